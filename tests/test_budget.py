"""A budget is a promise: fold racing stops losers early, kept weights mean nothing trains twice, the deadline holds."""

import importlib

import numpy as np
import pytest
import torch
from optuna.trial import TrialState

from autoft import records
from autoft.checkpoint import load_checkpoint
from autoft.racing import ALPHA, race
from autoft.study import SearchOptions, run_search


def _opts(**kw):
    return SearchOptions(**{"trials": 3, "progress": False, "sampler": "random", **kw})


# --- fold racing -----------------------------------------------------------------------------------------------

def test_a_trial_behind_beyond_noise_after_one_fold_is_stopped():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 10, 120)  # one fold of 600 images
    theirs = np.where(rng.random(120) < 0.9, y, (y + 1) % 10)  # the leader: 90 %
    mine = np.where(rng.random(120) < 0.6, y, (y + 2) % 10)  # 60 %
    for metric in ("accuracy", "balanced_accuracy", "f1_macro"):
        v = race(metric, y, mine, theirs, 10, folds=5)
        assert v.stop and v.mine < v.theirs and v.threshold == pytest.approx(ALPHA / 4), metric


@pytest.mark.parametrize("metric", ["accuracy", "balanced_accuracy"])
def test_a_trial_as_good_as_the_leader_is_rarely_stopped_over_the_whole_race(metric):
    """Simulated: two trials of the same true accuracy (80 %), errors independent; the race looks after folds 1-4 of
    5 on the images seen so far. The false-stop rate over the whole race stays within ALPHA (plus sampling noise)."""
    rng = np.random.default_rng(1)
    sims, stops = 200 if metric == "accuracy" else 60, 0
    for _ in range(sims):
        y = rng.integers(0, 5, 600)
        a = np.where(rng.random(600) < 0.8, y, (y + 1) % 5)
        b = np.where(rng.random(600) < 0.8, y, (y + 1) % 5)
        stops += any(race(metric, y[:n], a[:n], b[:n], 5, folds=5).stop for n in (120, 240, 360, 480))
    assert stops / sims <= ALPHA + 2 * np.sqrt(ALPHA * (1 - ALPHA) / sims)


def test_a_trial_within_noise_is_never_stopped():
    rng = np.random.default_rng(2)
    y = rng.integers(0, 10, 240)
    theirs = np.where(rng.random(240) < 0.85, y, (y + 1) % 10)
    mine = theirs.copy()
    mine[:4] = (y[:4] + 3) % 10  # four images worse: well within noise of 240
    assert not race("accuracy", y, mine, theirs, 10, folds=5).stop


def test_the_race_prunes_a_losing_trial_after_its_first_folds(tmp_path, tiny_config, monkeypatch):
    from autoft.finetune import Partial, Result

    def fake_finetune(cfg, data, report, cache=None, race=None, on_batch=None):  # fake scores, no training
        good = cfg.freeze_depth == 3  # the probe: right on every image; the others right on half of them
        labels = data.labelled.labels.numpy()
        folds = 5
        for f in range(folds):
            m = {"fold": f + 1, "epoch": 1, "train_loss": 1.0, "val_loss": 0.1, "val_accuracy": 1.0 if good else 0.5,
                 "images_per_s": 1.0, "epoch_time_s": 0.1}
            report(f * cfg.epochs, m)
            if race is not None and f + 1 < folds:
                n = (f + 1) * len(labels) // folds
                index = np.arange(n)
                right = np.ones(n, bool) if good else np.arange(n) % 2 == 0
                pred = np.where(right, labels[index], 1 - labels[index])
                race(Partial(f + 1, folds, index, np.log(np.eye(2)[pred] * 0.98 + 0.01), labels[index], 0.0, 1))
        oof = np.eye(2, dtype=np.float32)[labels] * 0.98 + 0.01
        m = {"epoch": 1, "train_loss": 1.0, "val_loss": 0.1, "val_accuracy": 1.0, "images_per_s": 1.0,
             "epoch_time_s": 0.1, "fold_scores": [1.0] * 5, "tau": 0.0}
        return Result(m, m, [m], [{}], 0, data.classes, cfg, "cpu", 0.1, 1.0, validated=len(labels), oof=oof,
                      fold=np.arange(len(labels)) % 5, prior=[0.5, 0.5])

    monkeypatch.setattr(importlib.import_module("autoft.objective"), "finetune", fake_finetune)
    monkeypatch.setattr(importlib.import_module("autoft.exports").Exporter, "keep_weights", lambda *a: None)
    monkeypatch.setattr(importlib.import_module("autoft.exports").Exporter, "shipped", lambda *a: None)
    monkeypatch.chdir(tmp_path)
    study = run_search(tiny_config.replace(epochs=1), _opts(trials=2, pruner="median", startup_trials=5))
    probe, loser = study.trials
    assert probe.state == TrialState.COMPLETE
    assert loser.state == TrialState.PRUNED and loser.user_attrs["prune_reason"].startswith("fold racing: after")
    looks = loser.user_attrs[records.RACE]
    assert looks[-1]["leader"] == probe.number and looks[-1]["folds"] <= 2  # stopped after one or two folds


