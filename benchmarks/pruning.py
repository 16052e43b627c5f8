"""Which pruner, which racing rule, which rungs? Replays of real, complete learning curves, rule by rule.

    python benchmarks/quality.py DATA --budget 2400 --trials 30 --pruner none --keep curves.db --skip-recipes
    python benchmarks/pruning.py curves.db [more.db ...] --orders 100

A study recorded without pruning or racing (`--pruner none`) holds every trial's every fold and epoch (STEPS),
`--keep` also keeps every trial's out-of-fold predictions (curves.artifacts/) and the predictions each fold race
would have been decided on (curves.partials/: the Partial after each fold but the last). Each rule is replayed
through Optuna's ask/tell on those curves: trials arrive in the recorded order, then in `--orders` random orders of
random subsets (the portfolio always first and whole; between half and all of the sampled trials, so that the
eventual winner varies), and, for the winner figures alone, `--orders` "stress" replays in which each portfolio
recipe is left out half of the time (so that the linear probe, which never races, is not always the winner);
each reports its fold-epochs until the pruner or the fold race (objective.versus, the
product's own code) stops it, and it is never pruned after its last step (as in the product).

Per rule and file, one JSON line: the share of the recorded seconds it saves and the trials a 900 s budget would
then buy at that rate; the trials stopped (by the pruner, by racing); the eventual winner (records.select over
every recorded trial of the replay, run to the end) stopped, and stopped when it was ahead of the winner the rule
ships by more than that one's standard error (a real loss, not a tie); the mean regret (the full-fidelity score
of the winner without the rule less that of the winner with it); the sampled trials that completed. A last line
per file says how well cheaper evidence ranks the trials: the Spearman correlation, over the fine-tunes, of
their final score with the score at one step (fold 1, epoch e) and with the score over the first k folds.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import optuna
from optuna.trial import FrozenTrial, TrialState
from scipy.stats import spearmanr

from autoft.estimate import score
from autoft.results import records
from autoft.results.exports import joins
from autoft.study import racing
from autoft.study.objective import versus
from autoft.study.pruning import _Guarded
from autoft.training import probe
from autoft.training.loop import Partial, adjusted

BUDGET_S = 900.0  # what "trials per budget" is quoted for


@dataclass(eq=False)
class Recorded:
    """One recorded trial: what the replay reports (steps, values), races on (partials, oof) and charges."""

    trial: FrozenTrial
    steps: list[dict]
    values: dict[int, float]  # Optuna step (1-based) -> the value the product reported there
    partials: dict[int, Partial] = field(default_factory=dict)  # folds done -> what the race after them saw
    oof: records.Oof | None = None

    def __post_init__(self) -> None:
        self.cfg = records.config(self.trial)

    @property
    def exact(self) -> bool:
        return probe.exact(self.steps)

    def seconds(self, steps_run: int) -> float:
        """Its recorded wall time, for the share of its training time that `steps_run` steps took."""
        wall = self.trial.user_attrs.get(records.WALL_TIME, 0.0)
        total = sum(s["epoch_time_s"] for s in self.steps)
        if self.exact or not total:
            return wall
        return wall * sum(s["epoch_time_s"] for s in self.steps[:steps_run]) / total


def load(path: str) -> tuple[list[Recorded], str, int, int]:
    """The complete trials of the file's study with every fold-epoch recorded; their metric, epochs and folds."""
    storage = f"sqlite:///{path}"
    artifacts, partials = Path(path).with_suffix(".artifacts"), Path(path).with_suffix(".partials")
    (summary,) = optuna.get_all_study_summaries(storage)
    study = optuna.load_study(study_name=summary.study_name, storage=storage)
    metric = records.study_metric(study)
    out = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        cfg, steps = records.config(t), records.steps(t)
        folds = records.folds_run(t)
        if len(steps) != folds * (1 if probe.exact(steps) else cfg.epochs):
            continue  # cut short by the budget: not a full curve
        r = Recorded(t, steps, dict(t.intermediate_values))
        if t.user_attrs.get(records.OOF) and artifacts.is_dir():
            r.oof = records.load_oof(t, artifacts)
        saved = partials / f"trial_{t.number}.npz"
        if saved.is_file() and r.oof is not None:
            with np.load(saved) as z:
                for k in range(1, folds):
                    if f"index{k}" in z:
                        index = z[f"index{k}"]
                        r.partials[k] = Partial(
                            k,
                            folds,
                            index,
                            z[f"log_probs{k}"],
                            r.oof.labels[index],
                            float(z[f"tau{k}"]),
                            int(z[f"epoch{k}"]),
                        )
        out.append(r)
    epochs = records.config(out[0].trial).epochs
    return sorted(out, key=lambda r: r.trial.number), metric, epochs, records.folds_run(out[0].trial)


