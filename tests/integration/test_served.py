"""A target whose RAM copy asd took down other than by a clean unsync: the unsync stopped
after the target's unmount, somebody unmounted it by hand, or a sync failed after it served
the target for a while. Whatever a program wrote to it is on disk once it is gone."""

from __future__ import annotations

import sys

import pytest

from tests.integration.conftest import World
from tests.integration.manifest import manifest
from tests.integration.test_lifecycle import inside_manifest
from tests.integration.test_tracker import held_at, target_with_tree, unsync_with_a_late_write


@pytest.mark.parametrize("then", ["unsync", "sync"])
def test_a_failed_look_after_the_unmount_loses_nothing(world: World, then: str) -> None:
    """The look after the unmount fails (rsync broken): unsync fails and keeps the RAM copy;
    the next unsync, or a sync, writes it back before taking it down."""
    target = target_with_tree(world)
    world.asd("sync", check=True)
    code, err = unsync_with_a_late_write(world, target, rsync_fails=True)
    assert code != 0 and "rsync" in err, err
    assert not (target / "base" / "late").exists(), "the late write reached the disk anyway"
    again = world.asd(then, check=True)
    if then == "sync":
        assert "base/late" in inside_manifest(world, target), "the sync lost the late write"
        world.asd("unsync", check=True)
    assert (target / "base" / "late").read_text() == "late\n"
    assert (target / "base" / "edit").read_text() == "v1\nv3\n"
    assert "writing its RAM copy back first" in again.stderr


def test_a_target_unmounted_by_hand_is_written_back_first(world: World) -> None:
    """Somebody unmounts the target's bind mount: unsync writes the RAM copy back, then
    takes it down."""
    target = target_with_tree(world)
    world.asd("sync", check=True)
    world.sh(f"echo by-hand > {target}/base/hand")
    in_ram = inside_manifest(world, target)
    world.sh(f"umount {target}")
    done = world.asd("unsync", check=True)
    assert (target / "base" / "hand").read_text() == "by-hand\n"
    assert manifest(target) == in_ram
    assert "writing its RAM copy back first" in done.stderr


def test_a_sync_that_fails_later_writes_back_what_it_served(copy_world: World) -> None:
    """Two targets: the first is served, then the bind mount of the second fails (strace
    holds it 3 s, then makes it fail with EPERM; meanwhile a program writes to the first).
    The sync undoes both, the write on disk."""
    world = copy_world
    first = target_with_tree(world)
    second = world.target("second")
    (second / "f").write_text("f\n")
    world.write_conf(first, second)
    trace = world.base / "bind.trace"
    fail = (
        "strace", "-o", str(trace), "-P", str(second), "-e", "trace=move_mount",
        "-e", "inject=move_mount:error=EPERM:delay_enter=3000000:when=1",
    )  # fmt: skip
    syncing = world.spawn([*fail, sys.executable, "-m", "asd", "-c", str(world.conf), "sync"])
    held_at(trace, "move_mount", syncing)
    assert world.mounted_at(first) > 0, "the first target is not served while the second binds"
    world.sh(f"echo meanwhile > {first}/base/meanwhile")
    assert syncing.wait(timeout=120) != 0
    assert world.asd_mounts() == [], "the failed sync left mounts"
    assert (first / "base" / "meanwhile").read_text() == "meanwhile\n"
