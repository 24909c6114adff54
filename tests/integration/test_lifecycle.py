"""sync → use → resync → unsync, in copy and overlay mode, checked on disk and in RAM."""

from __future__ import annotations

import json
import os
import pickle
import re
import shlex
import stat
import subprocess
import sys
import time

from asd.layout import backup_path
from tests.integration.conftest import CHANGES, World, populate
from tests.integration.manifest import asd_left, manifest


def inside_manifest(world: World, path: os.PathLike[str]) -> dict[str, object]:
    code = (
        "import pickle, sys; from pathlib import Path; "
        "from tests.integration.manifest import asd_left, manifest; "
        f"sys.stdout.write(pickle.dumps(manifest(Path({str(path)!r}))).hex())"
    )
    proc = world.run([sys.executable, "-c", code], check=True)
    data: dict[str, object] = pickle.loads(bytes.fromhex(proc.stdout))  # noqa: S301 - our own output
    return data


def test_full_cycle_is_transparent_and_lands_on_disk(world: World) -> None:
    target = world.target("home/user/.cache")
    populate(target)
    before = manifest(target)
    world.write_conf(target)

    synced = world.asd("sync", check=True)
    assert "now served from RAM" in synced.stdout
    assert inside_manifest(world, target) == before, "the RAM copy differs from the disk copy"
    assert world.mounted_at(target) == 1
    backup = target.parent / ".cache-backup_asd"
    assert world.mounted_at(backup) == 1, "disk copy not reachable beside it"

    world.run(["sh", "-c", CHANGES, "changes", str(target)], check=True)
    in_ram = inside_manifest(world, target)
    assert in_ram != before
    assert manifest(target) == before, "writes reached the disk before any resync"

    world.asd("resync", check=True)
    assert manifest(target) == in_ram, "after resync the disk copy is not what RAM holds"
    assert not (target / ".asd-work" / "stage").exists()
    idle = world.asd("resync", check=True)
    assert "nothing changed" in idle.stdout

    world.asd("unsync", check=True)
    assert manifest(target) == in_ram
    assert inside_manifest(world, target) == in_ram
    assert world.asd_mounts() == []
    assert not backup.exists()
    assert asd_left(target) == [] and (world.overlay or not (target / ".asd-work").exists())
    assert os.listdir(world.volatile) == [] or not inside_listdir(world, world.volatile)
    sparse = os.lstat(target / "sparse.img")
    assert sparse.st_blocks * 512 < 1024 * 1024, "the sparse file was filled in"
    assert os.lstat(target / "b-link").st_ino == os.lstat(target / "docs/deep/er/b.txt").st_ino


def inside_listdir(world: World, path: os.PathLike[str] | str) -> list[str]:
    return world.run(["ls", "-A", str(path)], check=True).stdout.split()


def test_nothing_left_in_volatile_after_unsync(world: World) -> None:
    target = world.target("srv/http")
    (target / "index.html").write_text("hi")
    world.write_conf(target)
    world.asd("sync", check=True)
    assert inside_listdir(world, world.volatile) == ["asd-root-" + world_instance(world)]
    world.asd("unsync", check=True)
    assert inside_listdir(world, world.volatile) == []
    # Only the lock file stays (removing a lock file races the next locker); no run state.
    assert [n for n in inside_listdir(world, "/run/asd") if not n.endswith(".lock")] == []


def test_a_mount_left_in_an_ram_directory_of_asd_is_not_emptied(overlay_world: World) -> None:
    """Unsync removes the overlay's RAM directories in-process (`dirfd.remove_unmounted`):
    one with something mounted inside is left whole and named, and the next unsync, once
    that is gone, finishes."""
    from asd.layout import Instance

    world = overlay_world
    target = world.target("t")
    (target / "f").write_text("on disk\n")
    world.write_conf(target)
    world.asd("sync", check=True)
    stray = Instance(world.conf, world.volatile).target(target).overlay_dir / "stray"
    world.run(["sh", "-c", f"mkdir {stray} && mount -t tmpfs stray {stray}"], check=True)
    world.run(["sh", "-c", f"echo mine > {stray}/kept"], check=True)
    proc = world.asd("unsync")
    assert proc.returncode == 1 and f"{stray} is mounted inside" in proc.stderr, proc.stderr
    assert world.run(["cat", f"{stray}/kept"], check=True).stdout == "mine\n"
    assert (target / "f").read_text() == "on disk\n"
    world.run(["umount", str(stray)], check=True)
    world.asd("unsync", check=True)
    assert inside_listdir(world, world.volatile) == []
    assert world.asd_mounts() == []


