"""Ensemble selection (Caruana, Niculescu-Mizil, Crew and Ksikes, ICML 2004), as AutoGluon and auto-sklearn use it:
from the out-of-fold probabilities of finished trials, a weighted mix chosen greedily.

Forward selection with replacement: start empty; each round add the candidate whose inclusion gives the
averaged probabilities the best score (the study's metric, ties broken by the lower log loss); a
candidate picked r times out of R rounds weighs r/R. The mix kept is the best round's, not the last's.
Selection happens on the same out-of-fold predictions it is scored on, so its score is optimistic (on
synthetic near-copies of one model, 25 greedy rounds gained 3.5 points of pure noise, more than one
standard error). So the decision is nested: the mix and the single best candidate are each chosen on 4/5
of the images and scored on the fifth they did not see (`nested_predictions`), and a mix ships only when it
beats the single candidate there by more than one standard error (the one-standard-error rule, as
`records.select` ranks trials).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

ROUNDS = 25  # AutoGluon's default; more rounds only refine weights among the same few members


@dataclass(frozen=True)
class Selection:
    weights: np.ndarray  # (M,) per candidate, summing to 1; 0 for the ones left out
    score: float  # the metric of the weighted mix's out-of-fold predictions
    log_loss: float

    @property
    def members(self) -> list[int]:
        return [int(i) for i in np.flatnonzero(self.weights)]


def log_loss(probs: np.ndarray, labels: np.ndarray) -> float:
    return float(-np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-15, None)).mean())


def ensemble_selection(
    probs: np.ndarray, labels: np.ndarray, metric: Callable[[np.ndarray, np.ndarray], float], rounds: int = ROUNDS
) -> Selection:
    """`probs` (M candidates, N images, C classes): out-of-fold probabilities on the same images; `labels` (N,);
    `metric(y_true, y_pred)` higher is better. Returns the weights of the best round's mix."""
    probs = np.asarray(probs, dtype=np.float64)
    total = np.zeros(probs.shape[1:])
    counts = np.zeros(len(probs))
    best: tuple[float, float] | None = None
    kept = counts
    for r in range(1, rounds + 1):
        keys = []
        for cand in probs:
            mix = (total + cand) / r
            keys.append((metric(labels, mix.argmax(1)), -log_loss(mix, labels)))
        pick = max(range(len(probs)), key=lambda m: keys[m])  # the first of equals: candidates come best first
        counts[pick] += 1
        total += probs[pick]
        if best is None or keys[pick] > best:
            best, kept = keys[pick], counts.copy()
    assert best is not None
    return Selection(kept / kept.sum(), best[0], -best[1])


def nested_predictions(
    probs: np.ndarray,
    labels: np.ndarray,
    metric: Callable[[np.ndarray, np.ndarray], float],
    folds: int = 5,
    seed: int = 0,
    rounds: int = ROUNDS,
) -> tuple[np.ndarray, np.ndarray]:
    """The predicted classes (N,) of the two procedures on images neither chose on: (the selected mix, the single
    best candidate). Over stratified `folds` of the images (scikit-learn), each is chosen on the other folds and
    predicts the held-out one. Both are selections, so both are judged the same way, paired on the same images."""
    from sklearn.model_selection import StratifiedKFold

    probs = np.asarray(probs, dtype=np.float64)
    mixed, single = np.zeros(len(labels), dtype=int), np.zeros(len(labels), dtype=int)
    folds = max(2, min(folds, int(np.bincount(labels)[np.unique(labels)].min())))
    with warnings.catch_warnings():  # a class of one image: the search's fold notice has said so
        warnings.filterwarnings("ignore", "The least populated class in y has only", UserWarning)
        splits = list(StratifiedKFold(folds, shuffle=True, random_state=seed).split(labels, labels))
    for tr, va in splits:
        mix = ensemble_selection(probs[:, tr], labels[tr], metric, rounds)
        mixed[va] = np.tensordot(mix.weights, probs[:, va], axes=1).argmax(1)
        keys = [(metric(labels[tr], p[tr].argmax(1)), -log_loss(p[tr], labels[tr])) for p in probs]
        single[va] = probs[max(range(len(probs)), key=lambda m: keys[m]), va].argmax(1)
    return mixed, single


def wins_beyond_noise(mix: Selection, nested: tuple[float, float], noise: float) -> bool:
    """Whether a mix of two or more members, judged on images it was not chosen on, beats the single best
    candidate judged the same way by more than `noise` (one standard error of the score)."""
    return len(mix.members) > 1 and nested[0] > nested[1] + noise
