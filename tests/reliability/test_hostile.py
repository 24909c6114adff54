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
import sys
import time
from pathlib import Path

import pytest

from tests.integration.manifest import manifest
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
    record("hostile", f"planted commit record ({kind}, {mode(world)})", "refused, nothing touched")


def racing_user(world: World, script: str, *args: str) -> subprocess.Popen[bytes]:
    """The user, really uid 1234, polling and swapping names while asd works."""
    return world.spawn([*AS_USER, "sh", "-c", script, "racer", *args])


def mounts_at(world: World, path: Path) -> int:
    return world.mounted_at(path)


SWAP = r"""
# Once asd has made "$3", move "$1" away and put a symlink to "$2" in its place.
i=0
while [ $i -lt 3000 ]; do
  if [ -e "$3" ] && [ ! -L "$1" ]; then mv "$1" "$1.moved" && ln -s "$2" "$1" && exit 0; fi
  sleep 0.01; i=$((i+1))
done
exit 1
"""


@pytest.mark.parametrize("swapped", ["backup mount point", "target"])
def test_swapped_for_a_symlink_while_sync_sets_up(world: World, swapped: str) -> None:
    """Between asd creating (or checking) a name and mounting on it, the user replaces it by
    a symlink to a root directory: asd must not mount on, or write into, what it points to.
    strace holds asd for a moment right after the name is made, so the race is always won
    by the user; without that, it would be won only sometimes."""
    target = user_target(world)
    f, d = canaries(world)
    (d / "inside").write_text("root's too\n")
    before = manifest(d)
    world.write_conf(target)
    backup = target.parent / ".t-backup_asd"
    name = backup if swapped == "backup mount point" else target
    racer = racing_user(world, SWAP, str(name), str(d), str(backup))
    # Hold asd 3 s after it creates the backup mount point (the race window, made wide):
    # it is made as .t-backup_asd.new and renamed; strace's -P matches a rename's source.
    new_name = f"{backup}.new"
    hold: tuple[str, ...] = ("strace", "-o", "/dev/null", "-P", new_name, "-e", "trace=rename")
    hold += ("-e", "inject=rename:delay_exit=3000000")
    proc = world.asd("sync", prefix=hold)
    assert racer.wait(timeout=90) == 0, "the racing user never got to swap the name"
    assert mounts_at(world, d) == 0, f"asd mounted on {d} through the user's symlink"
    assert manifest(d) == before, f"asd wrote into {d} through the user's symlink"
    assert_canaries(f, d)
    assert proc.returncode == 1, f"sync went on through a swapped {swapped}: {proc.stdout}"
    assert f"{name} was replaced" in proc.stderr, proc.stderr
    record(
        "hostile",
        f"{swapped} swapped for a symlink during sync (uid {UID}, {mode(world)})",
        "refused, nothing mounted or written through it",
    )


SWAPPED_AT_THE_MOUNT_CALL = r"""
import os, runpy, sys
from pathlib import Path
from asd import mountapi
name, elsewhere, conf = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
bind = mountapi.bind

def swapped_first(source_fd, target_fd, shown, **options):
    # asd has checked and opened both directories; the user swaps the name right before
    # the mount call, where mount(8) would look it up again.
    if shown == name:
        os.rename(name, f"{name}.moved")
        os.symlink(elsewhere, name)
    return bind(source_fd, target_fd, shown, **options)

mountapi.bind = swapped_first
sys.argv = ["asd", "-c", conf, "sync"]
runpy.run_module("asd", run_name="__main__")
"""


@pytest.mark.parametrize("swapped", ["backup mount point", "target"])
def test_swapped_for_a_symlink_at_the_mount_call(world: World, swapped: str) -> None:
    """The name swapped after asd's checks, right before the mount call: the mount goes onto
    the directory asd checked (by descriptor), never through the symlink; asd sees that the
    name no longer shows it, takes it off again and stops, and the undo leaves nothing."""
    target = user_target(world)
    f, d = canaries(world)
    (d / "inside").write_text("root's too\n")
    before = manifest(d)
    world.write_conf(target)
    name = target.parent / ".t-backup_asd" if swapped == "backup mount point" else target
    script = [sys.executable, "-c", SWAPPED_AT_THE_MOUNT_CALL, str(name), str(d), str(world.conf)]
    proc = world.run(script)
    assert proc.returncode == 1, f"sync went on through a swapped {swapped}: {proc.stdout}"
    assert f"{name} was replaced while asd mounted" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert mounts_at(world, d) == 0, f"asd mounted on {d} through the user's symlink"
    assert mounts_at(world, Path(f"{name}.moved")) == 0, "asd left its mount on the moved name"
    assert world.asd_mounts() == []
    assert manifest(d) == before, f"asd wrote into {d} through the user's symlink"
    assert_canaries(f, d)
    moved = Path(f"{target}.moved") if swapped == "target" else target
    assert (moved / "docs" / "a.txt").read_text() == "user data\n"
    record(
        "hostile",
        f"{swapped} swapped for a symlink at the mount call (uid {UID}, {mode(world)})",
        "mounted on the checked directory only, taken off again, nothing left",
    )


