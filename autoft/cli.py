"""Command line: parse, resolve settings (flags > autoft.yaml > defaults), dispatch. No logic of its own."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

import yaml

import autoft

from .config import TEXT_KEYS, Config, check_keys, load_yaml
from .estimate import METRICS, Estimate, span
from .exceptions import AutoftError, ConfigError, Terminated, disk_full
from .storage import DEFAULT_ARTIFACTS, DEFAULT_STORAGE, mask_url
from .study.run import SearchOptions
from .system import interrupts
from .system.processes import started_monotonic

log = logging.getLogger("autoft")
PROJECT_FILE = "autoft.yaml"


def _scalar(text: str) -> Any:
    """A flag's value read as a YAML scalar, so `--epochs 3` is an int and `--t-max none` is null."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def add_flags(
    group: argparse._ArgumentGroup, cls: type, value: Callable[[dataclasses.Field], Callable[[str], Any]]
) -> None:
    """Each field of a settings dataclass that has metadata as a flag (`image_size` -> `--image-size`), so the
    dataclass stays the one source of names, help, choices and defaults. `value(field)` parses the flag's text."""
    for f in dataclasses.fields(cls):
        if not f.metadata:
            continue
        helptext = f.metadata.get("help", "")
        if f.metadata.get("choices"):
            helptext += (": " if helptext else "") + ", ".join(f.metadata["choices"])
        if "(default:" not in helptext:
            helptext += f" (default: {f.default})"
        flag = "--" + f.name.replace("_", "-")
        if str(f.type).startswith("bool"):  # --skip-bad-images / --no-skip-bad-images: a file's true can be undone
            group.add_argument(
                flag, dest=f.name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=helptext
            )
        else:
            choices = f.metadata.get("choices")
            metavar = f.metadata.get("metavar") or ("{" + ",".join(choices) + "}" if choices else f.name.upper())
            group.add_argument(
                flag, dest=f.name, type=value(f), default=argparse.SUPPRESS, metavar=metavar, help=helptext
            )


def add_config_flags(p: argparse.ArgumentParser) -> None:
    """Every Config key as a flag, its value read as YAML like the config file's; a path or column name as typed."""
    p.add_argument("--config", metavar="FILE", help=f"YAML config (default: ./{PROJECT_FILE} when present)")
    add_flags(
        p.add_argument_group("config keys (override the file)"),
        Config,
        lambda f: str if f.name in TEXT_KEYS else _scalar,
    )


def resolve_config(args: argparse.Namespace) -> tuple[Config, dict[str, Any]]:
    """Config from flags, then the config file (or ./autoft.yaml), then defaults; plus the file's `search:` block.

    `args.given` becomes the config keys set by flag: a search does not overrule what was typed for this run
    (a file's keys, such as a best.yaml's, are only the base it searches from)."""
    path = args.config or (PROJECT_FILE if os.path.isfile(PROJECT_FILE) else None)
    values = load_yaml(path, raw=TEXT_KEYS) if path else {}
    values.pop("result", None)  # an exported best.yaml carries its score here
    search = values.pop("search", None) or {}
    if not isinstance(search, dict):
        raise ConfigError(f"{path}: 'search' must be a mapping of search settings")
    if "metric" in search:  # what the search optimises may be written with its settings; it is a config key
        if "metric" in values and values["metric"] != search["metric"]:
            raise ConfigError(f"{path}: metric is {values['metric']!r} but search: metric is {search['metric']!r}")
        values["metric"] = search.pop("metric")
    check_keys(search, [f.name for f in dataclasses.fields(SearchOptions)], "search setting", where=f"{path}: ")
    try:  # the file's values on their own, so that an error names the file
        SearchOptions(**search)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    args.given = sorted(f.name for f in dataclasses.fields(Config) if f.name in vars(args))
    args.set_keys = sorted(set(values) | set(args.given))  # by file or flag: what a search's defaults leave alone
    values |= {k: getattr(args, k) for k in args.given}
    return Config.from_dict(values), search


def cmd_train(args: argparse.Namespace) -> int:
    from .training.run import train

    config, _ = resolve_config(args)
    metrics = train(config, args.out, full=args.full, report=_print_epoch)
    if metrics["estimate"]:
        print(
            f"estimate {Estimate.from_dict(metrics['estimate']).describe()} at epoch {metrics['best']['epoch']}"
            + (f", logit adjustment tau {metrics['tau']:g}" if metrics["tau"] else "")
        )
    print(f"shipped: {metrics['shipped']}; {metrics['seconds']:.1f} s on {metrics['device']}")
    for name, m in (metrics.get("test") or {}).items():
        lo, hi = m["interval"]
        print(f"test {name} {m['value']:.4f} (95 % interval {span(lo, hi)}; {m['images']} images)")
    print(f"wrote {args.out}/model.pt, config.yaml, metrics.json")
    return 0