def test_a_target_whose_own_path_is_not_utf8(world: World) -> None:
    """A path is bytes: a target named in Latin-1 is synced, resynced and unsynced like any
    other (every command asd runs gets it as the very bytes; sh would otherwise refuse it)."""
    target = world.target(os.fsdecode(b"caf\xe9"))
    (target / "f").write_text("on disk\n")
    for i in range(20):  # enough directories for the RAM copy's removal to be shared
        (target / f"d{i:02}").mkdir()
        (target / f"d{i:02}" / os.fsdecode(b"\xe9t\xe9")).write_text(f"{i}\n")
    mode = "yes" if world.overlay else "no"
    conf = f'WHATTOSYNC=(\'{target}\')\nVOLATILE="{world.volatile}"\nUSE_OVERLAYFS="{mode}"\n'
    world.conf.write_bytes(os.fsencode(conf))
    world.asd("sync", check=True)
    world.sh(f"echo in RAM >> '{target}/f' && rm -r '{target}/d07'")
    world.asd("resync", check=True)
    in_ram = inside_manifest(world, target)
    world.asd("unsync", check=True)
    assert manifest(target) == in_ram
    assert (target / "f").read_text() == "on disk\nin RAM\n" and not (target / "d07").exists()
    assert inside_listdir(world, world.volatile) == [] and world.asd_mounts() == []


def test_a_mount_left_in_the_ram_copy_is_not_emptied(copy_world: World) -> None:
    """Unsync removes copy mode's RAM copy with two rm processes, each given half of its
    directories (`steps.remove_copy`): one of them holding a mount refuses to cross into
    it, as a single rm would, and the next unsync, once it is gone, finishes."""
    from asd.layout import Instance

    world = copy_world
    target = world.target("t")
    for i in range(20):
        (target / f"d{i:02}").mkdir()
        (target / f"d{i:02}" / "f").write_text(f"{i}\n")
    world.write_conf(target)
    world.asd("sync", check=True)
    stray = Instance(world.conf, world.volatile).target(target).ram_copy / "d03" / "stray"
    world.run(["sh", "-c", f"mkdir {stray} && mount -t tmpfs stray {stray}"], check=True)
    world.run(["sh", "-c", f"echo mine > {stray}/kept"], check=True)
    proc = world.asd("unsync")
    assert proc.returncode == 1 and "different device" in proc.stderr, proc.stderr
    assert world.run(["cat", f"{stray}/kept"], check=True).stdout == "mine\n"
    assert [(target / f"d{i:02}" / "f").read_text() for i in (0, 3, 19)] == ["0\n", "3\n", "19\n"]
    world.run(["umount", str(stray)], check=True)
    world.asd("unsync", check=True)
    assert inside_listdir(world, world.volatile) == []
    assert world.asd_mounts() == []


def world_instance(world: World) -> str:
    from asd.layout import instance_name

    return instance_name(world.conf)[4:]


def test_ram_copy_is_private_and_keeps_owner_and_mode(world: World) -> None:
    target = world.target("var/lib/app")
    os.chown(target, 1234, 1234)
    os.chmod(target, 0o700)
    world.write_conf(target)
    world.asd("sync", check=True)
    root = world.volatile / ("asd-root-" + world_instance(world))
    st = world.run(["stat", "-c", "%u %a", str(root), str(target)], check=True).stdout.split()
    assert st[:2] == ["0", "700"], "asd's RAM directory must be root-only"
    assert st[2:] == ["1234", "700"], "the RAM copy must keep the target's owner and mode"


