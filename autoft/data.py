"""Data: find images, decode each once into an on-disk uint8 image store, and augment whole batches on the device.

Images are stored at `store_size = image_size / crop_pct` (square, centre-cropped) so that the eval
transform is the pretraining one (resize, centre crop) and training crops have room to move.
"""

from __future__ import annotations

import bisect
import contextlib
import csv
import functools
import hashlib
import io
import json
import logging
import math
import os
import re
import tempfile
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import joblib
import numpy as np
import torch
import torch.nn.functional as F
from PIL import ExifTags, Image, ImageOps

from .exceptions import ConfigError, DataError
from .files import atomic_npy, atomic_write_text, check_writable_dir, sweep_temps

log = logging.getLogger("autoft")

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
MIN_SIDE = 8
DECODE_NOTICE = 100  # from this many images, decoding takes long enough to say so


class ImageStore:
    """Decoded images on disk: a uint8 (N, 3, S, S) .npy read memory-mapped, so the pages live in the OS's file
    cache, not in the process's own memory, and any number of images fits in bounded RAM.

    `rows[path]` is the row of each readable image; `skipped[path]` why an image could not be read (it has no
    row). `decoded` counts the images this process decoded to build it (0 when it came from disk).
    `value_range` is the range its 32-bit integer and float images were scaled by (None: it has none).
    """

    def __init__(self, file: Path, images: np.ndarray, paths: list[str], skipped: dict[str, str], decoded: int,
                 value_range: tuple[float, float] | None = None):
        self.file, self.images, self.skipped, self.decoded = file, images, skipped, decoded
        self.value_range = value_range
        self.rows = {p: i for i, p in enumerate(p for p in paths if p not in skipped)}

    def read(self, rows: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Images at `rows` (any order) as a (len(rows), 3, S, S) array in memory (`out` when given): read in
        ascending row order (sequential pages of the file), each copied straight to its place in the order asked
        for, so a batch costs one buffer, not a gathered copy as well."""
        rows = np.asarray(rows, dtype=np.int64)
        out = np.empty((len(rows), *self.images.shape[1:]), np.uint8) if out is None else out
        for i in np.argsort(rows, kind="stable").tolist():
            out[i] = self.images[rows[i]]
        return out


@dataclass
class Split:
    """Images of one split as rows of the store, never a copy of their pixels."""

    store: ImageStore
    rows: torch.Tensor  # (N,) int64 rows of store.images
    labels: torch.Tensor  # (N,) int64
    paths: list[str]

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: torch.Tensor) -> "Split":
        return Split(self.store, self.rows[index], self.labels[index], [self.paths[i] for i in index.tolist()])

    def read(self, index: torch.Tensor | None = None) -> torch.Tensor:
        """uint8 (n, 3, S, S) images in memory: all of them, or those at `index` (positions in this split)."""
        rows = self.rows if index is None else self.rows[index]
        return torch.from_numpy(self.store.read(rows.numpy()))

    @functools.cached_property
    def key(self) -> tuple[str, str]:
        """What identifies these images: the store's file and a digest of the rows."""
        return str(self.store.file), hashlib.sha1(self.rows.numpy().tobytes()).hexdigest()

    @property
    def nbytes(self) -> int:
        return len(self) * int(np.prod(self.store.images.shape[1:]))


@dataclass
class Fold:
    """Indices into `Dataset.labelled`: train on `train`, validate on `val` (empty for a refit: nothing is held out)."""

    train: torch.Tensor
    val: torch.Tensor


@dataclass
class Dataset:
    """Every labelled image (train/ then val/) as one Split, so each fold, the holdout and a refit are index
    sets into it and frozen features are computed once for all of them; test/ apart, only ever scored.
    All splits are rows of one ImageStore."""

    classes: list[str]
    labelled: Split
    holdout: Fold  # val/ when there is one, else a fixed stratified `val_fraction` of train/
    test: Split | None
    image_size: int
    store_size: int
    skipped: dict[str, str] = field(default_factory=dict)  # path -> why it could not be read
    fingerprint: Fingerprint | None = None  # of the scanned files (see Fingerprint): what the data is, not its path
    flat: bool = False  # no train/ (or no split column): every image was found as train

    @property
    def store(self) -> ImageStore:
        return self.labelled.store

    @functools.cached_property
    def train(self) -> Split:
        return self.labelled.subset(self.holdout.train)

    @functools.cached_property
    def val(self) -> Split:
        return self.labelled.subset(self.holdout.val)

    def everything(self) -> Fold:
        """Train on every labelled image, validate on none: a refit."""
        return Fold(torch.arange(len(self.labelled)), torch.zeros(0, dtype=torch.long))

    def cv_folds(self, k: int) -> list[Fold]:
        """Stratified k-fold over every labelled image, fixed (seed 0) for every trial, seed and resume of a study.

        k shrinks to the smallest class's size (at least 2), so that every class is in every validation fold; that
        is said once by `cv_notice`, so scikit-learn's own warning about it is silenced here.
        """
        from sklearn.model_selection import StratifiedKFold

        labels = self.labelled.labels.numpy()
        k = max(2, min(k, int(np.bincount(labels).min())))
        splitter = StratifiedKFold(n_splits=k, shuffle=True, random_state=0)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "The least populated class in y has only", UserWarning)
            folds = list(splitter.split(np.zeros(len(labels)), labels))
        return [Fold(torch.from_numpy(tr), torch.from_numpy(va)) for tr, va in folds]

    def cv_notice(self, k: int) -> str | None:
        """What `cv_folds(k)` changes, in one line, when a class has fewer than k labelled images; else None."""
        counts = np.bincount(self.labelled.labels.numpy(), minlength=len(self.classes))
        small = int(counts.argmin())
        n = int(counts[small])
        if n >= k:
            return None
        used = max(2, n)
        why = ("so that every class is in every validation fold" if n >= 2 else
               f"and {self.classes[small]!r} is validated in only one of them")
        return (f"class {self.classes[small]!r} has {n} labelled image{'s' if n != 1 else ''}: cross-validation uses "
                f"{used} folds, not {k}, {why}")


