"""What a search found, as pictures: `autoft report` and the per-trial extras on optuna-dashboard.

The report is one self-contained HTML file (plotly.js inlined, images as data URIs: it opens offline)
plus a PNG per plot. Optuna draws its own plots twice, interactive through `optuna.visualization`
for the HTML and static through `optuna.visualization.matplotlib` for the PNGs (plotly's PNG export
needs kaleido and a browser); learning curves and confusion matrices are ours.
"""

from __future__ import annotations

import base64
import html
import logging
import math
import os
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import optuna
from optuna.trial import FrozenTrial, TrialState

from ._private.storage import DEFAULT_STORAGE, make_storage, mask_url
from .config import Config
from .exceptions import AutoftError, ConfigError
from .predict import PNG_DPI, PNG_SIZE, evaluate
from .runs import config_yaml
from .study import best_trial

log = logging.getLogger("autoft")
SLICE_PARAMS = ("freeze_depth", "head_lr", "base_lr")
METRIC = "val_accuracy"
MIN_TRIALS_FOR_IMPORTANCE = 4  # fANOVA on fewer finished trials splits importance evenly: it would look like an answer
LEARNING_CURVES_ID = "learning-curves"  # the dashboard's study-level figure, rewritten after every trial

# name -> (heading, function in optuna.visualization and optuna.visualization.matplotlib)
OPTUNA_PLOTS = {
    "optimization_history": ("Optimization history", "plot_optimization_history"),
    "param_importances": ("Parameter importances (fANOVA)", "plot_param_importances"),
    "parallel_coordinate": ("Parallel coordinates", "plot_parallel_coordinate"),
    "intermediate_values": ("Validation accuracy per epoch (a pruned trial's line stops where it was pruned)",
                            "plot_intermediate_values"),
    "slice": ("Slice plots: freeze depth and the two learning rates", "plot_slice"),
}


@dataclass
class Report:
    html: Path
    pngs: dict[str, Path] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)  # plot -> why it is not in the report
    evaluations: dict[str, dict[str, Any]] = field(default_factory=dict)  # split -> predict.evaluate's result


def write_report(study_name: str = "autoft", storage_url: str = DEFAULT_STORAGE, out_dir: str | os.PathLike | None = None,
                 artifacts_dir: str | os.PathLike = "studies/artifacts") -> Report:
    """Write `<out_dir>/report.html` (default out_dir: studies/<study>) and one PNG per plot next to it.

    The confusion matrices score the exported best model (`best.pt` in out_dir, else the best trial's
    weights artifact) on the data its config names: validation, and test when there is one.
    A plot that cannot be drawn (too few trials, data gone) is listed in the report with the reason.
    """
    storage = make_storage(storage_url)
    try:
        study = optuna.load_study(study_name=study_name, storage=storage)
    except KeyError:
        raise ConfigError(f"no study named {study_name!r} in {mask_url(storage_url)}; run autoft search first") from None
    best = best_trial(study)
    if best is None:
        raise AutoftError(f"study {study_name!r} has no completed trial yet; nothing to report")
    out = Path(out_dir or Path("studies") / study_name)
    out.mkdir(parents=True, exist_ok=True)
    report = Report(out / "report.html")
    sections: list[str] = []

    for name, (title, fn) in OPTUNA_PLOTS.items():
        try:
            interactive, png = _optuna_plot(study, name, fn, out / f"{name}.png")
        except Exception as exc:  # optuna refuses some plots on small studies; the rest of the report still helps
            report.skipped[name] = _one_line(exc)
            sections.append(_section(title, f"<p class=note>not drawn: {html.escape(report.skipped[name])}</p>"))
            continue
        report.pngs[name] = png
        sections.append(_section(title, interactive.to_html(full_html=False, include_plotlyjs=False, config={"displaylogo": False})
                                 + _png_link(png)))

    history = best.user_attrs.get("history") or []
    if history:
        png = save_learning_curves_png(history, f"best trial {best.number}: learning curves", out / "learning_curves.png")
        report.pngs["learning_curves"] = png
        fig = learning_curves_figure({f"trial {best.number}": history}, train_loss=True)
        sections.append(_section(f"Best trial {best.number}: learning curves",
                                 fig.to_html(full_html=False, include_plotlyjs=False, config={"displaylogo": False}) + _png_link(png)))
    else:
        report.skipped["learning_curves"] = f"trial {best.number} recorded no per-epoch history"

    model = _best_weights(out, best, Path(artifacts_dir))
    for split in ("val", "test"):
        name = f"confusion_{split}"
        if model is None:
            report.skipped[name] = f"no best.pt in {out} and no weights artifact for trial {best.number}"
            continue
        try:
            ev = evaluate(model, Config.from_dict(best.user_attrs["config"]).data, split, out / f"{name}.png",
                          device="auto")
        except (AutoftError, OSError) as exc:
            report.skipped[name] = _one_line(exc)
            continue
        report.evaluations[split], report.pngs[name] = ev, Path(ev["confusion_png"])
        sections.append(_section(f"Best model on {split}: accuracy {ev['accuracy']:.4f}, balanced accuracy "
                                 f"{ev['balanced_accuracy']:.4f} ({ev['n']} images)",
                                 f"<img alt='confusion matrix, {split}' src='{_data_uri(ev['confusion_png'])}'>"
                                 f"<pre>{html.escape(ev['report'])}</pre>"))

    page = _page(study, best, sections, report, storage_url)
    tmp = report.html.with_name(f".{report.html.name}.tmp")
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, report.html)
    return report


