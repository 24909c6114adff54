"""Crash-safe write-back into a disk copy: stage, fsync, commit record, apply by rename.

The disk copy only ever moves from one sync point to the next:

1. changed files are copied (by rsync, elsewhere) into ``.asd-work/stage`` on the disk copy's
   own file system and made durable, all at once with `syncfs`;
2. a commit record listing the deletions, directories and files is written to a temp file,
   fsynced and renamed to ``.asd-work/commit.json`` — this rename is the commit point;
3. the record is applied: deletions, new directories, each staged file renamed over its old
   path, the staged blocks of each patched file written into it (`asd.patch`), then directory
   metadata from the stage, deepest first; one `syncfs` makes all of it durable; then the
   record and the stage are removed.

One `syncfs` per step, not an fsync per file and directory: each fsync is a journal commit and
a cache flush of the device of its own (ext4 writes the same inode-table and directory blocks
again at every commit), and the order that matters is between the steps. It also flushes what
other programs left unwritten on that file system, which a step then waits for.

Every apply step is idempotent, so `recover` rolls a committed record forward after a crash at
any point, and throws away a stage that was never committed. A file is replaced by a new
inode, or patched in place only when it has one link (in overlay mode the lower layer
hard-links the disk copy's files as they were at sync, and it must never change while
mounted): writing the same staged blocks again is idempotent too.

The disk copy belongs to the target's owner, who can write into it (through the backup mount
while asd runs, or before asd ever starts), so nothing in it is trusted: ``.asd-work`` is used
only if it is a real directory private to root, every name in a commit record must be a plain
path inside the disk copy, and the record is applied through directory descriptors opened one
component at a time without following symlinks — a symlink the owner planted on the way makes
the apply stop, never write through it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import stat
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from asd.dirfd import (
    exists_at,
    named,
    open_dir_at,
    open_private_dir,
    parent_at,
    rel_parts,
    remove_at,
    syncfs,
)
from asd.dirmeta import O_DIR, dir_metadata_fd, set_dir_metadata_fd
from asd.errors import SafetyError
from asd.layout import WORK_NAME
from asd.patch import DATA_DIR as PATCH_DATA
from asd.patch import Patch, open_disk_file
from asd.patch import apply as apply_patch
from asd.state import write_json_atomic
from asd.tree import Changes

log = logging.getLogger(__name__)


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
                remove_at(wfd, "stage")
                os.mkdir("stage", 0o700, dir_fd=wfd)
                fd = os.open("stage", O_DIR, dir_fd=wfd)
        except OSError as exc:
            raise named(exc, self.stage) from exc
        try:
            yield fd
        finally:
            os.close(fd)

    def commit(
        self,
        changes: Changes,
        given: Mapping[str, dict[str, object]],
        patches: Mapping[str, Patch] | None = None,
    ) -> None:
        """Make the staged changes durable and apply them. Returns at a new sync point.
        Each directory's metadata is read from the stage, unless ``given`` holds it.
        ``patches``: files written in place from their staged blocks (`asd.patch`)."""
        with self._work_fd() as wfd, open_dir_at(wfd, "stage", self.work) as sfd:
            syncfs(sfd, self.stage)
            dirs: dict[str, dict[str, object]] = {}
            for rel in changes.dirs:
                if rel in given:
                    dirs[rel] = given[rel]
                    continue
                with open_dir_at(sfd, rel, self.stage) as fd:
                    dirs[rel] = dir_metadata_fd(fd)
            record = {
                "deleted": list(changes.deleted),
                "dirs": dirs,
                "files": list(changes.files),
                "patches": {rel: p.to_record() for rel, p in (patches or {}).items()},
            }
            write_json_atomic(self.record, record, dir_fd=wfd)
        self.apply()

    def staged(self, stage_fd: int, rel: str) -> bool:
        """Whether ``rel`` is in the stage ``stage_fd``, looked up without following links
        (under a directory that became a symlink in RAM since the walk, it is not)."""
        try:
            parts = rel_parts(rel)
            with parent_at(stage_fd, parts, self.stage) as pfd:
                return exists_at(pfd, parts[-1]) is not None
        except (FileNotFoundError, NotADirectoryError, SafetyError):
            return False

    def _read_record(
        self, wfd: int
    ) -> tuple[list[str], dict[str, dict[str, object]], list[str], dict[str, Patch]]:
        fd = os.open("commit.json", os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=wfd)
        with os.fdopen(fd, "rb") as fh:
            data = json.loads(fh.read())
        try:
            deleted = [str(r) for r in data["deleted"]]
            dirs = {str(r): dict(m) for r, m in data["dirs"].items()}
            files = [str(r) for r in data["files"]]
            # (a record of asd before patches has none)
            patches = {str(r): Patch.from_record(p) for r, p in data.get("patches", {}).items()}
            for rel in [*deleted, *files, *patches]:
                rel_parts(rel)
            for rel in dirs:
                rel_parts(rel, root_ok=True)
        except (KeyError, TypeError, AttributeError, ValueError) as exc:
            raise SafetyError(
                f"{self.record} is not a commit record asd wrote (it names {exc}, not a path "
                f"inside {self.disk}); asd will not apply it. Move {self.work} away and try again"
            ) from exc
        return deleted, dirs, files, patches

    def apply(self) -> None:
        with self._work_fd() as wfd:
            deleted, dirs, files, patches = self._read_record(wfd)
            dfd = os.open(self.disk, O_DIR)
            at = [""]
            try:
                self._apply(wfd, dfd, deleted, dirs, files, at)
                if patches:
                    self._apply_patches(wfd, dfd, patches, at)
                # Durable before the record goes: one commit for all of it.
                at[0] = ""
                syncfs(dfd, self.disk)
            except OSError as exc:
                # Descriptor-relative calls only know the last name: say the whole path.
                raise named(exc, self.disk / at[0]) from exc
            finally:
                os.close(dfd)
            os.unlink("commit.json", dir_fd=wfd)
            os.fsync(wfd)
            remove_at(wfd, "stage")

    def _apply_patches(self, wfd: int, dfd: int, patches: dict[str, Patch], at: list[str]) -> None:
        """Write each patch's staged blocks into its file (after the renames, before the
        directory metadata: a patched file's directory is left as it is)."""
        with open_dir_at(wfd, f"stage/{PATCH_DATA}", self.work) as data_dir:
            for rel, patch in patches.items():
                at[0] = rel
                parts = rel_parts(rel)
                data = os.open(
                    patch.data, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=data_dir
                )
                try:
                    with parent_at(dfd, parts, self.disk) as pfd:
                        fd = open_disk_file(pfd, parts[-1], self.disk / rel)
                        try:
                            apply_patch(fd, data, patch)
                        finally:
                            os.close(fd)
                finally:
                    os.close(data)

    def _staged(self, wfd: int, parts: tuple[str, ...]) -> bool:
        try:
            with parent_at(wfd, ("stage", *parts), self.work) as sfd:
                return exists_at(sfd, parts[-1]) is not None
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
        new_files = set(files)
        for rel in deleted:
            at[0] = rel
            parts = rel_parts(rel)
            # A type change is a deletion plus the new entry. When rolling forward, the new
            # entry may already be in place: leave it (the old one is gone already).
            try:
                with parent_at(dfd, parts, disk) as pfd:
                    st = exists_at(pfd, parts[-1])
                    if st is None:
                        continue
                    if rel in dirs and stat.S_ISDIR(st.st_mode):
                        continue
                    if rel in new_files and not self._staged(wfd, parts):
                        continue
                    remove_at(pfd, parts[-1])
            except FileNotFoundError:
                continue
        for rel in sorted(dirs, key=lambda r: r.count("/")):
            at[0] = rel
            if not rel:
                continue
            parts = rel_parts(rel)
            with parent_at(dfd, parts, disk) as pfd:
                st = exists_at(pfd, parts[-1])
                if st is not None and not stat.S_ISDIR(st.st_mode):
                    remove_at(pfd, parts[-1])
                    st = None
                if st is None:
                    os.mkdir(parts[-1], 0o700, dir_fd=pfd)
        for rel in files:
            at[0] = rel
            parts = rel_parts(rel)
            try:
                with parent_at(wfd, ("stage", *parts), self.work) as sfd:
                    if exists_at(sfd, parts[-1]) is None:
                        continue  # renamed into place by an earlier, interrupted apply
                    with parent_at(dfd, parts, disk) as pfd:
                        st = exists_at(pfd, parts[-1])
                        if st is not None and stat.S_ISDIR(st.st_mode):
                            remove_at(pfd, parts[-1])
                        os.rename(parts[-1], parts[-1], src_dir_fd=sfd, dst_dir_fd=pfd)
            except FileNotFoundError:
                continue  # the staged file's directory is gone: renamed by an earlier apply
        for rel in sorted(dirs, key=lambda r: r.count("/"), reverse=True):
            at[0] = rel
            with open_dir_at(dfd, rel, disk) as fd:
                set_dir_metadata_fd(fd, dirs[rel])

    def recover(self) -> str | None:
        """Finish or discard what a crashed resync left. Says what it did, or None."""
        if not os.path.lexists(self.work):
            return None
        with self._work_fd() as wfd:
            if exists_at(wfd, "commit.json") is not None:
                committed = True
            elif exists_at(wfd, "stage") is not None:
                remove_at(wfd, "stage")
                return "discarded a resync that was interrupted before its commit point"
            else:
                return None
        if committed:
            self.apply()
        return "finished writing a resync that was interrupted after its commit point"
