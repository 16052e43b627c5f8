"""What a search found, as pictures: `autoft report` writes one self-contained HTML file and a PNG per plot.

The HTML inlines plotly.js and its images as data URIs, so it opens offline. Optuna's plots are drawn
twice, interactive for the HTML and static for the PNGs (plots.optuna_plot); learning curves and
confusion matrices are autoft's own (plots.py).
"""

from __future__ import annotations

import base64
import html
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from ..estimate import span
from ..exceptions import AutoftError, one_line
from ..storage import DEFAULT_ARTIFACTS, DEFAULT_STORAGE, export_dir, load_study, mask_url
from ..system.files import atomic_write_text, check_writable_dir
from . import records
from .plots import (
    estimates_figure,
    learning_curves_figure,
    optuna_plot,
    points,
    save_estimates_png,
    save_learning_curves_png,
    score_range,
)
from .predict import evaluate
from .summary import tie_break, time_per_state

SLICE_PARAMS = ("freeze_depth", "head_lr", "base_lr")
SCORE_AXIS = ("optimization_history", "intermediate_values", "slice")  # plots whose y axis is the study's metric
COLOURED = ("parallel_coordinate", "slice")  # plots coloured by trial or score
MIN_TRIALS_FOR_IMPORTANCE = 4  # fANOVA on fewer finished trials splits importance evenly: it would look like an answer

# name -> (heading, function in optuna.visualization and optuna.visualization.matplotlib)
OPTUNA_PLOTS = {
    "optimization_history": ("Optimization history", "plot_optimization_history"),
    "param_importances": ("Parameter importances (fANOVA)", "plot_param_importances"),
    "parallel_coordinate": ("Parallel coordinates", "plot_parallel_coordinate"),
    "intermediate_values": (
        "The study's metric per epoch (a pruned trial's line stops where it was pruned)",
        "plot_intermediate_values",
    ),
    "slice": ("Slice plots: freeze depth and the two learning rates", "plot_slice"),
}


@dataclass
class Report:
    html: Path
    pngs: dict[str, Path] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)  # plot -> why it is not in the report
    evaluations: dict[str, dict[str, Any]] = field(default_factory=dict)  # split -> predict.evaluate's result


def write_report(
    study_name: str | None = None,
    storage_url: str = DEFAULT_STORAGE,
    out_dir: str | os.PathLike | None = None,
    artifacts_dir: str | os.PathLike = DEFAULT_ARTIFACTS,
) -> Report:
    """Write `<out_dir>/report.html` (default out_dir: studies/<study>) and one PNG per plot next to it;
    `study_name` None: the storage's only study.

    The confusion matrices score the exported best model (`best.pt` in out_dir, else the best trial's
    weights artifact) on the data its config names: validation, and test when there is one.
    A plot that cannot be drawn (too few trials, data gone) is listed in the report with the reason.
    """
    study = load_study(storage_url, study_name)
    out = check_writable_dir(Path(out_dir) if out_dir else export_dir(study.study_name), "report folder")
    best = records.best_trial(study)
    if best is None:
        raise AutoftError(f"study {study.study_name!r} has no completed trial yet; nothing to report")
    out.mkdir(parents=True, exist_ok=True)
    metric = records.study_metric(study)
    report = Report(out / "report.html")
    sections: list[str] = []

    for name, (title, fn) in OPTUNA_PLOTS.items():
        try:
            interactive, png = _optuna_plot(study, name, fn, out / f"{name}.png", metric)
        except Exception as exc:  # optuna refuses some plots on small studies; the rest of the report still helps
            report.skipped[name] = one_line(exc)
            sections.append(_section(title, f"<p class=note>not drawn: {html.escape(report.skipped[name])}</p>"))
            continue
        report.pngs[name] = png
        sections.append(
            _section(
                title,
                interactive.to_html(full_html=False, include_plotlyjs=False, config={"displaylogo": False})
                + _png_link(png),
            )
        )

    estimates = points(study.get_trials(deepcopy=False), best.number)
    if estimates:
        png = save_estimates_png(estimates, out / "estimates.png", metric)
        report.pngs["estimates"] = png
        sections.insert(
            0,
            _section(
                "Estimates with their 95 % intervals, by trial and against training cost",
                estimates_figure(estimates, metric).to_html(
                    full_html=False, include_plotlyjs=False, config={"displaylogo": False}
                )
                + _png_link(png),
            ),
        )
    else:
        report.skipped["estimates"] = "no completed trial recorded an estimate"

    history = records.history(best)
    if history:
        png = save_learning_curves_png(
            history, f"best trial {best.number}: learning curves", out / "learning_curves.png", metric
        )
        report.pngs["learning_curves"] = png
        fig = learning_curves_figure({f"trial {best.number}": history}, metric, train_loss=True)
        sections.append(
            _section(
                f"Best trial {best.number}: learning curves",
                fig.to_html(full_html=False, include_plotlyjs=False, config={"displaylogo": False}) + _png_link(png),
            )
        )
    else:
        report.skipped["learning_curves"] = f"trial {best.number} recorded no per-epoch history"

    model = _best_weights(out, best, Path(artifacts_dir))
    for split in ("val", "test"):
        name = f"confusion_{split}"
        if model is None:
            report.skipped[name] = f"no best.pt in {out} and no weights artifact for trial {best.number}"
            continue
        try:
            ev = evaluate(model, None, split, out / f"{name}.png", device="auto")  # on the data it trained on
        except (AutoftError, OSError) as exc:
            report.skipped[name] = one_line(exc)
            continue
        report.evaluations[split], report.pngs[name] = ev, Path(ev["confusion_png"])
        scores = ", ".join(f"{m} {v['value']:.4f} ({span(*v['interval'])})" for m, v in ev["metrics"].items())
        sections.append(
            _section(
                f"Best model on {split}: {scores} ({ev['n']} images"
                f"{'; it trained on them, so this is no estimate' if ev['seen_in_training'] else ''})",
                f"<img alt='confusion matrix, {split}' src='{_data_uri(ev['confusion_png'])}'>"
                f"<pre>{html.escape(ev['report'])}</pre>",
            )
        )

    atomic_write_text(report.html, _page(study, best, sections, report, storage_url))
    return report


