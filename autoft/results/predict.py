"""Use a trained model: score it on a labelled split, predict new images, export it for deployment.

Every path goes through the training code's own eval transform (`data.decode.decode` at the stored size, then
`data.augment.center_crop` + `normalize` inside `training.inference.predict_logits`), so a prediction here is exactly
what validation measured during training.
"""

from __future__ import annotations

import io
import json
import logging
import os
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch
from PIL import ExifTags, Image
from torch import nn

from ..backbones import get_backbone
from ..cache import label_files, load_data
from ..config import Config
from ..data.augment import center_crop, normalize
from ..data.dataset import Dataset
from ..data.decode import WIDE_MODES, decode, try_decode
from ..data.scan import Fingerprint, find_images, scan, skipped_summary
from ..data.store import store_size_for
from ..estimate import scored
from ..exceptions import AutoftError, DataError
from ..system.files import atomic_path, atomic_write_text, check_output_file, output_file
from ..training.checkpoint import load_checkpoint, model_from_checkpoint, trained_on
from ..training.inference import predict_logits
from ..training.loop import resolve_device
from .plots import save_confusion_png

log = logging.getLogger("autoft")
SPLITS = ("train", "val", "test")
FORMATS = ("torchscript", "onnx")
# How each format loads, for the export's metadata and `autoft export`: TorchScript is deprecated upstream, and
# torch.jit.load warns so (a FutureWarning) but loads; onnxruntime loads an ONNX file without a warning.
LOADS = {
    "torchscript": "torch.jit.load(FILE) (warns that TorchScript is deprecated, and loads; --format onnx "
    "gives a model onnxruntime loads without a warning)",
    "onnx": "onnxruntime.InferenceSession(FILE)",
}
ImageLike = str | os.PathLike | Image.Image | torch.Tensor | np.ndarray


class Predictor:
    """A checkpoint ready to classify images: `predict`, `predict_proba`, `top_k`.

    Images may be file paths, PIL images, or uint8 arrays/tensors (3,H,W or H,W,3); each is decoded by
    `data.decode.decode` (any mode to RGB, shorter side to the stored size, centre square) like training data;
    32-bit integer and float images by `value_range`, the one range of the training data's such images (None:
    it had none, and each such image is scaled by its own, see `data.dataset_range`).
    """

    def __init__(
        self,
        model: nn.Module,
        config: Config,
        classes: Sequence[str],
        device: str = "auto",
        value_range: tuple[float, float] | None = None,
    ):
        self.config, self.classes, self.value_range = config, list(classes), value_range
        self.spec = get_backbone(config.backbone)
        self.store_size = store_size_for(config.image_size, self.spec.crop_pct)
        self.device = resolve_device(device)
        self.model = model.to(self.device).eval()

    def preprocess(self, images: ImageLike | Iterable[ImageLike]) -> torch.Tensor:
        """uint8 (N, 3, S, S) at the stored size: what the image store holds for a training image."""
        return self._batch([_decode(im, self.store_size, self.value_range) for im in _as_list(images)])

    def _batch(self, arrays: list[np.ndarray]) -> torch.Tensor:
        if not arrays:
            return torch.zeros(0, 3, self.store_size, self.store_size, dtype=torch.uint8)
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()

    def logits(self, images: ImageLike | Iterable[ImageLike]) -> torch.Tensor:
        return self._logits(self.preprocess(images))

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        return predict_logits(self.model, self.spec, self.config, x, 0, self.device).float().cpu()

    def predict_proba(self, images: ImageLike | Iterable[ImageLike]) -> torch.Tensor:
        """(N, num_classes) probabilities, columns in the order of `classes`."""
        return self.logits(images).softmax(1)

    def predict(self, images: ImageLike | Iterable[ImageLike]) -> list[str]:
        """The most likely class name per image."""
        return [self.classes[i] for i in self.predict_proba(images).argmax(1).tolist()]

    def top_k(self, images: ImageLike | Iterable[ImageLike], k: int = 1) -> list[list[tuple[str, float]]]:
        """Per image, the k most likely (class, probability) pairs, most likely first."""
        return self._top_k(self.logits(images), k)

    def _top_k(self, logits: torch.Tensor, k: int) -> list[list[tuple[str, float]]]:
        p, idx = logits.softmax(1).topk(min(k, len(self.classes)), dim=1)
        return [[(self.classes[i], float(v)) for v, i in zip(pr, ix)] for pr, ix in zip(p.tolist(), idx.tolist())]

    def top_k_files(
        self, paths: Sequence[str | os.PathLike], k: int = 1, chunk: int = 256
    ) -> Iterator[tuple[str, list[tuple[str, float]] | None, str | None]]:
        """Per file, in order: (path, top-k pairs, None), or (path, None, why) when it cannot be read.

        One unreadable file does not stop the others (`top_k` raises instead); files are decoded and
        classified `chunk` at a time, so memory stays bounded on large folders.
        """
        for i in range(0, len(paths), chunk):
            part = [os.fspath(p) for p in paths[i : i + chunk]]
            decoded = [try_decode(p, self.store_size, self.value_range) for p in part]
            good = [a for a in decoded if not isinstance(a, str)]
            tops = iter(self._top_k(self._logits(self._batch(good)), k) if good else [])
            for path, a in zip(part, decoded):
                yield (path, None, a) if isinstance(a, str) else (path, next(tops), None)


