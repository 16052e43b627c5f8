"""`autoft search` and `autoft worker`: the Optuna study around the objective (objective.py).

Here: how the study runs (SearchOptions), its sampler and pruner, creating, resuming or joining it,
running it in this process or in workers, and the progress bar and summary.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import sys
import time
import warnings
from collections import Counter
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import torch
from optuna.trial import FrozenTrial, TrialState

from . import interrupts, probe, records, workers
from .backbones import AUTO, JOIN, auto_backbones, build_model, get_backbone
from .cache import RunCache, label_files
from .checkpoint import shipped
from .config import Config, check_field
from .data import Dataset, Fingerprint, Found, scan
from .estimate import Estimate, span
from .exceptions import AutoftError, ConfigError
from .exports import Exporter, describe_mix
from .files import check_writable_dir
from .objective import Objective, trial_seed
from .probe import EXACT
from .space import SearchSpace, imbalanced
from .storage import (DEFAULT_ARTIFACTS, DEFAULT_STORAGE, check_study_name, check_writable_storage, export_dir, in_memory,
                      load_study, make_storage, mask_url)

log = logging.getLogger("autoft")
SEARCH_DEFAULTS = {"backbone": AUTO}  # a search's value for a key nobody set (autoft train keeps Config's)


def _option(default: Any, help: str, **more: Any) -> Any:
    return field(default=default, metadata={"help": help, **more})


@dataclass
class SearchOptions:
    """How the study runs; what each trial trains is the base Config plus the sampled parameters.

    Each field with a `help` is an `autoft search` flag too (cli.add_flags), its choices checked here.
    """

    trials: int = _option(10, "trials to add to the study (0: none; complete the study's exports)", lo=0)
    timeout: float | None = _option(None, "time budget in seconds for the whole run, the final export included: a "
                                          "running trial stops at the fold or epoch that would end past it",
                                    lo=0, lo_open=True)
    study: str = _option("autoft", "study name (letters, digits, '.', '_', '-'); an existing one is resumed")
    storage: str = _option(DEFAULT_STORAGE, "Optuna storage URL")
    space: str | None = _option(None, "YAML search space that fixes or reshapes parameters", metavar="FILE")
    sampler: str = _option("tpe", "sampler", choices=("tpe", "random", "cmaes", "gp"))
    pruner: str = _option("sha", "pruner (Optuna's: successive halving, median, Hyperband) over every fold's epochs, "
                                 "never pruning a trial within noise of the leader", choices=("sha", "median", "hyperband",
                                                                                              "none"))
    out: str | None = _option(None, "export folder (default: studies/<study>)")
    artifacts: str = _option(DEFAULT_ARTIFACTS, "folder of the weights and learning curves the dashboard serves")
    min_epochs: int = _option(1, "never prune before this many steps (epochs of the first fold)", lo=1)
    startup_trials: int = _option(1, "never prune before this many trials finished", lo=0)
    progress: bool = True  # progress bar and summary; the Python API may turn them off
    started: float | None = None  # time.monotonic() when the command began: the budget counts from it (None: the call)
    workers: int = _option(1, "worker processes sharing the study: one per GPU, else a share of the CPU cores", lo=1)

    def settings(self) -> dict[str, Any]:
        """What a joining worker must share with this search (kept in the study's user attrs)."""
        return {"sampler": self.sampler, "pruner": self.pruner, "min_epochs": self.min_epochs,
                "startup_trials": self.startup_trials}

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # numbers parsed as Config's are (YAML, flags and Python alike)
            if f.metadata:
                value = getattr(self, f.name)
                value = os.fspath(value) if isinstance(value, os.PathLike) else value  # out=Path(...) from Python
                setattr(self, f.name, check_field(f, value, f"search setting {f.name!r}"))
        check_study_name(self.study)

    @property
    def out_dir(self) -> Path:
        return Path(self.out) if self.out else export_dir(self.study)


def make_sampler(name: str, seed: int | None) -> optuna.samplers.BaseSampler:
    if name == "tpe":
        # group: a searched backbone makes the space conditional (see space.py); TPE models each branch apart
        with warnings.catch_warnings():  # "experimental" since Optuna 2.8; the grouping is what conditional spaces need
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True, n_startup_trials=5)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False)
    return optuna.samplers.GPSampler(seed=seed)


