"""Reading directory trees: the index of a RAM copy, what changed since, sizes.

An index maps each path relative to the tree's root ("" is the root) to the lstat fields that
change whenever content or metadata change (ctime moves on every write, chmod, chown, xattr
and ACL change, and link count change). Comparing a fresh walk of the RAM copy with the index
taken at the last sync point tells what to write back without reading the disk at all.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable, Iterator, MutableMapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

# (kind, inode, mode, uid, gid, size, mtime_ns, ctime_ns, nlink, rdev). The kind is the file
# type bits, plus flags an overlay's upper layer adds (`asd.upper`): a whiteout is a kind of
# its own (the path is gone from the merged view), an opaque or redirected directory keeps
# S_IFDIR with a flag bit above the type bits.
Entry = tuple[int, int, int, int, int, int, int, int, int, int]
Index = dict[str, Entry]
# What a resync that looks only at what changed reads and updates: a dict, or a saved index
# searched where it lies (`index.Stored`).
Entries = MutableMapping[str, Entry]


@runtime_checkable
class Searchable(Protocol):
    """Entries that can answer these without a pass over all of them (`index.Stored`)."""

    def below(self, directory: str) -> list[str]: ...

    def with_inodes(self, inodes: AbstractSet[int]) -> list[str]: ...


TYPE_BITS = 0o170000
OPAQUE = 1 << 20
REDIRECT = 1 << 21
WHITEOUT = 1 << 22
WHITEOUT_ENTRY: Entry = (WHITEOUT, 0, 0, 0, 0, 0, 0, 0, 0, 0)


def entry_of(st: os.stat_result) -> Entry:
    return (
        stat.S_IFMT(st.st_mode),
        st.st_ino,
        st.st_mode,
        st.st_uid,
        st.st_gid,
        st.st_size,
        st.st_mtime_ns,
        st.st_ctime_ns,
        st.st_nlink,
        st.st_rdev,
    )


def walk(
    root: Path, exclude_top: frozenset[str] = frozenset()
) -> Iterator[tuple[str, os.stat_result]]:
    """Every entry under ``root`` (not following symlinks, not crossing into other mounts).
    Programs keep writing while asd walks: what vanishes on the way is what a walk a moment
    later would not have seen (`GONE`)."""
    top = os.lstat(root)
    yield "", top
    stack: list[tuple[str, str]] = [("", os.fspath(root))]
    while stack:
        rel, path = stack.pop()
        for de in _entries(path):
            if not rel and de.name in exclude_top:
                continue
            sub = f"{rel}/{de.name}" if rel else de.name
            try:
                st = de.stat(follow_symlinks=False)
            except GONE:
                continue
            yield sub, st
            if stat.S_ISDIR(st.st_mode) and st.st_dev == top.st_dev:
                stack.append((sub, de.path))


GONE = (FileNotFoundError, NotADirectoryError)


def _entries(path: str) -> list[os.DirEntry[str]]:
    """The entries of the directory ``path``; none if it is gone (or no longer a directory)."""
    try:
        with os.scandir(path) as it:
            return list(it)
    except GONE:
        return []


def index(root: Path, exclude_top: frozenset[str] = frozenset()) -> Index:
    """`walk` and `entry_of` in one loop: this is the whole cost of an idle resync in copy
    mode, so it avoids a generator and a call per entry (about twice as fast)."""
    top = os.lstat(root)
    dev = top.st_dev
    out: Index = {"": entry_of(top)}
    stack: list[tuple[str, str]] = [("", os.fspath(root))]
    isdir = stat.S_ISDIR
    while stack:
        rel, path = stack.pop()
        prefix = f"{rel}/" if rel else ""
        for de in _entries(path):
            name = de.name
            if not rel and name in exclude_top:
                continue
            try:
                st = de.stat(follow_symlinks=False)
            except GONE:
                continue  # see `walk`
            mode = st.st_mode
            sub = prefix + name
            out[sub] = (
                mode & TYPE_BITS,
                st.st_ino,
                mode,
                st.st_uid,
                st.st_gid,
                st.st_size,
                st.st_mtime_ns,
                st.st_ctime_ns,
                st.st_nlink,
                st.st_rdev,
            )
            if isdir(mode) and st.st_dev == dev:
                stack.append((sub, de.path))
    return out


def frontier(root: Path, want: int, depth: int = 3, most: int = 4096) -> list[str] | None:
    """Paths that between them hold all of ``root``'s tree but ``root`` itself, for several
    processes to remove a share each: the directories of the first level (down to ``depth``)
    that has at least ``want`` of them, and the non-directories above it. None when a
    directory there is on another file system than ``root`` (a mount inside it), or when
    there would be more than ``most`` paths (a command line for each share)."""
    try:
        dev = os.lstat(root).st_dev
    except GONE:
        return None
    level = [os.fspath(root)]
    out: list[str] = []
    for _ in range(depth):
        below: list[str] = []
        for path in level:
            for de in _entries(path):
                if not de.is_dir(follow_symlinks=False):
                    out.append(de.path)
                elif de.stat(follow_symlinks=False).st_dev != dev:
                    return None
                else:
                    below.append(de.path)
            if len(out) + len(below) > most:
                return None
        level = below
        if len(level) >= want:
            break
    return out + level


def rescan(
    root: Path,
    old: Entries,
    new: Entries,
    touched: Iterable[tuple[str, str]],
    exclude_top: frozenset[str] = frozenset(),
) -> set[str] | None:
    """Bring ``new``, a copy of ``old``, up to date by looking only at the ``touched``
    entries (directory relative to ``root``, and a name in it, "" for the directory itself:
    `asd.tracker`), each directory that holds one, and all of any directory new under its
    name; return the paths whose entries it set or removed (all that can differ from
    ``old``). None, and ``new`` half done, when a
    touched file has or had other names: a change through one name moves the others' link
    count or times without an event for them, and only a walk finds them.
    Like `index`, it does not cross into other mounts."""
    paths: set[str] = set()
    for directory, name in touched:
        paths.add(directory)
        if name:
            paths.add(f"{directory}/{name}" if directory else name)
    dev = os.lstat(root).st_dev
    seen: dict[str, Entry] = {}
    other_fs: set[str] = set()
    gone: set[str] = set()
    for rel in paths:
        if rel and rel.partition("/")[0] in exclude_top:
            continue
        try:
            st = os.lstat(root / rel)
        except GONE:
            before = old.get(rel)
            if before and not is_dir(before) and before[8] > 1:
                return None
            if before:
                gone.add(rel)
            continue
        entry = entry_of(st)
        before = old.get(rel)
        if not is_dir(entry) and entry[8] > 1 or before and not is_dir(before) and before[8] > 1:
            return None
        if before is not None and is_dir(before) and not (is_dir(entry) and before[1] == entry[1]):
            gone.add(rel)  # no longer that directory: nothing known below it holds
        if st.st_dev != dev:
            other_fs.add(rel)
        seen[rel] = entry
    changed = set(seen)
    for rel in [r for r in gone if not is_dir(old[r])]:
        gone.discard(rel)  # a file: nothing below it to look for
        del new[rel]
        changed.add(rel)
    changed.update(drop_subtrees(new, gone))
    for rel in sorted(seen):  # a directory before what is in it
        parent = parent_of(rel)
        if rel and (parent not in new or parent in other_fs):
            continue  # its directory went away, or is another mount
        entry = seen[rel]
        fresh = is_dir(entry) and not (rel in new and is_dir(new[rel]))
        new[rel] = entry
        if fresh and rel not in other_fs:
            below = index(root / rel)
            del below[""]
            if any(not is_dir(e) and e[8] > 1 for e in below.values()):
                return None
            added = {f"{rel}/{sub}": e for sub, e in below.items()}
            new.update(added)
            changed.update(added)
    return changed


def is_dir(entry: Entry) -> bool:
    return entry[0] & TYPE_BITS == stat.S_IFDIR


def same_type(a: Entry, b: Entry) -> bool:
    """Same kind of file, ignoring an overlay's directory flags (a whiteout is its own kind)."""
    return (a[0] & ~(OPAQUE | REDIRECT)) == (b[0] & ~(OPAQUE | REDIRECT))


