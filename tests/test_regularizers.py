"""The regularizers from timm and torchvision (Mixup, CutMix, the weight average, stochastic depth, TrivialAugment):
exactly off at their neutral value, live at any other, and drawing from their own random streams."""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch
from timm.layers import DropPath

from autoft.backbones import build_model, set_drop_path
from autoft.training import probe
from autoft.training.loop import Regularizers, finetune

ON = {"mixup": 0.4, "cutmix": 1.0, "ema_decay": 0.99, "trivial_augment": True}
NEUTRAL = {"mixup": 0.0, "cutmix": 0.0, "ema_decay": 0.0, "trivial_augment": False, "drop_path_rate": 0.0}


def _weights(result):
    return [torch.cat([v.flatten().float() for v in m.values()]) for m in result.members]


def _run(cfg):
    """A seeded run, and the global random streams as it leaves them."""
    result = finetune(cfg)
    return result, torch.random.get_rng_state(), np.random.get_state()[1]


@pytest.fixture
def base(tiny_config):
    return tiny_config.replace(epochs=2, aug_strength=0.3, cv_folds=2, batch_size=7, tta="none")  # odd last batches


def test_at_their_neutral_values_no_regularizer_code_runs_and_the_run_is_bit_for_bit_the_same(base, monkeypatch):
    reference, torch_state, numpy_state = _run(base.replace(**NEUTRAL))
    finetune_module = importlib.import_module("autoft.training.loop")

    def refuse(*args, **kwargs):
        raise AssertionError("a regularizer was built at its neutral value")

    monkeypatch.setattr(finetune_module, "Regularizers", refuse)
    monkeypatch.setattr(finetune_module, "set_drop_path", refuse)
    again, torch_again, numpy_again = _run(base.replace(**NEUTRAL))
    assert all(torch.equal(a, b) for a, b in zip(_weights(reference), _weights(again)))
    assert torch.equal(torch_state, torch_again) and np.array_equal(numpy_state, numpy_again)


@pytest.mark.parametrize("key", list(ON))
def test_each_regularizer_changes_the_run_and_leaves_the_global_random_streams_alone(base, key):
    off, torch_off, numpy_off = _run(base)
    on, torch_on, numpy_on = _run(base.replace(**{key: ON[key]}))
    assert not all(torch.equal(a, b) for a, b in zip(_weights(off), _weights(on)))  # it is live
    assert torch.equal(torch_off, torch_on) and np.array_equal(numpy_off, numpy_on)  # its draws are its own
    again, _, _ = _run(base.replace(**{key: ON[key]}))
    assert all(torch.equal(a, b) for a, b in zip(_weights(on), _weights(again)))  # and seeded


def test_augmenting_regularizers_make_a_probe_train_by_epochs_and_the_others_leave_it_exact(base):
    frozen = base.replace(freeze_depth=3, aug_strength=0.0)
    assert probe.applies(frozen.replace(ema_decay=0.9, drop_path_rate=0.1), 3)  # nothing trains but the fitted head
    for key in ("mixup", "cutmix", "trivial_augment"):
        assert not probe.applies(frozen.replace(**{key: ON[key]}), 3)  # the features change every epoch


def test_mixup_targets_are_timms_and_an_odd_last_image_keeps_its_own_class(base):
    model = build_model("tiny_cnn", 3)[0]
    extra = Regularizers(base.replace(mixup=0.4, label_smoothing=0.1), model, 3, seed=5)
    x, y = torch.rand(5, 3, 8, 8), torch.tensor([0, 1, 2, 0, 1])
    last = x[4].clone()
    mixed, target = extra.mixed(x, y)
    assert target.shape == (5, 3) and torch.allclose(target.sum(1), torch.ones(5))
    assert torch.equal(mixed[4], last) and target[4].argmax() == 1
    assert target[4].max() == pytest.approx(1 - 0.1 + 0.1 / 3)  # its own class, label-smoothed
    assert torch.allclose(target[0], target[3])  # images 0 and 3 (both class 0) mixed with each other: i with n-1-i
    assert target[1, 1] == target[2, 2] and target[1, 2] == target[2, 1]  # 1 and 2 likewise, one share each way


def test_drop_path_skips_residual_blocks_in_training_only_rising_to_the_rate():
    model, _ = build_model("efficientnet_lite0", 2, weights="random")
    reference, _ = build_model("efficientnet_lite0", 2, weights="random")
    n = set_drop_path(model, 0.2)
    rates = [m.drop_path.drop_prob for m in model.modules() if isinstance(getattr(m, "drop_path", None), DropPath)]
    assert n == 16 and len(rates) == 15 and rates[-1] == pytest.approx(0.2 * 15 / 16) and rates == sorted(rates)
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), reference.eval()(x))  # eval: the model as shipped, unchanged
        torch.manual_seed(0)
        assert not torch.equal(model.train()(x), reference.train()(x))


def test_a_study_begun_before_these_keys_resumes_with_their_defaults(tiny_config):
    import optuna

    from autoft.exceptions import ConfigError
    from autoft.results import records
    from autoft.space import SearchSpace

    space = SearchSpace.default(tiny_config.epochs)
    study = optuna.create_study(direction="maximize")
    records.write_study_meta(study, tiny_config, space, 0)
    new = {*NEUTRAL, "tta"}
    study.set_user_attr(records.BASE, {k: v for k, v in study.user_attrs[records.BASE].items() if k not in new})
    records.check_same_meta(study, tiny_config, space)  # the keys it lacks read as their defaults
    with pytest.raises(ConfigError, match="mixup"):
        records.check_same_meta(study, tiny_config.replace(mixup=0.2), space)
