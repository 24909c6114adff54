"""Crash-recovery snapshots: zstd-compressed tarballs of a target's disk copy, kept beside it.

A snapshot of ``/foo/bar`` is ``/foo/.bar-backup_asd-crashrecovery-YYYYMMDD_HHMMSS.tar.zstd``
(upstream's name; ``-1``, ``-2`` are appended when two are taken in the same second). Its
members are the *contents* of the directory, ``./`` first, so extracting it into an empty
directory recreates the target. Snapshots made by upstream asd (one top-level directory,
``.bar-backup_asd-old/``) are read too and restored with that directory stripped.

The target's parent is usually writable by the target's owner while asd runs as root, so
every name in it is resolved once, relative to a descriptor of that directory, and tar and
zstd are handed ``/proc/<pid>/fd/<n>`` paths to files and directories asd already opened:
swapping a name for a symlink between our check and their open changes nothing. Which
members a snapshot may hold, and reading them, is `asd.archive`.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from asd import progress, tree
from asd.archive import Member, check_members, open_snapshot, parts, read_members
from asd.errors import CommandError, SafetyError
from asd.run import fd_path, run

STAMP = "%Y%m%d_%H%M%S"
SUFFIX = ".tar.zstd"
PARTIAL = ".partial"
# tar options that carry everything a user would miss: numeric owners, every xattr namespace
# (user.*, security.*, trusted.*), POSIX ACLs. xattrs and ACLs need the pax (posix) format.
TAR_METADATA = ("--numeric-owner", "--xattrs", "--xattrs-include=*", "--acls")


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


def _lexists(name: str, dir_fd: int) -> bool:
    try:
        os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


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
                watch = progress.on_terminal(
                    source,
                    "read into the snapshot",
                    lambda: tree.disk_usage(source, frozenset(exclude)),
                )
                run(tar_create_argv(fd_path(fd), source, exclude), watch=watch)
            except CommandError as exc:
                raise exc.reworded(f"Could not snapshot {source}; nothing was kept") from exc
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
        # tar reads the archive's stream from zstd: each member's data and a 512-byte header
        stream = sum(m.size for m in members) + 512 * len(members)
        watch = progress.on_terminal(target, "restored", lambda: stream)
        run(tar_extract_argv(fd_path(fd), fd_path(tfd), strip), watch=watch)
    except CommandError as exc:
        raise exc.reworded(f"Could not extract the snapshot into {target}") from exc
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
    fd = open_snapshot(snapshot)
    try:
        members = check_members(read_members(fd, snapshot), snapshot)
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
