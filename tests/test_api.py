"""The notebook API, run the way a user runs it: a Python script in a fresh interpreter."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
from conftest import make_image_folder

import autoft
from autoft.exceptions import ConfigError

SCRIPT = textwrap.dedent("""
    import json
    import autoft

    cfg = autoft.Config(data="data", backbone="tiny_cnn", image_size=32, batch_size=8, epochs=6, head_lr=0.05,
                        base_lr=0.02, device="cpu", aug_strength=0.2)
    metrics = autoft.train(cfg, out="run")
    model = autoft.load_model("run/model.pt", device="cpu")
    images = ["data/val/cat/000.png", "data/val/dog/000.png"]
    study = autoft.search(cfg, trials=2, epochs=1, study="api", progress=False)
    retrained = autoft.train("studies/api/best.yaml", out="again", epochs=1)
    print(json.dumps({"learned": metrics["best_val_accuracy"] >= 0.9, "predicted": model.predict(images),
                      "top": model.top_k(images[0], k=2)[0][0][0], "trials": len(study.trials),
                      "best_exported": bool(study.best_trial.user_attrs["config"]),
                      "retrained_epochs": len(retrained["history"])}))
""")


@pytest.mark.slow
def test_api_calls_work_in_a_script(tmp_path):
    make_image_folder(tmp_path / "data")
    (tmp_path / "use_autoft.py").write_text(SCRIPT)
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}  # AUTOFT_CACHE is the test's own (conftest)
    proc = subprocess.run(
        [sys.executable, "use_autoft.py"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == {
        "learned": True,
        "predicted": ["cat", "dog"],
        "top": "cat",
        "trials": 2,
        "best_exported": True,
        "retrained_epochs": 1,
    }
    assert (tmp_path / "studies" / "api" / "best.pt").is_file() and (tmp_path / "run" / "model.pt").is_file()


def test_search_rejects_an_unknown_setting():
    with pytest.raises(ConfigError, match="unknown setting 'trails'"):
        autoft.search(trails=3)


def test_public_names_are_few_and_exist():
    assert {"search", "train", "load_model", "Config", "Predictor"} <= set(autoft.__all__)
    assert all(hasattr(autoft, name) for name in autoft.__all__)


QUIET_SCRIPT = textwrap.dedent("""
    import optuna
    import autoft

    cfg = autoft.Config(data="data", backbone="tiny_cnn", image_size=32, batch_size=8, epochs=1, device="cpu")
    autoft.train(cfg, out="run")
    autoft.search(cfg, trials=2, study="quiet")
    print("done, optuna verbosity", optuna.logging.get_verbosity())  # the user's own setting is back
""")


@pytest.mark.slow
def test_api_prints_no_optuna_lines_or_blank_lines(tmp_path):
    """A script's output is the summary (stdout) and the progress bar (stderr): no Optuna INFO lines, no blank lines."""
    make_image_folder(tmp_path / "data")
    (tmp_path / "quiet.py").write_text(QUIET_SCRIPT)
    proc = subprocess.run([sys.executable, "quiet.py"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.replace("\r", "\n").splitlines() if line.strip()]
    assert all(line.startswith("trials") for line in lines), proc.stderr  # the bar only
    assert "" not in proc.stdout.splitlines(), proc.stdout
    assert proc.stdout.startswith("study quiet: 2 trials this run") and proc.stdout.endswith(
        "done, optuna verbosity 20\n"
    )
