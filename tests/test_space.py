import optuna
import pytest

from autoft.config import Config
from autoft.exceptions import ConfigError
from autoft.space import PORTFOLIO, SearchSpace

R18 = Config(backbone="resnet18", epochs=4)  # 5 stages, native 224; building its spec downloads nothing


def test_default_space_suggests_complete_valid_configs():
    space = SearchSpace.default(epochs=3)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))
    sizes = set()
    for _ in range(40):  # ask/tell with fake values: no training needed to check the space
        trial = study.ask()
        cfg = space.suggest(trial, Config(epochs=3))
        assert 0 <= cfg.freeze_depth <= 9 and 0 <= cfg.head_only_epochs <= 2
        assert 0.5 <= cfg.layer_decay <= 1.0
        sizes.add(cfg.image_size)
        assert 1e-4 <= cfg.head_lr <= 1e-1 and 1e-5 <= cfg.base_lr <= 1e-2
        assert cfg.optimizer in ("sgd", "adam", "adamw") and 0 <= cfg.aug_strength <= 1
        study.tell(trial, cfg.head_lr)
    assert {"freeze_depth", "head_lr", "base_lr", "t_max", "aug_strength", "image_size"} <= set(study.best_params)
    assert sizes == {128, 160, 192, 224}  # resolution is searched: about half to the native 224, one step of 32 apart


def test_space_file_fixes_and_reshapes(tmp_path):
    f = tmp_path / "space.yaml"
    f.write_text(
        "head_lr: {low: 1e-3, high: 1e-2, log: true}\noptimizer: [adam]\nlabel_smoothing: 0.1\n"
        "batch_size: {low: 8, high: 16}\n"
    )
    space = SearchSpace.from_yaml(f, R18)
    trial = optuna.create_study().ask()
    cfg = space.suggest(trial, Config(epochs=4))
    assert 1e-3 <= cfg.head_lr <= 1e-2 and cfg.optimizer == "adam" and cfg.label_smoothing == 0.1
    assert isinstance(cfg.batch_size, int) and 8 <= cfg.batch_size <= 16
    assert "label_smoothing" not in trial.params  # fixed values are not sampled


@pytest.mark.parametrize(
    "text, match",
    [
        ("head_lr: {low: 0.1, high: 0.01}\n", "greater than high"),
        ("learning_rate: {low: 0.1, high: 1}\n", "unknown parameter"),
        ("freeze_depth: {low: 0, high: 12}\n", "resnet18 has 5 stages"),
        ("head_lr: {low: 0, high: 0.1, log: true}\n", "log"),
        ("optimizer: [adam, lion]\n", "optimizer"),
        ("aug_strength: {low: 0, high: 2}\n", "aug_strength"),
        ("head_only_epochs: {low: 0, high: 9}\n", "head_only_epochs"),
        ("data: {low: 1, high: 2}\n", "unknown parameter"),
        ("head_lr: {min: 1, max: 2}\n", "low"),
        ("freeze_depth: {low: 0.5, high: 2}\n", "expected an integer"),
        ("image_size: {low: 100, high: 224, step: 32}\n", "does not divide"),
        ("image_size: {low: 128, high: native/2}\n", "native/2 is a low bound only"),
        ("head_lr: {low: native, high: 1}\n", "head_lr low"),
        ("backbone: [efficientnet_lite0, no_such_net]\n", "unknown backbone 'no_such_net'"),
        ("cv_folds: [3, 5]\n", "unknown parameter"),
    ],
)
def test_invalid_space_is_one_line_error(tmp_path, text, match):
    f = tmp_path / "space.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=match) as err:
        SearchSpace.from_yaml(f, R18)
    assert "\n" not in str(err.value)


def test_portfolio_recipes_resolve_per_backbone_and_clip_into_the_space():
    base = Config(epochs=3, image_size=128)
    recipes = dict(SearchSpace.default(epochs=3).portfolio(base))
    assert list(recipes) == list(PORTFOLIO)  # the probe first: cheap, and the others' yardstick
    probe = recipes["linear_probe"]
    assert probe["freeze_depth"] == 9 and probe["image_size"] == 224 and probe["aug_strength"] == 0.0  # native size
    assert probe["t_max"] == 3  # "epochs": the cosine spans the run
    assert recipes["hand_recipe"]["t_max"] == 10 and recipes["hand_recipe"]["optimizer"] == "adam"
    assert recipes["hand_recipe"]["head_lr"] == pytest.approx(10 * recipes["hand_recipe"]["base_lr"])
    assert recipes["freeze_unfreeze"]["head_only_epochs"] == 1 and recipes["freeze_unfreeze"]["layer_decay"] < 1
    assert all(r["image_size"] == 128 for name, r in recipes.items() if name != "linear_probe")  # the base size
    narrow = SearchSpace.default(epochs=3)
    narrow.params["t_max"] = narrow.params["t_max"].__class__(1, 4, kind="int")
    del narrow.params["optimizer"]
    clipped = dict(narrow.portfolio(base))["hand_recipe"]
    assert clipped["t_max"] == 4 and "optimizer" not in clipped  # into the range; unsearched keys left out


