"""One fine-tune from one config, top to bottom. No optuna here: the search hooks in through `report`.

The recipe: a new head trained from scratch at `head_lr` while the unfrozen pretrained stages move at
`base_lr` (each earlier stage at `layer_decay` times the next); the first `freeze_depth` stages stay frozen
(eval mode, no_grad, their output cached when it cannot change); `head_only_epochs` train only the head
before the rest unfreezes; the rate follows a linear warmup and a cosine of period `t_max` epochs;
training batches are augmented on the device.

Validation: with fewer than `cv_max_images` labelled images, k models train side by side, one per
stratified fold (`cv_folds`), so that each epoch's score is the out-of-fold `metric` over every labelled
image, not over a small holdout; otherwise one model validates on the holdout. The best epoch by that
pooled score is kept, with every fold's model at that epoch and every image's out-of-fold probabilities:
shipped together they are the ensemble the score validated, or `refit_config` retrains the recipe on
every image for that many epochs.

Imbalanced classes: the loss may weigh classes (`class_weight`), training batches may be drawn
class-balanced (`balanced_sampling`), and predictions may be logit-adjusted after training
(`logit_adjustment`: logits - tau * log prior, Menon et al., "Long-tail learning via logit adjustment",
ICLR 2021), with tau chosen on the out-of-fold predictions when it is `auto`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import resource
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .backbones import BackboneSpec, Net, build_model
from .cache import Images, RunCache, as_images, load_data  # load_data: re-exported, datasets as a run loads them
from .config import Config
from .data import Dataset, Fold, Split, augment, center_crop, normalize
from .estimate import Estimate, fold_of, scores
from .exceptions import ConfigError, TrialFailure
from .probe import applies as exact_probe, fit_heads

Report = Callable[[int, dict[str, Any]], Any]
TAUS = tuple(i / 4 for i in range(9))  # logit_adjustment auto's grid: 0, 0.25, ..., 2 (Menon et al. found 1 best)


@dataclass
class Result:
    """What a fine-tune hands back: the kept epoch's metrics, the history, and every fold's weights at it.

    The kept epoch is the best by `score_key` of the pooled out-of-fold score, or the last when nothing is
    validated (a refit). `members[i]` holds fold i's weights; their first `shared_stages` stages are the
    frozen pretrained ones, the same tensors in every member.
    """

    best: dict[str, Any]
    final: dict[str, Any]
    history: list[dict[str, Any]]
    members: list[dict[str, torch.Tensor]]
    shared_stages: int
    classes: list[str]
    config: Config
    device: str
    wall_time: float
    peak_memory_mb: float
    stopped_early: bool = False
    validated: int = 0  # images behind the score: every labelled image under cross-validation, else the holdout
    oof: np.ndarray | None = None  # (N, C) float32 out-of-fold probabilities at the kept epoch; NaN: not validated
    fold: np.ndarray | None = None  # (N,) the fold that validated each labelled image, -1: none
    prior: list[float] = field(default_factory=list)  # class frequencies of the labelled images (logit adjustment)

    @property
    def tau(self) -> float:
        """The logit adjustment the kept epoch was scored with; unvalidated, the config's (`auto`: 0, nothing to
        choose it on)."""
        return float(self.best.get("tau", 0.0 if self.config.logit_adjustment == "auto" else self.config.logit_adjustment))

    @property
    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.members[0]


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


def score_key(metrics: Mapping[str, Any], metric: str) -> tuple[float, float]:
    """The one ranking of epochs: the higher `val_<metric>`, ties broken by the lower val_loss."""
    return metrics[f"val_{metric}"], -metrics["val_loss"]


def class_weights(kind: str, counts: torch.Tensor) -> torch.Tensor | None:
    """Loss weight per class from its training images: `balanced` is n / (C * count), scikit-learn's
    compute_class_weight("balanced"); `sqrt` its square root (a milder remedy); `none`: None."""
    if kind == "none":
        return None
    counts = counts.float().clamp_min(1)
    w = counts.sum() / (len(counts) * counts)
    return w.sqrt() if kind == "sqrt" else w


def adjusted(log_probs: np.ndarray, log_prior: np.ndarray, tau: float) -> np.ndarray:
    """Post-hoc logit adjustment (Menon et al., ICLR 2021): logits - tau * log prior; tau = 0 leaves them as they are."""
    return log_probs - tau * log_prior if tau else log_probs


def choose_tau(cfg: Config, log_probs: np.ndarray, y: np.ndarray, log_prior: np.ndarray) -> float:
    """`logit_adjustment` as a number, or with `auto` the tau of TAUS whose adjusted predictions score best on
    `cfg.metric` (the smallest on ties, so a balanced set keeps 0): chosen on validation predictions, no training."""
    if cfg.logit_adjustment != "auto":
        return float(cfg.logit_adjustment)
    classes = log_probs.shape[1]
    return max(TAUS, key=lambda t: (scores(y, adjusted(log_probs, log_prior, t).argmax(1), classes)[cfg.metric], -t))


def fold_notice(cfg: Config, data: Dataset) -> str | None:
    """The one line to say, once per run or search, when a small class makes cross-validation use fewer folds."""
    return data.cv_notice(cfg.cv_folds) if cfg.cv_folds > 1 and len(data.labelled) < cfg.cv_max_images else None


def plan_folds(cfg: Config, data: Dataset) -> list[Fold]:
    """Cross-validation folds while the labelled images are few enough to afford k trainings, else the holdout."""
    if cfg.cv_folds > 1 and len(data.labelled) < cfg.cv_max_images:
        return data.cv_folds(cfg.cv_folds)
    return [data.holdout]


def refit_config(cfg: Config, epochs: int, tau: float = 0.0) -> Config:
    """The recipe for `epochs` epochs on every labelled image, along the validated learning-rate curve, with the
    logit adjustment `tau` the validation chose (the refit validates nothing to choose it on).

    The schedule is a function of the epoch, not of the step, so the refit's last epoch ends where the
    validated run's epoch `epochs` ended (same warmup, same cosine period), not at a re-stretched cosine.
    """
    return cfg.replace(epochs=epochs, t_max=cfg.cosine_t_max, head_only_epochs=min(cfg.head_only_epochs, epochs),
                       patience=0, logit_adjustment=tau)


def finetune(cfg: Config, data: Dataset | None = None, report: Report | None = None,
             folds: Sequence[Fold] | None = None, cache: RunCache | None = None) -> Result:
    """Fine-tune `cfg.backbone` on `data` (loaded from `cfg.data` when not given), one model per fold.

    `folds` defaults to `plan_folds`; `[data.everything()]` trains one model on every image (a refit).
    `report(epoch, metrics)` runs after each epoch; raising from it stops the run (the search prunes
    this way). A non-finite loss raises TrialFailure. `cache` holds what outlives this call (device copies
    of the images, frozen features, pretrained stages); None: a private one, dropped at the end.
    """
    t0 = time.perf_counter()
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    cache = RunCache() if cache is None else cache
    if data is None:
        data = cache.dataset(cfg)
    folds = plan_folds(cfg, data) if folds is None else folds
    images = cache.images(data.labelled, device)
    labels = data.labelled.labels.to(device)
    counts = torch.bincount(data.labelled.labels, minlength=len(data.classes))
    prior = (counts / counts.sum()).tolist()
    runs = [_FoldRun(cfg, fold, fold_seed(cfg.seed, i), data.labelled.labels, len(data.classes), device, cache)
            for i, fold in enumerate(folds)]
    spec, n_stages = runs[0].spec, len(runs[0].model.stages)
    history: list[dict[str, Any]] = []
    best = _Best(cfg.freeze_depth, cfg.metric)
    log_prior = np.log(np.maximum(prior, 1e-12))
    exact = exact_probe(cfg, n_stages)  # a linear head on fixed features: fitted exactly in one step (probe.py)
    try:
        for epoch in range(cfg.epochs):
            # Freeze, then unfreeze: during head-only epochs every stage is frozen.
            depth = n_stages if epoch < cfg.head_only_epochs else cfg.freeze_depth
            features = None  # without augmentation, the frozen stages' output for the training images never changes
            if cfg.aug_strength == 0 and depth:
                features = frozen_features(runs[0].model, spec, cfg, images, depth, device, cache)  # validation too
            exact = exact and features is not None  # features too big to hold: the head trains by epochs instead

            t_epoch = time.perf_counter()
            if exact:
                heads = [(r.model.head, r.fold.train, r.loss_weight) for r in runs]
                train_loss, seen, fitted = fit_heads(heads, features, labels, cfg)
            else:
                (train_loss, seen), fitted = train_epoch(runs, images, labels, depth, features), {}
            train_time = time.perf_counter() - t_epoch
            if not math.isfinite(train_loss):
                raise TrialFailure(f"training loss diverged ({train_loss}) in epoch {epoch + 1}")

            metrics: dict[str, Any] = {"epoch": epoch + 1, "train_loss": train_loss} | fitted
            held_out, oof = validate(runs, cfg, images, labels, depth, device, log_prior, cache)
            metrics |= held_out
            metrics |= {"images_per_s": seen / train_time, "epoch_time_s": time.perf_counter() - t_epoch,
                        "lr_head": runs[0].opt.param_groups[0]["lr"]}
            history.append(metrics)
            best.update(metrics, runs, oof)
            if report is not None:
                report(epoch, metrics)
            if exact or (cfg.patience and best.stale >= cfg.patience):
                break
        if not best.members:  # nothing validated (a refit): the last epoch's weights, copied once
            best.keep(runs)
        return Result(best.metrics, history[-1], history, best.members, cfg.freeze_depth, data.classes, cfg, str(device),
                      time.perf_counter() - t0, peak_memory_mb(device), not exact and len(history) < cfg.epochs,
                      sum(len(r.fold.val) for r in runs), best.oof,
                      fold_of([r.fold.val.cpu().numpy() for r in runs], len(data.labelled)), prior)
    finally:
        del runs, images
        if device.type == "cuda":
            torch.cuda.empty_cache()


def train_epoch(runs: Sequence[_FoldRun], images: torch.Tensor, labels: torch.Tensor, depth: int,
                features: torch.Tensor | None) -> tuple[float, int]:
    """One epoch of every fold's model: the mean training loss over all of them, and the images seen."""
    loss_sum, seen = 0.0, 0
    for run in runs:
        loss, n = run.train_epoch(images, labels, depth, features)
        loss_sum, seen = loss_sum + loss * n, seen + n
    return loss_sum / seen, seen


