"""Snapshots made and restored with the real tar and zstd, in directories under tmp_path.

Nothing here mounts anything. Root is needed to chown to uid 1234 and to set security.* xattrs.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import signal
import stat
import subprocess
import sys
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from asd import archive, snapshots
from asd.errors import CommandError, SafetyError
from asd.run import Result
from asd.run import run as real_run
from asd.snapshots import RestoreResult, Snapshot

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="chown and security.* xattrs need root"),
]

T1 = datetime(2026, 12, 1, 10, 10, 10)
T2 = datetime(2026, 12, 1, 10, 10, 11)
NAME = ".bar-backup_asd-crashrecovery-20261201_101010.tar.zstd"
UID = 1234
SPARSE_SIZE = 64 << 20
MTIME_NS = 981_173_106_123_456_789  # 2001-02-03, with nanoseconds
ODD_NAME = b"name with spaces\nand a newline \xe9"  # not UTF-8 either

Tree = dict[bytes, tuple[Any, ...]]


def sh(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout


def populate(target: Path) -> None:
    target.mkdir(mode=0o750)
    data = os.urandom(200_000)
    (target / "data.bin").write_bytes(data)
    os.link(target / "data.bin", target / "data-hardlink")
    with open(target / "sparse.img", "wb") as sparse:
        sparse.seek(SPARSE_SIZE)
        sparse.write(b"end")
    (target / "abs-link").symlink_to("/etc/passwd")
    (target / "dangling").symlink_to("nowhere/at/all")
    (target / "rel-link").symlink_to("data.bin")
    (target / "sub").mkdir(mode=0o700)
    (target / "sub" / "secret").write_text("only mine\n")
    (target / "sub" / "secret").chmod(0o600)
    (target / "sub" / ".asd-work").mkdir()  # not top level: kept
    (target / "empty").mkdir()
    os.mkfifo(target / "pipe")
    with open(os.path.join(os.fsencode(target), ODD_NAME), "wb") as odd:
        odd.write(b"odd")
    (target / ".asd-work-not-excluded").write_text("kept\n")
    (target / ".asd-work").mkdir()
    (target / ".asd-work" / "scratch").write_text("asd's own, excluded\n")
    os.setxattr(target / "data.bin", "user.test", b"hello")
    os.setxattr(target / "data.bin", "security.test", b"sec")
    os.setxattr(target, "user.root", b"top")
    sh("setfacl", "-m", "u:1235:r", str(target / "data.bin"))
    sh("setfacl", "-d", "-m", "u:1235:rwx", str(target / "sub"))
    os.utime(target / "data.bin", ns=(MTIME_NS, MTIME_NS))
    for dirpath, dirnames, filenames in os.walk(target):
        for name in [*dirnames, *filenames]:
            os.chown(os.path.join(dirpath, name), UID, UID, follow_symlinks=False)
    os.chown(target, UID, UID)
    os.utime(target, ns=(MTIME_NS, MTIME_NS))


def fingerprint(root: Path, skip: bytes | None = None) -> Tree:
    """What a user would notice, per path: type, mode, owner, times, bytes, links, xattrs."""
    tree: Tree = {}
    inodes: dict[tuple[int, int], bytes] = {}
    top = os.fsencode(root)
    for dirpath, dirnames, filenames in os.walk(top):
        if dirpath == top and skip in dirnames:
            dirnames.remove(skip)
        for path in [dirpath] + [os.path.join(dirpath, n) for n in dirnames + filenames]:
            st = os.lstat(path)
            rel = os.path.relpath(path, top)
            content: Any = None
            if stat.S_ISREG(st.st_mode):
                with open(path, "rb") as fh:
                    content = hashlib.sha256(fh.read()).hexdigest()
            elif stat.S_ISLNK(st.st_mode):
                content = os.readlink(path)
            xattrs = sorted(
                (name, os.getxattr(path, name, follow_symlinks=False))
                for name in os.listxattr(path, follow_symlinks=False)
            )
            same_as = inodes.setdefault((st.st_dev, st.st_ino), rel)
            tree[rel] = (
                stat.filemode(st.st_mode),
                st.st_uid,
                st.st_gid,
                st.st_size,
                st.st_mtime_ns,
                content,
                tuple(xattrs),
                same_as,
            )
    return tree


def names(directory: Path) -> list[str]:
    return sorted(os.listdir(directory))


@pytest.fixture
def target(tmp_path: Path) -> Path:
    (tmp_path / "home").mkdir()
    populate(tmp_path / "home" / "bar")
    return tmp_path / "home" / "bar"


@dataclass(frozen=True)
class Restored:
    before: Tree
    after: Tree
    acls_before: str
    snapshot: Snapshot
    result: RestoreResult


def getfacl(target: Path) -> str:
    return sh("getfacl", "-n", "-p", str(target / "data.bin"), str(target / "sub"), str(target))


@pytest.fixture
def restored(target: Path) -> Restored:
    before = fingerprint(target, skip=b".asd-work")
    acls = getfacl(target).replace(str(target), "T")
    snap = snapshots.create(target, target, now=T1)
    (target / "data.bin").write_bytes(b"damaged by the crash")
    (target / "sub" / "secret").unlink()
    result = snapshots.restore(target, None, now=T2)
    return Restored(before, fingerprint(target), acls, snap, result)


# --- round trip ------------------------------------------------------------------------------


def test_restored_tree_matches_the_original_exactly(restored: Restored) -> None:
    assert restored.after == restored.before
    assert restored.result.verified
    assert restored.result.entries == len(restored.before)


def test_restore_brings_back_bytes(restored: Restored, target: Path) -> None:
    assert (target / "sub" / "secret").read_text() == "only mine\n"
    assert len((target / "data.bin").read_bytes()) == 200_000
    assert restored.after[b"data.bin"][5] == restored.before[b"data.bin"][5]


def test_restore_brings_back_numeric_owners(target: Path, restored: Restored) -> None:
    for rel, (_, uid, gid, *_rest) in restored.after.items():
        assert (uid, gid) == (UID, UID), rel
    assert os.stat(target).st_uid == UID  # the target directory itself


def test_restore_brings_back_modes_and_times(target: Path, restored: Restored) -> None:
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o750
    assert stat.S_IMODE(os.stat(target / "sub" / "secret").st_mode) == 0o600
    assert os.stat(target / "data.bin").st_mtime_ns == MTIME_NS
    assert os.stat(target).st_mtime_ns == MTIME_NS


def test_restore_brings_back_xattrs_of_every_namespace(target: Path, restored: Restored) -> None:
    assert os.getxattr(target / "data.bin", "user.test") == b"hello"
    assert os.getxattr(target / "data.bin", "security.test") == b"sec"
    assert os.getxattr(target, "user.root") == b"top"


def test_restore_brings_back_acls(target: Path, restored: Restored) -> None:
    acls = getfacl(target).replace(str(target), "T")
    assert "user:1235:r--" in acls
    assert "default:user:1235:rwx" in acls
    assert acls == restored.acls_before


def test_restore_keeps_hard_links_as_one_inode(target: Path, restored: Restored) -> None:
    a, b = os.stat(target / "data.bin"), os.stat(target / "data-hardlink")
    assert (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)
    assert a.st_nlink == 2


def test_restore_keeps_sparse_files_sparse(target: Path, restored: Restored) -> None:
    st = os.stat(target / "sparse.img")
    assert st.st_size == SPARSE_SIZE + 3
    assert st.st_blocks * 512 < 1 << 20
    with open(target / "sparse.img", "rb") as fh:
        fh.seek(SPARSE_SIZE)
        assert fh.read() == b"end"


def test_restore_keeps_symlinks_as_links_not_copies(target: Path, restored: Restored) -> None:
    assert os.readlink(target / "abs-link") == "/etc/passwd"
    assert os.readlink(target / "dangling") == "nowhere/at/all"
    assert os.readlink(target / "rel-link") == "data.bin"
    assert os.lstat(target / "abs-link").st_uid == UID


def test_restore_keeps_fifos_empty_dirs_and_odd_names(target: Path, restored: Restored) -> None:
    assert stat.S_ISFIFO(os.lstat(target / "pipe").st_mode)
    assert (target / "empty").is_dir()
    with open(os.path.join(os.fsencode(target), ODD_NAME), "rb") as odd:
        assert odd.read() == b"odd"


def test_only_top_level_asd_work_is_left_out(target: Path, restored: Restored) -> None:
    assert not (target / ".asd-work").exists()
    assert (target / ".asd-work-not-excluded").read_text() == "kept\n"
    assert (target / "sub" / ".asd-work").is_dir()
    assert not any(".asd-work/" in m.name for m in archive.validate(restored.snapshot.path))


def test_previous_contents_are_kept_beside_the_target(target: Path, restored: Restored) -> None:
    bad = target.parent / "bar-bad-20261201_101011"
    assert restored.result.moved_aside == bad
    assert (bad / "data.bin").read_bytes() == b"damaged by the crash"
    assert not (bad / "sub" / "secret").exists()
    assert snapshots.describe(restored.result).endswith(f"the previous contents are in {bad}.")
    assert names(target.parent) == sorted([NAME, "bar", bad.name])


# --- the snapshot file -----------------------------------------------------------------------


def test_snapshot_is_private_from_its_first_byte_even_under_umask_000(
    target: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[tuple[int, int, int]] = []

    def look_then_run(argv: list[str], **kwargs: Any) -> Result:
        [partial] = [p for p in target.parent.iterdir() if p.name.endswith(".partial")]
        st = partial.stat()
        seen.append((stat.S_IMODE(st.st_mode), st.st_uid, st.st_size))
        return real_run(argv, **kwargs)

    monkeypatch.setattr("asd.snapshots.run", look_then_run)
    old = os.umask(0)
    try:
        snap = snapshots.create(target, target, now=T1)
    finally:
        os.umask(old)
    assert seen == [(0o600, 0, 0)]
    st = snap.path.stat()
    assert (stat.S_IMODE(st.st_mode), st.st_uid) == (0o600, 0)
    assert snap == Snapshot(target.parent / NAME, target, T1, st.st_size)
    assert names(target.parent) == sorted(["bar", NAME])


def test_same_second_snapshots_do_not_overwrite_each_other(target: Path) -> None:
    first = snapshots.create(target, target, now=T1)
    first_bytes = first.path.read_bytes()
    (target / "new-file").write_text("after the first snapshot\n")
    second = snapshots.create(target, target, now=T1)
    assert second.path.name == NAME.replace(".tar.zstd", "-1.tar.zstd")
    assert first.path.read_bytes() == first_bytes
    assert [s.path for s in snapshots.list_snapshots(target)] == [second.path, first.path]
    assert "./new-file" in {m.name for m in archive.validate(second.path)}
    assert "./new-file" not in {m.name for m in archive.validate(first.path)}


def test_source_may_be_another_path_than_the_target(target: Path, tmp_path: Path) -> None:
    other = tmp_path / "disk-copy"
    other.mkdir()
    (other / "only-here").write_text("from the disk copy\n")
    snap = snapshots.create(target, other, now=T1)
    assert snap.path.parent == target.parent
    assert [m.name for m in archive.validate(snap.path)] == [".", "./only-here"]


def test_crash_while_writing_leaves_a_partial_that_is_ignored_then_removed(target: Path) -> None:
    script = f"""
