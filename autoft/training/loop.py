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

Test-time augmentation (`tta`): the kept epoch's fold models also predict their held-out images mirrored;
with `auto` the mean of the two views' logits is used where it scores better out of fold (the metric
strictly higher, tau chosen again with it), and the choice ships with the model (backbones.FlipAveraged).
"""

from __future__ import annotations

import functools
import math
import resource
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..backbones import BackboneSpec, Net, build_model, set_drop_path
from ..cache import Images, RunCache
from ..config import Config
from ..data.augment import augment, normalize
from ..data.dataset import Dataset, Fold
from ..estimate import Estimate, fold_of, scores
from ..exceptions import ConfigError, TrialFailure
from .inference import autocast, frozen_features, predict_logits
from .probe import CHOSEN_C, EXACT, fit_heads
from .probe import applies as exact_probe

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
    steps: list[dict[str, Any]] = field(default_factory=list)  # every fold's every epoch, as `report` saw them

    @property
    def tau(self) -> float:
        """The logit adjustment the kept epoch was scored with; unvalidated, the config's (`auto`: 0, nothing to
        choose it on)."""
        return float(
            self.best.get("tau", 0.0 if self.config.logit_adjustment == "auto" else self.config.logit_adjustment)
        )

    @property
    def tta(self) -> str:
        """The test-time augmentation the kept epoch was scored with; unvalidated, the config's (`auto`: none)."""
        return self.best.get("tta", "none" if self.config.tta == "auto" else self.config.tta)

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
    """Post-hoc logit adjustment (Menon et al., ICLR 2021): logits - tau * log prior; tau = 0 leaves them as
    they are."""
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


@dataclass
class Partial:
    """What the folds trained so far say, handed to `race` after each fold but the last: the images they validated
    (indices into the labelled images), their log probabilities at the epoch that scores best pooled over those
    folds, its logit adjustment, and the labels. Enough to compare a trial with another on the same images."""

    folds_done: int
    folds: int
    index: np.ndarray  # (n,) labelled-image indices validated so far
    log_probs: np.ndarray  # (n, C) unadjusted, at `epoch`
    labels: np.ndarray  # (n,)
    tau: float
    epoch: int  # 1-based


Race = Callable[[Partial], Any]
BatchHook = Callable[[int, int, float], Any]  # (batches done, batches in the epoch, training images/s so far)


