"""A dataset as a run sees it: labelled and test splits over the image store, and its folds."""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import warnings
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from ..exceptions import DataError
from .decode import Extent
from .demo import demo_digits
from .scan import Fingerprint, Labels, scan
from .store import ImageStore, check_cache, open_store, store_size_for

log = logging.getLogger("autoft")


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

    @functools.cached_property
    def class_counts(self) -> list[int]:
        """Labelled images per class, in the order of `classes` (the images that could be read)."""
        return np.bincount(self.labelled.labels.numpy(), minlength=len(self.classes)).tolist()

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
        counts = np.asarray(self.class_counts)
        small = int(counts.argmin())
        n = int(counts[small])
        if n >= k:
            return None
        used = max(2, n)
        why = (
            "so that every class is in every validation fold"
            if n >= 2
            else f"and {self.classes[small]!r} is validated in only one of them"
        )
        return (
            f"class {self.classes[small]!r} has {n} labelled image{'s' if n != 1 else ''}: cross-validation uses "
            f"{used} folds, not {k}, {why}"
        )


def load_dataset(
    root: str | os.PathLike | None,
    image_size: int,
    crop_pct: float = 0.875,
    *,
    seed: int = 0,
    val_fraction: float = 0.2,
    skip_bad_images: bool = False,
    labels: str | os.PathLike | Labels | None = None,
    value_range: Extent | None = None,
) -> Dataset:
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
        raise DataError(
            f"{len(bad)} unreadable image(s): {listed}{more}; fix or remove them, or pass --skip-bad-images"
        )
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
        labelled = Split(
            store, torch.cat([train.rows, val.rows]), torch.cat([train.labels, val.labels]), train.paths + val.paths
        )
        holdout = Fold(torch.arange(n), torch.arange(n, len(labelled)))
    else:
        if counts.min() < 2:
            raise DataError(
                f"class {classes[int(counts.argmin())]!r} has one training image; a validation split needs "
                "at least two per class (or add a val/ folder)"
            )
        n_val = max(len(classes), round(n * val_fraction))
        idx_train, idx_val = train_test_split(
            np.arange(n), test_size=n_val, random_state=seed, stratify=train.labels.numpy()
        )
        labelled, holdout = train, Fold(torch.from_numpy(np.sort(idx_train)), torch.from_numpy(np.sort(idx_val)))
    test = split(*found["test"]) if "test" in found else None
    return Dataset(
        classes,
        labelled,
        holdout,
        test,
        image_size,
        size,
        bad,
        replace(scanned.fingerprint, value_range=store.value_range),
        scanned.flat,
    )
