"""`autoft search` and `autoft worker`: the Optuna study around the objective (objective.py).

Here: how the study runs (SearchOptions), its sampler and pruner, creating, resuming or joining it,
running it in this process or in workers, and the progress bar and summary.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import torch
from optuna.trial import FrozenTrial

from ..backbones import AUTO, JOIN, auto_backbones, build_model
from ..cache import RunCache, label_files
from ..config import Config, check_field, check_keys
from ..data.scan import Fingerprint, scan
from ..exceptions import AutoftError, ConfigError
from ..results import records
from ..results.exports import Exporter
from ..results.summary import print_summary
from ..space import SearchSpace, imbalanced
from ..storage import (
    DEFAULT_ARTIFACTS,
    DEFAULT_STORAGE,
    check_study_name,
    check_writable_storage,
    export_dir,
    in_memory,
    load_study,
    make_storage,
    mask_url,
)
from ..system import interrupts
from ..system.files import check_writable_dir
from . import workers
from .objective import Objective, trial_seed
from .progress import Progress
from .pruning import make_pruner, make_sampler

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
    timeout: float | None = _option(
        None,
        "time budget in seconds for the whole run, the final export included: a "
        "running trial stops at the fold or epoch that would end past it",
        lo=0,
        lo_open=True,
    )
    study: str = _option("autoft", "study name (letters, digits, '.', '_', '-'); an existing one is resumed")
    storage: str = _option(DEFAULT_STORAGE, "Optuna storage URL")
    space: str | None = _option(None, "YAML search space that fixes or reshapes parameters", metavar="FILE")
    sampler: str = _option("tpe", "sampler", choices=("tpe", "random", "cmaes", "gp"))
    pruner: str = _option(
        "sha",
        "pruner (Optuna's: successive halving, median, Hyperband) over every fold's epochs, "
        "never pruning a trial within noise of the leader",
        choices=("sha", "median", "hyperband", "none"),
    )
    out: str | None = _option(None, "export folder (default: studies/<study>)")
    artifacts: str = _option(DEFAULT_ARTIFACTS, "folder of the weights and learning curves the dashboard serves")
    min_epochs: int = _option(1, "never prune before this many steps (epochs of the first fold)", lo=1)
    startup_trials: int = _option(1, "never prune before this many trials finished", lo=0)
    progress: bool = True  # progress bar and summary; the Python API may turn them off
    started: float | None = None  # time.monotonic() when the command began: the budget counts from it (None: the call)
    workers: int = _option(1, "worker processes sharing the study: one per GPU, else a share of the CPU cores", lo=1)

    def settings(self) -> dict[str, Any]:
        """What a joining worker must share with this search (kept in the study's user attrs)."""
        return {
            "sampler": self.sampler,
            "pruner": self.pruner,
            "min_epochs": self.min_epochs,
            "startup_trials": self.startup_trials,
        }

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


def open_study(
    base: Config,
    opts: SearchOptions,
    space: SearchSpace,
    seed: int,
    images: int,
    data: Fingerprint | None = None,
    folds: int = 1,
    storage: optuna.storages.BaseStorage | None = None,
) -> optuna.Study:
    """Create or resume the study in `storage` (None: opened from `opts.storage`); a resumed study must have the same
    space, base config and data (`data`: its fingerprint, compared by content, so another spelling of the same folder
    resumes; `images`: one fold's validation images, of `folds`)."""
    storage = make_storage(opts.storage) if storage is None else storage
    try:
        existing = [s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False)]
    except Exception as exc:
        raise ConfigError(
            f"cannot read storage {mask_url(opts.storage)}: {mask_url(str(exc).splitlines()[0])[:300]}"
        ) from None
    n_before, replace = 0, False
    if opts.study in existing:
        old = optuna.load_study(study_name=opts.study, storage=storage)
        n_before = len(old.get_trials(deepcopy=False))
        try:
            records.check_same_meta(old, base, space, data)
        except ConfigError:  # a study none of whose trials finished has no results to keep comparable
            if records.finished_count(old.get_trials(deepcopy=False)):
                raise
            log.info(
                "study %r has no finished trial yet: its search space, base config and data are replaced by this run's",
                opts.study,
            )
            replace = True
    # Sampler seeded past the trials already run, so a resumed study samples new points, not the same ones again.
    study = optuna.create_study(
        storage=storage,
        study_name=opts.study,
        direction="maximize",
        load_if_exists=True,
        sampler=make_sampler(opts.sampler, trial_seed(seed, n_before)),
        pruner=make_pruner(opts.pruner, base.epochs, opts.min_epochs, opts.startup_trials, images, base.metric, folds),
    )
    if n_before == 0 or replace:
        records.write_study_meta(study, base, space, seed, data)
    elif data is not None:  # where the data is now (and, for a study from before fingerprints, what it is)
        records.record_data(study, base, data)
    return study


