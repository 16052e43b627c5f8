"""The finals: what ships from a run's validated fold models, as its `final` says (the ensemble itself, the soup
of their weights, or the recipe refitted on every labelled image): the one owner of what `final` means, for
`autoft train` (`ship`) and for a study's exports (`shipped_model`, `mixed_models`), which only write what it makes.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..backbones import BackboneSpec, Net
from ..cache import Images, RunCache
from ..config import Config
from ..data.dataset import Dataset
from .checkpoint import checkpoint, checkpoint_from_bytes, members
from .inference import autocast, eval_input, frozen_features
from .loop import Report, Result, build_on_device, cpu_copy, finetune, resolve_device

log = logging.getLogger("autoft")
Weights = dict[str, Any] | bytes  # a checkpoint, or a checkpoint file's bytes (a kept artifact, passed on as it is)


def refit_config(cfg: Config, epochs: int, tau: float = 0.0, tta: str = "none") -> Config:
    """The recipe for `epochs` epochs on every labelled image, along the validated learning-rate curve, with the
    logit adjustment `tau` and test-time augmentation `tta` the validation chose (the refit validates nothing to
    choose them on).

    The schedule is a function of the epoch, not of the step, so the refit's last epoch ends where the
    validated run's epoch `epochs` ended (same warmup, same cosine period), not at a re-stretched cosine.
    """
    return cfg.replace(
        epochs=epochs,
        t_max=cfg.cosine_t_max,
        head_only_epochs=min(cfg.head_only_epochs, epochs),
        patience=0,
        logit_adjustment=tau,
        tta=tta,
    )


def ship(
    cfg: Config, data: Dataset, result: Result, report: Report | None = None, cache: RunCache | None = None
) -> Result:
    """What a validated run ships, as `final` says: `result` itself (its fold models, the ensemble the score
    validated); their uniform soup (`soup`); or the recipe retrained on every labelled image for the epochs the
    score chose (`refit`). Nothing validated (a refit itself): `result`."""
    if cfg.final == "ensemble" or not result.validated:
        return result
    if cfg.final == "soup":
        return (
            dataclasses.replace(result, members=[make_soup(cfg, data, result.members, cache)])
            if len(result.members) > 1
            else result
        )
    return refit(cfg, data, result.best["epoch"], report, cache, result.tau, result.tta)


def soup(members: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The uniform model soup (Wortsman et al., ICML 2022): every floating-point tensor averaged over the members;
    integer counters (BatchNorm's num_batches_tracked) from the first member."""
    return {
        k: torch.stack([m[k] for m in members]).mean(0) if v.is_floating_point() else v.clone()
        for k, v in members[0].items()
    }


def make_soup(
    cfg: Config, data: Dataset, members: Sequence[Mapping[str, torch.Tensor]], cache: RunCache | None = None
) -> dict[str, torch.Tensor]:
    """The fold models as one model at one model's prediction cost: their uniform `soup`, then the BatchNorm
    statistics of the stages that trained recomputed on every labelled image (eval transform), as SWA does
    (Izmailov et al. 2018; torch.optim.swa_utils.update_bn): averaged weights change the activations, so
    averaged statistics would not match them (measured: a soup with averaged statistics fell to chance where
    the recomputed one kept the fold models' accuracy). Frozen stages are the same in every member: untouched."""
    device = resolve_device(cfg.device)
    cache = RunCache() if cache is None else cache
    model, spec = build_on_device(cfg, len(data.classes), device, cache=cache)
    model.load_state_dict(soup(members))
    recompute_batchnorm(model, spec, cfg, cache.images(data.labelled, device), cfg.freeze_depth, device, cache)
    return cpu_copy(model)


@torch.no_grad()
def recompute_batchnorm(
    model: Net, spec: BackboneSpec, cfg: Config, images: Images, depth: int, device: torch.device, cache: RunCache
) -> None:
    """Running statistics of every BatchNorm after stage `depth`: the plain average over batches of `images` of
    their batch statistics (momentum None, as torch.optim.swa_utils.update_bn), stages before `depth` in eval."""
    norms = [
        m for s in model.stages[depth:] for m in s.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
    ]
    if not norms:
        return
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    model.eval()
    for stage in model.stages[depth:]:
        stage.train()
    feats = frozen_features(model, spec, cfg, images, depth, device, cache) if depth else None
    chunks = torch.arange(len(images)).split(max(2, cfg.batch_size * 2))
    chunks = chunks[:-1] if len(chunks) > 1 and len(chunks[-1]) == 1 else chunks  # one image has no batch statistics
    pixels = images.batches(chunks) if feats is None else iter(())
    for chunk in chunks:
        x = (
            feats[chunk.to(feats.device)]
            if feats is not None
            else model.features(eval_input(next(pixels).to(device), spec, cfg.image_size), depth)
        )
        with autocast(device):
            model(x, start=depth)
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    model.eval()


