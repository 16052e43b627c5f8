"""Exact probes: a trial with every stage frozen and no augmentation is scikit-learn's logistic regression on the
cached pooled features, shipped as the usual model."""

from __future__ import annotations

import random
import shutil
import warnings

import numpy as np
import pytest
import torch
from conftest import make_image_folder
from optuna.trial import TrialState
from sklearn.linear_model import LogisticRegressionCV
from sklearn.model_selection import StratifiedKFold
from sklearn.preprocessing import StandardScaler

from autoft.cache import RunCache, load_data
from autoft.config import Config
from autoft.results.predict import image_paths, load_model
from autoft.study.run import SearchOptions, run_search
from autoft.training import probe
from autoft.training.checkpoint import assemble
from autoft.training.inference import frozen_features, predict_logits
from autoft.training.loop import build_on_device, finetune, plan_folds
from autoft.training.run import train

CPU = torch.device("cpu")


def _noisy_labels(root, share: float = 0.3, seed: int = 0):
    """Move a share of each class's images into the next class: labels no model fits perfectly, so C matters."""
    rng = random.Random(seed)
    for split in ("train", "val"):
        classes = sorted(p.name for p in (root / split).iterdir())
        moves = []
        for i, name in enumerate(classes):
            files = sorted((root / split / name).iterdir())
            moves += [
                (f, root / split / classes[(i + 1) % len(classes)] / f"moved_{name}_{f.name}")
                for f in rng.sample(files, int(len(files) * share))
            ]
        for src, dst in moves:
            shutil.move(src, dst)
    return root


@pytest.mark.slow
@pytest.mark.parametrize("classes", [("cat", "dog"), ("a", "b", "c")])
def test_exact_probe_is_scikit_learns_fit_on_the_same_features(tmp_path, tiny_config, classes):
    root = _noisy_labels(make_image_folder(tmp_path / "noisy", classes=classes, per_class=16))
    cfg = tiny_config.replace(data=str(root), freeze_depth=3, aug_strength=0.0, epochs=4)
    data = load_data(cfg)
    result = finetune(cfg, data)
    assert len(result.history) == 1 and result.best[probe.EXACT] and not result.stopped_early  # one exact fit
    cache = RunCache()
    model, spec = build_on_device(cfg, len(classes), CPU, cache=cache)
    x = frozen_features(model, spec, cfg, cache.images(data.labelled, CPU), 3, CPU, cache).double().numpy()
    y = data.labelled.labels.numpy()
    oof = np.zeros((len(y), len(classes)))
    for i, fold in enumerate(plan_folds(cfg, data)):
        tr, va = fold.train.numpy(), fold.val.numpy()
        scaler = StandardScaler().fit(x[tr])
        inner = StratifiedKFold(probe.INNER_FOLDS, shuffle=True, random_state=cfg.seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # scikit-learn's announced default changes
            ref = LogisticRegressionCV(Cs=probe.CS, cv=inner, scoring="neg_log_loss", max_iter=probe.MAX_ITER).fit(
                scaler.transform(x[tr]), y[tr]
            )
        assert result.best[probe.CHOSEN_C][i] == pytest.approx(np.atleast_1d(ref.C_)[0])
        expected = ref.predict_proba(scaler.transform(x[va]))
        # the shipped fold model, run from the images through every stage (nothing cached), gives the same
        net = assemble(cfg.backbone, len(classes), [result.members[i]], 0)
        got = predict_logits(net, spec, cfg, data.labelled, 0, CPU, fold.val).softmax(1).double().numpy()
        np.testing.assert_allclose(got, expected, atol=1e-4)
        oof[va] = expected
    assert 0.5 < result.best["val_accuracy"] < 1.0  # noisy labels: neither trivial nor perfect
    assert result.best["val_accuracy"] == pytest.approx(float((oof.argmax(1) == y).mean()))
    np.testing.assert_allclose(result.oof, oof, atol=1e-4)  # the out-of-fold probabilities the search keeps
    log_loss = -np.log(oof[np.arange(len(y)), y]).mean()
    assert result.best["val_loss"] == pytest.approx(log_loss, abs=1e-4)


def test_only_a_frozen_unaugmented_probe_is_exact(tiny_config):
    assert probe.applies(tiny_config.replace(freeze_depth=3, aug_strength=0.0), 3)
    assert not probe.applies(tiny_config.replace(freeze_depth=3, aug_strength=0.1), 3)  # augmented: features change
    assert not probe.applies(tiny_config.replace(freeze_depth=2, aug_strength=0.0), 3)  # a stage still trains
    history = finetune(tiny_config.replace(freeze_depth=3, aug_strength=0.1, epochs=2)).history
    assert len(history) == 2 and not any(probe.EXACT in h for h in history)  # epochs of the optimizer, as before


def test_search_runs_the_portfolio_probe_exactly_and_ships_it(in_tmp, tiny_config):
    study = run_search(tiny_config.replace(epochs=3), SearchOptions(trials=1, progress=False, sampler="random"))
    (t,) = study.trials
    assert t.user_attrs["portfolio"] == "linear_probe" and t.state == TrialState.COMPLETE
    assert len(t.user_attrs["history"]) == 1 and t.user_attrs["history"][0][probe.EXACT]  # one fit, not 3 epochs
    assert t.user_attrs["best_epoch"] == 1 and t.user_attrs["estimate"]["folds"] == 5
    model = load_model(in_tmp / "studies" / "autoft" / "best.pt", device="cpu")
    paths = image_paths([tiny_config.data + "/train"])
    assert model.predict(paths) == [p.split("/")[-2] for p in paths]


@pytest.mark.slow
@pytest.mark.parametrize("final", ["ensemble", "refit"])
def test_a_shipped_probe_predicts(tmp_path, tiny_config, final):
    cfg = tiny_config.replace(freeze_depth=3, aug_strength=0.0, final=final)
    metrics = train(cfg, tmp_path / "run")
    assert metrics["epochs_run"] == 1 and metrics["best_val_accuracy"] >= 0.9
    assert metrics["shipped"].startswith("ensemble of 5" if final == "ensemble" else "refit")
    model = load_model(tmp_path / "run" / "model.pt", device="cpu")
    paths = image_paths([tiny_config.data + "/val"])
    assert model.predict(paths) == [p.split("/")[-2] for p in paths]


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_a_fold_whose_training_part_holds_one_class_predicts_it():
    """A class of one labelled image leaves one fold's training part with a single class: nothing to regress, so
    that fold's head predicts the class it saw (as the trained head would), not a crash of the trial."""
    features = torch.randn(6, 4)
    labels = torch.tensor([0, 0, 0, 0, 0, 1])
    heads = [(torch.nn.Linear(4, 2), torch.arange(5), None), (torch.nn.Linear(4, 2), torch.arange(6), None)]
    loss, seen, metrics = probe.fit_heads(heads, features, labels, Config())
    assert seen == 11 and metrics[probe.CHOSEN_C][0] is None and metrics[probe.CHOSEN_C][1] > 0
    assert (heads[0][0](features).argmax(1) == 0).all()
    assert torch.softmax(heads[0][0](features), 1)[:, 0].min() > 0.99
