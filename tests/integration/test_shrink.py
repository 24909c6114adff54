"""Overlay mode gives its RAM back after a resync (asd.shrink), and the target never notices.

Observable from outside the namespace: the disk copy after each resync and after unsync.
From inside: the target's full state (manifest) across the switch, the RAM the upper layers
hold, the mount table, and `asd parse`. A file held open defers the switch; a power cut after
it leaves the disk copy of the last resync and nothing of asd.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.conftest import World, populate
from tests.integration.manifest import asd_left, manifest
from tests.integration.test_lifecycle import inside_manifest

MIB = 1024 * 1024

CHANGES = r"""
set -e
cd "$1"
head -c 3200000 /dev/urandom > "big-$2.bin"
echo "$2" >> docs/a.txt
rm -f docs/b.txt
mkdir -p "new dir/deeper"
echo "$2" > "new dir/deeper/file"
if [ -d sub ]; then mv sub sub-renamed; fi
chmod 0750 docs
"""


def upper_bytes(world: World) -> int:
    """RAM the overlay's upper layers hold, from inside the namespace."""
    code = (
        "import re; from pathlib import Path; from asd.tree import disk_usage; "
        f"roots = Path({str(world.volatile)!r}).glob('asd-root*/.overlay'); "
        "layers = [p for r in roots for p in r.rglob('upper*') "
        "if re.fullmatch(r'upper(\\.[0-9]+)?', p.name) "
        "and (p.parent / p.name.replace('upper', 'work')).is_dir()]; "
        "print(sum(disk_usage(p) for p in layers))"
    )
    return int(world.run([sys.executable, "-c", code], check=True).stdout)


def synced_and_changed(world: World) -> Path:
    """A target synced in overlay mode, with CHANGES made in RAM (more than 3 MiB)."""
    target = world.target("srv/t")
    populate(target)
    world.write_conf(target)
    world.asd("sync", check=True)
    world.run(["sh", "-c", CHANGES, "changes", str(target), "one"], check=True)
    return target


def wait_until_open(world: World, pid: int) -> None:
    """Until the process ``pid`` (in the namespace) has its file descriptor 3 open."""
    deadline = time.monotonic() + 10
    while "3 ->" not in world.sh(f"ls -l /proc/{pid}/fd || true").stdout:
        assert time.monotonic() < deadline
        time.sleep(0.05)


def parse_json(world: World) -> dict[str, object]:
    doc: dict[str, object] = json.loads(world.asd("parse", "--json", check=True).stdout)
    return doc


def test_resync_gives_the_upper_layer_back_and_the_view_never_changes(
    overlay_world: World,
) -> None:
    world = overlay_world
    target = world.target("srv/t")
    populate(target)
    world.write_conf(target)
    world.asd("sync", check=True)
    for n in ("one", "two", "three"):
        world.run(["sh", "-c", CHANGES, "changes", str(target), n], check=True)
        before = inside_manifest(world, target)
        assert upper_bytes(world) >= 3 * MIB
        out = world.asd("resync", check=True).stdout
        assert "of RAM back" in out, out
        assert inside_manifest(world, target) == before, f"resync {n}: the view changed"
        assert manifest(target) == before, f"resync {n}: the disk copy is not the view"
        # What stays: docs/a.txt, appended at every resync, is kept for patching in place.
        assert upper_bytes(world) < 64 * 1024, f"resync {n}: the RAM was not given back"
        stacked = [m for m in world.asd_mounts() if "asd-overlay" in m]
        assert len(stacked) == 2, stacked  # the overlay at the RAM path and its bind
        idle = world.asd("resync", check=True).stdout
        assert "nothing changed" in idle, f"resync {n}: the switch left work for the next: {idle}"
    # Unchanged since the last switch, then changed again through the new layer.
    world.sh(f"echo after >> '{target}/docs/a.txt' && rm '{target}/new dir/deeper/file'")
    final = inside_manifest(world, target)
    world.asd("unsync", check=True)
    assert manifest(target) == final
    assert world.asd_mounts() == []
    assert asd_left(target) == []


