import pytest
import yaml

from autoft.config import Config
from autoft.exceptions import ConfigError


def test_defaults_are_valid_and_data_alone_is_a_config(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("data: /some/where\n")
    cfg = Config.from_yaml(f)
    assert cfg.data == "/some/where"
    assert cfg == Config(data="/some/where")
    assert cfg.cosine_t_max == cfg.epochs  # t_max defaults to the epoch count


def test_yaml_round_trip_keeps_every_key(tmp_path):
    cfg = Config(data="d", epochs=7, head_lr=0.05, optimizer="sgd", t_max=3, aug_strength=0.25)
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump(cfg.to_dict()))
    assert Config.from_yaml(f) == cfg


def test_export_result_block_is_ignored_on_read(tmp_path):
    f = tmp_path / "best.yaml"
    f.write_text(yaml.safe_dump({**Config(epochs=2).to_dict(), "result": {"val_accuracy": 0.9}}))
    assert Config.from_yaml(f).epochs == 2


@pytest.mark.parametrize(
    "values, key",
    [
        ({"epochs": "three"}, "epochs"),
        ({"epochs": True}, "epochs"),
        ({"head_lr": "fast"}, "head_lr"),
        ({"head_lr": 0}, "head_lr"),
        ({"aug_strength": 1.5}, "aug_strength"),
        ({"optimizer": "rmsprop"}, "optimizer"),
        ({"label_smoothing": 1.0}, "label_smoothing"),
        ({"device": "tpu"}, "device"),
        ({"image_size": 4}, "image_size"),
        ({"head_only_epochs": 9, "epochs": 3}, "head_only_epochs"),
        ({"skip_bad_images": "yes"}, "skip_bad_images"),
        ({"learning_rate": 0.1}, "learning_rate"),
    ],
)
def test_bad_values_name_the_key_in_one_line(values, key):
    with pytest.raises(ConfigError) as err:
        Config.from_dict(values)
    msg = str(err.value)
    assert key in msg and "\n" not in msg


def test_ints_given_as_whole_floats_and_nulls_are_accepted():
    cfg = Config.from_dict({"epochs": 4.0, "t_max": "none", "head_lr": 1})
    assert cfg.epochs == 4 and isinstance(cfg.epochs, int)
    assert cfg.t_max is None and cfg.head_lr == 1.0


@pytest.mark.parametrize("text", ["data: [unclosed\n", "- a list\n- not a mapping\n"])
def test_invalid_yaml_is_a_config_error(tmp_path, text):
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError, match="bad.yaml"):
        Config.from_yaml(f)


def test_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        Config.from_yaml(tmp_path / "nope.yaml")


# --- numbers as people write them ---------------------------------------------------------------------------

import dataclasses  # noqa: E402

FLOAT_KEYS = [f.name for f in dataclasses.fields(Config) if str(f.type).startswith("float")]
INT_KEYS = [f.name for f in dataclasses.fields(Config) if str(f.type).startswith("int")]
SPELLINGS = ["1e-3", "1E-3", ".001", "0.001", "+1e-3", "1.0e-3"]
NON_FINITE = [float("nan"), float("inf"), float("-inf"), "nan", "inf", "-inf", ".nan", ".NaN", ".inf", "-.inf"]


def test_every_float_and_int_key_is_covered():
    assert sorted(FLOAT_KEYS) == sorted(
        [
            "head_lr",
            "base_lr",
            "layer_decay",
            "momentum",
            "weight_decay",
            "aug_strength",
            "label_smoothing",
            "val_fraction",
            "logit_adjustment",
            "mixup",
            "cutmix",
            "ema_decay",
            "drop_path_rate",
        ]
    )
    assert {"image_size", "batch_size", "epochs", "t_max", "seed"} <= set(INT_KEYS)


def _cli_config(args, tmp_path, monkeypatch):
    from autoft.cli import build_parser, resolve_config

    monkeypatch.chdir(tmp_path)  # no ./autoft.yaml to pick up
    return resolve_config(build_parser().parse_args(["train", *args]))[0]


@pytest.mark.parametrize("key", FLOAT_KEYS)
def test_float_keys_take_every_common_spelling(key, tmp_path, monkeypatch):
    for text in SPELLINGS:
        assert getattr(Config.from_dict({key: text}), key) == pytest.approx(0.001), text
        f = tmp_path / "c.yaml"
        f.write_text(f"{key}: {text}\n")  # unquoted: YAML 1.1 reads 1e-3 (no dot) as a string
        assert getattr(Config.from_yaml(f), key) == pytest.approx(0.001), text
        cfg = _cli_config(["--" + key.replace("_", "-"), text], tmp_path, monkeypatch)
        assert getattr(cfg, key) == pytest.approx(0.001) and isinstance(getattr(cfg, key), float), text


