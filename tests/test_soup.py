"""`final: soup`: the fold models' uniform weight average, shipped as one model."""

from __future__ import annotations

import pytest
import torch

from autoft.backbones import build_model
from autoft.cache import load_data
from autoft.results.predict import image_paths, load_model
from autoft.study.run import SearchOptions, run_search
from autoft.training.checkpoint import load_checkpoint, members
from autoft.training.finals import make_soup, soup
from autoft.training.inference import predict_logits
from autoft.training.loop import finetune
from autoft.training.run import train

CPU = torch.device("cpu")


def test_soup_averages_every_weight_and_batchnorm_statistic():
    a, b = (build_model("tiny_cnn", 3, seed=s)[0].state_dict() for s in (1, 2))
    a = {k: v + 1 if k.endswith("running_var") else v for k, v in a.items()}
    b = {k: v + (3 if k.endswith("num_batches_tracked") else 0) for k, v in b.items()}
    s = soup([a, b])
    assert s.keys() == a.keys()
    for k, v in s.items():
        if v.is_floating_point():
            torch.testing.assert_close(v, (a[k] + b[k]) / 2)
        else:
            assert torch.equal(v, a[k])  # counters: the first member's
    assert not torch.equal(s["head.weight"], a["head.weight"])  # the heads differ: really averaged


def test_soup_of_probe_folds_is_one_model_whose_logits_are_the_folds_mean(tmp_path, tiny_config):
    cfg = tiny_config.replace(freeze_depth=3, aug_strength=0.0, final="soup")
    metrics = train(cfg, tmp_path / "run")
    assert metrics["shipped"].startswith("soup (uniform weight average) of 5 fold models")
    ckpt = load_checkpoint(tmp_path / "run" / "model.pt")
    assert ckpt["members"] == []  # one model, one model's cost
    folds = finetune(cfg.replace(final="ensemble"))  # the same folds, seed and fit
    model = load_model(tmp_path / "run" / "model.pt", device="cpu")
    data = load_data(cfg)
    got = predict_logits(model.model, model.spec, cfg, data.labelled, 0, CPU)
    nets = [build_model(cfg.backbone, 2)[0] for _ in folds.members]
    for net, state in zip(nets, folds.members):
        net.load_state_dict(state)
    mean = torch.stack([predict_logits(n, model.spec, cfg, data.labelled, 0, CPU) for n in nets]).mean(0)
    torch.testing.assert_close(got, mean, atol=1e-4, rtol=0)  # frozen stages, linear head: the soup is exact
    paths = image_paths([tiny_config.data + "/val"])
    assert model.predict(paths) == [p.split("/")[-2] for p in paths]


def test_fine_tuned_soup_ships_one_model_that_predicts(tmp_path, tiny_config):
    metrics = train(tiny_config.replace(epochs=4, aug_strength=0.2, final="soup"), tmp_path / "run")
    assert metrics["shipped"].startswith("soup") and metrics["refit_history"] is None
    assert len(members(load_checkpoint(tmp_path / "run" / "model.pt"))) == 1
    paths = image_paths([tiny_config.data + "/train"])
    predicted = load_model(tmp_path / "run" / "model.pt", device="cpu").predict(paths)
    assert sum(p == t.split("/")[-2] for p, t in zip(predicted, paths)) >= 0.9 * len(paths)


@pytest.mark.slow
def test_search_with_final_soup_ships_the_winners_soup(tmp_path, monkeypatch, tiny_config):
    monkeypatch.chdir(tmp_path)
    run_search(tiny_config.replace(final="soup"), SearchOptions(trials=2, progress=False, sampler="random"))
    ckpt = load_checkpoint(tmp_path / "studies" / "autoft" / "best.pt")
    assert ckpt["metrics"]["final"] == "soup" and ckpt["members"] == []
    assert ckpt["metrics"]["shipped"].startswith("soup (uniform weight average) of 5 fold models")


def test_soup_recomputes_batchnorm_statistics_of_the_stages_that_trained_only(tiny_config):
    cfg = tiny_config.replace(freeze_depth=1, epochs=2, aug_strength=0.2, final="soup")
    data = load_data(cfg)
    result = finetune(cfg, data)
    made, averaged = make_soup(cfg, data, result.members), soup(result.members)
    for k, v in made.items():
        if k.endswith(("running_mean", "running_var")):
            if k.startswith("stages.0."):  # frozen: the pretrained statistics, the same in every member
                assert torch.equal(v, result.members[0][k])
            else:
                assert not torch.allclose(v, averaged[k])
        elif v.is_floating_point():
            assert torch.equal(v, averaged[k])  # the weights are the uniform average
