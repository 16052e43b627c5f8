"""`autoft search`: an Optuna study in which every trial is one fine-tune, pruned when it falls behind.

The objective is a few lines (suggest, fine-tune, report + should_prune); everything else here is the
study around it: storage, sampler, pruner, warm start, per-trial records, exports and progress.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import signal
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import torch
from optuna.trial import FrozenTrial, TrialState

from ._private.io import atomic_write_text, versions
from ._private.storage import DEFAULT_STORAGE, make_storage, mask_url
from .backbones import build_model, get_backbone
from .checkpoint import save_checkpoint
from .config import Config
from .data import Dataset
from .exceptions import ConfigError, TrialFailure
from .finetune import Result, clear_caches, finetune, load_data, resolve_device
from .runs import config_yaml
from .space import SearchSpace

log = logging.getLogger("autoft")
SAMPLERS = ("tpe", "random", "cmaes", "gp")
PRUNERS = ("hyperband", "median", "none")


@dataclass
class SearchOptions:
    """How the study runs; what each trial trains is the base Config plus the sampled parameters."""

    trials: int = 10
    timeout: float | None = None
    study: str = "autoft"
    storage: str = DEFAULT_STORAGE
    space: str | None = None
    sampler: str = "tpe"
    pruner: str = "hyperband"
    out: str | None = None  # default: studies/<study>
    artifacts: str = "studies/artifacts"
    min_epochs: int = 1  # no pruning before this many epochs
    startup_trials: int = 3  # nor before this many trials have finished
    progress: bool = True
    workers: int = 1  # processes on this machine sharing the study through its storage

    def settings(self) -> dict[str, Any]:
        """What a joining worker must share with this search (kept in the study's user attrs)."""
        return {"sampler": self.sampler, "pruner": self.pruner, "min_epochs": self.min_epochs,
                "startup_trials": self.startup_trials}

    def __post_init__(self) -> None:
        if self.trials < 1:
            raise ConfigError(f"--trials must be at least 1, got {self.trials}")
        if self.sampler not in SAMPLERS:
            raise ConfigError(f"--sampler {self.sampler!r} is not one of {', '.join(SAMPLERS)}")
        if self.pruner not in PRUNERS:
            raise ConfigError(f"--pruner {self.pruner!r} is not one of {', '.join(PRUNERS)}")
        if not self.study or "/" in self.study:
            raise ConfigError(f"--study {self.study!r}: a study name must be non-empty and contain no '/'")
        if self.workers < 1:
            raise ConfigError(f"--workers must be at least 1, got {self.workers}")

    @property
    def out_dir(self) -> Path:
        return Path(self.out or Path("studies") / self.study)


def trial_seed(study_seed: int, number: int) -> int:
    """Each trial's seed derives from the study seed and the trial number: reruns reproduce."""
    return (study_seed * 1_000_003 + number * 7919 + 17) % 2**32


def best_trial(study: optuna.Study) -> FrozenTrial | None:
    """Best on validation accuracy, ties broken by the lower validation loss."""
    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if t.value is not None]
    if not done:
        return None
    return max(done, key=lambda t: (t.value, -t.user_attrs.get("val_loss", math.inf), -t.number))


