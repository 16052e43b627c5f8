"""Training images/s of the autoft trial loop vs a tutorial-style loop vs the compute limit, in one run.

    python benchmarks/throughput.py --data ../shared/data/hotdog_nothotdog --backbone efficientnet_lite0 --device cpu

(a) autoft: `finetune` itself (batches cut from the memory-mapped uint8 image store, batched per-sample augmentation
    on the device, channels_last, bf16 autocast on CUDA), its own per-epoch `images_per_s` (training steps only);
(b) tutorial: torchvision ImageFolder + DataLoader(num_workers) + PIL RandomResizedCrop/flip/ToTensor/
    Normalize, fp32, the same model and optimizer;
(c) limit: the same model and optimizer on synthetic tensors already on the device (bf16 autocast +
    channels_last on CUDA, fp32 channels_last on CPU).
All three train every parameter (freeze_depth 0) with Adam. The small dataset is repeated to about
--images per epoch and each loop runs --epochs epochs (with --rounds K, the three loops take turns
K times); each figure is a loop's best epoch, because other processes sharing the machine only ever
slow an epoch down and the first epoch pays one-off set-up. Prints ONE JSON line on stdout; every
epoch's figure and the medians go to stderr.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from autoft.backbones import build_model, get_backbone
from autoft.config import Config
from autoft.data.dataset import Dataset, Fold, Split, load_dataset
from autoft.training.loop import autocast, finetune, resolve_device


def tiled(data: Dataset, n_train: int) -> Dataset:
    """The dataset with its train split repeated (or cut) to `n_train` images, so an epoch is long enough to time:
    rows of the same store, repeated, validated on the holdout as before."""
    idx = torch.arange(n_train) % len(data.train)
    train, val = data.train.subset(idx), data.val
    labelled = Split(
        data.store, torch.cat([train.rows, val.rows]), torch.cat([train.labels, val.labels]), train.paths + val.paths
    )
    holdout = Fold(torch.arange(n_train), torch.arange(n_train, len(labelled)))
    return Dataset(data.classes, labelled, holdout, None, data.image_size, data.store_size)


def autoft_loop(data: Dataset, cfg: Config) -> list[float]:
    """A real fine-tune; finetune times each epoch's training steps alone (validation excluded)."""
    return [h["images_per_s"] for h in finetune(cfg, data).history]


def tutorial_loop(root: Path, cfg: Config, times: int, workers: int, device: torch.device) -> list[float]:
    """The loop most tutorials write: decode and augment JPEGs with PIL in DataLoader workers, fp32."""
    from torch.utils.data import ConcatDataset, DataLoader
    from torchvision import datasets
    from torchvision import transforms as T

    spec = get_backbone(cfg.backbone)
    tf = T.Compose(
        [T.RandomResizedCrop(cfg.image_size), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(spec.mean, spec.std)]
    )
    folder = datasets.ImageFolder(str(root / "train" if (root / "train").is_dir() else root), tf)
    loader = DataLoader(
        ConcatDataset([folder] * times),
        batch_size=cfg.batch_size,
        shuffle=True,
        num_workers=workers,
        pin_memory=device.type == "cuda",
    )
    model, _ = build_model(cfg.backbone, len(folder.classes), cfg.weights, cfg.seed)
    model = model.to(device).train()
    opt = torch.optim.Adam(
        [
            {"params": model.head.parameters(), "lr": cfg.head_lr},
            {"params": model.stages.parameters(), "lr": cfg.base_lr},
        ]
    )
    rates = []
    for _ in range(cfg.epochs):
        t0, seen = time.perf_counter(), 0  # worker start-up included: a tutorial loop pays it every epoch
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            seen += len(y)
        loss.item()  # wait for the device
        rates.append(seen / (time.perf_counter() - t0))
    return rates


