"""What a search leaves in studies/<study>/: best.pt (and its artifact), best.yaml and trials.csv.

best.pt is the winner's shipped model: the fold models its estimate validated (one ensemble), or as its
`final` says their weight average (`soup`) or that recipe retrained on every labelled image (`refit`), made
once the search ends. All writes
are atomic, so an interrupted run leaves the previous complete files.
"""

from __future__ import annotations

import csv
import io
import logging
import shlex
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial

from . import records
from .checkpoint import load_checkpoint, members, save_checkpoint
from .config import Config
from .dashboard import publish_estimates
from .exceptions import AutoftError
from .files import atomic_write_text, versions
from .cache import RunCache
from .finetune import Result, finetune, make_soup, refit, ship, shipped_kind
from .storage import attach_file

log = logging.getLogger("autoft")


class Exporter:
    """Writes best.pt when a trial becomes the winner, best.yaml and trials.csv after every trial, and at the
    end of a search makes best.pt the final winner's shipped model."""

    def __init__(self, out: Path, artifacts: str, cache: RunCache):
        self.out, self.artifacts, self.cache = out, artifacts, cache

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self.export(study)

    def export(self, study: optuna.Study, final: bool = False) -> FrozenTrial | None:
        """trials.csv, best.yaml and the dashboard's estimates; with `final`, first the winner's shipped best.pt
        (which may train)."""
        trials = study.get_trials(deepcopy=False)
        self.write_trials_csv(trials)
        best = records.best_trial(study)
        publish_estimates(study, trials, best)
        if best is None:
            return None
        if final:
            self.finalize(study, best)
        self.write_best_yaml(study, best)
        return best

    def export_weights(self, trial: optuna.Trial, cfg: Config, result: Result) -> None:
        """Called while the trial still runs (artifacts can only be attached then): its fold models, as validated."""
        if not records.is_new_best(trial.study, trial.number, result):
            return
        self._save(cfg, result, trial.number, trial.study.study_name, "ensemble", shipped_kind(result, result))
        records.record_weights(trial, attach_file(trial, self.out / "best.pt", "application/octet-stream", self.artifacts))

    def finalize(self, study: optuna.Study, best: FrozenTrial) -> None:
        """Make best.pt the winner's shipped model, as its `final` says. Its fold models were saved when it won,
        unless the winner changed afterwards (a later trial narrowed the ties): then they are trained again
        from its config, which reproduces them. `soup` averages the fold models' weights; `refit` retrains the
        recipe on every labelled image."""
        cfg = records.config(best)
        saved = self.saved()
        if saved == (study.study_name, best.number, cfg.final):
            return
        if cfg.final == "soup" and saved == (study.study_name, best.number, "ensemble"):
            ckpt = load_checkpoint(self.out / "best.pt")
            folds = members(ckpt)
            kind = f"soup (uniform weight average) of {len(folds)} fold models at epoch {ckpt['metrics'].get('epoch')}"
            adjustment = ckpt.get("logit_adjustment") or {}
            save_checkpoint(self.out / "best.pt", [make_soup(cfg, self.cache.dataset(cfg), folds, self.cache)],
                            ckpt["classes"], cfg, ckpt["metrics"] | {"final": "soup", "shipped": kind}, 0,
                            adjustment.get("tau", 0.0), adjustment.get("prior", ()), self.cache.dataset(cfg).fingerprint)
            return
        data = self.cache.dataset(cfg)
        if cfg.final == "refit":
            epochs = best.user_attrs[records.BEST_EPOCH]
            log.info("refit of trial %d on all %d labelled images for %d epoch(s)", best.number, len(data.labelled), epochs)
            self._save(cfg, refit(cfg, data, epochs, cache=self.cache, tau=records.kept_epoch(best).get("tau", 0.0)),
                       best.number, study.study_name, "refit", f"refit on every labelled image for {epochs} epoch(s)")
            return
        log.info("trial %d is the winner, but its fold models were not kept; training them again from its config",
                 best.number)
        result = finetune(cfg, data, cache=self.cache)
        shipped = ship(cfg, data, result, cache=self.cache)
        self._save(cfg, shipped, best.number, study.study_name, cfg.final if shipped is not result else "ensemble",
                   shipped_kind(result, shipped))

    def saved(self) -> tuple[str | None, int | None, str | None]:
        """(study, trial, final) of the model in best.pt, if there is one."""
        try:
            metrics = load_checkpoint(self.out / "best.pt")["metrics"]
        except AutoftError:
            return None, None, None
        return metrics.get("study"), metrics.get("trial"), metrics.get("final")

    def _save(self, cfg: Config, result: Result, trial: int, study: str, final: str, kind: str) -> None:
        metrics: dict[str, Any] = {**{k: v for k, v in result.best.items() if not isinstance(v, list)},
                                   "trial": trial, "study": study, "final": final, "shipped": kind}
        save_checkpoint(self.out / "best.pt", result.members, result.classes, cfg, metrics, result.shared_stages,
                        result.tau, result.prior, self.cache.dataset(cfg).fingerprint)  # loaded already: no work

    def write_best_yaml(self, study: optuna.Study, best: FrozenTrial) -> None:
        trials = study.get_trials(deepcopy=False)
        estimate = records.estimate(best)
        kept = records.kept_epoch(best)
        result = {"metric": records.study_metric(study),
                  "estimate": estimate.to_dict() if estimate else {"value": best.value},
                  "scores": {k: v for k, v in kept.items() if k.startswith("val_") and k != "val_loss"},
                  "tau": kept.get("tau", 0.0),
                  "val_loss": records.val_loss(best), "best_epoch": best.user_attrs.get(records.BEST_EPOCH),
                  "trial": best.number, "recipe": records.portfolio_name(best), "study": study.study_name,
                  "gain_over_portfolio": records.gain_over_portfolio(best, trials),
                  "weights_file": "best.pt", "versions": versions()}
        path = (self.out / "best.yaml").absolute()
        header = (f"# autoft search result: study {study.study_name!r}, {records.describe(best)}\n"
                  f"# reuse: autoft train --config {shlex.quote(str(path))}\n"
                  "# paths (data, weights) are stored absolute, so this file works from any folder\n")
        atomic_write_text(self.out / "best.yaml", header + records.config(best).portable().to_yaml(result))

    def write_trials_csv(self, trials: Sequence[FrozenTrial]) -> None:
        header, rows = records.trial_rows(trials)
        buf = io.StringIO()
        csv.writer(buf).writerows([header, *rows])
        atomic_write_text(self.out / "trials.csv", buf.getvalue())
