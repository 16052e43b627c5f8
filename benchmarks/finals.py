"""What to ship from one validated recipe: the fold ensemble, their soup, or a refit? Scored on test/ only.

    python benchmarks/finals.py ../shared/data/clothing10
    python benchmarks/finals.py ../shared/data/clothing10_longtail --metric balanced_accuracy
    python benchmarks/finals.py ../shared/data/hotdog_nothotdog --val-as-test

For each recipe (the portfolio's full fine-tune and its exact linear probe by default, at the product's
defaults: 128 px, 5 epochs), the fold models are trained once (5-fold cross-validation, as `autoft train`
does), then each `final` ships from them as `autoft train --final X` would: `ensemble` (the fold models),
`soup` (their weight average, BatchNorm recomputed) and `refit` (one model on every labelled image for the
chosen epochs). Each is scored on test/ (every metric with its 95 % interval); beside it, what it costs:
the wall time the final adds after the shared cross-validation, and its prediction cost, the models run per
image (frozen stages shared by the fold models run once) and the measured milliseconds per test image.
Prints one JSON line per recipe (stdout) and a table (stderr).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from autoft.backbones import get_backbone
from autoft.cache import load_data
from autoft.config import Config
from autoft.estimate import METRICS, scored
from autoft.training.checkpoint import assemble
from autoft.training.finals import ship
from autoft.training.inference import evaluate_split
from autoft.training.loop import finetune, resolve_device

RECIPES = {  # the portfolio's hand_recipe (a full fine-tune) and linear_probe (every stage frozen, exact)
    "hand_recipe": dict(freeze_depth=0, aug_strength=0.5, head_lr=1e-2, base_lr=1e-3, optimizer="adam", t_max=10),
    "linear_probe": dict(freeze_depth="stages", aug_strength=0.0),
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data", type=Path)
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--image-size", type=int, default=Config().image_size)
    ap.add_argument("--epochs", type=int, default=Config().epochs)
    ap.add_argument("--metric", default="accuracy", choices=METRICS, help="what the kept epoch is chosen on")
    ap.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    ap.add_argument("--val-as-test", action="store_true", help="score on val/ (data without a test/ split)")
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    spec = get_backbone(args.backbone)
    with tempfile.TemporaryDirectory() as tmp:
        root = args.data
        if args.val_as_test:  # train/ as it is, val/ as test/: the folds see train/ only
            root = Path(tmp) / "val_as_test"
            root.mkdir()
            os.symlink((args.data / "train").resolve(), root / "train")
            os.symlink((args.data / "val").resolve(), root / "test")
        for name in args.recipes:
            print(json.dumps(run(name, root, spec, args)), flush=True)
    return 0


def run(name: str, root: Path, spec, args: argparse.Namespace) -> dict:
    keys = {k: spec.num_stages if v == "stages" else v for k, v in RECIPES[name].items()}
    cfg = Config(
        data=str(root),
        backbone=args.backbone,
        image_size=args.image_size,
        epochs=args.epochs,
        device=args.device,
        metric=args.metric,
        **keys,
    )
    data = load_data(cfg)
    device = resolve_device(cfg.device)
    t0 = time.perf_counter()
    folds = finetune(cfg, data)
    cv_seconds = time.perf_counter() - t0
    row = {
        "data": str(args.data),
        "recipe": name,
        "metric": args.metric,
        "config": {k: v for k, v in cfg.to_dict().items() if k in keys or k in ("backbone", "image_size", "epochs")},
        "estimate": folds.best[f"val_{args.metric}"],
        "best_epoch": folds.best["epoch"],
        "cv_seconds": cv_seconds,
    }
    for final in ("ensemble", "soup", "refit"):
        t0 = time.perf_counter()
        shipped = ship(cfg.replace(final=final), data, folds)
        ship_seconds = time.perf_counter() - t0
        model = assemble(
            cfg.backbone, len(data.classes), shipped.members, shipped.shared_stages, shipped.tau, shipped.prior
        )
        model = model.to(device, memory_format=torch.channels_last)
        evaluate_split(model, spec, cfg, data.test.subset(torch.arange(min(8, len(data.test)))), 0, device)  # warm-up
        t0 = time.perf_counter()
        _, pred = evaluate_split(model, spec, cfg, data.test, 0, device)
        predict_ms = (time.perf_counter() - t0) / len(data.test) * 1000
        test = scored(data.test.labels.numpy(), pred, len(data.classes))
        models = len(shipped.members)
        row[final] = {
            "test": test,
            "ship_seconds": ship_seconds,
            "models_per_image": models,
            "shared_stages": shipped.shared_stages if models > 1 else 0,
            "predict_ms_per_image": predict_ms,
        }
        m = test[args.metric]
        print(
            f"{name:<13} {final:<9} test {args.metric} {m['value']:.4f} ({m['interval'][0]:.3f}-"
            f"{m['interval'][1]:.3f}), {models} model(s)/image, {predict_ms:.2f} ms/image, +{ship_seconds:.1f} s "
            f"to ship after {cv_seconds:.1f} s of CV",
            file=sys.stderr,
            flush=True,
        )
    return row


if __name__ == "__main__":
    sys.exit(main())
