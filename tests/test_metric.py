"""The chosen metric: its scores against scikit-learn, its intervals, and that selection, pruning, the kept
out-of-fold predictions, `best --metric` and the imbalance remedies follow it."""

import numpy as np
import optuna
import pytest
import torch
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score
from sklearn.utils.class_weight import compute_class_weight

from autoft.backbones import LogitAdjusted, build_model
from autoft.cache import RunCache
from autoft.config import Config
from autoft.data.dataset import Fold
from autoft.estimate import Estimate, bootstrap, confusion, from_confusion, scores
from autoft.exceptions import ConfigError
from autoft.results import records
from autoft.space import SearchSpace, imbalanced
from autoft.training.checkpoint import assemble
from autoft.training.loop import Result, _FoldRun, adjusted, choose_tau, class_weights


def _predictions(seed=0, counts=(40, 15, 6), recall=(0.9, 0.6, 0.4)):
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(len(counts)), counts)
    right = rng.random(len(y)) < np.asarray(recall)[y]
    wrong = (y + rng.integers(1, len(counts), len(y))) % len(counts)
    return y, np.where(right, y, wrong)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_match_scikit_learn_on_fixed_predictions(seed):
    y, p = _predictions(seed)
    got = scores(y, p, 3)
    assert got["accuracy"] == pytest.approx(accuracy_score(y, p))
    assert got["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, p))
    assert got["f1_macro"] == pytest.approx(f1_score(y, p, average="macro", labels=[0, 1, 2], zero_division=0))
    never = np.where(p == 2, 0, p)  # a class never predicted: F1 0 for it, as sklearn's zero_division=0
    assert scores(y, never, 3)["f1_macro"] == pytest.approx(f1_score(y, never, average="macro", zero_division=0))
    batch = np.stack([confusion(y, p, 3), confusion(y, never, 3)])  # batched, as the bootstrap computes them
    assert from_confusion("balanced_accuracy", batch) == pytest.approx(
        [balanced_accuracy_score(y, p), balanced_accuracy_score(y, never)]
    )


def test_bootstrap_interval_covers_the_true_value_at_its_nominal_rate():
    # population: per-class recall fixed, errors spread evenly; the estimand is the metric of the expected confusion
    counts, recall, c = np.array([120, 60, 30, 16]), np.array([0.9, 0.8, 0.6, 0.5]), 4
    expected = (
        np.array([[r if i == j else (1 - r) / (c - 1) for j in range(c)] for i, r in enumerate(recall)])
        * counts[:, None]
    )
    sims, hits = 200, {"balanced_accuracy": 0, "f1_macro": 0}
    for s in range(sims):
        y, p = _predictions(100 + s, counts, recall)
        for metric in hits:
            lo, hi, _ = bootstrap(metric, y, p, c, resamples=1000, seed=s)
            hits[metric] += lo <= from_confusion(metric, expected) <= hi
    for metric, n in hits.items():  # 95 % nominal; 200 simulations: a binomial sd of 1.5 points
        assert 0.90 <= n / sims <= 0.99, (metric, n / sims)


def test_estimate_interval_and_noise_per_metric():
    y, p = _predictions()
    acc = Estimate.measure("accuracy", y, p, 3)
    assert acc.boot is None and acc.interval[0] < acc.value < acc.interval[1]  # Wilson
    assert acc.noise == pytest.approx(np.sqrt(acc.value * (1 - acc.value) / len(y)))
    bal = Estimate.measure("balanced_accuracy", y, p, 3, fold=np.arange(len(y)) % 5)
    assert bal.interval == bal.boot[:2] and bal.noise == bal.boot[2] and len(bal.fold_scores) == 5
    assert Estimate.from_dict(bal.to_dict()) == bal
    assert Estimate.of({"val_balanced_accuracy": bal.value, **bal.epoch_metrics()}, len(y), "balanced_accuracy") == bal


def test_metric_is_a_config_key_with_its_choices():
    assert Config(metric="balanced_accuracy").metric == "balanced_accuracy"
    with pytest.raises(ConfigError, match="metric"):
        Config(metric="auc")
    assert (
        Config(logit_adjustment="auto").logit_adjustment == "auto"
        and Config(logit_adjustment="0.5").logit_adjustment == 0.5
    )
    with pytest.raises(ConfigError, match="logit_adjustment"):
        Config(logit_adjustment="sometimes")


# --- selection and pruning follow the metric -------------------------------------------------------------------


def _told(study, value, loss, se, seconds=10.0, history=None):
    """A completed trial scored on balanced accuracy, with its bootstrap standard error."""
    t = study.ask()
    t.set_user_attr("val_loss", loss)
    t.set_user_attr(
        "estimate", Estimate(value, 200, (), "balanced_accuracy", (value - 2 * se, value + 2 * se, se)).to_dict()
    )
    t.set_user_attr("train_seconds", seconds)
    for step, v in enumerate(history or [], 1):
        t.report(v, step)
    study.tell(t, value)
    return t.number


def test_selection_ties_within_the_metrics_bootstrap_noise():
    study = optuna.create_study(direction="maximize")
    top = _told(study, 0.80, 0.50, se=0.01)
    near = _told(study, 0.79, 0.30, se=0.01)  # within the top's one standard error (0.01): a tie, won on loss
    assert records.best_trial(study).number == near
    wide = optuna.create_study(direction="maximize")
    _told(wide, 0.80, 0.50, se=0.001)  # a precise top: 0.79 is a real difference now
    _told(wide, 0.79, 0.30, se=0.001)
    assert records.best_trial(wide).number == top


def test_pruning_uses_the_running_trials_own_metric_noise():
    from autoft.study.pruning import make_pruner

    study = optuna.create_study(direction="maximize", pruner=make_pruner("median", 4, 1, 1, 200, "balanced_accuracy"))
    _told(study, 0.80, 0.3, se=0.01, history=[0.7, 0.75, 0.8])

    def running(now, se):
        t = study.ask()
        t.set_user_attr(
            "steps",
            [
                {
                    "fold": 1,
                    "epoch": 1,
                    "val_balanced_accuracy": now,
                    "fold_scores": [],
                    "bootstrap": [now - 2 * se, now + 2 * se, se],
                    "images": 200,
                }
            ],
        )
        t.report(now, 1)
        return t

    # the leader scored 0.70 at the same step (its noise there: binomial on 200 images, 0.032)
    assert not running(0.60, se=0.10).should_prune()  # 0.60 + hypot(0.10, 0.032) = 0.705: within noise of it
    assert running(0.60, se=0.01).should_prune()  # 0.60 + 0.034 = 0.634: behind beyond noise


# --- out-of-fold predictions kept, and `best --metric` ----------------------------------------------------------


def _fake_result(cfg, probabilities, prior, tau=0.0):
    n = len(probabilities)
    m = {"epoch": 1, "val_loss": 0.5, "tau": tau}
    return Result(
        m,
        m,
        [m],
        [{}],
        0,
        ["a", "b", "c"],
        cfg,
        "cpu",
        0.1,
        1.0,
        validated=n,
        oof=probabilities.astype(np.float32),
        fold=np.where(np.isnan(probabilities[:, 0]), -1, np.arange(n) % 5),
        prior=prior,
    )


def test_oof_artifact_round_trip(tmp_path):
    study = optuna.create_study(direction="maximize")
    trial = study.ask()
    probs = np.random.default_rng(0).dirichlet(np.ones(3), 30)
    probs[3] = np.nan  # an image no fold validated
    labels = np.arange(30) % 3
    records.write_oof(
        trial,
        _fake_result(Config(), probs, [0.5, 0.3, 0.2], tau=0.5),
        labels,
        [f"img{i}.png" for i in range(30)],
        str(tmp_path),
    )
    study.tell(trial, 0.5)
    oof = records.load_oof(study.trials[0], tmp_path)
    np.testing.assert_array_equal(oof.probabilities, probs.astype(np.float32))
    np.testing.assert_array_equal(oof.labels, labels)
    assert list(oof.paths[:2]) == ["img0.png", "img1.png"] and oof.tau == 0.5 and list(oof.prior) == [0.5, 0.3, 0.2]
    assert oof.fold[3] == -1 and oof.estimate("accuracy").images == 29  # an image not validated is not scored
    assert records.load_oof(study.trials[0], tmp_path / "elsewhere") is None  # gone: its users do without


def test_best_metric_reranks_a_finished_study_without_training(tmp_path, monkeypatch, capsys):
    """Two fake trials: one right on every common image, one right on every class half the time."""
    import autoft.training.loop
    from autoft.cli import main

    monkeypatch.setattr(autoft.training.loop._FoldRun, "__init__", lambda *a, **k: pytest.fail("best --metric trained"))
    labels = np.repeat([0, 1, 2], [80, 10, 10])
    common = np.eye(3)[np.zeros(100, dtype=int)]  # always class 0: accuracy 0.80, balanced accuracy 0.33
    even = np.eye(3)[np.where(np.arange(100) % 2 == 0, labels, (labels + 1) % 3)]  # half right per class: 0.50, 0.50
    storage = f"sqlite:///{tmp_path / 's.db'}"
    study = optuna.create_study(study_name="s", storage=storage, direction="maximize")
    records.write_study_meta(study, Config(), SearchSpace.default(5), 0)
    for probs in (common, even):
        trial = study.ask()
        result = _fake_result(Config(), probs, [0.8, 0.1, 0.1])
        records.record_config(trial, Config())
        trial.set_user_attr(records.VAL_LOSS, 0.5)
        records.write_oof(trial, result, labels, [f"{i}.png" for i in range(100)], str(tmp_path / "art"))
        e = Estimate.measure("accuracy", labels, probs.argmax(1), 3, np.arange(100) % 5)
        trial.set_user_attr(records.ESTIMATE, e.to_dict())
        study.tell(trial, e.value)
    assert records.best_trial(study).number == 0  # by accuracy, the study's metric
    best, estimate = records.best_by(study, "balanced_accuracy", tmp_path / "art")
    assert best.number == 1 and estimate.value == pytest.approx(0.5) and estimate.metric == "balanced_accuracy"
    assert (
        main(
            [
                "best",
                "--study",
                "s",
                "--storage",
                storage,
                "--artifacts",
                str(tmp_path / "art"),
                "--metric",
                "balanced_accuracy",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert out.startswith("# study s, trial 1: balanced_accuracy 0.5000 (95 % interval") and "backbone:" in out


# --- imbalance -------------------------------------------------------------------------------------------------


def test_imbalance_remedies_appear_in_the_space_only_for_imbalanced_data():
    assert not imbalanced([60, 60, 59]) and not imbalanced([60, 31]) and imbalanced([60, 30]) and imbalanced([60, 6])
    balanced, uneven = SearchSpace.default(5), SearchSpace.default(5, imbalanced=True)
    assert set(uneven.params) - set(balanced.params) == {"class_weight", "balanced_sampling", "logit_adjustment"}
    assert balanced.to_dict() == SearchSpace.default(5, imbalanced=False).to_dict()
    assert uneven.params["class_weight"].choices == ("none", "sqrt", "balanced")
    assert SearchSpace.from_dict(uneven.to_dict()).to_dict() == uneven.to_dict()  # as a study stores and reads it
    trial = optuna.create_study().ask()
    cfg = uneven.suggest(trial, Config())
    assert cfg.class_weight in ("none", "sqrt", "balanced") and cfg.logit_adjustment == "auto"
    for _, params in uneven.portfolio(Config()):  # the expert recipes run as written; the remedies are searched
        assert params["class_weight"] == "none" and params["balanced_sampling"] is False


def test_class_weights_are_scikit_learns():
    y = np.repeat([0, 1, 2], [50, 20, 5])
    counts = torch.bincount(torch.from_numpy(y))
    expected = compute_class_weight("balanced", classes=np.arange(3), y=y)
    np.testing.assert_allclose(class_weights("balanced", counts).numpy(), expected, rtol=1e-6)
    np.testing.assert_allclose(class_weights("sqrt", counts).numpy(), np.sqrt(expected), rtol=1e-6)
    assert class_weights("none", counts) is None


def test_balanced_sampling_draws_every_class_about_equally():
    labels = torch.tensor([0] * 90 + [1] * 10)
    cfg = Config(backbone="tiny_cnn", balanced_sampling=True, device="cpu")
    run = _FoldRun(
        cfg, Fold(torch.arange(100), torch.zeros(0, dtype=torch.long)), 0, labels, 2, torch.device("cpu"), RunCache()
    )
    drawn = labels[torch.multinomial(run.draw, 100 * 50, replacement=True, generator=torch.Generator().manual_seed(0))]
    assert abs(drawn.float().mean().item() - 0.5) < 0.03  # the rare class drawn half the time, not a tenth
    assert (
        _FoldRun(
            cfg.replace(balanced_sampling=False),
            Fold(torch.arange(100), torch.zeros(0, dtype=torch.long)),
            0,
            labels,
            2,
            torch.device("cpu"),
            RunCache(),
        ).draw
        is None
    )


def test_logit_adjustment_with_tau_zero_is_a_no_op():
    log_probs = np.log(np.random.default_rng(0).dirichlet(np.ones(3), 20))
    log_prior = np.log([0.7, 0.2, 0.1])
    assert adjusted(log_probs, log_prior, 0.0) is log_probs
    net, _ = build_model("tiny_cnn", 3, weights="random")
    state = net.state_dict()
    plain = assemble("tiny_cnn", 3, [state], 0)
    assert not isinstance(plain, LogitAdjusted) and not isinstance(
        assemble("tiny_cnn", 3, [state], 0, 0.0, [0.7, 0.2, 0.1]), LogitAdjusted
    )
    shifted = assemble("tiny_cnn", 3, [state], 0, 1.0, [0.7, 0.2, 0.1]).eval()
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        np.testing.assert_allclose((shifted(x) - plain.eval()(x)).numpy(), -np.log([[0.7, 0.2, 0.1]] * 4), rtol=1e-5)


def test_auto_tau_is_chosen_on_the_metric_and_is_zero_when_it_does_not_help():
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1], [90, 10])
    logits = np.stack([np.zeros(100), np.where(y == 1, rng.normal(-1.0, 0.5, 100), rng.normal(-3.0, 0.5, 100))], 1)
    log_probs = logits - np.log(np.exp(logits).sum(1, keepdims=True))  # the rare class under-predicted
    log_prior = np.log([0.9, 0.1])
    cfg = Config(logit_adjustment="auto", metric="balanced_accuracy")
    tau = choose_tau(cfg, log_probs, y, log_prior)
    assert (
        tau > 0
        and scores(y, adjusted(log_probs, log_prior, tau).argmax(1), 2)["balanced_accuracy"]
        > scores(y, log_probs.argmax(1), 2)["balanced_accuracy"]
    )
    right = np.log(np.eye(2)[y] * 0.98 + 0.01)  # already perfect: no adjustment
    assert choose_tau(cfg, right, y, log_prior) == 0.0
    assert choose_tau(cfg.replace(logit_adjustment=0.5), log_probs, y, log_prior) == 0.5


def test_an_imbalanced_accuracy_search_says_so_and_a_resume_keeps_its_metric(tmp_path, monkeypatch, capsys):
    import importlib

    from conftest import make_image_folder

    from autoft.study.run import SearchOptions, run_search

    data = make_image_folder(tmp_path / "data", per_class=12)
    for f in sorted((data / "train" / "dog").iterdir())[2:]:  # with val/: 18 cats, 8 dogs, imbalanced
        f.unlink()

    def fake_finetune(cfg, data, report, cache=None, **kw):  # fake scores, no training
        m = {
            "fold": 1,
            "epoch": 1,
            "train_loss": 1.0,
            "val_loss": 0.5,
            "val_accuracy": 0.8,
            "val_balanced_accuracy": 0.6,
            "val_f1_macro": 0.55,
            "images_per_s": 1.0,
            "epoch_time_s": 0.1,
            "tau": 0.0,
        }
        report(0, m)
        return Result(m, m, [m], [{}], 0, data.classes, cfg, "cpu", 0.1, 1.0, validated=len(data.labelled))

    monkeypatch.setattr(importlib.import_module("autoft.study.objective"), "finetune", fake_finetune)
    monkeypatch.setattr(importlib.import_module("autoft.results.exports").Exporter, "keep_weights", lambda *a: None)
    monkeypatch.setattr(importlib.import_module("autoft.results.exports").Exporter, "shipped", lambda *a: None)
    monkeypatch.chdir(tmp_path)
    cfg = Config(data=str(data), backbone="tiny_cnn", image_size=32, epochs=1, device="cpu")
    study = run_search(cfg, SearchOptions(trials=1, sampler="random"))
    assert records.class_counts(study) == [18, 8] and study.metric_names == ["val_accuracy"]
    assert {"class_weight", "balanced_sampling", "logit_adjustment"} <= set(study.user_attrs[records.SPACE])
    out = capsys.readouterr().out
    assert (
        "imbalanced classes (18 to 8 images): accuracy favours the common ones; the winner's balanced accuracy is "
        "0.6000 (accuracy 0.8000); to choose on it: --metric balanced_accuracy"
    ) in out
    with pytest.raises(ConfigError, match=r"different base config \(metric\)"):
        run_search(cfg.replace(metric="balanced_accuracy"), SearchOptions(trials=1, sampler="random"))


def test_metric_may_be_set_in_the_search_block_of_a_config_file(tmp_path, monkeypatch):
    from autoft.cli import build_parser, resolve_config

    monkeypatch.chdir(tmp_path)
    (tmp_path / "a.yaml").write_text("search: {metric: f1_macro, trials: 3}\n")
    cfg, search = resolve_config(build_parser().parse_args(["search", "--config", "a.yaml"]))
    assert cfg.metric == "f1_macro" and search == {"trials": 3}
    (tmp_path / "b.yaml").write_text("metric: accuracy\nsearch: {metric: f1_macro}\n")
    with pytest.raises(ConfigError, match="metric"):
        resolve_config(build_parser().parse_args(["search", "--config", "b.yaml"]))
