"""The on-disk image store: every image decoded once, at one size, into a memory-mapped uint8 .npy
keyed by the files' identities, so any number of images fits in bounded memory.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import joblib
import numpy as np

from ..exceptions import ConfigError, DataError
from ..system.files import atomic_npy, atomic_write_text, check_writable_dir, sweep_temps
from .decode import Extent, attempt, dataset_range, decode_or_extent, rescaled_notice, try_decode

log = logging.getLogger("autoft")


DECODE_NOTICE = 100  # from this many images, decoding takes long enough to say so


class ImageStore:
    """Decoded images on disk: a uint8 (N, 3, S, S) .npy read memory-mapped, so the pages live in the OS's file
    cache, not in the process's own memory, and any number of images fits in bounded RAM.

    `rows[path]` is the row of each readable image; `skipped[path]` why an image could not be read (it has no
    row). `decoded` counts the images this process decoded to build it (0 when it came from disk).
    `value_range` is the range its 32-bit integer and float images were scaled by (None: it has none).
    """

    def __init__(
        self,
        file: Path,
        images: np.ndarray,
        paths: list[str],
        skipped: dict[str, str],
        decoded: int,
        value_range: tuple[float, float] | None = None,
    ):
        self.file, self.images, self.skipped, self.decoded = file, images, skipped, decoded
        self.value_range = value_range
        self.rows = {p: i for i, p in enumerate(p for p in paths if p not in skipped)}

    def read(self, rows: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Images at `rows` (any order) as a (len(rows), 3, S, S) array in memory (`out` when given): read in
        ascending row order (sequential pages of the file), each copied straight to its place in the order asked
        for, so a batch costs one buffer, not a gathered copy as well."""
        rows = np.asarray(rows, dtype=np.int64)
        out = np.empty((len(rows), *self.images.shape[1:]), np.uint8) if out is None else out
        for i in np.argsort(rows, kind="stable").tolist():
            out[i] = self.images[rows[i]]
        return out


def store_size_for(image_size: int, crop_pct: float) -> int:
    """The stored side: image_size / crop_pct, rounded so the centre crop lands on whole pixels."""
    return image_size + 2 * round((image_size / crop_pct - image_size) / 2)


def cache_dir() -> Path:
    return Path(os.environ.get("AUTOFT_CACHE", Path.home() / ".cache" / "autoft"))


DECODE_CHUNK = 256  # images decoded (in parallel threads) per chunk written to the store: bounds decoding's memory
STORE_VERSION = 5  # v2: EXIF orientation, 16-bit range; v3: the memory-mapped .npy store; v4: I and F over their
# range; v5: I and F over the dataset's range, kept beside the store; files known by change time and inode too
CHANGE_TIME = os.name != "nt"  # POSIX ctime: set by every write, and no copy can set it (Windows': creation)
HASHED = 64 * 1024  # where there is no change time: bytes hashed at each end of a file


def _file_id(path: str) -> bytes:
    """What tells a file replaced in place (cp -p, rsync -t, a restore keep its size and modification time): its
    change time, device and inode, which a copy cannot keep; a digest of both ends where there is no change time."""
    st = os.stat(path)
    if CHANGE_TIME:
        return f"{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}:{st.st_dev}:{st.st_ino}".encode()
    with open(path, "rb") as fh:
        h = hashlib.blake2b(fh.read(HASHED), digest_size=16)
        if st.st_size > HASHED:
            fh.seek(max(HASHED, st.st_size - HASHED))
            h.update(fh.read(HASHED))
    return f"{st.st_size}:{st.st_mtime_ns}:{h.hexdigest()}".encode()


def _store_key(paths: list[str], size: int, value_range: Extent | None = None) -> str:
    """Every file's absolute path (as bytes: a non-UTF-8 name is fine) and `_file_id`, so a changed file is decoded
    again, and the range wide images are scaled by: `value_range`, or (None) the one these files give."""
    scale = "found" if value_range is None else ",".join(repr(float(v)) for v in value_range)
    h = hashlib.sha1(f"v{STORE_VERSION}:{size}:{scale}".encode())
    for p in paths:
        h.update(os.fsencode(os.path.abspath(p)) + b":" + _file_id(p) + b"\n")
    return h.hexdigest()


def check_cache() -> Path:
    """The image store's folder, checked writable before anything is decoded: a one-line ConfigError naming it
    (and $AUTOFT_CACHE) rather than a PermissionError after a scan."""
    folder = cache_dir()
    what = "image cache (AUTOFT_CACHE)" if "AUTOFT_CACHE" in os.environ else "image cache"
    try:
        return check_writable_dir(folder, what)
    except ConfigError as exc:
        raise ConfigError(f"{exc}; set AUTOFT_CACHE to a folder you can write") from None