# --- kept weights: nothing trains twice -------------------------------------------------------------------------

def _weights_files(artifacts):
    """The checkpoints among the artifacts (the rest are out-of-fold .npz files and learning-curve PNGs)."""
    out = []
    for p in artifacts.iterdir():
        try:
            load_checkpoint(p)
        except Exception:
            continue
        out.append(p)
    return out


def test_the_artifact_folder_holds_the_kept_set_and_the_final_export_trains_nothing(tmp_path, tiny_config,
                                                                                  monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(records, "KEEP", 1)  # the winner and the best by value: at most two trials' models
    study = run_search(tiny_config.replace(epochs=2), _opts(trials=4, pruner="none"))
    artifacts = tmp_path / "studies" / "artifacts"
    done = records.completed(study)
    assert len(done) == 4
    kept = records.kept_set([records.Candidate.of(t) for t in done])
    files = _weights_files(artifacts)
    assert 1 <= len(files) <= len(kept) <= 2
    # the final export again, with training forbidden: it assembles best.pt from the kept models
    exports = importlib.import_module("autoft.exports")

    def no_training(*a, **k):
        raise AssertionError("the final export trained")

    monkeypatch.setattr(exports, "finetune", no_training)
    monkeypatch.setattr(exports, "refit", no_training)
    (tmp_path / "studies" / "autoft" / "best.pt").unlink()
    from autoft.cache import RunCache

    best = exports.Exporter(tmp_path / "studies" / "autoft", str(artifacts), RunCache()).export(study, final=True)
    shipped = load_checkpoint(tmp_path / "studies" / "autoft" / "best.pt")
    mine = exports.Exporter(tmp_path / "studies" / "autoft", str(artifacts), RunCache()).kept_checkpoint(best)
    if shipped["metrics"].get("final") != "trials":  # the winner alone: exactly its validated models
        assert all(torch.equal(shipped["state_dict"][k], v) for k, v in mine["state_dict"].items())


def test_a_winner_whose_kept_models_were_deleted_is_trained_again_and_said(tmp_path, tiny_config, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    study = run_search(tiny_config.replace(epochs=1), _opts(trials=2, pruner="none"))
    artifacts = tmp_path / "studies" / "artifacts"
    for p in _weights_files(artifacts):
        p.unlink()
    (tmp_path / "studies" / "autoft" / "best.pt").unlink()
    from autoft.cache import RunCache
    from autoft.exports import Exporter

    with caplog.at_level("WARNING", logger="autoft"):
        Exporter(tmp_path / "studies" / "autoft", str(artifacts), RunCache()).export(study, final=True)
    assert "are not in" in caplog.text and (tmp_path / "studies" / "autoft" / "best.pt").is_file()


# --- the deadline ---------------------------------------------------------------------------------------------

class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def _train_on_the_clock(monkeypatch, tmp_path, clock: FakeClock, fake_finetune) -> None:
    """Trials run `fake_finetune` and read `clock`; kept weights and the final export are skipped, 5 s reserved."""
    exports = importlib.import_module("autoft.exports")
    objective_mod = importlib.import_module("autoft.objective")
    monkeypatch.setattr(objective_mod.Objective, "clock", staticmethod(clock))
    monkeypatch.setattr(objective_mod, "finetune", fake_finetune)
    monkeypatch.setattr(exports.Exporter, "keep_weights", lambda *a: None)
    monkeypatch.setattr(exports.Exporter, "shipped", lambda *a: None)
    monkeypatch.setattr(exports, "RESERVE_S", 5.0)
    monkeypatch.chdir(tmp_path)


def test_the_deadline_holds_with_a_trial_in_flight(tmp_path, tiny_config, monkeypatch):
    """Every fold-epoch costs 10 fake seconds; a 95 s budget: the trial running when the next step would not fit is
    stopped at that boundary (pruned, its steps kept), no trial starts after, and the exports are written."""
    from autoft.finetune import Result

    clock = FakeClock()
    study_mod = importlib.import_module("autoft.study")

    def fake_finetune(cfg, data, report, cache=None, race=None, on_batch=None):
        steps = 5 * cfg.epochs
        for s in range(steps):
            clock.now += 10.0
            report(s, {"fold": s // cfg.epochs + 1, "epoch": s % cfg.epochs + 1, "train_loss": 1.0, "val_loss": 0.5,
                       "val_accuracy": 0.8, "images_per_s": 1.0, "epoch_time_s": 10.0})
        m = {"epoch": cfg.epochs, "train_loss": 1.0, "val_loss": 0.5, "val_accuracy": 0.8, "images_per_s": 1.0,
             "epoch_time_s": 10.0 * steps}
        return Result(m, m, [m], [{}], 0, data.classes, cfg, "cpu", 10.0 * steps, 1.0, validated=36)

    _train_on_the_clock(monkeypatch, tmp_path, clock, fake_finetune)
    study = run_search(tiny_config.replace(epochs=1), _opts(trials=10, pruner="none", timeout=95, started=clock.now))
    states = [t.state for t in study.trials]
    assert states[0] == TrialState.COMPLETE  # 50 s
    assert states[-1] == TrialState.PRUNED and "time budget" in study.trials[-1].user_attrs["prune_reason"]
    assert len(states) == 2 and clock.now <= 1000.0 + 95  # the second stopped in flight, none started after
    assert len(records.steps(study.trials[-1])) == 4  # what it has is kept
    assert study_mod is not None and (tmp_path / "studies" / "autoft" / "trials.csv").is_file()


def test_a_trial_the_deadline_reaches_in_its_last_fold_completes_on_what_it_has(tmp_path, tiny_config, monkeypatch):
    """10 fake seconds a fold-epoch, 2 epochs, a 200 s budget: the second trial reaches the deadline after epoch 1
    of its last fold. Every fold has been validated that far, so it completes (not pruned) with what it has."""
    from autoft.finetune import Result

    clock = FakeClock()
    asked = []

    def fake_finetune(cfg, data, report, cache=None, race=None, on_batch=None):
        for s in range(5 * cfg.epochs):
            clock.now += 10.0
            fold, epoch = s // cfg.epochs + 1, s % cfg.epochs + 1
            stop = report(s, {"fold": fold, "epoch": epoch, "train_loss": 1.0, "val_loss": 0.5, "val_accuracy": 0.8,
                              "images_per_s": 1.0, "epoch_time_s": 10.0})
            asked.append(stop)
            if stop and fold == 5:
                break
        m = {"epoch": 1, "train_loss": 1.0, "val_loss": 0.5, "val_accuracy": 0.8, "images_per_s": 1.0,
             "epoch_time_s": 10.0}
        return Result(m, m, [m], [{}], 0, data.classes, cfg, "cpu", 10.0, 1.0, validated=36)

    _train_on_the_clock(monkeypatch, tmp_path, clock, fake_finetune)
    study = run_search(tiny_config.replace(epochs=2), _opts(trials=10, pruner="none", timeout=200, started=clock.now))
    assert [t.state for t in study.trials] == [TrialState.COMPLETE, TrialState.COMPLETE]
    assert len(records.steps(study.trials[1])) == 9 and asked[-1] is True and not any(asked[:-1])
    assert clock.now <= 1000.0 + 200
