"""Ctrl-C and SIGTERM stop a run between storage writes, never inside one.

Python runs a signal handler wherever the main thread is. Raised inside SQLAlchemy, the exception can leave the
thread's session half-way (SQLAlchemy then refuses it: "IllegalStateChangeError ... already in progress") or a
connection in a transaction that holds SQLite's lock, so the write that records the interrupted trial waits out the
busy timeout (a search once hung 120 s after SIGTERM in CI, inside `record_failure`). So the handler raises only when
the main thread is outside storage code; there, it remembers the signal and `check_stopped` raises it at the next
safe place: every batch, every epoch and between trials. The same memory covers a handler that ran inside a weakref
callback or a __del__, where Python prints the exception and drops it ("Exception ignored in ...").
"""
from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from types import FrameType

from .exceptions import Terminated

STORAGE_CODE = ("sqlalchemy", "optuna.storages", "sqlite3", "psycopg2", "pymysql", "redis")  # module name prefixes

_STOPPED: list[type[KeyboardInterrupt]] = []  # the signal's exception, until a safe place raises it


def stop(exc_type: type[KeyboardInterrupt], frame: FrameType | None = None) -> None:
    """Remember a signal's exception and raise it now, unless `frame` (where the main thread was) is in storage code."""
    _STOPPED[:] = [exc_type]
    if not in_storage_code(frame):
        raise exc_type()


def in_storage_code(frame: FrameType | None) -> bool:
    while frame is not None:
        if frame.f_globals.get("__name__", "").startswith(STORAGE_CODE):
            return True
        frame = frame.f_back
    return False


def check_stopped() -> None:
    """Raise the signal's exception if one came and has not been raised where it came."""
    if _STOPPED:
        raise _STOPPED[0]()


def clear_stopped() -> None:
    _STOPPED.clear()


def _on_sigint(signum: int, frame: FrameType | None) -> None:
    stop(KeyboardInterrupt, frame)


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    stop(Terminated, frame)


@contextlib.contextmanager
def handled() -> Iterator[None]:
    """SIGINT (KeyboardInterrupt, exit 130) and SIGTERM (Terminated, exit 143) handled as above while inside; off the
    main thread, where Python allows no handlers, nothing changes."""
    clear_stopped()
    main = threading.current_thread() is threading.main_thread()
    old = (signal.signal(signal.SIGINT, _on_sigint), signal.signal(signal.SIGTERM, _on_sigterm)) if main else None
    try:
        yield
        check_stopped()  # one that came in the last storage write
    finally:
        clear_stopped()  # raised by now: it stops this run, not the next one in this process
        if old is not None:
            signal.signal(signal.SIGINT, old[0])
            signal.signal(signal.SIGTERM, old[1])
