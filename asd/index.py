"""The index of a RAM copy on its way to and from /run: a compact binary file, read in place.

An index of 200k entries as JSON (25 MiB) took seconds to parse and to write; this format
is a table of path offsets, one array of 64-bit integers and one blob of NUL-separated
paths. Read whole (`load`), a handful of C-level calls decode it. Read in place
(`open_stored`: the file mapped into memory, for a resync that looks only at what changed),
a lookup is a bisection that touches a few pages of it, so the cost of a resync does not
grow with the number of entries the index holds. It is barely smaller than JSON (about 110
bytes an entry, 80 of them the ten integers): the gain is the time.

Layout: ``MAGIC`` (8 bytes), then the scope (8 bytes: ``full`` for a walk of the whole RAM
copy, ``upper`` for overlay mode's upper layer, `asd.upper`; two indexes of different scopes
must never be compared: every lower file would look deleted), then the entry count and the
path-blob length (two little-endian uint64); then ``count + 1`` uint64 offsets (where each
path starts in the blob; the last one is the blob's length plus one), ``FIELDS`` int64 per
entry, and the blob: the paths in the order of their bytes (UTF-8 with surrogateescape, so
any byte name round-trips), joined by NUL, which a name can never hold. Everything is
little-endian and 8-byte aligned.

The two layouts of earlier versions are still read whole (``ASDIDX2``: paths sorted as
strings, no offsets; ``ASDIDX1``: in walk order), and so is a file that does not start with
either, the JSON index of earlier versions (an upgrade while targets are synced keeps its sync
point); for that reason the file keeps its old name, `TargetLayout.index_file`. They are not
read in place: the next resync walks once and saves this layout.

A resync that knows which entries it changed (`asd.tracker`) does not write all of the index
again: `save_changes` keeps them in a second file beside it (`delta_file`: ``DELTA_MAGIC``,
the index file's inode, size and mtime, then the changed entries in the same layout, a
removed one as `REMOVED`), and `load` applies them. The delta holds every change since the
index file was written; once it grows past an eighth of it, the whole index is written
again. A delta that names another index file than the one there (a crash between writing
a whole index and removing the delta) is ignored: the index file is newer.
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import struct
import sys
from array import array
from bisect import bisect_left
from collections.abc import Iterable, Iterator, Mapping, MutableMapping
from collections.abc import Set as AbstractSet
from itertools import accumulate, chain
from pathlib import Path

from asd.tree import Entry, Index

MAGIC = b"ASDIDX3\n"  # paths sorted by their bytes, with offsets: read in place (`Stored`)
SORTED_MAGIC = b"ASDIDX2\n"  # earlier versions: paths sorted as strings, no offsets
UNSORTED_MAGIC = b"ASDIDX1\n"  # earlier versions: paths in walk order
DELTA_MAGIC = b"ASDDLT1\n"
REMOVED: Entry = (-2, 0, 0, 0, 0, 0, 0, 0, 0, 0)  # in a delta: the entry is gone
_DELTA_HEAD = struct.Struct("<8sQQQ")  # magic, the index file's st_ino, st_size, st_mtime_ns
FIELDS = 10
SCOPES = ("full", "upper")
LEGACY = "json"  # a full index in the JSON of earlier versions
_HEAD = struct.Struct("<8sQQ")
_START = len(MAGIC) + _HEAD.size  # where the offsets (or, before, the paths) begin


def _raw(key: str) -> bytes:
    return key.encode("utf-8", "surrogateescape")


def _sorted(idx: Index) -> tuple[list[str], bytes]:
    """The keys in the order of their bytes, and the blob of them joined by NUL. Code point
    order is byte order for UTF-8; a name with bytes that are not (a surrogate escape) sorts
    elsewhere as a string, so then the keys are sorted by their bytes."""
    keys = sorted(idx)
    try:
        return keys, "\0".join(keys).encode("utf-8")
    except UnicodeEncodeError:
        keys.sort(key=_raw)
        return keys, "\0".join(keys).encode("utf-8", "surrogateescape")


def encode(idx: Index, scope: str = "full") -> bytes:
    if scope not in SCOPES:
        raise ValueError(f"unknown index scope {scope!r}")
    keys, blob = _sorted(idx)
    ints = array("q", chain.from_iterable(map(idx.__getitem__, keys)))
    if len(ints) != FIELDS * len(idx):
        raise ValueError("every index entry must have exactly 10 fields")
    offsets = array("Q", [0])
    if keys:
        offsets.extend(accumulate(len(p) + 1 for p in blob.split(b"\0")))
    if sys.byteorder != "little":  # pragma: no cover - no big-endian machine here
        ints.byteswap()
        offsets.byteswap()
    head = _HEAD.pack(scope.encode(), len(idx), len(blob))
    return b"".join((MAGIC, head, offsets.tobytes(), ints.tobytes(), blob))


def decode(data: bytes) -> tuple[Index, str]:
    """The index and its scope (`SCOPES`, or `LEGACY`)."""
    if not data.startswith((MAGIC, SORTED_MAGIC, UNSORTED_MAGIC)):
        raw = json.loads(data)
        return {str(k): tuple(v) for k, v in raw.items()}, LEGACY
    paths, ints, scope = _parts(data)
    it = iter(ints)
    entries: list[Entry] = list(zip(*([it] * FIELDS), strict=True))
    return dict(zip(paths, entries, strict=True)), scope


def _scope(data: bytes | mmap.mmap) -> tuple[str, int, int]:
    """The scope, the entry count and the blob's length of an encoded index."""
    if len(data) < _START:
        raise ValueError("the index file is truncated or not one asd wrote")
    raw_scope, count, plen = _HEAD.unpack_from(data, len(MAGIC))
    scope = raw_scope.rstrip(b"\0").decode("ascii", "replace")
    if scope not in SCOPES:
        raise ValueError(f"the index file has an unknown scope {scope!r}")
    return scope, count, plen


