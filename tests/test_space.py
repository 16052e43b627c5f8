import optuna
import pytest

from autoft.config import Config
from autoft.exceptions import ConfigError
from autoft.space import HAND_RECIPE, SearchSpace


def test_default_space_suggests_complete_valid_configs():
    space = SearchSpace.default(num_stages=9, epochs=3)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(20):  # ask/tell with fake values: no training needed to check the space
        trial = study.ask()
        cfg = space.suggest(trial, Config(epochs=3))
        assert 0 <= cfg.freeze_depth <= 9 and 0 <= cfg.head_only_epochs <= 2
        assert 1e-4 <= cfg.head_lr <= 1e-1 and 1e-5 <= cfg.base_lr <= 1e-2
        assert cfg.optimizer in ("sgd", "adam", "adamw") and 0 <= cfg.aug_strength <= 1
        study.tell(trial, cfg.head_lr)
    assert {"freeze_depth", "head_lr", "base_lr", "t_max", "aug_strength"} <= set(study.best_params)


def test_space_file_fixes_and_reshapes(tmp_path):
    f = tmp_path / "space.yaml"
    f.write_text("head_lr: {low: 1e-3, high: 1e-2, log: true}\noptimizer: [adam]\nlabel_smoothing: 0.1\n"
                 "batch_size: {low: 8, high: 16}\n")
    space = SearchSpace.from_yaml(f, num_stages=5, epochs=4)
    trial = optuna.create_study().ask()
    cfg = space.suggest(trial, Config(epochs=4))
    assert 1e-3 <= cfg.head_lr <= 1e-2 and cfg.optimizer == "adam" and cfg.label_smoothing == 0.1
    assert isinstance(cfg.batch_size, int) and 8 <= cfg.batch_size <= 16
    assert "label_smoothing" not in trial.params  # fixed values are not sampled


@pytest.mark.parametrize("text, match", [
    ("head_lr: {low: 0.1, high: 0.01}\n", "greater than high"),
    ("learning_rate: {low: 0.1, high: 1}\n", "unknown parameter"),
    ("freeze_depth: {low: 0, high: 12}\n", "5 stages"),
    ("head_lr: {low: 0, high: 0.1, log: true}\n", "log"),
    ("optimizer: [adam, lion]\n", "optimizer"),
    ("aug_strength: {low: 0, high: 2}\n", "aug_strength"),
    ("head_only_epochs: {low: 0, high: 9}\n", "head_only_epochs"),
    ("data: {low: 1, high: 2}\n", "unknown parameter"),
    ("head_lr: {min: 1, max: 2}\n", "low"),
    ("freeze_depth: {low: 0.5, high: 2}\n", "whole numbers"),
])
def test_invalid_space_is_one_line_error(tmp_path, text, match):
    f = tmp_path / "space.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=match) as err:
        SearchSpace.from_yaml(f, num_stages=5, epochs=4)
    assert "\n" not in str(err.value)


def test_hand_recipe_is_clipped_into_the_space():
    space = SearchSpace.default(num_stages=9, epochs=3)
    recipe = space.hand_recipe()
    assert recipe["t_max"] == HAND_RECIPE["t_max"] == 10 and recipe["optimizer"] == "adam"
    assert recipe["head_lr"] == pytest.approx(10 * recipe["base_lr"])
    narrow = SearchSpace.default(num_stages=9, epochs=3)
    narrow.params["t_max"] = narrow.params["t_max"].__class__(1, 4, kind="int")
    assert narrow.hand_recipe()["t_max"] == 4


@pytest.mark.parametrize("text, match", [
    ("head_lr: .nan\n", "search space: head_lr: nan is not a finite number"),
    ("head_lr: {low: .nan, high: 1}\n", "search space: head_lr low: nan is not a finite number"),
    ("head_lr: {low: 1e-4, high: .inf, log: true}\n", "search space: head_lr high: inf is not a finite number"),
    ("weight_decay: [1e-4, .nan]\n", "search space: weight_decay: nan is not a finite number"),
    ("label_smoothing: nan\n", "search space: label_smoothing: nan is not a finite number"),
    ("epochs: .inf\n", "search space: epochs: inf is not a finite number"),
    ("batch_size: [8, 2.5]\n", "search space: batch_size: expected an integer"),
])
def test_non_finite_space_values_are_refused_before_any_trial(tmp_path, text, match):
    f = tmp_path / "space.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=match) as err:
        SearchSpace.from_yaml(f, num_stages=5, epochs=4)
    assert "\n" not in str(err.value)


def test_space_numbers_in_every_spelling(tmp_path):
    f = tmp_path / "space.yaml"
    f.write_text("head_lr: 1e-3\nbase_lr: {low: 1E-5, high: .001, log: true}\nweight_decay: [1e-4, 1E-3, .001]\n"
                 "batch_size: {low: 8, high: 1.6e1}\nfreeze_depth: [0, 2e0]\nwarmup_epochs: 1e0\n")
    space = SearchSpace.from_yaml(f, num_stages=5, epochs=4)
    p = space.params
    assert p["head_lr"].value == 0.001 and p["warmup_epochs"].value == 1 and isinstance(p["warmup_epochs"].value, int)
    assert (p["base_lr"].low, p["base_lr"].high) == (1e-5, 1e-3)
    assert p["weight_decay"].choices == (1e-4, 1e-3, 1e-3) and p["freeze_depth"].choices == (0, 2)
    assert (p["batch_size"].low, p["batch_size"].high, p["batch_size"].kind) == (8, 16, "int")
    cfg = space.suggest(optuna.create_study().ask(), Config(epochs=4))
    assert cfg.head_lr == 0.001 and 1e-5 <= cfg.base_lr <= 1e-3 and 8 <= cfg.batch_size <= 16