def mode(world: World) -> str:
    return "overlay" if world.overlay else "copy"


def test_nothing_of_a_private_target_is_readable_by_another_user(world: World) -> None:
    """A root-owned 0700 target holding a world-readable file: uid 1234 must not read that
    file through any path asd creates — RAM copy, disk copy mount, journal, run state, index,
    snapshot — while synced, during a resync's stage, and after a crash."""
    from asd.layout import Instance

    target = world.target("private")
    (target / "secret").write_text("secret\n")
    (target / "secret").chmod(0o644)
    target.chmod(0o700)
    world.write_conf(target)
    layout = Instance(world.conf, world.volatile).target(target)
    world.asd("sync", check=True)
    world.sh(f"echo more-secret > {target}/secret2; chmod 644 {target}/secret2")
    # A resync held just after its stage is filled (before the commit record is written).
    # (the record's temporary file is opened relative to the journal's descriptor: -P
    # matches that name literally)
    hold = ("strace", "-o", "/dev/null", "-P", ".commit.json.tmp")
    held = world.spawn(
        [*hold, "-e", "inject=openat:delay_exit=3000000", *world_asd_argv(world, "resync")]
    )
    tmp = layout.disk_work / ".commit.json.tmp"
    world.run(
        ["sh", "-c", f"for i in $(seq 600); do [ -e {tmp} ] && exit; sleep 0.05; done; exit 1"],
        check=True,
    )
    paths = [
        target / "secret",
        layout.ram_copy / "secret",
        layout.backup / "secret",
        layout.stage / "secret2",
        tmp,
        layout.session_marker,
        layout.instance.state_file,
        layout.index_file,
    ]
    tried = probe(world, paths)
    assert held.wait(timeout=60) == 0
    world.power_cut()
    world.boot()
    world.asd("sync", check=True)  # the crash-recovery snapshot
    snaps = sorted(target.parent.glob(".private-backup_asd-crashrecovery-*"))
    assert snaps
    tried += probe(world, snaps)
    record("hostile", "private target: paths another user tried to read", tried)


def world_asd_argv(world: World, *args: str) -> list[str]:
    import sys

    return [sys.executable, "-m", "asd", "-c", str(world.conf), *args]


def probe(world: World, paths: list[Path]) -> int:
    for path in paths:
        assert world.sh(f"test -e {path}", check=False).returncode == 0, f"{path} not there"
        got = as_user(world, 'cat "$1"', str(path))
        assert got.returncode != 0 and "secret" not in got.stdout, f"uid {UID} read {path}"
        assert "Permission denied" in got.stderr, got.stderr
    return len(paths)


def test_disk_copy_directory_swapped_for_a_symlink_is_not_written_through(world: World) -> None:
    """While asd runs, the owner reaches the disk copy through the backup mount and replaces
    docs/ by a symlink to a root directory; then changes docs/a.txt in RAM. The resync must
    not put a.txt into the root directory."""
    target = user_target(world)
    f, d = canaries(world)
    world.write_conf(target)
    world.asd("sync", check=True)
    backup = target.parent / ".t-backup_asd"
    swapped = as_user(
        world,
        'mv "$1/docs" "$1/docs.old" && ln -s "$2" "$1/docs" && echo mine > "$3/docs/a.txt"',
        str(backup),
        str(d),
        str(target),
    )
    assert swapped.returncode == 0, swapped.stderr
    proc = world.asd("resync")
    assert not (d / "a.txt").exists(), f"asd wrote {d}/a.txt through the user's symlink"
    assert_canaries(f, d)
    # Either outcome is safe: refusing, or replacing the symlink by the directory RAM holds.
    if proc.returncode == 0:
        docs = world.sh(f"test -d {backup}/docs -a ! -L {backup}/docs && cat {backup}/docs/a.txt")
        assert docs.stdout == "mine\n"
    else:
        assert proc.returncode == 1 and "docs" in proc.stderr, proc.stderr
    outcome = "symlink replaced by the directory" if proc.returncode == 0 else "refused"
    record("hostile", f"disk copy dir swapped for a symlink, then resync ({mode(world)})", outcome)