def store_size_for(image_size: int, crop_pct: float) -> int:
    """The stored side: image_size / crop_pct, rounded so the centre crop lands on whole pixels."""
    return image_size + 2 * round((image_size / crop_pct - image_size) / 2)


def cache_dir() -> Path:
    return Path(os.environ.get("AUTOFT_CACHE", Path.home() / ".cache" / "autoft"))


# --- discovery --------------------------------------------------------------------------------------------

SPLITS = ("train", "val", "test")
SPLIT_NAMES = {  # a labels CSV's split column: what Kaggle and Hugging Face call val too
    "train": "train", "val": "val", "validation": "val", "valid": "val", "dev": "val",
    "test": "test"}
SPLIT_WORDS = "train, val (validation, valid, dev) or test"


def is_image(path: str | os.PathLike) -> bool:
    """THE rule for what counts as an image: a known extension (the fast path), else any file Pillow can
    identify from its header without decoding it (.jfif, .avif where Pillow has the plugin, files without an
    extension). A file that passes but cannot be decoded is reported as unreadable, not dropped."""
    if os.path.splitext(path)[1].lower() in IMAGE_EXTENSIONS:
        return True
    try:
        with warnings.catch_warnings():  # a huge image is still an image (decode refuses it, with its size)
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path):
                return True
    except Image.DecompressionBombError:
        return True
    except Exception:  # not an image Pillow knows, or unreadable
        return False


def find_images(folder: str | os.PathLike, skipped: Counter[str]) -> list[str]:
    """Images under `folder` at any depth, sorted; what is left out is counted in `skipped` by why.

    Hidden files and folders (a leading '.', such as .ipynb_checkpoints or .DS_Store) are skipped at every
    depth. Linked subfolders are not followed (a link cycle cannot loop; `folder` itself may be a link).
    """
    found = []
    for top, dirs, files in os.walk(folder):
        keep = []
        for d in sorted(dirs):
            if d.startswith("."):
                skipped["hidden folder"] += 1
            elif os.path.islink(os.path.join(top, d)):
                skipped["linked subfolder (not followed)"] += 1
            else:
                keep.append(d)
        dirs[:] = keep
        for name in files:
            path = os.path.join(top, name)
            if name.startswith("."):
                skipped["hidden file"] += 1
            elif not os.path.isfile(path):
                skipped["broken link"] += 1
            elif is_image(path):
                found.append(path)
            else:
                skipped["non-image file"] += 1
    return sorted(found)


BESIDE_TRAIN = "folder beside train/ (only train, val and test are read)"
_PLURALS = {BESIDE_TRAIN: "folders beside train/ (only train, val and test are read)",
            "linked subfolder (not followed)": "linked subfolders (not followed)",
            "file outside a class folder": "files outside class folders"}


def _plural(n: int, what: str) -> str:
    return f"1 {what}" if n == 1 else f"{n} {_PLURALS.get(what, what + 's')}"


def skipped_summary(skipped: Counter[str]) -> str:
    """One line: 'skipped 3 non-image files, 2 hidden folders'; empty when nothing was skipped."""
    return "skipped " + ", ".join(_plural(n, why) for why, n in skipped.most_common()) if skipped else ""


@dataclass(frozen=True)
class Fingerprint:
    """A labelled dataset's content, whatever its path is spelled: classes, images per class per split, and per
    split a SHA-256 of every image's (class, path relative to the split folder or the CSV's folder, size).

    Two spellings of one folder have equal fingerprints; a renamed, added, removed or resized file changes it.
    A loaded dataset's also carries `value_range`, the one range its 32-bit integer and float images were scaled
    by (see `dataset_range`), so that checkpoints keep it and new images are scaled alike; it follows from the
    pixels, known once decoded, so it takes no part in comparing fingerprints.
    """

    classes: tuple[str, ...]
    counts: dict[str, list[int]]  # split -> images per class, in the order of `classes`
    hashes: dict[str, str]  # split -> hex SHA-256
    value_range: tuple[float, float] | None = field(default=None, compare=False)  # None: no such image, or scanned

    def to_dict(self) -> dict[str, Any]:
        return {"classes": list(self.classes), "counts": dict(self.counts), "hashes": dict(self.hashes),
                "value_range": list(self.value_range) if self.value_range is not None else None}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Fingerprint":
        vr = d.get("value_range")  # absent from checkpoints and studies written before it
        return cls(tuple(d["classes"]), {k: list(v) for k, v in d["counts"].items()}, dict(d["hashes"]),
                   (float(vr[0]), float(vr[1])) if vr is not None else None)

    def differences(self, before: "Fingerprint") -> str:
        """What changed from `before` to this, in words ("classes added: 'bird'; train: 6 images more")."""
        out = []
        added = [c for c in self.classes if c not in before.classes]
        removed = [c for c in before.classes if c not in self.classes]
        if added:
            out.append("classes added: " + ", ".join(map(repr, added)))
        if removed:
            out.append("classes removed: " + ", ".join(map(repr, removed)))
        for split in SPLITS:
            if self.hashes.get(split) == before.hashes.get(split):
                continue
            now, then = sum(self.counts.get(split, [])), sum(before.counts.get(split, []))
            change = (f"{now - then} image(s) more" if now > then else f"{then - now} image(s) fewer" if then > now
                      else "as many images, but other files (renamed, replaced or relabelled)")
            out.append(f"{split}: {change} ({then} -> {now})")
        return "; ".join(out) or "the same images"


@dataclass
class Found:
    """What `scan` found: classes and (paths, labels) per split, what it left out and why, and the fingerprint."""

    root: str  # absolute: the data folder, or the folder of the labels CSV
    classes: list[str]
    splits: dict[str, tuple[list[str], list[int]]]  # "train" (always), "val", "test" -> (paths, class indices)
    flat: bool  # no split structure (class folders at the root, a CSV without a split column): all is train
    skipped: Counter[str]
    fingerprint: Fingerprint
    warning: str | None = None  # what the layout may not mean as read (split lists beside class folders)