def _print_epoch(step: int, m: dict[str, Any]) -> None:
    val = (
        f"  val_loss {m['val_loss']:.4f}  "
        + "  ".join(f"val_{k} {m[f'val_{k}']:.4f}" for k in METRICS)
        + (f" ({len(m['fold_scores'])} folds)" if len(m.get("fold_scores", ())) > 1 else "")
        if "val_loss" in m
        else "  (nothing held out)"
    )
    print(
        f"fold {m['fold']} epoch {m['epoch']}: train_loss {m['train_loss']:.4f}{val}  {m['images_per_s']:.0f} img/s",
        flush=True,
    )


def search_args(args: argparse.Namespace) -> tuple[Config, SearchOptions, list[str]]:
    """A search's config, options and fixed keys from the command line: flags over the config file (and its
    `search:` block) over the defaults, merged as the Python API merges keywords (study.run.search_settings)."""
    from .study.run import search_settings

    config, from_file = resolve_config(args)
    flags = [f.name for f in dataclasses.fields(SearchOptions) if f.name in vars(args)] + args.given
    return search_settings(config, SearchOptions(**from_file), {k: getattr(args, k) for k in flags}, args.set_keys)


def cmd_search(args: argparse.Namespace) -> int:
    from .study.run import run_search

    config, options, fixed = search_args(args)
    run_search(config, dataclasses.replace(options, started=args.started), fixed=fixed)
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from .study.run import join

    if not args.storage:
        raise ConfigError("autoft worker needs --storage URL (or AUTOFT_STORAGE set to it)")
    if args.threads is not None and args.threads < 1:
        raise ConfigError(f"--threads must be at least 1, got {args.threads}")
    join(
        args.storage,
        args.study,
        data=args.data,
        device=args.device,
        out=args.out,
        artifacts=args.artifacts,
        threads=args.threads,
        timeout=args.timeout,
        progress=not args.quiet,
        started=args.started,
    )
    return 0


def cmd_best(args: argparse.Namespace) -> int:
    from .results import records
    from .storage import load_study

    study = load_study(args.storage, args.study)
    if args.metric is None:
        best, estimate = records.best_trial(study), None
    else:  # re-ranked from the trials' out-of-fold probabilities; nothing trains
        best, estimate = records.best_by(study, args.metric, args.artifacts)
    if best is None:
        raise AutoftError(f"study {study.study_name!r} has no completed trial yet")
    print(f"# study {study.study_name}, {records.describe(best, estimate)}")
    print(records.config(best).to_yaml(), end="")
    return 0


def cmd_dashboard(args: argparse.Namespace) -> int:
    from .results.dashboard import serve

    serve(args.storage, args.study, args.host, args.port, args.artifacts)
    return 0