class _WithProbes(_Guarded):
    """The guard before this version: any completed trial, an exact probe included, is the yardstick at a step."""

    @staticmethod
    def yardsticks(finished, step):
        return [t for t in finished if t.state == TrialState.COMPLETE and step in t.intermediate_values]


def guarded(kind: str, first_rung: int = 1) -> Callable[[int, str, int], optuna.pruners.BasePruner]:
    """A pruner as make_pruner builds it (successive halving, reduction 3, 1 startup trial), its first rung after
    `first_rung` steps; `kind`: "with probes", "completed" (completed fine-tunes only), "best at step" (the product's
    guard) or "none"."""

    def make(images: int, metric: str, epochs: int) -> optuna.pruners.BasePruner:
        if kind == "none":
            return optuna.pruners.NopPruner()
        inner = optuna.pruners.SuccessiveHalvingPruner(min_resource=first_rung, reduction_factor=3)
        cls = {"with probes": _WithProbes, "completed": _CompletedOnly}.get(kind, _Guarded)
        return cls(inner, 1, 1, images, metric, epochs)

    return make


@dataclass(frozen=True)
class Race:
    """A racing rule: off, "behind" only (the rule before), or also "cannot win" below `floor` at the looks after
    folds 1 to `last` (None: every look), with or without the ensemble's near-tie (`mix`: racing.runs_on_for_mix)."""

    on: bool = True
    floor: float = 0.0
    mix: bool = True
    last: int | None = None

    def stops(self, v: racing.Verdict, mixable: bool, others: int, look: int) -> bool:
        if not self.on or v.behind:
            return self.on
        return self.cannot_win(v, look) and not (self.mix and racing.runs_on_for_mix(v, mixable, others))

    def cannot_win(self, v: racing.Verdict, look: int) -> bool:
        return v.p_win < self.floor and (self.last is None or look <= self.last)


class _CompletedOnly(_Guarded):
    """A guard whose yardstick is the best completed fine-tune at the step (none until one completes)."""

    @staticmethod
    def yardsticks(finished, step):
        return [t for t in _Guarded.yardsticks(finished, step) if t.state == TrialState.COMPLETE]


PRUNERS = {
    "sha, probe as yardstick (before)": guarded("with probes"),
    "sha, completed fine-tunes as yardstick": guarded("completed"),
    "sha, best finished fine-tune at the step as yardstick (the product)": guarded("best at step"),
    "sha, first rung at fold 1's end": None,  # filled per file: first_rung = epochs
    "no pruner": guarded("none"),
}
RACES = {
    "no racing": Race(on=False),
    "behind (before)": Race(),
    "behind or cannot win, floor 0.05": Race(floor=0.05),
    "behind or cannot win, floor 0.05, no mix near-tie": Race(floor=0.05, mix=False),
    "behind or cannot win, floor 0.1": Race(floor=0.1),
    "behind or cannot win, floor 0.05, after folds 1-3": Race(floor=0.05, last=3),
    "behind or cannot win, floor 0.1, after folds 1-3": Race(floor=0.1, last=3),
    "behind or cannot win, floor 0.1, after folds 1-2": Race(floor=0.1, last=2),
}


