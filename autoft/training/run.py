"""`autoft train`: one recipe from a config, validated, shipped as validated, and scored on test/ when there is one.

The run validates as the search does (cross-validation on small data, else the holdout) and ships what
`final` says: the fold models at the best pooled epoch as one ensemble, their uniform weight average (a
soup), or a refit on every labelled image for that many epochs. So `autoft train --config best.yaml`
rebuilds the model a search exported.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import torch

from ..backbones import get_backbone
from ..cache import RunCache
from ..config import Config
from ..data.dataset import Dataset
from ..estimate import Estimate, scored
from ..system.files import atomic_write_text, check_writable_dir, versions
from .checkpoint import assemble, save_checkpoint
from .finals import ship, shipped_kind
from .inference import evaluate_split
from .loop import Report, Result, finetune, fold_notice, plan_folds, resolve_device

log = logging.getLogger("autoft")


def train(
    config: Config, out: str | os.PathLike = "runs/train", full: bool = False, report: Report | None = None
) -> dict[str, Any]:
    """Fine-tune once and write model.pt, config.yaml and metrics.json to `out`.

    `full` trains one model on every labelled image for `epochs` and keeps the last (nothing is held
    out, so nothing is validated). test/ is only ever scored, never used to choose anything.
    """
    t0 = time.perf_counter()
    check_writable_dir(out, "output folder")  # before training, not after it
    cache = RunCache()  # what this run keeps in memory, dropped when it returns
    data = cache.dataset(config)
    folds = [data.everything()] if full else plan_folds(config, data)
    notice = None if full else fold_notice(config, data)
    if notice:
        log.warning(notice)
    log.info(
        "training %s on %d labelled images (%d classes): %s",
        config.backbone,
        len(data.labelled),
        len(data.classes),
        "every image, nothing held out (--full)"
        if full
        else f"{len(folds)}-fold cross-validation"
        if len(folds) > 1
        else f"holdout of {len(data.holdout.val)}",
    )
    result = finetune(config, data, report, folds, cache)
    if config.final == "refit" and result.validated:
        log.info(
            "refit on all %d labelled images for %d epoch(s), the best by validation",
            len(data.labelled),
            result.best["epoch"],
        )
    shipped = ship(config, data, result, report, cache)
    metrics = run_metrics(result, shipped, data, full)
    metrics["seconds"] = time.perf_counter() - t0
    if data.test is not None:
        device = resolve_device(config.device)
        model = assemble(
            config.backbone,
            len(data.classes),
            shipped.members,
            shipped.shared_stages,
            result.tau,
            result.prior,
            tta=result.tta,
        )
        loss, pred = evaluate_split(
            model.to(device, memory_format=torch.channels_last),
            get_backbone(config.backbone),
            config,
            data.test,
            0,
            device,
            cache,
        )
        test = scored(data.test.labels.numpy(), pred, len(data.classes))
        metrics |= {"test_accuracy": test["accuracy"]["value"], "test_loss": loss, "test": test}
        log.info("test %s %.4f on %d images", config.metric, test[config.metric]["value"], len(data.test))
    out = Path(out)
    save_checkpoint(
        out / "model.pt",
        shipped.members,
        data.classes,
        config,
        {k: metrics.get(k) for k in ("best_val_accuracy", "best_val_score", "saved_epoch", "shipped", "test_accuracy")},
        shipped.shared_stages,
        result.tau,
        result.prior,
        data.fingerprint,
        tta=result.tta,
    )
    atomic_write_text(out / "config.yaml", config.portable().to_yaml())
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2))
    return metrics


def run_metrics(result: Result, shipped: Result, data: Dataset, full: bool) -> dict[str, Any]:
    """metrics.json: flat keys for scripts, then the detail."""
    validated = bool(result.validated)
    refitted = shipped is not result and result.config.final == "refit"
    metric = result.config.metric
    estimate = Estimate.of(result.best, result.validated, metric) if validated else None
    return {
        "best_val_accuracy": result.best["val_accuracy"] if validated else None,
        "metric": metric,
        "best_val_score": estimate.value if estimate else None,
        "tau": result.tau,
        "tta": result.tta,
        "tta_gain": result.best.get("tta_gain"),
        "final_val_accuracy": result.final.get("val_accuracy"),
        "epochs_run": len(result.history),
        "saved_epoch": shipped.best["epoch"],
        "shipped": shipped_kind(result, shipped),
        "estimate": estimate.to_dict() if estimate else None,
        "best": result.best,
        "final": result.final,
        "history": result.history,
        "refit_history": shipped.history if refitted else None,
        "wall_time_s": result.wall_time + (shipped.wall_time if refitted else 0.0),
        "device": result.device,
        "full": full,
        "skipped_images": len(data.skipped),
        "versions": versions(),
    }
