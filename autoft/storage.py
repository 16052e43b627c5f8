"""Optuna storages from one URL, with heartbeats, lock-tolerant SQLite, and passwords kept out of logs.

Also where a study's files live by default, and the one way to open a study that must already exist.

Every storage autoft opens has a heartbeat: a worker records one every HEARTBEAT_S seconds while its
trial runs, and a RUNNING trial whose last beat is older than GRACE_S (its worker was killed, or its
machine lost) is failed by the next worker that looks and re-queued once (heartbeat.py: Optuna's own on
its RDB storages, SQLite, PostgreSQL and MySQL; the same protocol on journal files, which Optuna gives none).
AUTOFT_HEARTBEAT_S / AUTOFT_GRACE_S override the periods (tests and the fault benchmark shrink them).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import optuna
from optuna.storages import JournalStorage, RDBStorage
from optuna.storages.journal import JournalFileBackend

from .exceptions import ConfigError
from .heartbeat import requeue_once
from .system.files import atomic_open, check_output_file, check_writable_dir, temp_dir

DEFAULT_STORAGE = "sqlite:///studies/autoft.db"
DEFAULT_ARTIFACTS = "studies/artifacts"  # weights and learning-curve PNGs uploaded by trials, served by the dashboard
EXPORTS = Path("studies")  # studies/<study>/: best.yaml, best.pt, trials.csv, report.html
HEARTBEAT_S = 20
GRACE_S = 60
SQLITE_BUSY_TIMEOUT_S = 300  # several workers on one SQLite file wait for its lock instead of failing
_SECRET = re.compile(r"(?P<head>[a-zA-Z][\w+.-]*://[^:/@\s]*:)(?P<pw>[^@\s]*)(?P<tail>@)")


def mask_url(text: str) -> str:
    """`postgresql://user:secret@host/db` -> `postgresql://user:***@host/db`, anywhere in a string."""
    return _SECRET.sub(lambda m: f"{m['head']}***{m['tail']}", str(text))


def heartbeat_periods() -> tuple[int, int]:
    """(interval, grace) in seconds, from the environment when set, so spawned workers agree."""
    beat = int(os.environ.get("AUTOFT_HEARTBEAT_S", HEARTBEAT_S))
    grace = int(os.environ.get("AUTOFT_GRACE_S", GRACE_S))
    if beat < 1 or grace <= beat:
        raise ConfigError(f"AUTOFT_HEARTBEAT_S ({beat}) must be >= 1 and AUTOFT_GRACE_S ({grace}) larger than it")
    return beat, grace


def is_journal(url: str) -> bool:
    return url.startswith("journal:") or url.endswith((".log", ".journal", ".jsonl"))


def journal_file(url: str) -> Path:
    return (
        Path(url.split("journal:", 1)[-1].removeprefix("///").removeprefix("//"))
        if url.startswith("journal:")
        else Path(url)
    )


def sqlite_file(url: str) -> Path | None:
    """The database file of a `sqlite:` URL; None for an in-memory database (`sqlite://`, `sqlite:///:memory:`)."""
    rest = url.split("?", 1)[0].split("://", 1)[-1] if "://" in url else ""
    db = rest[1:] if rest.startswith("/") else rest  # sqlite:///rel.db -> rel.db, sqlite:////abs.db -> /abs.db
    return Path(db) if db and db != ":memory:" and not db.startswith("file::memory:") else None


def in_memory(url: str) -> bool:
    """Whether `url` is a database no other process can open (`sqlite://`, `sqlite:///:memory:`)."""
    return url.startswith("sqlite:") and sqlite_file(url) is None


def check_writable_storage(url: str) -> None:
    """Before a search or worker runs anything: a SQLite or journal file, and its folder, must be writable
    (SQLite writes a journal next to its file). Server databases are checked when they are opened."""
    if url.startswith("sqlite:"):
        path = sqlite_file(url)
    elif is_journal(url):
        path = journal_file(url)
    else:
        return
    if path is not None:
        check_output_file(path, f"storage {mask_url(url)}:")


STUDY_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")


def check_study_name(name: str) -> str:
    """A study name is also a folder under studies/: letters, digits, '.', '_' and '-', not starting with '.'."""
    if not isinstance(name, str) or not STUDY_NAME.fullmatch(name) or ".." in name:
        raise ConfigError(
            f"study name {name!r} is not allowed: use up to 128 letters, digits, '.', '_' and '-', "
            "not starting with '.' and without '..'"
        )
    return name


def with_driver(url: str) -> str:
    """`postgresql://` means psycopg (3) to SQLAlchemy 2.1; use psycopg2 when only that is installed."""
    if url.startswith("postgresql://"):
        import importlib.util

        if importlib.util.find_spec("psycopg") is None and importlib.util.find_spec("psycopg2") is not None:
            return "postgresql+psycopg2://" + url.removeprefix("postgresql://")
    return url


def make_storage(url: str) -> optuna.storages.BaseStorage:
    """An Optuna storage for `url`; `journal:PATH` (or a *.log/*.journal path) is a journal file.

    Every storage gets a heartbeat so a trial whose worker died is failed and re-queued once; SQLite gets
    a long busy timeout so several workers wait for the lock instead of crashing on "database is locked".
    """
    with warnings.catch_warnings():  # heartbeats have been "experimental" in Optuna since 2.9; they work
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return _make_storage(url)


def _make_storage(url: str) -> optuna.storages.BaseStorage:
    beat, grace = heartbeat_periods()
    if is_journal(url):
        path = journal_file(url)
        if not path.exists():
            check_writable_dir(path.parent, f"storage {url}: folder")
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            return JournalStorage(JournalFileBackend(str(path)))  # its heartbeat: heartbeat.Trials
        except OSError as exc:
            raise ConfigError(f"cannot open journal storage {path}: {exc.strerror or exc}") from None
    if "://" not in url:
        raise ConfigError(
            f"storage {mask_url(url)!r} is not a URL; use sqlite:///path.db, postgresql://..., mysql://... or "
            f"journal:PATH"
        )
    heartbeat: dict = {
        "heartbeat_interval": beat,
        "grace_period": grace,
        "heartbeat_stale_trial_callback": requeue_once,
    }
    if url.startswith("sqlite:"):
        db = sqlite_file(url)
        if db is None:  # nothing outlives this process, so no trial can go stale: no heartbeat (its thread would
            heartbeat = {}  # open a connection of its own, to an empty database of its own, and fail every beat)
        elif not db.exists():
            check_writable_dir(db.parent, f"storage {mask_url(url)}: folder")
            db.parent.mkdir(parents=True, exist_ok=True)
        engine_kwargs = {"connect_args": {"timeout": SQLITE_BUSY_TIMEOUT_S}}
    else:
        engine_kwargs = {"pool_pre_ping": True}
    try:
        for attempt in range(5):
            try:
                return RDBStorage(with_driver(url), engine_kwargs=engine_kwargs, **heartbeat)
            except Exception as exc:  # several processes creating a new database's tables at once: the loser retries
                if not any(clash in str(exc) for clash in ("already exists", "alembic_version")) or attempt == 4:
                    raise
                time.sleep(0.2 * (attempt + 1))
    except ImportError:
        driver = (
            "psycopg2-binary (pip install 'autoft[postgres]')"
            if url.startswith("postgresql")
            else "its database driver"
        )
        raise ConfigError(f"storage {mask_url(url)}: the database driver is not installed; install {driver}") from None
    except Exception as exc:
        reason = mask_url(str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)
        raise ConfigError(f"cannot open storage {mask_url(url)}: {reason[:300]}") from None


def export_dir(study: str) -> Path:
    """Where a study's exports and report go unless told otherwise: always inside studies/."""
    return EXPORTS / check_study_name(study)


def load_study(
    url: str, name: str | None = None, opened: optuna.storages.BaseStorage | None = None, **kwargs
) -> optuna.Study:
    """An existing study in the storage at `url` (`opened`: that storage, already made; `kwargs` go to
    optuna.load_study); `name` None: the storage's only one. A missing or ambiguous one is a one-line error listing
    the studies the storage holds."""
    if name is not None:
        check_study_name(name)
    storage = make_storage(url) if opened is None else opened
    names = optuna.get_all_study_names(storage)
    if name is None and len(names) == 1:
        name = names[0]
    if name is not None and name in names:
        return optuna.load_study(study_name=name, storage=storage, **kwargs)
    listed = ", ".join(names[:20]) + (f" and {len(names) - 20} more" if len(names) > 20 else "")
    if not names:
        missing = f"no study named {name!r}" if name else "no study"
        raise ConfigError(f"{missing} in {mask_url(url)}; run autoft search first")
    if name is None:
        raise ConfigError(f"{len(names)} studies in {mask_url(url)}: {listed}; pick one with --study NAME")
    raise ConfigError(f"no study named {name!r} in {mask_url(url)}; it holds {listed} (--study NAME)")


def artifact_store(artifacts: str | os.PathLike):
    """Optuna's file-system artifact store, each artifact written under a temp name and renamed into place, so a
    killed upload leaves no torn artifact (its temp file is swept by the next run: files.sweep_temps)."""
    from optuna.artifacts import FileSystemArtifactStore

    class AtomicFileSystemArtifactStore(FileSystemArtifactStore):
        def write(self, artifact_id: str, content_body: BinaryIO) -> None:
            with atomic_open(Path(artifacts) / artifact_id) as fh:  # the layout of FileSystemArtifactStore
                shutil.copyfileobj(content_body, fh)

    return AtomicFileSystemArtifactStore(os.fspath(artifacts))


def attach_bytes(trial: optuna.Trial, filename: str, data: bytes, mimetype: str, artifacts: str | os.PathLike) -> str:
    """Upload `data` as an artifact named `filename` of the running trial into the folder `artifacts`; returns the
    artifact id. Staged in a temp folder inside `artifacts` (files.temp_dir), never in /tmp, so a killed process
    leaves nothing behind that the next run does not sweep."""
    from optuna.artifacts import upload_artifact

    with temp_dir(artifacts) as tmp:
        path = Path(tmp) / filename
        path.write_bytes(data)
        return upload_artifact(
            artifact_store=artifact_store(artifacts), file_path=str(path), study_or_trial=trial, mimetype=mimetype
        )


def read_artifact(artifact_id: str, artifacts: str | os.PathLike) -> bytes | None:
    """The bytes of an artifact `attach_bytes` stored in the folder `artifacts`; None when it is gone (deleted by
    hand, or the study's --artifacts pointed elsewhere): callers rebuild what it held or do without."""
    from optuna.artifacts.exceptions import ArtifactNotFound

    try:
        with artifact_store(artifacts).open_reader(artifact_id) as fh:
            return fh.read()
    except ArtifactNotFound:
        return None


def remove_artifact(artifact_id: str, artifacts: str | os.PathLike) -> None:
    """Delete an artifact from the folder `artifacts`; one already gone is fine."""
    from optuna.artifacts.exceptions import ArtifactNotFound

    try:
        artifact_store(artifacts).remove(artifact_id)
    except ArtifactNotFound:
        pass


@contextlib.contextmanager
def quiet_optuna() -> Iterator[None]:
    """Optuna's own INFO lines ("A new study created...", "Trial 0 finished...") kept out of a run's output.

    The CLI routes Optuna's log through its own handler at WARNING; the Python API has no such setup, so
    `autoft.search` runs inside this, which lowers Optuna's verbosity to WARNING and restores it after.
    """
    before = optuna.logging.get_verbosity()
    if before < optuna.logging.WARNING:
        optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        yield
    finally:
        if before < optuna.logging.WARNING:
            optuna.logging.set_verbosity(before)
