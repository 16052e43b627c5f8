"""Which pruner for a study of a few dozen trials? Replays of real learning curves, pruner by pruner.

    python benchmarks/quality.py DATA --budget 1500 --pruner none --keep curves.db --skip-recipes
    python benchmarks/pruning.py curves.db [more.db ...] --orders 50

A study run without pruning holds every trial's full curve (out-of-fold accuracy per epoch). Each
candidate pruner is replayed on those curves: trials arrive in the recorded order (then in `--orders`
random orders, the portfolio always first), each reports its epochs until the pruner stops it, and
a trial is never pruned after its last epoch (as in the product). Per pruner it prints one JSON line:
the share of epochs saved, the trials pruned, the pruned trials whose final score was within noise
(2 standard errors over the images behind it) of the study's best, and how often the winner the search
would ship (`records.select`) differs from the winner without pruning.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections.abc import Callable

import optuna
from optuna.trial import FrozenTrial, TrialState

from autoft import records
from autoft.estimate import Estimate
from autoft.study import make_pruner

CANDIDATES: dict[str, Callable[[int, int], optuna.pruners.BasePruner]] = {
    "none": lambda epochs, images: optuna.pruners.NopPruner(),
    "median (optuna, 3 startup)": lambda epochs, images: optuna.pruners.MedianPruner(n_startup_trials=3),
    "median (optuna, 1 startup)": lambda epochs, images: optuna.pruners.MedianPruner(n_startup_trials=1),
    "hyperband (optuna)": lambda epochs, images: optuna.pruners.HyperbandPruner(1, epochs, 3),
    "median, catch-up guard, 1 startup": lambda epochs, images: make_pruner("median", epochs, 1, 1, images),
    "median, catch-up guard, 3 startup": lambda epochs, images: make_pruner("median", epochs, 1, 3, images),
    "hyperband, catch-up guard, 1 startup": lambda epochs, images: make_pruner("hyperband", epochs, 1, 1, images),
    "hyperband, catch-up guard, 3 startup": lambda epochs, images: make_pruner("hyperband", epochs, 1, 3, images),
}


def curves(path: str) -> list[FrozenTrial]:
    """The completed trials of every study in the file that ran every epoch (recorded without pruning)."""
    storage = f"sqlite:///{path}"
    out = []
    for summary in optuna.get_all_study_summaries(storage):
        study = optuna.load_study(study_name=summary.study_name, storage=storage)
        out += [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                if len(t.intermediate_values) == records.config(t).epochs]
    return out


def replay(trials: list[FrozenTrial], pruner: optuna.pruners.BasePruner) -> dict:
    study = optuna.create_study(direction="maximize", pruner=pruner)
    kept, saved, pruned = [], 0, []
    for t in trials:
        trial = study.ask()
        steps = sorted(t.intermediate_values)
        stopped = None
        for step in steps:
            trial.report(t.intermediate_values[step], step)
            if step != steps[-1] and trial.should_prune():
                stopped = step
                break
        if stopped is None:
            study.tell(trial, t.value)
            kept.append(t)
        else:
            study.tell(trial, state=TrialState.PRUNED)
            saved += len(steps) - stopped
            pruned.append(t)
    return {"kept": kept, "pruned": pruned, "saved": saved}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="+")
    ap.add_argument("--orders", type=int, default=50, help="random trial orders replayed besides the recorded one")
    args = ap.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    for path in args.files:
        trials = sorted(curves(path), key=lambda t: t.number)
        if not trials:
            print(f"{path}: no complete trial with every epoch recorded (run the study with --pruner none)", file=sys.stderr)
            continue
        epochs = records.config(trials[0]).epochs
        images = records.estimate(trials[0]).images
        total = sum(len(t.intermediate_values) for t in trials)
        truth = records.select([records.Candidate.of(t) for t in trials]).number
        top = max(t.value for t in trials)
        noise = 2 * Estimate(top, images).noise
        portfolio = [t for t in trials if records.portfolio_name(t)]
        rest = [t for t in trials if not records.portfolio_name(t)]
        rng = random.Random(0)
        orders = [trials] + [portfolio + rng.sample(rest, len(rest)) for _ in range(args.orders)]
        for name, make in CANDIDATES.items():
            runs = [replay(order, make(epochs, images)) for order in orders]
            near = [sum(t.value >= top - noise for t in r["pruned"]) for r in runs]
            changed = [records.select([records.Candidate.of(t) for t in r["kept"]]).number != truth for r in runs]
            print(json.dumps({"file": path, "trials": len(trials), "epochs": epochs, "images": images, "pruner": name,
                              "epochs_saved": round(sum(r["saved"] for r in runs) / (total * len(runs)), 3),
                              "pruned_per_study": round(sum(len(r["pruned"]) for r in runs) / len(runs), 2),
                              "near_best_pruned_per_study": round(sum(near) / len(runs), 2),
                              "studies_with_a_near_best_pruned": round(sum(n > 0 for n in near) / len(runs), 3),
                              "winner_changed": round(sum(changed) / len(runs), 3)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
