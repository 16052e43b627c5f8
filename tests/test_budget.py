"""A budget is a promise: fold racing stops losers early, kept weights mean nothing trains twice, the deadline holds."""

import importlib

import numpy as np
import optuna
import pytest
import torch
from optuna.trial import TrialState

from autoft.results import records
from autoft.study.racing import ALPHA, race
from autoft.study.run import SearchOptions, run_search
from autoft.training.checkpoint import load_checkpoint


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
        assert v.behind and v.stop and v.mine < v.theirs and v.threshold == pytest.approx(ALPHA / 4), metric


@pytest.mark.slow
@pytest.mark.parametrize("metric", ["accuracy", "balanced_accuracy"])
def test_a_trial_as_good_as_the_leader_is_rarely_found_behind_over_the_whole_race(metric):
    """Simulated: two trials of the same true accuracy (80 %), errors independent; the race looks after folds 1-4 of
    5 on the images seen so far. The rate at which the first rule ("behind") stops it over the whole race stays
    within ALPHA (plus sampling noise); the second ("cannot win") is simulated in tests/test_racing.py."""
    rng = np.random.default_rng(1)
    sims, stops = 200 if metric == "accuracy" else 60, 0
    for _ in range(sims):
        y = rng.integers(0, 5, 600)
        a = np.where(rng.random(600) < 0.8, y, (y + 1) % 5)
        b = np.where(rng.random(600) < 0.8, y, (y + 1) % 5)
        stops += any(race(metric, y[:n], a[:n], b[:n], 5, folds=5).behind for n in (120, 240, 360, 480))
    assert stops / sims <= ALPHA + 2 * np.sqrt(ALPHA * (1 - ALPHA) / sims)


def test_a_trial_within_noise_is_never_found_behind():
    rng = np.random.default_rng(2)
    y = rng.integers(0, 10, 240)
    theirs = np.where(rng.random(240) < 0.85, y, (y + 1) % 10)
    mine = theirs.copy()
    mine[:4] = (y[:4] + 3) % 10  # four images worse: well within noise of 240
    assert not race("accuracy", y, mine, theirs, 10, folds=5).behind


def test_the_race_prunes_a_losing_trial_after_its_first_folds(tmp_path, tiny_config, monkeypatch):
    from autoft.training.loop import Partial, Result

    def fake_finetune(cfg, data, report, cache=None, race=None, on_batch=None):  # fake scores, no training
        good = cfg.freeze_depth == 3  # the probe: right on every image; the others right on half of them
        labels = data.labelled.labels.numpy()
        folds = 5
        for f in range(folds):
            m = {
                "fold": f + 1,
                "epoch": 1,
                "train_loss": 1.0,
                "val_loss": 0.1,
                "val_accuracy": 1.0 if good else 0.5,
                "images_per_s": 1.0,
                "epoch_time_s": 0.1,
            }
            report(f * cfg.epochs, m)
            if race is not None and f + 1 < folds:
                n = (f + 1) * len(labels) // folds
                index = np.arange(n)
                right = np.ones(n, bool) if good else np.arange(n) % 2 == 0
                pred = np.where(right, labels[index], 1 - labels[index])
                race(Partial(f + 1, folds, index, np.log(np.eye(2)[pred] * 0.98 + 0.01), labels[index], 0.0, 1))
        oof = np.eye(2, dtype=np.float32)[labels] * 0.98 + 0.01
        m = {
            "epoch": 1,
            "train_loss": 1.0,
            "val_loss": 0.1,
            "val_accuracy": 1.0,
            "images_per_s": 1.0,
            "epoch_time_s": 0.1,
            "fold_scores": [1.0] * 5,
            "tau": 0.0,
        }
        return Result(
            m,
            m,
            [m],
            [{}],
            0,
            data.classes,
            cfg,
            "cpu",
            0.1,
            1.0,
            validated=len(labels),
            oof=oof,
            fold=np.arange(len(labels)) % 5,
            prior=[0.5, 0.5],
        )

    monkeypatch.setattr(importlib.import_module("autoft.study.objective"), "finetune", fake_finetune)
    monkeypatch.setattr(importlib.import_module("autoft.results.exports").Exporter, "keep_weights", lambda *a: None)
    monkeypatch.setattr(importlib.import_module("autoft.results.exports").Exporter, "shipped", lambda *a: None)
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