def test_journal_swapped_for_a_symlink_while_resync_stages(world: World) -> None:
    """The owner renames the disk copy's .asd-work (root's 0700 directory, but in a directory
    the owner may write) and puts a symlink to their own directory in its place, whose
    stage/ is a symlink to a root directory — after asd made the stage, before rsync fills
    it. Nothing may be written into the root directory."""
    target = user_target(world)
    f, d = canaries(world)
    (d / "docs").mkdir()
    before = manifest(d)
    world.write_conf(target)
    world.asd("sync", check=True)
    backup = target.parent / ".t-backup_asd"
    # a.txt changed in place is patched by asd itself (through the stage's descriptor); the
    # new file is rsync's, which is held at its start
    world.sh(f"echo changed > {target}/docs/a.txt && echo new > {target}/docs/new.txt")
    rsync_path = world.sh("command -v rsync").stdout.strip()
    # hold rsync's start 3 s (the window between making the stage and filling it, made wide)
    hold: tuple[str, ...] = ("strace", "-f", "-o", "/dev/null", "-P", rsync_path)
    hold += ("-e", "trace=execve")
    hold += ("-e", "inject=execve:delay_enter=3000000")
    held = world.spawn([*hold, *world_asd_argv(world, "resync")], capture=True)
    stage = backup / ".asd-work" / "stage"
    world.run(
        ["sh", "-c", f"for i in $(seq 600); do [ -d {stage} ] && exit; sleep 0.02; done; exit 1"],
        check=True,
    )
    swapped = as_user(
        world,
        'mkdir "$3" && ln -s "$2" "$3/stage" && mv "$1" "$1.moved" && ln -s "$3" "$1"',
        str(backup / ".asd-work"),
        str(d),
        str(target.parent / "evil"),
    )
    assert swapped.returncode == 0, swapped.stderr
    out, err = held.communicate(timeout=120)
    assert manifest(d) == before, f"asd wrote into {d} through the user's symlinks"
    assert_canaries(f, d)
    assert world.sh(f"cat {target}/docs/a.txt").stdout == "changed\n", "RAM data lost"
    assert world.sh(f"cat {target}/docs/new.txt").stdout == "new\n", "RAM data lost"
    # Either outcome is safe: the resync completes through its descriptors, or it refuses
    # the swapped journal directory when it comes to commit. (rsync 3.4+ also refuses a
    # symlink in its destination path; asd does not rely on that: rsync gets the stage as
    # /proc/self/fd/N.)
    if held.returncode != 0:
        assert held.returncode == 1 and b".asd-work" in err, (out, err)
    outcome = "refused at commit" if held.returncode else "completed through its descriptors"
    record("hostile", f"journal dir swapped for a symlink during resync ({mode(world)})", outcome)


def test_journal_swapped_for_a_symlink_before_the_lower_tree_is_built(
    overlay_world: World,
) -> None:
    """Overlay mode: after asd made .asd-work and mounted the disk copy beside the target, the
    owner puts a symlink to a root directory in its place, one that holds names the lower
    tree uses (lower/, lower.json, spare/). asd builds, removes and moves links only in the
    directory it made, so it refuses; nothing of root's is removed or written."""
    world = overlay_world
    target = user_target(world)
    f, d = canaries(world)
    for name in ("lower", "spare"):
        (d / name).mkdir()
        (d / name / "keep").write_text("root's\n")
    (d / "lower.json").write_text("root's\n")
    before = manifest(d)
    world.write_conf(target)
    backup = target.parent / ".t-backup_asd"
    # Hold asd 3 s as the disk copy's bind mount is attached (the first move_mount of sync):
    # the window between making .asd-work and building the tree, made wide.
    hold: tuple[str, ...] = ("strace", "-o", "/dev/null", "-e", "trace=move_mount")
    hold += ("-e", "inject=move_mount:delay_exit=3000000:when=1")
    held = world.spawn([*hold, *world_asd_argv(world, "sync")], capture=True)
    deadline = time.monotonic() + 60
    while not world.mounted_at(backup):
        assert time.monotonic() < deadline, "the disk copy was never mounted"
        time.sleep(0.02)
    swapped = as_user(
        world, 'mv "$1" "$1.moved" && ln -s "$2" "$1"', str(target / ".asd-work"), str(d)
    )
    assert swapped.returncode == 0, swapped.stderr
    out, err = held.communicate(timeout=120)
    assert manifest(d) == before, f"asd removed or wrote in {d} through the user's symlink"
    assert_canaries(f, d)
    assert held.returncode == 1, (out, err)
    assert b"is not asd's own journal directory" in err, err
    assert world.asd_mounts() == [], "the refused sync left mounts"
    assert (target / "docs" / "a.txt").read_text() == "user data\n"
    record("hostile", "journal dir swapped for a symlink before the lower tree", "refused")


