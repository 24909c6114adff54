"""Overlay mode's delta layer: the disk copy's changes since sync, as a layer above the lower tree.

When asd gives an overlay's RAM back (`asd.shrink`), the new overlay's lower layers must show
the disk copy as the resync just left it. The lower tree still shows it as it was at sync,
and rebuilding it costs a link per file of the target. The delta holds only what differs,
on the disk copy's file system (in its ``.asd-work``):

- a name the upper layer held, or the previous delta did, as the disk copy has it now: a hard
  link to the disk copy's file (any non-directory), a directory with the disk copy's
  owner, mode, times and extended attributes, or a whiteout where the disk copy has nothing;
- a directory that was opaque or redirected, opaque here, with everything below it: the
  lower tree's directory under that name is not what the disk copy holds.

Nothing in a delta changes while it is mounted: each of its files has a second name (the
disk copy's), and a resync replaces, never patches, a file with more than one name
(`asd.patch`). A power cut leaves it in ``.asd-work``, which the next start removes.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Set as AbstractSet
from pathlib import Path

from asd.dirfd import exists_at, open_dir_at, parent_at, rel_parts
from asd.dirmeta import dir_metadata_fd, set_dir_metadata_fd
from asd.tree import OPAQUE, REDIRECT, WHITEOUT, Index, walk

OPAQUE_XATTR = "trusted.overlay.opaque"


def names(upper: Index, previous: Path | None) -> tuple[set[str], set[str]]:
    """The names a new delta must hold, and which of them are opaque directories: the upper
    layer's (from its index) and the previous delta's."""
    held = {rel for rel in upper if rel}
    opaque = {
        rel for rel, e in upper.items() if rel and e[0] != WHITEOUT and e[0] & (OPAQUE | REDIRECT)
    }
    if previous is not None and os.path.isdir(previous):
        for rel, st in walk(previous):
            if not rel:
                continue
            held.add(rel)
            if stat.S_ISDIR(st.st_mode) and _is_opaque(previous / rel):
                opaque.add(rel)
    return held, opaque


def _is_opaque(path: Path) -> bool:
    try:
        return os.getxattr(path, OPAQUE_XATTR, follow_symlinks=False) == b"y"
    except OSError:
        return False


def _below(rel: str, names: set[str]) -> bool:
    while "/" in rel:
        rel = rel.rsplit("/", 1)[0]
        if rel in names:
            return True
    return False


def _subtree(disk_fd: int, rel: str, disk: Path) -> list[str]:
    """Every name below the disk copy's directory ``rel``, never through a symlink."""
    try:
        with open_dir_at(disk_fd, rel, disk) as fd:
            return [
                f"{rel}/{os.path.normpath(os.path.join(top, name))}"
                for top, dirs, files, _fd in os.fwalk(".", dir_fd=fd, follow_symlinks=False)
                for name in (*dirs, *files)
            ]
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
            return []  # not a directory (any more): nothing below it
        raise


def build(
    disk_fd: int,
    disk: Path,
    out_fd: int,
    held: set[str],
    opaque: set[str],
    leave_out: AbstractSet[str] = frozenset(),
) -> int:
    """Fill the empty directory ``out_fd`` with the delta of the disk copy (open as
    ``disk_fd``, named ``disk`` in messages) for the names ``held``, less ``leave_out`` (files
    the next upper layer holds itself). Every name is looked up below the two descriptors
    without following a symlink: the disk copy belongs to the target's owner, who may be
    changing it meanwhile. Returns how many entries the delta holds."""
    dev = os.fstat(disk_fd).st_dev
    wanted = set(held)
    for rel in opaque:
        wanted.update(_subtree(disk_fd, rel, disk))
    wanted -= leave_out
    for rel in list(wanted):
        while "/" in rel:
            rel = rel.rsplit("/", 1)[0]
            wanted.add(rel)
    dirs = [""]
    cut: set[str] = set()  # names that are not directories here: nothing goes below them
    count = 0
    for rel in sorted(wanted):
        if _below(rel, cut):
            continue
        parts = rel_parts(rel)
        with parent_at(out_fd, parts, Path("delta")) as opfd:
            try:
                with parent_at(disk_fd, parts, disk) as pfd:
                    st = exists_at(pfd, parts[-1])
                    if st is not None and not stat.S_ISDIR(st.st_mode):
                        os.link(
                            parts[-1],
                            parts[-1],
                            src_dir_fd=pfd,
                            dst_dir_fd=opfd,
                            follow_symlinks=False,
                        )
                        cut.add(rel)
                        count += 1
                        continue
            except FileNotFoundError:
                st = None
            if st is None:
                os.mknod(parts[-1], stat.S_IFCHR | 0o600, 0, dir_fd=opfd)  # a whiteout
                cut.add(rel)
                count += 1
            elif st.st_dev != dev:
                cut.add(rel)  # another file system mounted inside: not part of the disk copy
            else:
                os.mkdir(parts[-1], 0o700, dir_fd=opfd)
                dirs.append(rel)
                count += 1
    # Deepest first, so each directory's times are set after its contents are made.
    for rel in reversed(dirs):
        with open_dir_at(disk_fd, rel, disk) as dfd, open_dir_at(out_fd, rel, Path("delta")) as ofd:
            set_dir_metadata_fd(ofd, dir_metadata_fd(dfd))
            if rel in opaque:
                os.setxattr(ofd, OPAQUE_XATTR, b"y")
    return count