def finetune(
    cfg: Config,
    data: Dataset | None = None,
    report: Report | None = None,
    folds: Sequence[Fold] | None = None,
    cache: RunCache | None = None,
    race: Race | None = None,
    on_batch: BatchHook | None = None,
) -> Result:
    """Fine-tune `cfg.backbone` on `data` (loaded from `cfg.data` when not given), one model per fold, fold after fold.

    `folds` defaults to `plan_folds`; `[data.everything()]` trains one model on every image (a refit).
    Folds train one after another (all epochs of fold 1, then fold 2, ...), so a recipe that is behind can be
    stopped after one fold instead of paying for all. `report(step, metrics)` runs after each epoch of each fold
    (step = fold * epochs + epoch, 0-based; `metrics` scores that fold's held-out images, with "fold" and "epoch"
    1-based); `race(partial)` after each fold but the last (see Partial). Raising from either stops the run (the
    search prunes this way); `report` returning True in the last fold ends it there, on what every fold has trained
    (the search's deadline: the kept epoch is then the best of the epochs all folds reached). Patience counts on
    the first fold; the others train as many epochs as it did. The kept epoch is the best pooled over every fold
    (`score_key`); `Result.history` holds each epoch's pooled metrics. A non-finite loss raises TrialFailure.
    `cache` holds what outlives this call (device copies of the images, frozen features, pretrained stages); None:
    a private one, dropped at the end.
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
    counts = torch.tensor(data.class_counts)
    prior = (counts / counts.sum()).tolist()
    log_prior = np.log(np.maximum(prior, 1e-12))
    folds_run = _Folds(cfg, folds, data.labelled.labels.numpy(), len(data.classes), log_prior)
    make_run = functools.partial(
        _FoldRun, cfg, labels=data.labelled.labels, num_classes=len(data.classes), device=device, cache=cache
    )
    first = make_run(folds[0], fold_seed(cfg.seed, 0))
    n_stages = len(first.model.stages)
    try:
        if exact_probe(cfg, n_stages):  # a linear head on fixed features: fitted exactly in one step (probe.py)
            features = frozen_features(first.model, first.spec, cfg, images, n_stages, device, cache)
            if features is not None:  # else too big to hold: the head trains by epochs instead
                runs = [first] + [make_run(f, fold_seed(cfg.seed, i)) for i, f in enumerate(folds) if i]
                _fit_exactly(runs, cfg, features, labels, images, device, cache, folds_run, report)
                del runs
                result = folds_run.result(data.classes, device, time.perf_counter() - t0, prior)
                return _test_time_augmentation(cfg, result, folds_run, images, device, cache)
        epochs, cut = cfg.epochs, False
        for i, fold in enumerate(folds):
            run = first if i == 0 else make_run(fold, fold_seed(cfg.seed, i))
            first = None  # each fold's model is dropped once its epochs are kept
            for epoch in range(epochs):
                metrics = _train_and_score(
                    run, cfg, images, labels, i, epoch, n_stages, device, cache, log_prior, on_batch
                )
                folds_run.add(i, run, metrics)
                cut = report is not None and report(i * cfg.epochs + epoch, metrics) is True and i + 1 == len(folds)
                if cut:
                    break
                if i == 0 and cfg.patience and folds_run.stale >= cfg.patience:
                    epochs = epoch + 1
                    break
            del run
            if race is not None and i + 1 < len(folds):
                race(folds_run.partial(i + 1))
        result = folds_run.result(
            data.classes, device, time.perf_counter() - t0, prior, stopped=epochs < cfg.epochs or cut
        )
        return _test_time_augmentation(cfg, result, folds_run, images, device, cache)
    finally:
        del first, images
        if device.type == "cuda":
            torch.cuda.empty_cache()


def _train_and_score(
    run: _FoldRun,
    cfg: Config,
    images: Images,
    labels: torch.Tensor,
    fold: int,
    epoch: int,
    n_stages: int,
    device: torch.device,
    cache: RunCache,
    log_prior: np.ndarray,
    on_batch: BatchHook | None,
) -> dict[str, Any]:
    """One epoch of one fold's model, then its held-out images scored: the epoch's metrics for `report`."""
    depth = n_stages if epoch < cfg.head_only_epochs else cfg.freeze_depth  # freeze, then unfreeze
    features = None  # without augmentation, the frozen stages' output for the training images never changes
    if not cfg.augmented and depth:
        features = frozen_features(run.model, run.spec, cfg, images, depth, device, cache)  # validation too
    t_epoch = time.perf_counter()
    train_loss, seen = run.train_epoch(images, labels, depth, features, on_batch)
    train_time = time.perf_counter() - t_epoch
    if not math.isfinite(train_loss):
        raise TrialFailure(f"training loss diverged ({train_loss}) in epoch {epoch + 1}")
    metrics: dict[str, Any] = {"fold": fold + 1, "epoch": epoch + 1, "train_loss": train_loss}
    metrics |= validate(run, cfg, images, labels, depth, device, log_prior, cache)
    return metrics | {
        "images_per_s": seen / train_time,
        "epoch_time_s": time.perf_counter() - t_epoch,
        "lr_head": run.opt.param_groups[0]["lr"],
    }


def _fit_exactly(
    runs: Sequence[_FoldRun],
    cfg: Config,
    features: torch.Tensor,
    labels: torch.Tensor,
    images: Images,
    device: torch.device,
    cache: RunCache,
    folds_run: _Folds,
    report: Report | None,
) -> None:
    """Every fold's head fitted exactly (probe.fit_heads) in one step, then each fold scored and reported once."""
    t_fit = time.perf_counter()
    heads = [(r.model.head, r.fold.train, r.loss_weight) for r in runs]
    train_loss, seen, fitted = fit_heads(heads, features, labels, cfg)
    train_time = time.perf_counter() - t_fit
    depth = cfg.freeze_depth
    for i, run in enumerate(runs):
        metrics = {"fold": i + 1, "epoch": 1, "train_loss": train_loss} | fitted
        metrics |= validate(run, cfg, images, labels, depth, device, folds_run.log_prior, cache)
        metrics |= {
            "images_per_s": seen / train_time,
            "epoch_time_s": train_time / len(runs),
            "lr_head": run.opt.param_groups[0]["lr"],
        }
        folds_run.add(i, run, metrics)
        if report is not None:
            report(i * cfg.epochs, metrics)


