"""Decoding one image file into a square uint8 array as the pretraining eval would see it: EXIF
orientation, 16-bit and wide greyscale ranges, a one-line reason for any image that cannot be read.
"""

from __future__ import annotations

import contextlib
import io
import math
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
from PIL import ExifTags, Image, ImageOps

MIN_SIDE = 8


# --- decoding ---------------------------------------------------------------------------------------------

WIDE_MODES = ("I", "F")  # 32-bit integer and float greyscale: no fixed range, scaled by one range per dataset
Extent = tuple[float, float]  # (low, high): a range, or a wide image's smallest and largest finite value


def decode(path: str | io.BytesIO, size: int, value_range: Extent | None = None) -> np.ndarray:
    """One image as (size, size, 3) uint8: upright by its EXIF orientation, any mode to RGB (16-bit over its
    full range; 32-bit integer and float greyscale over `value_range`, see `dataset_range`: None takes the image's
    own), shorter side resized to size, centre square.

    Sizes are checked before decoding (an explicit check: warning filters are not thread-safe, and
    decoding runs in threads): tiny images carry no signal, huge ones may be decompression bombs.
    """
    with _opened(path, size) as im:
        return _square(im, size, value_range or dataset_range([extent(im)]) if im.mode in WIDE_MODES else None)


def decode_or_extent(path: str, size: int) -> np.ndarray | Extent:
    """The store's first pass: a wide image's extent (it is decoded once the dataset's range is known), else the
    image decoded."""
    with _opened(path, size) as im:
        return extent(im) if im.mode in WIDE_MODES else _square(im, size, None)


@contextlib.contextmanager
def _opened(path: str | io.BytesIO, size: int) -> Iterator[Image.Image]:
    """The image at `path`, its size checked (see `decode`), loaded and turned upright."""
    with Image.open(path) as im:
        w, h = im.size
        if min(w, h) < MIN_SIDE:
            raise ValueError(f"too small: {w}x{h}, under {MIN_SIDE}x{MIN_SIDE}")
        if Image.MAX_IMAGE_PIXELS and w * h > Image.MAX_IMAGE_PIXELS:
            raise ValueError(
                f"too large: {w}x{h}, over {Image.MAX_IMAGE_PIXELS:,} pixels (possible decompression bomb)"
            )
        im.draft("RGB", (size, size))  # JPEG: decode at a reduced scale, much faster for big photos
        im.load()  # decoding errors surface here, before EXIF is read
        _exif_upright(im)
        yield im


def _square(im: Image.Image, size: int, value_range: Extent | None) -> np.ndarray:
    """An opened image as (size, size, 3) uint8 (see `decode`); `value_range` scales a wide one."""
    if im.mode.startswith("I;16"):
        im = _16bit_to_l(im)
    elif im.mode in WIDE_MODES:
        im = _range_to_l(im, value_range)
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        im = Image.new("RGB", rgba.size, (255, 255, 255))
        im.paste(rgba, mask=rgba.getchannel("A"))
    else:
        im = im.convert("RGB")
    w, h = im.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    im = im.resize((nw, nh), Image.BICUBIC, reducing_gap=3.0)
    left, top = (nw - size) // 2, (nh - size) // 2
    return np.asarray(im.crop((left, top, left + size, top + size)), dtype=np.uint8)


def _exif_upright(im: Image.Image) -> None:
    """Turn a photo the way its EXIF Orientation says (phones store pixels sideways), in place.

    A damaged EXIF block leaves the image as stored: the pixels themselves decoded fine.
    """
    try:
        orientation = im.getexif().get(ExifTags.Base.Orientation, 1)
    except Exception:
        return
    if orientation in (2, 3, 4, 5, 6, 7, 8):
        ImageOps.exif_transpose(im, in_place=True)


def _16bit_to_l(im: Image.Image) -> Image.Image:
    """16-bit greyscale (modes I;16*) to 8-bit L over its full range.

    Pillow's own conversion clips at 255, leaving a 16-bit image a few grey levels. The high byte is kept,
    as Pillow does for 16-bit RGB PNGs.
    """
    return Image.fromarray((np.asarray(im) >> 8).astype(np.uint8))


def extent(im: Image.Image) -> Extent:
    """A wide image's smallest and largest finite value: what `dataset_range` combines."""
    a = np.asarray(im)
    finite = a[np.isfinite(a)]
    return (float(finite.min()), float(finite.max())) if finite.size else (math.inf, -math.inf)


def dataset_range(extents: Iterable[Extent]) -> Extent:
    """The one range that every wide (I, F) image of a dataset is scaled by, so that a value means the same grey in
    every image: 0..1 when all values lie in it (reflectances, normalised floats: mapped as 8-bit images are),
    else the smallest..largest value of them all. A single value v gets v-0.5..v+0.5 (it is mid-grey)."""
    extents = list(extents)
    lo, hi = min((e[0] for e in extents), default=math.inf), max((e[1] for e in extents), default=-math.inf)
    if lo > hi or (0 <= lo and hi <= 1):  # no finite value at all, or all within 0..1
        return 0.0, 1.0
    return (lo - 0.5, hi + 0.5) if lo == hi else (lo, hi)


def _range_to_l(im: Image.Image, value_range: Extent) -> Image.Image:
    """32-bit integer (I) and float (F) greyscale to 8-bit L, `value_range` to 0..255 (values beyond it clip).

    Pillow's own conversion clips such images (0..1 floats become all black). NaN takes the range's low end.
    """
    lo, hi = value_range
    a = np.nan_to_num(np.asarray(im, dtype=np.float64), nan=lo, posinf=hi, neginf=lo)
    return Image.fromarray(np.rint((a.clip(lo, hi) - lo) * (255.0 / (hi - lo))).astype(np.uint8))


def attempt(fn: Callable[..., Any], *args: Any) -> Any:
    """fn(*args), or a one-line reason it failed (an unreadable, truncated, too small or too large image)."""
    try:
        return fn(*args)
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}".splitlines()[0][:200]


def try_decode(path: str, size: int, value_range: Extent | None = None) -> np.ndarray | str:
    """The decoded image, or a one-line reason it cannot be used."""
    return attempt(decode, path, size, value_range)


def rescaled_notice(n: int, value_range: Extent, given: bool = False) -> str:
    """Which range the wide images were scaled by, in one line."""
    why = (
        "the model's, from its training data"
        if given
        else "values within 0..1, as 8-bit images"
        if value_range == (0.0, 1.0)
        else "the dataset's smallest..largest value"
    )
    return (
        f"{n} image(s) are 32-bit integer or float greyscale (Pillow modes I, F): all scaled by one range, "
        f"{value_range[0]:g}..{value_range[1]:g} to 0..255 ({why})"
    )
