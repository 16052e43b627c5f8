"""The one typed config: CLI flags and YAML files become a `Config`; exports write it back unchanged."""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field, fields
from typing import Any

import yaml

from .estimate import METRICS
from .exceptions import ConfigError

OPTIMIZERS = ("sgd", "adam", "adamw")
# always a path as typed: `2024` and `0123` stay strings; ~ and $VARS expand
PATH_KEYS = ("data", "weights", "labels", "val_labels", "test_labels")
TEXT_KEYS = (*PATH_KEYS, "path_column", "label_column")  # read as typed: paths, and column names (`1` is a name)
FINALS = ("ensemble", "refit", "soup")
CLASS_WEIGHTS = ("none", "sqrt", "balanced")
TTA = ("auto", "none", "flip")
_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


def _rng(lo=None, hi=None, lo_open=False, hi_open=False, choices=None):
    return {"lo": lo, "hi": hi, "lo_open": lo_open, "hi_open": hi_open, "choices": choices}


@dataclass
class Config:
    """Everything one fine-tune needs. Every key has a default, so `data:` alone is a valid file."""

    data: str | None = field(
        default=None, metadata={"help": "dataset root (train/<class>/...); none = built-in digits demo"}
    )
    labels: str | None = field(
        default=None,
        metadata={
            "help": "CSV file with columns path,label[,split] (paths relative to its folder), instead of class folders",
            "metavar": "FILE.csv",
        },
    )
    val_labels: str | None = field(
        default=None,
        metadata={
            "help": "CSV file of the val rows (path,label), when they are not in the labels file",
            "metavar": "FILE.csv",
        },
    )
    test_labels: str | None = field(
        default=None,
        metadata={"help": "CSV file of the test rows (path,label), only ever scored", "metavar": "FILE.csv"},
    )
    path_column: str = field(
        default="path",
        metadata={
            "help": "the labels CSVs' column of image paths (an exact match first, else case-insensitive)",
            "metavar": "NAME",
        },
    )
    label_column: str = field(
        default="label", metadata={"help": "the labels CSVs' column of class names", "metavar": "NAME"}
    )
    backbone: str = field(
        default="efficientnet_lite0",
        metadata={
            "help": "registered backbone, torchvision name or timm/NAME; autoft search: auto (compare the "
            "offline ones) unless one is set (default: efficientnet_lite0)"
        },
    )
    weights: str | None = field(
        default=None,
        metadata={"help": "state-dict file; none = the backbone's pretrained weights; 'random' = no pretraining"},
    )
    image_size: int = field(default=128, metadata=_rng(16, 1024) | {"help": "input side in pixels (square)"})
    batch_size: int = field(default=32, metadata=_rng(1, 4096) | {"help": "images per training step"})
    epochs: int = field(default=5, metadata=_rng(1, 10000) | {"help": "passes over the training images"})
    epoch_images: int = field(
        default=0,
        metadata=_rng(0, 10**9)
        | {
            "help": "training images per epoch, a fresh seeded draw each epoch (fixed steps, or a cheap fidelity on a "
            "large set); 0 = every training image"
        },
    )
    freeze_depth: int = field(default=0, metadata=_rng(0, 1000) | {"help": "leading backbone stages kept frozen"})
    head_only_epochs: int = field(
        default=0, metadata=_rng(0, 10000) | {"help": "epochs that train only the head before unfreezing"}
    )
    head_lr: float = field(default=1e-2, metadata=_rng(0, 10, lo_open=True) | {"help": "learning rate of the new head"})
    base_lr: float = field(
        default=1e-3, metadata=_rng(0, 10, lo_open=True) | {"help": "learning rate of the unfrozen backbone stages"}
    )
    layer_decay: float = field(
        default=1.0,
        metadata=_rng(0, 1, lo_open=True)
        | {
            "help": "each earlier unfrozen stage trains at this times the rate of the stage after it (1 = all "
            "at base_lr)"
        },
    )
    optimizer: str = field(default="adamw", metadata=_rng(choices=OPTIMIZERS) | {"help": "optimizer"})
    momentum: float = field(
        default=0.9, metadata=_rng(0, 1, hi_open=True) | {"help": "momentum of the sgd optimizer (Nesterov)"}
    )
    weight_decay: float = field(default=1e-4, metadata=_rng(0, 1) | {"help": "weight decay (decoupled for adamw)"})
    t_max: int | None = field(
        default=None, metadata=_rng(1, 10000) | {"help": "cosine period in epochs; none = epochs"}
    )
    warmup_epochs: int = field(default=0, metadata=_rng(0, 10000) | {"help": "epochs of linear learning-rate warmup"})
    aug_strength: float = field(
        default=0.5, metadata=_rng(0, 1) | {"help": "data augmentation, 0 (none) to 1 (strong)"}
    )
    label_smoothing: float = field(
        default=0.0, metadata=_rng(0, 1, hi_open=True) | {"help": "label smoothing of the loss"}
    )
    trivial_augment: bool = field(
        default=False,
        metadata={
            "help": "TrivialAugment (torchvision's TrivialAugmentWide): one random operation at a random magnitude per "
            "training image, before the aug_strength crop and flip"
        },
    )
    mixup: float = field(
        default=0.0,
        metadata=_rng(0, 10)
        | {
            "help": "Mixup's alpha (timm.data.Mixup): each training batch mixed with itself reversed by a Beta(alpha, "
            "alpha) share, targets too; 0 = off"
        },
    )
    cutmix: float = field(
        default=0.0,
        metadata=_rng(0, 10)
        | {
            "help": "CutMix's alpha (timm.data.Mixup): a box of a Beta(alpha, alpha) share of each training image "
            "pasted from another, targets mixed by area; 0 = off (with mixup too, each batch gets one of them)"
        },
    )
    ema_decay: float = field(
        default=0.0,
        metadata=_rng(0, 1, hi_open=True)
        | {
            "help": "an exponential moving average of the weights (timm.utils.ModelEmaV3, with its warmup) is "
            "validated and shipped; its decay per step, 0 = off"
        },
    )
    drop_path_rate: float = field(
        default=0.0,
        metadata=_rng(0, 1, hi_open=True)
        | {
            "help": "stochastic depth: each residual block of the stages that train is skipped in training with a "
            "probability rising linearly to this at the last (timm's drop_path_rate); 0 = off"
        },
    )
    patience: int = field(
        default=0, metadata=_rng(0, 10000) | {"help": "stop after this many epochs without improvement; 0 = never"}
    )
    seed: int = field(
        default=0, metadata=_rng(0, 2**32 - 1) | {"help": "random seed (a search derives each trial's from it)"}
    )
    device: str = field(default="auto", metadata={"help": "auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N, mps"})
    skip_bad_images: bool = field(default=False, metadata={"help": "skip unreadable images instead of stopping"})
    val_fraction: float = field(
        default=0.2,
        metadata=_rng(0, 1, lo_open=True, hi_open=True) | {"help": "share of train held out when there is no val/"},
    )
    cv_folds: int = field(
        default=5,
        metadata=_rng(1, 20)
        | {
            "help": "score on every labelled image (train/ and val/) by stratified k-fold cross-validation; 1 = "
            "the holdout"
        },
    )
    cv_max_images: int = field(
        default=5000,
        metadata=_rng(0, 10**9)
        | {"help": "from this many labelled images on, validate on the holdout instead: k folds cost k trainings"},
    )
    final: str = field(
        default="ensemble",
        metadata=_rng(choices=FINALS)
        | {
            "help": "what is shipped: the validated fold models averaged as one model (ensemble), their uniform weight "
            "average (soup: one model's cost), or one model refit on every labelled image for the epochs "
            "cross-validation chose"
        },
    )
    metric: str = field(
        default="accuracy",
        metadata=_rng(choices=METRICS)
        | {
            "help": "what every epoch is scored, pruned, selected and reported on (balanced ones for imbalanced "
            "classes)"
        },
    )
    class_weight: str = field(
        default="none",
        metadata=_rng(choices=CLASS_WEIGHTS)
        | {
            "help": "weights of the loss per class: balanced = inverse class frequency (sklearn), sqrt = its "
            "square root"
        },
    )
    balanced_sampling: bool = field(
        default=False,
        metadata={
            "help": "draw each epoch's training images with probability inversely proportional to their class's size"
        },
    )
    logit_adjustment: float | str = field(
        default=0.0,
        metadata=_rng(0, 10)
        | {
            "words": ("auto",),
            "help": "tau of post-hoc logit adjustment, logits - tau * log(class prior) (Menon et al. 2021); "
            "auto = chosen on the out-of-fold predictions from 0, 0.25, ..., 2",
        },
    )
    tta: str = field(
        default="auto",
        metadata=_rng(choices=TTA)
        | {
            "help": "test-time augmentation: flip = the mean of the logits on the image and on its mirror image "
            "(not for data where a mirror image is another class); auto = flip where it scores better out of fold"
        },
    )

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in PATH_KEYS:
                value = expand_path(value, f.name)
            setattr(self, f.name, _check(f, value))
        if self.head_only_epochs > self.epochs:
            raise ConfigError(
                f"config key 'head_only_epochs': {self.head_only_epochs} is more than epochs ({self.epochs})"
            )
        for key in ("val_labels", "test_labels"):
            if getattr(self, key) is not None and self.labels is None:
                raise ConfigError(f"config key {key!r} needs 'labels' too: the CSV of the train rows (--labels FILE)")
        for key in ("path_column", "label_column"):
            if not getattr(self, key).strip():
                raise ConfigError(f"config key {key!r}: a column name is required")
        if not _DEVICE.match(self.device):
            raise ConfigError(f"config key 'device': {self.device!r} is not auto, cpu, cuda, cuda:N or mps")

    @property
    def cosine_t_max(self) -> int:
        return self.t_max or self.epochs

    @property
    def augmented(self) -> bool:
        """Whether the training images change from epoch to epoch (so no frozen features can stand in for them)."""
        return self.aug_strength > 0 or self.trivial_augment or self.mixup > 0 or self.cutmix > 0

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "Config":
        if not isinstance(values, dict):
            raise ConfigError(f"a config must be a mapping of keys to values, got {type(values).__name__}")
        check_keys(values, [f.name for f in fields(cls)], "config key")
        return cls(**values)

    @classmethod
    def from_yaml(cls, path: str | os.PathLike, **overrides: Any) -> "Config":
        """Read a config (or an exported best.yaml, whose extra `result:` block is ignored)."""
        values = load_yaml(path, raw=TEXT_KEYS)
        values.pop("result", None)
        values.update(overrides)
        return cls.from_dict(values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> "Config":
        return Config.from_dict({**self.to_dict(), **changes})

    def portable(self) -> "Config":
        """The config as exports store it: local paths (data, a weights file, the labels CSVs) made absolute, so an
        exported best.yaml or checkpoint works from any folder."""

        def absolute(path: str | None) -> str | None:
            return path if path in (None, "random") else os.path.abspath(os.path.expanduser(path))

        return self.replace(**{key: absolute(getattr(self, key)) for key in PATH_KEYS})

    def to_yaml(self, result: dict[str, Any] | None = None) -> str:
        """YAML that `autoft train --config` reads back; `result` goes under a key it ignores."""
        doc = self.to_dict()
        if result is not None:
            doc["result"] = result
        return yaml.safe_dump(doc, sort_keys=False)


def check_keys(keys: Iterable[str], known: Iterable[str], what: str, where: str = "") -> None:
    """The one rule for every mapping a user writes (config, search settings, search space): an unknown
    key is an error naming it and the known ones, never silently ignored."""
    known = sorted(set(known))
    unknown = sorted(set(keys) - set(known))
    if unknown:
        raise ConfigError(f"{where}unknown {what} {unknown[0]!r}; known: {', '.join(known)}")


_ENV_VAR = re.compile(r"\$(\w+|\{[^}]*\})")


def expand_path(value: Any, key: str) -> Any:
    """A path key as people write it: `~` and environment variables ($HOME, ${X}) expanded, a PathLike as its
    string; an unset variable is a one-line ConfigError naming it (rather than a folder literally called `$X`)."""
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str) or value.lower() in ("none", "null", "~", "random"):
        return value
    expanded = os.path.expandvars(os.path.expanduser(value))
    unset = _ENV_VAR.search(expanded)
    if unset and unset.group(1).strip("{}") not in os.environ and unset.group(0) in value:
        raise ConfigError(f"config key {key!r}: environment variable {unset.group(0)} in {value!r} is not set")
    return expanded


