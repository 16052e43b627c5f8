"""One exception base, so the CLI can turn every user-facing failure into one line and exit 2."""


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
