"""What changed in overlay mode, read from the overlay's upper layer alone.

Every change a program makes through an overlay lands in the upper layer (in RAM): a written
or chmod-ed file is copied up, a new entry is created there, a deleted one leaves a whiteout
(a 0/0 character device), a directory removed and made again is marked opaque, a renamed
directory carries a redirect to where its lower content lives. Everything not in the upper
layer is the lower layer, which is the disk copy as it was at sync. So the index of a
session in overlay mode is an index of the upper layer only, and a resync walks only that:
its cost follows what changed since sync, whatever the size of the target.

Three things the upper layer alone does not say, handled here:

- an opaque or redirected directory (or one that comes back where a whiteout was) hides or
  brings lower content: the first time it is seen, its whole subtree is read from the
  merged view and written, and what the disk copy holds below it and the merged view does
  not is deleted (the disk copy's directory is read for that, nothing else of the disk is);
- with ``index=on``, a hard-linked lower file copied up through one name changes every
  other name, which appear in the upper layer only when touched themselves: when the
  overlay's index holds any entry, the merged view is walked once per resync to find the
  other names (rare: hard links inside a cache are);
- the merged view's root is the upper's root, whose metadata asd set from the disk copy.
"""

from __future__ import annotations

import ctypes
import dataclasses
import os
import stat
from pathlib import Path

from asd.layout import WORK_NAME, TargetLayout
from asd.tree import (
    OPAQUE,
    REDIRECT,
    TYPE_BITS,
    WHITEOUT,
    WHITEOUT_ENTRY,
    Changes,
    Entry,
    Index,
    entry_of,
    is_dir,
    parent_of,
    walk,
)

EXCLUDE = frozenset({WORK_NAME})
OPAQUE_XATTR = "trusted.overlay.opaque"
ORIGIN_XATTR = "trusted.overlay.origin"
# The origin xattr: version, magic, length, flags, handle type, the layer's UUID, then the
# file handle itself (what name_to_handle_at gives).
ORIGIN_HANDLE_AT = 5 + 16
REDIRECT_XATTR = "trusted.overlay.redirect"


def is_overlay(layout: TargetLayout) -> bool:
    """Overlay mode's session: the RAM copy is an overlay whose upper layer exists."""
    return os.path.isdir(layout.upper)


def current(layout: TargetLayout) -> TargetLayout:
    """``layout`` at the generation of the RAM layer now mounted (`asd.shrink`)."""
    try:
        generation = int(layout.generation_file.read_text())
    except (OSError, ValueError):
        generation = 0
    return dataclasses.replace(layout, generation=generation)


def lower_entry(layout: TargetLayout, rel: str) -> Path:
    """Where the merged view's ``rel`` comes from below the upper layer: the delta of this
    generation if it has the name, else the lower tree."""
    for layer in layout.lowers[:-1]:
        if os.path.lexists(layer / rel):
            return layer / rel
    return layout.lowers[-1] / rel


def _dir_flags(path: str) -> int:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return 0
    flags = 0
    if OPAQUE_XATTR in names:
        flags |= OPAQUE
    if REDIRECT_XATTR in names:
        flags |= REDIRECT
    return flags


def upper_index(layout: TargetLayout) -> Index:
    """The upper layer, as entries of the merged view (whiteouts as `WHITEOUT_ENTRY`)."""
    out: Index = {}
    linked: set[str] = set()
    for rel, st in walk(layout.upper, EXCLUDE):
        mode = st.st_mode
        if stat.S_ISCHR(mode) and st.st_rdev == 0:
            out[rel] = WHITEOUT_ENTRY
            continue
        entry = entry_of(st)
        if stat.S_ISDIR(mode) and rel:
            flags = _dir_flags(os.path.join(layout.upper, rel))
            if flags:
                entry = (entry[0] | flags, *entry[1:])
        elif stat.S_ISREG(mode) and st.st_nlink > 1 and _may_have_other_names(layout, rel):
            linked.add(rel)
        out[rel] = entry
    if linked and _has_index_entries(layout):
        out.update(_other_names(layout, linked, out))
    return out


def _may_have_other_names(layout: TargetLayout, rel: str) -> bool:
    """Whether a copied-up file may have names elsewhere in the merged view. Every lower file
    has two links (the disk copy's name and the lower tree's, or the delta's), so index=on
    indexes every copy-up; other names exist only when the origin has more. Without an
    origin the file never came from the lower layer and all its names are in the upper one."""
    try:
        origin = os.getxattr(layout.upper / rel, ORIGIN_XATTR, follow_symlinks=False)
    except OSError:
        return False
    below = lower_entry(layout, rel)
    try:
        st = os.lstat(below)
    except OSError:
        return True  # renamed on copy-up: its origin is elsewhere
    if st.st_nlink > 2 or origin[ORIGIN_HANDLE_AT:] != _file_handle(below):
        return True
    if st.st_nlink == 2:
        # One lower name and the disk copy's, or two lower names once resyncs replaced the
        # disk copy's: only the first is a file without other names.
        try:
            disk = os.lstat(layout.backup / rel)
        except OSError:
            return True
        return (disk.st_dev, disk.st_ino) != (st.st_dev, st.st_ino)
    return False