import os, signal
from datetime import datetime
from pathlib import Path
import asd.snapshots as s
real = s.run
def run_then_die(argv, **kwargs):
    real(argv, **kwargs)
    os.kill(os.getpid(), signal.SIGKILL)  # power cut after tar, before the rename
s.run = run_then_die
s.create(Path({str(target)!r}), Path({str(target)!r}), now=datetime(2026, 12, 1, 10, 10, 10))
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    partial = target.parent / (NAME + ".partial")
    assert partial.stat().st_size > 0
    assert snapshots.list_snapshots(target) == []
    assert snapshots.remove_partial(target) == [partial]
    assert names(target.parent) == ["bar"]
    assert snapshots.create(target, target, now=T1).path.name == NAME  # the name is free again


def test_failed_tar_leaves_no_file_behind(target: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_argv = snapshots.tar_create_argv
    monkeypatch.setattr(
        snapshots, "tar_create_argv", lambda *a: [*real_argv(*a)[:-1], "--no-such-option", "."]
    )
    with pytest.raises(
        CommandError,
        match=re.escape(f"Could not snapshot {target}; nothing was kept: ")
        + ".*unrecognized option",
    ):
        snapshots.create(target, target, now=T1)
    assert names(target.parent) == ["bar"]


# --- restore: choosing and failing -----------------------------------------------------------


def test_restore_defaults_to_the_newest_snapshot(target: Path) -> None:
    snapshots.create(target, target, now=T1)
    (target / "data.bin").write_text("newer\n")
    newest = snapshots.create(target, target, now=T2)
    (target / "data.bin").write_text("newest, never snapshotted\n")
    result = snapshots.restore(target, None, now=datetime(2026, 12, 2))
    assert result.snapshot == newest.path
    assert (target / "data.bin").read_text() == "newer\n"


def test_restore_into_a_missing_target_moves_nothing_aside(target: Path) -> None:
    before = fingerprint(target, skip=b".asd-work")
    snapshots.create(target, target, now=T1)
    subprocess.run(["rm", "-rf", str(target)], check=True)
    result = snapshots.restore(target, None, now=T2)
    assert result.moved_aside is None
    assert fingerprint(target) == before
    assert names(target.parent) == sorted(["bar", NAME])


def test_restore_from_an_explicit_file_elsewhere(target: Path, tmp_path: Path) -> None:
    snap = snapshots.create(target, target, now=T1)
    elsewhere = tmp_path / "kept-by-hand.tar.zstd"
    snap.path.rename(elsewhere)
    (target / "data.bin").write_text("damaged\n")
    result = snapshots.restore(target, elsewhere, now=T2)
    assert result.snapshot == elsewhere
    assert len((target / "data.bin").read_bytes()) == 200_000


def test_upstream_snapshot_restores_without_the_extra_directory(target: Path) -> None:
    # Upstream: tar cf - -C /foo .bar-backup_asd-old | zstd > /foo/.bar-backup_asd-crashrecovery-…
    parent = target.parent
    sh("cp", "-a", str(target), str(parent / ".bar-backup_asd-old"))
    before = fingerprint(target)
    sh(
        "tar",
        "--xattrs",
        "--acls",
        "-cf",
        str(parent / "u.tar"),
        "-C",
        str(parent),
        ".bar-backup_asd-old",
    )
    sh("zstd", "-q", "--rm", str(parent / "u.tar"), "-o", str(parent / NAME))
    sh("rm", "-rf", str(parent / ".bar-backup_asd-old"))
    (target / "data.bin").write_text("damaged\n")
    snapshots.restore(target, None, now=T2)
    assert not (target / ".bar-backup_asd-old").exists()
    after = fingerprint(target)
    assert after.keys() == before.keys()
    assert after[b"data.bin"] == before[b"data.bin"]
    assert after[b"."][:3] == ("drwxr-x---", UID, UID)  # from the stripped top directory


def unchanged_after(target: Path, action: Callable[[], object]) -> Exception:
    """Run ``action``, which must fail, and check the target and its parent are untouched."""
    before, listing = fingerprint(target), names(target.parent)
    with pytest.raises((SafetyError, CommandError)) as caught:
        action()
    assert fingerprint(target) == before
    assert names(target.parent) == listing  # no -bad- directory, no partial target
    return caught.value


def test_failed_extraction_puts_the_old_target_back(
    target: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    snapshots.create(target, target, now=T1)
    (target / "data.bin").write_text("current\n")
    real_argv = snapshots.tar_extract_argv
    monkeypatch.setattr(snapshots, "tar_extract_argv", lambda *a: [*real_argv(*a), "--bogus"])
    error = unchanged_after(target, lambda: snapshots.restore(target, None, now=T2))
    assert f"Could not extract the snapshot into {target}" in str(error)
    assert (target / "data.bin").read_text() == "current\n"


def test_failed_verification_puts_the_old_target_back(
    target: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    snapshots.create(target, target, now=T1)
    (target / "data.bin").write_text("current\n")
    real_argv = snapshots.tar_extract_argv
    monkeypatch.setattr(  # tar "succeeds" but silently leaves one file out
        snapshots, "tar_extract_argv", lambda *a: [*real_argv(*a), "--exclude=./sub/secret"]
    )
    error = unchanged_after(target, lambda: snapshots.restore(target, None, now=T2))
    assert f"{target / 'sub/secret'} did not come out of the snapshot" in str(error)


def test_target_that_cannot_be_moved_aside_is_left_alone(
    target: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    snapshots.create(target, target, now=T1)

    def busy(*args: Any, **kwargs: Any) -> None:
        raise OSError(16, "Device or resource busy")  # what rename(2) says for a mount point

    monkeypatch.setattr(os, "rename", busy)
    error = unchanged_after(target, lambda: snapshots.restore(target, None, now=T2))
    assert "mount point" in str(error)


def test_damaged_snapshot_is_refused_with_its_name(target: Path) -> None:
    snap = snapshots.create(target, target, now=T1)
    data = snap.path.read_bytes()
    snap.path.write_bytes(data[: len(data) // 2])
    error = unchanged_after(target, lambda: snapshots.restore(target, None, now=T2))
    assert isinstance(error, CommandError)
    assert f"Could not decompress {snap.path}" in str(error)


def test_zstd_file_that_is_not_a_tar_is_refused(target: Path) -> None:
    subprocess.run(
        ["zstd", "-q", "-o", str(target.parent / NAME)], input=b"\x01" * 4096, check=True
    )
    error = unchanged_after(target, lambda: snapshots.restore(target, None, now=T2))
    assert "not a readable tar archive" in str(error)


# --- hostile snapshots -----------------------------------------------------------------------


def entry(
    name: str, kind: bytes = tarfile.REGTYPE, link: str = "", **extra: Any
) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, link
    data = b"pwned\n" if kind == tarfile.REGTYPE else b""
    info.size = len(data)
    for key, value in extra.items():
        setattr(info, key, value)
    return info, data


def write_hostile(path: Path, entries: list[tuple[tarfile.TarInfo, bytes]]) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in [entry("./", tarfile.DIRTYPE), *entries]:
            tar.addfile(info, io.BytesIO(data))
    subprocess.run(["zstd", "-q", "-o", str(path)], input=buf.getvalue(), check=True)


def hostile_cases(escape: Path) -> dict[str, tuple[list[tuple[tarfile.TarInfo, bytes]], str]]:
    return {
        "absolute name": ([entry(str(escape / "pwned"))], str(escape / "pwned")),
        "dot-dot": ([entry("./../../escape/pwned")], "./../../escape/pwned"),
        "device node": ([entry("./null", tarfile.CHRTYPE, devmajor=1, devminor=3)], "./null"),
        "through a symlink": (
            [entry("./a", tarfile.SYMTYPE, str(escape)), entry("./a/pwned")],
            "./a/pwned",
        ),
        "hard link out": ([entry("./h", tarfile.LNKTYPE, str(escape / "victim"))], "./h"),
        "NUL in name": ([entry("./a", pax_headers={"path": "./a\0b"})], "./a\0b"),
    }


CASES = list(hostile_cases(Path("/x")))


@pytest.mark.parametrize("case", CASES)
def test_hostile_snapshot_is_refused_and_nothing_changes(
    target: Path, tmp_path: Path, case: str
) -> None:
    escape = tmp_path / "escape"
    escape.mkdir()
    (escape / "victim").write_text("untouched\n")
    entries, offender = hostile_cases(escape)[case]
    write_hostile(target.parent / NAME, entries)
    with pytest.raises(SafetyError, match="Refusing") as caught:
        archive.validate(target.parent / NAME)
    assert f"member {offender!r}" in str(caught.value)
    error = unchanged_after(target, lambda: snapshots.restore(target, None, now=T2))
    assert f"member {offender!r}" in str(error)
    assert names(escape) == ["victim"]
    assert (escape / "victim").read_text() == "untouched\n"
    assert os.stat(escape / "victim").st_nlink == 1
