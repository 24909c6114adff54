"""Count real writes under directories with fanotify(7), called through ctypes.

`asd suggest --watch` uses this to measure, not guess, which directories are written to.
Each filesystem holding a watched directory gets one ``FAN_MARK_FILESYSTEM`` mark (falling
back to ``FAN_MARK_MOUNT`` on kernels before 4.20) for ``FAN_MODIFY`` and
``FAN_CLOSE_WRITE``; each event carries an open descriptor of the written file, whose path
(``/proc/self/fd``) tells which directory it belongs to. Needs CAP_SYS_ADMIN (root).

fanotify merges repeated ``FAN_MODIFY`` events of one file while they wait unread, so
``writes`` counts write bursts and is a lower bound on write(2) calls, never an invention.

- `measure(directories, seconds) -> Measurement`
- `parse_events(buffer) -> list[Event]` and `owner(directories, path)`: the pure parts.
"""

from __future__ import annotations

import ctypes
import errno
import os
import select
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from asd.errors import AsdError

FAN_CLOEXEC = 0x1
FAN_NONBLOCK = 0x2
FAN_CLASS_NOTIF = 0x0
FAN_UNLIMITED_QUEUE = 0x10
FAN_MARK_ADD = 0x1
FAN_MARK_MOUNT = 0x10
FAN_MARK_FILESYSTEM = 0x100
FAN_MODIFY = 0x2
FAN_CLOSE_WRITE = 0x8
FAN_Q_OVERFLOW = 0x4000
FAN_NOFD = -1
AT_FDCWD = -100
METADATA_VERSION = 3
# struct fanotify_event_metadata: event_len, vers, reserved, metadata_len, mask, fd, pid
_METADATA = struct.Struct("=IBBHQii")


@dataclass(frozen=True)
class Event:
    mask: int
    fd: int
    pid: int


@dataclass(frozen=True)
class Activity:
    """What was written under one directory while it was watched."""

    writes: int = 0  # FAN_MODIFY events (write bursts)
    closes: int = 0  # files closed after being written
    files: int = 0  # distinct files written


@dataclass(frozen=True)
class Measurement:
    seconds: float
    activity: dict[Path, Activity] = field(default_factory=dict)
    overflowed: bool = False  # the kernel dropped events: the counts are lower bounds


def parse_events(buffer: bytes) -> list[Event]:
    """Split what read(2) returned on a fanotify descriptor into events."""
    events = []
    offset = 0
    while offset + _METADATA.size <= len(buffer):
        length, version, _, _, mask, fd, pid = _METADATA.unpack_from(buffer, offset)
        if version != METADATA_VERSION or length < _METADATA.size:
            raise AsdError(f"fanotify sent event format {version}, asd reads {METADATA_VERSION}.")
        events.append(Event(mask, fd, pid))
        offset += length
    return events


def owner(directories: Sequence[Path], path: str) -> Path | None:
    """The deepest of ``directories`` that holds ``path``."""
    path = path.removesuffix(" (deleted)")
    best = None
    for directory in directories:
        d = str(directory).rstrip("/")
        if (path == d or path.startswith(d + "/")) and (best is None or len(d) > len(str(best))):
            best = directory
    return best


def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.fanotify_init.argtypes = [ctypes.c_uint, ctypes.c_uint]
    libc.fanotify_mark.argtypes = [
        ctypes.c_int,
        ctypes.c_uint,
        ctypes.c_uint64,
        ctypes.c_int,
        ctypes.c_char_p,
    ]
    return libc


def _init(libc: ctypes.CDLL) -> int:
    flags = FAN_CLASS_NOTIF | FAN_CLOEXEC | FAN_NONBLOCK | FAN_UNLIMITED_QUEUE
    fd = int(libc.fanotify_init(flags, os.O_RDONLY | os.O_LARGEFILE))
    if fd >= 0:
        return fd
    err = ctypes.get_errno()
    if err == errno.EPERM:
        raise AsdError("asd suggest --watch needs root: fanotify requires CAP_SYS_ADMIN.")
    if err == errno.ENOSYS:
        raise AsdError("This kernel has no fanotify; asd suggest --watch cannot measure writes.")
    raise AsdError(f"fanotify_init failed: {os.strerror(err)}.")


def _mark(libc: ctypes.CDLL, fd: int, directory: Path) -> None:
    mask = FAN_MODIFY | FAN_CLOSE_WRITE
    path = os.fsencode(directory)
    for how in (FAN_MARK_FILESYSTEM, FAN_MARK_MOUNT):
        if libc.fanotify_mark(fd, FAN_MARK_ADD | how, mask, AT_FDCWD, path) == 0:
            return
        err = ctypes.get_errno()
        if err != errno.EINVAL:
            break
    raise AsdError(f"Cannot watch {directory} with fanotify: {os.strerror(err)}.")


def _marks(directories: Sequence[Path]) -> list[Path]:
    """One directory per filesystem: a filesystem mark covers all of it."""
    by_device: dict[int, Path] = {}
    for directory in directories:
        try:
            by_device.setdefault(os.stat(directory).st_dev, directory)
        except OSError:
            continue
    return list(by_device.values())


def measure(
    directories: Sequence[Path],
    seconds: float,
    *,
    clock: Callable[[], float] = time.monotonic,
) -> Measurement:
    """Watch for ``seconds`` and count writes under each of ``directories``."""
    libc = _libc()
    fd = _init(libc)
    written: dict[Path, set[str]] = {d: set() for d in directories}
    counts: dict[Path, list[int]] = {d: [0, 0] for d in directories}
    overflowed = False
    me = os.getpid()
    try:
        for directory in _marks(directories):
            _mark(libc, fd, directory)
        deadline = clock() + seconds
        while (left := deadline - clock()) > 0:
            ready, _, _ = select.select([fd], [], [], left)
            if not ready:
                continue
            try:
                buffer = os.read(fd, 256 * 1024)
            except BlockingIOError:
                continue
            for event in parse_events(buffer):
                if event.mask & FAN_Q_OVERFLOW:
                    overflowed = True
                if event.fd == FAN_NOFD:
                    continue
                try:
                    path = os.readlink(f"/proc/self/fd/{event.fd}")
                except OSError:
                    path = ""
                finally:
                    os.close(event.fd)
                where = owner(directories, path) if event.pid != me else None
                if where is None:
                    continue
                counts[where][0] += bool(event.mask & FAN_MODIFY)
                counts[where][1] += bool(event.mask & FAN_CLOSE_WRITE)
                written[where].add(path)
    finally:
        os.close(fd)
    activity = {
        d: Activity(writes=counts[d][0], closes=counts[d][1], files=len(written[d]))
        for d in directories
    }
    return Measurement(seconds=seconds, activity=activity, overflowed=overflowed)
