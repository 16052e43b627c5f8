"""Memory and speed as the dataset grows: the on-disk image store from 4,000 to 100,000 images, fixed steps.

    python benchmarks/scale.py --sizes 4000,16000,64000,100000 --steps 40 --workdir /tmp/autoft-scale --clean

Generates N synthetic 160x120 JPEGs (10 classes as folders; class i is a bright block at a place and
colour of its own on noise, so a small CNN learns it), once, into --workdir (a pool of the largest N,
each size a folder of hard links to its first N), and per N runs, in a fresh subprocess with an empty
store: `finetune` for one epoch of --steps steps (`epoch_images` = steps x batch: a whole CPU epoch of
100,000 images at 224 px takes hours) on a holdout (`cv_folds 1`) at --image-size (224: a 256 px store)
with tiny_cnn, and with --lite0 efficientnet_lite0 (batch --lite0-batch-size) at the smallest N. Prints
one JSON line per run: scan, fingerprint and decode seconds, the store's size on disk, training images/s,
validation seconds, peak anonymous memory (RssAnon, sampled every 5 ms from a thread) while decoding,
training and validating, peak resident memory (VmHWM, which counts the store's mapped file pages), the
load average and wall time, and how the images reached the model (`memmap` on CPU, `resident` or
`streamed` on an accelerator). With --in-memory N (default 4000, when in --sizes) that size also runs
with the labelled images read into one tensor first (the pre-store loop) for comparison. On CUDA both
paths run: the device copy (default budget) and streamed (--device-budget, default 1 byte, forces it).
--clean deletes each store after its run (and, with --clean-data, the images at the end).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

CLASSES = 10


def _image(i: int, label: int):  # a PIL image
    from PIL import Image

    rng = np.random.default_rng(i)
    img = rng.integers(0, 90, (120, 160, 3), dtype=np.uint8)
    y, x = divmod(label, 5)
    colour = np.array([(label * 97) % 256, (label * 53 + 80) % 256, (label * 31 + 160) % 256], np.uint8)
    img[10 + y * 55 : 10 + y * 55 + 45, 5 + x * 30 : 5 + x * 30 + 30] = colour
    return Image.fromarray(img)


def make_pool(root: Path, n: int) -> None:
    """n JPEGs, n / CLASSES per class folder, made once (existing files are kept)."""
    per = n // CLASSES

    def write(i: int) -> None:
        label, k = divmod(i, per)
        f = root / f"c{label}" / f"{k:06d}.jpg"
        if not f.exists():
            _image(i, label).save(f, quality=90)

    for c in range(CLASSES):
        (root / f"c{c}").mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        list(pool.map(write, range(per * CLASSES), chunksize=256))


def dataset(workdir: Path, pool: Path, n: int) -> Path:
    """A folder of the first n / CLASSES images of each class, as hard links into the pool."""
    root = workdir / f"data_{n}"
    per = n // CLASSES
    for c in range(CLASSES):
        (root / f"c{c}").mkdir(parents=True, exist_ok=True)
        for k in range(per):
            f = root / f"c{c}" / f"{k:06d}.jpg"
            if not f.exists():
                os.link(pool / f"c{c}" / f"{k:06d}.jpg", f)
    return root


RUN = r"""
import json, os, sys, threading, time
args = json.loads(sys.argv[1])
t_start = time.perf_counter()

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024

phase = ["start"]
peak = {}
def sample():
    while True:
        peak[phase[0]] = max(peak.get(phase[0], 0), status("RssAnon"))
        time.sleep(0.005)
threading.Thread(target=sample, daemon=True).start()

import torch
import autoft.data.dataset as dataset_module
import autoft.data.scan as scan_module
import autoft.training.loop as ft
from autoft.cache import Images, Resident, RunCache, Streamed
from autoft.config import Config

timed = {}
def timer(name, fn):
    def wrapped(*a, **k):
        t = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            timed[name] = timed.get(name, 0.0) + time.perf_counter() - t
    return wrapped

dataset_module.scan = timer("scan", dataset_module.scan)  # discovery, fingerprint included
scan_module._fingerprint = timer("fingerprint", scan_module._fingerprint)
dataset_module.open_store = timer("decode", dataset_module.open_store)
validate = ft.validate
def validating(*a, **k):
    phase[0] = "validate"
    return timer("validate", validate)(*a, **k)
ft.validate = validating

class InMemory(RunCache):
    "The pre-store loop: the labelled images read into one tensor first."
    def images(self, split, device):
        return Resident(split.read().to(device), split.key)

cache = (InMemory if args["in_memory"] else RunCache)(device_bytes=args["device_bytes"])
cfg = Config(data=args["data"], backbone=args["backbone"], image_size=args["image_size"], batch_size=args["batch_size"],
             epochs=1, epoch_images=args["steps"] * args["batch_size"], cv_folds=1, device=args["device"],
             aug_strength=0.5)
phase[0] = "decode"
data = cache.dataset(cfg)
device = ft.resolve_device(cfg.device)
phase[0] = "train"
if args["in_memory"]:
    path = "in_memory"
