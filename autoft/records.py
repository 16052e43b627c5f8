"""What autoft keeps in Optuna's storage: every key, its readers and writers, and the ranking of trials.

A study's user attrs hold its search (base config, space, seed, goal, settings): all a joining worker
needs. A trial's user attrs hold its record (config, per-epoch history, scores, timings, the reason it
was pruned or failed, artifact ids). Nothing else in autoft names these keys, so a new per-trial field
(fold scores, an estimate with its interval, a cost) is added here: a key, a line in its writer, and,
to show it in trials.csv and the report, an entry in COLUMNS.
"""

from __future__ import annotations

import math
import os
import socket
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from .config import Config
from .exceptions import ConfigError
from .finetune import Result, score_key
from .space import SearchSpace

METRIC = "val_accuracy"  # a trial's value: its best epoch's validation accuracy
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)  # what counts towards a study's goal

# Study user attrs.
BASE = "base"  # the base config less device and seed, which may differ between machines and runs
SPACE = "space"  # SearchSpace.to_dict()
SEED = "seed"  # the study seed; each trial's derives from it
TARGET = "target"  # the goal: finished trials the study is to hold
SEARCH = "search"  # SearchOptions.settings(): what a joining worker must share

# Trial user attrs.
CONFIG = "config"  # the complete Config the trial trained
HISTORY = "history"  # finetune's metrics per epoch, rewritten after each
VAL_LOSS = "val_loss"  # of the best epoch, whose val_accuracy is the trial's value
BEST_EPOCH = "best_epoch"
WALL_TIME = "wall_time_s"
IMAGES_PER_S = "images_per_s"  # training throughput, mean over epochs
PEAK_MEMORY = "peak_memory_mb"
DEVICE = "device"
FAIL_REASON = "fail_reason"
PRUNE_REASON = "prune_reason"
OOM_RETRY = "oom_retry"
HAND_RECIPE = "hand_recipe"  # True on the enqueued hand-recipe trial
WEIGHTS = "weights_artifact_id"  # best.pt as uploaded when the trial was a new best
WORKER = "worker"  # host:pid of the process that ran it
SURPLUS = "surplus"  # how the fail_reason of a trial that gave its slot up begins


# --- the study -------------------------------------------------------------------------------------------------

def _base(base: Config) -> dict[str, Any]:
    return {k: v for k, v in base.to_dict().items() if k not in ("device", "seed")}


def write_study_meta(study: optuna.Study, base: Config, space: SearchSpace, seed: int) -> None:
    """A new study's metadata: what a resumed run must match (space, base) and a joining worker reads."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names([METRIC])
    study.set_user_attr(SPACE, space.to_dict())
    study.set_user_attr(BASE, _base(base))
    study.set_user_attr(SEED, seed)


def check_same_meta(study: optuna.Study, base: Config, space: SearchSpace) -> None:
    """Resuming with another space or base config is refused: the new trials would not compare with the old."""
    stored = study.user_attrs
    for key, now, label in ((SPACE, space.to_dict(), "search space"), (BASE, _base(base), "base config")):
        if key in stored and stored[key] != now:
            diff = sorted(k for k in set(stored[key]) | set(now) if stored[key].get(k) != now.get(k))
            raise ConfigError(f"study {study.study_name!r} exists with a different {label} ({', '.join(diff)}); "
                              "use a new --study name or the same settings")


def set_goal(study: optuna.Study, trials: int, settings: dict[str, Any]) -> int:
    """Raise the goal to `trials` more finished trials than the study has now; record what joiners need."""
    target = finished_count(study.get_trials(deepcopy=False)) + trials
    study.set_user_attr(TARGET, target)
    study.set_user_attr(SEARCH, settings)
    return target


def goal(study: optuna.Study) -> int:
    return study.user_attrs[TARGET]


@dataclass
class StudyMeta:
    base: Config  # with the study's seed
    space: SearchSpace
    settings: dict[str, Any]  # SearchOptions fields


def read_study_meta(study: optuna.Study) -> StudyMeta:
    """What a joining worker takes from the study; one without a goal was not started by `autoft search`."""
    attrs = study.user_attrs
    if not {BASE, SPACE, TARGET, SEARCH} <= set(attrs):
        raise ConfigError(f"study {study.study_name!r} was not started by this autoft version's search; it cannot be joined")
    return StudyMeta(Config.from_dict({**attrs[BASE], "seed": attrs.get(SEED, 0)}), SearchSpace.from_dict(attrs[SPACE]),
                     attrs[SEARCH])


def enqueue_hand_recipe(study: optuna.Study, params: dict[str, Any]) -> None:
    """The hand recipe runs first, and again if its trial was interrupted or crashed before finishing."""
    alive = (*FINISHED, TrialState.RUNNING, TrialState.WAITING)
    if not any(t.user_attrs.get(HAND_RECIPE) for t in study.get_trials(deepcopy=False, states=alive)):
        study.enqueue_trial(params, user_attrs={HAND_RECIPE: True})


# --- a trial ---------------------------------------------------------------------------------------------------

def record_config(trial: optuna.Trial, cfg: Config) -> None:
    trial.set_user_attr(CONFIG, cfg.to_dict())


def record_device(trial: optuna.Trial, device: str) -> None:
    trial.set_user_attr(DEVICE, device)


def record_worker(trial: optuna.Trial) -> None:
    trial.set_user_attr(WORKER, f"{socket.gethostname()}:{os.getpid()}")


def record_history(trial: optuna.Trial, history: list[dict[str, float]]) -> None:
    trial.set_user_attr(HISTORY, history)


def record_result(trial: optuna.Trial, result: Result, history: Sequence[dict[str, float]]) -> None:
    """What a finished fine-tune adds. `history` is every epoch the trial reported: after an out-of-memory
    retry, the first attempt's epochs too, as `HISTORY` holds them."""
    trial.set_user_attr(VAL_LOSS, result.best["val_loss"])
    trial.set_user_attr(BEST_EPOCH, result.best["epoch"])
    trial.set_user_attr(WALL_TIME, result.wall_time)
    trial.set_user_attr(IMAGES_PER_S, sum(h["images_per_s"] for h in history) / len(history))
    trial.set_user_attr(PEAK_MEMORY, result.peak_memory_mb)


