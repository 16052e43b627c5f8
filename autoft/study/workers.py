"""Many workers on one study: `autoft search --workers N` on one machine, `autoft worker` from any machine.

Optuna's storage is the distributed engine: every worker is an ordinary process running trials of the
same study through the same storage (SQLite file, journal file, PostgreSQL/MySQL), with ask and tell. What
autoft adds:

* an exact trial count. The study keeps a goal, `target` finished (COMPLETE + PRUNED) trials, in its
  user attrs. A worker starts a trial only while finished + running trials are below it; when a race
  lets two workers start the last slot at once, the trial with the higher number gives its slot up
  (it ends FAIL with a `surplus` reason, never COMPLETE or PRUNED). While the last trials run, idle
  workers wait instead of leaving, so a trial whose worker dies is retried and the goal is still met.
* zombie trials: a RUNNING trial whose worker ran on this machine and whose process is gone (kill -9, a
  crash, a reboot) is failed at once with the reason "worker died (host:pid)"; one whose worker ran
  elsewhere is failed by heartbeats (heartbeat.py) once its beats stop for the grace period. Workers look
  for both before each trial and, while idle, every POLL_S seconds; each is re-queued once
  (heartbeat.requeue_once), so the goal is still met exactly.
* a trial's own crash (an unexpected exception) is recorded as FAIL with its reason and the study goes
  on; MAX_CRASHES crashes in a row stop the worker, since then it is not the trial that is broken.

This module runs trials of the study and the objective it is given; what a trial is, and how a study is
opened or joined, is the caller's (study.run).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable, Sequence

import optuna
import torch
from optuna.trial import FrozenTrial, TrialState

from ..exceptions import AutoftError, Terminated, one_line
from ..heartbeat import Trials, requeue_once
from ..results import records
from ..storage import heartbeat_periods
from ..system.interrupts import check_stopped
from ..system.processes import gone, process_id, this_machine

log = logging.getLogger("autoft")
POLL_S = 1.0
MAX_CRASHES = 3
PROCESS = "autoft:process"  # trial user attr: the process that runs it (processes.process_id)

Callback = Callable[[optuna.Study, FrozenTrial], None]  # after each trial, as Optuna's optimize callbacks


def has_slot(trials: Sequence[FrozenTrial], number: int, target: int) -> bool:
    """Whether trial `number` may run: finished trials plus the unfinished ones numbered before it are
    below the goal. Numbers only grow, so of two trials racing for the last slot exactly one gets it."""
    ahead = sum(t.state in (TrialState.RUNNING, TrialState.WAITING) and t.number < number for t in trials)
    return records.finished_count(trials) + ahead < target


class Ran:
    """The trials one run started, so that its summary counts its own: those of this process (by number)
    and those of the worker processes it spawned (by host:pid), never another run's on the same study."""

    def __init__(self) -> None:
        self.numbers: set[int] = set()
        self.workers: set[str] = set()

    def trials(self, study: optuna.Study) -> list[FrozenTrial]:
        return [
            t
            for t in study.get_trials(deepcopy=False)
            if t.number in self.numbers or t.user_attrs.get(records.WORKER) in self.workers
        ]


