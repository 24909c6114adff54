"""`asd suggest`: directories on this machine worth moving into RAM.

Public API (the CLI's ``asd suggest [--watch SECONDS] [--json]`` calls `run_suggest`):

- `run_suggest(config, watch_seconds, as_json) -> str` — the whole command, its output.
- `known_places(root=Path("/")) -> list[Place]` — well-known write-heavy places that exist.
- `find_candidates(places, targets, volatile, ...) -> list[Candidate]` — size, device, and
  the reasons never to suggest one (already a target or nested with one, in RAM, hard links
  to files outside it, other filesystems mounted inside).
- `ram_budget(volatile, targets, ...) -> Budget` — what RAM asd may still fill.
- `watch(candidates, seconds) -> list[Candidate]` — real writes, measured with fanotify.
- `choose(candidates, budget_bytes, measured) -> list[Candidate]` — ranked (writes per hour
  per MiB when measured, smallest first otherwise) and marked suggested while they fit.
- `render_text(...)`, `render_json(...)` — the report, with a ready ``WHATTOSYNC=(…)`` line.
"""

from __future__ import annotations

import glob
import json
import os
import stat
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

from asd import fanotify
from asd.devices import describe_path
from asd.disks import PathDevice, human_size
from asd.errors import AsdError
from asd.fanotify import Activity
from asd.mounts import MountTable

PAGE = 4096
# (glob below a home directory or /, why it is written, a file that must exist in it)
HOME_PLACES: tuple[tuple[str, str, str | None], ...] = (
    (".cache", "user cache (thumbnails, browser and application caches)", None),
    (".mozilla/firefox/*", "Firefox profile", "prefs.js"),
    ("snap/firefox/common/.mozilla/firefox/*", "Firefox profile (snap)", "prefs.js"),
    (".var/app/org.mozilla.firefox/.mozilla/firefox/*", "Firefox profile (flatpak)", "prefs.js"),
    (".thunderbird/*", "Thunderbird profile", "prefs.js"),
    (".config/google-chrome", "Google Chrome profile", None),
    (".config/chromium", "Chromium profile", None),
    (".config/BraveSoftware/Brave-Browser", "Brave profile", None),
    (".config/vivaldi", "Vivaldi profile", None),
    (".config/microsoft-edge", "Microsoft Edge profile", None),
    (".config/opera", "Opera profile", None),
)
SYSTEM_PLACES: tuple[tuple[str, str, str | None], ...] = (
    ("var/log", "system logs", None),
    ("var/cache/*", "system cache", None),
    ("var/lib/monitorix", "Monitorix RRD graphs", None),
    ("var/lib/collectd", "collectd RRD data", None),
    ("var/lib/prometheus", "Prometheus time-series database", None),
    ("var/lib/munin", "Munin RRD data", None),
    ("var/lib/rrdcached", "rrdcached journal and RRD files", None),
    ("var/lib/smokeping", "SmokePing RRD data", None),
    ("var/lib/vnstat", "vnStat traffic database", None),
    ("var/lib/netdata", "Netdata state", None),
    ("var/lib/cacti/rra", "Cacti RRD files", None),
    ("var/lib/pnp4nagios", "PNP4Nagios RRD data", None),
)


class SuggestConfig(Protocol):
    """What `run_suggest` needs of `asd.config.Config`."""

    @property
    def whattosync(self) -> tuple[Path, ...]: ...
    @property
    def volatile(self) -> Path: ...


@dataclass(frozen=True)
class Place:
    path: Path
    why: str


@dataclass(frozen=True)
class Scan:
    size_bytes: int  # what the tree takes in a tmpfs: each file rounded up to a page
    files: int
    outside_links: int  # files with hard links outside the tree
    error: str | None = None