class Objective:
    """Suggest, fine-tune, report; a new best's weights are exported before the trial is told."""

    def __init__(self, base: Config, space: SearchSpace, study_seed: int, min_epochs: int, exporter: "Exporter"):
        self.base, self.space, self.study_seed, self.min_epochs = base, space, study_seed, min_epochs
        self.exporter = exporter
        self._data: dict[int, Dataset] = {}

    def data(self, cfg: Config) -> Dataset:
        if cfg.image_size not in self._data:  # one decode per image size per process, reused by all trials
            self._data[cfg.image_size] = load_data(cfg)
        return self._data[cfg.image_size]

    def __call__(self, trial: optuna.Trial) -> float:
        cfg = self.space.suggest(trial, self.base).replace(seed=trial_seed(self.study_seed, trial.number))
        trial.set_user_attr("config", cfg.to_dict())
        history: list[dict[str, float]] = []

        def report(epoch: int, metrics: dict[str, float]) -> None:
            history.append(metrics)
            trial.set_user_attr("history", history)
            trial.report(metrics["val_accuracy"], epoch + 1)
            last = epoch + 1 == cfg.epochs  # its cost is paid: a finished trial is worth keeping, never pruned
            if not last and epoch + 1 >= self.min_epochs and trial.should_prune():
                raise optuna.TrialPruned(f"pruned after epoch {epoch + 1} at val_accuracy {metrics['val_accuracy']:.4f}")

        trial.set_user_attr("device", str(resolve_device(cfg.device)))
        try:
            result = self._run(trial, cfg, report)
        except TrialFailure as exc:  # a diverged trial is a bad region of the space: prune it, keep going
            trial.set_user_attr("fail_reason", str(exc))
            raise optuna.TrialPruned(str(exc)) from None
        except optuna.TrialPruned as exc:
            trial.set_user_attr("prune_reason", str(exc))
            from .report import publish_trial  # learning curve + config note on the dashboard (report imports study)
            publish_trial(trial, cfg, history, self.exporter.artifacts)
            raise
        trial.set_user_attr("val_loss", result.best["val_loss"])
        trial.set_user_attr("best_epoch", result.best["epoch"])
        trial.set_user_attr("wall_time_s", result.wall_time)
        trial.set_user_attr("images_per_s", sum(h["images_per_s"] for h in history) / len(history))
        trial.set_user_attr("peak_memory_mb", result.peak_memory_mb)
        self.exporter.export_weights(trial, cfg, result)
        from .report import publish_trial

        publish_trial(trial, cfg, history, self.exporter.artifacts)
        return result.best["val_accuracy"]

    def _run(self, trial: optuna.Trial, cfg: Config, report) -> Result:
        """One fine-tune; an out-of-memory error is retried once at half the batch size."""
        try:
            return finetune(cfg, self.data(cfg), report)
        except (torch.OutOfMemoryError, MemoryError) as exc:
            clear_caches()
            smaller = max(1, cfg.batch_size // 2)
            log.warning("trial %d ran out of memory at batch size %d; retrying at %d", trial.number, cfg.batch_size, smaller)
            trial.set_user_attr("oom_retry", f"{type(exc).__name__} at batch_size {cfg.batch_size}; retried at {smaller}")
            trial.set_user_attr("config", cfg.replace(batch_size=smaller).to_dict())
            try:
                return finetune(cfg.replace(batch_size=smaller), self.data(cfg), report)
            except (torch.OutOfMemoryError, MemoryError) as again:
                clear_caches()
                trial.set_user_attr("fail_reason", f"out of memory at batch size {smaller}: {str(again).splitlines()[0][:200]}")
                raise TrialFailure(f"out of memory at batch size {smaller}") from None


class Exporter:
    """Writes best.pt (and its artifact) when a trial beats the study's best, best.yaml and trials.csv after every trial.

    All writes are atomic, so an interrupted run leaves the previous complete files.
    """

    def __init__(self, out: Path, artifacts: str):
        self.out, self.artifacts = out, artifacts

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self.export(study)

    def export(self, study: optuna.Study) -> FrozenTrial | None:
        self.write_trials_csv(study)
        best = best_trial(study)
        if best is not None:
            self.write_best_yaml(study, best)
        return best

    def export_weights(self, trial: optuna.Trial, cfg: Config, result: Result) -> None:
        """Called while the trial still runs (artifacts can only be attached then)."""
        best = best_trial(trial.study)
        if best is not None and (best.value, -best.user_attrs.get("val_loss", math.inf)) >= \
                (result.best["val_accuracy"], -result.best["val_loss"]):
            return
        save_checkpoint(self.out / "best.pt", result.state_dict, result.classes, cfg,
                        {**result.best, "trial": trial.number, "study": trial.study.study_name})
        from optuna.artifacts import FileSystemArtifactStore, upload_artifact

        Path(self.artifacts).mkdir(parents=True, exist_ok=True)
        artifact_id = upload_artifact(artifact_store=FileSystemArtifactStore(self.artifacts), file_path=str(self.out / "best.pt"),
                                      study_or_trial=trial, mimetype="application/octet-stream")
        trial.set_user_attr("weights_artifact_id", artifact_id)

    def write_best_yaml(self, study: optuna.Study, best: FrozenTrial) -> None:
        cfg = Config.from_dict(best.user_attrs["config"])
        result = {"val_accuracy": best.value, "val_loss": best.user_attrs.get("val_loss"),
                  "best_epoch": best.user_attrs.get("best_epoch"), "trial": best.number, "study": study.study_name,
                  "weights_file": "best.pt", "versions": versions()}
        header = (f"# autoft search result: study {study.study_name!r}, trial {best.number}, val_accuracy {best.value:.4f}\n"
                  f"# reuse: autoft train --config {self.out / 'best.yaml'}\n")
        atomic_write_text(self.out / "best.yaml", header + config_yaml(cfg, result))

    def write_trials_csv(self, study: optuna.Study) -> None:
        trials = study.get_trials(deepcopy=False)
        params = sorted({k for t in trials for k in t.params})
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["number", "state", "val_accuracy", "val_loss", "epochs_run", "wall_time_s", "images_per_s", *params, "reason"])
        for t in trials:
            a = t.user_attrs
            w.writerow([t.number, t.state.name, t.value, a.get("val_loss"), len(a.get("history", [])),
                        a.get("wall_time_s"), a.get("images_per_s"), *[t.params.get(p) for p in params],
                        a.get("fail_reason") or a.get("prune_reason") or ""])
        atomic_write_text(self.out / "trials.csv", buf.getvalue())