def _as_list(images: ImageLike | Iterable[ImageLike]) -> list[ImageLike]:
    """One image (path, PIL image, 3-d array) becomes a batch of one; a 4-d array is a batch."""
    single = isinstance(images, (str, os.PathLike, Image.Image)) or (
        isinstance(images, (torch.Tensor, np.ndarray)) and images.ndim == 3
    )
    return [images] if single else list(images)


def _decode(image: ImageLike, size: int, value_range: tuple[float, float] | None) -> np.ndarray:
    try:
        return decode(_as_file(image), size, value_range)
    except (OSError, ValueError) as exc:
        name = os.fspath(image) if isinstance(image, (str, os.PathLike)) else f"a {type(image).__name__}"
        raise DataError(f"cannot read {name} as an image: {str(exc).splitlines()[0][:200]}") from None


def _as_file(image: ImageLike) -> str | io.BytesIO:
    """A path for `data.decode.decode`; in-memory images are handed over as lossless PNG bytes (TIFF for 32-bit
    ones)."""
    if isinstance(image, (str, os.PathLike)):
        return os.fspath(image)
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or 3 not in (image.shape[0], image.shape[-1]):
            raise DataError(
                f"an image array must be uint8 with shape (3,H,W) or (H,W,3), got {image.dtype} {image.shape}"
            )
        image = Image.fromarray(image.transpose(1, 2, 0) if image.shape[-1] != 3 else image)
    if not isinstance(image, Image.Image):
        raise DataError(
            f"cannot read an image from a {type(image).__name__}; pass a path, a PIL image or a uint8 array"
        )
    exif = Image.Exif()  # carry the EXIF orientation, so a photo opened in memory is turned like one read from its file
    try:
        exif[ExifTags.Base.Orientation] = image.getexif()[ExifTags.Base.Orientation]
    except Exception:  # none, or a damaged EXIF block
        pass
    buf = io.BytesIO()
    image.save(buf, format="TIFF" if image.mode in WIDE_MODES else "PNG", exif=exif)
    buf.seek(0)
    return buf


def load_model(path: str | os.PathLike, device: str = "auto") -> Predictor:
    """A Predictor for a checkpoint written by `autoft train` (model.pt) or `autoft search` (best.pt)."""
    ckpt = load_checkpoint(path)
    model, config = model_from_checkpoint(ckpt)
    return Predictor(model, config, ckpt["classes"], device, _value_range(ckpt))


def _value_range(ckpt: dict[str, Any]) -> tuple[float, float] | None:
    """The range the checkpoint's training data scaled 32-bit integer and float images by (None: it had none)."""
    trained = trained_on(ckpt)
    return trained.value_range if trained is not None else None


def image_paths(items: Iterable[str | os.PathLike]) -> list[str]:
    """Files as given, folders expanded to the images under them (sorted; `data.is_image` decides, hidden files
    and folders left out, what was left out said in one line); a missing path is an error."""
    out: list[str] = []
    skipped: Counter[str] = Counter()
    items = list(items)
    for item in map(Path, items):
        if item.is_dir():
            out += find_images(item, skipped)
        elif item.is_file():
            out.append(str(item))
        else:
            raise DataError(f"{item} is neither an image file nor a folder")
    if skipped:
        log.info(skipped_summary(skipped))
    if not out:
        raise DataError(
            f"no images found in {', '.join(map(str, items))}" + (f" ({skipped_summary(skipped)})" if skipped else "")
        )
    return out


