"""Every picture autoft draws: learning curves, confusion matrices and Optuna's plots, as PNGs of one size.

Interactive figures are plotly (for the report's HTML and the dashboard); PNGs are matplotlib
(plotly's PNG export needs kaleido and a browser). Matplotlib figures are built without pyplot's global
state, except Optuna's own, which are closed at once and kept from leaking their style.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .exceptions import AutoftError
from .files import atomic_open
from .records import METRIC

PNG_SIZE = (1000, 640)  # pixels of every PNG autoft writes
PNG_DPI = 100


def _figure():
    from matplotlib.figure import Figure

    return Figure(figsize=(PNG_SIZE[0] / PNG_DPI, PNG_SIZE[1] / PNG_DPI), dpi=PNG_DPI, layout="constrained")


def _save(fig, path: str | os.PathLike) -> Path:
    path = Path(path)
    with atomic_open(path) as fh:  # like every output: old or new file, never half of one
        fig.savefig(fh, format="png", dpi=PNG_DPI)
    return path


def learning_curves_figure(histories: dict[str, Sequence[dict[str, float]]], train_loss: bool = False):
    """Plotly: loss per epoch (left) and validation accuracy per epoch (right), one colour per run."""
    import plotly.graph_objects as go
    from plotly.colors import qualitative
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=2, subplot_titles=("loss", METRIC))
    for i, (label, hist) in enumerate(histories.items()):
        color = qualitative.Plotly[i % len(qualitative.Plotly)]
        epochs = [h["epoch"] for h in hist]
        common = {"legendgroup": label, "line": {"color": color}, "mode": "lines+markers"}
        fig.add_trace(go.Scatter(x=epochs, y=[h["val_loss"] for h in hist], name=f"{label} val_loss", **common), 1, 1)
        if train_loss:
            fig.add_trace(go.Scatter(x=epochs, y=[h["train_loss"] for h in hist], name=f"{label} train_loss",
                                     **(common | {"line": {"color": color, "dash": "dash"}})), 1, 1)
        fig.add_trace(go.Scatter(x=epochs, y=[h["val_accuracy"] for h in hist], name=f"{label} {METRIC}", **common), 1, 2)
    fig.update_xaxes(title_text="epoch", dtick=1)
    fig.update_layout(title="Learning curves", height=420, margin={"t": 60})
    return fig


def save_learning_curves_png(history: Sequence[dict[str, float]], title: str, path: str | os.PathLike) -> Path:
    """Matplotlib: train/val loss and validation accuracy of one run."""
    fig = _figure()
    ax_loss, ax_acc = fig.subplots(1, 2)
    epochs = [h["epoch"] for h in history]
    ax_loss.plot(epochs, [h["train_loss"] for h in history], "o--", label="train loss")
    ax_loss.plot(epochs, [h["val_loss"] for h in history], "o-", label="val loss")
    ax_acc.plot(epochs, [h["val_accuracy"] for h in history], "o-", color="tab:green", label=METRIC)
    for ax, label in ((ax_loss, "loss"), (ax_acc, METRIC)):
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        if len(epochs) <= 20:
            ax.set_xticks(epochs)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    return _save(fig, path)


def save_confusion_png(cm: np.ndarray, classes: Sequence[str], title: str, path: str | os.PathLike) -> Path:
    """scikit-learn's ConfusionMatrixDisplay; cell counts shown while they stay legible."""
    from sklearn.metrics import ConfusionMatrixDisplay

    fig = _figure()
    ax = fig.add_subplot()
    ConfusionMatrixDisplay(np.asarray(cm), display_labels=list(classes)).plot(
        ax=ax, cmap="Blues", colorbar=False, include_values=len(classes) <= 20, xticks_rotation="vertical")
    ax.set_title(title)
    ax.grid(False)
    return _save(fig, path)


def optuna_plot(study, fn: str, kwargs: dict[str, Any], png: Path):
    """One of Optuna's plots (`fn` in optuna.visualization) from the same arguments twice: the interactive
    figure, returned, and its matplotlib twin saved as `png`. An empty plot is an error, not a blank image."""
    import matplotlib
    import matplotlib.pyplot as plt
    import optuna.visualization as vis
    import optuna.visualization.matplotlib as vis_mpl

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ExperimentalWarning for the matplotlib backend; "empty plot" is checked below
        figure = getattr(vis, fn)(study, **kwargs)
        if not figure.data:
            raise AutoftError("optuna drew an empty plot (not enough finished trials with this data)")
        with matplotlib.rc_context():  # optuna switches pyplot to its ggplot style; keep that from leaking out
            fig = np.asarray(getattr(vis_mpl, fn)(study, **kwargs)).flat[0].figure
            try:
                fig.set_size_inches(PNG_SIZE[0] / PNG_DPI, PNG_SIZE[1] / PNG_DPI)
                if len(fig.axes) == 1:  # with a colorbar axis, tight layout squashes it: keep optuna's layout
                    fig.tight_layout()
                _save(fig, png)
            finally:
                plt.close(fig)
    return figure
