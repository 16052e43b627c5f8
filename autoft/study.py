"""`autoft search` and `autoft worker`: the Optuna study around the objective (objective.py).

Here: how the study runs (SearchOptions), its sampler and pruner, creating, resuming or joining it,
running it in this process or in workers, and the progress bar and summary.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import torch
from optuna.trial import FrozenTrial, TrialState

from . import records, workers
from .backbones import build_model, get_backbone
from .config import Config, check_field
from .exceptions import ConfigError, Terminated
from .exports import Exporter
from .files import check_writable_dir
from .objective import Objective, trial_seed
from .space import SearchSpace
from .storage import (DEFAULT_ARTIFACTS, DEFAULT_STORAGE, check_study_name, check_writable_storage, export_dir, load_study,
                      make_storage, mask_url)

log = logging.getLogger("autoft")


def _option(default: Any, help: str, **more: Any) -> Any:
    return field(default=default, metadata={"help": help, **more})


@dataclass
class SearchOptions:
    """How the study runs; what each trial trains is the base Config plus the sampled parameters.

    Each field with a `help` is an `autoft search` flag too (cli.add_flags), its choices checked here.
    """

    trials: int = _option(10, "trials to add to the study", lo=1)
    timeout: float | None = _option(None, "stop starting trials after this many seconds", lo=0, lo_open=True)
    study: str = _option("autoft", "study name (letters, digits, '.', '_', '-'); an existing one is resumed")
    storage: str = _option(DEFAULT_STORAGE, "Optuna storage URL")
    space: str | None = _option(None, "YAML search space that fixes or reshapes parameters", metavar="FILE")
    sampler: str = _option("tpe", "sampler", choices=("tpe", "random", "cmaes", "gp"))
    pruner: str = _option("hyperband", "pruner", choices=("hyperband", "median", "none"))
    out: str | None = _option(None, "export folder (default: studies/<study>)")
    artifacts: str = _option(DEFAULT_ARTIFACTS, "folder of the weights and learning curves the dashboard serves")
    min_epochs: int = _option(1, "never prune before this many epochs", lo=1)
    startup_trials: int = _option(3, "never prune before this many trials finished", lo=0)
    progress: bool = True  # progress bar and summary; the Python API may turn them off
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
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, n_startup_trials=5)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False)
    return optuna.samplers.GPSampler(seed=seed)


class _Guarded(optuna.pruners.BasePruner):
    """Never prune before `min_epochs` epochs or before `startup` trials have finished: around every pruner."""

    def __init__(self, inner: optuna.pruners.BasePruner, min_epochs: int, startup: int):
        self.inner, self.min_epochs, self.startup = inner, min_epochs, startup

    def prune(self, study: optuna.Study, trial: FrozenTrial) -> bool:
        workers.check_stopped()  # asked every epoch: a SIGTERM that landed where Python drops exceptions stops here
        step = trial.last_step
        if step is None or step < self.min_epochs:
            return False
        finished = study.get_trials(deepcopy=False, states=records.FINISHED)
        return len(finished) >= self.startup and self.inner.prune(study, trial)


def make_pruner(name: str, epochs: int, min_epochs: int, startup: int) -> optuna.pruners.BasePruner:
    if name == "none":
        inner = optuna.pruners.NopPruner()
    elif name == "median":
        inner = optuna.pruners.MedianPruner(n_startup_trials=startup)  # its median needs that many completed trials
    else:
        inner = optuna.pruners.HyperbandPruner(min_resource=1, max_resource=max(1, epochs), reduction_factor=3)
    return _Guarded(inner, min_epochs, startup)


def open_study(base: Config, opts: SearchOptions, space: SearchSpace, seed: int) -> optuna.Study:
    """Create or resume the study; a resumed study must have the same space and base config."""
    storage = make_storage(opts.storage)
    try:
        existing = [s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False)]
    except Exception as exc:
        raise ConfigError(f"cannot read storage {mask_url(opts.storage)}: {mask_url(str(exc).splitlines()[0])[:300]}") from None
    n_before, replace = 0, False
    if opts.study in existing:
        old = optuna.load_study(study_name=opts.study, storage=storage)
        n_before = len(old.get_trials(deepcopy=False))
        try:
            records.check_same_meta(old, base, space)
        except ConfigError:  # a study none of whose trials finished has no results to keep comparable
            if records.finished_count(old.get_trials(deepcopy=False)):
                raise
            log.info("study %r has no finished trial yet: its search space and base config are replaced by this run's",
                     opts.study)
            replace = True
    # Sampler seeded past the trials already run, so a resumed study samples new points, not the same ones again.
    study = optuna.create_study(storage=storage, study_name=opts.study, direction="maximize", load_if_exists=True,
                                sampler=make_sampler(opts.sampler, trial_seed(seed, n_before)),
                                pruner=make_pruner(opts.pruner, base.epochs, opts.min_epochs, opts.startup_trials))
    if n_before == 0 or replace:
        records.write_study_meta(study, base, space, seed)
    records.enqueue_hand_recipe(study, space.hand_recipe())
    return study


def run_search(base: Config, opts: SearchOptions, space: SearchSpace | None = None) -> optuna.Study:
    """Run `opts.trials` more trials (resuming the study if it exists) and export the best.

    The study's goal becomes its finished trials now plus `opts.trials`, met exactly by this process or,
    with `opts.workers` > 1, by that many worker processes.
    """
    check_outputs(opts)
    space = _checked_space(base, opts, space)
    objective = _objective(base, opts, space)
    study = open_study(base, opts, space, base.seed)
    records.set_goal(study, opts.trials, opts.settings())
    return _run(study, objective, opts, spawn=opts.workers > 1)


def join(storage: str, study: str, *, data: str | None = None, device: str = "auto", out: str | None = None,
         artifacts: str = DEFAULT_ARTIFACTS, threads: int | None = None, timeout: float | None = None,
         progress: bool = True) -> optuna.Study:
    """`autoft worker`: one more worker on an existing study, until its goal is met, with the settings it recorded."""
    if threads:
        torch.set_num_threads(threads)
    check_outputs(SearchOptions(study=study, storage=storage, out=out, artifacts=artifacts, timeout=timeout))
    found = load_study(storage, study)
    meta = records.read_study_meta(found)
    base = meta.base.replace(device=device, **({"data": data} if data else {}))
    opts = SearchOptions(study=study, storage=storage, out=out, artifacts=artifacts, timeout=timeout, progress=progress,
                         **meta.settings)
    objective = _objective(base, opts, _checked_space(base, opts, meta.space))
    found.sampler = make_sampler(opts.sampler, None)  # seeded at random, so that workers sample different points
    found.pruner = make_pruner(opts.pruner, base.epochs, opts.min_epochs, opts.startup_trials)
    return _run(found, objective, opts, spawn=False)


def check_outputs(opts: SearchOptions) -> None:
    """Every place a search writes, checked before it loads data or trains: the exports, the artifacts, the
    storage's file; a one-line error at once rather than a traceback after the first trial."""
    check_writable_dir(opts.out_dir, "--out")
    check_writable_dir(opts.artifacts, "--artifacts")
    check_writable_storage(opts.storage)


