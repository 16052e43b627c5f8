import csv

import optuna
import pytest
import torch
import yaml
from optuna.trial import TrialState

from autoft.config import Config
from autoft.exceptions import ConfigError
from autoft.results import records
from autoft.results.records import best_trial, load_oof
from autoft.space import SearchSpace
from autoft.study.objective import trial_seed
from autoft.study.run import SearchOptions, open_study, run_search
from autoft.training.checkpoint import load_checkpoint


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _opts(**kw):
    return SearchOptions(**{"trials": 4, "progress": False, "sampler": "random", "pruner": "none", **kw})


@pytest.mark.slow
def test_four_trial_search_writes_all_exports(in_tmp, tiny_config):
    study = run_search(tiny_config, _opts())
    trials = study.get_trials()
    assert len(trials) == 4 and all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)
    assert study.metric_names == ["val_accuracy"]
    out = in_tmp / "studies" / "autoft"
    best = best_trial(study)
    doc = yaml.safe_load((out / "best.yaml").read_text())
    estimate = doc["result"]["estimate"]
    assert doc["result"]["trial"] == best.number and estimate["value"] == best.value
    assert doc["result"]["metric"] == estimate["metric"] == "accuracy"
    assert set(doc["result"]["scores"]) == {"val_accuracy", "val_balanced_accuracy", "val_f1_macro"}
    assert estimate["images"] == 36 and estimate["folds"] == 5 and len(estimate["fold_scores"]) == 5
    assert estimate["interval"][0] <= best.value <= estimate["interval"][1]
    assert Config.from_yaml(out / "best.yaml") == Config.from_dict(best.user_attrs["config"])
    ckpt = load_checkpoint(out / "best.pt")
    assert ckpt["classes"] == ["cat", "dog"] and ckpt["metrics"]["trial"] == best.number
    assert len(ckpt["members"]) == 4 and ckpt["metrics"]["shipped"].startswith("ensemble of 5 fold models")  # validated
    rows = list(csv.DictReader((out / "trials.csv").open()))
    assert [int(r["number"]) for r in rows] == [0, 1, 2, 3]
    assert {
        "freeze_depth",
        "head_lr",
        "base_lr",
        "t_max",
        "aug_strength",
        "image_size",
        "recipe",
        "metric",
        "value",
        "interval_low",
        "interval_high",
        "fold_scores",
        "se",
        "images",
        "val_accuracy",
        "val_balanced_accuracy",
        "val_f1_macro",
        "tau",
    } <= set(rows[0])
    assert len(rows[0]["fold_scores"].split(";")) == 5
    attrs = best.user_attrs
    exact = attrs["history"][0].get("exact_probe")  # the portfolio's linear probe is fitted in one step
    assert len(attrs["history"]) == (1 if exact else tiny_config.epochs) and attrs["device"] == "cpu"
    assert attrs["wall_time_s"] > 0 and attrs["images_per_s"] > 0 and attrs["peak_memory_mb"] > 0
    assert attrs["train_seconds"] > 0
    oof = load_oof(best, in_tmp / "studies" / "artifacts")  # the kept epoch's out-of-fold probabilities, an artifact
    assert oof.probabilities.shape == (36, 2) and oof.estimate("accuracy").value == pytest.approx(best.value)
    artifact = attrs["weights_artifact_id"]
    assert (in_tmp / "studies" / "artifacts" / artifact).is_file()


@pytest.mark.slow
def test_portfolio_runs_first_in_order(in_tmp, tiny_config):
    study = run_search(tiny_config, _opts(trials=4))
    base = tiny_config
    expected = SearchSpace.default(base.epochs).portfolio(base)
    assert [t.user_attrs.get("portfolio") for t in study.trials] == [name for name, _ in expected]
    assert [t.params for t in study.trials] == [params for _, params in expected]
    assert study.trials[0].user_attrs["config"]["freeze_depth"] == 3  # the linear probe: every stage frozen
    assert study.trials[0].user_attrs["config"]["seed"] == trial_seed(tiny_config.seed, 0)


