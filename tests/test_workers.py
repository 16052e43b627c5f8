"""Many workers and the faults they must survive: exact trial counts, killed workers, crashing trials, signals,
seeds."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import optuna
import pytest
import torch
from conftest import make_image_folder, search_args
from optuna.trial import TrialState

import autoft.results.records
import autoft.study.objective
import autoft.study.workers
import autoft.system.interrupts
from autoft.cli import main
from autoft.config import Config
from autoft.exceptions import Terminated, TrialFailure
from autoft.storage import make_storage
from autoft.study.workers import Worker, has_slot, plan

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


def one_thread() -> dict[str, str]:
    """The environment for a subprocess, at one CPU thread so it stays quick on a shared, busy machine."""
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def load(url: str = "sqlite:///studies/autoft.db", name: str = "autoft") -> optuna.Study:
    return optuna.load_study(study_name=name, storage=make_storage(url))


def states(study: optuna.Study) -> list[TrialState]:
    return [t.state for t in study.get_trials(deepcopy=False)]


def n_finished(study: optuna.Study) -> int:
    return sum(s in FINISHED for s in states(study))


@pytest.fixture(autouse=True)
def _no_dashboard_notes(monkeypatch):
    """Per-trial dashboard plots are not what these tests are about; in this process, skip their cost."""
    import autoft.results.dashboard

    monkeypatch.setattr(autoft.results.dashboard, "publish_trial", lambda *a, **k: None)


@pytest.fixture
def fast_heartbeat(monkeypatch):
    monkeypatch.setenv("AUTOFT_HEARTBEAT_S", "1")
    monkeypatch.setenv("AUTOFT_GRACE_S", "3")


def wait_for(predicate, timeout: float = 120.0, what: str = "condition"):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        got = predicate()
        if got:
            return got
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def running_mid_trial(study: optuna.Study, after_finished: int = 0):
    """A trial that has reported at least one epoch and is still running (once `after_finished` trials are done)."""
    trials = study.get_trials(deepcopy=False)
    if sum(t.state in FINISHED for t in trials) < after_finished:
        return None
    return next(
        (t for t in trials if t.state == TrialState.RUNNING and t.intermediate_values and "worker" in t.user_attrs),
        None,
    )


# --- the exact goal -----------------------------------------------------------------------------------------


def test_plan_pins_one_gpu_per_worker_else_splits_cores():
    assert plan(3, ["0", "1"], 16) == [
        {"CUDA_VISIBLE_DEVICES": "0"},
        {"CUDA_VISIBLE_DEVICES": "1"},
        {"CUDA_VISIBLE_DEVICES": "0"},
    ]
    assert plan(3, ["4", "7", "5"], 16) == [{"CUDA_VISIBLE_DEVICES": g} for g in ("4", "7", "5")]
    assert plan(4, [], 16) == [{"threads": "4"}] * 4
    assert plan(3, [], 2) == [{"threads": "1"}] * 3


def test_has_slot_gives_the_last_slot_to_exactly_one_racer():
    t = lambda n, s: SimpleNamespace(number=n, state=s)  # noqa: E731
    done = [t(0, TrialState.COMPLETE), t(1, TrialState.PRUNED), t(2, TrialState.FAIL)]
    racers = done + [t(3, TrialState.RUNNING), t(4, TrialState.RUNNING)]
    assert has_slot(racers, 3, target=3) and not has_slot(racers, 4, target=3)
    assert has_slot(racers, 3, target=4) and has_slot(racers, 4, target=4)
    # a retried trial still waiting to be picked up holds its slot against a newer trial
    retry = done + [t(5, TrialState.WAITING), t(6, TrialState.RUNNING)]
    assert not has_slot(retry, 6, target=3) and has_slot(retry, 5, target=3)


def test_surplus_trial_gives_its_slot_up_without_training(tmp_path):
    storage = make_storage(f"sqlite:///{tmp_path}/s.db")
    study = optuna.create_study(storage=storage)
    study.set_user_attr("target", 1)
    study.ask()  # another worker's trial holds the only slot
    ran = []
    Worker(study, storage, lambda trial: ran.append(trial) or 1.0).one()
    last = study.trials[-1]
    assert not ran and last.state == TrialState.FAIL and last.user_attrs["fail_reason"].startswith("surplus")


@pytest.mark.slow
def test_two_workers_one_killed_mid_trial_still_exact(tmp_path, fast_heartbeat):
    """`--workers 2` on SQLite, one worker SIGKILLed mid-trial: its trial is failed by heartbeat and retried,
    and the study ends with exactly the trials asked for; nothing crashes on the database lock."""
    data = make_image_folder(tmp_path / "data", per_class=24)
    proc = subprocess.Popen(
        [sys.executable, "-m", "autoft.cli", *search_args(data, "--trials", "4", "--workers", "2", epochs=6)],
        cwd=tmp_path,
        env=one_thread(),
        stderr=subprocess.PIPE,
        text=True,
    )
    url = f"sqlite:///{tmp_path}/studies/autoft.db"
    study = wait_for(lambda: (tmp_path / "studies" / "autoft.db").exists() and _try_load(url), what="the study")
    victim = wait_for(lambda: running_mid_trial(study), what="a trial mid-way")
    os.kill(int(victim.user_attrs["worker"].rsplit(":", 1)[1]), signal.SIGKILL)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert "locked" not in err and "killed by signal 9" in err
    trials = study.get_trials(deepcopy=False)
    assert n_finished(study) == 4 and TrialState.RUNNING not in states(study)
    assert trials[victim.number].state == TrialState.FAIL
    retried = [t for t in trials if t.system_attrs.get("failed_trial") == victim.number]
    assert len(retried) == 1 and retried[0].state in FINISHED and retried[0].params == victim.params
    assert len({t.user_attrs["worker"] for t in trials if "worker" in t.user_attrs}) == 2  # both ran trials


def _try_load(url: str):
    try:
        study = load(url)
        return study if "target" in study.user_attrs else None
    except Exception:  # not created yet, or its tables are being created right now
        return None


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Heartbeat of storage")
def test_dead_runs_zombie_is_retried_by_the_next_search(tmp_path, monkeypatch, image_folder, fast_heartbeat):
    monkeypatch.chdir(tmp_path)
    assert main(search_args(image_folder, "--trials", "1")) == 0
    study = load()
    zombie = study.ask()  # a worker that started a trial and then died without a trace
    study._storage.record_heartbeat(zombie._trial_id)
    assert main(search_args(image_folder, "--trials", "2")) == 0  # the retry runs before the next portfolio recipe
    trials = study.get_trials(deepcopy=False)
    assert trials[zombie.number].state == TrialState.FAIL
    assert autoft.results.records.reason(trials[zombie.number]) == "worker stopped sending heartbeats"
    assert any(t.system_attrs.get("failed_trial") == zombie.number and t.state in FINISHED for t in trials)
    assert n_finished(study) == 3


@pytest.mark.slow
def test_killed_runs_trial_is_failed_at_once_with_its_reason_and_retried(tmp_path, monkeypatch, capsys):
    """kill -9 of a search mid-trial, then a new search at once: with the default 60 s grace, the dead process's
    trial is failed as "worker died (host:pid)" without waiting, run again exactly once, and the goal is met."""
    monkeypatch.delenv("AUTOFT_HEARTBEAT_S", raising=False)
    monkeypatch.delenv("AUTOFT_GRACE_S", raising=False)
    data = make_image_folder(tmp_path / "data", per_class=24)
    proc = subprocess.Popen(
        [sys.executable, "-m", "autoft.cli", *search_args(data, "--trials", "3", epochs=6)],
        cwd=tmp_path,
        env=one_thread(),
        stderr=subprocess.DEVNULL,
    )
    url = f"sqlite:///{tmp_path}/studies/autoft.db"
    study = wait_for(lambda: (tmp_path / "studies" / "autoft.db").exists() and _try_load(url), what="the study")
    victim = wait_for(lambda: running_mid_trial(study), what="a trial mid-way")
    proc.kill()  # not reaped yet: a zombie, which is as dead as a reaped process
    monkeypatch.chdir(tmp_path)
    t0 = time.monotonic()
    try:
        assert main(search_args(data, "--trials", "1", epochs=6)[1:]) == 0  # not -q: its log is checked
    finally:
        proc.wait()
    assert time.monotonic() - t0 < 30, "waited for the dead trial's heartbeat grace period"
    err = capsys.readouterr().err
    assert "running elsewhere" not in err and f"trial {victim.number}: worker died (" in err
    trials = study.get_trials(deepcopy=False)
    dead = trials[victim.number]
    assert (
        dead.state == TrialState.FAIL
        and dead.user_attrs["fail_reason"] == f"worker died ({victim.user_attrs['worker']})"
    )
    retried = [t for t in trials if t.system_attrs.get("failed_trial") == victim.number]
    assert len(retried) == 1 and retried[0].state in FINISHED and retried[0].params == victim.params
    assert "fail_reason" not in retried[0].user_attrs
    assert TrialState.RUNNING not in states(study)


def test_dead_worker_is_told_from_a_live_one_and_from_a_reused_pid(tmp_path):
    """Only a process of this machine that is gone, a zombie, or whose pid now belongs to a later process is dead;
    a live worker, one on another machine, or one recorded by another autoft are left to heartbeats."""
    from autoft.study.workers import PROCESS, dead_worker
    from autoft.system.processes import process_id, this_machine

    def trial(recorded: str) -> SimpleNamespace:
        return SimpleNamespace(user_attrs={PROCESS: recorded, "worker": "me:1"}, system_attrs={}, number=7)

    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        alive = process_id(sleeper.pid)
        assert dead_worker(trial(alive)) is None
        machine, pid, started = alive.rsplit("|", 2)
        if started:  # Linux: a reused pid has another start time
            assert dead_worker(trial(f"{machine}|{pid}|{int(started) - 1}")) == "me:1"
        assert dead_worker(trial(f"elsewhere|boot|ns|{pid}|{started}")) is None
        assert dead_worker(trial("written by something else")) is None
        sleeper.kill()
        time.sleep(0.2)  # a zombie until reaped below
        assert dead_worker(trial(alive)) == "me:1"
    finally:
        sleeper.kill()
        sleeper.wait()
    assert dead_worker(trial(alive)) == "me:1"
    assert dead_worker(trial(process_id(os.getpid()))) == "me:1"  # this process, and not running that trial
    assert dead_worker(trial(process_id(os.getpid())), running_here=7) is None  # this process runs it
    assert this_machine().count("|") == 2


@pytest.mark.slow
def test_summary_counts_this_runs_trials_only(tmp_path, monkeypatch, image_folder, capsys):
    """Resumed, and with another process finishing a trial of the same study meanwhile, a run counts its own."""
    monkeypatch.chdir(tmp_path)
    assert main(search_args(image_folder, "--trials", "2")) == 0
    assert "study autoft: 2 trials this run (" in capsys.readouterr().out

    def elsewhere(n, cfg):
        if n == 1:
            load().add_trial(optuna.trial.create_trial(value=0.0, user_attrs={"worker": "elsewhere:1"}))

    _patched_finetune(monkeypatch, elsewhere)
    assert main(search_args(image_folder, "--trials", "2", "--pruner", "none")) == 0  # this run's trial completes
    summary = capsys.readouterr().out.splitlines()[0]
    assert summary.startswith("study autoft: 1 trials this run (1 complete, 0 pruned, 0 failed) in ")
    assert summary.endswith("; 4 in the study")


def test_worker_needs_an_existing_study(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["worker", "--storage", f"sqlite:///{tmp_path}/x.db", "--study", "nope"]) == 2
    err = capsys.readouterr().err.strip()
    assert "no study named 'nope'" in err and "\n" not in err


# --- a trial's own faults ---------------------------------------------------------------------------------------


def _patched_finetune(monkeypatch, fault):
    """Wrap the trainer: `fault(call_number, cfg)` may raise; otherwise train for real."""
    real, calls = autoft.study.objective.finetune, []

    def finetune(cfg, data=None, report=None, **kwargs):
        calls.append(cfg)
        fault(len(calls), cfg)
        return real(cfg, data, report, **kwargs)

    monkeypatch.setattr(autoft.study.objective, "finetune", finetune)
    return calls


@pytest.mark.slow
def test_crashing_trial_is_recorded_memory_released_and_study_goes_on(tmp_path, monkeypatch, image_folder):
    monkeypatch.chdir(tmp_path)

    def fault(n, cfg):
        if n == 2:
            raise OSError("image file is truncated (3 bytes not processed)")

    _patched_finetune(monkeypatch, fault)
    released = []
    monkeypatch.setattr(autoft.study.objective.Objective, "release_memory", lambda self: released.append(1))
    assert main(search_args(image_folder, "--trials", "3")) == 0
    study = load()
    failed = [t for t in study.trials if t.state == TrialState.FAIL]
    assert len(failed) == 1 and failed[0].user_attrs["fail_reason"].startswith("OSError: image file is truncated")
    assert released == [1] and n_finished(study) == 3
    assert "image file is truncated" in (tmp_path / "studies" / "autoft" / "trials.csv").read_text()


@pytest.mark.slow
def test_trials_crashing_again_and_again_stop_with_one_line(tmp_path, monkeypatch, image_folder, capsys):
    monkeypatch.chdir(tmp_path)

    def fault(n, cfg):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    _patched_finetune(monkeypatch, fault)
    assert main(search_args(image_folder, "--trials", "5")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("autoft: error: 3 trials in a row failed") and "illegal memory access" in err[-1]
    assert states(load()) == [TrialState.FAIL] * 3


@pytest.mark.slow
@pytest.mark.parametrize("twice", [False, True])
def test_out_of_memory_is_retried_once_at_half_batch(tmp_path, monkeypatch, image_folder, twice):
    monkeypatch.chdir(tmp_path)

    def fault(n, cfg):
        if cfg.batch_size == 8 or twice:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    calls = _patched_finetune(monkeypatch, fault)
    assert main(search_args(image_folder, "--trials", "1")) == 0
    (trial,) = load().trials
    assert [c.batch_size for c in calls] == [8, 4]
    assert trial.user_attrs["oom_retry"] == "OutOfMemoryError at batch_size 8; retried at 4"
    if twice:
        assert trial.state == TrialState.PRUNED and "out of memory at batch size 4" in trial.user_attrs["fail_reason"]
    else:
        assert trial.state == TrialState.COMPLETE and trial.user_attrs["config"]["batch_size"] == 4


@pytest.mark.slow
def test_study_none_of_whose_trials_finished_takes_a_new_space(tmp_path, monkeypatch, image_folder, capsys):
    """A space whose trials all fail must not lock the study name: with nothing finished, a new space (or base
    config) replaces the stored one. Once a trial finished, another space is refused (test_bad_inputs)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bad.yaml").write_text("head_lr: 5.0\n")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(
            autoft.study.objective, "finetune", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("loss is nan"))
        )
        assert main(search_args(image_folder, "--trials", "1", "--space", "bad.yaml")) == 2
    assert states(load()) == [TrialState.FAIL] * 3
    (tmp_path / "good.yaml").write_text("head_lr: 0.05\n")
    capsys.readouterr()
    assert main(search_args(image_folder, "--trials", "1", "--space", "good.yaml", epochs=1)[1:]) == 0
    study = load()
    assert study.user_attrs["space"]["head_lr"] == 0.05 and study.user_attrs["base"]["epochs"] == 1
    assert n_finished(study) == 1 and "no finished trial yet" in capsys.readouterr().err
    (tmp_path / "other.yaml").write_text("head_lr: 0.01\n")
    assert main(search_args(image_folder, "--trials", "1", "--space", "other.yaml", epochs=1)) == 2


