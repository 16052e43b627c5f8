import csv

import optuna
import pytest
import torch
import yaml
from optuna.trial import TrialState

from autoft.checkpoint import load_checkpoint
from autoft.config import Config
from autoft.exceptions import ConfigError
from autoft.space import SearchSpace
from autoft.objective import trial_seed
from autoft.records import best_trial
from autoft.study import SearchOptions, open_study, run_search


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _opts(**kw):
    return SearchOptions(**{"trials": 4, "progress": False, "sampler": "random", **kw})


def test_four_trial_search_writes_all_exports(in_tmp, tiny_config):
    study = run_search(tiny_config, _opts())
    trials = study.get_trials()
    assert len(trials) == 4 and all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)
    assert study.metric_names == ["val_accuracy"]
    out = in_tmp / "studies" / "autoft"
    best = best_trial(study)
    doc = yaml.safe_load((out / "best.yaml").read_text())
    assert doc["result"]["trial"] == best.number and doc["result"]["val_accuracy"] == best.value
    assert Config.from_yaml(out / "best.yaml") == Config.from_dict(best.user_attrs["config"])
    ckpt = load_checkpoint(out / "best.pt")
    assert ckpt["classes"] == ["cat", "dog"] and ckpt["metrics"]["trial"] == best.number
    rows = list(csv.DictReader((out / "trials.csv").open()))
    assert [int(r["number"]) for r in rows] == [0, 1, 2, 3]
    assert {"freeze_depth", "head_lr", "base_lr", "t_max", "aug_strength"} <= set(rows[0])
    attrs = best.user_attrs
    assert len(attrs["history"]) == tiny_config.epochs and attrs["device"] == "cpu"
    assert attrs["wall_time_s"] > 0 and attrs["images_per_s"] > 0 and attrs["peak_memory_mb"] > 0
    artifact = attrs["weights_artifact_id"]
    assert (in_tmp / "studies" / "artifacts" / artifact).is_file()


def test_hand_recipe_runs_first(in_tmp, tiny_config):
    study = run_search(tiny_config, _opts(trials=1))
    first = study.trials[0]
    assert first.user_attrs["hand_recipe"] is True
    assert first.params == SearchSpace.default(3, tiny_config.epochs).hand_recipe()
    assert first.user_attrs["config"]["seed"] == trial_seed(tiny_config.seed, 0)


def test_clearly_bad_trial_is_pruned(in_tmp, tiny_config):
    (in_tmp / "space.yaml").write_text("head_lr: {low: 1.0e-4, high: 10}\nbase_lr: {low: 1.0e-5, high: 10}\n")
    opts = _opts(trials=3, pruner="median", startup_trials=2, space="space.yaml")
    cfg = tiny_config.replace(epochs=4)
    space = SearchSpace.from_yaml(opts.space, 3, cfg.epochs)
    study = open_study(cfg, opts, space, cfg.seed)
    good = {**space.hand_recipe(), "head_lr": 0.05, "base_lr": 0.01, "aug_strength": 0.0}
    study.enqueue_trial(good)
    study.enqueue_trial({**good, "head_lr": 10.0, "base_lr": 10.0, "optimizer": "sgd", "weight_decay": 1e-6})
    study = run_search(cfg, opts)
    absurd = study.trials[2]
    assert absurd.params["head_lr"] == 10.0
    assert absurd.state == TrialState.PRUNED
    assert "prune_reason" in absurd.user_attrs or "fail_reason" in absurd.user_attrs
    assert study.trials[0].state == study.trials[1].state == TrialState.COMPLETE


def test_second_run_resumes_and_adds_trials(in_tmp, tiny_config):
    first = run_search(tiny_config, _opts(trials=2))
    old_params = [t.params for t in first.trials]
    again = run_search(tiny_config, _opts(trials=2))
    assert len(again.trials) == 4
    assert sum(bool(t.user_attrs.get("hand_recipe")) for t in again.trials) == 1
    assert [t.params for t in again.trials[:2]] == old_params
    assert again.trials[3].params != old_params[1]  # the resumed sampler does not replay old points


def test_resume_with_a_different_space_is_refused(in_tmp, tiny_config):
    run_search(tiny_config, _opts(trials=1))
    (in_tmp / "space.yaml").write_text("optimizer: [sgd]\n")
    with pytest.raises(ConfigError, match="different search space"):
        run_search(tiny_config, _opts(trials=1, space="space.yaml"))
    study = optuna.load_study(study_name="autoft", storage="sqlite:///studies/autoft.db")
    assert len(study.trials) == 1


