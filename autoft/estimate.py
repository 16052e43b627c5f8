"""What a validation score is worth: the accuracy, the images behind it, and the 95 % interval they allow.

On 100 images one image is a whole point, so a score without its interval invites reading noise as
progress. The interval is Wilson's for a binomial proportion (scipy), over every image that was scored
out of fold; the standard error is the spread of the fold scores (k > 1) or the binomial one (a holdout).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Estimate:
    accuracy: float
    images: int
    fold_accuracy: tuple[float, ...] = ()

    @property
    def folds(self) -> int:
        return max(1, len(self.fold_accuracy))

    @property
    def interval(self) -> tuple[float, float]:
        from scipy.stats import binomtest

        ci = binomtest(round(self.accuracy * self.images), self.images).proportion_ci(0.95, method="wilson")
        return float(ci.low), float(ci.high)

    @property
    def se(self) -> float:
        """Standard error of the mean fold score; with one fold, of the proportion."""
        k = len(self.fold_accuracy)
        if k > 1:
            mean = sum(self.fold_accuracy) / k
            return math.sqrt(sum((a - mean) ** 2 for a in self.fold_accuracy) / (k - 1) / k)
        return math.sqrt(self.accuracy * (1 - self.accuracy) / self.images)

    @property
    def binomial_se(self) -> float:
        """The noise that `images` alone allow at this accuracy: what the search's tie rule uses."""
        return math.sqrt(max(self.accuracy * (1 - self.accuracy), 1 / self.images) / self.images)

    @classmethod
    def of(cls, metrics: Mapping[str, Any], images: int) -> "Estimate":
        """From an epoch's metrics (`val_accuracy`, `fold_accuracy`) and the images they pooled."""
        return cls(metrics["val_accuracy"], images, tuple(metrics.get("fold_accuracy") or ()))

    def describe(self) -> str:
        lo, hi = self.interval
        how = f"{self.folds}-fold cross-validation" if self.folds > 1 else "holdout"
        return f"{self.accuracy:.4f} (95 % interval {lo:.3f}-{hi:.3f}; {self.images} images, {how})"

    def to_dict(self) -> dict[str, Any]:
        lo, hi = self.interval
        return {"accuracy": self.accuracy, "interval": [lo, hi], "images": self.images, "folds": self.folds,
                "fold_accuracy": list(self.fold_accuracy), "se": self.se}


def scored(accuracy: float, images: int) -> dict[str, Any]:
    """A test score with its interval, for metrics files and benchmarks."""
    return {k: v for k, v in Estimate(accuracy, images).to_dict().items() if k in ("accuracy", "interval", "images")}