def replay(
    trials: list[Recorded], pruner: optuna.pruners.BasePruner, rule: Race, metric: str, epochs: int, folds: int
) -> dict:
    """One replay through ask/tell: which trials completed, and what each cost and why it stopped."""
    study = optuna.create_study(direction="maximize", pruner=pruner)
    done: list[Recorded] = []
    ran_on: set[int] = set()
    out = {"kept": done, "stopped": [], "seconds": 0.0, "by_pruner": 0, "by_race": 0}
    for r in trials:
        trial = study.ask()
        last = len(r.values)
        stopped = None
        for i, step in enumerate(sorted(r.values)):
            trial.set_user_attr(records.STEPS, r.steps[: i + 1] if not r.exact else r.steps)
            trial.report(r.values[step], step)
            if r.exact or step == last:
                continue
            if trial.should_prune():
                stopped, why = step, "by_pruner"
                break
            if step % epochs == 0 and step // epochs < folds and done and step // epochs in r.partials:
                leader = max(done, key=lambda d: d.trial.value)
                partial = r.partials[step // epochs]
                v = versus(metric, partial, leader.oof, records.Candidate.of(leader.trial).noise, r.cfg.seed)
                if v is None:
                    continue
                mixable = joins(r.cfg, partial.tau, leader.cfg, leader.oof.tau)
                others = len(ran_on - {r.trial.number})
                if rule.stops(v, mixable, others, step // epochs):
                    stopped, why = step, "by_race"
                    break
                if rule.on and rule.cannot_win(v, step // epochs):  # not stopped, so not behind either
                    ran_on.add(r.trial.number)  # it could not win: the ensemble's near-tie ran it on
        if stopped is None:
            study.tell(trial, r.trial.value)
            done.append(r)
            out["seconds"] += r.seconds(len(r.steps))
        else:
            study.tell(trial, state=TrialState.PRUNED)
            out["stopped"].append(r)
            out[why] += 1
            out["seconds"] += r.seconds(stopped)
    out["mixed"] = len(ran_on)
    return out


def winner(trials: list[Recorded]) -> Recorded:
    chosen = records.select([records.Candidate.of(r.trial) for r in trials])
    return next(r for r in trials if r.trial.number == chosen.number)


def fidelity(trials: list[Recorded], epochs: int, folds: int, metric: str) -> dict:
    """Spearman's rho between the fine-tunes' final scores and cheaper evidence: one step of fold 1, or the pooled
    score over the first k folds (their race's partial, at its best epoch so far)."""
    tunes = [r for r in trials if not r.exact]
    out: dict[str, float] = {}
    for e in range(1, epochs + 1):
        out[f"fold 1 epoch {e}"] = _rho([r.values[e] for r in tunes], [r.trial.value for r in tunes])
    for k in range(1, folds):
        have = [r for r in tunes if k in r.partials]
        log_prior = np.log(np.maximum(have[0].oof.prior, 1e-12)) if have else None
        pooled = [
            score(metric, p.labels, adjusted(p.log_probs, log_prior, p.tau).argmax(1), p.log_probs.shape[1])
            for p in (r.partials[k] for r in have)
        ]
        out[f"first {k} folds pooled"] = _rho(pooled, [r.trial.value for r in have])
    return out


def _rho(a: list[float], b: list[float]) -> float:
    return round(float(spearmanr(a, b)[0]), 3) if len(a) > 2 else float("nan")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="+")
    ap.add_argument("--orders", type=int, default=100, help="random replays of each kind besides the recorded order")
    ap.add_argument("--table", action="store_true", help="also a Markdown table per file (stderr)")
    args = ap.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    for path in args.files:
        trials, metric, epochs, folds = load(path)
        if not trials:
            print(f"{path}: no complete trial with every step recorded (record with --pruner none)", file=sys.stderr)
            continue
        images = int((trials[0].oof.fold >= 0).sum()) // folds  # one fold's: what a step's score rests on
        portfolio = [r for r in trials if records.portfolio_name(r.trial)]
        rest = [r for r in trials if not records.portfolio_name(r.trial)]
        rng = random.Random(0)

        def some(pool: list[Recorded]) -> list[Recorded]:
            return rng.sample(pool, rng.randint((len(pool) + 1) // 2, len(pool)))

        product = [trials] + [portfolio + some(rest) for _ in range(args.orders)]
        stress = [[r for r in portfolio if rng.random() < 0.5] + some(rest) for _ in range(args.orders)]
        pruners = {**PRUNERS, "sha, first rung at fold 1's end": guarded("fine-tunes", epochs)}
        rows = []
        for pname, make in pruners.items():
            for rname, rule in RACES.items():
                row = {
                    "file": path,
                    "metric": metric,
                    "trials": len(trials),
                    "sampled": len(rest),
                    "pruner": pname,
                    "race": rname,
                }
                for kind, orders in (("", product), ("stress_", stress)):
                    runs = [
                        replay(order, make(images, metric, epochs), rule, metric, epochs, folds) for order in orders
                    ]
                    row |= {
                        kind + k: v
                        for k, v in summarize(orders, runs).items()
                        if not kind or k.startswith("winner") or k == "mean_regret"
                    }
                print(json.dumps(row), flush=True)
                rows.append(row)
        print(json.dumps({"file": path, "fidelity_spearman": fidelity(trials, epochs, folds, metric)}))
        if args.table:
            print(table(rows), file=sys.stderr)
    return 0


def summarize(orders: list[list[Recorded]], runs: list[dict]) -> dict:
    """What the replays of one rule add up to (see the module's docstring)."""
    full = [sum(r.seconds(len(r.steps)) for r in order) for order in orders]
    truths = [winner(order) for order in orders]
    shipped = [winner(run["kept"]) for run in runs]
    regret = [truth.trial.value - s.trial.value for truth, s in zip(truths, shipped)]

    def mean(xs) -> float:
        return float(np.mean(list(xs)))

    return {
        "seconds_saved": round(mean(1 - run["seconds"] / f for run, f in zip(runs, full)), 3),
        "seconds_recorded_order": round(runs[0]["seconds"]),
        "seconds_without": round(full[0]),
        "trials_per_budget": round(mean(len(o) * BUDGET_S / r["seconds"] for o, r in zip(orders, runs)), 1),
        "sampled_completed_per_budget": round(
            mean(sum(not records.portfolio_name(k.trial) for k in r["kept"]) * BUDGET_S / r["seconds"] for r in runs), 1
        ),
        "stopped_by_pruner": round(mean(r["by_pruner"] for r in runs), 2),
        "stopped_by_race": round(mean(r["by_race"] for r in runs), 2),
        "ran_on_for_mix": round(mean(r["mixed"] for r in runs), 2),
        "winner_stopped": round(mean(any(t is s for s in run["stopped"]) for t, run in zip(truths, runs)), 3),
        "winner_lost_beyond_noise": round(
            mean(g > records.Candidate.of(s.trial).noise for g, s in zip(regret, shipped)), 3
        ),
        "mean_regret": round(mean(regret), 4),
        "replays": len(runs),
    }


def table(rows: list[dict]) -> str:
    """The rows as Markdown: one line per pruner and racing rule."""
    cols = [
        ("pruner", "pruner"),
        ("race", "fold racing"),
        ("seconds_saved", "seconds saved"),
        ("trials_per_budget", f"trials per {BUDGET_S:g} s"),
        ("sampled_completed_per_budget", f"sampled completed per {BUDGET_S:g} s"),
        ("stopped_by_pruner", "stopped by pruner"),
        ("stopped_by_race", "by race"),
        ("ran_on_for_mix", "ran on for the mix"),
        ("winner_stopped", "winner stopped"),
        ("winner_lost_beyond_noise", "lost beyond noise"),
        ("mean_regret", "mean regret"),
        ("stress_winner_stopped", "stress: winner stopped"),
        ("stress_winner_lost_beyond_noise", "stress: lost beyond noise"),
        ("stress_mean_regret", "stress: regret"),
    ]
    head = (
        f"{rows[0]['file']}: {rows[0]['trials']} trials ({rows[0]['sampled']} sampled), {rows[0]['metric']}, "
        f"{rows[0]['replays']} replays, {rows[0]['seconds_without']} s recorded\n"
    )
    lines = ["| " + " | ".join(name for _, name in cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r[k]) for k, _ in cols) + " |" for r in rows]
    return head + "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
