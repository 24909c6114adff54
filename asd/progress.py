"""Progress of a long copy on a terminal: how much has reached the destination's file system.

The copy runs as one command; a thread beside it reads the destination file system's used
space (``statvfs``) twice a second and rewrites one line. Under systemd (no terminal) it is
never started: the journal gets the plain log lines.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

from asd.disks import human_size

INTERVAL = 0.5


def used_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


def line(name: Path, done: int, total: int) -> str:
    done = max(0, min(done, total))
    share = 100 * done // total if total else 100
    return f"\r{name}: {human_size(done)} of {human_size(total)} copied ({share} %)"


@contextlib.contextmanager
def copying(name: Path, dst: Path, total: int, out: TextIO = sys.stdout) -> Iterator[None]:
    """Show, while the body runs, the bytes of ``total`` that reached ``dst``'s file system."""
    start = used_bytes(dst)
    stop = threading.Event()

    def show() -> None:
        out.write(line(name, used_bytes(dst) - start, total))
        out.flush()

    def tick() -> None:
        while not stop.wait(INTERVAL):
            show()

    show()
    thread = threading.Thread(target=tick, name="asd-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
    out.write(line(name, total, total) + "\n")
    out.flush()