def _curves_by_head_lr(curves):
    """A finetune stand-in: each trial reports the curve its head_lr names (fake values, no training)."""
    from autoft.training.loop import Result

    def fake_finetune(cfg, data, report, cache=None, **kw):
        curve = curves[cfg.head_lr]
        for epoch, acc in enumerate(curve):
            report(
                epoch,
                {
                    "fold": 1,
                    "epoch": epoch + 1,
                    "train_loss": 1.0,
                    "val_loss": 1.0 - acc,
                    "val_accuracy": acc,
                    "images_per_s": 1.0,
                    "epoch_time_s": 0.1,
                },
            )
        m = {
            "epoch": len(curve),
            "train_loss": 1.0,
            "val_loss": 1.0 - max(curve),
            "val_accuracy": max(curve),
            "images_per_s": 1.0,
            "epoch_time_s": 0.1,
        }
        return Result(m, m, [m], [{}], 0, data.classes, cfg, "cpu", 0.1, 1.0, validated=12)

    return fake_finetune


def test_a_trial_far_behind_the_leader_at_the_same_step_is_pruned_and_one_within_noise_is_not(
    in_tmp, tiny_config, monkeypatch
):
    import importlib

    curves = {
        1e-2: [0.90, 0.90, 0.90, 0.90],  # the linear probe (head_lr 1e-2): the leader
        0.05: [0.30, 0.30, 0.30, 0.30],  # hopeless: far below the leader's score at the same step
        0.02: [0.80, 0.85, 0.90, 0.90],
    }  # behind at step 1, but within noise of 12 images: spared
    monkeypatch.setattr(importlib.import_module("autoft.study.objective"), "finetune", _curves_by_head_lr(curves))
    monkeypatch.setattr(importlib.import_module("autoft.results.exports").Exporter, "keep_weights", lambda *a: None)
    monkeypatch.setattr(importlib.import_module("autoft.results.exports").Exporter, "shipped", lambda *a: None)
    cfg = tiny_config.replace(epochs=4, cv_folds=1)  # one fold: a step is an epoch
    run_search(cfg, _opts(trials=1, pruner="median", startup_trials=1))  # the probe
    study = open_study(cfg, _opts(), SearchSpace.default(4), cfg.seed, images=12)
    study.enqueue_trial({"head_lr": 0.05})
    study.enqueue_trial({"head_lr": 0.02})
    study = run_search(cfg, _opts(trials=2, pruner="median", startup_trials=1))
    probe, bad, near = study.trials
    assert bad.state == TrialState.PRUNED and "pruned after fold 1/1 epoch 1" in bad.user_attrs["prune_reason"]
    assert near.state == TrialState.COMPLETE and near.value == 0.90  # a contender, not a loss


@pytest.mark.slow
def test_second_run_resumes_and_runs_the_portfolio_once(in_tmp, tiny_config):
    first = run_search(tiny_config, _opts(trials=2))  # two of the four recipes, none left waiting
    assert [t.state for t in first.trials] == [TrialState.COMPLETE] * 2
    old_params = [t.params for t in first.trials]
    again = run_search(tiny_config, _opts(trials=3))
    done = again.trials
    assert len(done) == 5
    names = [t.user_attrs.get("portfolio") for t in done]
    assert names[:4] == ["linear_probe", "hand_recipe", "freeze_unfreeze", "low_rate_full"] and names[4] is None
    assert [t.params for t in done[:2]] == old_params
    third = run_search(tiny_config, _opts(trials=1))
    sampled = [t.params for t in third.trials if t.user_attrs.get("portfolio") is None]
    assert len(sampled) == 2 and sampled[0] != sampled[1]  # the resumed sampler does not replay old points
    assert sum(bool(t.user_attrs.get("portfolio")) for t in third.trials) == 4  # each recipe once across resumes


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


def _told(study, value, loss, images=600, seconds=10.0):
    """A completed trial with fake scores, as the objective records them."""
    t = study.ask()
    t.set_user_attr("val_loss", loss)
    t.set_user_attr("estimate", {"metric": "accuracy", "value": value, "images": images, "fold_scores": [value] * 5})
    t.set_user_attr("train_seconds", seconds)
    study.tell(t, value)
    return t.number


