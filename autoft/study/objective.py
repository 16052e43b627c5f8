"""The search's objective: suggest a config, fine-tune it, report every epoch so the pruner can stop it.

Each trial is recorded through `records`, a new best's weights are exported before the trial is told,
and every finished or pruned trial is published to the dashboard.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import optuna
import torch
from optuna.trial import FrozenTrial, TrialState

from ..backbones import get_backbone
from ..cache import RunCache
from ..config import Config
from ..data.dataset import Dataset
from ..exceptions import TrialFailure, one_line
from ..results import dashboard, records
from ..results.exports import Exporter, joins
from ..space import SearchSpace
from ..system import interrupts
from ..training import probe
from ..training.loop import (
    BatchHook,
    Partial,
    Race,
    Report,
    Result,
    adjusted,
    finetune,
    fold_notice,
    plan_folds,
    resolve_device,
)
from ..training.probe import EXACT
from . import racing
from .racing import Verdict

log = logging.getLogger("autoft")


def trial_seed(study_seed: int, number: int) -> int:
    """Each trial's seed derives from the study seed and the trial number: reruns reproduce."""
    return (study_seed * 1_000_003 + number * 7919 + 17) % 2**32


EpochHook = Callable[[int, int, dict[str, Any]], None]  # (trial number, epochs planned, the epoch's metrics)
TrialBatchHook = Callable[[int, int, int, float], None]  # (trial number, batches done, batches in the epoch, images/s)


