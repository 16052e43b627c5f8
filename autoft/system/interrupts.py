"""Ctrl-C and SIGTERM stop a run between storage writes, never inside one.

Python runs a signal handler wherever the main thread is. Raised inside SQLAlchemy, the exception can leave the
thread's session half-way (SQLAlchemy then refuses it: "IllegalStateChangeError ... already in progress") or a
connection in a transaction that holds SQLite's lock, so the write that records the interrupted trial waits out the
busy timeout (a search once hung 120 s after SIGTERM in CI, inside `record_failure`). So the handler raises only when
the main thread is outside storage code; there, it remembers the signal and `check_stopped` raises it at the next
safe place: every batch, every epoch and between trials. The same memory covers a handler that ran inside a weakref
callback or a __del__, where Python would print the exception and drop it ("Exception ignored in ..."): such a
drop is silent here, and the signal is raised at the next safe place. Inside `deferred()` (the few renames that
publish a study's exports together) every signal waits for the block's end, so a study's files are always of
one decision.

The CLI handles them from its first line to its last (scan, decode, trials, the final export), so every command
ends on a signal with one line and exit 130 or 143, and leaves no temp file (files.atomic_path removes its own).
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any

from ..exceptions import Terminated

STORAGE_CODE = ("sqlalchemy", "optuna.storages", "sqlite3", "psycopg2", "pymysql")  # module name prefixes
EXCEPTIONS: dict[int, type[KeyboardInterrupt]] = {signal.SIGINT: KeyboardInterrupt, signal.SIGTERM: Terminated}

_STOPPED: list[type[KeyboardInterrupt]] = []  # the signal's exception, until a safe place raises it
_DEPTH = [0, 0]  # handled() blocks entered (the outermost installs the handlers), deferred() blocks entered


def stop(exc_type: type[KeyboardInterrupt], frame: FrameType | None = None) -> None:
    """Remember a signal's exception and raise it now, unless `frame` (where the main thread was) is in storage code
    or inside `deferred()`."""
    _STOPPED[:] = [exc_type]
    if not _DEPTH[1] and not in_storage_code(frame):
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


def _unraisable(hook: Callable[[Any], None]) -> Callable[[Any], None]:
    """sys.unraisablehook that keeps quiet about a signal's exception dropped in a weakref callback or __del__ (it
    is remembered, and raised at the next safe place); anything else goes to `hook`."""

    def quiet(unraisable: Any) -> None:
        if not (isinstance(unraisable.exc_value, KeyboardInterrupt) and _STOPPED):
            hook(unraisable)

    return quiet


@contextlib.contextmanager
def handled() -> Iterator[None]:
    """SIGINT (KeyboardInterrupt, exit 130) and SIGTERM (Terminated, exit 143) handled as above while inside; off the
    main thread, where Python allows no handlers, nothing changes. Blocks nest: the outermost owns the handlers and
    the remembered signal, so an inner block's end never drops a signal that its caller has yet to raise."""
    main = threading.current_thread() is threading.main_thread()
    outermost = main and not _DEPTH[0]
    old = {sig: signal.signal(sig, _on_signal) for sig in EXCEPTIONS} if outermost else {}
    hook = sys.unraisablehook
    if outermost:
        sys.unraisablehook = _unraisable(hook)
    _DEPTH[0] += main
    try:
        yield
        check_stopped()  # one that came in the last storage write
    finally:
        _DEPTH[0] -= main
        if outermost:
            _STOPPED.clear()  # raised by now: it stops this run, not the next one in this process
            sys.unraisablehook = hook
            for sig, handler in old.items():
                signal.signal(sig, handler)


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """A block no signal interrupts: one that comes inside waits for its end (then it is raised there). For the
    renames that publish several files as one decision; nothing slow belongs in here."""
    _DEPTH[1] += 1
    try:
        yield
    finally:
        _DEPTH[1] -= 1
    if not _DEPTH[1]:
        check_stopped()