def _fingerprint(classes: list[str], splits: dict[str, tuple[list[str], list[int]]],
                 bases: dict[str, str]) -> Fingerprint:
    """The fingerprint of `splits`, each image's path taken relative to its split's base folder."""
    counts, hashes = {}, {}
    for split, (paths, labels) in splits.items():
        h = hashlib.sha256()
        rows = sorted((os.fsencode(os.path.relpath(p, bases[split])), y, p) for p, y in zip(paths, labels))
        for rel, y, p in rows:
            h.update(os.fsencode(classes[y]) + b"\0" + rel + b"\0" + str(os.stat(p).st_size).encode() + b"\n")
        counts[split] = np.bincount(np.asarray(labels, dtype=np.int64), minlength=len(classes)).tolist()
        hashes[split] = h.hexdigest()
    return Fingerprint(tuple(classes), counts, hashes)


def _class_dirs(folder: Path, skipped: Counter[str]) -> list[Path]:
    dirs = []
    for p in sorted(folder.iterdir()):
        if p.name.startswith("."):
            skipped["hidden folder" if p.is_dir() else "hidden file"] += 1
        elif p.is_dir():
            dirs.append(p)
        else:
            skipped["file outside a class folder"] += 1
    return dirs


def _refuse_overlapping_links(split_folders: dict[str, Path], class_dirs: list[Path]) -> None:
    """A class folder (through a link) must not hold a split folder or another class's folder.

    A class linked back to train/ (or any ancestor) would hold every image of the split under one label;
    one linked to (a parent of) another class folder would give that class's images a second label.
    A link to an unrelated folder, or val/cat resolving to train/cat (same class), stays allowed.
    """
    resolved = sorted((str(d.resolve()), str(d), d) for d in class_dirs)
    keys = [r for r, _, _ in resolved]
    splits = {s: str(f.resolve()) for s, f in split_folders.items()}

    def fix(d: Path) -> str:
        return f"make {d} a folder of {d.name!r} images only, not a link"

    for r, _, d in resolved:
        for split, folder in splits.items():
            if folder == r or folder.startswith(r + os.sep):
                what = f"the {split}/ folder itself" if folder == r else f"which holds the {split}/ folder"
                raise DataError(f"class folder {d} resolves to {r}, {what}: the class would take every image of "
                                f"{split}/; {fix(d)}")
        i = bisect.bisect_left(keys, r)
        while i < len(keys) and (keys[i] == r or keys[i].startswith(r + os.sep)):  # class folders inside r
            q, _, e = resolved[i]
            i += 1
            if e == d or (q == r and e.name == d.name):
                continue
            if q == r:  # blame the link, not the real folder it points at
                x, y = (e, d) if e.is_symlink() and not d.is_symlink() else (d, e)
                raise DataError(f"class folder {x} resolves to {r}, the folder of class {y.name!r} ({y}) too: its "
                                f"images would carry both labels; {fix(x)}")
            if e.is_symlink() and not d.is_symlink():
                raise DataError(f"class folder {e} resolves to {q}, inside class folder {d}: its images would carry "
                                f"both labels; {fix(e)}")
            raise DataError(f"class folder {d} resolves to {r}, which holds class folder {e}: the class would take "
                            f"{e.name!r} images; {fix(d)}")


def scan(root: str | os.PathLike | None, labels: str | os.PathLike | Labels | None = None, say: bool = True) -> Found:
    """Classes and (paths, labels) per split: from ROOT/{train,val,test}/<class>/ (a root holding class folders
    directly, with no train/, is read whole as the train split), or from labels CSVs (`labels`; see `scan_csv`);
    neither: the built-in digits demo.

    Logs one line counting what was left out and why ("skipped 3 non-image files, 2 hidden folders"), and warns
    when the layout may not mean what it is read as, unless `say` is false (a look at the layout before the
    images are loaded, which says it then).
    """
    found = scan_csv(labels, root) if labels is not None else _scan_folders(Path(demo_digits() if root is None else root))
    if found.skipped and say:
        log.info("%s: %s", found.root, skipped_summary(found.skipped))
    if found.warning and say:
        log.warning(found.warning)
    return found


_SPLIT_WORD = re.compile(r"(?<![a-z])(train|training|val|valid|validation|dev|test|testing)(?![a-z])")


def split_lists_hint(root: Path) -> str | None:
    """One line when `root`, read as class folders without train/, also holds CSVs that look like lists of
    splits (train.csv, validation.csv, test.csv, or one with a `split` column): every image then trains or
    validates, those files' test rows included, and `--labels` is what reads their splits."""
    named: dict[str, list[Path]] = {}  # split -> files named for it
    with_column, heads = [], {}
    for p in sorted(root.glob("*.csv")):
        try:
            with open(p, newline="", encoding="utf-8-sig", errors="replace") as fh:
                heads[p] = [*(row for _, row in zip(range(2), csv.reader(fh))), [], []][:2]  # header, first row
        except (OSError, csv.Error):
            continue
        word = _SPLIT_WORD.search(p.stem.lower())
        if word:
            named.setdefault(SPLIT_NAMES[word.group(1).removesuffix("ing")], []).append(p)
        elif any(h.strip().casefold() == "split" for h in heads[p][0]):
            with_column.append(p)
    if not named and not with_column:
        return None
    flags = {"train": "--labels", "val": "--val-labels", "test": "--test-labels"}
    use = {"train": with_column[0]} if with_column and "train" not in named else {s: ps[0] for s, ps in named.items()}
    header, first = heads[use.get("train") or next(iter(use.values()))]
    command = " ".join(f"{flags[s]} {use.get(s, 'TRAIN.csv')}" for s in SPLITS if s in use or s == "train")
    if not {"path", "label"} <= {h.strip().casefold() for h in header}:
        paths = [h for h, v in zip(header, first) if v.strip() and (root / v.strip()).is_file()]
        path = paths[0] if paths else "NAME"
        others = ", ".join(h for h in header if h.strip() and h != path)
        command += f" --path-column {path} --label-column NAME (one of {others})"
    files = [*(p.name for s in SPLITS for p in named.get(s, [])), *(p.name for p in with_column)]
    look = "look like lists" if len(files) > 1 else "looks like a list"
    return (f"{root} holds {', '.join(files)}, which {look} of splits, but --data reads every image in its class "
            f"folders as labelled, test rows included; to use their splits, pass {command} instead of --data")


