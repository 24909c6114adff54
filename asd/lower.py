"""Overlay mode's lower layer: a tree of hard links to the disk copy's files, kept from one
session to the next and brought up to date at each sync.

Building it costs a directory entry per file on the disk (118 MiB of metadata for 200k files
on ext4) and removing it as much again, so asd builds it once and keeps it in ``.asd-work``
when it stops. At the next sync only the directories that changed meanwhile are looked at:
the record beside the tree (``lower.json``) holds, per directory, the disk copy's inode and
ctime and the lower tree's. Any entry made, removed or renamed in a directory, and any change
of its owner, mode, times or xattrs, moves that directory's ctime, which no program can set;
a file changed in place is the same inode, which the tree links already. A directory whose
four numbers are those recorded is skipped; any other is listed on both sides and its lower
entries made to match (a link to the same inode, or removed and made again), and so is every
directory below one the record does not know. A disk copy directory is listed through a
descriptor opened a name at a time from the top, never through a symlink (one swapped in
while asd walks is refused); the lower tree sits in asd's root-only ``.asd-work``.

A ctime is only as fine as the file system's clock tick (a second on old ext3): a directory
changed within ``RACY_NS`` of the moment asd looked at it could change again within the same
tick without its ctime moving, so it is recorded as unknown and listed again next time (git's
index treats "racily clean" entries the same way). No record, one that is not root's or not
of this directory, or an unreadable one: the tree is removed and built from nothing.

Directories get the disk copy's owner, mode, times and extended attributes (POSIX ACLs
included) once their own entries are right; deeper work changes only deeper directories, so
their times stay the disk copy's: the merged view shows a lower directory's own metadata
until a program changes it. Every non-directory (file, symlink, device node, fifo, socket) is
a hard link, so its metadata is the disk copy's by construction. Nothing is followed: symlinks
are linked as symlinks, and the walk stays on the disk copy's file system.

The spare: a session that gave overlay RAM back (`asd.shrink`) ends with a delta of hard
links to the files its resyncs wrote. Removing those links at the stop and making them again
in the tree at the next sync changes each file's inode twice, and after a first session the
files' inodes lie scattered over the inode tables (the new ones take the slots of the old
versions the tree let go), so each change costs a 4 KiB block of its own: 4.2 MiB for 500
files at an unsync of the benchmark. So a clean stop keeps the newest delta as ``spare``
(`keep_spare`), and the next sync moves a spare link into the tree by rename where it names
the very inode the disk copy holds at that name; every other spare entry (a whiteout, a
version replaced since, a name renamed while asd was stopped) is removed before the sync
goes on, so no count of links sees it.
"""

from __future__ import annotations

import errno
import json
import os
import re
import stat
import time
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from pathlib import Path

from asd.dirfd import remove_at, remove_tree, syncfs
from asd.dirmeta import O_DIR, dir_metadata_fd, set_dir_metadata_fd
from asd.errors import SafetyError
from asd.state import write_json_atomic

VERSION = 1
CACHEDIR_TAG = "CACHEDIR.TAG"
SPARE = "spare"  # beside the tree: the last session's delta, kept (see above)
DELTA = re.compile(r"delta\.(\d+)")  # `TargetLayout.delta`
CACHEDIR_SIGNATURE = "Signature: 8a477f597d28d172789f06886806bc55"  # the tag's spec fixes it
RACY_NS = 2_000_000_000
UNKNOWN = -1  # a ctime no directory has: never matches, so the directory is listed again
DIR = -1  # an entry's key when it is a directory: no inode number is negative

# rel -> (disk copy directory inode, its ctime_ns, lower directory inode, its ctime_ns)
DirState = tuple[int, int, int, int]


@dataclass(frozen=True)
class Refresh:
    built: bool  # made from nothing: there was no usable record
    dirs: int  # directories in the tree
    listed: int  # of them, listed and brought up to date
    linked: int  # hard links made
    moved: int  # links moved from the spare instead of made
    removed: int  # lower entries removed (gone from the disk copy, or replaced there)
    shared: int  # links made to a file that then had other than two (its name, this link)

    def describe(self) -> str:
        if self.built:
            return f"built the overlay's lower tree: {self.dirs} directories, {self.linked} links"
        return (
            f"overlay lower tree kept from the last session: {self.listed} of {self.dirs} "
            f"directories changed, {self.linked} links made, {self.moved} moved from the last "
            f"session's delta, {self.removed} removed"
        )


def refresh(
    src: Path, dst: Path, record: Path, exclude_top: AbstractSet[str] = frozenset()
) -> Refresh:
    """Make ``dst`` mirror ``src``, reusing what the tree and ``record`` say is still right."""
    known = _load(record, src, dst)
    built = known is None
    if known is None:
        discard(dst, record)
        os.mkdir(dst, 0o700)
        known = {}
    walk = _Walk(src, dst, exclude_top, known, dst.parent / SPARE)
    walk.run()
    remove_tree(dst.parent / SPARE)  # what was not moved: before anything counts links
    fd = os.open(dst, O_DIR)
    try:
        syncfs(fd, dst)  # the tree on disk before a record that vouches for it
    finally:
        os.close(fd)
    _save(record, walk.states)
    tag_as_cache(dst.parent)
    return Refresh(
        built, len(walk.states), walk.listed, walk.linked, walk.moved, walk.removed, walk.shared
    )


