"""Run the autoft CLI held at a named moment, so a test can send a signal (or kill -9) exactly there.

    python tests/hold.py MODULE:ATTR[.ATTR][@N][:after] MARKER -- ARGS...

On the N-th call (1st by default) of the named function, before it runs (or just after, with `:after`), the
process writes its pid to MARKER and waits there: the test sees the file appear and sends its signal, which our
handler raises inside that wait, as if it had landed inside the function. Nothing sleeps on a guess.
"""

from __future__ import annotations

import functools
import importlib
import os
import sys
import time
from pathlib import Path

HOLD_S = 120  # a test that never signals fails instead of hanging


def hold(spec: str, marker: str) -> None:
    target, rest = spec.split(":", 1)
    after = rest.endswith(":after")
    attr, _, n = rest.removesuffix(":after").partition("@")
    nth = int(n or 1)
    owner = importlib.import_module(target)
    *path, name = attr.split(".")
    for part in path:
        owner = getattr(owner, part)
    real = getattr(owner, name)
    calls = [0]

    def wait() -> None:
        from autoft.system.interrupts import check_stopped

        Path(marker).write_text(str(os.getpid()))
        t0 = time.monotonic()
        while time.monotonic() - t0 < HOLD_S:
            check_stopped()  # a signal that had to wait (storage code) is raised here too
            time.sleep(0.02)
        raise SystemExit(f"hold.py: no signal came within {HOLD_S} s at {spec}")

    @functools.wraps(real)
    def held(*args, **kwargs):
        calls[0] += 1
        if calls[0] == nth and not after:
            wait()
        out = real(*args, **kwargs)
        if calls[0] == nth and after:
            wait()
        return out

    setattr(owner, name, held)


if __name__ == "__main__":
    spec, marker, sep, *args = sys.argv[1:]
    assert sep == "--", "usage: hold.py SPEC MARKER -- ARGS..."
    hold(spec, marker)
    from autoft.cli import main

    sys.exit(main(args))
