"""Faults survived: 3 workers share one study of 12 trials while one of them is SIGKILLed mid-trial.

Per storage (SQLite, journal file, then PostgreSQL when its server binaries are installed) it runs
`autoft search --workers 3 --trials 12` on CPU with tiny_cnn on tiny generated images, kills the worker of
a trial that has reported an epoch, and prints one JSON line with the study's final counts:

    requested   trials asked for; complete + pruned must equal it exactly
    fail        FAIL trials (the killed worker's trial, plus any slot given up in a race: "surplus")
    retried     trials re-queued by the heartbeat callback after their worker died
    duplicates  original trials finished more than once (the original and a retry both finished)
    lost        killed trials never finished by a retry, plus trials left RUNNING at the end

Heartbeats are shortened (AUTOFT_HEARTBEAT_S=1, AUTOFT_GRACE_S=4) so the dead worker is noticed in seconds.
Usage: python benchmarks/faults.py [--storages sqlite journal postgresql] [--trials 12] [--workers 3]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import optuna
from optuna.trial import TrialState
from PIL import Image

from autoft.results import records
from autoft.storage import make_storage

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import pgtest  # noqa: E402  (test tooling: a throwaway PostgreSQL server)


def make_data(root: Path, per_class: int = 24) -> Path:
    """Two learnable classes (a bright square in a different corner), train and val."""
    rng = np.random.default_rng(0)
    for split, n in (("train", per_class), ("val", per_class // 2)):
        for ci, name in enumerate(("a", "b")):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                img = rng.integers(0, 60, (24, 24, 3), dtype=np.uint8)
                img[:12, ci * 12 : (ci + 1) * 12] = 220
                Image.fromarray(img).save(folder / f"{i:03d}.png")
    return root


def _load(url: str, name: str) -> optuna.Study | None:
    try:
        study = optuna.load_study(study_name=name, storage=make_storage(url))
        return study if records.TARGET in study.user_attrs else None
    except Exception:  # not created yet
        return None


def run(kind: str, url: str, work: Path, requested: int, workers: int, epochs: int) -> dict:
    env = {
        **os.environ,
        "AUTOFT_HEARTBEAT_S": "1",
        "AUTOFT_GRACE_S": "4",
        "AUTOFT_CACHE": str(work / "cache"),
        "OMP_NUM_THREADS": "1",
    }
    cmd = [
        sys.executable,
        "-m",
        "autoft.cli",
        "-q",
        "search",
        "--data",
        str(make_data(work / "data")),
        "--backbone",
        "tiny_cnn",
        "--image-size",
        "32",
        "--epochs",
        str(epochs),
        "--device",
        "cpu",
        "--trials",
        str(requested),
        "--workers",
        str(workers),
        "--storage",
        url,
        "--study",
        "faults",
    ]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    study, killed = None, None
    while proc.poll() is None and killed is None:
        study = study or _load(url, "faults")
        if study is not None:
            done = records.finished_count(study.get_trials(deepcopy=False))
            victim = next(
                (
                    t
                    for t in study.get_trials(deepcopy=False)
                    if t.state == TrialState.RUNNING and t.intermediate_values and records.worker_pid(t)
                ),
                None,
            )
            if victim is not None and done >= workers:  # mid-study and mid-trial
                os.kill(records.worker_pid(victim), signal.SIGKILL)
                killed = victim.number
        time.sleep(0.05)
    _, err = proc.communicate()
    study = study or _load(url, "faults")
    trials = study.get_trials(deepcopy=False)
    origin = {t.number: records.original_number(t) for t in trials}
    finished_by_origin: dict[int, int] = {}
    for t in trials:
        if t.state in records.FINISHED:
            finished_by_origin[origin[t.number]] = finished_by_origin.get(origin[t.number], 0) + 1
    stale = [t for t in trials if t.state == TrialState.FAIL and not records.is_surplus(t)]
    count = records.state_counts(trials)
    return {
        "storage": kind,
        "requested": requested,
        "complete": count[TrialState.COMPLETE],
        "pruned": count[TrialState.PRUNED],
        "fail": count[TrialState.FAIL],
        "retried": sum(records.original_number(t) != t.number for t in trials),
        "duplicates": sum(n - 1 for n in finished_by_origin.values() if n > 1),
        "lost": sum(origin[t.number] not in finished_by_origin for t in stale) + count[TrialState.RUNNING],
        "surplus": count[TrialState.FAIL] - len(stale),
        "killed_trial": killed,
        "exit": proc.returncode,
        "wall_s": round(time.perf_counter() - t0, 1),
        **({"stderr": err.strip()[-500:]} if proc.returncode else {}),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--storages", nargs="+", default=["sqlite", "journal", "postgresql"])
    p.add_argument("--trials", type=int, default=12)
    p.add_argument("--workers", type=int, default=3)
    p.add_argument("--epochs", type=int, default=6)
    args = p.parse_args()
    for kind in args.storages:
        with tempfile.TemporaryDirectory(prefix=f"autoft-faults-{kind}-") as tmp, contextlib.ExitStack() as stack:
            work = Path(tmp)
            if kind == "sqlite":
                url = f"sqlite:///{work}/faults.db"
            elif kind == "journal":
                url = f"journal:{work}/faults.journal"
            else:
                why = pgtest.unavailable_reason()
                if why:
                    print(json.dumps({"storage": kind, "skipped": why}), flush=True)
                    continue
                url = stack.enter_context(pgtest.throwaway_postgres())
            print(json.dumps(run(kind, url, work, args.trials, args.workers, args.epochs)), flush=True)


if __name__ == "__main__":
    main()
