"""The progress a search shows: a live bar on a terminal, one line per finished trial otherwise."""

from __future__ import annotations

import logging
import math
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import optuna
from optuna.trial import FrozenTrial, TrialState

from ..backbones import get_backbone
from ..results import records
from ..training import probe
from . import workers

log = logging.getLogger("autoft")


class Progress:
    """A bar with finished trials i/N, best so far, pruned/failed counts and where the running trial is.

    Trial counts are redrawn from the storage when a trial ends (and when `--workers` polls), so the bar also
    follows trials other processes run; an epoch or a batch only updates the text, without a storage round trip
    (but for a trial's first batch, which reads its config). The ETA is this process's own, not tqdm's mean over
    trials (a one-pass exact probe first made a 17-minute fine-tune look seconds away): the running trial's from
    its own batch rate and its planned epochs x `folds`, or, for an exact probe, its one feature pass; the study's
    adds the trials still to run at the median wall time of this run's fine-tunes (this trial's total until one
    ended).
    """

    def __init__(
        self,
        total: int,
        study: optuna.Study,
        ran: workers.Ran,
        folds: int = 1,
        clock: Callable[[], float] = time.monotonic,
        live: bool | None = None,
    ):
        from tqdm.auto import tqdm

        self.study, self.ran, self.folds, self.clock, self.total = study, ran, folds, clock, total
        self.score = records.metric_name(records.study_metric(study))
        # A live bar on a terminal only (`live` None: whether stderr is one); piped to a file (CI, nohup, a
        # scheduler), one plain line per finished trial instead of carriage-return frames.
        self.live = sys.stderr.isatty() if live is None else live
        self.bar = tqdm(
            total=total,
            desc="trials",
            unit="trial",
            dynamic_ncols=True,
            disable=not self.live,
            bar_format="{desc}{percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]",
        )
        self.said: set[int] = set()  # trials whose line was written (not live)
        self.best, self.running, self.last_epoch = "best=-", "", ""
        self.trial: dict[str, Any] = {}  # the trial batch() follows: its number, plan, and batches so far
        self.fine_tunes: list[float] = []  # wall seconds of this run's finished fine-tunes (exact probes aside)
        self.drawn = -math.inf

    def epoch(self, number: int, epochs: int, metrics: dict[str, Any]) -> None:
        """The objective's per-epoch hook: where the running trial is; the next batch begins a new pass (an epoch of
        one batch included)."""
        t = self.trial
        if t.get("number") == number and t["done"]:
            t["before"] += t["total"]
            t["passes"] += 1
            t["done"] = 0
        self.last_epoch = f"{self.score} {metrics[self.score]:.3f} at epoch {metrics['epoch']}"
        fold = f"fold {metrics['fold']}/{self.folds} " if self.folds > 1 and "fold" in metrics else ""
        self.running = f"trial {number} {fold}epoch {metrics['epoch']}/{epochs} {self.score} {metrics[self.score]:.3f}"
        self._draw()

    def batch(self, number: int, done: int, total: int, images_per_s: float) -> None:
        """The fine-tune's per-batch hook: `done` of the `total` batches of the current epoch (of one fold)."""
        if not self.live:
            return
        now, t = self.clock(), self.trial
        if t.get("number") != number:
            t = self.trial = self._plan(number, now)
        if done < t["done"]:  # a new pass (epoch or fold) began, unless the epoch hook said so
            t["before"] += t["total"]
            t["passes"] += 1
        if t["first"] is None:  # timed from here: what came before (building the model, caching) is no batch
            t["first"], t["start"] = done, now
        t["done"], t["total"] = done, total
        if done < total and now - self.drawn < self.bar.mininterval:
            return  # many batches a second: redraw at tqdm's pace
        seen = t["before"] + done - t["first"]  # batches since the first call, timed by the clock
        per_batch = (
            (now - t["start"]) / seen if seen > 0 else t["batch_size"] / images_per_s if images_per_s > 0 else math.nan
        )
        passes = 1 if t["exact"] else t["epochs"] * self.folds
        left = per_batch * ((total - done) + max(0, passes - t["passes"] - 1) * total)
        if t["exact"]:
            where = f"trial {number} exact probe: features batch {done}/{total}"
        else:
            fold, epoch = divmod(min(t["passes"], passes - 1), t["epochs"])
            where = (
                f"trial {number}"
                + (f" fold {fold + 1}/{self.folds}" if self.folds > 1 else "")
                + f" epoch {epoch + 1}/{t['epochs']} batch {done}/{total}"
            )
        eta = "ETA ?" if math.isnan(left) else f"ETA {self.bar.format_interval(left)}"
        if not math.isnan(left) and not t["exact"]:
            trials_after = max(0, self.total - self.bar.n - 1)
            each = float(np.median(self.fine_tunes)) if self.fine_tunes else now - t["start"] + left
            eta += f" (study ~{self.bar.format_interval(left + trials_after * each)})"
        self.running = f"{where} {images_per_s:.0f} img/s {eta}" + (
            f"; {self.last_epoch}" if self.last_epoch and not t["exact"] else ""
        )
        self.drawn = now
        self._draw()

    def _plan(self, number: int, now: float) -> dict[str, Any]:
        """What a trial will run, from the config it recorded: its epochs, batch size and kind."""
        cfg = next(records.config(t) for t in self.study.get_trials(deepcopy=False) if t.number == number)
        exact = probe.applies(cfg, get_backbone(cfg.backbone).num_stages)
        self.last_epoch = ""
        return {
            "number": number,
            "epochs": cfg.epochs,
            "batch_size": cfg.batch_size,
            "exact": exact,
            "start": now,
            "first": None,
            "done": 0,
            "total": 0,
            "before": 0,
            "passes": 0,
        }

    def __call__(self, study: optuna.Study | None = None, trial: FrozenTrial | None = None) -> None:
        """An Optuna callback (a trial ended) and what `--workers` polls while other processes work."""
        trials = self.study.get_trials(deepcopy=False)
        best = records.best_trial(self.study)
        mine = self.ran.trials(self.study)  # this run's, not other runs' on the same study
        new = records.state_counts(mine)
        self.fine_tunes = [
            t.duration.total_seconds()
            for t in mine
            if t.state == TrialState.COMPLETE and t.duration and not probe.exact(records.history(t))
        ]
        self.best = f"best={best.value:.4f} (#{best.number})" if best else "best=-"
        if trial is not None:
            self.running = ""
        elif study is None:  # polled: what the workers' running trials last reported
            self.running = ", ".join(
                f"trial {t.number} epoch {len(records.history(t))}"
                for t in trials
                if t.state == TrialState.RUNNING and records.history(t)
            )
        self.bar.set_description(
            f"trials (pruned {new[TrialState.PRUNED]}, failed {new[TrialState.FAIL]})", refresh=False
        )
        self.bar.n = new[TrialState.COMPLETE] + new[TrialState.PRUNED]
        self._draw()
        if not self.live:
            self._lines(mine, new)

    def _lines(self, mine: Sequence[FrozenTrial], counts: Counter[TrialState]) -> None:
        """One plain line per trial of this run that ended since the last call."""
        done = counts[TrialState.COMPLETE] + counts[TrialState.PRUNED]
        for t in mine:
            if t.state.is_finished() and t.number not in self.said:
                self.said.add(t.number)
                name = f" ({records.portfolio_name(t)})" if records.portfolio_name(t) else ""
                what = (
                    f"{self.score} {t.value:.4f}"
                    if t.state == TrialState.COMPLETE
                    else records.reason(t) or "no reason recorded"
                )
                log.info(
                    "trial %d%s %s: %s; %s; %d of %d finished",
                    t.number,
                    name,
                    t.state.name.lower(),
                    what,
                    self.best,
                    done,
                    self.total,
                )

    def _draw(self) -> None:
        if self.live:
            self.bar.set_postfix_str(self.best + (f" | {self.running}" if self.running else ""))

    def close(self) -> None:
        self.bar.close()