class Worker:
    """Runs trials of `study` with ask and tell until it holds exactly its goal of finished trials (or
    `time_left()` seconds are no more): the objective's value is told, a TrialPruned is told PRUNED, and an
    unexpected error ends the trial FAIL with its reason. `callbacks` see every trial after its tell (the exports,
    the progress line); `ran` collects the trials this process started; `before_trial(study)` runs once a slot is
    free, right before a trial is asked for (to queue the next portfolio recipe)."""

    def __init__(
        self,
        study: optuna.Study,
        storage: optuna.storages.BaseStorage,
        objective: Callable[[optuna.Trial], float],
        callbacks: Sequence[Callback] = (),
        time_left: Callable[[], float] | None = None,
        ran: Ran | None = None,
        before_trial: Callable[[optuna.Study], None] | None = None,
    ):
        self.study, self.objective, self.callbacks, self.time_left = study, objective, list(callbacks), time_left
        self.ran, self.before_trial = ran or Ran(), before_trial
        self.trials = Trials(study, storage, *heartbeat_periods())
        self.running: int | None = None  # the number of the trial this process runs now

    def run(self) -> None:
        crashes, waiting = 0, False
        try:
            while True:
                check_stopped()
                self.fail_stale()
                target = records.goal(self.study)
                trials = self.study.get_trials(deepcopy=False)
                done, running = records.finished_count(trials), records.state_counts(trials)[TrialState.RUNNING]
                if done >= target or (self.time_left is not None and self.time_left() <= 0):
                    return
                if done + running >= target:  # the last trials are running elsewhere; stay in case one dies
                    if not waiting:
                        log.info(
                            "%d of %d trials finished; waiting for the %d running elsewhere", done, target, running
                        )
                    waiting = True
                    time.sleep(POLL_S)
                    continue
                waiting = False
                if self.before_trial is not None:
                    self.before_trial(self.study)
                last = self.one()
                crashes = crashes + 1 if last.state == TrialState.FAIL and not records.is_surplus(last) else 0
                if crashes >= MAX_CRASHES:
                    raise AutoftError(
                        f"{crashes} trials in a row failed, the last with "
                        f"{records.reason(last) or 'no reason'}; see the trials' fail_reason (trials.csv) "
                        "and fix the cause"
                    )
        finally:
            self.abandon()

    def one(self) -> FrozenTrial:
        """Ask for a trial, claim its slot, run the objective with a heartbeat, tell the outcome, call back."""
        with warnings.catch_warnings():  # "Heartbeat ... supposed to be used with Study.optimize": this one beats
            warnings.filterwarnings("ignore", "Heartbeat of storage", UserWarning)
            trial = self.study.ask()
        self.running = trial.number
        try:
            check_stopped()
            target = records.goal(self.study)
            if not has_slot(self.study.get_trials(deepcopy=False), trial.number, target):
                records.record_surplus(trial, target)
                frozen = self.study.tell(trial, state=TrialState.FAIL)
            else:
                records.record_worker(trial)
                trial.set_user_attr(PROCESS, process_id())
                self.ran.numbers.add(trial.number)
                frozen = self._tell(trial)
        finally:
            self.running = None
        for callback in self.callbacks:
            callback(self.study, frozen)
        return frozen

    def _tell(self, trial: optuna.Trial) -> FrozenTrial:
        try:
            with self.trials.beating(trial.number):
                value = self.objective(trial)
        except optuna.TrialPruned:
            return self.study.tell(trial, state=TrialState.PRUNED)
        except AutoftError as exc:  # the user's to fix (a full disk, ...): the run stops; the trial says why
            records.record_failure(trial, one_line(exc))
            self.study.tell(trial, state=TrialState.FAIL)
            raise
        except KeyboardInterrupt as exc:
            records.record_failure(trial, f"interrupted ({'SIGTERM' if isinstance(exc, Terminated) else 'Ctrl-C'})")
            self.study.tell(trial, state=TrialState.FAIL)
            raise
        except Exception as exc:
            reason = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"[:300]
            release = getattr(self.objective, "release_memory", None)  # what the trial left in the run's cache
            if release is not None:
                release()
            records.record_failure(trial, reason)
            log.warning("trial %d failed: %s", trial.number, reason)
            return self.study.tell(trial, state=TrialState.FAIL)
        return self.study.tell(trial, value)

    def abandon(self) -> None:
        """Mark this process's trial FAIL if an interrupt left it RUNNING, so nobody waits for it."""
        if self.running is not None and self.trials.get(self.running).state == TrialState.RUNNING:
            self.trials.fail(self.running, "interrupted", records.FAIL_REASON)

    def fail_stale(self) -> None:
        """Fail the study's zombie trials with their reason, each exactly once, and have each re-queued once.

        Zombies are RUNNING trials whose worker is dead for sure (`dead_worker`), failed at once, and those whose
        heartbeat stopped for the grace period (heartbeat.Trials.fail_stale). Only the process whose FAIL lands
        re-queues a trial."""
        for t in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            who = self.dead_worker(t)
            if who and self.trials.fail(t.number, f"worker died ({who})", records.FAIL_REASON):
                self._say_retry(t, f"worker died ({who})")
                requeue_once(self.study, self.trials.get(t.number))
        for t in self.trials.fail_stale("worker stopped sending heartbeats", records.FAIL_REASON):
            self._say_retry(t, "its worker stopped sending heartbeats")

    @staticmethod
    def _say_retry(t: FrozenTrial, why: str) -> None:
        log.warning(
            "trial %d: %s; %s",
            t.number,
            why,
            "it is not retried again" if t.system_attrs.get("retry_history") else "it runs again",
        )

    def dead_worker(self, t: FrozenTrial) -> str | None:
        """The worker (host:pid) of a RUNNING trial when it ran on this machine and its process is gone for sure;
        None when it may still run (another machine, or one we cannot tell), which heartbeats then settle."""
        return dead_worker(t, running_here=self.running)