def load_yaml(path: str | os.PathLike, raw: Iterable[str] = ()) -> dict[str, Any]:
    """safe_load a YAML mapping, turning every failure into a one-line ConfigError.

    The top-level keys in `raw` keep their scalar's text as written (`data: 2024` is the folder "2024", not
    an int; `0123` is not 83): the document is composed with yaml.SafeLoader and those nodes read unresolved.
    """
    try:
        with open(path, encoding="utf-8") as fh:
            loader = yaml.SafeLoader(fh)
            try:
                node = loader.get_single_node()
                values = loader.construct_document(node) if node is not None else None
            finally:
                loader.dispose()
    except FileNotFoundError:
        raise ConfigError(f"config file {os.fspath(path)!r} does not exist") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {os.fspath(path)!r} is a folder, not a YAML file") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{os.fspath(path)} is not a text (UTF-8) YAML file: byte {exc.start} cannot be decoded"
        ) from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {os.fspath(path)!r}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        if isinstance(exc, yaml.reader.ReaderError):  # a binary file: its str() spans lines
            problem = (
                f"unacceptable character #x{exc.character:04x} at byte {exc.position}"
                if isinstance(exc.character, int)
                else exc.reason
            )
        else:
            problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{os.fspath(path)} is not valid YAML{where}: {problem}") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError(f"{os.fspath(path)} must hold a mapping of keys to values, not a {type(values).__name__}")
    raw = set(raw)
    for key_node, value_node in node.value if raw else ():
        key = key_node.value
        if (
            key in raw
            and isinstance(value_node, yaml.ScalarNode)
            and values.get(key) is not None
            and not isinstance(values.get(key), str)
        ):
            values[key] = value_node.value
    return values


