"""Atomic writes: a file is either its old version or its new one, never half of each.

Every file autoft writes (exports, checkpoints, the report and its PNGs, TorchScript and ONNX models, the
decoded-image store, artifacts) goes through `atomic_open` or `atomic_path`, so an interrupted run, or another
process reading at the same moment, never sees a torn file. Their temporary files are created like any other file
(mode 0666 less the umask, so 0644 under the usual 022), are removed when the write fails for any reason (Ctrl-C,
SIGTERM and SystemExit included; a full disk is then a one-line DiskFullError naming the file), and carry their
writer in their name (this machine, pid and process start time), so one left behind by a process killed mid-write
(kill -9, power loss) is removed by the next run that looks at its folder (`sweep_temps`, called by the up-front
checks below) as soon as its writer is gone for sure; one from another machine once it is STALE_TMP_S old.

Also the up-front checks that an output location can be written (`check_writable_dir`, `check_output_file`),
so a command fails in its first second rather than after training.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import secrets
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any

from ..exceptions import ConfigError, DiskFullError, disk_full
from .interrupts import deferred
from .processes import start_time, this_machine

STALE_TMP_S = 3600  # a temp file of another machine's untouched this long belongs to a dead writer
_TEMP = re.compile(
    r"\.(?P<name>.+)\.[A-Za-z0-9_]{6,16}(?:\.(?P<machine>[0-9a-f]{8})-(?P<pid>\d+)-(?P<start>\d+))?\.tmp"
)


def _owner() -> str:
    """This process as its temp files name it: a digest of this machine, the pid and the process's start time."""
    machine = hashlib.sha1(this_machine().encode()).hexdigest()[:8]
    return f"{machine}-{os.getpid()}-{start_time(os.getpid()) or 0}"


def _temp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{secrets.token_hex(6)}.{_owner()}.tmp")


