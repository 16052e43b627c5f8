"""The search space: which config keys a trial samples, over which ranges; a YAML file can fix or reshape any.

A range may name its backbone's own bounds, so one space fits every backbone a search compares:
`stages` (its stage count: freeze_depth up to a linear probe), `native` (the resolution it was pretrained
at) and `native/2`. When the backbone itself is searched, a parameter whose range differs between the
backbones is sampled under a per-backbone name (`image_size@efficientnet_lite1`), so the sampler models
each branch of the conditional space on its own and never proposes a value outside its branch; the
trial's config holds the plain key.

Imbalanced classes (the largest at least IMBALANCE_RATIO times the smallest): the default space adds
the standard remedies as searched choices, so the study shows which to keep: a class-weighted loss
(`class_weight`), class-balanced sampling (`balanced_sampling`), and post-hoc logit adjustment with tau
chosen on each trial's out-of-fold predictions (`logit_adjustment: auto`, no training). A balanced set's
space is unchanged.

The portfolio: complementary recipes that run before any sampled trial, so the search starts from what
an expert would try first and its gain over the best of them is measured.

Several backbones (`--backbone auto`): each one's exact linear probe runs first (seconds: one pass of frozen
features, cached for every later trial of that backbone and size), then one probe on all of their features
side by side (the joined backbone `a+b+c`, a searched choice that only ever probes); the fine-tuning trials,
the portfolio's fine-tune recipes included, then go to the backbones in proportion to the evidence
(`shares`, `next_backbone`), not to the sampler's categorical.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import optuna

from .backbones import JOIN, BackboneSpec, get_backbone
from .config import CLASS_WEIGHTS, OPTIMIZERS, Config, check_keys, load_yaml, parse_number
from .exceptions import ConfigError

_CONFIG_FIELDS = {f.name: f for f in dataclasses.fields(Config)}
# what a trial is scored on and shipped as, and what it costs (epoch_images), must be the same for all of them
_NOT_SEARCHABLE = {
    "data",
    "device",
    "seed",
    "weights",
    "skip_bad_images",
    "cv_folds",
    "cv_max_images",
    "final",
    "val_fraction",
    "metric",
    "epoch_images",
}
SYMBOLS = ("stages", "native", "native/2")  # bounds that a backbone resolves
RESOLUTION_STEP = 32
IMBALANCE_RATIO = 2  # largest class / smallest class from which the remedies are searched
PROBE = "linear_probe"  # the portfolio recipe that runs on every searched backbone
MIN_SHARE = 0.05  # a backbone less likely than this to hold the best trial gets no fine-tuning trial


def imbalanced(counts: Sequence[int]) -> bool:
    """THE rule for an imbalanced labelled set: its largest class has at least IMBALANCE_RATIO times the images of
    its smallest."""
    return len(counts) > 1 and max(counts) >= IMBALANCE_RATIO * min(counts)


@dataclass(frozen=True)
class Param:
    """One dimension: a number range (int or float, optionally log or stepped), a list of choices, or a fixed value.

    Int bounds may be SYMBOLS, resolved per backbone by `resolve`.
    """

    low: float | str | None = None
    high: float | str | None = None
    log: bool = False
    choices: tuple | None = None
    value: Any = None
    kind: str = "float"  # float | int | choice | fixed
    step: int | None = None

    def resolve(self, spec: BackboneSpec) -> "Param":
        """This dimension for one backbone: symbolic bounds become numbers (`native/2` rounds up onto the step grid
        that ends at `native`, so both ends are reachable)."""
        if self.kind != "int" or not any(isinstance(b, str) for b in (self.low, self.high)):
            return self
        named = {"stages": spec.num_stages, "native": spec.native_size}
        high = named.get(self.high, self.high)
        low = named.get(self.low, self.low)
        if self.low == "native/2":
            half, step = spec.native_size / 2, self.step or 1
            low = high - step * math.floor((high - half) / step)
        return dataclasses.replace(self, low=int(low), high=int(high))

    def symbolic(self) -> bool:
        return any(isinstance(b, str) for b in (self.low, self.high))

    def to_dict(self) -> Any:
        if self.kind == "fixed":
            return self.value
        if self.kind == "choice":
            return list(self.choices)
        return {"low": self.low, "high": self.high, "log": self.log} | ({"step": self.step} if self.step else {})


# Complementary first trials (the expert's shortlist); values may be SYMBOLS or "epochs", resolved per backbone
# and clipped into the space. Fine-tunes run at the base config's image_size (cheap enough for a CPU); the probe
# at the backbone's native resolution, where its frozen features are best and cost one pass.
_PLAIN = {"class_weight": "none", "balanced_sampling": False}  # the recipes as experts wrote them; remedies searched
PORTFOLIO: dict[str, dict[str, Any]] = {
    "linear_probe": {
        "freeze_depth": "stages",
        "image_size": "native",
        "aug_strength": 0.0,
        "head_only_epochs": 0,
        "head_lr": 1e-2,
        "base_lr": 1e-3,
        "layer_decay": 1.0,
        "optimizer": "adamw",
        "t_max": "epochs",
        "weight_decay": 1e-4,
        "label_smoothing": 0.0,
        **_PLAIN,
    },
    "hand_recipe": {
        "freeze_depth": 0,
        "image_size": "base",
        "aug_strength": 0.5,
        "head_only_epochs": 0,
        "head_lr": 1e-2,
        "base_lr": 1e-3,
        "layer_decay": 1.0,
        "optimizer": "adam",
        "t_max": 10,
        "weight_decay": 1e-4,
        "label_smoothing": 0.0,
        **_PLAIN,
    },
    "freeze_unfreeze": {
        "freeze_depth": 0,
        "image_size": "base",
        "aug_strength": 0.5,
        "head_only_epochs": 1,
        "head_lr": 1e-2,
        "base_lr": 1e-3,
        "layer_decay": 0.6,
        "optimizer": "adamw",
        "t_max": "epochs",
        "weight_decay": 1e-4,
        "label_smoothing": 0.0,
        **_PLAIN,
    },
    "low_rate_full": {
        "freeze_depth": 0,
        "image_size": "base",
        "aug_strength": 0.3,
        "head_only_epochs": 0,
        "head_lr": 1e-2,
        "base_lr": 1e-4,
        "layer_decay": 1.0,
        "optimizer": "adamw",
        "t_max": "epochs",
        "weight_decay": 1e-2,
        "label_smoothing": 0.1,
        **_PLAIN,
    },
}


class SearchSpace:
    """Ordered parameters; `suggest(trial, base)` turns one trial into a complete Config."""

    def __init__(self, params: dict[str, Param]):
        self.params = params

    @classmethod
    def default(cls, epochs: int, backbones: Sequence[str] = (), imbalanced: bool = False) -> "SearchSpace":
        """The built-in space; with several `backbones`, the backbone is a searched choice too; for `imbalanced`
        classes (see `imbalanced()`), the remedies too."""
        params = {"backbone": Param(choices=tuple(backbones), kind="choice")} if len(backbones) > 1 else {}
        remedies = (
            {
                "class_weight": Param(choices=CLASS_WEIGHTS, kind="choice"),
                "balanced_sampling": Param(choices=(False, True), kind="choice"),
                "logit_adjustment": Param(value="auto", kind="fixed"),
            }
            if imbalanced
            else {}
        )
        return cls(
            params
            | remedies
            | {
                "image_size": Param("native/2", "native", kind="int", step=RESOLUTION_STEP),
                "freeze_depth": Param(0, "stages", kind="int"),
                "head_only_epochs": Param(0, max(0, epochs - 1), kind="int")
                if epochs > 1
                else Param(value=0, kind="fixed"),
                "head_lr": Param(1e-4, 1e-1, log=True),
                "base_lr": Param(1e-5, 1e-2, log=True),
                "layer_decay": Param(0.5, 1.0),
                "t_max": Param(1, max(10, 2 * epochs), kind="int"),
                "aug_strength": Param(0.0, 1.0),
                "optimizer": Param(choices=OPTIMIZERS, kind="choice"),
                "weight_decay": Param(1e-6, 1e-2, log=True),
                "label_smoothing": Param(0.0, 0.2),
            }
        )

    @classmethod
    def from_yaml(
        cls,
        path: str | os.PathLike | None,
        base: Config,
        backbones: Sequence[str] = (),
        fixed: Sequence[str] = (),
        imbalanced: bool = False,
    ) -> "SearchSpace":
        """The default space, with each searched key in `fixed` (the ones the user set) fixed at `base`'s value,
        then the file's entries replacing or adding parameters, then validated for `base`."""
        space = cls.default(base.epochs, backbones, imbalanced)
        space.params |= {k: Param(value=getattr(base, k), kind="fixed") for k in fixed if k in space.params}
        if path is not None:
            space.params.update(cls.from_dict(load_yaml(path)).params)
        space.validate(base)
        return space

    @classmethod
    def from_dict(cls, specs: dict[str, Any]) -> "SearchSpace":
        """Parameters as written in a space file or stored by `to_dict` (not validated: see `validate`)."""
        return cls({name: _parse(name, spec) for name, spec in specs.items()})

    def backbones(self, base: Config) -> list[str]:
        p = self.params.get("backbone")
        if p is None:
            return [base.backbone]
        return list(p.choices) if p.kind == "choice" else [p.value]

    def validate(self, base: Config) -> None:
        """Every error a trial would hit, raised before any trial runs, for every backbone it may train."""
        check_keys(self.params, set(_CONFIG_FIELDS) - _NOT_SEARCHABLE, "parameter", where="search space: ")
        specs = [get_backbone(b) for b in self.backbones(base)]  # an unknown backbone stops here, listing the known
        for name, unresolved in self.params.items():
            if name == "backbone":
                continue
            for spec in specs:
                _validate(name, unresolved.resolve(spec), spec, base.epochs)

    def suggest(self, trial: optuna.Trial, base: Config) -> Config:
        backbone = (
            self._sample(trial, "backbone", self.params["backbone"]) if "backbone" in self.params else base.backbone
        )
        spec = get_backbone(backbone)
        branching = self._branching(base)
        values = {
            name: self._sample(trial, f"{name}@{backbone}" if name in branching else name, p.resolve(spec))
            for name, p in self.params.items()
            if name != "backbone"
        }
        return base.replace(backbone=backbone, **values)

    def _branching(self, base: Config) -> set[str]:
        """Parameters whose range differs between the searched backbones: each branch gets its own name."""
        specs = [get_backbone(b) for b in self.backbones(base)]
        return {name for name, p in self.params.items() if p.symbolic() and len({p.resolve(s) for s in specs}) > 1}

    @staticmethod
    def _sample(trial: optuna.Trial, key: str, p: Param) -> Any:
        if p.kind == "fixed":
            return p.value
        if p.kind == "choice":
            return trial.suggest_categorical(key, list(p.choices))
        if p.kind == "int":
            return trial.suggest_int(key, int(p.low), int(p.high), log=p.log, step=p.step or 1)
        return trial.suggest_float(key, p.low, p.high, log=p.log)

    def portfolio(self, base: Config, lead: str | None = None) -> list[tuple[str, dict[str, Any]]]:
        """The portfolio as (name, enqueue-able params): the linear probe on every searched backbone (`name@backbone`
        when there are several; the joined one last), the fine-tune recipes on `lead` (default: the first); each
        value clipped into the space, fixed parameters left out."""
        out = []
        backbones = self.backbones(base)
        for name, recipe in PORTFOLIO.items():
            for backbone in backbones if name == PROBE else [lead or backbones[0]]:
                label = f"{name}@{backbone}" if name == PROBE and len(backbones) > 1 else name
                out.append((label, self._params(recipe, backbone, base)))
        return out

    def _params(self, recipe: dict[str, Any], backbone: str, base: Config) -> dict[str, Any]:
        spec = get_backbone(backbone)
        branching = self._branching(base)
        out = {"backbone": backbone} if self.params.get("backbone", Param(kind="fixed")).kind == "choice" else {}
        for name, want in recipe.items():
            p = self.params.get(name)
            if p is None or p.kind == "fixed":
                continue
            p = p.resolve(spec)
            named = {
                "stages": spec.num_stages,
                "native": spec.native_size,
                "epochs": base.epochs,
                "base": getattr(base, name),
            }
            key = f"{name}@{backbone}" if name in branching else name
            out[key] = _clip(named.get(want, want) if isinstance(want, str) else want, p)
        return out

    def usable(self, base: Config) -> Config:
        """`base` at an image size a trial of this space trains at (the portfolio's fine-tunes use the base's, clipped
        into the space): the dataset a search loads before any trial is decoded at a size that is used."""
        p = self.params.get("image_size")
        if p is None:
            return base
        p = p.resolve(get_backbone(base.backbone))
        size = p.value if p.kind == "fixed" else _clip(base.image_size, p)
        return base if size == base.image_size else base.replace(image_size=size)

    def to_dict(self) -> dict[str, Any]:
        return {name: p.to_dict() for name, p in self.params.items()}


