import math

import pytest
import torch

from autoft.backbones import build_model
from autoft.config import Config
from autoft.exceptions import ConfigError, TrialFailure
from autoft.finetune import finetune, load_data, lr_factor, make_optimizer


def test_learnable_task_beats_chance_by_a_wide_margin(tiny_config):
    result = finetune(tiny_config.replace(epochs=6, aug_strength=0.2, head_lr=0.02, base_lr=0.01))
    assert result.best["val_accuracy"] >= 0.9  # chance is 0.5
    assert len(result.history) == 6 and result.classes == ["cat", "dog"]


def test_frozen_stages_stay_bit_identical_and_the_rest_change(tiny_config):
    cfg = tiny_config.replace(freeze_depth=1, epochs=2, aug_strength=0.3)
    start, _ = build_model(cfg.backbone, 2, seed=cfg.seed)
    result = finetune(cfg)
    after = result.last_state_dict
    before = start.state_dict()
    frozen = [k for k in before if k.startswith("stages.0.")]
    trained = [k for k in before if k.startswith(("stages.1.", "stages.2.")) and before[k].is_floating_point()]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)  # BN running stats too
    assert all(not torch.equal(before[k], after[k]) for k in trained if k.endswith("weight"))


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

    result = finetune(cfg, report=report)
    assert seen == {0: True, 1: True}
    stem = "stages.0.0.weight"
    assert not torch.equal(start.state_dict()[stem], result.last_state_dict[stem])  # unfrozen in epoch 2


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

    ft = importlib.import_module("autoft.finetune")
    cfg = tiny_config.replace(freeze_depth=2, epochs=2)
    cached = ft.finetune(cfg)
    ft.clear_caches()
    old = ft.FEATURE_CACHE_BYTES
    ft.FEATURE_CACHE_BYTES = 0  # nothing fits: every call recomputes
    try:
        fresh = ft.finetune(cfg)
    finally:
        ft.FEATURE_CACHE_BYTES = old
    assert [h["val_loss"] for h in cached.history] == pytest.approx([h["val_loss"] for h in fresh.history], abs=1e-6)