class _Guarded(optuna.pruners.BasePruner):
    """Around every pruner: never before `min_epochs` steps or `startup` finished trials, never a trial within noise
    of the leading fine-tune at the same step, and never by comparison with an exact probe.

    A step is one epoch of one fold (folds train one after another), so at a given step every fine-tune has scored
    the same fold's images at the same epoch: the trial is spared while its score there, `z` standard errors of the
    difference up (binomial on the fold's images for accuracy, the step's bootstrap for the other metrics), reaches
    the leading completed fine-tune's score at that step. The inner pruner (Optuna's) is asked first, so its
    bookkeeping (successive halving's rungs) sees every step; the guard only vetoes its "prune". With z = 1 it spares
    the trials that a one-standard-error tie could make the winner, and lets successive halving prune the rest.

    Exact probes are no yardstick here: fitted in one step, a probe reports its final score at every step of its
    folds, which a fine-tune's first epochs would be measured against (on a 245-image set, three sampled fine-tunes
    were pruned after one epoch at 0.88-0.90 against a probe's fitted 0.96). They never ask the pruner, so they hold
    no rung of successive halving either; until a fine-tune has completed, nothing is pruned here (fold racing
    compares every trial with the leader, a probe included, on whole folds).
    """

    def __init__(self, inner: optuna.pruners.BasePruner, min_epochs: int, startup: int, images: int, metric: str,
                 epochs: int = 1, z: float = 1.0):
        self.inner, self.min_epochs, self.startup, self.images = inner, min_epochs, startup, images
        self.metric, self.epochs, self.z = metric, epochs, z

    def prune(self, study: optuna.Study, trial: FrozenTrial) -> bool:
        interrupts.check_stopped()  # a signal that waited out a storage write, or that Python dropped, stops here
        step = trial.last_step
        if step is None or step < self.min_epochs:
            return False
        finished = study.get_trials(deepcopy=False, states=records.FINISHED)  # one storage read per epoch
        if len(finished) < self.startup:
            return False
        done = self.yardsticks(finished)
        if not done or not self.inner.prune(study, trial):
            return False
        top = max(done, key=lambda t: t.value)
        theirs = top.intermediate_values.get(step, top.value)
        now = trial.intermediate_values[step]
        noise = math.hypot(self._noise(trial, step, now), self._noise(top, step, theirs))
        return now + self.z * noise < theirs

    @staticmethod
    def yardsticks(finished: Sequence[FrozenTrial]) -> list[FrozenTrial]:
        """The trials a step is measured against: the completed fine-tunes (no exact probe)."""
        return [t for t in finished if t.state == TrialState.COMPLETE and t.value is not None
                and not probe.exact(records.steps(t))]

    def _noise(self, t: FrozenTrial, step: int, value: float) -> float:
        """The standard error of a trial's score at `step`: on its fold's images (all of them for an exact probe's
        pooled value)."""
        metrics = records.step(t, step, self.epochs)
        n = metrics.get("images") or self.images
        return (Estimate.of(metrics, n, self.metric) if metrics else Estimate(value, n)).noise


def make_pruner(name: str, epochs: int, min_epochs: int, startup: int, images: int,
                metric: str = "accuracy", folds: int = 1) -> optuna.pruners.BasePruner:
    """`images`: how many validation images a step's score (of `metric`) rests on, one fold's (the noise the guard
    allows for); a trial has `folds` x `epochs` steps, the resource successive halving and Hyperband divide."""
    if name == "none":
        inner = optuna.pruners.NopPruner()
    elif name == "median":
        inner = optuna.pruners.MedianPruner(n_startup_trials=startup)  # its median needs that many completed trials
    elif name == "sha":
        inner = optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=3)
    else:
        inner = optuna.pruners.HyperbandPruner(min_resource=1, max_resource=max(1, folds * epochs), reduction_factor=3)
    return _Guarded(inner, min_epochs, startup, images, metric, epochs)


