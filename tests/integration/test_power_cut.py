"""Guarantees 2 and 3: kill asd at its state-changing system calls, cut the power, boot.

For each crash point — the Nth call of one of the syscalls below made by the asd process —
strace delivers SIGKILL as the call is entered; then every process of the namespace dies
(mounts and RAM gone) and a fresh namespace "boots" and runs `asd sync`. The disk copy must
then equal exactly one completed sync point, with no litter, and a snapshot of it must exist.

The suite runs a sample of the points of each operation; ASD_CRASH_POINTS=all runs every one
(`make reliability`). Limits: a kill is not a real power cut for the page cache — data the
kernel has accepted survives a namespace's death even without fsync.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.integration.conftest import CHANGES, World, populate
from tests.integration.manifest import asd_left, differences, manifest

SYSCALLS = (
    "rename",
    "renameat",
    "renameat2",
    "unlink",
    "unlinkat",
    "mkdir",
    "mkdirat",
    "rmdir",
    "fsync",
    "fdatasync",
    "syncfs",
    "mount",
    "umount2",
    "utimensat",
    "fchmodat",
    "fchownat",
    "setxattr",
    # overlay mode's RAM give-back (asd.shrink): the delta's links and whiteouts, the attach
    "linkat",
    "mknodat",
    "move_mount",
    # the bind mounts by descriptor (asd.mountapi.bind): attach, then private propagation
    "mount_setattr",
)


def points_wanted() -> int | None:
    value = os.environ.get("ASD_CRASH_POINTS", "10")
    return None if value == "all" else int(value)


def count_points(world: World, *args: str) -> list[tuple[str, int]]:
    trace = world.base / "trace"
    world.run(
        [
            "strace",
            "-o",
            str(trace),
            "-e",
            f"trace={','.join(SYSCALLS)}",
            sys.executable,
            "-m",
            "asd",
            "-c",
            str(world.conf),
            *args,
        ],
        check=True,
    )
    counts: dict[str, int] = {}
    for line in trace.read_text(errors="replace").splitlines():
        m = re.match(r"(\w+)\(", line)
        if m and m.group(1) in SYSCALLS:
            counts[m.group(1)] = counts.get(m.group(1), 0) + 1
    trace.unlink()
    return [(sc, n) for sc, total in sorted(counts.items()) for n in range(1, total + 1)]


def sample(points: list[tuple[str, int]]) -> list[tuple[str, int]]:
    wanted = points_wanted()
    if wanted is None or len(points) <= wanted:
        return points
    step = len(points) / wanted
    return [points[int(i * step)] for i in range(wanted)]


def crash_at(world: World, point: tuple[str, int], *args: str) -> int:
    sc, n = point
    proc = world.run(
        [
            "strace",
            "-o",
            "/dev/null",
            "-e",
            f"trace={sc}",
            "-e",
            f"inject={sc}:signal=KILL:when={n}",
            sys.executable,
            "-m",
            "asd",
            "-c",
            str(world.conf),
            *args,
        ]
    )
    return proc.returncode


def no_litter(target: Path) -> None:
    parent = target.parent
    names = os.listdir(parent)
    assert asd_left(target) == [], "asd's journal left in the target"
    assert not [n for n in names if n.endswith("-backup_asd")], f"backup dir left: {names}"
    assert not [n for n in names if ".partial" in n or n.endswith(".tmp")], names


def snapshots_of(target: Path) -> list[Path]:
    return sorted(target.parent.glob(f".{target.name}-backup_asd-crashrecovery-*.tar.zstd"))


Setup = Callable[[World, Path], tuple[dict[str, object], dict[str, object]]]


def run_scenario(world: World, operation: tuple[str, ...], setup: Setup) -> int:
    """Enumerate crash points of ``operation`` after ``setup``; check every sampled one."""
    target = world.disk / "t"
    world.write_conf(target)

    def fresh() -> tuple[dict[str, object], dict[str, object]]:
        if world.holder is not None:
            world.power_cut()
        for snap in snapshots_of(target):
            snap.unlink()
        if target.exists():
            import shutil

            shutil.rmtree(target)
        target.mkdir()
        populate(target)
        world.boot()
        return setup(world, target)

    fresh()
    every = count_points(world, *operation)
    points = sample(every)
    assert points, "no crash points found"
    for point in points:
        before, after = fresh()
        rc = crash_at(world, point, *operation)
        world.power_cut()
        # The disk as a booting machine finds it: is an asd session still open on it?
        session_open = (target / ".asd-work" / "session.json").exists()
        world.boot()
        rec = world.asd("sync")
        assert rec.returncode == 0, f"recovery after a crash at {point} failed: {rec.stderr}"
        on_disk = manifest(target)
        assert on_disk in (before, after), (
            f"crash at {point} (exit {rc}) left a disk copy that is neither sync point: "
            f"{differences(before, on_disk)[:5]}"
        )
        snaps = snapshots_of(target)
        # A crash inside an open session leaves exactly one snapshot; before the session
        # marker is durable (early in sync) or after it is gone (late in unsync), none.
        assert len(snaps) == int(session_open), f"crash at {point}: snapshots {snaps}"
        assert all(stat.S_IMODE(os.stat(s).st_mode) == 0o600 for s in snaps)
        world.asd("unsync", check=True)
        assert manifest(target) == on_disk
        no_litter(target)
    mode = "overlay" if world.overlay else "copy"
    print(f"power cut: {' '.join(operation)} ({mode}): {len(points)} of {len(every)} points passed")
    return len(points)


def synced_and_changed(world: World, target: Path) -> tuple[dict[str, object], dict[str, object]]:
    world.asd("sync", check=True)
    manifest(target)
    world.run(["sh", "-c", CHANGES, "changes", str(target)], check=True)
    world.asd("resync", check=True)
    after = manifest(target)
    # Put the disk back at `before` only logically: make RAM hold `after` again on top of
    # a fresh sync point `before`? Simpler: take `after` as the new base and change again.
    world.run(
        [
            "sh",
            "-c",
            'echo second > "$1/docs/a.txt"; rm -r "$1/new"; '
            'mkdir "$1/third"; echo 3 > "$1/third/f"',
            "x",
            str(target),
        ],
        check=True,
    )
    return after, _ram_manifest(world, target)


def _ram_manifest(world: World, target: Path) -> dict[str, object]:
    from tests.integration.test_lifecycle import inside_manifest

    return inside_manifest(world, target)


def test_crash_during_resync(world: World) -> None:
    assert run_scenario(world, ("resync",), synced_and_changed) > 0


def synced_changed_and_large(
    world: World, target: Path
) -> tuple[dict[str, object], dict[str, object]]:
    """As `synced_and_changed`, with 2 MB more in RAM: overlay mode's resync then gives
    the upper layer's RAM back (asd.shrink) after its commit."""
    before, _after = synced_and_changed(world, target)
    world.run(["sh", "-c", 'head -c 2000000 /dev/urandom > "$1/large.bin"', "x", str(target)])
    return before, _ram_manifest(world, target)


