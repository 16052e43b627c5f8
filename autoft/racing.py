"""Fold racing: after each fold but the last, a trial is compared with the leading trial on the same images and
stopped once it is behind beyond noise, so a losing recipe pays for one or two folds, not all of them.

The comparison is paired, image by image, because both trials predicted the very same held-out images (the
folds are fixed for a study). For accuracy it is McNemar's exact test (one-sided: the binomial test on the
images exactly one of the two got right). For balanced accuracy and macro-F1, which are no sums over images,
it is a paired, class-stratified bootstrap of the difference of the metric (the one estimate.py uses for their
intervals). A trial is stopped when the one-sided p-value that it is not worse is below ALPHA / (folds - 1):
Bonferroni over the looks, so a trial exactly as good as the leader is stopped at most ALPHA of the time over
the whole race (the simulation in tests/test_racing.py measures it).

Why not Optuna's WilcoxonPruner: it ranks per-fold scores, and with 5 folds the signed-rank test cannot reach
p < 1/32 even when every fold is worse, so it could never stop a trial after one or two folds.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.stats import binomtest

from .estimate import RESAMPLES, from_confusion, score

ALPHA = 0.05  # the false-stop rate of the whole race for a trial as good as the leader


@dataclass(frozen=True)
class Verdict:
    """The race after some folds: the trial's and the leader's `metric` on the images seen so far, the one-sided
    p-value that the trial is not worse, and whether it stops (p below `threshold`)."""

    mine: float
    theirs: float
    p: float
    threshold: float
    images: int

    @property
    def stop(self) -> bool:
        return self.p < self.threshold


def race(metric: str, labels: np.ndarray, mine: np.ndarray, theirs: np.ndarray, classes: int, folds: int,
         seed: int = 0) -> Verdict:
    """Compare predicted classes `mine` with `theirs` (the leader's) on the same images (`labels`, all (n,)).

    `folds`: the study's fold count; each of its folds - 1 looks spends ALPHA / (folds - 1).
    """
    labels, mine, theirs = (np.asarray(a) for a in (labels, mine, theirs))
    threshold = ALPHA / max(1, folds - 1)
    a, b = score(metric, labels, mine, classes), score(metric, labels, theirs, classes)
    if metric == "accuracy":
        only_theirs = int(((theirs == labels) & (mine != labels)).sum())
        only_mine = int(((mine == labels) & (theirs != labels)).sum())
        n = only_theirs + only_mine
        p = binomtest(only_theirs, n, 0.5, alternative="greater").pvalue if n else 1.0
    else:
        p = _bootstrap_p(metric, labels, mine, theirs, classes, seed)
    return Verdict(a, b, float(p), threshold, len(labels))


def _bootstrap_p(metric: str, labels: np.ndarray, mine: np.ndarray, theirs: np.ndarray, classes: int,
                 seed: int) -> float:
    """The share of paired, class-stratified resamples in which `mine` scores at least `theirs` (plus one, so
    that no resample count gives p = 0)."""
    rng = np.random.default_rng(seed)
    draws = np.concatenate([rng.choice(np.flatnonzero(labels == c), (RESAMPLES, int((labels == c).sum())))
                            for c in np.unique(labels)], axis=1)
    y = labels[draws]
    cells = np.arange(RESAMPLES)[:, None] * classes * classes + y * classes

    def metric_of(pred: np.ndarray) -> np.ndarray:
        cm = np.bincount((cells + pred[draws]).ravel(), minlength=RESAMPLES * classes * classes)
        return from_confusion(metric, cm.reshape(RESAMPLES, classes, classes))

    diff = metric_of(mine) - metric_of(theirs)
    return float(((diff >= 0).sum() + 1) / (RESAMPLES + 1))
