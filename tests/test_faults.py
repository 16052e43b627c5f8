"""Faults around the trials (not inside one): what a user deletes, signals from start-up to the final export, kill -9
at the worst moments, dead parents, budgets, misleading messages and wasted work. Each numbered case of issue 29
has its test; a signal or a kill is sent at a named moment (tests/hold.py), never after a guessed sleep."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch
import yaml
from conftest import make_image_folder, search_args
from optuna.trial import TrialState

from autoft.cli import main
from autoft.results import records
from autoft.storage import make_storage
from autoft.training.checkpoint import load_checkpoint

HOLD = str(Path(__file__).with_name("hold.py"))
STUDY_DIR = Path("studies") / "autoft"


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}


def held(cwd: Path, spec: str, args: list[str]) -> tuple[subprocess.Popen, Path]:
    """The CLI with `args` in a subprocess, held at `spec` (see hold.py); returns it and the marker it writes."""
    marker = cwd / f"held-{time.monotonic_ns()}"
    proc = subprocess.Popen(
        [sys.executable, HOLD, spec, str(marker), "--", *args],
        cwd=cwd,
        env=env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    return proc, marker


def signal_when_held(proc: subprocess.Popen, marker: Path, sig: int, timeout: float = 180) -> tuple[int, str]:
    t0 = time.monotonic()
    while not marker.exists():
        if proc.poll() is not None:
            pytest.fail(f"exited {proc.returncode} before the moment: {proc.communicate()[1][-3000:]}")
        if time.monotonic() - t0 > timeout:
            proc.kill()
            pytest.fail("never reached the moment")
        time.sleep(0.02)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err


def load(tmp_path: Path, name: str = "autoft") -> optuna.Study:
    return optuna.load_study(study_name=name, storage=make_storage(f"sqlite:///{tmp_path}/studies/autoft.db"))


def temps(*folders: Path) -> list[Path]:
    return [p for f in folders if f.exists() for p in f.rglob("*") if p.name.endswith(".tmp")]


def cache() -> Path:
    return Path(os.environ["AUTOFT_CACHE"])


def exports_agree(out: Path) -> dict:
    """best.pt, best.yaml and trials.csv of one decision: best.yaml names what best.pt holds, and trials.csv lists
    the winner as it was."""
    result = yaml.safe_load((out / "best.yaml").read_text())["result"]
    held_ = load_checkpoint(out / "best.pt")["metrics"]
    assert result["shipped"] == f"trial {held_['trial']}: {held_['shipped']}"
    rows = (out / "trials.csv").read_text().splitlines()
    assert any(row.startswith(f"{result['trial']},COMPLETE,") for row in rows)
    return result


@pytest.fixture
def data(tmp_path) -> Path:
    return make_image_folder(tmp_path / "data", per_class=12)


# --- 1. a study always resumes ---------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("lost", ["artifacts", "artifacts_elsewhere"])
def test_1_a_study_whose_artifacts_are_gone_resumes_and_rebuilds_best_pt(tmp_path, monkeypatch, data, capsys, lost):
    monkeypatch.chdir(tmp_path)
    assert main(search_args(data, "--study", "s1", "--trials", "4", "--pruner", "sha")) == 0
    study = load(tmp_path, "s1")
    assert records.completed(study)
    more = []
    if lost == "artifacts":
        shutil.rmtree(tmp_path / "studies" / "artifacts")
    else:
        more = ["--artifacts", str(tmp_path / "elsewhere")]
    (tmp_path / "studies" / "s1" / "best.pt").unlink()
    capsys.readouterr()
    assert main(search_args(data, "--study", "s1", "--trials", "2", *more)) == 0
    err = capsys.readouterr().err
    assert "Traceback" not in err
    trials = load(tmp_path, "s1").get_trials(deepcopy=False)
    assert [t for t in trials if t.state == TrialState.FAIL] == []  # nothing outside a trial fails one
    assert sum(t.state in records.FINISHED for t in trials) == 6
    result = exports_agree(tmp_path / "studies" / "s1")
    assert result["export"] == "final"


# --- 2. signals and kill -9 while images are decoded ------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_2_a_signal_while_images_are_decoded_leaves_no_temp_file(tmp_path, data, sig, code):
    proc, marker = held(tmp_path, "autoft.system.files:NpyWriter.__init__:after", search_args(data, "--trials", "1"))
    rc, err = signal_when_held(proc, marker, sig)
    assert rc == code, err
    assert [line for line in err.splitlines() if line.strip()] == [err.strip().splitlines()[-1]]  # one line
    assert err.startswith("autoft: ")
    assert temps(cache(), tmp_path / "studies") == []


@pytest.mark.slow
def test_2_kill_9_while_images_are_decoded_is_swept_by_the_next_run(tmp_path, data, monkeypatch):
    proc, marker = held(tmp_path, "autoft.system.files:NpyWriter.__init__:after", search_args(data, "--trials", "1"))
    signal_when_held(proc, marker, signal.SIGKILL)
    left = temps(cache())
    assert left and all(p.stat().st_size > 0 for p in left)  # the store's temp, as a killed writer leaves it
    monkeypatch.chdir(tmp_path)
    assert main(search_args(data, "--trials", "1")) == 0  # its writer is gone: removed at once, not after an hour
    assert temps(cache(), tmp_path / "studies") == []


# --- 3. a signal during the final export ------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_3_a_signal_during_the_final_export_keeps_consistent_files_and_trials_0_completes_it(
    tmp_path, data, sig, code, monkeypatch
):
    proc, marker = held(
        tmp_path,
        "autoft.results.exports:Exporter.shipped",
        search_args(data, "--trials", "3", "--pruner", "none", "--final", "soup"),
    )
    rc, err = signal_when_held(proc, marker, sig)
    assert rc == code, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "final export was interrupted" in lines[0] and "--trials 0" in lines[0]
    out = tmp_path / STUDY_DIR
    before = exports_agree(out)
    assert before["export"] == "interim"  # the winner's validated fold models, as the trials left them
    assert temps(out, tmp_path / "studies" / "artifacts") == []
    n = len(load(tmp_path).trials)
    monkeypatch.chdir(tmp_path)
    assert main(search_args(data, "--trials", "0", "--pruner", "none", "--final", "soup")) == 0
    assert len(load(tmp_path).trials) == n  # no new trial
    after = exports_agree(out)
    assert after["export"] == "final" and "soup" in after["shipped"]


def test_3_a_signal_during_the_renames_waits_for_all_of_them(tmp_path, monkeypatch):
    """files.atomic_paths: a signal that comes between two renames is raised after the last one."""
    from autoft.exceptions import Terminated
    from autoft.system import files, interrupts

    real, done = os.replace, []

    def replace(src, dst):
        if not done:
            os.kill(os.getpid(), signal.SIGTERM)  # lands here, between the renames
        real(src, dst)
        done.append(dst)

    monkeypatch.setattr(files.os, "replace", replace)
    targets = [tmp_path / n for n in ("best.pt", "best.yaml", "trials.csv")]
    with pytest.raises(Terminated), interrupts.handled(), files.atomic_paths(targets) as paths:
        for p in paths:
            p.write_text("new")
    assert [p.read_text() for p in targets] == ["new"] * 3 and len(done) == 3
    assert temps(tmp_path) == []


# --- 4. kill -9 between the new best's weights and the trial's end -----------------------------------------------


@pytest.mark.slow
def test_4_kill_9_before_a_trial_completes_never_ships_it_and_its_weights_go(tmp_path, data, monkeypatch, capsys):
    proc, marker = held(
        tmp_path,
        "autoft.results.exports:Exporter.keep_weights:after",
        search_args(data, "--trials", "3", "--pruner", "none"),
    )
    signal_when_held(proc, marker, signal.SIGKILL)
    study = load(tmp_path)
    (victim,) = study.get_trials(deepcopy=False)
    assert victim.state == TrialState.RUNNING and records.weights_artifact(victim)  # kept, never completed
    assert not (tmp_path / STUDY_DIR / "best.pt").exists()  # best.pt only ever holds a completed trial
    monkeypatch.chdir(tmp_path)
    assert main(["best"]) == 2
    assert "no completed trial yet" in capsys.readouterr().err
    assert main(search_args(data, "--trials", "2", "--pruner", "none")) == 0
    trials = load(tmp_path).get_trials(deepcopy=False)
    assert trials[0].state == TrialState.FAIL and trials[0].user_attrs["fail_reason"].startswith("worker died")
    artifacts = tmp_path / "studies" / "artifacts"
    assert not (artifacts / records.weights_artifact(victim)).exists()  # the kept set alone, as promised
    kept = records.kept_set([records.Candidate.of(t) for t in records.completed(load(tmp_path))])
    held_weights = [
        t for t in trials if records.weights_artifact(t) and (artifacts / records.weights_artifact(t)).exists()
    ]
    assert {t.number for t in held_weights} <= kept
    exports_agree(tmp_path / STUDY_DIR)


# --- 5. workers end with their parent ---------------------------------------------------------------------------


@pytest.mark.slow
def test_5_workers_end_with_a_killed_parent_and_the_study_resumes(tmp_path, data, monkeypatch):
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "autoft.cli",
            *search_args(data, "--trials", "50", "--workers", "2", "--pruner", "none", epochs=10),
        ],
        cwd=tmp_path,
        env=env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    t0 = time.monotonic()
    while True:
        assert time.monotonic() - t0 < 180, "the workers never both ran a trial"
        try:
            running = [
                t
                for t in load(tmp_path).get_trials(deepcopy=False)  # fine-tunes (a probe ends at once)
                if t.state == TrialState.RUNNING and t.intermediate_values and t.user_attrs["config"]["aug_strength"]
            ]
        except Exception:  # the study is not there yet
            running = []
        if len(running) == 2:
            break
        time.sleep(0.1)
    pids = [records.worker_pid(t) for t in running]
    proc.kill()  # kill -9 of the search: its workers hear of it from nobody
    proc.wait()
    t0 = time.monotonic()
    while any(_alive(pid) for pid in pids):
        assert time.monotonic() - t0 < 30, "a worker outlived its parent"
        time.sleep(0.1)
    trials = load(tmp_path).get_trials(deepcopy=False)
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    ended = [trials[t.number] for t in running]  # interrupted, unless it finished (or was raced out) in the meantime
    assert all(t.state in records.FINISHED or records.reason(t).startswith("interrupted") for t in ended), [
        (t.number, t.state, records.reason(t)) for t in ended
    ]
    assert any(records.reason(t).startswith("interrupted") for t in trials)  # 50 asked: they were stopped mid-trial
    monkeypatch.chdir(tmp_path)
    finished = sum(t.state in records.FINISHED for t in trials)
    assert main(search_args(data, "--trials", "1", "--pruner", "none", epochs=10)) == 0
    assert sum(t.state in records.FINISHED for t in load(tmp_path).trials) == finished + 1


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


# --- 6. the budget includes everything ---------------------------------------------------------------------------


@pytest.mark.slow
def test_6_the_clock_starts_at_process_start(tmp_path):
    code = (
        "import time; time.sleep(1.0); from autoft.system.processes import started_monotonic; "
        "print(time.monotonic() - started_monotonic())"
    )
    age = float(
        subprocess.run([sys.executable, "-c", code], env=env(), capture_output=True, text=True, check=True).stdout
    )
    assert age >= 1.0  # the sleep and the imports before it count


def test_6_an_exact_probe_that_would_overrun_the_budget_does_not_start(tmp_path, tiny_config):
    from autoft.cache import RunCache
    from autoft.results.exports import Exporter
    from autoft.space import SearchSpace
    from autoft.study.objective import Objective

    cfg = tiny_config.replace(freeze_depth=3, aug_strength=0.0, image_size=64)
    objective = Objective(
        tiny_config, SearchSpace({}), 0, Exporter(tmp_path, str(tmp_path / "a"), RunCache()), RunCache()
    )
    study = optuna.create_study(direction="maximize")
    trial = study.ask()
    objective._afford(trial, cfg)  # nothing measured yet: the first probe runs
    objective.cache.put(("probe cost", "tiny_cnn"), (32, 10.0, 5.0), 0)  # 10 s of features at 32 px, 5 s of fit
    objective.deadline, objective.clock = 1000.0 + 15 + 44.0, lambda: 1000.0  # 44 s left after the export's 15
    with pytest.raises(optuna.TrialPruned, match="takes about 45 s here, and 44 s are left"):
        objective._afford(trial, cfg)  # 10 x (64 / 32)^2 + 5 = 45 s
    objective._afford(trial, cfg.replace(image_size=32))  # 15 s: it fits
    objective._afford(trial, cfg.replace(aug_strength=0.5))  # not an exact probe: stopped at its epochs instead


def test_6_a_budget_that_buys_no_trial_says_so_and_exits_non_zero(tmp_path, data, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(search_args(data, "--timeout", "1")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--timeout budget of 1 s bought no trial" in err[0]


# --- 7. messages that say what to fix ---------------------------------------------------------------------------


def test_7_evaluate_offers_and_takes_skip_bad_images(tmp_path, data, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert (
        main(
            [
                "train",
                "--data",
                str(data),
                "--backbone",
                "tiny_cnn",
                "--image-size",
                "32",
                "--epochs",
                "1",
                "--device",
                "cpu",
                "--cv-folds",
                "1",
                "--out",
                "run",
            ]
        )
        == 0
    )
    new = make_image_folder(tmp_path / "new", per_class=4, splits=("train", "test"))
    (new / "test" / "cat" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 10)
    capsys.readouterr()
    assert main(["evaluate", "--model", "run/model.pt", "--data", str(new), "--split", "test"]) == 2
    assert "--skip-bad-images" in capsys.readouterr().err
    assert (
        main(
            [
                "evaluate",
                "--model",
                "run/model.pt",
                "--data",
                str(new),
                "--split",
                "test",
                "--skip-bad-images",
                "--json",
            ]
        )
        == 0
    )
    assert '"n": 4' in capsys.readouterr().out  # 2 per class; the broken one left out


def test_7_workers_on_an_in_memory_storage_is_one_line_before_any_work(tmp_path, data, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(search_args(data, "--workers", "2", "--storage", "sqlite://")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "in-memory database" in err[0] and "no study" not in err[0]
    assert not temps(cache()) and not list((cache() / "images").glob("*.npy"))  # refused before decoding


def test_7_a_truncated_model_file_is_called_what_it_is(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    torch.save({"w": torch.zeros(1000)}, "whole.pt")
    Path("cut.pt").write_bytes(Path("whole.pt").read_bytes()[:2000])
    assert main(["predict", "--model", "cut.pt", "x.png"]) == 2
    err = capsys.readouterr().err
    assert "cut.pt is truncated, damaged or not a PyTorch file" in err and "refused" not in err


# --- 8. no wasted work ------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_8_an_image_size_fixed_in_the_space_decodes_that_size_only(tmp_path, data, monkeypatch):
    from autoft.backbones import get_backbone
    from autoft.data.store import store_size_for

    monkeypatch.chdir(tmp_path)
    Path("space.yaml").write_text("image_size: 32\n")
    args = [
        "-q",
        "search",
        "--data",
        str(data),
        "--backbone",
        "tiny_cnn",
        "--epochs",
        "1",
        "--device",
        "cpu",
        "--trials",
        "1",
        "--space",
        "space.yaml",
    ]
    assert main(args) == 0
    stores = [np.load(p, mmap_mode="r").shape[-1] for p in (cache() / "images").glob("*.npy")]
    assert stores == [store_size_for(32, get_backbone("tiny_cnn").crop_pct)]


def test_8_an_epoch_of_one_batch_moves_the_bar_to_the_next_epoch():
    from autoft.study.progress import Progress
    from autoft.study.workers import Ran

    class FakeStudy:
        def get_trials(self, deepcopy=False):
            from types import SimpleNamespace

            from autoft.config import Config

            return [SimpleNamespace(number=0, user_attrs={"config": Config(backbone="tiny_cnn", epochs=2).to_dict()})]

        user_attrs: dict = {}

    progress = Progress(1, FakeStudy(), Ran(), folds=1, live=True)
    progress.batch(0, 1, 1, 10.0)
    progress.epoch(0, 2, {"epoch": 1, "val_accuracy": 0.5})
    progress.batch(0, 1, 1, 10.0)
    assert "epoch 2/2 batch 1/1" in progress.bar.postfix
    progress.close()


def test_8_by_kind_and_time_in_trials_agree_on_an_interrupted_trial():
    import datetime

    from autoft.results.summary import budget_story, time_per_state

    start = datetime.datetime(2026, 1, 1)
    t = optuna.trial.create_trial(state=TrialState.FAIL, user_attrs={"fail_reason": "interrupted (SIGTERM)"})
    t.datetime_start, t.datetime_complete = start, start + datetime.timedelta(seconds=24)
    assert time_per_state([t]) == "24 s (24 s in 1 failed)" and budget_story([t]) == "failed 24 s (1)"
