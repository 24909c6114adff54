"""The index file format, and diffs of indexes with an overlay's whiteouts and flags."""

from __future__ import annotations

import os
import shutil
import stat
import struct
from pathlib import Path

import pytest

from asd import index
from asd.tree import OPAQUE, WHITEOUT_ENTRY, Entry, diff, drop_subtrees, with_inodes
from asd.tree import index as tree_index


def entry(kind: int = stat.S_IFREG, ino: int = 1, size: int = 0, ctime: int = 0) -> Entry:
    return (kind, ino, kind | 0o644, 0, 0, size, ctime, ctime, 1, 0)


def test_round_trip_keeps_every_name_and_number(tmp_path: Path) -> None:
    odd = os.fsdecode(b"latin-\xe9/caf\xc3\xa9 with space")
    idx = {
        "": entry(stat.S_IFDIR),
        "a": entry(size=2**40, ctime=-(2**62)),
        odd: entry(ino=2**63 - 1),
        "w": WHITEOUT_ENTRY,
    }
    for scope in index.SCOPES:
        index.save(tmp_path / "i", idx, scope)
        assert index.load(tmp_path / "i") == (idx, scope)
    assert index.load(tmp_path / "absent") == ({}, None)
    index.save(tmp_path / "e", {})
    assert index.load(tmp_path / "e") == ({}, "full")


def test_reads_the_json_index_of_earlier_versions(tmp_path: Path) -> None:
    (tmp_path / "i").write_text('{"": [16384, 1, 16877, 0, 0, 4096, 5, 6, 2, 0]}')
    assert index.load(tmp_path / "i") == ({"": (16384, 1, 16877, 0, 0, 4096, 5, 6, 2, 0)}, "json")


def test_truncated_or_foreign_files_are_refused(tmp_path: Path) -> None:
    data = index.encode({"a": entry(), "b": entry()})
    with pytest.raises(ValueError, match="truncated"):
        index.decode(data[:-8])
    with pytest.raises(ValueError, match="scope"):
        index.decode(data.replace(b"full", b"half", 1))
    with pytest.raises(ValueError, match="10 fields"):
        index.encode({"a": (1, 2)})  # type: ignore[dict-item]


def test_walk_index_matches_lstat(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "f").write_text("x")
    os.symlink("d/f", tmp_path / "l")
    (tmp_path / ".asd-work").mkdir()
    idx = tree_index(tmp_path, frozenset({".asd-work"}))
    assert sorted(idx) == ["", "d", "d/f", "l"]
    st = os.lstat(tmp_path / "d" / "f")
    assert idx["d/f"][1:] == (
        st.st_ino, st.st_mode, st.st_uid, st.st_gid, st.st_size,
        st.st_mtime_ns, st.st_ctime_ns, st.st_nlink, st.st_rdev,
    )  # fmt: skip


def test_diff_of_overlay_entries() -> None:
    root = entry(stat.S_IFDIR)
    d = entry(stat.S_IFDIR, ino=2)
    old = {"": root, "d": d, "d/x": entry(ino=3), "gone": WHITEOUT_ENTRY}
    assert diff(old, dict(old)).empty
    # A new whiteout deletes; an old whiteout dropped from the index deletes nothing.
    new = {"": root, "d": d, "d/x": WHITEOUT_ENTRY}
    ch = diff(old, new)
    assert ch.deleted == ("d/x",) and ch.files == () and ch.dirs == ("d",)
    # A directory marked opaque is not a type change (its subtree is handled by asd.upper).
    opaque: Entry = (stat.S_IFDIR | OPAQUE, *d[1:])
    ch = diff(old, {**old, "d": opaque})
    assert ch.deleted == () and ch.dirs == ("", "d")
    # A whiteout replaced by a file: written, nothing to delete (it is gone on disk already).
    ch = diff(old, {**old, "gone": entry(ino=9)})
    assert ch.deleted == () and ch.files == ("gone",)


