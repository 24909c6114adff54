"""Overlay mode keeps its lower tree from one session to the next (`asd.lower`): a clean stop
leaves it in ``.asd-work``, the next sync brings it up to date with what changed meanwhile,
and whatever the disk copy holds is what the target shows. Copy mode removes it."""

from __future__ import annotations

import json
import os
import re
import time

from asd import lower
from tests.integration.conftest import (
    CHANGES,
    World,
    populate,
    snapshot_of_v1_and_v2_in_ram,
)
from tests.integration.manifest import manifest
from tests.integration.test_lifecycle import inside_manifest

WORK = frozenset({".asd-work"})
# What a clean stop keeps when no resync gave RAM back (so no delta to keep as the spare).
TREE = {"lower", "lower.json", "CACHEDIR.TAG"}


def kept_sizes(said: str) -> tuple[int, int]:
    found = re.search(r"kept from the last session: (\d+) of (\d+) directories changed", said)
    assert found, said
    return int(found[1]), int(found[2])


def test_a_clean_stop_keeps_the_tree_and_the_next_sync_reuses_it(overlay_world: World) -> None:
    world = overlay_world
    target = world.target("home/user/.cache")
    populate(target)
    for n in range(30):
        (target / f"many/d{n}").mkdir(parents=True)
        (target / f"many/d{n}/f").write_text(str(n))
    world.write_conf(target)
    time.sleep(lower.RACY_NS / 1e9 + 0.1)  # every directory settled: none is racily clean

    first = world.asd("sync", check=True)
    assert "built the overlay's lower tree" in first.stdout
    world.run(["sh", "-c", CHANGES, "changes", str(target)], check=True)
    world.asd("resync", check=True)
    in_ram = inside_manifest(world, target)
    world.asd("unsync", check=True)
    assert manifest(target) == in_ram
    # The tree, its record, and the delta of the resync's RAM give-back (the sparse image's
    # copy-up filled the upper layer) kept as the tree's spare links.
    assert set(os.listdir(target / ".asd-work")) == {*TREE, "spare"}
    assert world.asd_mounts() == []
    # Tagged as a cache: a backup with tar --exclude-caches takes none of the tree.
    tag = (target / ".asd-work" / "CACHEDIR.TAG").read_text()
    assert tag.startswith("Signature: 8a477f597d28d172789f06886806bc55\n")
    archived = world.run(
        ["sh", "-c", f"tar -c --exclude-caches -f - -C {target} . | tar -t"], check=True
    ).stdout.splitlines()
    assert "./.asd-work/CACHEDIR.TAG" in archived and "./.asd-work/lower.json" not in archived
    assert not [n for n in archived if n.startswith("./.asd-work/lower/")]

    # While asd is stopped the directory is the user's: change it.
    (target / "many/d3/f").write_text("changed while asd was stopped")  # in place
    (target / "many/d4/new").write_text("new while asd was stopped")
    os.rename(target / "many/d5", target / "many/d5-renamed")
    (target / "many/d6/f").unlink()
    on_disk = manifest(target)

    again = world.asd("sync", check=True)
    listed, dirs = kept_sizes(again.stdout)
    # The resync's directories and today's, not the 30 untouched ones.
    assert 0 < listed <= dirs - 25, again.stdout
    assert inside_manifest(world, target) == on_disk, "the target does not show the disk copy"
    assert lower.is_mirror(target, target / ".asd-work/lower", WORK)
    world.sh(f"echo more >> {target}/many/d3/f")
    shown = inside_manifest(world, target)
    world.asd("unsync", check=True)
    assert manifest(target) == shown