def cmd_backbones(args: argparse.Namespace) -> int:
    """One line per backbone: parameters of the pretrained model (its ImageNet classifier included), the input side
    its weights were evaluated at, whether it builds without a download, stages, description."""
    from .backbones import list_backbones

    def count(n: int | None) -> str:
        return "-" if n is None else f"{n / 1e6:.1f}M" if n >= 50_000 else f"{n / 1e3:.1f}K"

    specs = list_backbones()
    width = max(len(s.name) for s in specs)
    print(f"{'name':<{width}}  params  native  offline  stages  description")
    for s in specs:
        print(
            f"{s.name:<{width}}  {count(s.params):>6}  {s.native_size:>6}  {'yes' if s.offline else 'no':>7}  "
            f"{s.num_stages:>6}  {s.description}"
        )
    print(
        f"{'timm/NAME':<{width}}  {'-':>6}  {'-':>6}  {'no':>7}  {'-':>6}  "
        "any timm model, e.g. timm/resnet18 (pretrained weights downloaded on first use)"
    )
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .results.report import write_report

    report = write_report(args.study, args.storage, args.out, args.artifacts)
    for name, png in report.pngs.items():
        print(f"  {name}: {png}")
    for name, why in report.skipped.items():
        print(f"  {name}: left out ({why})")
    print(f"wrote {report.html}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    import json

    from .results.predict import evaluate

    ev = evaluate(args.model, args.data, args.split, args.out, args.device, args.labels, args.skip_bad_images)
    if args.json:
        print(json.dumps({k: v for k, v in ev.items() if k != "report"}, indent=2))
        return 0
    print(f"{ev['split']}: {ev['n']} images from {ev['data'] or 'the built-in demo'}")
    for name, m in ev["metrics"].items():
        lo, hi = m["interval"]
        print(f"{name:<17} {m['value']:.4f} (95 % interval {span(lo, hi)} on {m['images']} images)")
    if ev["seen_in_training"]:
        log.warning("the model trained on these %s images: this is not what it scores on new ones", ev["split"])
    print(ev["report"], end="")
    print(f"confusion matrix: {ev['confusion_png']}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    import json

    from .results.predict import image_paths, load_model

    if args.top_k < 1:
        raise ConfigError(f"--top-k must be at least 1, got {args.top_k}")
    predictor = load_model(args.model, args.device)
    if predictor.value_range is not None:
        low, high = predictor.value_range
        log.info(
            "32-bit integer and float greyscale images (Pillow modes I, F) are scaled by the model's range, "
            "%g..%g to 0..255, from its training data",
            low,
            high,
        )
    paths = image_paths(args.images)
    rows, failed = [], 0
    for path, top, error in predictor.top_k_files(paths, args.top_k):  # an unreadable file is reported, the rest go on
        if error is not None:
            failed += 1
            print(f"autoft: cannot read {path}: {error}", file=sys.stderr, flush=True)
            if args.json:
                rows.append({"image": path, "error": error})
        elif args.json:
            rows.append({"image": path, "predictions": [{"class": c, "probability": p} for c, p in top]})
        else:
            print(f"{path}\t" + "  ".join(f"{c} {p:.4f}" for c, p in top), flush=True)
    if args.json:
        print(json.dumps(rows, indent=2))
    if failed:
        print(f"autoft: {failed} of {len(paths)} image(s) could not be read", file=sys.stderr)
        return 1
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .results.predict import LOADS, export

    ex = export(args.model, args.format, args.out)
    print(
        f"wrote {ex.path} ({ex.format}); reproduces the PyTorch logits on a sample batch within {ex.max_abs_diff:.1e}"
    )
    print(f"input, preprocessing and class names: {ex.metadata_path}")
    print(f"load it with {LOADS[ex.format].replace('FILE', repr(str(ex.path)))}")
    return 0


def _study_flags(p: argparse.ArgumentParser, artifacts: bool = False) -> None:
    p.add_argument("--study", help="study name (default: the storage's only study)")
    p.add_argument("--storage", default=DEFAULT_STORAGE, help=f"Optuna storage URL (default: {DEFAULT_STORAGE})")
    if artifacts:
        _artifacts_flag(p)


def _artifacts_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--artifacts", default=DEFAULT_ARTIFACTS, help=f"artifact folder (default: {DEFAULT_ARTIFACTS})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="autoft", description="Find the best way to fine-tune a pretrained image classifier."
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    parser.add_argument("--version", action="version", version=f"autoft {autoft.__version__}")
    # -q after the command too (`autoft search -q`); SUPPRESS keeps a -q given before it
    quiet = argparse.ArgumentParser(add_help=False)
    quiet.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help="only warnings and errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_parser = sub.add_parser
    sub.add_parser = lambda *a, **k: add_parser(*a, parents=[quiet], **k)  # type: ignore[method-assign]

    p = sub.add_parser("train", help="fine-tune once from a config")
    add_config_flags(p)
    p.add_argument("--out", default="runs/train", help="output folder (default: runs/train)")
    p.add_argument("--full", action="store_true", help="train on train+val and keep the last epoch")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("search", help="run (or resume) an Optuna search over fine-tuning recipes")
    add_config_flags(p)  # search settings' values are checked (numbers parsed) by SearchOptions, as a file's are
    add_flags(p.add_argument_group("search settings (override the file's search: block)"), SearchOptions, lambda f: str)
    p.set_defaults(func=cmd_search)

    p = sub.add_parser(
        "worker", help="join an existing study as one more worker, from any machine that reaches its storage"
    )
    p.add_argument(
        "--storage",
        default=os.environ.get("AUTOFT_STORAGE"),
        help="the study's storage URL (default: $AUTOFT_STORAGE, which keeps a password off the command line)",
    )
    p.add_argument("--study", required=True, help="name of the study to join")
    p.add_argument("--data", help="dataset root on this machine, when not at the path the study was started with")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N or mps")
    p.add_argument("--out", help="export folder (default: studies/<study>)")
    _artifacts_flag(p)
    p.add_argument("--threads", type=int, help="CPU threads for this worker (default: all cores)")
    p.add_argument("--timeout", type=float, help="stop starting trials after this many seconds")
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("best", help="print the best config and score of a study")
    _study_flags(p, artifacts=True)
    p.add_argument(
        "--metric",
        choices=METRICS,
        help="re-rank the finished trials by this metric, from their out-of-fold "
        "predictions (no training; default: the study's own ranking)",
    )
    p.set_defaults(func=cmd_best)

    p = sub.add_parser("dashboard", help="serve optuna-dashboard for the study's storage")
    _study_flags(p, artifacts=True)
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8080, help="port (default: 8080)")
    p.set_defaults(func=cmd_dashboard)

    p = sub.add_parser("backbones", help="list backbones and their stage counts")
    p.set_defaults(func=cmd_backbones)

    p = sub.add_parser("report", help="write studies/<study>/report.html and PNGs of the search")
    _study_flags(p, artifacts=True)
    p.add_argument("--out", help="report folder (default: studies/<study>, where best.pt is)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("evaluate", help="accuracy, per-class metrics and confusion matrix of a model on labelled data")
    p.add_argument("--model", required=True, help="best.pt or model.pt")
    p.add_argument(
        "--data",
        help="dataset root (default: the data the model was trained on); a folder of class "
        "folders without train/ is scored whole",
    )
    p.add_argument(
        "--labels",
        metavar="FILE.csv",
        help="score the images a CSV lists (path,label[,split]; columns named as in training) instead",
    )
    p.add_argument(
        "--split",
        choices=("train", "val", "test", "all"),
        help="split to score; all = train and val (default: val; new data without train/: all)",
    )
    p.add_argument("--out", help="confusion matrix PNG (default: <model>_<split>_confusion.png)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default: auto)")
    p.add_argument(
        "--skip-bad-images", action="store_true", help="leave unreadable images out (said) instead of stopping"
    )
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("predict", help="classify images with a trained model")
    p.add_argument("--model", required=True, help="best.pt or model.pt")
    p.add_argument("images", nargs="+", metavar="IMAGE_OR_DIR", help="image files or folders (searched recursively)")
    p.add_argument("--top-k", dest="top_k", type=int, default=1, help="classes to show per image (default: 1)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default: auto)")
    p.add_argument("--json", action="store_true", help="print the predictions as JSON")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("export", help="write a deployable TorchScript or ONNX model, checked against PyTorch")
    p.add_argument("--model", required=True, help="best.pt or model.pt")
    p.add_argument("--format", default="torchscript", choices=("torchscript", "onnx"), help="default: torchscript")
    p.add_argument("--out", help="output file (default: next to the model, .torchscript.pt or .onnx)")
    p.set_defaults(func=cmd_export)
    return parser


class _MaskSecrets(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = mask_url(record.getMessage())
        record.args = ()
        return True


def setup_logging(quiet: bool) -> None:
    import optuna

    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("autoft: %(message)s"))
    handler.addFilter(_MaskSecrets())
    logging.basicConfig(level=logging.WARNING, handlers=[handler], force=True)  # other libraries: warnings only
    log.setLevel(logging.WARNING if quiet else logging.INFO)
    optuna.logging.disable_default_handler()
    optuna.logging.enable_propagation()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings(
        "ignore", category=optuna.exceptions.ExperimentalWarning
    )  # heartbeat etc. are stable enough


def main(argv: list[str] | None = None) -> int:
    # A file name that is not UTF-8 (Python holds its odd bytes as surrogates): stdout writes the bytes as they are
    # on disk, so `autoft predict | cut -f1` gives paths that open; messages on stderr show them as \udcNN.
    for stream, errors in ((sys.stdout, "surrogateescape"), (sys.stderr, "backslashreplace")):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors=errors)
    args = build_parser().parse_args(argv)
    # A search's --timeout counts from the process's start: the whole command, the interpreter and imports included.
    args.started = started_monotonic() if argv is None else time.monotonic()
    setup_logging(args.quiet)
    try:
        if args.func is cmd_dashboard:  # the web server ends on Ctrl-C by itself
            return args.func(args)
        with interrupts.handled():  # from the first line to the last: scan, decode, trials, the final export
            return args.func(args)
    except AutoftError as exc:
        print(f"autoft: error: {mask_url(str(exc))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:  # SIGINT, or SIGTERM (Terminated), from the first line to the last
        code, what = (143, "terminated") if isinstance(exc, Terminated) else (130, "interrupted")
        why = exc.args[0] if exc.args else "finished trials and exports are kept, run again to resume"
        print(f"autoft: {what}; {why}", file=sys.stderr)
        return code
    except Exception as exc:  # out of space in a library's write (the study's SQLite file, ...): name the cause
        full = disk_full(exc)
        if full is None:
            raise
        storage = getattr(args, "storage", None)
        where = f" (the study's storage is {storage})" if storage else ""
        print(
            f"autoft: error: {mask_url(full + where)}; free space there and run again (finished work is kept)",
            file=sys.stderr,
        )
        return 2


if __name__ == "__main__":
    sys.exit(main())