def fold_seed(seed: int, fold: int) -> int:
    """Fold 0 keeps the config's seed (a holdout run is one fold); the others derive theirs from it."""
    return (seed + 1_000_003 * fold) % 2**32


class _FoldRun:
    """One fold's model, optimizer, schedule and random streams, trained an epoch at a time; with the loss weights
    (`class_weight`) and the sampling weights (`balanced_sampling`) of its training images' classes."""

    def __init__(self, cfg: Config, fold: Fold, seed: int, labels: torch.Tensor, num_classes: int, device: torch.device,
                 cache: RunCache):
        self.cfg, self.fold = cfg, fold  # indices stay on the CPU: batches are cut from the store by them
        train_labels = labels.cpu()[fold.train]
        counts = torch.bincount(train_labels, minlength=num_classes)
        self.loss_weight = class_weights(cfg.class_weight, counts)
        if self.loss_weight is not None:
            self.loss_weight = self.loss_weight.to(device)
        # class-balanced sampling: each image drawn with probability 1 / its class's count, as many draws as images
        self.draw = (1 / counts.clamp_min(1).double())[train_labels] if cfg.balanced_sampling else None
        self.model, self.spec = build_on_device(cfg, num_classes, device, seed, cache)
        self.opt = make_optimizer(self.model, cfg)
        # epoch_images: each epoch a fresh draw of that many training images; the schedule's steps follow it
        self.per_epoch = min(cfg.epoch_images, len(fold.train)) if cfg.epoch_images else len(fold.train)
        self.batch, self.steps = batch_plan(self.per_epoch, cfg.batch_size)
        self.sched = make_scheduler(self.opt, cfg, self.steps)
        self.gen_cpu = torch.Generator().manual_seed(seed)  # the order of training images
        self.gen_dev = torch.Generator(device=device).manual_seed(seed)  # their augmentation

    def train_epoch(self, images: Images, labels: torch.Tensor, depth: int,
                    features: torch.Tensor | None) -> tuple[float, int]:
        _set_trainable(self.model, depth)
        n, k = len(self.fold.train), self.per_epoch
        pick = (torch.randperm(n, generator=self.gen_cpu)[:k] if self.draw is None else
                torch.multinomial(self.draw, k, replacement=True, generator=self.gen_cpu))
        order = self.fold.train[pick]
        return train_one_epoch(self.model, self.spec, self.cfg, self.opt, self.sched, order.split(self.batch)[:self.steps],
                               images, labels, depth, self.gen_dev, features, self.loss_weight)


