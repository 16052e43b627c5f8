"""What to ship from one validated recipe: the fold ensemble, their soup, or a refit? Scored on test/ only.

    python benchmarks/finals.py ../shared/data/clothing10 --image-size 128 --epochs 3

For each recipe (a fine-tune and the exact linear probe by default), the fold models are trained once
(5-fold cross-validation, as `autoft train` does), then each `final` ships from them as `autoft train
--final X` would: `ensemble` (the fold models), `soup` (their weight average, BatchNorm recomputed) and
`refit` (one model on every labelled image for the chosen epochs). Each is scored on test/ with its 95 %
interval; wall times are the shared cross-validation, what each final adds, and the shipped model's
prediction time per test image. Prints one JSON line per recipe (stdout) and a table (stderr).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from autoft.checkpoint import assemble
from autoft.config import Config
from autoft.estimate import Estimate
from autoft.finetune import evaluate_split, finetune, load_data, resolve_device, ship
from autoft.backbones import get_backbone

RECIPES = {  # the portfolio's hand_recipe (a full fine-tune) and linear_probe (every stage frozen, exact)
    "hand_recipe": dict(freeze_depth=0, aug_strength=0.5, head_lr=1e-2, base_lr=1e-3, optimizer="adam", t_max=10),
    "linear_probe": dict(freeze_depth="stages", aug_strength=0.0),
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data", type=Path)
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    spec = get_backbone(args.backbone)
    for name in args.recipes:
        keys = {k: spec.num_stages if v == "stages" else v for k, v in RECIPES[name].items()}
        cfg = Config(data=str(args.data), backbone=args.backbone, image_size=args.image_size, epochs=args.epochs,
                     device=args.device, **keys)
        data = load_data(cfg)
        t0 = time.perf_counter()
        folds = finetune(cfg, data)
        cv_seconds = time.perf_counter() - t0
        row = {"recipe": name, "config": {k: v for k, v in cfg.to_dict().items() if k in keys or k in
                                          ("backbone", "image_size", "epochs")},
               "estimate": folds.best["val_accuracy"], "best_epoch": folds.best["epoch"], "cv_seconds": cv_seconds}
        for final in ("ensemble", "soup", "refit"):
            t0 = time.perf_counter()
            shipped = ship(cfg.replace(final=final), data, folds)
            ship_seconds = time.perf_counter() - t0
            device = resolve_device(cfg.device)
            model = assemble(cfg.backbone, len(data.classes), shipped.members, shipped.shared_stages)
            model = model.to(device, memory_format=torch.channels_last)
            t0 = time.perf_counter()
            _, acc = evaluate_split(model, spec, cfg, data.test, 0, device)
            predict_ms = (time.perf_counter() - t0) / len(data.test) * 1000
            row[final] = {"test_accuracy": acc, "interval": list(Estimate(acc, len(data.test)).interval),
                          "images": len(data.test), "ship_seconds": ship_seconds, "predict_ms_per_image": predict_ms}
            print(f"{name:<13} {final:<9} test {acc:.4f} ({row[final]['interval'][0]:.3f}-"
                  f"{row[final]['interval'][1]:.3f})  +{ship_seconds:6.1f} s to ship after {cv_seconds:.1f} s of CV, "
                  f"{predict_ms:.2f} ms/image", file=sys.stderr, flush=True)
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
