"""Time to quality: how long autoft and plain Optuna with a tutorial loop take to reach the same bar, the best
portfolio recipe's 5-fold cross-validation estimate, on the same data, in one run.

    python benchmarks/time_to_quality.py --data ../shared/data/hotdog_nothotdog --budget 300
    python benchmarks/time_to_quality.py --data ../shared/data/clothing10 --budget 900

Both sides score every trial the same way: pooled out-of-fold accuracy of stratified 5-fold cross-validation
over every labelled image (train/ and val/; scikit-learn's StratifiedKFold, seed 0), best epoch, so one bar
fits both. The bar is the best estimate among autoft's portfolio recipes (its first trials).
  * autoft: `run_search` with the product's defaults (portfolio first, TPE, guarded successive halving and fold
    racing, the decoded image store, cached frozen features), `--timeout BUDGET`, trials unbounded.
  * plain: what a user writes from the Optuna and PyTorch tutorials: TPE (same seed) over the same space (no
    portfolio: that is autoft's), each trial 5 folds of an ImageFolder + DataLoader loop
    (benchmarks/search.py's `tutorial_fit`), no pruning, until the same budget is spent.
Time to quality is the wall time from a side's start until its first finished trial scoring at least the
bar ("not reached" when none did within the budget). Each side runs in its own fresh process with an empty
decode cache. Prints the table on stderr and ONE JSON line on stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def run_autoft(args: argparse.Namespace, tmp: Path) -> dict:
    from autoft.config import Config
    from autoft.results import records
    from autoft.study.run import SearchOptions, run_search

    t0 = time.time()
    base = Config(
        data=args.data,
        backbone=args.backbone,
        epochs=args.epochs,
        seed=args.seed,
        device=args.device,
        **({"image_size": args.image_size} if args.image_size else {}),
    )
    opts = SearchOptions(
        trials=10_000,
        timeout=args.budget,
        study="ttq",
        storage=f"sqlite:///{tmp / 'autoft.db'}",
        out=str(tmp / "out"),
        artifacts=str(tmp / "artifacts"),
        progress=False,
    )
    study = run_search(base, opts, fixed=["image_size"] if args.image_size else [])
    done = [
        (t.datetime_complete.timestamp() - t0, t.value, bool(records.portfolio_name(t)))
        for t in study.trials
        if t.state.name == "COMPLETE"
    ]
    return {"seconds": time.time() - t0, "finished": done, "trials": len(study.trials)}


def run_plain(args: argparse.Namespace, tmp: Path) -> dict:
    import numpy as np
    import optuna
    import torch
    from search import tutorial_fit, tutorial_transforms
    from sklearn.model_selection import StratifiedKFold
    from torch.utils.data import ConcatDataset, DataLoader, Subset
    from torchvision import datasets

    from autoft.backbones import get_backbone
    from autoft.config import Config
    from autoft.space import SearchSpace
    from autoft.study.objective import trial_seed
    from autoft.study.pruning import make_sampler

    t0 = time.time()
    spec = get_backbone(args.backbone)
    size = args.image_size or spec.native_size
    base = Config(
        data=args.data, backbone=args.backbone, image_size=size, epochs=args.epochs, seed=args.seed, device=args.device
    )
    space = SearchSpace.from_yaml(None, base, fixed=["image_size"] if args.image_size else [])
    eval_tf, train_tf = tutorial_transforms(spec, size)
    root = Path(args.data)
    splits = [s for s in ("train", "val") if (root / s).is_dir()]

    def labelled(tf):
        return ConcatDataset([datasets.ImageFolder(str(root / s), tf) for s in splits])

    labels = np.concatenate([np.array(datasets.ImageFolder(str(root / s)).targets) for s in splits])
    folds = list(StratifiedKFold(5, shuffle=True, random_state=0).split(np.zeros(len(labels)), labels))
    classes = len(set(labels.tolist()))
    device = torch.device(args.device)
    finished = []

    def objective(trial: optuna.Trial) -> float:
        cfg = space.suggest(trial, base)
        torch.manual_seed(trial_seed(args.seed, trial.number))
        eval_ds, train_ds = labelled(eval_tf), labelled(train_tf(cfg.aug_strength))
        correct = np.zeros(cfg.epochs)
        for train_idx, val_idx in folds:
            train_dl = DataLoader(Subset(train_ds, train_idx), cfg.batch_size, shuffle=True, num_workers=args.workers)
            val_dl = DataLoader(Subset(eval_ds, val_idx), cfg.batch_size * 2, num_workers=args.workers)
            correct += tutorial_fit(cfg, spec, classes, train_dl, val_dl, device)
        value = float(correct.max() / len(labels))  # the best epoch of the pooled out-of-fold curve, as autoft's
        finished.append((time.time() - t0, value, False))
        print(
            f"plain trial {trial.number}: {time.time() - t0:.0f} s, estimate {value:.4f}", file=sys.stderr, flush=True
        )
        return value

    study = optuna.create_study(direction="maximize", sampler=make_sampler("tpe", trial_seed(args.seed, 0)))
    study.optimize(objective, timeout=args.budget)
    return {"seconds": time.time() - t0, "finished": finished, "trials": len(study.trials)}


def reached(finished: list, bar: float) -> float | None:
    """Seconds to the first finished trial at or above the bar."""
    return min((s for s, v, _ in finished if v >= bar - 1e-12), default=None)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="image folder with train/<class>/ (and val/<class>/)")
    p.add_argument("--budget", type=float, default=300, help="seconds each side may search")
    p.add_argument("--image-size", type=int, default=None, help="fix the resolution (default: searched)")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--backbone", default="efficientnet_lite0")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers of the plain side")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", choices=["autoft", "plain"], help=argparse.SUPPRESS)  # one side, in a child process
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    from search import run_sides

    res = run_sides(args, argv, __file__, run_autoft, run_plain)
    if not res:
        return {}
    portfolio = [v for _, v, p in res["autoft"]["finished"] if p]
    if not portfolio:
        sys.exit("no portfolio recipe finished within the budget: raise --budget")
    bar = max(portfolio)
    out = {"data": Path(args.data).name, "budget_s": args.budget, "bar": round(bar, 4), "device": args.device}
    lines = [
        f"bar: the best portfolio recipe's 5-fold estimate, {bar:.4f}",
        "| side | time to the bar (s) | trials complete | best estimate | wall (s) |",
        "|---|---|---|---|---|",
    ]
    for side, r in res.items():
        t = reached(r["finished"], bar)
        best = max((v for _, v, _ in r["finished"]), default=float("nan"))
        out |= {
            f"{side}_to_bar_s": None if t is None else round(t, 1),
            f"{side}_trials": len(r["finished"]),
            f"{side}_best": round(best, 4),
            f"{side}_s": round(r["seconds"], 1),
        }
        lines.append(
            f"| {side} | {'not reached' if t is None else f'{t:.0f}'} | {len(r['finished'])} | {best:.4f} | "
            f"{r['seconds']:.0f} |"
        )
    print("\n".join(lines), file=sys.stderr)
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
