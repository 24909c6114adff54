"""Crash-recovery snapshots: zstd-compressed tarballs of a target's disk copy, kept beside it.

A snapshot of ``/foo/bar`` is ``/foo/.bar-backup_asd-crashrecovery-YYYYMMDD_HHMMSS.tar.zstd``
(upstream's name; ``-1``, ``-2`` are appended when two are taken in the same second). Its
members are the *contents* of the directory, ``./`` first, so extracting it into an empty
directory recreates the target. Snapshots made by upstream asd (one top-level directory,
``.bar-backup_asd-old/``) are read too and restored with that directory stripped.

The target's parent is usually writable by the target's owner while asd runs as root, so
every name in it is resolved once, relative to a descriptor of that directory, and tar and
zstd are handed ``/proc/<pid>/fd/<n>`` paths to files and directories asd already opened:
swapping a name for a symlink between our check and their open changes nothing.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import tarfile
import threading
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, replace
from datetime import datetime
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Literal

from asd.errors import CommandError, SafetyError
from asd.run import run

STAMP = "%Y%m%d_%H%M%S"
SUFFIX = ".tar.zstd"
PARTIAL = ".partial"
# tar options that carry everything a user would miss: numeric owners, every xattr namespace
# (user.*, security.*, trusted.*), POSIX ACLs. xattrs and ACLs need the pax (posix) format.
TAR_METADATA = ("--numeric-owner", "--xattrs", "--xattrs-include=*", "--acls")

Kind = Literal["file", "dir", "symlink", "hardlink", "fifo", "chardev", "blockdev", "other"]


@dataclass(frozen=True)
class Snapshot:
    path: Path
    target: Path
    taken: datetime
    size_bytes: int

    def to_json(self) -> dict[str, str | int]:
        return {
            "path": str(self.path),
            "target": str(self.target),
            "taken": self.taken.isoformat(),
            "size_bytes": self.size_bytes,
        }


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


@dataclass(frozen=True)
class RestoreResult:
    target: Path
    snapshot: Path
    moved_aside: Path | None
    entries: int
    verified: bool


# --- names
def backup_name(target: Path) -> str:
    """Upstream's backup name: ``bar`` -> ``.bar-backup_asd``, ``.cache`` -> ``.cache-backup_asd``.

    ``/foo/bar`` and ``/foo/.bar`` therefore share snapshot names, exactly as upstream's do.
    """
    name = target.name
    return f"{name if name.startswith('.') else '.' + name}-backup_asd"


def snapshot_path(target: Path, when: datetime, seq: int = 0) -> Path:
    extra = f"-{seq}" if seq else ""
    return target.parent / f"{backup_name(target)}-crashrecovery-{when:{STAMP}}{extra}{SUFFIX}"


def _pattern(target: Path) -> re.Pattern[str]:
    return re.compile(
        rf"{re.escape(backup_name(target))}-crashrecovery-(\d{{8}}_\d{{6}})(?:-([1-9]\d*))?"
        rf"{re.escape(SUFFIX)}({re.escape(PARTIAL)})?"
    )


def _check_target(target: Path) -> None:
    if not target.is_absolute() or target.name in ("", ".", ".."):
        raise SafetyError(f"{target} is not a usable sync target; give an absolute directory path.")


# --- listing and deleting
def _scan(target: Path) -> list[tuple[datetime, int, str, bool, int]]:
    """(taken, seq, name, partial, size) of regular files in the target's parent named for it,
    newest first. Not recursive, and symlinks are ignored even when their name matches."""
    _check_target(target)
    pattern = _pattern(target)
    try:
        with os.scandir(target.parent) as it:
            dirents = list(it)
    except (FileNotFoundError, NotADirectoryError):
        return []
    found = []
    for dirent in dirents:
        match = pattern.fullmatch(dirent.name)
        if match is None or not dirent.is_file(follow_symlinks=False):
            continue
        try:
            taken = datetime.strptime(match[1], STAMP)
        except ValueError:
            continue
        size = dirent.stat(follow_symlinks=False).st_size
        found.append((taken, int(match[2] or 0), dirent.name, match[3] is not None, size))
    return sorted(found, reverse=True)


def list_snapshots(target: Path) -> list[Snapshot]:
    """Snapshots of ``target``, newest first."""
    found = _scan(target)
    return [
        Snapshot(target.parent / n, target, t, size) for t, _, n, part, size in found if not part
    ]


def _delete(target: Path, names: Iterable[str]) -> list[Path]:
    deleted: list[Path] = []
    names = list(names)
    if not names:  # also when the parent is gone: nothing to open, nothing to do
        return deleted
    with _open_dir(target.parent) as dfd:
        for name in names:
            try:
                os.unlink(name, dir_fd=dfd)
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise SafetyError(
                    f"Could not delete {target.parent / name}: {exc.strerror}; "
                    "check its permissions and delete it by hand."
                ) from exc
            deleted.append(target.parent / name)
    return deleted


def remove_partial(target: Path) -> list[Path]:
    """Delete temp files left by an interrupted `create`."""
    return _delete(target, [name for _, _, name, partial, _ in _scan(target) if partial])


def rotate(target: Path, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` snapshots."""
    if keep < 0:
        raise ValueError(f"keep must be 0 or more, not {keep}")
    return _delete(target, [s.path.name for s in list_snapshots(target)[keep:]])


