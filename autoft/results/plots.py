"""Every picture autoft draws: learning curves, confusion matrices and Optuna's plots, as PNGs of one size.

Interactive figures are plotly (for the report's HTML and the dashboard); PNGs are matplotlib
(plotly's PNG export needs kaleido and a browser). Matplotlib figures are built without pyplot's global
state, except Optuna's own, which are closed at once and kept from leaking their style.
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..estimate import span
from ..exceptions import AutoftError
from ..system.files import atomic_open, atomic_write_bytes
from . import records

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


def score_range(values: Sequence[float | None]) -> tuple[float, float] | None:
    """A score axis around `values` that stays near [0, 1], where every metric lives: left to itself, an axis
    of one or two points is padded to 0.2-1.8. None when there is no value."""
    shown = [v for v in values if v is not None and np.isfinite(v)]
    if not shown:
        return None
    lo, hi = min(shown), max(shown)
    pad = max(0.02, 0.1 * (hi - lo))
    return max(0.0, lo - pad), min(1.0 + pad / 2, hi + pad)


def learning_curves_figure(
    histories: dict[str, Sequence[dict[str, float]]], metric: str = "accuracy", train_loss: bool = False
):
    """Plotly: loss per epoch (left) and the validation `metric` per epoch (right), one colour per run."""
    import plotly.graph_objects as go
    from plotly.colors import qualitative
    from plotly.subplots import make_subplots

    score = records.metric_name(metric)
    fig = make_subplots(rows=1, cols=2, subplot_titles=("loss", score))
    for i, (label, hist) in enumerate(histories.items()):
        color = qualitative.Plotly[i % len(qualitative.Plotly)]
        epochs = [h["epoch"] for h in hist]
        common = {"legendgroup": label, "line": {"color": color}, "mode": "lines+markers"}
        fig.add_trace(go.Scatter(x=epochs, y=[h["val_loss"] for h in hist], name=f"{label} val_loss", **common), 1, 1)
        if train_loss:
            fig.add_trace(
                go.Scatter(
                    x=epochs,
                    y=[h["train_loss"] for h in hist],
                    name=f"{label} train_loss",
                    **(common | {"line": {"color": color, "dash": "dash"}}),
                ),
                1,
                1,
            )
        fig.add_trace(go.Scatter(x=epochs, y=[h.get(score) for h in hist], name=f"{label} {score}", **common), 1, 2)
    fig.update_xaxes(title_text="epoch", dtick=1)
    fig.update_yaxes(range=score_range([h.get(score) for hist in histories.values() for h in hist]), row=1, col=2)
    fig.update_layout(title="Learning curves", height=420, margin={"t": 60})
    return fig


def save_learning_curves_png(
    history: Sequence[dict[str, float]], title: str, path: str | os.PathLike, metric: str = "accuracy"
) -> Path:
    """`learning_curves_png` written to `path`."""
    path = Path(path)
    atomic_write_bytes(path, learning_curves_png(history, title, metric))
    return path


def learning_curves_png(history: Sequence[dict[str, float]], title: str, metric: str = "accuracy") -> bytes:
    """Matplotlib, as a PNG: train/val loss and the validation `metric` of one run."""
    score = records.metric_name(metric)
    fig = _figure()
    ax_loss, ax_acc = fig.subplots(1, 2)
    epochs = [h["epoch"] for h in history]
    ax_loss.plot(epochs, [h["train_loss"] for h in history], "o--", label="train loss")
    ax_loss.plot(epochs, [h["val_loss"] for h in history], "o-", label="val loss")
    ax_acc.plot(epochs, [h.get(score) for h in history], "o-", color="tab:green", label=score)
    for ax, label in ((ax_loss, "loss"), (ax_acc, score)):
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        if len(epochs) <= 20:
            ax.set_xticks(epochs)
        ax.grid(alpha=0.3)
        ax.legend()
    ax_acc.set_ylim(score_range([h.get(score) for h in history]))
    fig.suptitle(title)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=PNG_DPI)
    return buf.getvalue()


@dataclass(frozen=True)
class Point:
    """One completed trial on the estimates plot."""

    number: int
    value: float
    low: float
    high: float
    seconds: float
    backbone: str
    winner: bool = False


def points(trials: Sequence[Any], winner: int | None) -> list[Point]:
    """The completed trials that recorded an estimate, as plot points."""
    out = []
    for t in trials:
        e = records.estimate(t)
        if e is None or t.value is None:
            continue
        low, high = e.interval
        out.append(
            Point(
                t.number,
                e.value,
                low,
                high,
                t.user_attrs.get(records.WALL_TIME) or 0.0,
                t.user_attrs.get(records.CONFIG, {}).get("backbone", "?"),
                t.number == winner,
            )
        )
    return out


def estimates_figure(points: Sequence[Point], metric: str = "accuracy"):
    """Plotly: every completed trial's estimate with its 95 % interval, by trial (left) and against its wall time
    (right, log scale: frozen features and all), one colour per backbone; the winner ringed."""
    import plotly.graph_objects as go
    from plotly.colors import qualitative
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=2, subplot_titles=("estimate by trial", "estimate against cost"))
    for i, backbone in enumerate(dict.fromkeys(p.backbone for p in points)):
        mine = [p for p in points if p.backbone == backbone]
        bars = {
            "type": "data",
            "symmetric": False,
            "array": [p.high - p.value for p in mine],
            "arrayminus": [p.value - p.low for p in mine],
        }
        marker = {
            "color": qualitative.Plotly[i % len(qualitative.Plotly)],
            "line": {"width": [3 if p.winner else 0 for p in mine], "color": "black"},
            "size": 9,
        }
        text = [
            f"trial {p.number}" + (" (winner)" if p.winner else "") + f": {p.value:.4f} ({span(p.low, p.high)}), "
            f"{p.seconds:.0f} s"
            for p in mine
        ]
        for col, x in ((1, [p.number for p in mine]), (2, [p.seconds for p in mine])):
            fig.add_trace(
                go.Scatter(
                    x=x,
                    y=[p.value for p in mine],
                    error_y=bars,
                    mode="markers",
                    marker=marker,
                    text=text,
                    hovertemplate="%{text}",
                    name=backbone,
                    legendgroup=backbone,
                    showlegend=col == 1,
                ),
                1,
                col,
            )
    fig.update_xaxes(title_text="trial", row=1, col=1)
    fig.update_xaxes(title_text="trial wall time (s)", type="log", row=1, col=2)
    fig.update_yaxes(title_text=f"{records.metric_name(metric)} (95 % interval)", range=_interval_range(points))
    fig.update_layout(title="Estimates with their intervals, and what they cost", height=460, margin={"t": 70})
    return fig


def save_estimates_png(points: Sequence[Point], path: str | os.PathLike, metric: str = "accuracy") -> Path:
    """Matplotlib twin of `estimates_figure`."""
    fig = _figure()
    by_trial, by_cost = fig.subplots(1, 2, sharey=True)
    for backbone in dict.fromkeys(p.backbone for p in points):
        mine = [p for p in points if p.backbone == backbone]
        err = np.array([[p.value - p.low for p in mine], [p.high - p.value for p in mine]])
        for ax, x in ((by_trial, [p.number for p in mine]), (by_cost, [p.seconds for p in mine])):
            ax.errorbar(x, [p.value for p in mine], yerr=err, fmt="o", capsize=3, label=backbone)
            ax.scatter(
                [xi for xi, p in zip(x, mine) if p.winner],
                [p.value for p in mine if p.winner],
                s=160,
                facecolors="none",
                edgecolors="black",
                zorder=3,
            )
    by_trial.set_xlabel("trial")
    by_trial.xaxis.get_major_locator().set_params(integer=True)
    by_trial.set_ylabel(f"{records.metric_name(metric)} (95 % interval)")
    by_cost.set_xlabel("trial wall time (s)")
    by_cost.set_xscale("log")
    by_trial.set_ylim(_interval_range(points))
    for ax in (by_trial, by_cost):
        ax.grid(alpha=0.3)
    by_trial.legend()
    fig.suptitle("Estimates with their intervals (winner ringed), and what they cost")
    return _save(fig, path)


def _interval_range(points: Sequence[Point]) -> tuple[float, float] | None:
    return score_range([v for p in points for v in (p.low, p.high)])


def save_confusion_png(cm: np.ndarray, classes: Sequence[str], title: str, path: str | os.PathLike) -> Path:
    """scikit-learn's ConfusionMatrixDisplay; cell counts shown while they stay legible."""
    from sklearn.metrics import ConfusionMatrixDisplay

    fig = _figure()
    ax = fig.add_subplot()
    ConfusionMatrixDisplay(np.asarray(cm), display_labels=list(classes)).plot(
        ax=ax, cmap="Blues", colorbar=False, include_values=len(classes) <= 20, xticks_rotation="vertical"
    )
    ax.set_title(title)
    ax.grid(False)
    return _save(fig, path)


