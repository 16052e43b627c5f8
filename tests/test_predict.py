"""evaluate, predict and export on a tiny trained model: right classes, right numbers, faithful exports."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_image_folder
from PIL import Image

from autoft.backbones import build_model
from autoft.cache import load_data
from autoft.cli import main
from autoft.config import Config
from autoft.data.augment import center_crop
from autoft.exceptions import AutoftError, DataError
from autoft.results.plots import PNG_SIZE
from autoft.results.predict import evaluate, export, image_paths, load_model
from autoft.training.checkpoint import save_checkpoint
from autoft.training.inference import predict_logits
from autoft.training.run import train


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """(model.pt, data root) of a tiny_cnn trained to separate the fixture's two classes; trained once per module."""
    root = tmp_path_factory.mktemp("trained")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AUTOFT_CACHE", str(root / "cache"))
        data = make_image_folder(root / "data", splits=("train", "val", "test"))
        cfg = Config(
            data=str(data),
            backbone="tiny_cnn",
            image_size=32,
            batch_size=8,
            epochs=6,
            head_lr=0.05,
            base_lr=0.02,
            device="cpu",
            aug_strength=0.2,
        )
        metrics = train(cfg, root / "run")  # 5-fold cross-validation: model.pt is the ensemble of the fold models
    assert metrics["best_val_accuracy"] >= 0.9, "fixture model did not learn the toy classes"
    assert metrics["shipped"].startswith("ensemble of 5 fold models")
    return root / "run" / "model.pt", data


def _truth(paths: list[str]) -> list[str]:
    return [Path(p).parent.name for p in paths]


def test_predict_training_images_returns_their_classes(trained):
    model, data = trained
    paths = image_paths([data / "train"])
    assert len(paths) == 24
    assert load_model(model, device="cpu").predict(paths) == _truth(paths)


def test_predict_is_the_eval_transform_of_training(trained):
    """Logits from file paths equal the trainer's own validation logits, and every input kind agrees."""
    model, data = trained
    p = load_model(model, device="cpu")
    ds = load_data(p.config)
    expected = predict_logits(p.model, p.spec, p.config, ds.val, 0, torch.device("cpu"))
    torch.testing.assert_close(p.logits(ds.val.paths), expected, atol=1e-5, rtol=0)

    path = ds.val.paths[0]
    pil = Image.open(path)
    array = np.array(pil.convert("RGB"))
    from_path = p.predict_proba(path)  # a single image is a batch of one
    assert from_path.shape == (1, 2)
    for other in (pil, array, torch.from_numpy(array).permute(2, 0, 1)):
        torch.testing.assert_close(p.predict_proba(other), from_path)


def test_top_k_is_sorted_and_clipped_to_the_classes(trained):
    model, data = trained
    top = load_model(model, device="cpu").top_k(image_paths([data / "val" / "dog"])[:3], k=5)
    assert all(len(t) == 2 and t[0][0] == "dog" and t[0][1] >= t[1][1] for t in top)
    assert all(abs(sum(p for _, p in t) - 1) < 1e-5 for t in top)


def test_predict_rejects_what_is_not_an_image(trained, tmp_path):
    model, _ = trained
    (tmp_path / "notes.jpg").write_text("not an image")
    with pytest.raises(DataError, match="notes.jpg"):
        load_model(model, device="cpu").predict([tmp_path / "notes.jpg"])
    with pytest.raises(DataError, match="uint8"):
        load_model(model, device="cpu").predict(np.zeros((8, 8, 3), np.float32))
    with pytest.raises(DataError, match="neither"):
        image_paths([tmp_path / "missing"])


