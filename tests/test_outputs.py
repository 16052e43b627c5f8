"""Outputs: every place a command writes is checked before it spends compute, and every write is atomic with
the permissions the umask asks for."""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import make_image_folder

import autoft.results.predict
import autoft.training.run
from autoft.cli import main
from autoft.system.files import STALE_TMP_S, atomic_open, atomic_path, atomic_write_text
from autoft.training.checkpoint import FORMAT

TINY = ["--backbone", "tiny_cnn", "--image-size", "32", "--batch-size", "8", "--device", "cpu", "--epochs", "1"]


@pytest.fixture(scope="module")
def searched(tmp_path_factory) -> Path:
    """A folder holding data/ (with test/) and a finished two-trial study with its exports."""
    root = tmp_path_factory.mktemp("searched")
    make_image_folder(root / "data", per_class=6, splits=("train", "val", "test"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AUTOFT_CACHE", str(root / "cache"))
        mp.chdir(root)
        assert main(["-q", "search", "--data", "data", "--trials", "2", *TINY]) == 0
    return root


@pytest.fixture
def project(searched, tmp_path, monkeypatch) -> Path:
    root = tmp_path / "project"
    shutil.copytree(searched, root, ignore=shutil.ignore_patterns("cache"))
    monkeypatch.chdir(root)
    return root


def _fingerprint(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _one_error(capsys, expected: str) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("autoft: error: ") and expected in err[0], err
    return err[0]


# --- item 5: outputs checked before any work ------------------------------------------------------------------


@pytest.mark.slow
def test_train_out_that_is_a_file_fails_before_training(project, monkeypatch, capsys):
    (project / "taken").write_text("not a folder\n")
    monkeypatch.setattr(
        autoft.training.run, "finetune", lambda *a, **k: pytest.fail("trained although --out cannot be written")
    )
    assert main(["train", "--data", "data", "--out", "taken", *TINY]) == 2
    _one_error(capsys, "output folder taken is a file, not a folder")
    assert (project / "taken").read_text() == "not a folder\n"


def test_train_into_a_read_only_folder_fails_before_training(project, monkeypatch, capsys, read_only):
    (project / "runs").mkdir()
    read_only(project / "runs")
    monkeypatch.setattr(
        autoft.training.run, "finetune", lambda *a, **k: pytest.fail("trained although --out cannot be written")
    )
    assert main(["train", "--data", "data", "--out", "runs/train", *TINY]) == 2
    _one_error(capsys, "is not writable")


def test_search_out_that_is_a_file_wastes_no_trial(project, capsys):
    (project / "taken").write_text("x")
    before = _fingerprint(project / "studies")
    assert main(["search", "--data", "data", "--trials", "1", "--out", "taken", *TINY]) == 2
    _one_error(capsys, "--out taken is a file, not a folder")
    assert _fingerprint(project / "studies") == before


@pytest.mark.parametrize(
    "command",
    [
        ["report"],
        ["evaluate", "--model", "studies/autoft/best.pt"],
        ["export", "--model", "studies/autoft/best.pt"],
    ],
)
def test_read_only_studies_is_one_line_for_every_command(project, capsys, read_only, command):
    read_only(project / "studies")
    before = _fingerprint(project / "studies")
    assert main(command) == 2
    _one_error(capsys, "is not writable")
    assert _fingerprint(project / "studies") == before


@pytest.mark.parametrize(
    "command, expected",
    [
        (["report", "--out", "f"], "report folder f is a file, not a folder"),
        (
            ["evaluate", "--model", "studies/autoft/best.pt", "--out", "f/x.png"],
            "--out f/x.png: f is a file, not a folder",
        ),
        (["export", "--model", "studies/autoft/best.pt", "--out", "f/x.pt"], "--out f/x.pt: f is a file, not a folder"),
        (["dashboard", "--artifacts", "f"], "--artifacts f is a file, not a folder"),
        (
            ["worker", "--storage", "sqlite:///studies/autoft.db", "--study", "autoft", "--out", "f"],
            "--out f is a file, not a folder",
        ),
        (
            ["worker", "--storage", "sqlite:///studies/autoft.db", "--study", "autoft", "--threads", "0"],
            "--threads must be at least 1",
        ),
        (["report", "--storage", "sqlite:////proc/autoft/x.db"], "/proc"),
        (["report", "--study", ".."], "study name '..' is not allowed"),
    ],
)
def test_output_in_the_way_is_one_line(project, capsys, command, expected):
    (project / "f").write_text("a file\n")
    assert main(command) == 2
    _one_error(capsys, expected)


def test_evaluate_out_folder_gets_the_default_name_and_says_so(project, capsys):
    (project / "plots").mkdir()
    assert main(["evaluate", "--model", "studies/autoft/best.pt", "--out", "plots", "--device", "cpu"]) == 0
    png = Path("plots") / "best_val_confusion.png"
    assert png.is_file() and not Path("plots.png").exists()
    assert f"confusion matrix: {png}" in capsys.readouterr().out


def test_export_out_folder_gets_the_default_name(project, capsys):
    (project / "deploy").mkdir()
    assert main(["export", "--model", "studies/autoft/best.pt", "--out", "deploy"]) == 0
    assert (project / "deploy" / "best.torchscript.pt").is_file() and (
        project / "deploy" / "best.torchscript.pt.json"
    ).is_file()
    assert "wrote deploy/best.torchscript.pt" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.parametrize("url", ["sqlite://", "sqlite:///:memory:"])
def test_in_memory_sqlite_runs_a_search_without_tracebacks(project, url):
    """A study that lives only as long as the process: it runs (in a process of its own, so that a heartbeat
    thread's traceback would show on its stderr), exports its best, and prints nothing it should not."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "autoft.cli",
            "search",
            "--data",
            "data",
            "--trials",
            "2",
            "--storage",
            url,
            "--study",
            "mem",
            *TINY,
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr and "Exception" not in proc.stderr, proc.stderr
    assert "study mem: 2 trials this run" in proc.stdout and (project / "studies" / "mem" / "best.yaml").is_file()
    assert not Path("sqlite:").exists()  # `sqlite://` is not a file path


# --- item 6: atomic writes with normal permissions ----------------------------------------------------------


@pytest.mark.slow
def test_every_output_is_0644_under_umask_022(project, capsys):
    old = os.umask(0o022)
    try:
        assert main(["train", "--data", "data", "--out", "run", *TINY]) == 0
        assert main(["search", "--data", "data", "--trials", "1", "--study", "fresh", *TINY]) == 0
        assert main(["report", "--study", "fresh"]) == 0
        assert main(["evaluate", "--model", "run/model.pt", "--device", "cpu"]) == 0
        assert main(["export", "--model", "run/model.pt"]) == 0
    finally:
        os.umask(old)
    files = [*Path("run").iterdir(), *Path("studies/fresh").iterdir()]
    kinds = {p.name.split(".", 1)[-1] for p in files}
    assert {"yaml", "csv", "pt", "json", "png", "html", "torchscript.pt", "torchscript.pt.json"} <= kinds, kinds
    cache = [p for p in Path(os.environ["AUTOFT_CACHE"]).rglob("*") if p.is_file()]
    assert cache, "the decoded-image cache wrote nothing"
    modes = {str(p): oct(stat.S_IMODE(p.stat().st_mode)) for p in files + cache}
    assert set(modes.values()) == {"0o644"}, modes


@pytest.mark.parametrize("interrupt", [KeyboardInterrupt, SystemExit, OSError])
def test_interrupted_write_keeps_the_old_file_and_leaves_no_temp(tmp_path, interrupt):
    target = tmp_path / "best.yaml"
    atomic_write_text(target, "old\n")
    with pytest.raises(interrupt):
        with atomic_open(target) as fh:
            fh.write(b"half of the new")
            raise interrupt()
    assert target.read_text() == "old\n" and os.listdir(tmp_path) == ["best.yaml"]
    with pytest.raises(interrupt):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise interrupt()
    assert target.read_text() == "old\n" and os.listdir(tmp_path) == ["best.yaml"]


def test_export_killed_mid_write_keeps_the_previous_model(project, monkeypatch):
    assert main(["export", "--model", "studies/autoft/best.pt"]) == 0
    model = project / "studies" / "autoft" / "best.torchscript.pt"
    good = model.read_bytes()
    real = autoft.results.predict._export_torchscript

    def interrupted(module, sample, out):
        Path(out).write_bytes(b"")  # torch.jit.save has opened (truncated) its file
        raise KeyboardInterrupt()

    monkeypatch.setattr(autoft.results.predict, "_export_torchscript", interrupted)
    with pytest.raises(KeyboardInterrupt):
        autoft.results.predict.export("studies/autoft/best.pt")
    assert model.read_bytes() == good
    assert not [p for p in model.parent.iterdir() if p.name.endswith(".tmp")]

    def wrong(module, sample, out):  # a file that does not reproduce PyTorch is never put in place
        return real(module, sample, out) + 1.0

    monkeypatch.setattr(autoft.results.predict, "_export_torchscript", wrong)
    assert main(["export", "--model", "studies/autoft/best.pt"]) == 2
    assert model.read_bytes() == good
    assert not [p for p in model.parent.iterdir() if p.name.endswith(".tmp")]


def test_temp_files_of_killed_writers_are_swept_by_the_next_write(tmp_path):
    target = tmp_path / "best.pt"
    stale = [tmp_path / ".best.pt.x7k2m9qa.tmp", tmp_path / ".best.pt.0123456789ab.tmp"]  # mkstemp's and ours
    fresh, other = tmp_path / ".best.pt.fedcba987654.tmp", tmp_path / ".trials.csv.0123456789ab.tmp"
    long_ago = time.time() - STALE_TMP_S - 60
    for p in [*stale, fresh, other]:
        p.write_bytes(b"torn")
        if p is not fresh:
            os.utime(p, (long_ago, long_ago))
    torch.save({"w": torch.zeros(1)}, tmp_path / "unrelated.pt")
    with atomic_open(target) as fh:
        fh.write(b"new")
    assert sorted(os.listdir(tmp_path)) == sorted(["best.pt", fresh.name, other.name, "unrelated.pt"])


# --- item 9: a checkpoint that is not whole ----------------------------------------------------------------------


@pytest.mark.parametrize("missing", ["state_dict", "classes", "config"])
@pytest.mark.parametrize("command", ["evaluate", "export", "predict"])
def test_checkpoint_without_a_part_is_one_line(project, capsys, missing, command):
    ckpt = torch.load("studies/autoft/best.pt", weights_only=True)
    assert ckpt["format"] == FORMAT
    del ckpt[missing]
    torch.save(ckpt, "broken.pt")
    args = {"evaluate": ["--device", "cpu"], "export": [], "predict": ["data/val"]}[command]
    assert main([command, "--model", "broken.pt", *args]) == 2
    _one_error(capsys, f"broken.pt is an incomplete autoft checkpoint: it has no {missing!r}")
