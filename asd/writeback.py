"""Resync of one target: write what changed in RAM back to the disk copy, crash-safely.

What changed is found by comparing a walk of the RAM side with the index saved at the last
sync point (`asd.tree`, stored by `asd.index`); the disk side is never walked. In overlay
mode only the upper layer is walked (`asd.upper`). A file that was there at the last sync
point and changed in place has only its changed blocks staged (`asd.patch`); new files, and
those a patch does not suit, are copied by rsync into the journal's stage on the disk copy's
file system, then committed (`asd.journal`, which makes each step durable with one `syncfs`:
an fsync per file costs a journal commit each, ten times the bytes changed for small files).
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
from collections.abc import Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from asd import index, mapped, rsync, tracker, upper
from asd.dirmeta import dir_metadata
from asd.errors import CommandError
from asd.journal import Journal
from asd.layout import WORK_NAME, TargetLayout
from asd.mounts import MountTable
from asd.patch import IN_PLACE, Patch, stage_patches
from asd.run import run
from asd.tree import (
    Changes,
    Entries,
    Index,
    diff,
    diff_at,
    drop_subtrees,
    parent_of,
    rescan,
    with_inodes,
    with_links,
)
from asd.tree import index as tree_index

log = logging.getLogger(__name__)

EXCLUDE = frozenset({WORK_NAME})


@dataclass(frozen=True)
class WriteBack:
    target: Path
    changes: int
    deleted: int
    vanished: tuple[str, ...]
    walked: bool = False  # copy mode: the whole RAM copy was walked (no tracker's answer)

    def describe(self) -> str:
        if not self.changes and not self.deleted:
            return f"{self.target}: nothing changed since the last sync point"
        text = f"{self.target}: wrote {self.changes} changed entries, removed {self.deleted}"
        if self.vanished:
            text += f" ({len(self.vanished)} vanished while copying; the next resync catches up)"
        return text


def scope_of(layout: TargetLayout) -> str:
    return "upper" if upper.is_overlay(layout) else "full"


def save_index(layout: TargetLayout, idx: Entries, changed: AbstractSet[str] | None = None) -> None:
    """Save the RAM side's index; only as the entries at ``changed`` when that is known
    (`index.save_changes`)."""
    if changed is None:
        index.save(layout.index_file, idx if isinstance(idx, dict) else dict(idx), scope_of(layout))
    else:
        index.save_changes(layout.index_file, idx, changed, scope_of(layout))


def ram_index(layout: TargetLayout) -> Index:
    """The RAM side now, in this session's scope (`asd.index`), found by a walk."""
    if upper.is_overlay(layout):
        return upper.upper_index(layout)
    return tree_index(layout.ram_copy, EXCLUDE)


def take_first_index(layout: TargetLayout) -> None:
    """The sync point of a new session. In copy mode the change tracker is started first
    and its period closed before the walk, so the first resync already knows what changed."""
    answer = None
    if not upper.is_overlay(layout) and tracker.start(layout.instance):
        answer = tracker.cut(layout.instance, None)
    save_index(layout, ram_index(layout))
    tracker.save_token(layout, answer)


class Comparison(NamedTuple):
    old: Entries  # the last sync point's
    new: Entries  # the RAM side's now, to save once written
    changes: Changes
    answer: tracker.Answer | None  # the tracker's cut ``new`` was taken after, if any
    changed: set[str] | None  # where ``new`` can differ from ``old``, if not anywhere


