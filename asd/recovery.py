"""Start-time recovery of a disk copy after an unclean stop (crash, power cut, kill).

Evidence of an unclean stop is asd's session marker in the disk copy (``.asd-work/session.json``),
written at sync and removed by a clean unsync. At the next sync, before anything is mounted:
finish or discard an interrupted resync (the journal), snapshot the disk copy — now exactly the
last sync point — as a crash-recovery tarball, and clear asd's leftovers.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import time
from collections.abc import Callable
from pathlib import Path

from asd import lower, snapshots
from asd.dirfd import fsync_path, open_private_dir, open_set_up_dir, remove_at, remove_tree
from asd.errors import SafetyError, StateError
from asd.journal import Journal
from asd.layout import KEPT, WORK_NAME, TargetLayout, backup_path
from asd.state import write_json_atomic

log = logging.getLogger(__name__)


def was_unclean(target: Path) -> bool:
    return os.path.lexists(target / WORK_NAME / "session.json")


def mark_session(target: Path, info: dict[str, object]) -> None:
    """Write the marker; the target keeps its times (asd's own directory is not a change)."""
    work = target / WORK_NAME
    # The target itself, not whatever a symlink swapped in for it would point to.
    tfd = open_set_up_dir(target)
    try:
        before = os.fstat(tfd)
        with contextlib.suppress(FileExistsError):
            os.mkdir(WORK_NAME, 0o700, dir_fd=tfd)
        os.utime(tfd, ns=(before.st_atime_ns, before.st_mtime_ns))
        fd = open_private_dir(Path(f"/proc/self/fd/{tfd}") / WORK_NAME, shown=work)
    finally:
        os.close(tfd)
    try:
        write_json_atomic(work / "session.json", info, dir_fd=fd)
    finally:
        os.close(fd)


def remove_work(
    target: Path, times_from: Path | None = None, keep: frozenset[str] = frozenset()
) -> None:
    """Remove asd's journal directory from a plain target, all but the names in ``keep``
    (overlay mode's lower tree, `KEPT`; a session's last delta becomes the tree's spare
    when ``keep`` has that), keeping the target's own times: they are the last
    sync point's (asd's directory coming and going is not a change). With ``times_from``,
    the target takes that directory's times instead, journal or not."""
    work = target / WORK_NAME
    if times_from is None and not os.path.lexists(work):
        return
    before = os.lstat(times_from or target)
    try:
        fd = open_private_dir(work) if keep and os.path.lexists(work) else None
    except SafetyError:
        fd = None  # not asd's own directory: nothing in it is kept
    if fd is None:
        remove_tree(work)
    else:
        try:
            if lower.SPARE in keep:
                lower.keep_spare(fd)
            for name in set(os.listdir(fd)) - keep:
                remove_at(fd, name)
            left = os.listdir(fd)
        finally:
            os.close(fd)
        if not left:
            os.rmdir(work)
    os.utime(target, ns=(before.st_atime_ns, before.st_mtime_ns), follow_symlinks=False)
    fsync_path(target)


def discard_kept(target: Path) -> bool:
    """`asd clean`: remove what a clean stop kept in a plain target (overlay mode's lower tree
    and its record; the next overlay sync builds them again). Only asd's own root-private
    directory, and only when it holds nothing else: anything more is the journal of a session
    that did not stop cleanly, which the next sync has to finish first. The record goes before
    the tree, and the target keeps its times. True when there was something to remove."""
    tfd = open_set_up_dir(target)
    try:
        before = os.fstat(tfd)
        try:
            work = Path(f"/proc/self/fd/{tfd}") / WORK_NAME
            fd = open_private_dir(work, shown=target / WORK_NAME)
        except FileNotFoundError:
            return False
        try:
            names = set(os.listdir(fd))
            if names - KEPT:
                raise StateError(
                    f"{target / WORK_NAME} holds a journal, not only the kept lower tree: asd did "
                    f"not stop cleanly for {target}, and the next 'asd sync' finishes that session "
                    "first; nothing was removed"
                )
            for name in sorted(names, key=lambda n: n != "lower.json"):
                remove_at(fd, name)
        finally:
            os.close(fd)
        os.rmdir(WORK_NAME, dir_fd=tfd)
        os.utime(tfd, ns=(before.st_atime_ns, before.st_mtime_ns))
        os.fsync(tfd)
    finally:
        os.close(tfd)
    return True


def keep_times_beside(target: Path) -> None:
    """Give the empty mount point beside the target (about to be removed) the target's times:
    if a crash falls after the marker is gone but before the journal directory and the mount
    point are, the next start restores the target's mtime from it — the last sync point's,
    not the session start's."""
    backup = backup_path(target)
    if os.path.isdir(backup) and not os.path.islink(backup):
        st = os.lstat(target)
        os.utime(backup, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)
        fsync_path(backup.parent)


def clear_session(target: Path) -> None:
    """A clean stop: finish a committed write-back if one is pending, then drop the journal.
    With the marker already gone, an earlier stop was cut short after it removed the journal
    (asd killed, the machine still up): the target's times may be that removal's, and the
    mount point beside holds the right ones (`keep_times_beside`)."""
    journal = Journal(target)
    if os.path.lexists(journal.record):
        journal.apply()
    backup = backup_path(target)
    if not was_unclean(target) and os.path.isdir(backup) and not os.path.islink(backup):
        remove_work(target, times_from=backup, keep=KEPT)
        return
    keep_times_beside(target)
    remove_work(target, keep=KEPT)


def recover(
    layout: TargetLayout,
    *,
    use_backups: bool,
    backup_limit: int,
    say: Callable[[str], None],
    keep_lower: bool = False,
) -> snapshots.Snapshot | None:
    """Bring an unmounted target back to a plain last-sync-point state; snapshot if unclean.
    ``keep_lower``: overlay mode reuses a lower tree kept from an earlier session; copy mode
    removes one (its links would look like links to files outside the target)."""
    target = layout.target
    for partial in snapshots.remove_partial(target):
        say(f"removed an unfinished snapshot {partial}")
    journal = Journal(target)
    done = journal.recover()
    if done:
        say(f"{target}: {done}")
    snap = None
    if was_unclean(target):
        say(f"{target}: asd was not stopped cleanly; the disk copy holds the last sync point")
        if use_backups:
            started = time.monotonic()
            snap = snapshots.create(target, target, exclude=(WORK_NAME,))
            say(
                f"{target}: saved crash-recovery snapshot {snap.path} "
                f"({snap.size_bytes} bytes, {time.monotonic() - started:.1f} s)"
            )
            for old in snapshots.rotate(target, backup_limit):
                say(f"{target}: removed old snapshot {old} (BACKUP_LIMIT={backup_limit})")
    # Outside a session (no marker) the mount point beside the target, if it exists, holds
    # the target's last times: sync creates it with them (by rename, so it never exists
    # without), and a clean stop gives it the final times before removing the journal.
    early = not was_unclean(target) and os.path.isdir(layout.backup)
    if not early:
        keep_times_beside(target)  # the same as a clean stop, for a crash from here on
    stale = layout.backup.with_name(layout.backup.name + ".new")
    if os.path.isdir(stale) and not os.path.islink(stale):
        os.rmdir(stale)
    kept = os.path.lexists(target / WORK_NAME / "lower")
    remove_work(target, layout.backup if early else None, KEPT if keep_lower else frozenset())
    if kept and not keep_lower:
        say(f"{target}: removed the overlay lower tree an earlier session in overlay mode kept")
    backup = layout.backup
    try:
        st = os.lstat(backup)
    except FileNotFoundError:
        return snap
    if not stat.S_ISDIR(st.st_mode):
        raise SafetyError(
            f"{backup} exists and is not a directory; asd needs that name for the disk copy "
            f"of {target}: move it away and try again"
        )
    try:
        os.rmdir(backup)  # the empty mount point left by a crash
    except OSError as exc:
        raise SafetyError(
            f"{backup} exists and is not empty, so asd will not use or remove it; look at "
            f"what it holds (an older asd version may have moved {target} there), move it "
            "away, and try again"
        ) from exc
    return snap