def _check(f: dataclasses.Field, value: Any) -> Any:
    return check_field(f, value)


def check_field(f: dataclasses.Field, value: Any, label: str | None = None) -> Any:
    """Coerce and range-check one field of a settings dataclass by its type and metadata (lo, hi, lo_open,
    hi_open, choices); the message starts with `label` (default "config key 'NAME'") so the user knows what to fix."""
    name, typ = f.name, str(f.type)
    where = label or f"config key {name!r}"
    if isinstance(value, str) and value in f.metadata.get("words", ()):  # a word a numeric key also takes ('auto')
        return value
    if value is None:
        if "None" in typ:
            return None
        raise ConfigError(f"{where}: a value is required")
    if isinstance(value, str) and value.lower() in ("none", "null", "~") and "None" in typ:
        return None
    if typ.startswith("bool"):
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if typ.startswith(("int", "float")):
        value = parse_number(value, name, integer=typ.startswith("int"), label=where)
    elif not isinstance(value, str):
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    m = f.metadata
    if m.get("choices") and value not in m["choices"]:
        raise ConfigError(f"{where}: {value!r} is not one of {', '.join(m['choices'])}")
    lo, hi, lo_open, hi_open = m.get("lo"), m.get("hi"), m.get("lo_open", False), m.get("hi_open", False)
    if lo is not None and (value < lo or (lo_open and value == lo)):
        raise ConfigError(f"{where}: {value} is out of range ({'>' if lo_open else '>='} {lo})")
    if hi is not None and (value > hi or (hi_open and value == hi)):
        raise ConfigError(f"{where}: {value} is out of range ({'<' if hi_open else '<='} {hi})")
    return value


