"""Finding the images: class folders (train/, val/, test/) or a labels CSV, the skipped files and why,
and the fingerprint of what was found.
"""

from __future__ import annotations

import bisect
import csv
import hashlib
import logging
import os
import re
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..exceptions import ConfigError, DataError
from .demo import demo_digits

log = logging.getLogger("autoft")

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}


# --- discovery --------------------------------------------------------------------------------------------

SPLITS = ("train", "val", "test")
SPLIT_NAMES = {  # a labels CSV's split column: what Kaggle and Hugging Face call val too
    "train": "train",
    "val": "val",
    "validation": "val",
    "valid": "val",
    "dev": "val",
    "test": "test",
}
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
_PLURALS = {
    BESIDE_TRAIN: "folders beside train/ (only train, val and test are read)",
    "linked subfolder (not followed)": "linked subfolders (not followed)",
    "file outside a class folder": "files outside class folders",
}


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

    def labelled(self) -> list[int]:
        """Labelled (train and val) images per class."""
        return [sum(c) for c in zip(*(self.counts.get(s, [0] * len(self.classes)) for s in ("train", "val")))]

    def to_dict(self) -> dict[str, Any]:
        return {
            "classes": list(self.classes),
            "counts": dict(self.counts),
            "hashes": dict(self.hashes),
            "value_range": list(self.value_range) if self.value_range is not None else None,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Fingerprint":
        vr = d.get("value_range")  # absent from checkpoints and studies written before it
        return cls(
            tuple(d["classes"]),
            {k: list(v) for k, v in d["counts"].items()},
            dict(d["hashes"]),
            (float(vr[0]), float(vr[1])) if vr is not None else None,
        )

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
            change = (
                f"{now - then} image(s) more"
                if now > then
                else f"{then - now} image(s) fewer"
                if then > now
                else "as many images, but other files (renamed, replaced or relabelled)"
            )
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


def _fingerprint(
    classes: list[str], splits: dict[str, tuple[list[str], list[int]]], bases: dict[str, str]
) -> Fingerprint:
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
                raise DataError(
                    f"class folder {d} resolves to {r}, {what}: the class would take every image of {split}/; {fix(d)}"
                )
        i = bisect.bisect_left(keys, r)
        while i < len(keys) and (keys[i] == r or keys[i].startswith(r + os.sep)):  # class folders inside r
            q, _, e = resolved[i]
            i += 1
            if e == d or (q == r and e.name == d.name):
                continue
            if q == r:  # blame the link, not the real folder it points at
                x, y = (e, d) if e.is_symlink() and not d.is_symlink() else (d, e)
                raise DataError(
                    f"class folder {x} resolves to {r}, the folder of class {y.name!r} ({y}) too: its "
                    f"images would carry both labels; {fix(x)}"
                )
            if e.is_symlink() and not d.is_symlink():
                raise DataError(
                    f"class folder {e} resolves to {q}, inside class folder {d}: its images would carry "
                    f"both labels; {fix(e)}"
                )
            raise DataError(
                f"class folder {d} resolves to {r}, which holds class folder {e}: the class would take "
                f"{e.name!r} images; {fix(d)}"
            )


def scan(root: str | os.PathLike | None, labels: str | os.PathLike | Labels | None = None, say: bool = True) -> Found:
    """Classes and (paths, labels) per split: from ROOT/{train,val,test}/<class>/ (a root holding class folders
    directly, with no train/, is read whole as the train split), or from labels CSVs (`labels`; see `scan_csv`);
    neither: the built-in digits demo.

    Logs one line counting what was left out and why ("skipped 3 non-image files, 2 hidden folders"), and warns
    when the layout may not mean what it is read as, unless `say` is false (a look at the layout before the
    images are loaded, which says it then).
    """
    found = (
        scan_csv(labels, root) if labels is not None else _scan_folders(Path(demo_digits() if root is None else root))
    )
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
    return (
        f"{root} holds {', '.join(files)}, which {look} of splits, but --data reads every image in its class "
        f"folders as labelled, test rows included; to use their splits, pass {command} instead of --data"
    )


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
        raise DataError(
            f"{train} has {len(classes)} class folder(s); a classifier needs at least two (train/<class>/...)"
        )
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
    return Found(
        os.path.abspath(root), classes, splits, flat, skipped, fingerprint, split_lists_hint(root) if flat else None
    )


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
        how = "rename one" + (
            "" if exact or role == "split" else f", or pass --{role}-column with the exact name of the one to use"
        )
        raise DataError(f"{csv_path}: columns {both} both match the {role} column {name!r}; {how}")
    return found[0] if found else None


def _read_csv(csv_path: Path) -> list[list[str]]:
    """Every row of a labels CSV (csv module; UTF-8, a BOM allowed), the header first."""
    if not csv_path.is_file():
        raise DataError(
            f"labels file {str(csv_path)!r} {'is a folder' if csv_path.is_dir() else 'does not exist'}; "
            "expected a CSV with columns path,label[,split]"
        )
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
        raise ConfigError(
            f"data {os.fspath(data)!r} is not the folder of the labels file {main}: its paths are "
            f"relative to its own folder ({base}); leave out data"
        )
    files = {"train": main} | {s: Path(f) for s, f in (("val", spec.val), ("test", spec.test)) if f is not None}
    flags = {"val": "--val-labels", "test": "--test-labels"}
    bases = dict.fromkeys(SPLITS, base) | {s: os.path.abspath(f.parent) for s, f in files.items()}
    entries, lines, seen = [], {}, {}
    has_split = False
    for own, csv_path in files.items():
        rows = _read_csv(csv_path)
        header = rows[0]
        at = {
            role: _column(csv_path, header, name, role)
            for role, name in (("path", spec.path_column), ("label", spec.label_column), ("split", "split"))
        }
        for role, name in (("path", spec.path_column), ("label", spec.label_column)):
            if at[role] is None and name == role:
                raise DataError(
                    f"{csv_path} has no {name!r} column (its header: {','.join(header)}); expected "
                    "path,label[,split], or name yours with --path-column and --label-column"
                )
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
                raise DataError(
                    f"{csv_path} line {n}: split {written!r} in the {own} labels file ({flags[own]}); "
                    f"it lists {own} rows only"
                )
            if own == "train" and split in files and split != "train":
                raise DataError(
                    f"{csv_path} line {n}: a {split} row, but the {split} rows come from {files[split]} "
                    f"({flags[split]}); keep them in one of the two"
                )
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
