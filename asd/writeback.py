"""Resync of one target: write what changed in RAM back to the disk copy, crash-safely.

What changed is found by comparing a walk of the RAM side with the index saved at the last
sync point (`asd.tree`); the disk side is never walked. Changed files are copied by rsync into
the journal's stage on the disk copy's file system, then committed (`asd.journal`).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from asd import rsync
from asd.journal import Journal
from asd.layout import WORK_NAME, TargetLayout
from asd.run import run
from asd.state import write_json_atomic
from asd.tree import Changes, Index, diff, index

log = logging.getLogger(__name__)

EXCLUDE = frozenset({WORK_NAME})


@dataclass(frozen=True)
class WriteBack:
    target: Path
    changes: int
    deleted: int
    vanished: tuple[str, ...]

    def describe(self) -> str:
        if not self.changes and not self.deleted:
            return f"{self.target}: nothing changed since the last sync point"
        text = f"{self.target}: wrote {self.changes} changed entries, removed {self.deleted}"
        if self.vanished:
            text += f" ({len(self.vanished)} vanished while copying; the next resync catches up)"
        return text


def save_index(layout: TargetLayout, idx: Index) -> None:
    write_json_atomic(layout.index_file, idx)


def load_index(layout: TargetLayout) -> Index:
    try:
        with open(layout.index_file, "rb") as fh:
            raw = json.loads(fh.read())
    except FileNotFoundError:
        return {}
    return {k: tuple(v) for k, v in raw.items()}


def ram_index(layout: TargetLayout) -> Index:
    return index(layout.ram_copy, EXCLUDE)


def pending(layout: TargetLayout) -> Changes:
    """What a resync would write now (read-only; used by --dry-run and parse)."""
    return diff(load_index(layout), ram_index(layout))


def _without_subtree(idx: Index, rel: str) -> None:
    for key in [k for k in idx if k == rel or k.startswith(rel + "/")]:
        del idx[key]


def resync_target(layout: TargetLayout) -> WriteBack:
    journal = Journal(layout.backup)
    done = journal.recover()
    if done:
        log.warning("%s: %s", layout.target, done)
    old = load_index(layout)
    new = ram_index(layout)
    changes = diff(old, new)
    if changes.empty:
        return WriteBack(layout.target, 0, 0, ())
    stage = journal.new_stage()
    listed = [*changes.dirs, *changes.files]
    list_file = layout.index_file.with_suffix(".list")
    list_file.write_bytes(b"".join(os.fsencode(r or ".") + b"\0" for r in listed))
    try:
        run(
            rsync.copy_listed(layout.ram_copy, stage, list_file),
            ok_codes=rsync.ok_codes(allow_vanished=True),
        )
        vanished = tuple(r for r in listed if r and not os.path.lexists(stage / r))
        deleted = list(changes.deleted)
        for rel in vanished:
            # Gone from RAM between the walk and the copy: remove it on disk if it was there,
            # and forget it, so that if it comes back the next resync copies it.
            if rel in old:
                deleted.append(rel)
            _without_subtree(new, rel)
        gone = set(vanished)
        final = Changes(
            tuple(sorted(set(deleted))),
            tuple(r for r in changes.files if r not in gone),
            tuple(r for r in changes.dirs if r not in gone),
        )
        journal.commit(final)
    except BaseException:
        if not os.path.lexists(journal.record):
            journal.recover()  # discard the uncommitted stage; the disk copy is untouched
        raise
    finally:
        list_file.unlink(missing_ok=True)
    save_index(layout, new)
    return WriteBack(
        layout.target, len(final.files) + len(final.dirs), len(final.deleted), vanished
    )
