"""Load: resyncs back to back under a writer that never stops, and 50 invocations at once.

What asd can promise while a program keeps writing, and what these tests check:

- per file: asd copies each changed file with rsync from RAM into a stage and renames it into
  place, or stages the blocks that differ, read from one open RAM file, and writes them in
  place (`asd.patch`), so a file a program replaces atomically (write a temporary file, rename
  it over the old one: what browsers, sqlite's journal and most config writers do) is on disk
  as one of the versions it had while the resync ran — never torn, never a mix. An
  append-only log is a prefix of whole lines (tmpfs never shows a reader bytes past the size a
  write has reached).
- a name the program had deleted (or renamed away) before the resync started, and did not
  touch again while it ran, is gone from disk; one it left alone holds exactly its content.
- not promised: the tree as a whole at one instant. rsync reads the files one after another
  while the program keeps going, so two files may come from different moments (a rename
  during the resync can leave both names on disk until the next resync). A program that needs
  several files consistent with each other must not be written back while it writes — the
  same as for a copy taken by any backup tool without a file-system snapshot.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.conftest import CHANGES, populate
from tests.integration.manifest import differences, manifest
from tests.integration.test_lifecycle import inside_manifest
from tests.integration.test_power_cut import no_litter
from tests.reliability.conftest import FULL, World, record

RESYNCS = 500 if FULL else 30

# The writer: random operations on 48 names in 4 directories and a rotated log, each logged
# (after it completed) to an event file outside the target, one line per event.
WRITER = r"""
import os, random, sys, time
root, events, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
rng = random.Random(seed)
names = [f"d{d}/f{i}" for d in range(4) for i in range(12)]
gen = 0
log = open(events, "a", buffering=1)
FLAGS = os.O_WRONLY | os.O_APPEND | os.O_CREAT
applog = os.open(os.path.join(root, "log/app.log"), FLAGS, 0o644)
line = 0
def body(name, g):
    return "".join(f"gen {g} {name}\n" for _ in range(rng.randint(1, 400))) + f"end {g}\n"
while not os.path.exists(os.path.join(os.path.dirname(events), "stop")):
    op = rng.random()
    name = rng.choice(names)
    path = os.path.join(root, name)
    gen += 1
    if op < 0.5:
        tmp = os.path.join(os.path.dirname(path), f".tmp-{gen}")
        with open(tmp, "w") as fh:
            fh.write(body(name, gen))
        os.rename(tmp, path)
        log.write(f"put {name} {gen}\n")
    elif op < 0.7:
        try:
            os.unlink(path)
            log.write(f"del {name} {gen}\n")
        except FileNotFoundError:
            pass
    elif op < 0.85:
        other = rng.choice(names)
        try:
            os.rename(path, os.path.join(root, other))
            if other != name:
                log.write(f"mv {name} {other}\n")
        except FileNotFoundError:
            pass
    else:
        os.write(applog, f"{line}\n".encode())
        line += 1
        if line % 300 == 0:
            os.rename(os.path.join(root, "log/app.log"), os.path.join(root, "log/app.log.1"))
            os.close(applog)
            applog = os.open(os.path.join(root, "log/app.log"), FLAGS, 0o644)
            log.write(f"rotate {line}\n")
    time.sleep(0.002)
