"""Checkpoints carry weights, class names and the resolved config, so a result reproduces from its file alone."""

from __future__ import annotations

import os
from typing import Any

import torch

from .files import atomic_torch_save, versions
from .backbones import Net, build_model
from .config import Config
from .exceptions import AutoftError, ConfigError

FORMAT = "autoft-checkpoint/1"


def save_checkpoint(path: str | os.PathLike, state_dict: dict[str, torch.Tensor], classes: list[str], config: Config,
                    metrics: dict[str, Any] | None = None) -> None:
    atomic_torch_save(path, {"format": FORMAT, "state_dict": state_dict, "classes": list(classes),
                             "config": config.to_dict(), "metrics": dict(metrics or {}), "versions": versions()})


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a checkpoint with weights_only=True: a pickle that carries code is refused, not run."""
    if not os.path.isfile(path):
        raise AutoftError(f"model file {os.fspath(path)!r} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise AutoftError(f"{os.fspath(path)} is not a loadable autoft checkpoint (weights_only refused it: {type(exc).__name__})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise AutoftError(f"{os.fspath(path)} is not an autoft checkpoint (write one with autoft train or autoft search)")
    for key, ok in (("state_dict", lambda v: isinstance(v, dict) and all(isinstance(t, torch.Tensor) for t in v.values())),
                    ("classes", lambda v: isinstance(v, list) and len(v) >= 2 and all(isinstance(c, str) for c in v)),
                    ("config", lambda v: isinstance(v, dict))):
        if key not in ckpt:
            raise AutoftError(f"{os.fspath(path)} is an incomplete autoft checkpoint: it has no {key!r}")
        if not ok(ckpt[key]):
            raise AutoftError(f"{os.fspath(path)} is a damaged autoft checkpoint: its {key!r} is not what autoft writes")
    return ckpt


def model_from_checkpoint(ckpt: dict[str, Any]) -> tuple[Net, Config]:
    """Rebuild the network without reading pretrained weights: the checkpoint has all of them."""
    config = Config.from_dict(ckpt["config"])
    model, _ = build_model(config.backbone, len(ckpt["classes"]), weights="random")
    try:
        model.load_state_dict(ckpt["state_dict"])
    except RuntimeError as exc:
        raise ConfigError(f"checkpoint weights do not fit backbone {config.backbone!r}: {str(exc).splitlines()[0]}") from None
    return model.eval(), config
