import math

import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score

from autoft.backbones import build_model
from autoft.cache import RunCache, load_data
from autoft.config import Config
from autoft.estimate import Estimate
from autoft.exceptions import ConfigError, TrialFailure
from autoft.training.finals import refit_config
from autoft.training.loop import finetune, lr_factor, make_optimizer, plan_folds, score_key


def test_learnable_task_beats_chance_by_a_wide_margin(tiny_config):
    result = finetune(tiny_config.replace(epochs=6, aug_strength=0.2, head_lr=0.05, base_lr=0.02))
    assert result.best["val_accuracy"] >= 0.9  # chance is 0.5; out of fold, over every labelled image
    assert len(result.history) == 6 and result.classes == ["cat", "dog"]


def test_frozen_stages_stay_bit_identical_and_the_rest_change(tiny_config):
    cfg = tiny_config.replace(freeze_depth=1, epochs=2, aug_strength=0.3)
    start, _ = build_model(cfg.backbone, 2, seed=cfg.seed)
    result = finetune(cfg)
    before = start.state_dict()
    frozen = [k for k in before if k.startswith("stages.0.")]
    trained = [k for k in before if k.startswith(("stages.1.", "stages.2.")) and before[k].is_floating_point()]
    assert len(result.members) == 5 and result.shared_stages == 1  # one model per fold
    for after in result.members:
        assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)  # BN running stats too
        assert all(not torch.equal(before[k], after[k]) for k in trained if k.endswith("weight"))
    assert result.members[1]["stages.0.0.weight"] is result.members[0]["stages.0.0.weight"]  # kept once


def test_optimizer_groups_carry_head_and_base_lrs():
    model, _ = build_model("tiny_cnn", 2)
    cfg = Config(head_lr=0.1, base_lr=0.001, freeze_depth=1, optimizer="sgd", momentum=0.8)
    opt = make_optimizer(model, cfg)
    head, base = opt.param_groups
    assert head["lr"] == 0.1 and base["lr"] == 0.001 and head["momentum"] == 0.8
    assert {id(p) for p in head["params"]} == {id(p) for p in model.head.parameters()}
    assert {id(p) for p in base["params"]} == {id(p) for s in model.stages[1:] for p in s.parameters()}
    assert not any(p.requires_grad for p in model.stages[0].parameters())
    assert isinstance(make_optimizer(build_model("tiny_cnn", 2)[0], cfg.replace(optimizer="adamw")), torch.optim.AdamW)


def test_head_only_model_has_a_single_group():
    model, _ = build_model("tiny_cnn", 2)
    assert len(make_optimizer(model, Config(freeze_depth=3)).param_groups) == 1


def test_lr_follows_the_cosine_curve_for_t_max(tiny_config):
    for e in range(7):
        assert lr_factor(e, 0, 4) == pytest.approx(0.5 * (1 + math.cos(math.pi * e / 4)))
    assert lr_factor(0.5, 2, 4) < lr_factor(1.5, 2, 4) <= 1  # linear warmup first
    cfg = tiny_config.replace(epochs=4, t_max=4, head_lr=0.04)
    lrs = [h["lr_head"] for h in finetune(cfg).history]
    expected = [0.04 * 0.5 * (1 + math.cos(math.pi * (e + 1) / 4)) for e in range(4)]
    assert lrs == pytest.approx(expected, abs=1e-9)


def test_head_only_epochs_freeze_then_unfreeze(tiny_config):
    cfg = tiny_config.replace(epochs=2, head_only_epochs=1, aug_strength=0.2)
    start, _ = build_model(cfg.backbone, 2, seed=cfg.seed)
    seen = {}

    def report(epoch, metrics):
        seen[epoch] = True

    data = load_data(cfg)
    result = finetune(cfg, data, report=report, folds=[data.everything()])  # nothing validated: the last epoch is kept
    assert seen == {0: True, 1: True}
    stem = "stages.0.0.weight"
    assert not torch.equal(start.state_dict()[stem], result.state_dict[stem])  # unfrozen in epoch 2


def test_report_can_stop_the_run_and_best_weights_are_kept(tiny_config):
    class Stop(Exception):
        pass

    calls = []

    def report(epoch, metrics):
        calls.append(metrics)
        if epoch == 1:
            raise Stop

    with pytest.raises(Stop):
        finetune(tiny_config.replace(epochs=5), report=report)
    assert len(calls) == 2 and {"val_accuracy", "val_loss", "train_loss", "images_per_s"} <= set(calls[0])


