"""Does the search earn its keep? The test scores of what `autoft search` ships, against what a user would
have got without it, on data whose test/ split no run ever sees before scoring.

    python benchmarks/quality.py ../shared/data/clothing10 --budget 900
    python benchmarks/quality.py ../shared/data/hotdog_nothotdog --budget 600 --val-as-test
    python benchmarks/quality.py ../shared/data/clothing10_longtail --budget 900 --metric balanced_accuracy

Runs, in one process with a fresh image cache:
  1. `autoft search` (the product's defaults; `--timeout BUDGET`, trials unbounded), its best.pt scored on test/;
  2. a frozen-feature logistic-regression probe (scikit-learn, C by 5-fold CV on train, scored on `--metric`;
     class_weight="balanced" when the metric is a balanced one) at the native size, one per offline backbone:
     the one with the best CV score is the baseline (what a careful user could pick without a test set); and
     one on all their features side by side (`probes.all` in the JSON);
  3. each portfolio recipe alone, trained and shipped as `autoft train` ships it, scored on test/ (with
     `--backbone auto`: the probe on each backbone and on all of them, and the fine-tune recipes on the
     backbone the careful user's probes pick).
`--metric` is the search's and every recipe's metric (autoft's `metric` key). Prints ONE JSON line (stdout),
and a readable account on stderr. Every model's test accuracy, balanced accuracy and macro-F1 come with
their 95 % intervals (Wilson; stratified bootstrap, see autoft/estimate.py): on a few hundred test images
one image is a few tenths of a point. `--val-as-test` scores on val/ instead of test/ (the search then
sees train/ only).

The train split may be class-balanced where test is not: the JSON also gives the winner's estimate
re-weighted to test's class frequencies (its out-of-fold recall per class), which says how much of
the gap between estimate and test is the class mix rather than optimism.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import optuna
import torch

from autoft.backbones import AUTO, auto_backbones, build_model, get_backbone
from autoft.config import Config
from autoft.data.augment import center_crop, normalize
from autoft.data.dataset import Split, load_dataset
from autoft.estimate import METRICS, scored
from autoft.results import records
from autoft.results.predict import evaluate
from autoft.results.report import write_report
from autoft.results.summary import budget_story, sampled_story
from autoft.space import SearchSpace
from autoft.study.run import SEARCH_DEFAULTS, SearchOptions, run_search
from autoft.training.checkpoint import shipped as what_shipped
from autoft.training.run import train


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def as_test_root(data: Path, tmp: Path) -> Path:
    """train/ as it is, val/ as test/: the search sees train/ only and val/ is only scored."""
    root = tmp / "val_as_test"
    root.mkdir()
    os.symlink((data / "train").resolve(), root / "train")
    os.symlink((data / "val").resolve(), root / "test")
    return root


def test_score(model: Path, data: Path) -> dict:
    """Every metric of the model on test/, each with its 95 % interval."""
    return evaluate(model, data, "test", model.with_suffix(".test.png"), device="auto")["metrics"]


def brief(test: dict) -> str:
    return ", ".join(f"{m} {v['value']:.4f} ({v['interval'][0]:.3f}-{v['interval'][1]:.3f})" for m, v in test.items())


def record_race_inputs(folder: Path) -> None:
    """Keep what each trial's fold race is decided on (every Partial: after each fold but the last, its predictions
    on the images validated so far at its best pooled epoch) in folder/trial_<number>.npz, whether or not the
    search races: what benchmarks/pruning.py replays racing rules on."""
    from autoft.study.objective import Objective

    folder.mkdir(parents=True, exist_ok=True)
    run = Objective._run

    def recording(self, trial, cfg, report, race, on_batch):
        kept: dict[str, np.ndarray] = {}

        def keep(p):
            k = p.folds_done
            kept.update(
                {
                    f"index{k}": p.index,
                    f"log_probs{k}": p.log_probs.astype(np.float32),
                    f"tau{k}": np.float64(p.tau),
                    f"epoch{k}": np.int64(p.epoch),
                }
            )
            np.savez_compressed(folder / f"trial_{trial.number}.npz", **kept)
            return race(p)

        return run(self, trial, cfg, report, keep, on_batch)

    Objective._run = recording


def keep_oof(study: optuna.Study, artifacts: Path, folder: Path) -> None:
    """Copy every trial's out-of-fold artifact (not its weights) to `folder`, an --artifacts folder for the copy."""
    folder.mkdir(parents=True, exist_ok=True)
    for t in study.get_trials(deepcopy=False):
        if t.user_attrs.get(records.OOF):
            shutil.copy(artifacts / t.user_attrs[records.OOF], folder / t.user_attrs[records.OOF])


