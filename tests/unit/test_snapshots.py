"""Snapshot naming, listing, rotation and the member-list safety rules: no tar, no zstd."""

from __future__ import annotations

import os
import tarfile
from datetime import datetime
from pathlib import Path

import pytest

from asd import archive, snapshots
from asd.archive import Member, check_members
from asd.errors import SafetyError
from asd.snapshots import RestoreResult, Snapshot

WHEN = datetime(2026, 12, 1, 10, 10, 10)
NAME = ".bar-backup_asd-crashrecovery-{}.tar.zstd"


def touch(path: Path, data: bytes = b"x") -> Path:
    path.write_bytes(data)
    return path


# --- names -----------------------------------------------------------------------------------


def test_snapshot_of_plain_target_is_hidden_next_to_it() -> None:
    assert snapshots.snapshot_path(Path("/foo/bar"), WHEN) == Path(
        "/foo/.bar-backup_asd-crashrecovery-20261201_101010.tar.zstd"
    )


def test_snapshot_of_dotted_target_gets_no_second_dot() -> None:
    assert snapshots.snapshot_path(Path("/foo/.cache"), WHEN) == Path(
        "/foo/.cache-backup_asd-crashrecovery-20261201_101010.tar.zstd"
    )


def test_second_snapshot_in_the_same_second_gets_a_suffix() -> None:
    assert snapshots.snapshot_path(Path("/foo/bar"), WHEN, 2).name == (
        ".bar-backup_asd-crashrecovery-20261201_101010-2.tar.zstd"
    )


@pytest.mark.parametrize("target", ["foo/bar", "/", "/foo/.."])
def test_unusable_target_is_refused(target: str) -> None:
    with pytest.raises(SafetyError, match="not a usable sync target"):
        snapshots.list_snapshots(Path(target))


# --- listing ---------------------------------------------------------------------------------


def test_list_is_newest_first_by_time_then_suffix(tmp_path: Path) -> None:
    target = tmp_path / "bar"
    names = [
        "20261201_101010",
        "20261201_101010-1",
        "20261201_101010-10",
        "20261201_101010-9",
        "20261201_101011",
        "20251231_235959",
    ]
    for stamp in names:
        touch(tmp_path / NAME.format(stamp))
    listed = [s.path.name for s in snapshots.list_snapshots(target)]
    expected = [
        "20261201_101011",
        "20261201_101010-10",
        "20261201_101010-9",
        "20261201_101010-1",
        "20261201_101010",
        "20251231_235959",
    ]
    assert listed == [NAME.format(stamp) for stamp in expected]


def test_list_reports_time_size_and_target(tmp_path: Path) -> None:
    touch(tmp_path / NAME.format("20261201_101010"), b"12345")
    [snap] = snapshots.list_snapshots(tmp_path / "bar")
    assert snap == Snapshot(tmp_path / NAME.format("20261201_101010"), tmp_path / "bar", WHEN, 5)
    assert snap.to_json() == {
        "path": str(tmp_path / NAME.format("20261201_101010")),
        "target": str(tmp_path / "bar"),
        "taken": "2026-12-01T10:10:10",
        "size_bytes": 5,
    }


def test_list_ignores_other_tools_subdirectories_and_symlinks(tmp_path: Path) -> None:
    real = touch(tmp_path / NAME.format("20261201_101010"))
    lookalikes = [
        ".bar-backup_asd-crashrecovery-20261201_101011.tar.gz",  # another compressor
        ".bar-backup_asd-crashrecovery-20261201_101011.tar.zstd.bak",
        ".bar-backup_asd-crashrecovery-20261301_101011.tar.zstd",  # month 13
        ".bar-backup_asd-crashrecovery-20261201_101011-0.tar.zstd",
        ".bar-backup_asd-crashrecovery-2026.tar.zstd",
        ".barn-backup_asd-crashrecovery-20261201_101011.tar.zstd",  # another target
        "x.bar-backup_asd-crashrecovery-20261201_101011.tar.zstd",
        NAME.format("20261201_101011") + ".partial",  # unfinished
    ]
    for name in lookalikes:
        touch(tmp_path / name)
    (tmp_path / "sub").mkdir()
    touch(tmp_path / "sub" / NAME.format("20261201_101012"))  # asd#56: no recursion
    (tmp_path / NAME.format("20261201_101013")).symlink_to(real)
    (tmp_path / NAME.format("20261201_101014")).mkdir()
    assert [s.path for s in snapshots.list_snapshots(tmp_path / "bar")] == [real]


