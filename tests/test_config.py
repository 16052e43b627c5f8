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


@pytest.mark.parametrize("values, key", [
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
])
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
