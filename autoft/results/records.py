"""What autoft keeps in Optuna's storage: every key, its readers and writers, and the choice of the winner.

A study's user attrs hold its search (base config, space, seed, goal, settings): all a joining worker
needs. A trial's user attrs hold its record (config, per-epoch history, scores, timings, the reason it
was pruned or failed, artifact ids). Nothing else in autoft names these keys, so a new per-trial field
(fold scores, an estimate with its interval, a cost) is added here: a key, a line in its writer, and,
to show it in trials.csv and the report, an entry in COLUMNS.
"""

from __future__ import annotations

import io
import math
import os
import socket
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import optuna
from optuna.trial import FrozenTrial, TrialState

from ..config import Config
from ..data.scan import Fingerprint
from ..estimate import METRICS, Estimate
from ..exceptions import ConfigError
from ..space import PROBE, SearchSpace, fine_tunable, next_backbone, shares
from ..storage import attach_bytes, read_artifact
from ..training.loop import Result, adjusted

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)  # what counts towards a study's goal

# Study user attrs.
BASE = "base"  # the base config less device and seed (may differ between machines and runs) and the data's path
DATA = "data"  # what the study was searched on: {"path", *WHERE} (paths absolute), and its Fingerprint.to_dict()
WHERE = ("labels", "val_labels", "test_labels", "path_column", "label_column")  # with data: where the images are
SPACE = "space"  # SearchSpace.to_dict()
SEED = "seed"  # the study seed; each trial's derives from it
TARGET = "target"  # the goal: finished trials the study is to hold
SEARCH = "search"  # SearchOptions.settings(): what a joining worker must share
CLASS_COUNTS = "class_counts"  # labelled images per class, as the search found them
TRIAL_MIX = "trial_mix"  # the last final export's ensemble of trials, shipped or not (exports.choose_mix)

# Trial user attrs.
CONFIG = "config"  # the complete Config the trial trained
HISTORY = "history"  # a completed trial's metrics per epoch, pooled over its folds (finetune's Result.history)
STEPS = "steps"  # every fold's every epoch as reported (fold, epoch, the fold's scores), rewritten after each
RACE = "race"  # the fold race's looks: after how many folds, against which leader, both scores, p and threshold,
# p_win, delta, mix_gain and MIX
MIX = "mix"  # in a look: the trial could not win but ran on for the ensemble of trials (racing.runs_on_for_mix)
VAL_LOSS = "val_loss"  # of the best epoch, whose val_<metric> is the trial's value
BEST_EPOCH = "best_epoch"
ESTIMATE = (
    "estimate"  # Estimate.to_dict(): metric, value, 95 % interval, images, folds, per-fold scores, standard error
)
OOF = "oof_artifact_id"  # the .npz artifact of the best epoch's out-of-fold probabilities (write_oof, load_oof)
TRAIN_SECONDS = "train_seconds"  # training and validation time of its epochs: what the recipe costs, caches aside
WALL_TIME = "wall_time_s"
IMAGES_PER_S = "images_per_s"  # training throughput, mean over epochs
PEAK_MEMORY = "peak_memory_mb"
DEVICE = "device"
FAIL_REASON = "fail_reason"
PRUNE_REASON = "prune_reason"
OOM_RETRY = "oom_retry"
CANNOT_WIN = "it cannot win beyond noise"  # how the reason of a trial stopped by racing's second rule says so
PORTFOLIO = "portfolio"  # the recipe's name on a portfolio trial
ALLOCATED = "allocated"  # a fine-tuning trial's backbone as the evidence assigned it: {"backbone", "shares"}
WEIGHTS = "weights_artifact_id"  # the trial's validated models (a checkpoint), kept while it is in `kept_set`
WORKER = "worker"  # host:pid of the process that ran it
SURPLUS = "surplus"  # how the fail_reason of a trial that gave its slot up begins
# An Optuna constraint (Trial.set_constraint), 1 on a trial that the fold race or the time budget stopped (below)
UNRANKED = "unranked"


# --- the study -------------------------------------------------------------------------------------------------

_NOT_BASE = ("device", "seed", "data", *WHERE)  # the data is identified by its content (DATA), not its spelling


def metric_name(metric: str) -> str:
    """A trial's value is its kept epoch's `val_<metric>`: the out-of-fold score over every validated image."""
    return f"val_{metric}"