def fine_tunable(backbones: Sequence[str]) -> list[str]:
    """The searched backbones that fine-tuning trials may go to: all but the joined ones (`a+b`), which only probe."""
    return [b for b in backbones if JOIN not in b]


def shares(evidence: dict[str, tuple[float, float]]) -> dict[str, float]:
    """THE rule for spreading fine-tuning trials over backbones, from each one's best completed trial so far (its
    probe, at first) as (score, standard error): its probability of being the best of them, the scores taken as
    independent normal errors around the true values; a share under MIN_SHARE is dropped and the rest renormalized.

    The scores are paired (the same images), so the true odds are sharper than independent errors say: the rule
    errs towards trying a close second backbone, never towards dropping it."""
    if len(evidence) < 2:
        return {b: 1.0 for b in evidence}
    names = list(evidence)
    mu = np.array([evidence[b][0] for b in names], dtype=float)
    sd = np.maximum([evidence[b][1] for b in names], 1e-3)
    from scipy.stats import norm

    x = np.linspace((mu - 6 * sd).min(), (mu + 6 * sd).max(), 4001)
    cdf = norm.cdf((x[None] - mu[:, None]) / sd[:, None])  # (backbones, grid)
    pdf = norm.pdf((x[None] - mu[:, None]) / sd[:, None]) / sd[:, None]
    others = np.prod(cdf, 0) / np.maximum(cdf, 1e-300)  # every other backbone's score below x
    p = np.trapezoid(pdf * others, x, axis=1)
    p = np.where(p >= MIN_SHARE * p.sum(), p, 0.0)
    return {b: float(v / p.sum()) for b, v in zip(names, p)}