def test_the_last_delta_is_kept_and_its_links_moved_into_the_tree(overlay_world: World) -> None:
    """A session that gave RAM back (asd.shrink) ends with a delta of links to what its
    resync wrote: the stop keeps it as the tree's spare instead of removing those links, and
    the next sync moves them into the tree. What no longer names the disk copy's file is
    removed before the hard-link check counts links: a file renamed or replaced while asd
    was stopped is no link to outside the target."""
    world = overlay_world
    target = world.target("home/u/.cache/app")
    populate(target)
    for n in range(4):
        (target / f"d{n}").mkdir()
        (target / f"d{n}/f").write_text("before")
    world.write_conf(target)
    time.sleep(lower.RACY_NS / 1e9 + 0.1)
    world.asd("sync", check=True)
    world.sh(f"for n in 0 1 2 3; do head -c 600000 /dev/urandom > {target}/d$n/f; done")
    gave = world.asd("resync", check=True)
    assert "of RAM back" in gave.stdout, gave.stdout
    in_ram = inside_manifest(world, target)
    world.asd("unsync", check=True)
    assert manifest(target) == in_ram
    work = target / ".asd-work"
    assert set(os.listdir(work)) == {*TREE, "spare"}
    for n in range(4):
        assert os.path.samefile(work / f"spare/d{n}/f", target / f"d{n}/f")
    os.rename(target / "d0/f", target / "d0/renamed")  # while asd is stopped
    (target / "d1/f.new").write_text("replaced while asd was stopped")
    os.replace(target / "d1/f.new", target / "d1/f")
    on_disk = manifest(target)

    again = world.asd("sync", check=True)
    assert "2 moved from the last session's delta" in again.stdout, again.stdout
    assert not os.path.lexists(work / "spare")
    assert lower.is_mirror(target, work / "lower", WORK)
    for rel in ("d0/renamed", "d1/f", "d2/f", "d3/f"):
        assert os.lstat(target / rel).st_nlink == 2, rel  # its name and its twin in the tree
    assert inside_manifest(world, target) == on_disk
    world.sh(f"head -c 2000000 /dev/urandom > {target}/d2/f")
    assert "of RAM back" in world.asd("resync", check=True).stdout
    shown = inside_manifest(world, target)
    world.asd("unsync", check=True)
    assert manifest(target) == shown
    # What package removal runs: the spare goes with the tree.
    assert "spare" in os.listdir(work)
    world.asd("clean", "--lower-trees", check=True)
    assert not os.path.lexists(work) and manifest(target) == shown


def test_copy_mode_removes_a_kept_tree(overlay_world: World) -> None:
    world = overlay_world
    target = world.target("srv/cache")
    populate(target)
    world.write_conf(target)
    world.asd("sync", check=True)
    world.asd("unsync", check=True)
    assert (target / ".asd-work/lower").is_dir()
    before = manifest(target)

    world.overlay = False
    world.write_conf(target)
    synced = world.asd("sync", check=True)  # its links are no links to outside the target
    assert "removed the overlay lower tree" in synced.stdout
    assert inside_manifest(world, target) == before
    world.asd("unsync", check=True)
    assert not (target / ".asd-work").exists() and manifest(target) == before


def test_a_link_to_outside_is_still_refused_beside_a_kept_tree(overlay_world: World) -> None:
    world = overlay_world
    target = world.target("var/lib/app")
    (target / "db").write_text("data")
    (target / "linked").write_text("shared")
    world.write_conf(target)
    world.asd("sync", check=True)
    world.asd("unsync", check=True)
    os.link(target / "linked", world.disk / "outside")
    refused = world.asd("sync")
    assert refused.returncode != 0 and "hard-linked to files outside it" in refused.stderr
    assert str(target / "linked") in refused.stderr and "db" not in refused.stderr
    assert world.asd_mounts() == []
    assert not os.path.lexists(target / ".asd-work"), "the refused sync discarded the tree"
    os.unlink(world.disk / "outside")
    os.link(target / "linked", target / "second name")  # a link inside is no reason to refuse
    world.asd("sync", check=True)
    world.asd("unsync", check=True)


def test_a_tree_kept_by_a_crashed_session_is_brought_up_to_date(overlay_world: World) -> None:
    """A power cut leaves the tree of the session's start and a disk copy that resyncs
    changed; the next sync sees both and mirrors the disk copy."""
    world = overlay_world
    target = world.target("home/u/.mozilla")
    populate(target)
    world.write_conf(target)
    world.asd("sync", check=True)
    world.run(["sh", "-c", CHANGES, "changes", str(target)], check=True)
    world.asd("resync", check=True)
    on_disk = manifest(target)
    world.power_cut()
    world.boot()
    world.asd("sync", check=True)
    assert inside_manifest(world, target) == on_disk
    assert lower.is_mirror(target, target / ".asd-work/lower", WORK)
    world.asd("unsync", check=True)
    assert manifest(target) == on_disk


