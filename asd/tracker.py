"""The change tracker: which entries of the RAM copies changed, so a resync need not walk them.

A copy-mode resync used to find what changed by walking the whole RAM copy: its cost grew
with the size of the target, not with what changed. The tracker is a small process, started
by the sync that takes the first sync point, that keeps a fanotify group on VOLATILE's
filesystem (`fanotify.watch_entries`) and remembers, per directory, the names of entries that
changed. The kernel queues each event inside the system call that caused it, so once a call
has returned, its event is waiting to be read.

Its history is a row of *periods*, numbered; a client's request closes the open period
("cut") after reading every event queued so far. A resync asks for what changed since the
cut its index was taken at (`Token`) and gets the names touched in every period after it,
or "full" when the tracker cannot vouch for all of them: another tracker (restarted, so
``id`` differs), a period already forgotten (`HISTORY`), or one in which the kernel dropped
events (its queue overflowed) or in which more names changed than it keeps (`MAX_NAMES`).
"full" means: walk, as before. A cut is taken *before* the walk or rescan that makes the next
index, so what changes while it runs falls into the next period and is found again.

A resync that fails after its cut saves neither index nor token, and its next request goes
back to the older cut: periods are not forgotten when read, only when `HISTORY` is full.

The token is only believed together with the very index file it was saved with (inode,
size and mtime): whatever else rewrites the index makes the next resync walk.

The socket is root's only (0600 in /run/asd), and the tracker answers only uid 0. It ends on
"stop" (`asd unsync`), when the run state file is gone, or with the service (systemd stops
the unit's processes after ExecStop).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import select
import signal
import socket
import struct
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from asd import fanotify, index
from asd.errors import AsdError
from asd.layout import Instance, TargetLayout

log = logging.getLogger(__name__)

HISTORY = 256  # closed periods kept; a resync of each target closes one
MAX_NAMES = 100_000  # names kept per period; past that the period is "full"
MAX_KEPT = 4 * MAX_NAMES  # names kept in all of the history; the oldest periods go first
TIMEOUT = 10.0  # seconds a client waits for an answer
CHECK_EVERY = 30.0  # seconds between looks whether asd still runs
_CRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


@dataclass(frozen=True)
class Token:
    """The cut an index was taken at, which index file that was, and the entries its resync
    left out of it (they vanished while it copied them, or seemed to): the next resync looks
    at them again, as no event may come for them."""

    tracker: str
    cut: int
    index: tuple[int, ...]  # `index.identity` of the index file and its delta
    recheck: tuple[str, ...] = ()


@dataclass(frozen=True)
class Answer:
    tracker: str
    cut: int  # the period the request closed
    dev: int  # st_dev of the filesystem it watches
    touched: list[tuple[str, str]] | None  # (directory, name), or None: walk everything

    def under(self, root: Path) -> list[tuple[str, str]] | None:
        """The touched entries below ``root`` as (directory relative to it, name); a name
        "" is the directory itself. None if it cannot say, or watches another filesystem
        (VOLATILE changed since it started)."""
        if self.touched is None or os.lstat(root).st_dev != self.dev:
            return None
        top = os.path.realpath(root)
        prefix = top + "/"
        out = []
        for directory, name in self.touched:
            if directory == top:
                out.append(("", name))
            elif directory.startswith(prefix):
                out.append((directory[len(prefix) :], name))
        return out


def socket_path(instance: Instance) -> Path:
    return instance.run_dir / f"{instance.name}.track"


def token_file(layout: TargetLayout) -> Path:
    return layout.index_file.with_suffix(".track")


# ----- the client side ------------------------------------------------------------------------
def _request(instance: Instance, line: str) -> bytes | None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.settimeout(TIMEOUT)
    try:
        sock.connect(os.fspath(socket_path(instance)))
        sock.sendall(line.encode() + b"\n")
        chunks = []
        while chunk := sock.recv(1 << 20):
            chunks.append(chunk)
        return b"".join(chunks)
    except OSError as exc:
        log.debug("change tracker: %s", exc)
        return None
    finally:
        sock.close()


def parse_answer(data: bytes) -> Answer | None:
    head, _, body = data.partition(b"\n")
    words = head.split()
    if len(words) != 4 or words[0] not in (b"ok", b"full") or not b"".join(words[2:]).isdigit():
        return None
    tracker, number, dev = words[1].decode(), int(words[2]), int(words[3])
    if words[0] == b"full":
        return Answer(tracker, number, dev, None)
    fields = body.split(b"\0")[:-1]
    if len(fields) % 2:
        return None
    names = [os.fsdecode(f) for f in fields]
    return Answer(tracker, number, dev, list(zip(names[::2], names[1::2], strict=True)))


def cut(instance: Instance, since: Token | None) -> Answer | None:
    """Close the open period and say what changed since ``since``; None if no tracker runs."""
    line = f"cut {since.tracker} {since.cut}" if since else "cut - -1"
    data = _request(instance, line)
    return None if data is None else parse_answer(data)


def load_token(layout: TargetLayout) -> Token | None:
    """The token saved with the index file that is there now, or None."""
    try:
        raw = json.loads(token_file(layout).read_bytes())
        recheck = tuple(str(r) for r in raw.get("recheck", []))
        saved = tuple(int(n) for n in raw["index"])
        token = Token(str(raw["tracker"]), int(raw["cut"]), saved, recheck)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return token if token.index == index.identity(layout.index_file) else None


def save_token(layout: TargetLayout, answer: Answer | None, recheck: Iterable[str] = ()) -> None:
    """Record that the index file just saved was taken after ``answer``'s cut, less the
    entries in ``recheck``."""
    path = token_file(layout)
    identity = index.identity(layout.index_file)
    if answer is None or identity is None:
        path.unlink(missing_ok=True)
        return
    tmp = path.with_name(f".{path.name}.tmp")
    data = {
        "tracker": answer.tracker,
        "cut": answer.cut,
        "index": list(identity),
        "recheck": sorted(recheck),
    }
    tmp.write_text(json.dumps(data, ensure_ascii=True))
    os.replace(tmp, path)


def stop(instance: Instance) -> None:
    _request(instance, "stop")


def status(instance: Instance) -> str:
    """For `asd parse`: whether a tracker answers for VOLATILE (without closing a period)."""
    words = (_request(instance, "ping") or b"").split()
    if len(words) != 4 or words[0] != b"tracking":
        return "not running: copy-mode resyncs walk the whole RAM copy"
    try:
        here = os.stat(instance.ram_root).st_dev
    except OSError:
        here = -1
    if words[3] != str(here).encode():
        return "watches another filesystem than VOLATILE's: resyncs walk; the next sync restarts it"
    return f"running, {int(words[2])} cuts so far: resyncs look only at what changed"


def start(instance: Instance) -> bool:
    """Make sure a tracker runs for ``instance``: start one if none answers. False (and a
    debug line) when this kernel or filesystem cannot report directory entries. One that
    watches another filesystem than VOLATILE's (VOLATILE changed) is stopped first."""
    running = cut(instance, None)
    if running is not None:
        if running.dev == os.stat(instance.ram_root).st_dev:
            return True
        stop(instance)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child; its work is tested through its socket
        os.close(read_end)
        _child(instance, write_end)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        said = pipe.read().decode(errors="replace")
    if said != "ready":
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)
        log.debug("change tracker not started: %s", said or "it ended at once")
        return False
    return True


