"""Injected faults: each makes the operation fail with a message naming the file, a non-zero
exit, the disk copy still at one sync point, the RAM copy untouched — and once the fault is
gone, the next resync succeeds and the disk copy equals RAM.

Faults come from strace (`-e inject=SYSCALL:error=…`, limited to one file with `-P`), on the
asd process itself or, through a wrapper found first on PATH, on rsync and its children; from
real full file systems (an 8 MiB ext4 image on a loop device, mounted inside the namespace;
a tmpfs with too few inodes); from a read-only remount; from tools missing or killed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from asd.layout import WORK_NAME, Instance, TargetLayout
from tests.integration.conftest import CHANGES, populate
from tests.integration.manifest import differences, manifest
from tests.integration.test_lifecycle import inside_manifest
from tests.integration.test_power_cut import snapshots_of
from tests.reliability.conftest import World, record

pytestmark = pytest.mark.overlay_in_full  # the faults hit rsync and the journal alike in both

BIN_DIRS = ("/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin")


def tools(
    world: World, *, drop: tuple[str, ...] = (), wrap: dict[str, str] | None = None
) -> dict[str, str]:
    """An environment whose PATH has every program of this machine but ``drop``, and the
    given wrapper scripts in place of the real programs."""
    d = world.base / "bin"
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir()
    for src in BIN_DIRS:
        if not os.path.isdir(src):
            continue
        for name in os.listdir(src):
            if name not in drop and not os.path.lexists(d / name):
                os.symlink(os.path.join(src, name), d / name)
    for name, script in (wrap or {}).items():
        (d / name).unlink(missing_ok=True)
        (d / name).write_text(f"#!/bin/sh\n{script}\n")
        (d / name).chmod(0o755)
    return {"PATH": str(d)}


def real(name: str) -> str:
    found = shutil.which(name, path="/usr/bin:/bin:/usr/sbin:/sbin")
    assert found, f"{name} is needed"
    return found


def mode(world: World) -> str:
    return "overlay" if world.overlay else "copy"


def layout_of(world: World, target: Path) -> TargetLayout:
    return Instance(world.conf, world.volatile).target(target)


class Synced:
    """A target synced, changed in RAM (CHANGES), with the disk copy at the first sync point."""

    def __init__(self, world: World, target: Path) -> None:
        self.world = world
        self.target = target
        self.layout = layout_of(world, target)

    def start(self) -> Synced:
        populate(self.target)
        self.world.write_conf(self.target)
        self.world.asd("sync", check=True)
        self.disk_before = self.disk()
        self.world.run(["sh", "-c", CHANGES, "changes", str(self.target)], check=True)
        self.ram_before = self.ram()
        return self

    def disk(self) -> dict[str, Any]:
        """The disk copy, through the backup mount inside the namespace."""
        return inside_manifest(self.world, self.layout.backup)

    def ram(self) -> dict[str, Any]:
        return inside_manifest(self.world, self.target)

    def failed_cleanly(self, proc: subprocess.CompletedProcess[str], *names: str) -> None:
        assert proc.returncode == 1, f"exit {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
        for name in names:
            assert name in proc.stderr, f"the message does not name {name!r}: {proc.stderr}"
        assert "Traceback" not in proc.stderr
        disk = self.disk()
        assert disk == self.disk_before, (
            f"disk copy changed: {differences(self.disk_before, disk)[:5]}"
        )
        assert self.ram() == self.ram_before, "the RAM copy changed"
        assert not self.world.sh(f"ls -A {self.layout.disk_work}").stdout.count("stage")

    def recovers(self) -> None:
        """The fault gone, a resync writes RAM to disk exactly."""
        again = self.world.asd("resync")
        assert again.returncode == 0, again.stderr
        assert self.disk() == self.ram() == self.ram_before


@pytest.fixture
def synced(world: World) -> Iterator[Synced]:
    yield Synced(world, world.target("t")).start()


def strace(*args: str) -> tuple[str, ...]:
    """A prefix injecting into the asd process only (its children run untouched)."""
    return ("strace", "-o", "/dev/null", *args)


@pytest.mark.parametrize("fault", ["EIO", "EACCES"])
def test_rsync_cannot_read_one_ram_file(synced: Synced, fault: str) -> None:
    """The RAM copy's new/tree/file cannot be read (EIO) or opened (EACCES) by rsync. (A new
    file: one changed in place, like docs/a.txt, is read by asd itself for a patch.)"""
    ram_file = synced.layout.ram_copy / "new" / "tree" / "file"
    call = "read" if fault == "EIO" else "openat"
    # rsync reads through descriptors (matched by their path) and opens names relative to a
    # directory descriptor (`openat(4, "file")`, matched literally).
    inject = f"exec strace -f -o /dev/null -P {ram_file} -P file -e trace={call} "
    inject += f'-e inject={call}:error={fault} {real("rsync")} "$@"'
    proc = synced.world.asd("resync", env=tools(synced.world, wrap={"rsync": inject}))
    synced.failed_cleanly(proc, "new/tree/file")
    synced.recovers()
    record(
        "faults", f"{fault} on one RAM file, resync (rsync {call}) ({mode(synced.world)})", "passed"
    )


def acl_read_fails(world: World, fault: str) -> dict[str, str]:
    """rsync's sender gets ``fault`` reading the ACL of new/tree/file (after listing it): what
    a file deleted in between looks like, when ``fault`` is ENOENT."""
    inject = "exec strace -f -o /dev/null -P new/tree/file -e trace=getxattr "
    inject += f'-e inject=getxattr:error={fault} {real("rsync")} "$@"'
    return tools(world, wrap={"rsync": inject})


def test_a_file_gone_before_rsync_reads_its_acl(synced: Synced) -> None:
    """Seen under churn (a browser pruning its cache): rsync says exit 23, not 24. The resync
    writes everything else and takes the file as gone, as it was at that moment: the disk
    copy is a state the target passed through (what the churn test checks) — not the file's
    older version, and not the file written without its ACL. The next resync catches up."""
    proc = synced.world.asd("resync", env=acl_read_fails(synced.world, "ENOENT"))
    assert proc.returncode == 0, proc.stderr
    assert "1 vanished while copying" in proc.stdout + proc.stderr, proc.stdout + proc.stderr
    disk = synced.disk()
    assert "new/tree/file" not in disk
    rest = {k: v for k, v in disk.items() if k != "new/tree/file"}
    assert rest == {k: v for k, v in synced.ram_before.items() if k != "new/tree/file"}
    assert synced.ram() == synced.ram_before
    synced.recovers()
    record("faults", f"a file gone before rsync reads its ACL ({mode(synced.world)})", "passed")


def test_eio_reading_a_ram_files_acl_is_no_vanish(synced: Synced) -> None:
    proc = synced.world.asd("resync", env=acl_read_fails(synced.world, "EIO"))
    synced.failed_cleanly(proc, "new/tree/file", "Input/output error")
    synced.recovers()
    record("faults", f"EIO reading one RAM file's ACL ({mode(synced.world)})", "passed")


def test_eio_making_the_stage_durable(synced: Synced) -> None:
    """The disk reports lost writes when the stage is flushed (syncfs: how write-back errors
    reach programs since Linux 5.8): nothing is committed."""
    stage = synced.layout.stage
    prefix = strace("-P", str(stage), "-e", "trace=syncfs", "-e", "inject=syncfs:error=EIO")
    proc = synced.world.asd("resync", prefix=prefix)
    synced.failed_cleanly(proc, f"{WORK_NAME}/stage", "Input/output error")
    synced.recovers()
    record("faults", f"EIO from syncfs of the stage (asd) ({mode(synced.world)})", "passed")


def test_eio_making_the_applied_record_durable(synced: Synced) -> None:
    """The renames are done but the flush after them fails: the record must stay, so the next
    resync applies it again (idempotent) and flushes."""
    backup = synced.layout.backup
    prefix = strace("-P", str(backup), "-e", "trace=syncfs", "-e", "inject=syncfs:error=EIO")
    proc = synced.world.asd("resync", prefix=prefix)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Input/output error" in proc.stderr and str(backup) in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    assert synced.ram() == synced.ram_before
    assert synced.world.sh(f"ls {synced.layout.commit_record}", check=False).returncode == 0
    synced.recovers()
    record("faults", f"EIO from syncfs after applying the record ({mode(synced.world)})", "passed")


def test_eio_renaming_into_place_after_the_commit_point(synced: Synced) -> None:
    """The commit record is durable; the apply then fails. The record is rolled forward by
    the next resync — or, after a power cut, by the next start."""
    # renameat #1 is the commit record (written relative to the journal's descriptor).
    prefix = strace("-e", "trace=renameat", "-e", "inject=renameat:error=EIO:when=2")
    proc = synced.world.asd("resync", prefix=prefix)
    assert proc.returncode == 1 and "Input/output error" in proc.stderr
    assert str(synced.layout.backup) in proc.stderr, proc.stderr
    assert synced.ram() == synced.ram_before
    assert synced.world.sh(f"ls {synced.layout.commit_record}", check=False).returncode == 0
    synced.recovers()
    record(
        "faults",
        f"EIO renaming a staged file after the commit point (asd) ({mode(synced.world)})",
        "passed",
    )


def patched_next(synced: Synced) -> Path:
    """Resync twice, appending to app.log before each, then append again: the next resync
    patches it in place (`asd.patch`). In overlay mode the first resync replaces app.log
    (the lower layer links it) and may give the RAM back, after which the delta links it;
    the second replaces it again and keeps it in the new upper layer (changed at both)."""
    world = synced.world
    world.asd("resync", check=True)
    world.sh(f"echo 'written after the first resync' >> {synced.target}/app.log")
    world.asd("resync", check=True)
    world.sh(f"echo 'written after the second resync' >> {synced.target}/app.log")
    synced.disk_before, synced.ram_before = synced.disk(), synced.ram()
    return synced.layout.backup / "app.log"


def test_enospc_writing_a_patch_after_the_commit_point(synced: Synced) -> None:
    """A patch can need space after the commit point (an append allocates blocks). The apply
    stops, the record and the staged blocks stay, and the next resync rolls it forward."""
    disk_file = patched_next(synced)
    prefix = strace(
        "-P", str(disk_file), "-e", "trace=pwrite64", "-e", "inject=pwrite64:error=ENOSPC"
    )
    proc = synced.world.asd("resync", prefix=prefix)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "app.log" in proc.stderr and "No space left" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    assert synced.ram() == synced.ram_before
    assert synced.world.sh(f"ls {synced.layout.commit_record}", check=False).returncode == 0
    synced.recovers()
    record(
        "faults", f"ENOSPC writing a patch after the commit point ({mode(synced.world)})", "passed"
    )


def test_eio_reading_the_disk_file_a_patch_compares_with(synced: Synced) -> None:
    """The disk copy's old version cannot be read: no patch, the file is copied whole (a new
    inode, where a patch keeps it)."""
    disk_file = patched_next(synced)

    def inode() -> str:
        return synced.world.run(["stat", "-c", "%i", str(disk_file)], check=True).stdout

    before = inode()
    prefix = strace("-P", str(disk_file), "-e", "trace=pread64", "-e", "inject=pread64:error=EIO")
    proc = synced.world.asd("resync", prefix=prefix)
    assert proc.returncode == 0, proc.stderr
    assert inode() != before, "app.log was not copied whole"
    assert synced.disk() == synced.ram() == synced.ram_before
    record(
        "faults",
        f"EIO reading the disk file a patch compares with ({mode(synced.world)})",
        "passed",
    )


def test_commit_record_cannot_be_written(synced: Synced) -> None:
    """ENOSPC writing the commit record: nothing committed, nothing changed."""
    tmp = synced.layout.disk_work / ".commit.json.tmp"
    prefix = strace("-P", str(tmp), "-e", "trace=write", "-e", "inject=write:error=ENOSPC")
    proc = synced.world.asd("resync", prefix=prefix)
    synced.failed_cleanly(proc, "commit.json", "No space left")
    synced.recovers()
    record("faults", f"ENOSPC writing the commit record (asd) ({mode(synced.world)})", "passed")


def test_disk_copy_really_full(world: World) -> None:
    """The disk copy lives on an 8 MiB ext4 image; RAM gets a 20 MiB file."""
    img = world.base / "small.img"
    subprocess.run(["mkfs.ext4", "-q", "-F", str(img), "8M"], check=True, capture_output=True)
    small = world.base / "small"
    small.mkdir()
    world.run(["mount", "-o", "loop", str(img), str(small)], check=True)
    world.run(["mkdir", str(small / "t")], check=True)
    s = Synced(world, small / "t")
    world.write_conf(s.target)
    world.sh(f"echo hello > {s.target}/kept; mkdir {s.target}/d; echo x > {s.target}/d/x")
    world.asd("sync", check=True)
    s.disk_before = s.disk()
    world.sh(f"echo changed > {s.target}/kept; head -c 20M /dev/urandom > {s.target}/d/big")
    s.ram_before = s.ram()
    proc = world.asd("resync")
    s.failed_cleanly(proc, "big", "No space left on device")
    free = world.run(["df", "--output=avail", "-B1", str(small)], check=True).stdout
    assert int(free.split()[-1]) > 5 * 2**20, "the failed stage was not removed"
    world.sh(f"rm {s.target}/d/big")  # the user frees the space
    s.ram_before = s.ram()
    s.recovers()
    record(
        "faults",
        f"ENOSPC, real: disk copy on a full ext4 ({mode(world)})",
        "passed",
    )


def test_volatile_out_of_inodes_during_sync(copy_world: World) -> None:
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
    assert proc.returncode == 1 and "No space left on device" in proc.stderr, proc.stderr
    assert "f0" in proc.stderr, f"no file named: {proc.stderr}"
    assert manifest(target) == before and world.mounted_at(target) == 0
    world.power_cut()
    world.volatile_size = "64m"
    world.boot()
    world.asd("sync", check=True)
    assert inside_manifest(world, target) == before
    record("faults", "ENOSPC, real: VOLATILE out of inodes during sync", "passed")


def test_disk_copy_remounted_read_only(synced: Synced) -> None:
    backup = synced.layout.backup
    synced.world.run(["mount", "-o", "remount,bind,ro", str(backup)], check=True)
    proc = synced.world.asd("resync")
    synced.failed_cleanly(proc, "Read-only file system", str(backup))
    synced.world.run(["mount", "-o", "remount,bind,rw", str(backup)], check=True)
    synced.recovers()
    record(
        "faults", f"disk copy remounted read-only during resync ({mode(synced.world)})", "passed"
    )


def test_rsync_missing_at_resync(synced: Synced) -> None:
    proc = synced.world.asd("resync", env=tools(synced.world, drop=("rsync",)))
    synced.failed_cleanly(proc, "rsync is not installed")
    synced.recovers()
    record("faults", f"rsync missing at resync ({mode(synced.world)})", "passed")


@pytest.mark.parametrize("who", ["receiver", "rsync"])
def test_rsync_killed_by_a_signal(synced: Synced, who: str) -> None:
    """SIGKILL: rsync's receiver at its first rename in the stage (mid-transfer; rsync then
    fails on the broken pipe), or the rsync asd started (asd sees the signal)."""
    if who == "receiver":
        inject = "exec strace -f -o /dev/null -e inject=rename,renameat,renameat2:signal=KILL "
        inject += f'{real("rsync")} "$@"'
        said = "rsync exited with status"
    else:
        inject = "kill -KILL $$"
        said = "rsync was killed by signal 9"
    proc = synced.world.asd("resync", env=tools(synced.world, wrap={"rsync": inject}))
    synced.failed_cleanly(proc, said)
    synced.recovers()
    record(
        "faults",
        f"SIGKILL to {'rsync' if who == 'rsync' else 'rsync receiver mid-transfer'}",
        "passed",
    )


@pytest.mark.parametrize("how", ["missing", "killed"])
def test_zstd_fails_during_the_crash_recovery_snapshot(copy_world: World, how: str) -> None:
    """After an unclean stop the snapshot cannot be made: asd does not start over the disk
    copy without it, leaves no partial file, and succeeds once zstd works. A missing zstd is
    found by sync's check of its tools, before recovery starts."""
    world = copy_world
    target = world.target("t")
    populate(target)
    world.write_conf(target)
    world.asd("sync", check=True)
    world.power_cut()
    world.boot()
    before = manifest(target)
    env = (
        tools(world, drop=("zstd",))
        if how == "missing"
        else tools(world, wrap={"zstd": "kill -KILL $$"})
    )
    proc = world.asd("sync", env=env)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    if how == "missing":
        assert "zstd is not installed" in proc.stderr, proc.stderr
    else:
        assert "Could not snapshot" in proc.stderr and str(target) in proc.stderr, proc.stderr
    assert manifest(target) == before and world.mounted_at(target) == 0
    assert not [p for p in os.listdir(world.disk) if "crashrecovery" in p]
    world.asd("sync", check=True)
    assert len(snapshots_of(target)) == 1
    assert inside_manifest(world, target) == before
    record("faults", f"zstd {how} during the crash-recovery snapshot", "passed")