def _copy_index(
    layout: TargetLayout, full: bool, mapped_now: AbstractSet[tuple[int, int]]
) -> Comparison:
    """Copy mode's comparison. When the change tracker can say what changed since the last
    sync point, only those entries are looked at, and the saved index is searched where it
    lies instead of read whole (`index.Stored`); otherwise (or when ``full``) the RAM copy
    is walked. Writes through a shared mapping make no event, so the files mapped for
    writing now (``mapped_now``) and those the last resync smudged or left out (the token's
    `Token.recheck`) are looked at too; one unmapped since made an event as the mapping
    went."""
    token = None if full else tracker.load_token(layout)
    answer = tracker.cut(layout.instance, token)
    touched = None if answer is None or token is None else answer.under(layout.ram_copy)
    opened = None if touched is None else index.open_stored(layout.index_file)
    if touched is not None and token is not None and opened is not None and opened[1] == "full":
        old = opened[0]
        dev = os.lstat(layout.ram_copy).st_dev
        inodes = {ino for d, ino in mapped_now if d == dev}
        again = [*token.recheck]
        again += [r for r in with_inodes(old, inodes) if r]
        touched += [(parent_of(r), r.rpartition("/")[2]) for r in again]
        new = old.copy()
        changed = rescan(layout.ram_copy, old, new, touched, EXCLUDE)
        if changed is not None:
            log.debug(
                "%s: looked at %d entries the change tracker named", layout.target, len(touched)
            )
            changes = with_links(diff_at(old, new, changed), new)
            return Comparison(old, new, changes, answer, changed)
    walked_old, scope = index.load(layout.index_file)
    walked = tree_index(layout.ram_copy, EXCLUDE)
    return Comparison(
        walked_old, walked, with_links(diff(walked_old, walked), walked), answer, None
    )


def compare(
    layout: TargetLayout,
    *,
    full: bool = False,
    mapped_now: AbstractSet[tuple[int, int]] | None = None,
) -> Comparison:
    """The last sync point's index, the RAM side's now (to save after writing), and what
    changed in between. An index of another scope than this session's (a JSON index of an
    earlier version, in overlay mode) is compared with a full walk of the merged view, once.
    ``full``: in copy mode, walk even if the change tracker could say what changed;
    ``mapped_now``: the files mapped for writing (`mapped.shared_writable`), if looked at."""
    if not upper.is_overlay(layout):
        if mapped_now is None:
            mapped_now = mapped.shared_writable()
        return _copy_index(layout, full, mapped_now)
    old, scope = index.load(layout.index_file)
    new = upper.upper_index(layout)
    if scope is None or scope == scope_of(layout):
        changes = diff(old, new)
        if not changes.empty:
            changes = upper.expand(layout, old, new, changes)
            if upper.has_links(layout, changes):
                changes = with_links(changes, tree_index(layout.ram_copy, EXCLUDE))
    else:
        full_index = tree_index(layout.ram_copy, EXCLUDE)
        changes = with_links(diff(old, full_index), full_index)
    return Comparison(old, new, changes, None, None)


def pending(layout: TargetLayout) -> Changes:
    """What a resync would write now (read-only; used by --dry-run and parse)."""
    return compare(layout).changes


def patch_candidates(layout: TargetLayout, changes: Changes, new: Entries) -> list[str]:
    """Changed files that may be patched in place (`asd.patch`): regular files with no
    other name in RAM, neither new nor of another type (those are deletions too), on a disk
    copy whose file system overwrites in place."""
    if MountTable.read().holding(layout.backup).fstype not in IN_PLACE:
        return []
    deleted = set(changes.deleted)
    overlay = upper.is_overlay(layout)
    out = []
    for rel in changes.files:
        entry = new.get(rel)
        if entry is None or rel in deleted or entry[0] != stat.S_IFREG:
            continue
        if upper.single_name(layout, rel) if overlay else entry[8] == 1:
            out.append(rel)
    return out


def without_patched(
    changes: Changes, patches: Mapping[str, Patch], old: Entries, new: Entries
) -> Changes:
    """``changes`` less the patched files, and less the directories listed only because a
    file in them changed that is now patched (a patch leaves its directory as it is; a rename
    into it would not)."""
    if not patches:
        return changes
    files = [r for r in changes.files if r not in patches]
    own = [d for d in changes.dirs if old.get(d) != new.get(d)]
    needed = {parent_of(r) for r in (*files, *changes.deleted, *own) if r} | set(own)
    return Changes(changes.deleted, tuple(files), tuple(d for d in changes.dirs if d in needed))


def copy_listed(
    layout: TargetLayout, journal: Journal, listed: list[str], list_file: Path, stage: int
) -> None:
    """rsync the ``listed`` paths from RAM into the stage (through its descriptor, not its
    name: see `Journal.new_stage`). What vanished on the way is found by the caller."""
    try:
        list_file.write_bytes(b"".join(os.fsencode(r) + b"\0" for r in listed))
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror, str(list_file)) from exc
    alias = f"/proc/self/fd/{stage}"
    try:
        run(
            rsync.copy_listed(layout.ram_copy, Path(alias), list_file),
            ok_codes=rsync.ok_codes(allow_vanished=True),
            pass_fds=(stage,),
        )
    except CommandError as exc:
        if not rsync.only_vanished(exc.exit_code, exc.stderr):
            raise exc.showing(alias, str(journal.stage)) from None
        log.debug("rsync: %s", exc.stderr.strip())  # counted as vanished by the caller


