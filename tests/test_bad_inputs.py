"""Bad inputs through the real CLI: each is one line on stderr, exit status 2, and the study and exports untouched."""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import socket
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_image_folder
from PIL import Image

from autoft.cli import main

BASE = [
    "search",
    "--data",
    "data",
    "--backbone",
    "tiny_cnn",
    "--image-size",
    "32",
    "--epochs",
    "1",
    "--trials",
    "1",
    "--device",
    "cpu",
    "--batch-size",
    "8",
]


@pytest.fixture(scope="module")
def baseline(tmp_path_factory) -> Path:
    """A folder holding data/ and a finished one-trial study with all its exports, searched with BASE."""
    root = tmp_path_factory.mktemp("baseline")
    make_image_folder(root / "data", per_class=6)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AUTOFT_CACHE", str(root / "cache"))
        mp.chdir(root)
        assert main(["-q", *BASE]) == 0
    assert (root / "studies" / "autoft" / "best.yaml").is_file()
    return root


def _png_10k(path: Path) -> None:
    """A valid 10,000 x 10,000 1-bit PNG written row by row: a few kB on disk, 100 megapixels when decoded."""
    side = 10_000

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    z = zlib.compressobj(9)
    row = b"\x00" + bytes((side + 7) // 8)
    idat = b"".join(z.compress(row) for _ in range(side)) + z.flush()
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0))
        + chunk(b"IDAT", idat)
        + chunk(b"IEND", b"")
    )


def _with_bad_image(name: str, write) -> callable:
    def setup(root: Path) -> list[str]:
        shutil.copytree(root / "data", root / "bad")
        write(root / "bad" / "train" / "cat" / name)
        return ["--data", "bad"]

    return setup


def _data(build) -> callable:
    def setup(root: Path) -> list[str]:
        build(root / "bad")
        return ["--data", "bad"]

    return setup


def _file(name: str, text: str, flag: str) -> callable:
    def setup(root: Path) -> list[str]:
        (root / name).write_text(text)
        return [flag, name]

    return setup


class _Evil:
    def __reduce__(self):
        return exec, ("open('pwned', 'w').write('code ran')",)


def _weights(obj) -> callable:
    def setup(root: Path) -> list[str]:
        torch.save(obj, root / "w.pt")
        return ["--weights", "w.pt"]

    return setup


def _truncated_png(path: Path) -> None:
    Image.fromarray(np.full((40, 40, 3), 128, np.uint8)).save(path)
    path.write_bytes(path.read_bytes()[:-60])


def _empty_class(root: Path) -> None:
    make_image_folder(root, per_class=4)
    shutil.rmtree(root / "train" / "dog")
    (root / "train" / "dog").mkdir()


def _class_linked_to_train(root: Path) -> None:
    make_image_folder(root, per_class=4)
    (root / "train" / "all").symlink_to("../train", target_is_directory=True)  # a class holding every image


_LOCK: list = []  # the test's `read_only` and `monkeypatch` fixtures, for the rows that need them


def _read_only(folder: str) -> callable:
    def setup(root: Path) -> list[str]:
        _LOCK[0](root / folder)
        return []

    return setup


def _cache_at(folder: str, lock: bool = False) -> callable:
    """$AUTOFT_CACHE pointing at `folder` under the run's root (made read-only with `lock`)."""

    def setup(root: Path) -> list[str]:
        (root / "f").write_text("a file, not a folder\n")
        (root / "ro").mkdir()
        if lock:
            _LOCK[0](root / "ro")
        _LOCK[1].setenv("AUTOFT_CACHE", str(root / folder))
        return []

    return setup


def _disk_full(err: int) -> callable:
    """Every atomic write (the decoded-image cache first) fails with `err` after 1,000 bytes, as on a full disk."""

    def setup(root: Path) -> list[str]:
        from test_intake import _disk_full_after

        _LOCK[1].setenv("AUTOFT_CACHE", str(root / "fresh_cache"))
        _disk_full_after(_LOCK[1], 1000, err)
        return []

    return setup


def _in_the_way(flag: str, value: str = "f") -> callable:
    """A plain file where the flag's folder (or a folder on its path) should be."""

    def setup(root: Path) -> list[str]:
        (root / "f").write_text("a file, not a folder\n")
        return [flag, value]

    return setup


def _bytes(name: str, data: bytes, flag: str) -> callable:
    def setup(root: Path) -> list[str]:
        (root / name).write_bytes(data)
        return [flag, name]

    return setup