# --- plots ---------------------------------------------------------------------------------------------------

def _optuna_plot(study: optuna.Study, name: str, fn: str, png: Path):
    """The interactive figure and the PNG of one optuna plot, from the same arguments."""
    import matplotlib
    import matplotlib.pyplot as plt
    import numpy as np
    import optuna.visualization as vis
    import optuna.visualization.matplotlib as vis_mpl

    kwargs: dict[str, Any] = {} if name == "intermediate_values" else {"target_name": METRIC}
    if name == "param_importances":
        done = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
        if done < MIN_TRIALS_FOR_IMPORTANCE:
            raise AutoftError(f"{done} finished trial(s); importances need at least {MIN_TRIALS_FOR_IMPORTANCE}")
        kwargs["evaluator"] = optuna.importance.FanovaImportanceEvaluator(seed=0)
    if name == "slice":
        searched = {p for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) for p in t.params}
        kwargs["params"] = [p for p in SLICE_PARAMS if p in searched]
        if not kwargs["params"]:
            raise AutoftError(f"none of {', '.join(SLICE_PARAMS)} was searched")
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
                fig.savefig(png, dpi=PNG_DPI)
            finally:
                plt.close(fig)
    return figure, png


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
    """Matplotlib: train/val loss and validation accuracy of one run, PNG_SIZE pixels (no pyplot state)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(PNG_SIZE[0] / PNG_DPI, PNG_SIZE[1] / PNG_DPI), dpi=PNG_DPI, layout="constrained")
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
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=PNG_DPI)
    return path


# --- dashboard -----------------------------------------------------------------------------------------------

def publish_trial(trial: optuna.Trial, cfg: Config, history: Sequence[dict[str, float]],
                  artifacts_dir: str | os.PathLike = "studies/artifacts") -> None:
    """Make a finished (or pruned) trial readable on optuna-dashboard; never fails the trial.

    The trial page gets a note with the trial's config and its learning-curve PNG as an image artifact
    (optuna-dashboard draws plotly figures only per study); the study page gets one plotly figure with
    every trial's learning curve, rewritten in place.
    """
    try:
        _publish(trial, cfg, history, Path(artifacts_dir))
    except Exception as exc:  # the dashboard is a view; the trial's result matters more
        log.warning("trial %d: could not publish to the dashboard: %s", trial.number, _one_line(exc))


def _publish(trial: optuna.Trial, cfg: Config, history: Sequence[dict[str, float]], artifacts: Path) -> None:
    from optuna.artifacts import FileSystemArtifactStore, upload_artifact
    from optuna_dashboard import save_note, save_plotly_graph_object

    if not history:
        save_note(trial, f"### Trial {trial.number}\n\nno epoch finished\n\n```yaml\n{config_yaml(cfg)}```\n")
        return
    best = max(history, key=lambda h: (h["val_accuracy"], -h["val_loss"]))
    summary = f"best {METRIC} {best['val_accuracy']:.4f} at epoch {best['epoch']} of {len(history)} run ({cfg.epochs} planned)"
    reason = trial.user_attrs.get("prune_reason") or trial.user_attrs.get("fail_reason")
    if reason:
        summary += f"; {reason}"
    artifacts.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        png = save_learning_curves_png(history, f"trial {trial.number}: {summary}", Path(tmp) / f"learning_curves_trial_{trial.number}.png")
        artifact_id = upload_artifact(artifact_store=FileSystemArtifactStore(str(artifacts)), file_path=str(png),
                                      study_or_trial=trial, mimetype="image/png")
    # the dashboard serves trial artifacts at this path, so the note shows the curve full size above the config
    image = f"/artifacts/{trial.study._study_id}/{trial._trial_id}/{artifact_id}"
    save_note(trial, f"### Trial {trial.number}\n\n{summary}\n\n![learning curves]({image})\n\n```yaml\n{config_yaml(cfg)}```\n")
    runs = {t.number: t.user_attrs["history"] for t in trial.study.get_trials(deepcopy=False) if t.user_attrs.get("history")}
    runs[trial.number] = list(history)
    save_plotly_graph_object(trial.study, learning_curves_figure({f"trial {n}": runs[n] for n in sorted(runs)}),
                             graph_object_id=LEARNING_CURVES_ID)


# --- html ----------------------------------------------------------------------------------------------------

def _page(study: optuna.Study, best: FrozenTrial, sections: list[str], report: Report, storage_url: str) -> str:
    from plotly.offline import get_plotlyjs

    trials = study.get_trials(deepcopy=False)
    counts = {s: sum(t.state == s for t in trials) for s in TrialState}
    hand = next((t for t in trials if t.user_attrs.get("hand_recipe") and t.state == TrialState.COMPLETE), None)
    wall = sum(t.user_attrs.get("wall_time_s") or 0 for t in trials)
    facts = [("study", study.study_name), ("storage", mask_url(storage_url)),
             ("trials", f"{len(trials)}: {counts[TrialState.COMPLETE]} complete, {counts[TrialState.PRUNED]} pruned, "
                        f"{counts[TrialState.FAIL]} failed, {counts[TrialState.RUNNING]} running"),
             ("best", f"trial {best.number}, {METRIC} {best.value:.4f}, val_loss {best.user_attrs.get('val_loss', math.nan):.4f}"),
             ("hand recipe", f"trial {hand.number}, {METRIC} {hand.value:.4f}" if hand else "not completed"),
             ("training time", f"{wall:.0f} s in finished trials")]
    facts_html = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in facts)
    skipped = "".join(f"<li>{html.escape(k)}: {html.escape(v)}</li>" for k, v in report.skipped.items())
    config = html.escape(config_yaml(Config.from_dict(best.user_attrs["config"])))
    head = (f"<h1>autoft report: study {html.escape(study.study_name)}</h1><table class=facts>{facts_html}</table>"
            + (f"<p class=note>left out:</p><ul class=note>{skipped}</ul>" if skipped else "")
            + f"<h2>Best config (trial {best.number})</h2><pre>{config}</pre>")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>autoft report: {html.escape(study.study_name)}</title>
<style>body{{font-family:sans-serif;margin:2em auto;max-width:1200px;color:#222}} th,td{{text-align:left;padding:2px 10px;
font-size:90%}} table.trials td{{font-family:monospace}} .note{{color:#a60}} pre{{background:#f6f6f6;padding:8px}}
img{{max-width:100%}} section{{margin-top:2em}}</style>
<script type="text/javascript">{get_plotlyjs()}</script></head>
<body>{head}{''.join(sections)}{_section('All trials', _trials_table(trials))}</body></html>
"""