def run_the_search(base: Config, budget: float, tmp: Path, pruner: str, trials: int = 10_000) -> dict:
    t0 = time.perf_counter()
    opts = SearchOptions(
        trials=trials,
        timeout=budget,
        study="quality",
        storage=f"sqlite:///{tmp / 'quality.db'}",
        out=str(tmp / "search"),
        artifacts=str(tmp / "artifacts"),
        progress=False,
        pruner=pruner,
    )
    study = run_search(base, opts)
    seconds = time.perf_counter() - t0
    best = records.best_trial(study)
    trials = study.get_trials(deepcopy=False)
    for t in trials:
        cfg = t.user_attrs.get("config", {})
        log(
            f"  trial {t.number:>3} {t.state.name.lower():<8} {records.fmt(t.value):<7} "
            f"{records.portfolio_name(t) or '':<16} {cfg.get('backbone', '')} {cfg.get('image_size', '')}px "
            f"freeze {cfg.get('freeze_depth', '')} aug {records.fmt(cfg.get('aug_strength'))} "
            f"{records.fmt(t.user_attrs.get(records.TRAIN_SECONDS))} s {records.reason(t)}"
        )
    estimate = records.estimate(best)
    cfg = records.config(best)
    return {
        "seconds": seconds,
        "trials": len(trials),
        "study": study,
        "best": best,
        "metric": estimate.metric,
        "shipped": what_shipped(tmp / "search" / "best.pt"),
        "estimate": estimate.value,
        "interval": list(estimate.interval),
        "images": estimate.images,
        "tau": records.kept_epoch(best).get("tau"),
        "tta": records.kept_epoch(best).get("tta"),
        "tta_gain": records.kept_epoch(best).get("tta_gain"),
        "class_weight": cfg.class_weight,
        "balanced_sampling": cfg.balanced_sampling,
        "winner": {
            "trial": best.number,
            "recipe": records.portfolio_name(best),
            "backbone": cfg.backbone,
            "image_size": cfg.image_size,
            "freeze_depth": cfg.freeze_depth,
            "epochs": cfg.epochs,
            "best_epoch": best.user_attrs.get(records.BEST_EPOCH),
            "aug_strength": cfg.aug_strength,
        },
        "states": {s.name.lower(): n for s, n in records.state_counts(trials).items()},
        "sampled": sampled_story(trials),
        "where_the_seconds_went": budget_story(trials),
    }


def at_test_priors(best, data_root: Path, base: Config, artifacts: Path) -> float | None:
    """The winner's out-of-fold recall per class, weighted by test/'s class frequencies."""
    oof = records.load_oof(best, artifacts)
    if oof is None:
        return None
    data = load_dataset(data_root, base.image_size, get_backbone(base.backbone).crop_pct)
    seen = oof.fold >= 0  # a holdout search predicted its validation images only
    y = oof.labels[seen]
    pred = (np.log(np.maximum(oof.probabilities[seen], 1e-30)) - oof.tau * np.log(oof.prior)).argmax(1)
    recall = np.array([(pred[y == c] == c).mean() for c in range(len(data.classes))])
    prior = np.bincount(data.test.labels.numpy(), minlength=len(data.classes)) / len(data.test)
    return float((recall * prior).sum())


