"""What a search leaves in studies/<study>/: best.pt (and its artifact), best.yaml and trials.csv.

best.pt is the winner's shipped model: the fold models its estimate validated (one ensemble), or as its
`final` says their weight average (`soup`) or that recipe retrained on every labelled image (`refit`), made
once the search ends; or, when it wins beyond noise, an ensemble of trials (choose_mix). All writes
are atomic, so an interrupted run leaves the previous complete files.
"""

from __future__ import annotations

import csv
import io
import logging
import shlex
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import torch
from optuna.trial import FrozenTrial

from . import probe, records
from .checkpoint import checkpoint, checkpoint_from_bytes, load_checkpoint, members, save_checkpoint
from .config import Config
from .dashboard import publish_estimates
from .estimate import Estimate, score
from .exceptions import AutoftError
from .files import atomic_torch_save, atomic_write_bytes, atomic_write_text, versions
from .cache import RunCache
from .finetune import Result, finetune, make_soup, refit, ship, shipped_kind
from .selection import ensemble_selection, nested_predictions, wins_beyond_noise
from .storage import attach_file, has_artifact, read_artifact, remove_artifact

log = logging.getLogger("autoft")
RESERVE_S = 15.0  # what writing the final exports takes, beside any training `final` asks for


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

    def reserve(self, study: optuna.Study) -> float:
        """Seconds the final export is expected to take, which the trials leave to it: writing the files, and the
        work `final` asks of the winner so far (a refit trains on every image: about its fold models' training time
        over folds - 1; a soup recomputes BatchNorm statistics: about one epoch of one fold)."""
        best = records.best_trial(study)
        if best is None:
            return RESERVE_S
        cfg, seconds = records.config(best), best.user_attrs.get(records.TRAIN_SECONDS, 0.0)
        folds = max(1, (records.estimate(best) or Estimate(0, 1)).folds)
        if cfg.final == "refit":
            return RESERVE_S + seconds / max(1, folds - 1)
        if cfg.final == "soup":
            return RESERVE_S + seconds / (folds * max(1, len(records.history(best))))
        return RESERVE_S

    def keep_weights(self, trial: optuna.Trial, cfg: Config, result: Result) -> None:
        """Called while the trial still runs (artifacts can only be attached then): when it enters the kept set
        (records.kept_set), its validated fold models become an artifact, and best.pt when it is the new winner;
        trials that fell out of the set lose theirs, so the artifact folder holds the kept set's models alone."""
        candidates, me = records.with_running(trial.study, trial.number, result)
        kept = records.kept_set(candidates)
        if trial.number in kept:
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / f"weights_trial_{trial.number}.pt"
                self._save(cfg, result, trial.number, trial.study.study_name, "ensemble", shipped_kind(result, result),
                           path)
                records.record_weights(trial, attach_file(trial, path, "application/octet-stream", self.artifacts))
                if records.select(candidates) is me:
                    atomic_write_bytes(self.out / "best.pt", path.read_bytes())
        for t in records.completed(trial.study):
            if t.number not in kept and records.weights_artifact(t):
                remove_artifact(records.weights_artifact(t), self.artifacts)

    def kept_checkpoint(self, t: FrozenTrial) -> dict[str, Any] | None:
        """The trial's validated models as kept while it ran; None when none were kept (or they were deleted)."""
        artifact = records.weights_artifact(t)
        if not artifact or not has_artifact(artifact, self.artifacts):
            return None
        return checkpoint_from_bytes(read_artifact(artifact, self.artifacts), f"the weights of trial {t.number}")

    def finalize(self, study: optuna.Study, best: FrozenTrial) -> None:
        """Make best.pt the winner's shipped model, as its `final` says, from the models kept while trials ran:
        what ships is what was validated, bit for bit, and nothing trains again (`soup` averages the fold models'
        weights and recomputes BatchNorm statistics; `refit` retrains the recipe on every labelled image, as it
        asks). A winner whose kept models are gone (deleted by hand) is the one case trained again, and said."""
        mix = choose_mix(study, best, self.artifacts)
        if mix is not None:
            records.record_trial_mix(study, mix)
            if mix["shipped"]:
                self._ship_mix(study, best, mix)
                return
        cfg = records.config(best)
        saved = self.saved()
        if saved == (study.study_name, best.number, cfg.final):
            return
        data = self.cache.dataset(cfg)
        if cfg.final == "refit":
            epochs = best.user_attrs[records.BEST_EPOCH]
            log.info("refit of trial %d on all %d labelled images for %d epoch(s)", best.number, len(data.labelled), epochs)
            kept = records.kept_epoch(best)
            self._save(cfg, refit(cfg, data, epochs, cache=self.cache, tau=kept.get("tau", 0.0),
                                  tta=kept.get("tta", "none")),
                       best.number, study.study_name, "refit", f"refit on every labelled image for {epochs} epoch(s)")
            return
        ckpt = self.kept_checkpoint(best)
        if ckpt is None:
            log.warning("the kept models of trial %d (the winner) are gone from %s; training them again from its config",
                        best.number, self.artifacts)
            result = finetune(cfg, data, cache=self.cache)
            shipped = ship(cfg, data, result, cache=self.cache)
            self._save(cfg, shipped, best.number, study.study_name, cfg.final if shipped is not result else "ensemble",
                       shipped_kind(result, shipped))
            return
        folds = members(ckpt)
        adjustment = ckpt.get("logit_adjustment") or {}
        if cfg.final == "soup" and len(folds) > 1:
            kind = f"soup (uniform weight average) of {len(folds)} fold models at epoch {ckpt['metrics'].get('epoch')}"
            folds = [make_soup(cfg, data, folds, self.cache)]
            metrics = ckpt["metrics"] | {"final": "soup", "shipped": kind}
        else:
            metrics = ckpt["metrics"]
        save_checkpoint(self.out / "best.pt", folds, ckpt["classes"], cfg, metrics,
                        ckpt.get("shared_stages", 0) if len(folds) > 1 else 0, adjustment.get("tau", 0.0),
                        adjustment.get("prior", ()), data.fingerprint, tta=ckpt.get("tta", "none"))

    def _ship_mix(self, study: optuna.Study, best: FrozenTrial, mix: dict[str, Any]) -> None:
        """best.pt as the ensemble of trials `mix`: each member's validated models as kept while it ran, shipped as its
        `final` says (a soup averaged here), its models weighted by its share."""
        trials = {t.number: t for t in records.completed(study)}
        states, weights, shared, first = [], [], [], None
        for number, w in zip(mix["members"], mix["weights"]):
            cfg = records.config(trials[number])
            ckpt = self.kept_checkpoint(trials[number])
            if ckpt is None:  # kept by no run (an older autoft) or deleted by hand: the one case trained again
                log.warning("ensemble of trials: the kept models of trial %d are gone; training it again from its "
                            "config", number)
                result = finetune(cfg, self.cache.dataset(cfg), cache=self.cache)
                ckpt = self._checkpoint(cfg, result, number, study.study_name, "ensemble", shipped_kind(result, result))
            folds = members(ckpt)
            if cfg.final == "soup" and len(folds) > 1:
                folds = [make_soup(cfg, self.cache.dataset(cfg), folds, self.cache)]
            states += folds
            weights += [w / len(folds)] * len(folds)
            shared.append(ckpt.get("shared_stages", 0))
            if first is None or number == best.number:
                first = ckpt
        metrics: dict[str, Any] = {**first["metrics"], "trial": best.number, "study": study.study_name, "final": "trials",
                                   "shipped": describe_mix(mix, len(states)),
                                   "trial_mix": {"members": mix["members"], "weights": mix["weights"]}}
        prior = (first.get("logit_adjustment") or {}).get("prior", ())
        save_checkpoint(self.out / "best.pt", states, first["classes"], records.config(best), metrics,
                        shared_prefix(states, max(shared)), mix["tau"], prior,
                        self.cache.dataset(records.config(best)).fingerprint, weights, mix.get("tta", "none"))

    def saved(self) -> tuple[str | None, int | None, str | None]:
        """(study, trial, final) of the model in best.pt, if there is one."""
        try:
            metrics = load_checkpoint(self.out / "best.pt")["metrics"]
        except AutoftError:
            return None, None, None
        return metrics.get("study"), metrics.get("trial"), metrics.get("final")

    def _checkpoint(self, cfg: Config, result: Result, trial: int, study: str, final: str, kind: str) -> dict[str, Any]:
        metrics: dict[str, Any] = {**{k: v for k, v in result.best.items() if not isinstance(v, list)},
                                   "trial": trial, "study": study, "final": final, "shipped": kind}
        return checkpoint(result.members, result.classes, cfg, metrics, result.shared_stages, result.tau, result.prior,
                          self.cache.dataset(cfg).fingerprint, tta=result.tta)  # loaded already: no work

    def _save(self, cfg: Config, result: Result, trial: int, study: str, final: str, kind: str,
              path: Path | None = None) -> None:
        atomic_torch_save(path or self.out / "best.pt", self._checkpoint(cfg, result, trial, study, final, kind))

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
        if probe.exact(records.history(best)):  # its head is fitted: the keys that shape training by epochs are moot
            header += (f"# an exact linear probe (its head fitted, C by cross-validation): {', '.join(probe.UNUSED)} "
                       "unused\n")
        atomic_write_text(self.out / "best.yaml", header + records.config(best).portable().to_yaml(result))

    def write_trials_csv(self, trials: Sequence[FrozenTrial]) -> None:
        header, rows = records.trial_rows(trials)
        buf = io.StringIO()
        csv.writer(buf).writerows([header, *rows])
        atomic_write_text(self.out / "trials.csv", buf.getvalue())


