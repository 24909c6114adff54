"""File operations through directory descriptors, one component at a time, never following
a symlink: how asd touches trees a user can write into while it works (the disk copy, the
RAM copy) as root.

- `open_private_dir(path)`: asd's own directory, refused unless it is a real one private to root.
- `parent_at(root_fd, parts, where)`, `open_dir_at(root_fd, rel, where)`, `exists_at`,
  `remove_at`: reach and change entries below an opened directory.
- `rel_parts(rel)`: the components of a relative path a record names, refusing ``..`` and the like.
- `fsync_fd`, `fsync_path`, `syncfs`, `remove_tree`, `remove_unmounted`, `named`: errors name the
  user's path.
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from asd.dirmeta import O_DIR
from asd.errors import SafetyError


def fsync_fd(fd: int, shown: Path) -> None:
    try:
        os.fsync(fd)
    except OSError as exc:
        # fsync is where a failing disk reports lost writes (EIO): say which file.
        raise OSError(exc.errno, exc.strerror, str(shown)) from exc


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        fsync_fd(fd, path)
    finally:
        os.close(fd)


def remove_tree(path: Path) -> None:
    """Remove a file or a whole directory tree; absent is fine. Never follows symlinks."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(path)
    else:
        os.unlink(path)


def remove_unmounted(path: Path) -> None:
    """Remove asd's own RAM directory ``path`` and what it holds, in this process; refused,
    with nothing removed, while anything is mounted below it (as ``rm --one-file-system``
    would). For the smaller trees of a stop: the large RAM copy goes to rm (`asd.coreutils`),
    whose start costs more than Python's extra time per file only from some thousands on."""
    from asd.mounts import MountTable  # mounts runs commands; only this function needs it

    inside = MountTable.read().below(path)
    if inside:
        raise SafetyError(
            f"{inside[0].mountpoint} is mounted inside {path}, so asd removed nothing there; "
            "unmount it and run asd again"
        )
    remove_tree(path)


def named(exc: OSError, path: Path) -> OSError:
    """The same error, naming ``path`` (what the user knows) instead of a relative name."""
    if exc.filename is not None and os.path.isabs(str(exc.filename)):
        return exc
    return OSError(exc.errno, exc.strerror, str(path))


def remove_at(dir_fd: int, name: str) -> None:
    """`remove_tree` of ``name`` in an opened directory."""
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(name, dir_fd=dir_fd)
    else:
        os.unlink(name, dir_fd=dir_fd)


def open_private_dir(path: Path, *, shown: Path | None = None) -> int:
    """Open asd's own directory ``path``: a real directory (not a symlink), owned by us,
    closed to group and others. Anything else was not made by asd and is refused.
    ``shown``: the name to give in messages, when ``path`` is a /proc/self/fd one."""
    try:
        fd = os.open(path, O_DIR)
    except OSError as exc:
        if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
            raise
        fd = -1
    st = os.fstat(fd) if fd >= 0 else os.lstat(path)
    if fd < 0 or st.st_uid != os.geteuid() or st.st_mode & 0o077:
        if fd >= 0:
            os.close(fd)
        raise SafetyError(
            f"{shown or path} is not asd's own journal directory (a "
            f"{stat.filemode(st.st_mode)} entry owned by uid {st.st_uid}); someone may have "
            "planted it to make asd act on files it names, so asd will neither read nor "
            "remove it. Look at what it holds, move it away, and try again"
        )
    return fd


def open_set_up_dir(path: Path, flags: int = os.O_RDONLY) -> int:
    """Open the directory asd set up or checked at ``path``, without following a symlink
    there; one swapped in for it (or a file) is refused: someone who can write to its parent
    is at work."""
    try:
        return os.open(path, flags | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
            raise
        raise SafetyError(
            f"{path} was replaced by a symlink or a file while asd was setting it up; asd "
            "mounts nothing on or from it. Someone who can write to its parent did this: "
            "look at it, and run asd again"
        ) from exc


def rel_parts(rel: str, *, root_ok: bool = False) -> tuple[str, ...]:
    """The components of a path a commit record names; refuses anything not plainly inside."""
    parts = tuple(rel.split("/")) if rel else ()
    if "\0" in rel or any(p in ("", ".", "..") for p in parts):
        raise ValueError(rel)
    if not parts and not root_ok:
        raise ValueError(rel)
    return parts


@contextmanager
def parent_at(root_fd: int, parts: tuple[str, ...], where: Path) -> Iterator[int]:
    """An fd of the directory holding ``parts[-1]`` below ``root_fd``, reached without
    following symlinks. FileNotFoundError if a directory on the way is missing."""
    fd = os.dup(root_fd)
    try:
        for i, name in enumerate(parts[:-1]):
            try:
                nfd = os.open(name, O_DIR, dir_fd=fd)
            except OSError as exc:
                if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                    raise
                bad = where.joinpath(*parts[: i + 1])
                raise SafetyError(
                    f"{bad} is not a directory (someone replaced it, perhaps by a symlink, "
                    f"while asd was writing {where.joinpath(*parts)}); asd does not write "
                    "through it. Look at it, and run asd again"
                ) from exc
            os.close(fd)
            fd = nfd
        yield fd
    finally:
        os.close(fd)


def exists_at(dir_fd: int, name: str) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


@contextmanager
def open_dir_at(root_fd: int, rel: str, where: Path) -> Iterator[int]:
    """An fd of the directory ``rel`` below ``root_fd`` ("" is ``root_fd`` itself), reached
    without following symlinks; ``where`` names ``root_fd`` in messages."""
    if not rel:
        fd = os.dup(root_fd)
    else:
        parts = rel_parts(rel)
        with parent_at(root_fd, parts, where) as pfd:
            fd = os.open(parts[-1], O_DIR, dir_fd=pfd)
    try:
        yield fd
    finally:
        os.close(fd)


def syncfs(fd: int, shown: Path) -> None:
    """Flush the file system holding the open ``fd`` (``shown`` in messages): data and
    metadata, in one journal commit, where an fsync per file costs a commit each."""
    if _libc.syncfs(fd) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(shown))


_libc = ctypes.CDLL(None, use_errno=True)


def remove_empty_tree(root: Path) -> None:
    """Remove ``root`` if it holds nothing but empty directories."""
    if not root.is_dir() or root.is_symlink():
        return
    for dirpath, _dirs, files in os.walk(root, topdown=False):
        if files:
            return
        try:
            os.rmdir(dirpath)
        except OSError:
            return