def make_sampler(name: str, seed: int) -> optuna.samplers.BaseSampler:
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, n_startup_trials=5)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False)
    return optuna.samplers.GPSampler(seed=seed)


class _Guarded(optuna.pruners.BasePruner):
    """Never prune before `min_epochs` epochs or before `startup` trials have finished."""

    def __init__(self, inner: optuna.pruners.BasePruner, min_epochs: int, startup: int):
        self.inner, self.min_epochs, self.startup = inner, min_epochs, startup

    def prune(self, study: optuna.Study, trial: FrozenTrial) -> bool:
        step = trial.last_step
        if step is None or step < self.min_epochs:
            return False
        finished = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
        return len(finished) >= self.startup and self.inner.prune(study, trial)


def make_pruner(name: str, epochs: int, min_epochs: int, startup: int) -> optuna.pruners.BasePruner:
    if name == "none":
        return optuna.pruners.NopPruner()
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=startup, n_warmup_steps=min_epochs - 1)
    return _Guarded(optuna.pruners.HyperbandPruner(min_resource=1, max_resource=max(1, epochs), reduction_factor=3),
                    min_epochs, startup)


def open_study(base: Config, opts: SearchOptions, space: SearchSpace, seed: int) -> optuna.Study:
    """Create or resume the study; a resumed study must have the same space and base config."""
    storage = make_storage(opts.storage)
    try:
        existing = [s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False)]
    except Exception as exc:
        raise ConfigError(f"cannot read storage {mask_url(opts.storage)}: {mask_url(str(exc).splitlines()[0])[:300]}") from None
    fingerprint = {"space": space.to_dict(), "base": {k: v for k, v in base.to_dict().items() if k not in ("device", "seed")}}
    n_before = 0
    if opts.study in existing:
        old = optuna.load_study(study_name=opts.study, storage=storage)
        n_before = len(old.trials)
        for key, label in (("space", "search space"), ("base", "base config")):
            if key in old.user_attrs and old.user_attrs[key] != fingerprint[key]:
                diff = sorted(k for k in set(old.user_attrs[key]) | set(fingerprint[key])
                              if old.user_attrs[key].get(k) != fingerprint[key].get(k))
                raise ConfigError(f"study {opts.study!r} exists with a different {label} ({', '.join(diff)}); "
                                  "use a new --study name or the same settings")
    # Sampler seeded past the trials already run, so a resumed study samples new points, not the same ones again.
    study = optuna.create_study(storage=storage, study_name=opts.study, direction="maximize", load_if_exists=True,
                                sampler=make_sampler(opts.sampler, trial_seed(seed, n_before)),
                                pruner=make_pruner(opts.pruner, base.epochs, opts.min_epochs, opts.startup_trials))
    if n_before == 0:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names(["val_accuracy"])
        for key, value in fingerprint.items():
            study.set_user_attr(key, value)
        study.set_user_attr("seed", seed)
    # The hand recipe runs first, and again if its trial was interrupted or crashed before finishing.
    alive = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)
    if not any(t.user_attrs.get("hand_recipe") for t in study.get_trials(deepcopy=False, states=alive)):
        study.enqueue_trial(space.hand_recipe(), user_attrs={"hand_recipe": True})
    return study


class Terminated(KeyboardInterrupt):
    """SIGTERM, handled like Ctrl-C (so Optuna marks the running trial) but exiting 143."""


