"""Crash-safe write-back into a disk copy: stage, fsync, commit record, apply by rename.

The disk copy only ever moves from one sync point to the next:

1. changed files are copied (by rsync, elsewhere) into ``.asd-work/stage`` on the disk copy's
   own file system and fsynced;
2. a commit record listing the deletions, directories and files is written to a temp file,
   fsynced and renamed to ``.asd-work/commit.json`` — this rename is the commit point;
3. the record is applied: deletions, new directories, each staged file renamed over its old
   path, then directory metadata from the stage, deepest first; then the record and the stage
   are removed.

Every apply step is idempotent, so `recover` rolls a committed record forward after a crash at
any point, and throws away a stage that was never committed. Files are always replaced by a
new inode, never rewritten in place: in overlay mode the lower layer hard-links the disk
copy's files, and it must never change while mounted.

The disk copy belongs to the target's owner, who can write into it (through the backup mount
while asd runs, or before asd ever starts), so nothing in it is trusted: ``.asd-work`` is used
only if it is a real directory private to root, every name in a commit record must be a plain
path inside the disk copy, and the record is applied through directory descriptors opened one
component at a time without following symlinks — a symlink the owner planted on the way makes
the apply stop, never write through it.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
import stat
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from asd.dirmeta import O_DIR, dir_metadata_fd, set_dir_metadata_fd
from asd.errors import SafetyError
from asd.layout import WORK_NAME
from asd.state import write_json_atomic
from asd.tree import Changes

log = logging.getLogger(__name__)


def _fsync(fd: int, shown: Path) -> None:
    try:
        os.fsync(fd)
    except OSError as exc:
        # fsync is where a failing disk reports lost writes (EIO): say which file.
        raise OSError(exc.errno, exc.strerror, str(shown)) from exc


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        _fsync(fd, path)
    finally:
        os.close(fd)


def fsync_tree(root_fd: int, shown: Path) -> None:
    """fsync every regular file and directory below the opened directory ``root_fd``
    (symlinks have no data), never following a symlink; errors name ``shown``/…"""
    for dirpath, _dirnames, filenames, dir_fd in os.fwalk(".", dir_fd=root_fd):
        here = shown / dirpath
        for name in filenames:
            try:
                fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
            except OSError as exc:
                if exc.errno == errno.ELOOP:
                    continue  # a symlink
                raise named(exc, here / name) from exc
            try:
                if stat.S_ISREG(os.fstat(fd).st_mode):
                    _fsync(fd, here / name)
            finally:
                os.close(fd)
        _fsync(dir_fd, here)


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


def named(exc: OSError, path: Path) -> OSError:
    """The same error, naming ``path`` (what the user knows) instead of a relative name."""
    if exc.filename is not None and os.path.isabs(str(exc.filename)):
        return exc
    return OSError(exc.errno, exc.strerror, str(path))


def _remove_at(dir_fd: int, name: str) -> None:
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


def rel_parts(rel: str, *, root_ok: bool = False) -> tuple[str, ...]:
    """The components of a path a commit record names; refuses anything not plainly inside."""
    parts = tuple(rel.split("/")) if rel else ()
    if "\0" in rel or any(p in ("", ".", "..") for p in parts):
        raise ValueError(rel)
    if not parts and not root_ok:
        raise ValueError(rel)
    return parts


@contextmanager
def _parent(root_fd: int, parts: tuple[str, ...], where: Path) -> Iterator[int]:
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


def _exists_at(dir_fd: int, name: str) -> os.stat_result | None:
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
        with _parent(root_fd, parts, where) as pfd:
            fd = os.open(parts[-1], O_DIR, dir_fd=pfd)
    try:
        yield fd
    finally:
        os.close(fd)


@dataclass(frozen=True)
class Journal:
    """The journal of one disk copy, ``disk`` (the target before mounting, its backup after)."""

    disk: Path

    @property
    def work(self) -> Path:
        return self.disk / WORK_NAME

    @property
    def stage(self) -> Path:
        return self.work / "stage"

    @property
    def record(self) -> Path:
        return self.work / "commit.json"

    @contextmanager
    def _work_fd(self) -> Iterator[int]:
        fd = open_private_dir(self.work)
        try:
            yield fd
        finally:
            os.close(fd)

    @contextmanager
    def new_stage(self) -> Iterator[int]:
        """An empty stage, as an open directory descriptor: whoever fills it must write
        through that (``/proc/self/fd/N``), never by name. The disk copy's owner can rename
        ``.asd-work`` and plant a symlink in its place at any moment; a write by name would
        then follow it anywhere, as root."""
        try:
            with contextlib.suppress(FileExistsError):
                os.mkdir(self.work, 0o700)
            with self._work_fd() as wfd:
                _remove_at(wfd, "stage")
                os.mkdir("stage", 0o700, dir_fd=wfd)
                fd = os.open("stage", O_DIR, dir_fd=wfd)
        except OSError as exc:
            raise named(exc, self.stage) from exc
        try:
            yield fd
        finally:
            os.close(fd)

    def commit(self, changes: Changes, given: Mapping[str, dict[str, object]]) -> None:
        """Make the staged changes durable and apply them. Returns at a new sync point.
        Each directory's metadata is read from the stage, unless ``given`` holds it."""
        with self._work_fd() as wfd, open_dir_at(wfd, "stage", self.work) as sfd:
            fsync_tree(sfd, self.stage)
            dirs: dict[str, dict[str, object]] = {}
            for rel in changes.dirs:
                if rel in given:
                    dirs[rel] = given[rel]
                    continue
                with open_dir_at(sfd, rel, self.stage) as fd:
                    dirs[rel] = dir_metadata_fd(fd)
            record = {"deleted": list(changes.deleted), "dirs": dirs, "files": list(changes.files)}
            write_json_atomic(self.record, record, dir_fd=wfd)
        self.apply()

    def staged(self, stage_fd: int, rel: str) -> bool:
        """Whether ``rel`` is in the stage ``stage_fd``, looked up without following links
        (under a directory that became a symlink in RAM since the walk, it is not)."""
        try:
            parts = rel_parts(rel)
            with _parent(stage_fd, parts, self.stage) as pfd:
                return _exists_at(pfd, parts[-1]) is not None
        except (FileNotFoundError, NotADirectoryError, SafetyError):
            return False

    def _read_record(self, wfd: int) -> tuple[list[str], dict[str, dict[str, object]], list[str]]:
        fd = os.open("commit.json", os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=wfd)
        with os.fdopen(fd, "rb") as fh:
            data = json.loads(fh.read())
        try:
            deleted = [str(r) for r in data["deleted"]]
            dirs = {str(r): dict(m) for r, m in data["dirs"].items()}
            files = [str(r) for r in data["files"]]
            for rel in [*deleted, *files]:
                rel_parts(rel)
            for rel in dirs:
                rel_parts(rel, root_ok=True)
        except (KeyError, TypeError, AttributeError, ValueError) as exc:
            raise SafetyError(
                f"{self.record} is not a commit record asd wrote (it names {exc}, not a path "
                f"inside {self.disk}); asd will not apply it. Move {self.work} away and try again"
            ) from exc
        return deleted, dirs, files

    def apply(self) -> None:
        with self._work_fd() as wfd:
            deleted, dirs, files = self._read_record(wfd)
            dfd = os.open(self.disk, O_DIR)
            at = [""]
            try:
                self._apply(wfd, dfd, deleted, dirs, files, at)
            except OSError as exc:
                # Descriptor-relative calls only know the last name: say the whole path.
                raise named(exc, self.disk / at[0]) from exc
            finally:
                os.close(dfd)
            os.unlink("commit.json", dir_fd=wfd)
            os.fsync(wfd)
            _remove_at(wfd, "stage")

    def _staged(self, wfd: int, parts: tuple[str, ...]) -> bool:
        try:
            with _parent(wfd, ("stage", *parts), self.work) as sfd:
                return _exists_at(sfd, parts[-1]) is not None
        except FileNotFoundError:
            return False

    def _apply(
        self,
        wfd: int,
        dfd: int,
        deleted: list[str],
        dirs: dict[str, dict[str, object]],
        files: list[str],
        at: list[str],
    ) -> None:
        """Apply a validated record; ``at[0]`` is kept at the entry being worked on."""
        disk = self.disk
        touched: set[str] = set()
        new_files = set(files)
        for rel in deleted:
            at[0] = rel
            parts = rel_parts(rel)
            # A type change is a deletion plus the new entry. When rolling forward, the new
            # entry may already be in place: leave it (the old one is gone already).
            try:
                with _parent(dfd, parts, disk) as pfd:
                    st = _exists_at(pfd, parts[-1])
                    if st is None:
                        continue
                    if rel in dirs and stat.S_ISDIR(st.st_mode):
                        continue
                    if rel in new_files and not self._staged(wfd, parts):
                        continue
                    _remove_at(pfd, parts[-1])
            except FileNotFoundError:
                continue
            touched.add(rel.rpartition("/")[0])
        for rel in sorted(dirs, key=lambda r: r.count("/")):
            at[0] = rel
            if not rel:
                continue
            parts = rel_parts(rel)
            with _parent(dfd, parts, disk) as pfd:
                st = _exists_at(pfd, parts[-1])
                if st is not None and not stat.S_ISDIR(st.st_mode):
                    _remove_at(pfd, parts[-1])
                    st = None
                if st is None:
                    os.mkdir(parts[-1], 0o700, dir_fd=pfd)
        for rel in files:
            at[0] = rel
            parts = rel_parts(rel)
            try:
                with _parent(wfd, ("stage", *parts), self.work) as sfd:
                    if _exists_at(sfd, parts[-1]) is None:
                        continue  # renamed into place by an earlier, interrupted apply
                    with _parent(dfd, parts, disk) as pfd:
                        st = _exists_at(pfd, parts[-1])
                        if st is not None and stat.S_ISDIR(st.st_mode):
                            _remove_at(pfd, parts[-1])
                        os.rename(parts[-1], parts[-1], src_dir_fd=sfd, dst_dir_fd=pfd)
            except FileNotFoundError:
                continue  # the staged file's directory is gone: renamed by an earlier apply
            touched.add(rel.rpartition("/")[0])
        for rel in sorted(dirs, key=lambda r: r.count("/"), reverse=True):
            at[0] = rel
            with open_dir_at(dfd, rel, disk) as fd:
                set_dir_metadata_fd(fd, dirs[rel])
            touched.add(rel)
        for rel in touched:
            at[0] = rel
            try:
                with open_dir_at(dfd, rel, disk) as fd:
                    os.fsync(fd)
            except (FileNotFoundError, NotADirectoryError):
                continue
            except OSError as exc:
                raise OSError(exc.errno, exc.strerror, str(disk / rel)) from exc

    def recover(self) -> str | None:
        """Finish or discard what a crashed resync left. Says what it did, or None."""
        if not os.path.lexists(self.work):
            return None
        with self._work_fd() as wfd:
            if _exists_at(wfd, "commit.json") is not None:
                committed = True
            elif _exists_at(wfd, "stage") is not None:
                _remove_at(wfd, "stage")
                return "discarded a resync that was interrupted before its commit point"
            else:
                return None
        if committed:
            self.apply()
        return "finished writing a resync that was interrupted after its commit point"
