"""What a validation score is worth: the metric, the images behind it, and the 95 % interval they allow.

On 100 images one image is a whole point, so a score without its interval invites reading noise as
progress. Three metrics are measured on every set of predictions (scikit-learn's definitions, computed
from confusion matrices so that thousands of bootstrap resamples cost milliseconds):

- `accuracy`: the share of images predicted right; its interval is Wilson's for a binomial proportion (scipy).
- `balanced_accuracy`: the mean of the per-class recalls (sklearn.metrics.balanced_accuracy_score).
- `f1_macro`: the mean of the per-class F1 scores (sklearn.metrics.f1_score, average="macro").

The last two are no proportions: their interval is a stratified percentile bootstrap over the scored
images (paired: an image's label and prediction are resampled together; within each class, so every
resample has the class counts that these metrics are defined on, as the test set would). The noise
that decides ties (`Estimate.noise`) is the binomial standard error for accuracy and the bootstrap's for
the others; the reported `se` is the spread of the fold scores under cross-validation.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

METRICS = ("accuracy", "balanced_accuracy", "f1_macro")
LEVEL = 0.95
BOOTSTRAP_DRAWS = 2**20  # labels drawn, and confusion cells held, at once (8 MiB each) in the bootstrap
RESAMPLES = 2000  # bootstrap resamples: the interval's ends move by well under a point between seeds


def confusion(y_true: np.ndarray, y_pred: np.ndarray, classes: int) -> np.ndarray:
    """(C, C) counts, row = true class, column = predicted (sklearn.metrics.confusion_matrix's layout)."""
    return np.bincount(np.asarray(y_true) * classes + np.asarray(y_pred), minlength=classes * classes).reshape(
        classes, classes
    )


def from_confusion(metric: str, cm: np.ndarray) -> np.ndarray:
    """The metric of each confusion matrix in a batch (..., C, C).

    Balanced accuracy averages the recall of the classes that have images (sklearn leaves the others
    out, with a warning); macro-F1 averages 2TP / (2TP + FP + FN) over every class, 0 where undefined
    (sklearn's zero_division=0).
    """
    cm = np.asarray(cm, dtype=np.float64)
    tp = np.diagonal(cm, axis1=-2, axis2=-1)
    support, predicted = cm.sum(-1), cm.sum(-2)
    if metric == "accuracy":
        return tp.sum(-1) / np.maximum(support.sum(-1), 1)
    if metric == "balanced_accuracy":
        present = support > 0
        recall = np.where(present, tp / np.maximum(support, 1), 0.0)
        return recall.sum(-1) / np.maximum(present.sum(-1), 1)
    if metric == "f1_macro":
        denom = support + predicted
        return np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 0.0).mean(-1)
    raise ValueError(f"unknown metric {metric!r}; known: {', '.join(METRICS)}")


def score(metric: str, y_true: np.ndarray, y_pred: np.ndarray, classes: int) -> float:
    return float(from_confusion(metric, confusion(y_true, y_pred, classes)))


def scores(y_true: np.ndarray, y_pred: np.ndarray, classes: int) -> dict[str, float]:
    """Every metric, from one confusion matrix."""
    cm = confusion(y_true, y_pred, classes)
    return {m: float(from_confusion(m, cm)) for m in METRICS}