def mixable(t: FrozenTrial, winner: Config, tau: float, tta: str = "none") -> bool:
    """Whether trial `t` can join the winner's ensemble: one preprocessing (backbone, its weights, image size), one
    logit adjustment and one test-time augmentation, which predict and export apply to the whole model; and
    out-of-fold probabilities kept."""
    if not t.user_attrs.get(records.OOF):
        return False
    cfg, kept = records.config(t), records.kept_epoch(t)
    return ((cfg.backbone, cfg.weights, cfg.image_size) == (winner.backbone, winner.weights, winner.image_size)
            and kept.get("tau", 0.0) == tau and kept.get("tta", "none") == tta)


def choose_mix(study: optuna.Study, best: FrozenTrial, artifacts: str) -> dict[str, Any] | None:
    """The ensemble of trials (selection.ensemble_selection on their out-of-fold probabilities, by the study's
    metric) among the completed trials that can join the winner (`mixable`) and whose models are kept
    (records.kept_set: the others' were deleted as the search ran), and whether it ships: only when it beats the
    single best trial by more than the winner's standard error on images it was not chosen on
    (selection.nested_predictions). None when fewer than two trials kept out-of-fold probabilities.

    Returns {"winner", "members" (trial numbers), "weights", "shipped", "estimate" (Estimate.to_dict of the mix's
    nested predictions), "single" (the single best's nested score), "noise", "tau", "tta", "models" and "single_models"
    (forward passes per image, shared frozen stages aside)}."""
    winner, kept_epoch = records.config(best), records.kept_epoch(best)
    tau, tta = kept_epoch.get("tau", 0.0), kept_epoch.get("tta", "none")
    done = records.completed(study)
    kept = records.kept_set([records.Candidate.of(t) for t in done])
    trials = sorted((t for t in done if mixable(t, winner, tau, tta) and t.number in kept),
                    key=lambda t: (t.number != best.number, -t.value))  # the winner first: it wins ties
    oofs = [(t, o) for t in trials if (o := records.load_oof(t, artifacts)) is not None]
    if not oofs or oofs[0][0].number != best.number:
        return None
    oofs = [(t, o) for t, o in oofs if np.array_equal(o.labels, oofs[0][1].labels)]  # the same images, in order
    if len(oofs) < 2:
        return None
    metric = records.study_metric(study)
    first = oofs[0][1]
    seen = np.logical_and.reduce([o.fold >= 0 for _, o in oofs])
    labels, classes = first.labels[seen], first.probabilities.shape[1]
    # predict adjusts the mix's log probabilities by -tau * log(prior): the same argmax as each candidate's
    # probabilities times prior ** -tau, averaged
    scale = np.maximum(first.prior, 1e-12) ** -tau
    probs = np.stack([o.probabilities[seen] * scale for _, o in oofs])

    def measure(y: np.ndarray, pred: np.ndarray) -> float:
        return score(metric, y, pred, classes)

    mix = ensemble_selection(probs, labels, measure)
    mixed, single = nested_predictions(probs, labels, measure)
    estimate = Estimate.measure(metric, labels, mixed, classes)
    noise = (records.estimate(best) or Estimate.measure(metric, labels, single, classes)).noise
    nested = (estimate.value, measure(labels, single))
    models = [1 if records.config(t).final != "ensemble" else (records.estimate(t) or Estimate(0, 1)).folds
              for t, _ in oofs]
    kept = mix.members
    return {"winner": best.number, "members": [oofs[i][0].number for i in kept],
            "weights": [float(mix.weights[i]) for i in kept], "shipped": wins_beyond_noise(mix, nested, noise),
            "estimate": estimate.to_dict(), "single": nested[1], "noise": noise, "tau": tau, "tta": tta,
            "models": sum(models[i] for i in kept), "single_models": models[0]}


def describe_mix(mix: dict[str, Any], models: int | None = None) -> str:
    """`ensemble of trials 3 (0.6), 5 (0.4): 10 models`, for checkpoints and summaries."""
    parts = ", ".join(f"{n} ({w:.2f})" for n, w in zip(mix["members"], mix["weights"]))
    return f"ensemble of trials {parts}: {mix['models'] if models is None else models} models"


def shared_prefix(states: Sequence[dict[str, torch.Tensor]], most: int) -> int:
    """How many first stages (at most `most`) hold the same tensors in every member: those an Ensemble runs once.
    Trials share their frozen pretrained stages; with random weights or another freeze depth they may not."""
    for i in range(most):
        keys = [k for k in states[0] if k.startswith(f"stages.{i}.")]
        if not all(k in s and torch.equal(s[k], states[0][k]) for s in states[1:] for k in keys):
            return i
    return most