def _create_temp(path: Path) -> tuple[int, Path]:
    """A new, empty temp file next to `path`, created with mode 0666 so that the umask applies (mkstemp's 0600
    would not)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        tmp = _temp_name(path)
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666), tmp
        except FileExistsError:  # 48 random bits taken: try another name
            continue


def _discard(tmp: Path) -> None:
    with contextlib.suppress(OSError):
        os.unlink(tmp)


def _writer_gone(match: re.Match[str], age: float) -> bool:
    """Whether the process that wrote this temp file has ended: for sure when it ran on this machine (its pid is
    free, or now another process's), else (another machine, or a name without its writer) once it is STALE_TMP_S
    old. Earlier versions' names (without a writer) follow the age rule."""
    if match["machine"] is None or match["machine"] != _owner().split("-")[0]:
        return age > STALE_TMP_S
    now = start_time(int(match["pid"]))
    return now is None or (match["start"] != "0" and now not in ("", match["start"]))


def sweep_temps(folder: str | os.PathLike, of: str | None = None) -> list[Path]:
    """Remove the temp files in `folder` (of writes of the file named `of`, or of any) whose writer is gone
    (`_writer_gone`); returns those removed. Never one of a live process: its write goes on."""
    removed, now = [], time.time()
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        match = _TEMP.fullmatch(entry.name)
        if match is None or (of is not None and match["name"] != of):
            continue
        try:
            if _writer_gone(match, now - entry.stat(follow_symlinks=False).st_mtime):
                if entry.is_dir(follow_symlinks=False):  # a `temp_dir`
                    shutil.rmtree(entry.path)
                else:
                    os.unlink(entry.path)
                removed.append(Path(entry.path))
        except OSError:  # gone already (another process swept it), or not ours to remove
            pass
    return removed


def temp_dir(folder: str | os.PathLike) -> tempfile.TemporaryDirectory:
    """A private folder inside `folder` for files that exist only while they are copied elsewhere (an artifact's
    upload); named like a temp file, so `sweep_temps` removes it once its writer is gone."""
    Path(folder).mkdir(parents=True, exist_ok=True)
    return tempfile.TemporaryDirectory(dir=folder, prefix=".upload.", suffix=f".{_owner()}.tmp")


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike) -> Iterator[IO[bytes]]:
    """A binary file to write; it replaces `path` only when the block ends without an error.

    Writers stream into it (a large cache entry is never held twice in memory); flushed and fsynced
    before the rename, so a crash right after leaves the new file, not an empty one.
    """
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        yield fh


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temp file's path for writers that need a file name (torch.jit.save, torch.onnx.export); it replaces
    `path` only when the block ends without an error, so a check inside the block can still refuse it."""
    path = Path(path)
    tmp = None
    try:
        fd, tmp = _create_temp(path)
        os.close(fd)
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp is not None:
            _discard(tmp)
        full = disk_full(exc) if isinstance(exc, Exception) else None
        if full and not isinstance(exc, DiskFullError):  # one line naming the cause, not a traceback
            raise DiskFullError(f"cannot write {path}: {full}; free space on its disk and run again") from exc
        raise
    sweep_temps(path.parent, path.name)


@contextlib.contextmanager
def atomic_paths(paths: Sequence[str | os.PathLike]) -> Iterator[list[Path]]:
    """Temp files for several `paths` that replace them together when the block ends without an error: all the
    writing happens before the first rename, and the renames run with signals deferred (interrupts.deferred), so
    the files are all their old versions or all their new ones (but for a kill -9 between two renames: then the
    next export writes them again). A study's best.pt, best.yaml and trials.csv are published this way."""
    targets, temps = [Path(p) for p in paths], []
    try:
        for path in targets:
            fd, tmp = _create_temp(path)
            os.close(fd)
            temps.append(tmp)
        yield temps
        for tmp in temps:
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
        with deferred():
            for tmp, path in zip(temps, targets):
                os.replace(tmp, path)
        temps.clear()
    except BaseException as exc:
        for tmp in temps:
            _discard(tmp)
        full = disk_full(exc) if isinstance(exc, Exception) else None
        if full and not isinstance(exc, DiskFullError):
            raise DiskFullError(
                f"cannot write {', '.join(map(str, targets))}: {full}; free space and run again"
            ) from exc
        raise
    for path in targets:
        sweep_temps(path.parent, path.name)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_open(path) as fh:
        fh.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_torch_save(path: str | os.PathLike, obj: Any) -> None:
    import torch

    with atomic_open(path) as fh:
        torch.save(obj, fh)


class NpyWriter:
    """The array being written by `atomic_npy` (a writable memmap), and how many leading rows to keep."""

    def __init__(self, array: Any):
        self.array, self.rows = array, len(array)


