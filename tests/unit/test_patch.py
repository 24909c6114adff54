"""asd.patch: the blocks a patch stages, that applying it gives the RAM file, what it refuses."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from asd import patch
from asd.errors import SafetyError
from asd.journal import Journal
from asd.patch import BLOCK, Patch
from asd.tree import Changes

KIB = 1024


def body(size: int, seed: int = 1) -> bytes:
    return random.Random(seed).randbytes(size)  # noqa: S311 - test data, not secrets


def planned(ram: Path, disk: Path, out: Path) -> Patch | None:
    with open(ram, "rb") as r, open(disk, "rb") as d, open(out, "wb") as o:
        return patch.plan(r.fileno(), d.fileno(), o.fileno())


def applied(disk: Path, out: Path, p: Patch) -> None:
    fd = os.open(disk, os.O_WRONLY)
    data = os.open(out, os.O_RDONLY)
    try:
        patch.apply(fd, data, p)
    finally:
        os.close(fd)
        os.close(data)


@pytest.fixture
def pair(tmp_path: Path) -> tuple[Path, Path, Path]:
    ram, disk = tmp_path / "ram", tmp_path / "disk"
    data = body(1024 * KIB)
    ram.write_bytes(data)
    disk.write_bytes(data)
    return ram, disk, tmp_path / "staged"


def test_an_append_stages_only_the_tail(pair: tuple[Path, Path, Path]) -> None:
    ram, disk, out = pair
    with open(ram, "ab") as fh:
        fh.write(b"x" * 10 * KIB)
    os.utime(ram, ns=(1_000_000_000, 2_000_000_000))
    inode = disk.stat().st_ino
    p = planned(ram, disk, out)
    assert p is not None
    assert p.extents == ((1024 * KIB, 10 * KIB),)  # three blocks, the last one partial
    assert p.written == out.stat().st_size == 10 * KIB
    assert p.size == 1034 * KIB
    applied(disk, out, p)
    applied(disk, out, p)  # rolling forward again writes the same bytes
    assert disk.read_bytes() == ram.read_bytes()
    assert disk.stat().st_ino == inode
    assert disk.stat().st_mtime_ns == 2_000_000_000


def test_a_changed_byte_in_the_middle_stages_one_block(pair: tuple[Path, Path, Path]) -> None:
    ram, disk, out = pair
    with open(ram, "r+b") as fh:
        fh.seek(300_000)
        fh.write(b"!")
        fh.seek(300_001 + 5 * BLOCK)
        fh.write(b"?")
    p = planned(ram, disk, out)
    assert p is not None
    assert p.extents == ((73 * BLOCK, BLOCK), (78 * BLOCK, BLOCK))
    applied(disk, out, p)
    assert disk.read_bytes() == ram.read_bytes()


def test_shrinking_and_growing_with_a_hole(pair: tuple[Path, Path, Path]) -> None:
    ram, disk, out = pair
    os.truncate(ram, 512 * KIB)
    p = planned(ram, disk, out)
    assert p is not None and p.extents == () and p.size == 512 * KIB
    applied(disk, out, p)
    assert disk.read_bytes() == ram.read_bytes()

    os.truncate(ram, 64 * 1024 * KIB)  # 64 MiB of zeros past the end: a hole, not data
    p = planned(ram, disk, out)
    assert p is not None and p.extents == ()
    applied(disk, out, p)
    assert disk.stat().st_size == 64 * 1024 * KIB
    assert disk.stat().st_blocks * 512 < 2 * 1024 * KIB, "the hole was written as data"
    assert disk.read_bytes() == ram.read_bytes()


def test_copied_whole_instead(pair: tuple[Path, Path, Path], tmp_path: Path) -> None:
    ram, disk, out = pair
    ram.write_bytes(body(1024 * KIB, seed=2))  # everything differs: a replacement costs less
    assert planned(ram, disk, out) is None
    ram.write_bytes(disk.read_bytes() + b"tail")
    os.link(disk, tmp_path / "other-name")
    assert planned(ram, disk, out) is None, "a disk file with another name was patched"
    os.unlink(tmp_path / "other-name")
    assert planned(ram, disk, out) is not None
    os.setxattr(ram, "user.colour", b"blue")
    assert planned(ram, disk, out) is None, "an xattr change needs the whole-file copy"


def test_small_files_are_patched_whole_and_share_one_data_file(tmp_path: Path) -> None:
    """A small file rewritten costs less in place (its data twice) than replaced (a new inode,
    the old one freed, two directory blocks); the patches of one resync share a data file,
    and one abandoned half-way leaves nothing in it."""
    out = tmp_path / "staged"
    pairs = []
    for i, (old, new) in enumerate(
        [(b"a" * 3000, b"b" * 3500), (b"x" * 10_000, b""), (body(900 * KIB), body(900 * KIB, 3))]
    ):
        ram, disk = tmp_path / f"ram{i}", tmp_path / f"disk{i}"
        ram.write_bytes(new)
        disk.write_bytes(old)
        pairs.append((ram, disk))
    got = []
    with open(out, "wb") as o:
        for ram, disk in pairs:
            with open(ram, "rb") as r, open(disk, "rb") as d:
                got.append(patch.plan(r.fileno(), d.fileno(), o.fileno()))
    first, second, third = got
    assert first is not None and first.extents == ((0, 3500),) and first.data_offset == 0
    assert second is not None and second.extents == () and second.data_offset == 3500
    assert third is None
    assert out.stat().st_size == 3500, "the abandoned patch left its blocks behind"
    for (ram, disk), p in zip(pairs[:2], got[:2], strict=True):
        assert p is not None
        applied(disk, out, p)
        assert disk.read_bytes() == ram.read_bytes()


def test_records_round_trip_and_refuse_what_asd_did_not_write() -> None:
    p = Patch(100 * KIB, ((0, 4096), (8192, 100)), 0o640, 1, 2, 3, 4, "0", 12)
    assert Patch.from_record(p.to_record()) == p
    bad: list[dict[str, object]] = [
        {**p.to_record(), "size": -1},
        {**p.to_record(), "extents": [[8192, 10], [0, 4096]]},  # overlapping, out of order
        {**p.to_record(), "extents": [[0, 0]]},
        {**p.to_record(), "extents": [[0, 200 * KIB]]},  # past the size
        {**p.to_record(), "data": "../../etc/passwd"},
        {**p.to_record(), "mode": 0o170644},
        {**p.to_record(), "uid": "0"},
        {**p.to_record(), "data_offset": -5},
    ]
    for record in bad:
        with pytest.raises((ValueError, TypeError)):
            Patch.from_record(record)


def test_the_apply_refuses_a_file_that_was_swapped(pair: tuple[Path, Path, Path]) -> None:
    ram, disk, out = pair
    pfd = os.open(disk.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.replace(disk, disk.with_name("moved"))
        disk.symlink_to("/etc/passwd")
        with pytest.raises(SafetyError, match="no longer the file"):
            patch.open_disk_file(pfd, disk.name, disk)
        disk.unlink()
        with pytest.raises(SafetyError, match="no longer the file"):
            patch.open_disk_file(pfd, disk.name, disk)
        os.link(disk.with_name("moved"), disk)  # a file with another name somewhere
        with pytest.raises(SafetyError, match="no longer the file"):
            patch.open_disk_file(pfd, disk.name, disk)
        disk.unlink()
        os.mkfifo(disk)
        with pytest.raises(SafetyError, match="no longer the file"):
            patch.open_disk_file(pfd, disk.name, disk)
    finally:
        os.close(pfd)


def test_a_commit_interrupted_while_patching_rolls_forward(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ram, disk = tmp_path / "ram", tmp_path / "disk"
    (ram / "d").mkdir(parents=True)
    (disk / "d").mkdir(parents=True)
    for name in ("d/log", "big"):
        data = body(256 * KIB, seed=len(name))
        (ram / name).write_bytes(data + b"appended")
        (disk / name).write_bytes(data)
    journal = Journal(disk)
    with journal.new_stage() as stage:
        patches = patch.stage_patches(ram, disk, ["d/log", "big", "missing"], stage)
    assert sorted(patches) == ["big", "d/log"]

    real = patch.apply
    calls = []

    def crash_after_first(fd: int, data: int, p: Patch) -> None:
        real(fd, data, p)
        calls.append(p)
        raise KeyboardInterrupt  # stands for the power going out

    monkeypatch.setattr("asd.journal.apply_patch", crash_after_first)
    with pytest.raises(KeyboardInterrupt):
        journal.commit(Changes((), (), ()), {}, patches)
    assert journal.record.exists()
    monkeypatch.setattr("asd.journal.apply_patch", real)
    assert journal.recover() is not None
    for name in ("d/log", "big"):
        assert (disk / name).read_bytes() == (ram / name).read_bytes()
    assert not journal.record.exists()
    assert not journal.stage.exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")
def test_an_owner_change_is_copied_whole(pair: tuple[Path, Path, Path]) -> None:
    ram, disk, out = pair
    with open(ram, "ab") as fh:
        fh.write(b"more")
    os.chown(ram, 1234, 1234)  # a patch's fchown could meet a quota after the commit point
    assert planned(ram, disk, out) is None


def test_no_patches_when_the_disk_is_nearly_full(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An append allocates blocks after the commit point: with less than SPACE_FACTOR times
    the patches' bytes free, every file is copied whole (which fails before the commit)."""
    ram, disk = tmp_path / "ram", tmp_path / "disk"
    ram.mkdir()
    disk.mkdir()
    (ram / "log").write_bytes(b"x" * 100 * KIB + b"y" * 40 * KIB)
    (disk / "log").write_bytes(b"x" * 100 * KIB)
    journal = Journal(disk)
    with journal.new_stage() as stage:
        assert list(patch.stage_patches(ram, disk, ["log"], stage)) == ["log"]
    real = os.fstatvfs

    def nearly_full(fd: int) -> os.statvfs_result:
        v = real(fd)
        free = (40 * KIB * patch.SPACE_FACTOR - 1) // v.f_frsize
        return os.statvfs_result((v.f_bsize, v.f_frsize, v.f_blocks, free, *v[4:]))

    monkeypatch.setattr(os, "fstatvfs", nearly_full)
    with journal.new_stage() as stage:
        assert patch.stage_patches(ram, disk, ["log"], stage) == {}
        data = journal.stage / patch.DATA_DIR / patch.DATA_NAME
        assert data.stat().st_size == 0, "the abandoned patches' blocks were left staged"


def test_patches_only_where_the_file_system_overwrites_in_place(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from asd import writeback
    from asd.layout import Instance
    from asd.mounts import MountTable, parse_mountinfo

    layout = Instance(Path("/etc/asd.conf"), tmp_path / "volatile").target(Path("/srv/t"))
    changes = Changes((), ("app.log",), ())
    new = {"app.log": (0o100000, 5, 0o100644, 0, 0, 9, 1, 1, 1, 0)}
    for fstype, expected in (("ext4", ["app.log"]), ("btrfs", []), ("xfs", []), ("f2fs", [])):
        line = f"20 1 8:1 / / rw,relatime shared:1 - {fstype} /dev/sda1 rw\n"
        table = MountTable(parse_mountinfo(line))
        monkeypatch.setattr(MountTable, "read", classmethod(lambda cls, t=table: t))
        assert writeback.patch_candidates(layout, changes, new) == expected, fstype
