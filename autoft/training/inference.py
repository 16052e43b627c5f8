"""Running a model over stored images: logits with the eval transform (and the mirrored view for
test-time augmentation), and the cached features of frozen stages.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..backbones import BackboneSpec, Concatenated, FlipAveraged, Net
from ..cache import Images, RunCache, as_images
from ..config import Config
from ..data.augment import center_crop, normalize
from ..data.dataset import Split


def autocast(device: torch.device):
    """bf16 autocast on CUDA only: on CPU it is ~10x slower than fp32 for these convnets."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def evaluate_split(
    model: torch.nn.Module,
    spec: BackboneSpec,
    cfg: Config,
    split: Split,
    depth: int,
    device: torch.device,
    cache: RunCache | None = None,
) -> tuple[float, np.ndarray]:
    """Loss and predicted classes on a split (test/, or new data); the frozen prefix's output comes from `cache`."""
    logits = predict_logits(model, spec, cfg, split, depth, device, cache=cache)
    return F.cross_entropy(logits, split.labels.to(device)).item(), logits.argmax(1).cpu().numpy()


@torch.no_grad()
def predict_logits(
    model: torch.nn.Module,
    spec: BackboneSpec,
    cfg: Config,
    images: torch.Tensor | Split | Images,
    depth: int,
    device: torch.device,
    index: torch.Tensor | None = None,
    cache: RunCache | None = None,
    flip: bool = False,
) -> torch.Tensor:
    """Logits for the images at `index` (all of them by default) through the eval transform (mirrored with
    `flip`), in batches.

    `images`: uint8 (N, 3, S, S) as a tensor, a Split (read from its store) or Images. With `depth`, the frozen
    prefix's output over all of them comes from `cache` (computed once) when it fits its budget. A FlipAveraged
    model is its model's mean over the plain and the mirrored views, each of them cached so.
    """
    if isinstance(model, FlipAveraged):
        views = [
            predict_logits(model.model, spec, cfg, images, depth, device, index, cache, f) for f in (flip, not flip)
        ]
        return (views[0].float() + views[1].float()) / 2
    images = as_images(images, device)
    was_training = model.training
    model.eval()
    cached = depth and cache is not None
    feats = frozen_features(model, spec, cfg, images, depth, device, cache, flip) if cached else None
    index = torch.arange(len(images)) if index is None else index.cpu()
    chunks = index.split(max(1, cfg.batch_size * 2))
    pixels = images.batches(chunks) if feats is None else iter(())
    out = []
    for chunk in chunks:
        if feats is not None:
            x, start = feats[chunk.to(feats.device)], depth
        else:  # no depth, or features too big to keep: the whole model from the images
            x, start = eval_input(next(pixels).to(device, non_blocking=True), spec, cfg.image_size, flip), 0
        with autocast(device):
            out.append(model(x, start=start).float())
    model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, model.num_classes, device=device)


def eval_input(images: torch.Tensor, spec: BackboneSpec, size: int, flip: bool = False) -> torch.Tensor:
    x = normalize(center_crop(images, size), spec.mean, spec.std)
    return (x.flip(-1) if flip else x).contiguous(memory_format=torch.channels_last)


# --- frozen-prefix features ------------------------------------------------------------------------------------


@torch.no_grad()
def frozen_features(
    model: Net,
    spec: BackboneSpec,
    cfg: Config,
    images: Images,
    depth: int,
    device: torch.device,
    cache: RunCache,
    flip: bool = False,
) -> torch.Tensor | None:
    """Output of the frozen stages[:depth] for every one of `images` (eval transform, mirrored with `flip`), computed
    once per `cache`.

    Frozen stages hold the pretrained weights unchanged, so trials with the same backbone, weights, image
    size and depth share the result. It counts against the cache's byte budget (least recently used out);
    features that would not fit even alone, or of images with no key, are never materialised: None tells
    the caller to run the prefix per batch, so a huge set costs time, never memory. Several backbones side by
    side (backbones.Concatenated) are cached per backbone, under the key of that backbone's own probe where
    its input is the same, so a probe on all of them reuses what each one's probe computed.
    """
    if images.key is None:
        return None
    stage = model.stages[0] if depth == 1 else None
    view = ("flip",) if flip else ()
    if isinstance(stage, Concatenated):
        parts = [
            _features(
                cache,
                (
                    "features",
                    name,
                    cfg.weights,
                    stage.view_key(i, cfg.image_size),
                    stage.depths[i],
                    images.key,
                    str(device),
                    *view,
                ),
                stage.backbones[i : i + 1],
                images,
                cfg,
                device,
                functools.partial(lambda x, i: stage.part(i, eval_input(x, spec, cfg.image_size, flip)), i=i),
            )
            for i, name in enumerate(stage.names)
        ]
        return None if any(p is None for p in parts) else torch.cat(parts, 1)
    key = ("features", spec.name, cfg.weights, cfg.image_size, depth, images.key, str(device), *view)
    return _features(
        cache,
        key,
        model.stages[:depth],
        images,
        cfg,
        device,
        lambda x: model.features(eval_input(x, spec, cfg.image_size, flip), depth),
    )


def _features(
    cache: RunCache,
    key: tuple,
    frozen: Sequence[torch.nn.Module],
    images: Images,
    cfg: Config,
    device: torch.device,
    compute: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor | None:
    """`compute` (stored images -> features, through the `frozen` modules in eval mode) over every one of
    `images`, held in `cache` under `key`; each pass over the images is counted there (`feature_passes`)."""
    hit = cache.get(key)
    if hit is not None:
        return hit
    was_training = [s.training for s in frozen]
    for s in frozen:
        s.eval()
    feats = None
    step = max(1, cfg.batch_size * 2)
    chunks = torch.arange(len(images)).split(step)
    cache.feature_passes[key] += 1
    try:
        with autocast(device):
            for chunk, pixels in zip(chunks, images.batches(chunks)):
                part = compute(pixels)
                if feats is None:  # the first batch tells the size of the whole; filled in place, no concatenation
                    nbytes = part[0].numel() * part.element_size() * len(images)
                    if not cache.make_room(nbytes):
                        return None
                    fmt = torch.channels_last if part.dim() == 4 else torch.contiguous_format
                    feats = torch.empty(
                        (len(images), *part.shape[1:]), dtype=part.dtype, device=part.device, memory_format=fmt
                    )
                feats[chunk[0] : chunk[-1] + 1] = part
    finally:
        for s, t in zip(frozen, was_training):
            s.train(t)
    if feats is not None:
        cache.put(key, feats, feats.numel() * feats.element_size())
    return feats
