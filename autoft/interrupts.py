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

STORAGE_CODE = ("sqlalchemy", "optuna.storages", "sqlite3", "psycopg2", "pymysql")  # module name prefixes
EXCEPTIONS: dict[int, type[KeyboardInterrupt]] = {signal.SIGINT: KeyboardInterrupt, signal.SIGTERM: Terminated}

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


def _on_signal(signum: int, frame: FrameType | None) -> None:
    stop(EXCEPTIONS[signum], frame)


@contextlib.contextmanager
def handled() -> Iterator[None]:
    """SIGINT (KeyboardInterrupt, exit 130) and SIGTERM (Terminated, exit 143) handled as above while inside; off the
    main thread, where Python allows no handlers, nothing changes."""
    main = threading.current_thread() is threading.main_thread()
    old = {sig: signal.signal(sig, _on_signal) for sig in EXCEPTIONS} if main else {}
    try:
        yield
        check_stopped()  # one that came in the last storage write
    finally:
        _STOPPED.clear()  # raised by now: it stops this run, not the next one in this process
        for sig, handler in old.items():
            signal.signal(sig, handler)
