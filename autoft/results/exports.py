"""What a search leaves in studies/<study>/: best.pt, best.yaml and trials.csv, always of one decision.

best.pt is the winner's shipped model: the fold models its estimate validated (one ensemble), or as its
`final` says their weight average (`soup`) or that recipe retrained on every labelled image (`refit`), made
once the search ends; or, when it wins beyond noise, an ensemble of trials (choose_mix). While trials run (and
after an interrupted run) the export is *interim*: best.pt is the winner's validated fold models, as kept while
it ran. The three files are published together (files.atomic_paths): an interrupted export leaves the previous
three, a finished one the new three, and best.yaml says what best.pt holds and whether the export is final.
"""

from __future__ import annotations

import csv
import io
import logging
import shlex
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import torch
from optuna.trial import FrozenTrial, TrialState

from ..cache import RunCache
from ..config import Config
from ..estimate import Estimate, score
from ..exceptions import AutoftError
from ..storage import attach_bytes, read_artifact, remove_artifact
from ..system.files import atomic_paths, versions
from ..training import probe
from ..training.checkpoint import checkpoint, checkpoint_from_bytes, load_checkpoint
from ..training.finals import Weights, mixed_models, result_checkpoint, shipped_kind, shipped_model
from ..training.loop import Result
from . import records
from .dashboard import publish_estimates
from .selection import ensemble_selection, nested_predictions, wins_beyond_noise

log = logging.getLogger("autoft")
RESERVE_S = 15.0  # what writing the final exports takes, beside any training `final` asks for


