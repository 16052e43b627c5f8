"""Test-time augmentation: the mean of the logits on the image and on its mirror image, chosen on out-of-fold
predictions, stored in the checkpoint and applied by predict, evaluate and export."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from conftest import make_image_folder

from autoft.backbones import FlipAveraged, build_model
from autoft.cache import RunCache, load_data
from autoft.data.augment import center_crop
from autoft.results.predict import evaluate, export, image_paths, load_model
from autoft.results.summary import tta_line
from autoft.training.checkpoint import assemble, load_checkpoint, model_from_checkpoint
from autoft.training.inference import predict_logits
from autoft.training.loop import build_on_device, finetune, plan_folds
from autoft.training.run import train

CPU = torch.device("cpu")


def test_tta_off_is_the_model_itself_bit_for_bit(tmp_path, tiny_config):
    metrics = train(tiny_config.replace(tta="none"), tmp_path / "run")
    assert metrics["tta"] == "none" and metrics["tta_gain"] is None  # not even tried
    ckpt = load_checkpoint(tmp_path / "run" / "model.pt")
    assert ckpt["tta"] == "none"
    plain = assemble("tiny_cnn", 2, [ckpt["state_dict"]], 0)
    off = assemble("tiny_cnn", 2, [ckpt["state_dict"]], 0, tta="none")
    x = torch.rand(4, 3, 32, 32)
    assert type(off) is type(plain) and torch.equal(off.eval()(x), plain.eval()(x))
    del ckpt["tta"]  # a checkpoint written before test-time augmentation: none
    assert not isinstance(model_from_checkpoint(ckpt)[0], FlipAveraged)


def test_tta_on_is_the_mean_of_the_flipped_and_plain_logits(tiny_config):
    net = build_model("tiny_cnn", 3, seed=1)[0].eval()
    x = torch.rand(5, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(FlipAveraged(net)(x), (net(x) + net(x.flip(-1))) / 2)
    data = load_data(tiny_config)
    cache = RunCache()  # the frozen prefix of both views from the feature cache gives the same
    direct = predict_logits(FlipAveraged(net), _spec(), tiny_config, data.labelled, 0, CPU)
    cached = predict_logits(FlipAveraged(net), _spec(), tiny_config, data.labelled, 2, CPU, cache=cache)
    torch.testing.assert_close(cached, direct, atol=1e-6, rtol=0)
    assert sum(cache.feature_passes.values()) == 2  # the plain images and their mirror images, once each


def _spec():
    from autoft.backbones import get_backbone

    return get_backbone("tiny_cnn")


def test_tta_is_chosen_on_out_of_fold_predictions_and_off_where_a_flip_changes_the_class(tiny_config):
    """The fixture's classes are a bright square top left (cat) or top right (dog): a mirror image is the other
    class. A probe scores the flip badly out of fold and leaves it off; forced on, the kept scores and out-of-fold
    probabilities are those of the mean of each fold model's plain and mirrored logits."""
    cfg = tiny_config.replace(freeze_depth=3, aug_strength=0.0)
    auto = finetune(cfg)
    assert auto.tta == "none" and auto.best["tta_gain"] < 0 and auto.best["val_accuracy"] == 1.0
    forced = finetune(cfg.replace(tta="flip"))
    assert forced.tta == "flip" and forced.best["tta_gain"] == pytest.approx(auto.best["tta_gain"])
    data = load_data(cfg)
    expected = np.zeros_like(forced.oof)
    for fold, state in zip(plan_folds(cfg, data), forced.members):
        model, spec = build_on_device(cfg, 2, CPU)
        model.load_state_dict(state)
        views = [
            predict_logits(model, spec, cfg, data.labelled, 0, CPU, fold.val, flip=f).log_softmax(1)
            for f in (False, True)
        ]
        expected[fold.val.numpy()] = ((views[0] + views[1]) / 2).softmax(1).numpy()
    np.testing.assert_allclose(forced.oof, expected, atol=1e-5)
    y = data.labelled.labels.numpy()
    assert forced.best["val_accuracy"] == pytest.approx(float((expected.argmax(1) == y).mean()))
    assert forced.best["val_accuracy"] == pytest.approx(1.0 + forced.best["tta_gain"])
    assert "none (a flip changed the estimate by -" in tta_line(auto.best)
    assert tta_line(forced.best).startswith("test-time augmentation: flip")


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_a_tta_model_predicts_evaluates_and_exports_as_its_checkpoint_says(tmp_path, tiny_config, fmt):
    pytest.importorskip("onnxruntime") if fmt == "onnx" else None
    root = make_image_folder(tmp_path / "d", splits=("train", "val", "test"))
    metrics = train(tiny_config.replace(data=str(root), tta="flip"), tmp_path / "run")
    assert metrics["tta"] == "flip" and load_checkpoint(tmp_path / "run" / "model.pt")["tta"] == "flip"
    model = load_model(tmp_path / "run" / "model.pt", device="cpu")
    assert isinstance(model.model, FlipAveraged)
    paths = image_paths([root / "test"])
    x = center_crop(model.preprocess(paths), 32)
    inner = model.model.model
    with torch.no_grad():
        plain, mirrored = inner((x - 0.5) / 0.5), inner((x.flip(-1) - 0.5) / 0.5)
    torch.testing.assert_close(model.logits(paths), (plain + mirrored) / 2, atol=1e-5, rtol=0)
    result = evaluate(tmp_path / "run" / "model.pt", split="test")
    assert result["accuracy"] == float(np.mean(np.array(model.predict(paths)) == [p.split("/")[-2] for p in paths]))
    exported = export(tmp_path / "run" / "model.pt", fmt, tmp_path / f"model.{fmt}")
    if fmt == "onnx":
        import onnxruntime

        got = torch.from_numpy(onnxruntime.InferenceSession(str(exported.path)).run(None, {"image": x.numpy()})[0])
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            got = torch.jit.load(str(exported.path))(x)
    torch.testing.assert_close(got, model.logits(paths), atol=1e-4, rtol=0)
