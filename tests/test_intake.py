"""How images come in: what counts as an image, what is skipped and said, names and modes as people have them,
the cache's and the disk's failures, labels from a CSV, and a dataset's identity (its fingerprint)."""

from __future__ import annotations

import errno
import logging
import os
import shutil
import sqlite3
from collections import Counter
from pathlib import Path

import numpy as np
import optuna
import pytest
import yaml
from conftest import make_image_folder
from PIL import Image, features

import autoft.data.decode as decode_module
import autoft.data.scan as scan_module
import autoft.data.store as store_module
import autoft.system.files
from autoft.cli import main
from autoft.data.dataset import load_dataset
from autoft.data.decode import decode, rescaled_notice
from autoft.data.scan import scan, skipped_summary
from autoft.exceptions import DataError, DiskFullError, disk_full, one_line
from autoft.training.checkpoint import load_checkpoint, trained_on

FAST = ["--backbone", "tiny_cnn", "--image-size", "32", "--epochs", "1", "--device", "cpu", "--batch-size", "8"]


def _photo(path: Path, fmt: str | None = None, value: int = 200) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (24, 24), (value, 40, 40)).save(path, format=fmt)


# --- every file is either used or reported --------------------------------------------------------------------


def test_hidden_files_and_folders_are_skipped_at_any_depth_and_counted(tmp_path, caplog):
    root = make_image_folder(tmp_path / "d", per_class=3)
    _photo(root / "train" / "cat" / ".ipynb_checkpoints" / "dog-checkpoint.png")  # a dog picture, hidden in cat/
    _photo(root / "train" / "cat" / "sub" / ".hidden" / "x.png")
    _photo(root / "train" / "dog" / ".DS_Store.png")
    (root / "train" / "dog" / "notes.txt").write_text("not an image")
    (root / "train" / ".cache").mkdir()  # beside the classes
    _photo(root / "train" / "cat" / "sub" / "deep.png")  # a plain subfolder is read
    with caplog.at_level(logging.INFO, logger="autoft"):
        found = scan(root)
    paths = found.splits["train"][0]
    assert len(paths) == 7 and not any("/." in p for p in paths)
    assert any(p.endswith("deep.png") for p in paths)
    lines = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert len(lines) == 1 and lines[0].endswith("skipped 3 hidden folders, 1 hidden file, 1 non-image file"), lines


def test_pillow_decides_what_an_image_is_beyond_the_usual_extensions(tmp_path, caplog):
    root = make_image_folder(tmp_path / "d", per_class=3, splits=("train",))
    _photo(root / "train" / "cat" / "a.jfif", "JPEG")
    _photo(root / "train" / "cat" / "no_extension", "PNG")
    _photo(root / "train" / "cat" / "photo.JPG_large", "JPEG")  # what a browser saves
    expected = 9
    if features.check("avif"):
        _photo(root / "train" / "dog" / "b.avif", "AVIF")
        expected += 1
    (root / "train" / "dog" / "labels.json").write_text("{}")
    found = scan(root)
    assert len(found.splits["train"][0]) == expected
    assert found.skipped == {"non-image file": 1}
    ds = load_dataset(root, 16)
    assert len(ds.labelled) == expected and not ds.skipped  # every one of them decodes


def test_predict_uses_the_same_rule(tmp_path):
    from autoft.results.predict import image_paths

    _photo(tmp_path / "p" / "a.jfif", "JPEG")
    _photo(tmp_path / "p" / ".ipynb_checkpoints" / "b.png")
    (tmp_path / "p" / "readme.txt").write_text("x")
    assert image_paths([tmp_path / "p"]) == [str(tmp_path / "p" / "a.jfif")]
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "a.txt").write_text("x")
    with pytest.raises(DataError, match=r"no images found in .*t \(skipped 1 non-image file\)"):
        image_paths([tmp_path / "t"])


def test_a_folder_beside_train_is_said_not_ignored(tmp_path):
    root = make_image_folder(tmp_path / "d", per_class=3)
    make_image_folder(tmp_path / "tmp", per_class=3, splits=("valid",))
    shutil.move(tmp_path / "tmp" / "valid", root / "valid")  # Roboflow's name for val/
    assert scan(root).skipped == {"folder beside train/ (only train, val and test are read)": 1}
    assert skipped_summary(scan(root).skipped) == ("skipped 1 folder beside train/ (only train, val and test are read)")


# --- modes ----------------------------------------------------------------------------------------------------


