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
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path

from asd.layout import WORK_NAME
from asd.state import read_json, write_json_atomic
from asd.tree import Changes

log = logging.getLogger(__name__)


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every regular file and directory below ``root`` (symlinks have no data)."""
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            p = Path(dirpath, name)
            if stat.S_ISREG(os.lstat(p).st_mode):
                fsync_path(p)
        fsync_path(Path(dirpath))


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


def dir_metadata(path: Path) -> dict[str, object]:
    """Owner, mode, times and xattrs (POSIX ACLs are xattrs) of a directory, as JSON."""
    st = os.lstat(path)
    xattrs = {
        name: os.getxattr(path, name, follow_symlinks=False).hex()
        for name in os.listxattr(path, follow_symlinks=False)
    }
    return {
        "uid": st.st_uid,
        "gid": st.st_gid,
        "mode": stat.S_IMODE(st.st_mode),
        "atime_ns": st.st_atime_ns,
        "mtime_ns": st.st_mtime_ns,
        "xattrs": xattrs,
    }


def set_dir_metadata(path: Path, meta: dict[str, object]) -> None:
    os.chown(path, int(meta["uid"]), int(meta["gid"]), follow_symlinks=False)  # type: ignore[call-overload]
    os.chmod(path, int(meta["mode"]))  # type: ignore[call-overload]
    wanted: dict[str, str] = meta["xattrs"]  # type: ignore[assignment]
    for name in set(os.listxattr(path, follow_symlinks=False)) - set(wanted):
        try:
            os.removexattr(path, name, follow_symlinks=False)
        except OSError as exc:
            if exc.errno not in (errno.ENODATA, errno.EOPNOTSUPP):
                raise
    for name, value in wanted.items():
        os.setxattr(path, name, bytes.fromhex(value), follow_symlinks=False)
    times = (int(meta["atime_ns"]), int(meta["mtime_ns"]))  # type: ignore[call-overload]
    os.utime(path, ns=times, follow_symlinks=False)


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

    def new_stage(self) -> Path:
        remove_tree(self.stage)
        self.work.mkdir(mode=0o700, exist_ok=True)
        self.stage.mkdir(mode=0o700)
        return self.stage

    def commit(self, changes: Changes) -> None:
        """Make the staged changes durable and apply them. Returns at a new sync point."""
        fsync_tree(self.stage)
        dirs = {rel: dir_metadata(self.stage / rel if rel else self.stage) for rel in changes.dirs}
        record = {"deleted": list(changes.deleted), "dirs": dirs, "files": list(changes.files)}
        write_json_atomic(self.record, record)
        self.apply()

    def apply(self) -> None:
        data = read_json(self.record)
        deleted: list[str] = data["deleted"]
        dirs: dict[str, dict[str, object]] = data["dirs"]
        files: list[str] = data["files"]
        touched: set[str] = set()
        for rel in deleted:
            remove_tree(self.disk / rel)
            touched.add(rel.rpartition("/")[0])
        for rel in sorted(dirs, key=lambda r: r.count("/")):
            path = self.disk / rel if rel else self.disk
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                path.mkdir(mode=0o700)
            else:
                if not stat.S_ISDIR(st.st_mode):
                    remove_tree(path)
                    path.mkdir(mode=0o700)
        for rel in files:
            staged = self.stage / rel
            if not os.path.lexists(staged):
                continue  # renamed into place by an earlier, interrupted apply
            dest = self.disk / rel
            try:
                if stat.S_ISDIR(os.lstat(dest).st_mode):
                    remove_tree(dest)
            except FileNotFoundError:
                pass
            os.rename(staged, dest)
            touched.add(rel.rpartition("/")[0])
        for rel in sorted(dirs, key=lambda r: r.count("/"), reverse=True):
            set_dir_metadata(self.disk / rel if rel else self.disk, dirs[rel])
            touched.add(rel)
        for rel in touched:
            path = self.disk / rel if rel else self.disk
            if os.path.isdir(path):
                fsync_path(path)
        self.record.unlink()
        fsync_path(self.work)
        remove_tree(self.stage)

    def recover(self) -> str | None:
        """Finish or discard what a crashed resync left. Says what it did, or None."""
        if os.path.lexists(self.record):
            self.apply()
            return "finished writing a resync that was interrupted after its commit point"
        if os.path.lexists(self.stage):
            remove_tree(self.stage)
            return "discarded a resync that was interrupted before its commit point"
        return None