def test_a_file_held_open_defers_and_parse_says_so(overlay_world: World) -> None:
    world = overlay_world
    target = synced_and_changed(world)
    holder = world.spawn(["sh", "-c", f"exec 3>>'{target}/docs/a.txt'; exec sleep 300"])
    try:
        wait_until_open(world, holder.pid)
        out = world.asd("resync", check=True).stdout
        assert "not given back yet" in out and "in use" in out, out
        view = inside_manifest(world, target)
        assert manifest(target) == view  # the resync itself was done
        assert upper_bytes(world) >= 3 * MIB
        doc = parse_json(world)
        said = doc["targets"][0]["ram_given_back"]  # type: ignore[index]
        assert "in use" in str(said), said
    finally:
        os.killpg(holder.pid, 9)
        holder.wait()
    out = world.asd("resync", check=True).stdout
    assert "of RAM back" in out, out
    assert upper_bytes(world) < 64 * 1024
    assert inside_manifest(world, target) == view
    world.asd("unsync", check=True)
    assert manifest(target) == view


def test_a_power_cut_after_a_switch_leaves_the_last_resync_on_disk(
    overlay_world: World,
) -> None:
    world = overlay_world
    target = synced_and_changed(world)
    world.asd("resync", check=True)
    synced = inside_manifest(world, target)
    world.sh(f"echo lost >> '{target}/docs/a.txt'")  # in RAM only: the power cut takes it
    world.power_cut()
    assert manifest(target) == synced
    world.boot()
    world.asd("sync", check=True)
    assert inside_manifest(world, target) == synced
    world.asd("unsync", check=True)
    assert manifest(target) == synced
    leftovers = [p.name for p in Path(target).iterdir() if p.name.startswith(".asd")]
    assert leftovers == [".asd-work"] and asd_left(target) == []  # the lower tree is kept


WINDOW = r"""
import os, runpy, sys
from collections.abc import Iterator
from pathlib import Path
from asd import shrink
target, conf = Path(sys.argv[1]), sys.argv[2]
unmount = shrink._unmount_when_free

def written_meanwhile(path):
    # Between the resync's walk and the switch, with the next overlay already attached
    # beneath: a program writes to the old one.
    (target / "window.txt").write_text("written in the window\n")
    with open(target / "docs" / "a.txt", "a") as fh:
        fh.write("appended in the window\n")
    os.unlink(target / "name with spaces")
    os.mkdir(target / "window-dir")
    return unmount(path)

shrink._unmount_when_free = written_meanwhile
sys.argv = ["asd", "-c", conf, "resync"]
runpy.run_module("asd", run_name="__main__")
"""


def test_what_is_written_during_the_switch_reaches_the_new_layer(overlay_world: World) -> None:
    world = overlay_world
    target = world.target("srv/t")
    populate(target)
    world.write_conf(target)
    world.asd("sync", check=True)
    # A first switch, so that docs/a.txt, appended to again, is kept in the next upper layer
    # (changed at two resyncs in a row): a window write to a kept file is carried over too.
    world.run(["sh", "-c", CHANGES, "changes", str(target), "zero"], check=True)
    world.asd("resync", check=True)
    world.run(["sh", "-c", CHANGES, "changes", str(target), "one"], check=True)
    proc = world.run([sys.executable, "-c", WINDOW, str(target), str(world.conf)], check=True)
    assert "of RAM back" in proc.stdout, proc.stdout + proc.stderr
    view = inside_manifest(world, target)
    assert view["window.txt"]["data"] == b"written in the window\n"  # type: ignore[index]
    assert view["docs/a.txt"]["data"].endswith(b"appended in the window\n")  # type: ignore[index]
    assert "name with spaces" not in view and "window-dir" in view
    assert view["."]["mtime_ns"] != manifest(target)["."]["mtime_ns"]  # type: ignore[index]
    # Not on disk yet (it was written after the resync's walk), but the next resync takes it.
    assert "window.txt" not in manifest(target)
    assert "big-one.bin" in manifest(target)
    world.asd("resync", check=True)
    assert manifest(target) == view
    world.asd("unsync", check=True)
    assert manifest(target) == view