def record_failure(trial: optuna.Trial, reason: str) -> None:
    trial.set_user_attr(FAIL_REASON, reason)


def record_pruning(trial: optuna.Trial, reason: str) -> None:
    trial.set_user_attr(PRUNE_REASON, reason)


def record_surplus(trial: optuna.Trial, target: int) -> None:
    record_failure(trial, f"{SURPLUS}: the study's {target} trials were already finished or running")


def record_oom_retry(trial: optuna.Trial, what: str) -> None:
    trial.set_user_attr(OOM_RETRY, what)


def record_weights(trial: optuna.Trial, artifact_id: str) -> None:
    trial.set_user_attr(WEIGHTS, artifact_id)


def config(t: FrozenTrial) -> Config:
    return Config.from_dict(t.user_attrs[CONFIG])


def history(t: FrozenTrial) -> list[dict[str, float]]:
    return t.user_attrs.get(HISTORY) or []


def val_loss(t: FrozenTrial, default: float | None = None) -> float | None:
    return t.user_attrs.get(VAL_LOSS, default)


def reason(t: FrozenTrial | optuna.Trial) -> str:
    """Why the trial failed or was pruned; empty when it completed."""
    return t.user_attrs.get(FAIL_REASON) or t.user_attrs.get(PRUNE_REASON) or ""


def is_surplus(t: FrozenTrial) -> bool:
    return t.user_attrs.get(FAIL_REASON, "").startswith(SURPLUS)


def weights_artifact(t: FrozenTrial) -> str | None:
    return t.user_attrs.get(WEIGHTS)


def worker_pid(t: FrozenTrial) -> int | None:
    """The process id of the worker that ran the trial (on its machine)."""
    worker = t.user_attrs.get(WORKER)
    return int(worker.rsplit(":", 1)[1]) if worker else None


def original_number(t: FrozenTrial) -> int:
    """The number of the trial this one re-runs after its worker died (Optuna's heartbeat callback records it
    as the system attr `failed_trial`), else its own."""
    return t.system_attrs.get("failed_trial", t.number)


def hand_recipe_result(trials: Sequence[FrozenTrial]) -> FrozenTrial | None:
    return next((t for t in trials if t.user_attrs.get(HAND_RECIPE) and t.state == TrialState.COMPLETE), None)


# --- many trials -----------------------------------------------------------------------------------------------

def rank_key(t: FrozenTrial) -> tuple:
    """THE ranking: value (finetune's `score_key`: accuracy, then lower loss), then the earlier trial."""
    return (*score_key({METRIC: t.value, VAL_LOSS: t.user_attrs.get(VAL_LOSS, math.inf)}), -t.number)


def best_trial(study: optuna.Study) -> FrozenTrial | None:
    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if t.value is not None]
    return max(done, key=rank_key, default=None)


def is_new_best(study: optuna.Study, number: int, best_epoch: dict[str, float]) -> bool:
    """Whether trial `number`, still running with this best epoch, would rank above the study's best so far."""
    best = best_trial(study)
    return best is None or (*score_key(best_epoch), -number) > rank_key(best)


def state_counts(trials: Sequence[FrozenTrial]) -> Counter[TrialState]:
    """Trials per state (a state with none counts 0)."""
    return Counter(t.state for t in trials)


def finished_count(trials: Sequence[FrozenTrial]) -> int:
    counts = state_counts(trials)
    return sum(counts[s] for s in FINISHED)


def describe(t: FrozenTrial) -> str:
    return f"trial {t.number}, {METRIC} {t.value:.4f}, val_loss {val_loss(t, math.nan):.4f}"


# The trials table (trials.csv and the report): a column is a name and how to read it from a trial;
# the searched parameters follow, then the reason.
COLUMNS: list[tuple[str, Callable[[FrozenTrial], Any]]] = [
    ("number", lambda t: t.number),
    ("state", lambda t: t.state.name),
    (METRIC, lambda t: t.value),
    (VAL_LOSS, val_loss),
    ("epochs_run", lambda t: len(history(t))),
    (WALL_TIME, lambda t: t.user_attrs.get(WALL_TIME)),
    (IMAGES_PER_S, lambda t: t.user_attrs.get(IMAGES_PER_S)),
]


def trial_rows(trials: Sequence[FrozenTrial]) -> tuple[list[str], list[list[Any]]]:
    """(header, one row per trial): the values as stored, for a CSV writer or `fmt`."""
    params = sorted({p for t in trials for p in t.params})
    header = [name for name, _ in COLUMNS] + params + ["reason"]
    rows = [[read(t) for _, read in COLUMNS] + [t.params.get(p) for p in params] + [reason(t)] for t in trials]
    return header, rows


def fmt(v: Any) -> str:
    """A stored value for people: floats to 4 significant digits, nothing for None."""
    if v is None:
        return ""
    return f"{v:.4g}" if isinstance(v, float) else str(v)
