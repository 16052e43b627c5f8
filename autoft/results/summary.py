"""The summary a search prints: what won, what it is worth, where the budget went."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from ..estimate import Estimate, span
from ..space import imbalanced
from ..training import probe
from ..training.checkpoint import shipped
from ..training.probe import EXACT
from . import records
from .exports import describe_mix


def print_summary(
    study: optuna.Study,
    best: FrozenTrial | None,
    seconds: float,
    out: Path,
    mine: Sequence[FrozenTrial],
    export_seconds: float = 0.0,
    budget: float | None = None,
) -> None:
    """What the search found, what it is worth (the winner's estimate with its 95 % interval and the images
    behind it), what it adds over the portfolio recipes, where the budget went (`mine`: this run's trials), and
    where the exports are."""
    trials = study.get_trials(deepcopy=False)
    count = records.state_counts(mine)
    done = count[TrialState.COMPLETE] + count[TrialState.PRUNED] + count[TrialState.FAIL]
    lines = [
        f"study {study.study_name}: {done} trials this run ({count[TrialState.COMPLETE]} complete, "
        f"{count[TrialState.PRUNED]} pruned, {count[TrialState.FAIL]} failed) in {seconds:.1f} s"
        + (f" of a {budget:g} s budget" if budget else "")
        + f"; {len(trials)} in the study",
        f"  time in trials this run: {time_per_state(mine)}",
        f"  by kind: {budget_story(mine)}; final export {export_seconds:.0f} s",
        f"  {sampled_story(mine)}",
    ]
    if best is not None:
        e = records.estimate(best)
        lines.append(f"winner: {records.describe(best)}")
        lines.append(
            f"  its estimate rests on {e.folds if e else 1} fold(s) x {len(records.history(best))} epoch(s)"
            f" ({e.images if e else '?'} images validated)"
        )
        tie = tie_break(best, trials)
        if tie:
            lines.append(f"  {tie}")
        # each recipe's first trial that ended: its estimate, or where it was pruned
        for name, t in records.portfolio_results(trials, (TrialState.COMPLETE, TrialState.PRUNED)).items():
            _, value = max(t.intermediate_values.items(), default=(0, float("nan")))
            last = (records.steps(t) or [{}])[-1]
            where = f"fold {last['fold']} epoch {last['epoch']}" if "fold" in last else "its first epoch"
            result = records.fmt(t.value) if t.state == TrialState.COMPLETE else f"pruned after {where} ({value:.4f})"
            lines.append(f"  portfolio {name:<28} trial {t.number:<3} {result}")
        gain = records.gain_over_portfolio(best, trials)
        if gain is not None:
            lines.append(
                f"  gain over the best portfolio recipe: {gain:+.4f}"
                + (" (below it, within one standard error: the tie-break above)" if gain < 0 else "")
            )
        counts = records.class_counts(study)
        if imbalanced(counts) and records.study_metric(study) == "accuracy":
            kept = records.kept_epoch(best)
            lines.append(
                f"  imbalanced classes ({max(counts)} to {min(counts)} images): accuracy favours the common "
                f"ones; the winner's balanced accuracy is {kept.get('val_balanced_accuracy', float('nan')):.4f} "
                f"(accuracy {kept.get('val_accuracy', float('nan')):.4f}); to choose on it: "
                "--metric balanced_accuracy"
            )
        backbones = records.per_backbone(trials)
        if len(backbones) > 1:  # accuracy against cost, per backbone
            lines += [
                f"  {b:<20} {n:>3} trials, best {acc:.4f}, {sec:.1f} s per trial (median wall time)"
                for b, (n, acc, sec) in sorted(backbones.items())
            ]
            line = allocation_line(trials)
            if line:
                lines.append(f"  {line}")
        cfg, keys = records.config(best), records.searched_keys(best)
        unused = [k for k in keys if k in probe.UNUSED] if probe.exact(records.history(best)) else []
        shown = {"backbone": cfg.backbone, **{k: getattr(cfg, k) for k in keys if k not in unused}}
        width = max(map(len, shown))
        lines += [f"  {k:<{width}}  {records.fmt(v)}" for k, v in shown.items()]
        if unused:
            chosen = ", ".join(records.fmt(c) for c in records.kept_epoch(best).get(probe.CHOSEN_C) or [])
            lines.append(
                f"  an exact probe: its head is fitted (C per fold by cross-validation: {chosen or '-'}); "
                f"not used: {', '.join(unused)}"
            )
        line = tta_line(records.kept_epoch(best))
        if line:
            lines.append(f"  {line}")
        mix = records.trial_mix(study, best.number)
        if mix is not None:
            lines.append(mix_summary(mix))
        lines.append(
            f"shipped: {out / 'best.pt'} ({shipped(out / 'best.pt')}); config: {out / 'best.yaml'}; "
            f"all trials: {out / 'trials.csv'}"
        )
    print("\n".join(lines), flush=True)


def allocation_line(trials: Sequence[FrozenTrial]) -> str | None:
    """How the fine-tuning trials were spread over the backbones (space.shares): the trials each got and the shares
    the last one was queued by; None when no trial was allocated (one backbone)."""
    allocated = [t.user_attrs[records.ALLOCATED] for t in trials if records.ALLOCATED in t.user_attrs]
    if not allocated:
        return None
    got = Counter(a["backbone"] for a in allocated)
    shares = ", ".join(f"{b} {s:.0%} ({got.get(b, 0)})" for b, s in allocated[-1]["shares"].items())
    return f"fine-tuning trials by the probes' evidence (share of being best, trials): {shares}"


def tta_line(kept: dict[str, Any]) -> str | None:
    """What test-time augmentation the winner ships and what the flip was worth out of fold; None when not tried."""
    if "tta_gain" not in kept:
        return None
    gain = f"{kept['tta_gain']:+.4f} out of fold"
    if kept.get("tta") == "flip":
        return f"test-time augmentation: flip (the mean of the image's and its mirror image's logits), {gain}"
    return f"test-time augmentation: none (a flip changed the estimate by {gain})"


def budget_story(trials: Sequence[FrozenTrial]) -> str:
    """Where the time went, per kind of trial: exact probes, complete fine-tunes, pruned trials (by what stopped
    them) and failed ones, in wall seconds (records.seconds, as `time_per_state` counts them)."""
    kinds: dict[str, list[float]] = {}
    for t in trials:
        if t.state == TrialState.COMPLETE:
            kind = "probes" if records.history(t) and records.history(t)[0].get(EXACT) else "fine-tunes"
        elif t.state == TrialState.PRUNED:
            why = records.reason(t)
            kind = (
                "stopped by fold racing (cannot win)"
                if why.startswith("fold racing") and records.CANNOT_WIN in why
                else "stopped by fold racing (behind)"
                if why.startswith("fold racing")
                else "stopped by the budget"
                if why.startswith("the time budget")
                else "pruned by the pruner"
                if why.startswith("pruned after")
                else "pruned (diverged)"
            )
        elif t.state == TrialState.FAIL:
            kind = "failed"
        else:
            continue
        kinds.setdefault(kind, []).append(records.seconds(t))
    return ", ".join(f"{k} {sum(v):.0f} s ({len(v)})" for k, v in kinds.items()) or "no trials"


def sampled_story(trials: Sequence[FrozenTrial]) -> str:
    """How many of the trials the sampler proposed (the portfolio's aside) ran every fold: the trials that can win."""
    sampled = [t for t in trials if not records.portfolio_name(t) and t.state in records.FINISHED]
    done = sum(t.state == TrialState.COMPLETE for t in sampled)
    return f"sampled trials (the portfolio aside): {len(sampled)}, of which {done} ran to completion"


def mix_summary(mix: dict[str, Any]) -> str:
    """The ensemble of trials the export considered: members, weights, its estimate on images it was not chosen
    on against the single best trial's, its prediction cost against the single model's; shipped or not."""
    e = Estimate.from_dict(mix["estimate"])
    lo, hi = e.interval
    scored = (
        f"{e.metric} {e.value:.4f} (95 % interval {span(lo, hi)}) on images it was not chosen on, against "
        f"{mix['single']:.4f} for the single best trial (one standard error {mix['noise']:.4f})"
    )
    if mix["shipped"]:
        return (
            f"  shipped an {describe_mix(mix)}: {scored}; prediction costs {mix['models']} forward passes per "
            f"image against {mix['single_models']} for the winner alone"
        )
    if len(mix["members"]) < 2:
        return f"  an ensemble of trials was considered: the selection kept trial {mix['members'][0]} alone"
    return f"  an {describe_mix(mix)} was considered and not shipped, not better beyond noise: {scored}"


def tie_break(best: FrozenTrial, trials: Sequence[FrozenTrial]) -> str | None:
    """Why the winner is not the highest-scoring completed trial (records.select's rule), in one line; None when
    it is."""
    done = [t for t in trials if t.state == TrialState.COMPLETE and t.value is not None]
    top = max(done, key=lambda t: t.value, default=None)
    if top is None or top.value <= best.value:
        return None
    return (
        f"tie-break: trial {top.number} scored highest ({top.value:.4f}); every trial within one standard error "
        f"of it ({records.Candidate.of(top).noise:.4f}) ties, and of those the lowest val_loss wins "
        f"({records.val_loss(best, math.nan):.4f} against {records.val_loss(top, math.nan):.4f}), then the "
        "cheaper, then the earlier"
    )


def time_per_state(trials: Sequence[FrozenTrial]) -> str:
    """The wall time of the finished trials, per state: pruned and failed trials cost time too (Optuna's start
    to end)."""
    states = {TrialState.COMPLETE: "complete", TrialState.PRUNED: "pruned", TrialState.FAIL: "failed"}
    spent: dict[TrialState, list[float]] = {}
    for t in trials:
        if t.state in states:
            spent.setdefault(t.state, []).append(records.seconds(t))
    total = sum(map(sum, spent.values()))
    parts = ", ".join(f"{sum(spent[s]):,.0f} s in {len(spent[s])} {name}" for s, name in states.items() if s in spent)
    return f"{total:,.0f} s" + (f" ({parts})" if parts else "")
