"""An ensemble of trials ships as one checkpoint: several models with weights, predicted and exported as one."""

from __future__ import annotations

import torch

from autoft.backbones import build_model
from autoft.checkpoint import save_checkpoint
from autoft.config import Config
from autoft.data import center_crop, normalize
from autoft.predict import export, load_model


def test_weighted_ensemble_predicts_the_weighted_mean_and_exports_as_one_graph(tmp_path):
    nets = [build_model("tiny_cnn", 3, seed=s)[0] for s in (1, 2, 3)]
    for i, net in enumerate(nets):  # distinct trained-looking members
        with torch.no_grad():
            net.head.weight.mul_(5 + i)
    weights = [0.6, 0.3, 0.1]
    cfg = Config(backbone="tiny_cnn", image_size=32, device="cpu")
    path = tmp_path / "mix.pt"
    save_checkpoint(path, [n.state_dict() for n in nets], ["a", "b", "c"], cfg, {"shipped": "mix"}, 0, weights=weights)
    model = load_model(path, device="cpu")
    x = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)
    spec = model.spec
    inputs = normalize(center_crop(x, 32), spec.mean, spec.std)
    expected = sum(w * n.eval()(inputs).softmax(1) for w, n in zip(weights, nets))
    torch.testing.assert_close(model._logits(x).softmax(1), expected, atol=1e-5, rtol=0)
    for fmt in ("torchscript",):
        out = export(path, fmt, tmp_path / f"mix.{fmt}")
        assert out.max_abs_diff <= 1e-4  # the exported graph against PyTorch, on a sample batch
        traced = torch.jit.load(str(out.path))
        torch.testing.assert_close(traced(center_crop(x, 32)).softmax(1), expected, atol=1e-4, rtol=0)