def _wide(path: Path, value: float | np.ndarray, dtype=np.float32) -> Path:
    """A 32 x 32 float (mode F) or int32 (mode I) TIFF of `value` (constant, or an array)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.broadcast_to(np.asarray(value, dtype), (32, 32)).copy()).save(path)
    return path


def _wide_set(root: Path, values: dict[str, float], dtype=np.float32, per_class: int = 3) -> Path:
    """Class folders of constant wide images: class -> its value."""
    for split in ("train", "val"):
        for c, v in values.items():
            for i in range(per_class):
                _wide(root / split / c / f"{i}.tif", v, dtype)
    return root


def _pixels(ds, cls: str) -> np.ndarray:
    """The stored pixels of the labelled images of class `cls`."""
    return ds.labelled.read()[ds.labelled.labels == ds.classes.index(cls)].numpy()


def test_a_float_image_in_0_1_decodes_as_its_values_say(tmp_path):
    for v in (0.9, 0.1):  # decoded alone (predict, without a training range): as 8-bit images map, not mid-grey
        assert np.abs(decode(str(_wide(tmp_path / f"{v}.tif", v)), 32).astype(int) - round(v * 255)).max() <= 1
    ds = load_dataset(_wide_set(tmp_path / "d", {"bright": 0.9, "dark": 0.1}), 16)
    assert ds.store.value_range == ds.fingerprint.value_range == (0.0, 1.0)
    assert np.abs(_pixels(ds, "bright").astype(int) - 230).max() <= 1  # 0.9 x 255
    assert np.abs(_pixels(ds, "dark").astype(int) - 26).max() <= 1  # 0.1 x 255


def test_int32_images_are_scaled_by_one_range_for_the_dataset(tmp_path, caplog):
    root = _wide_set(tmp_path / "d", {"high": 900_000, "low": 100_000, "mid": 500_000}, np.int32)
    with caplog.at_level(logging.INFO, logger="autoft"):
        ds = load_dataset(root, 16)
    assert ds.store.value_range == (100_000, 900_000)
    assert _pixels(ds, "high").min() == 255 and _pixels(ds, "low").max() == 0  # far apart, in order
    assert np.abs(_pixels(ds, "mid").astype(int) - 128).max() <= 1
    notices = [r.getMessage() for r in caplog.records if "Pillow modes I, F" in r.getMessage()]
    assert notices == [rescaled_notice(18, (100_000, 900_000))]
    assert "100000..900000 to 0..255 (the dataset's smallest..largest value)" in notices[0]  # which range, said once
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="autoft"):
        assert load_dataset(root, 16).store.decoded == 0  # the range is kept beside the store: reused, not re-found
    assert load_dataset(root, 16).fingerprint.value_range == (100_000, 900_000)


def test_wide_images_keep_their_detail_and_odd_values(tmp_path):
    a = np.linspace(0, 1, 32 * 32, dtype=np.float32).reshape(32, 32)  # microscopy: floats in 0..1
    for name, img in (("f.tif", a), ("i.tif", (a * 5e6 - 1e6).astype(np.int32))):
        out = decode(str(_wide(tmp_path / name, img, img.dtype)), 32)
        assert out.min() <= 2 and out.max() >= 253 and len(np.unique(out)) > 200, name  # a gradient, not all black
    assert (decode(str(_wide(tmp_path / "flat.tif", 7e5, np.int32)), 32) == 128).all()  # one value: mid-grey
    nan = a.copy()
    nan[0, :4] = np.nan
    assert decode(str(_wide(tmp_path / "nan.tif", nan)), 32).max() >= 253
    assert decode_module.dataset_range([(0.2, 0.5), (0.0, 0.7)]) == (0.0, 1.0)
    assert decode_module.dataset_range([(-3.0, 0.5), (0.0, 40.0)]) == (-3.0, 40.0)
    assert decode_module.dataset_range(
        [decode_module.extent(Image.fromarray(np.full((8, 8), np.nan, np.float32)))]
    ) == (0.0, 1.0)


def test_a_dataset_without_wide_images_opens_each_once(tmp_path, monkeypatch):
    root = make_image_folder(tmp_path / "d", per_class=3, splits=("train",))
    _wide(root / "train" / "cat" / "w.tif", 5000, np.int32)
    opened = Counter()
    real = decode_module._opened

    def counted(path, size):
        opened[Path(path).suffix] += 1
        return real(path, size)

    monkeypatch.setattr(decode_module, "_opened", counted)
    assert load_dataset(root, 16).store.value_range is not None
    assert opened == {".png": 6, ".tif": 2}  # the wide one twice (its extent, then its pixels), 8-bit ones once
    (root / "train" / "cat" / "w.tif").unlink()
    opened.clear()
    assert load_dataset(root, 16).store.value_range is None
    assert opened == {".png": 6}


def test_predict_and_evaluate_scale_new_images_by_the_training_range(tmp_path, monkeypatch, capsys):
    from autoft.backbones import get_backbone
    from autoft.results.predict import load_model
    from autoft.training.checkpoint import load_checkpoint, trained_on

    _wide_set(tmp_path / "d", {"high": 900_000, "low": 100_000}, np.int32)
    monkeypatch.chdir(tmp_path)
    assert main(["-q", "train", "--data", "d", *FAST, "--out", "run"]) == 0
    assert trained_on(load_checkpoint("run/model.pt")).value_range == (100_000, 900_000)
    predictor = load_model("run/model.pt", device="cpu")
    assert predictor.value_range == (100_000, 900_000)
    new = _wide(tmp_path / "new.tif", 900_000, np.int32)  # alone its own range would make it mid-grey
    assert (predictor.preprocess(str(new)) == 255).all()
    assert (predictor.preprocess(Image.open(new)) == 255).all()  # an image in memory alike
    capsys.readouterr()
    assert main(["predict", "--model", "run/model.pt", str(new)]) == 0
    assert "scaled by the model's range, 100000..900000 to 0..255" in capsys.readouterr().err  # said in one line

    _wide_set(tmp_path / "other", {"high": 2_000_000, "low": 500_000}, np.int32)  # new data, another range
    assert main(["-q", "evaluate", "--model", "run/model.pt", "--data", "other", "--json"]) == 0
    ds = load_dataset("other", 32, get_backbone("tiny_cnn").crop_pct, value_range=(100_000, 900_000))
    assert ds.store.decoded == 0  # the store that evaluate wrote: the training range, not 500,000..2,000,000
    assert _pixels(ds, "high").min() == 255 and _pixels(ds, "low").max() == 128
    assert ds.store.value_range == (100_000, 900_000)


# --- names that are not UTF-8 --------------------------------------------------------------------------------


def test_non_utf8_file_names_work_end_to_end(tmp_path, monkeypatch, capsysbinary):
    root = make_image_folder(tmp_path / "d", per_class=6, splits=("train", "val", "test"))
    odd = os.fsdecode(b"caf\xe9-\xff.png")  # bytes from an old zip: not UTF-8
    for split in ("train", "test"):
        shutil.copy(root / split / "cat" / "000.png", root / split / "cat" / odd)
    monkeypatch.chdir(tmp_path)
    assert main(["-q", "train", "--data", "d", *FAST, "--out", "run"]) == 0
    assert main(["-q", "search", "--data", "d", *FAST, "--trials", "1"]) == 0
    assert main(["-q", "evaluate", "--model", "run/model.pt", "--split", "test", "--json"]) == 0
    capsysbinary.readouterr()
    assert main(["-q", "predict", "--model", "studies/autoft/best.pt", "d/test/cat"]) == 0
    out = capsysbinary.readouterr().out
    assert b"d/test/cat/caf\xe9-\xff.png\t" in out  # the name's bytes as on disk: the printed path opens
    assert main(["-q", "predict", "--model", "run/model.pt", "--json", "d/test/cat"]) == 0
    assert b"caf\\udce9" in capsysbinary.readouterr().out  # JSON escapes it


# --- the cache and the disk -----------------------------------------------------------------------------------


def test_an_unwritable_cache_is_one_error_before_decoding(tmp_path, monkeypatch):
    root = make_image_folder(tmp_path / "d", per_class=3)
    (tmp_path / "f").write_text("a file")
    monkeypatch.setenv("AUTOFT_CACHE", str(tmp_path / "f" / "cache"))
    monkeypatch.setattr(store_module, "_decode_into", lambda *a: pytest.fail("decoded before the cache was checked"))
    with pytest.raises(Exception, match=r"image cache \(AUTOFT_CACHE\) .*f is a file, not a folder; set AUTOFT_CACHE"):
        load_dataset(root, 16)


def _disk_full_after(monkeypatch, limit: int, err: int = errno.ENOSPC) -> None:
    """Every atomic write (system/files.py) fails with `err` once `limit` bytes are written, as on a full disk; so does
    claiming the space of an image store."""
    real_open = open

    def fallocate(fd, offset, length):
        if offset + length > limit:
            raise OSError(err, os.strerror(err))

    monkeypatch.setattr(os, "posix_fallocate", fallocate, raising=False)

    class Full:
        def __init__(self, fh):
            self.fh, self.n = fh, 0

        def write(self, b):
            self.n += len(b)
            if self.n > limit:
                raise OSError(err, os.strerror(err))
            return self.fh.write(b)

        def __getattr__(self, name):
            return getattr(self.fh, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.fh.close()

    monkeypatch.setattr(
        autoft.system.files,
        "open",
        lambda f, mode="r", *a, **k: Full(real_open(f, mode, *a, **k)) if "w" in mode else real_open(f, mode, *a, **k),
        raising=False,
    )


@pytest.mark.parametrize(
    "err, words", [(errno.ENOSPC, "No space left on device (ENOSPC)"), (errno.EFBIG, "File too large (EFBIG)")]
)
def test_a_full_disk_while_caching_is_one_line_and_leaves_nothing(tmp_path, monkeypatch, capsys, err, words):
    make_image_folder(tmp_path / "d", per_class=4)
    monkeypatch.setenv("AUTOFT_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    _disk_full_after(monkeypatch, 1000, err)
    assert main(["train", "--data", "d", *FAST, "--out", "run"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "autoft: error: cannot write " in lines[0] and words in lines[0], lines
    assert "free space" in lines[0]
    assert [p.name for p in (tmp_path / "cache").rglob("*") if p.is_file()] == []  # no temp left behind


def _sqlite_full() -> Exception:
    """What Optuna's RDB storage raises when SQLite's disk is full: a misleading wrapper around the real cause."""
    try:
        try:
            raise sqlite3.OperationalError("database or disk is full")
        except sqlite3.OperationalError as cause:
            raise optuna.exceptions.StorageInternalError(
                "An exception is raised during the commit. This typically happens due to invalid data in the commit, "
                "e.g. exceeding max length."
            ) from cause
    except optuna.exceptions.StorageInternalError as exc:
        return exc


def test_a_full_disk_under_the_study_names_the_real_cause(tmp_path, monkeypatch, capsys):
    exc = _sqlite_full()
    assert disk_full(exc) == "out of disk space: database or disk is full (sqlite3 OperationalError)"
    assert one_line(exc) == disk_full(exc)
    assert disk_full(ValueError("x")) is None

    def search(*a, **k):
        raise exc

    monkeypatch.setattr("autoft.study.run.run_search", search)
    monkeypatch.chdir(tmp_path)
    assert main(["search", "--data", "d", "--storage", "sqlite:///s/x.db"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [
        "autoft: error: out of disk space: database or disk is full (sqlite3 OperationalError) (the "
        "study's storage is sqlite:///s/x.db); free space there and run again (finished work is kept)"
    ]

    from autoft.results import dashboard

    def full(*a, **k):
        raise exc

    monkeypatch.setattr("optuna_dashboard.save_plotly_graph_object", full)
    study = optuna.create_study()
    study.add_trial(
        optuna.trial.create_trial(
            value=0.5,
            user_attrs={
                "estimate": {"accuracy": 0.5, "images": 10, "fold_accuracy": [0.5], "interval": [0.2, 0.8], "folds": 1}
            },
        )
    )
    dashboard.publish_estimates(study, study.trials, study.trials[0])  # logs through the handler main() set up
    assert capsys.readouterr().err == (
        "autoft: could not publish the estimates to the dashboard: out of disk space: "
        "database or disk is full (sqlite3 OperationalError)\n"
    )


def test_full_disk_error_is_an_autoft_error():
    from autoft.exceptions import AutoftError

    assert issubclass(DiskFullError, AutoftError)


# --- a dataset is identified by its content, not its spelling ---------------------------------------------------


def test_the_fingerprint_is_the_content_whatever_the_spelling(tmp_path, monkeypatch):
    root = make_image_folder(tmp_path / "photos", per_class=4)
    monkeypatch.chdir(tmp_path)
    fp = scan("photos").fingerprint
    assert scan("./photos/").fingerprint == fp == scan(root.resolve()).fingerprint
    shutil.copytree(root, tmp_path / "moved")
    assert scan("moved").fingerprint == fp  # the same images elsewhere
    os.utime(root / "train" / "cat" / "000.png", ns=(1, 1))
    assert scan("photos").fingerprint == fp  # a touch is no change of content (the decode cache still sees it)
    assert fp.counts == {"train": [4, 4], "val": [2, 2]} and fp.classes == ("cat", "dog")

    (root / "train" / "cat" / "000.png").rename(root / "train" / "cat" / "zzz.png")
    assert scan("photos").fingerprint.differences(fp) == (
        "train: as many images, but other files (renamed, replaced or relabelled) (8 -> 8)"
    )
    make_image_folder(tmp_path / "photos", classes=("bird",), per_class=3)  # 3 train, 2 val
    (root / "val" / "dog" / "000.png").unlink()
    assert scan("photos").fingerprint.differences(fp) == (
        "classes added: 'bird'; train: 3 image(s) more (8 -> 11); val: 1 image(s) more (4 -> 5)"
    )


def test_a_file_replaced_in_place_is_decoded_again(tmp_path):
    root = make_image_folder(tmp_path / "d", per_class=3)
    first = load_dataset(root, 16)
    f = root / "train" / "cat" / "000.png"
    st = f.stat()
    Image.new("RGB", (30, 30), (0, 0, 255)).save(f)  # another picture under the same name
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))  # even with the old modification time
    again = load_dataset(root, 16)
    assert again.store.decoded and not np.array_equal(
        first.labelled.read()[0].numpy(), again.labelled.read()[0].numpy()
    )


@pytest.mark.slow
def test_the_study_knows_its_data_by_content_not_spelling(tmp_path, monkeypatch, capsys):
    make_image_folder(tmp_path / "2024", per_class=4)  # a folder named like a number stays a folder name
    monkeypatch.chdir(tmp_path)
    db = f"sqlite:///{tmp_path}/studies/autoft.db"
    search = ["-q", "search", *FAST, "--trials", "1", "--storage", db, "--cv-folds", "1"]
    assert main([*search, "--data", "2024"]) == 0
    assert main([*search, "--data", "./2024/"]) == 0
    assert main([*search, "--data", str(tmp_path / "2024")]) == 0
    shutil.move(tmp_path / "2024", tmp_path / "moved")
    assert main([*search, "--data", "moved"]) == 0  # the same images, moved
    study = optuna.load_study(study_name="autoft", storage=db)
    assert len(study.trials) == 4
    assert study.user_attrs["data"]["path"] == str(tmp_path / "moved")  # where they are now
    assert all(
        t.user_attrs["config"]["data"] in (str(tmp_path / "2024"), str(tmp_path / "moved")) for t in study.trials
    )
    capsys.readouterr()

    other = tmp_path / "elsewhere"  # another dataset that happens to be called 2024 too
    make_image_folder(other / "2024", classes=("cat", "dog", "bird"), per_class=6)
    monkeypatch.chdir(other)
    assert main([*search, "--data", "2024"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [
        f"autoft: error: study 'autoft' was searched on other data than {other / '2024'}: classes added: "
        "'bird'; train: 10 image(s) more (8 -> 18); val: 5 image(s) more (4 -> 9); use a new --study "
        f"name, or the data it was searched on ({tmp_path / 'moved'})"
    ]
    assert len(optuna.load_study(study_name="autoft", storage=db).trials) == 4  # nothing mixed in


def test_checkpoints_store_the_fingerprint_of_their_data(tmp_path, monkeypatch):
    import torch

    from autoft.training.checkpoint import load_checkpoint, trained_on

    make_image_folder(tmp_path / "d", per_class=4)
    monkeypatch.chdir(tmp_path)
    assert main(["-q", "train", "--data", "d", *FAST, "--out", "run"]) == 0
    assert main(["-q", "search", "--data", "d", *FAST, "--trials", "1"]) == 0
    for model in ("run/model.pt", "studies/autoft/best.pt"):
        assert trained_on(load_checkpoint(model)) == scan("d").fingerprint, model
    old = torch.load("run/model.pt", weights_only=True)
    del old["data"]  # a checkpoint from before fingerprints
    assert trained_on(old) is None


# --- labels from a CSV -----------------------------------------------------------------------------------------


def _csv_set(root: Path, per_class: int = 6, split: bool = True, classes=("cat", "dog")) -> Path:
    """A Kaggle-style set: images in one folder, labels in a CSV beside it (path,label[,split])."""
    src = make_image_folder(root / "src", classes=classes, per_class=per_class)
    lines = ["path,label" + (",split" if split else "")]
    for i, p in enumerate(sorted((src).rglob("*.png"))):
        dest = root / "images" / f"{i:04d}.png"
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(p, dest)
        lines.append(f"images/{dest.name},{p.parent.name}" + (f",{p.parent.parent.name}" if split else ""))
    shutil.rmtree(src)
    (root / "labels.csv").write_text("\n".join(lines) + "\n")
    return root / "labels.csv"


def test_labels_from_a_csv_plug_into_the_same_dataset(tmp_path):
    csv_file = _csv_set(tmp_path / "k")
    found = scan(None, csv_file)
    assert found.classes == ["cat", "dog"] and not found.flat and found.root == str(tmp_path / "k")
    assert [len(found.splits[s][0]) for s in ("train", "val")] == [12, 6]
    assert scan(tmp_path / "k", csv_file).fingerprint == found.fingerprint  # data may be the CSV's folder
    ds = load_dataset(None, 16, labels=csv_file)
    assert len(ds.labelled) == 18 and len(ds.holdout.val) == 6 and ds.fingerprint == found.fingerprint
    flat = scan(None, _csv_set(tmp_path / "flat", split=False))
    assert flat.flat and list(flat.splits) == ["train"] and len(flat.splits["train"][0]) == 18


def test_train_and_search_take_labels_from_a_csv(tmp_path, monkeypatch):
    _csv_set(tmp_path / "k")
    monkeypatch.chdir(tmp_path)
    assert main(["-q", "train", "--labels", "k/labels.csv", *FAST, "--out", "run"]) == 0
    assert main(["-q", "search", "--labels", "k/labels.csv", "--data", "k", *FAST, "--trials", "1"]) == 0
    best = (tmp_path / "studies" / "autoft" / "best.yaml").read_text()
    assert f"labels: {tmp_path / 'k' / 'labels.csv'}" in best  # stored absolute, like data


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "labels.csv is empty; expected a header path,label[,split]"),
        ("path,label\n", "labels.csv has a header but no rows"),
        (
            "file,class\na.png,cat\n",
            "labels.csv has no 'path' column (its header: file,class); expected path,label[,split], "
            "or name yours with --path-column and --label-column",
        ),
        (
            "path,Label,LABEL\nimages/0000.png,cat,dog\n",
            "labels.csv: columns 2 ('Label') and 3 ('LABEL') both match the label column 'label'; rename one, or pass "
            "--label-column with the exact name of the one to use",
        ),
        (
            "path,label,label\nimages/0000.png,cat,dog\n",
            "labels.csv: columns 2 ('label') and 3 ('label') both match the label column 'label'; rename one",
        ),
        (
            "path,label,split\nimages/0000.png,cat,train\nnope.png,dog,train\n",
            "labels.csv line 3: image 'nope.png' does not exist (paths are relative to ",
        ),
        (
            "path,label,split\nimages/0000.png,cat,holdout\n",
            "labels.csv line 2: split 'holdout' is not train, val (validation, valid, dev) or test",
        ),
        (
            "path,label\nimages/0000.png,cat\nimages/0001.png,cat\n",
            "has 1 class(es) in its train rows; a classifier needs",
        ),
        (
            "path,label\nimages/0000.png,cat\nimages/0001.png,cat\nimages/0002.png,dog\n",
            "class 'dog' has one training image; a validation split needs at least two",
        ),
        (
            "path,label,split\nimages/0000.png,cat,train\nimages/0001.png,dog,train\nimages/0002.png,bird,val\n",
            "labels.csv line 4: class 'bird' is in val but has no train rows",
        ),
        (
            "path,label\nimages/0000.png,cat\nimages/0000.png,dog\n",
            "labels.csv line 3: 'images/0000.png' is listed twice",
        ),
    ],
)
def test_csv_mistakes_are_one_line_naming_the_line(tmp_path, text, message):
    _csv_set(tmp_path / "k")
    (tmp_path / "k" / "labels.csv").write_text(text)
    with pytest.raises(DataError) as err:
        load_dataset(None, 16, labels=tmp_path / "k" / "labels.csv")
    assert message in str(err.value) and "\n" not in str(err.value)


def test_data_with_labels_must_be_the_csv_folder(tmp_path):
    from autoft.exceptions import ConfigError

    csv_file = _csv_set(tmp_path / "k")
    with pytest.raises(ConfigError, match="is not the folder of the labels file .*; leave out data"):
        scan(tmp_path, csv_file)


# --- evaluate on new data ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_evaluate_scores_new_data_whole_and_says_seen_only_when_it_is(tmp_path, monkeypatch, capsys):
    from autoft.results.predict import evaluate

    make_image_folder(tmp_path / "d", per_class=6, splits=("train", "val", "test"))
    make_image_folder(tmp_path / "new", per_class=10, splits=("train",), seed=7)  # 20 new images
    shutil.move(tmp_path / "new" / "train", tmp_path / "new_flat")  # class folders only, no train/
    monkeypatch.chdir(tmp_path)
    assert main(["-q", "train", "--data", "d", *FAST, "--out", "run"]) == 0  # 5-fold CV: val trained fold models

    ev = evaluate("run/model.pt", "new_flat")
    assert (ev["split"], ev["n"], ev["seen_in_training"]) == ("all", 20, False)  # every image, none seen
    assert evaluate("run/model.pt", "d/train")["seen_in_training"]  # its own train/ folder, as new data: seen
    assert evaluate("run/model.pt", "d/train")["split"] == "all"
    ev = evaluate("run/model.pt")
    assert (ev["split"], ev["n"], ev["seen_in_training"]) == ("val", 6, True)  # cross-validation trained on val
    ev = evaluate("run/model.pt", split="test")
    assert (ev["n"], ev["seen_in_training"]) == (6, False)
    shutil.copytree("d", "copy")
    assert evaluate("run/model.pt", "copy", split="test")["seen_in_training"] is False
    assert evaluate("run/model.pt", "copy")["seen_in_training"] is True  # the same data elsewhere

    _csv_set(tmp_path / "k", split=False)
    ev = evaluate("run/model.pt", labels_csv="k/labels.csv")
    assert (ev["split"], ev["n"], ev["seen_in_training"]) == ("all", 18, False)
    capsys.readouterr()
    (tmp_path / "new_flat" / "cat" / ".DS_Store").write_text("x")
    assert main(["evaluate", "--model", "run/model.pt", "--data", "new_flat"]) == 0
    out, err = capsys.readouterr()
    assert "all: 20 images from new_flat" in out and "trained on these" not in err
    assert err.count("skipped 1 hidden file") == 1, err  # said once, though the layout is read before the images


def test_a_small_class_is_one_notice_not_library_warnings(tmp_path, monkeypatch, capsys):
    root = make_image_folder(tmp_path / "d", per_class=4)
    for p in sorted((root / "train" / "dog").iterdir())[1:]:
        p.unlink()
    shutil.rmtree(root / "val" / "dog")  # one dog picture in all, and a val/ folder
    monkeypatch.chdir(tmp_path)
    with __import__("warnings").catch_warnings(record=True) as caught:
        __import__("warnings").simplefilter("always")
        assert main(["search", "--data", "d", *FAST, "--trials", "3", "--epochs", "2"]) == 0
    err = capsys.readouterr().err
    notice = (
        "class 'dog' has 1 labelled image: cross-validation uses 2 folds, not 5, and 'dog' is validated in only one"
    )
    assert err.count(notice) == 1, err
    assert "least populated class" not in err and not [w for w in caught if "least populated" in str(w.message)]


# --- a Kaggle-style set as it ships: class folders of images and split CSVs with their own header -------------

KAGGLE_HEADER = ",Filename,Label,ClassName"
KAGGLE_COLUMNS = ["--path-column", "Filename", "--label-column", "ClassName"]


def _kaggle_set(root: Path, per_class: int = 8) -> Path:
    """root/<class>/*.png and train.csv, validation.csv, test.csv (half, a quarter and a quarter of each class),
    with Kaggle's header: an unnamed index column, the path, an integer Label and the class name."""
    make_image_folder(root / "src", classes=("cat", "dog"), per_class=per_class, splits=("train",))
    rows = {"train": [], "validation": [], "test": []}
    for y, c in enumerate(("cat", "dog")):
        shutil.move(root / "src" / "train" / c, root / c)
        for i, p in enumerate(sorted((root / c).iterdir())):
            split = "train" if i < per_class // 2 else "validation" if i < 3 * per_class // 4 else "test"
            rows[split].append(f"{c}/{p.name},{y},{c}")
    shutil.rmtree(root / "src")
    for split, lines in rows.items():
        numbered = [f"{i},{r}" for i, r in enumerate(lines)]
        (root / f"{split}.csv").write_text("\n".join([KAGGLE_HEADER, *numbered]) + "\n")
    return root


def _split_files(root: Path) -> list[str]:
    return [
        "--labels",
        str(root / "train.csv"),
        "--val-labels",
        str(root / "validation.csv"),
        "--test-labels",
        str(root / "test.csv"),
    ]


def test_an_exact_column_name_wins_over_one_equal_only_case_folded(tmp_path, monkeypatch):
    """The user's `label` (class names) beside Kaggle's integer `Label`: the classes are the names, in the model."""
    root = _kaggle_set(tmp_path / "k")
    merged = [f"{KAGGLE_HEADER},path,label,split"]
    for split in ("train", "validation", "test"):
        for line in (root / f"{split}.csv").read_text().splitlines()[1:]:
            _, name, _, c = line.split(",")
            merged.append(f"{line},{name},{c},{split}")
    (root / "all.csv").write_text("\n".join(merged) + "\n")
    assert scan(None, root / "all.csv").classes == ["cat", "dog"]
    monkeypatch.chdir(tmp_path)
    assert main(["-q", "train", "--labels", "k/all.csv", *FAST, "--out", "run"]) == 0
    assert load_checkpoint("run/model.pt")["classes"] == ["cat", "dog"]
    # `Path` alone (no exact match) is still the path column, as before
    (root / "upper.csv").write_text("Path,Label\n" + "".join(",".join(r.split(",")[1:4:2]) + "\n" for r in merged[1:]))
    assert scan(None, root / "upper.csv").classes == ["cat", "dog"]


@pytest.mark.slow
def test_the_kaggle_layout_trains_as_shipped_with_column_flags_and_three_split_files(tmp_path, monkeypatch, capsys):
    from autoft.results.predict import evaluate

    root = _kaggle_set(tmp_path / "k")
    monkeypatch.chdir(tmp_path)
    assert main(["train", *_split_files(Path("k")), *KAGGLE_COLUMNS, *FAST, "--out", "run"]) == 0
    out = capsys.readouterr().out
    assert "test accuracy" in out and "4 images)" in out  # test.csv scored: 2 per class
    ckpt = load_checkpoint("run/model.pt")
    assert ckpt["classes"] == ["cat", "dog"]
    found = scan(None, scan_module.Labels("k/train.csv", "k/validation.csv", "k/test.csv", "Filename", "ClassName"))
    assert [len(found.splits[s][0]) for s in ("train", "val", "test")] == [8, 4, 4] and not found.flat
    assert trained_on(ckpt) == found.fingerprint
    # the same images listed in one file with a split column are the same data (a study resumes on either)
    lines = ["path,label,split"] + [
        f"{r.split(',')[1]},{r.split(',')[3]},{s}"
        for s in ("train", "validation", "test")
        for r in (root / f"{s}.csv").read_text().splitlines()[1:]
    ]
    (root / "one.csv").write_text("\n".join(lines) + "\n")
    assert scan(None, root / "one.csv").fingerprint == found.fingerprint

    assert main(["-q", "search", *_split_files(Path("k")), *KAGGLE_COLUMNS, *FAST, "--trials", "1"]) == 0
    best = yaml.safe_load((tmp_path / "studies" / "autoft" / "best.yaml").read_text())
    assert (best["labels"], best["val_labels"], best["test_labels"]) == tuple(
        str(root / f"{s}.csv") for s in ("train", "validation", "test")
    )  # absolute, so it trains from anywhere
    assert (best["path_column"], best["label_column"]) == ("Filename", "ClassName")
    from autoft.results import records

    joined = records.read_study_meta(optuna.load_study(study_name="autoft", storage="sqlite:///studies/autoft.db")).base
    assert (joined.val_labels, joined.label_column) == (best["val_labels"], "ClassName")  # what a worker reads
    assert main(["-q", "search", *_split_files(Path("k")), *KAGGLE_COLUMNS, *FAST, "--trials", "1"]) == 0  # resumes
    assert main(["-q", "search", "--labels", "k/one.csv", *FAST, "--trials", "1"]) == 0  # the same data, one file
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert (
        main(
            [
                "-q",
                "train",
                "--config",
                str(tmp_path / "studies" / "autoft" / "best.yaml"),
                "--epochs",
                "1",
                "--out",
                "again",
            ]
        )
        == 0
    )
    assert load_checkpoint("again/model.pt")["classes"] == ["cat", "dog"]
    ev = evaluate("again/model.pt", labels_csv=root / "test.csv")
    assert (ev["split"], ev["n"], ev["seen_in_training"]) == ("all", 4, False)  # the model's columns read it


@pytest.mark.parametrize("split", ["validation", "Valid", "dev", "val"])
def test_validation_valid_and_dev_are_the_val_split(tmp_path, split):
    csv_file = _csv_set(tmp_path / "k")
    text = csv_file.read_text()
    csv_file.write_text(text.replace(",val\n", f",{split}\n"))
    found = scan(None, csv_file)
    assert [len(found.splits[s][0]) for s in ("train", "val")] == [12, 6]


@pytest.mark.parametrize(
    "files, message",
    [
        (
            {"test.csv": ",Filename,Label,ClassName\n0,cat/nope.png,0,cat\n"},
            "test.csv line 2: image 'cat/nope.png' does not exist (paths are relative to ",
        ),
        (
            {"test.csv": ",Filename,Label,ClassName\n0,cat/000.png,0,cat\n"},
            "test.csv line 2: 'cat/000.png' is listed twice (also on line 2 of ",
        ),
        (
            {"validation.csv": ",Filename,Label,ClassName\n0,cat/004.png,0,bird\n"},
            "validation.csv line 2: class 'bird' is in val but has no train rows",
        ),
        (
            {"validation.csv": "Filename,ClassName,split\ncat/004.png,cat,test\n"},
            "validation.csv line 2: split 'test' in the val labels file (--val-labels); it lists val rows only",
        ),
        ({"test.csv": ",Filename,Label,ClassName\n"}, "test.csv has a header but no rows"),
        (
            {"test.csv": "Filename,Label\ncat/006.png,0\n"},
            "test.csv has no 'ClassName' column (--label-column; its header: Filename,Label)",
        ),
    ],
)
def test_the_checks_hold_across_the_split_files(tmp_path, files, message):
    root = _kaggle_set(tmp_path / "k")
    for name, text in files.items():
        (root / name).write_text(text)
    with pytest.raises(DataError) as err:
        scan(
            None,
            scan_module.Labels(*(root / f"{s}.csv" for s in ("train", "validation", "test")), "Filename", "ClassName"),
        )
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_data_folder_with_split_csvs_beside_its_class_folders_says_so(tmp_path, monkeypatch, capsys):
    _kaggle_set(tmp_path / "k")
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--data", "k", *FAST, "--out", "run"]) == 0
    err = capsys.readouterr().err
    hint = (
        "k holds train.csv, validation.csv, test.csv, which look like lists of splits, but --data reads every "
        "image in its class folders as labelled, test rows included; to use their splits, pass --labels "
        "k/train.csv --val-labels k/validation.csv --test-labels k/test.csv --path-column Filename "
        "--label-column NAME (one of Label, ClassName) instead of --data"
    )
    assert err.count(hint) == 1, err
    for split in ("train", "validation", "test"):
        (tmp_path / "k" / f"{split}.csv").unlink()
    (tmp_path / "k" / "labels.csv").write_text("path,label,split\ncat/000.png,cat,train\n")  # one file, split column
    assert scan_module.split_lists_hint(Path("k")) == (
        "k holds labels.csv, which looks like a list of splits, but --data reads every image in its class folders as "
        "labelled, test rows included; to use their splits, pass --labels k/labels.csv instead of --data"
    )
    make_image_folder(tmp_path / "plain", per_class=3, splits=("train",))
    (tmp_path / "plain" / "train" / "notes.csv").write_text("a,b\n1,2\n")  # no split list: nothing said
    assert main(["train", "--data", "plain/train", *FAST, "--out", "run2"]) == 0
    assert "look like lists of splits" not in capsys.readouterr().err
