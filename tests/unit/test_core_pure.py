"""Pure pieces of the engine: paths, mountinfo, command lines, change detection, journal."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from asd import coreutils, rsync
from asd.disks import human_size, meminfo_available
from asd.holders import Holder, holders
from asd.journal import Journal
from asd.layout import DEFAULT_CONFIG, Instance, hidden_name, instance_name
from asd.links import find_argv, split_files
from asd.mounts import MountTable, overlay, parse_mountinfo, unescape
from asd.run import FS_CODEC
from asd.state import RunState, StateStore, locked, write_json_atomic
from asd.steps import Step, describe_plan, plan_target
from asd.tree import Changes, diff, index

MOUNTINFO = (
    "27 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw\n"
    "40 27 0:35 / /tmp rw,nosuid shared:2 - tmpfs tmpfs rw,size=100k\n"
    "41 27 254:0 /home/a\\040b /srv/with\\040space rw - ext4 /dev/vda rw\n"
    "42 27 251:0 / /var/cache rw - ext4 /dev/zram0 rw\n"
    "43 41 0:40 / /srv/with\\040space/inner rw - nfs4 host:/x rw\n"
)


def test_mountinfo_octal_escapes_and_lookup() -> None:
    mounts = parse_mountinfo(MOUNTINFO)
    assert mounts[2].mountpoint == "/srv/with space" and mounts[2].root == "/home/a b"
    table = MountTable(mounts)
    assert table.holding("/tmp/x/y").fstype == "tmpfs" and table.holding("/tmp").is_ram
    assert table.holding("/tmpfoo").mountpoint == "/", "a prefix that is not a path component"
    assert table.holding("/var/cache/apt").is_ram, "zram counts as RAM"
    assert [m.mountpoint for m in table.below("/srv/with space")] == ["/srv/with space/inner"]
    assert table.is_mountpoint("/srv/with space") and not table.is_mountpoint("/srv")
    assert unescape("a\\134b\\011c") == "a\\b\tc"
    with pytest.raises(ValueError):
        parse_mountinfo("garbage without separator\n")


def test_command_lines_are_data() -> None:
    assert coreutils.copy_tree(Path("/a"), Path("/b")) == [
        "cp", "--no-dereference", "--recursive",
        "--preserve=mode,ownership,timestamps,links,xattr", "--sparse=auto",
        "--no-target-directory", "--", "/a", "/b",
    ]  # fmt: skip
    assert coreutils.remove_tree(Path("/r/x")) == [
        "rm", "--recursive", "--force", "--one-file-system", "--", "/r/x",
    ]  # fmt: skip
    assert coreutils.remove_tree("/a", Path("/b"))[-3:] == ["--", "/a", "/b"]
    latin = os.fsdecode(b"/srv/caf\xe9")  # a path is bytes: sh gets back the very ones
    assert latin.encode(FS_CODEC) == b"/srv/caf\xe9"
    assert b"\xe9t\xc3\xa9".decode(FS_CODEC) == os.fsdecode(b"\xe9t\xc3\xa9")
    assert coreutils.shares(["a", "b", "c", "d", "e"], 2) == [["a", "c", "e"], ["b", "d"]]
    assert coreutils.shares(["a"], 2) == [["a"]], "no empty share"
    listed = rsync.copy_listed(Path("/r"), Path("/s"), Path("/l"))
    assert listed[-3:] == ["--files-from=/l", "/r/", "/s/"] and "--from0" in listed
    assert "--ignore-missing-args" in listed  # a name that vanished since the walk is no error
    assert rsync.ok_codes(allow_vanished=True) == (0, 24)
    assert rsync.ok_codes(allow_vanished=False) == (0,)


SUMMARY_23 = "rsync error: some files/attrs were not transferred (see previous errors) (code 23)"


def test_rsync_failing_only_on_files_gone_since_its_listing() -> None:
    acl = "rsync: [sender] get_acl: sys_acl_get_file(d/f, ACL_TYPE_ACCESS): "
    xattr = 'rsync: [sender] get_xattr_names: llistxattr("/r/d/g",1024) failed: '
    gone = f"{acl}No such file or directory (2)\n{xattr}No such file or directory (2)\n"
    assert rsync.only_vanished(23, gone + SUMMARY_23 + "\n")
    assert rsync.only_vanished(23, 'file has vanished: "/r/x"\n' + gone + SUMMARY_23)
    assert not rsync.only_vanished(24, gone), "24 is accepted by its exit code, not here"
    assert not rsync.only_vanished(23, SUMMARY_23), "no file named as gone"
    assert not rsync.only_vanished(23, f"{acl}Input/output error (5)\n{SUMMARY_23}")
    assert not rsync.only_vanished(23, f"{gone}{acl}Permission denied (13)\n{SUMMARY_23}")
    receiver = 'rsync: [receiver] mkstemp "/s/d/.f.XYZ" failed: No such file or directory (2)'
    assert not rsync.only_vanished(23, f"{receiver}\n{SUMMARY_23}"), "the stage's side"
    assert not rsync.only_vanished(11, gone)
    opts = overlay(Path("/lo"), Path("/up"), Path("/wo"), Path("/m"))[4]
    assert "lowerdir=/lo" in opts and "index=on" in opts and "redirect_dir=on" in opts


def test_layout_names_follow_upstream() -> None:
    inst = Instance(DEFAULT_CONFIG, Path("/tmp"))
    bar = inst.target(Path("/foo/bar"))
    assert bar.backup == Path("/foo/.bar-backup_asd")
    assert inst.target(Path("/foo/.cache")).backup == Path("/foo/.cache-backup_asd")
    assert bar.ram_copy == Path("/tmp/asd-root/foo/bar")
    assert bar.snapshot_prefix == ".bar-backup_asd-crashrecovery-"
    assert bar.disk_work == Path("/foo/.bar-backup_asd/.asd-work")
    assert hidden_name(".x") == ".x" and hidden_name("x") == ".x"
    other = Instance(Path("/etc/other.conf"), Path("/dev/shm"))
    assert other.name != inst.name and other.name.startswith("asd-")
    assert other.state_file != inst.state_file and other.lock_file != inst.lock_file
    assert other.ram_root != inst.ram_root
    assert instance_name(Path("/etc/other.conf")) == other.name


def test_plan_has_recovery_first_and_serving_last() -> None:
    inst = Instance(DEFAULT_CONFIG, Path("/tmp"))
    for overlay_mode in (False, True):
        steps = plan_target(inst.target(Path("/foo/bar")), overlay_mode)
        kinds = [s.kind for s in steps]
        assert kinds[0] == "recover" and kinds[-1] == "bind-target"
        assert ("overlay" in kinds) == overlay_mode and ("copy" in kinds) != overlay_mode
        # Copy mode reads the disk copy through a noatime mount; overlay mode's programs do.
        disk = "bind-backup" if overlay_mode else "bind-disk"
        assert kinds.index("mark") < kinds.index(disk) < kinds.index("index")
        for s in steps:
            assert Step.from_json(s.to_json()) == s
            assert s.describe()


def test_describe_plan_mentions_every_target() -> None:
    from asd.config import Config

    conf = Config(Path("/etc/asd.conf"), whattosync=(Path("/a"), Path("/b")))
    text = "\n".join(describe_plan(conf, Instance(conf.path, conf.volatile)))
    assert "/a" in text and "/b" in text and "bind-mount" in text


def test_diff_finds_exactly_what_changed(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "keep").write_text("k")
    (tmp_path / "d" / "edit").write_text("1")
    (tmp_path / "gone").mkdir()
    (tmp_path / "gone" / "x").write_text("x")
    old = index(tmp_path)
    assert diff(old, index(tmp_path)).empty
    (tmp_path / "d" / "edit").write_text("2")
    import shutil

    shutil.rmtree(tmp_path / "gone")
    (tmp_path / "new").mkdir()
    (tmp_path / "new" / "f").write_text("f")
    ch = diff(old, index(tmp_path))
    assert ch.deleted == ("gone",), "a deleted tree is one deletion"
    assert ch.files == ("d/edit", "new/f")
    assert set(ch.dirs) == {"", "d", "new"}
    assert ch.count() == 3


def test_diff_sees_metadata_and_type_changes(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    (tmp_path / "l").write_text("y")
    old = index(tmp_path)
    os.chmod(tmp_path / "f", 0o600)
    (tmp_path / "l").unlink()
    os.symlink("f", tmp_path / "l")
    ch = diff(old, index(tmp_path))
    assert "f" in ch.files and "l" in ch.files and "l" in ch.deleted


def test_the_link_check_asks_find_for_files_with_more_links_than_names() -> None:
    argv = find_argv(frozenset({".asd-work"}), 2)
    assert argv[:3] == ["find", ".", "-xdev"]
    assert argv[3:7] == ["-path", "./.asd-work", "-prune", "-o"], "asd's own top-level name"
    assert argv[7:] == ["!", "-type", "d", "-links", "+2", "-printf", "%i %n %P\\0"]
    assert find_argv(frozenset(), 1)[3:6] == ["!", "-type", "d"], "nothing excluded"


@pytest.mark.parametrize(
    ("found", "names_per_file", "split"),
    [
        ("", 1, []),
        ("7 2 a\x007 2 sub/b\x00", 1, []),  # both names inside
        ("7 3 a\x007 3 sub/b\x00", 1, ["a"]),  # a third name elsewhere: one name of it
        ("7 2 z\x009 2 x y\x009 2 x z\x00", 1, ["z"]),  # a space in a name is its own
        ("7 4 a\x007 4 b\x00", 2, []),  # two names, each with its twin in the lower tree
        ("7 3 a\x00", 2, ["a"]),  # one name, its twin, and one more
        ("5 2 new\nline\x006 2 ok\x00", 1, ["new\nline", "ok"]),
    ],
)
def test_files_split_by_a_ram_copy(found: str, names_per_file: int, split: list[str]) -> None:
    assert split_files(found, names_per_file) == split


def test_journal_roll_forward_is_idempotent(tmp_path: Path) -> None:
    disk = tmp_path / "disk"
    (disk / "sub").mkdir(parents=True)
    (disk / "old").write_text("old")
    (disk / "sub" / "f").write_text("v1")
    j = Journal(disk)
    with j.new_stage():  # a test writes the stage by name; asd writes through the fd
        pass
    stage = j.stage
    (stage / "sub").mkdir()
    (stage / "sub" / "f").write_text("v2")
    (stage / "sub" / "n").write_text("new")
    os.utime(stage / "sub", ns=(0, 123_000_000_000))
    changes = Changes(deleted=("old",), files=("sub/f", "sub/n"), dirs=("sub",))
    # Commit but "crash" before applying: write the record the way commit() does.
    from asd.dirmeta import dir_metadata

    meta = {"sub": dir_metadata(stage / "sub")}
    write_json_atomic(j.record, {"deleted": ["old"], "dirs": meta, "files": list(changes.files)})
    os.rename(stage / "sub" / "f", disk / "sub" / "f")  # half applied
    assert j.recover() is not None
    assert (disk / "sub" / "f").read_text() == "v2" and (disk / "sub" / "n").read_text() == "new"
    assert not (disk / "old").exists()
    assert os.lstat(disk / "sub").st_mtime_ns == 123_000_000_000
    assert not j.record.exists() and not j.stage.exists()
    assert j.recover() is None


def test_journal_discards_an_uncommitted_stage(tmp_path: Path) -> None:
    disk = tmp_path / "disk"
    disk.mkdir()
    (disk / "f").write_text("kept")
    j = Journal(disk)
    with j.new_stage():
        (j.stage / "f").write_text("half")
    assert "discarded" in (j.recover() or "")
    assert (disk / "f").read_text() == "kept" and not j.stage.exists()


def test_state_roundtrip_and_lock(tmp_path: Path) -> None:
    inst = Instance(Path("/etc/x.conf"), Path("/tmp"), run_dir=tmp_path / "run")
    store = StateStore(inst)
    assert store.load() is None
    state = RunState("syncing", {"a": 1})
    store.record(state, "/t", {"kind": "mkdir", "target": "/t", "path": "/p", "source": ""})
    loaded = store.load()
    assert loaded is not None and loaded.actions == state.actions and loaded.status == "syncing"
    assert stat.S_IMODE(os.stat(store.path).st_mode) == 0o600
    store.path.write_text("{broken")
    from asd.errors import StateError

    with pytest.raises(StateError, match="cannot read the run state"):
        store.load()
    store.path.write_text(json.dumps({"version": 99}))
    with pytest.raises(StateError, match="unknown version"):
        store.load()
    with locked(inst, "resync"):
        assert "asd resync" in inst.lock_file.read_text()
    assert inst.lock_file.read_text() == ""


def test_served_targets_are_recorded_and_read_from_an_older_state(tmp_path: Path) -> None:
    def action(kind: str, target: str) -> dict[str, str]:
        return {"kind": kind, "target": target, "path": target, "source": ""}

    inst = Instance(Path("/etc/x.conf"), Path("/tmp"), run_dir=tmp_path / "run")
    store = StateStore(inst)
    state = RunState("synced", {})
    state.actions = {"/a": [action("copy", "/a"), action("bind-target", "/a")]}
    state.actions["/b"] = [action("copy", "/b")]  # a sync stopped half way
    state.served = ["/a"]
    store.save(state)
    loaded = store.load()
    assert loaded is not None and loaded.served == ["/a"]
    # A state written before "served" existed: a target counts as served when its bind
    # mount is in the record (an unsync stopped after the unmount cannot be told from a
    # half-done sync there).
    older = state.to_json()
    del older["served"]
    assert RunState.from_json(older).served == ["/a"]
    state.served = []
    assert RunState.from_json(state.to_json()).served == []


def test_holders_reads_a_proc_tree(tmp_path: Path) -> None:
    proc = tmp_path / "proc"
    p = proc / "4242"
    (p / "fd").mkdir(parents=True)
    (p / "comm").write_text("firefox\n")
    os.symlink("/home/a/.cache/x (deleted)", p / "fd" / "3")
    os.symlink("/elsewhere", p / "fd" / "4")
    os.symlink("/home/a/.cache", p / "cwd")
    (p / "maps").write_text("7f00-7f01 r--p 0 08:01 12 /home/a/.cache/lib.so\n")
    (proc / "self").mkdir()
    found = holders([Path("/home/a/.cache")], proc=proc)
    assert {h.path for h in found} == {
        "/home/a/.cache/x",
        "/home/a/.cache",
        "/home/a/.cache/lib.so",
    }
    assert all(h.pid == 4242 and h.command == "firefox" for h in found)
    assert "pid 4242 (firefox)" in found[0].describe()
    assert holders([Path("/home/a/.cach")], proc=proc) == []


@pytest.mark.parametrize(
    ("cmdline", "skipped"),
    [
        (b"/usr/bin/python3\0/usr/bin/asd\0parse\0", True),
        (b"/usr/local/bin/asd\0parse\0", True),
        (b"python3\0-m\0asd\0-c\0/etc/asd.conf\0parse\0", True),
        (b"python3\0/home/u/asd-notes.py\0", False),
        (b"vim\0asd\0", False),  # a file named asd opened in an editor is not asd
    ],
)
def test_holders_leave_out_asd_itself(tmp_path: Path, cmdline: bytes, skipped: bool) -> None:
    """A concurrent `asd parse` walking a target must not make unsync refuse."""
    proc = tmp_path / "proc"
    p = proc / "4343"
    (p / "fd").mkdir(parents=True)
    (p / "comm").write_text("python3\n")
    (p / "cmdline").write_bytes(cmdline)
    os.symlink("/home/a/.cache/deep", p / "fd" / "3")
    found = holders([Path("/home/a/.cache")], proc=proc)
    assert found == ([] if skipped else [Holder(4343, "python3", "/home/a/.cache/deep")])


def test_sizes_and_memory(tmp_path: Path) -> None:
    assert human_size(512) == "512 B" and human_size(3 * 1024 * 1024) == "3.0 MiB"
    (tmp_path / "m").write_text("MemTotal: 10 kB\nMemAvailable:   2048 kB\n")
    assert meminfo_available(str(tmp_path / "m")) == 2 * 1024 * 1024
    assert meminfo_available(str(tmp_path / "none")) is None


def test_a_command_error_shows_the_stage_by_name_not_by_descriptor() -> None:
    from asd.errors import CommandError

    err = CommandError(
        ["rsync", "-a", "src/", "/proc/self/fd/7/"],
        23,
        stderr='rsync: [Receiver] mkstemp "/proc/self/fd/7/docs/.a.txt.XyZ" failed: '
        "No space left on device (28)\nrsync error: some files could not be transferred",
    )
    shown = err.showing("/proc/self/fd/7", "/d/.t-backup_asd/.asd-work/stage")
    assert "/d/.t-backup_asd/.asd-work/stage/docs/.a.txt.XyZ" in str(shown)
    assert "/proc/self/fd" not in str(shown) + shown.stderr + " ".join(shown.argv)
    assert (shown.exit_code, shown.argv[-1]) == (23, "/d/.t-backup_asd/.asd-work/stage/")


def test_a_stage_is_reached_through_its_descriptor(tmp_path: Path) -> None:
    j = Journal(tmp_path)
    with j.new_stage() as fd:
        os.mkdir("d", dir_fd=fd)
        os.symlink("/etc", "l", dir_fd=fd)
        open(os.open("d/f", os.O_CREAT | os.O_WRONLY, dir_fd=fd), "w").close()
        assert j.staged(fd, "d/f") and j.staged(fd, "l") and not j.staged(fd, "l/passwd")
        assert not j.staged(fd, "gone")
    assert stat.S_IMODE(os.lstat(j.stage).st_mode) == 0o700


def test_progress_shows_what_the_command_has_read(monkeypatch: pytest.MonkeyPatch) -> None:
    import io
    import time

    from asd import progress

    assert progress.read_by(os.getpid()) > 0, "this process has read something"
    assert progress.read_by(2**22 + 1) == 0, "no such process"
    line = progress.line
    assert line(Path("/t"), "copied", 512, 2048) == "\r/t: 512 B of 2.0 KiB copied (25 %)"
    assert line(Path("/t"), "copied", -5, 10).endswith("0 B of 10 B copied (0 %)")
    assert line(Path("/t"), "copied", 99, 10).endswith("(100 %)"), "rchar counts more than data"
    assert line(Path("/t"), "copied", 0, 0).endswith("(100 %)"), "an empty target"
    asked: list[int] = []
    counts = iter(range(2048, 2048 * 100, 2048))

    def read_by(pid: int) -> int:
        asked.append(pid)
        return next(counts)

    monkeypatch.setattr(progress, "read_by", read_by)
    monkeypatch.setattr(progress, "INTERVAL", 0.01)
    out = io.StringIO()
    with progress.watching(Path("/t"), "copied", 8192, out=out)(4242):
        time.sleep(0.2)
    shown = out.getvalue().split("\r")[1:]
    assert set(asked) == {4242}
    assert shown[0] == "/t: 0 B of 8.0 KiB copied (0 %)"
    assert "/t: 2.0 KiB of 8.0 KiB copied (25 %)" in shown, shown
    assert shown[-1] == "/t: 8.0 KiB of 8.0 KiB copied (100 %)\n"
    failed = io.StringIO()
    with pytest.raises(OSError), progress.watching(Path("/t"), "copied", 8192, out=failed)(1):
        raise OSError("cp failed")
    assert failed.getvalue().endswith("\n") and "100 %" not in failed.getvalue()


def test_a_frontier_covers_the_whole_tree_once(tmp_path: Path) -> None:
    """The paths `tree.frontier` gives, removed each with all below it, leave of the tree
    below its root only the (then empty) directories above them; no path is inside another."""
    from asd.tree import frontier

    for top in range(3):
        (tmp_path / f"t{top}").write_text("file at the top")
        for mid in range(4):
            leaf = tmp_path / f"d{top}" / f"m{mid}"
            leaf.mkdir(parents=True)
            (leaf / "f").write_text("deep")
            (leaf.parent / f"g{mid}").write_text("middle")
    os.symlink("d0", tmp_path / "link-to-a-dir")
    every = {str(p) for p in tmp_path.rglob("*")}
    for want, depth in ((2, 3), (8, 3), (100, 3), (100, 1)):
        parts = frontier(tmp_path, want, depth)
        assert parts is not None
        covered = {p for p in every if any(p == q or p.startswith(q + "/") for q in parts)}
        above = {
            str(a)
            for q in parts
            for a in Path(q).parents
            if a != tmp_path and tmp_path in a.parents
        }
        assert covered | above == every and not covered & above, (want, depth)
        assert not [q for q in parts if any(q.startswith(r + "/") for r in parts)], parts
    assert len(frontier(tmp_path, 2, 3) or []) == 3 + 3 + 1  # the top level's entries
    assert len(frontier(tmp_path, 8, 3) or []) == 3 + 1 + 12 + 12  # and the middle's
    assert frontier(tmp_path, 100, 3, most=20) is None, "too many paths for the command lines"
    assert frontier(tmp_path / "absent", 2) is None