def smudge_mapped(
    layout: TargetLayout, new: Entries, before: mapped.Look, wrote: Changes
) -> set[str]:
    """Smudge the entries of files mapped for writing at ``before`` or now, and of those this
    resync wrote whose times are as recent as ``before`` (`asd.mapped`); which they were."""
    files = before.files | mapped.shared_writable()
    rels = set(mapped.racy(new, wrote.files, before.started_ns))
    if files and upper.is_overlay(layout):  # a mapping shows the merged view's inode
        for rel, entry in new.items():
            if stat.S_ISREG(entry[0]) and rel not in rels:
                with contextlib.suppress(OSError):
                    st = os.stat(layout.ram_copy / rel, follow_symlinks=False)
                    if (st.st_dev, st.st_ino) in files:
                        rels.add(rel)
    elif files:
        dev = os.lstat(layout.ram_copy).st_dev
        inodes = {ino for d, ino in files if d == dev}
        rels |= {r for r in with_inodes(new, inodes) if stat.S_ISREG(new[r][0])}
    smudged = {r for r in rels if r in new}
    mapped.smudge(new, smudged)
    return smudged


def resync_target(layout: TargetLayout, *, full: bool = False) -> WriteBack:
    """``full``: in copy mode, walk the whole RAM copy whatever the change tracker says
    (`compare`)."""
    journal = Journal(layout.backup)
    done = journal.recover()
    if done:
        log.warning("%s: %s", layout.target, done)
    before = mapped.look()
    old, new, changes, answer, changed = compare(layout, full=full, mapped_now=before.files)
    compared = changes  # before patched files are taken out of it
    walked = changed is None and not upper.is_overlay(layout)
    if changes.empty:
        smudged = smudge_mapped(layout, new, before, changes)
        if smudged:
            save_index(layout, new, None if changed is None else smudged)
        # The index there still holds at this cut (nothing changed): only the token moves on.
        tracker.save_token(layout, answer, recheck=smudged)
        return WriteBack(layout.target, 0, 0, (), walked)
    list_file = layout.index_file.with_suffix(".list")
    try:
        with journal.new_stage() as stage:
            patches = stage_patches(
                layout.ram_copy, layout.backup, patch_candidates(layout, changes, new), stage
            )
            changes = without_patched(changes, patches, old, new)
            # Not the root: rsync copies the contents of a listed "." one level down (every
            # file at the top of the target, data and all); the commit takes its metadata
            # from RAM instead.
            listed = [r for r in (*changes.dirs, *changes.files) if r]
            if listed:
                copy_listed(layout, journal, listed, list_file, stage)
            vanished = tuple(r for r in listed if not journal.staged(stage, r))
        deleted = list(changes.deleted)
        for rel in vanished:
            # Gone from RAM between the walk and the copy: remove it on disk if it was there
            # (in the last sync point's index, or, in overlay mode, only in the lower layer),
            # and forget it, so that if it comes back the next resync copies it.
            if rel in old or os.path.lexists(layout.backup / rel):
                deleted.append(rel)
        gone = set(vanished)
        dropped = drop_subtrees(new, gone)
        final = Changes(
            tuple(sorted(set(deleted))),
            tuple(r for r in changes.files if r not in gone),
            tuple(r for r in changes.dirs if r not in gone),
        )
        root = {"": dir_metadata(layout.ram_copy)} if "" in final.dirs else {}
        journal.commit(final, root, patches)
    except BaseException:
        if not os.path.lexists(journal.record):
            journal.recover()  # discard the uncommitted stage; the disk copy is untouched
        raise
    finally:
        list_file.unlink(missing_ok=True)
    smudged = smudge_mapped(layout, new, before, compared)
    save_index(layout, new, None if changed is None else {*changed, *dropped, *smudged})
    tracker.save_token(layout, answer, recheck={*vanished, *smudged})
    written = len(final.files) + len(patches) + len(final.dirs)
    return WriteBack(layout.target, written, len(final.deleted), vanished, walked)
