"""The search space: which config keys a trial samples, over which ranges; a YAML file can fix or reshape any."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any

import optuna

from .config import OPTIMIZERS, Config, check_keys, load_yaml, parse_number
from .exceptions import ConfigError

_CONFIG_FIELDS = {f.name: f for f in dataclasses.fields(Config)}
_NOT_SEARCHABLE = {"data", "device", "seed", "weights", "backbone", "skip_bad_images"}


@dataclass(frozen=True)
class Param:
    """One dimension: a number range (int or float, optionally log), a list of choices, or a fixed value."""

    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: tuple | None = None
    value: Any = None
    kind: str = "float"  # float | int | choice | fixed

    def to_dict(self) -> Any:
        if self.kind == "fixed":
            return self.value
        if self.kind == "choice":
            return list(self.choices)
        return {"low": self.low, "high": self.high, "log": self.log}


# The classic hand recipe, enqueued as trial 0 so the search's gain over it is visible.
HAND_RECIPE = {"freeze_depth": 0, "head_only_epochs": 0, "base_lr": 1e-3, "head_lr": 1e-2, "optimizer": "adam",
               "t_max": 10, "aug_strength": 0.5, "weight_decay": 1e-4, "label_smoothing": 0.0}


class SearchSpace:
    """Ordered parameters; `suggest(trial, base)` turns one trial into a complete Config."""

    def __init__(self, params: dict[str, Param]):
        self.params = params

    @classmethod
    def default(cls, num_stages: int, epochs: int) -> "SearchSpace":
        return cls({
            "freeze_depth": Param(0, num_stages, kind="int"),
            "head_only_epochs": Param(0, max(0, epochs - 1), kind="int") if epochs > 1 else Param(value=0, kind="fixed"),
            "head_lr": Param(1e-4, 1e-1, log=True),
            "base_lr": Param(1e-5, 1e-2, log=True),
            "t_max": Param(1, max(10, 2 * epochs), kind="int"),
            "aug_strength": Param(0.0, 1.0),
            "optimizer": Param(choices=OPTIMIZERS, kind="choice"),
            "weight_decay": Param(1e-6, 1e-2, log=True),
            "label_smoothing": Param(0.0, 0.2),
        })

    @classmethod
    def from_yaml(cls, path: str | os.PathLike | None, num_stages: int, epochs: int) -> "SearchSpace":
        """The default space with the file's entries replacing or adding parameters, then validated."""
        space = cls.default(num_stages, epochs)
        if path is not None:
            space.params.update(cls.from_dict(load_yaml(path)).params)
        space.validate(num_stages, epochs)
        return space

    @classmethod
    def from_dict(cls, specs: dict[str, Any]) -> "SearchSpace":
        """Parameters as written in a space file or stored by `to_dict` (not validated: see `validate`)."""
        return cls({name: _parse(name, spec) for name, spec in specs.items()})

    def validate(self, num_stages: int, epochs: int) -> None:
        """Every error a trial would hit, raised before any trial runs."""
        check_keys(self.params, set(_CONFIG_FIELDS) - _NOT_SEARCHABLE, "parameter", where="search space: ")
        for name, p in self.params.items():
            if p.kind in ("int", "float"):
                if p.low > p.high:
                    raise ConfigError(f"search space: {name} low ({p.low}) is greater than high ({p.high})")
                if p.log and p.low <= 0:
                    raise ConfigError(f"search space: {name} is log-scaled, so low must be > 0 (got {p.low})")
                values = [p.low, p.high]
            else:
                values = list(p.choices) if p.kind == "choice" else [p.value]
            for v in values:
                try:
                    Config.from_dict({name: v} | ({"epochs": max(epochs, int(v))} if name == "head_only_epochs" else {}))
                except ConfigError as exc:
                    raise ConfigError(f"search space: {exc}") from None
        fd = self.params.get("freeze_depth")
        top = fd.high if fd and fd.kind == "int" else max(fd.choices) if fd and fd.kind == "choice" else fd.value if fd else 0
        if top is not None and top > num_stages:
            raise ConfigError(f"search space: freeze_depth goes up to {top}, but the backbone has {num_stages} stages")
        ho = self.params.get("head_only_epochs")
        if ho and ho.kind == "int" and ho.high > epochs:
            raise ConfigError(f"search space: head_only_epochs goes up to {ho.high}, more than epochs ({epochs})")

    def suggest(self, trial: optuna.Trial, base: Config) -> Config:
        values = {}
        for name, p in self.params.items():
            if p.kind == "fixed":
                values[name] = p.value
            elif p.kind == "choice":
                values[name] = trial.suggest_categorical(name, list(p.choices))
            elif p.kind == "int":
                values[name] = trial.suggest_int(name, int(p.low), int(p.high), log=p.log)
            else:
                values[name] = trial.suggest_float(name, p.low, p.high, log=p.log)
        return base.replace(**values)

    def hand_recipe(self) -> dict[str, Any]:
        """The hand recipe restricted to searched parameters and clipped into their ranges."""
        out = {}
        for name, v in HAND_RECIPE.items():
            p = self.params.get(name)
            if p is None or p.kind == "fixed":
                continue
            if p.kind == "choice":
                out[name] = v if v in p.choices else p.choices[0]
            else:
                out[name] = type(p.low)(min(max(v, p.low), p.high)) if p.kind == "float" else int(min(max(v, p.low), p.high))
        return out

    def to_dict(self) -> dict[str, Any]:
        return {name: p.to_dict() for name, p in self.params.items()}


def _parse(name: str, spec: Any) -> Param:
    if isinstance(spec, list):
        if not spec:
            raise ConfigError(f"search space: {name} has an empty list of choices")
        return Param(choices=tuple(_num(name, v) for v in spec), kind="choice")
    if isinstance(spec, dict):
        extra = set(spec) - {"low", "high", "log"}
        if extra or not {"low", "high"} <= set(spec):
            raise ConfigError(f"search space: {name} must be {{low: ..., high: ..., log: false}}, a list of choices or a value")
        low, high = (parse_number(spec[end], name, label=f"search space: {name} {end}") for end in ("low", "high"))
        is_int = str(_CONFIG_FIELDS[name].type).startswith("int") if name in _CONFIG_FIELDS else False
        if is_int and not (float(low).is_integer() and float(high).is_integer()):
            raise ConfigError(f"search space: {name} takes whole numbers, got {low}..{high}")
        kind = "int" if is_int else "float"
        conv = int if is_int else float
        return Param(conv(low), conv(high), bool(spec.get("log", False)), kind=kind)
    return Param(value=_num(name, spec), kind="fixed")


def _num(name: str, v: Any) -> Any:
    """A choice or fixed value of a numeric key as the number the user meant (`1e-4`, a string to YAML 1.1, too);
    a non-finite or non-numeric one is a one-line error naming the parameter. Other keys' values pass unchanged."""
    f = _CONFIG_FIELDS.get(name)
    typ = str(f.type) if f else ""
    if not typ.startswith(("int", "float")) or v is None:
        return v
    if isinstance(v, str) and v.strip().lower() in ("none", "null", "~") and "None" in typ:
        return None
    return parse_number(v, name, integer=typ.startswith("int"), label=f"search space: {name}")
