"""optuna-dashboard: `autoft dashboard` serves it on loopback by default; `publish_trial` makes each trial
readable there."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import optuna
from optuna.trial import FrozenTrial

from ..config import Config
from ..estimate import METRICS
from ..exceptions import ConfigError, one_line
from ..storage import DEFAULT_ARTIFACTS, artifact_store, attach_bytes, load_study, make_storage, mask_url
from ..system.files import check_writable_dir
from ..training.loop import score_key
from . import records
from .plots import estimates_figure, learning_curves_figure, learning_curves_png, points

log = logging.getLogger("autoft")
LEARNING_CURVES_ID = "learning-curves"  # the study page's figures, rewritten after every trial
ESTIMATES_ID = "estimates"


def serve(
    storage_url: str, study: str | None, host: str = "127.0.0.1", port: int = 8080, artifacts: str = DEFAULT_ARTIFACTS
) -> None:
    """Blocks until Ctrl-C or SIGTERM. Prints the URL of the study's page when the study exists.

    optuna-dashboard's WSGI app, served from a thread: the signal reaches the main thread, which only waits, so
    it always stops the server (raised inside a request, wsgiref would catch it and serve on)."""
    import signal
    import threading
    from wsgiref.simple_server import WSGIRequestHandler, make_server

    from optuna_dashboard import wsgi

    url = f"http://{host}:{port}/dashboard"
    if not Path(artifacts).is_dir():  # an existing one is only read (uploads aside): a read-only study can be viewed
        check_writable_dir(artifacts, "--artifacts")
    storage = make_storage(storage_url)
    names = optuna.get_all_study_names(storage)
    if study or len(names) < 2:  # the one study's page; a missing one is an error listing those there
        found = load_study(storage_url, study, opened=storage)
        url += f"/studies/{storage.get_study_id_from_name(found.study_name)}"
    else:  # several: the dashboard's list of them
        print(f"{len(names)} studies: {', '.join(names)}", flush=True)
    Path(artifacts).mkdir(parents=True, exist_ok=True)

    class Quiet(WSGIRequestHandler):
        def log_message(self, *args) -> None:  # one line per request is noise in a terminal
            pass

    try:
        server = make_server(host, port, wsgi(storage, artifact_store(artifacts)), handler_class=Quiet)
    except OSError as exc:
        raise ConfigError(f"cannot listen on {host}:{port} ({exc.strerror}); pick another --port") from None
    print(f"optuna-dashboard for {mask_url(storage_url)}: {url}  (Ctrl-C to stop)", flush=True)
    thread = threading.Thread(target=server.serve_forever, name="autoft-dashboard", daemon=True)
    old = signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM stops it as Ctrl-C does
    try:
        thread.start()  # inside the try: a Ctrl-C right after the first answer still stops it cleanly
        while thread.is_alive():
            thread.join(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, old)
        server.shutdown()
        server.server_close()


def publish_trial(
    trial: optuna.Trial,
    cfg: Config,
    history: Sequence[dict[str, float]],
    artifacts_dir: str | os.PathLike = DEFAULT_ARTIFACTS,
) -> None:
    """Make a finished (or pruned) trial readable on optuna-dashboard; never fails the trial.

    The trial page gets a note with the trial's config and its learning-curve PNG as an image artifact
    (optuna-dashboard draws plotly figures only per study); the study page gets one plotly figure with
    every trial's learning curve, rewritten in place.
    """
    try:
        _publish(trial, cfg, history, Path(artifacts_dir))
    except Exception as exc:  # the dashboard is a view; the trial's result matters more
        log.warning("trial %d: could not publish to the dashboard: %s", trial.number, one_line(exc))


def _publish(trial: optuna.Trial, cfg: Config, history: Sequence[dict[str, float]], artifacts: Path) -> None:
    from optuna_dashboard import save_note, save_plotly_graph_object

    if not history:
        save_note(trial, f"### Trial {trial.number}\n\nno epoch finished\n\n```yaml\n{cfg.to_yaml()}```\n")
        return
    score = records.metric_name(cfg.metric)
    best = max(history, key=lambda h: score_key(h, cfg.metric))
    summary = (
        f"best {score} {best[score]:.4f} at epoch {best['epoch']} of {len(history)} run ({cfg.epochs} planned); "
        + ", ".join(f"val_{m} {best[f'val_{m}']:.4f}" for m in METRICS if m != cfg.metric and f"val_{m}" in best)
        + (f"; logit adjustment tau {best['tau']:g}" if best.get("tau") else "")
    )
    estimate = records.estimate(trial)
    if estimate is not None:
        folds = " ".join(f"{a:.3f}" for a in estimate.fold_scores)
        summary += f"; estimate {estimate.describe()}" + (f"; per fold {folds}" if folds else "")
    if records.reason(trial):
        summary += f"; {records.reason(trial)}"
    png = learning_curves_png(history, f"trial {trial.number}: {summary}", cfg.metric)
    artifact_id = attach_bytes(trial, f"learning_curves_trial_{trial.number}.png", png, "image/png", artifacts)
    # the dashboard serves trial artifacts at this path, so the note shows the curve full size above the config
    study_id = trial.storage.get_study_id_from_name(trial.study.study_name)
    trial_id = trial.storage.get_trial_id_from_study_id_trial_number(study_id, trial.number)
    image = f"/artifacts/{study_id}/{trial_id}/{artifact_id}"
    save_note(
        trial, f"### Trial {trial.number}\n\n{summary}\n\n![learning curves]({image})\n\n```yaml\n{cfg.to_yaml()}```\n"
    )
    runs = {t.number: records.history(t) for t in trial.study.get_trials(deepcopy=False) if records.history(t)}
    runs[trial.number] = list(history)
    save_plotly_graph_object(
        trial.study,
        learning_curves_figure({f"trial {n}": runs[n] for n in sorted(runs)}, cfg.metric),
        graph_object_id=LEARNING_CURVES_ID,
    )


def publish_estimates(study: optuna.Study, trials: Sequence[FrozenTrial], winner: FrozenTrial | None) -> None:
    """The study page's figure of every completed trial's estimate and interval, winner ringed; redrawn once a
    trial has finished (a trial still publishing its own page is not complete yet). Never fails the study."""
    from optuna_dashboard import save_plotly_graph_object

    try:
        shown = points(trials, winner.number if winner else None)
        if shown:
            save_plotly_graph_object(
                study, estimates_figure(shown, records.study_metric(study)), graph_object_id=ESTIMATES_ID
            )
    except Exception as exc:  # the dashboard is a view
        log.warning("could not publish the estimates to the dashboard: %s", one_line(exc))