def next_backbone(share: dict[str, float], counts: dict[str, int]) -> str:
    """The backbone the next fine-tuning trial goes to: the one furthest below its share of the trials so far and
    this one (largest deficit share * (n + 1) - count; ties to the larger share, then the earlier)."""
    n = sum(counts.get(b, 0) for b in share)
    order = list(share)
    return max(order, key=lambda b: (share[b] * (n + 1) - counts.get(b, 0), share[b], -order.index(b)))


def _clip(v: Any, p: Param) -> Any:
    if p.kind == "choice":
        return v if v in p.choices else p.choices[0]
    v = min(max(v, p.low), p.high)
    if p.kind == "int":
        step = p.step or 1
        return int(p.low + step * round((v - p.low) / step))
    return float(v)


def _validate(name: str, p: Param, spec: BackboneSpec, epochs: int) -> None:
    if p.kind in ("int", "float"):
        if p.symbolic():
            raise ConfigError(f"search space: {name}: {', '.join(SYMBOLS)} only bound whole-number parameters")
        if p.low > p.high:
            raise ConfigError(f"search space: {name} low ({p.low}) is greater than high ({p.high})")
        if p.log and p.low <= 0:
            raise ConfigError(f"search space: {name} is log-scaled, so low must be > 0 (got {p.low})")
        if p.step and (p.high - p.low) % p.step:
            raise ConfigError(f"search space: {name} step {p.step} does not divide {p.low}..{p.high}")
        values = [p.low, p.high]
    else:
        values = list(p.choices) if p.kind == "choice" else [p.value]
    for v in values:
        try:
            Config.from_dict({name: v} | ({"epochs": max(epochs, int(v))} if name == "head_only_epochs" else {}))
        except ConfigError as exc:
            raise ConfigError(f"search space: {exc}") from None
    if name == "freeze_depth" and max(values) > spec.num_stages:
        raise ConfigError(
            f"search space: freeze_depth goes up to {max(values)}, but {spec.name} has {spec.num_stages} stages"
        )
    if name == "head_only_epochs" and max(values) > epochs:
        raise ConfigError(f"search space: head_only_epochs goes up to {max(values)}, more than epochs ({epochs})")