def test_changes_saved_beside_the_index_read_back_until_it_is_written_whole(
    tmp_path: Path,
) -> None:
    path = tmp_path / "i"
    idx = {f"d/{n}": entry(ino=n) for n in range(2000)}
    idx[""] = entry(stat.S_IFDIR)
    index.save(path, idx)
    whole = path.read_bytes()
    idx["d/5"] = entry(ino=5, size=9)
    del idx["d/6"]
    idx["new"] = entry(ino=9999)
    index.save_changes(path, idx, {"d/5", "d/6", "new"})
    assert path.read_bytes() == whole, "the index file was written again"
    assert index.load(path) == (idx, "full")
    idx["d/7"] = entry(ino=7, size=1)  # a second resync: the delta holds both
    index.save_changes(path, idx, {"d/7"})
    assert index.load(path) == (idx, "full")
    # Past an eighth of the index (at least 1000 entries), it is written whole.
    index.save(path, idx)
    for n in range(1001):
        idx[f"d/{n}"] = entry(ino=n, size=3)
    index.save_changes(path, idx, {f"d/{n}" for n in range(1001)})
    assert not index.delta_file(path).exists() and index.load(path) == (idx, "full")


def test_a_delta_left_from_an_older_index_file_is_ignored(tmp_path: Path) -> None:
    path = tmp_path / "i"
    index.save(path, {"a": entry(), "b": entry()})
    index.save_changes(path, {"a": entry(size=1)}, {"a", "b"})
    stale = index.delta_file(path).read_bytes()
    index.save(path, {"c": entry()})  # a whole index written; then the old delta comes back
    index.delta_file(path).write_bytes(stale)
    assert index.load(path) == ({"c": entry()}, "full")
    index.delta_file(path).write_bytes(b"ASD")
    with pytest.raises(ValueError, match="truncated"):
        index.load(path)


def test_dropping_subtrees_takes_the_names_and_all_below_them_only() -> None:
    idx = {r: entry() for r in ("", "a", "a/x", "a/x/y", "ab", "ab/z", "b", "b/a", "c")}
    drop_subtrees(idx, set())
    assert len(idx) == 9
    drop_subtrees(idx, {"a", "b/a"})
    assert sorted(idx) == ["", "ab", "ab/z", "b", "c"]  # "ab" only shares a prefix with "a"
    drop_subtrees(idx, {""})
    assert idx == {}


def test_lower_tree_links_every_file_and_copies_directories(tmp_path: Path) -> None:
    from asd import lower

    src = tmp_path / "src"
    (src / "d" / "e").mkdir(parents=True)
    (src / "d" / "f").write_text("f")
    os.symlink("d/f", src / "l")
    (src / ".asd-work").mkdir()
    os.chmod(src / "d", 0o700)  # not the 0o755 mkdir gave it
    os.utime(src / "d", ns=(1, 1_500_000_000_123_456_789))
    dst = src / ".asd-work" / "lower"
    done = lower.refresh(src, dst, src / ".asd-work" / "lower.json", frozenset({".asd-work"}))
    assert done.built and done.linked == 2
    assert lower.is_mirror(src, dst, frozenset({".asd-work"}))
    assert sorted(os.listdir(dst)) == ["d", "l"]
    st = os.lstat(dst / "d")
    assert stat.S_IMODE(st.st_mode) == 0o700 and st.st_mtime_ns == 1_500_000_000_123_456_789
    assert os.readlink(dst / "l") == "d/f"


@pytest.mark.parametrize("how", ["index", "walk"])
def test_a_walk_skips_what_vanishes_under_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    """Programs keep writing during a resync: a file deleted after its directory was listed,
    and a directory deleted after it was seen but before it was read, are simply not there."""
    from asd import tree

    for d in ("a", "c"):
        (tmp_path / d).mkdir()
    for rel in ("a/x", "a/y", "c/z", "b"):
        (tmp_path / rel).write_text(rel)
    listed = tree._entries

    def racing(path: str) -> list[os.DirEntry[str]]:
        got = listed(path)
        if path == str(tmp_path):
            os.unlink(tmp_path / "b")
            shutil.rmtree(tmp_path / "c")
        elif path == str(tmp_path / "a"):
            os.unlink(tmp_path / "a" / "x")
        return got

    monkeypatch.setattr(tree, "_entries", racing)
    found = set(tree.index(tmp_path)) if how == "index" else {r for r, _ in tree.walk(tmp_path)}
    assert found == {"", "a", "a/y"}
    # and a directory gone (or become a file) by the time it is read has no entries
    assert listed(str(tmp_path / "c")) == [] and listed(str(tmp_path / "a" / "y")) == []


