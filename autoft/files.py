"""Atomic writes: a file is either its old version or its new one, never half of each.

Every file autoft writes (exports, checkpoints, the report, the decoded-image cache) goes through
`atomic_open`, so an interrupted run, or another process reading at the same moment, never sees a torn file.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike) -> Iterator[IO[bytes]]:
    """A binary file to write; it replaces `path` only when the block ends without an error.

    Writers stream into it (a large cache entry is never held twice in memory); flushed and fsynced
    before the rename, so a crash right after leaves the new file, not an empty one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_open(path) as fh:
        fh.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_torch_save(path: str | os.PathLike, obj: Any) -> None:
    import torch

    with atomic_open(path) as fh:
        torch.save(obj, fh)


def atomic_joblib_dump(path: str | os.PathLike, obj: Any) -> None:
    import joblib

    with atomic_open(path) as fh:
        joblib.dump(obj, fh)


def versions() -> dict[str, str]:
    """Package versions written into every export, so a result says what produced it."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("autoft", "torch", "torchvision", "timm", "optuna"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out