def dead_worker(t: FrozenTrial, running_here: int | None = None) -> str | None:
    """`Worker.dead_worker` of a process that runs trial `running_here` (None: none)."""
    recorded = t.user_attrs.get(PROCESS, t.system_attrs.get(PROCESS))  # earlier versions: a system attr
    if not isinstance(recorded, str) or recorded.count("|") != 4:
        return None
    machine, pid, _ = recorded.rsplit("|", 2)
    who = t.user_attrs.get(records.WORKER) or f"{socket.gethostname()}:{pid}"
    if machine == this_machine() and pid == str(os.getpid()):
        return None if t.number == running_here else who  # an earlier process of this pid, or a run that crashed
    return who if gone(recorded) else None


def work(
    study: optuna.Study,
    storage: optuna.storages.BaseStorage,
    objective: Callable[[optuna.Trial], float],
    callbacks: Sequence[Callback] = (),
    time_left: Callable[[], float] | None = None,
    ran: Ran | None = None,
    before_trial: Callable[[optuna.Study], None] | None = None,
) -> None:
    """Run trials until the study holds exactly its goal (see Worker)."""
    Worker(study, storage, objective, callbacks, time_left, ran, before_trial).run()


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


def spawn(
    n: int,
    storage: str,
    study: str,
    device: str,
    out: str,
    artifacts: str,
    timeout: float | None,
    progress: Callable[[], None] | None = None,
    ran: Ran | None = None,
) -> None:
    """Start `n` `autoft worker` processes on this machine and wait for them.

    The storage URL goes through the environment, not the command line, so `ps` never shows a password.
    Ctrl-C or SIGTERM here is passed on to every worker, which marks its trial and writes its exports.
    """
    pinned = device in ("auto", "cuda")
    slots = plan(n, gpu_ids() if pinned else [], os.cpu_count() or 1)
    procs = []
    for i, slot in enumerate(slots):
        env = {**os.environ, "AUTOFT_STORAGE": storage, PARENT: str(os.getpid())}
        cmd = [
            sys.executable,
            "-m",
            "autoft.cli",
            "-q",
            "worker",
            "--study",
            study,
            "--out",
            out,
            "--artifacts",
            artifacts,
        ]
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
        log.info(
            "worker %d/%d: pid %d%s",
            i + 1,
            n,
            procs[-1].pid,
            f", GPU {slot['CUDA_VISIBLE_DEVICES']}"
            if "CUDA_VISIBLE_DEVICES" in slot
            else f", {slot['threads']} CPU threads",
        )
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
            log.warning(
                "worker %d (pid %d) was killed by signal %d; the other workers took over its trial",
                i + 1,
                procs[i].pid,
                -code,
            )
    if 2 in codes:
        raise AutoftError(f"worker {codes.index(2) + 1} stopped on the error above")
