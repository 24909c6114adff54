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

The change tracker (`asd.tracker`) uses the other kind of group, which reports directory
entries instead of open files (``FAN_REPORT_DFID_NAME``): each event names a directory by its
file handle, and the entry in it that changed. `watch_entries` makes one such group on a
whole filesystem, `parse_entries` splits its events, and `open_handle` turns a directory's
handle back into its path.
"""

from __future__ import annotations

import ctypes
import errno
import os
import select
import struct
import time
from collections.abc import Callable, Iterator, Sequence
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
FAN_ATTRIB = 0x4
FAN_MOVED_FROM = 0x40
FAN_MOVED_TO = 0x80
FAN_CREATE = 0x100
FAN_DELETE = 0x200
FAN_ONDIR = 0x40000000
FAN_REPORT_DIR_FID = 0x400
FAN_REPORT_NAME = 0x800
# Every change to an entry of a directory: its data, its metadata, its name coming or going;
# and the last close of a file opened for writing, which is also when a shared writable
# mapping of it goes away (writes through one make no event: `asd.mapped`).
ENTRY_CHANGES = (
    FAN_MODIFY
    | FAN_ATTRIB
    | FAN_CLOSE_WRITE
    | FAN_CREATE
    | FAN_DELETE
    | FAN_MOVED_FROM
    | FAN_MOVED_TO
    | FAN_ONDIR
)
INFO_DFID_NAME = 2
INFO_DFID = 3
_INFO = struct.Struct("=BBH")  # struct fanotify_event_info_header: type, pad, len
_FSID_AND_HANDLE = struct.Struct("=iiIi")  # fsid (2 x int), handle_bytes, handle_type
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


def _records(buffer: bytes) -> Iterator[tuple[int, int, int, int, int, int]]:
    """Each event's offset, length, metadata length, mask, fd and pid in what read(2)
    returned on a fanotify descriptor."""
    offset = 0
    while offset + _METADATA.size <= len(buffer):
        length, version, _, meta_len, mask, fd, pid = _METADATA.unpack_from(buffer, offset)
        if version != METADATA_VERSION or length < _METADATA.size:
            raise AsdError(f"fanotify sent event format {version}, asd reads {METADATA_VERSION}.")
        yield offset, length, meta_len, mask, fd, pid
        offset += length


def parse_events(buffer: bytes) -> list[Event]:
    """Split what read(2) returned on a fanotify descriptor into events."""
    return [Event(mask, fd, pid) for _, _, _, mask, fd, pid in _records(buffer)]


@dataclass(frozen=True)
class EntryEvent:
    """One event of a `watch_entries` group: ``handle`` is the directory's file handle
    (struct file_handle as bytes, with the filesystem's id before it), ``name`` the entry of it
    that changed, or "" when the directory itself did."""

    mask: int
    handle: bytes
    name: bytes


def parse_entries(buffer: bytes) -> list[EntryEvent]:
    """Split what read(2) returned on a `watch_entries` descriptor; an overflow is an event
    with ``FAN_Q_OVERFLOW`` in its mask and no handle."""
    events = []
    for offset, length, meta_len, mask, _, _ in _records(buffer):
        handle, name = b"", b""
        info = offset + meta_len
        while info + _INFO.size <= offset + length:
            kind, _, info_len = _INFO.unpack_from(buffer, info)
            if info_len < _INFO.size:
                break
            if kind in (INFO_DFID_NAME, INFO_DFID):
                body = info + _INFO.size
                handle_bytes = _FSID_AND_HANDLE.unpack_from(buffer, body)[2]
                end = body + _FSID_AND_HANDLE.size + handle_bytes
                handle = bytes(buffer[body:end])
                if kind == INFO_DFID_NAME:
                    name = bytes(buffer[end : info + info_len]).split(b"\0", 1)[0]
                    if name == b".":
                        name = b""
            info += info_len
        events.append(EntryEvent(mask, handle, name))
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
    libc.open_by_handle_at.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
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


def watch_entries(directory: Path) -> int:
    """A non-blocking fanotify descriptor that reports `ENTRY_CHANGES` anywhere on the
    filesystem holding ``directory`` (a filesystem mark). Its queue is the kernel's default
    size: when a reader falls behind, the kernel drops events and says so (an overflow
    event), and the reader must then assume anything changed."""
    libc = _libc()
    flags = FAN_CLASS_NOTIF | FAN_CLOEXEC | FAN_NONBLOCK | FAN_REPORT_DIR_FID | FAN_REPORT_NAME
    fd = int(libc.fanotify_init(flags, os.O_RDONLY | os.O_LARGEFILE))
    if fd < 0:
        err = ctypes.get_errno()
        raise AsdError(f"fanotify cannot report directory entries here: {os.strerror(err)}.")
    how = FAN_MARK_ADD | FAN_MARK_FILESYSTEM
    if libc.fanotify_mark(fd, how, ENTRY_CHANGES, AT_FDCWD, os.fsencode(directory)) != 0:
        err = ctypes.get_errno()
        os.close(fd)
        raise AsdError(f"Cannot watch the filesystem of {directory}: {os.strerror(err)}.")
    return fd


def open_handle(mount_fd: int, handle: bytes) -> str | None:
    """The path, through the mount of ``mount_fd``, of the directory an `EntryEvent` names;
    None if it no longer exists. Needs CAP_DAC_READ_SEARCH: any other failure raises, since
    a caller that took it for "gone" would drop a change."""
    libc = _libc()
    fd = int(libc.open_by_handle_at(mount_fd, handle[8:], os.O_PATH | os.O_CLOEXEC))
    if fd < 0:
        err = ctypes.get_errno()
        if err in (errno.ESTALE, errno.ENOENT):
            return None
        raise AsdError(f"Cannot open a directory by its handle: {os.strerror(err)}.")
    try:
        path = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return None
    finally:
        os.close(fd)
    return None if path.endswith(" (deleted)") else path