def test_diverged_loss_is_pruned_with_its_reason(tmp_path, monkeypatch, image_folder):
    monkeypatch.chdir(tmp_path)

    def fault(n, cfg):
        if n == 1:
            raise TrialFailure("training loss diverged (nan) in epoch 1")

    _patched_finetune(monkeypatch, fault)
    assert main(search_args(image_folder, "--trials", "2")) == 0
    first, second = load().trials
    assert (
        first.state == TrialState.PRUNED
        and first.user_attrs["fail_reason"] == "training loss diverged (nan) in epoch 1"
    )
    assert second.state == TrialState.COMPLETE


# --- signals ---------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_mid_trial_keeps_finished_work_and_resumes(tmp_path, monkeypatch, sig, code):
    data = make_image_folder(tmp_path / "data", per_class=24)
    proc = subprocess.Popen(
        [sys.executable, "-m", "autoft.cli", *search_args(data, "--trials", "20", epochs=6)],
        cwd=tmp_path,
        env={**one_thread(), "PYTHONFAULTHANDLER": "1"},
        stderr=subprocess.PIPE,
        text=True,
    )
    url = f"sqlite:///{tmp_path}/studies/autoft.db"
    study = wait_for(lambda: (tmp_path / "studies" / "autoft.db").exists() and _try_load(url), what="the study")
    victim = wait_for(lambda: running_mid_trial(study, after_finished=1), what="a trial mid-way after one finished")
    proc.send_signal(sig)
    try:
        _, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:  # where it hangs: faulthandler prints every thread's stack on SIGABRT
        proc.send_signal(signal.SIGABRT)
        pytest.fail("no exit 120 s after the signal; its threads:\n" + proc.communicate(timeout=30)[1][-8000:])
    assert proc.returncode == code, err
    trials = study.get_trials(deepcopy=False)
    assert trials[victim.number].state == TrialState.FAIL
    assert trials[victim.number].user_attrs["fail_reason"].startswith("interrupted")
    assert TrialState.RUNNING not in states(study)
    done = n_finished(study)
    assert done >= 1
    best = Config.from_yaml(tmp_path / "studies" / "autoft" / "best.yaml")
    assert best.backbone == "tiny_cnn"
    csv_rows = (tmp_path / "studies" / "autoft" / "trials.csv").read_text().strip().splitlines()
    assert len(csv_rows) == 1 + len(trials)
    monkeypatch.chdir(tmp_path)
    assert main(search_args(data, "--trials", "1", epochs=6)) == 0  # resumes: one more finished trial
    assert n_finished(study) == done + 1