"""

RECORD = re.compile(r"(?:gen (\d+) (d\d/f\d+)\n)+end (\d+)\n")


class Names:
    """What the event log says each name held: a generation, or None (absent)."""

    def __init__(self) -> None:
        self.held: dict[str, int | None] = {}

    def apply(self, line: str) -> set[str]:
        op, *args = line.split()
        if op == "put":
            self.held[args[0]] = int(args[1])
            return {args[0]}
        if op == "del":
            self.held[args[0]] = None
            return {args[0]}
        if op == "mv":
            self.held[args[1]] = self.held.get(args[0])
            self.held[args[0]] = None
            return {args[0], args[1]}
        return set()


def check_disk(target: Path, at_start: Names, window: list[str]) -> int:
    """The disk copy against the events before the resync and during it. Returns files checked."""
    during = Names()
    during.held = dict(at_start.held)
    touched: set[str] = set()
    possible: dict[str, set[int | None]] = {n: {g} for n, g in at_start.held.items()}
    for line in window:
        for name in during.apply(line):
            touched.add(name)
            possible.setdefault(name, {None}).add(during.held[name])
        if line.startswith("mv "):
            # A renamed file keeps its generation: the new name may hold any the old one had.
            old, new = line.split()[1:]
            possible[new] |= possible.get(old, {None})
    checked = 0
    for name in sorted(set(possible) | {f"d{d}/f{i}" for d in range(4) for i in range(12)}):
        path = target / name
        try:
            data = path.read_text()
        except FileNotFoundError:
            data = None
        if name not in touched:
            want = at_start.held.get(name)
            if want is None:
                assert data is None, f"{name} was deleted before the resync started, yet is on disk"
            else:
                assert data is not None, f"{name} (generation {want}) is missing from disk"
                m = RECORD.fullmatch(data)
                assert m and int(m[3]) == want, (
                    f"{name}: want generation {want}, disk has {data[:80]!r}"
                )
        elif data is not None:
            m = RECORD.fullmatch(data)
            assert m is not None, f"{name} is torn on disk: {data[:80]!r}…{data[-40:]!r}"
            assert m[1] == m[3], f"{name} mixes generations {m[1]} and {m[3]}"
            assert int(m[3]) in possible[name], (
                f"{name} holds generation {m[3]}, never held while the resync ran {possible[name]}"
            )
        checked += data is not None
    for log in ("app.log", "app.log.1"):
        try:
            text = (target / "log" / log).read_text()
        except FileNotFoundError:
            continue
        lines = text.split("\n")
        assert lines[-1] == "", f"log/{log} ends in a torn line: {lines[-1]!r}"
        nums = [int(x) for x in lines[:-1]]
        consecutive = not nums or nums == list(range(nums[0], nums[0] + len(nums)))
        assert consecutive, f"log/{log} on disk is not consecutive whole lines"
    return checked


@pytest.fixture
def churned(world: World) -> Iterator[tuple[World, Path, Path]]:
    target = world.target("t")
    for d in range(4):
        (target / f"d{d}").mkdir()
    (target / "log").mkdir()
    world.write_conf(target)
    world.asd("sync", check=True)
    events = world.base / "events" / "log"
    events.parent.mkdir()
    events.touch()
    writer = world.spawn([sys.executable, "-c", WRITER, str(target), str(events), "5"])
    try:
        yield world, target, events
    finally:
        (events.parent / "stop").touch()
        writer.wait(timeout=60)


def test_resyncs_back_to_back_under_churn(churned: tuple[World, Path, Path]) -> None:
    world, target, events = churned
    names = Names()
    seen = 0
    files_checked = 0
    for i in range(RESYNCS):
        lines = events.read_text().splitlines()
        for line in lines[seen:]:
            names.apply(line)
        seen = len(lines)
        proc = world.asd("resync")
        assert proc.returncode == 0, f"resync {i} failed: {proc.stderr}"
        window = events.read_text().splitlines()[seen:]
        files_checked += check_disk(target, names, window)
    (events.parent / "stop").touch()
    world.children[-1].wait(timeout=60)
    world.asd("resync", check=True)
    ram = inside_manifest(world, target)
    assert manifest(target) == ram, differences(ram, manifest(target))[:5]
    world.asd("unsync", check=True)
    assert manifest(target) == ram
    no_litter(target)
    mode = "overlay" if world.overlay else "copy"
    events_n = len(events.read_text().splitlines())
    record(
        "load",
        f"resyncs under churn ({mode})",
        {"resyncs": RESYNCS, "writer events": events_n, "file states checked": files_checked},
    )


COMMANDS = ["sync"] * 10 + ["resync"] * 15 + ["parse"] * 10 + ["unsync"] * 5 + ["clean"] * 5
COMMANDS += ["resync --dry-run"] * 5


@pytest.mark.overlay_in_full
def test_fifty_invocations_at_once(world: World) -> None:
    target = world.target("t")
    populate(target)
    world.write_conf(target)
    world.asd("sync", check=True)
    world.run(["sh", "-c", CHANGES, "changes", str(target)], check=True)
    expected = inside_manifest(world, target)
    # A first resync holds the lock for 3 s (strace delays it once it holds it), so every other
    # invocation that takes the lock must wait for it, and says so.
    holder = world.spawn(
        [
            "strace",
            "-o",
            "/dev/null",
            "-e",
            "trace=pwrite64",
            "-e",
            "inject=pwrite64:delay_exit=3000000:when=1",  # just after it wrote the lock
            sys.executable,
            "-m",
            "asd",
            "-c",
            str(world.conf),
            "resync",
        ]
    )
    lock = "/run/asd/" + Path(world_instance_lock(world)).name
    world.run(
        ["sh", "-c", f"until grep -q pid {lock} 2>/dev/null; do sleep 0.05; done"], check=True
    )
    results: dict[int, subprocess.CompletedProcess[str]] = {}

    def one(i: int) -> None:
        results[i] = world.asd(*COMMANDS[i].split())

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(COMMANDS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert holder.wait(timeout=120) == 0
    waited = 0
    for i, cmd in enumerate(COMMANDS):
        proc = results[i]
        assert "Traceback" not in proc.stderr, proc.stderr
        if cmd in ("sync", "parse", "clean"):
            assert proc.returncode == 0, f"{cmd}: {proc.stderr}"
        else:
            ok = proc.returncode == 0 or "not running" in proc.stderr
            assert ok, f"{cmd} exited {proc.returncode}: {proc.stderr}"
        said = [line for line in (proc.stdout + proc.stderr).splitlines() if "waiting for" in line]
        for line in said:
            assert re.search(r"waiting for pid \d+ running 'asd \w+' to finish", line), line
        if cmd in ("parse", "resync --dry-run"):
            assert not said, f"{cmd} must not wait: {said}"
        waited += bool(said)
    assert waited >= 1, "no invocation said it waited, though the lock was held"
    assert world.mounted_at(target) <= 1, "mounts stacked on the target"
    doc = json.loads(world.asd("parse", "--json", check=True).stdout)
    assert doc["targets"]
    world.asd("sync", check=True)
    assert inside_manifest(world, target) == expected
    world.asd("unsync", check=True)
    assert manifest(target) == expected, differences(expected, manifest(target))[:5]
    no_litter(target)
    assert world.mounted_at(target) == 0
    codes: dict[str, set[int]] = {}
    for i, cmd in enumerate(COMMANDS):
        codes.setdefault(cmd, set()).add(results[i].returncode)
    record(
        "load",
        f"50 invocations at once ({'overlay' if world.overlay else 'copy'})",
        {
            "invocations": len(COMMANDS),
            "said they waited": waited,
            "exit codes": {c: sorted(v) for c, v in sorted(codes.items())},
        },
    )


def world_instance_lock(world: World) -> str:
    from asd.layout import Instance

    return str(Instance(world.conf, world.volatile).lock_file)


def test_events_log_is_parsed_as_the_writer_means() -> None:
    """The checker itself: a rename carries a generation; a delete clears it."""
    n = Names()
    for line in ["put d0/f1 7", "mv d0/f1 d0/f2", "del d0/f3 9"]:
        n.apply(line)
    assert n.held == {"d0/f1": None, "d0/f2": 7, "d0/f3": None}