# --- evaluate ------------------------------------------------------------------------------------------------


def evaluate(
    model_path: str | os.PathLike,
    data_dir: str | os.PathLike | None = None,
    split: str | None = None,
    out: str | os.PathLike | None = None,
    device: str = "auto",
    labels_csv: str | os.PathLike | None = None,
    skip_bad_images: bool = False,
) -> dict[str, Any]:
    """Score a checkpoint on labelled images: the data it was trained on (default), or new data (`data_dir`, a
    folder, or `labels_csv`, a CSV as `autoft train --labels` takes, read with the model's path and label columns).

    `split`: train, val, test, or all (every labelled image: train and val). By default val, except that new data
    without train/ (a folder of class folders, a CSV without a split column) is scored whole. A val split carved
    out of train/ (no val/ folder) is the same fixed split that training and the search validated on.
    `seen_in_training` is true only when the scored images are ones the model trained on: the data's fingerprint
    is compared with the one the checkpoint stores (see data.Fingerprint).

    Returns every metric (accuracy, balanced accuracy, macro-F1) with its 95 % interval (estimate.py), per-class
    precision/recall/F1/support, the confusion matrix and sklearn's text report, whatever metric the model was
    chosen on; predictions are logit-adjusted as the checkpoint says; unreadable images stop it with their list,
    unless `skip_bad_images` (then they are left out, and said); the confusion matrix PNG goes to `out`
    (default: next to the model, `<model>_<split>_confusion.png`; into `out` under that name when `out` is a folder).
    """
    from sklearn.metrics import classification_report, confusion_matrix

    if split is not None and split not in (*SPLITS, "all"):
        raise AutoftError(f"--split {split!r} is not one of {', '.join(SPLITS)}, all")
    ckpt = load_checkpoint(model_path)
    cfg = Config.from_dict(ckpt["config"])
    own = data_dir is None and labels_csv is None
    where = (
        cfg
        if own
        else cfg.replace(
            data=os.fspath(data_dir) if data_dir is not None else None,  # columns kept
            labels=os.fspath(labels_csv) if labels_csv is not None else None,
            val_labels=None,
            test_labels=None,
        )
    )
    where = where.replace(skip_bad_images=skip_bad_images)
    trained = trained_on(ckpt)
    if split is None:  # which layout new data has: a scan, nothing decoded
        found = None if own else scan(where.data, label_files(where), say=False)
        split = "all" if found is not None and found.flat and found.fingerprint != trained else "val"
    png = output_file(out, Path(model_path).with_name(f"{Path(model_path).stem}_{split}_confusion.png"))
    check_output_file(png, "--out" if out else "confusion matrix")  # before the data are decoded
    model, _ = model_from_checkpoint(ckpt)
    predictor = Predictor(model, cfg, ckpt["classes"], device, _value_range(ckpt))
    data = load_data(where, predictor.value_range)  # new images scaled as the training data were
    shown = where.labels or where.data
    classes = predictor.classes
    unknown = [c for c in data.classes if c not in classes]
    if unknown:
        raise DataError(
            f"{shown} has classes the model was not trained on: {', '.join(map(repr, unknown))} (the "
            f"model knows {', '.join(map(repr, classes))}); remove them or evaluate another model"
        )
    part = data.labelled if split == "all" else getattr(data, split)
    if part is None or len(part) == 0:
        raise DataError(f"{shown} has no {split}/ images to evaluate on")
    y_pred = predict_logits(predictor.model, predictor.spec, cfg, part, 0, predictor.device).argmax(1).cpu().numpy()
    y_true = np.array([classes.index(c) for c in data.classes])[part.labels.numpy()]  # data's classes -> model's
    present = [c for i, c in enumerate(classes) if i in set(y_true.tolist())]
    absent = [c for c in classes if c not in present]
    if absent:
        log.info(
            "%s holds %d of the model's %d classes: scored on those; absent: %s",
            shown,
            len(present),
            len(classes),
            ", ".join(absent),
        )
    seen = _seen_in_training(cfg, trained, data, split, own)
    labels = list(range(len(classes)))
    per_class = classification_report(
        y_true, y_pred, labels=labels, target_names=classes, output_dict=True, zero_division=0
    )
    cm = confusion_matrix(y_true, y_pred, labels=labels)  # the model's classes: predictions of absent ones show
    metrics = _over_present(scored(y_true, y_pred, len(classes)), len(classes), len(present))
    save_confusion_png(
        cm,
        classes,
        f"{split}: {len(part)} images, accuracy {per_class['accuracy']:.3f}, balanced "
        f"accuracy {metrics['balanced_accuracy']['value']:.3f}",
        png,
    )
    return {
        "model": os.fspath(model_path),
        "data": shown,
        "split": split,
        "n": len(part),
        "metrics": metrics,
        "accuracy": metrics["accuracy"]["value"],
        "interval": metrics["accuracy"]["interval"],
        "balanced_accuracy": metrics["balanced_accuracy"]["value"],
        "f1_macro": metrics["f1_macro"]["value"],
        "per_class": {
            c: {
                "precision": per_class[c]["precision"],
                "recall": per_class[c]["recall"],
                "f1": per_class[c]["f1-score"],
                "support": int(per_class[c]["support"]),
            }
            for c in present
        },
        "classes": classes,
        "absent_classes": absent,
        "confusion_matrix": cm.tolist(),
        "confusion_png": str(png),
        "seen_in_training": seen,
        "report": classification_report(
            y_true, y_pred, labels=[classes.index(c) for c in present], target_names=present, digits=4, zero_division=0
        ),
    }