def test_evaluate_matches_a_hand_computation(tmp_path):
    """A head that always says 'dog' on a val set of 2 cats and 6 dogs: every number is known in advance."""
    data = make_image_folder(tmp_path / "data", per_class=12)
    for f in sorted((data / "val" / "cat").iterdir())[2:]:
        f.unlink()
    cfg = Config(data=str(data), backbone="tiny_cnn", image_size=32, device="cpu")
    net, _ = build_model("tiny_cnn", 2, weights="random")
    with torch.no_grad():
        net.head.weight.zero_()
        net.head.bias.copy_(torch.tensor([0.0, 3.0]))
    save_checkpoint(tmp_path / "always_dog.pt", [net.state_dict()], ["cat", "dog"], cfg)

    ev = evaluate(tmp_path / "always_dog.pt", split="val", device="cpu")
    assert ev["n"] == 8
    assert ev["accuracy"] == pytest.approx(6 / 8)
    assert ev["balanced_accuracy"] == pytest.approx((0 + 1) / 2)
    assert ev["per_class"]["dog"] == pytest.approx(
        {"precision": 6 / 8, "recall": 1.0, "f1": 2 * 0.75 / 1.75, "support": 6}
    )
    assert ev["per_class"]["cat"] == pytest.approx({"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 2})
    assert ev["confusion_matrix"] == [[0, 2], [0, 6]]
    png = Path(ev["confusion_png"])
    assert png == tmp_path / "always_dog_val_confusion.png"
    assert Image.open(png).size == PNG_SIZE
    probs = load_model(tmp_path / "always_dog.pt", device="cpu").predict_proba(data / "val" / "dog" / "000.png")
    torch.testing.assert_close(probs, torch.tensor([[0.0, 3.0]]).softmax(1))


def test_evaluate_on_new_data_with_some_of_the_classes_scores_those_and_names_the_absent(tmp_path, caplog):
    """A 3-class model that always says 'bee', on new data holding bees and cats (6 each in val/) but no ants."""
    cfg = Config(
        data=str(make_image_folder(tmp_path / "own", classes=("ant", "bee", "cat"))),
        backbone="tiny_cnn",
        image_size=32,
        device="cpu",
    )
    net, _ = build_model("tiny_cnn", 3, weights="random")
    with torch.no_grad():
        net.head.weight.zero_()
        net.head.bias.copy_(torch.tensor([0.0, 3.0, 0.0]))
    save_checkpoint(tmp_path / "always_bee.pt", [net.state_dict()], ["ant", "bee", "cat"], cfg)
    new = make_image_folder(tmp_path / "new", classes=("bee", "cat"))
    with caplog.at_level("INFO", logger="autoft"):
        ev = evaluate(tmp_path / "always_bee.pt", new, device="cpu")
    assert ev["n"] == 12 and ev["absent_classes"] == ["ant"] and "absent: ant" in caplog.text
    assert ev["accuracy"] == pytest.approx(0.5) and ev["balanced_accuracy"] == pytest.approx(0.5)
    assert ev["f1_macro"] == pytest.approx((2 / 3 + 0) / 2)  # over bee and cat, not ant's 0 as well
    lo, hi = ev["metrics"]["f1_macro"]["interval"]
    assert lo <= ev["f1_macro"] <= hi
    assert set(ev["per_class"]) == {"bee", "cat"} and ev["per_class"]["bee"]["recall"] == 1.0
    assert ev["confusion_matrix"] == [[0, 0, 0], [0, 6, 0], [0, 6, 0]]  # rows and columns: the model's classes
    alien = make_image_folder(tmp_path / "alien", classes=("bee", "wasp"))
    with pytest.raises(DataError, match="not trained on: 'wasp'"):
        evaluate(tmp_path / "always_bee.pt", alien, device="cpu")


def test_evaluate_counts_agree_with_predictions(trained, tmp_path):
    model, data = trained
    paths = image_paths([data / "test"])
    predicted = load_model(model, device="cpu").predict(paths)
    truth = _truth(paths)
    ev = evaluate(model, data, "test", tmp_path / "cm.png", device="cpu")
    assert ev["n"] == len(paths)
    assert ev["accuracy"] == pytest.approx(np.mean([a == b for a, b in zip(predicted, truth)]))
    for c in ("cat", "dog"):
        hits = sum(p == t == c for p, t in zip(predicted, truth))
        assert ev["per_class"][c]["recall"] == pytest.approx(hits / truth.count(c))
    assert (tmp_path / "cm.png").stat().st_size > 0


def test_evaluate_says_when_a_split_is_missing(tmp_path):
    data = make_image_folder(tmp_path / "data")
    cfg = Config(data=str(data), backbone="tiny_cnn", image_size=32, device="cpu")
    net, _ = build_model("tiny_cnn", 2, weights="random")
    save_checkpoint(tmp_path / "m.pt", [net.state_dict()], ["cat", "dog"], cfg)
    with pytest.raises(DataError, match="no test/"):
        evaluate(tmp_path / "m.pt", split="test", device="cpu")
    with pytest.raises(AutoftError, match="not one of"):
        evaluate(tmp_path / "m.pt", split="holdout", device="cpu")
    other = make_image_folder(tmp_path / "other", classes=("ant", "bee"))
    with pytest.raises(DataError, match="not trained on: 'ant', 'bee'"):
        evaluate(tmp_path / "m.pt", other, device="cpu")


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_export_torchscript_reproduces_pytorch(trained, tmp_path):
    model, data = trained
    ex = export(model, "torchscript", tmp_path / "m.torchscript.pt")
    assert ex.max_abs_diff <= 1e-4
    meta = json.loads(ex.metadata_path.read_text())
    assert meta["classes"] == ["cat", "dog"] and meta["input"]["shape"] == ["N", 3, 32, 32]

    p = load_model(model, device="cpu")
    paths = image_paths([data / "val"])
    x = center_crop(p.preprocess(paths), p.config.image_size)  # the documented input: [0,1] RGB, cropped, unnormalized
    deployed = torch.jit.load(str(ex.path))
    torch.testing.assert_close(deployed(x), p.logits(paths), atol=1e-4, rtol=0)


def test_export_onnx_reproduces_pytorch(trained, tmp_path):
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    model, data = trained
    ex = export(model, "onnx", tmp_path / "m.onnx")
    p = load_model(model, device="cpu")
    paths = image_paths([data / "val"])
    x = center_crop(p.preprocess(paths), p.config.image_size).numpy()
    out = ort.InferenceSession(str(ex.path), providers=["CPUExecutionProvider"]).run(None, {"image": x})[0]
    torch.testing.assert_close(torch.from_numpy(out), p.logits(paths), atol=1e-4, rtol=0)


def test_export_onnx_without_onnx_says_what_to_install(trained, monkeypatch, tmp_path):
    model, _ = trained
    monkeypatch.setitem(sys.modules, "onnx", None)  # import onnx now raises ImportError
    with pytest.raises(AutoftError, match="pip install onnx onnxruntime"):
        export(model, "onnx", tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


def test_cli_evaluate_predict_export(trained, tmp_path, capsys):
    model, data = trained
    assert (
        main(
            [
                "evaluate",
                "--model",
                str(model),
                "--data",
                str(data),
                "--split",
                "test",
                "--out",
                str(tmp_path / "cm.png"),
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    out, err = capsys.readouterr()
    assert "accuracy          1.0000 (95 % interval 0.758-1.000 on 12 images)" in out
    assert (
        (
            "balanced_accuracy 1.0000 (95 % interval 1.000, of zero width: every bootstrap resample scored the same "
            "on 12 images)"
        )
        in out
        and "f1_macro" in out
        and "precision" in out
        and (tmp_path / "cm.png").is_file()
    )

    assert "not what it scores on new ones" not in err  # test/ never trains anything
    assert (
        main(
            [
                "evaluate",
                "--model",
                str(model),
                "--data",
                str(data),
                "--split",
                "train",
                "--out",
                str(tmp_path / "t.png"),
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    assert "the model trained on these train images" in capsys.readouterr().err

    assert main(["predict", "--model", str(model), str(data / "val"), "--top-k", "2", "--json", "--device", "cpu"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["predictions"][0]["class"] for r in rows] == _truth([r["image"] for r in rows])
    assert all(len(r["predictions"]) == 2 for r in rows)

    assert main(["predict", "--model", str(model), str(data / "val" / "cat" / "000.png"), "--device", "cpu"]) == 0
    assert capsys.readouterr().out.split("\t")[1].startswith("cat ")

    assert main(["export", "--model", str(model), "--out", str(tmp_path / "m.pt")]) == 0
    assert "reproduces the PyTorch logits" in capsys.readouterr().out and (tmp_path / "m.pt").is_file()

    assert main(["predict", "--model", str(tmp_path / "missing.pt"), str(data)]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["evaluate", "--model", str(tmp_path)]) == 2
    assert f"model file {str(tmp_path)!r} is a folder" in capsys.readouterr().err


def test_cli_predict_reports_unreadable_files_and_goes_on(trained, tmp_path, capsys):
    """One corrupt file among good ones: the others are predicted, one stderr line names it, exit 1 at the end."""
    import shutil

    model, data = trained
    folder = tmp_path / "new"
    shutil.copytree(data / "val", folder)
    bad = folder / "cat" / "001b.jpg"  # sorts between good files, so the ones after it must still come out
    bad.write_bytes(b"\xff\xd8\xff\xe0" + bytes(range(256)) * 2)
    good = [p for p in image_paths([folder]) if p != str(bad)]

    assert main(["predict", "--model", str(model), str(folder), "--device", "cpu"]) == 1
    out, err = capsys.readouterr()
    rows = [line.split("\t") for line in out.splitlines()]
    assert [r[0] for r in rows] == good
    assert [r[1].split()[0] for r in rows] == _truth(good)
    bad_lines = [line for line in err.splitlines() if str(bad) in line]
    assert len(bad_lines) == 1 and bad_lines[0].startswith(f"autoft: cannot read {bad}: "), err
    assert "Traceback" not in err

    assert main(["predict", "--model", str(model), str(folder), "--json", "--device", "cpu"]) == 1
    out, err = capsys.readouterr()
    rows = json.loads(out)
    assert [r["image"] for r in rows] == image_paths([folder])  # every file, in order, the bad one included
    (failed,) = [r for r in rows if "error" in r]
    assert failed["image"] == str(bad) and "predictions" not in failed and failed["error"]
    assert [r["predictions"][0]["class"] for r in rows if "error" not in r] == _truth(good)
    assert sum(str(bad) in line for line in err.splitlines()) == 1


def test_top_k_files_yields_every_file_in_order(trained, tmp_path):
    model, data = trained
    (tmp_path / "x.png").write_text("not an image")
    paths = (
        image_paths([data / "val" / "cat"])[:2] + [str(tmp_path / "x.png")] + image_paths([data / "val" / "dog"])[:1]
    )
    results = list(load_model(model, device="cpu").top_k_files(paths, k=1, chunk=2))
    assert [p for p, _, _ in results] == paths
    assert [top[0][0] if top else None for _, top, _ in results] == ["cat", "cat", None, "dog"]
    assert results[2][2] and results[2][1] is None and all(e is None for i, (_, _, e) in enumerate(results) if i != 2)
