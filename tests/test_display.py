"""What people read while and after a search runs: progress within an epoch, the summary's tie-break and time
per state, the listing of studies, the version, and the small plots and messages of one- or two-trial studies."""

from __future__ import annotations

import datetime
import sys

import optuna
import pytest
import torch
import yaml
from conftest import make_image_folder
from optuna.distributions import FloatDistribution, IntDistribution
from optuna.trial import FrozenTrial, TrialState
from test_report import STORAGE, fake_study

from autoft.backbones import get_backbone
from autoft.cli import main
from autoft.estimate import Estimate, span
from autoft.exceptions import AutoftError, ConfigError
from autoft.results import records
from autoft.results.summary import print_summary, tie_break, time_per_state
from autoft.storage import load_study, make_storage
from autoft.study.progress import Progress
from autoft.study.workers import Ran
from autoft.training.probe import CHOSEN_C, EXACT


class _Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _running(study: optuna.Study, cfg) -> optuna.Trial:
    trial = study.ask()
    records.record_config(trial, cfg)
    return trial


def test_progress_within_a_slow_fine_tune_shows_batches_rate_and_its_own_eta(tiny_config):
    """A fine-tune of 3 epochs x 2 folds, 10 batches a pass, 2 s a batch: the ETA is this trial's, not a mean
    over trials, and a finished exact probe (seconds) does not make the study look nearly done."""
    study = optuna.create_study(direction="maximize")
    ran, clock = Ran(), _Clock()
    probe_cfg = tiny_config.replace(freeze_depth=get_backbone("tiny_cnn").num_stages, aug_strength=0.0)
    probe_trial = _running(study, probe_cfg)
    ran.numbers.add(probe_trial.number)
    progress = Progress(4, study, ran, folds=2, clock=clock, live=True)
    for done in range(1, 4):  # the probe's one feature pass
        progress.batch(probe_trial.number, done, 10, 500.0)
        clock.now += 0.2
    assert "trial 0 exact probe: features batch 3/10 500 img/s ETA 00:01" in progress.bar.postfix
    probe_trial.set_user_attr(records.HISTORY, [{"epoch": 1, EXACT: True}])
    study.tell(probe_trial, 0.8)
    progress(study, study.trials[0])

    trial = _running(study, tiny_config)  # epochs 3, no frozen stages: trained by epochs
    ran.numbers.add(trial.number)
    for done in range(1, 6):
        progress.batch(trial.number, done, 10, 4.0)
        clock.now += 2.0
    text = progress.bar.postfix  # drawn at the 5th batch: 4 batches timed since the first, 2 s each
    # left: 5 batches of this pass + 5 more passes of 10, at 2 s = 110 s; the study: 2 more trials of 8 + 110 s
    assert "trial 1 fold 1/2 epoch 1/3 batch 5/10 4 img/s ETA 01:50 (study ~05:46)" in text, text
    for done in (10, 1, 2):  # the next epoch begins
        clock.now += 2.0
        progress.batch(trial.number, done, 10, 4.0)
    assert "trial 1 fold 1/2 epoch 2/3 batch 2/10" in progress.bar.postfix
    progress.epoch(trial.number, 3, {"epoch": 1, "val_accuracy": 0.75})
    clock.now += 2.0
    progress.batch(trial.number, 3, 10, 4.0)
    assert progress.bar.postfix.endswith("; val_accuracy 0.750 at epoch 1")
    progress.close()


def test_progress_redraws_many_batches_a_second_at_tqdms_pace(tiny_config):
    study = optuna.create_study(direction="maximize")
    clock = _Clock()
    progress = Progress(1, study, Ran(), clock=clock, live=True)
    trial = _running(study, tiny_config)
    progress.batch(trial.number, 1, 100, 900.0)
    first = progress.bar.postfix
    clock.now += 0.001
    progress.batch(trial.number, 2, 100, 900.0)
    assert progress.bar.postfix == first  # a millisecond later: not redrawn
    clock.now += 1.0
    progress.batch(trial.number, 3, 100, 900.0)
    assert "batch 3/100" in progress.bar.postfix
    progress.close()


