"""Many workers on one study: `autoft search --workers N` on one machine, `autoft worker` from any machine.

Optuna's storage is the distributed engine: every worker is an ordinary process running trials of the
same study through the same storage (SQLite file, journal file, PostgreSQL/MySQL). What autoft adds:

* an exact trial count. The study keeps a goal, `target` finished (COMPLETE + PRUNED) trials, in its
  user attrs. A worker starts a trial only while finished + running trials are below it; when a race
  lets two workers start the last slot at once, the trial with the higher number gives its slot up
  (it ends FAIL with a `surplus` reason, never COMPLETE or PRUNED). While the last trials run, idle
  workers wait instead of leaving, so a trial whose worker dies is retried and the goal is still met.
* zombie trials: a RUNNING trial whose worker ran on this machine and whose process is gone (kill -9, a
  crash, a reboot) is failed at once with the reason "worker died (host:pid)"; one whose worker ran
  elsewhere is failed by heartbeats (see storage.py) once its beats stop for the grace period ("worker
  stopped sending heartbeats"). Workers look for both before each trial and, while idle, every POLL_S
  seconds; RetryHeartbeatStaleTrialCallback re-queues the trial once, so the goal is still met exactly.
* a trial's own crash (an unexpected exception) is recorded as FAIL with its reason and the study goes
  on; MAX_CRASHES crashes in a row stop the worker, since then it is not the trial that is broken.

This module runs trials of the study and the objective it is given; what a trial is, and how a study is
opened or joined, is the caller's (study.py).
"""

from __future__ import annotations

import copy
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence

import optuna
import torch
from optuna.storages._heartbeat import BaseHeartbeat, is_heartbeat_enabled
from optuna.trial import FrozenTrial, TrialState

from . import records
from .exceptions import AutoftError, Terminated, one_line
from .interrupts import check_stopped
from .processes import gone, process_id, this_machine
from .storage import _BEAT as HEARTBEAT_ATTR  # a journal storage's heartbeat, a trial system attr

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


class Ran:
    """The trials one run started, so that its summary counts its own: those of this process (by trial id)
    and those of the worker processes it spawned (by host:pid), never another run's on the same study."""

    def __init__(self) -> None:
        self.trial_ids: set[int] = set()
        self.workers: set[str] = set()

    def trials(self, study: optuna.Study) -> list[FrozenTrial]:
        return [t for t in study.get_trials(deepcopy=False)
                if t._trial_id in self.trial_ids or t.user_attrs.get(records.WORKER) in self.workers]


class _Slot:
    """Wraps the objective: claims a slot first, and turns a trial's unexpected error into a recorded FAIL."""

    def __init__(self, objective: Callable[[optuna.Trial], float], ran: Ran | None = None):
        self.objective, self.ran = objective, ran
        self.trial_id: int | None = None  # the last trial this process started

    def __call__(self, trial: optuna.Trial) -> float:
        self.trial_id = trial._trial_id
        check_stopped()
        target = records.goal(trial.study)
        if not has_slot(trial.study.get_trials(deepcopy=False), trial.number, target):
            records.record_surplus(trial, target)
            raise Surplus()
        records.record_worker(trial)
        trial.study._storage.set_trial_system_attr(trial._trial_id, PROCESS, process_id())
        if self.ran is not None:
            self.ran.trial_ids.add(trial._trial_id)
        _RUNNING_HERE.add(trial._trial_id)
        try:
            return self.objective(trial)
        except optuna.TrialPruned:
            raise
        except AutoftError as exc:  # the user's to fix (a full disk, ...): the run stops; the trial says why
            records.record_failure(trial, one_line(exc))
            raise
        except KeyboardInterrupt as exc:
            records.record_failure(trial, f"interrupted ({'SIGTERM' if isinstance(exc, Terminated) else 'Ctrl-C'})")
            raise
        except Exception as exc:
            reason = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"[:300]
            release = getattr(self.objective, "release_memory", None)  # what the trial left in the run's cache
            if release is not None:
                release()
            records.record_failure(trial, reason)
            raise TrialCrashed(reason) from exc
        finally:
            _RUNNING_HERE.discard(trial._trial_id)

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


# --- zombie trials ------------------------------------------------------------------------------------------

PROCESS = "autoft:process"  # trial system attr: which process runs it (processes.process_id)
_RUNNING_HERE: set[int] = set()  # trial ids this process is running right now


def dead_worker(t: FrozenTrial) -> str | None:
    """The worker (host:pid) of a RUNNING trial when it ran on this machine and its process is gone for sure;
    None when it may still run (another machine, or one we cannot tell), which heartbeats then settle."""
    recorded = t.system_attrs.get(PROCESS)
    if not isinstance(recorded, str) or recorded.count("|") != 4:
        return None
    machine, pid, _ = recorded.rsplit("|", 2)
    who = t.user_attrs.get(records.WORKER) or f"{socket.gethostname()}:{pid}"
    if machine == this_machine() and pid == str(os.getpid()):
        return None if t._trial_id in _RUNNING_HERE else who  # an earlier process of this pid, or a run that crashed
    return who if gone(recorded) else None


