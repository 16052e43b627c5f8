"""The sampler and the pruner: successive halving behind a guard that measures a step against
completed fine-tunes only.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import optuna
from optuna.trial import FrozenTrial

from ..estimate import Estimate
from ..results import records
from ..system import interrupts
from ..training import probe


def make_sampler(name: str, seed: int | None) -> optuna.samplers.BaseSampler:
    if name == "tpe":
        # group: a searched backbone makes the space conditional (see space.py); TPE models each branch apart
        with warnings.catch_warnings():  # "experimental" since Optuna 2.8; the grouping is what conditional spaces need
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True, n_startup_trials=5)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False)
    return optuna.samplers.GPSampler(seed=seed)


class _Guarded(optuna.pruners.BasePruner):
    """Around every pruner: never before `min_epochs` steps or `startup` finished trials, never a trial within noise
    of the leading fine-tune at the same step, and never by comparison with an exact probe.

    A step is one epoch of one fold (folds train one after another), so at a given step every fine-tune has scored
    the same fold's images at the same epoch: the trial is spared while its score there, `z` standard errors of the
    difference up (binomial on the fold's images for accuracy, the step's bootstrap for the other metrics), reaches
    the best score at that step among the finished fine-tunes (stopped ones too: they reached the step). The inner
    pruner (Optuna's) is asked first, so its bookkeeping (successive halving's rungs) sees every step; the guard
    only vetoes its "prune". With z = 1 it spares the trials that a one-standard-error tie could make the winner.

    Exact probes are no yardstick: fitted in one step, a probe reports its final score at every step of its folds,
    which a fine-tune's first epochs would be measured against. They never ask the pruner, so they hold no rung of
    successive halving either; fold racing compares every trial with the leader, a probe included, on whole folds.
    Replayed on recorded curves (benchmarks/pruning.py), this yardstick bought about twice the trials per budget of
    completed fine-tunes alone (which a search whose probe leads may never have), and stopped no eventual winner.
    """

    def __init__(
        self,
        inner: optuna.pruners.BasePruner,
        min_epochs: int,
        startup: int,
        images: int,
        metric: str,
        epochs: int = 1,
        z: float = 1.0,
    ):
        self.inner, self.min_epochs, self.startup, self.images = inner, min_epochs, startup, images
        self.metric, self.epochs, self.z = metric, epochs, z

    def prune(self, study: optuna.Study, trial: FrozenTrial) -> bool:
        interrupts.check_stopped()  # a signal that waited out a storage write, or that Python dropped, stops here
        step = trial.last_step
        if step is None or step < self.min_epochs:
            return False
        finished = study.get_trials(deepcopy=False, states=records.FINISHED)  # one storage read per epoch
        if len(finished) < self.startup or not self.inner.prune(study, trial):
            return False
        there = self.yardsticks(finished, step)
        if not there:
            return False
        top = max(there, key=lambda t: t.intermediate_values[step])
        theirs, now = top.intermediate_values[step], trial.intermediate_values[step]
        noise = math.hypot(self._noise(trial, step, now), self._noise(top, step, theirs))
        return now + self.z * noise < theirs

    @staticmethod
    def yardsticks(finished: Sequence[FrozenTrial], step: int) -> list[FrozenTrial]:
        """The trials a step is measured against: the finished fine-tunes that reached it (no exact probe)."""
        return [t for t in finished if step in t.intermediate_values and not probe.exact(records.steps(t))]

    def _noise(self, t: FrozenTrial, step: int, value: float) -> float:
        """The standard error of a trial's score at `step`: on its fold's images (all of them for an exact probe's
        pooled value)."""
        metrics = records.step(t, step, self.epochs)
        n = metrics.get("images") or self.images
        return (Estimate.of(metrics, n, self.metric) if metrics else Estimate(value, n)).noise


def make_pruner(
    name: str, epochs: int, min_epochs: int, startup: int, images: int, metric: str = "accuracy", folds: int = 1
) -> optuna.pruners.BasePruner:
    """`images`: how many validation images a step's score (of `metric`) rests on, one fold's (the noise the guard
    allows for); a trial has `folds` x `epochs` steps, the resource successive halving and Hyperband divide."""
    if name == "none":
        inner = optuna.pruners.NopPruner()
    elif name == "median":
        inner = optuna.pruners.MedianPruner(n_startup_trials=startup)  # its median needs that many completed trials
    elif name == "sha":
        inner = optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=3)
    else:
        inner = optuna.pruners.HyperbandPruner(min_resource=1, max_resource=max(1, folds * epochs), reduction_factor=3)
    return _Guarded(inner, min_epochs, startup, images, metric, epochs)