@dataclass(frozen=True)
class Candidate:
    path: Path
    why: str
    size_bytes: int
    files: int
    device: PathDevice
    excluded: str | None = None  # why it must never be suggested
    activity: Activity | None = None  # measured writes, with --watch
    seconds: float | None = None
    suggested: bool = False
    note: str | None = None  # why a candidate that could be suggested was not

    @property
    def writes_per_hour(self) -> float | None:
        if self.activity is None or not self.seconds:
            return None
        return self.activity.writes * 3600.0 / self.seconds

    @property
    def score(self) -> float | None:
        """Writes per hour per MiB of RAM it would take."""
        rate = self.writes_per_hour
        return None if rate is None else rate / max(self.size_bytes / 2**20, 1.0)


@dataclass(frozen=True)
class Budget:
    memory_available: int
    volatile_free: int
    pending_targets: int  # configured targets not yet in RAM

    @property
    def free_bytes(self) -> int:
        return max(0, min(self.memory_available, self.volatile_free) - self.pending_targets)


def known_places(root: Path = Path("/")) -> list[Place]:
    """The well-known places that exist on this machine, as real directories."""
    homes = sorted(glob.glob(os.path.join(root, "home", "*"))) + [os.path.join(root, "root")]
    patterns = [(os.path.join(root, p), why, m) for p, why, m in SYSTEM_PLACES]
    patterns += [(os.path.join(h, p), why, m) for h in homes for p, why, m in HOME_PLACES]
    places = []
    for pattern, why, marker in patterns:
        for found in sorted(glob.glob(glob.escape(pattern).replace("[*]", "*"))):
            real_dir = os.path.isdir(found) and not os.path.islink(found)
            if real_dir and (marker is None or os.path.exists(os.path.join(found, marker))):
                places.append(Place(Path(found), why))
    return places


