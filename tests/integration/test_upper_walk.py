"""Resync reads only what changed: in overlay mode, only the upper layer. The cases the
upper layer alone does not tell (renamed and re-made lower directories, hard links copied
up through one name) must still land on disk exactly as programs see them."""

from __future__ import annotations

import os
import re

from tests.integration.conftest import World
from tests.integration.manifest import manifest
from tests.integration.test_lifecycle import inside_manifest


def lower_tree(target: os.PathLike[str]) -> None:
    root = os.fspath(target)
    for d in ("a/deep", "b", "c", "d"):
        os.makedirs(os.path.join(root, d))
    for rel, text in {
        "a/one": "1\n",
        "a/deep/two": "2\n",
        "b/three": "3\n",
        "c/four": "4\n",
        "d/five": "5\n",
        "file": "f\n",
        "linked": "shared\n",
    }.items():
        with open(os.path.join(root, rel), "w") as fh:
            fh.write(text)
    os.link(os.path.join(root, "linked"), os.path.join(root, "d", "alias"))


ROUNDS = [
    # A lower directory renamed (a redirect in the upper layer), one made again where a
    # lower one was (opaque), a file become a directory, a hard link written through one name.
    "mv a a2 && rm -r b && mkdir b && echo new > b/n && rm file && mkdir file"
    " && echo x > file/x && echo more >> linked",
    # Renamed back, and the renamed tree renamed again inside another renamed one.
    "mv a2 a && mv c a/c && echo five >> d/five",
    # Deleted after being written back; a new file under a directory that came from the lower.
    "rm -r a && echo z > d/zz && mv d d2",
]


def test_resync_writes_exactly_the_view(world: World) -> None:
    target = world.target("t")
    lower_tree(target)
    world.write_conf(target)
    world.asd("sync", check=True)
    for i, script in enumerate(ROUNDS):
        world.run(["sh", "-c", f"cd {target} && {script}"], check=True)
        world.asd("resync", check=True)
        view = inside_manifest(world, target)
        assert manifest(target) == view, f"round {i}: disk copy and view differ"
        idle = world.asd("resync", check=True)
        assert "nothing changed" in idle.stdout + idle.stderr, f"round {i}: idle resync wrote"
    final = inside_manifest(world, target)
    world.asd("unsync", check=True)
    assert manifest(target) == final


def resync_lookups(world: World, files: int) -> int:
    """stat-family, openat and getdents64 calls of one resync after the same changes (three files
    appended, one rewritten by rename, two created) in a synced target of ``files`` files."""
    target = world.target(f"t{files}")
    for d in range(files // 100):
        os.makedirs(target / f"d{d}")
        for f in range(100):
            (target / f"d{d}" / f"f{f}").write_text(f"{d}/{f}\n")
    world.write_conf(target)
    world.asd("sync", check=True)
    world.sh(
        f"cd {target} && for f in d0/f1 d1/f2 d2/f3; do echo more >> $f; done"
        " && echo new > d3/tmp && mv d3/tmp d3/f4 && echo a > d0/new1 && echo b > d4/new2"
    )
    out = world.base / f"strace-{files}.txt"
    lookups = "trace=newfstatat,statx,lstat,stat,fstat,getdents64,openat"
    trace = ("strace", "-f", "-c", "-o", str(out), "-e", lookups)
    world.asd("resync", check=True, prefix=trace)
    # outside the namespace, the target's path shows the disk copy
    assert (target / "d0" / "f1").read_text() == "0/1\nmore\n"
    assert (target / "d3" / "f4").read_text() == "new\n"
    assert (target / "d4" / "new2").read_text() == "b\n"
    world.asd("unsync", check=True)
    total = re.search(r"^\s*100\.00\s+\S+\s+\S+\s+(\d+)", out.read_text(), re.M)
    assert total, out.read_text()
    return int(total.group(1))


def test_overlay_resync_never_visits_unchanged_files(overlay_world: World) -> None:
    """Written-to lower files show two links through the overlay (the lower tree's): that
    alone must not make a resync walk the merged view, nor may the stage take more than was
    listed. The same six changes in a target eight times larger cost the same lookups, give
    or take a few (a walk would add one per file: 3500)."""
    small = resync_lookups(overlay_world, 500)
    large = resync_lookups(overlay_world, 4000)
    assert abs(large - small) < 50, (small, large)


def test_resync_never_reads_unchanged_files_beside_a_new_one(world: World) -> None:
    """A new file at the top of the target changes the target's own directory; writing that
    directory back must not copy what else sits at the top (rsync copies a listed "." one
    level deep). Any read of the unchanged file during the resync fails here, by injection."""
    from asd.layout import Instance

    target = world.target("flat")
    (target / "big").write_bytes(b"x" * 2**20)
    (target / "sub").mkdir()
    world.write_conf(target)
    world.asd("sync", check=True)
    world.sh(f"echo new > {target}/new && mkdir {target}/sub2")
    big = Instance(world.conf, world.volatile).target(target).ram_copy / "big"
    no_reads: tuple[str, ...] = (
        "strace",
        "-f",
        "-o",
        "/dev/null",
        "-P",
        str(big),
        "-e",
        "trace=read",
    )
    no_reads += ("-e", "inject=read:error=EIO")
    done = world.asd("resync", prefix=no_reads)
    assert done.returncode == 0, f"the resync read {big}:\n{done.stdout}{done.stderr}"
    assert (target / "new").read_text() == "new\n" and (target / "sub2").is_dir()
    view = inside_manifest(world, target)
    assert manifest(target) == view