@contextlib.contextmanager
def atomic_npy(path: str | os.PathLike, shape: tuple[int, ...], dtype: Any) -> Iterator[NpyWriter]:
    """A new .npy of `shape` to fill through a memmap (numpy.lib.format.open_memmap), never whole in memory;
    it replaces `path` only when the block ends without an error. Setting `rows` below shape[0] keeps only
    the leading rows: the header is rewritten in place (numpy pads it for a growing first axis) and the file
    truncated, so no second copy is written."""
    import numpy as np
    from numpy.lib import format as npy

    with atomic_path(path) as tmp:
        writer = NpyWriter(npy.open_memmap(tmp, mode="w+", dtype=dtype, shape=shape))
        offset = writer.array.offset
        if hasattr(os, "posix_fallocate"):  # claim the disk space now: a full disk is an OSError here, not a SIGBUS
            with open(tmp, "r+b") as fh:  # when a page of the memory map is first written
                os.posix_fallocate(fh.fileno(), 0, offset + int(np.prod(shape)) * np.dtype(dtype).itemsize)
        yield writer
        writer.array.flush()
        del writer.array
        if writer.rows != shape[0]:
            kept = (writer.rows, *shape[1:])
            with open(tmp, "r+b") as fh:
                npy.write_array_header_1_0(
                    fh, {"descr": npy.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": kept}
                )
                if fh.tell() != offset:  # numpy always pads the header this much; never written otherwise
                    raise OSError(f"cannot shrink {path} in place: its .npy header changed length")
                fh.truncate(offset + int(np.prod(kept)) * np.dtype(dtype).itemsize)


def torch_load(source: str | os.PathLike | IO[bytes], name: str) -> Any:
    """torch.load with weights_only=True (tensors and plain containers: a pickle that carries code is refused, not
    run); a refused or unreadable file is one ConfigError naming `name` and which of the two it is."""
    import pickle

    import torch

    try:
        return torch.load(source, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "weights only load failed" in str(exc).lower():
            raise ConfigError(
                f"{name} holds more than tensors (code to run on loading), so weights_only loading "
                "refused it; use a plain state dict or an autoft checkpoint"
            ) from None
        raise ConfigError(f"{name} is damaged or not a PyTorch file ({_first_line(exc)})") from None
    except Exception as exc:  # a truncated zip, a text file, a folder of the wrong kind...
        raise ConfigError(f"{name} is truncated, damaged or not a PyTorch file ({_first_line(exc)})") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().split(". ")[0].splitlines()
    return f"{type(exc).__name__}: {text[0][:120]}" if text else type(exc).__name__


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


# --- output locations, checked before any work -----------------------------------------------------------


def check_writable_dir(path: str | os.PathLike, what: str) -> Path:
    """That `path` is a folder this process can write in, or one it can create; a one-line ConfigError otherwise.

    Creates nothing: the nearest existing ancestor must be a folder, writable, and must take a file (a probe
    created and removed at once: that catches what permission bits do not show, such as /proc, a read-only
    mount or an immutable folder). `what` names the location in the message ("--out", "report folder"). Temp files
    that a killed writer left in the folder are removed (`sweep_temps`): this check is where every run starts.
    """
    path = Path(path)
    _writable_folder(path, f"{what} {os.fspath(path)}", is_folder=True)
    sweep_temps(path)  # what a killed writer left here
    return path


def check_output_file(path: str | os.PathLike, what: str) -> Path:
    """That a file can be written (or replaced) at `path`: not a folder, not read-only, in a folder it can write in."""
    path = Path(path)
    where = f"{what} {os.fspath(path)}"
    if path.is_dir():
        raise ConfigError(f"{where} is a folder; give a file name")
    if path.exists() and not os.access(path, os.W_OK):
        raise ConfigError(f"{where} is read-only")
    _writable_folder(path.parent, where, is_folder=False)
    sweep_temps(path.parent, path.name)
    return path


def _writable_folder(folder: Path, where: str, is_folder: bool) -> None:
    """`where` names `folder` itself (is_folder) or a file in it."""
    nearest = folder
    while not nearest.exists() and nearest.parent != nearest:
        nearest = nearest.parent
    if not nearest.is_dir():
        raise ConfigError(
            f"{where}{'' if is_folder and nearest == folder else ': ' + os.fspath(nearest)} is a file, not a folder"
        )
    if not os.access(nearest, os.W_OK | os.X_OK):
        raise ConfigError(
            f"{where}: {os.fspath(nearest)} is not writable (permission denied or a read-only file system)"
        )
    try:
        fd, probe = tempfile.mkstemp(dir=nearest, prefix=".autoft-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise ConfigError(f"{where}: cannot write in {os.fspath(nearest)} ({exc.strerror or exc})") from None


def output_file(out: str | os.PathLike | None, default: str | os.PathLike) -> Path:
    """Where a command writes its one file: `out`; inside it, under the default's name, when `out` is an
    existing folder; the default when there is no `out`."""
    if out is None:
        return Path(default)
    return Path(out) / Path(default).name if Path(out).is_dir() else Path(out)