@torch.no_grad()
def validate(runs: Sequence[_FoldRun], cfg: Config, images: Images, labels: torch.Tensor, depth: int,
             device: torch.device, log_prior: np.ndarray,
             cache: RunCache | None = None) -> tuple[dict[str, Any], np.ndarray | None]:
    """Every fold's model on its own held-out images, pooled: the loss and every metric over all of them
    (`val_accuracy`, `val_balanced_accuracy`, `val_f1_macro`), after the logit adjustment `tau` (chosen here when
    `auto`); each fold's score and the interval of `cfg.metric`; and the (N, C) out-of-fold probabilities,
    unadjusted (NaN where an image was not validated). Nothing held out: no scores."""
    held = [r for r in runs if len(r.fold.val)]
    if not held:
        return {}, None
    logits = [predict_logits(r.model, r.spec, cfg, images, depth, device, r.fold.val, cache) for r in held]
    index = torch.cat([r.fold.val for r in held]).to(device)
    pooled, truth = torch.cat(logits), labels[index]
    log_probs, y = pooled.float().log_softmax(1).cpu().numpy(), truth.cpu().numpy()
    tau = choose_tau(cfg, log_probs, y, log_prior)
    pred = adjusted(log_probs, log_prior, tau).argmax(1)
    classes = log_probs.shape[1]
    fold = np.concatenate([np.full(len(r.fold.val), i) for i, r in enumerate(held)])
    estimate = Estimate.measure(cfg.metric, y, pred, classes, fold)
    oof = np.full((len(labels), classes), np.nan, dtype=np.float32)
    oof[index.cpu().numpy()] = np.exp(log_probs)
    return {"val_loss": F.cross_entropy(pooled, truth).item(),
            **{f"val_{m}": v for m, v in scores(y, pred, classes).items()},
            **estimate.epoch_metrics(), "tau": tau}, oof


