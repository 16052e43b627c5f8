"""One exception base, so the CLI can turn every user-facing failure into one line and exit 2.

Also the exceptions that are not the user's to fix: a trial's own failure, and SIGTERM.
"""

import errno


class AutoftError(Exception):
    """Something the user must fix (config, data, backbone, storage); stops at once."""


class ConfigError(AutoftError):
    """A config key, value, YAML file or search space is invalid."""


class DataError(AutoftError):
    """The dataset folder is missing, malformed or holds unreadable images."""


class DiskFullError(AutoftError):
    """A write ran out of space (or past the file system's file-size limit); nothing half-written was left."""


DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
_DISK_FULL_TEXT = ("database or disk is full", "no space left on device", "disk quota exceeded", "file too large")


def disk_full(exc: BaseException) -> str | None:
    """The out-of-space cause anywhere in `exc`'s chain (__cause__, __context__), in words; None if there is none.

    Libraries wrap it in misleading text: Optuna's RDB storage turns SQLite's "database or disk is full"
    into "invalid data in the commit, e.g. exceeding max length".
    """
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS:
            where = f" writing {exc.filename}" if exc.filename else ""
            return f"out of disk space{where}: {exc.strerror or exc} ({errno.errorcode[exc.errno]})"
        text = str(exc).lower()
        found = next((t for t in _DISK_FULL_TEXT if t in text), None)
        if found:
            return f"out of disk space: {found} ({type(exc).__module__.split('.')[0]} {type(exc).__name__})"
        exc = exc.__cause__ or exc.__context__
    return None


class TrialFailure(Exception):
    """A trial's own failure (NaN loss, out of memory): that trial ends, the study goes on.

    Deliberately not an AutoftError: it is not the user's input that is wrong.
    """


class Terminated(KeyboardInterrupt):
    """SIGTERM, handled like Ctrl-C (so Optuna marks the running trial) but exiting 143."""


def one_line(exc: BaseException, limit: int = 300) -> str:
    """An exception's first line (or its type's name), short enough for a log line, a trial attr or a report note;
    a full disk anywhere in its chain is named as the cause instead of the wrapper's text."""
    full = disk_full(exc)
    if full:
        return full[:limit]
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:limit]
