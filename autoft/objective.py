"""The search's objective: suggest a config, fine-tune it, report every epoch so the pruner can stop it.

Each trial is recorded through `records`, a new best's weights are exported before the trial is told,
and every finished or pruned trial is published to the dashboard.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import optuna
import torch

from . import dashboard, records
from .config import Config
from .exceptions import TrialFailure, one_line
from .exports import Exporter
from .cache import RunCache
from .finetune import Result, finetune, fold_notice, plan_folds, resolve_device
from .probe import EXACT
from .space import SearchSpace

log = logging.getLogger("autoft")


def trial_seed(study_seed: int, number: int) -> int:
    """Each trial's seed derives from the study seed and the trial number: reruns reproduce."""
    return (study_seed * 1_000_003 + number * 7919 + 17) % 2**32


EpochHook = Callable[[int, int, dict[str, Any]], None]  # (trial number, epochs planned, the epoch's metrics)


class Objective:
    """Suggest, fine-tune, report; the pruner (see study.make_pruner) decides when a trial falls behind.

    `deadline` (time.monotonic) makes `--timeout` a budget: a trial still running then stops at its next
    epoch, pruned, and no new one starts. `on_epoch` sees every epoch of every trial (the progress line).
    `cache` is what the search keeps between trials (datasets, device copies, frozen features, weights).
    """

    def __init__(self, base: Config, space: SearchSpace, study_seed: int, exporter: Exporter, cache: RunCache):
        self.base, self.space, self.study_seed, self.exporter, self.cache = base, space, study_seed, exporter, cache
        self.deadline: float | None = None
        self.on_epoch: EpochHook | None = None

    def validated_images(self) -> int:
        """How many images each epoch's score rests on (every labelled image under cross-validation)."""
        return sum(len(f.val) for f in plan_folds(self.base, self.cache.dataset(self.base)))

    def say_folds(self) -> None:
        """Says, once per search or worker, when a small class makes cross-validation use fewer folds: after the
        study's checks, so that a refused resume prints its one-line error alone."""
        notice = fold_notice(self.base, self.cache.dataset(self.base))
        if notice:
            log.warning(notice)

    def __call__(self, trial: optuna.Trial) -> float:
        cfg = self.space.suggest(trial, self.base).replace(seed=trial_seed(self.study_seed, trial.number))
        records.record_config(trial, cfg)
        history: list[dict[str, Any]] = []
        score = records.metric_name(cfg.metric)

        def report(epoch: int, metrics: dict[str, Any]) -> None:
            history.append(metrics)
            records.record_history(trial, history)
            if self.on_epoch is not None:
                self.on_epoch(trial.number, cfg.epochs, metrics)
            if metrics.get(EXACT):  # fitted in one step: no learning curve for the pruner to compare, nothing to stop
                return
            trial.report(metrics[score], epoch + 1)
            if epoch + 1 == cfg.epochs:  # its cost is paid: a finished trial is worth keeping, never pruned
                return
            if self.deadline is not None and time.monotonic() >= self.deadline:
                raise optuna.TrialPruned(f"the time budget (--timeout) ran out after epoch {epoch + 1}")
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned after epoch {epoch + 1} at {score} {metrics[score]:.4f}")

        records.record_device(trial, str(resolve_device(cfg.device)))
        try:
            result = self._run(trial, cfg, report)
        except TrialFailure as exc:  # a diverged trial is a bad region of the space: prune it, keep going
            records.record_failure(trial, str(exc))
            raise optuna.TrialPruned(str(exc)) from None
        except optuna.TrialPruned as exc:
            records.record_pruning(trial, str(exc))
            dashboard.publish_trial(trial, cfg, history, self.exporter.artifacts)
            raise
        records.record_result(trial, result, history)
        labelled = self.cache.dataset(cfg).labelled
        records.write_oof(trial, result, labelled.labels.numpy(), labelled.paths, self.exporter.artifacts)
        self.exporter.export_weights(trial, cfg, result)
        dashboard.publish_trial(trial, cfg, history, self.exporter.artifacts)
        return result.best[score]

    def _run(self, trial: optuna.Trial, cfg: Config, report: Callable[[int, dict[str, float]], None]) -> Result:
        """One fine-tune; an out-of-memory error is retried once at half the batch size."""
        try:
            return finetune(cfg, self.cache.dataset(cfg), report, cache=self.cache)
        except (torch.OutOfMemoryError, MemoryError) as exc:
            self.release_memory()
            smaller = max(1, cfg.batch_size // 2)
            log.warning("trial %d ran out of memory at batch size %d; retrying at %d", trial.number, cfg.batch_size, smaller)
            records.record_oom_retry(trial, f"{type(exc).__name__} at batch_size {cfg.batch_size}; retried at {smaller}")
            records.record_config(trial, cfg.replace(batch_size=smaller))
            try:
                return finetune(cfg.replace(batch_size=smaller), self.cache.dataset(cfg), report, cache=self.cache)
            except (torch.OutOfMemoryError, MemoryError) as again:
                self.release_memory()
                records.record_failure(trial, f"out of memory at batch size {smaller}: {one_line(again, 200)}")
                raise TrialFailure(f"out of memory at batch size {smaller}") from None

    def release_memory(self) -> None:
        """Let go of what the search keeps between trials (after an out-of-memory error or a crashed trial)."""
        self.cache.clear()
