"""Many workers on one study: `autoft search --workers N` on one machine, `autoft worker` from any machine.

Optuna's storage is the distributed engine: every worker is an ordinary process running trials of the
same study through the same storage (SQLite file, journal file, PostgreSQL/MySQL). What autoft adds:

* an exact trial count. The study keeps a goal, `target` finished (COMPLETE + PRUNED) trials, in its
  user attrs. A worker starts a trial only while finished + running trials are below it; when a race
  lets two workers start the last slot at once, the trial with the higher number gives its slot up
  (it ends FAIL with a `surplus` reason, never COMPLETE or PRUNED). While the last trials run, idle
  workers wait instead of leaving, so a trial whose worker dies is retried and the goal is still met.
* zombie trials: heartbeats (see storage.py) fail the trial of a killed worker; idle workers
  look for them every POLL_S seconds, and RetryHeartbeatStaleTrialCallback re-queues it once.
* a trial's own crash (an unexpected exception) is recorded as FAIL with its reason and the study goes
  on; MAX_CRASHES crashes in a row stop the worker, since then it is not the trial that is broken.

This module runs trials of the study and the objective it is given; what a trial is, and how a study is
opened or joined, is the caller's (study.py).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence

import optuna
import torch
from optuna.trial import FrozenTrial, TrialState

from . import records
from .exceptions import AutoftError, ConfigError, Terminated
from .finetune import clear_caches as release_memory  # after a crashed trial

log = logging.getLogger("autoft")
POLL_S = 1.0
MAX_CRASHES = 3


class TrialCrashed(Exception):
    """An unexpected error inside one trial: that trial ends FAIL with the reason, the study goes on."""


class Surplus(Exception):
    """The study's goal was already taken by other workers' trials when this one started."""


class _QuietTrialEnds(logging.Filter):
    """A given-up slot is bookkeeping, and an interrupt is the user's doing: neither is worth a traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, KeyboardInterrupt):
            record.exc_info = None
        return not isinstance(exc, Surplus)


logging.getLogger("optuna.study._optimize").addFilter(_QuietTrialEnds())


def has_slot(trials: Sequence[FrozenTrial], number: int, target: int) -> bool:
    """Whether trial `number` may run: finished trials plus the unfinished ones numbered before it are
    below the goal. Numbers only grow, so of two trials racing for the last slot exactly one gets it."""
    ahead = sum(t.state in (TrialState.RUNNING, TrialState.WAITING) and t.number < number for t in trials)
    return records.finished_count(trials) + ahead < target