def mounted_over(upper_dir: Path, lower_dir: Path) -> bool:
    """Whether the overlay just mounted with the new, empty ``upper_dir`` took ``lower_dir``
    as its topmost lower layer. asd names its layers by path, under a ``.asd-work`` that the
    target's owner can rename and replace; with index=on the kernel records the root of the
    layer it did take as the upper root's origin (a file handle), which this compares with
    ``lower_dir`` (reached through asd's own descriptor). Where the kernel cannot index (a
    layer's file system without file handles or a UUID) it records no origin, and there is
    nothing to compare: true."""
    try:
        origin = os.getxattr(upper_dir, ORIGIN_XATTR, follow_symlinks=False)
    except OSError:
        return True
    return origin[ORIGIN_HANDLE_AT:] == _file_handle(lower_dir)


class _FileHandle(ctypes.Structure):
    _fields_ = [
        ("handle_bytes", ctypes.c_uint),
        ("handle_type", ctypes.c_int),
        ("f_handle", ctypes.c_ubyte * 128),
    ]


_libc = ctypes.CDLL(None, use_errno=True)
AT_FDCWD = -100  # name_to_handle_at never follows a final symlink unless asked to


def _file_handle(path: Path) -> bytes:
    """The kernel's file handle of ``path`` (what an overlay's origin xattr records), or b""."""
    fh = _FileHandle(handle_bytes=128)
    mount_id = ctypes.c_int()
    rc = _libc.name_to_handle_at(
        AT_FDCWD, os.fsencode(path), ctypes.byref(fh), ctypes.byref(mount_id), 0
    )
    if rc != 0:
        return b""
    return bytes(fh.f_handle[: fh.handle_bytes])


def _has_index_entries(layout: TargetLayout) -> bool:
    try:
        with os.scandir(layout.overlay_work / "index") as it:
            return any(True for _ in it)
    except FileNotFoundError:
        return False


def _other_names(layout: TargetLayout, linked: set[str], upper: Index) -> Index:
    """Names in the merged view of hard-linked files copied up under another name."""
    merged = layout.ram_copy
    inodes = set()
    for rel in linked:
        try:
            inodes.add(os.lstat(merged / rel).st_ino)
        except FileNotFoundError:
            continue
    names = {
        rel: entry_of(st)
        for rel, st in walk(merged, EXCLUDE)
        if st.st_ino in inodes and rel not in upper and not stat.S_ISDIR(st.st_mode)
    }
    # Their directories too: writing a name back changes its directory's times on disk,
    # which the write-back then sets back from the merged view.
    for parent in {parent_of(rel) for rel in names} - upper.keys():
        names[parent] = entry_of(os.lstat(merged / parent))
    return names


def single_name(layout: TargetLayout, rel: str) -> bool:
    """Whether the upper layer's file ``rel`` is a file with no other name in the merged view
    (its link count there also counts the lower tree's and the index's links)."""
    try:
        st = os.lstat(layout.upper / rel)
    except OSError:
        return False
    return stat.S_ISREG(st.st_mode) and (st.st_nlink == 1 or not _may_have_other_names(layout, rel))


def has_links(layout: TargetLayout, changes: Changes) -> bool:
    """Whether a file to write may have other names in the merged view that the write-back
    must keep one inode with it: then the caller groups names by a full walk. Every lower
    file counts the lower tree's link too, so the merged view's link count alone would say
    yes for any file ever copied up; a name in the upper layer is asked about its origin
    instead (`_may_have_other_names`), and only names read from the merged view (`expand`'s,
    `_other_names`') with more than one link count (rare: hard links, renamed directories)."""
    for rel in changes.files:
        try:
            if os.lstat(layout.ram_copy / rel).st_nlink <= 1:
                continue
        except FileNotFoundError:
            continue
        if not os.path.lexists(layout.upper / rel) or _may_have_other_names(layout, rel):
            return True
    return False


def _needs_subtree(before: Entry | None, entry: Entry) -> bool:
    if not is_dir(entry) or (before is not None and before[0] == entry[0]):
        return False
    return bool(entry[0] & (OPAQUE | REDIRECT)) or (before is not None and before[0] == WHITEOUT)


def expand(layout: TargetLayout, old: Index, new: Index, changes: Changes) -> Changes:
    """Add to ``changes`` the lower content that opaque or redirected directories hide or
    bring (see the module's docstring)."""
    special = sorted(rel for rel in changes.dirs if rel and _needs_subtree(old.get(rel), new[rel]))
    if not special:
        return changes
    deleted = set(changes.deleted)
    files = set(changes.files)
    dirs = set(changes.dirs)
    done: list[str] = []
    for rel in special:
        if any(rel.startswith(d + "/") for d in done):
            continue  # inside a subtree already taken whole
        done.append(rel)
        merged = {f"{rel}/{sub}" if sub else rel: e for sub, e in _entries(layout.ram_copy / rel)}
        for path, entry in merged.items():
            (dirs if is_dir(entry) else files).add(path)
        for sub, entry in _entries(layout.backup / rel):
            if not sub:
                continue
            path = f"{rel}/{sub}"
            now = merged.get(path)
            if now is None or (now[0] & TYPE_BITS) != (entry[0] & TYPE_BITS):
                deleted.add(path)
    # Keep only the topmost deletions, as `tree.diff` does.
    top: list[str] = []
    for path in sorted(deleted):
        if not (top and path.startswith(top[-1] + "/")):
            top.append(path)
    return Changes(tuple(top), tuple(sorted(files)), tuple(sorted(dirs)))


def _entries(root: Path) -> list[tuple[str, Entry]]:
    """``root`` and, if it is a directory (never through a symlink), everything below it."""
    try:
        st = os.lstat(root)
    except FileNotFoundError:
        return []
    if not stat.S_ISDIR(st.st_mode):
        return [("", entry_of(st))]
    return [(rel, entry_of(st)) for rel, st in walk(root, frozenset())]