@dataclass(frozen=True)
class Changes:
    """What a resync must do to bring the disk copy from ``old`` to ``new``."""

    deleted: tuple[str, ...]  # paths gone (or changed type): remove from the disk copy
    files: tuple[str, ...]  # non-directories new or changed: copy whole, replace by rename
    dirs: tuple[str, ...]  # directories new or changed, and parents of anything touched

    @property
    def empty(self) -> bool:
        return not (self.deleted or self.files or self.dirs)

    def count(self) -> int:
        return len(self.deleted) + len(self.files)


NO_CHANGES = Changes((), (), ())


def parent_of(rel: str) -> str:
    return rel.rpartition("/")[0]


def drop_subtrees(idx: Entries, gone: AbstractSet[str]) -> list[str]:
    """Drop the paths in ``gone`` and everything below them, and say which went: in a dict,
    one C-level prefix test per entry; in an index that can list what is below a path
    (`index.Stored.below`), by that. Nothing at all when ``gone`` is empty."""
    if not gone:
        return []
    if isinstance(idx, Searchable) and "" not in gone:
        dropped = [k for g in gone for k in ([g] if g in idx else [])]
        dropped += [k for g in gone for k in idx.below(g)]
    else:
        prefixes = tuple(f"{g}/" for g in gone if g)
        dropped = [k for k in idx if "" in gone or k in gone or k.startswith(prefixes)]
    for key in set(dropped):
        del idx[key]
    return dropped