else:  # what finetune will get (on CUDA this makes the device copy it then reuses)
    path = {Images: "memmap", Resident: "resident", Streamed: "streamed"}[type(cache.images(data.labelled, device))]
result = ft.finetune(cfg, data, cache=cache)
peak[phase[0]] = max(peak.get(phase[0], 0), status("RssAnon"))
h = result.history[0]
print(json.dumps({
    "n": len(data.labelled) + (len(data.test) if data.test else 0), "backbone": cfg.backbone, "device": device.type,
    "path": path, "image_size": cfg.image_size, "store_px": data.store_size,
    "store_gb": round(data.store.images.nbytes / 1e9, 2), "decoded": cache.decoded,
    "scan_s": round(timed["scan"] - timed["fingerprint"], 2), "fingerprint_s": round(timed["fingerprint"], 2),
    "decode_s": round(timed["decode"], 1),
    "steps": ft.batch_plan(min(cfg.epoch_images, len(data.train)), cfg.batch_size)[1],
    "train_img_s": round(h["images_per_s"], 1), "validate_s": round(timed["validate"], 1),
    "val_images": len(data.val), "val_accuracy": round(h["val_accuracy"], 3),
    "peak_anon_decode_gb": round(peak.get("decode", 0) / 1e9, 3),
    "peak_anon_train_gb": round(peak.get("train", 0) / 1e9, 3),
    "peak_anon_validate_gb": round(peak.get("validate", 0) / 1e9, 3),
    "peak_anon_gb": round(max(peak.values()) / 1e9, 3), "peak_rss_gb": round(status("VmHWM") / 1e9, 3),
    "load": [round(x, 1) for x in os.getloadavg()], "wall_s": round(time.perf_counter() - t_start, 1)}), flush=True)
"""


def run_one(
    data: Path,
    cache_dir: Path,
    backbone: str,
    args: argparse.Namespace,
    device_bytes: int | None,
    in_memory: bool = False,
) -> dict:
    """A fixed-steps epoch in a fresh process against an empty store (so decoding is measured)."""
    shutil.rmtree(cache_dir, ignore_errors=True)
    batch = args.lite0_batch_size if backbone != "tiny_cnn" else args.batch_size
    spec = {
        "data": str(data),
        "backbone": backbone,
        "image_size": args.image_size,
        "batch_size": batch,
        "steps": args.steps,
        "device": args.device,
        "device_bytes": device_bytes,
        "in_memory": in_memory,
    }
    repo = str(Path(__file__).resolve().parents[1])
    env = dict(
        os.environ,
        AUTOFT_CACHE=str(cache_dir),
        PYTHONPATH=os.pathsep.join(p for p in (repo, os.environ.get("PYTHONPATH")) if p),
    )
    out = subprocess.run([sys.executable, "-c", RUN, json.dumps(spec)], env=env, capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"run failed for {data} ({backbone}):\n{out.stderr[-3000:]}")
    if args.clean:
        shutil.rmtree(cache_dir, ignore_errors=True)
    row = json.loads(out.stdout.strip().splitlines()[-1])
    print(json.dumps(row), flush=True)
    return row


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="4000,16000,64000,100000", help="comma-separated image counts")
    p.add_argument("--workdir", default="/tmp/autoft-scale", help="generated images and stores (reused across runs)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N")
    p.add_argument("--device-budget", type=int, default=1, help="device bytes for the streamed run on CUDA")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=40, help="training steps per run (epoch_images = steps x batch)")
    p.add_argument("--in-memory", type=int, default=4000, help="also run this size with the images in memory")
    p.add_argument("--lite0", action="store_true", help="also efficientnet_lite0 at the smallest size")
    p.add_argument("--lite0-batch-size", type=int, default=16)
    p.add_argument("--clean", action="store_true", help="delete each store after its run")
    p.add_argument("--clean-data", action="store_true", help="delete the generated images at the end")
    args = p.parse_args(argv)

    sizes = sorted(int(s) for s in args.sizes.split(","))
    workdir = Path(args.workdir)
    pool = workdir / "pool"
    t0 = time.perf_counter()
    make_pool(pool, sizes[-1])
    print(f"{sizes[-1]} images in {pool} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    cuda = args.device.startswith("cuda")
    rows = []
    for n in sizes:
        data = dataset(workdir, pool, n)
        runs = [("tiny_cnn", None, False)]
        if cuda:
            runs.append(("tiny_cnn", args.device_budget, False))
        if n == args.in_memory:
            runs.append(("tiny_cnn", None, True))
        if n == sizes[0] and args.lite0:
            runs.append(("efficientnet_lite0", None, False))
        for backbone, budget, in_memory in runs:
            rows.append(run_one(data, workdir / "cache", backbone, args, budget, in_memory))
    if args.clean_data:
        shutil.rmtree(workdir, ignore_errors=True)
    return rows


if __name__ == "__main__":
    main()