def _test_time_augmentation(
    cfg: Config, result: Result, folds_run: _Folds, images: Images, device: torch.device, cache: RunCache
) -> Result:
    """`tta` decided on the out-of-fold predictions at the kept epoch: every fold model predicts its held-out images
    mirrored, and the mean of the two views' logits replaces the plain ones when `tta` is flip, or when it is auto
    and that scores strictly higher (tau chosen again with it). The kept epoch's metrics (the trial's value), the
    out-of-fold probabilities and `Result.tta` follow the choice; `tta_gain` is the score with the flip less the
    score without, whichever was chosen. Nothing validated, or `tta: none`: `result` as it is."""
    if cfg.tta == "none" or not result.validated or result.oof is None:
        return result
    kept, upto = result.best["epoch"] - 1, len(folds_run.folds)
    _, index, plain, _ = folds_run.pooled(kept, upto)
    mirrored = []
    for fold, state in zip(folds_run.folds, result.members):
        if len(fold.val):
            model, spec = build_on_device(cfg, folds_run.classes, device, cache=cache)
            model.load_state_dict(state)
            logits = predict_logits(model, spec, cfg, images, cfg.freeze_depth, device, fold.val, cache, flip=True)
            mirrored.append(logits.float().log_softmax(1).cpu().numpy())
    both = torch.from_numpy((plain + np.concatenate(mirrored)) / 2).log_softmax(1).numpy()
    flipped = folds_run.measure(both, upto)
    key = f"val_{cfg.metric}"
    gain = flipped[key] - result.best[key]
    if cfg.tta == "flip" or gain > 0:
        result.best.update(flipped)  # the kept epoch's entry of the history too
        oof = np.full_like(result.oof, np.nan)
        oof[index] = np.exp(both)
        result.oof = oof
        result.best["tta"] = "flip"
    else:
        result.best["tta"] = "none"
    result.best["tta_gain"] = gain
    return result