class Exporter:
    """Keeps the kept set's validated models while trials run, and publishes best.pt, best.yaml and trials.csv
    after every trial, when a run starts (a missing best.pt rebuilt, a killed run's leftovers removed) and when it
    ends (`final`: the winner's shipped model)."""

    def __init__(self, out: Path, artifacts: str, cache: RunCache):
        self.out, self.artifacts, self.cache = out, artifacts, cache
        self._saved: tuple[tuple[int, int], dict[str, Any]] | None = None  # best.pt's (mtime_ns, size) and metrics

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self.export(study)

    def export(self, study: optuna.Study, final: bool = False) -> FrozenTrial | None:
        """Publish the three files for the study as it stands; with `final`, best.pt is the winner's shipped model
        (which may train: a refit, or a winner whose kept models are gone), else its validated fold models when
        they are kept. Returns the winner."""
        trials = study.get_trials(deepcopy=False)
        self.forget_weights(trials)
        best = records.best_trial(study)
        publish_estimates(study, trials, best)
        weights = None
        if best is not None:
            weights = self.shipped(study, best) if final else self.interim(study, best)
        self.publish(study, trials, best, weights, final)
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

    # --- the kept models ------------------------------------------------------------------------------------

    def keep_weights(self, trial: optuna.Trial, cfg: Config, result: Result) -> None:
        """Called while the trial still runs (artifacts can only be attached then): when it enters the kept set
        (records.kept_set), its validated fold models become an artifact. best.pt follows only once the trial has
        completed (`export`), so it never holds a trial that did not finish."""
        candidates, _ = records.with_running(trial.study, trial.number, result)
        if trial.number in records.kept_set(candidates):
            data = _serialize(
                result_checkpoint(
                    cfg,
                    self.cache.dataset(cfg),
                    result,
                    trial.number,
                    trial.study.study_name,
                    "ensemble",
                    shipped_kind(result, result),
                )
            )
            records.record_weights(
                trial,
                attach_bytes(
                    trial, f"weights_trial_{trial.number}.pt", data, "application/octet-stream", self.artifacts
                ),
            )

    def forget_weights(self, trials: Sequence[FrozenTrial]) -> None:
        """The artifact folder holds the kept set's models alone: those of completed trials that fell out of it,
        and of trials that ended otherwise (failed after keeping them, e.g. killed before completing), go."""
        kept = records.kept_set(
            [records.Candidate.of(t) for t in trials if t.state == TrialState.COMPLETE and t.value is not None]
        )
        for t in trials:
            artifact = records.weights_artifact(t)
            if artifact and t.state.is_finished() and not (t.state == TrialState.COMPLETE and t.number in kept):
                remove_artifact(artifact, self.artifacts)

    def kept_checkpoint(self, t: FrozenTrial) -> dict[str, Any] | None:
        """The trial's validated models as kept while it ran; None when none were kept (or they were deleted)."""
        data = self._kept_bytes(t)
        return None if data is None else checkpoint_from_bytes(data, f"the weights of trial {t.number}")

    def _kept_bytes(self, t: FrozenTrial) -> bytes | None:
        artifact = records.weights_artifact(t)
        return read_artifact(artifact, self.artifacts) if artifact else None

    # --- what best.pt holds ---------------------------------------------------------------------------------

    def interim(self, study: optuna.Study, best: FrozenTrial) -> Weights | None:
        """best.pt while trials run: the winner's validated fold models as kept; None to leave best.pt as it is
        (it holds them already, or they are gone: then the final export trains them again)."""
        if self.saved()[:2] == (study.study_name, best.number):
            return None
        return self._kept_bytes(best)

    def shipped(self, study: optuna.Study, best: FrozenTrial) -> Weights | None:
        """best.pt at the end: the winner's shipped model as its `final` says, from the models kept while trials
        ran, so what ships is what was validated, bit for bit, and nothing trains again (`soup` averages the fold
        models' weights and recomputes BatchNorm statistics; `refit` retrains the recipe on every labelled image, as
        it asks); or an ensemble of trials when it wins beyond noise. A winner whose kept models are gone (deleted,
        or another --artifacts folder) is the one case trained again, and said. None: best.pt holds it already."""
        mix = choose_mix(study, best, self.artifacts)
        if mix is not None:
            records.record_trial_mix(study, mix)
            if mix["shipped"]:
                return self._mix_checkpoint(study, best, mix)
        cfg = records.config(best)
        if self.saved() == (study.study_name, best.number, cfg.final):
            return None
        kept = None if cfg.final == "refit" else self._kept_bytes(best)
        if kept is None and cfg.final != "refit":
            log.warning(
                "the kept models of trial %d (the winner) are not in %s; training them again from its config",
                best.number,
                self.artifacts,
            )
        chosen = records.kept_epoch(best)
        return shipped_model(
            cfg,
            self.cache.dataset(cfg),
            kept,
            best.number,
            study.study_name,
            best.user_attrs[records.BEST_EPOCH],
            chosen.get("tau", 0.0),
            chosen.get("tta", "none"),
            self.cache,
        )

    def _mix_checkpoint(self, study: optuna.Study, best: FrozenTrial, mix: dict[str, Any]) -> dict[str, Any]:
        """The ensemble of trials `mix`: each member's validated models as kept while it ran, shipped as its `final`
        says (a soup averaged here), its models weighted by its share."""
        trials = {t.number: t for t in records.completed(study)}
        states, weights, shared, first = [], [], [], None
        for number, w in zip(mix["members"], mix["weights"]):
            cfg = records.config(trials[number])
            ckpt = self.kept_checkpoint(trials[number])
            if ckpt is None:  # kept by no run (an older autoft) or deleted by hand: the one case trained again
                log.warning(
                    "ensemble of trials: the kept models of trial %d are gone; training it again from its config",
                    number,
                )
            folds, ckpt = mixed_models(cfg, self.cache.dataset(cfg), ckpt, number, study.study_name, self.cache)
            states += folds
            weights += [w / len(folds)] * len(folds)
            shared.append(ckpt.get("shared_stages", 0))
            if first is None or number == best.number:
                first = ckpt
        metrics: dict[str, Any] = {
            **first["metrics"],
            "trial": best.number,
            "study": study.study_name,
            "final": "trials",
            "shipped": describe_mix(mix, len(states)),
            "trial_mix": {"members": mix["members"], "weights": mix["weights"]},
        }
        prior = (first.get("logit_adjustment") or {}).get("prior", ())
        return checkpoint(
            states,
            first["classes"],
            records.config(best),
            metrics,
            shared_prefix(states, max(shared)),
            mix["tau"],
            prior,
            self.cache.dataset(records.config(best)).fingerprint,
            weights,
            mix.get("tta", "none"),
        )

    def saved(self) -> tuple[str | None, int | None, str | None]:
        """(study, trial, final) of the model in best.pt, if there is one."""
        metrics = self.saved_metrics()
        return metrics.get("study"), metrics.get("trial"), metrics.get("final")

    def saved_metrics(self) -> dict[str, Any]:
        """The metrics best.pt carries ({} when there is none, or it is not a checkpoint); read again only when the
        file changed."""
        path = self.out / "best.pt"
        try:
            st = path.stat()
            stamp = (st.st_mtime_ns, st.st_size)
        except OSError:
            return {}
        if self._saved is None or self._saved[0] != stamp:
            try:
                metrics = load_checkpoint(path)["metrics"]
            except AutoftError:
                metrics = {}
            self._saved = stamp, metrics
        return self._saved[1]

    # --- the three files, together ---------------------------------------------------------------------------

    def publish(
        self,
        study: optuna.Study,
        trials: Sequence[FrozenTrial],
        best: FrozenTrial | None,
        weights: Weights | None,
        final: bool,
    ) -> None:
        """trials.csv, best.yaml (when there is a winner) and best.pt (when `weights` replace it) in one
        files.atomic_paths: all old or all new."""
        if weights is None:
            holds = self.saved_metrics()
            holds = holds if holds.get("study") == study.study_name else {}
        elif isinstance(weights, bytes):
            holds = checkpoint_from_bytes(weights, "best.pt")["metrics"]
        else:
            holds = weights["metrics"]
        files: dict[str, Any] = {"trials.csv": self.trials_csv(trials).encode()}
        if best is not None:
            files["best.yaml"] = self.best_yaml(study, best, holds, final).encode()
        if weights is not None:
            files["best.pt"] = weights
        with atomic_paths([self.out / name for name in files]) as temps:
            for tmp, content in zip(temps, files.values()):
                if isinstance(content, bytes):
                    tmp.write_bytes(content)
                else:
                    torch.save(content, tmp)

    def best_yaml(self, study: optuna.Study, best: FrozenTrial, holds: dict[str, Any], final: bool) -> str:
        """The winner's config, loadable by `autoft train --config`, with its result, what best.pt holds (`holds`:
        its checkpoint's metrics) and whether the export is final."""
        trials = study.get_trials(deepcopy=False)
        estimate = records.estimate(best)
        kept = records.kept_epoch(best)
        result = {
            "metric": records.study_metric(study),
            "estimate": estimate.to_dict() if estimate else {"value": best.value},
            "scores": {k: v for k, v in kept.items() if k.startswith("val_") and k != "val_loss"},
            "tau": kept.get("tau", 0.0),
            "val_loss": records.val_loss(best),
            "best_epoch": best.user_attrs.get(records.BEST_EPOCH),
            "trial": best.number,
            "recipe": records.portfolio_name(best),
            "study": study.study_name,
            "gain_over_portfolio": records.gain_over_portfolio(best, trials),
            "weights_file": "best.pt" if holds else None,
            "shipped": (
                f"trial {holds.get('trial')}: {holds.get('shipped', 'one model')}"
                if holds
                else "nothing yet: the final export trains the winner's models again"
            ),
            "export": "final" if final else "interim",
            "versions": versions(),
        }
        path = (self.out / "best.yaml").absolute()
        header = (
            f"# autoft search result: study {study.study_name!r}, {records.describe(best)}\n"
            f"# reuse: autoft train --config {shlex.quote(str(path))}\n"
            "# paths (data, weights) are stored absolute, so this file works from any folder\n"
        )
        if not final:
            header += (
                "# interim export (trials ran, or were interrupted): best.pt is the winner's validated fold "
                "models; the search's final export ships it as `final` says\n"
            )
        if probe.exact(records.history(best)):  # its head is fitted: the keys that shape training by epochs are moot
            header += (
                f"# an exact linear probe (its head fitted, C by cross-validation): {', '.join(probe.UNUSED)} unused\n"
            )
        return header + records.config(best).portable().to_yaml(result)

    @staticmethod
    def trials_csv(trials: Sequence[FrozenTrial]) -> str:
        header, rows = records.trial_rows(trials)
        buf = io.StringIO()
        csv.writer(buf).writerows([header, *rows])
        return buf.getvalue()


