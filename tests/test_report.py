"""The report (HTML + PNGs) of a study built with ask/tell, and what each trial publishes to the dashboard."""

from __future__ import annotations

import io
import json
import math
import re
import wsgiref.util
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import optuna
import pytest
from conftest import make_image_folder
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from PIL import Image

from autoft.backbones import build_model
from autoft.cli import main
from autoft.config import Config
from autoft.exceptions import AutoftError
from autoft.results.dashboard import ESTIMATES_ID, LEARNING_CURVES_ID, publish_trial
from autoft.results.plots import PNG_SIZE
from autoft.results.report import write_report
from autoft.storage import make_storage
from autoft.training.checkpoint import save_checkpoint

STORAGE = "sqlite:///studies/autoft.db"
DISTRIBUTIONS = {
    "freeze_depth": IntDistribution(0, 3),
    "head_lr": FloatDistribution(1e-4, 1.0, log=True),
    "base_lr": FloatDistribution(1e-5, 1e-1, log=True),
    "optimizer": CategoricalDistribution(["adam", "sgd"]),
}
PLOTS = {
    "optimization_history",
    "param_importances",
    "parallel_coordinate",
    "intermediate_values",
    "slice",
    "learning_curves",
    "confusion_val",
    "confusion_test",
    "estimates",
}


def _history(acc: float, epochs: int) -> list[dict[str, float]]:
    return [
        {
            "epoch": e,
            "train_loss": 1.2 - acc * e / 3,
            "val_loss": 1.3 - acc * e / 3,
            "val_accuracy": acc * e / 3,
            "images_per_s": 100.0,
        }
        for e in range(1, epochs + 1)
    ]


def fake_study(name: str, data: Path, n: int, best_pt: Path | None) -> optuna.Study:
    """A search told by hand: accuracy peaks at head_lr 1e-2, every third trial is pruned after one epoch."""
    study = optuna.create_study(storage=make_storage(STORAGE), study_name=name, direction="maximize")
    study.set_metric_names(["val_accuracy"])
    study.set_user_attr("seed", 0)
    for i in range(n):
        trial = study.ask(DISTRIBUTIONS)
        acc = 0.5 + 0.45 * math.exp(-abs(math.log10(trial.params["head_lr"]) + 2))
        pruned = i % 3 == 2
        history = _history(acc, 1 if pruned else 3)
        for h in history:
            trial.report(h["val_accuracy"], h["epoch"])
        cfg = Config(data=str(data), backbone="tiny_cnn", image_size=32, device="cpu", **trial.params)
        score = history[-1]["val_accuracy"]
        for key, value in {
            "config": cfg.to_dict(),
            "history": history,
            "val_loss": history[-1]["val_loss"],
            "wall_time_s": 1.5,
            "train_seconds": 1.0 + i,
            "estimate": {"accuracy": score, "images": 36, "fold_accuracy": [score] * 5},
        }.items():
            trial.set_user_attr(key, value)
        if i == 0:
            trial.set_user_attr("portfolio", "linear_probe")
        if pruned:
            trial.set_user_attr("prune_reason", "pruned after epoch 1")
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        else:
            study.tell(trial, history[-1]["val_accuracy"])
    if best_pt is not None:
        net, _ = build_model("tiny_cnn", 2, weights="random")
        save_checkpoint(
            best_pt, [net.state_dict()], ["cat", "dog"], Config.from_dict(study.best_trial.user_attrs["config"])
        )
    return study


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """One `autoft report` run on an 8-trial study whose data has val/ and test/ (reports take seconds)."""
    root = tmp_path_factory.mktemp("report")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.setenv("AUTOFT_CACHE", str(root / "cache"))
        data = make_image_folder(root / "data", splits=("train", "val", "test"))
        (root / "studies" / "s").mkdir(parents=True)
        fake_study("s", data, 8, root / "studies" / "s" / "best.pt")
        return write_report("s", STORAGE), root


@pytest.mark.slow
def test_report_writes_every_plot_as_a_png_of_the_expected_size(report):
    rep, root = report
    assert rep.html == Path("studies/s/report.html") and (root / rep.html).stat().st_size > 0
    assert rep.skipped == {}
    assert set(rep.pngs) == PLOTS
    for name, png in rep.pngs.items():
        with Image.open(root / png) as im:
            assert im.format == "PNG" and im.size == PNG_SIZE, name
            pixels = np.asarray(im.convert("L"), dtype=float)
        assert pixels.std() > 5, f"{name}.png is blank"
    assert rep.evaluations["test"]["n"] == 12 and rep.evaluations["val"]["confusion_matrix"]
    text = (root / rep.html).read_text(encoding="utf-8")  # 5-fold CV: the shipped fold models trained on val/ too
    assert "it trained on them, so this is no estimate" in text and rep.evaluations["val"]["seen_in_training"]
    assert not rep.evaluations["test"]["seen_in_training"]


class _Refs(HTMLParser):
    def __init__(self):
        super().__init__()
        self.refs: list[tuple[str, str, str]] = []
        self.tags: set[str] = set()

    def handle_starttag(self, tag, attrs):
        self.tags.add(tag)
        self.refs += [(tag, k, v or "") for k, v in attrs if k in ("src", "href", "data", "action", "srcset", "poster")]


def test_report_html_loads_nothing_from_the_network(report):
    rep, root = report
    text = (root / rep.html).read_text(encoding="utf-8")
    parser = _Refs()
    parser.feed(text)
    assert parser.refs, "expected image data and PNG links"
    for tag, attr, value in parser.refs:
        assert value.startswith("data:") or (attr == "href" and (root / rep.html).with_name(value).is_file()), (
            tag,
            attr,
            value[:80],
        )
    assert "link" not in parser.tags and "iframe" not in parser.tags
    assert "url(http" not in text and "@import" not in text
    assert "Plotly.newPlot" in text and len(text) > 3_000_000  # plotly.js inlined, figures drawn by it
    assert "backbone: tiny_cnn" in text and "pruned after epoch 1" in text


