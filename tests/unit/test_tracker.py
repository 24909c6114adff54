"""The change tracker's pure parts: its periods, its answers, its events, and the rescan of
what it names (checked against a full walk of the same tree)."""

from __future__ import annotations

import os
import struct
from pathlib import Path

from asd import fanotify
from asd.fanotify import FAN_CREATE, FAN_MODIFY, FAN_Q_OVERFLOW, EntryEvent, parse_entries
from asd.layout import Instance
from asd.tracker import (
    HISTORY,
    MAX_KEPT,
    MAX_NAMES,
    Answer,
    Tracker,
    load_token,
    parse_answer,
    save_token,
    token_file,
)
from asd.tree import diff, diff_at, index, rescan

HANDLE_A = b"\x01" * 16
HANDLE_B = b"\x02" * 16


def tracker() -> Tracker:
    return Tracker(Instance(Path("/etc/asd.conf"), Path("/tmp")))  # noqa: S108 - never touched


def test_a_period_answers_for_every_name_touched_since_a_cut() -> None:
    t = tracker()
    t.record([EntryEvent(FAN_MODIFY, HANDLE_A, b"x")])
    t.close_period()  # cut 1: the sync point
    t.record([EntryEvent(FAN_MODIFY, HANDLE_A, b"y"), EntryEvent(FAN_CREATE, HANDLE_B, b"")])
    t.close_period()  # cut 2: a resync that then failed, saving no token
    t.record([EntryEvent(FAN_MODIFY, HANDLE_A, b"z")])
    t.close_period()  # cut 3
    assert t.since(t.id, 1) == {HANDLE_A: {b"y", b"z"}, HANDLE_B: {b""}}
    assert t.since(t.id, 2) == {HANDLE_A: {b"z"}}
    assert t.since(t.id, 3) == {}
    # Another tracker's cut, a cut not made yet, or no cut: it cannot vouch.
    assert t.since("0123456789abcdef", 2) is None
    assert t.since(t.id, 4) is None
    assert t.since(t.id, -1) is None


def test_an_overflow_or_too_many_names_makes_the_period_unknown() -> None:
    t = tracker()
    t.close_period()
    t.record([EntryEvent(FAN_MODIFY, HANDLE_A, b"x"), EntryEvent(FAN_Q_OVERFLOW, b"", b"")])
    t.record([EntryEvent(FAN_MODIFY, HANDLE_B, b"y")])  # after the overflow: still unknown
    t.close_period()
    t.record([EntryEvent(FAN_MODIFY, HANDLE_A, b"w")])
    t.close_period()
    assert t.since(t.id, 1) is None  # the overflowed period lies after cut 1
    assert t.since(t.id, 2) == {HANDLE_A: {b"w"}}
    t.record(EntryEvent(FAN_MODIFY, HANDLE_A, str(i).encode()) for i in range(MAX_NAMES + 1))
    t.close_period()
    assert t.since(t.id, 3) is None
    assert t.open == {}