def test_journal_swapped_for_a_symlink_as_the_overlay_is_mounted(overlay_world: World) -> None:
    """Overlay mode: after the lower tree is built, as mount(8) is about to mount the overlay
    that names it by path, the owner puts a symlink to a root directory in place of
    .asd-work, whose lower/ is root's and closed to them. The overlay would show that
    directory at the target; asd compares the layer the kernel took (the upper root's
    origin) with its own tree, takes the overlay off and refuses."""
    from asd.layout import Instance

    world = overlay_world
    target = user_target(world)
    f, d = canaries(world)
    (d / "lower").mkdir(mode=0o700)
    (d / "lower" / "a root-only name").write_text("root's\n")
    before = manifest(d)
    world.write_conf(target)
    layout = Instance(world.conf, world.volatile).target(target)
    mount = world.sh("command -v mount").stdout.strip()
    # Hold mount(8)'s start 3 s: the window between the tree and the mount, made wide.
    hold: tuple[str, ...] = ("strace", "-f", "-o", "/dev/null", "-P", mount)
    hold += ("-e", "trace=execve", "-e", "inject=execve:delay_enter=3000000")
    held = world.spawn([*hold, *world_asd_argv(world, "sync")], capture=True)
    world.run(
        ["sh", "-c", f"for i in $(seq 600); do [ -d {layout.upper} ] && exit; sleep 0.02; done"],
        check=True,
    )
    swapped = as_user(
        world, 'mv "$1" "$1.moved" && ln -s "$2" "$1"', str(target / ".asd-work"), str(d)
    )
    assert swapped.returncode == 0, swapped.stderr
    out, err = held.communicate(timeout=120)
    assert held.returncode == 1, (out, err)
    assert b"was replaced while asd mounted the overlay" in err, err
    assert world.asd_mounts() == [], "the overlay over root's directory stayed"
    assert manifest(d) == before, f"asd changed {d}"
    assert_canaries(f, d)
    record("hostile", "journal dir swapped for a symlink as the overlay is mounted", "refused")


def test_symlinks_out_of_a_user_target_stay_links(world: World) -> None:
    """Links to root's files inside a user's target: resync, unsync, the crash snapshot and
    restore keep them as links and never write to, chmod or read through them."""
    target = user_target(world)
    f, d = canaries(world)
    world.write_conf(target)
    world.asd("sync", check=True)
    made = as_user(
        world,
        'cd "$1" && ln -s "$2" etc-file && ln -s "$3" etc-dir && ln -s /root root-dir',
        str(target),
        str(f),
        str(d),
    )
    assert made.returncode == 0, made.stderr
    world.asd("resync", check=True)
    world.power_cut()
    world.boot()
    world.asd("sync", check=True)  # recovery: snapshot of the disk copy with the links
    world.asd("unsync", check=True)
    assert os.readlink(target / "etc-file") == str(f) and os.readlink(target / "etc-dir") == str(d)
    restored = world.asd("restore", str(target))
    assert restored.returncode == 0, restored.stderr
    for name in ("etc-file", "etc-dir", "root-dir"):
        assert (target / name).is_symlink(), f"{name} is no longer a symlink after restore"
    assert_canaries(f, d)
    assert sorted(os.listdir(d)) == [], f"something was written into {d}"
    record("hostile", f"symlinks to root's files in a user target ({mode(world)})", "kept as links")
