"""Optuna storages from one URL, with heartbeats, lock-tolerant SQLite, and passwords kept out of logs."""

from __future__ import annotations

import re
from pathlib import Path

import optuna
from optuna.storages import JournalStorage, RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.storages.journal import JournalFileBackend

from ..exceptions import ConfigError

DEFAULT_STORAGE = "sqlite:///studies/autoft.db"
HEARTBEAT_S = 20
GRACE_S = 60
_SECRET = re.compile(r"(?P<head>[a-zA-Z][\w+.-]*://[^:/@\s]*:)(?P<pw>[^@\s]*)(?P<tail>@)")


def mask_url(text: str) -> str:
    """`postgresql://user:secret@host/db` -> `postgresql://user:***@host/db`, anywhere in a string."""
    return _SECRET.sub(lambda m: f"{m['head']}***{m['tail']}", str(text))


def make_storage(url: str) -> optuna.storages.BaseStorage:
    """An Optuna storage for `url`; `journal:PATH` (or a *.log/*.journal path) is a journal file.

    RDB storages get a heartbeat so a trial whose worker died is failed and re-queued once; SQLite gets
    a long busy timeout so several workers wait for the lock instead of crashing on "database is locked".
    """
    if url.startswith("journal:") or url.endswith((".log", ".journal", ".jsonl")):
        path = Path(url.split("journal:", 1)[-1].removeprefix("///").removeprefix("//")) if url.startswith("journal:") else Path(url)
        path.parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(path)))
    if "://" not in url:
        raise ConfigError(f"storage {mask_url(url)!r} is not a URL; use sqlite:///path.db, postgresql://..., mysql://... or journal:PATH")
    engine_kwargs = {}
    if url.startswith("sqlite:"):
        db = url.split("sqlite:///", 1)[-1]
        if db and db != ":memory:":
            Path(db).parent.mkdir(parents=True, exist_ok=True)
        engine_kwargs = {"connect_args": {"timeout": 120}}
    else:
        engine_kwargs = {"pool_pre_ping": True}
    try:
        return RDBStorage(url, engine_kwargs=engine_kwargs, heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S,
                          heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=1))
    except ImportError as exc:
        raise ConfigError(f"storage {mask_url(url)}: a database driver is missing ({exc.name}); pip install it") from None
    except Exception as exc:
        reason = mask_url(str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)
        raise ConfigError(f"cannot open storage {mask_url(url)}: {reason[:300]}") from None