class _Folds:
    """The folds trained so far: every fold's held-out log probabilities and a CPU copy of its weights at every epoch
    (the kept epoch is the best pooled over all folds, known only at the end), and, on the first fold, the epochs
    since its best (patience). Frozen stages are the same pretrained tensors in every copy: held once."""

    def __init__(self, cfg: Config, folds: Sequence[Fold], labels: np.ndarray, classes: int, log_prior: np.ndarray):
        self.cfg, self.folds, self.labels, self.classes, self.log_prior = cfg, folds, labels, classes, log_prior
        self.shared_prefix = tuple(f"stages.{i}." for i in range(cfg.freeze_depth))
        self.shared: dict[str, torch.Tensor] = {}
        self.weights: list[list[dict[str, torch.Tensor]]] = [[] for _ in folds]
        self.log_probs: list[list[np.ndarray]] = [[] for _ in folds]
        self.steps: list[dict[str, Any]] = []
        self.stale = 0  # epochs of the first fold since its best

    def add(self, i: int, run: _FoldRun, metrics: dict[str, Any]) -> None:
        """Fold `i`'s epoch just scored (`metrics`, with its log probabilities under _LOG_PROBS): keep them, and a copy
        of its weights (one fold alone, a holdout or a refit, keeps only its best epoch's, or its latest)."""
        log_probs = metrics.pop(_LOG_PROBS, None)
        mine = [s for s in self.steps if s["fold"] == i + 1]
        self.steps.append(metrics)
        if log_probs is not None:
            self.log_probs[i].append(log_probs)
        validated = "val_loss" in metrics
        best = validated and all(score_key(metrics, self.cfg.metric) > score_key(s, self.cfg.metric) for s in mine)
        if len(self.folds) > 1:
            self.weights[i].append(self._copy(run.evaluated))
        elif best or not validated:
            self.weights[i] = [self._copy(run.evaluated)]
        if i == 0:
            self.stale = 0 if best else self.stale + 1

    def _copy(self, model: Net) -> dict[str, torch.Tensor]:
        out = {}
        for k, v in model.state_dict().items():
            if k.startswith(self.shared_prefix):
                out[k] = self.shared.setdefault(k, v.detach().to("cpu", copy=True))
            else:
                out[k] = v.detach().to("cpu", copy=True)
        return out

    def pooled(self, epoch: int, upto: int) -> tuple[dict[str, Any], np.ndarray, np.ndarray, float] | None:
        """Epoch `epoch` (0-based) of the first `upto` folds pooled: its metrics (every metric, loss, fold scores, the
        interval of the chosen one, tau), the validated indices and their unadjusted log probabilities."""
        held = [(f, lp[epoch]) for f, lp in zip(self.folds[:upto], self.log_probs[:upto]) if len(f.val)]
        if not held:
            return None
        index = np.concatenate([f.val.cpu().numpy() for f, _ in held])
        log_probs = np.concatenate([lp for _, lp in held])
        metrics = self.measure(log_probs, upto)
        return metrics, index, log_probs, metrics["tau"]

    def measure(self, log_probs: np.ndarray, upto: int) -> dict[str, Any]:
        """The pooled metrics of the held-out log probabilities of the first `upto` folds, in fold order (as
        `pooled` concatenates them): loss, every metric after the logit adjustment chosen on them, the interval."""
        held = [f for f in self.folds[:upto] if len(f.val)]
        index = np.concatenate([f.val.cpu().numpy() for f in held])
        y = self.labels[index]
        tau = choose_tau(self.cfg, log_probs, y, self.log_prior)
        pred = adjusted(log_probs, self.log_prior, tau).argmax(1)
        fold = np.concatenate([np.full(len(f.val), i) for i, f in enumerate(held)])
        estimate = Estimate.measure(self.cfg.metric, y, pred, self.classes, fold)
        return {
            "val_loss": float(-log_probs[np.arange(len(y)), y].mean()),
            **{f"val_{m}": v for m, v in scores(y, pred, self.classes).items()},
            **estimate.epoch_metrics(),
            "tau": tau,
        }

    def _history(self, upto: int) -> list[tuple[dict[str, Any], np.ndarray, np.ndarray, float] | None]:
        epochs = min(len(lp) for lp in self.log_probs[:upto]) if all(self.log_probs[:upto]) else 0
        return [self.pooled(e, upto) for e in range(epochs)]

    def partial(self, done: int) -> Partial:
        history = [h for h in self._history(done) if h is not None]
        e = max(range(len(history)), key=lambda k: score_key(history[k][0], self.cfg.metric))
        _, index, log_probs, tau = history[e]
        return Partial(done, len(self.folds), index, log_probs, self.labels[index], tau, e + 1)

    def result(
        self, classes: list[str], device: torch.device, seconds: float, prior: list[float], stopped: bool = False
    ) -> Result:
        """The kept epoch (the best pooled over every fold by `score_key`; the last when nothing is validated), every
        fold's weights at it and the out-of-fold probabilities."""
        cfg, n = self.cfg, len(self.labels)
        per_fold = [[s for s in self.steps if s["fold"] == i + 1] for i in range(len(self.folds))]
        epochs = min(len(s) for s in per_fold)
        pooled = self._history(len(self.folds))
        history = []
        for e in range(epochs):
            steps = [s[e] for s in per_fold]
            m = {
                "epoch": e + 1,
                "train_loss": float(np.mean([s["train_loss"] for s in steps])),
                "images_per_s": float(np.mean([s["images_per_s"] for s in steps])),
                "epoch_time_s": float(sum(s["epoch_time_s"] for s in steps)),
                "lr_head": steps[0]["lr_head"],
            }
            m |= {k: v for k, v in steps[0].items() if k in (EXACT, CHOSEN_C)}
            if e < len(pooled) and pooled[e] is not None:
                m |= pooled[e][0]
            history.append(m)
        validated = pooled and pooled[0] is not None
        kept = max(range(epochs), key=lambda e: score_key(history[e], cfg.metric)) if validated else epochs - 1
        members = [w[kept] if len(w) > 1 else w[0] for w in self.weights]
        oof = None
        if validated:
            _, index, log_probs, _ = pooled[kept]
            oof = np.full((n, self.classes), np.nan, dtype=np.float32)
            oof[index] = np.exp(log_probs)
        fold = fold_of([f.val.cpu().numpy() for f in self.folds], n)
        return Result(
            history[kept],
            history[-1],
            history,
            members,
            cfg.freeze_depth,
            classes,
            cfg,
            str(device),
            seconds,
            peak_memory_mb(device),
            stopped,
            sum(len(f.val) for f in self.folds),
            oof,
            fold,
            prior,
            self.steps,
        )