def _checked_space(base: Config, opts: SearchOptions, space: SearchSpace | None) -> SearchSpace:
    spec = get_backbone(base.backbone)
    if space is None:
        return SearchSpace.from_yaml(opts.space, spec.num_stages, base.epochs)
    space.validate(spec.num_stages, base.epochs)
    return space


def _objective(base: Config, opts: SearchOptions, space: SearchSpace) -> Objective:
    """The objective, once what would fail every trial has been tried: a bad weights file or bad data stops
    here, before the study is touched."""
    if base.weights != "random":  # a bad file, or pretrained weights that cannot be downloaded (kept for the trials)
        build_model(base.backbone, 2, base.weights)
    objective = Objective(base, space, base.seed, Exporter(opts.out_dir, opts.artifacts))
    objective.data(base)
    return objective


def _run(study: optuna.Study, objective: Objective, opts: SearchOptions, spawn: bool) -> optuna.Study:
    """Trials until the study's goal is met, here or in `opts.workers` spawned processes; then the exports."""
    target = records.goal(study)
    todo = max(0, target - records.finished_count(study.get_trials(deepcopy=False)))
    log.info("study %r on %s: %d trial(s) to go, to %d finished; exports in %s", study.study_name, mask_url(opts.storage),
             todo, target, opts.out_dir)
    exporter = objective.exporter
    ran = workers.Ran()  # this run's trials, for the progress bar and the summary
    progress = _Progress(todo, study, ran) if opts.progress else None
    on_main_thread = threading.current_thread() is threading.main_thread()
    workers.clear_stopped()
    old_term = signal.signal(signal.SIGTERM, _raise_terminated) if on_main_thread else None
    t0 = time.perf_counter()
    try:
        if spawn:
            workers.spawn(opts.workers, opts.storage, opts.study, objective.base.device, str(opts.out_dir), opts.artifacts,
                          opts.timeout, progress=progress, ran=ran)
        else:
            workers.work(study, objective, [exporter] + ([progress] if progress else []), opts.timeout, ran=ran)
    finally:
        if progress:
            progress.close()
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)
        best = exporter.export(study)
        if opts.progress:
            print_summary(study, best, time.perf_counter() - t0, opts.out_dir, ran)
    return study