def _parse(name: str, spec: Any) -> Param:
    if isinstance(spec, list):
        if not spec:
            raise ConfigError(f"search space: {name} has an empty list of choices")
        return Param(choices=tuple(_num(name, v) for v in spec), kind="choice")
    if isinstance(spec, dict):
        extra = set(spec) - {"low", "high", "log", "step"}
        if extra or not {"low", "high"} <= set(spec):
            raise ConfigError(
                f"search space: {name} must be {{low: ..., high: ..., log: false}}, a list of choices or a value"
            )
        is_int = str(_CONFIG_FIELDS[name].type).startswith("int") if name in _CONFIG_FIELDS else False
        if spec["high"] == "native/2":
            raise ConfigError(f"search space: {name} high may be stages or native; native/2 is a low bound only")
        low, high = (
            spec[end]
            if is_int and spec[end] in SYMBOLS
            else parse_number(spec[end], name, integer=is_int, label=f"search space: {name} {end}")
            for end in ("low", "high")
        )
        step = (
            parse_number(spec["step"], name, integer=True, label=f"search space: {name} step")
            if "step" in spec
            else None
        )
        if step is not None and step < 1:
            raise ConfigError(f"search space: {name} step must be at least 1, got {step}")
        if not is_int:
            return Param(float(low), float(high), bool(spec.get("log", False)), kind="float")
        return Param(low, high, bool(spec.get("log", False)), kind="int", step=step)
    return Param(value=_num(name, spec), kind="fixed")


def _num(name: str, v: Any) -> Any:
    """A choice or fixed value of a numeric key as the number the user meant (`1e-4`, a string to YAML 1.1, too);
    a non-finite or non-numeric one is a one-line error naming the parameter. Other keys' values pass unchanged."""
    f = _CONFIG_FIELDS.get(name)
    typ = str(f.type) if f else ""
    if not typ.startswith(("int", "float")) or v is None or v in f.metadata.get("words", ()):
        return v
    if isinstance(v, str) and v.strip().lower() in ("none", "null", "~") and "None" in typ:
        return None
    return parse_number(v, name, integer=typ.startswith("int"), label=f"search space: {name}")