def with_inodes(idx: Entries, inodes: AbstractSet[int]) -> list[str]:
    """The paths whose entries name one of ``inodes``: in a dict, one pass over it; in an
    index that can search its inode column (`index.Stored.with_inodes`), by that."""
    if not inodes:
        return []
    if isinstance(idx, Searchable):
        return idx.with_inodes(inodes)
    return [r for r, e in idx.items() if e[1] in inodes]


def diff_at(old: Entries, new: Entries, changed: AbstractSet[str]) -> Changes:
    """`diff` of two indexes known to differ only at ``changed``: the same answer, at the
    cost of what changed (the entries and their directories) instead of a pass over both."""
    keys = set(changed)
    keys.update([parent_of(k) for k in changed if k])
    return diff(
        {k: old[k] for k in keys if k in old},
        {k: new[k] for k in keys if k in new},
    )


def diff(old: Index, new: Index) -> Changes:
    """Compare two indexes. Costs one C-level comparison when nothing changed, and otherwise
    a pass over ``new`` plus work in proportion to what changed."""
    if old == new:
        return NO_CHANGES
    deleted: list[str] = []
    files: list[str] = []
    dirs: set[str] = set()
    for rel in old.keys() - new.keys():
        if old[rel][0] != WHITEOUT:
            deleted.append(rel)
            if rel:
                dirs.add(parent_of(rel))
    get = old.get
    for rel in [rel for rel, entry in new.items() if get(rel) != entry]:
        entry = new[rel]
        before = get(rel)
        if rel:
            dirs.add(parent_of(rel))
        if entry[0] == WHITEOUT:
            deleted.append(rel)  # gone from the merged view of an overlay
            continue
        if before is not None and not same_type(before, entry) and before[0] != WHITEOUT:
            deleted.append(rel)
        if is_dir(entry):
            dirs.add(rel)
        else:
            files.append(rel)
    # A deleted directory takes everything below it: keep only the topmost deletions.
    deleted.sort()
    top: list[str] = []
    for rel in deleted:
        if top and rel.startswith(top[-1] + "/"):
            continue
        top.append(rel)
    # Parents of changes must exist in the new tree (a deleted parent is itself deleted).
    dirs = {d for d in dirs if d in new and is_dir(new[d])}
    return Changes(tuple(top), tuple(sorted(files)), tuple(sorted(dirs)))


def with_links(changes: Changes, idx: Entries) -> Changes:
    """Add every other name of a changed hard-linked file (per ``idx``, a full index), so the
    copy keeps them one inode: a name moved with its directory is new, while the link that
    stayed put looks unchanged, and writing only the first would split the pair."""
    linked = {idx[r][1] for r in changes.files if r in idx and idx[r][8] > 1}
    if not linked:
        return changes
    extra = {r for r in with_inodes(idx, linked) if not is_dir(idx[r])} - set(changes.files)
    if not extra:
        return changes
    dirs = set(changes.dirs) | {parent_of(r) for r in extra}
    return Changes(changes.deleted, tuple(sorted({*changes.files, *extra})), tuple(sorted(dirs)))


def disk_usage(root: Path, exclude_top: frozenset[str] = frozenset()) -> int:
    """Bytes allocated (st_blocks) under root, each hard-linked inode once."""
    seen: set[int] = set()
    total = 0
    for _rel, st in walk(root, exclude_top):
        if st.st_nlink > 1 and not stat.S_ISDIR(st.st_mode):
            if st.st_ino in seen:
                continue
            seen.add(st.st_ino)
        total += st.st_blocks * 512
    return total
