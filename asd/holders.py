"""Which processes hold files, working directories or mappings under a path (from /proc)."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Holder:
    pid: int
    command: str
    path: str

    def describe(self) -> str:
        return f"pid {self.pid} ({self.command}) holds {self.path}"


def _under(path: str, prefixes: tuple[str, ...]) -> bool:
    path = path.removesuffix(" (deleted)")
    return any(path == p or path.startswith(p.rstrip("/") + "/") for p in prefixes)


def _command(pid_dir: Path) -> str:
    try:
        return (pid_dir / "comm").read_text().strip()
    except OSError:
        return "?"


def is_asd(pid_dir: Path) -> bool:
    """Whether the process is an asd invocation (``asd …``, ``python3 /usr/bin/asd …`` or
    ``python -m asd …``). Another asd running beside an unsync can only be one that takes no
    lock — ``parse`` or ``--dry-run``, reading the targets for a moment — and holds nothing
    that unmounting would cut off."""
    try:
        argv = (pid_dir / "cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    names = [os.path.basename(a) for a in argv]
    if names[0] == b"asd":
        return True
    if not names[0].startswith(b"python"):
        return False
    return names[1:2] == [b"asd"] or any(
        a == b"-m" and b == b"asd" for a, b in zip(argv, argv[1:], strict=False)
    )


def holders(paths: list[Path], proc: Path = Path("/proc")) -> list[Holder]:
    """One entry per process and path: open fds, cwd, root, exe and memory maps (asd's own
    processes left out: see `is_asd`)."""
    prefixes = tuple(os.path.normpath(str(p)) for p in paths)
    me = os.getpid()
    found: list[Holder] = []
    for entry in os.scandir(proc):
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        pid_dir = Path(entry.path)
        if is_asd(pid_dir):
            continue
        seen: set[str] = set()
        links = ["cwd", "root", "exe"]
        with contextlib.suppress(OSError):
            links += [f"fd/{n}" for n in os.listdir(pid_dir / "fd")]
        for link in links:
            try:
                target = os.readlink(pid_dir / link)
            except OSError:
                continue
            if _under(target, prefixes):
                seen.add(target.removesuffix(" (deleted)"))
        try:
            with open(pid_dir / "maps", encoding="utf-8", errors="surrogateescape") as fh:
                for line in fh:
                    parts = line.split(None, 5)
                    if len(parts) == 6 and _under(parts[5].rstrip("\n"), prefixes):
                        seen.add(parts[5].rstrip("\n").removesuffix(" (deleted)"))
        except OSError:
            pass
        command = _command(pid_dir) if seen else ""
        found += [Holder(int(entry.name), command, p) for p in sorted(seen)]
    return found
