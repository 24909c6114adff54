"""Copy mode's change tracker, for real: resyncs that look only at what it names still leave
the disk copy exactly what RAM holds, and when it cannot vouch (killed, or its queue
overflowed) the resync walks instead."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.integration.conftest import World
from tests.integration.manifest import manifest
from tests.integration.test_lifecycle import inside_manifest

NAMED = "entries the change tracker named"

ROUNDS = [
    "mkdir -p new/dir && echo a > new/dir/a && echo b > base/b && ln -s b base/b.lnk",
    "rm new/dir/a && mv base/b base/b2 && echo v2 >> base/edit && chmod 600 base/keep",
    "mv new base/moved && rm base/keep && echo c > base/moved/dir/c && truncate -s 1 base/edit",
    "setfattr -n user.k -v v base/b2 && chmod 700 base && touch -d @1 base/moved",
    "rm -r base/moved && mkdir -p base/moved/again && echo x > base/moved/again/x",
    "rm base/b2 && mkdir base/b2 && echo in > base/b2/in && rm -r deep && echo f > deep",
]


def target_with_tree(world: World) -> Path:
    target = world.target("t")
    (target / "base").mkdir()
    (target / "base" / "keep").write_text("keep\n")
    (target / "base" / "edit").write_text("v1\n")
    (target / "deep" / "er").mkdir(parents=True)
    (target / "deep" / "er" / "f").write_text("f\n")
    world.write_conf(target)
    return target


def test_resyncs_write_what_the_tracker_names(copy_world: World) -> None:
    world = copy_world
    target = target_with_tree(world)
    world.asd("sync", check=True)
    assert len(world.trackers()) == 1, "sync started no change tracker"
    assert "change tracker: running" in world.asd("parse", check=True).stdout
    for i, script in enumerate(ROUNDS):
        world.run(["sh", "-c", f"cd {target} && {script}"], check=True)
        done = world.asd("--debug", "resync", check=True)
        assert NAMED in done.stderr, f"round {i}: the resync did not use the tracker"
        assert manifest(target) == inside_manifest(world, target), f"round {i}: disk differs"
    idle = world.asd("--debug", "resync", check=True)
    assert "nothing changed" in idle.stdout and "looked at 0 entries" in idle.stderr
    world.run(["sh", "-c", f"cd {target} && echo last > base/last && rm deep"], check=True)
    in_ram = inside_manifest(world, target)
    done = world.asd("--debug", "unsync", check=True)
    assert NAMED in done.stderr, "with nothing held, unsync's write-back walked"
    assert manifest(target) == in_ram
    assert world.trackers() == [], "the tracker outlived unsync"


def test_a_resync_walks_when_the_tracker_cannot_vouch(copy_world: World) -> None:
    world = copy_world
    target = target_with_tree(world)
    world.asd("sync", check=True)
    (pid,) = world.trackers()
    os.kill(pid, signal.SIGKILL)
    assert "change tracker: not running" in world.asd("parse", check=True).stdout
    world.run(["sh", "-c", f"cd {target} && {ROUNDS[0]}"], check=True)
    walked = world.asd("--debug", "resync", check=True)
    assert NAMED not in walked.stderr
    assert manifest(target) == inside_manifest(world, target)
    world.asd("unsync", check=True)

    # A new session has a new tracker; stopped, its kernel queue overflows.
    world.asd("sync", check=True)
    (pid,) = world.trackers()
    world.asd("resync", check=True)  # one resync through the tracker first: a token exists
    os.kill(pid, signal.SIGSTOP)
    many = f"for i in range(20000): open(f'{target}/base/n{{i}}', 'w').close()"
    try:
        world.run([sys.executable, "-c", many], check=True)
    finally:
        os.kill(pid, signal.SIGCONT)
    walked = world.asd("--debug", "resync", check=True)
    assert NAMED not in walked.stderr, "an overflowed period was trusted"
    assert len(os.listdir(target / "base")) == 20004  # keep, edit, b, b.lnk and the new
    assert manifest(target) == inside_manifest(world, target)
    again = world.asd("--debug", "resync", check=True)
    assert NAMED in again.stderr, "the tracker was not trusted again after the walk"
    world.asd("unsync", check=True)


def test_a_power_cut_takes_the_tracker_with_it(copy_world: World) -> None:
    world = copy_world
    target = target_with_tree(world)
    world.asd("sync", check=True)
    assert world.trackers()
    world.power_cut()
    world.boot()
    world.asd("sync", check=True)  # recovery, then a fresh tracker
    assert len(world.trackers()) == 1
    world.run(["sh", "-c", f"cd {target} && {ROUNDS[0]}"], check=True)
    assert NAMED in world.asd("--debug", "resync", check=True).stderr
    assert manifest(target) == inside_manifest(world, target)
    world.asd("unsync", check=True)


MAP_WRITE_UNMAP = r"""
import mmap, os, sys
fd = os.open(sys.argv[1], os.O_RDWR)
m = mmap.mmap(fd, 4096, mmap.MAP_SHARED)
os.close(fd)
m[0:6] = b"mapped"
m.close()
"""


def synced_with_a_store(world: World) -> Path:
    """A synced target holding ``store`` (4 KiB, "disk" at its start), resynced once through
    the tracker, so the next write-back can rest on it."""
    target = target_with_tree(world)
    with open(target / "store", "wb") as fh:
        fh.write(b"disk  " + b"\0" * 4090)
    world.asd("sync", check=True)
    world.asd("resync", check=True)
    return target


def test_a_file_written_through_a_mapping_that_is_gone_by_the_resync(copy_world: World) -> None:
    """No event for writes through a mapping; but the mapping's end is the file's last
    close, which is one."""
    world = copy_world
    target = synced_with_a_store(world)
    world.run([sys.executable, "-c", MAP_WRITE_UNMAP, str(target / "store")], check=True)
    done = world.asd("--debug", "resync", check=True)
    assert NAMED in done.stderr and "wrote 1 changed entries" in done.stdout, done.stdout
    assert (target / "store").read_bytes()[:6] == b"mapped"
    world.asd("unsync", check=True)


MAP_WRITE_UNMAP_HOLD = r"""
import mmap, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR)
m = mmap.mmap(fd, 4096, mmap.MAP_SHARED)
m[0:6] = b"mapped"
m.close()
print("written", flush=True)
time.sleep(600)
"""


def test_unsync_walks_while_a_file_is_held(copy_world: World) -> None:
    """A write through a mapping makes its event only when the file is closed: while a
    program still holds it open, unsync's write-back walks (and then refuses to unmount)."""
    world = copy_world
    target = synced_with_a_store(world)
    holder = world.spawn(
        [sys.executable, "-c", MAP_WRITE_UNMAP_HOLD, str(target / "store")], capture=True
    )
    assert holder.stdout is not None and holder.stdout.readline() == b"written\n"
    refused = world.asd("--debug", "unsync")
    assert refused.returncode == 1 and "in use" in refused.stderr, refused.stderr
    assert NAMED not in refused.stderr, "unsync trusted the tracker while a file was held"
    assert (target / "store").read_bytes()[:6] == b"mapped"
    holder.kill()
    holder.wait()
    world.asd("unsync", check=True)
    assert (target / "store").read_bytes()[:6] == b"mapped"