def test_parse_json_reports_targets(world: World) -> None:
    t1 = world.target("a/one")
    t2 = world.target("a/.two")
    (t1 / "f").write_bytes(b"x" * 10000)
    world.write_conf(t1, t2)
    doc = json.loads(world.asd("parse", "--json", check=True).stdout)
    assert set(doc) >= {"targets", "volatile"}
    paths = [t["path"] for t in doc["targets"]]
    assert paths == [str(t1), str(t2)]
    first, second = doc["targets"]
    assert first["backup"] == str(t1.parent / ".one-backup_asd")
    assert second["backup"] == str(t2.parent / ".two-backup_asd")
    assert first["size_bytes"] >= 10000
    assert first["snapshots"] == [] and isinstance(first["warnings"], list)
    assert first["in_ram"] is False and doc["running"] is False
    world.asd("sync", check=True)
    doc = json.loads(world.asd("p", "--json", check=True).stdout)
    assert doc["running"] is True and doc["targets"][0]["in_ram"] is True
    # The device is the one under the disk copy, not the RAM copy now mounted at the path.
    device = doc["targets"][0]["device"]
    assert device["kind"] not in ("ram", "unknown") and device["disks"]
    assert not any("RAM" in w for w in doc["targets"][0]["warnings"])
    assert doc["volatile"]["device"]["kind"] == "ram"
    text = world.asd("preview", check=True).stdout
    assert str(t1) in text and "in RAM" in text


def test_dry_run_changes_nothing(world: World) -> None:
    target = world.target("x/y")
    (target / "f").write_text("1")
    world.write_conf(target)
    before = manifest(target)
    out = world.asd("sync", "--dry-run", check=True)
    assert "would" in out.stdout and str(target) in out.stdout
    assert world.asd_mounts() == [] and manifest(target) == before
    world.asd("sync", check=True)
    world.sh(f"echo 2 > {target}/f; echo 3 > {target}/g")
    out = world.asd("resync", "--dry-run", check=True)
    assert "2 files" in out.stdout
    assert (target / "f").read_text() == "1", "dry-run resync wrote to disk"
    out = world.asd("unsync", "--dry-run", check=True)
    assert "would unmount" in out.stdout
    assert world.mounted_at(target) == 1


def test_second_sync_is_a_no_op_and_resync_without_sync_fails(world: World) -> None:
    target = world.target("t")
    world.write_conf(target)
    failed = world.asd("resync")
    assert failed.returncode == 1 and "not running" in failed.stderr
    world.asd("sync", check=True)
    again = world.asd("sync", check=True)
    assert "already" in again.stdout
    assert world.mounted_at(target) == 1


def test_concurrent_runs_wait_for_the_lock(world: World) -> None:
    target = world.target("t")
    (target / "f").write_text("1")
    world.write_conf(target)
    world.asd("sync", check=True)
    lock = "/run/asd/" + ("asd-" + world_instance(world)) + ".lock"
    holder = world.spawn(["flock", lock, "sleep", "3"])
    try:
        out = world.asd("resync", check=True)
    finally:
        holder.wait()
    assert "waiting for" in out.stdout
    parse = world.asd("parse", check=True)
    assert parse.returncode == 0


def test_unsync_refuses_while_files_are_open_and_force_names_them(world: World) -> None:
    target = world.target("logs")
    (target / "app.log").write_text("start\n")
    world.write_conf(target)
    world.asd("sync", check=True)
    writer = world.spawn(
        [
            "sh",
            "-c",
            f"exec 3>>{target}/app.log; echo opened >&3; sleep 1.5; echo late >&3; sleep 30",
        ]
    )
    import time

    time.sleep(0.5)
    refused = world.asd("unsync")
    assert refused.returncode == 1
    assert "pid" in refused.stderr and "app.log" in refused.stderr
    assert world.mounted_at(target) == 1, "the refused unsync unmounted the target"
    assert "opened" in (target / "app.log").read_text(), "refused unsync did not resync"
    time.sleep(1.5)
    forced = world.asd("unsync", "--force")
    assert forced.returncode == 0, forced.stderr
    assert "lost" in forced.stderr and "sh" in forced.stderr
    assert (target / "app.log").read_text() == "start\nopened\nlate\n"
    assert world.asd_mounts() == []
    writer.kill()


