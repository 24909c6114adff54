"""Files written through a shared mapping, which tmpfs does not stamp (`asd.writeback`).

A program that maps a file ``MAP_SHARED`` and writes to the mapping moves the file's mtime
only at its first write: that write faults the page in writable, and the fault stamps the
time. tmpfs never writes pages back, so nothing makes them read-only again, and later writes
go straight to memory: no mtime, ctime or size change, and msync and munmap change nothing
either (checked on this kernel). A resync that compares a walk with the last sync point's
index would take such a file for unchanged from then on, and the disk would keep what the
last resync that copied it saw: a write lost at unsync.

So a resync looks for shared writable mappings of the files in RAM before it walks (`look`)
and again once it has written, and saves their index entries *smudged*: with a ctime no file
can have (`SMUDGED`), so that the next resync finds them changed and writes them again
(patched in place: only the blocks that differ). A mapping made after the first look stamps
the file with its first write; a file this resync wrote whose mtime or ctime is that recent
(within `RACY_NS` of the look) is smudged too, so a mapping made and dropped while the resync
ran is caught as well. Each look reads /proc/PID/maps of every process and stats each shared
writable mapping through /proc/PID/map_files (root's: it takes CAP_SYS_ADMIN or
CAP_CHECKPOINT_RESTORE), so a file is found by its device and inode whatever the mapping
process's root or mount namespace.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from asd.tree import Entries, Entry

SMUDGED = -1  # a ctime no file has: the entry never matches a walk
# tmpfs stamps times from the coarse clock, which lags by up to a tick (10 ms at HZ=100). Not
# much more: a file written just before a resync would be smudged (written again by the next
# one, and kept in RAM at the give-back).
RACY_NS = 20_000_000


@dataclass(frozen=True)
class Look:
    started_ns: int
    files: frozenset[tuple[int, int]]  # (st_dev, st_ino) mapped shared and writable


def look(proc: Path = Path("/proc")) -> Look:
    started = time.time_ns()
    return Look(started, frozenset(shared_writable(proc)))


def shared_writable(proc: Path = Path("/proc")) -> set[tuple[int, int]]:
    """(st_dev, st_ino) of every file some process has mapped shared and writable now."""
    found: set[tuple[int, int]] = set()
    for entry in os.scandir(proc):
        if not entry.name.isdigit():
            continue
        try:
            with open(os.path.join(entry.path, "maps"), "rb") as fh:
                lines = fh.read().splitlines()
        except OSError:
            continue  # gone, or a kernel thread
        for line in lines:
            parts = line.split(None, 5)
            if len(parts) < 6 or parts[1][1:2] != b"w" or parts[1][3:4] != b"s":
                continue
            try:
                st = os.stat(os.path.join(entry.path, "map_files", parts[0].decode()))
            except OSError:
                continue  # unmapped meanwhile
            found.add((st.st_dev, st.st_ino))
    return found


def racy(idx: Entries, rels: Iterable[str], since_ns: int) -> list[str]:
    """Of ``rels``, those whose entry's mtime or ctime is within `RACY_NS` of ``since_ns``
    or later."""
    edge = since_ns - RACY_NS
    return [r for r in rels if r in idx and (idx[r][6] >= edge or idx[r][7] >= edge)]


def smudge_entry(e: Entry) -> Entry:
    return (e[0], e[1], e[2], e[3], e[4], e[5], e[6], SMUDGED, e[8], e[9])


def smudge(idx: Entries, rels: Iterable[str]) -> int:
    """Smudge the entries of ``rels`` in place; how many there were."""
    done = 0
    for rel in rels:
        entry = idx.get(rel)
        if entry is not None:
            idx[rel] = smudge_entry(entry)
            done += 1
    return done
