"""Fold racing: after each fold but the last, a trial is compared with the leading trial on the same images, and
it pays for the next fold only while it may still win. Two stops:

* **behind**: it is worse than the leader beyond noise. The comparison is paired, image by image, because both
  trials predicted the very same held-out images (the folds are fixed for a study). For accuracy it is McNemar's
  exact test (one-sided: the binomial test on the images exactly one of the two got right); for balanced accuracy
  and macro-F1, which are no sums over images, a paired, class-stratified bootstrap of the difference of the metric
  (the one estimate.py uses for their intervals). Stopped when the one-sided p-value that it is not worse is below
  ALPHA / (folds - 1): Bonferroni over the looks, so a trial exactly as good as the leader is stopped this way at
  most ALPHA of the time over the whole race.
* **cannot win**: it is unlikely to beat the leader by more than `delta` once every fold is in, `delta` being the
  leader's standard error: the one-standard-error tie of `records.select`, inside which a trial is no better than
  the leader. This is stochastic curtailment (conditional power; Lan, Simon and Halperin 1982): the trial's final
  difference is its difference so far plus that on the images still to come, predicted from the paired difference
  so far (normal, its standard error from the same paired test). Stopped when that predictive probability,
  `p_win`, is below WIN_FLOOR, at every look but the last (`finalist`). For every look, P(stopped there and it
  would have won) <= WIN_FLOOR x P(stopped there), so a trial that would have won by more than noise is rarely
  stopped: the simulation in tests/test_racing.py measures the rate, and benchmarks/pruning.py replays it on
  recorded studies (docs/search-budget.md).

A near-tie that the ensemble of trials may want (exports.choose_mix needs complete out-of-fold predictions) is the
one exception (`runs_on_for_mix`). Why not Optuna's WilcoxonPruner: it ranks per-fold scores, and with 5 folds the
signed-rank test cannot reach p < 1/32 even when every fold is worse, so it could never stop a trial after one or
two folds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.stats import binomtest

from ..estimate import RESAMPLES, from_confusion, score

ALPHA = 0.05  # "behind": the false-stop rate over the whole race of a trial as good as the leader
WIN_FLOOR = 0.05  # "cannot win": a trial goes on while its predictive probability to win beyond noise is at least this
MIX_RUNS = 1  # near-ties per study that may run every fold for the ensemble of trials though they cannot win


@dataclass(frozen=True)
class Verdict:
    """The race after some folds: the trial's and the leader's `metric` on the images seen so far (`images` of the
    `validated` its final score will rest on), the one-sided p-value that the trial is not worse (against
    `threshold`), the predictive probability `p_win` that its final score beats the leader's by more than `delta`,
    and `mix_gain`: what averaging its probabilities with the leader's adds to the leader's score on these images."""

    mine: float
    theirs: float
    p: float
    threshold: float
    images: int
    p_win: float = 1.0
    delta: float = 0.0
    mix_gain: float = 0.0
    finalist: bool = False

    @property
    def behind(self) -> bool:
        return self.p < self.threshold

    @property
    def cannot_win(self) -> bool:
        return self.p_win < WIN_FLOOR and not self.finalist

    @property
    def stop(self) -> bool:
        """Either stop; `runs_on_for_mix` may still keep a trial that only cannot win."""
        return self.behind or self.cannot_win


def race(
    metric: str,
    labels: np.ndarray,
    mine: np.ndarray,
    theirs: np.ndarray,
    classes: int,
    folds: int,
    seed: int = 0,
    delta: float = 0.0,
    validated: int | None = None,
    mixed: np.ndarray | None = None,
    done: int | None = None,
) -> Verdict:
    """Compare predicted classes `mine` with `theirs` (the leader's) on the same images (`labels`, all (n,)).

    `folds`: the study's fold count; each of its folds - 1 looks spends ALPHA / (folds - 1). `delta`: the margin
    a win must exceed (the leader's standard error); `validated`: the images the trial's final score will rest on
    (None: these); `mixed`: the classes the two predict averaged, for `mix_gain`; `done`: the folds done (None:
    a look before the last).
    """
    labels, mine, theirs = (np.asarray(a) for a in (labels, mine, theirs))
    n = len(labels)
    threshold = ALPHA / max(1, folds - 1)
    a, b = score(metric, labels, mine, classes), score(metric, labels, theirs, classes)
    if metric == "accuracy":
        only_theirs = int(((theirs == labels) & (mine != labels)).sum())
        only_mine = int(((mine == labels) & (theirs != labels)).sum())
        disagree = only_theirs + only_mine
        p = binomtest(only_theirs, disagree, 0.5, alternative="greater").pvalue if disagree else 1.0
        # the paired difference's standard error, as if at least one image had told the two apart
        se = math.sqrt(max((disagree + 1) / n - (a - b) ** 2, 0.0) / n)
    else:
        diff = _bootstrap_diff(metric, labels, mine, theirs, classes, seed)
        p = float(((diff >= 0).sum() + 1) / (RESAMPLES + 1))
        se = max(float(diff.std(ddof=1)), 1 / n)
    gain = score(metric, labels, np.asarray(mixed), classes) - b if mixed is not None else 0.0
    return Verdict(
        a,
        b,
        float(p),
        threshold,
        n,
        p_win(a - b, se, delta, n, validated),
        delta,
        gain,
        done is not None and finalist(done, folds),
    )


def finalist(done: int, folds: int) -> bool:
    """THE rule for when "cannot win" no longer stops a trial: at the last look (every fold but one done), where the
    last fold costs a fold's share of the trial and makes it complete: a candidate for the ensemble of trials, a
    yardstick for the pruner's guard and a completed point for the sampler (the replays in docs/search-budget.md
    found stopping there saved less than it cost). Only "behind" stops it there."""
    return done >= folds - 1


def p_win(diff: float, se: float, delta: float, seen: int, validated: int | None) -> float:
    """The predictive probability that the difference over all `validated` images exceeds `delta`, given `diff`
    (standard error `se`) on the `seen` first: the final difference is (seen x diff + rest x its mean there) /
    validated, and the rest's mean is predicted as diff, give or take se x sqrt(seen / rest), so its standard
    deviation is se x sqrt(1 - seen / validated)."""
    left = 1 - seen / validated if validated else 0.0
    spread = se * math.sqrt(max(left, 0.0))
    if spread <= 0:
        return float(diff > delta)
    return 0.5 * math.erfc(-(diff - delta) / (spread * math.sqrt(2)))


def runs_on_for_mix(v: Verdict, mixable: bool, others: int) -> bool:
    """THE rule for a near-tie the ensemble of trials may want: a trial that cannot win, but is not behind, runs
    every fold when it can join the leader's ensemble (`mixable`: exports.mixable's conditions, as far as the race
    can tell), its probabilities averaged with the leader's score higher than the leader's alone on the images seen
    so far, and fewer than MIX_RUNS other trials of the study have run on this way (`others`)."""
    return not v.behind and mixable and v.mix_gain > 0 and others < MIX_RUNS


def _bootstrap_diff(
    metric: str, labels: np.ndarray, mine: np.ndarray, theirs: np.ndarray, classes: int, seed: int
) -> np.ndarray:
    """`metric` of `mine` less that of `theirs` in each of RESAMPLES paired, class-stratified resamples."""
    rng = np.random.default_rng(seed)
    draws = np.concatenate(
        [rng.choice(np.flatnonzero(labels == c), (RESAMPLES, int((labels == c).sum()))) for c in np.unique(labels)],
        axis=1,
    )
    y = labels[draws]
    cells = np.arange(RESAMPLES)[:, None] * classes * classes + y * classes

    def metric_of(pred: np.ndarray) -> np.ndarray:
        cm = np.bincount((cells + pred[draws]).ravel(), minlength=RESAMPLES * classes * classes)
        return from_confusion(metric, cm.reshape(RESAMPLES, classes, classes))

    return metric_of(mine) - metric_of(theirs)