def test_winner_is_chosen_on_the_estimate_with_ties_within_noise():
    # 600 images at 0.90: one standard error is sqrt(0.9 * 0.1 / 600) = 0.0122
    study = optuna.create_study(direction="maximize")
    lucky = _told(study, 0.905, 0.50)  # the highest score, a worse loss
    steady = _told(study, 0.895, 0.30)  # within one standard error of it: a tie, won on the lower loss
    _told(study, 0.880, 0.10)  # lower loss still, but 0.025 below the top: not a tie
    assert best_trial(study).number == steady
    cheap = _told(study, 0.900, 0.30, seconds=2.0)  # tied and as good a loss: the cheaper recipe
    assert best_trial(study).number == cheap
    clear = _told(study, 0.95, 0.60)  # 0.95 is beyond the noise of every other: it wins outright
    assert best_trial(study).number == clear
    assert lucky != clear

    few = optuna.create_study(direction="maximize")  # on 50 images one standard error at 0.96 is 0.028: more ties
    _told(few, 0.96, 0.40, images=50)
    modest = _told(few, 0.94, 0.20, images=50)  # one image fewer right: a tie on 50 images...
    assert best_trial(few).number == modest
    many = optuna.create_study(direction="maximize")
    top = _told(many, 0.96, 0.40, images=5000)
    _told(many, 0.94, 0.20, images=5000)  # ...but 100 images fewer right on 5000: a real difference
    assert best_trial(many).number == top


def test_pruner_spares_every_trial_that_could_still_end_within_noise_of_the_best():
    from autoft.study.pruning import _Guarded, make_pruner

    pruner = make_pruner("median", epochs=4, min_epochs=2, startup=2, images=600)
    assert isinstance(pruner, _Guarded) and isinstance(pruner.inner, optuna.pruners.MedianPruner)
    study = optuna.create_study(direction="maximize", pruner=pruner)
    t = study.ask()
    t.report(0.0, 1)
    assert not t.should_prune()  # before min_epochs, and before any trial has finished
    for curve in ([0.80, 0.90, 0.92, 0.93], [0.60, 0.70, 0.80, 0.86], [0.60, 0.75, 0.78, 0.80]):
        done = study.ask()
        for step, v in enumerate(curve, 1):
            done.report(v, step)
        study.tell(done, max(curve))
    behind = study.ask()  # below the median at step 2 (0.75) and far below the leader's 0.90 there
    behind.report(0.5, 1)
    behind.report(0.68, 2)
    assert behind.should_prune()

    class Always(optuna.pruners.BasePruner):  # an inner pruner that always says prune: only the guard can spare
        def prune(self, study, trial):
            return True

    study.pruner = _Guarded(Always(), 2, 2, 600, "accuracy", 4)
    near = study.ask()  # the leader scored 0.90 at step 2: 0.89 + hypot(0.0128, 0.0122) = 0.908 reaches it
    near.report(0.89, 2)
    assert not near.should_prune()
    far = study.ask()  # 0.85 + 0.019 = 0.869: behind beyond noise at the same step
    far.report(0.85, 2)
    assert far.should_prune()
    assert isinstance(make_pruner("sha", 4, 1, 1, 600).inner, optuna.pruners.SuccessiveHalvingPruner)
    assert isinstance(make_pruner("hyperband", 9, 1, 3, 600).inner, optuna.pruners.HyperbandPruner)


@pytest.mark.slow
def test_portfolio_recipe_is_run_again_if_its_trial_never_finished(in_tmp, tiny_config):
    from autoft.results.records import enqueue_portfolio

    space = SearchSpace.default(tiny_config.epochs)
    study = open_study(tiny_config, _opts(), space, tiny_config.seed, images=36)
    enqueue_portfolio(study, space.portfolio(tiny_config))  # as the search does right before a trial starts
    interrupted = study.ask()  # takes the first recipe
    assert interrupted.user_attrs["portfolio"] == "linear_probe"
    study.tell(interrupted, state=TrialState.FAIL)
    study = run_search(tiny_config, _opts(trials=4))
    probes = [t for t in study.trials if t.user_attrs.get("portfolio") == "linear_probe"]
    assert [t.state for t in probes] == [TrialState.FAIL, TrialState.COMPLETE]
    assert probes[1].params == dict(space.portfolio(tiny_config))["linear_probe"]
    assert [t.user_attrs.get("portfolio") for t in study.trials[1:]] == [
        "linear_probe",
        "hand_recipe",
        "freeze_unfreeze",
        "low_rate_full",
    ]


def test_a_dead_workers_trial_is_retried_before_the_next_recipe(in_tmp, tiny_config):
    from autoft.results.records import enqueue_portfolio

    space = SearchSpace.default(tiny_config.epochs)
    study = open_study(tiny_config, _opts(), space, tiny_config.seed, images=36)
    study.enqueue_trial({"head_lr": 0.05}, user_attrs={"note": "a retry, queued by a heartbeat sweep"})
    enqueue_portfolio(study, space.portfolio(tiny_config))
    assert [t.user_attrs for t in study.get_trials(states=(TrialState.WAITING,))] == [
        {"note": "a retry, queued by a heartbeat sweep"}
    ]


