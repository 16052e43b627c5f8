"""A signal never lands inside a storage write: it waits for the next safe place, and the storage stays usable."""

import os
import signal

import optuna
import pytest
import sqlalchemy

from autoft.exceptions import Terminated
from autoft.storage import make_storage
from autoft.system import interrupts


@pytest.mark.parametrize("sig, exc_type", [(signal.SIGTERM, Terminated), (signal.SIGINT, KeyboardInterrupt)])
def test_a_signal_during_a_storage_write_waits_for_the_next_safe_place(tmp_path, sig, exc_type):
    study = optuna.create_study(storage=make_storage(f"sqlite:///{tmp_path}/s.db"), study_name="s")
    trial = study.ask()
    sent, reported = [], False

    def signal_mid_write(conn, cursor, statement, *args):
        if statement.lstrip().upper().startswith("INSERT INTO TRIAL_INTERMEDIATE_VALUES") and not sent:
            sent.append(statement)
            os.kill(os.getpid(), sig)  # Python runs the handler here, inside SQLAlchemy's execute

    sqlalchemy.event.listen(sqlalchemy.engine.Engine, "before_cursor_execute", signal_mid_write)
    try:
        with pytest.raises(exc_type):
            with interrupts.handled():
                trial.report(0.5, 1)  # the write the signal came in completes...
                reported = True
                interrupts.check_stopped()  # ...and the signal is raised at the next safe place
                reported = False
    finally:
        sqlalchemy.event.remove(sqlalchemy.engine.Engine, "before_cursor_execute", signal_mid_write)
    assert sent and reported
    trial.set_user_attr("fail_reason", "interrupted")  # the same thread's session is whole, no lock is left held
    study.tell(trial, state=optuna.trial.TrialState.FAIL)
    (frozen,) = study.get_trials()
    assert frozen.intermediate_values == {1: 0.5} and frozen.user_attrs == {"fail_reason": "interrupted"}
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handlers are put back
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_signal_outside_storage_code_is_raised_where_it_lands():
    with pytest.raises(Terminated):
        with interrupts.handled():
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(1000):  # the handler runs between these bytecodes
                pass
            raise AssertionError("not interrupted")