class Objective:
    """Suggest, fine-tune, report; the pruner (study.pruning.make_pruner) and the fold race decide when a trial
    falls behind.

    Folds train one after another: every epoch of every fold is a step the pruner sees (the same fold's images at
    the same epoch in every trial), and after each fold but the last the trial races the leading trial on the
    images validated so far (racing.py). `deadline` (time.monotonic) makes `--timeout` a budget for the whole run:
    a running trial stops (pruned, its steps kept) at the first fold or epoch boundary after which the next one
    would not end before the deadline less what the final export needs (`Exporter.reserve`). `on_epoch` and
    `on_batch` see every epoch and batch of every trial (the progress line). `cache` is what the search keeps
    between trials (datasets, device copies, frozen features, weights, the leaders' out-of-fold predictions).
    """

    clock: Callable[[], float] = staticmethod(time.monotonic)  # what the deadline is read on (a test's fake clock)

    def __init__(self, base: Config, space: SearchSpace, study_seed: int, exporter: Exporter, cache: RunCache):
        self.base, self.space, self.study_seed, self.exporter, self.cache = base, space, study_seed, exporter, cache
        self.deadline: float | None = None
        self.on_epoch: EpochHook | None = None
        self.on_batch: TrialBatchHook | None = None
        self.unit_seconds = 0.0  # the last fold-epoch's wall time: what the next one is expected to take
        self.racing = True  # off with `--pruner none`: every trial runs all its folds

    def dataset(self) -> Dataset:
        """The labelled images, decoded at a size the trials use (space.usable): what folds and counts are read from."""
        return self.cache.dataset(self.space.usable(self.base))

    def validated_images(self) -> int:
        """How many images each epoch's score rests on (every labelled image under cross-validation)."""
        return sum(len(f.val) for f in plan_folds(self.base, self.dataset()))

    def folds(self) -> int:
        return len(plan_folds(self.base, self.dataset()))

    def say_folds(self) -> None:
        """Says, once per search or worker, when a small class makes cross-validation use fewer folds: after the
        study's checks, so that a refused resume prints its one-line error alone."""
        notice = fold_notice(self.base, self.dataset())
        if notice:
            log.warning(notice)

    def time_left(self, study: optuna.Study) -> float:
        """Seconds that trials may still use: to the deadline, less what the final export will need."""
        if self.deadline is None:
            return math.inf
        return self.deadline - self.clock() - self.exporter.reserve(study)

    def __call__(self, trial: optuna.Trial) -> float:
        cfg = self.space.suggest(trial, self.base).replace(seed=trial_seed(self.study_seed, trial.number))
        records.record_config(trial, cfg)
        steps: list[dict[str, Any]] = []
        score = records.metric_name(cfg.metric)
        folds = self.folds()
        started = last = self.clock()

        def report(step: int, metrics: dict[str, Any]) -> bool:
            nonlocal last
            now = self.clock()
            self.unit_seconds, last = now - last, now
            steps.append(metrics)
            records.record_steps(trial, steps)
            if self.on_epoch is not None:
                self.on_epoch(trial.number, cfg.epochs, metrics)
            if metrics.get(EXACT):  # fitted in one step: its fold's score holds at every epoch; nothing to stop
                for s in range(step, step + cfg.epochs):
                    trial.report(metrics[score], s + 1)
                return False
            trial.report(metrics[score], step + 1)
            where = f"fold {metrics['fold']}/{folds} epoch {metrics['epoch']}"
            if step + 1 == folds * cfg.epochs:  # its cost is paid: a finished trial is worth keeping, never pruned
                return False
            if self.time_left(trial.study) < self.unit_seconds:
                if metrics["fold"] == folds:  # every fold has come this far: it completes on the epochs they share
                    log.info(
                        "trial %d: the time budget ends its last fold after epoch %d; it completes on the epochs "
                        "every fold reached",
                        trial.number,
                        metrics["epoch"],
                    )
                    return True
                records.record_unranked(trial)
                raise optuna.TrialPruned(
                    f"the time budget (--timeout) would run out before the next epoch; stopped after {where}"
                )
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned after {where} at {score} {metrics[score]:.4f}")
            return False

        def race(partial: Partial) -> None:
            if not self.racing:
                return
            raced = self._race(trial, cfg, partial)
            if raced is None or not raced[1].stop or raced[2]:
                return
            number, v, _ = raced
            records.record_unranked(trial)
            said = (
                f"fold racing: after {partial.folds_done} of {partial.folds} folds, {cfg.metric} {v.mine:.4f} "
                f"(its best epoch so far, {partial.epoch}) against trial {number}'s {v.theirs:.4f} on the same "
                f"{v.images} images"
            )
            if v.behind:
                raise optuna.TrialPruned(f"{said} (p = {v.p:.2g} < {v.threshold:.2g})")
            raise optuna.TrialPruned(
                f"{said}: {records.CANNOT_WIN} (P(ahead by more than {v.delta:.4f} over every fold) = "
                f"{v.p_win:.2g} < {racing.WIN_FLOOR:g})"
            )

        def on_batch(done: int, total: int, rate: float) -> None:
            interrupts.check_stopped()  # a signal that came inside a storage write stops the trial here
            if self.on_batch is not None:
                self.on_batch(trial.number, done, total, rate)

        records.record_device(trial, str(resolve_device(cfg.device)))
        try:
            self._afford(trial, cfg)
            result = self._run(trial, cfg, report, race, on_batch)
        except TrialFailure as exc:  # a diverged trial is a bad region of the space: prune it, keep going
            records.record_failure(trial, str(exc))
            records.record_cost(trial, steps, self.clock() - started)
            raise optuna.TrialPruned(str(exc)) from None
        except optuna.TrialPruned as exc:
            records.record_pruning(trial, str(exc))
            records.record_cost(trial, steps, self.clock() - started)
            dashboard.publish_trial(trial, cfg, records.fold_curve(steps), self.exporter.artifacts)
            raise
        records.record_result(trial, result, steps)
        if probe.exact(result.history):  # what the next exact probe of this backbone is expected to cost
            fit = sum(h["epoch_time_s"] for h in result.history)
            self.cache.put(
                ("probe cost", cfg.backbone), (cfg.image_size, max(0.0, self.clock() - started - fit), fit), 0
            )
        labelled = self.cache.dataset(cfg).labelled
        records.write_oof(trial, result, labelled.labels.numpy(), labelled.paths, self.exporter.artifacts)
        self.exporter.keep_weights(trial, cfg, result)
        dashboard.publish_trial(trial, cfg, result.history, self.exporter.artifacts)
        return result.best[score]

    def _afford(self, trial: optuna.Trial, cfg: Config) -> None:
        """An exact probe reports once, so nothing stops it midway: under a deadline, one that would not end before
        it is pruned before it starts. Its cost is predicted from this run's last exact probe of the backbone: the
        feature pass scales with the pixels, the fit (probe.fit_heads) does not. The first one runs unpredicted
        (the portfolio's, at the start)."""
        seen = self.cache.get(("probe cost", cfg.backbone)) if self.deadline is not None else None
        if seen is None or not probe.applies(cfg, get_backbone(cfg.backbone).num_stages):
            return
        size, features, fit = seen
        cost, left = features * (cfg.image_size / size) ** 2 + fit, self.time_left(trial.study)
        if cost > left:
            raise optuna.TrialPruned(
                f"the time budget (--timeout): an exact probe of {cfg.backbone} at {cfg.image_size} "
                f"px takes about {cost:.0f} s here, and {max(0.0, left):.0f} s are left"
            )

    def _race(self, trial: optuna.Trial, cfg: Config, partial: Partial) -> tuple[int, Verdict, bool] | None:
        """The trial against the leading completed trial (the highest value) on the images validated so far: the
        leader's number, the verdict, and whether a stop is waived because the ensemble of trials may want it
        (racing.runs_on_for_mix). None when there is no leader with out-of-fold predictions on them."""
        leader = max(records.completed(trial.study), key=lambda t: t.value, default=None)
        if leader is None:
            return None
        oof = self._oof(leader)
        verdict = versus(cfg.metric, partial, oof, records.Candidate.of(leader).noise, cfg.seed) if oof else None
        if verdict is None:
            return None
        mix = False
        if verdict.cannot_win:
            others = sum(
                records.ran_on_for_mix(t)
                for t in trial.study.get_trials(deepcopy=False)
                if t.number != trial.number and t.state != TrialState.FAIL
            )
            mix = racing.runs_on_for_mix(verdict, joins(cfg, partial.tau, records.config(leader), oof.tau), others)
        records.record_race(
            trial,
            {
                "folds": partial.folds_done,
                "leader": leader.number,
                "mine": verdict.mine,
                "theirs": verdict.theirs,
                "p": verdict.p,
                "threshold": verdict.threshold,
                "images": verdict.images,
                "p_win": verdict.p_win,
                "delta": verdict.delta,
                "mix_gain": verdict.mix_gain,
                records.MIX: mix,
            },
        )
        return leader.number, verdict, mix

    def _oof(self, t: FrozenTrial) -> records.Oof | None:
        """A finished trial's out-of-fold predictions, read once per run (they never change); None when they are gone
        from the artifact folder (said once: trials are then not raced against it)."""
        key = ("oof", t.user_attrs.get(records.OOF), str(self.exporter.artifacts))
        hit = self.cache.get(key)
        if hit is None:
            hit = records.load_oof(t, self.exporter.artifacts) or False
            self.cache.put(key, hit, hit.probabilities.nbytes if hit else 0)
            if not hit and t.user_attrs.get(records.OOF):
                log.warning(
                    "fold racing: the out-of-fold predictions of trial %d (the leader) are not in %s; trials are "
                    "not raced against it",
                    t.number,
                    self.exporter.artifacts,
                )
        return hit or None

    def _run(self, trial: optuna.Trial, cfg: Config, report: Report, race: Race, on_batch: BatchHook) -> Result:
        """One fine-tune; an out-of-memory error is retried once at half the batch size."""
        try:
            return finetune(cfg, self.cache.dataset(cfg), report, cache=self.cache, race=race, on_batch=on_batch)
        except (torch.OutOfMemoryError, MemoryError) as exc:
            self.release_memory()
            smaller = max(1, cfg.batch_size // 2)
            log.warning(
                "trial %d ran out of memory at batch size %d; retrying at %d", trial.number, cfg.batch_size, smaller
            )
            records.record_oom_retry(
                trial, f"{type(exc).__name__} at batch_size {cfg.batch_size}; retried at {smaller}"
            )
            records.record_config(trial, cfg.replace(batch_size=smaller))
            try:
                return finetune(
                    cfg.replace(batch_size=smaller),
                    self.cache.dataset(cfg),
                    report,
                    cache=self.cache,
                    race=race,
                    on_batch=on_batch,
                )
            except (torch.OutOfMemoryError, MemoryError) as again:
                self.release_memory()
                records.record_failure(trial, f"out of memory at batch size {smaller}: {one_line(again, 200)}")
                raise TrialFailure(f"out of memory at batch size {smaller}") from None

    def release_memory(self) -> None:
        """Let go of what the search keeps between trials (after an out-of-memory error or a crashed trial)."""
        self.cache.clear()


def versus(metric: str, partial: Partial, leader: records.Oof, delta: float, seed: int = 0) -> Verdict | None:
    """racing.race between a trial's folds so far and a leader's out-of-fold predictions on the same images (each
    logit-adjusted by its own tau), `delta` the leader's standard error; None when the leader's predictions do not
    cover those images. Also what benchmarks/pruning.py replays."""
    if (
        len(leader.labels) <= partial.index.max()
        or leader.fold[partial.index].min() < 0
        or not np.array_equal(leader.labels[partial.index], partial.labels)
    ):
        return None
    log_prior = np.log(np.maximum(leader.prior, 1e-12))
    theirs = adjusted(np.log(np.maximum(leader.probabilities[partial.index], 1e-30)), log_prior, leader.tau)
    mine = adjusted(partial.log_probs, log_prior, partial.tau)
    top = np.maximum(theirs.max(1, keepdims=True), mine.max(1, keepdims=True))
    mixed = np.exp(theirs - top) + np.exp(mine - top)  # choose_mix's average: probabilities x prior ** -tau
    return racing.race(
        metric,
        partial.labels,
        mine.argmax(1),
        theirs.argmax(1),
        partial.log_probs.shape[1],
        partial.folds,
        seed=seed,
        delta=delta,
        validated=int((leader.fold >= 0).sum()),
        mixed=mixed.argmax(1),
        done=partial.folds_done,
    )