def tag_as_cache(work: Path) -> None:
    """Mark ``work`` (the lower tree's directory) with a cache directory tag: backup tools
    that honour tags (``tar --exclude-caches``, borg and restic's ``--exclude-caches``) then
    skip it while asd is stopped. The tree only repeats the target's own files, 200k
    entries for 200k files, and a tool that does not see hard links would copy each file
    twice."""
    try:
        fd = os.open(
            work / CACHEDIR_TAG, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644
        )
    except FileExistsError:
        return
    with os.fdopen(fd, "w") as fh:
        fh.write(
            f"{CACHEDIR_SIGNATURE}\n# anything-sync-daemon's lower tree for overlay mode: hard"
            " links to this target's own files, rebuilt when missing (see asd(1)).\n"
        )


def discard(dst: Path, record: Path) -> None:
    """Remove the tree, its record and the spare; the record first: a half-removed tree must
    never meet its old record. The cache tag goes last: it marks the tree."""
    remove_tree(record)
    remove_tree(dst)
    remove_tree(dst.parent / SPARE)
    remove_tree(dst.parent / CACHEDIR_TAG)


def keep_spare(work_fd: int) -> None:
    """At the end of a session (a clean stop, or the recovery after a crash), in asd's opened
    work directory: keep the newest delta as the spare, unless one is kept already (a sync
    that did not reach its tree; that one is as good). Older deltas are the caller's to
    remove. Any delta will do, even a half-built one: a sync moves only links that name the
    inode the disk copy holds at that name."""
    names = os.listdir(work_fd)
    deltas = [(int(m[1]), name) for name in names if (m := DELTA.fullmatch(name))]
    if deltas and SPARE not in names:
        os.rename(max(deltas)[1], SPARE, src_dir_fd=work_fd, dst_dir_fd=work_fd)


