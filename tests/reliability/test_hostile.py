"""Hostile input: a local unprivileged user (uid 1234, really, through setpriv) owns a target
and its parent and plays with every name asd uses there and in VOLATILE.

What a user must never get: asd (root) deleting, writing, chowning or chmodding anything
outside the target because of names, symlinks or journal files the user planted; or reading
RAM copies, staging, state or snapshots the target would not let them read.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
from pathlib import Path

import pytest

from tests.reliability.conftest import World, record

UID = 1234
AS_USER = ["setpriv", f"--reuid={UID}", f"--regid={UID}", "--clear-groups"]


def as_user(world: World, script: str, *args: str) -> subprocess.CompletedProcess[str]:
    return world.run([*AS_USER, "sh", "-c", script, "user", *args])


def user_target(world: World) -> Path:
    """/…/home/u/t, owned by the user (as is its parent, like a home directory)."""
    home = world.disk / "home" / "u"
    target = home / "t"
    target.mkdir(parents=True)
    (target / "docs").mkdir()
    (target / "docs" / "a.txt").write_text("user data\n")
    for p in (home, target, target / "docs", target / "docs" / "a.txt"):
        os.chown(p, UID, UID)
    return target


def canaries(world: World) -> tuple[Path, Path]:
    """A root file and a root directory outside every target, as the user cannot touch them."""
    f = world.base / "canary"
    f.write_text("root's\n")
    f.chmod(0o644)
    d = world.base / "canary-dir"
    d.mkdir()
    d.chmod(0o755)
    return f, d


def assert_canaries(f: Path, d: Path) -> None:
    assert f.read_text() == "root's\n", f"{f} was changed by asd"
    st = os.lstat(f)
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o644), f"{f} owner/mode changed"
    st = os.lstat(d)
    assert stat.S_ISDIR(st.st_mode), f"{d} was replaced"
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o755), f"{d} owner/mode changed"


def planted_record(world: World, f: Path, d: Path, kind: str) -> object:
    up = os.path.relpath(world.base, world.disk / "home" / "u" / "t")
    meta = {"uid": UID, "gid": UID, "mode": 0o777, "atime_ns": 0, "mtime_ns": 0, "xattrs": {}}
    return {
        "delete": {"deleted": [f"{up}/{f.name}"], "dirs": {}, "files": []},
        "chown": {"deleted": [], "dirs": {f"{up}/{d.name}": meta}, "files": []},
        "absolute": {"deleted": [str(f)], "dirs": {}, "files": []},
        "move": {"deleted": [], "dirs": {}, "files": [f"{up}/{f.name}"]},
    }[kind]


@pytest.mark.parametrize("kind", ["delete", "chown", "absolute", "move"])
def test_planted_commit_record_never_acts_outside_the_target(world: World, kind: str) -> None:
    """The journal lives in the disk copy, which its owner can write: a commit record the
    user wrote there before asd starts (or swapped in while it runs) is untrusted input."""
    target = user_target(world)
    f, d = canaries(world)
    world.write_conf(target)
    rec = json.dumps(planted_record(world, f, d, kind))
    stage_line = f'mkdir -p "$1/.asd-work/stage" && echo evil > "$1/.asd-work/stage/{f.name}"'
    planted = as_user(
        world,
        f"mkdir \"$1/.asd-work\" && printf '%s' '{rec}' > \"$1/.asd-work/commit.json\" && "
        + stage_line,
        str(target),
    )
    assert planted.returncode == 0, planted.stderr
    proc = world.asd("sync")
    assert_canaries(f, d)
    assert proc.returncode == 1, f"asd used a journal the user planted:\n{proc.stdout}{proc.stderr}"
    assert ".asd-work" in proc.stderr
    assert (target / "docs" / "a.txt").read_text() == "user data\n"
    record("hostile", f"planted commit record ({kind})", "refused, nothing outside touched")