def _raise_terminated(signum, frame):
    workers.stop(Terminated)


class _Progress:
    """A bar with finished trials i/N, best so far and pruned/failed counts, redrawn from the storage."""

    def __init__(self, total: int, study: optuna.Study, ran: workers.Ran):
        from tqdm.auto import tqdm

        self.study, self.ran = study, ran
        self.bar = tqdm(total=total, desc="trials", unit="trial", dynamic_ncols=True)

    def __call__(self, study: optuna.Study | None = None, trial: FrozenTrial | None = None) -> None:
        """An Optuna callback, and what `--workers` polls while the trials finish in other processes."""
        best = records.best_trial(self.study)
        new = records.state_counts(self.ran.trials(self.study))  # this run's, not other runs' on the same study
        self.bar.set_postfix_str(f"best={best.value:.4f} (#{best.number})" if best else "best=-", refresh=False)
        self.bar.set_description(f"trials (pruned {new[TrialState.PRUNED]}, failed {new[TrialState.FAIL]})")
        self.bar.n = new[TrialState.COMPLETE] + new[TrialState.PRUNED]
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()


def print_summary(study: optuna.Study, best: FrozenTrial | None, seconds: float, out: Path, ran: workers.Ran) -> None:
    trials = study.get_trials(deepcopy=False)
    count = records.state_counts(ran.trials(study))
    done = count[TrialState.COMPLETE] + count[TrialState.PRUNED] + count[TrialState.FAIL]
    lines = [f"study {study.study_name}: {done} trials this run ({count[TrialState.COMPLETE]} complete, "
             f"{count[TrialState.PRUNED]} pruned, {count[TrialState.FAIL]} failed) in {seconds:.1f} s; "
             f"{len(trials)} in the study"]
    if best is not None:
        lines.append(f"best: {records.describe(best)}")
        hand = records.hand_recipe_result(trials)
        if hand is not None:
            lines.append(f"hand recipe (trial {hand.number}): val_accuracy {hand.value:.4f}")
        width = max(len(k) for k in best.params) if best.params else 0
        lines += [f"  {k:<{width}}  {records.fmt(v)}" for k, v in best.params.items()]
        lines.append(f"exported: {out / 'best.yaml'}, {out / 'best.pt'}, {out / 'trials.csv'}")
    print("\n".join(lines), flush=True)