def limit_loop(cfg: Config, n_images: int, n_classes: int, device: torch.device) -> list[float]:
    """The same model and optimizer on tensors already on the device: no data loading at all."""
    model, _ = build_model(cfg.backbone, n_classes, cfg.weights, cfg.seed)
    model = model.to(device, memory_format=torch.channels_last).train()
    opt = torch.optim.Adam(
        [
            {"params": model.head.parameters(), "lr": cfg.head_lr},
            {"params": model.stages.parameters(), "lr": cfg.base_lr},
        ]
    )
    x = torch.randn(cfg.batch_size, 3, cfg.image_size, cfg.image_size, device=device).contiguous(
        memory_format=torch.channels_last
    )
    y = torch.randint(0, n_classes, (cfg.batch_size,), device=device)

    def step():
        with autocast(device):
            loss = F.cross_entropy(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    steps = max(1, math.ceil(n_images / cfg.batch_size))
    rates = []
    for _ in range(cfg.epochs):
        t0 = time.perf_counter()
        for _ in range(steps):
            loss = step()
        loss.item()
        rates.append(steps * cfg.batch_size / (time.perf_counter() - t0))
    return rates


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="image folder (ROOT/train/<class>/*)")
    p.add_argument("--backbone", default="efficientnet_lite0")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers of the tutorial loop")
    p.add_argument("--images", type=int, default=None, help="images per timed epoch (default 400 on CPU, 4096 on CUDA)")
    p.add_argument("--repeat", type=int, default=None, help="repeat the train split R times (overrides --images)")
    p.add_argument("--epochs", type=int, default=3, help="timed epochs per loop and round")
    p.add_argument("--rounds", type=int, default=1, help="the three loops take turns this many times")
    args = p.parse_args(argv)

    device = resolve_device(args.device)
    spec = get_backbone(args.backbone)
    data = load_dataset(args.data, args.image_size, spec.crop_pct)
    target = args.images or (400 if device.type == "cpu" else 4096)
    times = args.repeat or max(1, round(target / len(data.train)))
    n_images = times * len(data.train)
    big = tiled(data, n_images)
    cfg = Config(
        data=args.data,
        backbone=args.backbone,
        image_size=args.image_size,
        batch_size=args.batch_size,
        epochs=args.epochs,
        freeze_depth=0,
        optimizer="adam",
        head_lr=1e-2,
        base_lr=1e-3,
        aug_strength=1.0,
        device=str(device),
        cv_folds=1,
    )  # one model per epoch, as the other two loops train

    epochs = {"autoft": [], "tutorial": [], "limit": []}
    for r in range(args.rounds):
        epochs["autoft"] += autoft_loop(big, cfg)
        epochs["tutorial"] += tutorial_loop(Path(args.data), cfg, times, args.workers, device)
        epochs["limit"] += limit_loop(cfg, n_images, len(data.classes), device)
        print(
            f"round {r + 1}/{args.rounds}, {n_images} images/epoch, img/s per epoch: "
            + "; ".join(f"{k} {' '.join(f'{v:.1f}' for v in vs)}" for k, vs in epochs.items()),
            file=sys.stderr,
            flush=True,
        )
    print(
        "medians: " + ", ".join(f"{k} {statistics.median(vs):.1f}" for k, vs in epochs.items()),
        file=sys.stderr,
        flush=True,
    )
    best = {k: max(vs) for k, vs in epochs.items()}
    out = {
        "backbone": args.backbone,
        "device": device.type,
        "image_size": args.image_size,
        "batch_size": args.batch_size,
        "autoft_img_s": round(best["autoft"], 1),
        "tutorial_img_s": round(best["tutorial"], 1),
        "limit_img_s": round(best["limit"], 1),
        "vs_tutorial": round(best["autoft"] / best["tutorial"], 2),
        "vs_limit": round(best["autoft"] / best["limit"], 2),
    }
    print(json.dumps(out), flush=True)
    return out


if __name__ == "__main__":
    main()