def optuna_plot(study, fn: str, kwargs: dict[str, Any], png: Path, y_range: tuple[float, float] | None = None):
    """One of Optuna's plots (`fn` in optuna.visualization) from the same arguments twice: the interactive
    figure, returned, and its matplotlib twin saved as `png`, their y axes (colour bars aside) spanning `y_range`
    when given. An empty plot is an error, not a blank image."""
    import matplotlib
    import matplotlib.pyplot as plt
    import optuna.visualization as vis
    import optuna.visualization.matplotlib as vis_mpl

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ExperimentalWarning for the matplotlib backend; "empty plot" is checked below
        figure = getattr(vis, fn)(study, **kwargs)
        if not figure.data:
            raise AutoftError("optuna drew an empty plot (not enough finished trials with this data)")
        if y_range:
            figure.update_yaxes(range=y_range)
        with matplotlib.rc_context():  # optuna switches pyplot to its ggplot style; keep that from leaking out
            fig = np.asarray(getattr(vis_mpl, fn)(study, **kwargs)).flat[0].figure
            try:
                fig.set_size_inches(PNG_SIZE[0] / PNG_DPI, PNG_SIZE[1] / PNG_DPI)
                for ax in fig.axes if y_range else ():
                    if ax.get_label() != "<colorbar>":
                        ax.set_ylim(y_range)
                if len(fig.axes) == 1:  # with a colorbar axis, tight layout squashes it: keep optuna's layout
                    fig.tight_layout()
                _save(fig, png)
            finally:
                plt.close(fig)
    return figure
