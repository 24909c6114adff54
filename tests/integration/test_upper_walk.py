"""Resync reads only what changed: in overlay mode, only the upper layer. The cases the
upper layer alone does not tell (renamed and re-made lower directories, hard links copied
up through one name) must still land on disk exactly as programs see them."""

from __future__ import annotations

import os

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
