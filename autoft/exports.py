"""What a search leaves in studies/<study>/: best.pt (and its artifact), best.yaml and trials.csv.

All writes are atomic, so an interrupted run leaves the previous complete files.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import optuna
from optuna.trial import FrozenTrial

from . import records
from .checkpoint import save_checkpoint
from .config import Config
from .files import atomic_write_text, versions
from .finetune import Result
from .storage import attach_file


class Exporter:
    """Writes best.pt when a trial beats the study's best, best.yaml and trials.csv after every trial."""

    def __init__(self, out: Path, artifacts: str):
        self.out, self.artifacts = out, artifacts

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self.export(study)

    def export(self, study: optuna.Study) -> FrozenTrial | None:
        self.write_trials_csv(study)
        best = records.best_trial(study)
        if best is not None:
            self.write_best_yaml(study, best)
        return best

    def export_weights(self, trial: optuna.Trial, cfg: Config, result: Result) -> None:
        """Called while the trial still runs (artifacts can only be attached then)."""
        if not records.is_new_best(trial.study, trial.number, result.best):
            return
        save_checkpoint(self.out / "best.pt", result.state_dict, result.classes, cfg,
                        {**result.best, "trial": trial.number, "study": trial.study.study_name})
        records.record_weights(trial, attach_file(trial, self.out / "best.pt", "application/octet-stream", self.artifacts))

    def write_best_yaml(self, study: optuna.Study, best: FrozenTrial) -> None:
        result = {"val_accuracy": best.value, "val_loss": records.val_loss(best),
                  "best_epoch": best.user_attrs.get(records.BEST_EPOCH), "trial": best.number, "study": study.study_name,
                  "weights_file": "best.pt", "versions": versions()}
        header = (f"# autoft search result: study {study.study_name!r}, trial {best.number}, val_accuracy {best.value:.4f}\n"
                  f"# reuse: autoft train --config {self.out / 'best.yaml'}\n")
        atomic_write_text(self.out / "best.yaml", header + records.config(best).to_yaml(result))

    def write_trials_csv(self, study: optuna.Study) -> None:
        header, rows = records.trial_rows(study.get_trials(deepcopy=False))
        buf = io.StringIO()
        csv.writer(buf).writerows([header, *rows])
        atomic_write_text(self.out / "trials.csv", buf.getvalue())