def held_at(trace: Path, call: str, proc: subprocess.Popen[bytes]) -> None:
    """Wait until strace, writing to ``trace``, holds ``proc`` at ``call``."""
    for _ in range(600):
        if trace.exists() and f"{call}(" in trace.read_text():
            return
        assert proc.poll() is None, f"asd ended before it reached {call}"
        time.sleep(0.05)
    raise AssertionError(f"asd never reached {call}")


def unsync_with_a_late_write(
    world: World, target: Path, *, rsync_fails: bool = False
) -> tuple[int, str]:
    """Run unsync under strace, which holds it at the unmount of the target for 3 s, after
    its last write-back; a program writes a file through the target meanwhile. With
    ``rsync_fails``, rsync (which only the look after the unmount needs) exits 12."""
    trace = world.base / "umount.trace"
    delay = (
        "strace", "-o", str(trace), "-P", str(target), "-e", "trace=umount2",
        "-e", "inject=umount2:delay_enter=3000000:when=1",
    )  # fmt: skip
    env: list[str] = []
    if rsync_fails:
        bin_dir = world.base / "failing-bin"
        bin_dir.mkdir()
        (bin_dir / "rsync").write_text("#!/bin/sh\necho 'rsync: broken' >&2\nexit 12\n")
        (bin_dir / "rsync").chmod(0o755)
        env = ["env", f"PATH={bin_dir}:{os.environ['PATH']}"]
    command = [*env, *delay, sys.executable, "-m", "asd", "-c", str(world.conf), "unsync"]
    stopping = world.spawn(command, capture=True)
    held_at(trace, "umount2", stopping)
    world.sh(f"echo late > {target}/base/late && echo v3 >> {target}/base/edit")
    out, err = stopping.communicate(timeout=120)
    return stopping.returncode, err.decode(errors="replace")


def test_unsync_catches_a_write_made_just_before_the_unmount(world: World) -> None:
    """The write made between the last write-back and the unmount is on disk after unsync."""
    target = target_with_tree(world)
    world.asd("sync", check=True)
    code, err = unsync_with_a_late_write(world, target)
    assert code == 0, err
    assert (target / "base" / "late").read_text() == "late\n"
    assert (target / "base" / "edit").read_text() == "v1\nv3\n"


def test_unsync_stops_the_tracker_before_it_removes_the_ram_copy(copy_world: World) -> None:
    """Each file removed while the tracker's mark is on VOLATILE makes an event: unsync asks
    the tracker to stop (it closes the mark before it answers) before rm runs."""
    world = copy_world
    target_with_tree(world)
    world.asd("sync", check=True)
    trace = world.base / "unsync.trace"
    strace = ("strace", "-f", "-o", str(trace), "-s", "16", "-e", "trace=sendto,execve")
    world.asd("unsync", check=True, prefix=strace)
    lines = trace.read_text().splitlines()
    stop = [i for i, line in enumerate(lines) if "sendto(" in line and '"stop\\n"' in line]
    rm = [i for i, line in enumerate(lines) if "execve(" in line and "/rm" in line]
    assert stop and rm, "no stop request or no rm in the trace"
    assert stop[0] < rm[0], "rm ran while the tracker still watched"
    assert world.trackers() == []


def test_a_second_targets_copy_is_not_news_to_the_first(copy_world: World) -> None:
    """Two targets, the second of 101 000 files: the tracker starts once every RAM copy is
    made. Started with the first target's index, it saw each file copied for the second
    as a change, more than a period keeps (`tracker.MAX_NAMES`), and the first target's
    resync then walked its whole RAM copy."""
    world = copy_world
    first = target_with_tree(world)
    second = world.target("second")
    for d in range(101):
        (second / f"d{d}").mkdir()
        for f in range(1000):
            (second / f"d{d}" / f"f{f}").touch()  # no data: VOLATILE is small here
    world.write_conf(first, second)
    world.asd("sync", check=True)
    done = world.asd("--debug", "resync", check=True)
    for target in (first, second):
        assert f"{target}: looked at 0 {NAMED}" in done.stderr, done.stderr[-2000:]
    world.asd("unsync", check=True)