def test_report_ends_the_last_fold_early_on_the_epochs_every_fold_reached(tiny_config):
    """The search's deadline: True from `report` in the last fold ends the run there, and the result stands on the
    epochs all folds trained (every image still scored out of fold); True in an earlier fold changes nothing."""
    cfg = tiny_config.replace(epochs=3)
    calls = []

    def report(step, metrics):
        calls.append((metrics["fold"], metrics["epoch"]))
        return metrics["epoch"] == 2  # asks to stop at epoch 2 of every fold: only the last one's counts

    result = finetune(cfg, report=report)
    assert calls == [(f, e) for f in range(1, 5) for e in (1, 2, 3)] + [(5, 1), (5, 2)]
    assert result.stopped_early and len(result.history) == 2 and result.best["epoch"] in (1, 2)
    assert result.oof.shape == (36, 2) and np.allclose(result.oof.sum(1), 1, atol=1e-5)
    full = finetune(cfg)  # the same seeds: up to the cut, the same models and scores
    assert [h["val_loss"] for h in result.history] == [h["val_loss"] for h in full.history[:2]]


def test_early_stopping_with_patience(tiny_config):
    result = finetune(tiny_config.replace(epochs=30, patience=1, head_lr=1e-6, base_lr=1e-6))
    assert result.stopped_early and len(result.history) < 30


def test_diverging_loss_is_a_trial_failure(tiny_config):
    from torch import nn

    from autoft.backbones import _REGISTRY, register_backbone

    class Blowup(nn.Module):
        def forward(self, x):
            return x.mean((2, 3)) * float("inf")

    register_backbone("blowup_test", stages=1)(lambda weights: ([Blowup()], 3))
    try:
        with pytest.raises(TrialFailure, match="diverged"):
            finetune(tiny_config.replace(backbone="blowup_test"))
    finally:
        _REGISTRY.pop("blowup_test")


def test_freeze_depth_beyond_the_backbone_is_a_config_error(tiny_config):
    with pytest.raises(ConfigError, match="freeze_depth"):
        finetune(tiny_config.replace(freeze_depth=4))


def test_same_seed_same_scores_on_cpu(tiny_config):
    cfg = tiny_config.replace(epochs=2, aug_strength=0.5)
    a, b = finetune(cfg), finetune(cfg)
    assert [h["val_loss"] for h in a.history] == [h["val_loss"] for h in b.history]


def test_frozen_feature_cache_gives_the_same_result_as_recomputing(tiny_config):
    import importlib

    ft = importlib.import_module("autoft.training.loop")
    cfg = tiny_config.replace(freeze_depth=2, epochs=2)
    cached = ft.finetune(cfg)
    fresh = ft.finetune(cfg, cache=RunCache(max_bytes=0))  # nothing fits: every call recomputes
    assert [h["val_loss"] for h in cached.history] == pytest.approx([h["val_loss"] for h in fresh.history], abs=1e-6)


def test_cross_validation_folds_are_stratified_fixed_and_cover_every_image(tiny_config):
    data = load_data(tiny_config)
    folds = plan_folds(tiny_config, data)
    assert len(folds) == 5 and len(data.labelled) == 36  # train/ and val/ pooled: every labelled image
    val = torch.cat([f.val for f in folds])
    assert sorted(val.tolist()) == list(range(36))  # each image validated exactly once
    for f in folds:
        assert set(f.train.tolist()).isdisjoint(f.val.tolist())
        counts = torch.bincount(data.labelled.labels[f.val], minlength=2)
        assert counts.min() >= 3  # stratified: both classes in every fold
    again = plan_folds(tiny_config.replace(seed=123), load_data(tiny_config))  # another trial, seed or process
    assert all(torch.equal(a.val, b.val) for a, b in zip(folds, again))
    assert plan_folds(tiny_config.replace(cv_folds=1), data) == [data.holdout]
    assert plan_folds(tiny_config.replace(cv_max_images=36), data) == [data.holdout]  # too many images for k trainings


def test_each_epoch_is_scored_out_of_fold_on_every_image(tiny_config):
    result = finetune(tiny_config.replace(epochs=2))
    best = result.best
    assert result.validated == 36 and len(best["fold_scores"]) == 5
    assert result.oof.shape == (36, 2) and np.allclose(result.oof.sum(1), 1, atol=1e-5)  # every image out of fold
    assert sorted(np.unique(result.fold)) == [0, 1, 2, 3, 4]
    labels = load_data(tiny_config).labelled.labels.numpy()
    pred = result.oof.argmax(1)
    assert best["val_accuracy"] == pytest.approx(accuracy_score(labels, pred))
    assert best["val_balanced_accuracy"] == pytest.approx(balanced_accuracy_score(labels, pred))
    assert best["val_f1_macro"] == pytest.approx(f1_score(labels, pred, average="macro"))
    assert all(len(h["fold_scores"]) == 5 for h in result.history)


