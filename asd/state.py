"""Run state under /run (what asd did, durably) and the per-instance lock.

The state file is rewritten whole on every change (temp file, fsync, ``os.replace``), so a
reader sees either the old or the new record. Every action is recorded *before* it is
performed; undo checks reality (the mount table, the file system) and skips what did not
happen, so a crash between the two never makes undo touch something asd did not do.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from asd.errors import StateError
from asd.layout import Instance

log = logging.getLogger(__name__)

STATE_VERSION = 1


def write_json_atomic(
    path: Path, data: object, mode: int = 0o600, *, dir_fd: int | None = None
) -> None:
    """Write ``data`` to ``path`` whole or not at all. With ``dir_fd``, ``path.name`` is
    written in that already opened directory (no name above it is looked up again)."""
    if dir_fd is None:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    else:
        dfd = os.dup(dir_fd)
    try:
        tmp = f".{path.name}.tmp"
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            fd = os.open(tmp, flags, mode, dir_fd=dfd)
            try:
                os.fchmod(fd, mode)
                os.write(fd, json.dumps(data, indent=1, sort_keys=True).encode())
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path.name, src_dir_fd=dfd, dst_dir_fd=dfd)
            os.fsync(dfd)
        except OSError as exc:
            # Name the file: a bare "No space left on device" tells the user nothing.
            raise OSError(exc.errno, exc.strerror, str(path)) from exc
    finally:
        os.close(dfd)


def read_json(path: Path) -> Any:
    with open(path, "rb") as fh:
        return json.loads(fh.read())


@dataclass
class RunState:
    """What this instance has done: status, the config it runs with, actions per target."""

    status: str  # "syncing", "synced", "unsyncing"
    config: dict[str, Any]
    actions: dict[str, list[dict[str, str]]] = field(default_factory=dict)
    # Overlay mode: what the last resync did with each target's RAM layer (`asd.shrink`).
    ram: dict[str, str] = field(default_factory=dict)
    # Targets shown from RAM since their sync finished: their RAM copy is whole and may hold
    # writes the disk copy lacks, so it is written back before it is taken down, whatever
    # took the target's bind mount away (`asd.sync.Engine.retire`).
    served: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.time)
    pid: int = field(default_factory=os.getpid)

    def to_json(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "status": self.status,
            "config": self.config,
            "actions": self.actions,
            "ram": self.ram,
            "served": self.served,
            "started": self.started,
            "pid": self.pid,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RunState:
        if data.get("version") != STATE_VERSION:
            raise StateError(f"run state has unknown version {data.get('version')!r}")
        actions = {k: list(v) for k, v in data.get("actions", {}).items()}
        return cls(
            status=str(data["status"]),
            config=dict(data["config"]),
            actions=actions,
            ram={str(k): str(v) for k, v in data.get("ram", {}).items()},
            served=[str(t) for t in data["served"]] if "served" in data else served(actions),
            started=float(data.get("started", 0.0)),
            pid=int(data.get("pid", 0)),
        )


def served(actions: dict[str, list[dict[str, str]]]) -> list[str]:
    """A run state written before ``served`` was recorded: a target whose sync finished (its
    bind mount is in the record) counts as served."""
    return [t for t, steps in actions.items() if any(a["kind"] == "bind-target" for a in steps)]


class StateStore:
    def __init__(self, instance: Instance) -> None:
        self.instance = instance
        self.path = instance.state_file

    def load(self) -> RunState | None:
        try:
            data = read_json(self.path)
        except FileNotFoundError:
            return None
        except PermissionError as exc:
            raise StateError(f"cannot read the run state {self.path}: run asd as root") from exc
        except (OSError, ValueError) as exc:
            raise StateError(
                f"cannot read the run state {self.path}: {exc}; if asd is not running, "
                "remove it and run 'asd sync' again"
            ) from exc
        return RunState.from_json(data)

    def save(self, state: RunState) -> None:
        write_json_atomic(self.path, state.to_json())

    def record(self, state: RunState, target: str, action: dict[str, str]) -> None:
        state.actions.setdefault(target, []).append(action)
        self.save(state)

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


def lock_holder(fd: int) -> str | None:
    """Who holds the lock, as it wrote itself into the file; None if we got the lock while
    looking. A holder writes its line just after taking the lock and empties the file just
    before leaving it: an empty file means one of those moments, so look again shortly."""
    for _ in range(40):
        text = os.pread(fd, 200, 0).decode(errors="replace").strip()
        if text:
            return text
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            time.sleep(0.05)
        else:
            return None
    return "another asd"


@contextmanager
def locked(instance: Instance, what: str, *, say: Any = None) -> Iterator[None]:
    """Hold the instance's lock for ``what``; tell the user when waiting for another run."""
    instance.run_dir.mkdir(parents=True, exist_ok=True, mode=0o755)
    fd = os.open(instance.lock_file, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = lock_holder(fd)
            if holder is not None:
                message = f"waiting for {holder} to finish (lock {instance.lock_file})"
                (say or log.warning)(message)
                fcntl.flock(fd, fcntl.LOCK_EX)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} running 'asd {what}'\n".encode(), 0)
        yield
    finally:
        os.ftruncate(fd, 0)
        os.close(fd)