def test_missing_parent_has_no_snapshots_to_list_or_delete(tmp_path: Path) -> None:
    target = tmp_path / "gone" / "bar"
    assert snapshots.list_snapshots(target) == []
    assert snapshots.remove_partial(target) == []
    assert snapshots.rotate(target, 1) == []
    assert snapshots.clean(target) == []


# --- deleting --------------------------------------------------------------------------------


def make(tmp_path: Path, *stamps: str) -> list[Path]:
    return [touch(tmp_path / NAME.format(stamp)) for stamp in stamps]


def test_rotate_keeps_exactly_the_newest(tmp_path: Path) -> None:
    old1, old2, new1, new2 = make(
        tmp_path, "20260101_000000", "20260102_000000", "20260103_000000", "20260103_000000-1"
    )
    deleted = snapshots.rotate(tmp_path / "bar", 2)
    assert sorted(deleted) == sorted([old1, old2])
    assert sorted(tmp_path.iterdir()) == sorted([new1, new2])


def test_rotate_to_zero_and_beyond_count(tmp_path: Path) -> None:
    make(tmp_path, "20260101_000000", "20260102_000000")
    assert snapshots.rotate(tmp_path / "bar", 5) == []
    assert len(list(tmp_path.iterdir())) == 2
    assert len(snapshots.rotate(tmp_path / "bar", 0)) == 2
    assert list(tmp_path.iterdir()) == []


def test_rotate_refuses_negative_keep(tmp_path: Path) -> None:
    make(tmp_path, "20260101_000000")
    with pytest.raises(ValueError, match="keep"):
        snapshots.rotate(tmp_path / "bar", -1)
    assert len(list(tmp_path.iterdir())) == 1


def test_remove_partial_deletes_only_unfinished_files(tmp_path: Path) -> None:
    [done] = make(tmp_path, "20260101_000000")
    partial = touch(tmp_path / (NAME.format("20260102_000000") + ".partial"))
    other = touch(tmp_path / "notes.partial")
    assert snapshots.list_snapshots(tmp_path / "bar")[0].path == done
    assert snapshots.remove_partial(tmp_path / "bar") == [partial]
    assert sorted(tmp_path.iterdir()) == sorted([done, other])


def test_clean_deletes_every_snapshot_and_partial_but_nothing_else(tmp_path: Path) -> None:
    doomed = make(tmp_path, "20260101_000000", "20260102_000000")
    doomed.append(touch(tmp_path / (NAME.format("20260103_000000") + ".partial")))
    kept = [
        touch(tmp_path / ".baz-backup_asd-crashrecovery-20260101_000000.tar.zstd"),
        touch(tmp_path / "bar.tar.zstd"),
    ]
    assert sorted(snapshots.clean(tmp_path / "bar")) == sorted(doomed)
    assert sorted(tmp_path.iterdir()) == sorted(kept)


def test_dotted_target_lists_its_own_snapshots(tmp_path: Path) -> None:
    mine = touch(tmp_path / ".cache-backup_asd-crashrecovery-20260101_000000.tar.zstd")
    touch(tmp_path / ".cache2-backup_asd-crashrecovery-20260101_000000.tar.zstd")
    assert [s.path for s in snapshots.list_snapshots(tmp_path / ".cache")] == [mine]


# --- member lists ----------------------------------------------------------------------------


def d(name: str) -> Member:
    return Member(name, "dir", mode=0o755)


def f(name: str, size: int = 1) -> Member:
    return Member(name, "file", size=size)


def sym(name: str, to: str) -> Member:
    return Member(name, "symlink", link=to)


def hard(name: str, to: str) -> Member:
    return Member(name, "hardlink", link=to)


def test_ordinary_home_directory_content_is_accepted() -> None:
    members = [
        d("."),
        f("./a", 10),
        hard("./a-again", "./a"),
        sym("./etc-link", "/etc"),  # absolute target: legal content
        sym("./dangling", "../../nowhere"),  # dangling and upward: legal content
        d("./sub"),
        f("./sub/..hidden"),  # '..' inside a name is not a '..' component
        Member("./sub/pipe", "fifo"),
        f("./implied/dir/file"),
        d("./implied"),  # a directory may come after what is inside it
    ]
    assert check_members(members) == members


def test_upstream_layout_with_one_top_directory_is_accepted() -> None:
    members = [
        d(".bar-backup_asd-old/"),
        f(".bar-backup_asd-old/a"),
        hard(".bar-backup_asd-old/b", ".bar-backup_asd-old/a"),
    ]
    assert check_members(members) == members


