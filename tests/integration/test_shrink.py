"""Overlay mode gives its RAM back after a resync (asd.shrink), and the target never notices.

Observable from outside the namespace: the disk copy after each resync and after unsync.
From inside: the target's full state (manifest) across the switch, the RAM the upper layers
hold, the mount table, and `asd parse`. A file held open defers the switch; a power cut after
it leaves the disk copy of the last resync and nothing of asd.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.conftest import World, booted_world, populate
from tests.integration.manifest import manifest
from tests.integration.test_lifecycle import inside_manifest

MIB = 1024 * 1024

CHANGES = r"""
set -e
cd "$1"
head -c 3200000 /dev/urandom > big.bin
echo "$2" >> docs/a.txt
rm -f docs/b.txt
mkdir -p "new dir/deeper"
echo "$2" > "new dir/deeper/file"
if [ -d sub ]; then mv sub sub-renamed; fi
chmod 0750 docs
"""


@pytest.fixture
def overlay_world() -> Iterator[World]:
    with booted_world(overlay=True) as w:
        yield w


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
        assert upper_bytes(world) < 64 * 1024, f"resync {n}: the RAM was not given back"
        stacked = [m for m in world.asd_mounts() if "asd-overlay" in m]
        assert len(stacked) == 2, stacked  # the overlay at the RAM path and its bind
    # Unchanged since the last switch, then changed again through the new layer.
    world.sh(f"echo after >> '{target}/docs/a.txt' && rm '{target}/new dir/deeper/file'")
    final = inside_manifest(world, target)
    world.asd("unsync", check=True)
    assert manifest(target) == final
    assert world.asd_mounts() == []
    assert not (target / ".asd-work").exists()


def test_a_file_held_open_defers_and_parse_says_so(overlay_world: World) -> None:
    world = overlay_world
    target = world.target("srv/t")
    populate(target)
    world.write_conf(target)
    world.asd("sync", check=True)
    world.run(["sh", "-c", CHANGES, "changes", str(target), "one"], check=True)
    holder = world.spawn(["sh", "-c", f"exec 3>>'{target}/docs/a.txt'; exec sleep 300"])
    try:
        deadline = time.monotonic() + 10
        while "3 ->" not in world.sh(f"ls -l /proc/{holder.pid}/fd || true").stdout:
            assert time.monotonic() < deadline
            time.sleep(0.05)
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
    target = world.target("srv/t")
    populate(target)
    world.write_conf(target)
    world.asd("sync", check=True)
    world.run(["sh", "-c", CHANGES, "changes", str(target), "one"], check=True)
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
    assert leftovers == []
