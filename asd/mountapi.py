"""The kernel's descriptor-based mount calls, for what ``mount(8)`` cannot do: an overlay made
without a mount point, a mount attached *beneath* the one a path shows, and a bind mount from
and onto directories asd holds open (no name looked up between asd's checks and the mount).

Overlay mode gives its RAM back (`asd.shrink`) by building a new overlay, attaching it under
the target's top mount and unmounting that top mount: whoever opens the path afterwards sees
the new overlay, and the switch never shows anything else in between. ``umount`` of the top
mount fails with EBUSY while a file under it is open, which is how asd learns that it must
wait. util-linux has no option for ``MOVE_MOUNT_BENEATH`` (Linux 6.5), so these are system
calls through ctypes; their numbers are the same on every architecture Linux added them to
after 5.1 (the unified table).

Layers go in as ``lowerdir+`` one at a time (Linux 6.8): no escaping of ``:`` or ``,``.

Unmounting is a call here too (`take_off`): a stop takes three mounts off per target, and
starting umount(8) for each cost more than the kernel's work for a small target.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
from collections.abc import Iterator
from pathlib import Path

SYS_OPEN_TREE = 428
SYS_MOVE_MOUNT = 429
SYS_FSOPEN = 430
SYS_FSCONFIG = 431
SYS_FSMOUNT = 432
SYS_MOUNT_SETATTR = 442

OPEN_TREE_CLONE = 1
OPEN_TREE_CLOEXEC = os.O_CLOEXEC
AT_FDCWD = -100
AT_EMPTY_PATH = 0x1000
AT_RECURSIVE = 0x8000
MOVE_MOUNT_F_EMPTY_PATH = 0x4
MOVE_MOUNT_T_EMPTY_PATH = 0x40
MOVE_MOUNT_BENEATH = 0x200
FSOPEN_CLOEXEC = 1
FSMOUNT_CLOEXEC = 1
FSCONFIG_SET_STRING = 1
FSCONFIG_CMD_CREATE = 6
MS_PRIVATE = 1 << 18
MOUNT_ATTR_NOATIME = 0x10
MOUNT_ATTR__ATIME = 0x70  # the atime field: cleared before one of its values is set
MNT_DETACH = 2
UMOUNT_NOFOLLOW = 8


class MountAttr(ctypes.Structure):
    _fields_ = [  # noqa: RUF012 - ctypes' own declaration
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    ]


_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class MountCallError(OSError):
    """A mount system call failed; ``str()`` names the call, the path and the kernel's words."""


def _call(what: str, *args: object) -> int:
    rc = _libc.syscall(*args)
    if rc < 0:
        err = ctypes.get_errno()
        raise MountCallError(err, f"{what}: {os.strerror(err)}")
    return int(rc)


def _fs_messages(fs_fd: int) -> str:
    """What the file system said about a failed configuration (read from its context)."""
    lines = []
    with contextlib.suppress(OSError):
        while True:
            raw = os.read(fs_fd, 1024)
            if not raw:
                break
            lines.append(raw.decode(errors="replace").strip())
    return "; ".join(lines)


def overlay(lowers: list[Path], upper: Path, work: Path, options: dict[str, str]) -> int:
    """A new overlay, not attached anywhere: a mount descriptor (the caller closes it)."""
    fs_fd = _call("fsopen overlay", SYS_FSOPEN, b"overlay", FSOPEN_CLOEXEC)
    try:
        settings = [("lowerdir+", str(p)) for p in lowers]
        settings += [("upperdir", str(upper)), ("workdir", str(work)), *options.items()]
        try:
            for key, value in settings:
                _call(
                    f"overlay option {key}={value}",
                    SYS_FSCONFIG,
                    fs_fd,
                    FSCONFIG_SET_STRING,
                    key.encode(),
                    os.fsencode(value),
                    0,
                )
            _call("overlay create", SYS_FSCONFIG, fs_fd, FSCONFIG_CMD_CREATE, None, None, 0)
        except MountCallError as exc:
            said = _fs_messages(fs_fd)
            text = f"{exc.strerror} ({said})" if said else exc.strerror
            raise MountCallError(exc.errno, text) from None
        return _call("fsmount overlay", SYS_FSMOUNT, fs_fd, FSMOUNT_CLOEXEC, 0)
    finally:
        os.close(fs_fd)