def fold_seed(seed: int, fold: int) -> int:
    """Fold 0 keeps the config's seed (a holdout run is one fold); the others derive theirs from it."""
    return (seed + 1_000_003 * fold) % 2**32


class _FoldRun:
    """One fold's model, optimizer, schedule and random streams, trained an epoch at a time; with the loss weights
    (`class_weight`) and the sampling weights (`balanced_sampling`) of its training images' classes."""

    def __init__(
        self,
        cfg: Config,
        fold: Fold,
        seed: int,
        labels: torch.Tensor,
        num_classes: int,
        device: torch.device,
        cache: RunCache,
    ):
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
        on = cfg.trivial_augment or cfg.mixup or cfg.cutmix or cfg.ema_decay
        self.extra = Regularizers(cfg, self.model, num_classes, fold_seed(seed, 1)) if on else None

    @property
    def evaluated(self) -> Net:
        """The model validated and kept: the weight average once it has been stepped, else the model itself."""
        return (
            self.extra.ema.module
            if self.extra is not None and self.extra.ema is not None and self.extra.steps
            else self.model
        )

    def train_epoch(
        self,
        images: Images,
        labels: torch.Tensor,
        depth: int,
        features: torch.Tensor | None,
        on_batch: BatchHook | None = None,
    ) -> tuple[float, int]:
        _set_trainable(self.model, depth)
        n, k = len(self.fold.train), self.per_epoch
        pick = (
            torch.randperm(n, generator=self.gen_cpu)[:k]
            if self.draw is None
            else torch.multinomial(self.draw, k, replacement=True, generator=self.gen_cpu)
        )
        order = self.fold.train[pick]
        return train_one_epoch(
            self.model,
            self.spec,
            self.cfg,
            self.opt,
            self.sched,
            order.split(self.batch)[: self.steps],
            images,
            labels,
            depth,
            self.gen_dev,
            features,
            self.loss_weight,
            on_batch,
            self.extra,
        )


_LOG_PROBS = "_log_probs"  # validate's (n_val, C) array, taken out of the metrics before they are recorded


@torch.no_grad()
def validate(
    run: _FoldRun,
    cfg: Config,
    images: Images,
    labels: torch.Tensor,
    depth: int,
    device: torch.device,
    log_prior: np.ndarray,
    cache: RunCache | None = None,
) -> dict[str, Any]:
    """One fold's model on its own held-out images: the loss and every metric over them (`val_accuracy`,
    `val_balanced_accuracy`, `val_f1_macro`) after the logit adjustment `tau` (chosen here when `auto`), the interval
    of `cfg.metric`, and under `_LOG_PROBS` their (n, C) unadjusted log probabilities. Nothing held out: {}."""
    index = run.fold.val
    if not len(index):
        return {}
    logits = predict_logits(run.evaluated, run.spec, cfg, images, depth, device, index, cache)
    log_probs, y = logits.float().log_softmax(1).cpu().numpy(), labels[index.to(device)].cpu().numpy()
    tau = choose_tau(cfg, log_probs, y, log_prior)
    pred = adjusted(log_probs, log_prior, tau).argmax(1)
    estimate = Estimate.measure(cfg.metric, y, pred, log_probs.shape[1])
    return {
        "val_loss": float(-log_probs[np.arange(len(y)), y].mean()),
        **{f"val_{m}": v for m, v in scores(y, pred, log_probs.shape[1]).items()},
        **estimate.epoch_metrics(),
        "tau": tau,
        "images": len(y),
        _LOG_PROBS: log_probs,
    }