def test_report_of_a_small_study_says_what_it_left_out(tmp_path, monkeypatch, capsys):
    """One finished trial: fANOVA has nothing to compare and there is no best.pt; the rest is still written."""
    monkeypatch.chdir(tmp_path)
    fake_study("small", make_image_folder(tmp_path / "data"), 1, None)
    assert main(["report", "--study", "small", "--out", "out"]) == 0
    out = capsys.readouterr().out
    assert "param_importances: left out (1 finished trial(s); importances need at least 4)" in out
    assert "confusion_val: left out (no best.pt in out" in out
    assert (
        "optimization_history: out/optimization_history.png" in out
        and "learning_curves: out/learning_curves.png" in out
    )
    assert out.rstrip().endswith("wrote out/report.html")
    assert "not drawn" in (tmp_path / "out" / "report.html").read_text(encoding="utf-8")


def test_report_needs_a_finished_trial(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    optuna.create_study(storage=make_storage(STORAGE), study_name="empty")
    with pytest.raises(AutoftError, match="no completed trial"):
        write_report("empty", STORAGE)
    assert main(["report", "--study", "nope"]) == 2


def _dashboard_get(storage, path: str, artifacts: Path | None = None) -> bytes:
    """GET on optuna-dashboard's own WSGI app: what its pages show."""
    from optuna.artifacts import FileSystemArtifactStore
    from optuna_dashboard import wsgi

    environ: dict = {"PATH_INFO": path, "REQUEST_METHOD": "GET"}
    wsgiref.util.setup_testing_defaults(environ)
    status: list[str] = []
    app = wsgi(storage, artifact_store=FileSystemArtifactStore(str(artifacts)) if artifacts else None)
    body = b"".join(app(environ, lambda s, h, exc_info=None: status.append(s)))
    assert status[0].startswith("200"), (path, status)
    return body


def _study_page(study: optuna.Study) -> dict:
    return json.loads(_dashboard_get(study._storage, f"/api/studies/{study._study_id}"))


def test_publish_trial_puts_curve_config_and_figure_on_the_dashboard(tmp_path):
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'db.sqlite'}")
    study = optuna.create_study(storage=storage, study_name="d", direction="maximize")
    for acc in (0.7, 0.9):
        trial = study.ask(DISTRIBUTIONS)
        cfg = Config(backbone="tiny_cnn", image_size=32, **trial.params)
        history = _history(acc, 3)
        trial.set_user_attr("history", history)
        publish_trial(trial, cfg, history, tmp_path / "artifacts")
        study.tell(trial, acc)

    detail = _study_page(study)
    for t in detail["trials"]:
        note = t["note"]["body"]
        assert "backbone: tiny_cnn" in note and f"### Trial {t['number']}" in note
        (png,) = [a for a in t["artifacts"] if a["mimetype"] == "image/png"]
        assert png["filename"] == f"learning_curves_trial_{t['number']}.png"
        url = f"/artifacts/{study._study_id}/{t['trial_id']}/{png['artifact_id']}"
        assert f"![learning curves]({url})" in note  # the note shows the curve, served by the dashboard
        with Image.open(io.BytesIO(_dashboard_get(storage, url, tmp_path / "artifacts"))) as im:
            assert im.size == PNG_SIZE
    (figure,) = [g for g in detail["plotly_graph_objects"] if g["id"] == LEARNING_CURVES_ID]
    names = {trace["name"] for trace in json.loads(figure["graph_object"])["data"]}
    assert {"trial 0 val_accuracy", "trial 1 val_accuracy", "trial 1 val_loss"} <= names


def test_publish_trial_never_fails_the_trial(tmp_path, caplog):
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'db.sqlite'}")
    trial = study.ask()
    (tmp_path / "artifacts").write_text("a file where the artifact folder should be")
    publish_trial(trial, Config(backbone="tiny_cnn"), _history(0.8, 2), tmp_path / "artifacts")
    assert "could not publish" in caplog.text


@pytest.mark.slow
def test_search_publishes_each_trial(tiny_config, tmp_path, monkeypatch):
    """The hook in the objective: finished and pruned trials both get their note and learning curve."""
    from autoft.study.run import SearchOptions, run_search

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(optuna.trial.Trial, "should_prune", lambda self: self.number == 1)
    study = run_search(tiny_config.replace(epochs=2), SearchOptions(trials=3, study="p", progress=False, pruner="none"))
    assert [t.state.name for t in study.trials] == ["COMPLETE", "PRUNED", "COMPLETE"]
    detail = _study_page(study)
    assert len(detail["trials"]) == 3
    for t in detail["trials"]:
        assert "```yaml" in t["note"]["body"]
        assert ("pruned after fold" in t["note"]["body"]) == (t["state"] == "Pruned")
        assert any(a["mimetype"] == "image/png" for a in t["artifacts"])
    assert {g["id"] for g in detail["plotly_graph_objects"]} == {LEARNING_CURVES_ID, ESTIMATES_ID}
    (figure,) = [g for g in detail["plotly_graph_objects"] if g["id"] == ESTIMATES_ID]
    shown = {
        re.split(r" \(|:", text)[0] for trace in json.loads(figure["graph_object"])["data"] for text in trace["text"]
    }
    assert shown == {"trial 0", "trial 2"}  # every completed trial, the last one too
