"""An ensemble of trials ships as one checkpoint: several models with weights, predicted and exported as one."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from autoft.backbones import build_model
from autoft.config import Config
from autoft.data.augment import center_crop, normalize
from autoft.results.predict import export, load_model
from autoft.training.checkpoint import save_checkpoint


def test_weighted_ensemble_predicts_the_weighted_mean_and_exports_as_one_graph(tmp_path):
    nets = [build_model("tiny_cnn", 3, seed=s)[0] for s in (1, 2, 3)]
    for i, net in enumerate(nets):  # distinct trained-looking members
        with torch.no_grad():
            net.head.weight.mul_(5 + i)
    weights = [0.6, 0.3, 0.1]
    cfg = Config(backbone="tiny_cnn", image_size=32, device="cpu")
    path = tmp_path / "mix.pt"
    save_checkpoint(path, [n.state_dict() for n in nets], ["a", "b", "c"], cfg, {"shipped": "mix"}, 0, weights=weights)
    model = load_model(path, device="cpu")
    x = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)
    spec = model.spec
    inputs = normalize(center_crop(x, 32), spec.mean, spec.std)
    expected = sum(w * n.eval()(inputs).softmax(1) for w, n in zip(weights, nets))
    torch.testing.assert_close(model._logits(x).softmax(1), expected, atol=1e-5, rtol=0)
    for fmt in ("torchscript",):
        out = export(path, fmt, tmp_path / f"mix.{fmt}")
        assert out.max_abs_diff <= 1e-4  # the exported graph against PyTorch, on a sample batch
        traced = torch.jit.load(str(out.path))
        torch.testing.assert_close(traced(center_crop(x, 32)).softmax(1), expected, atol=1e-4, rtol=0)


def _search_with_fake_oof(tmp_path, tiny_config, wrong_on):
    """A study of three completed trials (distinct seeds) told with fake out-of-fold probabilities: trial k is
    confidently wrong on the images `wrong_on(k)` marks; then the search's final export."""
    from types import SimpleNamespace

    import numpy as np
    import optuna

    from autoft.cache import RunCache
    from autoft.results import records
    from autoft.results.exports import Exporter

    cfg = tiny_config.replace(epochs=1)
    cache = RunCache()
    labels = cache.dataset(cfg).labelled.labels.numpy()
    n, artifacts = len(labels), str(tmp_path / "artifacts")
    study = optuna.create_study(direction="maximize")
    for k in range(3):
        t = study.ask()
        pred = np.where(wrong_on(k, np.arange(n)), 1 - labels, labels)
        probs = np.full((n, 2), 0.2, dtype=np.float32)
        probs[np.arange(n), pred] = 0.8
        oof = SimpleNamespace(oof=probs, fold=np.arange(n) % 5, prior=[0.5, 0.5], tau=0.0)
        records.write_oof(t, oof, labels, [str(i) for i in range(n)], artifacts)
        estimate = records.load_oof(study.trials[-1], artifacts).estimate("accuracy")
        t.set_user_attr(records.CONFIG, cfg.replace(seed=k).to_dict())
        t.set_user_attr(records.ESTIMATE, estimate.to_dict())
        t.set_user_attr(records.VAL_LOSS, 0.3 + k / 10)
        t.set_user_attr(records.BEST_EPOCH, 1)
        study.tell(t, estimate.value)
    out = tmp_path / "out"
    out.mkdir()
    best = Exporter(out, artifacts, cache).export(study, final=True)
    return study, best, out


def test_a_search_ships_a_mix_of_trials_that_wins_beyond_noise_and_not_one_that_does_not(tmp_path, tiny_config, capsys):
    from autoft.results import records
    from autoft.results.summary import print_summary
    from autoft.training.checkpoint import load_checkpoint

    # each trial wrong on its own third of the images: any two outvote the third, the mix is right everywhere
    study, best, out = _search_with_fake_oof(tmp_path / "wins", tiny_config, lambda k, i: i % 3 == k)
    ckpt = load_checkpoint(out / "best.pt")
    mix = ckpt["metrics"]["trial_mix"]
    assert sorted(mix["members"]) == [0, 1, 2] and sum(mix["weights"]) == pytest.approx(1)
    assert len(ckpt["members"]) + 1 == 15 and ckpt["member_weights"] == pytest.approx(
        [w / 5 for w in mix["weights"] for _ in range(5)]
    )
    assert ckpt["metrics"]["final"] == "trials" and ckpt["metrics"]["trial"] == best.number
    val = sorted((Path(tiny_config.data) / "val").rglob("*.png"))
    predicted = load_model(out / "best.pt", device="cpu").predict(val)
    assert len(predicted) == len(val) == 12 and set(predicted) <= {"cat", "dog"}
    print_summary(study, best, 1.0, out, [])
    summary = capsys.readouterr().out
    assert "shipped an ensemble of trials" in summary and "15 forward passes per image against 5" in summary
    assert records.trial_mix(study, best.number)["estimate"]["value"] == 1.0

    # near-copies, each wrong on 2 of the same 3 images: no mix beats the single best beyond noise
    study, best, out = _search_with_fake_oof(tmp_path / "ties", tiny_config, lambda k, i: (i < 3) & (i != k))
    ckpt = load_checkpoint(out / "best.pt")
    assert "trial_mix" not in ckpt["metrics"] and "member_weights" not in ckpt
    assert ckpt["metrics"]["shipped"].startswith("ensemble of 5 fold models")
    assert ckpt["metrics"]["trial"] == best.number
    assert not records.trial_mix(study, best.number)["shipped"]
    print_summary(study, best, 1.0, out, [])
    summary = capsys.readouterr().out
    assert "was considered and not shipped, not better beyond noise" in summary


def test_an_ensemble_of_trials_is_chosen_from_the_kept_set_only(tmp_path, tiny_config, monkeypatch):
    """A trial that fell out of the kept set lost its models while the search ran: the ensemble must not choose it
    (it would be trained again after the deadline). Each of three trials is wrong on its own third of the images,
    so all three together are right everywhere; with room for two, the third is left out."""
    from autoft.results import records

    monkeypatch.setattr(records, "KEEP", 2)
    study, best, _ = _search_with_fake_oof(tmp_path, tiny_config, lambda k, i: i % 3 == k)
    kept = records.kept_set([records.Candidate.of(t) for t in records.completed(study)])
    assert kept == {0, 1}
    assert set(records.trial_mix(study, best.number)["members"]) <= kept