def clean(target: Path) -> list[Path]:
    """Delete every snapshot of ``target`` and any partial ones."""
    return _delete(target, [name for _, _, name, _, _ in _scan(target)])


# --- file descriptors
@contextmanager
def _open_dir(path: Path) -> Iterator[int]:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise SafetyError(f"Cannot open the directory {path}: {exc.strerror}.") from exc
    try:
        yield fd
    finally:
        os.close(fd)


def _fd_path(fd: int) -> str:
    """A path another process can open to reach the very file ``fd`` refers to."""
    return f"/proc/{os.getpid()}/fd/{fd}"


def _lexists(name: str, dir_fd: int) -> bool:
    try:
        os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


def _reworded(exc: CommandError, message: str) -> CommandError:
    """The same failure, told in terms of the user's files (tar's first complaint is the cause)."""
    lines = exc.stderr.strip().splitlines()
    detail = re.sub(r"/proc/\d+/fd/\d+\s*:\s*", "", lines[0] if lines else str(exc))
    return CommandError(exc.argv, exc.exit_code, exc.stdout, exc.stderr, f"{message}: {detail}")


# --- create
def tar_create_argv(archive: str, source: Path, exclude: Sequence[str]) -> list[str]:
    argv = ["tar", "--create", f"--file={archive}", "--zstd", "--format=posix", "--sparse"]
    # --anchored --no-wildcards: each exclude matches exactly one top-level name, literally.
    argv += [*TAR_METADATA, "--anchored", "--no-wildcards"]
    return [*argv, *(f"--exclude=./{name}" for name in exclude), f"--directory={source}", "."]


def _claim(target: Path, when: datetime, dir_fd: int) -> tuple[str, str, int]:
    """Pick a free snapshot name and create its partial file, mode 0600, before any data."""
    for seq in range(1000):
        final = snapshot_path(target, when, seq).name
        if _lexists(final, dir_fd):
            continue
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            fd = os.open(final + PARTIAL, flags, 0o600, dir_fd=dir_fd)
        except FileExistsError:
            continue
        os.fchmod(fd, 0o600)
        return final, final + PARTIAL, fd
    raise SafetyError(f"There are already 1000 snapshots of {target} from {when:{STAMP}}.")