class _Slot:
    """Wraps the objective: claims a slot first, and turns a trial's unexpected error into a recorded FAIL."""

    def __init__(self, objective: Callable[[optuna.Trial], float]):
        self.objective = objective
        self.trial_id: int | None = None  # the last trial this process started

    def __call__(self, trial: optuna.Trial) -> float:
        self.trial_id = trial._trial_id
        target = records.goal(trial.study)
        if not has_slot(trial.study.get_trials(deepcopy=False), trial.number, target):
            records.record_surplus(trial, target)
            raise Surplus()
        records.record_worker(trial)
        try:
            return self.objective(trial)
        except (optuna.TrialPruned, AutoftError):
            raise
        except KeyboardInterrupt as exc:
            records.record_failure(trial, f"interrupted ({'SIGTERM' if isinstance(exc, Terminated) else 'Ctrl-C'})")
            raise
        except Exception as exc:
            reason = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"[:300]
            release_memory()
            records.record_failure(trial, reason)
            raise TrialCrashed(reason) from exc

    def abandon(self, study: optuna.Study) -> None:
        """Mark this process's trial FAIL if an interrupt left it RUNNING, so nobody waits for it."""
        if self.trial_id is None:
            return
        try:
            if study._storage.get_trial(self.trial_id).state == TrialState.RUNNING:
                study._storage.set_trial_user_attr(self.trial_id, records.FAIL_REASON, "interrupted")
                study._storage.set_trial_state_values(self.trial_id, TrialState.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:
            pass


def fail_stale(study: optuna.Study) -> None:
    """Optuna's own zombie sweep: stale RUNNING trials become FAIL and are re-queued by the storage's callback."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


def work(study: optuna.Study, objective: Callable[[optuna.Trial], float],
         callbacks: Sequence[Callable[[optuna.Study, FrozenTrial], None]] = (), timeout: float | None = None,
         before_trial: Callable[[optuna.Study], None] | None = None) -> None:
    """Run trials until the study holds exactly its goal of finished trials (or `timeout` seconds pass).

    `before_trial(study)` runs once a slot is free, right before a trial starts (to queue the next one).
    """
    slot = _Slot(objective)
    t0 = time.monotonic()
    crashes, waiting = 0, False
    try:
        while True:
            fail_stale(study)
            target = records.goal(study)
            trials = study.get_trials(deepcopy=False)
            done, running = records.finished_count(trials), records.state_counts(trials)[TrialState.RUNNING]
            if done >= target or (timeout is not None and time.monotonic() - t0 >= timeout):
                return
            if done + running >= target:  # the last trials are running elsewhere; stay in case one dies
                if not waiting:
                    log.info("%d of %d trials finished; waiting for the %d running elsewhere", done, target, running)
                waiting = True
                time.sleep(POLL_S)
                continue
            waiting = False
            if before_trial is not None:
                before_trial(study)
            study.optimize(slot, n_trials=1, callbacks=list(callbacks), catch=(TrialCrashed, Surplus), gc_after_trial=False)
            last = study._storage.get_trial(slot.trial_id)
            crashes = crashes + 1 if last.state == TrialState.FAIL and not records.is_surplus(last) else 0
            if crashes >= MAX_CRASHES:
                raise AutoftError(f"{crashes} trials in a row failed, the last with {records.reason(last) or 'no reason'}; "
                                  "see the trials' fail_reason (trials.csv) and fix the cause")
    finally:
        slot.abandon(study)


# --- several processes ----------------------------------------------------------------------------------------

def gpu_ids() -> list[str]:
    """The GPUs this process may use, as CUDA_VISIBLE_DEVICES entries."""
    if not torch.cuda.is_available():
        return []
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible:
        return [v.strip() for v in visible.split(",") if v.strip()]
    return [str(i) for i in range(torch.cuda.device_count())]


def plan(n: int, gpus: Sequence[str], cores: int) -> list[dict[str, str]]:
    """Per worker: a GPU of its own when there are GPUs (round robin past their count), else a share of the cores."""
    if gpus:
        return [{"CUDA_VISIBLE_DEVICES": gpus[i % len(gpus)]} for i in range(n)]
    return [{"threads": str(max(1, cores // n))} for _ in range(n)]


def spawn(n: int, storage: str, study: str, device: str, out: str, artifacts: str, timeout: float | None,
          progress: Callable[[], None] | None = None) -> None:
    """Start `n` `autoft worker` processes on this machine and wait for them.

    The storage URL goes through the environment, not the command line, so `ps` never shows a password.
    Ctrl-C or SIGTERM here is passed on to every worker, which marks its trial and writes its exports.
    """
    if storage.startswith("sqlite") and ":memory:" in storage:
        raise ConfigError("--workers needs a storage that processes share; an in-memory SQLite database is not")
    pinned = device in ("auto", "cuda")
    slots = plan(n, gpu_ids() if pinned else [], os.cpu_count() or 1)
    procs = []
    for i, slot in enumerate(slots):
        env = {**os.environ, "AUTOFT_STORAGE": storage}
        cmd = [sys.executable, "-m", "autoft.cli", "-q", "worker", "--study", study, "--out", out, "--artifacts", artifacts]
        if "CUDA_VISIBLE_DEVICES" in slot:
            env["CUDA_VISIBLE_DEVICES"] = slot["CUDA_VISIBLE_DEVICES"]
            cmd += ["--device", "auto"]
        else:
            cmd += ["--device", device, "--threads", slot["threads"]]
        if timeout is not None:
            cmd += ["--timeout", str(timeout)]
        procs.append(subprocess.Popen(cmd, env=env, start_new_session=True))
        log.info("worker %d/%d: pid %d%s", i + 1, n, procs[-1].pid,
                 f", GPU {slot['CUDA_VISIBLE_DEVICES']}" if "CUDA_VISIBLE_DEVICES" in slot else f", {slot['threads']} CPU threads")
    try:
        while any(p.poll() is None for p in procs):
            if progress:
                progress()
            time.sleep(POLL_S)
    except KeyboardInterrupt as exc:
        sig = signal.SIGTERM if isinstance(exc, Terminated) else signal.SIGINT
        for p in procs:
            if p.poll() is None:
                p.send_signal(sig)
        for p in procs:
            p.wait()
        raise
    finally:
        if progress:
            progress()
    codes = [p.returncode for p in procs]
    for i, code in enumerate(codes):
        if code < 0:
            log.warning("worker %d (pid %d) was killed by signal %d; the other workers took over its trial",
                        i + 1, procs[i].pid, -code)
    if 2 in codes:
        raise AutoftError(f"worker {codes.index(2) + 1} stopped on the error above")