def _trial(number: int, value: float | None, state=TrialState.COMPLETE, seconds: float = 1.0, **attrs) -> FrozenTrial:
    start = datetime.datetime(2026, 1, 1)
    return FrozenTrial(
        number=number,
        state=state,
        value=value,
        values=None,
        datetime_start=start,
        datetime_complete=start + datetime.timedelta(seconds=seconds),
        params=attrs.pop("params", {}),
        distributions=attrs.pop("distributions", {}),
        user_attrs=attrs,
        system_attrs={},
        intermediate_values={},
        trial_id=number,
    )


def test_time_per_state_counts_pruned_and_failed_trials_too():
    trials = [
        _trial(0, 0.8, seconds=30),
        _trial(1, 0.9, seconds=25),
        _trial(2, None, TrialState.PRUNED, 1000),
        _trial(3, None, TrialState.PRUNED, 60),
        _trial(4, None, TrialState.FAIL, 5),
    ]
    assert time_per_state(trials) == "1,120 s (55 s in 2 complete, 1,060 s in 2 pruned, 5 s in 1 failed)"
    assert time_per_state([]) == "0 s"


def test_summary_of_a_tie_break_winner_says_why_and_marks_the_probes_unused_keys(tmp_path, capsys, tiny_config):
    """After a resume the probe (0.8529) wins over a recipe at 0.8647 by the one-standard-error rule: the summary
    says so in one line, its negative gain comes with the reason, and the probe's rates are marked unused."""
    study = optuna.create_study(direction="maximize")
    space = {"head_lr": FloatDistribution(1e-4, 1.0, log=True), "freeze_depth": IntDistribution(0, 5)}
    common = {"distributions": space}
    probe_cfg = tiny_config.replace(freeze_depth=5, head_lr=0.01)
    study.add_trial(
        _trial(
            0,
            0.8529,
            params={"head_lr": 0.01, "freeze_depth": 5},
            **common,
            config=probe_cfg.to_dict(),
            portfolio="linear_probe",
            val_loss=0.40,
            estimate=Estimate(0.8529, 340).to_dict(),
            history=[{"epoch": 1, EXACT: True, CHOSEN_C: [0.1, 0.3]}],
            best_epoch=1,
        )
    )
    study.add_trial(
        _trial(
            1,
            0.8647,
            params={"head_lr": 0.002, "freeze_depth": 0},
            **common,
            config=tiny_config.to_dict(),
            portfolio="hand_recipe",
            val_loss=0.52,
            estimate=Estimate(0.8647, 340).to_dict(),
            history=[{"epoch": 1}],
        )
    )
    best = records.best_trial(study)
    assert best.number == 0
    print_summary(study, best, 1.0, tmp_path, [])
    out = capsys.readouterr().out
    lines = out.splitlines()
    tie = next(line for line in lines if "tie-break" in line)
    assert "trial 1 scored highest (0.8647)" in tie and "within one standard error of it (0.0185)" in tie
    assert "lowest val_loss wins (0.4000 against 0.5200)" in tie
    gain = next(line for line in lines if "gain over" in line)
    assert gain.endswith("-0.0118 (below it, within one standard error: the tie-break above)")
    assert not any(line.split() and line.split()[0] == "head_lr" for line in lines)
    assert "an exact probe: its head is fitted (C per fold by cross-validation: 0.1, 0.3); not used: head_lr" in out
    assert tie_break(study.trials[1], study.trials) is None  # the top trial needs no explanation


def test_best_yaml_of_an_exact_probe_says_which_keys_it_does_not_use(tmp_path, tiny_config):
    from autoft.cache import RunCache
    from autoft.results.exports import Exporter

    study = optuna.create_study(direction="maximize")
    study.add_trial(
        _trial(
            0,
            0.85,
            config=tiny_config.replace(freeze_depth=5).to_dict(),
            val_loss=0.4,
            history=[{"epoch": 1, EXACT: True}],
            best_epoch=1,
        )
    )
    text = Exporter(tmp_path, tmp_path / "artifacts", RunCache()).best_yaml(study, study.trials[0], {}, final=True)
    assert "# an exact linear probe (its head fitted, C by cross-validation): epochs, head_only_epochs, head_lr" in text
    assert yaml.safe_load(text)["head_lr"] == tiny_config.head_lr  # still a config `autoft train` reads back


