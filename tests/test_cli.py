import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import optuna
import pytest
import yaml
from conftest import make_image_folder

from autoft.cli import main
from autoft.config import Config
from autoft.storage import make_storage

TINY = [
    "--backbone",
    "tiny_cnn",
    "--image-size",
    "32",
    "--batch-size",
    "8",
    "--device",
    "cpu",
    "--head-lr",
    "0.05",
    "--base-lr",
    "0.01",
    "--aug-strength",
    "0",
]


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_train_writes_model_config_metrics_and_test_accuracy(in_tmp, capsys):
    data = make_image_folder(in_tmp / "data", splits=("train", "val", "test"))
    assert main(["train", "--data", str(data), "--out", "run", "--epochs", "3", *TINY]) == 0
    metrics = json.loads((in_tmp / "run" / "metrics.json").read_text())
    assert len(metrics["history"]) == 3 and 0 <= metrics["test_accuracy"] <= 1
    out = capsys.readouterr().out
    assert "test accuracy" in out and "test balanced_accuracy" in out and "test f1_macro" in out
    cfg = Config.from_yaml(in_tmp / "run" / "config.yaml")
    assert cfg.epochs == 3 and cfg.backbone == "tiny_cnn" and cfg.data == str(data)


def test_flags_override_the_config_file_which_overrides_defaults(in_tmp):
    data = make_image_folder(in_tmp / "data")
    (in_tmp / "autoft.yaml").write_text(yaml.safe_dump({"data": str(data), "epochs": 2, "batch_size": 4}))
    assert main(["train", "--out", "run", "--epochs", "1", *TINY[:2], "--image-size", "32", "--device", "cpu"]) == 0
    cfg = Config.from_yaml(in_tmp / "run" / "config.yaml")
    assert cfg.epochs == 1 and cfg.batch_size == 4 and cfg.image_size == 32


def test_full_retrains_on_train_plus_val(in_tmp):
    data = make_image_folder(in_tmp / "data")
    assert main(["train", "--data", str(data), "--out", "run", "--epochs", "2", "--full", *TINY]) == 0
    metrics = json.loads((in_tmp / "run" / "metrics.json").read_text())
    assert metrics["full"] is True and metrics["saved_epoch"] == 2 and metrics["best_val_accuracy"] is None
    assert metrics["shipped"] == "one model at epoch 2 (nothing validated)"


@pytest.mark.slow
def test_best_yaml_round_trips_into_train(in_tmp, capsys):
    data = make_image_folder(in_tmp / "data")
    assert main(["search", "--data", str(data), "--trials", "2", "--epochs", "2", "--sampler", "random", *TINY]) == 0
    best_yaml = in_tmp / "studies" / "autoft" / "best.yaml"
    exported = Config.from_yaml(best_yaml)
    assert main(["train", "--config", str(best_yaml), "--out", "again"]) == 0
    assert Config.from_yaml(in_tmp / "again" / "config.yaml") == exported
    capsys.readouterr()
    assert main(["best", "--study", "autoft"]) == 0
    printed = capsys.readouterr().out
    assert Config.from_dict(yaml.safe_load(printed)) == exported


def test_errors_are_one_line_and_exit_2(in_tmp, capsys):
    assert main(["train", "--data", str(in_tmp / "nope")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("autoft: error:") and "nope" in err and "\n" not in err
    assert main(["train", "--epochs", "many"]) == 2
    assert "epochs" in capsys.readouterr().err
    assert main(["search", "--backbone", "nonesuch", "--trials", "1"]) == 2
    assert "unknown backbone" in capsys.readouterr().err
    assert not (in_tmp / "studies" / "autoft.db").exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_dashboard_serves_the_study_and_stops_cleanly(in_tmp):
    data = make_image_folder(in_tmp / "data")
    assert main(["search", "--data", str(data), "--trials", "1", "--epochs", "1", "--study", "dash", *TINY]) == 0
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "autoft.cli", "dashboard", "--study", "dash", "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONFAULTHANDLER": "1"},
    )
    try:
        body = None
        for _ in range(100):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=2) as r:
                    body = json.loads(r.read())
                break
            except OSError:
                time.sleep(0.2)
        assert body is not None, "dashboard did not answer"
        assert [s["study_name"] for s in body["study_summaries"]] == ["dash"]
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            out, _ = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGABRT)
            out, _ = proc.communicate(timeout=20)
            raise AssertionError(out[:6000])
    assert proc.returncode == 0
    assert f"http://127.0.0.1:{port}/dashboard/studies/" in out


