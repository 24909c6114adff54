"""Progress of a long copy or snapshot on a terminal: how much the tool doing it has read.

The work runs as one command (cp, tar); `asd.run` hands its pid to `watching`, whose thread
reads the process's own I/O counter (``rchar`` in ``/proc/<pid>/io``: bytes it read or copied)
twice a second and rewrites one line against the total asd measured beforehand. Under
systemd (no terminal) it is never started: the journal gets the plain log lines.
"""

from __future__ import annotations

import contextlib
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TextIO

from asd.disks import human_size
from asd.run import Watch

INTERVAL = 0.5


def read_by(pid: int) -> int:
    """Bytes process ``pid`` has read so far (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/io", "rb") as f:
            for row in f:
                if row.startswith(b"rchar:"):
                    return int(row.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def line(name: Path, what: str, done: int, total: int) -> str:
    done = max(0, min(done, total))
    share = 100 * done // total if total else 100
    return f"\r{name}: {human_size(done)} of {human_size(total)} {what} ({share} %)"


def watching(name: Path, what: str, total: int, out: TextIO = sys.stdout) -> Watch:
    """For `asd.run`'s ``watch``: while the command ``pid`` runs, show how much of ``total``
    bytes it has read, as "<name>: 3.1 MiB of 12.0 MiB <what> (25 %)"."""

    @contextlib.contextmanager
    def shown(pid: int) -> Iterator[None]:
        stop = threading.Event()

        def show(done: int) -> None:
            out.write(line(name, what, done, total))
            out.flush()

        def tick() -> None:
            while not stop.wait(INTERVAL):
                show(read_by(pid))

        show(0)
        thread = threading.Thread(target=tick, name="asd-progress", daemon=True)
        thread.start()
        try:
            yield
        except BaseException:
            stop.set()
            thread.join()
            out.write("\n")  # what went wrong starts a line of its own
            raise
        stop.set()
        thread.join()
        out.write(line(name, what, total, total) + "\n")
        out.flush()

    return shown


def on_terminal(name: Path, what: str, total: Callable[[], int]) -> Watch | None:
    """`watching`, when standard output is a terminal (the total is measured only then)."""
    return watching(name, what, total()) if sys.stdout.isatty() else None