def test_conditional_space_never_leaves_the_chosen_backbone():
    base = Config(epochs=3)
    space = SearchSpace.default(epochs=3, backbones=["efficientnet_lite0", "tiny_cnn"])
    space.validate(base)
    study = optuna.create_study(
        direction="maximize",
        sampler=optuna.samplers.TPESampler(seed=0, multivariate=True, group=True, n_startup_trials=5),
    )
    for _ in range(30):
        trial = study.ask()
        cfg = space.suggest(trial, base)
        stages, native = {"efficientnet_lite0": (9, 224), "tiny_cnn": (3, 32)}[cfg.backbone]
        assert 0 <= cfg.freeze_depth <= stages and native // 2 <= cfg.image_size <= native
        # a parameter whose range differs by backbone is sampled under that backbone's own name
        assert f"image_size@{cfg.backbone}" in trial.params and "image_size" not in trial.params
        assert f"freeze_depth@{cfg.backbone}" in trial.params
        assert "head_lr" in trial.params  # the same range everywhere: one name
        study.tell(trial, cfg.image_size / native + cfg.freeze_depth / stages)
    assert {t.params["backbone"] for t in study.trials} == {"efficientnet_lite0", "tiny_cnn"}
    recipes = dict(space.portfolio(base))
    assert {"linear_probe@efficientnet_lite0", "linear_probe@tiny_cnn", "hand_recipe"} <= set(recipes)
    assert (
        recipes["linear_probe@tiny_cnn"]["backbone"] == "tiny_cnn"
        and recipes["hand_recipe"]["backbone"] == "efficientnet_lite0"
    )
    assert recipes["linear_probe@tiny_cnn"]["freeze_depth@tiny_cnn"] == 3
    assert recipes["linear_probe@tiny_cnn"]["image_size@tiny_cnn"] == 32


def test_symbolic_bounds_round_trip_through_the_stored_space():
    space = SearchSpace.default(epochs=3)
    again = SearchSpace.from_dict(space.to_dict())
    assert again.to_dict() == space.to_dict() and again.params["image_size"].low == "native/2"
    again.validate(Config(epochs=3, backbone="efficientnet_lite2"))  # 260 px native: 132..260 in steps of 32
    assert again.params["image_size"].resolve(__import__("autoft").get_backbone("efficientnet_lite2")).low == 132


@pytest.mark.parametrize(
    "text, match",
    [
        ("head_lr: .nan\n", "search space: head_lr: nan is not a finite number"),
        ("head_lr: {low: .nan, high: 1}\n", "search space: head_lr low: nan is not a finite number"),
        ("head_lr: {low: 1e-4, high: .inf, log: true}\n", "search space: head_lr high: inf is not a finite number"),
        ("weight_decay: [1e-4, .nan]\n", "search space: weight_decay: nan is not a finite number"),
        ("label_smoothing: nan\n", "search space: label_smoothing: nan is not a finite number"),
        ("epochs: .inf\n", "search space: epochs: inf is not a finite number"),
        ("batch_size: [8, 2.5]\n", "search space: batch_size: expected an integer"),
    ],
)
def test_non_finite_space_values_are_refused_before_any_trial(tmp_path, text, match):
    f = tmp_path / "space.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=match) as err:
        SearchSpace.from_yaml(f, R18)
    assert "\n" not in str(err.value)


def test_space_numbers_in_every_spelling(tmp_path):
    f = tmp_path / "space.yaml"
    f.write_text(
        "head_lr: 1e-3\nbase_lr: {low: 1E-5, high: .001, log: true}\nweight_decay: [1e-4, 1E-3, .001]\n"
        "batch_size: {low: 8, high: 1.6e1}\nfreeze_depth: [0, 2e0]\nwarmup_epochs: 1e0\n"
    )
    space = SearchSpace.from_yaml(f, R18)
    p = space.params
    assert p["head_lr"].value == 0.001 and p["warmup_epochs"].value == 1 and isinstance(p["warmup_epochs"].value, int)
    assert (p["base_lr"].low, p["base_lr"].high) == (1e-5, 1e-3)
    assert p["weight_decay"].choices == (1e-4, 1e-3, 1e-3) and p["freeze_depth"].choices == (0, 2)
    assert (p["batch_size"].low, p["batch_size"].high, p["batch_size"].kind) == (8, 16, "int")
    cfg = space.suggest(optuna.create_study().ask(), Config(epochs=4))
    assert cfg.head_lr == 0.001 and 1e-5 <= cfg.base_lr <= 1e-3 and 8 <= cfg.batch_size <= 16