def bootstrap(
    metric: str, y_true: np.ndarray, y_pred: np.ndarray, classes: int, resamples: int = RESAMPLES, seed: int = 0
) -> tuple[float, float, float]:
    """(low, high, standard error) of `metric` by a stratified, paired percentile bootstrap (Efron & Tibshirani
    1993, ch. 13): each resample draws, within every class, as many of its images as it has, with replacement.

    Seeded, so the same predictions always get the same interval. Drawn in chunks of resamples, so that it
    runs after every epoch in memory that grows with neither resamples x images nor resamples x classes^2.
    """
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    rng = np.random.default_rng(seed)
    present = np.unique(y_true)
    groups = [y_pred[y_true == c] for c in present]
    chunk = max(1, min(resamples, BOOTSTRAP_DRAWS // max(len(y_true), classes * classes)))
    parts = []
    for start in range(0, resamples, chunk):
        n = min(chunk, resamples - start)
        cm = np.zeros((n, classes, classes), dtype=np.int64)
        offset = np.arange(n)[:, None] * classes
        for c, pred in zip(present, groups):
            drawn = pred[rng.integers(0, len(pred), size=(n, len(pred)))] + offset
            cm[:, c, :] = np.bincount(drawn.ravel(), minlength=n * classes).reshape(n, classes)
        parts.append(from_confusion(metric, cm))
    stats = np.concatenate(parts)
    tail = 100 * (1 - LEVEL) / 2
    low, high = np.percentile(stats, [tail, 100 - tail])
    return float(low), float(high), float(stats.std(ddof=1))


@dataclass(frozen=True)
class Estimate:
    """A score (`value` of `metric`) on `images` images, with the fold scores behind it under cross-validation
    and, for metrics other than accuracy, the bootstrap's (low, high, standard error)."""

    value: float
    images: int
    fold_scores: tuple[float, ...] = ()
    metric: str = "accuracy"
    boot: tuple[float, float, float] | None = None

    @property
    def folds(self) -> int:
        return max(1, len(self.fold_scores))

    @property
    def interval(self) -> tuple[float, float]:
        """95 %: Wilson's for accuracy; the bootstrap's percentile interval for the other metrics."""
        if self.boot is not None:
            return self.boot[0], self.boot[1]
        from scipy.stats import binomtest

        ci = binomtest(round(self.value * self.images), self.images).proportion_ci(LEVEL, method="wilson")
        return float(ci.low), float(ci.high)

    @property
    def noise(self) -> float:
        """THE standard error that ties and pruning allow for: the binomial one at this accuracy (at least that of
        one image in `images`), or the bootstrap's for another metric (at least 1/images)."""
        if self.boot is not None:
            return max(self.boot[2], 1 / self.images)
        return math.sqrt(max(self.value * (1 - self.value), 1 / self.images) / self.images)

    @property
    def se(self) -> float:
        """Standard error of the mean fold score; with one fold, `noise`."""
        k = len(self.fold_scores)
        if k > 1:
            mean = sum(self.fold_scores) / k
            return math.sqrt(sum((a - mean) ** 2 for a in self.fold_scores) / (k - 1) / k)
        return self.noise

    @classmethod
    def measure(
        cls, metric: str, y_true: np.ndarray, y_pred: np.ndarray, classes: int, fold: np.ndarray | None = None
    ) -> "Estimate":
        """`metric` of predictions, its interval, and with `fold` (each image's fold) the score of every fold."""
        y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
        folds = (
            ()
            if fold is None
            else tuple(score(metric, y_true[fold == f], y_pred[fold == f], classes) for f in np.unique(fold))
        )
        boot = None if metric == "accuracy" else bootstrap(metric, y_true, y_pred, classes)
        return cls(score(metric, y_true, y_pred, classes), len(y_true), folds if len(folds) > 1 else (), metric, boot)

    @classmethod
    def of(cls, metrics: Mapping[str, Any], images: int, metric: str = "accuracy") -> "Estimate":
        """From an epoch's metrics (`val_<metric>`, `fold_scores`, `bootstrap`) and the images they pooled."""
        boot = metrics.get("bootstrap")
        return cls(
            metrics[f"val_{metric}"],
            images,
            tuple(metrics.get("fold_scores") or ()),
            metric,
            tuple(boot) if boot else None,
        )

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Estimate":
        """Back from `to_dict` (also reads the accuracy-only form earlier versions stored)."""
        boot = d.get("bootstrap")
        return cls(
            d["value"] if "value" in d else d["accuracy"],
            d["images"],
            tuple(d.get("fold_scores", d.get("fold_accuracy")) or ()),
            d.get("metric", "accuracy"),
            tuple(boot) if boot else None,
        )

    def epoch_metrics(self) -> dict[str, Any]:
        """What an epoch's metrics carry of this estimate, beside the pooled scores (`of` reads it back)."""
        return {"fold_scores": list(self.fold_scores), "bootstrap": list(self.boot) if self.boot else None}

    def describe(self) -> str:
        lo, hi = self.interval
        how = f"{self.folds}-fold cross-validation" if self.folds > 1 else "holdout"
        return f"{self.metric} {self.value:.4f} (95 % interval {span(lo, hi)}; {self.images} images, {how})"

    def to_dict(self) -> dict[str, Any]:
        lo, hi = self.interval
        return {
            "metric": self.metric,
            "value": self.value,
            "interval": [lo, hi],
            "images": self.images,
            "folds": self.folds,
            "fold_scores": list(self.fold_scores),
            "se": self.se,
            "bootstrap": list(self.boot) if self.boot else None,
        }


def span(low: float, high: float) -> str:
    """An interval as printed, `0.821-0.878`: one of zero width (a bootstrap whose resamples all scored the same,
    as perfect predictions on a few images do) says so, and one narrower than the digits shown gets more of them,
    rather than a puzzling `1.000-1.000`."""
    if high - low <= 1e-12:
        return f"{low:.3f}, of zero width: every bootstrap resample scored the same"
    digits = 3 if f"{low:.3f}" != f"{high:.3f}" else 5
    return f"{low:.{digits}f}-{high:.{digits}f}"


def scored(y_true: np.ndarray, y_pred: np.ndarray, classes: int) -> dict[str, dict[str, Any]]:
    """Every metric of a test split's predictions with its interval, for metrics files, evaluate and benchmarks."""
    return {
        m: {
            k: v
            for k, v in Estimate.measure(m, y_true, y_pred, classes).to_dict().items()
            if k in ("value", "interval", "images")
        }
        for m in METRICS
    }


def fold_of(index: Sequence[np.ndarray], n: int) -> np.ndarray:
    """(n,) the fold that validated each image (-1: none), from each fold's validation indices."""
    fold = np.full(n, -1)
    for f, idx in enumerate(index):
        fold[np.asarray(idx)] = f
    return fold