def probes(data_root: Path, backbones: list[str], metric: str) -> dict[str, dict]:
    """The careful user's probes: scikit-learn's LogisticRegressionCV on each frozen backbone's pooled features at its
    native size (standardized, C chosen by 5-fold CV on `metric`, sklearn's scorer of that name; classes weighted
    inversely to their frequency for a balanced metric), and one on all of their features side by side ("all")."""
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    weight = None if metric == "accuracy" else "balanced"
    warnings.filterwarnings("ignore", category=FutureWarning, module="sklearn")  # default changes announced for 1.10+

    def fit(train: np.ndarray, test: np.ndarray, y: np.ndarray, y_test: np.ndarray, classes: int, t0: float) -> dict:
        clf = make_pipeline(
            StandardScaler(),
            LogisticRegressionCV(Cs=[1e-3, 1e-2, 1e-1, 1.0], cv=5, max_iter=3000, scoring=metric, class_weight=weight),
        )
        clf.fit(train, y)
        lr = clf[-1]
        cv = float(np.max(np.mean(next(iter(lr.scores_.values())), axis=0)))  # its own 5-fold score at the chosen C
        return {
            "test": scored(y_test, clf.predict(test), classes),
            "seconds": time.perf_counter() - t0,
            "cv_score": cv,
            "class_weight": weight,
            "C": float(lr.C_[0]),
        }

    out, feats = {}, []
    for backbone in backbones:
        t0 = time.perf_counter()
        spec = get_backbone(backbone)
        data = load_dataset(data_root, spec.native_size, spec.crop_pct)
        model, _ = build_model(backbone, 2)
        model.eval()

        @torch.no_grad()
        def features(split: Split) -> np.ndarray:  # read from the image store 64 at a time
            return torch.cat(
                [
                    model.features(
                        normalize(center_crop(split.read(rows), spec.native_size), spec.mean, spec.std),
                        len(model.stages),
                    )
                    for rows in torch.arange(len(split)).split(64)
                ]
            ).numpy()

        pair = features(data.labelled), features(data.test)
        feats.append(pair)
        y, y_test = data.labelled.labels.numpy(), data.test.labels.numpy()
        out[backbone] = fit(*pair, y, y_test, len(data.classes), t0) | {
            "image_size": spec.native_size,
            "backbone": backbone,
        }
    if len(backbones) > 1:
        t0 = time.perf_counter()
        out["all"] = fit(
            np.hstack([f for f, _ in feats]), np.hstack([t for _, t in feats]), y, y_test, len(data.classes), t0
        ) | {"backbone": "+".join(backbones), "image_size": None}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data", type=Path)
    ap.add_argument("--budget", type=float, required=True, help="the search's --timeout, in seconds")
    ap.add_argument("--val-as-test", action="store_true", help="score on val/ (data without a test/ split)")
    ap.add_argument(
        "--backbone",
        default=SEARCH_DEFAULTS["backbone"],
        help="the base config's backbone (default: the search's, auto); auto searches the offline ones "
        "(the fine-tune recipes alone then run on the backbone the careful user's probes pick)",
    )
    ap.add_argument("--report", type=Path, help="also write the study's report (HTML and PNGs) to this folder")
    ap.add_argument("--epochs", type=int, default=Config().epochs)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-recipes", action="store_true", help="only the search and the probe")
    ap.add_argument("--pruner", default=SearchOptions.pruner, help="the search's pruner (default: the product's)")
    ap.add_argument(
        "--keep",
        type=Path,
        help="copy the study's SQLite file here (learning curves for pruning "
        "replays), its out-of-fold artifacts to KEEP.artifacts/ and every fold "
        "race's inputs to KEEP.partials/",
    )
    ap.add_argument("--trials", type=int, default=10_000, help="at most this many trials (default: the budget decides)")
    ap.add_argument(
        "--metric",
        default="accuracy",
        choices=METRICS,
        help="what the search, the recipes and the probe choose on (default: accuracy)",
    )
    args = ap.parse_args()

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the account below says what each trial did
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        os.environ["AUTOFT_CACHE"] = str(tmp / "cache")  # cold: the search pays for decoding, as for a new user
        root = as_test_root(args.data, tmp) if args.val_as_test else args.data
        if not (root / "test").is_dir():
            raise SystemExit(f"{root} has no test/ split; pass --val-as-test to score on val/")
        base = Config(
            data=str(root),
            backbone=args.backbone,
            epochs=args.epochs,
            device=args.device,
            seed=args.seed,
            metric=args.metric,
        )

        log(f"search: {args.budget:.0f} s budget on {args.data}")
        if args.keep:
            record_race_inputs(args.keep.with_suffix(".partials"))
        search = run_the_search(base, args.budget, tmp, args.pruner, args.trials)
        if args.keep:
            shutil.copy(tmp / "quality.db", args.keep)
            keep_oof(search["study"], tmp / "artifacts", args.keep.with_suffix(".artifacts"))
        if args.report:
            write_report("quality", f"sqlite:///{tmp / 'quality.db'}", args.report, tmp / "artifacts")
        candidates = auto_backbones()
        searched = candidates if base.backbone == AUTO else [base.backbone]
        base = base.replace(backbone=searched[0])
        shipped = test_score(tmp / "search" / "best.pt", root)
        log(
            f"search: {search['trials']} trials in {search['seconds']:.0f} s; winner {search['winner']}; "
            f"shipped {search['shipped']}; "
            f"estimate {search['metric']} {search['estimate']:.4f} {search['interval']}; test {brief(shipped)}"
        )
        prior_adjusted = at_test_priors(search["best"], root, base, tmp / "artifacts")

        careful = probes(root, candidates, args.metric)  # the careful user's: a probe on each offline backbone,
        p = max((r for b, r in careful.items() if b != "all"), key=lambda r: r["cv_score"])  # the one CV picks
        for b, r in careful.items():
            log(
                f"probe {b}: cv {args.metric} {r['cv_score']:.4f}, test {brief(r['test'])} (C={r['C']}), "
                f"{r['seconds']:.0f} s"
            )

        recipes = {}
        if not args.skip_recipes:  # the expert's recipes as written, with the post-hoc adjustment the search gives them
            backbones = [*searched, "+".join(searched)] if len(searched) > 1 else []
            space = SearchSpace.default(base.epochs, backbones)
            for name, params in space.portfolio(base, p["backbone"] if backbones else None):
                t0 = time.perf_counter()
                cfg = base.replace(
                    **{k.split("@")[0]: v for k, v in params.items()},
                    logit_adjustment=search["best"].user_attrs["config"]["logit_adjustment"],
                )
                metrics = train(cfg, tmp / "recipes" / name)
                recipes[name] = {
                    "test": metrics["test"],
                    "estimate": metrics["best_val_score"],
                    "tau": metrics["tau"],
                    "seconds": time.perf_counter() - t0,
                }
                log(
                    f"recipe {name}: estimate {metrics['best_val_score']:.4f}, test {brief(metrics['test'])}, "
                    f"{recipes[name]['seconds']:.0f} s"
                )

    line = {
        "data": str(args.data),
        "budget_s": args.budget,
        "metric": args.metric,
        "test_images": shipped["accuracy"]["images"],
        "search": {
            "test": shipped,
            "estimate": search["estimate"],
            "interval": search["interval"],
            "images": search["images"],
            "estimate_at_test_class_mix": prior_adjusted,
            "seconds": search["seconds"],
            "trials": search["trials"],
            "states": search["states"],
            "sampled": search["sampled"],
            "where_the_seconds_went": search["where_the_seconds_went"],
            "shipped": search["shipped"],
            "winner": search["winner"]
            | {k: search[k] for k in ("tau", "tta", "tta_gain", "class_weight", "balanced_sampling")},
        },
        "recipes": recipes,
        "probe": {k: p[k] for k in ("test", "seconds", "C", "class_weight", "image_size", "backbone", "cv_score")},
        "probes": careful,
    }
    print(json.dumps(line))
    return 0


if __name__ == "__main__":
    sys.exit(main())
