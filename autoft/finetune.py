"""One fine-tune from one config, top to bottom. No optuna here: the search hooks in through `report`.

The recipe: a new head trained from scratch at `head_lr` while the unfrozen pretrained stages move at
`base_lr`; the first `freeze_depth` stages stay frozen (eval mode, no_grad, their output cached when it
cannot change); `head_only_epochs` train only the head before the rest unfreezes; the rate follows a
linear warmup and a cosine of period `t_max` epochs; training batches are augmented on the device;
validation after every epoch keeps the best weights and may stop early.
"""

from __future__ import annotations

import contextlib
import gc
import math
import resource
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from .backbones import BackboneSpec, Net, build_model
from .config import Config
from .data import Dataset, Split, augment, center_crop, load_dataset, normalize
from .exceptions import ConfigError, TrialFailure

Report = Callable[[int, dict[str, float]], Any]


@dataclass
class Result:
    """What a fine-tune hands back: metrics of the best and last epoch, the history and the best weights."""

    best: dict[str, float]
    final: dict[str, float]
    history: list[dict[str, float]]
    state_dict: dict[str, torch.Tensor]
    classes: list[str]
    config: Config
    device: str
    wall_time: float
    peak_memory_mb: float
    last_state_dict: dict[str, torch.Tensor] = field(default_factory=dict)
    stopped_early: bool = False


def resolve_device(name: str) -> torch.device:
    """`auto` picks CUDA, then MPS, then CPU; an explicit device that is absent is a config error."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"config key 'device': {name!r} asked for, but CUDA is not available here; use auto or cpu")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ConfigError("config key 'device': 'mps' asked for, but MPS is not available here; use auto or cpu")
    return torch.device(name)


def autocast(device: torch.device):
    """bf16 autocast on CUDA only: on CPU it is ~10x slower than fp32 for these convnets."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def lr_factor(epoch: float, warmup: int, t_max: int) -> float:
    """Linear warmup over `warmup` epochs, then torch's CosineAnnealingLR curve (eta_min=0, period t_max)."""
    if epoch < warmup:
        return (epoch + 1e-3) / warmup
    return 0.5 * (1 + math.cos(math.pi * (epoch - warmup) / t_max))


def score_key(metrics: Mapping[str, float]) -> tuple[float, float]:
    """The one ranking of results: higher val_accuracy, ties broken by the lower val_loss.

    It picks a run's best epoch here; the search ranks its trials by it too (`records.rank_key`).
    """
    return metrics["val_accuracy"], -metrics["val_loss"]


def finetune(cfg: Config, data: Dataset | None = None, report: Report | None = None) -> Result:
    """Fine-tune `cfg.backbone` on `data` (loaded from `cfg.data` when not given).

    `report(epoch, metrics)` runs after each epoch; raising from it stops the run (the search prunes
    this way). A non-finite loss raises TrialFailure.
    """
    t0 = time.perf_counter()
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    if data is None:
        data = load_data(cfg)
    model, spec = build_on_device(cfg, len(data.classes), device)
    opt = make_optimizer(model, cfg)
    batch, steps = batch_plan(len(data.train), cfg.batch_size)
    sched = make_scheduler(opt, cfg, steps)
    gen_cpu = torch.Generator().manual_seed(cfg.seed)  # the order of training images
    gen_dev = torch.Generator(device=device).manual_seed(cfg.seed)  # their augmentation
    train_images = to_device(data.train.images, device)
    train_labels = data.train.labels.to(device)
    val_labels = data.val.labels.to(device)
    history: list[dict[str, float]] = []
    best = _Best()
    try:
        for epoch in range(cfg.epochs):
            # Freeze, then unfreeze: during head-only epochs every stage is frozen.
            depth = len(model.stages) if epoch < cfg.head_only_epochs else cfg.freeze_depth
            _set_trainable(model, depth)
            features = None  # without augmentation, the frozen stages' output for the training images never changes
            if cfg.aug_strength == 0 and depth:
                features = frozen_features(model, spec, cfg, data.train, depth, device)

            t_epoch = time.perf_counter()
            order = torch.randperm(len(data.train), generator=gen_cpu).to(device)  # one copy per epoch, not one per step
            train_loss, seen = train_one_epoch(model, spec, cfg, opt, sched, order.split(batch)[:steps], train_images,
                                               train_labels, depth, gen_dev, features)
            train_time = time.perf_counter() - t_epoch
            if not math.isfinite(train_loss):
                raise TrialFailure(f"training loss diverged ({train_loss}) in epoch {epoch + 1}")

            val_loss, val_acc = evaluate_split(model, spec, cfg, data.val, depth, device, val_labels)
            metrics = {"epoch": epoch + 1, "train_loss": train_loss, "val_loss": val_loss, "val_accuracy": val_acc,
                       "images_per_s": seen / train_time, "epoch_time_s": time.perf_counter() - t_epoch,
                       "lr_head": opt.param_groups[0]["lr"]}
            history.append(metrics)
            best.update(metrics, model)
            if report is not None:
                report(epoch, metrics)
            if cfg.patience and best.stale >= cfg.patience:
                break
        return Result(best.metrics, history[-1], history, best.state_dict, data.classes, cfg, str(device),
                      time.perf_counter() - t0, peak_memory_mb(device), _cpu_copy(model), len(history) < cfg.epochs)
    finally:
        del model, opt, train_images
        if device.type == "cuda":
            torch.cuda.empty_cache()


