"""Heartbeats and stale trials through Optuna's public API; written against Optuna 5.1.

autoft runs trials with ask/tell (workers.py), and Optuna beats only inside `study.optimize`, so a worker beats for
its running trial itself (`beating`). On the storages that have a heartbeat (RDBStorage: SQLite, PostgreSQL, MySQL)
it is Optuna's own: `record_heartbeat`, and `optuna.storages.fail_stale_trials`, which fails the trials whose beat
stopped for the grace period and re-queues each once through the storage's RetryHeartbeatStaleTrialCallback.
Journal files have no heartbeat in Optuna: here a trial user attr (BEAT) holds the wall-clock time of its last beat,
and `fail_stale` fails the trials whose beat is older than the grace period and re-queues them through the same
RetryHeartbeatStaleTrialCallback. Workers on several machines sharing a journal file therefore need roughly
synchronised clocks (well within the grace period).

`Trials` reaches trials by number (another worker's, a dead one's) through BaseStorage's public methods.
"""

from __future__ import annotations

import contextlib
import copy
import threading
import time
import warnings
from collections.abc import Iterator
from datetime import datetime

import optuna
from optuna.storages import JournalStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, TrialState

BEAT = "autoft:heartbeat"  # a journal-stored trial's last beat, time.time(); a user attr
KEPT_ON_RETRY = ("portfolio",)  # what queued a trial (records.PORTFOLIO): the only user attr its retry keeps


def requeue_once(study: optuna.Study, trial: FrozenTrial) -> None:
    """The stale-trial callback of every storage autoft opens: Optuna's RetryHeartbeatStaleTrialCallback (one retry,
    same parameters), the retry keeping only what queued the trial, not the dead run's record and artifacts."""
    trial = copy.deepcopy(trial)
    for key in [k for k in trial.user_attrs if k not in KEPT_ON_RETRY]:
        del trial.user_attrs[key]
    RetryHeartbeatStaleTrialCallback(max_retry=1)(study, trial)


class Trials:
    """A study's trials by number, through the public methods of the storage the study was opened on."""

    def __init__(self, study: optuna.Study, storage: optuna.storages.BaseStorage, interval: int, grace: int):
        self.study, self.storage, self.interval, self.grace = study, storage, interval, grace
        self.study_id = storage.get_study_id_from_name(study.study_name)

    def trial_id(self, number: int) -> int:
        return self.storage.get_trial_id_from_study_id_trial_number(self.study_id, number)

    def get(self, number: int) -> FrozenTrial:
        return self.storage.get_trial(self.trial_id(number))

    def fail(self, number: int, reason: str, key: str) -> bool:
        """Mark a RUNNING trial FAIL with its reason (user attr `key`, written first: a finished trial takes no
        attrs); False when it had finished meanwhile, or another process failed it first."""
        trial_id = self.trial_id(number)
        try:
            self.storage.set_trial_user_attr(trial_id, key, reason)
            return self.storage.set_trial_state_values(trial_id, TrialState.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:
            return False

    @property
    def journal(self) -> bool:
        return isinstance(self.storage, JournalStorage)

    @contextlib.contextmanager
    def beating(self, number: int) -> Iterator[None]:
        """Beats for trial `number` every `interval` seconds while inside (a thread), so that other workers can tell
        a live trial from one whose worker died on another machine. A storage without a heartbeat (an in-memory
        database: nothing outlives this process) is not beaten."""
        if not self.journal and getattr(self.storage, "get_heartbeat_interval", lambda: None)() is None:
            yield
            return
        trial_id, stop = self.trial_id(number), threading.Event()

        def beat() -> None:
            while True:
                try:
                    if self.journal:
                        self.storage.set_trial_user_attr(trial_id, BEAT, time.time())
                    else:
                        self.storage.record_heartbeat(trial_id)
                except optuna.exceptions.UpdateFinishedTrialError:
                    return  # another worker declared it dead
                if stop.wait(self.interval):
                    return

        thread = threading.Thread(target=beat, name=f"autoft-heartbeat-{number}", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()

    def fail_stale(self, reason: str, key: str) -> list[FrozenTrial]:
        """Fail the RUNNING trials whose beat stopped for the grace period and re-queue each once; returns the ones
        failed here (another worker may fail some first). A journal trial's reason is written (user attr `key`);
        Optuna's fail_stale_trials writes none (the log line says it)."""
        if not self.journal:
            before = {t.number for t in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
            with warnings.catch_warnings():  # "experimental" since Optuna 2.9
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                optuna.storages.fail_stale_trials(self.study)
            return [t for t in self.study.get_trials(deepcopy=False, states=(TrialState.FAIL,)) if t.number in before]
        now, failed = time.time(), []
        for t in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            last = t.user_attrs.get(
                BEAT, (t.datetime_start or datetime.now()).timestamp()
            )  # not beating yet: its start
            if now - last > self.grace and self.fail(t.number, reason, key):
                failed.append(self.get(t.number))
                requeue_once(self.study, failed[-1])
        return failed