def open_study(base: Config, opts: SearchOptions, space: SearchSpace, seed: int, images: int,
               data: Fingerprint | None = None, folds: int = 1,
               storage: optuna.storages.BaseStorage | None = None) -> optuna.Study:
    """Create or resume the study in `storage` (None: opened from `opts.storage`); a resumed study must have the same
    space, base config and data (`data`: its fingerprint, compared by content, so another spelling of the same folder
    resumes; `images`: one fold's validation images, of `folds`)."""
    storage = make_storage(opts.storage) if storage is None else storage
    try:
        existing = [s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False)]
    except Exception as exc:
        raise ConfigError(f"cannot read storage {mask_url(opts.storage)}: {mask_url(str(exc).splitlines()[0])[:300]}") from None
    n_before, replace = 0, False
    if opts.study in existing:
        old = optuna.load_study(study_name=opts.study, storage=storage)
        n_before = len(old.get_trials(deepcopy=False))
        try:
            records.check_same_meta(old, base, space, data)
        except ConfigError:  # a study none of whose trials finished has no results to keep comparable
            if records.finished_count(old.get_trials(deepcopy=False)):
                raise
            log.info("study %r has no finished trial yet: its search space, base config and data are replaced by "
                     "this run's", opts.study)
            replace = True
    # Sampler seeded past the trials already run, so a resumed study samples new points, not the same ones again.
    study = optuna.create_study(storage=storage, study_name=opts.study, direction="maximize", load_if_exists=True,
                                sampler=make_sampler(opts.sampler, trial_seed(seed, n_before)),
                                pruner=make_pruner(opts.pruner, base.epochs, opts.min_epochs, opts.startup_trials, images,
                                                   base.metric, folds))
    if n_before == 0 or replace:
        records.write_study_meta(study, base, space, seed, data)
    elif data is not None:  # where the data is now (and, for a study from before fingerprints, what it is)
        records.record_data(study, base, data)
    return study


def run_search(base: Config, opts: SearchOptions, space: SearchSpace | None = None,
               fixed: Sequence[str] = ()) -> optuna.Study:
    """Run `opts.trials` more trials (resuming the study if it exists) and export the best.

    The study's goal becomes its finished trials now plus `opts.trials`, met exactly by this process or,
    with `opts.workers` > 1, by that many worker processes. `backbone: auto` makes the backbone a searched
    choice among the offline ones (the first is the base the portfolio's fine-tunes use). `fixed`: the config
    keys the user set; the search does not overrule them.
    """
    started = opts.started if opts.started is not None else time.monotonic()
    check_outputs(opts)
    cache = RunCache()
    base, space = search_space(base.portable(), opts, space, fixed)  # trials record the data's absolute path
    objective = _objective(base, opts, space, cache)
    storage = make_storage(opts.storage)
    study = open_study(base, opts, space, base.seed, objective.validated_images() // objective.folds(),
                       objective.dataset().fingerprint, objective.folds(), storage)
    objective.say_folds()
    records.set_goal(study, opts.trials, opts.settings())
    records.record_class_counts(study, class_counts(objective.dataset()))
    held = sorted(k for k in fixed if k in space.params and space.params[k].kind == "fixed")
    if held:
        log.info("not searched, as you set them: %s", ", ".join(f"{k}={space.params[k].value}" for k in held))
    return _run(study, storage, objective, opts, started, spawn=opts.workers > 1)