SWAPPED_LAYERS = r"""
import os, runpy, sys
from pathlib import Path
from asd import mountapi
backup, elsewhere, conf = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
overlay = mountapi.overlay

def swapped_meanwhile(lowers, upper, work, options):
    # The target's owner renames .asd-work and puts a symlink to a directory holding the
    # same names in its place as asd gives the next layer's lowers by path, and puts the
    # names back right after: only the layer the kernel took can tell.
    os.rename(backup / ".asd-work", backup / ".asd-work.moved")
    os.symlink(elsewhere, backup / ".asd-work")
    try:
        return overlay(lowers, upper, work, options)
    finally:
        os.unlink(backup / ".asd-work")
        os.rename(backup / ".asd-work.moved", backup / ".asd-work")

mountapi.overlay = swapped_meanwhile
sys.argv = ["asd", "-c", conf, "resync"]
runpy.run_module("asd", run_name="__main__")
"""


def test_a_journal_swapped_as_the_next_layer_is_made_keeps_the_ram(overlay_world: World) -> None:
    world = overlay_world
    target = synced_and_changed(world)
    elsewhere = world.base / "elsewhere"
    for name in ("delta.1", "lower"):
        (elsewhere / name).mkdir(parents=True)
        (elsewhere / name / "planted").write_text("not asd's\n")
    planted = manifest(elsewhere)
    before = world.asd_mounts()
    backup = target.parent / ".t-backup_asd"
    argv = [sys.executable, "-c", SWAPPED_LAYERS, str(backup), str(elsewhere), str(world.conf)]
    proc = world.run(argv)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "was replaced while asd made the next RAM layer" in proc.stderr, proc.stderr
    view = inside_manifest(world, target)
    assert "planted" not in view
    on_disk = manifest(target)
    # The owner's renames moved the disk copy's mtime behind asd's back: the root's times are
    # not compared.
    on_disk.pop("."), view.pop(".")
    assert on_disk == view, "the resync's write-back was not done"
    assert world.asd_mounts() == before and upper_bytes(world) >= 3 * MIB
    assert manifest(elsewhere) == planted
    assert not [p for p in (target / ".asd-work").iterdir() if p.name.startswith("delta")]
    world.asd("resync", check=True)  # the next one gives the RAM back
    view = inside_manifest(world, target)
    assert upper_bytes(world) < 64 * 1024 and "planted" not in view
    world.asd("unsync", check=True)
    on_disk = manifest(target)
    on_disk.pop("."), view.pop(".")
    assert on_disk == view


OLD_KERNEL = r"""
import errno, runpy, sys
from asd import mountapi
where = sys.argv[2]

def refused(*args, **kwargs):
    raise mountapi.MountCallError(errno.EINVAL, "move_mount: Invalid argument")

setattr(mountapi, where, refused)
sys.argv = ["asd", "-c", sys.argv[1], "resync"]
runpy.run_module("asd", run_name="__main__")
"""


@pytest.mark.parametrize("call", ["overlay", "attach"])
def test_a_kernel_that_cannot_switch_keeps_the_ram_and_nothing_else(
    overlay_world: World, call: str
) -> None:
    world = overlay_world
    target = synced_and_changed(world)
    before = world.asd_mounts()
    proc = world.run([sys.executable, "-c", OLD_KERNEL, str(world.conf), call], check=True)
    assert "of RAM kept" in proc.stdout and "Linux 6.8" in proc.stdout, proc.stdout
    view = inside_manifest(world, target)
    assert manifest(target) == view  # the resync itself was done
    assert world.asd_mounts() == before
    assert upper_bytes(world) >= 3 * MIB
    assert not any(p.name.startswith("delta") for p in (target / ".asd-work").iterdir())
    world.asd("unsync", check=True)
    assert manifest(target) == view


