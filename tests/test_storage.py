"""Storages: passwords masked, heartbeats on every kind (journal included), SQLite under concurrent writers,
PostgreSQL."""

from __future__ import annotations

import multiprocessing
import os
import shutil
import time

import optuna
import pgtest
import pytest
from optuna.trial import TrialState

from autoft.cli import build_parser, main
from autoft.exceptions import ConfigError
from autoft.heartbeat import Trials
from autoft.results import records
from autoft.storage import make_storage, mask_url, with_driver


@pytest.fixture(scope="module")
def postgres_url():
    """A real PostgreSQL server on 127.0.0.1 for this module, started from the installed binaries."""
    why = pgtest.unavailable_reason()
    if why:
        if os.environ.get("AUTOFT_REQUIRE_POSTGRES"):  # CI installed the server: not running these is a failure
            pytest.fail(why)
        pytest.skip(why)
    with pgtest.throwaway_postgres(password="secret") as url:
        yield url


@pytest.fixture
def fast_heartbeat(monkeypatch):
    monkeypatch.setenv("AUTOFT_HEARTBEAT_S", "1")
    monkeypatch.setenv("AUTOFT_GRACE_S", "2")


@pytest.mark.parametrize(
    "text, masked",
    [
        ("postgresql://user:secret@host:5432/db", "postgresql://user:***@host:5432/db"),
        (
            "error on mysql+pymysql://root:p%40ss@10.0.0.1/x: refused",
            "error on mysql+pymysql://root:***@10.0.0.1/x: refused",
        ),
        ("postgresql://user@host/db", "postgresql://user@host/db"),
        ("sqlite:///studies/autoft.db", "sqlite:///studies/autoft.db"),
    ],
)
def test_mask_url(text, masked):
    assert mask_url(text) == masked


def test_postgresql_url_uses_an_installed_driver():
    url = with_driver("postgresql://u:p@h/db")
    driver = url.split("://")[0]
    assert driver in ("postgresql", "postgresql+psycopg2")
    assert url.endswith("://u:p@h/db")
    assert with_driver("postgresql+psycopg://u@h/db") == "postgresql+psycopg://u@h/db"


def test_unreachable_storage_is_one_line_without_password():
    with pytest.raises(ConfigError) as err:
        make_storage("postgresql://u:secret@127.0.0.1:1/db")
    assert "secret" not in str(err.value) and "\n" not in str(err.value) and "u:***@" in str(err.value)


def test_dashboard_binds_loopback_unless_told():
    assert build_parser().parse_args(["dashboard"]).host == "127.0.0.1"
    assert build_parser().parse_args(["dashboard", "--host", "0.0.0.0"]).host == "0.0.0.0"


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sqlite", "journal"])
def test_stale_trial_is_failed_and_requeued_once(tmp_path, fast_heartbeat, kind):
    """A trial whose worker stopped beating becomes FAIL and comes back WAITING with the same params, once: through
    Optuna's heartbeat on SQLite, autoft's on a journal file (heartbeat.Trials), public API only."""
    url = f"sqlite:///{tmp_path}/s.db" if kind == "sqlite" else f"journal:{tmp_path}/s.journal"
    storage = make_storage(url)
    study = optuna.create_study(storage=storage, study_name="s")
    trials = Trials(study, storage, 1, 2)
    zombie = study.ask()
    zombie.suggest_float("lr", 1e-4, 1e-1, log=True)
    zombie.set_user_attr("portfolio", "hand_recipe")
    zombie.set_user_attr("weights_artifact_id", "gone-with-its-worker")
    with trials.beating(zombie.number):  # it beats, then its worker "dies": no more beats
        time.sleep(0.1)
    alive = study.ask()
    time.sleep(3.5)  # > grace (2 s) + SQLite CURRENT_TIMESTAMP's one-second resolution
    with trials.beating(alive.number):  # this one's worker is still beating
        time.sleep(0.1)
        assert [t.number for t in trials.fail_stale("worker stopped sending heartbeats", "fail_reason")] == [0]
        trials.fail_stale("worker stopped sending heartbeats", "fail_reason")  # another worker's sweep: no 2nd retry
    found = study.get_trials(deepcopy=False)
    assert [t.state for t in found] == [TrialState.FAIL, TrialState.RUNNING, TrialState.WAITING]
    assert found[2].params == found[0].params
    assert found[2].system_attrs["failed_trial"] == zombie.number
    assert found[2].user_attrs == {"portfolio": "hand_recipe"}  # what queued it; not the dead run's record
    assert records.reason(found[0]) == "worker stopped sending heartbeats"