def test_service_style_exit_codes(world: World) -> None:
    target = world.target("t")
    world.write_conf(target)
    assert world.asd("--version", check=True).stdout.startswith("asd ")
    assert world.asd("bogus").returncode == 2
    assert world.asd("sync", check=True).returncode == 0
    st = os.stat(world.conf)
    assert stat.S_ISREG(st.st_mode)


def test_merged_view_stays_right_across_resyncs(world: World) -> None:
    """Overlay mode's hazard: asd must never change what the overlay reads from. Create in a
    new directory, resync, then delete, rename, modify and link: after each resync the view
    and the disk copy agree, and nothing deleted comes back."""
    target = world.target("t")
    (target / "base").mkdir()
    (target / "base" / "keep").write_text("keep\n")
    (target / "base" / "edit").write_text("v1\n")
    world.write_conf(target)
    world.asd("sync", check=True)
    rounds = [
        "mkdir -p new/dir && echo a > new/dir/a && echo b > base/b",
        "rm new/dir/a && mv base/b base/b2 && echo v2 >> base/edit && ln base/keep base/keep2",
        "mv new moved && rm base/keep && echo c > moved/dir/c",
        "rm -r moved && mkdir new && echo again > new/a",
    ]
    for i, script in enumerate(rounds):
        world.run(["sh", "-c", f"cd {target} && {script}"], check=True)
        world.asd("resync", check=True)
        view = inside_manifest(world, target)
        assert manifest(target) == view, f"round {i}: disk copy and view differ"
        # Drop the kernel's caches: a stale overlay dentry would now resurface lower files.
        world.run(["sh", "-c", "sync; echo 2 > /proc/sys/vm/drop_caches"], check=True)
        assert inside_manifest(world, target) == view, f"round {i}: the view changed by itself"
    world.asd("unsync", check=True)
    kept = [".asd-work"] if world.overlay else []  # overlay mode's lower tree
    assert sorted(os.listdir(target)) == [*kept, "base", "new"] and asd_left(target) == []
    assert (target / "new" / "a").read_text() == "again\n"
    assert os.lstat(target / "base" / "keep2").st_nlink == 1


def test_config_edits_apply_at_next_start_and_asdconf_picks_the_config(world: World) -> None:
    first = world.target("first")
    second = world.target("second")
    world.write_conf(first)
    env = {"ASDCONF": str(world.conf)}
    world.run([sys.executable, "-m", "asd", "sync"], check=True, env=env)
    world.write_conf(second)
    doc = json.loads(world.asd("parse", "--json", check=True).stdout)
    assert [t["path"] for t in doc["targets"]] == [str(first)], "parse must show the running config"
    assert "apply at the next start" in world.asd("sync", check=True).stderr
    assert world.mounted_at(second) == 0
    world.asd("unsync", check=True)
    world.asd("sync", check=True)
    assert world.mounted_at(second) == 1 and world.mounted_at(first) == 0


def progress_lines(text: str, name: os.PathLike[str], what: str) -> list[tuple[str, str, str]]:
    """(done, total, percent) of each "<name>: <done> of <total> <what> (<n> %)" line."""
    shown = rf"{re.escape(str(name))}: (\S+ \S+) of (\S+ \S+) {re.escape(what)} \((\d+) %\)"
    return re.findall(shown, text)


