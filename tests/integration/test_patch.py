"""A large file changed a little is written back in place, only its changed blocks (asd.patch).

Observable from outside: the disk copy's file keeps its inode (a whole-file copy is renamed
over it and gets a new one), holds exactly what RAM holds, keeps its holes, and in overlay
mode the lower layer's file — the disk copy as it was at sync — never changes.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from asd.mounts import MountTable
from asd.patch import IN_PLACE
from tests.integration.conftest import World
from tests.integration.manifest import manifest
from tests.integration.test_lifecycle import inside_manifest

MIB = 1024 * 1024


def make(target: Path) -> None:
    with open(target / "app.log", "w") as fh:
        fh.writelines(f"{i:08d} boot message of a long-running service\n" for i in range(20000))
    os.chown(target / "app.log", 1234, 1234)
    os.chmod(target / "app.log", 0o640)
    (target / "data").mkdir()
    (target / "data" / "load.rrd").write_bytes(bytes(range(256)) * 2048)  # 512 KiB
    (target / "data" / "rewritten.bin").write_bytes(b"a" * 256 * 1024)
    with open(target / "holes.img", "wb") as fh:
        fh.truncate(16 * MIB)
        fh.write(b"header")


CHANGE = r"""
set -e
cd "$1"
echo "$2 appended line" >> app.log
printf 'new values %s' "$2" | dd of=data/load.rrd bs=1 seek=300000 conv=notrunc status=none
head -c 262144 /dev/urandom > data/rewritten.bin.tmp
cat data/rewritten.bin.tmp > data/rewritten.bin && rm data/rewritten.bin.tmp
printf 'middle %s' "$2" | dd of=holes.img bs=1 seek=8388608 conv=notrunc status=none
truncate -s 20M holes.img
"""


def inodes(target: Path) -> dict[str, int]:
    names = ("app.log", "data/load.rrd", "data/rewritten.bin", "holes.img")
    return {n: os.lstat(target / n).st_ino for n in names}


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_large_files_changed_a_little_are_patched_in_place(world: World) -> None:
    target = world.target("srv/t")
    make(target)
    world.write_conf(target)
    at_sync = digest(target / "app.log")
    world.asd("sync", check=True)
    lower = target / ".asd-work" / "lower"  # the disk copy, as seen outside the namespace

    rounds = []
    for n in ("one", "two", "three") if world.overlay else ("one", "two"):
        before = inodes(target)
        world.run(["sh", "-c", CHANGE, "change", str(target), n], check=True)
        in_ram = inside_manifest(world, target)
        world.asd("resync", check=True)
        assert manifest(target) == in_ram, f"resync {n}: the disk copy is not what RAM holds"
        after = inodes(target)
        rounds.append({name: before[name] == after[name] for name in before})
        holes = os.lstat(target / "holes.img")
        assert holes.st_blocks * 512 < MIB, "the sparse file was filled in on disk"
        if world.overlay:
            assert digest(lower / "app.log") == at_sync, "the overlay's lower layer changed"

    in_place = {
        "app.log": True,
        "data/load.rrd": True,
        "data/rewritten.bin": False,
        "holes.img": True,
    }
    if MountTable.read().holding(world.disk).fstype not in IN_PLACE:
        # A file system that writes elsewhere (btrfs, xfs reflinks) could run out of space
        # after the commit point: nothing is patched there.
        in_place = dict.fromkeys(in_place, False)
    if world.overlay:
        # At sync every disk file is also a lower-layer link: the first resync must copy
        # whole files. It then gives the RAM back (asd.shrink), and the new overlay's delta
        # links the files the resync wrote, so the second copies them whole again; files
        # changed at both are kept in RAM from then on, and from the third on are patched.
        assert rounds[0] == dict.fromkeys(in_place, False)
        assert rounds[1] == dict.fromkeys(in_place, False)
    else:
        assert rounds[0] == in_place
    assert rounds[-1] == in_place

    world.asd("unsync", check=True)
    assert manifest(target) == in_ram


def test_a_patch_never_writes_into_a_file_with_another_link(copy_world: World) -> None:
    world = copy_world
    target = world.target("srv/t")
    make(target)
    os.link(target / "app.log", target / "data" / "app.log.link")
    world.write_conf(target)
    world.asd("sync", check=True)
    before = inodes(target)
    world.run(["sh", "-c", CHANGE, "change", str(target), "one"], check=True)
    in_ram = inside_manifest(world, target)
    world.asd("resync", check=True)
    assert manifest(target) == in_ram
    assert os.lstat(target / "app.log").st_ino != before["app.log"], "a linked file was patched"
    assert os.lstat(target / "app.log").st_ino == os.lstat(target / "data/app.log.link").st_ino
    if MountTable.read().holding(world.disk).fstype in IN_PLACE:
        assert os.lstat(target / "data/load.rrd").st_ino == before["data/load.rrd"]
    world.asd("unsync", check=True)