INTERRUPTED = r"""
import os, runpy, sys
from asd import mountapi, shrink
conf, point = sys.argv[1], sys.argv[2]
calls = {"attach": 0, "remove": 0}

def die(*args, **kwargs):
    os._exit(9)  # asd killed here: its mounts and RAM stay, as after a SIGKILL

if point == "recorded":  # the switch is in the run state, nothing attached yet
    attach = mountapi.attach
    def first_attach_dies(fd, path, *, beneath=False):
        if beneath:
            die()
        return attach(fd, path, beneath=beneath)
    mountapi.attach = first_attach_dies
elif point == "attached":  # the next overlay waits beneath the old one
    shrink._unmount_when_free = die
elif point == "unmounted":  # the old one is out of sight; nothing carried over yet
    shrink.carry.carry_over = die
elif point == "indexed":  # the new sync point saved, the generation not yet
    shrink.write_json_atomic = die
elif point == "switched":  # all done but removing the old layer
    remove = shrink._remove_generation
    def second_remove_dies(layout):
        calls["remove"] += 1
        if calls["remove"] == 2:
            die()
        return remove(layout)
    shrink._remove_generation = second_remove_dies
sys.argv = ["asd", "-c", conf, "resync"]
runpy.run_module("asd", run_name="__main__")
"""


@pytest.mark.parametrize("then", ["resync", "unsync"])
@pytest.mark.parametrize("point", ["recorded", "attached", "unmounted", "indexed", "switched"])
def test_an_asd_killed_during_the_switch_is_finished_or_undone_by_the_next_run(
    overlay_world: World, point: str, then: str
) -> None:
    world = overlay_world
    target = synced_and_changed(world)
    view = inside_manifest(world, target)
    proc = world.run([sys.executable, "-c", INTERRUPTED, str(world.conf), point])
    assert proc.returncode == 9, proc.stdout + proc.stderr
    assert inside_manifest(world, target) == view, "the view changed when asd was killed"
    world.sh(f"echo 'after the kill' >> '{target}/docs/a.txt'")
    view = inside_manifest(world, target)
    if then == "resync":
        world.asd("resync", check=True)
        assert inside_manifest(world, target) == view
        assert manifest(target) == view
        assert upper_bytes(world) < 64 * 1024
        assert len([m for m in world.asd_mounts() if "asd-overlay" in m]) == 2
    world.asd("unsync", check=True)
    assert manifest(target) == view
    assert world.asd_mounts() == []
    assert asd_left(target) == []


RACED = r"""
import runpy, sys
from asd import shrink
shrink.holders = lambda paths: []  # a file is opened just after asd looked
sys.argv = ["asd", "-c", sys.argv[1], "resync"]
runpy.run_module("asd", run_name="__main__")
"""


@contextlib.contextmanager
def a_switch_left_waiting(world: World, target: Path) -> Iterator[None]:
    """A program opens docs/a.txt just after the resync looked for holders (`RACED`): the
    switch to the next RAM layer waits, its overlay attached beneath. The program is killed
    when the block ends."""
    holder = world.spawn(["sh", "-c", f"exec 3>>'{target}/docs/a.txt'; exec sleep 300"])
    try:
        wait_until_open(world, holder.pid)
        proc = world.run([sys.executable, "-c", RACED, str(world.conf)], check=True)
        assert "not given back yet" in proc.stdout, proc.stdout + proc.stderr
        assert len([m for m in world.asd_mounts() if "asd-overlay" in m]) == 3  # one waits
        yield
    finally:
        os.killpg(holder.pid, 9)
        holder.wait()


def test_a_file_opened_just_before_the_switch_leaves_it_pending(overlay_world: World) -> None:
    world = overlay_world
    target = synced_and_changed(world)
    with a_switch_left_waiting(world, target):
        world.sh(f"echo 'while pending' >> '{target}/docs/a.txt' && echo p > '{target}/pend'")
        view = inside_manifest(world, target)
        # Still held: the resync writes what the target shows, and the switch still waits.
        out = world.asd("resync", check=True)
        assert "not given back yet" in out.stdout + out.stderr
        assert manifest(target) == view
        said = parse_json(world)["targets"][0]["ram_given_back"]  # type: ignore[index]
        assert "in use" in str(said), said
    world.asd("resync", check=True)
    assert inside_manifest(world, target) == view
    assert manifest(target) == view
    assert upper_bytes(world) < 64 * 1024
    assert len([m for m in world.asd_mounts() if "asd-overlay" in m]) == 2
    world.asd("unsync", check=True)
    assert manifest(target) == view
    assert world.asd_mounts() == []


