"""`autoft train`: one fine-tune from a config, saved with its config, and scored on test/ when there is one."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from .backbones import build_model
from .checkpoint import save_checkpoint
from .config import Config
from .data import Dataset, Split
from .files import atomic_write_text, check_writable_dir, versions
from .finetune import evaluate_split, finetune, load_data, resolve_device

log = logging.getLogger("autoft")


def train(config: Config, out: str | os.PathLike = "runs/train", full: bool = False, report=None) -> dict[str, Any]:
    """Fine-tune once and write model.pt, config.yaml and metrics.json to `out`.

    `full` trains on train+val for the configured epochs and keeps the last weights (validation is then
    seen data, so it cannot pick an epoch). test/ is only ever scored, never used to choose anything.
    """
    check_writable_dir(out, "output folder")  # before training, not after it
    data = load_data(config)
    if full:
        data = Dataset(data.classes, _concat(data.train, data.val), data.val, data.test, data.image_size, data.store_size, data.skipped)
    log.info("training %s on %d images (%d classes), validating on %d%s", config.backbone, len(data.train),
             len(data.classes), len(data.val), " (seen: --full)" if full else "")
    result = finetune(config, data, report=report)
    metrics: dict[str, Any] = {"best": result.best, "final": result.final, "history": result.history,
                               "wall_time_s": result.wall_time, "device": result.device, "full": full,
                               "skipped_images": len(data.skipped), "versions": versions()}
    state = result.last_state_dict if full else result.state_dict
    if data.test is not None:
        model, spec = build_model(config.backbone, len(data.classes), weights="random")
        model.load_state_dict(state)
        device = resolve_device(config.device)
        model = model.to(device, memory_format=torch.channels_last)
        loss, acc = evaluate_split(model, spec, config, data.test, 0, device)
        metrics.update(test_accuracy=acc, test_loss=loss)
        log.info("test accuracy %.4f on %d images", acc, len(data.test))
    out = Path(out)
    save_checkpoint(out / "model.pt", state, data.classes, config, metrics["best"] | {"test_accuracy": metrics.get("test_accuracy")})
    atomic_write_text(out / "config.yaml", config.to_yaml())
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2))
    return metrics


def _concat(a: Split, b: Split) -> Split:
    return Split(torch.cat([a.images, b.images]), torch.cat([a.labels, b.labels]), a.paths + b.paths)