def build_on_device(cfg: Config, num_classes: int, device: torch.device) -> tuple[Net, BackboneSpec]:
    """The backbone with a new head, channels_last on `device`; a freeze depth past its stages is a config error."""
    model, spec = build_model(cfg.backbone, num_classes, cfg.weights, cfg.seed)
    n_stages = len(model.stages)
    if cfg.freeze_depth > n_stages:
        raise ConfigError(f"config key 'freeze_depth': {cfg.freeze_depth} is more than {cfg.backbone}'s {n_stages} stages")
    model = model.to(device, memory_format=torch.channels_last)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        torch.backends.cudnn.benchmark = True  # batch shapes repeat every step: pick the fastest kernels once
    return model, spec


def batch_plan(n_train: int, batch_size: int) -> tuple[int, int]:
    """(batch, steps per epoch). A last batch of one sample is dropped: it would break BatchNorm in train mode."""
    batch = min(batch_size, n_train)
    drop_last = n_train % batch == 1
    return batch, n_train // batch if drop_last else math.ceil(n_train / batch)


def make_scheduler(opt: torch.optim.Optimizer, cfg: Config, steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Stepped every batch, so warmup and cosine move smoothly within epochs (`lr_factor` of fractional epochs)."""
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(step / steps, cfg.warmup_epochs, cfg.cosine_t_max))


def train_one_epoch(model: Net, spec: BackboneSpec, cfg: Config, opt: torch.optim.Optimizer,
                    sched: torch.optim.lr_scheduler.LRScheduler, batches: Sequence[torch.Tensor], images: torch.Tensor,
                    labels: torch.Tensor, depth: int, generator: torch.Generator,
                    features: torch.Tensor | None = None) -> tuple[float, int]:
    """One optimizer step per batch of indices into `images`/`labels`; returns the mean loss and the images seen.

    Stages before `depth` are frozen: their output comes from `features` (cached, when there is no
    augmentation) or is computed under no_grad; images are augmented on the device with `generator`.
    """
    device = labels.device
    total_loss, seen = torch.zeros((), device=device), 0
    for idx in batches:
        if features is not None:
            x = features[idx]
        else:
            x = augment(images[idx], cfg.image_size, cfg.aug_strength, generator)
            x = normalize(x, spec.mean, spec.std).contiguous(memory_format=torch.channels_last)
            if depth:
                with torch.no_grad(), autocast(device):
                    x = model.features(x, depth)
        with autocast(device):
            loss = F.cross_entropy(model(x, start=depth).float(), labels[idx], label_smoothing=cfg.label_smoothing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        total_loss += loss.detach() * len(idx)
        seen += len(idx)
    return (total_loss / seen).item(), seen  # one sync per epoch, not per step


class _Best:
    """The best epoch so far by `score_key`, a CPU copy of its weights, and the epochs since it (for patience)."""

    def __init__(self) -> None:
        self.metrics: dict[str, float] | None = None
        self.state_dict: dict[str, torch.Tensor] | None = None
        self.stale = 0

    def update(self, metrics: dict[str, float], model: Net) -> None:
        if self.metrics is None or score_key(metrics) > score_key(self.metrics):
            self.metrics, self.state_dict, self.stale = metrics, _cpu_copy(model), 0
        else:
            self.stale += 1


def _cpu_copy(model: Net) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def peak_memory_mb(device: torch.device) -> float:
    """Peak allocated CUDA memory on a GPU; the process's peak resident memory elsewhere."""
    peak = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return peak / 2**20


def make_optimizer(model: Net, cfg: Config) -> torch.optim.Optimizer:
    """Two parameter groups: the new head at head_lr, the unfrozen pretrained stages at base_lr.

    Frozen stages get no group at all; stages that only wait out head_only_epochs are in the base
    group but receive no gradient until they unfreeze, so the optimizer skips them until then.
    """
    for p in (p for s in model.stages[:cfg.freeze_depth] for p in s.parameters()):
        p.requires_grad_(False)
    base_params = [p for s in model.stages[cfg.freeze_depth:] for p in s.parameters()]
    groups = [{"params": list(model.head.parameters()), "lr": cfg.head_lr, "name": "head"}]
    if base_params:
        groups.append({"params": base_params, "lr": cfg.base_lr, "name": "base"})
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, momentum=cfg.momentum, nesterov=cfg.momentum > 0, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(groups, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)


def load_data(cfg: Config) -> Dataset:
    """The dataset a config names, decoded at the size its backbone's crop needs.

    A held-out validation split does not follow `cfg.seed`: every trial, seed and retrain of a
    search must validate on the same images, or their scores would not compare.
    """
    from .backbones import get_backbone

    return load_dataset(cfg.data, cfg.image_size, get_backbone(cfg.backbone).crop_pct,
                        val_fraction=cfg.val_fraction, skip_bad_images=cfg.skip_bad_images)


def _set_trainable(model: Net, depth: int) -> None:
    """Stages before `depth`: no gradients and BatchNorm in eval mode; the rest train."""
    model.train()
    for i, stage in enumerate(model.stages):
        frozen = i < depth
        stage.train(not frozen)
        for p in stage.parameters():
            p.requires_grad_(not frozen)


@torch.no_grad()
def evaluate_split(model: Net, spec: BackboneSpec, cfg: Config, split: Split, depth: int, device: torch.device,
                   labels: torch.Tensor | None = None) -> tuple[float, float]:
    """Validation loss and accuracy; the frozen prefix's output comes from the feature cache."""
    logits = predict_logits(model, spec, cfg, split, depth, device)
    labels = split.labels.to(device) if labels is None else labels
    loss = F.cross_entropy(logits, labels).item()
    return loss, (logits.argmax(1) == labels).float().mean().item()


@torch.no_grad()
def predict_logits(model: Net, spec: BackboneSpec, cfg: Config, split: Split, depth: int, device: torch.device) -> torch.Tensor:
    was_training = model.training
    model.eval()
    feats = frozen_features(model, spec, cfg, split, depth, device) if depth else None
    out = []
    step = max(1, cfg.batch_size * 2)
    for i in range(0, len(split), step):
        if feats is not None:
            x, start = feats[i:i + step], depth
        else:  # no depth, or features too big to keep: the whole model from the images
            x, start = _eval_input(split.images[i:i + step].to(device, non_blocking=True), spec, cfg.image_size), 0
        with autocast(device):
            out.append(model(x, start=start).float())
    model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, model.head.out_features, device=device)