@pytest.mark.parametrize("then", ["unsync", "resync"])
def test_a_waiting_switch_uncovered_by_somebodys_umount_loses_nothing(
    overlay_world: World, then: str
) -> None:
    """A switch waits (a file was held); the holder goes, and somebody unmounts the target by
    hand: the new overlay waiting beneath now shows, and programs write into it. The next
    asd run finishes the switch first, so what they wrote is written back, not dropped with
    the layer asd takes down."""
    world = overlay_world
    target = synced_and_changed(world)
    with a_switch_left_waiting(world, target):
        pass
    assert len([m for m in world.asd_mounts() if "asd-overlay" in m]) == 3  # still waits
    world.sh(f"umount '{target}'")
    world.sh(
        f"echo 'into the layer beneath' > '{target}/uncovered' && echo x >> '{target}/app.log'"
    )
    view = inside_manifest(world, target)
    assert view["uncovered"]["data"] == b"into the layer beneath\n"  # type: ignore[index]
    assert "uncovered" not in manifest(target)
    world.asd(then, check=True)
    if then == "resync":
        assert manifest(target) == view
        assert inside_manifest(world, target) == view
        # The switch is done: what was written beneath is the new layer's (under 1 MiB, kept).
        assert len([m for m in world.asd_mounts() if "asd-overlay" in m]) == 2
        world.asd("unsync", check=True)
    assert manifest(target) == view
    assert world.asd_mounts() == []
    assert asd_left(target) == []


SWAPPED = r"""
import os, runpy, sys
from collections.abc import Iterator
from pathlib import Path
from asd import delta
backup, conf = Path(sys.argv[1]), sys.argv[2]
parent_at = delta.parent_at

def swapped_on_the_way(root_fd, parts, where):
    # "docs" was made in the delta as a directory; before asd looks into it for docs/a.txt,
    # the target's owner swaps it for a symlink out of the disk copy.
    if parts == ("docs", "a.txt") and where == backup:
        os.rename(backup / "docs", backup / "docs.real")
        os.symlink("/etc", backup / "docs")
    return parent_at(root_fd, parts, where)

delta.parent_at = swapped_on_the_way
sys.argv = ["asd", "-c", conf, "resync"]
runpy.run_module("asd", run_name="__main__")
"""


def test_a_directory_swapped_for_a_symlink_during_the_delta_is_refused(
    overlay_world: World,
) -> None:
    world = overlay_world
    target = world.target("srv/t")
    populate(target)
    world.write_conf(target)
    world.asd("sync", check=True)
    world.run(["sh", "-c", CHANGES, "changes", str(target), "one"], check=True)  # docs/a.txt
    backup = target.parent / ".t-backup_asd"
    before = world.asd_mounts()
    proc = world.run([sys.executable, "-c", SWAPPED, str(backup), str(world.conf)], check=True)
    assert "of RAM kept" in proc.stdout and "symlink" in proc.stdout, proc.stdout
    assert world.asd_mounts() == before
    work = target / ".asd-work"
    assert not [p for p in work.iterdir() if p.name.startswith("delta")]
    os.unlink(target / "docs")
    os.rename(target / "docs.real", target / "docs")
    view = inside_manifest(world, target)
    root_mtime = view["."]["mtime_ns"]  # type: ignore[index]
    os.utime(target, ns=(root_mtime, root_mtime))  # the swap's own traces on the disk copy
    world.asd("unsync", check=True)
    assert manifest(target) == view


REDIRECTED = r"""
import os, runpy, sys
from collections.abc import Iterator
from pathlib import Path
from asd import carry, shrink
target, conf, outside = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
unmount, carry_over = shrink._unmount_when_free, carry.carry_over

def window_write(path):
    os.makedirs(target / "win" / "dir")
    (target / "win" / "dir" / "file").write_text("written in the window\n")
    return unmount(path)

def symlink_first(layout, nxt, start):
    # In the new layer, before asd carries the window's writes over, the target's owner
    # puts a symlink where the window made a directory.
    os.symlink(outside, target / "win")
    return carry_over(layout, nxt, start)

shrink._unmount_when_free, carry.carry_over = window_write, symlink_first
sys.argv = ["asd", "-c", conf, "resync"]
runpy.run_module("asd", run_name="__main__")
"""


