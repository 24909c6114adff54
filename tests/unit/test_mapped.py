"""Which files are mapped for writing, and what a resync does with their index entries
(`asd.mapped`)."""

from __future__ import annotations

import mmap
import os
from pathlib import Path

import pytest

from asd import mapped
from asd.tree import Entry, Index


def map_files_readable() -> bool:
    """/proc/PID/map_files needs CAP_SYS_ADMIN or CAP_CHECKPOINT_RESTORE: asd runs as root, a
    package build does not."""
    try:
        with open("/proc/self/maps") as fh:
            first = fh.readline().split()[0]
        os.stat(f"/proc/self/map_files/{first}")
    except (OSError, IndexError):
        return False
    return True


def entry(mtime: int, ctime: int, ino: int = 7) -> Entry:
    return (0o100000, ino, 0o100644, 0, 0, 10, mtime, ctime, 1, 0)


@pytest.mark.skipif(
    not map_files_readable(), reason="needs CAP_SYS_ADMIN or CAP_CHECKPOINT_RESTORE (asd has)"
)
def test_a_shared_writable_mapping_is_found_and_a_private_or_read_only_one_is_not(
    tmp_path: Path,
) -> None:
    files = [tmp_path / n for n in ("shared", "private", "read-only")]
    for f in files:
        f.write_bytes(b"\0" * 4096)
    ids = [(os.stat(f).st_dev, os.stat(f).st_ino) for f in files]
    with open(files[0], "r+b") as a, open(files[1], "r+b") as b, open(files[2], "rb") as c:
        maps = [
            mmap.mmap(a.fileno(), 4096, mmap.MAP_SHARED),
            mmap.mmap(b.fileno(), 4096, mmap.MAP_PRIVATE),
            mmap.mmap(c.fileno(), 4096, mmap.MAP_SHARED, mmap.PROT_READ),
        ]
        found = mapped.look().files
        for m in maps:
            m.close()
    assert ids[0] in found and ids[1] not in found and ids[2] not in found
    assert ids[0] not in mapped.shared_writable(), "unmapped: no longer found"


def test_entries_written_while_the_resync_ran_are_racy() -> None:
    since = 50_000_000_000
    idx: Index = {
        "old": entry(since - 5 * mapped.RACY_NS, since - 5 * mapped.RACY_NS),
        "stamped late": entry(since + 1, since + 1),
        "within a tick": entry(since - mapped.RACY_NS // 2, since - 5 * mapped.RACY_NS),
        "chmod now": entry(since - 5 * mapped.RACY_NS, since),
    }
    got = mapped.racy(idx, ["old", "stamped late", "within a tick", "chmod now", "gone"], since)
    assert got == ["stamped late", "within a tick", "chmod now"]


def test_a_smudged_entry_matches_no_walk() -> None:
    idx: Index = {"a": entry(1, 2), "b": entry(1, 2, ino=8)}
    assert mapped.smudge(idx, ["a", "missing"]) == 1
    assert idx["a"] != entry(1, 2) and idx["a"][7] == mapped.SMUDGED
    assert idx["a"][:7] == entry(1, 2)[:7] and idx["b"] == entry(1, 2, ino=8)
