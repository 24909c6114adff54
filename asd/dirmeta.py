"""A directory's own metadata — owner, mode, times, xattrs (POSIX ACLs are xattrs) — as a
JSON-able dict, read from and applied to directories opened without following symlinks.
The journal records it for every directory a resync writes; the overlay's lower tree and
upper root are given the disk copy's with it."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

O_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def dir_metadata(path: Path) -> dict[str, object]:
    """Owner, mode, times and xattrs (POSIX ACLs are xattrs) of a directory, as JSON."""
    fd = os.open(path, O_DIR)
    try:
        return dir_metadata_fd(fd)
    finally:
        os.close(fd)


def dir_metadata_fd(fd: int) -> dict[str, object]:
    st = os.fstat(fd)
    xattrs = {name: os.getxattr(fd, name).hex() for name in os.listxattr(fd)}
    return {
        "uid": st.st_uid,
        "gid": st.st_gid,
        "mode": stat.S_IMODE(st.st_mode),
        "atime_ns": st.st_atime_ns,
        "mtime_ns": st.st_mtime_ns,
        "xattrs": xattrs,
    }


def set_dir_metadata(path: Path, meta: dict[str, object]) -> None:
    fd = os.open(path, O_DIR)
    try:
        set_dir_metadata_fd(fd, meta)
    finally:
        os.close(fd)


def set_dir_metadata_fd(fd: int, meta: dict[str, object]) -> None:
    os.chown(fd, int(meta["uid"]), int(meta["gid"]))  # type: ignore[call-overload]
    os.chmod(fd, int(meta["mode"]))  # type: ignore[call-overload]
    wanted: dict[str, str] = meta["xattrs"]  # type: ignore[assignment]
    for name in set(os.listxattr(fd)) - set(wanted):
        try:
            os.removexattr(fd, name)
        except OSError as exc:
            if exc.errno not in (errno.ENODATA, errno.EOPNOTSUPP):
                raise
    for name, value in wanted.items():
        os.setxattr(fd, name, bytes.fromhex(value))
    times = (int(meta["atime_ns"]), int(meta["mtime_ns"]))  # type: ignore[call-overload]
    os.utime(fd, ns=times)