def test_the_carry_over_never_writes_through_a_symlink_made_in_the_new_layer(
    overlay_world: World,
) -> None:
    world = overlay_world
    target = world.target("srv/t")
    populate(target)
    world.write_conf(target)
    outside = world.base / "outside"
    outside.mkdir()
    world.asd("sync", check=True)
    world.run(["sh", "-c", CHANGES, "changes", str(target), "one"], check=True)
    world.run([sys.executable, "-c", REDIRECTED, str(target), str(world.conf), str(outside)])
    assert list(outside.iterdir()) == [], "root wrote through the owner's symlink"
    view = inside_manifest(world, target)
    # The later change wins: the symlink stays, the window's directory is not put back there,
    # but saved, at its path, in a directory of its own at the top of the target.
    assert view["win"]["type"] == stat.S_IFLNK, view["win"]  # type: ignore[index]
    (saved,) = [name for name in view if name.startswith("asd-conflict-") and "/" not in name]
    assert view[f"{saved}/win/dir/file"]["data"] == b"written in the window\n"  # type: ignore[index]
    world.asd("unsync", check=True)
    assert manifest(target) == view
    assert list(outside.iterdir()) == []


TWICE = r"""
import os, runpy, sys
from collections.abc import Iterator
from pathlib import Path
from asd import carry, conflict, shrink
target, conf = Path(sys.argv[1]), sys.argv[2]
unmount, carry_over = shrink._unmount_when_free, carry.carry_over

carried = []

def window_append(path):
    with open(target / "docs" / "a.txt", "a") as fh:  # to the old layer, after the walk
        fh.write("appended in the window\n")
    (target / "window-only.txt").write_text("written once, in the window\n")
    return unmount(path)

def appended_again(layout, nxt, start):
    with open(target / "docs" / "a.txt", "a") as fh:  # to the new layer, before the carry-over
        fh.write("appended after the switch\n")
    done = carry_over(layout, nxt, start)
    carried.append(done)
    return done

def saving_fails(src, dst, list_file):
    return ["sh", "-c", "echo 'rsync: write error' >&2; exit 23"]

def killed_while_saving(src, dst, list_file):
    return ["sh", "-c", "kill -9 $PPID"]  # asd itself, as its rsync runs

real_unmount = shrink.mountapi.unmount

def killed_after_carrying(path):
    if carried:
        os._exit(9)
    return real_unmount(path)

shrink._unmount_when_free, carry.carry_over = window_append, appended_again
if sys.argv[3:] == ["saving fails"]:
    conflict.rsync.copy_trees = saving_fails
elif sys.argv[3:] == ["killed while saving"]:
    conflict.rsync.copy_trees = killed_while_saving
elif sys.argv[3:] == ["killed after carrying"]:
    shrink.mountapi.unmount = killed_after_carrying
sys.argv = ["asd", "-c", conf, "resync"]
runpy.run_module("asd", run_name="__main__")
"""


def test_a_file_written_in_the_window_and_again_after_keeps_both_versions(
    overlay_world: World,
) -> None:
    world = overlay_world
    target = synced_and_changed(world)  # docs/a.txt appended to, among others
    before = inside_manifest(world, target)["docs/a.txt"]["data"]  # type: ignore[index]
    proc = world.run([sys.executable, "-c", TWICE, str(target), str(world.conf)], check=True)
    view = inside_manifest(world, target)
    (saved,) = [name for name in view if name.startswith("asd-conflict-") and "/" not in name]
    assert f"saved in {target / saved}" in proc.stdout + proc.stderr, proc.stdout + proc.stderr
    later = view["docs/a.txt"]["data"]  # type: ignore[index]
    earlier = view[f"{saved}/docs/a.txt"]["data"]  # type: ignore[index]
    assert later == before + b"appended after the switch\n"
    assert earlier == before + b"appended in the window\n"
    assert view[saved]["uid"] == view["."]["uid"]  # type: ignore[index]
    said = parse_json(world)["targets"][0]["ram_given_back"]  # type: ignore[index]
    assert f"saved in {target / saved}" in str(said), said
    world.asd("resync", check=True)
    assert manifest(target) == view
    world.asd("unsync", check=True)
    assert manifest(target) == view