def _scan_folders(root: Path) -> Found:
    if not root.is_dir():
        raise DataError(f"data folder {str(root)!r} does not exist; expected {root}/train/<class>/*.jpg")
    skipped: Counter[str] = Counter()
    train = root / "train"
    flat = not train.is_dir()
    if flat:
        if any((root / s).is_dir() for s in ("val", "test")):
            raise DataError(f"{root} has no train/ folder; expected {root}/train/<class>/*.jpg")
        train = root
    else:  # e.g. valid/ instead of val/: said in the summary, not silently ignored
        for p in root.iterdir():
            if p.is_dir() and p.name not in SPLITS and not p.name.startswith("."):
                skipped[BESIDE_TRAIN] += 1
    folders = {"train": train} | ({} if flat else {s: root / s for s in ("val", "test") if (root / s).is_dir()})
    dirs = {split: _class_dirs(folder, skipped) for split, folder in folders.items()}
    classes = [d.name for d in dirs["train"]]
    if len(classes) < 2:
        raise DataError(f"{train} has {len(classes)} class folder(s); a classifier needs at least two (train/<class>/...)")
    _refuse_overlapping_links(folders, [d for ds in dirs.values() for d in ds])
    splits = {}
    for split, folder in folders.items():
        paths, labels = [], []
        for d in dirs[split]:
            if d.name not in classes:
                raise DataError(f"{d} is a class that train/ does not have; add {train / d.name} or remove it")
            found = find_images(d, skipped)
            if not found and split == "train":
                raise DataError(f"class folder {d} holds no images (no file Pillow can read, hidden ones aside)")
            paths += found
            labels += [classes.index(d.name)] * len(found)
        if paths:
            splits[split] = (paths, labels)
    fingerprint = _fingerprint(classes, splits, {s: str(f) for s, f in folders.items()})
    return Found(os.path.abspath(root), classes, splits, flat, skipped, fingerprint,
                 split_lists_hint(root) if flat else None)


@dataclass(frozen=True)
class Labels:
    """Labels from CSV files instead of class folders: `train` lists the train rows (or every split, by a `split`
    column), `val` and `test` each list one split as Kaggle ships them; `path_column` and `label_column` name
    the columns that hold each image's path and class."""

    train: str | os.PathLike
    val: str | os.PathLike | None = None
    test: str | os.PathLike | None = None
    path_column: str = "path"
    label_column: str = "label"


def _column(csv_path: Path, header: list[str], name: str, role: str) -> int | None:
    """The column named `name`: an exact match first, else one equal case-folded (`Path` for `path`); two that
    match equally are an error naming both, never the first silently."""
    exact = [i for i, h in enumerate(header) if h.strip() == name]
    found = exact or [i for i, h in enumerate(header) if h.strip().casefold() == name.casefold()]
    if len(found) > 1:
        both = " and ".join(f"{i + 1} ({header[i]!r})" for i in found[:2])
        how = "rename one" + ("" if exact or role == "split" else
                              f", or pass --{role}-column with the exact name of the one to use")
        raise DataError(f"{csv_path}: columns {both} both match the {role} column {name!r}; {how}")
    return found[0] if found else None


def _read_csv(csv_path: Path) -> list[list[str]]:
    """Every row of a labels CSV (csv module; UTF-8, a BOM allowed), the header first."""
    if not csv_path.is_file():
        raise DataError(f"labels file {str(csv_path)!r} {'is a folder' if csv_path.is_dir() else 'does not exist'}; "
                        "expected a CSV with columns path,label[,split]")
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as fh:
            rows = list(csv.reader(fh))
    except UnicodeDecodeError as exc:
        raise DataError(f"{csv_path} is not a text (UTF-8) CSV file: byte {exc.start} cannot be decoded") from None
    except csv.Error as exc:
        raise DataError(f"{csv_path} is not a valid CSV file: {exc}") from None
    except OSError as exc:
        raise DataError(f"cannot read labels file {csv_path}: {exc.strerror or exc}") from None
    if not rows:
        raise DataError(f"{csv_path} is empty; expected a header path,label[,split] and one row per image")
    return rows