def _hammer(url: str) -> None:
    study = optuna.load_study(study_name="busy", storage=make_storage(url))
    for _ in range(15):
        t = study.ask()
        t.set_user_attr("history", [{"epoch": j, "loss": 0.1 * j} for j in range(20)])
        t.report(0.5, 1)
        study.tell(t, t.suggest_float("x", 0, 1))


@pytest.mark.slow
def test_sqlite_many_writers_never_locked(tmp_path):
    """Three processes writing trials as fast as they can to one SQLite file: none fails on the lock."""
    url = f"sqlite:///{tmp_path}/busy.db"
    optuna.create_study(storage=make_storage(url), study_name="busy")
    fork = multiprocessing.get_context("fork")  # the children inherit the imports: no start-up cost
    procs = [fork.Process(target=_hammer, args=(url,)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(300)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    study = optuna.load_study(study_name="busy", storage=make_storage(url))
    assert len(study.get_trials(states=(TrialState.COMPLETE,))) == 45


def _search_args(data, storage, study, *more):
    return [
        "-q",
        "search",
        "--data",
        str(data),
        "--backbone",
        "tiny_cnn",
        "--image-size",
        "32",
        "--epochs",
        "2",
        "--device",
        "cpu",
        "--storage",
        storage,
        "--study",
        study,
        *more,
    ]


@pytest.mark.slow
def test_two_workers_on_postgresql(postgres_url, image_folder, tmp_path, monkeypatch, capfd):
    """`autoft search --workers 2` on a real PostgreSQL server: exactly the trials asked for, password never shown."""
    monkeypatch.chdir(tmp_path)
    assert main(_search_args(image_folder, postgres_url, "pg2", "--trials", "3", "--workers", "2")[1:]) == 0  # not -q
    study = optuna.load_study(study_name="pg2", storage=make_storage(postgres_url))
    states = [t.state for t in study.get_trials(deepcopy=False)]
    assert states.count(TrialState.COMPLETE) + states.count(TrialState.PRUNED) == 3
    assert TrialState.RUNNING not in states
    out, err = capfd.readouterr()
    exports = [p.read_text(errors="replace") for p in (tmp_path / "studies" / "pg2").glob("*") if p.suffix != ".pt"]
    assert exports and "secret" not in out + err + "".join(exports)
    assert "postgresql://autoft:***@127.0.0.1" in err  # the log line naming the storage, masked


@pytest.mark.slow
def test_worker_joins_postgresql_study_from_its_attrs(postgres_url, image_folder, tmp_path, monkeypatch):
    """A second worker needs only storage and study name; it meets the study's goal and stops."""
    monkeypatch.chdir(tmp_path)
    assert main(_search_args(image_folder, postgres_url, "join", "--trials", "1")) == 0
    study = optuna.load_study(study_name="join", storage=make_storage(postgres_url))
    study.set_user_attr("target", 3)  # as if another `autoft search --trials` had raised the goal
    monkeypatch.setenv("AUTOFT_STORAGE", postgres_url)
    elsewhere = shutil.copytree(image_folder, tmp_path / "elsewhere")  # the images at another path on "this machine"
    assert main(["-q", "worker", "--study", "join", "--device", "cpu", "--data", str(elsewhere)]) == 0
    states = [t.state for t in study.get_trials(deepcopy=False)]
    assert states.count(TrialState.COMPLETE) + states.count(TrialState.PRUNED) == 3
    assert study.trials[-1].user_attrs["config"]["data"] == str(elsewhere)
