"""`asd suggest`: places, sizes, exclusions, ranking, the budget and the output."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest

from asd import fanotify
from asd.disks import Disk, PathDevice
from asd.errors import AsdError
from asd.fanotify import Activity
from asd.mounts import MountTable, parse_mountinfo
from asd.suggest import (
    Budget,
    Candidate,
    Place,
    Scan,
    choose,
    find_candidates,
    known_places,
    ram_budget,
    render_json,
    render_text,
    scan_tree,
    whattosync_line,
)

MiB = 2**20
SSD = PathDevice(
    "ssd",
    False,
    (Disk("/dev/sda", "CT1000MX500SSD1", None, "ata", False, False, 10**12, "ssd"),),
    ("ext4 /", "sda2", "sda"),
    "ext4",
)
RAM = PathDevice("ram", False, (), ("tmpfs /tmp",), "tmpfs")
ROOT = MountTable(parse_mountinfo("26 1 8:2 / / rw - ext4 /dev/sda2 rw"))


def cand(path: str, size: int, *, files: int = 3, writes: int | None = None) -> Candidate:
    activity = None if writes is None else Activity(writes=writes, closes=0, files=1)
    seconds = None if writes is None else 60.0
    return Candidate(Path(path), "why", size, files, SSD, activity=activity, seconds=seconds)


def test_known_places_are_the_well_known_directories_that_exist(tmp_path: Path) -> None:
    for d in [
        "home/alice/.cache",
        "home/alice/.mozilla/firefox/ab12.default-release",
        "home/alice/.mozilla/firefox/Crash Reports",
        "home/bob/.config/chromium",
        "root/.thunderbird/x1.default",
        "var/log",
        "var/cache/apt",
        "var/cache/man",
        "var/lib/collectd",
        "var/lib/unrelated",
    ]:
        (tmp_path / d).mkdir(parents=True)
    (tmp_path / "home/alice/.mozilla/firefox/ab12.default-release/prefs.js").touch()
    (tmp_path / "root/.thunderbird/x1.default/prefs.js").touch()
    (tmp_path / "var/cache/link").symlink_to(tmp_path / "var/cache/apt")
    (tmp_path / "var/cache/file").touch()
    found = [(str(p.path.relative_to(tmp_path)), p.why) for p in known_places(tmp_path)]
    assert found == [
        ("var/log", "system logs"),
        ("var/cache/apt", "system cache"),
        ("var/cache/man", "system cache"),
        ("var/lib/collectd", "collectd RRD data"),
        ("home/alice/.cache", "user cache (thumbnails, browser and application caches)"),
        ("home/alice/.mozilla/firefox/ab12.default-release", "Firefox profile"),
        ("home/bob/.config/chromium", "Chromium profile"),
        ("root/.thunderbird/x1.default", "Thunderbird profile"),
    ]


def test_scan_counts_pages_hard_links_once_and_links_leaving_the_tree(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "one-byte").write_bytes(b"x")
    (tree / "sub" / "two-pages").write_bytes(b"y" * 4097)
    os.link(tree / "one-byte", tree / "sub" / "same-file")
    (tree / "short-symlink").symlink_to("/etc/passwd")  # kept in the inode
    (tree / "long-symlink").symlink_to("/" + "d" * 200)  # takes a page
    assert scan_tree(tree) == Scan(size_bytes=4 * 4096, files=5, outside_links=0)
    os.link(tree / "sub" / "two-pages", tmp_path / "outside")
    assert scan_tree(tree).outside_links == 1
    assert scan_tree(tmp_path / "missing").error is not None


def _find(
    tmp_path: Path, targets: list[Path], volatile: Path, mounts: MountTable
) -> dict[str, str | None]:  # noqa: E501
    names = ["a", "b", "b/inner", "vol", "ram", "linked", "mnt", "fine"]
    for name in names:
        (tmp_path / name).mkdir(exist_ok=True)
    (tmp_path / "linked" / "f").touch()
    os.link(tmp_path / "linked" / "f", tmp_path / "f-elsewhere")
    places = [Place(tmp_path / n, "why") for n in names]

    def describe(path: Path, _: MountTable) -> PathDevice:
        return RAM if path.name == "ram" else SSD

    found = find_candidates(places, targets, volatile, mounts=mounts, describe=describe)
    return {str(c.path.relative_to(tmp_path)): c.excluded for c in found}


def test_candidates_that_must_never_be_suggested_say_why(tmp_path: Path) -> None:
    mounts = MountTable(
        parse_mountinfo(
            f"26 1 8:2 / / rw - ext4 /dev/sda2 rw\n41 26 0:40 / {tmp_path}/mnt/x rw - tmpfs t rw"
        )
    )
    targets = [tmp_path / "a", tmp_path / "b" / "inner", tmp_path / "fine-not"]
    excluded = _find(tmp_path, targets, tmp_path / "vol" / "asd", mounts)
    assert excluded == {
        "a": "already a target",
        "b": f"contains target {tmp_path}/b/inner",
        "b/inner": "already a target",
        "vol": f"nested with VOLATILE {tmp_path}/vol/asd",
        "ram": "already in RAM",
        "linked": "1 file(s) have hard links outside it; a RAM copy would split them",
        "mnt": "other filesystems are mounted inside it",
        "fine": None,
    }


def test_a_candidate_inside_a_target_is_excluded(tmp_path: Path) -> None:
    excluded = _find(tmp_path, [tmp_path / "b"], Path("/run/asd"), ROOT)
    assert excluded["b/inner"] == f"inside target {tmp_path}/b"


def test_unmeasured_ranking_is_smallest_first_within_the_budget() -> None:
    ranked = choose(
        [cand("/big", 60 * MiB), cand("/small", 1 * MiB), cand("/mid", 30 * MiB)],
        budget_bytes=100 * MiB,
        measured=False,
    )
    assert [(str(c.path), c.suggested) for c in ranked] == [
        ("/small", True),
        ("/mid", True),
        ("/big", False),  # more than half of the budget on its own
    ]
    assert ranked[2].note == "takes more than half the RAM budget (100.0 MiB)"


def test_suggestions_together_never_exceed_the_budget() -> None:
    ranked = choose(
        [cand("/a", 40 * MiB), cand("/b", 40 * MiB), cand("/c", 40 * MiB)], 100 * MiB, False
    )
    assert [c.suggested for c in ranked] == [True, True, False]
    assert ranked[2].note == "does not fit in what is left of the RAM budget (20.0 MiB)"


def test_measured_ranking_is_writes_per_hour_per_mib() -> None:
    ranked = choose(
        [
            cand("/quiet", 1 * MiB, writes=0),
            cand("/busy-big", 40 * MiB, writes=400),  # 10 writes/h... per MiB: 24000/40
            cand("/busy-small", 2 * MiB, writes=100),  # 6000/h over 2 MiB
        ],
        1000 * MiB,
        measured=True,
    )
    assert [str(c.path) for c in ranked] == ["/busy-small", "/busy-big", "/quiet"]
    assert [c.suggested for c in ranked] == [True, True, False]
    assert ranked[0].writes_per_hour == 6000.0
    assert ranked[2].note == "no writes measured in 60 s"


def test_empty_directories_are_not_suggested_without_a_measurement() -> None:
    (empty,) = choose([cand("/var/cache/none", 0, files=0)], 100 * MiB, False)
    assert not empty.suggested
    assert empty.note == "empty: nothing to keep in RAM"


def test_excluded_candidates_stay_excluded_and_last() -> None:
    bad = Candidate(Path("/t"), "why", 1, 1, SSD, excluded="already a target")
    ranked = choose([bad, cand("/ok", MiB)], 100 * MiB, False)
    assert [(str(c.path), c.suggested) for c in ranked] == [("/ok", True), ("/t", False)]


def test_the_whattosync_line_keeps_existing_targets_first_and_quotes() -> None:
    ranked = choose([cand("/home/o'brien/.cache", MiB)], 100 * MiB, False)
    line = whattosync_line([Path("/var/log")], ranked)
    assert line == "WHATTOSYNC=('/var/log' '/home/o'\\''brien/.cache')"


def test_text_report_shows_budget_suggestions_reasons_and_the_line() -> None:
    ranked = choose([cand("/srv/cache", 2 * MiB), cand("/huge", 90 * MiB)], 100 * MiB, False)
    text = render_text(ranked, Budget(200 * MiB, 150 * MiB, 50 * MiB), [Path("/var/log")], None)
    lines = text.splitlines()
    assert lines[0] == (
        "RAM budget: 100.0 MiB (memory available 200.0 MiB, VOLATILE free 150.0 MiB, "
        "configured targets not yet in RAM 50.0 MiB)"
    )
    assert "run `asd suggest --watch 600`" in lines[1]
    assert lines[3] == "Suggested:"
    assert lines[4].split() == ["/srv/cache", "2.0", "MiB", "ssd", "why"]
    assert "Not suggested:" in lines
    assert lines[-1] == "WHATTOSYNC=('/var/log' '/srv/cache')"


def test_json_report_is_one_document_for_machines() -> None:
    ranked = choose([cand("/srv/cache", 2 * MiB, writes=30)], 100 * MiB, True)
    doc = json.loads(render_json(ranked, Budget(100 * MiB, 200 * MiB, 0), [], 60.0))
    assert doc["budget"]["bytes"] == 100 * MiB
    assert doc["watch_seconds"] == 60.0
    (c,) = doc["candidates"]
    assert c["path"] == "/srv/cache"
    assert c["suggested"] is True
    assert c["writes"] == {"modify_events": 30, "closes": 0, "files": 1}
    assert c["writes_per_hour"] == 1800.0
    assert c["device"]["kind"] == "ssd"
    assert doc["whattosync"] == ["/srv/cache"]


def test_the_budget_subtracts_targets_not_yet_in_ram(tmp_path: Path) -> None:
    meminfo = "MemTotal:  16000000 kB\nMemFree: 1 kB\nMemAvailable:    1024 kB\n"
    sizes = {"/on-disk": 300 * 1024, "/in-ram": 10**9}

    budget = ram_budget(
        tmp_path,
        [Path("/on-disk"), Path("/in-ram")],
        mounts=ROOT,
        meminfo=meminfo,
        describe=lambda p, _: RAM if p.name == "in-ram" else SSD,
        scan=lambda p: Scan(sizes[str(p)], 1, 0),
    )
    assert budget.memory_available == 1024 * 1024
    assert budget.pending_targets == 300 * 1024
    assert budget.free_bytes == 1024 * 1024 - 300 * 1024
    with pytest.raises(AsdError, match="VOLATILE .* cannot be read"):
        ram_budget(tmp_path / "gone", [], mounts=ROOT, meminfo=meminfo)


def test_fanotify_events_are_parsed_from_what_read_returns() -> None:
    meta = struct.Struct("=IBBHQii")
    buffer = meta.pack(24, 3, 0, 24, fanotify.FAN_MODIFY, 7, 100) + meta.pack(
        24, 3, 0, 24, fanotify.FAN_Q_OVERFLOW, fanotify.FAN_NOFD, 0
    )
    assert fanotify.parse_events(buffer) == [
        fanotify.Event(fanotify.FAN_MODIFY, 7, 100),
        fanotify.Event(fanotify.FAN_Q_OVERFLOW, -1, 0),
    ]
    with pytest.raises(AsdError, match="event format 2"):
        fanotify.parse_events(meta.pack(24, 2, 0, 24, 2, 7, 100))


def test_a_written_file_belongs_to_the_deepest_watched_directory() -> None:
    dirs = [Path("/var/log"), Path("/var/log/journal"), Path("/home/a/.cache")]
    assert fanotify.owner(dirs, "/var/log/journal/x/system.journal") == Path("/var/log/journal")
    assert fanotify.owner(dirs, "/var/log/syslog (deleted)") == Path("/var/log")
    assert fanotify.owner(dirs, "/var/logs/other") is None
    assert fanotify.owner(dirs, "/home/a/.cache") == Path("/home/a/.cache")
