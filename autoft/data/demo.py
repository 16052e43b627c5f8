"""The built-in demo data: scikit-learn's bundled digits as PNG folders."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from .store import cache_dir

# --- demo data ----------------------------------------------------------------------------------------------


def demo_digits(per_class: int = 30, val_per_class: int = 10) -> Path:
    """scikit-learn's bundled handwritten digits written out as PNGs, so the default run needs no download."""
    from sklearn.datasets import load_digits

    root = cache_dir() / f"demo_digits_{per_class}_{val_per_class}"
    if (root / "val").is_dir():
        return root
    digits = load_digits()
    tmp = Path(tempfile.mkdtemp(dir=cache_dir().mkdir(parents=True, exist_ok=True) or cache_dir()))
    seen = [0] * 10
    for img, y in zip(digits.images, digits.target):
        i = seen[y]
        if i >= per_class + val_per_class:
            continue
        seen[y] += 1
        folder = tmp / ("train" if i < per_class else "val") / str(y)
        folder.mkdir(parents=True, exist_ok=True)
        pix = (255 - img * 255 / 16).astype(np.uint8)  # dark ink on white, like a scan
        Image.fromarray(pix).resize((32, 32), Image.BILINEAR).save(folder / f"{i:04d}.png")
    try:
        os.replace(tmp, root)
    except OSError:  # another process wrote it first
        pass
    return root
