"""Overlay mode's lower tree kept between sessions: what the record lets a sync skip, and
that every change made to the disk copy meanwhile reaches the tree (`asd.lower`)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from asd import dirmeta, lower
from asd.dirmeta import dir_metadata
from asd.errors import SafetyError

WORK = frozenset({".asd-work"})


@pytest.fixture
def tick(monkeypatch: pytest.MonkeyPatch) -> None:
    """Directories the test just made count as settled (a test runs within one second)."""
    monkeypatch.setattr(lower, "RACY_NS", 0)


def make_tree(src: Path) -> None:
    for d in ("a/deep/er", "b", "c/sub", "gone/inner", "same"):
        (src / d).mkdir(parents=True)
    for f in ("a/f", "a/deep/er/g", "b/h", "c/sub/i", "gone/inner/j", "same/k", "top"):
        (src / f).write_text(f)
    os.symlink("a/f", src / "link")
    os.link(src / "b/h", src / "c/h2")
    (src / ".asd-work").mkdir()


def refresh(src: Path) -> lower.Refresh:
    work = src / ".asd-work"
    return lower.refresh(src, work / "lower", work / "lower.json", WORK)


def listed_dirs(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The directories the next refresh lists (in the order it lists them)."""
    seen: list[str] = []
    update = lower._Walk._update

    def spy(self: lower._Walk, rel: str, src_dir: str, dst_dir: str) -> list[str]:
        seen.append(rel)
        return update(self, rel, src_dir, dst_dir)

    monkeypatch.setattr(lower._Walk, "_update", spy)
    return seen


def same_metadata(src: Path, dst: Path) -> bool:
    for dirpath, _dirs, _files in os.walk(dst):
        rel = os.path.relpath(dirpath, dst)
        mine, theirs = dir_metadata(Path(dirpath)), dir_metadata(src / rel)
        mine.pop("atime_ns"), theirs.pop("atime_ns")
        if mine != theirs:
            return False
    return True