@pytest.mark.slow
def test_ctrl_c_keeps_finished_trials_and_a_valid_best_yaml(in_tmp):
    data = make_image_folder(in_tmp / "data", per_class=40)
    cmd = [
        sys.executable,
        "-m",
        "autoft.cli",
        "search",
        "--data",
        str(data),
        "--trials",
        "50",
        "--epochs",
        "4",
        "--sampler",
        "random",
        "--pruner",
        "none",
        *TINY,
    ]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"}
    )
    best_yaml = in_tmp / "studies" / "autoft" / "best.yaml"
    deadline = time.time() + 120
    while not best_yaml.exists() and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(0.5)  # now inside a later trial
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, out

    study = optuna.load_study(study_name="autoft", storage="sqlite:///studies/autoft.db")
    states = [t.state.name for t in study.trials]
    assert "COMPLETE" in states and "RUNNING" not in states and len(states) < 50
    cfg = Config.from_yaml(best_yaml)
    assert cfg.backbone == "tiny_cnn"
    assert yaml.safe_load(best_yaml.read_text())["result"]["trial"] in [
        t.number for t in study.trials if t.state.name == "COMPLETE"
    ]


def test_quiet_works_before_and_after_the_command(in_tmp, capsys):
    from autoft.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["-q", "search"]).quiet and parser.parse_args(["search", "-q"]).quiet
    assert parser.parse_args(["train", "--quiet"]).quiet and not parser.parse_args(["search"]).quiet
    data = make_image_folder(in_tmp / "data")
    assert main(["train", "--data", str(data), "--out", "run", "--epochs", "1", *TINY, "-q"]) == 0
    assert capsys.readouterr().err == ""


def test_help_gives_every_config_key_its_meaning_choices_and_default(capsys):
    import dataclasses

    assert [f.name for f in dataclasses.fields(Config) if not f.metadata.get("help")] == []
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--optimizer {sgd,adam,adamw} optimizer: sgd, adam, adamw (default: adamw)" in text
    assert "--head-lr HEAD_LR learning rate of the new head (default: 0.01)" in text
    assert "--skip-bad-images, --no-skip-bad-images" in text
    with pytest.raises(SystemExit):
        main(["dashboard", "--help"])
    assert "--port PORT port (default: 8080)" in " ".join(capsys.readouterr().out.split())


def test_skip_bad_images_from_a_file_can_be_turned_off(in_tmp):
    from autoft.cli import build_parser, resolve_config

    (in_tmp / "autoft.yaml").write_text("skip_bad_images: true\n")
    resolved = {
        args: resolve_config(build_parser().parse_args(["train", *args]))[0].skip_bad_images
        for args in [(), ("--no-skip-bad-images",), ("--skip-bad-images",)]
    }
    assert resolved == {(): True, ("--no-skip-bad-images",): False, ("--skip-bad-images",): True}


def test_search_settings_take_numbers_as_people_write_them(in_tmp):
    from autoft.cli import build_parser, search_args

    (in_tmp / "autoft.yaml").write_text("search: {trials: 1e1, timeout: 1_800, startup_trials: '2'}\n")
    args = build_parser().parse_args(["search", "--min-epochs", "2.0", "--workers", "+2"])
    opts = search_args(args)[1]
    assert (opts.trials, opts.timeout, opts.startup_trials, opts.min_epochs, opts.workers) == (10, 1800.0, 2, 2, 2)
    args = build_parser().parse_args(["search", "--timeout", "none", "--trials", "3"])
    assert search_args(args)[1].timeout is None


@pytest.mark.slow
def test_random_init_backbone_retrains_to_the_trials_result(in_tmp):
    """`--weights random`: retraining a trial's exported config (in a fresh process: nothing built yet, the global
    RNG anywhere) gives that trial's learning curve exactly, body and head alike."""
    import torch

    from autoft.training.run import train

    data = make_image_folder(in_tmp / "data")
    assert (
        main(
            [
                "-q",
                "search",
                "--data",
                str(data),
                "--trials",
                "2",
                "--epochs",
                "2",
                "--weights",
                "random",
                "--sampler",
                "random",
                "--pruner",
                "none",
                *TINY,
            ]
        )
        == 0
    )
    trial = optuna.load_study(study_name="autoft", storage="sqlite:///studies/autoft.db").trials[1]
    torch.manual_seed(12345)  # train() builds its backbone afresh, as a new process would
    metrics = train(Config.from_dict(trial.user_attrs["config"]), "again")
    assert [h["val_loss"] for h in metrics["history"]] == [h["val_loss"] for h in trial.user_attrs["history"]]


@pytest.mark.slow
def test_a_searched_key_set_on_the_command_line_is_not_searched(in_tmp, capsys):
    data = make_image_folder(in_tmp / "data")
    args = [
        "search",
        "--data",
        str(data),
        "--trials",
        "5",
        "--epochs",
        "1",
        "--freeze-depth",
        "2",
        "--study",
        "fix",
        "--backbone",
        "tiny_cnn",
        "--batch-size",
        "8",
        "--device",
        "cpu",
    ]
    assert main(args) == 0
    study = optuna.load_study(study_name="fix", storage=make_storage("sqlite:///studies/autoft.db"))
    assert [t.user_attrs["config"]["freeze_depth"] for t in study.trials] == [2] * 5  # the probe's "stages" too
    assert all("freeze_depth" not in t.params and "head_lr" in t.params for t in study.trials)
    assert len({t.params["head_lr"] for t in study.trials}) > 1  # the rest is searched
    assert "not searched, as you set them: freeze_depth=2" in capsys.readouterr().err
