"""Bad inputs through the real CLI: each is one line on stderr, exit status 2, and the study and exports untouched."""

from __future__ import annotations

import hashlib
import os
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import autoft.data
from autoft.cli import main

from conftest import make_image_folder

BASE = ["search", "--data", "data", "--backbone", "tiny_cnn", "--image-size", "32", "--epochs", "1", "--trials", "1",
        "--device", "cpu", "--batch-size", "8"]


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
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0))
                     + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


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
    "study exists with another space": (_file("s.yaml", "head_lr: {low: 0.001, high: 0.01}\n", "--space"),
                                        "different search space"),
    "weights not a state dict": (_weights([1, 2, 3]), "not a state dict"),
    "pickled code in checkpoint": (_weights({"state_dict": _Evil()}), "weights_only"),
    "--head-lr .nan": (lambda root: ["--head-lr", ".nan"], "config key 'head_lr': nan is not a finite number"),
    "--weight-decay .nan": (lambda root: ["--weight-decay", ".nan"], "config key 'weight_decay': nan is not a finite number"),
    "--val-fraction .nan": (lambda root: ["--val-fraction", ".nan"], "config key 'val_fraction': nan is not a finite number"),
    "space with .nan": (_file("s.yaml", "head_lr: .nan\n", "--space"), "search space: head_lr: nan is not a finite number"),
    "class folder linked to train/": (_data(_class_linked_to_train), "bad/train/all resolves to"),
}


def _fingerprint(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input(case, baseline, tmp_path, monkeypatch, capsys):
    setup, expected = CASES[case]
    root = tmp_path / "run"
    shutil.copytree(baseline, root, ignore=shutil.ignore_patterns("cache"))
    monkeypatch.chdir(root)
    extra = setup(root)
    before = _fingerprint(root / "studies")

    code = main([*BASE, *extra])
    out, err = capsys.readouterr()
    assert code == 2, out + err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("autoft: error: "), err
    assert expected in lines[0]
    assert _fingerprint(root / "studies") == before, "the study or its exports changed"
    assert "secret" not in out + err
    assert not (root / "pwned").exists(), "a pickled checkpoint ran code"