def _trials_table(trials: list[FrozenTrial]) -> str:
    params = sorted({p for t in trials for p in t.params})
    cols = ["#", "state", METRIC, "epochs", "wall s", *params, "note"]
    rows = []
    for t in trials:
        a = t.user_attrs
        cells = [t.number, t.state.name.lower(), _fmt(t.value), len(a.get("history", [])), _fmt(a.get("wall_time_s")),
                 *[_fmt(t.params.get(p)) for p in params], a.get("fail_reason") or a.get("prune_reason") or
                 ("hand recipe" if a.get("hand_recipe") else "")]
        rows.append("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in cells) + "</tr>")
    return ("<table class=trials><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in cols) + "</tr>"
            + "".join(rows) + "</table>")


def _section(title: str, body: str) -> str:
    return f"<section><h2>{html.escape(title)}</h2>{body}</section>"


def _png_link(png: Path) -> str:
    return f"<p><a href='{html.escape(png.name)}'>{html.escape(png.name)}</a></p>"


def _data_uri(png: str | os.PathLike) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(png).read_bytes()).decode()


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]


def _best_weights(out: Path, best: FrozenTrial, artifacts: Path) -> Path | None:
    """best.pt as exported; when it is gone, the artifact the search uploaded for the best trial."""
    if (out / "best.pt").is_file():
        return out / "best.pt"
    artifact = best.user_attrs.get("weights_artifact_id")
    if artifact and (artifacts / artifact).is_file():
        return artifacts / artifact
    return None