class _Walk:
    """One pass over the disk copy's directories, top down."""

    def __init__(
        self,
        src: Path,
        dst: Path,
        exclude_top: AbstractSet[str],
        known: dict[str, DirState],
        spare: Path,
    ) -> None:
        self.src, self.dst, self.exclude_top, self.known = src, dst, exclude_top, known
        self.spare = spare
        self.dev = os.lstat(src).st_dev
        self.children: dict[str, list[str]] = {}
        for rel in known:
            if rel:
                self.children.setdefault(rel.rpartition("/")[0], []).append(rel)
        self.states: dict[str, DirState] = {}
        self.listed = self.linked = self.moved = self.removed = self.shared = 0

    def run(self) -> None:
        todo = [""]
        while todo:
            rel = todo.pop()
            src_dir = os.path.join(self.src, rel) if rel else os.fspath(self.src)
            dst_dir = os.path.join(self.dst, rel) if rel else os.fspath(self.dst)
            state = self._unchanged(rel, src_dir, dst_dir)
            if state is not None:
                self.states[rel] = state
                todo += self.children.get(rel, [])
            else:
                todo += self._update(rel, src_dir, dst_dir)

    def _unchanged(self, rel: str, src_dir: str, dst_dir: str) -> DirState | None:
        was = self.known.get(rel)
        if was is None or was[1] == UNKNOWN:
            return None
        try:
            s, d = os.lstat(src_dir), os.lstat(dst_dir)
        except FileNotFoundError:
            return None
        if not (stat.S_ISDIR(s.st_mode) and stat.S_ISDIR(d.st_mode)):
            return None
        now = (s.st_ino, s.st_ctime_ns, d.st_ino, d.st_ctime_ns)
        return was if now == was else None

    def _update(self, rel: str, src_dir: str, dst_dir: str) -> list[str]:
        """Bring the lower directory ``rel`` up to date; its subdirectories, to visit."""
        self.listed += 1
        looked = time.time_ns()
        if not os.path.isdir(dst_dir) or os.path.islink(dst_dir):
            remove_tree(Path(dst_dir))
            os.mkdir(dst_dir, 0o700)
        sfd = self._open_src(rel, src_dir)
        spare = self._open_spare(rel)
        try:
            before = os.fstat(sfd)
            with os.scandir(sfd) as it:
                want = [de for de in it if rel or de.name not in self.exclude_top]
            subdirs: list[str] = []
            dfd = os.open(dst_dir, O_DIR)
            try:
                # An entry is right when both are directories (their contents are checked on
                # their own) or both name the same inode: one key per entry says which.
                with os.scandir(dfd) as it:
                    have = {
                        de.name: DIR if de.is_dir(follow_symlinks=False) else de.inode()
                        for de in it
                    }
                keys = [DIR if de.is_dir(follow_symlinks=False) else de.inode() for de in want]
                right = {
                    de.name for de, key in zip(want, keys, strict=True) if have.get(de.name) == key
                }
                for name in have.keys() - right:
                    remove_at(dfd, name)
                    self.removed += 1
                for w, key in zip(want, keys, strict=True):
                    name = w.name
                    if key == DIR:
                        if not self._same_fs(w):
                            continue  # another file system mounted inside: not part of the copy
                        if name not in right:
                            os.mkdir(name, 0o700, dir_fd=dfd)
                        subdirs.append(f"{rel}/{name}" if rel else name)
                    elif name not in right:
                        if spare >= 0 and self._spare_links(spare, name, key):
                            os.rename(name, name, src_dir_fd=spare, dst_dir_fd=dfd)
                            self.moved += 1
                        else:
                            os.link(
                                name, name, src_dir_fd=sfd, dst_dir_fd=dfd, follow_symlinks=False
                            )
                            self.linked += 1
                        if os.stat(name, dir_fd=dfd, follow_symlinks=False).st_nlink != 2:
                            self.shared += 1
                set_dir_metadata_fd(dfd, dir_metadata_fd(sfd))
                after = os.fstat(sfd)
                mine = os.fstat(dfd)
            finally:
                os.close(dfd)
        finally:
            os.close(sfd)
            if spare >= 0:
                os.close(spare)
        ctime = before.st_ctime_ns
        if (after.st_ino, after.st_ctime_ns) != (before.st_ino, ctime) or ctime >= looked - RACY_NS:
            ctime = UNKNOWN  # changed while asd listed it, or may change within its tick
        self.states[rel] = (before.st_ino, ctime, mine.st_ino, mine.st_ctime_ns)
        return subdirs

    def _open_src(self, rel: str, shown: str) -> int:
        """The disk copy's directory ``rel``, opened a name at a time from the top without
        following a symlink: a directory swapped for one while asd walks is refused, so the
        tree never links what a symlink points to."""
        fd = os.open(self.src, O_DIR)
        try:
            for name in rel.split("/") if rel else ():
                parent, fd = fd, -1
                try:
                    fd = os.open(name, O_DIR, dir_fd=parent)
                finally:
                    os.close(parent)
        except OSError as exc:
            if fd >= 0:
                os.close(fd)
            if exc.errno in (errno.ELOOP, errno.ENOTDIR, errno.ENOENT):
                raise SafetyError(
                    f"{shown} stopped being a directory while asd built the overlay's lower "
                    "tree (something renamed or replaced it); this start was undone, try again"
                ) from exc
            raise
        return fd

    def _open_spare(self, rel: str) -> int:
        """The spare's directory ``rel``, or -1. The spare is asd's own, in its root-only
        work directory; its last name is not followed all the same."""
        try:
            return os.open(os.path.join(self.spare, rel) if rel else self.spare, O_DIR)
        except OSError:
            return -1

    def _spare_links(self, spare_fd: int, name: str, ino: int) -> bool:
        """Whether the spare's ``name`` is a link to the disk copy's inode ``ino``."""
        try:
            st = os.stat(name, dir_fd=spare_fd, follow_symlinks=False)
        except OSError:
            return False
        return st.st_ino == ino and st.st_dev == self.dev and not stat.S_ISDIR(st.st_mode)

    def _same_fs(self, de: os.DirEntry[str]) -> bool:
        return de.stat(follow_symlinks=False).st_dev == self.dev


def _load(record: Path, src: Path, dst: Path) -> dict[str, DirState] | None:
    """The record, if asd wrote it for this very directory and the tree is there."""
    try:
        fd = os.open(record, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
            return None
        with os.fdopen(os.dup(fd), "rb") as fh:
            raw = json.loads(fh.read())
        dirs = {str(d[0]): (int(d[1]), int(d[2]), int(d[3]), int(d[4])) for d in raw["dirs"]}
        if raw["version"] != VERSION or dirs[""][0] != os.lstat(src).st_ino:
            return None
        if not os.path.isdir(dst) or os.path.islink(dst):
            return None
        return dirs
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return None
    finally:
        os.close(fd)


def _save(record: Path, states: dict[str, DirState]) -> None:
    dirs = [[rel, *state] for rel, state in sorted(states.items())]
    write_json_atomic(record, {"version": VERSION, "dirs": dirs})


def is_mirror(src: Path, dst: Path, exclude_top: frozenset[str] = frozenset()) -> bool:
    """Whether ``dst`` shares every non-directory inode of ``src`` and holds nothing else
    (a check for tests)."""
    for dirpath, dirnames, filenames in os.walk(src):
        rel = os.path.relpath(dirpath, src)
        if rel == ".":
            dirnames[:] = [d for d in dirnames if d not in exclude_top]
            filenames = [f for f in filenames if f not in exclude_top]
        theirs = set(os.listdir(os.path.join(dst, rel)))
        if theirs != {*dirnames, *filenames}:
            return False
        for name in filenames:
            a = os.lstat(os.path.join(dirpath, name))
            b = os.lstat(os.path.join(dst, rel, name))
            if (a.st_dev, a.st_ino) != (b.st_dev, b.st_ino) or stat.S_ISDIR(b.st_mode):
                return False
    return True
