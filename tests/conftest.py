"""Shared fixtures: every test gets its own image cache and tiny, learnable image folders made on the fly."""

from __future__ import annotations

import signal
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:  # a background job (`make test &`): Ctrl-C as in a terminal,
    signal.signal(signal.SIGINT, signal.default_int_handler)  # here and in the CLI subprocesses the tests signal


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("AUTOFT_CACHE", str(tmp_path_factory.mktemp("cache")))
    yield


def make_image_folder(
    root: Path,
    classes=("cat", "dog"),
    per_class: int = 12,
    splits=("train", "val"),
    size: int = 24,
    seed: int = 0,
    ext: str = ".png",
) -> Path:
    """Learnable classes: class i is a bright square in quadrant i on noise, so a tiny CNN separates them."""
    rng = np.random.default_rng(seed)
    for split in splits:
        n = per_class if split == "train" else max(2, per_class // 2)
        for ci, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                img = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
                q = size // 2
                y0, x0 = (ci // 2 % 2) * q, (ci % 2) * q
                img[y0 : y0 + q, x0 : x0 + q] = rng.integers(180, 255, 3, dtype=np.uint8)
                Image.fromarray(img).save(folder / f"{i:03d}{ext}")
    return root


@pytest.fixture
def image_folder(tmp_path) -> Path:
    return make_image_folder(tmp_path / "data")


@pytest.fixture
def tiny_config(image_folder):
    """A Config for fast CPU runs: tiny_cnn backbone at 32 px."""
    from autoft.config import Config

    return Config(
        data=str(image_folder),
        backbone="tiny_cnn",
        image_size=32,
        batch_size=8,
        epochs=3,
        head_lr=0.05,
        base_lr=0.01,
        device="cpu",
        aug_strength=0.0,
    )


def make_read_only(path: Path) -> "callable":
    """Make a folder and everything in it unwritable for this process; returns the undo.

    chmod is enough for a normal user; root ignores permission bits, so as root the files are made immutable
    (chattr +i), which binds root too. Skips the test where neither works.
    """
    import os
    import shutil
    import subprocess

    if os.geteuid() != 0:
        modes = {p: p.stat().st_mode for p in [path, *path.rglob("*")]}
        for p in sorted(modes, key=lambda p: -len(p.parts)):
            p.chmod(modes[p] & ~0o222)

        def undo():
            for p, mode in modes.items():
                p.chmod(mode)

        return undo
    if (
        shutil.which("chattr") is None
        or subprocess.run(["chattr", "-R", "+i", str(path)], capture_output=True).returncode
    ):
        subprocess.run(["chattr", "-R", "-i", str(path)], capture_output=True)
        pytest.skip("cannot make a folder read-only for root here (no chattr, or a file system without +i)")
    return lambda: subprocess.run(["chattr", "-R", "-i", str(path)], check=True)


@pytest.fixture
def read_only():
    """`read_only(path)` makes `path` unwritable until the test ends."""
    undo = []
    yield lambda path: undo.append(make_read_only(Path(path)))
    for u in reversed(undo):
        u()


def search_args(data: Path, *more: str, epochs: int = 2) -> list[str]:
    """`autoft search` on `data` with tiny_cnn at 32 px on the CPU, small batches: seconds a trial."""
    return [
        "-q",
        "search",
        "--data",
        str(data),
        "--backbone",
        "tiny_cnn",
        "--image-size",
        "32",
        "--epochs",
        str(epochs),
        "--device",
        "cpu",
        "--batch-size",
        "8",
        *more,
    ]