def _changed_data(change) -> callable:
    """The study's own data/ folder, changed since the baseline study was searched on it."""

    def setup(root: Path) -> list[str]:
        change(root / "data")
        return []

    return setup


def _add_images(data: Path) -> None:
    for i in range(2):
        shutil.copy(data / "train" / "cat" / "000.png", data / "train" / "cat" / f"new{i}.png")


def _labels(text: str) -> callable:
    """A Kaggle-style set (images/ and labels.csv) whose CSV is `text`; images/0000.png ... exist."""

    def setup(root: Path) -> list[str]:
        from test_intake import _csv_set

        _csv_set(root / "k")
        (root / "k" / "labels.csv").write_text(text)
        return ["--labels", "k/labels.csv", "--data", "k"]

    return setup


def _flags(*args: str) -> callable:
    return lambda root: list(args)


CASES = {
    "missing data folder": (lambda root: ["--data", "no/such/folder"], "does not exist"),
    "one class": (_data(lambda d: make_image_folder(d, classes=("cat",), per_class=4)), "at least two"),
    "empty class": (_data(_empty_class), "holds no images"),
    "corrupt JPEG": (_with_bad_image("x.jpg", lambda p: p.write_bytes(b"\xff\xd8\xff\xe0" + os.urandom(300))), "x.jpg"),
    "truncated PNG": (_with_bad_image("x.png", _truncated_png), "x.png"),
    "text file named .jpg": (_with_bad_image("x.jpg", lambda p: p.write_text("not an image")), "x.jpg"),
    "1x1 image": (_with_bad_image("x.png", lambda p: Image.new("RGB", (1, 1)).save(p)), "too small"),
    "10000x10000 image": (_with_bad_image("x.png", _png_10k), "too large"),
    "invalid YAML": (_file("c.yaml", "epochs: [1, 2\n", "--config"), "not valid YAML"),
    "unknown key": (_file("c.yaml", "learning_rate: 0.1\n", "--config"), "unknown config key 'learning_rate'"),
    "wrong type": (_file("c.yaml", "head_lr: fast\n", "--config"), "expected a number"),
    "low > high": (_file("s.yaml", "head_lr: {low: 0.1, high: 0.001}\n", "--space"), "greater than high"),
    "unknown backbone": (lambda root: ["--backbone", "no_such_net"], "unknown backbone 'no_such_net'"),
    "unreachable storage": (lambda root: ["--storage", "postgresql://u:secret@127.0.0.1:1/db"], "u:***@127.0.0.1:1/db"),
    "study exists with another space": (
        _file("s.yaml", "head_lr: {low: 0.001, high: 0.01}\n", "--space"),
        "different search space",
    ),
    "weights not a state dict": (_weights([1, 2, 3]), "not a state dict"),
    "pickled code in checkpoint": (_weights({"state_dict": _Evil()}), "weights_only"),
    "--head-lr .nan": (lambda root: ["--head-lr", ".nan"], "config key 'head_lr': nan is not a finite number"),
    "--weight-decay .nan": (
        lambda root: ["--weight-decay", ".nan"],
        "config key 'weight_decay': nan is not a finite number",
    ),
    "--val-fraction .nan": (
        lambda root: ["--val-fraction", ".nan"],
        "config key 'val_fraction': nan is not a finite number",
    ),
    "space with .nan": (
        _file("s.yaml", "head_lr: .nan\n", "--space"),
        "search space: head_lr: nan is not a finite number",
    ),
    "class folder linked to train/": (_data(_class_linked_to_train), "bad/train/all resolves to"),
    # what a dataset is: its content, whatever its path is called
    "the study's data gained a class": (
        _changed_data(lambda d: make_image_folder(d, classes=("bird",), per_class=4)),
        "/run/data: classes added: 'bird'; train: 4 image(s) more (12 -> 16)",
    ),
    "the study's data gained a class too small for 5 folds": (  # the fold notice would come before the error
        _changed_data(lambda d: make_image_folder(d, classes=("bird",), per_class=2)),
        "classes added: 'bird'",
    ),
    "the study's data gained images": (
        _changed_data(_add_images),
        "train: 2 image(s) more (12 -> 14); use a new --study",
    ),
    "another dataset called data": (
        _changed_data(lambda d: (shutil.rmtree(d), make_image_folder(d, per_class=5))),
        "train: 2 image(s) fewer (12 -> 10); val: 2 image(s) fewer (6 -> 4); use a new --study name",
    ),
    "--data 2024 (no such folder)": (_flags("--data", "2024"), "/run/2024' does not exist"),
    "--data $UNSET_X/photos": (
        _flags("--data", "$UNSET_X/photos"),
        "config key 'data': environment variable $UNSET_X in '$UNSET_X/photos' is not set",
    ),
    "weights: $UNSET_X/w.pt in a file": (
        _file("c.yaml", "weights: $UNSET_X/w.pt\n", "--config"),
        "config key 'weights': environment variable $UNSET_X",
    ),
    # labels from a CSV: the same checks as folders, naming the line
    "labels CSV empty": (_labels(""), "labels.csv is empty"),
    "labels CSV without a label column": (_labels("path,class\nimages/0000.png,cat\n"), "has no 'label' column"),
    "labels CSV names a missing image": (
        _labels("path,label\nimages/0000.png,cat\nimages/x.png,dog\n"),
        "labels.csv line 3: image 'images/x.png' does not exist",
    ),
    "labels CSV lists an image twice as ./path": (
        _labels("path,label\nimages/0000.png,cat\n./images/0000.png,dog\n"),
        "labels.csv line 3: './images/0000.png' is listed twice (also on line 2)",
    ),
    "labels CSV lists an image twice as a/../path": (
        _labels("path,label\nimages/0000.png,cat\nimages/../images/0000.png,cat\n"),
        "is listed twice (also on line 2)",
    ),
    "labels CSV names a folder": (
        _labels("path,label\nimages/0000.png,cat\nimages,dog\n"),
        "labels.csv line 3: 'images' is a folder, not an image",
    ),
    "labels CSV with split holdout": (
        _labels("path,label,split\nimages/0000.png,cat,holdout\n"),
        "labels.csv line 2: split 'holdout' is not train, val (validation, valid, dev) or test",
    ),
    "labels CSV with Label and LABEL": (
        _labels("path,Label,LABEL\nimages/0000.png,cat,dog\n"),
        "labels.csv: columns 2 ('Label') and 3 ('LABEL') both match the label column",
    ),
    "labels CSV without the named column": (
        lambda root: [*_labels("path,label\n")(root), "--path-column", "Filename"],
        "labels.csv has no 'Filename' column (--path-column; its header: path,label)",
    ),
    "--val-labels without --labels": (
        _flags("--val-labels", "v.csv"),
        "config key 'val_labels' needs 'labels' too: the CSV of the train rows",
    ),
    "val rows in two files": (
        lambda root: [
            *_labels("path,label,split\nimages/0000.png,cat,train\nimages/0001.png,dog,validation\n")(root),
            "--val-labels",
            "k/labels.csv",
        ],
        "labels.csv line 3: a val row, but the val rows come from /",
    ),  # absolute: as stored
    "labels CSV with one class": (
        _labels("path,label\nimages/0000.png,cat\nimages/0001.png,cat\n"),
        "a classifier needs at least two",
    ),
    "labels CSV with a one-image class": (
        _labels("path,label\nimages/0000.png,cat\nimages/0001.png,cat\nimages/0002.png,dog\n"),
        "class 'dog' has one training image",
    ),
    "labels CSV is missing": (
        _flags("--labels", "nope.csv", "--data", "."),
        "/run/nope.csv' does not exist; expected a CSV with columns path,label[,split]",
    ),
    "--data is not the CSV's folder": (
        lambda root: _labels("path,label\n")(root)[:2],  # --data data, from BASE
        "/run/data' is not the folder of the labels file ",
    ),
    # outputs, checked before any data is read or trial run
    "read-only studies/": (_read_only("studies"), "is not writable"),
    "--out is a file": (_in_the_way("--out"), "--out f is a file, not a folder"),
    "--out inside a file": (_in_the_way("--out", "f/exports"), "--out f/exports: f is a file, not a folder"),
    "--artifacts is a file": (_in_the_way("--artifacts"), "--artifacts f is a file, not a folder"),
    "storage folder is a file": (_in_the_way("--storage", "sqlite:///f/x.db"), "f is a file, not a folder"),
    "storage under /proc": (_flags("--storage", "sqlite:////proc/autoft/x.db"), "/proc"),
    "journal under /proc": (_flags("--storage", "journal:/proc/autoft/x.log"), "/proc"),
    # the decoded-image cache and the disk, before or when it happens
    "$AUTOFT_CACHE read-only": (_cache_at("ro/cache", lock=True), "image cache (AUTOFT_CACHE) "),
    "$AUTOFT_CACHE is a file": (_cache_at("f"), "image cache (AUTOFT_CACHE) "),
    "disk full while caching": (_disk_full(errno.ENOSPC), "No space left on device (ENOSPC)"),
    "file too large while caching": (_disk_full(errno.EFBIG), "File too large (EFBIG)"),
    # config files and search settings
    "binary --config": (_bytes("c.yaml", b"\x89PNG\r\n\x1a\n\x00\xff\xfe", "--config"), "not a text (UTF-8) YAML file"),
    "--config with NUL bytes": (_bytes("c.yaml", b"epochs: 1\n\x00\x01", "--config"), "unacceptable character #x0000"),
    "--config is a folder": (_flags("--config", "data"), "config file 'data' is a folder"),
    "search: {trials: two}": (
        _file("c.yaml", "search: {trials: two}\n", "--config"),
        "c.yaml: search setting 'trials': expected an integer, got 'two'",
    ),
    "unknown search: key": (
        _file("c.yaml", "search: {trails: 3}\n", "--config"),
        "c.yaml: unknown search setting 'trails'",
    ),
    "search: not a mapping": (_file("c.yaml", "search: [1]\n", "--config"), "c.yaml: 'search' must be a mapping"),
    "--trials two": (_flags("--trials", "two"), "search setting 'trials': expected an integer, got 'two'"),
    "--trials -1": (_flags("--trials", "-1"), "search setting 'trials': -1 is out of range (>= 0)"),
    "--min-epochs 0": (_flags("--min-epochs", "0"), "search setting 'min_epochs': 0 is out of range (>= 1)"),
    "--startup-trials -1": (
        _flags("--startup-trials", "-1"),
        "search setting 'startup_trials': -1 is out of range (>= 0)",
    ),
    "--timeout -1": (_flags("--timeout", "-1"), "search setting 'timeout': -1.0 is out of range (> 0)"),
    "--timeout .inf": (_flags("--timeout", ".inf"), "search setting 'timeout': '.inf' is not a finite number"),
    "--workers 0": (_flags("--workers", "0"), "search setting 'workers': 0 is out of range (>= 1)"),
    "--sampler bogus": (_flags("--sampler", "bogus"), "search setting 'sampler': 'bogus' is not one of tpe"),
    # study names: never a path outside studies/
    "--study ..": (_flags("--study", ".."), "study name '..' is not allowed"),
    "--study with a newline": (_flags("--study", "a\nb"), "study name 'a\\nb' is not allowed"),
    "--study a/b": (_flags("--study", "a/b"), "study name 'a/b' is not allowed"),
    "--study .hidden": (_flags("--study", ".hidden"), "not starting with '.'"),
    # a backbone whose pretrained weights cannot be downloaded (TORCH_HOME is empty, the network unreachable)
    "offline torchvision backbone": (_flags("--backbone", "resnet18"), "resnet18-f37072fd.pth: not in "),
}