def build_on_device(
    cfg: Config, num_classes: int, device: torch.device, seed: int | None = None, cache: RunCache | None = None
) -> tuple[Net, BackboneSpec]:
    """The backbone with a new head (seeded), channels_last on `device`; a freeze depth past its stages is a config
    error. The pretrained stages come from `cache` (read once per run) when given."""
    model, spec = build_model(
        cfg.backbone,
        num_classes,
        cfg.weights,
        cfg.seed if seed is None else seed,
        cache.pretrained_stages if cache is not None else None,
    )
    if cfg.drop_path_rate:
        set_drop_path(model, cfg.drop_path_rate)
    n_stages = len(model.stages)
    if cfg.freeze_depth > n_stages:
        raise ConfigError(
            f"config key 'freeze_depth': {cfg.freeze_depth} is more than {cfg.backbone}'s {n_stages} stages"
        )
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
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda step: lr_factor(step / steps, cfg.warmup_epochs, cfg.cosine_t_max)
    )


def train_one_epoch(
    model: Net,
    spec: BackboneSpec,
    cfg: Config,
    opt: torch.optim.Optimizer,
    sched: torch.optim.lr_scheduler.LRScheduler,
    batches: Sequence[torch.Tensor],
    images: Images,
    labels: torch.Tensor,
    depth: int,
    generator: torch.Generator,
    features: torch.Tensor | None = None,
    class_weight: torch.Tensor | None = None,
    on_batch: BatchHook | None = None,
    extra: Regularizers | None = None,
) -> tuple[float, int]:
    """One optimizer step per batch of indices into `images`/`labels`; returns the mean loss and the images seen.

    Stages before `depth` are frozen: their output comes from `features` (cached, when there is no
    augmentation) or is computed under no_grad; images are augmented on the device with `generator`.
    `class_weight` (C,) weighs each class in the cross-entropy; `on_batch(done, total, images/s)` sees each step;
    `extra`: TrivialAugment before the augmentation, Mixup/CutMix after it, the weight average after each step.
    """
    device = labels.device
    total_loss, seen, t0 = torch.zeros((), device=device), 0, time.perf_counter()
    pixels = images.batches(batches) if features is None else iter(())
    for done, idx in enumerate(batches, 1):
        target = labels[idx.to(device)]
        if features is not None:
            x = features[idx.to(features.device)]
        else:
            x = next(pixels)
            x = extra.trivial_augment(x) if extra is not None and extra.trivial else x
            x = augment(x, cfg.image_size, cfg.aug_strength, generator)
            x = normalize(x, spec.mean, spec.std).contiguous(memory_format=torch.channels_last)
            if extra is not None and extra.mix is not None:
                x, target = extra.mixed(x, target)
            if depth:
                with torch.no_grad(), autocast(device):
                    x = model.features(x, depth)
        with autocast(device):  # mixed targets carry their own label smoothing (timm's Mixup applies it)
            loss = F.cross_entropy(
                model(x, start=depth).float(),
                target,
                weight=class_weight,
                label_smoothing=cfg.label_smoothing if target.dim() == 1 else 0.0,
            )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if extra is not None and extra.ema is not None:
            extra.steps += 1
            extra.ema.update(model, step=extra.steps)
        total_loss += loss.detach() * len(idx)
        seen += len(idx)
        if on_batch is not None:
            on_batch(done, len(batches), seen / max(time.perf_counter() - t0, 1e-9))
    return (total_loss / seen).item(), seen  # one sync per epoch, not per step