def run_search(
    base: Config, opts: SearchOptions, space: SearchSpace | None = None, fixed: Sequence[str] = ()
) -> optuna.Study:
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
    study = open_study(
        base,
        opts,
        space,
        base.seed,
        objective.validated_images() // objective.folds(),
        objective.dataset().fingerprint,
        objective.folds(),
        storage,
    )
    objective.say_folds()
    records.set_goal(study, opts.trials, opts.settings())
    records.record_class_counts(study, objective.dataset().class_counts)
    held = sorted(k for k in fixed if k in space.params and space.params[k].kind == "fixed")
    if held:
        log.info("not searched, as you set them: %s", ", ".join(f"{k}={space.params[k].value}" for k in held))
    return _run(study, storage, objective, opts, started, spawn=opts.workers > 1)


def join(
    storage: str,
    study: str,
    *,
    data: str | None = None,
    device: str = "auto",
    out: str | None = None,
    artifacts: str = DEFAULT_ARTIFACTS,
    threads: int | None = None,
    timeout: float | None = None,
    progress: bool = True,
    started: float | None = None,
) -> optuna.Study:
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
    opts = SearchOptions(
        study=study, storage=storage, out=out, artifacts=artifacts, timeout=timeout, progress=progress, **meta.settings
    )
    cache = RunCache()
    base, space = search_space(base.portable(), opts, meta.space)
    objective = _objective(base, opts, space, cache)
    records.check_same_data(found, base, objective.dataset().fingerprint)  # --data: the same images, elsewhere
    found.sampler = make_sampler(opts.sampler, None)  # seeded at random, so that workers sample different points
    found.pruner = make_pruner(
        opts.pruner,
        base.epochs,
        opts.min_epochs,
        opts.startup_trials,
        objective.validated_images() // objective.folds(),
        base.metric,
        objective.folds(),
    )
    objective.say_folds()
    return _run(found, opened, objective, opts, started, spawn=False, ship=False)


def check_outputs(opts: SearchOptions) -> None:
    """Every place a search writes, checked before it loads data or trains: the exports, the artifacts, the
    storage's file; a one-line error at once rather than a traceback after the first trial."""
    if opts.workers > 1 and in_memory(opts.storage):
        raise ConfigError(
            f"--workers {opts.workers} needs a storage that processes share; {mask_url(opts.storage)} is an "
            "in-memory database of this process (use sqlite:///FILE.db, journal:FILE or a server)"
        )
    check_writable_dir(opts.out_dir, "--out")
    check_writable_dir(opts.artifacts, "--artifacts")
    check_writable_storage(opts.storage)


def search_settings(
    base: Config, options: SearchOptions, typed: Mapping[str, Any], set_keys: Collection[str], where: str = ""
) -> tuple[Config, SearchOptions, list[str]]:
    """THE merge of a search's settings, for the command line and the Python API alike: `typed` (flags, or
    keywords: Config keys and SearchOptions fields, checked) over `base` and `options` (a config file's values and
    its `search:` block, or the objects passed in), the search's own defaults (SEARCH_DEFAULTS) for the Config keys
    nobody set (neither in `set_keys` nor typed), and the typed Config keys fixed: a search never overrules what
    was typed for this run. Returns (config, options, fixed keys)."""
    config_keys = {f.name for f in dataclasses.fields(Config)}
    option_keys = {f.name for f in dataclasses.fields(SearchOptions)}
    check_keys(typed, config_keys | option_keys, "setting", where=where)
    fixed = sorted(k for k in typed if k in config_keys)
    unset = {k: v for k, v in SEARCH_DEFAULTS.items() if k not in set(set_keys) | set(fixed)}
    config = base.replace(**{k: typed[k] for k in fixed}, **unset)
    return config, dataclasses.replace(options, **{k: v for k, v in typed.items() if k in option_keys}), fixed


