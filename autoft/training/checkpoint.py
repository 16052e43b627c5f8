"""Checkpoints carry weights, class names and the resolved config, so a result reproduces from its file alone.

A checkpoint holds one model or an ensemble of fold models. `state_dict` is always one complete model
(the only one, or the first member); the other members store only the tensors after their shared frozen
stages, so a probe's ensemble costs a few heads, not k backbones.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..backbones import Ensemble, FlipAveraged, LogitAdjusted, build_model
from ..config import Config
from ..data.scan import Fingerprint
from ..exceptions import AutoftError, ConfigError
from ..system.files import atomic_torch_save, torch_load, versions

FORMAT = "autoft-checkpoint/2"
READABLE = ("autoft-checkpoint/1", FORMAT)  # format 1: one model, no members


def save_checkpoint(
    path: str | os.PathLike,
    members: Sequence[dict[str, torch.Tensor]],
    classes: list[str],
    config: Config,
    metrics: dict[str, Any] | None = None,
    shared_stages: int = 0,
    tau: float = 0.0,
    prior: Sequence[float] = (),
    data: Fingerprint | None = None,
    weights: Sequence[float] | None = None,
    tta: str = "none",
) -> None:
    """Write `checkpoint(...)` of these arguments to `path`, atomically."""
    atomic_torch_save(
        path, checkpoint(members, classes, config, metrics, shared_stages, tau, prior, data, weights, tta)
    )


def checkpoint(
    members: Sequence[dict[str, torch.Tensor]],
    classes: list[str],
    config: Config,
    metrics: dict[str, Any] | None = None,
    shared_stages: int = 0,
    tau: float = 0.0,
    prior: Sequence[float] = (),
    data: Fingerprint | None = None,
    weights: Sequence[float] | None = None,
    tta: str = "none",
) -> dict[str, Any]:
    """One model (one member) or an ensemble whose members share their first `shared_stages` stages, averaged
    with `weights` (one per member; uniform when None); with its logit adjustment `tau` for the class `prior`
    and its test-time augmentation `tta` (applied by every reader: predict, evaluate, export), and `data`, the
    fingerprint of the images it trained on (so `evaluate` knows new data from seen data). What
    `load_checkpoint` returns; one without `tta` (written before it) has none."""
    shared = _prefixes(shared_stages)
    rest = [{k: v for k, v in m.items() if not k.startswith(shared)} for m in members[1:]]
    return {
        "format": FORMAT,
        "state_dict": dict(members[0]),
        "members": rest,
        "shared_stages": shared_stages,
        "classes": list(classes),
        "config": config.portable().to_dict(),
        "metrics": dict(metrics or {}),
        "versions": versions(),
        "logit_adjustment": {"tau": float(tau), "prior": [float(p) for p in prior]},
        "data": data.to_dict() if data is not None else None,
        "tta": tta,
    } | ({"member_weights": [float(w) for w in weights]} if weights is not None else {})


def trained_on(ckpt: dict[str, Any]) -> Fingerprint | None:
    """The fingerprint of the data a checkpoint trained on; None for one written before fingerprints."""
    try:
        return Fingerprint.from_dict(ckpt["data"]) if ckpt.get("data") else None
    except (KeyError, TypeError, AttributeError):
        return None


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a checkpoint with weights_only=True: a pickle that carries code is refused, not run."""
    if not os.path.isfile(path):
        raise AutoftError(
            f"model file {os.fspath(path)!r} {'is a folder' if os.path.isdir(path) else 'does not exist'}"
        )
    return _read(path, os.fspath(path))


def checkpoint_from_bytes(data: bytes, name: str) -> dict[str, Any]:
    """A checkpoint held in memory (an Optuna artifact), read as `load_checkpoint` reads a file; `name` for errors."""
    return _read(io.BytesIO(data), name)


def _read(source: str | os.PathLike | io.BytesIO, name: str) -> dict[str, Any]:
    ckpt = torch_load(source, name)
    if not isinstance(ckpt, dict) or ckpt.get("format") not in READABLE:
        raise AutoftError(f"{name} is not an autoft checkpoint (write one with autoft train or autoft search)")
    for key, ok in (
        ("state_dict", lambda v: isinstance(v, dict) and all(isinstance(t, torch.Tensor) for t in v.values())),
        ("classes", lambda v: isinstance(v, list) and len(v) >= 2 and all(isinstance(c, str) for c in v)),
        ("config", lambda v: isinstance(v, dict)),
    ):
        if key not in ckpt:
            raise AutoftError(f"{name} is an incomplete autoft checkpoint: it has no {key!r}")
        if not ok(ckpt[key]):
            raise AutoftError(f"{name} is a damaged autoft checkpoint: its {key!r} is not what autoft writes")
    return ckpt


def model_from_checkpoint(ckpt: dict[str, Any]) -> tuple[nn.Module, Config]:
    """Rebuild the network (a Net, or an Ensemble of them) without reading pretrained weights: the checkpoint
    has all of them."""
    config = Config.from_dict(ckpt["config"])
    adjustment = ckpt.get("logit_adjustment") or {}
    return assemble(
        config.backbone,
        len(ckpt["classes"]),
        members(ckpt),
        ckpt.get("shared_stages", 0),
        adjustment.get("tau", 0.0),
        adjustment.get("prior", ()),
        ckpt.get("member_weights"),
        ckpt.get("tta", "none"),
    ).eval(), config


def members(ckpt: dict[str, Any]) -> list[dict[str, torch.Tensor]]:
    """Every member's complete state dict (the shared frozen stages are stored once, in the first)."""
    first = ckpt["state_dict"]
    return [first] + [{**first, **rest} for rest in ckpt.get("members", [])]


def assemble(
    backbone: str,
    num_classes: int,
    members: Sequence[dict[str, torch.Tensor]],
    shared_stages: int,
    tau: float = 0.0,
    prior: Sequence[float] = (),
    weights: Sequence[float] | None = None,
    tta: str = "none",
) -> nn.Module:
    """The model that `members` (complete state dicts) make: the Net itself for one, else their Ensemble (weighted
    by `weights`, uniform when None); logit adjusted when `tau` is not 0, and flip-averaged when `tta` is flip
    (tau = 0 and no tta: the model itself, nothing wrapped)."""
    nets = []
    for state in members:
        net, _ = build_model(backbone, num_classes, weights="random")
        try:
            net.load_state_dict(state)
        except RuntimeError as exc:
            raise ConfigError(
                f"checkpoint weights do not fit backbone {backbone!r}: {str(exc).splitlines()[0]}"
            ) from None
        nets.append(net)
    model = nets[0] if len(nets) == 1 else Ensemble(nets, shared_stages, weights)
    model = LogitAdjusted(model, tau, list(prior)) if tau else model
    return FlipAveraged(model) if tta == "flip" else model


def _prefixes(shared_stages: int) -> tuple[str, ...]:
    return tuple(f"stages.{i}." for i in range(shared_stages))


def shipped(path: str | os.PathLike) -> str:
    """What a checkpoint holds, in words ("ensemble of 5 fold models", ...), for summaries."""
    try:
        return load_checkpoint(path)["metrics"].get("shipped", "one model")
    except AutoftError as exc:
        return str(exc)