def build_on_device(cfg: Config, num_classes: int, device: torch.device, seed: int | None = None,
                    cache: RunCache | None = None) -> tuple[Net, BackboneSpec]:
    """The backbone with a new head (seeded), channels_last on `device`; a freeze depth past its stages is a config
    error. The pretrained stages come from `cache` (read once per run) when given."""
    model, spec = build_model(cfg.backbone, num_classes, cfg.weights, cfg.seed if seed is None else seed,
                              cache.pretrained_stages if cache is not None else None)
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
                    sched: torch.optim.lr_scheduler.LRScheduler, batches: Sequence[torch.Tensor], images: Images,
                    labels: torch.Tensor, depth: int, generator: torch.Generator,
                    features: torch.Tensor | None = None, class_weight: torch.Tensor | None = None) -> tuple[float, int]:
    """One optimizer step per batch of indices into `images`/`labels`; returns the mean loss and the images seen.

    Stages before `depth` are frozen: their output comes from `features` (cached, when there is no
    augmentation) or is computed under no_grad; images are augmented on the device with `generator`.
    `class_weight` (C,) weighs each class in the cross-entropy.
    """
    device = labels.device
    total_loss, seen = torch.zeros((), device=device), 0
    pixels = images.batches(batches) if features is None else iter(())
    for idx in batches:
        if features is not None:
            x = features[idx.to(features.device)]
        else:
            x = augment(next(pixels), cfg.image_size, cfg.aug_strength, generator)
            x = normalize(x, spec.mean, spec.std).contiguous(memory_format=torch.channels_last)
            if depth:
                with torch.no_grad(), autocast(device):
                    x = model.features(x, depth)
        with autocast(device):
            loss = F.cross_entropy(model(x, start=depth).float(), labels[idx.to(device)], weight=class_weight,
                                   label_smoothing=cfg.label_smoothing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        total_loss += loss.detach() * len(idx)
        seen += len(idx)
    return (total_loss / seen).item(), seen  # one sync per epoch, not per step


class _Best:
    """The kept epoch so far (best by `score_key`; the latest when nothing is validated), a CPU copy of every
    fold's weights at it, and the epochs since it (for patience)."""

    def __init__(self, shared_stages: int, metric: str):
        self.shared = tuple(f"stages.{i}." for i in range(shared_stages))
        self.metric = metric
        self.metrics: dict[str, Any] | None = None
        self.members: list[dict[str, torch.Tensor]] = []
        self.oof: np.ndarray | None = None
        self.stale = 0

    def update(self, metrics: dict[str, Any], runs: Sequence[_FoldRun], oof: np.ndarray | None) -> None:
        if "val_loss" not in metrics:  # nothing held out: the latest epoch, its weights copied after the last
            self.metrics = metrics
        elif self.metrics is None or score_key(metrics, self.metric) > score_key(self.metrics, self.metric):
            self.keep(runs)
            self.metrics, self.oof, self.stale = metrics, oof, 0
        else:
            self.stale += 1

    def keep(self, runs: Sequence[_FoldRun]) -> None:
        """A CPU copy of every fold's weights now; frozen stages are the same pretrained tensors in every fold:
        one copy, shared by reference."""
        first = _cpu_copy(runs[0].model)
        self.members = [first] + [{k: first[k] if k.startswith(self.shared) else v.detach().to("cpu", copy=True)
                                   for k, v in r.model.state_dict().items()} for r in runs[1:]]


def _cpu_copy(model: Net) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def peak_memory_mb(device: torch.device) -> float:
    """Peak allocated CUDA memory on a GPU; the process's peak resident memory elsewhere."""
    peak = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return peak / 2**20


def make_optimizer(model: Net, cfg: Config) -> torch.optim.Optimizer:
    """The new head at head_lr; the unfrozen pretrained stages at base_lr, each earlier one `layer_decay` times
    the next (fastai's lower rates for early layers; one group when there is no decay).

    Frozen stages get no group at all; stages that only wait out head_only_epochs are in a group but
    receive no gradient until they unfreeze, so the optimizer skips them until then.
    """
    for p in (p for s in model.stages[:cfg.freeze_depth] for p in s.parameters()):
        p.requires_grad_(False)
    groups = [{"params": list(model.head.parameters()), "lr": cfg.head_lr, "name": "head"}]
    trainable = list(enumerate(model.stages))[cfg.freeze_depth:]
    if cfg.layer_decay == 1.0:
        groups.append({"params": [p for _, s in trainable for p in s.parameters()], "lr": cfg.base_lr, "name": "base"})
    else:
        last = len(model.stages) - 1
        groups += [{"params": list(s.parameters()), "lr": cfg.base_lr * cfg.layer_decay ** (last - i), "name": f"stage{i}"}
                   for i, s in trainable]
    groups = [g for g in groups if g["params"]]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, momentum=cfg.momentum, nesterov=cfg.momentum > 0, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(groups, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)


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
    return refit(cfg, data, result.best["epoch"], report, cache, result.tau)


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
    return _cpu_copy(model)


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
            _eval_input(next(pixels).to(device), spec, cfg.image_size), depth)
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
          cache: RunCache | None = None, tau: float = 0.0) -> Result:
    """The recipe retrained on every labelled image for `epochs`, along its validated learning-rate curve, logit
    adjusted by the validated `tau`."""
    return finetune(refit_config(cfg, epochs, tau), data, report, [data.everything()], cache)


