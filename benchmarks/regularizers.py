"""Which of the regularizers users expect earn a place in the search space? Each one alone on top of the
portfolio's full fine-tune, measured by 5-fold cross-validation (the search's own estimate) and, to compare
designs only, on test/.

    python benchmarks/regularizers.py ../shared/data/clothing10
    python benchmarks/regularizers.py ../shared/data/clothing10_longtail --metric balanced_accuracy
    python benchmarks/regularizers.py ../shared/data/hotdog_nothotdog --val-as-test

Arms: the recipe as it is (`hand_recipe`: Lite0, 128 px, 5 epochs, every stage training, aug_strength 0.5,
Adam at 1e-2 / 1e-3), then with each of Mixup (alpha 0.2), CutMix (alpha 1.0), the weight average
(ModelEmaV3, decay 0.999 with its warmup), stochastic depth (drop_path_rate 0.1) and TrivialAugment, at
the values their papers and timm's recipes use for fine-tuning. Every arm trains the same folds from the same
seed, test-time augmentation off (it is measured apart: for each arm the out-of-fold and test effect of the
flip is reported too). Per arm: the out-of-fold estimate with its interval, its paired difference from the
plain recipe on the same images (bootstrap standard error, 2,000 resamples), the test score of the shipped
fold ensemble with its interval, with and without the flip, and the wall time. One JSON line per arm (stdout),
a table (stderr).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from autoft.backbones import FlipAveraged, get_backbone
from autoft.cache import load_data
from autoft.config import Config
from autoft.estimate import METRICS, Estimate, score, scored
from autoft.training.checkpoint import assemble
from autoft.training.inference import evaluate_split, predict_logits
from autoft.training.loop import adjusted, choose_tau, finetune, plan_folds, resolve_device

RECIPE = dict(freeze_depth=0, aug_strength=0.5, head_lr=1e-2, base_lr=1e-3, optimizer="adam", t_max=10)
ARMS = {
    "plain": {},
    "mixup": {"mixup": 0.2},
    "cutmix": {"cutmix": 1.0},
    "ema": {"ema_decay": 0.999},
    "drop_path": {"drop_path_rate": 0.1},
    "trivial_augment": {"trivial_augment": True},
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data", type=Path)
    ap.add_argument("--metric", default="accuracy", choices=METRICS)
    ap.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    ap.add_argument("--val-as-test", action="store_true", help="score on val/ (data without a test/ split)")
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = args.data
        if args.val_as_test:
            root = Path(tmp) / "val_as_test"
            root.mkdir()
            os.symlink((args.data / "train").resolve(), root / "train")
            os.symlink((args.data / "val").resolve(), root / "test")
        plain = None
        for arm in args.arms:
            row, oof = run(arm, root, args)
            if plain is None:
                plain = oof
            row["vs_plain"] = paired(plain, oof, args.metric)
            print(json.dumps(row), flush=True)
            e, d = row["estimate"], row["vs_plain"]
            t, f = row["test"][args.metric], row["test_with_flip"][args.metric]
            print(
                f"{arm:<16} estimate {e['value']:.4f} ({e['interval'][0]:.3f}-{e['interval'][1]:.3f}), "
                f"vs plain {d['difference']:+.4f} (se {d['se']:.4f}); test {t['value']:.4f} "
                f"({t['interval'][0]:.3f}-{t['interval'][1]:.3f}), with flip {f['value']:.4f} "
                f"(out of fold {row['flip_oof_gain']:+.4f}); {row['seconds']:.0f} s",
                file=sys.stderr,
                flush=True,
            )
    return 0


def run(arm: str, root: Path, args: argparse.Namespace) -> tuple[dict, tuple[np.ndarray, np.ndarray]]:
    """One arm: its cross-validation, out-of-fold predictions with and without the flip, and test scores."""
    cfg = Config(data=str(root), device=args.device, metric=args.metric, tta="none", **RECIPE, **ARMS[arm])
    data = load_data(cfg)
    t0 = time.perf_counter()
    result = finetune(cfg, data)
    seconds = time.perf_counter() - t0
    device = resolve_device(cfg.device)
    spec = get_backbone(cfg.backbone)
    classes = len(data.classes)
    model = assemble(cfg.backbone, classes, result.members, result.shared_stages, result.tau, result.prior)
    model = model.to(device, memory_format=torch.channels_last)
    y = data.test.labels.numpy()
    _, pred = evaluate_split(model, spec, cfg, data.test, 0, device)
    _, pred_flip = evaluate_split(FlipAveraged(model), spec, cfg, data.test, 0, device)
    labels = data.labelled.labels.numpy()
    log_prior = np.log(np.maximum(result.prior, 1e-12))
    plain = np.log(np.maximum(result.oof, 1e-30))
    mirrored = np.zeros_like(plain)  # each fold model on its held-out images, mirrored: the flip's out-of-fold effect
    for fold, state in zip(plan_folds(cfg, data), result.members):
        net = assemble(cfg.backbone, classes, [state], 0).to(device, memory_format=torch.channels_last)
        logits = predict_logits(net, spec, cfg, data.labelled, 0, device, fold.val, flip=True)
        mirrored[fold.val.numpy()] = logits.float().log_softmax(1).cpu().numpy()
    both = torch.from_numpy((plain + mirrored) / 2).log_softmax(1).numpy()
    oof_pred = adjusted(plain, log_prior, result.tau).argmax(1)
    flip_pred = adjusted(both, log_prior, choose_tau(cfg, both, labels, log_prior)).argmax(1)
    row = {
        "data": str(args.data),
        "arm": arm,
        "config": ARMS[arm],
        "metric": args.metric,
        "estimate": Estimate.of(result.best, result.validated, args.metric).to_dict(),
        "best_epoch": result.best["epoch"],
        "seconds": seconds,
        "test": scored(y, pred, classes),
        "test_with_flip": scored(y, pred_flip, classes),
        "flip_oof_gain": score(args.metric, labels, flip_pred, classes) - score(args.metric, labels, oof_pred, classes),
    }
    return row, (labels, oof_pred)


def paired(base: tuple, arm: tuple, metric: str, resamples: int = 2000) -> dict:
    """The arm's out-of-fold score less the plain recipe's on the same images, with its paired bootstrap standard
    error (images resampled with replacement, both scored on each resample)."""
    labels, a = base
    _, b = arm
    classes = int(labels.max()) + 1
    diff = score(metric, labels, b, classes) - score(metric, labels, a, classes)
    rng = np.random.default_rng(0)
    draws = [
        score(metric, labels[i], b[i], classes) - score(metric, labels[i], a[i], classes)
        for i in (rng.integers(0, len(labels), len(labels)) for _ in range(resamples))
    ]
    return {"difference": float(diff), "se": float(np.std(draws))}


if __name__ == "__main__":
    sys.exit(main())