@pytest.mark.slow
def test_a_trial_is_never_pruned_after_its_last_epoch(in_tmp, tiny_config, monkeypatch):
    import importlib

    from autoft.training.loop import Result

    def fake_finetune(
        cfg, data, report, cache=None, **kw
    ):  # fake values: the good LR scores 0.9, the bad one 0.1, every epoch
        m = {
            "fold": 1,
            "epoch": 1,
            "train_loss": 1.0,
            "val_loss": 1.0,
            "val_accuracy": 0.9 if cfg.head_lr > 1e-3 else 0.1,
            "images_per_s": 1.0,
            "epoch_time_s": 0.1,
        }
        for epoch in range(cfg.epochs):
            report(epoch, {**m, "epoch": epoch + 1})
        return Result(m, m, [m], [{}], 0, data.classes, cfg, "cpu", 0.1, 1.0, validated=36)

    monkeypatch.setattr(importlib.import_module("autoft.study.objective"), "finetune", fake_finetune)
    monkeypatch.setattr(importlib.import_module("autoft.results.exports").Exporter, "keep_weights", lambda *a: None)
    monkeypatch.setattr(importlib.import_module("autoft.results.exports").Exporter, "shipped", lambda *a: None)
    cfg = tiny_config.replace(epochs=2, cv_folds=1)  # one fold: a step is an epoch
    opts = _opts(trials=1, pruner="median", startup_trials=1)
    run_search(cfg, opts)  # the linear probe (head_lr 1e-2): 0.9
    study = open_study(cfg, opts, SearchSpace.default(2), cfg.seed, images=36)
    bad = {"head_lr": 1e-4, "base_lr": 1e-5}
    study.enqueue_trial({**bad, "t_max": 1})
    study.enqueue_trial({**bad, "t_max": 2})
    study = run_search(cfg, _opts(trials=2, pruner="median", startup_trials=1))
    assert [t.state for t in study.trials] == [TrialState.COMPLETE, TrialState.PRUNED, TrialState.PRUNED]
    assert [len(records.history(t)) for t in study.trials[1:]] == [1, 1]  # pruned after epoch 1 of 2

    one = _opts(trials=1, pruner="median", startup_trials=1, study="one")
    cfg1 = cfg.replace(epochs=1)
    run_search(cfg1, one)
    open_study(cfg1, one, SearchSpace.default(1), cfg.seed, images=36).enqueue_trial({**bad, "t_max": 1})
    study = run_search(cfg1, one)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE, TrialState.COMPLETE]  # its only epoch was its last


@pytest.mark.slow
def test_timeout_is_a_budget_a_running_trial_stops_at_its_next_epoch(in_tmp, tiny_config, monkeypatch):
    import importlib
    import time

    objective_module = importlib.import_module("autoft.study.objective")
    real = objective_module.finetune

    def slow_finetune(cfg, data, report, cache=None, **kw):
        def slow_report(epoch, metrics):
            time.sleep(0.4)
            report(epoch, metrics)

        return real(cfg, data, slow_report, cache=cache, **kw)

    monkeypatch.setattr(objective_module, "finetune", slow_finetune)
    monkeypatch.setattr("autoft.training.loop.exact_probe", lambda cfg, stages: False)  # the probe trains by epochs too
    t0 = time.monotonic()
    monkeypatch.setattr("autoft.results.exports.RESERVE_S", 0.0)  # these exports take no time worth reserving
    study = run_search(tiny_config.replace(epochs=20), _opts(trials=5, timeout=3.0))
    assert time.monotonic() - t0 < 20  # not the 5 x 20 epochs x 0.4 s the trials asked for
    # the budget counts from the call: what a trial that started had run is kept, and it was stopped for the budget
    assert study.trials and all(
        t.state == TrialState.PRUNED and "time budget" in t.user_attrs["prune_reason"] for t in study.trials
    )