@pytest.mark.parametrize("when", ["killed while saving", "killed after carrying"])
def test_a_switch_killed_after_a_name_was_written_twice_saves_it_once(
    overlay_world: World, when: str
) -> None:
    """The next resync finishes the carry-over from where it was: the earlier version is
    saved once, and what the first attempt carried over is not taken for a second write."""
    world = overlay_world
    target = synced_and_changed(world)
    before = inside_manifest(world, target)["docs/a.txt"]["data"]  # type: ignore[index]
    args = [sys.executable, "-c", TWICE, str(target), str(world.conf), when]
    assert world.run(args).returncode in (9, -9, 137)
    out = world.asd("resync", check=True)
    view = inside_manifest(world, target)
    saved = [name for name in view if name.startswith("asd-conflict-") and "/" not in name]
    assert len(saved) == 1, (saved, out.stdout + out.stderr)
    inside = sorted(n for n in view if n.startswith(saved[0] + "/"))
    assert inside == [f"{saved[0]}/docs", f"{saved[0]}/docs/a.txt"], inside
    assert view[f"{saved[0]}/docs/a.txt"]["data"] == before + b"appended in the window\n"  # type: ignore[index]
    assert view["docs/a.txt"]["data"] == before + b"appended after the switch\n"  # type: ignore[index]
    assert view["window-only.txt"]["data"] == b"written once, in the window\n"  # type: ignore[index]
    assert "1 name written during the switch" in out.stdout + out.stderr or when.endswith(
        "carrying"
    )
    world.asd("unsync", check=True)
    assert manifest(target) == view


def test_an_earlier_version_that_cannot_be_saved_keeps_the_old_layer(overlay_world: World) -> None:
    world = overlay_world
    target = synced_and_changed(world)
    before = inside_manifest(world, target)["docs/a.txt"]["data"]  # type: ignore[index]
    args = [sys.executable, "-c", TWICE, str(target), str(world.conf), "saving fails"]
    proc = world.run(args)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "could not save the earlier version" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    assert not [name for name in inside_manifest(world, target) if "asd-conflict" in name]
    assert upper_bytes(world) >= 3 * MIB  # the old layer, with the window's append, is kept
    out = world.asd("resync", check=True).stderr
    assert "saved in" in out, out
    view = inside_manifest(world, target)
    (saved,) = [name for name in view if name.startswith("asd-conflict-") and "/" not in name]
    assert view[f"{saved}/docs/a.txt"]["data"] == before + b"appended in the window\n"  # type: ignore[index]
    assert view["docs/a.txt"]["data"] == before + b"appended after the switch\n"  # type: ignore[index]
    world.asd("unsync", check=True)
    assert manifest(target) == view


BEFORE_KEEP = r"""
import runpy, sys
from collections.abc import Iterator
from pathlib import Path
from asd import shrink
target, conf = Path(sys.argv[1]), sys.argv[2]
keep = shrink._keep

def appended_first(layout, nxt, hot):
    assert "docs/a.txt" in hot, hot
    with open(target / "docs" / "a.txt", "a") as fh:  # after the resync's walk
        fh.write("appended before the copy\n")
    return keep(layout, nxt, hot)

shrink._keep = appended_first
sys.argv = ["asd", "-c", conf, "resync"]
runpy.run_module("asd", run_name="__main__")
"""


