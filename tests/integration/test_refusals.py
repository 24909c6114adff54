"""Bad input and hostile surroundings: a clear error, a non-zero exit, and nothing changed."""

from __future__ import annotations

import os
import shutil
import sys
import time
from collections.abc import Set as AbstractSet
from pathlib import Path

import pytest

from asd import links, lower
from asd.errors import CommandError, SafetyError
from asd.run import run, run_together
from tests.integration.conftest import World, snapshot_of_v1_and_v2_in_ram
from tests.integration.manifest import manifest

PWNED = Path("/var/tmp/asd-test-pwned")


def assert_untouched(world: World, target: Path, before: dict[str, object]) -> None:
    assert world.asd_mounts() == [], "something was left mounted"
    assert manifest(target) == before, "the target changed"
    assert not (target / ".asd-work").exists()
    assert not any(n.endswith("-backup_asd") for n in os.listdir(target.parent))
    assert world.run(["ls", "-A", str(world.volatile)], check=True).stdout == ""
    assert world.run(["test", "-e", "/run/asd/" + "x"]).returncode != 0


BAD_CONFIGS = {
    "relative": ("WHATTOSYNC=('relative/dir')", "absolute"),
    "empty path": ("WHATTOSYNC=('')", ""),
    "root": ("WHATTOSYNC=('/')", "/"),
    "proc": ("WHATTOSYNC=('/proc/sys')", "/proc"),
    "missing": ("WHATTOSYNC=('{base}/nope')", "nope"),
    "a file": ("WHATTOSYNC=('{base}/asd.conf')", "asd.conf"),
    "nested": ("WHATTOSYNC=('{t}' '{t}/sub')", "sub"),
    "duplicate": ("WHATTOSYNC=('{t}' '{t}/')", "{t}"),
    "inside volatile": ("WHATTOSYNC=('{vol}/x')", "VOLATILE"),
    "volatile inside target": ("WHATTOSYNC=('{t}')\nVOLATILE='{t}/ram'", "VOLATILE"),
    "volatile on disk": ("WHATTOSYNC=('{t}')\nVOLATILE='{base}/ondisk'", "tmpfs"),
    "typo": ("WHATTOSNYC=('{t}')", "WHATTOSYNC"),
    "command substitution": ("WHATTOSYNC=('{t}')\nVOLATILE=$(touch " + str(PWNED) + ")", "$("),
    "backticks": ("WHATTOSYNC=(`touch " + str(PWNED) + "`)", "`"),
    "second command": ("WHATTOSYNC=('{t}'); touch " + str(PWNED), "touch"),
    "bare command": ("touch " + str(PWNED), "touch"),
    "bad boolean": ("WHATTOSYNC=('{t}')\nUSE_OVERLAYFS=maybe", "maybe"),
    "bad limit": ("WHATTOSYNC=('{t}')\nBACKUP_LIMIT=-3", "-3"),
    "unterminated": ("WHATTOSYNC=('{t}'", "WHATTOSYNC"),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_bad_config_is_refused_with_exit_2(copy_world: World, case: str) -> None:
    world = copy_world
    target = world.target("t")
    (target / "sub").mkdir()
    (target / "f").write_text("data\n")
    before = manifest(target)
    text, needle = BAD_CONFIGS[case]
    fill = {"base": world.base, "t": target, "vol": world.volatile}
    (world.volatile / "x").mkdir(exist_ok=True)
    (world.base / "ondisk").mkdir(exist_ok=True)
    world.conf.write_text(text.format(**fill) + "\n")
    PWNED.unlink(missing_ok=True)
    proc = world.asd("sync")
    assert proc.returncode == 2, proc.stderr
    assert "asd: error:" in proc.stderr
    assert needle.format(**fill) in proc.stderr
    assert not PWNED.exists(), "asd executed part of its config"
    (world.volatile / "x").rmdir()
    assert_untouched(world, target, before)


def test_all_config_problems_reported_at_once(copy_world: World) -> None:
    world = copy_world
    world.conf.write_text("WHATTOSYNC=('rel')\nUSE_BACKUPS=perhaps\nBACKUP_LIMT=3\n")
    proc = world.asd("parse")
    assert proc.returncode == 2
    for line in (":1:", ":2:", ":3:"):
        assert f"{world.conf}{line}" in proc.stderr


@pytest.mark.parametrize("kind", ["symlink", "foreign-owner", "world-writable"])
def test_hostile_ram_directory_is_refused(copy_world: World, kind: str) -> None:
    """A local user pre-creates asd's directory in the world-writable VOLATILE."""
    from asd.layout import Instance

    world = copy_world
    target = world.target("t")
    (target / "f").write_text("data\n")
    world.write_conf(target)
    before = manifest(target)
    ram_root = Instance(world.conf, world.volatile).ram_root
    if kind == "symlink":
        world.run(
            [
                "setpriv",
                "--reuid=1234",
                "--regid=1234",
                "--clear-groups",
                "ln",
                "-s",
                "/etc",
                str(ram_root),
            ],
            check=True,
        )
    elif kind == "foreign-owner":
        world.run(
            [
                "setpriv",
                "--reuid=1234",
                "--regid=1234",
                "--clear-groups",
                "mkdir",
                "-m",
                "700",
                str(ram_root),
            ],
            check=True,
        )
    else:
        world.run(["mkdir", "-m", "777", str(ram_root)], check=True)
    proc = world.asd("sync")
    assert proc.returncode == 1
    assert str(ram_root) in proc.stderr and "private directory of root" in proc.stderr
    assert world.asd_mounts() == []
    assert manifest(target) == before
    assert not os.path.exists("/etc/var"), "asd wrote through the planted symlink"
    assert not (target / ".asd-work").exists()


def test_ram_budget_refuses_with_both_numbers(copy_world: World) -> None:
    world = copy_world
    world.power_cut()
    world.volatile_size = "8m"
    world.boot()
    target = world.target("big")
    (target / "blob").write_bytes(os.urandom(12 * 1024 * 1024))
    world.write_conf(target)
    before = manifest(target)
    proc = world.asd("sync")
    assert proc.returncode == 1
    assert "RAM" in proc.stderr and "MiB" in proc.stderr and "free" in proc.stderr
    assert_untouched(world, target, before)


def test_enospc_during_copy_is_undone(copy_world: World) -> None:
    """The byte budget passes, but VOLATILE runs out of inodes mid-copy (cp fails)."""
    world = copy_world
    world.power_cut()
    world.volatile_size = "64m,nr_inodes=40"
    world.boot()
    target = world.target("many")
    for i in range(200):
        (target / f"f{i:03}").write_text(str(i))
    world.write_conf(target)
    before = manifest(target)
    proc = world.asd("sync")
    assert proc.returncode == 1
    assert f"Could not copy {target} into RAM" in proc.stderr, proc.stderr
    assert "No space left on device" in proc.stderr and "undoing" in proc.stderr
    assert_untouched(world, target, before)


def test_hard_links_outside_the_target(world: World) -> None:
    """Refused in both modes, naming the file, and nothing is left: in overlay mode not the
    lower tree either, which is built before the check there. Links inside are fine."""
    target = world.target("t")
    (target / "sub").mkdir()
    (target / "inside").write_text("shared\n")
    (target / "pair").write_text("both names inside\n")
    os.link(target / "pair", target / "sub/pair")
    os.link(target / "inside", world.disk / "outside")
    world.write_conf(target)
    before = manifest(target)
    proc = world.asd("sync")
    assert proc.returncode == 1 and "hard-linked" in proc.stderr and "inside" in proc.stderr
    assert "pair" not in proc.stderr
    assert_untouched(world, target, before)
    os.unlink(world.disk / "outside")
    world.asd("sync", check=True)
    world.asd("unsync", check=True)
    os.link(target / "inside", world.disk / "outside")
    world.write_conf(target, extra="ENABLE_HARDLINK_SAFETY_CHECK=0\n")
    assert world.asd("sync").returncode == 0


def test_missing_tool_fails_cleanly(copy_world: World) -> None:
    world = copy_world
    target = world.target("t")
    (target / "f").write_text("data\n")
    world.write_conf(target)
    before = manifest(target)
    proc = world.run(
        ["env", "PATH=/nonexistent", sys.executable, "-m", "asd", "-c", str(world.conf), "sync"]
    )
    assert proc.returncode == 1
    assert "is not installed" in proc.stderr
    assert_untouched(world, target, before)


def test_a_missing_zstd_is_named_before_anything_is_done(copy_world: World) -> None:
    """Crash recovery's snapshot needs tar and zstd: a sync finds out at its start, not after
    a power cut, when recovery would be the first to run them."""
    world = copy_world
    target = world.target("t")
    (target / "f").write_text("data\n")
    world.write_conf(target)
    before = manifest(target)
    bin_dir = world.base / "bin"
    bin_dir.mkdir()
    for tool in ("mount", "umount", "rsync", "cp", "tar", "rm", "find", "findmnt"):
        found = shutil.which(tool)
        if found:
            (bin_dir / tool).symlink_to(found)
    argv = [sys.executable, "-m", "asd", "-c", str(world.conf), "sync"]
    proc = world.run(["env", f"PATH={bin_dir}", *argv])
    assert proc.returncode == 1 and "zstd is not installed" in proc.stderr, proc.stderr
    assert_untouched(world, target, before)
    world.conf.write_text(world.conf.read_text() + 'USE_BACKUPS="no"\n')
    world.run(["env", f"PATH={bin_dir}", *argv], check=True)  # without snapshots, no zstd


def test_sigterm_during_sync_undoes_and_exits_143(copy_world: World) -> None:
    world = copy_world
    target = world.target("t")
    (target / "f").write_text("data\n")
    world.write_conf(target)
    before = manifest(target)
    proc = world.run(
        [
            "strace",
            "-o",
            "/dev/null",
            "-e",
            "trace=renameat",
            "-e",
            "inject=renameat:signal=TERM:when=4",  # the 4th run-state write: mid-sync
            sys.executable,
            "-m",
            "asd",
            "-c",
            str(world.conf),
            "sync",
        ]
    )
    assert proc.returncode == 143, proc.stderr
    assert "stopped by SIGTERM" in proc.stderr
    assert_untouched(world, target, before)
    assert world.asd("sync").returncode == 0


def test_restore_is_safe_and_refused_while_running(copy_world: World) -> None:
    world = copy_world
    target = snapshot_of_v1_and_v2_in_ram(world, "t")
    refused = world.asd("restore")
    assert refused.returncode == 1 and "running" in refused.stderr
    world.asd("unsync", check=True)
    assert (target / "f").read_text() == "v2\n"
    done = world.asd("restore", check=True)
    assert "Restored" in done.stdout
    assert (target / "f").read_text() == "v1\n"
    aside = [p for p in world.disk.iterdir() if p.name.startswith("t-bad-")]
    assert len(aside) == 1 and (aside[0] / "f").read_text() == "v2\n"


def test_restore_refuses_a_crafted_snapshot(copy_world: World) -> None:
    import io
    import tarfile

    world = copy_world
    target = world.target("t")
    (target / "f").write_text("mine\n")
    world.write_conf(target)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        top = tarfile.TarInfo("./")
        top.type = tarfile.DIRTYPE
        tar.addfile(top)
        evil = tarfile.TarInfo("../../escaped")
        evil.size = 4
        tar.addfile(evil, io.BytesIO(b"evil"))
    raw = world.base / "evil.tar"
    raw.write_bytes(buf.getvalue())
    snap = world.disk / ".t-backup_asd-crashrecovery-20200101_000000.tar.zstd"
    world.run(["zstd", "-q", "-o", str(snap), str(raw)], check=True)
    proc = world.asd("restore", str(snap))
    assert proc.returncode == 1 and ".." in proc.stderr
    assert (target / "f").read_text() == "mine\n"
    assert not (world.base / "escaped").exists() and not Path("/var/tmp/escaped").exists()
    assert not [p for p in world.disk.iterdir() if "-bad-" in p.name]


def test_the_link_check_with_the_real_find(tmp_path: Path) -> None:
    """`asd.links` with find(1) itself: odd names, links inside, asd's own directory."""
    target = tmp_path / "t"
    (target / ".asd-work").mkdir(parents=True)
    (target / "a b\nc").write_text("split")
    os.link(target / "a b\nc", tmp_path / "outside")
    (target / "pair").write_text("inside")
    os.link(target / "pair", target / "pair2")
    (target / "alone").write_text("one name")
    os.link(target / "alone", target / ".asd-work/twin")  # asd's tree is not looked at
    assert links.linked_outside(target, frozenset({".asd-work"})) == ["a b\nc", "alone"]
    assert links.linked_outside(target, frozenset({".asd-work"}), names_per_file=2) == []
    os.unlink(tmp_path / "outside")
    assert links.linked_outside(target, frozenset({".asd-work"})) == ["alone"]


def test_the_link_check_run_while_the_lower_tree_is_made(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`links.linked_outside_while`: find walks while the tree is brought up to date. Here the
    tree waits until find is done (a handful of files), so what find could not see, a new
    file's outside link, must come from the links the tree made."""
    target, outside = tmp_path / "t", tmp_path / "outside"
    work = target / ".asd-work"
    (target / "d").mkdir(parents=True)
    work.mkdir()
    outside.mkdir()
    (target / "old").write_text("there at the last stop")
    (target / "d/x").write_text("x")

    def mirror() -> int:
        time.sleep(0.5)
        return lower.refresh(target, work / "lower", work / "lower.json", {".asd-work"}).shared

    exact: list[Path] = []
    real = links.linked_outside

    def counted(root: Path, exclude_top: AbstractSet[str], names_per_file: int) -> list[str]:
        exact.append(root)
        return real(root, exclude_top, names_per_file)

    monkeypatch.setattr(links, "linked_outside", counted)

    def check() -> list[str]:
        return links.linked_outside_while(target, {".asd-work"}, mirror)

    assert check() == [] and exact == []  # built from nothing: find's walk was enough
    assert check() == [] and exact == []  # kept
    (target / "d/new").write_text("made while asd was stopped")
    os.link(target / "d/new", outside / "new")  # 1 link when find looked, 3 after the tree's
    assert check() == ["d/new"] and exact == [target]
    os.unlink(outside / "new")
    os.link(target / "old", outside / "old")  # its twin was there: find sees 3 links
    exact.clear()
    assert check() == ["old"]
    os.unlink(outside / "old")
    (target / "d/pair").write_text("two names, both inside")
    os.link(target / "d/pair", target / "pair")
    exact.clear()
    assert check() == [] and exact == [target]  # not refused: checked again on the tree
    assert lower.is_mirror(target, work / "lower", frozenset({".asd-work"}))


def test_a_failure_alongside_a_command_kills_it(tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"

    def fail() -> None:
        while not pidfile.exists() or not pidfile.read_text().endswith("\n"):
            time.sleep(0.01)
        raise SafetyError("the work alongside failed")

    with pytest.raises(SafetyError, match="alongside failed"):
        run(["sh", "-c", f"echo $$ > {pidfile}; exec sleep 60"], alongside=fail)
    assert not Path(f"/proc/{pidfile.read_text().strip()}").exists()  # killed and reaped


def test_commands_run_together_at_once_and_the_first_failure_is_raised(tmp_path: Path) -> None:
    flag = tmp_path / "flag"
    waits = ["timeout", "10", "sh", "-c", f"while [ ! -e {flag} ]; do sleep 0.01; done"]
    run_together([waits, ["touch", str(flag)]])  # one after the other, timeout would exit 124
    with pytest.raises(CommandError) as failed:
        run_together([["true"], ["sh", "-c", "echo bad >&2; exit 3"], ["sh", "-c", "exit 4"]])
    assert failed.value.exit_code == 3 and "bad" in failed.value.stderr
    odd = tmp_path / os.fsdecode(b"caf\xe9")  # a name that is not UTF-8, passed as its bytes
    run_together([["touch", str(odd)]])
    assert os.fsencode(odd.name) in os.listdir(os.fsencode(tmp_path))