def scan_csv(labels: str | os.PathLike | Labels, data: str | os.PathLike | None = None) -> Found:
    """Labels from CSV files (see `Labels`): a header naming the path and label columns (`path`, `label` unless
    named otherwise; any order, other columns ignored) and, in the train file, optionally `split` (train, val or
    test; validation, valid and dev are val; without it every row is train, as a folder of class folders is).
    Separate val and test files list one split each. Paths are relative to each CSV's folder (or absolute);
    `data`, when given, must be the train file's folder. Classes are the train rows' labels, sorted. Every error
    names the file and line; a path is listed once across all the files.
    """
    spec = labels if isinstance(labels, Labels) else Labels(labels)
    main = Path(spec.train)
    base = os.path.abspath(main.parent)
    if data is not None and os.path.realpath(data) != os.path.realpath(base):
        raise ConfigError(f"data {os.fspath(data)!r} is not the folder of the labels file {main}: its paths are "
                          f"relative to its own folder ({base}); leave out data")
    files = {"train": main} | {s: Path(f) for s, f in (("val", spec.val), ("test", spec.test)) if f is not None}
    flags = {"val": "--val-labels", "test": "--test-labels"}
    bases = dict.fromkeys(SPLITS, base) | {s: os.path.abspath(f.parent) for s, f in files.items()}
    entries, lines, seen = [], {}, {}
    has_split = False
    for own, csv_path in files.items():
        rows = _read_csv(csv_path)
        header = rows[0]
        at = {role: _column(csv_path, header, name, role)
              for role, name in (("path", spec.path_column), ("label", spec.label_column), ("split", "split"))}
        for role, name in (("path", spec.path_column), ("label", spec.label_column)):
            if at[role] is None and name == role:
                raise DataError(f"{csv_path} has no {name!r} column (its header: {','.join(header)}); expected "
                                "path,label[,split], or name yours with --path-column and --label-column")
            if at[role] is None:
                raise DataError(f"{csv_path} has no {name!r} column (--{role}-column; its header: {','.join(header)})")
        has_split |= own == "train" and at["split"] is not None
        folder, before = bases[own], len(entries)
        for n, row in enumerate(rows[1:], start=2):
            if not any(v.strip() for v in row):
                continue
            if len(row) < len(header):
                raise DataError(f"{csv_path} line {n}: {len(row)} value(s), but the header has {len(header)}")
            rel, label = row[at["path"]].strip(), row[at["label"]].strip()
            written = row[at["split"]].strip() if at["split"] is not None else own
            split = SPLIT_NAMES.get(written.lower())
            if not rel or not label:
                raise DataError(f"{csv_path} line {n}: the {'path' if not rel else 'label'} is empty")
            if split is None:
                raise DataError(f"{csv_path} line {n}: split {written!r} is not {SPLIT_WORDS}")
            if own != "train" and split != own:
                raise DataError(f"{csv_path} line {n}: split {written!r} in the {own} labels file ({flags[own]}); "
                                f"it lists {own} rows only")
            if own == "train" and split in files and split != "train":
                raise DataError(f"{csv_path} line {n}: a {split} row, but the {split} rows come from {files[split]} "
                                f"({flags[split]}); keep them in one of the two")
            path = os.path.join(folder, rel)
            if os.path.isdir(path):
                raise DataError(f"{csv_path} line {n}: {rel!r} is a folder, not an image")
            if not os.path.isfile(path):
                raise DataError(f"{csv_path} line {n}: image {rel!r} does not exist (paths are relative to {folder})")
            same = os.path.realpath(path)  # one file however it is spelled (./x, a/../x, absolute, a link)
            if same in seen:
                then, m = seen[same]
                where = f"line {m}" if then == csv_path else f"line {m} of {then}"
                raise DataError(f"{csv_path} line {n}: {rel!r} is listed twice (also on {where})")
            seen[same] = csv_path, n
            entries.append((split, path, label))
            lines.setdefault((split, label), (csv_path, n))
        if len(entries) == before:
            raise DataError(f"{csv_path} has a header but no rows; expected one row per image")
    classes = sorted({label for split, _, label in entries if split == "train"})
    if len(classes) < 2:
        raise DataError(f"{main} has {len(classes)} class(es) in its train rows; a classifier needs at least two")
    for (split, label), (csv_path, n) in lines.items():
        if label not in classes:
            raise DataError(f"{csv_path} line {n}: class {label!r} is in {split} but has no train rows")
    splits = {}
    for split in SPLITS:
        rows_ = sorted((p, classes.index(label)) for s, p, label in entries if s == split)
        if rows_:
            splits[split] = ([p for p, _ in rows_], [y for _, y in rows_])
    fingerprint = _fingerprint(classes, splits, bases)
    return Found(base, classes, splits, not has_split and len(files) == 1, Counter(), fingerprint)


# --- decoding ---------------------------------------------------------------------------------------------

WIDE_MODES = ("I", "F")  # 32-bit integer and float greyscale: no fixed range, scaled by one range per dataset
Extent = tuple[float, float]  # (low, high): a range, or a wide image's smallest and largest finite value


def decode(path: str | io.BytesIO, size: int, value_range: Extent | None = None) -> np.ndarray:
    """One image as (size, size, 3) uint8: upright by its EXIF orientation, any mode to RGB (16-bit over its
    full range; 32-bit integer and float greyscale over `value_range`, see `dataset_range`: None takes the image's
    own), shorter side resized to size, centre square.

    Sizes are checked before decoding (an explicit check: warning filters are not thread-safe, and
    decoding runs in threads): tiny images carry no signal, huge ones may be decompression bombs.
    """
    with _opened(path, size) as im:
        return _square(im, size, value_range or dataset_range([extent(im)]) if im.mode in WIDE_MODES else None)


def _decode_or_extent(path: str, size: int) -> np.ndarray | Extent:
    """The store's first pass: a wide image's extent (it is decoded once the dataset's range is known), else the
    image decoded."""
    with _opened(path, size) as im:
        return extent(im) if im.mode in WIDE_MODES else _square(im, size, None)


@contextlib.contextmanager
def _opened(path: str | io.BytesIO, size: int) -> Iterator[Image.Image]:
    """The image at `path`, its size checked (see `decode`), loaded and turned upright."""
    with Image.open(path) as im:
        w, h = im.size
        if min(w, h) < MIN_SIDE:
            raise ValueError(f"too small: {w}x{h}, under {MIN_SIDE}x{MIN_SIDE}")
        if Image.MAX_IMAGE_PIXELS and w * h > Image.MAX_IMAGE_PIXELS:
            raise ValueError(f"too large: {w}x{h}, over {Image.MAX_IMAGE_PIXELS:,} pixels (possible decompression bomb)")
        im.draft("RGB", (size, size))  # JPEG: decode at a reduced scale, much faster for big photos
        im.load()  # decoding errors surface here, before EXIF is read
        _exif_upright(im)
        yield im