def study_metric(study: optuna.Study) -> str:
    """What the study ranks its trials by: its base config's `metric` (part of what a resume must match)."""
    return study.user_attrs.get(BASE, {}).get("metric", "accuracy")


def _base(base: Config | dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in (base if isinstance(base, dict) else base.to_dict()).items() if k not in _NOT_BASE}


def write_study_meta(
    study: optuna.Study, base: Config, space: SearchSpace, seed: int, data: Fingerprint | None = None
) -> None:
    """A new study's metadata: what a resumed run must match (space, base: the metric with it, data) and a joining
    worker reads."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names([metric_name(base.metric)])
    study.set_user_attr(SPACE, space.to_dict())
    study.set_user_attr(BASE, _base(base))
    study.set_user_attr(SEED, seed)
    if data is not None:
        record_data(study, base, data)


def record_data(study: optuna.Study, base: Config, data: Fingerprint) -> None:
    where = base.portable()
    study.set_user_attr(
        DATA, {"path": where.data, **{k: getattr(where, k) for k in WHERE}, "fingerprint": data.to_dict()}
    )


def check_same_meta(study: optuna.Study, base: Config, space: SearchSpace, data: Fingerprint | None = None) -> None:
    """Resuming with another space, base config or dataset is refused: the new trials would not compare with the
    old. The dataset is compared by content, so the same folder under another spelling (or moved) resumes. It is
    compared first: other data can change the default space (imbalance remedies), and the data is what to name."""
    check_same_data(study, base, data)
    stored = study.user_attrs
    for key, now, label in ((SPACE, space.to_dict(), "search space"), (BASE, _base(base), "base config")):
        # a config key added since the study began reads as its default, which the resumed trials then run with
        then = _base(Config().to_dict() | stored[key]) if key == BASE and key in stored else stored.get(key)
        if then is not None and then != now:
            diff = sorted(k for k in set(then) | set(now) if then.get(k) != now.get(k))
            raise ConfigError(
                f"study {study.study_name!r} exists with a different {label} ({', '.join(diff)}); "
                "use a new --study name or the same settings"
            )


def check_same_data(study: optuna.Study, base: Config, data: Fingerprint | None) -> None:
    """The images `base` names must be those the study was searched on (a study from before fingerprints passes)."""
    stored = study.user_attrs.get(DATA)
    if stored is None or data is None:
        return
    before = Fingerprint.from_dict(stored["fingerprint"])
    if before != data:
        now = base.labels or base.data or "the built-in demo"
        then = stored["labels"] or stored["path"] or "the built-in demo"
        raise ConfigError(
            f"study {study.study_name!r} was searched on other data than {now}: "
            f"{data.differences(before)}; use a new --study name, or the data it was searched on ({then})"
        )


def set_goal(study: optuna.Study, trials: int, settings: dict[str, Any]) -> int:
    """Raise the goal to `trials` more finished trials than the study has now; record what joiners need."""
    target = finished_count(study.get_trials(deepcopy=False)) + trials
    study.set_user_attr(TARGET, target)
    study.set_user_attr(SEARCH, settings)
    return target


def goal(study: optuna.Study) -> int:
    return study.user_attrs[TARGET]


def record_class_counts(study: optuna.Study, counts: Sequence[int]) -> None:
    study.set_user_attr(CLASS_COUNTS, [int(c) for c in counts])


def class_counts(study: optuna.Study) -> list[int]:
    return study.user_attrs.get(CLASS_COUNTS) or []


def record_trial_mix(study: optuna.Study, mix: dict[str, Any]) -> None:
    """The ensemble of trials the final export considered for winner `mix["winner"]`, and whether it shipped."""
    study.set_user_attr(TRIAL_MIX, mix)


def trial_mix(study: optuna.Study, winner: int) -> dict[str, Any] | None:
    """That record, if it was made for this winner (a run interrupted before its final export made none)."""
    mix = study.user_attrs.get(TRIAL_MIX)
    return mix if mix and mix.get("winner") == winner else None


@dataclass
class StudyMeta:
    base: Config  # with the study's seed
    space: SearchSpace
    settings: dict[str, Any]  # SearchOptions fields


def read_study_meta(study: optuna.Study) -> StudyMeta:
    """What a joining worker takes from the study; one without a goal was not started by `autoft search`."""
    attrs = study.user_attrs
    if not {BASE, SPACE, TARGET, SEARCH} <= set(attrs):
        raise ConfigError(
            f"study {study.study_name!r} was not started by this autoft version's search; it cannot be joined"
        )
    stored = attrs.get(DATA, {})
    data = {"data": stored["path"], **{k: stored[k] for k in WHERE if k in stored}} if stored else {}
    return StudyMeta(
        Config.from_dict({**attrs[BASE], **data, "seed": attrs.get(SEED, 0)}),
        SearchSpace.from_dict(attrs[SPACE]),
        attrs[SEARCH],
    )


def enqueue_portfolio(study: optuna.Study, recipes: Sequence[tuple[str, dict[str, Any]]], count: int = 1) -> None:
    """Queue the next `count` portfolio recipes, in order, that have no trial yet (or only failed ones: a recipe
    interrupted or crashed runs again), unless a trial already waits: a dead worker's trial re-queued by its
    heartbeat, or a recipe another worker queued, runs first. Called right before a trial starts, so the
    portfolio runs first, each recipe once across resumes, and nothing is left queued when a run stops."""
    _enqueue(study, lambda lead: recipes, [], count)


def enqueue_next(study: optuna.Study, space: SearchSpace, base: Config, count: int = 1) -> None:
    """What the search queues right before a trial starts: the portfolio as `enqueue_portfolio` does, its
    fine-tune recipes on the backbone the evidence points to; with several backbones, every trial after the
    portfolio too, its backbone fixed by the same rule (space.shares, space.next_backbone) and the rest sampled."""
    _enqueue(study, lambda lead: space.portfolio(base, lead), fine_tunable(space.backbones(base)), count)


def _enqueue(
    study: optuna.Study,
    recipes: Callable[[str | None], Sequence[tuple[str, dict[str, Any]]]],
    backbones: Sequence[str],
    count: int,
) -> None:
    trials = study.get_trials(deepcopy=False)
    if any(t.state == TrialState.WAITING for t in trials):
        return
    alive = (*FINISHED, TrialState.RUNNING)
    have = {t.user_attrs.get(PORTFOLIO) for t in trials if t.state in alive}
    counts = Counter(t.user_attrs[ALLOCATED]["backbone"] for t in trials if ALLOCATED in t.user_attrs)
    share = shares(backbone_evidence(trials, backbones)) if len(backbones) > 1 else {}
    for _ in range(count):
        lead = next_backbone(share, counts) if share else None
        todo = [(n, p) for n, p in recipes(lead) if n not in have]
        if not todo and lead is None:
            return
        name, params = todo[0] if todo else (None, {"backbone": lead})
        attrs: dict[str, Any] = {PORTFOLIO: name} if name else {}
        if lead is not None and params.get("backbone") == lead and not (name or "").startswith(PROBE):
            attrs[ALLOCATED] = {"backbone": lead, "shares": share}
            counts[lead] += 1
        have.add(name)
        study.enqueue_trial(params, user_attrs=attrs)


def backbone_evidence(trials: Sequence[FrozenTrial], backbones: Sequence[str]) -> dict[str, tuple[float, float]]:
    """Each of `backbones`' best completed trial so far, as (value, standard error); a backbone none of whose trials
    completed yet is left out (with none at all, the first backbone stands alone)."""
    out: dict[str, tuple[float, float]] = {}
    for t in trials:
        b = t.user_attrs.get(CONFIG, {}).get("backbone")
        if t.state != TrialState.COMPLETE or t.value is None or b not in backbones:
            continue
        if b not in out or t.value > out[b][0]:
            e = estimate(t)
            out[b] = (t.value, e.noise if e is not None else 0.0)
    return out or {backbones[0]: (0.0, 0.0)}


# --- a trial ---------------------------------------------------------------------------------------------------


def record_config(trial: optuna.Trial, cfg: Config) -> None:
    trial.set_user_attr(CONFIG, cfg.to_dict())


def record_device(trial: optuna.Trial, device: str) -> None:
    trial.set_user_attr(DEVICE, device)


def record_worker(trial: optuna.Trial) -> None:
    trial.set_user_attr(WORKER, f"{socket.gethostname()}:{os.getpid()}")


def record_steps(trial: optuna.Trial, steps: list[dict[str, Any]]) -> None:
    trial.set_user_attr(STEPS, steps)


def record_race(trial: optuna.Trial, look: dict[str, Any]) -> None:
    trial.set_user_attr(RACE, [*trial.user_attrs.get(RACE, []), look])


def ran_on_for_mix(t: FrozenTrial) -> bool:
    """Whether the fold race let the trial run on, though it could not win, for the ensemble of trials."""
    return any(look.get(MIX) for look in t.user_attrs.get(RACE) or [])


def record_unranked(trial: optuna.Trial) -> None:
    """A trial the fold race or the time budget stopped is no good point for the sampler. Optuna 5.1's TPE ranks a
    pruned trial by the last step it reported first and its value there second, and fills its good group with
    pruned trials, deepest first, when too few completed: exactly these, stopped after some folds. A constraint
    above 0 makes it infeasible, which TPE ranks after every feasible trial; it stays evidence of where not to look.
    (The samplers that model constraints read them on completed trials only; CMA-ES says it ignores them.)"""
    trial.set_constraint(UNRANKED, 1.0)


def record_cost(trial: optuna.Trial, steps: Sequence[dict[str, Any]], seconds: float) -> None:
    """What a trial that did not complete spent: its wall time, and the training and validation time of its steps."""
    trial.set_user_attr(WALL_TIME, seconds)
    trial.set_user_attr(TRAIN_SECONDS, sum(s["epoch_time_s"] for s in steps))


def record_result(trial: optuna.Trial, result: Result, steps: Sequence[dict[str, Any]]) -> None:
    """What a finished fine-tune adds; `steps` is every fold-epoch the trial reported (a retry's included)."""
    trial.set_user_attr(HISTORY, result.history)
    trial.set_user_attr(VAL_LOSS, result.best["val_loss"])
    trial.set_user_attr(BEST_EPOCH, result.best["epoch"])
    trial.set_user_attr(ESTIMATE, Estimate.of(result.best, result.validated, result.config.metric).to_dict())
    trial.set_user_attr(WALL_TIME, result.wall_time)
    trial.set_user_attr(TRAIN_SECONDS, sum(h["epoch_time_s"] for h in result.history))
    trial.set_user_attr(IMAGES_PER_S, sum(s["images_per_s"] for s in steps) / len(steps))
    trial.set_user_attr(PEAK_MEMORY, result.peak_memory_mb)


@dataclass
class Oof:
    """A trial's out-of-fold predictions at its kept epoch: what any metric, an ensemble of trials or a calibration
    can be computed from after the fact, without training."""

    probabilities: np.ndarray  # (N, C) float32, unadjusted; NaN rows: not validated (a holdout's training images)
    labels: np.ndarray  # (N,) int64
    fold: np.ndarray  # (N,) the fold that validated each image, -1: none
    paths: np.ndarray  # (N,) str: the labelled images, in this order
    prior: np.ndarray  # (C,) class frequencies of the labelled images
    tau: float  # the logit adjustment the trial was scored with

    def estimate(self, metric: str) -> Estimate:
        """`metric` of the validated images' predictions (logit-adjusted by `tau`), per fold and with its interval."""
        seen = self.fold >= 0
        log_probs = np.log(np.maximum(self.probabilities[seen], 1e-30))
        pred = adjusted(log_probs, np.log(np.maximum(self.prior, 1e-12)), self.tau).argmax(1)
        return Estimate.measure(metric, self.labels[seen], pred, self.probabilities.shape[1], self.fold[seen])


def write_oof(trial: optuna.Trial, result: Result, labels: np.ndarray, paths: Sequence[str], artifacts: str) -> None:
    """Upload the kept epoch's out-of-fold probabilities as an .npz artifact of the running trial; record its id.
    A result that validated nothing has none."""
    if result.oof is None:
        return
    buf = io.BytesIO()
    np.savez_compressed(
        buf,
        probabilities=result.oof,
        labels=np.asarray(labels, dtype=np.int64),
        fold=result.fold,
        paths=np.asarray(paths, dtype=str),
        prior=np.asarray(result.prior),
        tau=np.float64(result.tau),
    )
    trial.set_user_attr(
        OOF, attach_bytes(trial, f"oof_trial_{trial.number}.npz", buf.getvalue(), "application/octet-stream", artifacts)
    )


def load_oof(t: FrozenTrial, artifacts: str | os.PathLike) -> Oof | None:
    """The trial's out-of-fold predictions from the artifact folder; None when it kept none, or when they are gone
    from `artifacts` (deleted, or another folder): what needs them (the fold race, an ensemble of trials, a re-rank)
    then does without them."""
    artifact = t.user_attrs.get(OOF)
    data = read_artifact(artifact, artifacts) if artifact else None
    if data is None:
        return None
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        return Oof(z["probabilities"], z["labels"], z["fold"], z["paths"], z["prior"], float(z["tau"]))


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


def steps(t: FrozenTrial) -> list[dict[str, Any]]:
    return t.user_attrs.get(STEPS) or []


def fold_curve(steps_: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The first fold's epochs: the learning curve of a trial that stopped before its folds could be pooled."""
    return [s for s in steps_ if s.get("fold", 1) == 1]


def history(t: FrozenTrial) -> list[dict[str, float]]:
    """Per epoch: a completed trial's pooled metrics, else its first fold's."""
    return t.user_attrs.get(HISTORY) or fold_curve(steps(t))


def folds_run(t: FrozenTrial) -> int:
    """How many folds the trial trained (the last one maybe in part)."""
    return max((s.get("fold", 1) for s in steps(t)), default=0)


def seconds(t: FrozenTrial) -> float:
    """What a finished trial cost, in wall seconds: Optuna's start to end (an interrupted trial's too), else what it
    recorded."""
    return t.duration.total_seconds() if t.duration is not None else t.user_attrs.get(WALL_TIME, 0.0)


def val_loss(t: FrozenTrial, default: float | None = None) -> float | None:
    return t.user_attrs.get(VAL_LOSS, default)


def reason(t: FrozenTrial | optuna.Trial) -> str:
    """Why the trial failed or was pruned; empty when it completed. autoft records a reason on every failure it
    sees; a FAIL without one was failed by Optuna's heartbeat check (heartbeat.py), which records none."""
    recorded = t.user_attrs.get(FAIL_REASON) or t.user_attrs.get(PRUNE_REASON)
    if not recorded and getattr(t, "state", None) == TrialState.FAIL:
        return "worker stopped sending heartbeats"
    return recorded or ""


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


def estimate(t: FrozenTrial) -> Estimate | None:
    e = t.user_attrs.get(ESTIMATE)
    return Estimate.from_dict(e) if e else None


def epoch(t: FrozenTrial, number: int) -> dict[str, Any]:
    """The pooled metrics of epoch `number` (1-based) of a completed trial; {} when it recorded none."""
    return next((h for h in t.user_attrs.get(HISTORY) or [] if h.get("epoch") == number), {})


def step(t: FrozenTrial, number: int, epochs: int) -> dict[str, Any]:
    """The metrics the trial reported at Optuna step `number` (fold (number - 1) // epochs + 1); {} when none (an exact
    probe reports each fold once, for all of its steps)."""
    fold, epoch_ = (number - 1) // epochs + 1, (number - 1) % epochs + 1
    mine = [s for s in steps(t) if s.get("fold", 1) == fold]
    return next((s for s in mine if s.get("epoch") == epoch_), mine[0] if mine and mine[0].get("exact_probe") else {})


def kept_epoch(t: FrozenTrial) -> dict[str, Any]:
    """The metrics of the epoch the trial kept (every metric's out-of-fold score, its tau); {} when unknown."""
    return epoch(t, t.user_attrs.get(BEST_EPOCH))


def searched_keys(t: FrozenTrial) -> list[str]:
    """The config keys a trial sampled (a per-backbone name `image_size@efficientnet_lite1` is `image_size`)."""
    return list(dict.fromkeys(k.split("@")[0] for k in t.params if k != "backbone"))


def portfolio_name(t: FrozenTrial) -> str | None:
    return t.user_attrs.get(PORTFOLIO)


def portfolio_results(
    trials: Sequence[FrozenTrial], states: Sequence[TrialState] = (TrialState.COMPLETE,)
) -> dict[str, FrozenTrial]:
    """The portfolio trials in `states` by recipe name (the first of each, should one have run twice)."""
    out: dict[str, FrozenTrial] = {}
    for t in trials:
        if portfolio_name(t) and t.state in states:
            out.setdefault(portfolio_name(t), t)
    return out


# --- many trials -----------------------------------------------------------------------------------------------


def per_backbone(trials: Sequence[FrozenTrial]) -> dict[str, tuple[int, float, float]]:
    """Per backbone of the completed trials: (trials, best accuracy, median wall seconds of a trial)."""
    out: dict[str, list[FrozenTrial]] = {}
    for t in trials:
        if t.state == TrialState.COMPLETE and t.value is not None:
            out.setdefault(t.user_attrs.get(CONFIG, {}).get("backbone", "?"), []).append(t)
    return {
        b: (len(ts), max(t.value for t in ts), float(np.median([t.user_attrs.get(WALL_TIME, 0.0) for t in ts])))
        for b, ts in out.items()
    }


def gain_over_portfolio(best: FrozenTrial, trials: Sequence[FrozenTrial]) -> float | None:
    """The winner's estimate minus the best portfolio recipe's: what the search added to the expert's shortlist."""
    recipes = [t.value for t in portfolio_results(trials).values()]
    return best.value - max(recipes) if recipes else None


@dataclass(frozen=True)
class Candidate:
    """What the choice of the winner looks at in a completed trial."""

    number: int
    value: float  # of the study's metric (or the one asked to re-rank by)
    noise: float  # its standard error (Estimate.noise); 0 for a trial recorded without an estimate
    loss: float
    cost: float

    @classmethod
    def of(cls, t: FrozenTrial, estimate_: Estimate | None = None) -> "Candidate":
        """The trial as recorded, or scored by `estimate_` (another metric of its out-of-fold predictions)."""
        e = estimate_ or estimate(t)
        return cls(
            t.number,
            e.value if estimate_ else t.value,
            e.noise if e else 0.0,
            t.user_attrs.get(VAL_LOSS, math.inf),
            t.user_attrs.get(TRAIN_SECONDS, t.user_attrs.get(WALL_TIME, 0.0)),
        )


def select(candidates: Sequence[Candidate]) -> Candidate | None:
    """THE choice of the winner: the best score is a maximum over noisy scores, so every trial within one
    standard error of it (the noise its images allow, Estimate.noise: binomial for accuracy, bootstrap for
    the balanced metrics; the one-standard-error rule) ties with it; of those, the lowest loss wins, and on
    equal losses (to 3 decimals) the cheaper recipe, then the earlier.
    """
    if not candidates:
        return None
    top = max(candidates, key=lambda c: (c.value, -c.loss, -c.number))
    tied = [c for c in candidates if c.value >= top.value - top.noise - 1e-12]
    return min(tied, key=lambda c: (round(c.loss, 3), c.cost, c.number))


def completed(study: optuna.Study) -> list[FrozenTrial]:
    return [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if t.value is not None]


def best_trial(study: optuna.Study) -> FrozenTrial | None:
    trials = completed(study)
    winner = select([Candidate.of(t) for t in trials])
    return next(t for t in trials if t.number == winner.number) if winner else None


def best_by(
    study: optuna.Study, metric: str, artifacts: str | os.PathLike
) -> tuple[FrozenTrial | None, Estimate | None]:
    """The winner had the study been ranked by `metric`: every completed trial scored from its out-of-fold
    artifact (no training) and chosen by `select`; with that trial's estimate."""
    scored_: list[tuple[FrozenTrial, Estimate]] = []
    for t in completed(study):
        oof = load_oof(t, artifacts)
        if oof is None:
            raise ConfigError(
                f"trial {t.number} kept no out-of-fold predictions (an older autoft ran it); "
                f"it cannot be re-ranked by {metric}"
            )
        scored_.append((t, oof.estimate(metric)))
    winner = select([Candidate.of(t, e) for t, e in scored_])
    return next(((t, e) for t, e in scored_ if t.number == winner.number), (None, None))


KEEP = 5  # completed trials whose weights are kept besides the winner: the pool an ensemble of trials is chosen from


def kept_set(candidates: Sequence[Candidate]) -> set[int]:
    """THE rule for whose validated models a study keeps (as artifacts): the winner (`select`) and the KEEP best by
    value. Ensemble selection picks its members from them, so the final export trains nothing again."""
    top = sorted(candidates, key=lambda c: (-c.value, c.number))[:KEEP]
    winner = select(candidates)
    return {c.number for c in top} | ({winner.number} if winner else set())


def with_running(study: optuna.Study, number: int, result: Result) -> tuple[list[Candidate], Candidate]:
    """The completed trials as candidates plus trial `number`, still running with this result (and that one)."""
    e = Estimate.of(result.best, result.validated, result.config.metric)
    me = Candidate(number, e.value, e.noise, result.best["val_loss"], sum(h["epoch_time_s"] for h in result.history))
    return [Candidate.of(t) for t in completed(study) if t.number != number] + [me], me


def state_counts(trials: Sequence[FrozenTrial]) -> Counter[TrialState]:
    """Trials per state (a state with none counts 0)."""
    return Counter(t.state for t in trials)


def finished_count(trials: Sequence[FrozenTrial]) -> int:
    counts = state_counts(trials)
    return sum(counts[s] for s in FINISHED)


def describe(t: FrozenTrial, estimate_: Estimate | None = None) -> str:
    """`trial 7 (linear_probe): accuracy 0.8517 (95 % interval 0.821-0.878; 600 images, 5-fold cross-validation),
    val_loss 0.47`; with `estimate_`, that score instead of the recorded one."""
    e = estimate_ or estimate(t)
    name = f" ({portfolio_name(t)})" if portfolio_name(t) else ""
    score = e.describe() if e else f"value {t.value:.4f}"
    tau, tta = kept_epoch(t).get("tau"), kept_epoch(t).get("tta")
    return (
        f"trial {t.number}{name}: {score}, val_loss {val_loss(t, math.nan):.4f}"
        + (f", tau {tau:g}" if tau else "")
        + (", with test-time flips" if tta == "flip" else "")
    )


# The trials table (trials.csv and the report): a column is a name and how to read it from a trial;
# the searched parameters follow, then the reason.
def _estimated(read: Callable[[Estimate], Any]) -> Callable[[FrozenTrial], Any]:
    def column(t: FrozenTrial) -> Any:
        e = estimate(t)
        return None if e is None else read(e)

    return column


COLUMNS: list[tuple[str, Callable[[FrozenTrial], Any]]] = [
    ("number", lambda t: t.number),
    ("state", lambda t: t.state.name),
    ("recipe", lambda t: portfolio_name(t) or ""),
    ("metric", lambda t: t.user_attrs.get(CONFIG, {}).get("metric")),
    ("value", lambda t: t.value),
    ("interval_low", _estimated(lambda e: e.interval[0])),
    ("interval_high", _estimated(lambda e: e.interval[1])),
    ("images", _estimated(lambda e: e.images)),
    ("fold_scores", _estimated(lambda e: ";".join(f"{a:.4f}" for a in e.fold_scores))),
    ("se", _estimated(lambda e: e.se)),
    *((f"val_{m}", lambda t, m=m: kept_epoch(t).get(f"val_{m}")) for m in METRICS),
    ("tau", lambda t: kept_epoch(t).get("tau")),
    ("tta", lambda t: kept_epoch(t).get("tta")),
    (VAL_LOSS, val_loss),
    (BEST_EPOCH, lambda t: t.user_attrs.get(BEST_EPOCH)),
    ("epochs_run", lambda t: len(history(t))),
    ("folds_run", folds_run),
    ("backbone", lambda t: t.user_attrs.get(CONFIG, {}).get("backbone")),
    ("image_size", lambda t: t.user_attrs.get(CONFIG, {}).get("image_size")),
    (TRAIN_SECONDS, lambda t: t.user_attrs.get(TRAIN_SECONDS)),
    (WALL_TIME, lambda t: t.user_attrs.get(WALL_TIME)),
    (IMAGES_PER_S, lambda t: t.user_attrs.get(IMAGES_PER_S)),
]


def trial_rows(trials: Sequence[FrozenTrial]) -> tuple[list[str], list[list[Any]]]:
    """(header, one row per trial): the values as stored, for a CSV writer or `fmt`."""
    columns = [name for name, _ in COLUMNS]
    params = sorted({p for t in trials for p in t.params} - set(columns))  # a searched backbone is a column already
    header = columns + params + ["reason"]
    rows = [[read(t) for _, read in COLUMNS] + [t.params.get(p) for p in params] + [reason(t)] for t in trials]
    return header, rows


def fmt(v: Any) -> str:
    """A stored value for people: floats to 4 significant digits, nothing for None."""
    if v is None:
        return ""
    return f"{v:.4g}" if isinstance(v, float) else str(v)