def _ram_size(st: os.stat_result) -> int:
    """What an entry takes in a tmpfs: file data in whole pages; a short symlink lives in
    its inode (shmem keeps targets under 128 bytes inline), a longer one takes a page."""
    if stat.S_ISREG(st.st_mode):
        return -(-st.st_size // PAGE) * PAGE
    if stat.S_ISLNK(st.st_mode):
        return PAGE if st.st_size >= 128 else 0
    return 0


def scan_tree(path: Path) -> Scan:
    """Size and hard links of a tree, not following symlinks nor crossing into other mounts."""
    try:
        top = os.lstat(path)
    except OSError as exc:
        return Scan(0, 0, 0, f"cannot be read: {exc.strerror}")
    size, files = 0, 0
    links: dict[tuple[int, int], list[int]] = {}  # inode -> [nlink, seen here]
    stack = [os.fspath(path)]
    try:
        while stack:
            with os.scandir(stack.pop()) as entries:
                for entry in entries:
                    st = entry.stat(follow_symlinks=False)
                    if stat.S_ISDIR(st.st_mode):
                        if st.st_dev == top.st_dev:
                            stack.append(entry.path)
                        continue
                    files += 1
                    if st.st_nlink > 1 and stat.S_ISREG(st.st_mode):
                        seen = links.setdefault((st.st_dev, st.st_ino), [st.st_nlink, 0])
                        seen[1] += 1
                        if seen[1] > 1:
                            continue  # another name of a file already counted
                    size += _ram_size(st)
    except OSError as exc:
        return Scan(size, files, 0, f"cannot be read: {exc.strerror} ({exc.filename})")
    outside = sum(1 for nlink, seen in links.values() if nlink > seen)
    return Scan(size, files, outside)


def _nested(a: Path, b: Path) -> bool:
    return a == b or a.is_relative_to(b) or b.is_relative_to(a)


def _exclusion(
    path: Path, targets: Sequence[Path], volatile: Path, device: PathDevice, scan: Scan
) -> str | None:
    for target in targets:
        if path == target:
            return "already a target"
        if path.is_relative_to(target):
            return f"inside target {target}"
        if target.is_relative_to(path):
            return f"contains target {target}"
    if _nested(path, volatile):
        return f"nested with VOLATILE {volatile}"
    if device.kind == "ram":
        return "already in RAM"
    if scan.error:
        return scan.error
    if scan.outside_links:
        return (
            f"{scan.outside_links} file(s) have hard links outside it; a RAM copy would split them"
        )
    return None


def find_candidates(
    places: Iterable[Place],
    targets: Sequence[Path],
    volatile: Path,
    *,
    mounts: MountTable | None = None,
    describe: Callable[[Path, MountTable], PathDevice] = describe_path,
    scan: Callable[[Path], Scan] = scan_tree,
) -> list[Candidate]:
    """Every place with its size and device, and the reason it is excluded, if any."""
    table = mounts if mounts is not None else MountTable.read()
    found = []
    for place in places:
        device = describe(place.path, table)
        result = scan(place.path)
        reason = _exclusion(place.path, targets, volatile, device, result)
        if reason is None and table.below(place.path):
            reason = "other filesystems are mounted inside it"
        found.append(
            Candidate(place.path, place.why, result.size_bytes, result.files, device, reason)
        )
    return found


def _mem_available(meminfo: str) -> int:
    for line in meminfo.splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def ram_budget(
    volatile: Path,
    targets: Sequence[Path],
    *,
    mounts: MountTable | None = None,
    meminfo: str | None = None,
    describe: Callable[[Path, MountTable], PathDevice] = describe_path,
    scan: Callable[[Path], Scan] = scan_tree,
) -> Budget:
    """RAM asd may still fill: the smaller of free memory and VOLATILE's free space, less
    the configured targets that are not in RAM yet."""
    table = mounts if mounts is not None else MountTable.read()
    if meminfo is None:
        with open("/proc/meminfo", encoding="ascii") as fh:
            meminfo = fh.read()
    try:
        vfs = os.statvfs(volatile)
    except OSError as exc:
        raise AsdError(
            f"VOLATILE {volatile} cannot be read ({exc.strerror}); fix VOLATILE."
        ) from None
    pending = sum(scan(t).size_bytes for t in targets if describe(t, table).kind != "ram")
    return Budget(_mem_available(meminfo), vfs.f_bavail * vfs.f_frsize, pending)


def watch(candidates: Sequence[Candidate], seconds: float) -> list[Candidate]:
    """Measure writes under every candidate not excluded, for ``seconds``."""
    open_ones = [c.path for c in candidates if c.excluded is None]
    measured = fanotify.measure(open_ones, seconds)
    note = "the kernel dropped events: counts are lower bounds" if measured.overflowed else None
    return [
        replace(c, activity=measured.activity.get(c.path), seconds=seconds, note=note)
        if c.excluded is None
        else c
        for c in candidates
    ]


def choose(candidates: Sequence[Candidate], budget_bytes: int, measured: bool) -> list[Candidate]:
    """Rank the candidates and mark as suggested those that fit the budget, best first.

    A suggestion never takes more than half the budget on its own (asd warns about such
    targets at sync), all of them together never more than the budget, and with ``--watch``
    a directory nobody wrote to is not worth RAM.
    """

    def key(c: Candidate) -> tuple[float, int]:
        return (-(c.score or 0.0) if measured else 0.0, c.size_bytes)

    ranked = sorted(candidates, key=lambda c: (c.excluded is not None, *key(c)))
    left = budget_bytes
    out: list[Candidate] = []
    for c in ranked:
        if c.excluded is not None:
            out.append(c)
            continue
        if c.size_bytes > budget_bytes // 2:
            note = f"takes more than half the RAM budget ({human_size(budget_bytes)})"
        elif c.size_bytes > left:
            note = f"does not fit in what is left of the RAM budget ({human_size(left)})"
        elif measured and (c.activity is None or c.activity.writes == 0):
            note = f"no writes measured in {c.seconds:g} s"
        elif not measured and c.files == 0:
            note = "empty: nothing to keep in RAM"
        elif any(s.suggested and _nested(s.path, c.path) for s in out):
            note = "nested with a better suggestion"
        else:
            left -= c.size_bytes
            out.append(replace(c, suggested=True))
            continue
        out.append(replace(c, note=note))
    return out


def whattosync_line(targets: Sequence[Path], candidates: Sequence[Candidate]) -> str:
    paths = [*targets, *(c.path for c in candidates if c.suggested)]
    return "WHATTOSYNC=(" + " ".join(_quote(str(p)) for p in paths) + ")"


def _quote(path: str) -> str:
    """Single-quoted, as asd.conf users write them; a quote inside becomes '\\''."""
    return "'" + path.replace("'", "'\\''") + "'"


def render_text(
    candidates: Sequence[Candidate], budget: Budget, targets: Sequence[Path], seconds: float | None
) -> str:
    lines = [
        f"RAM budget: {human_size(budget.free_bytes)} (memory available "
        f"{human_size(budget.memory_available)}, VOLATILE free {human_size(budget.volatile_free)},"
        f" configured targets not yet in RAM {human_size(budget.pending_targets)})",
        f"Writes measured with fanotify for {seconds:g} s."
        if seconds
        else "Writes not measured: run `asd suggest --watch 600` to rank by real writes.",
        "",
    ]

    def row(c: Candidate) -> str:
        rate = c.writes_per_hour
        writes = "" if rate is None else f"{rate:9.0f} writes/h"
        return f"  {str(c.path):<48} {human_size(c.size_bytes):>10}  {c.device.kind:<9}{writes}"

    chosen = [c for c in candidates if c.suggested]
    lines.append("Suggested:" if chosen else "Nothing to suggest.")
    lines += [f"{row(c)}  {c.why}" for c in chosen]
    rest = [c for c in candidates if not c.suggested]
    if rest:
        lines += ["", "Not suggested:"]
        lines += [f"{row(c)}  {c.excluded or c.note}" for c in rest]
    lines += ["", whattosync_line(targets, candidates)]
    return "\n".join(lines)


def _candidate_json(c: Candidate) -> dict[str, Any]:
    return {
        "path": str(c.path),
        "why": c.why,
        "size_bytes": c.size_bytes,
        "files": c.files,
        "device": c.device.to_json(),
        "suggested": c.suggested,
        "reason": c.excluded or c.note,
        "writes": None
        if c.activity is None
        else {
            "modify_events": c.activity.writes,
            "closes": c.activity.closes,
            "files": c.activity.files,
        },
        "writes_per_hour": c.writes_per_hour,
        "score": c.score,
    }


def render_json(
    candidates: Sequence[Candidate], budget: Budget, targets: Sequence[Path], seconds: float | None
) -> str:
    document = {
        "budget": {
            "bytes": budget.free_bytes,
            "memory_available": budget.memory_available,
            "volatile_free": budget.volatile_free,
            "pending_targets": budget.pending_targets,
        },
        "watch_seconds": seconds,
        "candidates": [_candidate_json(c) for c in candidates],
        "whattosync": [str(t) for t in targets] + [str(c.path) for c in candidates if c.suggested],
        "whattosync_line": whattosync_line(targets, candidates),
    }
    return json.dumps(document, indent=2)


def run_suggest(config: SuggestConfig, watch_seconds: float | None, as_json: bool) -> str:
    """``asd suggest``: returns what to print. Raises `AsdError` when --watch cannot measure."""
    mounts = MountTable.read()
    targets = list(config.whattosync)
    budget = ram_budget(config.volatile, targets, mounts=mounts)
    candidates = find_candidates(known_places(), targets, config.volatile, mounts=mounts)
    if watch_seconds:
        candidates = watch(candidates, watch_seconds)
    ranked = choose(candidates, budget.free_bytes, measured=bool(watch_seconds))
    render = render_json if as_json else render_text
    return render(ranked, budget, targets, watch_seconds)