def _square(im: Image.Image, size: int, value_range: Extent | None) -> np.ndarray:
    """An opened image as (size, size, 3) uint8 (see `decode`); `value_range` scales a wide one."""
    if im.mode.startswith("I;16"):
        im = _16bit_to_l(im)
    elif im.mode in WIDE_MODES:
        im = _range_to_l(im, value_range)
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        im = Image.new("RGB", rgba.size, (255, 255, 255))
        im.paste(rgba, mask=rgba.getchannel("A"))
    else:
        im = im.convert("RGB")
    w, h = im.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    im = im.resize((nw, nh), Image.BICUBIC, reducing_gap=3.0)
    left, top = (nw - size) // 2, (nh - size) // 2
    return np.asarray(im.crop((left, top, left + size, top + size)), dtype=np.uint8)


def _exif_upright(im: Image.Image) -> None:
    """Turn a photo the way its EXIF Orientation says (phones store pixels sideways), in place.

    A damaged EXIF block leaves the image as stored: the pixels themselves decoded fine.
    """
    try:
        orientation = im.getexif().get(ExifTags.Base.Orientation, 1)
    except Exception:
        return
    if orientation in (2, 3, 4, 5, 6, 7, 8):
        ImageOps.exif_transpose(im, in_place=True)


def _16bit_to_l(im: Image.Image) -> Image.Image:
    """16-bit greyscale (modes I;16*) to 8-bit L over its full range.

    Pillow's own conversion clips at 255, leaving a 16-bit image a few grey levels. The high byte is kept,
    as Pillow does for 16-bit RGB PNGs.
    """
    return Image.fromarray((np.asarray(im) >> 8).astype(np.uint8))


def extent(im: Image.Image) -> Extent:
    """A wide image's smallest and largest finite value: what `dataset_range` combines."""
    a = np.asarray(im)
    finite = a[np.isfinite(a)]
    return (float(finite.min()), float(finite.max())) if finite.size else (math.inf, -math.inf)


def dataset_range(extents: Iterable[Extent]) -> Extent:
    """The one range that every wide (I, F) image of a dataset is scaled by, so that a value means the same grey in
    every image: 0..1 when all values lie in it (reflectances, normalised floats: mapped as 8-bit images are),
    else the smallest..largest value of them all. A single value v gets v-0.5..v+0.5 (it is mid-grey)."""
    extents = list(extents)
    lo, hi = min((e[0] for e in extents), default=math.inf), max((e[1] for e in extents), default=-math.inf)
    if lo > hi or (0 <= lo and hi <= 1):  # no finite value at all, or all within 0..1
        return 0.0, 1.0
    return (lo - 0.5, hi + 0.5) if lo == hi else (lo, hi)


def _range_to_l(im: Image.Image, value_range: Extent) -> Image.Image:
    """32-bit integer (I) and float (F) greyscale to 8-bit L, `value_range` to 0..255 (values beyond it clip).

    Pillow's own conversion clips such images (0..1 floats become all black). NaN takes the range's low end.
    """
    lo, hi = value_range
    a = np.nan_to_num(np.asarray(im, dtype=np.float64), nan=lo, posinf=hi, neginf=lo)
    return Image.fromarray(np.rint((a.clip(lo, hi) - lo) * (255.0 / (hi - lo))).astype(np.uint8))


def _attempt(fn: Callable[..., Any], *args: Any) -> Any:
    """fn(*args), or a one-line reason it failed (an unreadable, truncated, too small or too large image)."""
    try:
        return fn(*args)
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}".splitlines()[0][:200]


def _try_decode(path: str, size: int, value_range: Extent | None = None) -> np.ndarray | str:
    """The decoded image, or a one-line reason it cannot be used."""
    return _attempt(decode, path, size, value_range)


DECODE_CHUNK = 256  # images decoded (in parallel threads) per chunk written to the store: bounds decoding's memory
STORE_VERSION = 5  # v2: EXIF orientation, 16-bit range; v3: the memory-mapped .npy store; v4: I and F over their
# range; v5: I and F over the dataset's range, kept beside the store; files known by change time and inode too
CHANGE_TIME = os.name != "nt"  # POSIX ctime: set by every write, and no copy can set it (Windows': creation)
HASHED = 64 * 1024  # where there is no change time: bytes hashed at each end of a file


def rescaled_notice(n: int, value_range: Extent, given: bool = False) -> str:
    """Which range the wide images were scaled by, in one line."""
    why = ("the model's, from its training data" if given else "values within 0..1, as 8-bit images"
           if value_range == (0.0, 1.0) else "the dataset's smallest..largest value")
    return (f"{n} image(s) are 32-bit integer or float greyscale (Pillow modes I, F): all scaled by one range, "
            f"{value_range[0]:g}..{value_range[1]:g} to 0..255 ({why})")


def _file_id(path: str) -> bytes:
    """What tells a file replaced in place (cp -p, rsync -t, a restore keep its size and modification time): its
    change time, device and inode, which a copy cannot keep; a digest of both ends where there is no change time."""
    st = os.stat(path)
    if CHANGE_TIME:
        return f"{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}:{st.st_dev}:{st.st_ino}".encode()
    with open(path, "rb") as fh:
        h = hashlib.blake2b(fh.read(HASHED), digest_size=16)
        if st.st_size > HASHED:
            fh.seek(max(HASHED, st.st_size - HASHED))
            h.update(fh.read(HASHED))
    return f"{st.st_size}:{st.st_mtime_ns}:{h.hexdigest()}".encode()


def _store_key(paths: list[str], size: int, value_range: Extent | None = None) -> str:
    """Every file's absolute path (as bytes: a non-UTF-8 name is fine) and `_file_id`, so a changed file is decoded
    again, and the range wide images are scaled by: `value_range`, or (None) the one these files give."""
    scale = "found" if value_range is None else ",".join(repr(float(v)) for v in value_range)
    h = hashlib.sha1(f"v{STORE_VERSION}:{size}:{scale}".encode())
    for p in paths:
        h.update(os.fsencode(os.path.abspath(p)) + b":" + _file_id(p) + b"\n")
    return h.hexdigest()