class Regularizers:
    """A fold's regularizers beyond the recipe's augmentation, each built only when its key is on, so that at its
    neutral value the training run is the one without it, bit for bit: TrivialAugment (torchvision's
    TrivialAugmentWide, per image), Mixup and CutMix (timm.data.Mixup), and the weight average (timm.utils.
    ModelEmaV3, with its warmup, stepped after every optimizer step). Their random draws come from their own
    seeded streams, never the global ones the rest of training uses."""

    def __init__(self, cfg: Config, model: Net, num_classes: int, seed: int):
        from timm.data import Mixup
        from timm.utils import ModelEmaV3
        from torchvision.transforms import v2

        self.trivial = v2.TrivialAugmentWide() if cfg.trivial_augment else None
        self.mix = (
            Mixup(
                mixup_alpha=cfg.mixup,
                cutmix_alpha=cfg.cutmix,
                label_smoothing=cfg.label_smoothing,
                num_classes=num_classes,
            )
            if cfg.mixup or cfg.cutmix
            else None
        )
        self.ema = ModelEmaV3(model, decay=cfg.ema_decay, use_warmup=True) if cfg.ema_decay else None
        self.steps = 0
        self.generator = torch.Generator().manual_seed(seed)
        self.numpy = np.random.RandomState(seed % 2**32).get_state()  # timm's Mixup draws from numpy's global stream

    def trivial_augment(self, x: torch.Tensor) -> torch.Tensor:
        """One TrivialAugmentWide draw per uint8 image of the batch."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(torch.randint(2**62, (1,), generator=self.generator)))
            return torch.stack([self.trivial(image) for image in x])

    def mixed(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mixup or CutMix of the batch (in place; an even number of its images, as timm's batch mode pairs image i
        with n-1-i) and soft targets for all of it: an odd last image keeps its own class, label-smoothed."""
        from timm.data.mixup import mixup_target

        even = len(x) - len(x) % 2
        rest = mixup_target(y[even:], self.mix.num_classes, 1.0, self.mix.label_smoothing)
        if not even:
            return x, rest
        outer = np.random.get_state()
        np.random.set_state(self.numpy)
        try:
            _, head = self.mix(x[:even], y[:even])
            self.numpy = np.random.get_state()
        finally:
            np.random.set_state(outer)
        return x, torch.cat([head, rest])


def cpu_copy(model: Net) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def peak_memory_mb(device: torch.device) -> float:
    """Peak allocated CUDA memory on a GPU; the process's peak resident memory elsewhere."""
    peak = (
        torch.cuda.max_memory_allocated(device)
        if device.type == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    )
    return peak / 2**20


def make_optimizer(model: Net, cfg: Config) -> torch.optim.Optimizer:
    """The new head at head_lr; the unfrozen pretrained stages at base_lr, each earlier one `layer_decay` times
    the next (fastai's lower rates for early layers; one group when there is no decay).

    Frozen stages get no group at all; stages that only wait out head_only_epochs are in a group but
    receive no gradient until they unfreeze, so the optimizer skips them until then.
    """
    for p in (p for s in model.stages[: cfg.freeze_depth] for p in s.parameters()):
        p.requires_grad_(False)
    groups = [{"params": list(model.head.parameters()), "lr": cfg.head_lr, "name": "head"}]
    trainable = list(enumerate(model.stages))[cfg.freeze_depth :]
    if cfg.layer_decay == 1.0:
        groups.append({"params": [p for _, s in trainable for p in s.parameters()], "lr": cfg.base_lr, "name": "base"})
    else:
        last = len(model.stages) - 1
        groups += [
            {"params": list(s.parameters()), "lr": cfg.base_lr * cfg.layer_decay ** (last - i), "name": f"stage{i}"}
            for i, s in trainable
        ]
    groups = [g for g in groups if g["params"]]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, momentum=cfg.momentum, nesterov=cfg.momentum > 0, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(groups, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)


def _set_trainable(model: Net, depth: int) -> None:
    """Stages before `depth`: no gradients and BatchNorm in eval mode; the rest train."""
    model.train()
    for i, stage in enumerate(model.stages):
        frozen = i < depth
        stage.train(not frozen)
        for p in stage.parameters():
            p.requires_grad_(not frozen)