def create(
    target: Path,
    source: Path,
    *,
    exclude: Sequence[str] = (".asd-work",),
    now: datetime | None = None,
) -> Snapshot:
    """Snapshot the contents of ``source`` (the disk copy of ``target``) next to ``target``."""
    _check_target(target)
    for name in exclude:
        if not name or "/" in name or name in (".", ".."):
            raise SafetyError(f"Cannot exclude {name!r}: give a name directly inside {source}.")
    if not source.is_dir():
        raise SafetyError(f"Cannot snapshot {source}: it is not a directory.")
    when = now or datetime.now()
    with _open_dir(target.parent) as dfd:
        final, partial, fd = _claim(target, when, dfd)
        try:
            try:
                run(tar_create_argv(_fd_path(fd), source, exclude))
            except CommandError as exc:
                raise _reworded(exc, f"Could not snapshot {source}; nothing was kept") from exc
            os.fsync(fd)
            size = os.fstat(fd).st_size
            os.rename(partial, final, src_dir_fd=dfd, dst_dir_fd=dfd)
            os.fsync(dfd)
        except OSError as exc:
            with suppress(FileNotFoundError):
                os.unlink(partial, dir_fd=dfd)
            raise SafetyError(
                f"Could not write the snapshot {target.parent / final}: {exc.strerror}; "
                "nothing was kept. Check free space and permissions there."
            ) from exc
        except BaseException:
            with suppress(FileNotFoundError):
                os.unlink(partial, dir_fd=dfd)
            raise
        finally:
            os.close(fd)
    return Snapshot(
        target.parent / final, target, datetime.strptime(f"{when:{STAMP}}", STAMP), size
    )


# --- validate
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


def _read_members(fd: int, label: Path) -> list[Member]:
    """Stream the archive through ``zstd -d`` into tarfile; nothing is extracted."""
    rfd, wfd = os.pipe()
    failed: list[CommandError] = []

    def decompress() -> None:
        try:
            # --no-sparse: zstd otherwise seeks in its output, which a pipe cannot do.
            argv = ["zstd", "--decompress", "--quiet", "--force", "--no-sparse"]
            run([*argv, "-o", _fd_path(wfd), _fd_path(fd)])
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
        raise _reworded(
            failed[0], f"Could not decompress {label}; it may be damaged, so try an older one"
        )
    if error is not None:
        raise SafetyError(f"Refusing {label}: it is not a readable tar archive ({error}).")
    return members


def _open_snapshot(snapshot: Path) -> int:
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
    fd = _open_snapshot(snapshot)
    try:
        return check_members(_read_members(fd, snapshot), snapshot)
    finally:
        os.close(fd)


# --- restore
def tar_extract_argv(archive: str, directory: str, strip: int) -> list[str]:
    # No --keep-old-files: it makes tar skip './' (the target's own mode, owner, ACL, xattrs).
    # Nothing can be overwritten anyway: the directory is new and member names are unique.
    argv = ["tar", "--extract", f"--file={archive}", "--zstd", *TAR_METADATA]
    argv += ["--preserve-permissions", "--same-owner", f"--strip-components={strip}"]
    return [*argv, f"--directory={directory}"]


def _verify(tfd: int, members: list[Member], strip: int, target: Path) -> None:
    """Every member exists with its type; files with their size, hard links as one inode."""
    inodes: dict[tuple[str, ...], tuple[int, int]] = {}
    checks = {"file": stat.S_ISREG, "hardlink": stat.S_ISREG, "dir": stat.S_ISDIR}
    checks |= {"symlink": stat.S_ISLNK, "fifo": stat.S_ISFIFO}
    for m in members[1:]:
        p = parts(m.name)[strip:]
        rel = "/".join(p)
        try:
            st = os.stat(rel, dir_fd=tfd, follow_symlinks=False)
            ok = checks[m.kind](st.st_mode)
            if ok and m.kind == "file":
                ok = st.st_size == m.size
                inodes[p] = (st.st_dev, st.st_ino)
            elif ok and m.kind == "hardlink":
                ok = inodes.get(parts(m.link)[strip:]) == (st.st_dev, st.st_ino)
            elif ok and m.kind == "symlink":
                ok = os.readlink(rel, dir_fd=tfd) == m.link
        except OSError:
            ok = False
        if not ok:
            raise SafetyError(
                f"{target / rel} did not come out of the snapshot as the {m.kind} it should be."
            )


