"""Crash at every point of the operations the power-cut tier does not cover, and of recovery.

A crash point is the Nth call of one of `SYSCALLS` (renames, unlinks, mkdirs, fsyncs, mounts,
time/mode/owner/xattr changes) made by the asd process; strace kills it with SIGKILL as the
call is entered, then the whole namespace dies (mounts and RAM gone) and a fresh one boots.
Children (rsync, tar, zstd) die with the namespace; their own system calls are not crash
points (what they write goes to a stage or a temporary name that asd discards).

- resync with type changes (file↔directory, symlink→directory): the roll-forward of a commit
  record must be idempotent when the same name is deleted and recreated;
- recovery itself: a first crash during resync, then a second crash at every point of the
  recovery `asd sync` — a third boot must still come back to one sync point;
- clean and restore.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import CHANGES, populate
from tests.integration.manifest import asd_left, differences, manifest
from tests.integration.test_lifecycle import inside_manifest
from tests.integration.test_power_cut import count_points, crash_at, no_litter, snapshots_of
from tests.reliability.conftest import FULL, World, record, sample

Point = tuple[str, int]
Manifest = dict[str, Any]

# Type changes, the case where one name is both deleted and written by one commit record,
# and an append to a large file, patched in place in either mode (asd.patch).
TYPE_CHANGES = r"""
set -e
cd "$1"
rm -r docs/deep && echo "a file now" > docs/deep
rm sparse.img && mkdir sparse.img && echo inside > sparse.img/f
rm -r rel-link && ln -s docs rel-link
rm dangling && mkdir -p dangling/sub && echo deeper > dangling/sub/g
echo "and another line" >> app.log
"""


def fresh_target(world: World) -> Path:
    if world.holder is not None:
        world.power_cut()
    for snap in snapshots_of(world.disk / "t"):
        snap.unlink()
    for p in world.disk.iterdir():
        shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    target = world.disk / "t"
    target.mkdir()
    populate(target)
    world.write_conf(target)
    world.boot()
    return target


def two_sync_points(world: World, *, extra: str = TYPE_CHANGES) -> tuple[Manifest, Manifest]:
    """Synced; sync point A on disk; RAM holds B (CHANGES, resync, then ``extra``)."""
    target = world.disk / "t"
    world.asd("sync", check=True)
    world.run(["sh", "-c", CHANGES, "changes", str(target)], check=True)
    world.asd("resync", check=True)
    before = manifest(target)
    world.run(["sh", "-c", extra, "changes", str(target)], check=True)
    return before, inside_manifest(world, target)


def boot_and_recover(world: World, target: Path, point: object, expect: list[Manifest]) -> None:
    world.boot()
    rec = world.asd("sync")
    assert rec.returncode == 0, f"recovery after a crash at {point} failed: {rec.stderr}"
    on_disk = manifest(target)
    nearest: list[str] = min((differences(e, on_disk)[:4] for e in expect), key=len)
    assert on_disk in expect, f"crash at {point} left no sync point: {'; '.join(nearest)}"
    assert not [p for p in os.listdir(target.parent) if p.endswith(".partial")]
    world.asd("unsync", check=True)
    assert manifest(target) == on_disk
    no_litter(target)


def test_crash_during_resync_with_type_changes(world: World) -> None:
    target = fresh_target(world)
    two_sync_points(world)
    points = count_points(world, "resync")
    chosen = sample(list(points), 3)
    for point in chosen:
        target = fresh_target(world)
        before, after = two_sync_points(world)
        crash_at(world, point, "resync")  # type: ignore[arg-type]
        world.power_cut()
        boot_and_recover(world, target, point, [before, after])
    mode = "overlay" if world.overlay else "copy"
    record("crash points", f"resync with type changes ({mode})", [len(points), len(chosen)])


def test_asd_killed_during_unsync_then_unsync_again(world: World) -> None:
    """asd dies at a point of unsync but the machine does not: its mounts and RAM copies
    stay. The next unsync writes back whatever a target still shows or served (`retire`)
    and takes everything down: the disk holds what programs saw, and nothing is left."""
    target = fresh_target(world)
    world.asd("sync", check=True)
    world.run(["sh", "-c", CHANGES, "changes", str(target)], check=True)
    points = count_points(world, "unsync")
    chosen = sample(list(points), 4)
    for point in chosen:
        target = fresh_target(world)
        world.asd("sync", check=True)
        world.run(["sh", "-c", CHANGES, "changes", str(target)], check=True)
        shown = inside_manifest(world, target)
        crash_at(world, point, "unsync")  # type: ignore[arg-type]
        again = world.asd("unsync")
        assert again.returncode == 0, f"unsync after a kill at {point}: {again.stderr}"
        assert manifest(target) == shown, f"kill at {point}: {differences(shown, manifest(target))}"
        assert world.asd_mounts() == [], f"kill at {point} left mounts"
        no_litter(target)
    mode = "overlay" if world.overlay else "copy"
    record(
        "crash points",
        f"asd killed during unsync, mounts kept ({mode})",
        [len(points), len(chosen)],
    )


@pytest.mark.parametrize("then", ["sync", "unsync"])
def test_asd_killed_during_sync_then_again(world: World, then: str) -> None:
    """asd dies at a point of sync, the machine does not. The next sync finishes the job
    (the target then shows the disk copy), or the next unsync takes down what was done; the
    disk copy is the same throughout and nothing is left after an unsync."""
    fresh_target(world)
    points = count_points(world, "sync")
    world.asd("unsync", check=True)
    chosen = sample(list(points), 3)
    for point in chosen:
        target = fresh_target(world)
        on_disk = manifest(target)
        crash_at(world, point, "sync")  # type: ignore[arg-type]
        again = world.asd(then)
        if "no run state" in again.stderr:  # killed before it recorded anything
            assert then == "unsync" and world.asd_mounts() == [], again.stderr
        else:
            assert again.returncode == 0, f"{then} after a kill at {point}: {again.stderr}"
        if then == "sync":
            assert inside_manifest(world, target) == on_disk, f"kill at {point}: not shown"
            world.asd("unsync", check=True)
        assert manifest(target) == on_disk, (
            f"kill at {point}: {differences(on_disk, manifest(target))}"
        )
        assert world.asd_mounts() == [], f"kill at {point} left mounts"
        no_litter(target)
    mode = "overlay" if world.overlay else "copy"
    record(
        "crash points", f"asd killed during sync, then {then} ({mode})", [len(points), len(chosen)]
    )


def save(world: World) -> Path:
    saved = world.base / "saved"
    shutil.rmtree(saved, ignore_errors=True)
    subprocess.run(["cp", "-a", "--sparse=always", str(world.disk), str(saved)], check=True)
    return saved


def load(world: World, saved: Path) -> None:
    shutil.rmtree(world.disk)
    subprocess.run(["cp", "-a", "--sparse=always", str(saved), str(world.disk)], check=True)


def first_crash_states(world: World, points: list[Point]) -> list[tuple[Point, str]]:
    """Which state a first crash at each point leaves on disk (the recovery's work)."""
    kinds = []
    for point in points:
        fresh_target(world)
        two_sync_points(world)
        crash_at(world, point, "resync")
        world.power_cut()
        work = world.disk / "t" / ".asd-work"
        kind = (
            "commit record pending"
            if (work / "commit.json").exists()
            else "uncommitted stage"
            if (work / "stage").exists()
            else "open session"
        )
        kinds.append((point, kind))
    return kinds


def test_second_crash_during_recovery(world: World) -> None:
    """Crash in resync, boot, crash again at every point of the recovering `asd sync`."""
    target = fresh_target(world)
    two_sync_points(world)
    resync_points = count_points(world, "resync")
    # First crashes: spread over resync, and always one with a commit record pending (the
    # roll-forward is the recovery that does the most) and one with only a stage.
    by_kind: dict[str, list[Point]] = {}
    for point, kind in first_crash_states(world, sample(list(resync_points), 12 if FULL else 3)):  # type: ignore[arg-type]
        by_kind.setdefault(kind, []).append(point)
    firsts = [(pts[len(pts) // 2], kind) for kind, pts in sorted(by_kind.items())]
    total_second = run_second = 0
    for first, kind in firsts:
        target = fresh_target(world)
        before, after = two_sync_points(world)
        crash_at(world, first, "resync")
        world.power_cut()
        saved = save(world)
        world.boot()
        second_points = count_points(world, "sync")
        world.power_cut()
        chosen = sample(list(second_points), 30 if FULL else 2)
        for second in chosen:
            if world.holder is not None:
                world.power_cut()
            load(world, saved)
            world.boot()
            crash_at(world, second, "sync")  # type: ignore[arg-type]
            world.power_cut()
            boot_and_recover(world, target, (first, kind, second), [before, after])
            snaps = snapshots_of(target)
            assert 1 <= len(snaps) <= 2, f"after crashes at {first} and {second}: {snaps}"
        total_second += len(second_points)
        run_second += len(chosen)
    mode = "overlay" if world.overlay else "copy"
    record(
        "crash points",
        f"recovery sync after a crash in resync ({mode})",
        {"first crashes": [f"{sc}#{n}: {k}" for (sc, n), k in firsts]}
        | {"second crash points": total_second, "run": run_second},
    )


def test_crash_after_recovery_dropped_the_journal(world: World) -> None:
    """The one window the full run found: recovery after a power cut has removed the journal
    directory (and with it the session marker) but not yet the empty mount point beside the
    target; the next start must give the target its last sync point's times, not the
    session start's the mount point was made with. Crash at recovery's rmdir of the mount
    point: its second in copy mode (after the journal directory's), its first in overlay
    mode, which keeps the journal directory for the lower tree."""
    target = fresh_target(world)
    world.asd("sync", check=True)
    world.sh(f"touch {target}/new-at-top && echo changed > {target}/docs/a.txt")
    world.asd("resync", check=True)
    synced = manifest(target)  # the target's own mtime moved with the new entry
    world.power_cut()
    world.boot()
    crash_at(world, ("rmdir", 1 if world.overlay else 2), "sync")
    world.power_cut()
    backup = target.parent / ".t-backup_asd"
    assert asd_left(target) == [] and backup.is_dir(), "not the window meant"
    boot_and_recover(world, target, "recovery's rmdir of the mount point", [synced])


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def stopped_with_snapshots(world: World, count: int) -> tuple[Path, dict[str, str]]:
    """asd stopped cleanly, ``count`` snapshots of the target beside it (crash, boot, sync)."""
    target = fresh_target(world)
    for i in range(count):
        world.asd("sync", check=True)
        world.sh(f"echo round {i} > {target}/docs/a.txt")
        world.asd("resync", check=True)
        world.power_cut()
        world.boot()
    world.asd("sync", check=True)
    world.asd("unsync", check=True)
    snaps = snapshots_of(target)
    assert len(snaps) == count
    return target, {s.name: digest(s) for s in snaps}


@pytest.mark.overlay_in_full  # clean does not depend on the mode
def test_crash_during_clean(world: World) -> None:
    target, snaps = stopped_with_snapshots(world, 3)
    points = count_points(world, "clean")
    chosen = sample(list(points), 2)
    disk = None
    for point in chosen:
        target, snaps = stopped_with_snapshots(world, 3)
        disk = manifest(target)
        crash_at(world, point, "clean")  # type: ignore[arg-type]
        world.power_cut()
        world.boot()
        left = {s.name: digest(s) for s in snapshots_of(target)}
        assert all(snaps[n] == d for n, d in left.items()), f"crash at {point}: a snapshot torn"
        assert manifest(target) == disk
        again = world.asd("clean", check=True)
        assert all(n in again.stdout for n in left)
        assert snapshots_of(target) == []
        assert not [p for p in os.listdir(target.parent) if "crashrecovery" in p]
    record(
        "crash points",
        f"clean ({'overlay' if world.overlay else 'copy'})",
        [len(points), len(chosen)],
    )


@pytest.mark.overlay_in_full  # restore does not depend on the mode
def test_crash_during_restore(world: World) -> None:
    """Whatever point restore dies at, the previous contents are kept whole somewhere, and
    running `asd restore` again brings the snapshot back exactly."""

    def prepared() -> tuple[Path, Manifest, Manifest]:
        target = fresh_target(world)
        v1 = manifest(target)
        world.asd("sync", check=True)
        world.power_cut()
        world.boot()
        world.asd("sync", check=True)  # snapshot of v1
        world.run(["sh", "-c", CHANGES, "changes", str(target)], check=True)
        world.asd("unsync", check=True)
        return target, v1, manifest(target)

    prepared()
    points = count_points(world, "restore")
    chosen = sample(list(points), 3)
    kept: Callable[[Path, Manifest], bool] = lambda parent, m: any(  # noqa: E731
        manifest(p) == m for p in [parent / "t", *parent.glob("t-bad-*")] if p.is_dir()
    )
    for point in chosen:
        target, v1, v2 = prepared()
        crash_at(world, point, "restore")  # type: ignore[arg-type]
        world.power_cut()
        world.boot()
        assert kept(target.parent, v2), f"crash at {point}: the contents before restore are lost"
        again = world.asd("restore")
        assert again.returncode == 0, f"restore after a crash at {point}: {again.stderr}"
        assert manifest(target) == v1, differences(v1, manifest(target))[:5]
        assert kept(target.parent, v2)
        assert len(snapshots_of(target)) == 1, "restore must keep the snapshot"
    record(
        "crash points",
        f"restore ({'overlay' if world.overlay else 'copy'})",
        [len(points), len(chosen)],
    )