@pytest.mark.parametrize("key", FLOAT_KEYS)
def test_non_finite_floats_are_refused_naming_the_key(key):
    for value in NON_FINITE:
        with pytest.raises(ConfigError) as err:
            Config.from_dict({key: value})
        msg = str(err.value)
        assert f"config key {key!r}" in msg and "not a finite number" in msg and "\n" not in msg, value


@pytest.mark.parametrize("key", FLOAT_KEYS + INT_KEYS)
def test_non_finite_from_yaml_and_flags_is_one_line_naming_the_key(key, tmp_path, monkeypatch):
    f = tmp_path / "c.yaml"
    f.write_text(f"{key}: .nan\n")
    with pytest.raises(ConfigError, match=f"'{key}': nan is not a finite number") as err:
        Config.from_yaml(f)
    assert "\n" not in str(err.value)
    for text in (".nan", "-.inf", "nan"):
        with pytest.raises(ConfigError, match=f"'{key}'.*not a finite number"):
            _cli_config(["--" + key.replace("_", "-") + "=" + text], tmp_path, monkeypatch)


@pytest.mark.parametrize("key", INT_KEYS)
def test_int_keys_take_whole_numbers_in_any_spelling_only(key):
    extra = {"epochs": 20} if key == "head_only_epochs" else {}
    for text in ("2e1", "2.0E1", "+20", "20.0"):
        value = getattr(Config.from_dict({key: text, **extra}), key)
        assert value == 20 and isinstance(value, int)
    with pytest.raises(ConfigError, match=f"'{key}': expected an integer, got '2.5'"):
        Config.from_dict({key: "2.5"})


@pytest.mark.parametrize("key", FLOAT_KEYS)
def test_bools_are_not_numbers(key):
    with pytest.raises(ConfigError, match=f"'{key}': expected a number"):
        Config.from_dict({key: True})


def test_parse_number_keeps_big_integers_exact():
    from autoft.config import parse_number

    assert parse_number("4294967295", "seed", integer=True) == 2**32 - 1
    assert parse_number("1_000", "epochs", integer=True) == 1000
    assert Config.from_dict({"seed": "4294967295"}).seed == 2**32 - 1


@pytest.mark.parametrize("typed", ["2024", "0123", "1e3", "yes", "0x1F", "3.10"])
def test_a_path_key_stays_as_typed_in_yaml_and_flags(typed, tmp_path, monkeypatch):
    """YAML would read these as 2024, 83, 1000.0, True, 31 and 3.1: a folder name is never a number."""
    from autoft.cli import build_parser, resolve_config

    monkeypatch.chdir(tmp_path)
    (tmp_path / "c.yaml").write_text(f"data: {typed}\nweights: {typed}\nlabels: {typed}\nepochs: 2\n")
    cfg = Config.from_yaml(tmp_path / "c.yaml")
    assert (cfg.data, cfg.weights, cfg.labels, cfg.epochs) == (typed, typed, typed, 2)
    args = build_parser().parse_args(["train", "--data", typed, "--weights", typed, "--labels", typed])
    cfg, _ = resolve_config(args)
    assert (cfg.data, cfg.weights, cfg.labels) == (typed, typed, typed)
    args = build_parser().parse_args(["train", "--config", "c.yaml"])
    assert resolve_config(args)[0].data == typed


def test_path_keys_expand_home_and_environment_variables(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("PHOTOS", "pics")
    (tmp_path / "c.yaml").write_text("data: ~/photos\nweights: $HOME/w.pt\nlabels: ${HOME}/x/${PHOTOS}.csv\n")
    cfg = Config.from_yaml(tmp_path / "c.yaml")
    assert cfg.data == str(tmp_path / "home" / "photos")
    assert cfg.weights == str(tmp_path / "home" / "w.pt")
    assert cfg.labels == str(tmp_path / "home" / "x" / "pics.csv")
    assert Config(data=tmp_path / "d").data == str(tmp_path / "d")  # a PathLike from Python
    assert Config(weights="random").weights == "random" and Config(data="null").data is None
    with pytest.raises(
        ConfigError, match=r"config key 'data': environment variable \$NOPE_X in '\$NOPE_X/a' is not set"
    ):
        Config(data="$NOPE_X/a")
