"""Training images/s of the autoft trial loop vs a tutorial-style loop vs the compute limit, in one run.

    python benchmarks/throughput.py --data ../shared/data/hotdog_nothotdog --backbone efficientnet_lite0 --device cpu

(a) autoft: `finetune` itself (decoded uint8 cache, batched per-sample augmentation on the device,
    channels_last, bf16 autocast on CUDA), its own per-epoch `images_per_s` (training steps only);
(b) tutorial: torchvision ImageFolder + DataLoader(num_workers) + PIL RandomResizedCrop/flip/ToTensor/
    Normalize, fp32, the same model and optimizer;
(c) limit: the same model and optimizer on synthetic tensors already on the device (bf16 autocast +
    channels_last on CUDA, fp32 channels_last on CPU).
All three train every parameter (freeze_depth 0) with Adam. The small dataset is repeated to about
--images per epoch; each loop is warmed up first, and with --rounds K the three are interleaved K
times and the best of each is kept (other processes sharing the CPU only ever slow a round down).
Prints ONE JSON line on stdout; per-round figures go to stderr.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from autoft.backbones import build_model, get_backbone
from autoft.config import Config
from autoft.data import Dataset, Split, load_dataset
from autoft.finetune import autocast, finetune, resolve_device


def tiled(data: Dataset, n_train: int, n_val: int | None = None) -> Dataset:
    """The dataset with its train split repeated (or cut) to `n_train` images, so an epoch is long enough to time."""

    def tile(s: Split, n: int) -> Split:
        idx = torch.arange(n) % len(s)
        return Split(s.images[idx], s.labels[idx], [s.paths[i] for i in idx.tolist()])

    val = data.val if n_val is None else tile(data.val, n_val)
    return Dataset(data.classes, tile(data.train, n_train), val, None, data.image_size, data.store_size)


def autoft_loop(data: Dataset, cfg: Config) -> float:
    """One real fine-tune epoch; finetune times its training steps alone (validation excluded)."""
    return finetune(cfg, data).history[-1]["images_per_s"]


def tutorial_loop(root: Path, cfg: Config, times: int, workers: int, device: torch.device, warmup: bool = False) -> float:
    """The loop most tutorials write: decode and augment JPEGs with PIL in DataLoader workers, fp32."""
    from torch.utils.data import ConcatDataset, DataLoader, Subset
    from torchvision import datasets, transforms as T

    spec = get_backbone(cfg.backbone)
    tf = T.Compose([T.RandomResizedCrop(cfg.image_size), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(spec.mean, spec.std)])
    folder = datasets.ImageFolder(str(root / "train" if (root / "train").is_dir() else root), tf)
    ds = Subset(folder, range(2 * cfg.batch_size)) if warmup else ConcatDataset([folder] * times)
    loader = DataLoader(ds, batch_size=cfg.batch_size, shuffle=True, num_workers=workers, pin_memory=device.type == "cuda")
    model, _ = build_model(cfg.backbone, len(folder.classes), cfg.weights, cfg.seed)
    model = model.to(device).train()
    opt = torch.optim.Adam([{"params": model.head.parameters(), "lr": cfg.head_lr},
                            {"params": model.stages.parameters(), "lr": cfg.base_lr}])
    t0, seen = time.perf_counter(), 0
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        seen += len(y)
    loss.item()  # wait for the device
    return seen / (time.perf_counter() - t0)


def limit_loop(cfg: Config, n_images: int, n_classes: int, device: torch.device) -> float:
    """The same model and optimizer on tensors already on the device: no data loading at all."""
    model, _ = build_model(cfg.backbone, n_classes, cfg.weights, cfg.seed)
    model = model.to(device, memory_format=torch.channels_last).train()
    opt = torch.optim.Adam([{"params": model.head.parameters(), "lr": cfg.head_lr},
                            {"params": model.stages.parameters(), "lr": cfg.base_lr}])
    x = torch.randn(cfg.batch_size, 3, cfg.image_size, cfg.image_size, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, n_classes, (cfg.batch_size,), device=device)

    def step():
        with autocast(device):
            loss = F.cross_entropy(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    step().item()  # warm-up: kernel selection, allocator
    steps = max(1, math.ceil(n_images / cfg.batch_size))
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = step()
    loss.item()
    return steps * cfg.batch_size / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="image folder (ROOT/train/<class>/*)")
    p.add_argument("--backbone", default="efficientnet_lite0")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers of the tutorial loop")
    p.add_argument("--images", type=int, default=None, help="images per timed epoch (default 512 on CPU, 4096 on CUDA)")
    p.add_argument("--repeat", type=int, default=None, help="repeat the train split R times (overrides --images)")
    p.add_argument("--rounds", type=int, default=1, help="interleave the three loops this many times, keep each one's best")
    args = p.parse_args(argv)

    device = resolve_device(args.device)
    spec = get_backbone(args.backbone)
    data = load_dataset(args.data, args.image_size, spec.crop_pct)
    target = args.images or (512 if device.type == "cpu" else 4096)
    times = args.repeat or max(1, round(target / len(data.train)))
    n_images = times * len(data.train)
    big = tiled(data, n_images)
    cfg = Config(data=args.data, backbone=args.backbone, image_size=args.image_size, batch_size=args.batch_size, epochs=1,
                 freeze_depth=0, optimizer="adam", head_lr=1e-2, base_lr=1e-3, aug_strength=1.0, device=str(device))

    # Warm-up: first-use costs (weights from disk, kernel selection, worker start-up code paths) are paid once here.
    autoft_loop(tiled(data, 2 * args.batch_size, 8), cfg)
    tutorial_loop(Path(args.data), cfg, 1, args.workers, device, warmup=True)
    best = {"autoft": 0.0, "tutorial": 0.0, "limit": 0.0}
    for r in range(args.rounds):
        figures = {"autoft": autoft_loop(big, cfg),
                   "tutorial": tutorial_loop(Path(args.data), cfg, times, args.workers, device),
                   "limit": limit_loop(cfg, n_images, len(data.classes), device)}
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{k} {v:.1f} img/s" for k, v in figures.items())
              + f" ({n_images} images/epoch)", file=sys.stderr, flush=True)
        best = {k: max(best[k], v) for k, v in figures.items()}
    out = {"backbone": args.backbone, "device": device.type, "image_size": args.image_size, "batch_size": args.batch_size,
           "autoft_img_s": round(best["autoft"], 1), "tutorial_img_s": round(best["tutorial"], 1),
           "limit_img_s": round(best["limit"], 1), "vs_tutorial": round(best["autoft"] / best["tutorial"], 2),
           "vs_limit": round(best["autoft"] / best["limit"], 2)}
    print(json.dumps(out), flush=True)
    return out


if __name__ == "__main__":
    main()
