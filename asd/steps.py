"""The steps of a sync: a fixed plan per target, each step described, done and undone.

`plan_target` is pure: (target, mode) -> steps. The engine (`asd.sync`) records each step in
the run state before `perform` does it, so `undo` can later replay exactly what was done,
backwards, checking the mount table and skipping what did not happen.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from asd import coreutils, lower, mountapi, mounts, progress, tree, upper
from asd.dirfd import open_private_dir, open_set_up_dir, remove_tree, remove_unmounted
from asd.dirmeta import dir_metadata, set_dir_metadata
from asd.errors import CommandError, SafetyError
from asd.layout import WORK_NAME, Instance, TargetLayout
from asd.mounts import MountTable
from asd.recovery import clear_session, mark_session
from asd.run import run, run_together
from asd.writeback import take_first_index

if TYPE_CHECKING:
    from asd.config import Config


@dataclass(frozen=True)
class Step:
    """One thing sync does. ``kind`` picks the action and its undo; paths are plain strings."""

    kind: str
    target: str
    path: str
    source: str = ""

    def describe(self) -> str:
        return {
            "recover": f"check {self.path} for an unclean stop; finish or discard an "
            "interrupted resync; snapshot it if asd was not stopped cleanly",
            "mark": f"write asd's session marker in {self.path}",
            "mkdir": f"create directory {self.path}",
            "bind-backup": f"bind-mount {self.source} at {self.path} (the disk copy), private",
            "bind-disk": f"bind-mount {self.source} at {self.path} (the disk copy), private, "
            "noatime (asd's reads of it move no atime)",
            "ram-dir": f"create the RAM directory {self.path} (root-only parents)",
            "copy": f"copy {self.source} into RAM at {self.path}",
            "lower": f"build the overlay's lower tree {self.path} (hard links to "
            f"{self.source}), or bring the one kept from the last session up to date",
            "overlay": f"mount an overlay at {self.path} (lower {self.source}, upper in RAM)",
            "index": f"record the state of {self.path} as the first sync point",
            "bind-target": f"bind-mount the RAM copy {self.source} over {self.path}",
            "beneath": f"attach the next overlay (upper {self.source}) beneath {self.path}",
        }[self.kind]

    def to_json(self) -> dict[str, str]:
        return {"kind": self.kind, "target": self.target, "path": self.path, "source": self.source}

    @classmethod
    def from_json(cls, d: dict[str, str]) -> Step:
        return cls(d["kind"], d["target"], d["path"], d.get("source", ""))


def plan_target(layout: TargetLayout, overlay: bool) -> list[Step]:
    t = str(layout.target)
    steps = [
        Step("recover", t, t),
        Step("mkdir", t, str(layout.backup), t),
        Step("mark", t, t),
        # Copy mode: only asd reads the disk copy, at each sync all of it; through a noatime
        # mount, so that with relatime (atimes a day old move on the next read) a sync does
        # not write every file's inode. In overlay mode programs read the lower files, whose
        # atimes then move as they would without asd.
        Step("bind-backup" if overlay else "bind-disk", t, str(layout.backup), t),
    ]
    if overlay:
        steps += [
            Step("lower", t, str(layout.lower), str(layout.backup)),
            Step("ram-dir", t, str(layout.overlay_dir)),
            Step("ram-dir", t, str(layout.ram_copy)),
            Step("overlay", t, str(layout.ram_copy), str(layout.lower)),
        ]
    else:
        steps += [
            Step("ram-dir", t, str(layout.ram_copy)),
            Step("copy", t, str(layout.ram_copy), str(layout.backup)),
        ]
    steps += [
        Step("index", t, str(layout.ram_copy)),
        Step("bind-target", t, t, str(layout.ram_copy)),
    ]
    return steps


@contextlib.contextmanager
def pinned(path: Path, *, ours: bool = False) -> Iterator[int]:
    """The very directory at ``path`` now, that no later rename or symlink swap can
    redirect: an O_PATH descriptor opened without following a symlink, which
    `mountapi.bind` mounts from or on. The target's parent is often writable by its owner
    (a home directory), so any name asd mounts on or from there could otherwise be swapped
    between check and mount.
    ``ours``: the directory must also be the empty, root-owned mount point asd made."""
    fd = open_set_up_dir(path, os.O_PATH)
    try:
        if ours:
            st = os.fstat(fd)
            if st.st_uid != os.geteuid() or os.listdir(f"/proc/self/fd/{fd}"):
                raise SafetyError(
                    f"{path} is no longer the empty mount point asd created (owner uid "
                    f"{st.st_uid}); someone replaced it. asd mounts nothing on it: look at it, "
                    "and run asd again"
                )
        yield fd
    finally:
        os.close(fd)


def secure_ram_root(ram_root: Path) -> None:
    """Create VOLATILE/asd-root race-free: a root-owned 0700 directory, never a symlink."""
    pfd = os.open(ram_root.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        with contextlib.suppress(FileExistsError):
            os.mkdir(ram_root.name, 0o700, dir_fd=pfd)
        st = os.stat(ram_root.name, dir_fd=pfd, follow_symlinks=False)
    finally:
        os.close(pfd)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
        raise SafetyError(
            f"{ram_root} already exists and is not a private directory of root "
            f"(mode {stat.filemode(st.st_mode)}, owner uid {st.st_uid}); someone else may "
            "have created it to read or redirect asd's RAM copies. Remove it (check who made "
            "it) and try again"
        )


def refuse_leftover(step: Step) -> None:
    """A step that creates a directory never reuses or deletes one already there."""
    path = Path(step.path)
    if step.kind in ("ram-dir", "mkdir") and os.path.lexists(path):
        raise SafetyError(
            f"{path} already exists, left by an earlier run of asd that was not cleaned "
            "up; asd will neither use nor delete it. Look at what it holds, move it away, "
            "and try again"
        )


def perform(step: Step, layout: TargetLayout) -> None:
    """Do ``step`` (already recorded in the run state); "recover" and "lower" (`refresh_lower`,
    run alongside the hard-link check) are the engine's."""
    path = Path(step.path)
    if step.kind == "mark":
        mark_session(path, {"instance": layout.instance.name, "pid": os.getpid()})
    elif step.kind == "mkdir":
        # The mount point carries the target's times (see `recover`): made under a
        # temporary name, given the times, then renamed, so it never exists without them.
        tmp = path.with_name(path.name + ".new")
        tmp.mkdir(mode=0o755)
        if step.source:
            st = os.lstat(step.source)
            # Through a descriptor: the parent may be writable by the target's owner.
            fd = os.open(tmp, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                os.utime(fd, ns=(st.st_atime_ns, st.st_mtime_ns))
            finally:
                os.close(fd)
        os.rename(tmp, path)
    elif step.kind in ("bind-backup", "bind-disk"):
        noatime = step.kind == "bind-disk"
        bind_pinned(Path(step.source), path, ours=True, private=True, noatime=noatime)
    elif step.kind == "ram-dir":
        secure_ram_root(layout.instance.ram_root)
        path.mkdir(mode=0o700, parents=True)
    elif step.kind == "copy":
        copy_in(Path(step.source), path, layout.target)
    elif step.kind == "overlay":
        layout.upper.mkdir(mode=0o700)
        layout.overlay_work.mkdir(mode=0o700)
        with own_work(layout) as work:
            tree = work / layout.lower.name
            # The merged view's root takes the upper's owner, mode and xattrs: the target's.
            set_dir_metadata(layout.upper, dir_metadata(tree))
            run(mounts.overlay(Path(step.source), layout.upper, layout.overlay_work, path))
            if not upper.mounted_over(layout.upper, tree):
                mountapi.take_off(path)
                raise SafetyError(
                    f"{layout.disk_work} was replaced while asd mounted the overlay of "
                    f"{layout.target}, which then showed something else (now taken off "
                    "again). Someone who can write to the target did this: look at it, and "
                    "run asd again"
                )
    elif step.kind == "index":
        take_first_index(layout)
    elif step.kind == "bind-target":
        bind_pinned(Path(step.source), path)


def refresh_lower(step: Step, layout: TargetLayout) -> lower.Refresh:
    """The "lower" step: overlay mode's lower tree made to mirror the disk copy."""
    with own_work(layout) as work:
        dst, record = work / Path(step.path).name, work / layout.lower_record.name
        return lower.refresh(Path(step.source), dst, record, {WORK_NAME})


@contextlib.contextmanager
def own_work(layout: TargetLayout) -> Iterator[Path]:
    """asd's journal directory in the disk copy, checked to be root's own and reached through
    its descriptor while the caller works in it: the disk copy's owner can rename anything in
    it, ``.asd-work`` too, and put a directory or a symlink of theirs in its place. The lower
    tree is built, and removed, only in the directory asd made."""
    fd = open_private_dir(layout.disk_work)
    try:
        yield Path(f"/proc/self/fd/{fd}")
    finally:
        os.close(fd)


def bind_pinned(
    source: Path, path: Path, *, ours: bool = False, private: bool = False, noatime: bool = False
) -> None:
    """Bind-mount ``source`` on ``path``, both `pinned`; then ``path`` must show the new mount.
    If someone swapped the name meanwhile, the mount went onto the directory asd checked,
    wherever it is now: asd takes it off again and stops."""
    with (
        pinned(source) as source_fd,
        pinned(path, ours=ours) as path_fd,
        mountapi.bind(source_fd, path_fd, path, private=private, noatime=noatime) as mount_fd,
    ):
        shown, mounted = os.stat(path), os.fstat(mount_fd)
        if (shown.st_dev, shown.st_ino) != (mounted.st_dev, mounted.st_ino):
            mountapi.detach(mount_fd, path)
            raise SafetyError(
                f"{path} was replaced while asd mounted {source} on it, so it does not show "
                "what asd mounted (now taken off again). Someone who can write to its "
                "parent did this: look at it, and run asd again"
            )


def copy_in(source: Path, ram_copy: Path, target: Path) -> None:
    """Copy the disk copy into RAM, all but asd's own ``.asd-work`` (the session marker)."""
    argv = coreutils.copy_tree(source, ram_copy)
    watch = progress.on_terminal(
        target, "copied", lambda: tree.disk_usage(source, frozenset({WORK_NAME}))
    )
    try:
        run(argv, watch=watch)
    except CommandError as exc:
        raise exc.reworded(f"Could not copy {target} into RAM at {ram_copy}") from None
    # cp cannot leave it out: remove the copy, and give the directory back the times cp set.
    st = os.lstat(ram_copy)
    remove_tree(ram_copy / WORK_NAME)
    os.utime(ram_copy, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)


def undo(step: Step, *, lazy: bool = False) -> None:
    """Take back what `perform` did for ``step``; what did not happen is skipped."""
    path = Path(step.path)
    if step.kind in ("bind-backup", "bind-disk", "overlay", "bind-target"):
        if MountTable.read().is_mountpoint(path):
            mountapi.take_off(path, lazy=lazy)
    elif step.kind == "beneath":
        # Only that overlay, once the one above it is gone: never a mount of the user's.
        if mounts.is_layer_of(MountTable.read().top_at(path), step.source):
            mountapi.take_off(path, lazy=lazy)
    elif step.kind == "ram-dir":
        remove_unmounted(path)  # by now empty, or the overlay's layer: the copy is its own step
    elif step.kind == "lower":
        pass  # kept for the next session (`asd.lower`); a clean stop leaves it in .asd-work
    elif step.kind == "mkdir":
        # Not a directory any more: someone swapped it (the error that stopped asd says so).
        with contextlib.suppress(FileNotFoundError, NotADirectoryError):
            os.rmdir(path)
    elif step.kind == "mark":
        clear_session(path)
    elif step.kind == "copy":
        remove_copy(path)


def remove_copy(path: Path) -> None:
    """Remove the RAM copy. Freeing a tmpfs's files is kernel time per file, and the kernel
    frees files of different directories at once: two rm processes, each given half of
    the tree's directories (`tree.frontier`), took 0.32 s for 200k small files where one
    took 0.56 s. rm then removes what is left of the root (nothing but empty directories)."""
    parts = tree.frontier(path, want=16) if (os.cpu_count() or 1) > 1 else None
    if parts and len(parts) > 1:
        first, second = coreutils.shares(parts, 2)
        run_together([coreutils.remove_tree(*first), coreutils.remove_tree(*second)])
    run(coreutils.remove_tree(path))


def describe_plan(config: Config, instance: Instance) -> Iterable[str]:
    for target in config.whattosync:
        for step in plan_target(instance.target(target), config.use_overlayfs):
            yield step.describe()