def test_the_kept_epoch_is_the_best_by_the_chosen_metric(tiny_config):
    cfg = tiny_config.replace(epochs=3, metric="f1_macro", cv_folds=1)
    result = finetune(cfg)
    assert best_of(result.history, "f1_macro") is result.best
    lo, hi, se = result.best["bootstrap"]  # a balanced metric's interval is the bootstrap's
    assert lo <= result.best["val_f1_macro"] <= hi and se >= 0
    assert Estimate.of(result.best, result.validated, "f1_macro").noise >= 1 / 12  # never 0, even at a perfect score
    assert np.isnan(result.oof[load_data(cfg).holdout.train.numpy()]).all()  # a holdout predicts its val images only


def best_of(history, metric):
    return max(history, key=lambda h: score_key(h, metric))


def test_holdout_run_is_one_fold_and_reproduces_the_single_model_run(tiny_config):
    cfg = tiny_config.replace(cv_folds=1, epochs=2)
    result = finetune(cfg)
    data = load_data(cfg)
    assert len(result.members) == 1 and result.validated == len(data.val) == 12
    again = finetune(cfg, data, folds=[data.holdout])
    assert [h["val_loss"] for h in result.history] == [h["val_loss"] for h in again.history]


def test_refit_keeps_the_validated_learning_rate_curve():
    cfg = Config(epochs=6, t_max=None, head_only_epochs=3, patience=2)
    refit = refit_config(cfg, 2)
    assert refit.epochs == 2 and refit.cosine_t_max == 6  # the validated curve, not one squeezed into 2 epochs
    assert refit.head_only_epochs == 2 and refit.patience == 0
    assert [lr_factor(e, 0, refit.cosine_t_max) for e in range(2)] == [lr_factor(e, 0, 6) for e in range(2)]


def test_layer_decay_gives_earlier_stages_lower_rates():
    model, _ = build_model("tiny_cnn", 2)
    opt = make_optimizer(model, Config(head_lr=0.1, base_lr=0.01, layer_decay=0.5, freeze_depth=1))
    rates = {g["name"]: g["lr"] for g in opt.param_groups}
    assert rates == {"head": 0.1, "stage1": pytest.approx(0.005), "stage2": pytest.approx(0.01)}


def test_refit_trains_every_labelled_image_for_the_epoch_the_score_chose(tiny_config):
    from autoft.training.finals import ship

    cfg = tiny_config.replace(epochs=4, final="refit")
    data = load_data(cfg)
    chosen = []
    result = finetune(cfg, data, folds=plan_folds(cfg, data))
    assert result.best["epoch"] < cfg.epochs  # this data peaks early, so the count is a choice
    shipped = ship(cfg, data, result, report=lambda epoch, m: chosen.append(epoch))
    assert len(shipped.history) == result.best["epoch"] == len(chosen)  # no more, no fewer epochs than validated
    assert len(shipped.members) == 1 and not shipped.validated  # one model; nothing was held out to score it
    assert ship(cfg.replace(final="ensemble"), data, result) is result  # the fold models as validated


def test_imbalance_remedies_train_and_the_adjustment_reaches_the_checkpoint(tiny_config, tmp_path):
    from autoft.results.predict import evaluate
    from autoft.training.checkpoint import load_checkpoint
    from autoft.training.run import train

    cfg = tiny_config.replace(
        epochs=2,
        cv_folds=1,
        metric="balanced_accuracy",
        class_weight="balanced",
        balanced_sampling=True,
        logit_adjustment=0.75,
    )
    metrics = train(cfg, tmp_path / "run")
    assert metrics["tau"] == 0.75 and all(h["tau"] == 0.75 for h in metrics["history"])
    assert metrics["best_val_score"] == metrics["best"]["val_balanced_accuracy"]
    ckpt = load_checkpoint(tmp_path / "run" / "model.pt")
    assert ckpt["logit_adjustment"] == {"tau": 0.75, "prior": [0.5, 0.5]}
    ev = evaluate(tmp_path / "run" / "model.pt", split="val", out=tmp_path / "cm.png", device="cpu")
    assert set(ev["metrics"]) == {"accuracy", "balanced_accuracy", "f1_macro"}
