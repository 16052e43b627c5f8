"""One exception base, so the CLI can turn every user-facing failure into one line and exit 2.

Also the exceptions that are not the user's to fix: a trial's own failure, and SIGTERM.
"""


class AutoftError(Exception):
    """Something the user must fix (config, data, backbone, storage); stops at once."""


class ConfigError(AutoftError):
    """A config key, value, YAML file or search space is invalid."""


class DataError(AutoftError):
    """The dataset folder is missing, malformed or holds unreadable images."""


class TrialFailure(Exception):
    """A trial's own failure (NaN loss, out of memory): that trial ends, the study goes on.

    Deliberately not an AutoftError: it is not the user's input that is wrong.
    """


class Terminated(KeyboardInterrupt):
    """SIGTERM, handled like Ctrl-C (so Optuna marks the running trial) but exiting 143."""


def one_line(exc: BaseException, limit: int = 300) -> str:
    """An exception's first line (or its type's name), short enough for a log line, a trial attr or a report note."""
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:limit]