def _serialize(ckpt: dict[str, Any]) -> bytes:
    buf = io.BytesIO()
    torch.save(ckpt, buf)
    return buf.getvalue()


def mixable(t: FrozenTrial, winner: Config, tau: float, tta: str = "none") -> bool:
    """Whether trial `t` can join the winner's ensemble (`joins`) and kept out-of-fold probabilities."""
    if not t.user_attrs.get(records.OOF):
        return False
    kept = records.kept_epoch(t)
    return joins(records.config(t), kept.get("tau", 0.0), winner, tau, kept.get("tta", "none"), tta)


def joins(
    cfg: Config, tau: float, winner: Config, winner_tau: float, tta: str = "none", winner_tta: str = "none"
) -> bool:
    """THE rule for who can share an ensemble with the winner: one preprocessing (backbone, its weights, image size),
    one logit adjustment and one test-time augmentation, which predict and export apply to the whole model."""
    return (
        (cfg.backbone, cfg.weights, cfg.image_size) == (winner.backbone, winner.weights, winner.image_size)
        and tau == winner_tau
        and tta == winner_tta
    )


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
    trials = sorted(
        (t for t in done if mixable(t, winner, tau, tta) and t.number in kept),
        key=lambda t: (t.number != best.number, -t.value),
    )  # the winner first: it wins ties
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
    models = [
        1 if records.config(t).final != "ensemble" else (records.estimate(t) or Estimate(0, 1)).folds for t, _ in oofs
    ]
    kept = mix.members
    return {
        "winner": best.number,
        "members": [oofs[i][0].number for i in kept],
        "weights": [float(mix.weights[i]) for i in kept],
        "shipped": wins_beyond_noise(mix, nested, noise),
        "estimate": estimate.to_dict(),
        "single": nested[1],
        "noise": noise,
        "tau": tau,
        "tta": tta,
        "models": sum(models[i] for i in kept),
        "single_models": models[0],
    }


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
