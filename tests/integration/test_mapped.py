"""Writes through a shared mapping reach the disk (`asd.mapped`).

tmpfs stamps a mapped file's mtime at the mapping's first write only; a later write, msync
and munmap change no time and no size. A program here maps a file of the target, writes,
lets a resync copy it, writes again through the same mapping and unmaps: without asd
looking for mappings, the next resyncs saw nothing changed and unsync left the first
version on disk (both modes, before `asd.mapped`)."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from tests.integration.conftest import World

WRITER = r"""
import mmap, os, sys, time
path, steps = sys.argv[1], sys.argv[2]
fd = os.open(path, os.O_RDWR)
m = mmap.mmap(fd, 4096, mmap.MAP_SHARED)
os.close(fd)
m[0:6] = b"first "
open(os.path.join(steps, "1"), "w").close()
while not os.path.exists(os.path.join(steps, "go")):
    time.sleep(0.02)
m[0:6] = b"second"
m.flush()
m.close()
open(os.path.join(steps, "2"), "w").close()
"""


def wait_for(path: Path) -> None:
    for _ in range(500):
        if path.exists():
            return
        time.sleep(0.02)
    raise AssertionError(f"{path} never appeared")


def test_a_write_through_a_mapping_after_a_resync_is_written_back(world: World) -> None:
    target = world.target("var/lib/db")
    with open(target / "store", "wb") as fh:
        fh.write(b"disk  " + b"\0" * 4090)
    (target / "other").write_text("untouched\n")
    world.write_conf(target)
    world.asd("sync", check=True)
    steps = world.base / "steps"
    steps.mkdir()
    world.spawn([sys.executable, "-c", WRITER, str(target / "store"), str(steps)])
    wait_for(steps / "1")
    time.sleep(1.2)  # the first write's stamp is older than the resync below
    world.asd("resync", check=True)
    assert (target / "store").read_bytes()[:6] == b"first ", "the resync did not write it"

    (steps / "go").touch()
    wait_for(steps / "2")  # written again through the mapping, and unmapped
    again = world.asd("resync", check=True)
    assert "wrote 1 changed entries" in again.stdout, again.stdout
    assert (target / "store").read_bytes()[:6] == b"second"
    # Mapped no more: the resync after that has nothing to write.
    assert "nothing changed" in world.asd("resync", check=True).stdout
    world.asd("unsync", check=True)
    assert (target / "store").read_bytes()[:6] == b"second"
    assert (target / "other").read_text() == "untouched\n"
    assert os.path.getsize(target / "store") == 4096
