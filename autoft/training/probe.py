"""Exact linear probes: with every stage frozen and nothing augmented, the head is fitted, not trained.

A trial whose `freeze_depth` is the backbone's stage count (the last stage ends in global pooling) and whose
`aug_strength` is 0 sees the same pooled features every epoch, so its head is multinomial logistic regression
on fixed features: a convex problem that scikit-learn solves exactly (L-BFGS) in seconds, where epochs of
AdamW only approach it. The inverse regularization C is chosen per fold by an inner stratified
cross-validation on that fold's training features (`LogisticRegressionCV`, scored by log loss), on
standardized features; the scaler is folded into the weights, so the shipped model is still the backbone
plus one `nn.Linear` head, and predict, export and evaluate are unchanged. The optimizer keys (rates,
weight decay, epochs, label smoothing) do not apply to such a trial: C is its regularization.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression, LogisticRegressionCV
from sklearn.model_selection import StratifiedKFold
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits
from torch import nn

from ..config import Config

CS = np.logspace(-4, 1, 11)  # the C grid of the inner cross-validation: 1e-4 to 10, half a decade apart
INNER_FOLDS = 5
MAX_ITER = 2000
EXACT = "exact_probe"  # in the metrics of the one epoch an exact probe reports
CHOSEN_C = "probe_C"  # the C each fold's inner cross-validation chose
# The config keys that shape training by epochs, which an exact probe never runs: its summary marks them unused.
UNUSED = (
    "epochs",
    "head_only_epochs",
    "head_lr",
    "base_lr",
    "layer_decay",
    "optimizer",
    "momentum",
    "weight_decay",
    "t_max",
    "warmup_epochs",
    "label_smoothing",
    "patience",
    "balanced_sampling",
    "ema_decay",
    "drop_path_rate",
)


def applies(cfg: Config, n_stages: int) -> bool:
    """Whether a trial is an exact probe: every stage frozen (a linear head on pooled features), no augmentation
    (`Config.augmented`: none of aug_strength, TrivialAugment, Mixup, CutMix)."""
    return cfg.freeze_depth == n_stages and not cfg.augmented


def exact(history: Sequence[dict[str, Any]]) -> bool:
    """Whether a run's recorded epochs are an exact probe's (one epoch, fitted)."""
    return any(h.get(EXACT) for h in history)


def fit_logistic(
    x: np.ndarray, y: np.ndarray, seed: int, weight: dict[int, float] | None = None
) -> tuple[LogisticRegression, float]:
    """scikit-learn's L-BFGS multinomial logistic regression on `x` (n, d), labels `y` (n,), with C chosen by a
    stratified inner `INNER_FOLDS`-fold cross-validation over `CS` by log loss (fewer inner folds when a class
    has fewer images; C=1 when one has a single image); `weight`: scikit-learn's class_weight, per class.
    Returns the model refitted on all of `x` and its C."""
    folds = min(INNER_FOLDS, int(np.bincount(y)[np.unique(y)].min()))
    # One BLAS thread: these matrices are small, and on a shared CPU spinning BLAS threads made the same fit 25x
    # slower (LogisticRegressionCV on 480 x 1280 features, 10 classes: 260 s against 10 s at load 25 on 2 cores).
    with threadpool_limits(limits=1, user_api="blas"), warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        warnings.simplefilter("ignore", FutureWarning)  # scikit-learn announces default changes we do not rely on
        if folds < 2:
            model = LogisticRegression(C=1.0, max_iter=MAX_ITER, class_weight=weight).fit(x, y)
            return model, 1.0
        model = LogisticRegressionCV(
            Cs=CS,
            cv=StratifiedKFold(folds, shuffle=True, random_state=seed % 2**32),
            scoring="neg_log_loss",
            max_iter=MAX_ITER,
            class_weight=weight,
        ).fit(x, y)
    return model, float(np.atleast_1d(model.C_)[0])


def linear_head(model: LogisticRegression, scaler: StandardScaler, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """The (num_classes, d) weight and (num_classes,) bias of one softmax layer equal to `scaler` then `model`.

    A binary model's one logit w.x + b becomes the pair (-w.x - b, w.x + b) / 2, whose softmax is the same
    sigmoid; a class absent from the fit gets zero weight and a bias far below every other."""
    coef, intercept = model.coef_, model.intercept_
    if len(model.classes_) == 2:
        coef, intercept = np.vstack([-coef, coef]) / 2, np.array([-intercept[0], intercept[0]]) / 2
    weight = coef / scaler.scale_  # (x - mean) / scale, folded into the weights
    bias = intercept - weight @ scaler.mean_
    full_w = np.zeros((num_classes, weight.shape[1]))
    full_b = np.full(num_classes, bias.min() - 50.0)
    full_w[model.classes_], full_b[model.classes_] = weight, bias
    return full_w, full_b


@torch.no_grad()
def fit_heads(
    heads: Sequence[tuple[nn.Linear, torch.Tensor, torch.Tensor | None]],
    features: torch.Tensor,
    labels: torch.Tensor,
    cfg: Config,
) -> tuple[float, int, dict[str, Any]]:
    """Fit each (head, training indices, class weights or None) exactly on `features[indices]` (pooled features,
    (N, d)), the classes weighted as the loss would weight them (`class_weight`), and write the solution into
    the head. Returns the mean training log loss, the images fitted, and metrics for the epoch (`EXACT`, the C
    each fold chose; None for a fold that saw one class)."""
    x = features.float().cpu().numpy().astype(np.float64)
    y = labels.cpu().numpy()
    loss_sum, seen, chosen = 0.0, 0, []
    for head, train, weight in heads:
        idx = train.cpu().numpy()
        present = np.unique(y[idx])
        if len(present) == 1:  # a fold whose training part holds one class (a class of one image): it predicts it
            weight, bias, c = np.zeros((head.out_features, x.shape[1])), np.full(head.out_features, -50.0), None
            bias[present] = 0.0
        else:
            scaler = StandardScaler().fit(x[idx])
            per_class = None if weight is None else dict(enumerate(weight.tolist()))
            model, c = fit_logistic(scaler.transform(x[idx]), y[idx], cfg.seed, per_class)
            weight, bias = linear_head(model, scaler, head.out_features)
        head.weight.copy_(torch.from_numpy(weight).to(head.weight))
        head.bias.copy_(torch.from_numpy(bias).to(head.bias))
        logits = head(features[train].to(head.weight.dtype))
        loss_sum += F.cross_entropy(logits, labels[train], reduction="sum").item()
        seen += len(idx)
        chosen.append(c)
    return loss_sum / seen, seen, {EXACT: True, CHOSEN_C: chosen}