def check_cache() -> Path:
    """The image store's folder, checked writable before anything is decoded: a one-line ConfigError naming it
    (and $AUTOFT_CACHE) rather than a PermissionError after a scan."""
    folder = cache_dir()
    what = "image cache (AUTOFT_CACHE)" if "AUTOFT_CACHE" in os.environ else "image cache"
    try:
        return check_writable_dir(folder, what)
    except ConfigError as exc:
        raise ConfigError(f"{exc}; set AUTOFT_CACHE to a folder you can write") from None


def open_store(paths: list[str], size: int, value_range: Extent | None = None) -> ImageStore:
    """The images at `paths` decoded at `size`, from the on-disk store when it is there, else decoded into it:
    once per size, ever (later trials, runs and processes map the file). Unreadable images get no row; their
    reasons and the range wide images were scaled by are kept beside the store.

    `value_range` (a model's, for new data) scales wide images instead of the range these files give; a store
    of the files' own range serves when that is the same, or when no image is wide.
    """
    file = cache_dir() / "images" / f"{_store_key(paths, size)}.npy"
    sweep_temps(file.parent)  # a store whose writer was killed (kill -9 while decoding): removed once it is gone
    store = _read_store(file, paths, size)
    if store is not None and (value_range is None or store.value_range in (None, value_range)):
        return store
    if value_range is not None:
        file = file.with_name(f"{_store_key(paths, size, value_range)}.npy")
        store = _read_store(file, paths, size)
        if store is not None:
            return store
    log.log(logging.INFO if len(paths) >= DECODE_NOTICE else logging.DEBUG,
            "decoding %d images at %d px into the store %s (once; later runs reuse it)", len(paths), size, file.parent)
    bad, used = _decode_into(file, paths, size, value_range)
    meta = {"skipped": sorted(bad.items()), "value_range": used}  # indices: file names need not be valid UTF-8
    atomic_write_text(file.with_suffix(".json"), json.dumps(meta))
    return ImageStore(file, np.load(file, mmap_mode="r"), paths, {paths[i]: why for i, why in bad.items()},
                      len(paths), used)


def _read_store(file: Path, paths: list[str], size: int) -> ImageStore | None:
    """The store at `file`, or None when it is missing or damaged (then it is decoded again)."""
    try:
        meta = json.loads(file.with_suffix(".json").read_text())
        skipped = {paths[i]: why for i, why in meta["skipped"]}
        used = tuple(meta["value_range"]) if meta["value_range"] is not None else None
        images = np.load(file, mmap_mode="r")
        if images.shape != (len(paths) - len(skipped), 3, size, size):
            raise ValueError(f"store {file} has shape {images.shape}")
        return ImageStore(file, images, paths, skipped, 0, used)
    except Exception:
        return None


def _decode_into(file: Path, paths: list[str], size: int,
                 value_range: Extent | None) -> tuple[dict[int, str], Extent | None]:
    """Decode `paths` chunk by chunk (threads within a chunk) into a new .npy at `file`, good images only, in
    order; returns index -> reason for the bad ones, and the range wide images were scaled by (None: none is wide).
    The file appears whole or not at all.

    Wide images are only opened in this pass (their extents give the dataset's range), and decoded in a second
    one over them alone: a dataset without them pays nothing for it.
    """
    n_jobs = min(8, os.cpu_count() or 1)
    bad: dict[int, str] = {}
    wide: dict[int, tuple[int, Extent]] = {}  # index -> (its reserved row, its extent)
    with atomic_npy(file, (len(paths), 3, size, size), np.uint8) as out, \
            joblib.Parallel(n_jobs=n_jobs, prefer="threads") as parallel:
        row = 0
        for start in range(0, len(paths), DECODE_CHUNK):
            chunk = paths[start:start + DECODE_CHUNK]
            decoded = parallel(joblib.delayed(_attempt)(_decode_or_extent, p, size) for p in chunk)
            for i, r in enumerate(decoded, start):
                if isinstance(r, str):
                    bad[i] = r
                    continue
                if isinstance(r, tuple):
                    wide[i] = row, r
                else:
                    out.array[row] = r.transpose(2, 0, 1)
                row += 1
        out.rows = row
        if not wide:
            return bad, None
        used = value_range or dataset_range(e for _, e in wide.values())
        index = list(wide)
        for start in range(0, len(index), DECODE_CHUNK):
            chunk = index[start:start + DECODE_CHUNK]
            for i, r in zip(chunk, parallel(joblib.delayed(_try_decode)(paths[i], size, used) for i in chunk)):
                if isinstance(r, str):
                    raise DataError(f"{paths[i]} changed while it was decoded ({r}); run again")
                out.array[wide[i][0]] = r.transpose(2, 0, 1)
    log.info(rescaled_notice(len(wide), used, value_range is not None))
    return bad, used