def test_long_work_shows_progress_on_a_terminal_only(copy_world: World) -> None:
    """The copy into RAM, and the crash-recovery snapshot after an unclean stop."""
    world = copy_world
    target = world.target("t")
    populate(target)
    (target / "big").write_bytes(os.urandom(3 << 20))
    world.write_conf(target)
    before, untimed = manifest(target), manifest(target, times=False)
    argv = [sys.executable, "-m", "asd", "-c", str(world.conf), "sync"]
    on_tty = world.run(["script", "-qefc", shlex.join(argv), "/dev/null"], check=True)
    done = progress_lines(on_tty.stdout, target, "copied")
    assert done, f"no progress line on a terminal: {on_tty.stdout!r}"
    assert done[0][0] == "0 B" and done[-1][0] == done[-1][1] and done[-1][2] == "100", done
    assert done[-1][1].endswith("MiB") and float(done[-1][1].split()[0]) >= 3.0, done
    assert inside_manifest(world, target) == before
    world.power_cut()
    world.boot()
    on_tty = world.run(["script", "-qefc", shlex.join(argv), "/dev/null"], check=True)
    snap = progress_lines(on_tty.stdout, target, "read into the snapshot")
    assert snap and snap[-1][2] == "100", f"no snapshot progress: {on_tty.stdout!r}"
    assert float(snap[-1][1].split()[0]) >= 3.0, snap
    assert progress_lines(on_tty.stdout, target, "copied"), on_tty.stdout
    world.asd("unsync", check=True)
    restore = [*argv[:-1], "restore"]
    on_tty = world.run(["script", "-qefc", shlex.join(restore), "/dev/null"], check=True)
    back = progress_lines(on_tty.stdout, target, "restored")
    assert back and back[-1][2] == "100", f"no restore progress: {on_tty.stdout!r}"
    assert manifest(target, times=False) == untimed, "the snapshot holds the state at the crash"
    piped = world.asd("sync", check=True)
    said = piped.stdout + piped.stderr
    assert "copied (" not in said and "snapshot (" not in said, "progress under a pipe (systemd)"
    assert inside_manifest(world, target) == before


def test_empty_whattosync_is_a_quiet_no_op(copy_world: World) -> None:
    copy_world.conf.write_text("WHATTOSYNC=()\n")
    out = copy_world.asd("sync", check=True)
    assert "WHATTOSYNC" in out.stdout and "is empty" in out.stdout
    assert copy_world.asd_mounts() == []
    assert copy_world.asd("resync").returncode == 1


def test_sync_warns_about_a_target_already_in_ram(copy_world: World) -> None:
    world = copy_world
    target = world.target("in-ram")
    world.run(["mount", "-t", "tmpfs", "-o", "size=8m", "already-ram", str(target)], check=True)
    world.write_conf(target)
    out = world.asd("sync", check=True)
    assert "RAM" in out.stderr and str(target) in out.stderr, "no warning for a target in RAM"


def test_target_that_is_a_file_system_of_its_own(world: World) -> None:
    """/var/log on its own partition: the target is a mount point; the cycle must still work
    and the files must land on that file system, not on the one below it."""
    target = world.target("own-fs")
    image = world.base / "fs.img"
    subprocess.run(["truncate", "-s", "64M", str(image)], check=True)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True)
    world.run(["mount", "-o", "loop", str(image), str(target)], check=True)
    try:
        world.sh(f"echo one > {target}/f")
        world.write_conf(target)
        world.asd("sync", check=True)
        world.sh(f"echo two > {target}/f")
        world.asd("unsync", check=True)
        assert world.sh(f"cat {target}/f").stdout == "two\n"
        assert world.mounted_at(target) == 1, "the target's own file system must stay mounted"
        assert not (target / "f").exists(), "data landed below the target's file system"
    finally:
        world.run(["umount", str(target)])


def test_copy_mode_reads_the_disk_without_moving_atimes(copy_world: World) -> None:
    """Copy mode's reads of the disk copy (the copy into RAM at each sync) go through a
    noatime bind mount: with relatime, the first read of a file whose atime is a day old
    would write its inode, every file at every boot. Nobody else reads through it."""
    world = copy_world
    target = world.target("var/cache/app")
    old = target / "old"
    old.write_text("read a while ago\n")
    day_ago = time.time_ns() - 3 * 86_400 * 10**9
    os.utime(old, ns=(day_ago, day_ago - 10**9))
    world.write_conf(target)
    world.asd("sync", check=True)
    assert "noatime" in world.sh(f"findmnt -no OPTIONS {backup_path(target)}").stdout
    assert (world.sh(f"cat {target}/old").stdout) == "read a while ago\n"
    world.asd("unsync", check=True)
    assert os.stat(old).st_atime_ns == day_ago, "asd's copy moved the atime"