def _child(instance: Instance, ready: int) -> None:  # pragma: no cover - see `start`
    """The forked tracker: a session of its own, no descriptor of its parent (a lock held
    by an inherited descriptor would outlive the command), then `serve`."""
    code = 0
    try:
        os.setsid()
        _name_process(b"asd-tracker")
        os.closerange(0, ready)
        os.closerange(ready + 1, os.sysconf("SC_OPEN_MAX"))
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        Tracker(instance).serve(ready)
    except BaseException as exc:  # noqa: BLE001 - the child must never return to the parent's code
        with contextlib.suppress(OSError):
            os.write(ready, str(exc).encode())
        code = 1
    os._exit(code)


def _name_process(name: bytes) -> None:  # pragma: no cover - see `start`
    """What ps and /proc/PID/comm call the tracker (PR_SET_NAME)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(15, ctypes.c_char_p(name), 0, 0, 0)


# ----- the tracker ------------------------------------------------------------------------
class Tracker:
    def __init__(self, instance: Instance) -> None:
        self.instance = instance
        self.id = os.urandom(8).hex()
        self.open: dict[bytes, set[bytes]] = {}
        self.open_names = 0
        self.open_full = False
        # (number, names touched per directory handle or None if unknown, how many names)
        self.periods: deque[tuple[int, dict[bytes, set[bytes]] | None, int]] = deque()
        self.kept = 0  # names in ``periods``
        self.number = 0  # of the last closed period
        self.dev = -1  # of the filesystem watched

    def serve(self, ready: int) -> None:
        ram_root = self.instance.ram_root
        events = fanotify.watch_entries(ram_root)
        self.dev = os.stat(ram_root).st_dev
        mount_fd = os.open(ram_root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        path = socket_path(self.instance)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        path.unlink(missing_ok=True)
        old = os.umask(0o177)
        try:
            listener.bind(os.fspath(path))
        finally:
            os.umask(old)
        listener.listen(8)
        bound = os.stat(path).st_ino
        os.write(ready, b"ready")
        os.dup2(1, ready)  # the pipe ends (the parent reads on); its number stays /dev/null
        while True:
            readable, _, _ = select.select([events, listener.fileno()], [], [], CHECK_EVERY)
            if events in readable:
                self.drain(events)
            if listener.fileno() in readable:
                conn, _ = listener.accept()
                with conn:
                    if self.answer(conn, events, mount_fd) == "stop":
                        self.unlink(path, bound)
                        # The socket and the mark are gone before unsync goes on: the mark
                        # would make an event of each file unsync then removes.
                        os.close(events)
                        conn.sendall(b"stopped\n")
                        break
            if not readable and not self.instance.state_file.exists():
                self.unlink(path, bound)
                break

    @staticmethod
    def unlink(path: Path, bound: int) -> None:
        """Remove the socket's name, unless another tracker's socket took it."""
        with contextlib.suppress(FileNotFoundError):
            if os.stat(path).st_ino == bound:
                path.unlink()

    def drain(self, events: int) -> None:
        while True:
            try:
                buffer = os.read(events, 256 * 1024)
            except BlockingIOError:
                return
            self.record(fanotify.parse_entries(buffer))

    def record(self, events: Iterable[fanotify.EntryEvent]) -> None:
        for event in events:
            if event.mask & fanotify.FAN_Q_OVERFLOW or not event.handle:
                self.open_full = True
            if self.open_full:
                continue
            names = self.open.setdefault(event.handle, set())
            if event.name not in names:
                names.add(event.name)
                self.open_names += 1
                if self.open_names > MAX_NAMES:
                    self.open_full = True
        if self.open_full:
            self.open.clear()

    def close_period(self) -> None:
        self.number += 1
        names = 0 if self.open_full else self.open_names
        self.periods.append((self.number, None if self.open_full else self.open, names))
        self.kept += names
        while len(self.periods) > HISTORY or self.kept > MAX_KEPT:
            self.kept -= self.periods.popleft()[2]
        self.open, self.open_names, self.open_full = {}, 0, False

    def since(self, tracker: str, cut: int) -> dict[bytes, set[bytes]] | None:
        """The names touched in every closed period after ``cut``, or None if not all of
        them are known."""
        if tracker != self.id or cut < 0 or cut > self.number:
            return None
        wanted = [p for n, p, _ in self.periods if n > cut and p is not None]
        if len(wanted) != self.number - cut:
            return None  # forgotten, or not all seen
        union: dict[bytes, set[bytes]] = {}
        for period in wanted:
            for handle, names in period.items():
                union.setdefault(handle, set()).update(names)
        return union

    def answer(self, conn: socket.socket, events: int, mount_fd: int) -> str:
        conn.settimeout(TIMEOUT)
        try:
            cred = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CRED.size)
            if _CRED.unpack(cred)[1] != 0:
                return ""
            words = conn.makefile("rb").readline(256).split()
            if words == [b"stop"]:
                return "stop"
            if words == [b"ping"]:
                conn.sendall(f"tracking {self.id} {self.number} {self.dev}\n".encode())
                return ""
            if len(words) != 3 or words[0] != b"cut":
                return ""
            self.drain(events)
            self.close_period()
            cut = int(words[2]) if words[2].lstrip(b"-").isdigit() else -1
            union = self.since(words[1].decode(errors="replace"), cut)
            if union is None:
                conn.sendall(f"full {self.id} {self.number} {self.dev}\n".encode())
                return ""
            body = [f"ok {self.id} {self.number} {self.dev}\n".encode()]
            for handle, names in union.items():
                directory = fanotify.open_handle(mount_fd, handle)
                if directory is None:
                    continue  # gone: its removal is an entry of its parent
                encoded = os.fsencode(directory)
                body += [encoded + b"\0" + name + b"\0" for name in names]
            conn.sendall(b"".join(body))
        except (OSError, AsdError) as exc:
            log.debug("change tracker: %s", exc)
        return ""