def _eval_input(images: torch.Tensor, spec: BackboneSpec, size: int) -> torch.Tensor:
    return normalize(center_crop(images, size), spec.mean, spec.std).contiguous(memory_format=torch.channels_last)


# --- process-wide caches --------------------------------------------------------------------------------------

FEATURE_CACHE_BYTES = 2 * 2**30  # bound on cached frozen-prefix features; over it entries are dropped, never OOM
_features: OrderedDict[tuple, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
_device_images: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def to_device(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The uint8 image cache on the compute device, moved once per process rather than once per trial."""
    if device.type == "cpu":
        return images
    key = (id(images), str(device))
    if key not in _device_images or _device_images[key][0] is not images:
        _device_images[key] = (images, images.to(device))
    return _device_images[key][1]


@torch.no_grad()
def frozen_features(model: Net, spec: BackboneSpec, cfg: Config, split: Split, depth: int,
                    device: torch.device) -> torch.Tensor | None:
    """Output of the frozen stages[:depth] for every image of `split` (eval transform), computed once.

    Frozen stages hold the pretrained weights unchanged, so trials with the same backbone, weights,
    image size and depth share the result. Entries are evicted oldest-first to stay under
    FEATURE_CACHE_BYTES; features that would not fit even alone are never materialised: None tells
    the caller to run the prefix per batch, so a huge split costs time, never memory.
    """
    key = (spec.name, cfg.weights, cfg.image_size, depth, id(split.images), str(device))
    hit = _features.get(key)
    if hit is not None and hit[0] is split.images:
        _features.move_to_end(key)
        return hit[1]
    was_training = [s.training for s in model.stages[:depth]]
    for s in model.stages[:depth]:
        s.eval()
    feats = None
    step = max(1, cfg.batch_size * 2)
    try:
        with autocast(device):
            for i in range(0, len(split), step):
                part = model.features(_eval_input(split.images[i:i + step].to(device, non_blocking=True), spec,
                                                  cfg.image_size), depth)
                if feats is None:  # the first batch tells the size of the whole; filled in place, no concatenation
                    nbytes = part[0].numel() * part.element_size() * len(split)
                    if nbytes > FEATURE_CACHE_BYTES:
                        return None
                    while _features and _cached_bytes() + nbytes > FEATURE_CACHE_BYTES:
                        _features.popitem(last=False)
                    fmt = torch.channels_last if part.dim() == 4 else torch.contiguous_format
                    feats = torch.empty((len(split), *part.shape[1:]), dtype=part.dtype, device=part.device,
                                        memory_format=fmt)
                feats[i:i + len(part)] = part
    finally:
        for s, t in zip(model.stages[:depth], was_training):
            s.train(t)
    if feats is not None:
        _features[key] = (split.images, feats)
    return feats


def _cached_bytes() -> int:
    return sum(f.numel() * f.element_size() for _, f in _features.values())


def clear_caches() -> None:
    """Drop device copies and cached features and collect garbage (between studies, after an out-of-memory error)."""
    _features.clear()
    _device_images.clear()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