@pytest.fixture
def second_backbone():
    """A second cheap backbone with other stages, native size and crop than tiny_cnn: a conditional space."""
    from torch import nn

    from autoft.backbones import _REGISTRY, register_backbone

    def build(weights):
        def block(cin, cout):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, 2, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())

        return [block(3, 12), nn.Sequential(block(12, 24), nn.AdaptiveAvgPool2d(1), nn.Flatten())], 24

    register_backbone(
        "tiny_two",
        stages=2,
        mean=(0.5,) * 3,
        std=(0.5,) * 3,
        native_size=48,
        crop_pct=0.8,
        offline=True,
        pretrained=False,
    )(build)
    yield "tiny_two"
    _REGISTRY.pop("tiny_two")


@pytest.mark.slow
def test_two_backbone_search_exports_a_config_that_round_trips(in_tmp, tiny_config, second_backbone):
    from autoft.cli import main
    from autoft.results.predict import evaluate, export, load_model

    (in_tmp / "space.yaml").write_text(f"backbone: [tiny_cnn, {second_backbone}]\n")
    study = run_search(tiny_config, _opts(trials=6, space="space.yaml"))
    configs = [t.user_attrs["config"] for t in study.trials]
    assert {c["backbone"] for c in configs} == {"tiny_cnn", "tiny_two"}
    for c in configs:  # each trial inside its own backbone's branch of the space
        stages, native = {"tiny_cnn": (3, 32), "tiny_two": (2, 48)}[c["backbone"]]
        assert c["freeze_depth"] <= stages and native // 2 <= c["image_size"] <= native
    assert [t.user_attrs.get("portfolio") for t in study.trials[:2]] == [
        "linear_probe@tiny_cnn",
        "linear_probe@tiny_two",
    ]
    out = in_tmp / "studies" / "autoft"
    exported = Config.from_yaml(out / "best.yaml")
    assert exported == Config.from_dict(best_trial(study).user_attrs["config"])
    assert main(["-q", "train", "--config", str(out / "best.yaml"), "--out", "again"]) == 0
    assert Config.from_yaml(in_tmp / "again" / "config.yaml") == exported
    shipped = torch.load(out / "best.pt", weights_only=True)
    rebuilt = torch.load(in_tmp / "again" / "model.pt", weights_only=True)
    assert all(
        torch.equal(shipped["state_dict"][k], rebuilt["state_dict"][k]) for k in shipped["state_dict"]
    )  # same model
    assert evaluate(out / "best.pt", split="val", device="cpu")["n"] == 12
    assert load_model(out / "best.pt", device="cpu").predict(str(tiny_config.data) + "/val/cat/000.png") in (
        ["cat"],
        ["dog"],
    )
    assert export(out / "best.pt").max_abs_diff <= 1e-4


def test_backbone_auto_searches_every_offline_pretrained_backbone(in_tmp, tiny_config):
    from autoft.backbones import auto_backbones
    from autoft.study.run import search_space

    base, space = search_space(tiny_config.replace(backbone="auto"), _opts(), fixed=["backbone"])  # as typed
    assert auto_backbones() == ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"]
    joined = "+".join(auto_backbones())  # one probe on all of them side by side
    assert base.backbone == "efficientnet_lite0" and space.backbones(base) == [*auto_backbones(), joined]
    recipes = [name for name, _ in space.portfolio(base)]
    assert recipes[:4] == [f"linear_probe@{b}" for b in space.backbones(base)] and len(recipes) == 7
    with pytest.raises(ConfigError, match="autoft search compare"):
        from autoft.backbones import get_backbone

        get_backbone("auto")


def test_summary_names_each_portfolio_recipe_pruned_or_not(tmp_path, capsys, tiny_config):
    from autoft.results import records
    from autoft.results.summary import print_summary

    study = optuna.create_study(direction="maximize")
    probe = study.ask()
    probe.set_user_attr(records.PORTFOLIO, "linear_probe")
    probe.set_user_attr(records.CONFIG, tiny_config.to_dict())
    study.tell(probe, 0.8)
    hand = study.ask()
    hand.set_user_attr(records.PORTFOLIO, "hand_recipe")
    hand.report(0.4, 1)
    hand.report(0.3, 4)
    hand.set_user_attr(
        records.STEPS, [{"fold": 1, "epoch": 1, "accuracy": 0.4}, {"fold": 2, "epoch": 1, "accuracy": 0.3}]
    )
    study.tell(hand, state=TrialState.PRUNED)
    print_summary(study, study.trials[0], 1.0, tmp_path, [])
    out = capsys.readouterr().out
    assert "portfolio linear_probe                 trial 0   0.8" in out
    assert "portfolio hand_recipe                  trial 1   pruned after fold 2 epoch 1 (0.3000)" in out
