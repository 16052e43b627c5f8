"""The finals: what ships from a trial's validated fold models (its `final`: the ensemble, a soup of
their weights, or a refit on every labelled image). The one owner of what `final` means.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
import torch
from ..backbones import BackboneSpec, Net
from ..cache import Images, RunCache
from ..config import Config
from ..data.dataset import Dataset
from .inference import eval_input, autocast, frozen_features
from .loop import Report, Result, cpu_copy, build_on_device, finetune, resolve_device



def refit_config(cfg: Config, epochs: int, tau: float = 0.0, tta: str = "none") -> Config:
    """The recipe for `epochs` epochs on every labelled image, along the validated learning-rate curve, with the
    logit adjustment `tau` and test-time augmentation `tta` the validation chose (the refit validates nothing to
    choose them on).

    The schedule is a function of the epoch, not of the step, so the refit's last epoch ends where the
    validated run's epoch `epochs` ended (same warmup, same cosine period), not at a re-stretched cosine.
    """
    return cfg.replace(epochs=epochs, t_max=cfg.cosine_t_max, head_only_epochs=min(cfg.head_only_epochs, epochs),
                       patience=0, logit_adjustment=tau, tta=tta)


def ship(cfg: Config, data: Dataset, result: Result, report: Report | None = None,
         cache: RunCache | None = None) -> Result:
    """What a validated run ships, as `final` says: `result` itself (its fold models, the ensemble the score
    validated); their uniform soup (`soup`); or the recipe retrained on every labelled image for the epochs the
    score chose (`refit`). Nothing validated (a refit itself): `result`."""
    if cfg.final == "ensemble" or not result.validated:
        return result
    if cfg.final == "soup":
        return dataclasses.replace(result, members=[make_soup(cfg, data, result.members, cache)]) if len(result.members) > 1 \
            else result
    return refit(cfg, data, result.best["epoch"], report, cache, result.tau, result.tta)


def soup(members: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The uniform model soup (Wortsman et al., ICML 2022): every floating-point tensor averaged over the members;
    integer counters (BatchNorm's num_batches_tracked) from the first member."""
    return {k: torch.stack([m[k] for m in members]).mean(0) if v.is_floating_point() else v.clone()
            for k, v in members[0].items()}


def make_soup(cfg: Config, data: Dataset, members: Sequence[Mapping[str, torch.Tensor]],
              cache: RunCache | None = None) -> dict[str, torch.Tensor]:
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
def recompute_batchnorm(model: Net, spec: BackboneSpec, cfg: Config, images: Images, depth: int,
                        device: torch.device, cache: RunCache) -> None:
    """Running statistics of every BatchNorm after stage `depth`: the plain average over batches of `images` of
    their batch statistics (momentum None, as torch.optim.swa_utils.update_bn), stages before `depth` in eval."""
    norms = [m for s in model.stages[depth:] for m in s.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
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
        x = feats[chunk.to(feats.device)] if feats is not None else model.features(
            eval_input(next(pixels).to(device), spec, cfg.image_size), depth)
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


def refit(cfg: Config, data: Dataset, epochs: int, report: Report | None = None,
          cache: RunCache | None = None, tau: float = 0.0, tta: str = "none") -> Result:
    """The recipe retrained on every labelled image for `epochs`, along its validated learning-rate curve, logit
    adjusted by the validated `tau`, with the validated test-time augmentation `tta`."""
    return finetune(refit_config(cfg, epochs, tau, tta), data, report, [data.everything()], cache)