def _set_trainable(model: Net, depth: int) -> None:
    """Stages before `depth`: no gradients and BatchNorm in eval mode; the rest train."""
    model.train()
    for i, stage in enumerate(model.stages):
        frozen = i < depth
        stage.train(not frozen)
        for p in stage.parameters():
            p.requires_grad_(not frozen)


@torch.no_grad()
def evaluate_split(model: torch.nn.Module, spec: BackboneSpec, cfg: Config, split: Split, depth: int,
                   device: torch.device, cache: RunCache | None = None) -> tuple[float, np.ndarray]:
    """Loss and predicted classes on a split (test/, or new data); the frozen prefix's output comes from `cache`."""
    logits = predict_logits(model, spec, cfg, split, depth, device, cache=cache)
    return F.cross_entropy(logits, split.labels.to(device)).item(), logits.argmax(1).cpu().numpy()


@torch.no_grad()
def predict_logits(model: torch.nn.Module, spec: BackboneSpec, cfg: Config, images: torch.Tensor | Split | Images,
                   depth: int, device: torch.device, index: torch.Tensor | None = None,
                   cache: RunCache | None = None) -> torch.Tensor:
    """Logits for the images at `index` (all of them by default) through the eval transform, in batches.

    `images`: uint8 (N, 3, S, S) as a tensor, a Split (read from its store) or Images. With `depth`, the frozen
    prefix's output over all of them comes from `cache` (computed once) when it fits its budget.
    """
    images = as_images(images, device)
    was_training = model.training
    model.eval()
    feats = frozen_features(model, spec, cfg, images, depth, device, cache) if depth and cache is not None else None
    index = torch.arange(len(images)) if index is None else index.cpu()
    chunks = index.split(max(1, cfg.batch_size * 2))
    pixels = images.batches(chunks) if feats is None else iter(())
    out = []
    for chunk in chunks:
        if feats is not None:
            x, start = feats[chunk.to(feats.device)], depth
        else:  # no depth, or features too big to keep: the whole model from the images
            x, start = _eval_input(next(pixels).to(device, non_blocking=True), spec, cfg.image_size), 0
        with autocast(device):
            out.append(model(x, start=start).float())
    model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, model.num_classes, device=device)