@pytest.mark.slow
def test_the_artifact_folder_holds_the_kept_set_and_the_final_export_trains_nothing(tmp_path, tiny_config, monkeypatch):
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
    exports, finals = (
        importlib.import_module("autoft.results.exports"),
        importlib.import_module("autoft.training.finals"),
    )

    def no_training(*a, **k):
        raise AssertionError("the final export trained")

    monkeypatch.setattr(finals, "finetune", no_training)  # the finals own all training an export may ask for
    monkeypatch.setattr(finals, "refit", no_training)
    (tmp_path / "studies" / "autoft" / "best.pt").unlink()
    from autoft.cache import RunCache

    best = exports.Exporter(tmp_path / "studies" / "autoft", str(artifacts), RunCache()).export(study, final=True)
    shipped = load_checkpoint(tmp_path / "studies" / "autoft" / "best.pt")
    mine = exports.Exporter(tmp_path / "studies" / "autoft", str(artifacts), RunCache()).kept_checkpoint(best)
    if shipped["metrics"].get("final") != "trials":  # the winner alone: exactly its validated models
        assert all(torch.equal(shipped["state_dict"][k], v) for k, v in mine["state_dict"].items())


@pytest.mark.slow
def test_a_winner_whose_kept_models_were_deleted_is_trained_again_and_said(tmp_path, tiny_config, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    study = run_search(tiny_config.replace(epochs=1), _opts(trials=2, pruner="none"))
    artifacts = tmp_path / "studies" / "artifacts"
    for p in _weights_files(artifacts):
        p.unlink()
    (tmp_path / "studies" / "autoft" / "best.pt").unlink()
    from autoft.cache import RunCache
    from autoft.results.exports import Exporter

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
    exports = importlib.import_module("autoft.results.exports")
    objective_mod = importlib.import_module("autoft.study.objective")
    monkeypatch.setattr(objective_mod.Objective, "clock", staticmethod(clock))
    monkeypatch.setattr(objective_mod, "finetune", fake_finetune)
    monkeypatch.setattr(exports.Exporter, "keep_weights", lambda *a: None)
    monkeypatch.setattr(exports.Exporter, "shipped", lambda *a: None)
    monkeypatch.setattr(exports, "RESERVE_S", 5.0)
    monkeypatch.chdir(tmp_path)


def test_the_deadline_holds_with_a_trial_in_flight(tmp_path, tiny_config, monkeypatch):
    """Every fold-epoch costs 10 fake seconds; a 95 s budget: the trial running when the next step would not fit is
    stopped at that boundary (pruned, its steps kept), no trial starts after, and the exports are written."""
    from autoft.training.loop import Result

    clock = FakeClock()
    study_mod = importlib.import_module("autoft.study.run")

    def fake_finetune(cfg, data, report, cache=None, race=None, on_batch=None):
        steps = 5 * cfg.epochs
        for s in range(steps):
            clock.now += 10.0
            report(
                s,
                {
                    "fold": s // cfg.epochs + 1,
                    "epoch": s % cfg.epochs + 1,
                    "train_loss": 1.0,
                    "val_loss": 0.5,
                    "val_accuracy": 0.8,
                    "images_per_s": 1.0,
                    "epoch_time_s": 10.0,
                },
            )
        m = {
            "epoch": cfg.epochs,
            "train_loss": 1.0,
            "val_loss": 0.5,
            "val_accuracy": 0.8,
            "images_per_s": 1.0,
            "epoch_time_s": 10.0 * steps,
        }
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
    from autoft.training.loop import Result

    clock = FakeClock()
    asked = []

    def fake_finetune(cfg, data, report, cache=None, race=None, on_batch=None):
        for s in range(5 * cfg.epochs):
            clock.now += 10.0
            fold, epoch = s // cfg.epochs + 1, s % cfg.epochs + 1
            stop = report(
                s,
                {
                    "fold": fold,
                    "epoch": epoch,
                    "train_loss": 1.0,
                    "val_loss": 0.5,
                    "val_accuracy": 0.8,
                    "images_per_s": 1.0,
                    "epoch_time_s": 10.0,
                },
            )
            asked.append(stop)
            if stop and fold == 5:
                break
        m = {
            "epoch": 1,
            "train_loss": 1.0,
            "val_loss": 0.5,
            "val_accuracy": 0.8,
            "images_per_s": 1.0,
            "epoch_time_s": 10.0,
        }
        return Result(m, m, [m], [{}], 0, data.classes, cfg, "cpu", 10.0, 1.0, validated=36)

    _train_on_the_clock(monkeypatch, tmp_path, clock, fake_finetune)
    study = run_search(tiny_config.replace(epochs=2), _opts(trials=10, pruner="none", timeout=200, started=clock.now))
    assert [t.state for t in study.trials] == [TrialState.COMPLETE, TrialState.COMPLETE]
    assert len(records.steps(study.trials[1])) == 9 and asked[-1] is True and not any(asked[:-1])
    assert clock.now <= 1000.0 + 200


# --- evidence per second: through ask/tell, fake curves and costs ----------------------------------------------

FOLDS, EPOCHS, STEP_S = 5, 3, 10.0  # a fold-epoch costs 10 fake seconds


def _fold_of(n: int) -> np.ndarray:
    return np.arange(n) % FOLDS


def _fake_trainer(clock: FakeClock, plans: list[dict]):
    """finetune's stand-in: the i-th trial trained follows plans[i]: `right` (which labelled images its kept epoch
    gets right), `first` (its score at each fold's first epoch, rising linearly to the fold's final score), `exact`
    (a probe fitted in one step per fold). It reports every fold-epoch, races after each fold but the last on the
    images seen so far, and charges STEP_S per fold-epoch (a probe's fold: one)."""
    from autoft.training.loop import Partial, Result

    plans = iter(plans)

    def fake_finetune(cfg, data, report, cache=None, race=None, on_batch=None):
        plan = next(plans)
        labels = data.labelled.labels.numpy()
        fold = _fold_of(len(labels))
        pred = np.where(plan["right"], labels, 1 - labels)
        probs = (np.eye(2)[pred] * 0.9 + 0.05).astype(np.float32)
        for f in range(FOLDS):
            final = float(plan["right"][fold == f].mean())
            for e in range(1 if plan.get("exact") else cfg.epochs):
                clock.now += STEP_S
                score = (
                    final
                    if plan.get("exact")
                    else plan.get("first", final) + (final - plan.get("first", final)) * e / (cfg.epochs - 1)
                )
                report(
                    f * cfg.epochs + e,
                    {
                        "fold": f + 1,
                        "epoch": e + 1,
                        "train_loss": 1.0,
                        "val_loss": 0.3,
                        "val_accuracy": score,
                        "images_per_s": 1.0,
                        "epoch_time_s": STEP_S,
                        **({"exact_probe": True} if plan.get("exact") else {}),
                    },
                )
            if race is not None and f + 1 < FOLDS:
                seen = np.flatnonzero(fold <= f)
                race(Partial(f + 1, FOLDS, seen, np.log(probs[seen]), labels[seen], 0.0, cfg.epochs))
        m = {
            "epoch": cfg.epochs,
            "train_loss": 1.0,
            "val_loss": 0.3,
            "val_accuracy": float(plan["right"].mean()),
            "images_per_s": 1.0,
            "epoch_time_s": STEP_S,
            "tau": 0.0,
            "fold_scores": [float(plan["right"][fold == f].mean()) for f in range(FOLDS)],
        }
        return Result(
            m,
            m,
            [m],
            [{}],
            0,
            data.classes,
            cfg,
            "cpu",
            STEP_S,
            1.0,
            validated=len(labels),
            oof=probs,
            fold=fold,
            prior=[0.5, 0.5],
        )

    return fake_finetune


def _ask_tell(tmp_path, monkeypatch, plans: list[dict]) -> optuna.Study:
    """Each plan through the product's Objective by ask/tell, in a study with the product's pruner (successive
    halving behind the guard) and fold racing; every trial samples the same image size (so any two can mix)."""
    from conftest import make_image_folder

    from autoft.cache import RunCache
    from autoft.config import Config
    from autoft.study.pruning import make_pruner, make_sampler
    from autoft.study.run import _objective, search_space

    clock = FakeClock()
    _train_on_the_clock(monkeypatch, tmp_path, clock, _fake_trainer(clock, plans))
    monkeypatch.setattr(importlib.import_module("autoft.study.objective").dashboard, "publish_trial", lambda *a: None)
    data = make_image_folder(tmp_path / "data", per_class=100, splits=("train",), size=8)
    base = Config(data=str(data), backbone="tiny_cnn", image_size=32, epochs=EPOCHS, device="cpu")
    opts = _opts(out=str(tmp_path / "out"), artifacts=str(tmp_path / "artifacts"))
    cache = RunCache()
    base, space = search_space(base.portable(), opts, fixed=("image_size",))
    objective = _objective(base, opts, space, cache)
    images = objective.validated_images() // objective.folds()
    study = optuna.create_study(
        direction="maximize",
        sampler=make_sampler("random", 0),
        pruner=make_pruner("sha", EPOCHS, 1, 1, images, "accuracy", FOLDS),
    )
    for _ in plans:
        trial = study.ask()
        try:
            study.tell(trial, objective(trial))
        except optuna.TrialPruned:
            study.tell(trial, state=TrialState.PRUNED)
    return study


def _right(n: int, accuracy: float, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random(n) < accuracy


def _flip(right: np.ndarray, to: bool, folds: dict[int, int]) -> np.ndarray:
    """A copy of `right` with `folds[f]` images of fold f turned to `to` (right or wrong)."""
    out = right.copy()
    fold = _fold_of(len(right))
    for f, count in folds.items():
        out[np.flatnonzero((fold == f) & (right != to))[:count]] = to
    return out


def test_a_trial_that_cannot_win_beyond_noise_stops_after_one_or_two_folds(tmp_path, monkeypatch):
    """A near-tie of the leader (one image worse per fold): never significantly worse, so the race before this
    version paid all five folds for it; it cannot beat the leader by more than its standard error, so it stops."""
    leader = _right(200, 0.9)
    study = _ask_tell(tmp_path, monkeypatch, [{"right": leader}, {"right": _flip(leader, False, {0: 1, 1: 1, 2: 1})}])
    first, near = study.trials
    assert first.state == TrialState.COMPLETE and near.state == TrialState.PRUNED
    assert "cannot win" in near.user_attrs["prune_reason"], near.user_attrs["prune_reason"]
    looks = near.user_attrs[records.RACE]
    assert len(looks) <= 2 and all(look["p"] >= look["threshold"] for look in looks)  # never "behind"
    assert records.folds_run(near) <= 2 and near.user_attrs[records.WALL_TIME] <= 2 * EPOCHS * STEP_S


def test_a_trial_likely_to_win_runs_every_fold(tmp_path, monkeypatch):
    leader = _right(200, 0.85)
    better = _flip(leader, True, {f: 4 for f in range(FOLDS)})  # 0.95: well beyond noise ahead
    study = _ask_tell(tmp_path, monkeypatch, [{"right": leader}, {"right": better}])
    assert [t.state for t in study.trials] == [TrialState.COMPLETE, TrialState.COMPLETE]
    assert records.folds_run(study.trials[1]) == FOLDS
    assert all(look["p_win"] >= 0.05 for look in study.trials[1].user_attrs[records.RACE])


def test_a_near_tie_that_reaches_the_last_look_runs_its_last_fold(tmp_path, monkeypatch):
    """Ahead for three folds, then behind in the fourth: after it, it cannot win (p_win about 0) but is not behind,
    and the last fold costs a fifth of it: it completes (racing.finalist)."""
    leader = _right(200, 0.9)
    late = _flip(_flip(leader, True, {0: 2, 1: 2, 2: 2}), False, {3: 10})
    study = _ask_tell(tmp_path, monkeypatch, [{"right": leader}, {"right": late}])
    assert study.trials[1].state == TrialState.COMPLETE
    last = study.trials[1].user_attrs[records.RACE][-1]
    assert last["folds"] == FOLDS - 1 and last["p_win"] < 0.05 and last["p"] >= last["threshold"]


def test_one_near_tie_runs_on_for_the_ensemble_of_trials(tmp_path, monkeypatch):
    """Two near-ties that disagree with the leader (their average with it is right where the leader is wrong):
    the first runs every fold for the ensemble, the second does not (racing.MIX_RUNS = 1)."""
    leader = _right(200, 0.9)
    other = _flip(_flip(leader, True, {f: 2 for f in range(FOLDS)}), False, {f: 3 for f in range(FOLDS)})
    study = _ask_tell(tmp_path, monkeypatch, [{"right": leader}, {"right": other}, {"right": other}])
    _, first, second = study.trials
    assert first.state == TrialState.COMPLETE and records.ran_on_for_mix(first)
    assert second.state == TrialState.PRUNED and "cannot win" in second.user_attrs["prune_reason"]


def test_a_probe_never_prunes_a_fine_tune_at_its_first_epoch(tmp_path, monkeypatch):
    """An exact probe (0.96 at every step it reports) leads; a fine-tune starts at 0.50 after its first epoch.
    Against the probe's fitted score it would be pruned there (0.50 + noise < 0.96); no fine-tune has reached that
    step to measure it by, so it trains on, and it meets the probe in the fold race, on whole folds."""
    probe_right = _right(200, 0.96, seed=1)
    study = _ask_tell(
        tmp_path,
        monkeypatch,
        [{"right": probe_right, "exact": True}, {"right": _right(200, 0.9, seed=2), "first": 0.50}],
    )
    probe_trial, slow = study.trials
    assert probe_trial.state == TrialState.COMPLETE
    assert len(records.steps(slow)) >= EPOCHS  # it trained fold 1 to its end
    assert not slow.user_attrs.get("prune_reason", "").startswith("pruned after fold 1/5 epoch 1")


def test_a_fine_tune_behind_a_stopped_fine_tune_at_the_same_epoch_is_pruned(tmp_path, monkeypatch):
    """The yardstick is the best finished fine-tune at the step, stopped ones too: behind a probe, the first
    fine-tune (0.85 after one epoch) is stopped by the fold race, and still measures a later one at 0.30 there
    (beyond noise: pruned at its first epoch), so a search whose probe leads still prunes."""
    probe_right = _right(200, 0.98, seed=1)
    study = _ask_tell(
        tmp_path,
        monkeypatch,
        [
            {"right": probe_right, "exact": True},
            {"right": _right(200, 0.8, seed=4), "first": 0.85},
            {"right": _right(200, 0.5, seed=3), "first": 0.30},
        ],
    )
    assert study.trials[1].state == TrialState.PRUNED and "fold racing" in study.trials[1].user_attrs["prune_reason"]
    assert study.trials[2].user_attrs["prune_reason"].startswith("pruned after fold 1/5 epoch 1")


def test_a_fine_tune_behind_the_leading_fine_tune_at_the_same_epoch_is_still_pruned(tmp_path, monkeypatch):
    """The rung stays where fine-tunes compare: a completed fine-tune that scored 0.85 after one epoch of fold 1
    is the yardstick for a later one at 0.30 there (beyond noise: pruned at its first epoch)."""
    leader = _right(200, 0.9)
    study = _ask_tell(
        tmp_path,
        monkeypatch,
        [
            {"right": leader, "first": 0.85},
            {"right": leader, "first": 0.80},
            {"right": _right(200, 0.5, seed=3), "first": 0.30},
        ],
    )
    assert study.trials[2].user_attrs["prune_reason"].startswith("pruned after fold 1/5 epoch 1")


def test_the_sampler_never_reads_a_trial_stopped_deep_in_its_folds_as_a_good_point():
    """Optuna's TPE ranks pruned trials by their last step first: with fewer completed trials than its good group
    wants, the deepest pruned trial (one the race or the budget stopped in fold 5) joins the good group and draws
    the sampler to it. Marked unranked (records.record_unranked), it does not."""
    from autoft.study.pruning import make_sampler

    def share_near_the_stopped_trial(unranked: bool) -> float:
        study = optuna.create_study(direction="maximize", sampler=make_sampler("tpe", 0))

        def run(x: float, steps: int, value: float | None, stopped: bool = False) -> None:
            trial = study.ask()
            trial.suggest_float("x", 0, 1)  # fixed below: study.enqueue_trial sets it
            for s in range(1, steps + 1):
                trial.report(0.6 if steps > 1 else 0.3, s)
            if stopped and unranked:
                records.record_unranked(trial)
            study.tell(trial, value, state=TrialState.COMPLETE if value is not None else TrialState.PRUNED)

        study.enqueue_trial({"x": 0.1})
        run(0.1, 25, 0.8)  # the one completed trial
        study.enqueue_trial({"x": 0.9})
        run(0.9, 24, None, stopped=True)  # stopped in its last fold
        for x in np.linspace(0.3, 0.7, 18):  # pruned at the first rung
            study.enqueue_trial({"x": float(x)})
            run(float(x), 1, None)
        drawn = []
        for _ in range(40):
            trial = study.ask()
            drawn.append(trial.suggest_float("x", 0, 1))
            study.tell(trial, state=TrialState.FAIL)  # no evidence: every draw reads the same trials
        return float(np.mean(np.abs(np.array(drawn) - 0.9) < 0.1))

    assert share_near_the_stopped_trial(unranked=False) > 0.2  # Optuna as it is: drawn to it
    assert share_near_the_stopped_trial(unranked=True) == 0.0


def test_the_summary_says_how_many_sampled_trials_ran_to_completion():
    from optuna.trial import create_trial

    from autoft.results.summary import sampled_story

    trials = [
        create_trial(value=0.9, user_attrs={records.PORTFOLIO: "linear_probe"}),
        create_trial(value=0.8),
        create_trial(state=TrialState.PRUNED),
        create_trial(value=0.7),
        create_trial(state=TrialState.FAIL),
    ]
    assert sampled_story(trials) == "sampled trials (the portfolio aside): 3, of which 2 ran to completion"