def clone(path: Path | None = None, fd: int = AT_FDCWD) -> int:
    """A detached copy of the mount at ``path`` (or of the mount descriptor ``fd``)."""
    name = os.fsencode(path) if path is not None else b""
    flags = OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC | (0 if path is not None else AT_EMPTY_PATH)
    return _call(f"open_tree {path or fd}", SYS_OPEN_TREE, fd, name, flags)


def attach(mount_fd: int, path: Path, *, beneath: bool = False) -> None:
    """Attach the detached mount ``mount_fd`` at ``path``: on top, or beneath its top mount."""
    flags = MOVE_MOUNT_F_EMPTY_PATH | (MOVE_MOUNT_BENEATH if beneath else 0)
    where = f"{'beneath the mount at ' if beneath else ''}{path}"
    name = os.fsencode(path)
    _call(f"move_mount to {where}", SYS_MOVE_MOUNT, mount_fd, b"", AT_FDCWD, name, flags)


@contextlib.contextmanager
def bind(
    source_fd: int, target_fd: int, shown: Path, *, private: bool = False, noatime: bool = False
) -> Iterator[int]:
    """Bind-mount the directory ``source_fd`` is open on over the one ``target_fd`` is open
    on (``shown`` names it in messages), as ``mount --bind`` does, but without looking a name
    up again: mount(8) turns a ``/proc/self/fd`` name back into a path, which someone who
    can write to a parent directory could swap before its mount call. ``private``: the new
    mount neither sends nor receives mount events (``--make-private``). ``noatime``: reads
    through it leave atimes alone (``-o noatime``, this mount only). Yields the new mount's
    descriptor (for `detach`)."""
    flags = OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC | AT_EMPTY_PATH
    with descriptor(_call(f"open_tree for {shown}", SYS_OPEN_TREE, source_fd, b"", flags)) as fd:
        if noatime:
            _set_attr(fd, shown, MountAttr(attr_set=MOUNT_ATTR_NOATIME, attr_clr=MOUNT_ATTR__ATIME))
        moved = MOVE_MOUNT_F_EMPTY_PATH | MOVE_MOUNT_T_EMPTY_PATH
        _call(f"move_mount to {shown}", SYS_MOVE_MOUNT, fd, b"", target_fd, b"", moved)
        if private:  # once attached: attaching below a shared mount makes it shared
            _set_attr(fd, shown, MountAttr(propagation=MS_PRIVATE))
        yield fd


def _set_attr(mount_fd: int, shown: Path, attr: MountAttr) -> None:
    size = ctypes.sizeof(attr)
    what = f"mount_setattr {shown}"
    _call(what, SYS_MOUNT_SETATTR, mount_fd, b"", AT_EMPTY_PATH, ctypes.byref(attr), size)


def detach(mount_fd: int, shown: Path) -> None:
    """Unmount the mount ``mount_fd`` is open on, wherever it is now (lazily if busy)."""
    if _libc.umount2(os.fsencode(f"/proc/self/fd/{mount_fd}"), MNT_DETACH) != 0:
        err = ctypes.get_errno()
        raise MountCallError(err, f"umount {shown}: {os.strerror(err)}")


def unmount(path: Path) -> bool:
    """Unmount the top mount at ``path``, never lazily: False while it is busy (EBUSY)."""
    if _libc.umount2(os.fsencode(path), 0) == 0:
        return True
    err = ctypes.get_errno()
    if err == errno.EBUSY:
        return False
    raise MountCallError(err, f"umount {path}: {os.strerror(err)}")


def take_off(path: Path, *, lazy: bool = False) -> None:
    """Unmount the top mount at ``path`` (never one below it, never forced: asd#86; a symlink
    in its place is not followed). ``lazy``: detach it even while files under it are open."""
    if _libc.umount2(os.fsencode(path), UMOUNT_NOFOLLOW | (MNT_DETACH if lazy else 0)) == 0:
        return
    err = ctypes.get_errno()
    hint = (
        "; a program opened a file in it since asd looked, try again" if err == errno.EBUSY else ""
    )
    raise MountCallError(err, f"umount {path}: {os.strerror(err)}{hint}")


@contextlib.contextmanager
def descriptor(fd: int) -> Iterator[int]:
    try:
        yield fd
    finally:
        os.close(fd)