def test_bare_best_and_report_use_the_storages_only_study_and_list_several(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    data = make_image_folder(tmp_path / "data")
    fake_study("mine", data, 1, None)
    assert main(["best"]) == 0
    assert capsys.readouterr().out.startswith("# study mine, trial 0")
    from autoft.results.report import write_report

    rep = write_report(None, STORAGE, "out")
    assert rep.skipped["parallel_coordinate"].startswith("one completed trial")
    html = (tmp_path / "out" / "report.html").read_text(encoding="utf-8")
    assert "<div class=wide><table class=trials>" in html and ".wide{overflow-x:auto}" in html
    assert "time in trials" in html and "in finished trials" not in html
    fake_study("other", data, 1, None)
    assert main(["best"]) == 2
    err = capsys.readouterr().err
    assert "2 studies in sqlite:///studies/autoft.db: mine, other; pick one with --study NAME" in err
    with pytest.raises(ConfigError, match="no study named 'nope' in .*; it holds mine, other"):
        load_study(STORAGE, "nope")
    assert main(["dashboard", "--study", "nope"]) == 2


def test_an_empty_storage_says_to_search_first(tmp_path):
    url = f"sqlite:///{tmp_path}/empty.db"
    make_storage(url)
    with pytest.raises(ConfigError, match="^no study in .*; run autoft search first$"):
        load_study(url)


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == "autoft 0.1.0"


def test_a_zero_width_interval_says_so():
    perfect = Estimate(1.0, 12, metric="balanced_accuracy", boot=(1.0, 1.0, 0.0))
    assert "1.000-1.000" not in perfect.describe()
    assert "1.000, of zero width: every bootstrap resample scored the same" in perfect.describe()
    assert span(0.821, 0.878) == "0.821-0.878" and span(0.99961, 0.99999) == "0.99961-0.99999"


def test_plots_of_one_trial_keep_the_score_axis_near_0_1():
    from autoft.results.plots import Point, estimates_figure, learning_curves_figure, score_range

    fig = learning_curves_figure({"trial 0": [{"epoch": 1, "val_loss": 0.1, "val_accuracy": 1.0}]})
    low, high = fig.layout.yaxis2.range
    assert 0.9 < low < 1.0 <= high <= 1.01
    one = estimates_figure([Point(0, 0.8529411764705882, 0.81, 0.89, 3.0, "tiny_cnn", True)])
    assert one.layout.yaxis.range[1] <= 1.01 and one.layout.yaxis.range[0] >= 0.7
    assert one.data[0].text[0] == "trial 0 (winner): 0.8529 (0.810-0.890), 3 s"  # the hover, rounded
    assert score_range([None]) is None and score_range([0.0, 1.0]) == (0.0, 1.05)


def test_onnx_hint_names_the_extra(monkeypatch, tmp_path):
    from autoft.results.predict import _export_onnx

    monkeypatch.setitem(sys.modules, "onnx", None)  # not installed
    with pytest.raises(AutoftError, match=r"pip install 'autoft\[onnx\]'"):
        _export_onnx(torch.nn.Identity(), torch.zeros(1, 3), tmp_path / "m.onnx")


def test_trials_csv_names_each_column_once_when_the_backbone_is_searched():
    import optuna
    from optuna.distributions import CategoricalDistribution

    from autoft.config import Config
    from autoft.results import records

    searched = CategoricalDistribution(["tiny_cnn", "other"])
    trial = optuna.trial.create_trial(
        params={"backbone": "tiny_cnn"},
        distributions={"backbone": searched},
        value=0.5,
        user_attrs={"config": Config(backbone="tiny_cnn").to_dict()},
    )
    header, rows = records.trial_rows([trial])
    assert len(header) == len(set(header)) and rows[0][header.index("backbone")] == "tiny_cnn"