def join(storage: str, study: str, *, data: str | None = None, device: str = "auto", out: str | None = None,
         artifacts: str = DEFAULT_ARTIFACTS, threads: int | None = None, timeout: float | None = None,
         progress: bool = True, started: float | None = None) -> optuna.Study:
    """`autoft worker`: one more worker on an existing study, until its goal is met, with the settings it recorded;
    `timeout` counts from `started` (time.monotonic(); None: now). A worker that a search spawned ends with it."""
    started = time.monotonic() if started is None else started
    workers.watch_parent()
    if threads:
        torch.set_num_threads(threads)
    check_outputs(SearchOptions(study=study, storage=storage, out=out, artifacts=artifacts, timeout=timeout))
    opened = make_storage(storage)
    found = load_study(storage, study, opened=opened)
    meta = records.read_study_meta(found)
    base = meta.base.replace(device=device, **({"data": data} if data else {}))
    opts = SearchOptions(study=study, storage=storage, out=out, artifacts=artifacts, timeout=timeout, progress=progress,
                         **meta.settings)
    cache = RunCache()
    base, space = search_space(base.portable(), opts, meta.space)
    objective = _objective(base, opts, space, cache)
    records.check_same_data(found, base, objective.dataset().fingerprint)  # --data: the same images, elsewhere
    found.sampler = make_sampler(opts.sampler, None)  # seeded at random, so that workers sample different points
    found.pruner = make_pruner(opts.pruner, base.epochs, opts.min_epochs, opts.startup_trials,
                               objective.validated_images() // objective.folds(), base.metric, objective.folds())
    objective.say_folds()
    return _run(found, opened, objective, opts, started, spawn=False, ship=False)


def check_outputs(opts: SearchOptions) -> None:
    """Every place a search writes, checked before it loads data or trains: the exports, the artifacts, the
    storage's file; a one-line error at once rather than a traceback after the first trial."""
    if opts.workers > 1 and in_memory(opts.storage):
        raise ConfigError(f"--workers {opts.workers} needs a storage that processes share; {mask_url(opts.storage)} is an "
                          "in-memory database of this process (use sqlite:///FILE.db, journal:FILE or a server)")
    check_writable_dir(opts.out_dir, "--out")
    check_writable_dir(opts.artifacts, "--artifacts")
    check_writable_storage(opts.storage)


def search_defaults(config: Config, set_keys: Collection[str]) -> Config:
    """`config` with SEARCH_DEFAULTS for the keys not in `set_keys` (those set by flag, config file or keyword):
    a search compares the offline backbones unless one is named (docs/models-and-finals.md has the evidence)."""
    return config.replace(**{k: v for k, v in SEARCH_DEFAULTS.items() if k not in set_keys})


def search_space(base: Config, opts: SearchOptions, space: SearchSpace | None = None, fixed: Sequence[str] = ()
                 ) -> tuple[Config, SearchSpace]:
    """The base config and the validated space: `opts.space` over the default one (with the imbalance remedies
    when the labelled classes of `base`'s data are imbalanced: a scan, nothing decoded), the keys in `fixed` (set by
    the user) fixed at their values, and `backbone: auto` a searched choice among the offline backbones (the first is
    the base) and all of them joined (one probe on their features side by side)."""
    backbones = auto_backbones() if base.backbone == AUTO else []
    if len(backbones) > 1:  # and one probe on all of them side by side
        backbones.append(JOIN.join(backbones))
    if backbones:  # `--backbone auto` asks for the search, it does not hold the backbone
        base, fixed = base.replace(backbone=backbones[0]), [k for k in fixed if k != "backbone"]
    if space is None:
        uneven = imbalanced(labelled_counts(scan(base.data, label_files(base), say=False)))
        return base, SearchSpace.from_yaml(opts.space, base, backbones, fixed, uneven)
    space.validate(base)
    return base, space


def class_counts(data: Dataset) -> list[int]:
    return torch.bincount(data.labelled.labels, minlength=len(data.classes)).tolist()


def labelled_counts(found: Found) -> list[int]:
    """Labelled (train and val) images per class, as a scan found them."""
    labels = [y for split in ("train", "val") for y in found.splits.get(split, ((), ()))[1]]
    return np.bincount(labels, minlength=len(found.classes)).tolist()


def _objective(base: Config, opts: SearchOptions, space: SearchSpace, cache: RunCache) -> Objective:
    """The objective, once what would fail every trial has been tried: a bad weights file or bad data stops
    here, before the study is touched."""
    if base.weights != "random":  # a bad file, or pretrained weights that cannot be downloaded (kept for the trials)
        build_model(base.backbone, 2, base.weights, pretrained=cache.pretrained_stages)
    objective = Objective(base, space, base.seed, Exporter(opts.out_dir, opts.artifacts, cache), cache)
    objective.racing = opts.pruner != "none"
    objective.dataset()
    return objective


def _run(study: optuna.Study, storage: optuna.storages.BaseStorage, objective: Objective, opts: SearchOptions,
         started: float, spawn: bool, ship: bool = True) -> optuna.Study:
    """Trials until the study's goal is met (or the time budget, counted from `started`, is spent), here or in
    `opts.workers` spawned processes; then the exports, with `ship` the winner's shipped model too unless the run was
    interrupted (the search ships it; its workers, which end with it, would each train the same model again).

    The exports are published before the first trial too: a best.pt deleted by hand comes back from the kept
    models, and what a killed run left (weights of a trial that never completed) goes. Signals are handled from
    here to the end of the final export; one that interrupts the export leaves the previous files, and
    `--trials 0` completes it. The budget holds for the whole run: trials get the time left less what the final
    export needs (`Exporter.reserve`), and a trial that would not end before that stops at its next fold or epoch
    boundary; a budget that bought no trial is an error."""
    target = records.goal(study)
    todo = max(0, target - records.finished_count(study.get_trials(deepcopy=False)))
    log.info("study %r on %s: %d trial(s) to go, to %d finished; exports in %s", study.study_name, mask_url(opts.storage),
             todo, target, opts.out_dir)
    exporter = objective.exporter
    ran = workers.Ran()  # this run's trials, for the progress bar and the summary
    progress = _Progress(todo, study, ran, objective.folds()) if opts.progress and todo else None
    objective.on_epoch = progress.epoch if progress else None
    objective.on_batch = getattr(progress, "batch", None)
    objective.deadline = started + opts.timeout if opts.timeout else None
    finished = False
    space, base = objective.space, objective.base
    with interrupts.handled():
        exporter.export(study)
        try:
            if todo and spawn:  # queue a recipe per worker now, or they would all start on the first
                records.enqueue_next(study, space, base, min(opts.workers, todo))
                left = objective.time_left(study)
                workers.spawn(opts.workers, opts.storage, opts.study, objective.base.device, str(opts.out_dir),
                              opts.artifacts, left if math.isfinite(left) else None, progress=progress, ran=ran)
            elif todo:
                workers.work(study, storage, objective, [exporter] + ([progress] if progress else []),
                             lambda: objective.time_left(study) - objective.unit_seconds, ran=ran,
                             before_trial=lambda s: records.enqueue_next(s, space, base))
            finished = True
        finally:
            if progress:
                progress.close()
            t_export = time.monotonic()
            best = _export(study, exporter, final=finished and ship)
            if opts.progress:
                print_summary(study, best, time.monotonic() - started, opts.out_dir, ran.trials(study), time.monotonic() - t_export,
                              opts.timeout)
    mine = ran.trials(study)
    if opts.timeout and todo and not any(t.state in records.FINISHED for t in mine):
        raise AutoftError(f"the --timeout budget of {opts.timeout:g} s bought no trial ({time.monotonic() - started:.0f} s "
                          f"went to starting up and exporting); give a larger --timeout"
                          + (" (the last trial ran out of time before its first epoch)" if mine else ""))
    return study


def _export(study: optuna.Study, exporter: Exporter, final: bool) -> FrozenTrial | None:
    """The exports; a signal in the final one leaves the previous files, and says how to complete it."""
    try:
        return exporter.export(study, final=final)
    except KeyboardInterrupt as exc:
        if not final:
            raise
        raise type(exc)(f"the final export was interrupted: {exporter.out} holds the previous best.pt, best.yaml and "
                        f"trials.csv; `autoft search --study {study.study_name} --trials 0` (same storage) completes it "
                        "without new trials") from None


class _Progress:
    """A bar with finished trials i/N, best so far, pruned/failed counts and where the running trial is.

    Trial counts are redrawn from the storage when a trial ends (and when `--workers` polls), so the bar also
    follows trials other processes run; an epoch or a batch only updates the text, without a storage round trip
    (but for a trial's first batch, which reads its config). The ETA is this process's own, not tqdm's mean over
    trials (a one-pass exact probe first made a 17-minute fine-tune look seconds away): the running trial's from
    its own batch rate and its planned epochs x `folds`, or, for an exact probe, its one feature pass; the study's
    adds the trials still to run at the median wall time of this run's fine-tunes (this trial's total until one
    ended).
    """

    def __init__(self, total: int, study: optuna.Study, ran: workers.Ran, folds: int = 1,
                 clock: Callable[[], float] = time.monotonic, live: bool | None = None):
        from tqdm.auto import tqdm

        self.study, self.ran, self.folds, self.clock, self.total = study, ran, folds, clock, total
        self.score = records.metric_name(records.study_metric(study))
        # A live bar on a terminal only (`live` None: whether stderr is one); piped to a file (CI, nohup, a
        # scheduler), one plain line per finished trial instead of carriage-return frames.
        self.live = sys.stderr.isatty() if live is None else live
        self.bar = tqdm(total=total, desc="trials", unit="trial", dynamic_ncols=True, disable=not self.live,
                        bar_format="{desc}{percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]")
        self.said: set[int] = set()  # trials whose line was written (not live)
        self.best, self.running, self.last_epoch = "best=-", "", ""
        self.trial: dict[str, Any] = {}  # the trial batch() follows: its number, plan, and batches so far
        self.fine_tunes: list[float] = []  # wall seconds of this run's finished fine-tunes (exact probes aside)
        self.drawn = -math.inf

    def epoch(self, number: int, epochs: int, metrics: dict[str, Any]) -> None:
        """The objective's per-epoch hook: where the running trial is; the next batch begins a new pass (an epoch of
        one batch included)."""
        t = self.trial
        if t.get("number") == number and t["done"]:
            t["before"] += t["total"]
            t["passes"] += 1
            t["done"] = 0
        self.last_epoch = f"{self.score} {metrics[self.score]:.3f} at epoch {metrics['epoch']}"
        fold = f"fold {metrics['fold']}/{self.folds} " if self.folds > 1 and "fold" in metrics else ""
        self.running = f"trial {number} {fold}epoch {metrics['epoch']}/{epochs} {self.score} {metrics[self.score]:.3f}"
        self._draw()

    def batch(self, number: int, done: int, total: int, images_per_s: float) -> None:
        """The fine-tune's per-batch hook: `done` of the `total` batches of the current epoch (of one fold)."""
        if not self.live:
            return
        now, t = self.clock(), self.trial
        if t.get("number") != number:
            t = self.trial = self._plan(number, now)
        if done < t["done"]:  # a new pass (epoch or fold) began, unless the epoch hook said so
            t["before"] += t["total"]
            t["passes"] += 1
        if t["first"] is None:  # timed from here: what came before (building the model, caching) is no batch
            t["first"], t["start"] = done, now
        t["done"], t["total"] = done, total
        if done < total and now - self.drawn < self.bar.mininterval:
            return  # many batches a second: redraw at tqdm's pace
        seen = t["before"] + done - t["first"]  # batches since the first call, timed by the clock
        per_batch = ((now - t["start"]) / seen if seen > 0 else
                     t["batch_size"] / images_per_s if images_per_s > 0 else math.nan)
        passes = 1 if t["exact"] else t["epochs"] * self.folds
        left = per_batch * ((total - done) + max(0, passes - t["passes"] - 1) * total)
        if t["exact"]:
            where = f"trial {number} exact probe: features batch {done}/{total}"
        else:
            fold, epoch = divmod(min(t["passes"], passes - 1), t["epochs"])
            where = (f"trial {number}" + (f" fold {fold + 1}/{self.folds}" if self.folds > 1 else "")
                     + f" epoch {epoch + 1}/{t['epochs']} batch {done}/{total}")
        eta = "ETA ?" if math.isnan(left) else f"ETA {self.bar.format_interval(left)}"
        if not math.isnan(left) and not t["exact"]:
            trials_after = max(0, self.total - self.bar.n - 1)
            each = float(np.median(self.fine_tunes)) if self.fine_tunes else now - t["start"] + left
            eta += f" (study ~{self.bar.format_interval(left + trials_after * each)})"
        self.running = (f"{where} {images_per_s:.0f} img/s {eta}"
                        + (f"; {self.last_epoch}" if self.last_epoch and not t["exact"] else ""))
        self.drawn = now
        self._draw()

    def _plan(self, number: int, now: float) -> dict[str, Any]:
        """What a trial will run, from the config it recorded: its epochs, batch size and kind."""
        cfg = next(records.config(t) for t in self.study.get_trials(deepcopy=False) if t.number == number)
        exact = probe.applies(cfg, get_backbone(cfg.backbone).num_stages)
        self.last_epoch = ""
        return {"number": number, "epochs": cfg.epochs, "batch_size": cfg.batch_size, "exact": exact, "start": now,
                "first": None, "done": 0, "total": 0, "before": 0, "passes": 0}

    def __call__(self, study: optuna.Study | None = None, trial: FrozenTrial | None = None) -> None:
        """An Optuna callback (a trial ended) and what `--workers` polls while other processes work."""
        trials = self.study.get_trials(deepcopy=False)
        best = records.best_trial(self.study)
        mine = self.ran.trials(self.study)  # this run's, not other runs' on the same study
        new = records.state_counts(mine)
        self.fine_tunes = [t.duration.total_seconds() for t in mine if t.state == TrialState.COMPLETE and t.duration
                           and not probe.exact(records.history(t))]
        self.best = f"best={best.value:.4f} (#{best.number})" if best else "best=-"
        if trial is not None:
            self.running = ""
        elif study is None:  # polled: what the workers' running trials last reported
            self.running = ", ".join(f"trial {t.number} epoch {len(records.history(t))}" for t in trials
                                     if t.state == TrialState.RUNNING and records.history(t))
        self.bar.set_description(f"trials (pruned {new[TrialState.PRUNED]}, failed {new[TrialState.FAIL]})", refresh=False)
        self.bar.n = new[TrialState.COMPLETE] + new[TrialState.PRUNED]
        self._draw()
        if not self.live:
            self._lines(mine, new)

    def _lines(self, mine: Sequence[FrozenTrial], counts: Counter[TrialState]) -> None:
        """One plain line per trial of this run that ended since the last call."""
        done = counts[TrialState.COMPLETE] + counts[TrialState.PRUNED]
        for t in mine:
            if t.state.is_finished() and t.number not in self.said:
                self.said.add(t.number)
                name = f" ({records.portfolio_name(t)})" if records.portfolio_name(t) else ""
                what = (f"{self.score} {t.value:.4f}" if t.state == TrialState.COMPLETE else
                        records.reason(t) or "no reason recorded")
                log.info("trial %d%s %s: %s; %s; %d of %d finished", t.number, name, t.state.name.lower(), what,
                         self.best, done, self.total)

    def _draw(self) -> None:
        if self.live:
            self.bar.set_postfix_str(self.best + (f" | {self.running}" if self.running else ""))

    def close(self) -> None:
        self.bar.close()


def print_summary(study: optuna.Study, best: FrozenTrial | None, seconds: float, out: Path,
                  mine: Sequence[FrozenTrial], export_seconds: float = 0.0, budget: float | None = None) -> None:
    """What the search found, what it is worth (the winner's estimate with its 95 % interval and the images
    behind it), what it adds over the portfolio recipes, where the budget went (`mine`: this run's trials), and
    where the exports are."""
    trials = study.get_trials(deepcopy=False)
    count = records.state_counts(mine)
    done = count[TrialState.COMPLETE] + count[TrialState.PRUNED] + count[TrialState.FAIL]
    lines = [f"study {study.study_name}: {done} trials this run ({count[TrialState.COMPLETE]} complete, "
             f"{count[TrialState.PRUNED]} pruned, {count[TrialState.FAIL]} failed) in {seconds:.1f} s"
             + (f" of a {budget:g} s budget" if budget else "") + f"; {len(trials)} in the study",
             f"  time in trials this run: {time_per_state(mine)}",
             f"  by kind: {budget_story(mine)}; final export {export_seconds:.0f} s",
             f"  {sampled_story(mine)}"]
    if best is not None:
        e = records.estimate(best)
        lines.append(f"winner: {records.describe(best)}")
        lines.append(f"  its estimate rests on {e.folds if e else 1} fold(s) x {len(records.history(best))} epoch(s)"
                     f" ({e.images if e else '?'} images validated)")
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
            lines.append(f"  gain over the best portfolio recipe: {gain:+.4f}"
                         + (" (below it, within one standard error: the tie-break above)" if gain < 0 else ""))
        counts = records.class_counts(study)
        if imbalanced(counts) and records.study_metric(study) == "accuracy":
            kept = records.kept_epoch(best)
            lines.append(f"  imbalanced classes ({max(counts)} to {min(counts)} images): accuracy favours the common "
                         f"ones; the winner's balanced accuracy is {kept.get('val_balanced_accuracy', float('nan')):.4f} "
                         f"(accuracy {kept.get('val_accuracy', float('nan')):.4f}); to choose on it: "
                         "--metric balanced_accuracy")
        backbones = records.per_backbone(trials)
        if len(backbones) > 1:  # accuracy against cost, per backbone
            lines += [f"  {b:<20} {n:>3} trials, best {acc:.4f}, {sec:.1f} s per trial (median wall time)"
                      for b, (n, acc, sec) in sorted(backbones.items())]
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
            lines.append(f"  an exact probe: its head is fitted (C per fold by cross-validation: {chosen or '-'}); "
                         f"not used: {', '.join(unused)}")
        line = tta_line(records.kept_epoch(best))
        if line:
            lines.append(f"  {line}")
        mix = records.trial_mix(study, best.number)
        if mix is not None:
            lines.append(mix_summary(mix))
        lines.append(f"shipped: {out / 'best.pt'} ({shipped(out / 'best.pt')}); config: {out / 'best.yaml'}; "
                     f"all trials: {out / 'trials.csv'}")
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
            kind = ("stopped by fold racing (cannot win)" if why.startswith("fold racing") and records.CANNOT_WIN in why else
                    "stopped by fold racing (behind)" if why.startswith("fold racing") else
                    "stopped by the budget" if why.startswith("the time budget") else
                    "pruned by the pruner" if why.startswith("pruned after") else "pruned (diverged)")
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
    scored = (f"{e.metric} {e.value:.4f} (95 % interval {span(lo, hi)}) on images it was not chosen on, against "
              f"{mix['single']:.4f} for the single best trial (one standard error {mix['noise']:.4f})")
    if mix["shipped"]:
        return (f"  shipped an {describe_mix(mix)}: {scored}; prediction costs {mix['models']} forward passes per "
                f"image against {mix['single_models']} for the winner alone")
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
    return (f"tie-break: trial {top.number} scored highest ({top.value:.4f}); every trial within one standard error "
            f"of it ({records.Candidate.of(top).noise:.4f}) ties, and of those the lowest val_loss wins "
            f"({records.val_loss(best, math.nan):.4f} against {records.val_loss(top, math.nan):.4f}), then the "
            "cheaper, then the earlier")


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