HOSTILE = {
    "absolute name": ([d("."), f("/etc/passwd")], "/etc/passwd", "absolute"),
    "dot-dot": ([d("."), f("./../escape")], "./../escape", "'..'"),
    "deep dot-dot": ([d("."), d("./a"), f("./a/../../x")], "./a/../../x", "'..'"),
    "char device": ([d("."), Member("./null", "chardev")], "./null", "device node"),
    "block device": ([d("."), Member("./sda", "blockdev")], "./sda", "device node"),
    "through absolute symlink": (
        [d("."), sym("./a", "/etc"), f("./a/passwd")],
        "./a/passwd",
        "symbolic link './a'",
    ),
    "through relative symlink": (
        [d("."), sym("./up", "."), f("./up/x")],
        "./up/x",
        "symbolic link './up'",
    ),
    "through nested symlink": (
        [d("."), d("./b"), sym("./b/c", "/"), d("./b/c/etc")],
        "./b/c/etc",
        "symbolic link",
    ),
    "hard link outside": ([d("."), hard("./h", "/etc/shadow")], "./h", "not an earlier"),
    "hard link forward": ([d("."), hard("./h", "./later"), f("./later")], "./h", "not an earlier"),
    "hard link to symlink": (
        [d("."), sym("./s", "/etc/shadow"), hard("./h", "./s")],
        "./h",
        "not an earlier regular",
    ),
    "hard link to dir": ([d("."), d("./sub"), hard("./h", "./sub")], "./h", "not an earlier"),
    "hard link dot-dot": ([d("."), hard("./h", "../x")], "./h", "not an earlier"),
    "NUL in name": ([d("."), f("./a\0b")], "./a\0b", "NUL"),
    "NUL in link": ([d("."), sym("./a", "/etc\0")], "./a", "NUL"),
    "file replaced by symlink": ([d("."), f("./a"), sym("./a", "/etc")], "./a", "twice"),
    "root twice": ([d("."), d("./")], "./", "twice"),
    "inside a file": ([d("."), f("./a"), f("./a/b")], "./a/b", "not a directory"),
    "symlink after its contents": (
        [d("."), f("./a/b"), sym("./a", "/etc")],
        "./a",
        "not a directory",
    ),
    "first is a file": ([f("./a")], "./a", "top directory"),
    "first is nested": ([d("./a/b"), f("./a/b/c")], "./a/b", "top directory"),
    "outside the top": ([d("top"), f("top/a"), f("other")], "other", "outside"),
    "unknown type": ([d("."), Member("./x", "other")], "./x", "type"),
}


@pytest.mark.parametrize("case", HOSTILE, ids=list(HOSTILE))
def test_hostile_member_is_refused_by_name(case: str) -> None:
    members, offender, why = HOSTILE[case]
    with pytest.raises(SafetyError) as caught:
        check_members(members, "/foo/.bar.tar.zstd")
    message = str(caught.value)
    assert f"member {offender!r}" in message
    assert why in message
    assert message.startswith("Refusing /foo/.bar.tar.zstd:")


def test_empty_archive_is_refused() -> None:
    with pytest.raises(SafetyError, match="empty"):
        check_members([])


# --- tarfile -> Member -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tartype", "kind"),
    [
        (tarfile.REGTYPE, "file"),
        (tarfile.AREGTYPE, "file"),
        (tarfile.GNUTYPE_SPARSE, "file"),
        (tarfile.DIRTYPE, "dir"),
        (tarfile.SYMTYPE, "symlink"),
        (tarfile.LNKTYPE, "hardlink"),
        (tarfile.FIFOTYPE, "fifo"),
        (tarfile.CHRTYPE, "chardev"),
        (tarfile.BLKTYPE, "blockdev"),
        (b"V", "other"),
    ],
)
def test_tar_types_map_to_kinds(tartype: bytes, kind: str) -> None:
    info = tarfile.TarInfo("./x")
    info.type = tartype
    assert archive.member_from_tarinfo(info).kind == kind


def test_member_keeps_owner_mode_link_and_nanosecond_mtime() -> None:
    info = tarfile.TarInfo("./l")
    info.type, info.linkname, info.uid, info.gid, info.mode = tarfile.SYMTYPE, "/etc", 7, 8, 0o777
    info.mtime = 1700000000
    info.pax_headers = {"mtime": "1700000000.123456789"}
    assert archive.member_from_tarinfo(info) == Member(
        "./l", "symlink", 0, "/etc", 0o777, 7, 8, 1700000000123456789
    )
    info.pax_headers = {}
    assert archive.member_from_tarinfo(info).mtime_ns == 1700000000 * 10**9