def test_a_kept_file_written_after_the_walk_reaches_the_disk_at_the_next_resync(
    overlay_world: World,
) -> None:
    world = overlay_world
    target = world.target("srv/t")
    populate(target)
    world.write_conf(target)
    world.asd("sync", check=True)
    world.run(["sh", "-c", CHANGES, "changes", str(target), "zero"], check=True)
    world.asd("resync", check=True)
    world.run(["sh", "-c", CHANGES, "changes", str(target), "one"], check=True)
    world.run([sys.executable, "-c", BEFORE_KEEP, str(target), str(world.conf)], check=True)
    view = inside_manifest(world, target)
    assert view["docs/a.txt"]["data"].endswith(b"appended before the copy\n")  # type: ignore[index]
    world.asd("resync", check=True)
    assert manifest(target) == view


def test_unsync_force_while_a_switch_waits_leaves_nothing_behind(overlay_world: World) -> None:
    world = overlay_world
    target = synced_and_changed(world)
    holder = world.spawn(["sh", "-c", f"exec 3>>'{target}/docs/a.txt'; exec sleep 300"])
    try:
        wait_until_open(world, holder.pid)
        proc = world.run([sys.executable, "-c", RACED, str(world.conf)], check=True)
        assert "not given back yet" in proc.stdout, proc.stdout + proc.stderr
        world.sh(f"echo 'while pending' >> '{target}/docs/a.txt'")
        view = inside_manifest(world, target)
        out = world.asd("unsync", "--force", check=True)
        assert "pid" in out.stderr, out.stderr  # the holder is named
    finally:
        os.killpg(holder.pid, 9)
        holder.wait()
    assert manifest(target) == view
    assert world.asd_mounts() == []
    assert asd_left(target) == []


CARRY_FAILS = r"""
import runpy, sys
from collections.abc import Iterator
from pathlib import Path
from asd import rsync, shrink
target, conf = Path(sys.argv[1]), sys.argv[2]
unmount, copy_listed = shrink._unmount_when_free, rsync.copy_listed

def window_write(path):
    (target / "window.txt").write_text("written in the window\n")
    return unmount(path)

def carry_over_fails(src, dst, list_file):
    if Path(dst) == target:  # the carry-over's copy, not the resync's
        return ["sh", "-c", "echo 'rsync: read error' >&2; exit 23"]
    return copy_listed(src, dst, list_file)

shrink._unmount_when_free, rsync.copy_listed = window_write, carry_over_fails
sys.argv = ["asd", "-c", conf, "resync"]
runpy.run_module("asd", run_name="__main__")
"""


def test_a_failed_carry_over_keeps_the_old_layer_and_the_next_resync_finishes(
    overlay_world: World,
) -> None:
    world = overlay_world
    target = synced_and_changed(world)
    proc = world.run([sys.executable, "-c", CARRY_FAILS, str(target), str(world.conf)])
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "could not copy what was written during the switch" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    said = parse_json(world)["targets"][0]["ram_given_back"]  # type: ignore[index]
    assert "not given back yet" in str(said), said
    assert upper_bytes(world) >= 3 * MIB  # the old layer is kept
    out = world.asd("resync", check=True).stdout
    view = inside_manifest(world, target)
    assert view["window.txt"]["data"] == b"written in the window\n", out  # type: ignore[index]
    world.asd("resync", check=True)
    assert manifest(target) == view
    assert upper_bytes(world) < 64 * 1024
    world.asd("unsync", check=True)
    assert manifest(target) == view


VANISHED = r"""
import dataclasses, runpy, sys
from asd import sync
resync_target = sync.resync_target

def one_vanished(layout):
    # As when rsync could not read a file it had listed: it is not on disk, nor in the
    # index the delta would be built from.
    return dataclasses.replace(resync_target(layout), vanished=("new dir/deeper/file",))

sync.resync_target = one_vanished
sys.argv = ["asd", "-c", sys.argv[1], "resync"]
runpy.run_module("asd", run_name="__main__")
"""


def test_no_switch_after_a_resync_that_could_not_copy_everything(overlay_world: World) -> None:
    world = overlay_world
    synced_and_changed(world)
    proc = world.run([sys.executable, "-c", VANISHED, str(world.conf)], check=True)
    assert "vanished while the resync copied them" in proc.stdout, proc.stdout
    assert upper_bytes(world) >= 3 * MIB
    assert "of RAM back" in world.asd("resync", check=True).stdout