def test_a_stored_index_answers_as_the_dict_it_was_saved_from(tmp_path: Path) -> None:
    names = ["", "a", "a/b", "a/b/c", "a b", "a0", "a/\udcff", "b", "b/a", "é", "z/y"]
    idx = {n: entry(stat.S_IFDIR if n in ("", "a", "a/b", "b", "z") else stat.S_IFREG, i)
           for i, n in enumerate(names)}  # fmt: skip
    path = tmp_path / "i"
    index.save(path, idx)
    idx["new"] = entry(ino=99)  # a delta beside it, applied when it is opened
    del idx["b/a"]
    index.save_changes(path, idx, {"new", "b/a"})
    opened = index.open_stored(path)
    assert opened is not None and opened[1] == "full"
    stored = opened[0]
    assert dict(stored.items()) == idx and len(stored) == len(idx)
    for key in [*idx, "missing", "a/", "b/a", "zz"]:
        assert (key in stored) == (key in idx) and stored.get(key) == idx.get(key)
    copy = stored.copy()
    copy["a/b/c"] = entry(ino=7)
    del copy["a b"]
    assert stored["a/b/c"] == idx["a/b/c"] and "a b" in stored, "the copy changed the original"
    with pytest.raises(KeyError):
        del copy["a b"]
    assert sorted(copy.below("a")) == ["a/b", "a/b/c", "a/\udcff"]  # not "a b" nor "a0"
    as_dict = dict(copy.items())
    copy["a0"] = entry(ino=3)  # set, with the inode "a/b/c" had when saved
    as_dict["a0"] = entry(ino=3)
    for inodes in ({3}, {7, 99}, {1, 2, 3, 4, 5}, {12345}, set()):
        assert sorted(with_inodes(copy, inodes)) == sorted(with_inodes(as_dict, inodes)), inodes
    # "a/b/c" was set to inode 7 above, which "b" has had from the start
    assert sorted(with_inodes(copy, {3, 7})) == ["a/b/c", "a0", "b"]
    assert sorted(drop_subtrees(copy, {"a", "z/y"})) == sorted(drop_subtrees(as_dict, {"a", "z/y"}))
    assert dict(copy.items()) == as_dict
    # An index of an earlier layout (paths sorted as strings, or in walk order, and no
    # offsets) is not searched where it lies, only read whole.
    for magic, keys in ((index.SORTED_MAGIC, sorted(idx)), (index.UNSORTED_MAGIC, [*idx])):
        path.write_bytes(earlier_layout(magic, keys, idx))
        assert index.open_stored(path) is None and index.load(path) == (idx, "full")


def earlier_layout(magic: bytes, keys: list[str], idx: dict[str, Entry]) -> bytes:
    """An index file as versions before the offsets wrote it: the paths, then the integers."""
    blob = "\0".join(keys).encode("utf-8", "surrogateescape")
    ints = b"".join(struct.pack("<10q", *idx[k]) for k in keys)
    return magic + struct.pack("<8sQQ", b"full", len(keys), len(blob)) + blob + ints


def test_a_stored_index_finds_names_whose_bytes_sort_unlike_their_characters(
    tmp_path: Path,
) -> None:
    """A name that is not UTF-8 (a surrogate escape) sorts after "é" as a string but before
    it as bytes; the file is sorted by bytes and searched by bytes."""
    names = ["", "é", os.fsdecode(b"\x80"), os.fsdecode(b"d/\xff"), "d", "d/é", "d/a", "ü/x"]
    idx = {n: entry(ino=i) for i, n in enumerate(names)}
    path = tmp_path / "i"
    index.save(path, idx)
    opened = index.open_stored(path)
    assert opened is not None
    stored = opened[0]
    assert {k: stored[k] for k in idx} == idx and dict(stored.items()) == idx
    assert sorted(stored.below("d")) == sorted(["d/a", "d/é", os.fsdecode(b"d/\xff")])
    assert "e" not in stored and os.fsdecode(b"\x81") not in stored


def test_a_truncated_index_is_refused_where_it_lies(tmp_path: Path) -> None:
    path = tmp_path / "i"
    index.save(path, {"": entry(stat.S_IFDIR), "a": entry()})
    data = path.read_bytes()
    for cut in (8, 20, len(data) - 1):
        path.write_bytes(data[:cut])
        with pytest.raises(ValueError, match="truncated"):
            index.open_stored(path)
