"""Which process is which: this machine, a process's start time, whether one is gone, and when this one began.

Files and trials carry the process that owns them (`process_id`), so a later run can tell for sure that their owner
died (kill -9, a crash, a reboot) and clean up after it at once, instead of waiting out a timeout. A pid alone is
not enough: pids are reused, so the owner is the pid and the process's start time on this machine.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path


def this_machine() -> str:
    """host|boot id|pid namespace: two processes with equal values see the same process table. Containers
    sharing a host name (or a database) differ in pid namespace, and a reboot changes the boot id."""
    return f"{socket.gethostname()}|{_read(Path('/proc/sys/kernel/random/boot_id'))}|{_readlink('/proc/self/ns/pid')}"


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:  # not Linux
        return ""


def _readlink(path: str) -> str:
    try:
        return os.readlink(path)
    except OSError:
        return ""


def start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux); None when there is no such live process
    (a zombie is dead too); "" when this system cannot tell (no /proc): then only whether the pid exists counts."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        if Path("/proc/self/stat").exists():
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:  # exists, another user's
            pass
        return ""
    except OSError:
        return ""
    fields = stat.rsplit(")", 1)[1].split()  # the command name in (...) may hold spaces
    return None if fields[0] in ("Z", "X") else fields[19]


def process_id(pid: int | None = None) -> str:
    """machine|pid|start time of process `pid` (this one by default): what `gone` reads back."""
    pid = os.getpid() if pid is None else pid
    return f"{this_machine()}|{pid}|{start_time(pid) or ''}"


def gone(recorded: str) -> bool | None:
    """Whether the process `process_id` recorded has ended: True for sure (on this machine, and its pid is free or
    now another process's), False when it still runs, None when this machine cannot tell (another machine)."""
    if not isinstance(recorded, str) or recorded.count("|") != 4:
        return None
    machine, pid, started = recorded.rsplit("|", 2)
    if machine != this_machine() or not pid.isdigit():
        return None
    now = start_time(int(pid))
    return now is None or bool(now and started and now != started)


def started_monotonic() -> float:
    """When this process began, on time.monotonic()'s clock: a budget for a whole command counts the interpreter's
    start and the heavy imports (torch, optuna) too. Where the start time cannot be read, now."""
    now = time.monotonic()
    try:
        ticks = int(start_time(os.getpid()) or "")
        age = time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK")
    except (ValueError, OSError, AttributeError):
        return now
    return now - age if 0 <= age < 3600 else now
