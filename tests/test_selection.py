"""Ensemble selection on synthetic out-of-fold probabilities: the known best mix, and never a mix that only fits
noise."""

from __future__ import annotations

import numpy as np
import pytest

from autoft.estimate import Estimate
from autoft.results.selection import ensemble_selection, nested_predictions, wins_beyond_noise


def accuracy(y, pred):
    return float((y == pred).mean())


def nested_scores(probs, labels, metric):
    """What exports.choose_mix judges: the mix's and the single best's scores on images neither chose on."""
    mixed, single = nested_predictions(probs, labels, metric)
    return metric(labels, mixed), metric(labels, single)


def _confident(pred: np.ndarray, classes: int, p: float = 0.8) -> np.ndarray:
    out = np.full((len(pred), classes), (1 - p) / (classes - 1))
    out[np.arange(len(pred)), pred] = p
    return out


def test_complementary_trials_are_mixed_equally_and_a_loser_is_left_out():
    rng = np.random.default_rng(0)
    n, c = 300, 3
    y = rng.integers(0, c, n)
    cands = []
    for k in range(3):  # each wrong, confidently, on its own third of the images: any two outvote the third
        pred = np.where(np.arange(n) % 3 == k, (y + 1) % c, y)
        cands.append(_confident(pred, c))
    cands.append(_confident(rng.integers(0, c, n), c))  # a loser: chance
    mix = ensemble_selection(np.stack(cands), y, accuracy)
    assert mix.members == [0, 1, 2] and mix.weights == pytest.approx([1 / 3, 1 / 3, 1 / 3, 0], abs=0.05)
    assert mix.score == 1.0
    nested = nested_scores(np.stack(cands), y, accuracy)
    assert nested[0] == 1.0 and nested[1] <= 0.7  # on images neither chose on
    assert wins_beyond_noise(mix, nested, Estimate(nested[1], n).noise)


def _softmax(z):
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


@pytest.mark.parametrize("seed", range(12))
def test_a_shipped_mix_is_never_worse_than_the_single_winner_on_fresh_images(seed):
    """Candidates are fixed linear classifiers (the true one perturbed, some badly), scored out of fold on 200
    images; what each mix is really worth is its accuracy on 20,000 fresh images from the same classes.
    Whenever the rule ships a mix, the mix is at least as good there as the single winner."""
    rng = np.random.default_rng(seed)
    n, c, d = 200, 4, 8
    means = rng.normal(scale=1.2, size=(c, d))

    def sample(k):
        y = rng.integers(0, c, k)
        return means[y] + rng.normal(size=(k, d)), y

    x, y = sample(n)
    fresh_x, fresh_y = sample(20_000)
    weights = [means.T + rng.normal(scale=s, size=(d, c)) for s in (0.5, 0.5, 1.0, 1.0, 2.0, 3.0)]
    cands = np.stack([_softmax(x @ w) for w in weights])
    scores = [accuracy(y, p.argmax(1)) for p in cands]
    single = int(np.argmax(scores))
    mix = ensemble_selection(cands, y, accuracy)
    nested = nested_scores(cands, y, accuracy)
    fresh = np.stack([_softmax(fresh_x @ w) for w in weights])
    if wins_beyond_noise(mix, nested, Estimate(nested[1], n).noise):
        assert (
            accuracy(fresh_y, np.tensordot(mix.weights, fresh, 1).argmax(1))
            >= accuracy(fresh_y, fresh[single].argmax(1)) - 0.005
        )


def test_copies_of_one_model_never_ship_as_a_mix():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 200)
    p = _softmax(rng.normal(size=(200, 3)) + 2 * np.eye(3)[y])
    cands = np.stack([p, p, p, _softmax(rng.normal(size=(200, 3)))])
    mix = ensemble_selection(cands, y, accuracy)
    assert not wins_beyond_noise(mix, nested_scores(cands, y, accuracy), 0.0)


def test_a_single_member_is_no_mix():
    y = np.array([0, 1, 0, 1])
    p = _confident(y, 2)
    mix = ensemble_selection(np.stack([p, p]), y, accuracy)
    assert mix.members == [0] and not wins_beyond_noise(mix, (1.0, 0.0), 0.0)