def _sections(count: int, plen: int) -> tuple[int, int, int]:
    """Where this layout's integers and blob begin, and where the file ends."""
    ints_at = _START + 8 * (count + 1)
    blob_at = ints_at + 8 * FIELDS * count
    return ints_at, blob_at, blob_at + plen


def _parts(data: bytes) -> tuple[list[str], array[int], str]:
    """The paths, the integers and the scope of an encoded index, of any binary layout."""
    scope, count, plen = _scope(data)
    if data.startswith(MAGIC):
        ints_at, blob_at, end = _sections(count, plen)
    else:  # earlier layouts: the paths, then the integers
        blob_at, ints_at = _START, _START + plen
        end = ints_at + 8 * FIELDS * count
    if len(data) != end:
        raise ValueError("the index file is truncated or not one asd wrote")
    ints = array("q", data[ints_at : ints_at + 8 * FIELDS * count])
    if sys.byteorder != "little":  # pragma: no cover
        ints.byteswap()
    blob = data[blob_at : blob_at + plen]
    paths = blob.decode("utf-8", "surrogateescape").split("\0") if count else []
    if len(paths) != count:
        raise ValueError("the index file is truncated or not one asd wrote")
    return paths, ints, scope


class _Table:
    """An index file's sorted paths and integers where they lie (the file mapped into
    memory): a path or an entry is decoded only when asked for. A sequence of the paths'
    bytes, so that `bisect_left` searches it."""

    def __init__(self, data: mmap.mmap) -> None:
        self.scope, self.count, plen = _scope(data)
        ints_at, self.blob, end = _sections(self.count, plen)
        if len(data) != end:
            raise ValueError("the index file is truncated or not one asd wrote")
        view = memoryview(data)
        self.data = data
        self.offsets = view[_START:ints_at].cast("Q")
        self.ints = view[ints_at : self.blob].cast("q")

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int) -> bytes:
        return self.data[self.blob + self.offsets[i] : self.blob + self.offsets[i + 1] - 1]

    def find(self, raw: bytes) -> int:
        """The position of the path ``raw``, or -1."""
        i = bisect_left(self, raw)
        return i if i < self.count and self[i] == raw else -1

    def path(self, i: int) -> str:
        return self[i].decode("utf-8", "surrogateescape")

    def entry(self, i: int) -> Entry:
        e = self.ints[FIELDS * i : FIELDS * i + FIELDS]
        return (e[0], e[1], e[2], e[3], e[4], e[5], e[6], e[7], e[8], e[9])


class Stored(MutableMapping[str, Entry]):
    """A saved index read where it lies (`_Table`), an entry made only when asked for; what
    is set or removed is kept apart. A lookup costs a bisection over the file, whatever
    the number of entries in it: for a resync that looks only at what changed
    (`asd.tracker`), which asks for few entries."""

    def __init__(self, table: _Table) -> None:
        self._table = table
        self._set: Index = {}
        self._removed: set[str] = set()

    def _base(self, key: str) -> Entry | None:
        i = self._table.find(_raw(key))
        return None if i < 0 else self._table.entry(i)

    def __getitem__(self, key: str) -> Entry:
        entry = self._set.get(key)
        if entry is None and key not in self._removed:
            entry = self._base(key)
        if entry is None:
            raise KeyError(key)
        return entry

    def __contains__(self, key: object) -> bool:
        if not isinstance(key, str):
            return False
        return key in self._set or key not in self._removed and self._base(key) is not None

    def __setitem__(self, key: str, entry: Entry) -> None:
        self._set[key] = entry
        self._removed.discard(key)

    def __delitem__(self, key: str) -> None:
        if key not in self:
            raise KeyError(key)
        self._set.pop(key, None)
        self._removed.add(key)

    def __iter__(self) -> Iterator[str]:
        path = self._table.path
        for i in range(len(self._table)):
            key = path(i)
            if key not in self._removed and key not in self._set:
                yield key
        yield from self._set

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def copy(self) -> Stored:
        other = Stored(self._table)
        other._set = dict(self._set)
        other._removed = set(self._removed)
        return other

    def with_inodes(self, inodes: AbstractSet[int]) -> list[str]:
        """The paths whose entries name one of ``inodes``: the file's inode column searched
        by C-level calls (a few milliseconds for 200k entries), not an entry made per path."""
        table = self._table
        found: list[str] = []
        if inodes and table.count:
            column = array("q", table.ints[1::FIELDS])
            for ino in inodes:
                i = -1
                with contextlib.suppress(ValueError):
                    while True:
                        i = column.index(ino, i + 1)
                        found.append(table.path(i))
        out = [k for k in found if k not in self._removed and k not in self._set]
        return out + [k for k, e in self._set.items() if e[1] in inodes]

    def below(self, directory: str) -> list[str]:
        """The paths below ``directory`` (not itself), by bisection: those starting with
        "directory/" sort from there up to "directory0" ("0" follows "/")."""
        table = self._table
        lo = bisect_left(table, _raw(f"{directory}/"))
        hi = bisect_left(table, _raw(f"{directory}0"))
        inside = (table.path(i) for i in range(lo, hi))
        out = [k for k in inside if k not in self._removed and k not in self._set]
        return out + [k for k in self._set if k.startswith(f"{directory}/")]


