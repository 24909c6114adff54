"""`asd suggest` on this machine: fanotify really counts writes, the report is whole.

Nothing is mounted here: the measurement only reads fanotify events, and the writes come
from a child process writing under tmp_path.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from asd import fanotify
from asd.suggest import run_suggest

pytestmark = pytest.mark.integration

WRITER = """
import sys, time
paths = sys.argv[1:]
ready = False
while True:
    for p in paths:
        with open(p, "a") as f:
            f.write("x" * 100)
    if not ready:
        print("ready", flush=True)
        ready = True
    time.sleep(0.01)
"""


@pytest.fixture
def writer(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    busy, quiet = tmp_path / "busy", tmp_path / "quiet"
    (busy / "sub").mkdir(parents=True)
    quiet.mkdir()
    (quiet / "untouched").write_text("x")
    files = [str(busy / "a.log"), str(busy / "sub" / "b.db")]
    child = subprocess.Popen([sys.executable, "-c", WRITER, *files], stdout=subprocess.PIPE)
    try:
        assert child.stdout is not None
        assert child.stdout.readline() == b"ready\n"  # writing before the watch starts
        yield busy, quiet
    finally:
        child.kill()
        child.wait()


def test_fanotify_counts_the_writes_of_another_process(writer: tuple[Path, Path]) -> None:
    busy, quiet = writer
    measured = fanotify.measure([busy, quiet], 1.0)
    assert measured.activity[busy].writes > 0
    assert measured.activity[busy].closes > 0
    assert measured.activity[busy].files == 2  # a.log and sub/b.db
    assert measured.activity[quiet].writes == 0
    assert measured.activity[quiet].files == 0


def test_our_own_writes_do_not_count(tmp_path: Path) -> None:
    # measure() ignores the watcher's own process, so asd's logging never ranks a directory.
    (tmp_path / "mine").write_text("x")
    measured = fanotify.measure([tmp_path], 0.2)
    assert measured.activity[tmp_path] == fanotify.Activity(0, 0, 0)


@dataclass(frozen=True)
class Conf:
    whattosync: tuple[Path, ...]
    volatile: Path


def test_run_suggest_json_reports_this_machine(tmp_path: Path) -> None:
    target = tmp_path / "target"
    target.mkdir()
    doc = json.loads(run_suggest(Conf((target,), Path("/dev/shm")), None, True))
    assert doc["budget"]["bytes"] > 0
    assert doc["whattosync"][0] == str(target)
    assert doc["whattosync_line"].startswith(f"WHATTOSYNC=('{target}'")
    paths = {c["path"]: c for c in doc["candidates"]}
    if Path("/var/log").is_dir():
        log = paths["/var/log"]
        assert log["device"]["kind"] != "unknown"
        assert log["size_bytes"] > 0 or log["files"] == 0
    for c in doc["candidates"]:
        assert c["suggested"] or c["reason"]  # every candidate left out says why


def test_run_suggest_watch_text_reports_the_measurement(tmp_path: Path) -> None:
    text = run_suggest(Conf((), Path("/dev/shm")), 0.5, False)
    assert "Writes measured with fanotify for 0.5 s." in text.splitlines()[1]
    assert text.splitlines()[-1].startswith("WHATTOSYNC=(")
