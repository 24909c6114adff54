"""What a snapshot holds, and which of its members asd will extract.

A snapshot is read as a stream (``zstd -d`` into a pipe, tarfile in streaming mode) and
nothing is extracted until every member passed `check_members`: no absolute names, no
``..``, no device nodes, nothing through a symlink or outside the archive's top directory,
hard links only to an earlier regular file. `asd.snapshots` makes and restores them.
"""

from __future__ import annotations

import os
import stat
import tarfile
import threading
from collections.abc import Iterable
from dataclasses import dataclass, replace
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Literal

from asd.errors import CommandError, SafetyError
from asd.run import fd_path, run

Kind = Literal["file", "dir", "symlink", "hardlink", "fifo", "chardev", "blockdev", "other"]


@dataclass(frozen=True)
class Member:
    """One entry of a snapshot, as stored (``name`` is raw, e.g. ``./a/b``)."""

    name: str
    kind: Kind
    size: int = 0
    link: str = ""
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    mtime_ns: int = 0


def _mtime_ns(info: tarfile.TarInfo) -> int:
    try:
        return int(Decimal(info.pax_headers["mtime"]) * 10**9)
    except (KeyError, InvalidOperation):
        return int(info.mtime) * 10**9


_KINDS: dict[bytes, Kind] = {tarfile.DIRTYPE: "dir", tarfile.SYMTYPE: "symlink"}
_KINDS |= {tarfile.LNKTYPE: "hardlink", tarfile.FIFOTYPE: "fifo"}
_KINDS |= {tarfile.CHRTYPE: "chardev", tarfile.BLKTYPE: "blockdev"}


def member_from_tarinfo(info: tarfile.TarInfo) -> Member:
    # isreg() covers every regular-file type tarfile knows: plain, old-style, contiguous, sparse.
    kind = "file" if info.isreg() else _KINDS.get(info.type, "other")
    m = Member(info.name, kind, info.size, info.linkname, info.mode, info.uid, info.gid)
    return replace(m, mtime_ns=_mtime_ns(info))


def parts(name: str) -> tuple[str, ...]:
    """``./a//b/`` -> ``("a", "b")``; the archive root is ``()``."""
    return tuple(p for p in name.split("/") if p not in ("", "."))


def check_members(members: Iterable[Member], label: object = "the snapshot") -> list[Member]:
    """Refuse, naming the first offender, anything that could write outside a fresh directory."""
    checked: list[Member] = []
    seen: dict[tuple[str, ...], Member] = {}
    implied: set[tuple[str, ...]] = set()
    root: tuple[str, ...] | None = None
    for m in members:

        def refuse(why: str, m: Member = m) -> SafetyError:
            return SafetyError(f"Refusing {label}: member {m.name!r} {why}; nothing was changed.")

        if "\0" in m.name or "\0" in m.link:
            raise refuse("contains a NUL byte")
        if m.name.startswith("/"):
            raise refuse("has an absolute name")
        p = parts(m.name)
        if ".." in p:
            raise refuse("has a '..' component")
        if m.kind in ("chardev", "blockdev"):
            raise refuse("is a device node")
        if m.kind == "other":
            raise refuse("is of a type asd does not restore")
        if p in seen:
            raise refuse("appears twice")
        if m.kind != "dir" and p in implied:
            raise refuse("is not a directory but comes after members inside it")
        if root is None:
            if m.kind != "dir" or len(p) > 1:
                raise refuse("comes first but is not the snapshot's top directory ('./')")
            root = p
        elif p[: len(root)] != root:
            raise refuse(f"is outside the snapshot's top directory {'/'.join(root)!r}")
        for k in range(1, len(p)):
            above = seen.get(p[:k])
            if above is not None and above.kind == "symlink":
                raise refuse(f"passes through the symbolic link {above.name!r}")
            if above is not None and above.kind != "dir":
                raise refuse(f"is inside {above.name!r}, which is not a directory")
        if m.kind == "hardlink":
            to = seen.get(parts(m.link))
            if m.link.startswith("/") or to is None or to.kind != "file":
                raise refuse(f"is a hard link to {m.link!r}, which is not an earlier regular file")
        seen[p] = m
        implied.update(p[:k] for k in range(1, len(p)))
        checked.append(m)
    if root is None:
        raise SafetyError(f"Refusing {label}: it is empty; nothing was changed.")
    return checked


def read_members(fd: int, label: Path) -> list[Member]:
    """Stream the archive through ``zstd -d`` into tarfile; nothing is extracted."""
    rfd, wfd = os.pipe()
    failed: list[CommandError] = []

    def decompress() -> None:
        try:
            # --no-sparse: zstd otherwise seeks in its output, which a pipe cannot do.
            argv = ["zstd", "--decompress", "--quiet", "--force", "--no-sparse"]
            run([*argv, "-o", fd_path(wfd), fd_path(fd)])
        except CommandError as exc:
            failed.append(exc)
        finally:
            os.close(wfd)  # only now, so zstd has certainly opened the pipe (or failed)

    thread = threading.Thread(target=decompress, name="asd-zstd", daemon=True)
    thread.start()
    members: list[Member] = []
    error: Exception | None = None
    try:
        with os.fdopen(rfd, "rb") as stream:
            try:
                with tarfile.open(fileobj=stream, mode="r|") as tar:
                    members = [member_from_tarinfo(info) for info in tar]
            except (tarfile.TarError, EOFError, ValueError) as exc:  # ValueError: bad pax data
                error = exc
            # Read to the end so zstd exits on its own and its status means what it says.
            while stream.read(1 << 16):
                pass
    finally:
        thread.join()
    if failed:
        raise failed[0].reworded(
            f"Could not decompress {label}; it may be damaged, so try an older one"
        )
    if error is not None:
        raise SafetyError(f"Refusing {label}: it is not a readable tar archive ({error}).")
    return members


def open_snapshot(snapshot: Path) -> int:
    try:
        fd = os.open(snapshot, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise SafetyError(
            f"Cannot open the snapshot {snapshot}: {exc.strerror}; give the path of the "
            "snapshot file itself (not a symbolic link to it)."
        ) from exc
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise SafetyError(f"{snapshot} is not a regular file, so it is not a snapshot.")
    return fd


def validate(snapshot: Path) -> list[Member]:
    """The snapshot's members, or SafetyError naming the first one unsafe to extract."""
    fd = open_snapshot(snapshot)
    try:
        return check_members(read_members(fd, snapshot), snapshot)
    finally:
        os.close(fd)