# --- command lines ---------------------------------------------------------------------------


def test_create_command_keeps_metadata_and_anchors_excludes() -> None:
    argv = snapshots.tar_create_argv("/proc/1/fd/3", Path("/foo/bar"), [".asd-work", "a*b"])
    for flag in [
        "--zstd",
        "--format=posix",
        "--sparse",
        "--numeric-owner",
        "--xattrs",
        "--xattrs-include=*",
        "--acls",
    ]:
        assert flag in argv
    assert argv[:3] == ["tar", "--create", "--file=/proc/1/fd/3"]
    assert argv[-2:] == ["--directory=/foo/bar", "."]
    first_exclude = argv.index("--exclude=./.asd-work")
    assert argv.index("--anchored") < first_exclude
    assert argv.index("--no-wildcards") < first_exclude
    assert "--exclude=./a*b" in argv


def test_extract_command_restores_owners_modes_xattrs_acls() -> None:
    argv = snapshots.tar_extract_argv("/proc/1/fd/3", "/proc/1/fd/4", 1)
    for flag in [
        "--zstd",
        "--numeric-owner",
        "--xattrs",
        "--xattrs-include=*",
        "--acls",
        "--preserve-permissions",
        "--same-owner",
        "--strip-components=1",
    ]:
        assert flag in argv
    assert "--keep-old-files" not in argv  # it would skip './', the target's own attributes
    assert argv[-1] == "--directory=/proc/1/fd/4"


# --- refusals before any command runs ---------------------------------------------------------


@pytest.mark.parametrize("bad", ["", ".", "..", "a/b"])
def test_create_refuses_exclude_that_is_not_a_top_level_name(tmp_path: Path, bad: str) -> None:
    (tmp_path / "bar").mkdir()
    with pytest.raises(SafetyError, match="Cannot exclude"):
        snapshots.create(tmp_path / "bar", tmp_path / "bar", exclude=[bad], now=WHEN)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bar"]


def test_create_refuses_missing_source(tmp_path: Path) -> None:
    with pytest.raises(SafetyError, match="not a directory"):
        snapshots.create(tmp_path / "bar", tmp_path / "nope", now=WHEN)
    assert list(tmp_path.iterdir()) == []


def test_restore_without_any_snapshot_says_so_and_changes_nothing(tmp_path: Path) -> None:
    touch(tmp_path / "bar")
    with pytest.raises(SafetyError, match=f"no snapshot of {tmp_path / 'bar'}"):
        snapshots.restore(tmp_path / "bar", None, now=WHEN)
    assert [p.name for p in tmp_path.iterdir()] == ["bar"]


def test_restore_refuses_a_symlink_given_as_snapshot(tmp_path: Path) -> None:
    real = touch(tmp_path / "real.tar.zstd")
    link = tmp_path / NAME.format("20261201_101010")
    link.symlink_to(real)
    (tmp_path / "bar").mkdir()
    with pytest.raises(SafetyError, match="symbolic link"):
        snapshots.restore(tmp_path / "bar", link, now=WHEN)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["real.tar.zstd", link.name, "bar"])


def test_restore_refuses_a_directory_given_as_snapshot(tmp_path: Path) -> None:
    (tmp_path / "bar").mkdir()
    with pytest.raises(SafetyError, match="not a regular file"):
        snapshots.restore(tmp_path / "bar", tmp_path, now=WHEN)
    assert os.listdir(tmp_path) == ["bar"]


# --- messages --------------------------------------------------------------------------------


def test_describe_names_snapshot_and_where_the_old_contents_went() -> None:
    result = RestoreResult(
        Path("/foo/bar"),
        Path("/foo/.bar-backup_asd-crashrecovery-x.tar.zstd"),
        Path("/foo/bar-bad-20261201_101010"),
        12,
        True,
    )
    assert snapshots.describe(result) == (
        "Restored /foo/bar from /foo/.bar-backup_asd-crashrecovery-x.tar.zstd (12 entries "
        "checked); the previous contents are in /foo/bar-bad-20261201_101010."
    )


def test_describe_when_nothing_was_there() -> None:
    result = RestoreResult(Path("/foo/bar"), Path("/s.tar.zstd"), None, 1, True)
    assert snapshots.describe(result).endswith("; there was nothing at /foo/bar before.")