def open_store(paths: list[str], size: int, value_range: Extent | None = None) -> ImageStore:
    """The images at `paths` decoded at `size`, from the on-disk store when it is there, else decoded into it:
    once per size, ever (later trials, runs and processes map the file). Unreadable images get no row; their
    reasons and the range wide images were scaled by are kept beside the store.

    `value_range` (a model's, for new data) scales wide images instead of the range these files give; a store
    of the files' own range serves when that is the same, or when no image is wide.
    """
    file = cache_dir() / "images" / f"{_store_key(paths, size)}.npy"
    sweep_temps(file.parent)  # a store whose writer was killed (kill -9 while decoding): removed once it is gone
    store = _read_store(file, paths, size)
    if store is not None and (value_range is None or store.value_range in (None, value_range)):
        return store
    if value_range is not None:
        file = file.with_name(f"{_store_key(paths, size, value_range)}.npy")
        store = _read_store(file, paths, size)
        if store is not None:
            return store
    log.log(
        logging.INFO if len(paths) >= DECODE_NOTICE else logging.DEBUG,
        "decoding %d images at %d px into the store %s (once; later runs reuse it)",
        len(paths),
        size,
        file.parent,
    )
    bad, used = _decode_into(file, paths, size, value_range)
    meta = {"skipped": sorted(bad.items()), "value_range": used}  # indices: file names need not be valid UTF-8
    atomic_write_text(file.with_suffix(".json"), json.dumps(meta))
    return ImageStore(
        file, np.load(file, mmap_mode="r"), paths, {paths[i]: why for i, why in bad.items()}, len(paths), used
    )


def _read_store(file: Path, paths: list[str], size: int) -> ImageStore | None:
    """The store at `file`, or None when it is missing or damaged (then it is decoded again)."""
    try:
        meta = json.loads(file.with_suffix(".json").read_text())
        skipped = {paths[i]: why for i, why in meta["skipped"]}
        used = tuple(meta["value_range"]) if meta["value_range"] is not None else None
        images = np.load(file, mmap_mode="r")
        if images.shape != (len(paths) - len(skipped), 3, size, size):
            raise ValueError(f"store {file} has shape {images.shape}")
        return ImageStore(file, images, paths, skipped, 0, used)
    except Exception:
        return None


def _decode_into(
    file: Path, paths: list[str], size: int, value_range: Extent | None
) -> tuple[dict[int, str], Extent | None]:
    """Decode `paths` chunk by chunk (threads within a chunk) into a new .npy at `file`, good images only, in
    order; returns index -> reason for the bad ones, and the range wide images were scaled by (None: none is wide).
    The file appears whole or not at all.

    Wide images are only opened in this pass (their extents give the dataset's range), and decoded in a second
    one over them alone: a dataset without them pays nothing for it.
    """
    n_jobs = min(8, os.cpu_count() or 1)
    bad: dict[int, str] = {}
    wide: dict[int, tuple[int, Extent]] = {}  # index -> (its reserved row, its extent)
    with (
        atomic_npy(file, (len(paths), 3, size, size), np.uint8) as out,
        joblib.Parallel(n_jobs=n_jobs, prefer="threads") as parallel,
    ):
        row = 0
        for start in range(0, len(paths), DECODE_CHUNK):
            chunk = paths[start : start + DECODE_CHUNK]
            decoded = parallel(joblib.delayed(attempt)(decode_or_extent, p, size) for p in chunk)
            for i, r in enumerate(decoded, start):
                if isinstance(r, str):
                    bad[i] = r
                    continue
                if isinstance(r, tuple):
                    wide[i] = row, r
                else:
                    out.array[row] = r.transpose(2, 0, 1)
                row += 1
        out.rows = row
        if not wide:
            return bad, None
        used = value_range or dataset_range(e for _, e in wide.values())
        index = list(wide)
        for start in range(0, len(index), DECODE_CHUNK):
            chunk = index[start : start + DECODE_CHUNK]
            for i, r in zip(chunk, parallel(joblib.delayed(try_decode)(paths[i], size, used) for i in chunk)):
                if isinstance(r, str):
                    raise DataError(f"{paths[i]} changed while it was decoded ({r}); run again")
                out.array[wide[i][0]] = r.transpose(2, 0, 1)
    log.info(rescaled_notice(len(wide), used, value_range is not None))
    return bad, used