def _fingerprint(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def offline(monkeypatch, root: Path) -> None:
    """No pretrained weights cached, and no network at all: every socket connection is refused before it leaves
    the process, so a download fails at once, as on a machine offline (and no test ever reaches the internet)."""
    monkeypatch.setenv("TORCH_HOME", str(root / "torch_home"))

    def refuse(*args, **kwargs):
        raise ConnectionRefusedError("network disabled in tests")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_bad_input(case, baseline, tmp_path, monkeypatch, capsys, read_only):
    setup, expected = CASES[case]
    root = tmp_path / "run"
    shutil.copytree(baseline, root, ignore=shutil.ignore_patterns("cache"))
    monkeypatch.chdir(root)
    offline(monkeypatch, root)
    _LOCK[:] = [read_only, monkeypatch]
    extra = setup(root)
    before = _fingerprint(root / "studies")

    code = main([*BASE, *extra])
    out, err = capsys.readouterr()
    assert code == 2, out + err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("autoft: error: "), err
    assert expected in lines[0], lines[0]
    assert _fingerprint(root / "studies") == before, "the study or its exports changed"
    assert not (root / "torch_home" / "hub" / "checkpoints").is_dir() or not any(
        (root / "torch_home" / "hub" / "checkpoints").iterdir()
    )
    assert "secret" not in out + err
    assert not (root / "pwned").exists(), "a pickled checkpoint ran code"