def _move_aside(target: Path, when: datetime, pfd: int) -> Path | None:
    if not _lexists(target.name, pfd):
        return None
    for seq in range(1000):
        aside = f"{target.name}-bad-{when:{STAMP}}" + (f"-{seq}" if seq else "")
        if _lexists(aside, pfd):
            continue
        try:
            os.rename(target.name, aside, src_dir_fd=pfd, dst_dir_fd=pfd)
        except OSError as exc:
            raise SafetyError(
                f"Could not move {target} aside to {target.parent / aside}: {exc.strerror}. "
                "If it is a mount point, stop asd or unmount it first; nothing was changed."
            ) from exc
        return target.parent / aside
    raise SafetyError(f"There are already 1000 {target.name}-bad-* directories in {target.parent}.")


def _roll_back(target: Path, aside: Path | None, pfd: int, why: BaseException, ours: bool) -> None:
    """Remove the half-restored target (only if we created it) and put the old one back."""
    try:
        if ours:
            shutil.rmtree(target.name, dir_fd=pfd)
        if aside is not None:
            os.rename(aside.name, target.name, src_dir_fd=pfd, dst_dir_fd=pfd)
    except OSError as exc:
        kept = f"the previous contents are in {aside}" if aside else "there were none before"
        raise SafetyError(
            f"Restoring {target} failed ({why}) and undoing it failed too ({exc.strerror}); "
            f"{kept}. Remove {target} and move them back by hand."
        ) from exc


def _extract(fd: int, target: Path, tfd: int, members: list[Member]) -> None:
    root = members[0]
    strip = len(parts(root.name))
    try:
        run(tar_extract_argv(_fd_path(fd), _fd_path(tfd), strip))
    except CommandError as exc:
        raise _reworded(exc, f"Could not extract the snapshot into {target}") from exc
    _verify(tfd, members, strip, target)
    # tar applied './' itself (mode, owner, ACL, xattrs, times), but skips the top directory it
    # strips from an upstream snapshot; so set owner, mode and mtime from the root entry here.
    os.chown(tfd, root.uid, root.gid)
    os.chmod(tfd, stat.S_IMODE(root.mode))
    os.utime(tfd, ns=(os.fstat(tfd).st_atime_ns, root.mtime_ns))


def restore(target: Path, snapshot: Path | None, *, now: datetime | None = None) -> RestoreResult:
    """Put ``snapshot`` (default: the newest) back at ``target``; the old target is kept."""
    _check_target(target)
    if snapshot is None:
        found = list_snapshots(target)
        if not found:
            raise SafetyError(
                f"There is no snapshot of {target} in {target.parent}; nothing was restored."
            )
        snapshot = found[0].path
    fd = _open_snapshot(snapshot)
    try:
        members = check_members(_read_members(fd, snapshot), snapshot)
        with _open_dir(target.parent) as pfd:
            aside = _move_aside(target, now or datetime.now(), pfd)
            ours = False
            try:
                os.mkdir(target.name, 0o700, dir_fd=pfd)
                ours = True
                flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
                tfd = os.open(target.name, flags, dir_fd=pfd)
                try:
                    _extract(fd, target, tfd, members)
                finally:
                    os.close(tfd)
                os.fsync(pfd)
            except OSError as exc:
                _roll_back(target, aside, pfd, exc, ours)
                raise SafetyError(
                    f"Could not restore {target}: {exc.strerror}; it was left as it was."
                ) from exc
            except BaseException as exc:
                _roll_back(target, aside, pfd, exc, ours)
                raise
    finally:
        os.close(fd)
    return RestoreResult(target, snapshot, aside, len(members), verified=True)


def describe(result: RestoreResult) -> str:
    head = f"Restored {result.target} from {result.snapshot} ({result.entries} entries checked)"
    if result.moved_aside is None:
        return f"{head}; there was nothing at {result.target} before."
    return f"{head}; the previous contents are in {result.moved_aside}."
