"""The index of a RAM copy on its way to and from /run: a compact binary file.

An index of 200k entries as JSON (25 MiB) took seconds to parse and to write; this format
is one blob of NUL-separated paths and one array of 64-bit integers, read and written by a
handful of C-level calls (decode, split, `array.frombytes`, `zip`). It is barely smaller
(about 100 bytes an entry, 80 of them the ten integers): the gain is the time.

Layout: ``MAGIC`` (8 bytes), then the scope (8 bytes: ``full`` for a walk of the whole RAM
copy, ``upper`` for overlay mode's upper layer, `asd.upper`; two indexes of different scopes
must never be compared: every lower file would look deleted), then the entry count and the
path-blob length (two little-endian uint64),
the paths (UTF-8 with surrogateescape, so any byte name round-trips, joined by NUL: a name
can never hold one), then ``FIELDS`` int64 per entry, little-endian.

A file that does not start with ``MAGIC`` is read as the JSON index of earlier versions (an
upgrade while targets are synced keeps its sync point); for that reason the file keeps its
old name, `TargetLayout.index_file`.
"""

from __future__ import annotations

import json
import os
import struct
import sys
from array import array
from itertools import chain
from pathlib import Path

from asd.tree import Entry, Index

MAGIC = b"ASDIDX1\n"
FIELDS = 10
SCOPES = ("full", "upper")
LEGACY = "json"  # a full index in the JSON of earlier versions
_HEAD = struct.Struct("<8sQQ")


def encode(idx: Index, scope: str = "full") -> bytes:
    paths = "\0".join(idx).encode("utf-8", "surrogateescape")
    ints = array("q", chain.from_iterable(idx.values()))
    if len(ints) != FIELDS * len(idx):
        raise ValueError("every index entry must have exactly 10 fields")
    if sys.byteorder != "little":  # pragma: no cover - no big-endian machine here
        ints.byteswap()
    if scope not in SCOPES:
        raise ValueError(f"unknown index scope {scope!r}")
    head = _HEAD.pack(scope.encode(), len(idx), len(paths))
    return b"".join((MAGIC, head, paths, ints.tobytes()))


def decode(data: bytes) -> tuple[Index, str]:
    """The index and its scope (`SCOPES`, or `LEGACY`)."""
    if not data.startswith(MAGIC):
        raw = json.loads(data)
        return {str(k): tuple(v) for k, v in raw.items()}, LEGACY
    raw_scope, count, plen = _HEAD.unpack_from(data, len(MAGIC))
    scope = raw_scope.rstrip(b"\0").decode("ascii", "replace")
    if scope not in SCOPES:
        raise ValueError(f"the index file has an unknown scope {scope!r}")
    start = len(MAGIC) + _HEAD.size
    paths = data[start : start + plen].decode("utf-8", "surrogateescape").split("\0")
    if count == 0:
        paths = []
    ints = array("q")
    ints.frombytes(data[start + plen :])
    if sys.byteorder != "little":  # pragma: no cover
        ints.byteswap()
    if len(paths) != count or len(ints) != FIELDS * count:
        raise ValueError("the index file is truncated or not one asd wrote")
    it = iter(ints)
    entries: list[Entry] = list(zip(*([it] * FIELDS), strict=True))
    return dict(zip(paths, entries, strict=True)), scope


def save(path: Path, idx: Index, scope: str = "full") -> None:
    """Write atomically (temp file, fsync, rename); /run is RAM, but a reader never sees half."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(encode(idx, scope))
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def load(path: Path) -> tuple[Index, str | None]:
    """The saved index and its scope, or an empty one and None when there is none."""
    try:
        with open(path, "rb") as fh:
            return decode(fh.read())
    except FileNotFoundError:
        return {}, None