# --- reproducibility ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_same_seed_same_trials_and_scores_on_cpu(tmp_path, monkeypatch, image_folder):
    runs = {}
    for name, seed in (("a", 7), ("b", 7), ("c", 8)):
        (tmp_path / name).mkdir()
        monkeypatch.chdir(tmp_path / name)
        assert main(search_args(image_folder, "--trials", "5", "--seed", str(seed), "--pruner", "none")) == 0
        runs[name] = [(t.params, t.value) for t in load().trials]
    assert runs["a"] == runs["b"]
    assert runs["a"][4][0] != runs["c"][4][0]  # trials 0-3 are the portfolio; the sampled ones follow the seed


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # the dropped exception, reported
def test_sigterm_dropped_where_python_ignores_exceptions_still_stops_the_run(tmp_path, monkeypatch, image_folder):
    """A signal handler runs wherever the main thread is; raised inside a weakref callback (or a __del__), its
    exception is printed and dropped. The run must stop anyway: at the next epoch, the trial marked interrupted."""
    import gc
    import weakref

    monkeypatch.chdir(tmp_path)

    def sigterm_in_a_weakref_callback(n, cfg):
        if n == 2:

            class Thing:
                pass

            thing = Thing()
            ref = weakref.ref(thing, lambda _: autoft.system.interrupts.stop(Terminated))
            del thing  # the callback raises Terminated; Python prints "Exception ignored" and goes on
            gc.collect()
            assert ref() is None

    _patched_finetune(monkeypatch, sigterm_in_a_weakref_callback)
    assert main(search_args(image_folder, "--trials", "5", "--pruner", "none", epochs=3)) == 143
    trials = load().trials
    assert len(trials) == 2 and trials[1].state == TrialState.FAIL
    assert trials[1].user_attrs["fail_reason"] == "interrupted (SIGTERM)"