def search_space(
    base: Config, opts: SearchOptions, space: SearchSpace | None = None, fixed: Sequence[str] = ()
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
        uneven = imbalanced(scan(base.data, label_files(base), say=False).fingerprint.labelled())
        return base, SearchSpace.from_yaml(opts.space, base, backbones, fixed, uneven)
    space.validate(base)
    return base, space


def _objective(base: Config, opts: SearchOptions, space: SearchSpace, cache: RunCache) -> Objective:
    """The objective, once what would fail every trial has been tried: a bad weights file or bad data stops
    here, before the study is touched."""
    if base.weights != "random":  # a bad file, or pretrained weights that cannot be downloaded (kept for the trials)
        build_model(base.backbone, 2, base.weights, pretrained=cache.pretrained_stages)
    objective = Objective(base, space, base.seed, Exporter(opts.out_dir, opts.artifacts, cache), cache)
    objective.racing = opts.pruner != "none"
    objective.dataset()
    return objective


def _run(
    study: optuna.Study,
    storage: optuna.storages.BaseStorage,
    objective: Objective,
    opts: SearchOptions,
    started: float,
    spawn: bool,
    ship: bool = True,
) -> optuna.Study:
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
    log.info(
        "study %r on %s: %d trial(s) to go, to %d finished; exports in %s",
        study.study_name,
        mask_url(opts.storage),
        todo,
        target,
        opts.out_dir,
    )
    exporter = objective.exporter
    ran = workers.Ran()  # this run's trials, for the progress bar and the summary
    progress = Progress(todo, study, ran, objective.folds()) if opts.progress and todo else None
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
                workers.spawn(
                    opts.workers,
                    opts.storage,
                    opts.study,
                    objective.base.device,
                    str(opts.out_dir),
                    opts.artifacts,
                    left if math.isfinite(left) else None,
                    progress=progress,
                    ran=ran,
                )
            elif todo:
                workers.work(
                    study,
                    storage,
                    objective,
                    [exporter] + ([progress] if progress else []),
                    lambda: objective.time_left(study) - objective.unit_seconds,
                    ran=ran,
                    before_trial=lambda s: records.enqueue_next(s, space, base),
                )
            finished = True
        finally:
            if progress:
                progress.close()
            t_export = time.monotonic()
            best = _export(study, exporter, final=finished and ship)
            if opts.progress:
                print_summary(
                    study,
                    best,
                    time.monotonic() - started,
                    opts.out_dir,
                    ran.trials(study),
                    time.monotonic() - t_export,
                    opts.timeout,
                )
    mine = ran.trials(study)
    if opts.timeout and todo and not any(t.state in records.FINISHED for t in mine):
        raise AutoftError(
            f"the --timeout budget of {opts.timeout:g} s bought no trial ({time.monotonic() - started:.0f} s "
            f"went to starting up and exporting); give a larger --timeout"
            + (" (the last trial ran out of time before its first epoch)" if mine else "")
        )
    return study


def _export(study: optuna.Study, exporter: Exporter, final: bool) -> FrozenTrial | None:
    """The exports; a signal in the final one leaves the previous files, and says how to complete it."""
    try:
        return exporter.export(study, final=final)
    except KeyboardInterrupt as exc:
        if not final:
            raise
        raise type(exc)(
            f"the final export was interrupted: {exporter.out} holds the previous best.pt, best.yaml and "
            f"trials.csv; `autoft search --study {study.study_name} --trials 0` (same storage) completes it "
            "without new trials"
        ) from None
