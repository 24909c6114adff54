"""Start-time recovery of a disk copy after an unclean stop (crash, power cut, kill).

Evidence of an unclean stop is asd's session marker in the disk copy (``.asd-work/session.json``),
written at sync and removed by a clean unsync. At the next sync, before anything is mounted:
finish or discard an interrupted resync (the journal), snapshot the disk copy — now exactly the
last sync point — as a crash-recovery tarball, and clear asd's leftovers.
"""

from __future__ import annotations

import logging
import os
import stat
import time
from collections.abc import Callable
from pathlib import Path

from asd import snapshots
from asd.errors import SafetyError
from asd.journal import Journal, fsync_path, remove_tree
from asd.layout import WORK_NAME, TargetLayout
from asd.state import write_json_atomic

log = logging.getLogger(__name__)


def was_unclean(target: Path) -> bool:
    return os.path.lexists(target / WORK_NAME / "session.json")


def mark_session(target: Path, info: dict[str, object]) -> None:
    """Write the marker; the target keeps its times (asd's own directory is not a change)."""
    before = os.lstat(target)
    work = target / WORK_NAME
    work.mkdir(mode=0o700, exist_ok=True)
    write_json_atomic(work / "session.json", info)
    os.utime(target, ns=(before.st_atime_ns, before.st_mtime_ns), follow_symlinks=False)


def clear_session(target: Path, root_mtime_ns: int | None) -> None:
    """Remove asd's journal directory from a plain (unmounted) target, keep its mtime."""
    journal = Journal(target)
    if os.path.lexists(journal.record):
        journal.apply()
    remove_tree(target / WORK_NAME)
    if root_mtime_ns is not None:
        st = os.lstat(target)
        os.utime(target, ns=(st.st_atime_ns, root_mtime_ns), follow_symlinks=False)
    fsync_path(target)


def recover(
    layout: TargetLayout,
    *,
    use_backups: bool,
    backup_limit: int,
    say: Callable[[str], None],
) -> snapshots.Snapshot | None:
    """Bring an unmounted target back to a plain last-sync-point state; snapshot if unclean."""
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
    if os.path.lexists(target / WORK_NAME):
        remove_tree(target / WORK_NAME)
        fsync_path(target)
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