_YAML_NON_FINITE = {".nan", ".inf", "+.inf", "-.inf"}  # YAML spellings, lower-cased; float() does not know them


def parse_number(value: Any, key: str, integer: bool = False, *, label: str | None = None) -> int | float:
    """The number a user meant, however it was spelled; a one-line ConfigError naming the key otherwise.

    Accepts ints, floats and numeric strings in any common spelling (`1e-3`, `1E-3`, `.001`, `+5`, `1_000`):
    YAML 1.1 reads `1e-3` (no dot) as a string, and so do CLI flags parsed as YAML scalars. Refuses bools and
    every non-finite value (nan, inf, `.nan`, `.inf`), which would otherwise slip through range checks.
    With `integer`, the value must be a whole number (`1e3` and `4.0` are 1000 and 4, `2.5` is refused).
    `label` replaces "config key 'KEY'" at the start of the message (the search space names its parameters).
    """
    where = label or f"config key {key!r}"
    number: Any = value
    if isinstance(value, str):
        text = value.strip()
        if text.lower() in _YAML_NON_FINITE:
            raise ConfigError(f"{where}: {value!r} is not a finite number")
        try:
            number = int(text)  # exact for long integers; also takes '+5' and '1_000'
        except ValueError:
            try:
                number = float(text)  # '1e-3', '1E-3', '.001', 'nan', 'inf'
            except ValueError:
                number = None
    if isinstance(number, bool) or not isinstance(number, numbers.Real):
        raise ConfigError(f"{where}: expected {'an integer' if integer else 'a number'}, got {value!r}")
    if not isinstance(number, numbers.Integral) or not integer:
        try:
            number = float(number)
        except OverflowError:  # an int too large for a float
            number = math.inf if number > 0 else -math.inf
        if not math.isfinite(number):
            raise ConfigError(f"{where}: {number} is not a finite number")
        if integer:
            if not number.is_integer():
                raise ConfigError(f"{where}: expected an integer, got {value!r}")
            return int(number)
        return number
    return int(number)