def _optuna_plot(study: optuna.Study, name: str, fn: str, png: Path, metric: str):
    """The interactive figure and the PNG of one optuna plot, or an error saying why it is left out."""
    kwargs: dict[str, Any] = {} if name == "intermediate_values" else {"target_name": records.metric_name(metric)}
    if name == "param_importances":
        done = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
        if done < MIN_TRIALS_FOR_IMPORTANCE:
            raise AutoftError(f"{done} finished trial(s); importances need at least {MIN_TRIALS_FOR_IMPORTANCE}")
        kwargs["evaluator"] = optuna.importance.FanovaImportanceEvaluator(seed=0)
    if name in COLOURED and len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))) < 2:
        raise AutoftError("one completed trial: its colour scale (by trial) would compare nothing")
    if name == "slice":
        searched = {p for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) for p in t.params}
        kwargs["params"] = [p for p in SLICE_PARAMS if p in searched]
        if not kwargs["params"]:
            raise AutoftError(f"none of {', '.join(SLICE_PARAMS)} was searched")
    trials = study.get_trials(deepcopy=False)
    scores = [t.value for t in trials if t.state == TrialState.COMPLETE] + [
        v for t in trials for v in t.intermediate_values.values()
    ]
    return optuna_plot(study, fn, kwargs, png, score_range(scores) if name in SCORE_AXIS else None), png


# --- html ----------------------------------------------------------------------------------------------------


def _page(study: optuna.Study, best: FrozenTrial, sections: list[str], report: Report, storage_url: str) -> str:
    from plotly.offline import get_plotlyjs

    trials = study.get_trials(deepcopy=False)
    counts = records.state_counts(trials)
    recipes = records.portfolio_results(trials)
    gain = records.gain_over_portfolio(best, trials)
    tie = tie_break(best, trials)
    facts = [
        ("study", study.study_name),
        ("storage", mask_url(storage_url)),
        (
            "trials",
            f"{len(trials)}: {counts[TrialState.COMPLETE]} complete, {counts[TrialState.PRUNED]} pruned, "
            f"{counts[TrialState.FAIL]} failed, {counts[TrialState.RUNNING]} running",
        ),
        ("winner", records.describe(best)),
        *((("tie-break", tie),) if tie else ()),
        *((f"portfolio: {name}", records.describe(t)) for name, t in recipes.items()),
        (
            "gain over the best portfolio recipe",
            "no portfolio recipe completed"
            if gain is None
            else f"{gain:+.4f}" + (" (below it, within one standard error: see the tie-break)" if gain < 0 else ""),
        ),
        ("time in trials", time_per_state(trials)),
    ]
    facts_html = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in facts)
    skipped = "".join(f"<li>{html.escape(k)}: {html.escape(v)}</li>" for k, v in report.skipped.items())
    config = html.escape(records.config(best).to_yaml())
    head = (
        f"<h1>autoft report: study {html.escape(study.study_name)}</h1><table class=facts>{facts_html}</table>"
        + (f"<p class=note>left out:</p><ul class=note>{skipped}</ul>" if skipped else "")
        + f"<h2>Best config (trial {best.number})</h2><pre>{config}</pre>"
    )
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>autoft report: {html.escape(study.study_name)}</title>
<style>body{{font-family:sans-serif;margin:2em auto;max-width:1200px;color:#222}}
th,td{{text-align:left;padding:2px 10px;font-size:90%}} table.trials td{{font-family:monospace}} .note{{color:#a60}}
pre{{background:#f6f6f6;padding:8px}}
img{{max-width:100%}} section{{margin-top:2em}} .wide{{overflow-x:auto}} pre{{overflow-x:auto}}</style>
<script type="text/javascript">{get_plotlyjs()}</script></head>
<body>{head}{"".join(sections)}{_section("All trials", _trials_table(trials))}</body></html>
"""


def _trials_table(trials: list[FrozenTrial]) -> str:
    header, rows = records.trial_rows(trials)
    return (
        "<div class=wide><table class=trials><tr>"
        + "".join(f"<th>{html.escape(c)}</th>" for c in header)
        + "</tr>"
        + "".join("<tr>" + "".join(f"<td>{html.escape(records.fmt(c))}</td>" for c in row) + "</tr>" for row in rows)
        + "</table></div>"
    )


def _section(title: str, body: str) -> str:
    return f"<section><h2>{html.escape(title)}</h2>{body}</section>"


def _png_link(png: Path) -> str:
    return f"<p><a href='{html.escape(png.name)}'>{html.escape(png.name)}</a></p>"


def _data_uri(png: str | os.PathLike) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(png).read_bytes()).decode()


def _best_weights(out: Path, best: FrozenTrial, artifacts: Path) -> Path | None:
    """best.pt as exported; when it is gone, the artifact the search uploaded for the best trial."""
    if (out / "best.pt").is_file():
        return out / "best.pt"
    artifact = records.weights_artifact(best)
    if artifact and (artifacts / artifact).is_file():
        return artifacts / artifact
    return None
