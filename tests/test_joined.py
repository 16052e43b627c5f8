"""One probe on several backbones at once: their pooled features side by side (backbones.Concatenated), one exact
logistic regression, shipped as one model; and `--backbone auto`, which probes each backbone, then all of them,
then spreads the fine-tuning trials by the evidence."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import make_image_folder
from optuna.trial import TrialState
from sklearn.linear_model import LogisticRegressionCV
from sklearn.model_selection import StratifiedKFold
from sklearn.preprocessing import StandardScaler

from autoft.backbones import _REGISTRY, JOIN, _tiny_cnn, get_backbone, pretrained_stages, register_backbone
from autoft.cache import RunCache, load_data
from autoft.data.augment import center_crop, normalize
from autoft.results import records
from autoft.results.predict import evaluate, export, image_paths, load_model
from autoft.space import next_backbone, shares
from autoft.study.run import SearchOptions, run_search
from autoft.training import probe
from autoft.training.checkpoint import assemble
from autoft.training.inference import frozen_features, predict_logits
from autoft.training.loop import build_on_device, finetune, plan_folds
from autoft.training.run import train

CPU = torch.device("cpu")
OTHER = "tiny_cnn_24"  # a second test backbone, at another native size and normalisation: its input is resized
JOINED = f"tiny_cnn{JOIN}{OTHER}"


@pytest.fixture(autouse=True)
def other_backbone():
    register_backbone(
        OTHER,
        stages=3,
        mean=(0.4, 0.45, 0.5),
        std=(0.3, 0.25, 0.2),
        native_size=24,
        offline=True,
        pretrained=False,
        description="tiny_cnn at 24 px, for tests",
    )(_tiny_cnn)
    yield
    del _REGISTRY[OTHER]


def test_a_joined_backbone_crops_and_resizes_the_one_input_for_each_backbone():
    spec = get_backbone(JOINED)
    assert spec.num_stages == 1 and spec.crop_pct == 1.0 and spec.native_size == 36  # tiny_cnn's store: 32 / 0.875
    (stage,) = build_on_device(_cfg(None), 3, CPU)[0].stages
    assert [stage.crop(i, 36) for i in range(2)] == [32, 30]  # 24 / 28 of the side, as tiny_cnn_24's own eval
    assert stage.view_key(0, 36) == 32 and stage.view_key(1, 36) == (30, 24)
    x = torch.rand(2, 3, 36, 36)
    expected = F.interpolate(x[..., 3:33, 3:33], size=(24, 24), mode="bicubic", antialias=True, align_corners=False)
    expected = normalize(expected, (0.4, 0.45, 0.5), (0.3, 0.25, 0.2))
    torch.testing.assert_close(stage.view(1, x), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(stage.view(0, x), normalize(x[..., 2:34, 2:34], (0.5,) * 3, (0.5,) * 3), atol=0, rtol=0)
    with pytest.raises(Exception, match="two or more different backbones"):
        get_backbone(f"tiny_cnn{JOIN}tiny_cnn")


def _cfg(data):
    from autoft.config import Config

    return Config(
        data=data,
        backbone=JOINED,
        image_size=36,
        batch_size=8,
        epochs=2,
        device="cpu",
        freeze_depth=1,
        aug_strength=0.0,
    )


@pytest.mark.slow
def test_joined_probe_is_scikit_learns_fit_on_the_concatenated_features_and_shares_the_first_probes(tmp_path):
    root = make_image_folder(tmp_path / "d", classes=("a", "b", "c"), per_class=16)
    _mislabel(root)
    cfg = _cfg(str(root))
    cache = RunCache()
    single = cfg.replace(backbone="tiny_cnn", image_size=32, freeze_depth=3)
    finetune(single, cache=cache)  # tiny_cnn's own probe first: its store is the joined model's input
    result = finetune(cfg, cache=cache)
    assert len(result.history) == 1 and result.best[probe.EXACT]
    passes = cache.feature_passes  # tiny_cnn's features once, shared; tiny_cnn_24's once; each also mirrored (tta)
    assert sorted(passes.values()) == [1, 1, 1, 1] and sum("flip" in str(k) for k in passes) == 2, passes

    data = load_data(cfg)
    y = data.labelled.labels.numpy()
    stored = data.labelled.read()  # uint8 at 36 px
    with torch.no_grad():  # each backbone's features by hand, as its own eval transform would make them
        mine = _stages("tiny_cnn")(normalize(center_crop(stored, 32), (0.5,) * 3, (0.5,) * 3))
        resized = F.interpolate(
            center_crop(stored, 30), size=(24, 24), mode="bicubic", antialias=True, align_corners=False
        )
        other = _stages(OTHER)(normalize(resized, (0.4, 0.45, 0.5), (0.3, 0.25, 0.2)))
    fresh = RunCache()  # the joined model's own first part, computed afresh, is tiny_cnn's probe's features exactly
    joined = frozen_features(
        build_on_device(cfg, 3, CPU)[0], get_backbone(JOINED), cfg, fresh.images(data.labelled, CPU), 1, CPU, fresh
    )
    single_data = load_data(single)
    alone = frozen_features(
        build_on_device(single, 3, CPU)[0],
        get_backbone("tiny_cnn"),
        single,
        fresh.images(single_data.labelled, CPU),
        3,
        CPU,
        RunCache(),
    )
    assert torch.equal(joined[:, :32], alone)  # so the shared cache key holds what either would compute
    torch.testing.assert_close(joined, torch.cat([mine, other], 1), atol=1e-5, rtol=0)
    x = torch.cat([mine, other], 1).double().numpy()
    for i, fold in enumerate(plan_folds(cfg, data)):
        tr, va = fold.train.numpy(), fold.val.numpy()
        scaler = StandardScaler().fit(x[tr])
        inner = StratifiedKFold(probe.INNER_FOLDS, shuffle=True, random_state=cfg.seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            ref = LogisticRegressionCV(Cs=probe.CS, cv=inner, scoring="neg_log_loss", max_iter=probe.MAX_ITER).fit(
                scaler.transform(x[tr]), y[tr]
            )
        assert result.best[probe.CHOSEN_C][i] == pytest.approx(np.atleast_1d(ref.C_)[0])
        net = assemble(cfg.backbone, 3, [result.members[i]], 0)  # the shipped fold model, from the images
        got = predict_logits(net, get_backbone(JOINED), cfg, data.labelled, 0, CPU, fold.val).softmax(1).double()
        np.testing.assert_allclose(got.numpy(), ref.predict_proba(scaler.transform(x[va])), atol=1e-4)


def _stages(name):
    stages, _ = pretrained_stages(name, None)
    return torch.nn.Sequential(*stages).eval()


def _mislabel(root, share=0.3):
    """A share of each class moved to the next: labels no probe fits perfectly, so C matters."""
    import random
    import shutil

    rng = random.Random(0)
    for split in ("train", "val"):
        classes = sorted(p.name for p in (root / split).iterdir())
        moves = []
        for i, name in enumerate(classes):
            files = sorted((root / split / name).iterdir())
            moves += [
                (f, root / split / classes[(i + 1) % len(classes)] / f"moved_{f.name}")
                for f in rng.sample(files, int(len(files) * share))
            ]
        for src, dst in moves:
            shutil.move(src, dst)


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_a_joined_probe_ships_as_one_model_that_predicts_evaluates_and_exports(tmp_path, fmt):
    pytest.importorskip("onnxruntime") if fmt == "onnx" else None
    root = make_image_folder(tmp_path / "d", splits=("train", "val", "test"))
    metrics = train(_cfg(str(root)), tmp_path / "run")
    assert metrics["best_val_accuracy"] >= 0.9 and metrics["shipped"].startswith("ensemble of 5")
    model = load_model(tmp_path / "run" / "model.pt", device="cpu")
    paths = image_paths([root / "test"])
    assert model.predict(paths) == [p.split("/")[-2] for p in paths]
    assert evaluate(tmp_path / "run" / "model.pt", split="test")["accuracy"] == 1.0
    exported = export(tmp_path / "run" / "model.pt", fmt, tmp_path / f"model.{fmt}")
    assert exported.max_abs_diff <= 1e-4
    x = center_crop(model.preprocess(paths), 36)  # what the exported model takes: the stored image, in [0, 1]
    if fmt == "onnx":
        import onnxruntime

        got = torch.from_numpy(onnxruntime.InferenceSession(str(exported.path)).run(None, {"image": x.numpy()})[0])
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            got = torch.jit.load(str(exported.path))(x)
    torch.testing.assert_close(got, model.logits(paths), atol=1e-4, rtol=0)


def test_shares_follow_the_evidence_and_the_next_backbone_keeps_to_them():
    even = shares({"a": (0.8, 0.02), "b": (0.8, 0.02)})
    assert even == pytest.approx({"a": 0.5, "b": 0.5})
    ahead = shares({"a": (0.84, 0.015), "b": (0.82, 0.015), "c": (0.70, 0.02)})
    assert ahead["a"] > ahead["b"] > 0 and ahead["c"] == 0  # far behind: under MIN_SHARE, no fine-tuning trials
    assert sum(ahead.values()) == pytest.approx(1)
    counts: dict[str, int] = {}
    for _ in range(20):
        b = next_backbone(ahead, counts)
        counts[b] = counts.get(b, 0) + 1
    assert counts.get("c", 0) == 0 and abs(counts["a"] - 20 * ahead["a"]) <= 1


@pytest.mark.slow
def test_auto_search_probes_each_backbone_then_all_then_extracts_no_features_twice(tmp_path, monkeypatch):
    import autoft.study.run as study_module

    root = make_image_folder(tmp_path / "d")
    monkeypatch.setattr(study_module, "auto_backbones", lambda: ["tiny_cnn", OTHER])
    caches = []
    monkeypatch.setattr(study_module, "RunCache", lambda: caches.append(RunCache()) or caches[-1])
    base = _cfg(str(root)).replace(
        backbone="auto", image_size=32, freeze_depth=0, aug_strength=0.5, epochs=1, head_lr=0.05, base_lr=0.01
    )
    opts = SearchOptions(
        trials=8,
        progress=False,
        storage=f"sqlite:///{tmp_path / 's.db'}",
        out=str(tmp_path / "out"),
        artifacts=str(tmp_path / "art"),
        pruner="none",
    )
    study = run_search(base, opts, fixed=["backbone", "epochs"])
    trials = study.get_trials(deepcopy=False)
    names = [t.user_attrs.get(records.PORTFOLIO) for t in trials]
    assert names[:3] == ["linear_probe@tiny_cnn", f"linear_probe@{OTHER}", f"linear_probe@{JOINED}"]
    assert all(t.state == TrialState.COMPLETE for t in trials[:3])
    assert names[3:6] == ["hand_recipe", "freeze_unfreeze", "low_rate_full"]
    allocated = [t.user_attrs[records.ALLOCATED]["backbone"] for t in trials[3:]]
    assert len(allocated) == 5 and set(allocated) <= {"tiny_cnn", OTHER}  # fine-tunes: never the joined backbone
    assert [records.config(t).backbone for t in trials[3:]] == allocated
    from autoft.results.summary import allocation_line

    line = allocation_line(trials)
    assert line.startswith("fine-tuning trials by the probes' evidence") and f"{OTHER} " in line
    assert sum(int(part.rsplit("(", 1)[1].rstrip(")")) for part in line.split(": ", 1)[1].split(", ")) == 5
    (cache,) = caches
    passes = cache.feature_passes
    assert passes and max(passes.values()) == 1  # each backbone's features once per input, across every trial
    assert {k[1] for k in passes} == {"tiny_cnn", OTHER}


@pytest.mark.slow
def test_a_timm_model_with_cached_weights_is_probed_and_ranked_like_the_others(tmp_path, monkeypatch):
    import huggingface_hub.constants as hf
    from test_backbones import _cache_timm_weights

    import autoft.backbones as backbones
    import autoft.study.run as study_module

    monkeypatch.setattr(hf, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    _cache_timm_weights(tmp_path / "hub")
    backbones._timm_spec.cache_clear()
    monkeypatch.setattr(study_module, "auto_backbones", lambda: ["tiny_cnn", *backbones.cached_timm_models()])
    root = make_image_folder(tmp_path / "d")
    base = _cfg(str(root)).replace(backbone="auto", image_size=32, freeze_depth=0, aug_strength=0.5, epochs=1)
    opts = SearchOptions(
        trials=5,
        progress=False,
        storage=f"sqlite:///{tmp_path / 's.db'}",
        out=str(tmp_path / "out"),
        artifacts=str(tmp_path / "art"),
        pruner="none",
    )
    trials = run_search(base, opts, fixed=["backbone", "epochs"]).get_trials(deepcopy=False)
    timm_name = "timm/test_resnet.r160_in1k"
    assert trials[1].user_attrs[records.PORTFOLIO] == f"linear_probe@{timm_name}"
    assert trials[1].state == TrialState.COMPLETE and records.config(trials[1]).image_size == 160
    assert records.config(trials[2]).backbone == f"tiny_cnn{JOIN}{timm_name}"
    assert set(trials[3].user_attrs[records.ALLOCATED]["shares"]) == {"tiny_cnn", timm_name}
    backbones._timm_spec.cache_clear()


def test_a_search_compares_the_backbones_unless_one_is_set(tmp_path, monkeypatch):
    import autoft
    from autoft.cli import build_parser, resolve_config, search_args
    from autoft.config import Config

    monkeypatch.chdir(tmp_path)

    def searched(*argv):
        return search_args(build_parser().parse_args(["search", *argv]))[0].backbone

    assert searched("--data", "d") == "auto"
    assert searched("--data", "d", "--backbone", "tiny_cnn") == "tiny_cnn"
    (tmp_path / "autoft.yaml").write_text("backbone: efficientnet_lite1\n")  # a config file's is kept too
    assert searched("--data", "d") == "efficientnet_lite1"
    (tmp_path / "autoft.yaml").unlink()
    assert resolve_config(build_parser().parse_args(["train", "--data", "d"]))[0].backbone == "efficientnet_lite0"

    bases = []
    monkeypatch.setattr("autoft.study.run.run_search", lambda base, opts, fixed=(): bases.append(base))
    autoft.search(data="d", trials=1)
    autoft.search(data="d", trials=1, backbone="tiny_cnn")
    autoft.search(Config(data="d"), trials=1)  # a Config is taken as it is
    assert [b.backbone for b in bases] == ["auto", "tiny_cnn", "efficientnet_lite0"]