def _over_present(metrics: dict[str, dict[str, Any]], classes: int, present: int) -> dict[str, dict[str, Any]]:
    """Macro-F1 averaged over the `present` classes the data holds, not over all the model's `classes`.

    An absent class has no true positive, so its F1 is 0 in the data and in every bootstrap resample: the mean
    over the present ones is the mean over all times classes / present, value and interval alike. Accuracy and
    balanced accuracy (which averages the recall of the classes that have images) need nothing.
    """
    if present == classes:
        return metrics
    f1 = dict(metrics["f1_macro"])
    f1["value"] *= classes / present
    f1["interval"] = [v * classes / present for v in f1["interval"]]
    return {**metrics, "f1_macro": f1}


def _seen_in_training(cfg: Config, trained: Fingerprint | None, data: Dataset, split: str, own: bool) -> bool:
    """Whether the model trained on the images of `split`: by the split's name on the data it trained on (known by
    its fingerprint, or, for a checkpoint from before fingerprints, by not naming other data); on other data, when
    a scored split holds exactly the files of a split that trained it (e.g. new data that is its train/ folder)."""
    if trained is None or data.fingerprint == trained:
        if trained is None and not own:
            return False  # cannot know: say nothing that may be false
        labelled = len(data.labelled)
        return split in ("train", "all") or (split == "val" and _val_trained(cfg, labelled))
    labelled = sum(sum(trained.counts.get(s, [])) for s in ("train", "val"))
    trained_hashes = {trained.hashes.get("train")} | (
        {trained.hashes.get("val")} if _val_trained(cfg, labelled) else set()
    )
    parts = ["train"] if data.flat else ["train", "val"] if split == "all" else [split]
    return any(data.fingerprint.hashes.get(p) in trained_hashes for p in parts if p in data.fingerprint.hashes)


def _val_trained(cfg: Config, labelled: int) -> bool:
    """Under cross-validation every labelled image trains some fold model, and a refit trains on them all."""
    return cfg.final == "refit" or (cfg.cv_folds > 1 and labelled < cfg.cv_max_images)


# --- export --------------------------------------------------------------------------------------------------


class Deployable(nn.Module):
    """The network with its input normalization built in.

    Input: float32 (N, 3, image_size, image_size) RGB in [0, 1], made like training's eval transform:
    shorter side resized to store_size (bicubic), centre square, then the centre image_size crop.
    Output: logits (N, num_classes); softmax gives probabilities in the order of the exported classes.
    """

    def __init__(self, net: nn.Module, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.net = net
        # buffers, not data.augment.normalize: torch.tensor() inside forward would be traced as an untracked constant
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean) / self.std)


