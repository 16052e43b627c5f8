"""The same N-trial search through autoft and through a plain Optuna objective written the tutorial way.

    python benchmarks/search.py --data ../shared/data/hotdog_nothotdog --trials 12

Both studies use the same TPE sampler and seed, the same search space (autoft's default space with the
image size fixed, its portfolio queued first), the same backbone, image size, batch size and epoch
budget, and return the best epoch's validation accuracy on the same holdout (autoft with cv_folds 1:
this measures the engine, not cross-validation, which costs k trainings on both sides alike).
autoft runs `run_search` (decode-once uint8 cache, on-device augmentation, cached frozen features, its
default pruning) on a temporary SQLite file. The plain objective is what a tutorial writes: per trial
it builds the pretrained model from disk and a torchvision ImageFolder + DataLoader(num_workers) that
re-decodes the JPEGs with PIL transforms every epoch; fp32, no pruning, no caching; frozen stages via
requires_grad=False (and eval-mode BatchNorm, the same semantics as autoft), the head's and the stages'
learning rates (layer decay included), cosine over T_max epochs.
Each side runs in its own fresh process with its own empty decode cache, so neither warms the
other. Prints ONE JSON line and a short human summary.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run_autoft(args: argparse.Namespace, tmp: Path) -> dict:
    import optuna

    from autoft.config import Config
    from autoft.results.records import WALL_TIME, best_trial, history
    from autoft.study.run import SearchOptions, run_search

    t0 = time.perf_counter()
    base = Config(
        data=args.data,
        backbone=args.backbone,
        image_size=args.image_size,
        batch_size=args.batch_size,
        epochs=args.epochs,
        seed=args.seed,
        device=args.device,
        cv_folds=1,
    )
    opts = SearchOptions(
        trials=args.trials,
        study="bench",
        storage=f"sqlite:///{tmp / 'autoft.db'}",
        out=str(tmp / "out"),
        artifacts=str(tmp / "artifacts"),
        progress=False,
    )
    study = run_search(base, opts, fixed=["image_size"])
    seconds = time.perf_counter() - t0
    best = best_trial(study)
    states = [t.state for t in study.trials]
    for t in study.trials:
        h = history(t)
        print(
            f"autoft trial {t.number}: {t.state.name.lower()}, {len(h)} epochs, "
            f"{t.user_attrs.get(WALL_TIME, 0):.1f} s, "
            f"val_accuracy {max((e['val_accuracy'] for e in h), default=0):.3f}, {_params(t.params)}",
            file=sys.stderr,
        )
    return {
        "seconds": seconds,
        "best": study.best_value,  # the maximum, as on the plain side
        "winner": best.value if best else float("nan"),  # what autoft ships: chosen within noise of the maximum
        "pruned": states.count(optuna.trial.TrialState.PRUNED),
        "epochs_run": sum(len(history(t)) for t in study.trials),
    }


def run_plain(args: argparse.Namespace, tmp: Path) -> dict:
    import optuna
    import torch
    from torch.utils.data import DataLoader
    from torchvision import datasets

    from autoft.backbones import get_backbone
    from autoft.config import Config
    from autoft.space import SearchSpace
    from autoft.study.objective import trial_seed
    from autoft.study.pruning import make_sampler

    t0 = time.perf_counter()
    spec = get_backbone(args.backbone)
    base = Config(
        data=args.data,
        backbone=args.backbone,
        image_size=args.image_size,
        batch_size=args.batch_size,
        epochs=args.epochs,
        seed=args.seed,
        device=args.device,
        cv_folds=1,
    )
    space = SearchSpace.from_yaml(None, base, fixed=["image_size"])
    root = Path(args.data)
    eval_tf, train_tf = tutorial_transforms(spec, args.image_size)
    device = torch.device(args.device)

    def objective(trial: optuna.Trial) -> float:
        t_trial = time.perf_counter()
        cfg = space.suggest(trial, base)
        torch.manual_seed(trial_seed(args.seed, trial.number))
        train_ds = datasets.ImageFolder(str(root / "train"), train_tf(cfg.aug_strength))
        val_ds = datasets.ImageFolder(str(root / "val"), eval_tf)
        train_dl = DataLoader(train_ds, cfg.batch_size, shuffle=True, num_workers=args.workers)
        val_dl = DataLoader(val_ds, cfg.batch_size * 2, num_workers=args.workers)
        best = max(tutorial_fit(cfg, spec, len(train_ds.classes), train_dl, val_dl, device)) / len(val_ds)
        print(
            f"plain trial {trial.number}: {cfg.epochs} epochs, {time.perf_counter() - t_trial:.1f} s, "
            f"val_accuracy {best:.3f}, {_params(trial.params)}",
            file=sys.stderr,
        )
        return best

    study = optuna.create_study(
        direction="maximize", sampler=make_sampler("tpe", trial_seed(args.seed, 0)), pruner=optuna.pruners.NopPruner()
    )
    for _, params in space.portfolio(base):
        study.enqueue_trial(params)
    study.optimize(objective, n_trials=args.trials)
    return {
        "seconds": time.perf_counter() - t0,
        "best": study.best_value,
        "pruned": 0,
        "epochs_run": args.trials * args.epochs,
    }


def tutorial_transforms(spec, size: int):
    """(eval transform, train transform of an aug strength): PIL/torchvision, as a tutorial writes them."""
    from torchvision import transforms as T

    from autoft.data.store import store_size_for

    eval_tf = T.Compose(
        [
            T.Resize(store_size_for(size, spec.crop_pct)),
            T.CenterCrop(size),
            T.ToTensor(),
            T.Normalize(spec.mean, spec.std),
        ]
    )

    def train_tf(s: float) -> T.Compose:
        if s == 0:
            return eval_tf
        r = math.log(4 / 3) * s
        return T.Compose(
            [
                T.RandomResizedCrop(size, scale=(1 - 0.92 * s, 1.0), ratio=(math.exp(-r), math.exp(r))),
                T.RandomHorizontalFlip(0.5 * s),
                T.RandomRotation(30 * s),
                T.ColorJitter(0.4 * s, 0.4 * s, 0.4 * s),
                T.ToTensor(),
                T.Normalize(spec.mean, spec.std),
            ]
        )

    return eval_tf, train_tf


def tutorial_fit(cfg, spec, num_classes: int, train_dl, val_dl, device) -> list[int]:
    """A tutorial's training loop: the pretrained model read from disk, fp32, no caching; frozen stages via
    requires_grad=False and eval-mode BatchNorm; head and stage learning rates (layer decay), cosine over
    T_max epochs. Returns the validation images right after each epoch."""
    import torch
    import torch.nn.functional as F

    from autoft.backbones import Net

    stages, n_features = spec.build(cfg.weights)  # pretrained weights read from disk, as a tutorial does
    model = Net(stages, n_features, num_classes).to(device)
    for p in model.stages[: cfg.freeze_depth].parameters():
        p.requires_grad_(False)
    n = len(model.stages)
    groups = [{"params": model.head.parameters(), "lr": cfg.head_lr}] + [
        {"params": model.stages[i].parameters(), "lr": cfg.base_lr * cfg.layer_decay ** (n - 1 - i)}
        for i in range(cfg.freeze_depth, n)
    ]
    if cfg.optimizer == "sgd":
        opt = torch.optim.SGD(groups, momentum=cfg.momentum, nesterov=True, weight_decay=cfg.weight_decay)
    else:
        opt = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[cfg.optimizer](
            groups, weight_decay=cfg.weight_decay
        )
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.cosine_t_max)
    correct_per_epoch = []
    for epoch in range(cfg.epochs):
        depth = len(model.stages) if epoch < cfg.head_only_epochs else cfg.freeze_depth
        model.train()
        for i, stage in enumerate(model.stages):
            stage.train(i >= depth)
            stage.requires_grad_(i >= depth)
        for x, y in train_dl:
            loss = F.cross_entropy(model(x.to(device)), y.to(device), label_smoothing=cfg.label_smoothing)
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
        model.eval()
        correct = 0
        with torch.no_grad():
            for x, y in val_dl:
                correct += (model(x.to(device)).argmax(1).cpu() == y).sum().item()
        correct_per_epoch.append(correct)
    return correct_per_epoch


def _params(params: dict) -> str:
    return " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="image folder with train/<class>/ and val/<class>/")
    p.add_argument("--trials", type=int, default=12)
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--backbone", default="efficientnet_lite0")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers of the plain objective")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", choices=["autoft", "plain"], help=argparse.SUPPRESS)  # one side, in a child process
    return p.parse_args(argv)


def run_sides(args: argparse.Namespace, argv: list[str] | None, script: str, run_autoft, run_plain) -> dict:
    """Each side in a fresh child process of `script` (`--only SIDE`), with a cold image cache, so neither inherits
    the other's caches or memory; returns {side: its JSON}. In the child itself: run that side, print its JSON and
    return {}."""
    if args.only:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        with tempfile.TemporaryDirectory() as tmp:
            os.environ["AUTOFT_CACHE"] = str(Path(tmp) / "cache")  # cold decode cache: decoding is part of the cost
            run = run_autoft if args.only == "autoft" else run_plain
            print(json.dumps(run(args, Path(tmp))), flush=True)
        return {}
    res = {}
    for side in ("autoft", "plain"):
        child = subprocess.run(
            [sys.executable, script, *(argv if argv is not None else sys.argv[1:]), "--only", side],
            stdout=subprocess.PIPE,
            text=True,
            check=True,
        )
        res[side] = json.loads(child.stdout.strip().splitlines()[-1])
    return res


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    if not (Path(args.data) / "val").is_dir():
        sys.exit(f"{args.data} needs a val/ folder so both sides validate on the same images")
    res = run_sides(args, argv, __file__, run_autoft, run_plain)
    if not res:
        return {}
    for side, r in res.items():
        print(
            f"{side}: {r['seconds']:.1f} s, best val_accuracy {r['best']:.4f}, {r['pruned']} pruned, "
            f"{r['epochs_run']} epochs run",
            file=sys.stderr,
            flush=True,
        )
    a, b = res["autoft"], res["plain"]
    out = {
        "trials": args.trials,
        "image_size": args.image_size,
        "epochs": args.epochs,
        "backbone": args.backbone,
        "device": args.device,
        "autoft_s": round(a["seconds"], 1),
        "plain_s": round(b["seconds"], 1),
        "speedup": round(b["seconds"] / a["seconds"], 2),
        "autoft_best": round(a["best"], 4),
        "plain_best": round(b["best"], 4),
        "autoft_winner": round(a["winner"], 4),
        "autoft_pruned": a["pruned"],
        "autoft_epochs": a["epochs_run"],
        "plain_epochs": b["epochs_run"],
    }
    print(json.dumps(out))
    print(
        f"{args.trials} trials x {args.epochs} epochs at {args.image_size} px on {args.device}: "
        f"autoft {a['seconds']:.0f} s (best {a['best']:.4f}, {a['pruned']} pruned) "
        f"vs plain Optuna {b['seconds']:.0f} s (best {b['best']:.4f}): "
        f"{out['speedup']:.2f}x faster, best accuracy "
        f"{'at least as good' if out['autoft_best'] >= out['plain_best'] else 'lower'}"
    )
    return out


if __name__ == "__main__":
    main()
