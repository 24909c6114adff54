"""Write back only the blocks of a large file that changed, in place, through the journal.

A resync otherwise replaces each changed file by a new inode (stage, rename), which writes the
whole file: a 100 MiB log with 10 KiB appended costs 100 MiB on the drive every time, an RRD
database with a few values updated its full size. For such a file asd compares the RAM copy
with the disk copy block by block (reading both, writing nothing), stages only the blocks that
differ, and the journal's apply writes them into the disk copy's file in place. Writing the
same blocks again gives the same file, so rolling a commit forward after a crash is idempotent,
as a rename is. The staged blocks are written twice (stage, then in place), so a patch is
taken only where at most a quarter of the file differs.

A file is patched only when, on both sides, it is a regular file with one name, of at least
`MIN_SIZE` bytes, with the same extended attributes and ACLs; anything else is copied whole
(rsync keeps hard links as links).
One link on the disk side is what keeps overlay mode's lower layer unchanged: the lower tree
hard-links the disk copy's files as they were at sync, so such a file has two links; one that
a resync has already replaced has one and belongs to no layer. The apply checks that the disk
file is still the inode the patch was computed against (the disk copy's owner can swap names).

- `stage_patches(ram, disk, rels, stage_fd) -> dict[str, Patch]`: plan and stage the patches.
- `plan(ram_fd, disk_fd, out_fd) -> Patch | None`: compare; the differing blocks go to ``out_fd``.
- `apply(disk_fd, data_fd, patch)`: write them in place, set size, owner, mode and times.
- `Patch.to_record()` / `Patch.from_record(data)`: its form in a commit record.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path

from asd.dirfd import named, parent_at, rel_parts
from asd.dirmeta import O_DIR
from asd.errors import SafetyError
from asd.layout import WORK_NAME

BLOCK = 4096
CHUNK = 1 << 20
MIN_SIZE = 64 * 1024
MAX_SHARE = 4  # patch only if at most 1/MAX_SHARE of the file's bytes are written
O_FILE = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
DATA_DIR = WORK_NAME  # inside the stage: a name rsync never stages (the target's .asd-work)


@dataclass(frozen=True)
class Patch:
    """What turns the disk file (inode ``ino``) into the RAM file: ``extents`` (offset,
    length) are written from the staged data file ``data``, in order, then the size and the
    metadata are set."""

    ino: int
    size: int
    extents: tuple[tuple[int, int], ...]
    mode: int
    uid: int
    gid: int
    atime_ns: int
    mtime_ns: int
    data: str = ""

    @property
    def written(self) -> int:
        return sum(length for _, length in self.extents)

    def to_record(self) -> dict[str, object]:
        return {
            "ino": self.ino,
            "size": self.size,
            "extents": [list(e) for e in self.extents],
            "mode": self.mode,
            "uid": self.uid,
            "gid": self.gid,
            "atime_ns": self.atime_ns,
            "mtime_ns": self.mtime_ns,
            "data": self.data,
        }

    @classmethod
    def from_record(cls, data: dict[str, object]) -> Patch:
        """Raises ValueError (or KeyError, TypeError) unless ``data`` is a patch asd wrote."""
        ints = {k: data[k] for k in ("ino", "size", "mode", "uid", "gid", "atime_ns", "mtime_ns")}
        values = [v for v in ints.values() if type(v) is int and v >= 0]
        raw, name = data["extents"], data["data"]
        if len(values) != len(ints) or not isinstance(raw, list) or not isinstance(name, str):
            raise TypeError(data)
        extents = tuple((int(offset), int(length)) for offset, length in raw)
        end = 0
        for offset, length in extents:
            if offset < end or length <= 0:
                raise ValueError(extents)
            end = offset + length
        ino, size, mode, uid, gid, atime_ns, mtime_ns = values
        if end > size or mode > 0o7777 or not name.isdigit():
            raise ValueError(data)
        return cls(ino, size, extents, mode, uid, gid, atime_ns, mtime_ns, name)


def eligible(st: os.stat_result) -> bool:
    """A disk file a patch may write into."""
    return stat.S_ISREG(st.st_mode) and st.st_nlink == 1 and st.st_size >= MIN_SIZE


def _xattrs(fd: int) -> dict[str, bytes]:
    try:
        return {name: os.getxattr(fd, name) for name in os.listxattr(fd)}
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.ENODATA):
            return {}
        raise


def plan(ram_fd: int, disk_fd: int, out_fd: int) -> Patch | None:
    """Compare the open RAM and disk files; append the RAM blocks that differ to ``out_fd``.
    None if the disk file is not `eligible`, the RAM one is not a regular file of at least
    `MIN_SIZE`, their xattrs differ, or too much differs. That the RAM file has no other name
    is the caller's to know (an overlay's merged view counts links of its own)."""
    ram, disk = os.fstat(ram_fd), os.fstat(disk_fd)
    big = stat.S_ISREG(ram.st_mode) and ram.st_size >= MIN_SIZE
    if not (big and eligible(disk)) or _xattrs(ram_fd) != _xattrs(disk_fd):
        return None
    limit = max(ram.st_size, disk.st_size) // MAX_SHARE
    extents: list[tuple[int, int]] = []
    written = 0
    offset = 0
    while new := os.pread(ram_fd, CHUNK, offset):
        old = os.pread(disk_fd, len(new), offset) if offset < disk.st_size else b""
        if new != old:
            for i in range(0, len(new), BLOCK):
                block = new[i : i + BLOCK]
                at = offset + i
                if block == old[i : i + BLOCK]:
                    continue
                if at >= disk.st_size and block.count(0) == len(block):
                    continue  # past the old end: the final ftruncate makes it a hole
                written += len(block)
                if written > limit:
                    return None
                _write_all(out_fd, block)
                if extents and extents[-1][0] + extents[-1][1] == at:
                    extents[-1] = (extents[-1][0], extents[-1][1] + len(block))
                else:
                    extents.append((at, len(block)))
        offset += len(new)
    # The times and owner as they are now; a program writing while we read leaves a newer
    # ctime than the index taken before, so the next resync compares again.
    after = os.fstat(ram_fd)
    return Patch(
        ino=disk.st_ino,
        size=offset,
        extents=tuple(extents),
        mode=stat.S_IMODE(after.st_mode),
        uid=after.st_uid,
        gid=after.st_gid,
        atime_ns=after.st_atime_ns,
        mtime_ns=after.st_mtime_ns,
    )


def _write_all(fd: int, data: bytes, offset: int | None = None) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view) if offset is None else os.pwrite(fd, view, offset)
        view = view[n:]
        if offset is not None:
            offset += n


def apply(disk_fd: int, data_fd: int, patch: Patch) -> None:
    """Write ``patch`` into the open disk file; the same bytes again when rolling forward."""
    pos = 0
    for offset, length in patch.extents:
        done = 0
        while done < length:
            block = os.pread(data_fd, min(CHUNK, length - done), pos + done)
            if not block:
                raise OSError(errno.EIO, "staged patch data is shorter than its record says")
            _write_all(disk_fd, block, offset + done)
            done += len(block)
        pos += length
    os.ftruncate(disk_fd, patch.size)
    os.fchown(disk_fd, patch.uid, patch.gid)
    os.chmod(disk_fd, patch.mode)  # after chown, which clears set-id bits
    os.utime(disk_fd, ns=(patch.atime_ns, patch.mtime_ns))
    os.fsync(disk_fd)


def open_disk_file(pfd: int, name: str, patch: Patch, shown: Path) -> int:
    """The disk file a patch is for, opened for writing: refused unless it is still the
    regular file, with one link, that the patch was computed against."""
    try:
        fd = os.open(name, os.O_WRONLY | O_FILE, dir_fd=pfd)
    except OSError as exc:
        if exc.errno not in (errno.ELOOP, errno.ENOENT, errno.EISDIR, errno.ENXIO):
            raise named(exc, shown) from exc
        fd = -1
    st = os.fstat(fd) if fd >= 0 else None
    if st is None or not stat.S_ISREG(st.st_mode) or st.st_nlink != 1 or st.st_ino != patch.ino:
        if fd >= 0:
            os.close(fd)
        raise SafetyError(
            f"{shown} is no longer the file asd was writing back into (someone replaced or "
            "linked it in the disk copy during a resync); asd does not write into it. Look at "
            "it, put the file back or move it away, and run asd again"
        )
    return fd


def _open_file(root_fd: int, rel: str, where: Path, flags: int) -> int | None:
    """``rel`` below ``root_fd`` opened without following symlinks, or None if that fails
    for any reason (the whole-file copy then deals with it)."""
    try:
        parts = rel_parts(rel)
        with parent_at(root_fd, parts, where) as pfd:
            return os.open(parts[-1], flags | O_FILE, dir_fd=pfd)
    except (OSError, ValueError, SafetyError):
        return None


def stage_patches(ram: Path, disk: Path, rels: Iterable[str], stage_fd: int) -> dict[str, Patch]:
    """Plan a patch for each of ``rels`` (changed files, present on both sides) and stage its
    data in ``stage_fd``; those not worth patching are left out (copied whole)."""
    patches: dict[str, Patch] = {}
    rels = list(rels)
    if not rels:
        return patches
    os.mkdir(DATA_DIR, 0o700, dir_fd=stage_fd)
    data_dir = os.open(DATA_DIR, O_DIR, dir_fd=stage_fd)
    ram_root = os.open(ram, O_DIR)
    disk_root = os.open(disk, O_DIR)
    try:
        for n, rel in enumerate(rels):
            patch = _stage_one(ram_root, disk_root, rel, data_dir, str(n), ram, disk)
            if patch is not None:
                patches[rel] = patch
    finally:
        for fd in (ram_root, disk_root, data_dir):
            os.close(fd)
    return patches


def _stage_one(
    ram_root: int, disk_root: int, rel: str, data_dir: int, name: str, ram: Path, disk: Path
) -> Patch | None:
    rfd = _open_file(ram_root, rel, ram, os.O_RDONLY)
    if rfd is None:
        return None
    try:
        dfd = _open_file(disk_root, rel, disk, os.O_RDONLY)
        if dfd is None:
            return None
        try:
            out = os.open(
                name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | O_FILE, 0o600, dir_fd=data_dir
            )
            try:
                patch = plan(rfd, dfd, out)
            except OSError:
                patch = None  # an unreadable old copy, a full stage: the whole-file copy decides
            finally:
                os.close(out)
        finally:
            os.close(dfd)
    finally:
        os.close(rfd)
    if patch is None:
        os.unlink(name, dir_fd=data_dir)
        return None
    return replace(patch, data=name)