def _eval_input(images: torch.Tensor, spec: BackboneSpec, size: int) -> torch.Tensor:
    return normalize(center_crop(images, size), spec.mean, spec.std).contiguous(memory_format=torch.channels_last)


# --- frozen-prefix features ------------------------------------------------------------------------------------

@torch.no_grad()
def frozen_features(model: Net, spec: BackboneSpec, cfg: Config, images: Images, depth: int, device: torch.device,
                    cache: RunCache) -> torch.Tensor | None:
    """Output of the frozen stages[:depth] for every one of `images` (eval transform), computed once per `cache`.

    Frozen stages hold the pretrained weights unchanged, so trials with the same backbone, weights, image
    size and depth share the result. It counts against the cache's byte budget (least recently used out);
    features that would not fit even alone, or of images with no key, are never materialised: None tells
    the caller to run the prefix per batch, so a huge set costs time, never memory.
    """
    if images.key is None:
        return None
    key = ("features", spec.name, cfg.weights, cfg.image_size, depth, images.key, str(device))
    hit = cache.get(key)
    if hit is not None:
        return hit
    was_training = [s.training for s in model.stages[:depth]]
    for s in model.stages[:depth]:
        s.eval()
    feats = None
    step = max(1, cfg.batch_size * 2)
    chunks = torch.arange(len(images)).split(step)
    try:
        with autocast(device):
            for chunk, pixels in zip(chunks, images.batches(chunks)):
                part = model.features(_eval_input(pixels, spec, cfg.image_size), depth)
                if feats is None:  # the first batch tells the size of the whole; filled in place, no concatenation
                    nbytes = part[0].numel() * part.element_size() * len(images)
                    if not cache.make_room(nbytes):
                        return None
                    fmt = torch.channels_last if part.dim() == 4 else torch.contiguous_format
                    feats = torch.empty((len(images), *part.shape[1:]), dtype=part.dtype, device=part.device,
                                        memory_format=fmt)
                feats[chunk[0]:chunk[-1] + 1] = part
    finally:
        for s, t in zip(model.stages[:depth], was_training):
            s.train(t)
    if feats is not None:
        cache.put(key, feats, feats.numel() * feats.element_size())
    return feats