def fail_stale(study: optuna.Study) -> None:
    """Fail the study's zombie trials with their reason, each exactly once, and have the storage re-queue them.

    Zombies are RUNNING trials whose worker is dead for sure (`dead_worker`), failed at once, and those whose
    heartbeat stopped for the grace period (Optuna's test). Only the process whose FAIL lands re-queues a trial.
    """
    storage = study._storage
    reasons = {t._trial_id: f"worker died ({who})" for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
               if (who := dead_worker(t))}
    if is_heartbeat_enabled(storage):
        for trial_id in storage._get_stale_trial_ids(study._study_id):
            who = storage.get_trial(trial_id).user_attrs.get(records.WORKER)
            reasons.setdefault(trial_id, "worker stopped sending heartbeats" + (f" ({who})" if who else ""))
    failed = []
    for trial_id, reason in reasons.items():
        try:
            storage.set_trial_user_attr(trial_id, records.FAIL_REASON, reason)  # first: a finished trial takes no attrs
            if storage.set_trial_state_values(trial_id, TrialState.FAIL):
                failed.append(trial_id)
        except optuna.exceptions.UpdateFinishedTrialError:  # finished meanwhile, or another worker failed it first
            pass
    retry = storage.get_heartbeat_stale_trial_callback() if isinstance(storage, BaseHeartbeat) else None
    for trial_id in failed:
        trial = copy.deepcopy(storage.get_trial(trial_id))
        log.warning("trial %d: %s; %s", trial.number, reasons[trial_id],
                    "it runs again" if retry and not trial.system_attrs.get("retry_history") else "it is not retried")
        if retry is not None:  # the retry copies the trial's attrs: only what queued it (a recipe's name), not the
            for key in [k for k in trial.user_attrs if k != records.PORTFOLIO]:  # dead run's record and artifacts
                trial.user_attrs.pop(key)
            for key in (PROCESS, HEARTBEAT_ATTR):
                trial.system_attrs.pop(key, None)
            retry(study, trial)


def work(study: optuna.Study, objective: Callable[[optuna.Trial], float],
         callbacks: Sequence[Callable[[optuna.Study, FrozenTrial], None]] = (),
         time_left: Callable[[], float] | None = None,
         ran: Ran | None = None, before_trial: Callable[[optuna.Study], None] | None = None) -> None:
    """Run trials until the study holds exactly its goal of finished trials (or `time_left()` seconds are no more).

    `ran` collects the trials this process started; `before_trial(study)` runs once a slot is free, right
    before a trial starts (to queue the next one).
    """
    slot = _Slot(objective, ran)
    crashes, waiting = 0, False
    try:
        while True:
            check_stopped()
            fail_stale(study)
            target = records.goal(study)
            trials = study.get_trials(deepcopy=False)
            done, running = records.finished_count(trials), records.state_counts(trials)[TrialState.RUNNING]
            if done >= target or (time_left is not None and time_left() <= 0):
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


PARENT = "AUTOFT_PARENT_PID"  # set by `spawn` for its workers: the search they end with


def watch_parent() -> None:
    """A worker that `autoft search --workers` spawned ends with it: once its parent is gone (kill -9 included),
    it sends itself SIGTERM, so its trial is marked interrupted and it exits, instead of training on for a search
    nobody waits for; the next search on the study resumes. Polled (the parent's pid, every POLL_S), so it works
    wherever Python runs; nothing to do in a worker started by hand."""
    parent = os.environ.get(PARENT)
    if not parent or not parent.isdigit():
        return

    def watch() -> None:
        while os.getppid() == int(parent):
            time.sleep(POLL_S)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="autoft-parent", daemon=True).start()


def spawn(n: int, storage: str, study: str, device: str, out: str, artifacts: str, timeout: float | None,
          progress: Callable[[], None] | None = None, ran: Ran | None = None) -> None:
    """Start `n` `autoft worker` processes on this machine and wait for them.

    The storage URL goes through the environment, not the command line, so `ps` never shows a password.
    Ctrl-C or SIGTERM here is passed on to every worker, which marks its trial and writes its exports.
    """
    pinned = device in ("auto", "cuda")
    slots = plan(n, gpu_ids() if pinned else [], os.cpu_count() or 1)
    procs = []
    for i, slot in enumerate(slots):
        env = {**os.environ, "AUTOFT_STORAGE": storage, PARENT: str(os.getpid())}
        cmd = [sys.executable, "-m", "autoft.cli", "-q", "worker", "--study", study, "--out", out, "--artifacts", artifacts]
        if "CUDA_VISIBLE_DEVICES" in slot:
            env["CUDA_VISIBLE_DEVICES"] = slot["CUDA_VISIBLE_DEVICES"]
            cmd += ["--device", "auto"]
        else:
            cmd += ["--device", device, "--threads", slot["threads"]]
        if timeout is not None:
            cmd += ["--timeout", str(timeout)]
        procs.append(subprocess.Popen(cmd, env=env, start_new_session=True))
        if ran is not None:
            ran.workers.add(f"{socket.gethostname()}:{procs[-1].pid}")  # as records.record_worker writes it
        log.info("worker %d/%d: pid %d%s", i + 1, n, procs[-1].pid,
                 f", GPU {slot['CUDA_VISIBLE_DEVICES']}" if "CUDA_VISIBLE_DEVICES" in slot else f", {slot['threads']} CPU threads")
    try:
        while any(p.poll() is None for p in procs):
            check_stopped()
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

