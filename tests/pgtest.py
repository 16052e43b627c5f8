"""A throwaway PostgreSQL server on 127.0.0.1 for the tests and the fault benchmark (not used by the product).

It needs the server binaries (Debian: `apt-get install postgresql`, found under /usr/lib/postgresql/*/bin).
initdb refuses to run as root, so as root the cluster runs as the `postgres` user the package creates.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path


def server_bin() -> Path | None:
    """The newest installed server's bin folder, or None when PostgreSQL is not installed."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=lambda p: int(Path(p).parts[-3]))
    if found:
        return Path(found[-1]).parent
    pg_ctl = shutil.which("pg_ctl")
    return Path(pg_ctl).resolve().parent if pg_ctl else None


def unavailable_reason() -> str | None:
    """Why a throwaway server cannot start here, or None when it can."""
    if server_bin() is None:
        return "PostgreSQL server binaries not found (apt-get install postgresql)"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root and there is no 'postgres' user to run the server as"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def throwaway_postgres(password: str = "secret") -> Iterator[str]:
    """Start a fresh cluster (trust auth, fsync off) in a temporary folder; yield its URL; stop and delete it."""
    why = unavailable_reason()
    if why:
        raise RuntimeError(why)
    bindir = server_bin()
    root = Path(tempfile.mkdtemp(prefix="autoft-pg-"))
    user = {}
    if os.geteuid() == 0:
        pw = pwd.getpwnam("postgres")
        os.chown(root, pw.pw_uid, pw.pw_gid)
        user = {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}
    port = _free_port()
    data = root / "data"

    def run(*cmd: str) -> None:
        subprocess.run(cmd, check=True, capture_output=True, cwd=root, **user)

    try:
        run(str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "autoft", "--no-sync", "-E", "UTF8")
        run(
            str(bindir / "pg_ctl"),
            "-D",
            str(data),
            "-l",
            str(root / "server.log"),
            "-w",
            "-t",
            "60",
            "start",
            "-o",
            f"-p {port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={root} -F",
        )
        yield f"postgresql://autoft:{password}@127.0.0.1:{port}/postgres"
    finally:
        with contextlib.suppress(subprocess.CalledProcessError):
            run(str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(root, ignore_errors=True)