def shipped_kind(result: Result, shipped: Result) -> str:
    """What `ship` made of `result`, in words, for metrics and summaries."""
    n, epoch = len(result.members), result.best["epoch"]
    if shipped is result:
        if n > 1:
            return f"ensemble of {n} fold models at epoch {epoch}"
        return f"one model at epoch {epoch}" + ("" if result.validated else " (nothing validated)")
    if result.config.final == "soup":
        return f"soup (uniform weight average) of {n} fold models at epoch {epoch}"
    return f"refit on every labelled image for {shipped.config.epochs} epoch(s)"


def refit(
    cfg: Config,
    data: Dataset,
    epochs: int,
    report: Report | None = None,
    cache: RunCache | None = None,
    tau: float = 0.0,
    tta: str = "none",
) -> Result:
    """The recipe retrained on every labelled image for `epochs`, along its validated learning-rate curve, logit
    adjusted by the validated `tau`, with the validated test-time augmentation `tta`."""
    return finetune(refit_config(cfg, epochs, tau, tta), data, report, [data.everything()], cache)


def result_checkpoint(
    cfg: Config, data: Dataset, result: Result, trial: int, study: str, final: str, kind: str
) -> dict[str, Any]:
    """The checkpoint of a run's models (`result.members`) as trial `trial` of `study` shipped them (`final`, and
    `kind` in words)."""
    metrics: dict[str, Any] = {
        **{k: v for k, v in result.best.items() if not isinstance(v, list)},
        "trial": trial,
        "study": study,
        "final": final,
        "shipped": kind,
    }
    return checkpoint(
        result.members,
        result.classes,
        cfg,
        metrics,
        result.shared_stages,
        result.tau,
        result.prior,
        data.fingerprint,
        tta=result.tta,
    )


def shipped_model(
    cfg: Config,
    data: Dataset,
    kept: bytes | None,
    trial: int,
    study: str,
    best_epoch: int,
    tau: float,
    tta: str,
    cache: RunCache,
) -> Weights:
    """A study's winner as its `final` says, from the fold models kept while it ran (`kept`: their checkpoint file,
    passed on as it is where `final` is the ensemble), so what ships is what was validated, bit for bit: `soup`
    averages their weights and recomputes BatchNorm statistics; `refit` retrains the recipe on every labelled image
    for `best_epoch` epochs with the validated `tau` and `tta`. Kept models that are gone (None) are trained again
    from the config: the one case where a validated model trains twice."""
    if cfg.final == "refit":
        log.info("refit of trial %d on all %d labelled images for %d epoch(s)", trial, len(data.labelled), best_epoch)
        return result_checkpoint(
            cfg,
            data,
            refit(cfg, data, best_epoch, cache=cache, tau=tau, tta=tta),
            trial,
            study,
            "refit",
            f"refit on every labelled image for {best_epoch} epoch(s)",
        )
    if kept is None:
        result = finetune(cfg, data, cache=cache)
        final = ship(cfg, data, result, cache=cache)
        return result_checkpoint(
            cfg,
            data,
            final,
            trial,
            study,
            cfg.final if final is not result else "ensemble",
            shipped_kind(result, final),
        )
    if cfg.final != "soup":
        return kept
    ckpt = checkpoint_from_bytes(kept, f"the weights of trial {trial}")
    folds = members(ckpt)
    if len(folds) == 1:
        return kept
    adjustment = ckpt.get("logit_adjustment") or {}
    kind = f"soup (uniform weight average) of {len(folds)} fold models at epoch {ckpt['metrics'].get('epoch')}"
    return checkpoint(
        [make_soup(cfg, data, folds, cache)],
        ckpt["classes"],
        cfg,
        ckpt["metrics"] | {"final": "soup", "shipped": kind},
        0,
        adjustment.get("tau", 0.0),
        adjustment.get("prior", ()),
        data.fingerprint,
        tta=ckpt.get("tta", "none"),
    )


def mixed_models(
    cfg: Config, data: Dataset, kept: dict[str, Any] | None, trial: int, study: str, cache: RunCache
) -> tuple[list[dict[str, torch.Tensor]], dict[str, Any]]:
    """A trial's models as they join an ensemble of trials, and the checkpoint they came from: its kept fold models
    (trained again when gone: None), averaged into one soup where its `final` is `soup` (a refit validated nothing,
    so it never joins)."""
    if kept is None:
        result = finetune(cfg, data, cache=cache)
        kept = result_checkpoint(cfg, data, result, trial, study, "ensemble", shipped_kind(result, result))
    folds = members(kept)
    if cfg.final == "soup" and len(folds) > 1:
        folds = [make_soup(cfg, data, folds, cache)]
    return folds, kept