def load_dataset(root: str | os.PathLike | None, image_size: int, crop_pct: float = 0.875, *, seed: int = 0,
                 val_fraction: float = 0.2, skip_bad_images: bool = False,
                 labels: str | os.PathLike | Labels | None = None, value_range: Extent | None = None) -> Dataset:
    """Scan (class folders, or the `labels` CSVs), decode (or reuse the cache) and split. `root=None` without
    `labels` uses the built-in digits demo. `value_range`: the range to scale 32-bit integer and float images by
    (a model's, for new data; None: the one these images give, see `dataset_range`)."""
    from sklearn.model_selection import train_test_split

    check_cache()
    root = demo_digits() if root is None and labels is None else root
    scanned = scan(root, labels)
    classes, found = scanned.classes, scanned.splits
    size = store_size_for(image_size, crop_pct)
    all_paths = [p for paths, _ in found.values() for p in paths]
    store = open_store(all_paths, size, value_range)
    bad = store.skipped
    if bad and not skip_bad_images:
        listed = "; ".join(f"{p} ({why})" for p, why in list(bad.items())[:5])
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise DataError(f"{len(bad)} unreadable image(s): {listed}{more}; fix or remove them, or pass --skip-bad-images")
    if bad:
        log.warning("skipped %d unreadable image(s)", len(bad))

    def split(paths: list[str], labels: list[int]) -> Split:
        keep = [(p, y) for p, y in zip(paths, labels) if p not in bad]
        rows = torch.tensor([store.rows[p] for p, _ in keep], dtype=torch.long)
        return Split(store, rows, torch.tensor([y for _, y in keep], dtype=torch.long), [p for p, _ in keep])

    train = split(*found["train"])
    counts = torch.bincount(train.labels, minlength=len(classes))
    for c, n in zip(classes, counts.tolist()):
        if n == 0:
            raise DataError(f"class {c!r} has no readable training images")
    n = len(train)
    if "val" in found:
        val = split(*found["val"])
        labelled = Split(store, torch.cat([train.rows, val.rows]), torch.cat([train.labels, val.labels]),
                         train.paths + val.paths)
        holdout = Fold(torch.arange(n), torch.arange(n, len(labelled)))
    else:
        if counts.min() < 2:
            raise DataError(f"class {classes[int(counts.argmin())]!r} has one training image; a validation split needs "
                            "at least two per class (or add a val/ folder)")
        n_val = max(len(classes), round(n * val_fraction))
        idx_train, idx_val = train_test_split(np.arange(n), test_size=n_val, random_state=seed, stratify=train.labels.numpy())
        labelled, holdout = train, Fold(torch.from_numpy(np.sort(idx_train)), torch.from_numpy(np.sort(idx_val)))
    test = split(*found["test"]) if "test" in found else None
    return Dataset(classes, labelled, holdout, test, image_size, size, bad,
                   replace(scanned.fingerprint, value_range=store.value_range), scanned.flat)


# --- demo data ----------------------------------------------------------------------------------------------

def demo_digits(per_class: int = 30, val_per_class: int = 10) -> Path:
    """scikit-learn's bundled handwritten digits written out as PNGs, so the default run needs no download."""
    from sklearn.datasets import load_digits

    root = cache_dir() / f"demo_digits_{per_class}_{val_per_class}"
    if (root / "val").is_dir():
        return root
    digits = load_digits()
    tmp = Path(tempfile.mkdtemp(dir=cache_dir().mkdir(parents=True, exist_ok=True) or cache_dir()))
    seen = [0] * 10
    for img, y in zip(digits.images, digits.target):
        i = seen[y]
        if i >= per_class + val_per_class:
            continue
        seen[y] += 1
        folder = tmp / ("train" if i < per_class else "val") / str(y)
        folder.mkdir(parents=True, exist_ok=True)
        pix = (255 - img * 255 / 16).astype(np.uint8)  # dark ink on white, like a scan
        Image.fromarray(pix).resize((32, 32), Image.BILINEAR).save(folder / f"{i:04d}.png")
    try:
        os.replace(tmp, root)
    except OSError:  # another process wrote it first
        pass
    return root


# --- batched augmentation on the compute device ----------------------------------------------------------

def center_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    """The eval transform on stored images: the central size x size square, as float in [0, 1]."""
    off = (x.shape[-1] - size) // 2
    return x[..., off:off + size, off:off + size].float().div_(255)


def augment(x: torch.Tensor, size: int, strength: float, generator: torch.Generator | None = None,
            force: bool = False) -> torch.Tensor:
    """Per-sample random-resized crop, flip, rotation and colour jitter, all scaled by one dial.

    strength 0 is the eval transform exactly (`force` runs the general path anyway, for tests);
    strength 1 is torchvision's RandomResizedCrop range (scale 0.08-1, ratio 3/4-4/3), flip p=0.5,
    rotation +-30 degrees and brightness/contrast/saturation jitter 0.4. One affine grid_sample does
    crop, flip and rotation for the whole batch.
    """
    if strength == 0 and not force:
        return center_crop(x, size)
    b, dev, s = x.shape[0], x.device, float(strength)

    def u(lo, hi):
        return torch.rand(b, device=dev, generator=generator) * (hi - lo) + lo

    a0 = (size / x.shape[-1]) ** 2
    area = u(a0 - s * (a0 - 0.08), a0 + s * (1 - a0))
    log_r = u(-s * math.log(4 / 3), s * math.log(4 / 3)).exp()
    w = (area * log_r).sqrt().clamp(max=1.0)
    h = (area / log_r).sqrt().clamp(max=1.0)
    cx, cy = s * (1 - w) * u(-1, 1), s * (1 - h) * u(-1, 1)
    flip = torch.where(u(0, 1) < 0.5 * s, -1.0, 1.0)
    angle = u(-30 * s, 30 * s) * (math.pi / 180)
    cos, sin = angle.cos(), angle.sin()
    theta = torch.stack([torch.stack([w * flip * cos, -h * sin, cx], 1),
                         torch.stack([w * flip * sin, h * cos, cy], 1)], 1)
    grid = F.affine_grid(theta, [b, 3, size, size], align_corners=False)
    out = F.grid_sample(x.float().div_(255), grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    if s > 0:
        j = 0.4 * s
        out = out * u(1 - j, 1 + j).view(b, 1, 1, 1)
        gray = (out * torch.tensor([0.299, 0.587, 0.114], device=dev).view(1, 3, 1, 1)).sum(1, keepdim=True)
        mean = gray.mean((2, 3), keepdim=True)
        out = (out - mean) * u(1 - j, 1 + j).view(b, 1, 1, 1) + mean
        gray = (out * torch.tensor([0.299, 0.587, 0.114], device=dev).view(1, 3, 1, 1)).sum(1, keepdim=True)
        out = (out - gray) * u(1 - j, 1 + j).view(b, 1, 1, 1) + gray
    return out.clamp_(0, 1)


def normalize(x: torch.Tensor, mean, std) -> torch.Tensor:
    m = torch.tensor(mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    sd = torch.tensor(std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - m) / sd