@dataclass
class Exported:
    path: Path
    metadata_path: Path
    format: str
    max_abs_diff: float  # between the exported model's and PyTorch's logits on the check batch


def export(
    model_path: str | os.PathLike,
    format: str = "torchscript",
    out: str | os.PathLike | None = None,
    tolerance: float = 1e-4,
) -> Exported:
    """Write a deployable model (see `Deployable` for its input) plus `<out>.json` with classes and preprocessing.

    The file is loaded back and run on a sample batch; it must reproduce the PyTorch logits within `tolerance`,
    else the previous file at `out`, if any, is left as it was. `out` may be a folder (the default name inside it).
    """
    if format not in FORMATS:
        raise AutoftError(f"--format {format!r} is not one of {', '.join(FORMATS)}")
    out = output_file(out, Path(model_path).with_suffix(".torchscript.pt" if format == "torchscript" else ".onnx"))
    check_output_file(out, "--out")  # before the model is loaded
    check_output_file(out.with_name(out.name + ".json"), "--out")
    predictor = load_model(model_path, device="cpu")
    cfg, spec = predictor.config, predictor.spec
    module = Deployable(predictor.model, spec.mean, spec.std).eval()
    gen = torch.Generator().manual_seed(0)
    stored = torch.randint(0, 256, (4, 3, predictor.store_size, predictor.store_size), dtype=torch.uint8, generator=gen)
    sample = center_crop(stored, cfg.image_size)
    with torch.no_grad(), atomic_path(out) as tmp, warnings.catch_warnings():  # `out` replaced once checked
        # a joined backbone's crops follow the input's side: constants in the trace, which takes the one side it
        # was made for (and the check below runs)
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning, module=r"autoft\.backbones")
        reference = predictor.model(normalize(sample, spec.mean, spec.std))
        got = _export_torchscript(module, sample, tmp) if format == "torchscript" else _export_onnx(module, sample, tmp)
        diff = float((got - reference).abs().max())
        if not diff <= tolerance:
            raise AutoftError(
                f"exported {format} model differs from PyTorch by {diff:.3g} (> {tolerance}); not usable as is"
            )
    meta = {
        "format": format,
        "file": out.name,
        "classes": predictor.classes,
        "backbone": cfg.backbone,
        "input": {
            "shape": ["N", 3, cfg.image_size, cfg.image_size],
            "dtype": "float32",
            "range": [0, 1],
            "color": "RGB",
            "normalization": "inside the model",
            "preprocessing": f"resize shorter side to {predictor.store_size} px (bicubic), centre-crop "
            f"{predictor.store_size}x{predictor.store_size}, then centre-crop {cfg.image_size}x{cfg.image_size}",
        },
        "output": "logits (N, num_classes); softmax for probabilities",
        "check_max_abs_diff": diff,
        "load": LOADS[format].replace("FILE", repr(out.name)),
    }
    meta_path = out.with_name(out.name + ".json")
    atomic_write_text(meta_path, json.dumps(meta, indent=2))
    return Exported(out, meta_path, format, diff)


def _export_torchscript(module: nn.Module, sample: torch.Tensor, out: Path) -> torch.Tensor:
    with warnings.catch_warnings():  # torch.jit is deprecated upstream, yet still the format every runtime loads
        warnings.simplefilter("ignore", FutureWarning)
        traced = torch.jit.trace(module, sample)
        torch.jit.save(traced, str(out))
        return torch.jit.load(str(out))(sample)


def _export_onnx(module: nn.Module, sample: torch.Tensor, out: Path) -> torch.Tensor:
    try:
        import onnx  # noqa: F401  (torch's exporter needs it)
        import onnxruntime
    except ImportError:
        raise AutoftError(
            "ONNX export needs onnx and onnxruntime: pip install 'autoft[onnx]' (or pip install onnx onnxruntime)"
        ) from None
    torch.onnx.export(
        module,
        (sample,),
        str(out),
        input_names=["image"],
        output_names=["logits"],
        dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
        dynamo=False,
    )
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(["logits"], {"image": sample.numpy()})[0])