def run_search(base: Config, opts: SearchOptions, space: SearchSpace | None = None, join: bool = False) -> optuna.Study:
    """Run `opts.trials` more trials (resuming the study if it exists) and export the best.

    The study's goal becomes its finished trials now plus `opts.trials`, met exactly by this process or,
    with `opts.workers` > 1, by that many worker processes; `join` adds this process as one more worker
    to an existing study's goal instead (`autoft worker`).
    """
    from . import workers

    spec = get_backbone(base.backbone)
    if space is None:
        space = SearchSpace.from_yaml(opts.space, spec.num_stages, base.epochs)
    else:
        space.validate(spec.num_stages, base.epochs)
    if base.weights not in (None, "random"):
        build_model(base.backbone, 2, base.weights)  # a bad weights file stops here, before the study is touched
    exporter = Exporter(opts.out_dir, opts.artifacts)
    objective = Objective(base, space, base.seed, opts.min_epochs, exporter)
    objective.data(base)  # bad data stops here, before any trial exists
    if join:  # settings come from the study itself; the sampler is seeded at random so workers differ
        study = optuna.load_study(study_name=opts.study, storage=make_storage(opts.storage),
                                  sampler=make_sampler(opts.sampler, None),
                                  pruner=make_pruner(opts.pruner, base.epochs, opts.min_epochs, opts.startup_trials))
        target = study.user_attrs["target"]
    else:
        study = open_study(base, opts, space, base.seed)
        target = workers.set_goal(study, opts.trials, opts.settings())
    todo = max(0, target - workers.finished_count(study.get_trials(deepcopy=False)))
    log.info("study %r on %s: %d trial(s) to go, to %d finished; exports in %s", study.study_name, mask_url(opts.storage),
             todo, target, opts.out_dir)
    progress = _Progress(todo, study) if opts.progress else None
    callbacks = [exporter] + ([progress] if progress else [])
    old_term = signal.signal(signal.SIGTERM, _raise_terminated) if _main_thread() else None
    t0 = time.perf_counter()
    try:
        if opts.workers > 1 and not join:
            workers.spawn(opts.workers, opts.storage, opts.study, base.device, str(opts.out_dir), opts.artifacts,
                          opts.timeout, progress=progress)
        else:
            workers.work(study, objective, callbacks, opts.timeout)
    finally:
        if progress:
            progress.close()
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)
        best = exporter.export(study)
        if opts.progress:
            print_summary(study, best, time.perf_counter() - t0, opts.out_dir)
    return study


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _raise_terminated(signum, frame):
    raise Terminated()


class _Progress:
    """A bar with finished trials i/N, best so far and pruned/failed counts, redrawn from the storage."""

    def __init__(self, total: int, study: optuna.Study):
        from tqdm.auto import tqdm

        self.study = study
        self.bar = tqdm(total=total, desc="trials", unit="trial", dynamic_ncols=True)
        self.n0 = self._counts()

    def _counts(self) -> dict[TrialState, int]:
        trials = self.study.get_trials(deepcopy=False)
        return {s: sum(t.state == s for t in trials) for s in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)}

    def __call__(self, study: optuna.Study | None = None, trial: FrozenTrial | None = None) -> None:
        """An Optuna callback, and what `--workers` polls while the trials finish in other processes."""
        best = best_trial(self.study)
        counts = {s: n - self.n0[s] for s, n in self._counts().items()}
        self.bar.set_postfix_str(f"best={best.value:.4f} (#{best.number})" if best else "best=-", refresh=False)
        self.bar.set_description(f"trials (pruned {counts[TrialState.PRUNED]}, failed {counts[TrialState.FAIL]})")
        self.bar.n = counts[TrialState.COMPLETE] + counts[TrialState.PRUNED]
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()


def print_summary(study: optuna.Study, best: FrozenTrial | None, seconds: float, out: Path) -> None:
    trials = study.get_trials(deepcopy=False)
    count = {s.name.lower(): sum(t.state == s for t in trials) for s in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)}
    hand = next((t for t in trials if t.user_attrs.get("hand_recipe")), None)
    lines = [f"study {study.study_name}: {len(trials)} trials ({count['complete']} complete, {count['pruned']} pruned, "
             f"{count['fail']} failed) in {seconds:.1f} s this run"]
    if best is not None:
        lines.append(f"best: trial {best.number}, val_accuracy {best.value:.4f}, val_loss {best.user_attrs.get('val_loss', float('nan')):.4f}")
        if hand is not None and hand.state == TrialState.COMPLETE:
            lines.append(f"hand recipe (trial {hand.number}): val_accuracy {hand.value:.4f}")
        width = max(len(k) for k in best.params) if best.params else 0
        lines += [f"  {k:<{width}}  {_fmt(v)}" for k, v in best.params.items()]
        lines.append(f"exported: {out / 'best.yaml'}, {out / 'best.pt'}, {out / 'trials.csv'}")
    print("\n".join(lines), flush=True)


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)