def open_stored(path: Path) -> tuple[Stored, str] | None:
    """The index at ``path`` (delta applied) as a `Stored`, and its scope; None if there is
    none or it is of an earlier layout, which cannot be searched where it lies. The mapping
    stays valid when the file is replaced meanwhile: it holds the file it was made from."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        st = os.fstat(fd)
        if os.pread(fd, len(MAGIC), 0) != MAGIC or sys.byteorder != "little":
            return None
        data = mmap.mmap(fd, st.st_size, prot=mmap.PROT_READ)
        delta = _delta(path, st)
    finally:
        os.close(fd)
    table = _Table(data)
    stored = Stored(table)
    _apply(stored, delta)
    return stored, table.scope


def _apply(idx: MutableMapping[str, Entry], delta: Index) -> None:
    for rel, entry in delta.items():
        if entry == REMOVED:
            idx.pop(rel, None)
        else:
            idx[rel] = entry


def delta_file(path: Path) -> Path:
    return path.with_name(f"{path.name}.delta")


def _write(path: Path, *parts: bytes) -> None:
    """Write atomically (temp file, fsync, rename); /run is RAM, but a reader never sees half."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        for part in parts:
            fh.write(part)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def save(path: Path, idx: Index, scope: str = "full") -> None:
    _write(path, encode(idx, scope))
    delta_file(path).unlink(missing_ok=True)


def _identity(st: os.stat_result) -> tuple[int, int, int]:
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def _delta(path: Path, base: os.stat_result) -> Index:
    """The changes kept beside the index file ``path`` (whose stat is ``base``), if they
    belong to it."""
    try:
        data = delta_file(path).read_bytes()
    except FileNotFoundError:
        return {}
    if len(data) < _DELTA_HEAD.size:
        raise ValueError("the index's delta file is truncated")
    magic, *identity = _DELTA_HEAD.unpack_from(data)
    if magic != DELTA_MAGIC:
        raise ValueError("the index's delta file is not one asd wrote")
    if tuple(identity) != _identity(base):
        return {}
    return decode(data[_DELTA_HEAD.size :])[0]


def save_changes(
    path: Path, idx: Mapping[str, Entry], changed: Iterable[str], scope: str = "full"
) -> None:
    """Save ``idx``, which differs from what `load` gives only at ``changed``, as a delta
    beside the index file (or, once the delta is large, as a whole index)."""
    try:
        with open(path, "rb") as fh:
            base = os.fstat(fh.fileno())
            head = fh.read(len(MAGIC) + _HEAD.size)
        if not head.startswith(MAGIC) or len(head) < len(MAGIC) + _HEAD.size:
            raise FileNotFoundError  # an index of earlier versions: write it whole
        count = _HEAD.unpack_from(head, len(MAGIC))[1]
        delta = _delta(path, base)
    except FileNotFoundError:
        save(path, dict(idx.items()), scope)
        return
    for rel in changed:
        delta[rel] = idx.get(rel, REMOVED)
    if len(delta) > max(1000, count // 8):
        save(path, dict(idx.items()), scope)
        return
    head = _DELTA_HEAD.pack(DELTA_MAGIC, *_identity(base))
    _write(delta_file(path), head, encode(delta, scope))


def load(path: Path) -> tuple[Index, str | None]:
    """The saved index, with its delta applied, and its scope; an empty one and None when
    there is none."""
    try:
        with open(path, "rb") as fh:
            idx, scope = decode(fh.read())
            delta = _delta(path, os.fstat(fh.fileno()))
    except FileNotFoundError:
        return {}, None
    _apply(idx, delta)
    return idx, scope


def identity(path: Path) -> tuple[int, ...] | None:
    """What tells this index, delta included, from any other saved at the same path."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    try:
        delta = _identity(os.stat(delta_file(path)))
    except FileNotFoundError:
        delta = (0, 0, 0)
    return (*_identity(st), *delta)