def test_an_unchanged_tree_is_not_listed_again(
    tmp_path: Path, tick: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_tree(tmp_path)
    first = refresh(tmp_path)
    assert first.built and first.dirs == 10 and first.linked == 9 and first.removed == 0
    seen = listed_dirs(monkeypatch)
    again = refresh(tmp_path)
    assert (again.built, again.listed, again.linked, again.removed) == (False, 0, 0, 0)
    assert again.dirs == 10 and seen == []
    assert lower.is_mirror(tmp_path, tmp_path / ".asd-work/lower", WORK)


def test_every_change_made_while_asd_was_stopped_reaches_the_tree(
    tmp_path: Path, tick: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_tree(tmp_path)
    refresh(tmp_path)
    src = tmp_path
    (src / "a/new").write_text("new")  # created
    (src / "b/h").unlink()  # removed (its other name stays)
    (src / "top.tmp").write_text("replaced")
    os.replace(src / "top.tmp", src / "top")  # replaced by rename: another inode
    os.rename(src / "c/sub", src / "c/moved")  # a directory renamed
    import shutil

    shutil.rmtree(src / "gone")  # a directory removed with what it held
    (src / "fresh/x/y").mkdir(parents=True)  # a new subtree
    (src / "fresh/x/y/z").write_text("z")
    os.chmod(src / "same", 0o700)  # only a directory's own metadata
    os.setxattr(src / "a/deep", "user.note", b"1")
    os.unlink(src / "link")
    os.symlink("b", src / "link")  # a symlink pointing elsewhere
    os.unlink(src / "a/f")
    (src / "a/f").mkdir()  # a file become a directory
    seen = listed_dirs(monkeypatch)
    done = refresh(src)
    dst = src / ".asd-work/lower"
    assert lower.is_mirror(src, dst, WORK) and same_metadata(src, dst)
    assert os.readlink(dst / "link") == "b"
    assert (dst / "c/moved/i").read_text() == "c/sub/i" and not (dst / "gone").exists()
    # The directories that changed and the ones under a new name, nothing else: a/deep/er
    # is skipped (its parent's xattr is not its own change).
    assert sorted(seen) == sorted(
        ["", "a", "a/deep", "a/f", "b", "c", "c/moved", "fresh", "fresh/x", "fresh/x/y", "same"]
    )
    assert not done.built and done.listed == len(seen)
    # Nothing left to do afterwards.
    seen.clear()
    assert refresh(src).listed == 0 and seen == []


def test_links_made_to_a_file_with_other_names_are_counted(tmp_path: Path, tick: None) -> None:
    """`Refresh.shared`, which lets the hard-link check trust a find run meanwhile
    (`asd.links`): links made to a file that then has more than its name and the new one."""
    src = tmp_path / "t"
    src.mkdir()
    make_tree(src)
    assert refresh(src).shared == 2  # b/h and c/h2: one file, two names in the target
    (src / "plain").write_text("one name")
    (src / "linked").write_text("one name and one outside")
    os.link(src / "linked", tmp_path / "outside")
    again = refresh(src)
    assert (again.linked, again.shared) == (2, 1)


def test_a_file_changed_in_place_needs_nothing(
    tmp_path: Path, tick: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_tree(tmp_path)
    refresh(tmp_path)
    with open(tmp_path / "a/deep/er/g", "a") as fh:
        fh.write(" and more")
    os.chmod(tmp_path / "b/h", 0o600)
    seen = listed_dirs(monkeypatch)
    assert refresh(tmp_path).listed == 0 and seen == []
    assert (tmp_path / ".asd-work/lower/a/deep/er/g").read_text() == "a/deep/er/g and more"


def test_a_directory_changed_just_before_is_listed_again_next_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its ctime may not move for a change within the same clock tick: it stays unknown."""
    make_tree(tmp_path)
    first = refresh(tmp_path)  # everything was made within RACY_NS: all unknown
    record = json.loads((tmp_path / ".asd-work/lower.json").read_text())
    assert first.built and all(d[2] == lower.UNKNOWN for d in record["dirs"])
    seen = listed_dirs(monkeypatch)
    monkeypatch.setattr(lower, "RACY_NS", 0)
    assert refresh(tmp_path).listed == 10 and len(seen) == 10
    seen.clear()
    assert refresh(tmp_path).listed == 0 and seen == []


def test_a_directory_that_changes_while_it_is_listed_is_listed_again(
    tmp_path: Path, tick: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_tree(tmp_path)
    refresh(tmp_path)
    os.chmod(tmp_path / "same", 0o700)
    real: Callable[[int], dict[str, object]] = dirmeta.dir_metadata_fd
    late = tmp_path / "same/late"

    def racing(fd: int) -> dict[str, object]:
        if os.readlink(f"/proc/self/fd/{fd}") == str(tmp_path / "same") and not late.exists():
            late.write_text("written after asd listed the directory")
        return real(fd)

    monkeypatch.setattr(lower, "dir_metadata_fd", racing)
    refresh(tmp_path)
    assert not (tmp_path / ".asd-work/lower/same/late").exists()  # missed this time...
    monkeypatch.setattr(lower, "dir_metadata_fd", real)
    refresh(tmp_path)  # ... so it was recorded as unknown, and the next one takes it
    assert lower.is_mirror(tmp_path, tmp_path / ".asd-work/lower", WORK)


def test_something_changed_in_the_tree_itself_is_put_right(
    tmp_path: Path, tick: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_tree(tmp_path)
    refresh(tmp_path)
    dst = tmp_path / ".asd-work/lower"
    (dst / "b/stray").write_text("not the disk copy's")
    os.unlink(dst / "a/deep/er/g")
    seen = listed_dirs(monkeypatch)
    done = refresh(tmp_path)
    assert sorted(seen) == ["a/deep/er", "b"] and done.removed == 1 and done.linked == 1
    assert lower.is_mirror(tmp_path, dst, WORK)


def test_the_spare_gives_its_links_where_they_name_the_disk_copys_file(
    tmp_path: Path, tick: None
) -> None:
    """The last session's delta, kept as the spare: a link to the file the disk copy holds at
    that name is moved into the tree (the file keeps its two links); a link to a version
    replaced since, one under a name that is gone, a special file and a directory are not, and
    the spare is gone afterwards."""
    make_tree(tmp_path)
    refresh(tmp_path)
    work = tmp_path / ".asd-work"
    spare = work / lower.SPARE
    for rel in ("a", "b", "c/sub", "old"):
        (spare / rel).mkdir(parents=True)
    for rel in ("a/f", "b/h", "top"):  # the resync replaced them: new inodes
        (tmp_path / f"{rel}.new").write_text(f"{rel} again")
        os.replace(tmp_path / f"{rel}.new", tmp_path / rel)
    os.link(tmp_path / "a/f", spare / "a/f")  # the disk copy's file: moved
    os.link(tmp_path / "top", spare / "top")  # the same, at the top
    (spare / "b/h").write_text("a version replaced since")  # another inode: not used
    # A special file at a name the disk copy has (a whiteout is a character device, which
    # only root may make: the packages run these tests unprivileged; test_lower_kept has them).
    os.mkfifo(spare / "c/sub/i")
    (spare / "old/gone").write_text("a name that is gone")
    moved = os.lstat(spare / "a/f").st_ino

    done = refresh(tmp_path)
    assert (done.moved, done.linked) == (2, 1), done
    assert os.lstat(work / "lower/a/f").st_ino == moved
    assert os.lstat(tmp_path / "a/f").st_nlink == 2 and os.lstat(tmp_path / "top").st_nlink == 2
    assert not os.path.lexists(spare)
    assert lower.is_mirror(tmp_path, work / "lower", WORK)
    assert "2 moved from the last session's delta" in done.describe()


def test_a_stop_keeps_the_newest_delta_as_the_spare(tmp_path: Path) -> None:
    for name in ("delta.2", "delta.10", "delta.x", "lower"):
        (tmp_path / name).mkdir()
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        lower.keep_spare(fd)
        assert sorted(os.listdir(tmp_path)) == ["delta.2", "delta.x", "lower", "spare"]
        (tmp_path / "delta.11").mkdir()
        lower.keep_spare(fd)  # one is kept already: the caller removes the delta
        assert sorted(os.listdir(tmp_path)) == ["delta.11", "delta.2", "delta.x", "lower", "spare"]
    finally:
        os.close(fd)


@pytest.mark.parametrize("spoil", ["missing", "garbage", "readable", "other-directory", "tree"])
def test_a_record_that_cannot_be_trusted_means_building_from_nothing(
    tmp_path: Path, tick: None, spoil: str
) -> None:
    src = tmp_path / "t"
    make_tree(src)
    refresh(src)
    record, dst = src / ".asd-work/lower.json", src / ".asd-work/lower"
    (dst / "b/stray").write_text("x")
    os.utime(dst / "b", ns=(1, 1))  # the record's ctime for it no longer matters either way
    if spoil == "missing":
        record.unlink()
    elif spoil == "garbage":
        record.write_text("{not json")
    elif spoil == "readable":
        os.chmod(record, 0o644)
    elif spoil == "other-directory":
        os.rename(src, tmp_path / "old")
        (tmp_path / "old").rename(tmp_path / "t2")
        src.mkdir()
        os.rename(tmp_path / "t2/.asd-work", src / ".asd-work")
        (src / "only").write_text("only")
    elif spoil == "tree":
        import shutil

        shutil.rmtree(dst)
        dst.write_text("not a directory")
    done = refresh(src)
    assert done.built and lower.is_mirror(src, dst, WORK)
    assert json.loads(record.read_text())["version"] == lower.VERSION


@pytest.mark.parametrize("swapped", ["c/sub", "c"])
def test_a_directory_swapped_for_a_symlink_during_the_walk_is_refused_not_followed(
    tmp_path: Path, tick: None, monkeypatch: pytest.MonkeyPatch, swapped: str
) -> None:
    """The owner of a target replaces a directory by a symlink to one elsewhere on the same
    file system after asd listed its parent: no file from there may get into the tree."""
    src, elsewhere = tmp_path / "t", tmp_path / "elsewhere"
    make_tree(src)
    elsewhere.mkdir()
    update = lower._Walk._update

    def swap_first(self: lower._Walk, rel: str, src_dir: str, dst_dir: str) -> list[str]:
        if rel == "c/sub" and not os.path.islink(src / swapped):
            os.rename(src / swapped, elsewhere / "moved")
            os.symlink(elsewhere / "moved", src / swapped)
        return update(self, rel, src_dir, dst_dir)

    monkeypatch.setattr(lower._Walk, "_update", swap_first)
    with pytest.raises(SafetyError, match="stopped being a directory"):
        refresh(src)
    # What "c/sub" names through the symlink (files of "c" itself were linked before the swap).
    through = elsewhere / "moved" / ("sub" if swapped == "c" else "")
    outside = {os.lstat(p).st_ino for p in through.rglob("*") if not p.is_dir()}
    linked = {os.lstat(p).st_ino for p in (src / ".asd-work/lower").rglob("*") if not p.is_dir()}
    assert outside and not outside & linked, "a file from outside the target was linked"

    monkeypatch.setattr(lower._Walk, "_update", update)
    os.unlink(src / swapped)
    os.rename(elsewhere / "moved", src / swapped)
    refresh(src)
    assert lower.is_mirror(src, src / ".asd-work/lower", WORK)