def test_invalid_space_errors_before_any_trial(in_tmp, tiny_config):
    (in_tmp / "space.yaml").write_text("freeze_depth: {low: 0, high: 7}\n")
    with pytest.raises(ConfigError, match="3 stages"):
        run_search(tiny_config, _opts(space="space.yaml"))
    assert not (in_tmp / "studies" / "autoft.db").exists()


def test_bad_data_stops_before_a_study_exists(in_tmp, tiny_config):
    from autoft.exceptions import DataError

    with pytest.raises(DataError):
        run_search(tiny_config.replace(data=str(in_tmp / "missing")), _opts())
    assert not (in_tmp / "studies" / "autoft.db").exists()


def test_best_is_accuracy_then_lower_val_loss():
    study = optuna.create_study(direction="maximize")
    for value, loss in [(0.9, 0.5), (0.9, 0.3), (0.8, 0.1)]:
        t = study.ask()
        t.set_user_attr("val_loss", loss)
        study.tell(t, value)
    assert best_trial(study).number == 1


def test_hyperband_is_the_default_and_guarded():
    from autoft.study import make_pruner, _Guarded

    pruner = make_pruner("hyperband", epochs=9, min_epochs=2, startup=3)
    assert isinstance(pruner, _Guarded) and isinstance(pruner.inner, optuna.pruners.HyperbandPruner)
    study = optuna.create_study(direction="maximize", pruner=pruner)
    t = study.ask()
    t.report(0.0, 1)
    assert not t.should_prune()  # before min_epochs, and before any trial has finished


def test_hand_recipe_is_run_again_if_its_trial_never_finished(in_tmp, tiny_config):
    space = SearchSpace.default(3, tiny_config.epochs)
    study = open_study(tiny_config, _opts(), space, tiny_config.seed)
    interrupted = study.ask()  # takes the enqueued hand recipe
    assert interrupted.user_attrs["hand_recipe"]
    study.tell(interrupted, state=TrialState.FAIL)
    study = run_search(tiny_config, _opts(trials=1))
    assert study.trials[1].user_attrs.get("hand_recipe") and study.trials[1].state == TrialState.COMPLETE
    assert study.trials[1].params == space.hand_recipe()


def test_a_trial_is_never_pruned_after_its_last_epoch(in_tmp, tiny_config, monkeypatch):
    import importlib

    from autoft.finetune import Result

    def fake_finetune(cfg, data, report):  # fake values: the good LR scores 0.9, the bad one 0.1, every epoch
        m = {"epoch": 1, "train_loss": 1.0, "val_loss": 1.0, "val_accuracy": 0.9 if cfg.head_lr > 1e-3 else 0.1,
             "images_per_s": 1.0}
        for epoch in range(cfg.epochs):
            report(epoch, {**m, "epoch": epoch + 1})
        return Result(m, m, [m], {}, data.classes, cfg, "cpu", 0.1, 1.0)

    monkeypatch.setattr(importlib.import_module("autoft.objective"), "finetune", fake_finetune)
    monkeypatch.setattr(importlib.import_module("autoft.exports").Exporter, "export_weights", lambda *a: None)
    opts = _opts(trials=3, pruner="median", startup_trials=1)
    cfg = tiny_config.replace(epochs=2)
    study = open_study(cfg, opts, SearchSpace.default(3, 2), cfg.seed)
    bad = {"head_lr": 1e-4, "base_lr": 1e-5}
    study.enqueue_trial({**bad, "t_max": 1})
    study.enqueue_trial({**bad, "t_max": 2})
    study = run_search(cfg.replace(epochs=2), opts)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE, TrialState.PRUNED, TrialState.PRUNED]
    assert [len(t.user_attrs["history"]) for t in study.trials[1:]] == [1, 1]  # pruned after epoch 1 of 2

    one = _opts(trials=2, pruner="median", startup_trials=1, study="one")
    cfg1 = cfg.replace(epochs=1)
    open_study(cfg1, one, SearchSpace.default(3, 1), cfg.seed).enqueue_trial({**bad, "t_max": 1})
    study = run_search(cfg1, one)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE, TrialState.COMPLETE]  # its only epoch was its last