def test_clean_deletes_a_kept_tree_but_not_one_in_use_or_beside_a_journal(
    overlay_world: World,
) -> None:
    """`asd clean` removes the tree of a stopped target (the next sync builds it again); one
    asd runs on, and one beside a crashed session's journal, stay."""
    world = overlay_world
    target = world.target("home/u/.config/app")
    populate(target)
    world.write_conf(target)
    world.asd("sync", check=True)
    running = world.asd("clean", check=True)
    assert "its lower tree is in use and stays" in running.stdout
    assert "lower" in os.listdir(target / ".asd-work"), "the overlay's lower layer was removed"
    assert world.asd_mounts() != []
    world.run(["sh", "-c", CHANGES, "changes", str(target)], check=True)
    stopped = world.asd("unsync", check=True)
    assert "'asd clean' deletes it" in stopped.stdout
    assert set(os.listdir(target / ".asd-work")) == TREE
    before, mtime = manifest(target), os.lstat(target).st_mtime_ns
    shown = json.loads(world.asd("parse", "--json", check=True).stdout)["targets"][0]
    assert shown["kept_lower"] == f"{target}/.asd-work/lower"
    assert "'asd clean' deletes it" in world.asd("parse", check=True).stdout

    cleaned = world.asd("clean", check=True)
    assert f"deleted {target}/.asd-work" in cleaned.stdout
    assert not os.path.lexists(target / ".asd-work")
    assert manifest(target) == before and os.lstat(target).st_mtime_ns == mtime
    assert "no crash-recovery snapshots" in world.asd("clean", check=True).stdout
    assert (
        json.loads(world.asd("parse", "--json", check=True).stdout)["targets"][0]["kept_lower"]
        is None
    )

    synced = world.asd("sync", check=True)
    assert "built the overlay's lower tree" in synced.stdout
    assert inside_manifest(world, target) == before
    world.asd("resync", check=True)
    on_disk = manifest(target)
    world.power_cut()
    world.boot()
    left = set(os.listdir(target / ".asd-work"))
    refused = world.asd("clean")
    assert refused.returncode == 1 and "did not stop cleanly" in refused.stderr
    assert set(os.listdir(target / ".asd-work")) == left and manifest(target) == on_disk
    world.asd("sync", check=True)  # recovery finishes the session
    world.asd("unsync", check=True)
    assert manifest(target) == on_disk


def test_clean_of_lower_trees_goes_on_past_a_crashed_target_and_keeps_snapshots(
    overlay_world: World,
) -> None:
    """What package removal runs: ``asd clean --lower-trees`` deletes every kept tree it may,
    says which one it may not (a crashed session's journal beside it) and exits 1, and never
    deletes a crash-recovery snapshot."""
    world = overlay_world
    crashed, stopped = world.target("srv/crashed"), world.target("srv/stopped")
    for target in (crashed, stopped):
        (target / "f").write_text(f"{target.name}\n")
    world.write_conf(stopped)
    world.asd("sync", check=True)
    world.asd("unsync", check=True)
    world.write_conf(crashed)
    world.asd("sync", check=True)
    world.power_cut()
    world.boot()
    world.write_conf(crashed, stopped)
    left = set(os.listdir(crashed / ".asd-work"))

    cleaned = world.asd("clean", "--lower-trees")
    assert cleaned.returncode == 1, cleaned
    assert "did not stop cleanly for " + str(crashed) in cleaned.stderr
    assert f"deleted {stopped}/.asd-work" in cleaned.stdout
    assert not os.path.lexists(stopped / ".asd-work")
    assert set(os.listdir(crashed / ".asd-work")) == left
    assert "snapshot" not in cleaned.stdout

    world.asd("sync", check=True)  # recovery finishes the crashed session, with a snapshot
    world.asd("unsync", check=True)
    snapshots = [p.name for p in world.disk.glob("srv/.crashed*") if "crashrecovery" in p.name]
    assert snapshots, list(world.disk.glob("srv/*"))
    cleaned = world.asd("clean", "--lower-trees", check=True)
    assert "snapshot" not in cleaned.stdout
    assert not os.path.lexists(crashed / ".asd-work")
    assert not os.path.lexists(stopped / ".asd-work")
    assert [p.name for p in world.disk.glob("srv/.crashed*") if "crashrecovery" in p.name] == (
        snapshots
    )
    again = world.asd("clean", "--lower-trees", check=True)
    assert again.stdout == "no kept lower trees to delete\n"
    assert (crashed / "f").read_text() == "crashed\n" and (stopped / "f").read_text() == (
        "stopped\n"
    )


def test_clean_leaves_a_work_directory_asd_did_not_make(overlay_world: World) -> None:
    world = overlay_world
    target = world.target("srv/data")
    (target / "f").write_text("mine")
    planted = target / ".asd-work"
    planted.mkdir(mode=0o755)
    (planted / "lower.json").write_text("someone's file")
    world.write_conf(target)
    refused = world.asd("clean")
    assert refused.returncode == 1 and "not asd's own journal directory" in refused.stderr
    assert (planted / "lower.json").read_text() == "someone's file"


def test_restore_takes_the_kept_tree_out_of_the_directory_it_moves_aside(
    overlay_world: World,
) -> None:
    world = overlay_world
    target = snapshot_of_v1_and_v2_in_ram(world, "t")
    world.asd("unsync", check=True)
    assert set(os.listdir(target / ".asd-work")) == TREE
    current = manifest(target)

    done = world.asd("restore", check=True)
    assert "deleted the lower tree overlay mode kept" in done.stdout
    assert (target / "f").read_text() == "v1\n" and not (target / ".asd-work").exists()
    aside = [p for p in world.disk.iterdir() if p.name.startswith("t-bad-")]
    assert len(aside) == 1 and not os.path.lexists(aside[0] / ".asd-work")
    assert manifest(aside[0]) == current, "the user's files and times moved aside as they were"
