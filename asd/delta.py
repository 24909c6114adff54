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

import os
import stat
from collections.abc import Set as AbstractSet
from pathlib import Path

from asd.dirmeta import dir_metadata, set_dir_metadata
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


def build(
    disk: Path,
    dst: Path,
    held: set[str],
    opaque: set[str],
    leave_out: AbstractSet[str] = frozenset(),
) -> int:
    """Make the delta at ``dst`` (which must not exist) from the disk copy at ``disk`` for
    the names ``held``, less ``leave_out`` (files the next upper layer holds itself).
    Returns how many entries it holds."""
    dev = os.lstat(disk).st_dev
    wanted = set(held)
    for rel in opaque:
        if os.path.isdir(disk / rel) and not os.path.islink(disk / rel):
            wanted.update(f"{rel}/{sub}" for sub, _ in walk(disk / rel) if sub)
    wanted -= leave_out
    for rel in list(wanted):
        while "/" in rel:
            rel = rel.rsplit("/", 1)[0]
            wanted.add(rel)
    os.mkdir(dst, 0o700)
    dirs = [""]
    cut: set[str] = set()  # names that are not directories here: nothing goes below them
    count = 0
    for rel in sorted(wanted):
        if _below(rel, cut):
            continue
        src, out = disk / rel, dst / rel
        try:
            st = os.lstat(src)
        except FileNotFoundError:
            os.mknod(out, stat.S_IFCHR | 0o600, 0)  # a whiteout
            cut.add(rel)
            count += 1
            continue
        if stat.S_ISDIR(st.st_mode) and st.st_dev == dev:
            os.mkdir(out, 0o700)
            dirs.append(rel)
        elif stat.S_ISDIR(st.st_mode):
            cut.add(rel)  # another file system mounted inside: not part of the disk copy
            continue
        else:
            os.link(src, out, follow_symlinks=False)
            cut.add(rel)
        count += 1
    # Deepest first, so each directory's times are set after its contents are made.
    for rel in reversed(dirs):
        set_dir_metadata(dst / rel if rel else dst, dir_metadata(disk / rel if rel else disk))
        if rel in opaque:
            os.setxattr(dst / rel, OPAQUE_XATTR, b"y", follow_symlinks=False)
    return count