def test_crash_during_resync_that_gives_ram_back(overlay_world: World) -> None:
    world = overlay_world
    target = world.disk / "t"
    world.write_conf(target)
    target.mkdir()
    populate(target)
    synced_changed_and_large(world, target)
    every = count_points(world, "resync")
    assert ("umount2", 1) in every and ("move_mount", 1) in every, "no switch was traced"
    world.power_cut()
    shutil.rmtree(target)
    world.boot()
    assert run_scenario(world, ("resync",), synced_changed_and_large) > 0


def test_crash_during_sync(world: World) -> None:
    def plain(world: World, target: Path) -> tuple[dict[str, object], dict[str, object]]:
        m = manifest(target)
        return m, m

    assert run_scenario(world, ("sync",), plain) > 0


def stopped_with_a_spare(world: World, target: Path) -> tuple[dict[str, object], dict[str, object]]:
    """A session whose resyncs gave RAM back, stopped cleanly: its last delta is kept as the
    lower tree's spare (asd.lower); then a file is renamed while asd is stopped, so the next
    sync both moves spare links into the tree and removes one that no longer fits."""
    synced_changed_and_large(world, target)
    world.asd("resync", check=True)
    world.asd("unsync", check=True)
    assert (target / ".asd-work" / "spare").is_dir(), "no delta was kept"
    os.rename(target / "large.bin", target / "large-renamed.bin")
    m = manifest(target)
    return m, m


def test_crash_during_sync_that_moves_spare_links(overlay_world: World) -> None:
    assert run_scenario(overlay_world, ("sync",), stopped_with_a_spare) > 0


def test_crash_during_unsync(world: World) -> None:
    assert run_scenario(world, ("unsync",), synced_and_changed) > 0


@pytest.mark.parametrize("use_backups", ["yes", "no"])
def test_unclean_stop_snapshot_and_rotation(copy_world: World, use_backups: str) -> None:
    world = copy_world
    target = world.target("t")
    (target / "f").write_text("v1\n")
    world.write_conf(target, extra=f'USE_BACKUPS="{use_backups}"\nBACKUP_LIMIT=2\n')
    os.umask(0)
    try:
        for i in range(3):
            world.asd("sync", check=True)
            world.sh(f"echo v{i + 2} > {target}/f")
            world.asd("resync", check=True)
            world.power_cut()
            world.boot()
        out = world.asd("sync", check=True)
    finally:
        os.umask(0o022)
    snaps = snapshots_of(target)
    if use_backups == "no":
        assert snaps == []
        return
    assert "not stopped cleanly" in out.stdout
    assert len(snaps) == 2, "BACKUP_LIMIT=2 must keep the two newest"
    assert all(stat.S_IMODE(os.stat(s).st_mode) == 0o600 for s in snaps)
    # Newest as asd orders them: two snapshots taken in the same second are told apart by a
    # suffix, which sorts before the plain name.
    from asd.snapshots import list_snapshots

    newest = list_snapshots(target)[0].path
    listing = world.run(["tar", "--zstd", "-xOf", str(newest), "./f"], check=True).stdout
    assert listing == "v4\n", "the newest snapshot must hold the last sync point"
    cleaned = world.asd("clean", check=True)
    assert all(str(s) in cleaned.stdout for s in snaps)
    assert snapshots_of(target) == []