def test_a_forgotten_period_makes_older_cuts_unknown() -> None:
    t = tracker()
    for _ in range(HISTORY):
        t.close_period()
    t.close_period()  # the first period falls out of the history
    assert t.since(t.id, 0) is None
    assert t.since(t.id, 1) == {}
    # So do the oldest ones, past as many names as it keeps in all.
    for round_ in range(MAX_KEPT // MAX_NAMES + 1):
        t.record(EntryEvent(FAN_MODIFY, HANDLE_A, b"%d-%d" % (round_, i)) for i in range(MAX_NAMES))
        t.close_period()
    assert t.kept <= MAX_KEPT and len(t.periods) == MAX_KEPT // MAX_NAMES
    assert t.since(t.id, t.number - 1) is not None and t.since(t.id, HISTORY + 1) is None


def test_answers_are_read_back_and_mapped_below_a_root(tmp_path: Path) -> None:
    root = tmp_path / "ram"
    root.mkdir()
    body = b"".join(
        os.fsencode(d) + b"\0" + n + b"\0"
        for d, n in [(str(root), b"top"), (f"{root}/a/b", b"f\xff"), (str(tmp_path), b"ram"),
                     (f"{root}x", b"no")]
    )  # fmt: skip
    dev = os.lstat(root).st_dev
    answer = parse_answer(f"ok 00aa 7 {dev}\n".encode() + body)
    assert answer is not None and (answer.tracker, answer.cut, answer.dev) == ("00aa", 7, dev)
    assert answer.under(root) == [("", "top"), ("a/b", os.fsdecode(b"f\xff"))]
    # A tracker of another filesystem (VOLATILE moved) cannot say what changed here.
    assert Answer("00aa", 7, dev + 1, answer.touched).under(root) is None
    assert parse_answer(b"full 00aa 8 5\n") == Answer("00aa", 8, 5, None)
    assert Answer("00aa", 8, dev, None).under(root) is None
    for bad in (b"", b"ok 00aa 7\n", b"ok 00aa 7 1\nodd\0", b"hello 00aa 7 1\n"):
        assert parse_answer(bad) is None


def test_entry_events_are_split_with_their_directory_handle_and_name() -> None:
    def event(mask: int, kind: int, handle: bytes, name: bytes) -> bytes:
        fid = struct.pack("=iiIi", 7, 9, len(handle), 1) + handle
        info_body = fid + (name + b"\0" if kind == fanotify.INFO_DFID_NAME else b"")
        info_body += b"\0" * (-(len(info_body) + 4) % 4)
        info = struct.pack("=BBH", kind, 0, len(info_body) + 4) + info_body
        meta = struct.pack("=IBBHQii", 24 + len(info), 3, 0, 24, mask, -1, 42)
        return meta + info

    buffer = (
        event(FAN_MODIFY, fanotify.INFO_DFID_NAME, b"H" * 8, b"file")
        + event(fanotify.FAN_ATTRIB | fanotify.FAN_ONDIR, fanotify.INFO_DFID, b"D" * 12, b"")
        + event(FAN_CREATE, fanotify.INFO_DFID_NAME, b"H" * 8, b".")
        + struct.pack("=IBBHQii", 24, 3, 0, 24, FAN_Q_OVERFLOW, -1, 0)
    )
    events = parse_entries(buffer)
    assert [(e.mask, e.name) for e in events] == [
        (FAN_MODIFY, b"file"),
        (fanotify.FAN_ATTRIB | fanotify.FAN_ONDIR, b""),
        (FAN_CREATE, b""),
        (FAN_Q_OVERFLOW, b""),
    ]
    assert events[0].handle == struct.pack("=iiIi", 7, 9, 8, 1) + b"H" * 8
    assert len(events[1].handle) == 16 + 12 and events[3].handle == b""


def _tree(root: Path) -> None:
    for d in ("a/b", "c", "d/e", "keep"):
        (root / d).mkdir(parents=True)
    for f in ("a/x", "a/b/y", "c/z", "d/e/w", "keep/k", "top"):
        (root / f).write_text(f)
    (root / ".asd-work").mkdir()


def test_a_rescan_of_what_was_touched_equals_a_walk(tmp_path: Path) -> None:
    root = tmp_path / "ram"
    root.mkdir()
    _tree(root)
    skip = frozenset({".asd-work"})
    old = index(root, skip)
    touched: list[tuple[str, str]] = []

    def did(directory: str, name: str) -> None:
        touched.append((directory, name))

    (root / "a/x").write_text("rewritten")
    did("a", "x")
    with open(root / "a/b/y", "a") as fh:
        fh.write("more")
    did("a/b", "y")
    os.chmod(root / "c", 0o700)
    did("c", "")  # a directory's own change names the directory itself
    os.rename(root / "d", root / "moved")
    did("", "d")
    did("", "moved")
    (root / "c/z").unlink()
    (root / "c/z").mkdir()  # a file become a directory, with something in it
    (root / "c/z/in").write_text("in")
    did("c", "z")
    (root / "new/deep").mkdir(parents=True)  # a new tree: only its top is named
    (root / "new/deep/f").write_text("f")
    did("", "new")
    os.symlink("top", root / "link")
    did("", "link")
    (root / ".asd-work/junk").write_text("not the target's")
    did(".asd-work", "junk")
    did("gone", "never")  # a directory that went away before the rescan
    new = dict(old)
    changed = rescan(root, old, new, touched, skip)
    assert changed is not None
    assert new == index(root, skip)
    # What it says it changed is all that differs: the diff at those paths is the whole diff.
    assert diff_at(old, new, changed) == diff(old, new)
    assert {k for k in old.keys() | new.keys() if old.get(k) != new.get(k)} <= changed


def test_a_rescan_gives_up_on_files_with_other_names(tmp_path: Path) -> None:
    root = tmp_path / "ram"
    root.mkdir()
    _tree(root)
    old = index(root)
    os.link(root / "top", root / "c/second")
    assert rescan(root, old, dict(old), [("c", "second")]) is None  # the other name changed
    os.unlink(root / "c/second")
    old = index(root)
    os.link(root / "top", root / "c/second")
    old_linked = index(root)
    os.unlink(root / "c/second")
    assert rescan(root, old_linked, dict(old_linked), [("c", "second")]) is None  # "top" lost one
    (root / "new").mkdir()
    os.link(root / "top", root / "new/l")
    assert rescan(root, old, dict(old), [("", "new")]) is None


def test_a_token_holds_only_with_the_index_file_it_was_saved_with(tmp_path: Path) -> None:
    layout = Instance(tmp_path / "asd.conf", tmp_path / "vol", run_dir=tmp_path).target(
        Path("/srv/t")
    )
    layout.index_file.parent.mkdir(parents=True)
    layout.index_file.write_bytes(b"index one")
    odd = os.fsdecode(b"caf\xe9")
    save_token(layout, Answer("00aa", 3, 1, []), recheck=["d/gone", odd])
    token = load_token(layout)
    assert token is not None and (token.tracker, token.cut) == ("00aa", 3)
    assert token.recheck == (odd, "d/gone")
    layout.index_file.write_bytes(b"index two, written by something else")
    assert load_token(layout) is None
    save_token(layout, None)  # no tracker answered: nothing to believe next time
    assert not token_file(layout).exists()
