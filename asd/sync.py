"""sync, resync and unsync: plan the steps, record each before doing it, undo in reverse.

A sync of one target is a fixed list of small steps (`plan_target`). Each step is recorded in
the run state before it runs, so undo — after a failure, and at unsync — replays exactly what
was done, backwards, checking the mount table and skipping what did not happen.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from asd import devices, lower, mounts, rsync, tree
from asd.config import Config
from asd.errors import SafetyError, StateError
from asd.holders import Holder, holders
from asd.journal import dir_metadata, remove_tree, set_dir_metadata
from asd.layout import WORK_NAME, Instance, TargetLayout
from asd.mounts import MountTable
from asd.recovery import clear_session, mark_session, recover
from asd.run import run
from asd.state import RunState, StateStore
from asd.writeback import WriteBack, ram_index, resync_target, save_index

log = logging.getLogger(__name__)

Say = Callable[[str], None]


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
            "ram-dir": f"create the RAM directory {self.path} (root-only parents)",
            "copy": f"copy {self.source} into RAM at {self.path}",
            "lower": f"build overlay lower tree {self.path} (hard links to {self.source})",
            "overlay": f"mount an overlay at {self.path} (lower {self.source}, upper in RAM)",
            "index": f"record the state of {self.path} as the first sync point",
            "bind-target": f"bind-mount the RAM copy {self.source} over {self.path}",
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
        Step("bind-backup", t, str(layout.backup), t),
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
def pinned(path: Path, *, ours: bool = False) -> Iterator[str]:
    """A name for the very directory at ``path`` now, that no later rename or symlink swap
    can redirect: ``/proc/<pid>/fd/<n>`` of an O_PATH descriptor opened without following a
    symlink. The target's parent is often writable by its owner (a home directory), so any
    name asd mounts on or from there could otherwise be swapped between check and mount.
    ``ours``: the directory must also be the empty, root-owned mount point asd made."""
    try:
        fd = os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
            raise
        raise SafetyError(
            f"{path} was replaced by a symlink or a file while asd was setting it up; asd "
            "mounts nothing on or from it. Someone who can write to its parent did this: look "
            "at it, and run asd again"
        ) from exc
    try:
        if ours:
            st = os.fstat(fd)
            if st.st_uid != os.geteuid() or os.listdir(f"/proc/self/fd/{fd}"):
                raise SafetyError(
                    f"{path} is no longer the empty mount point asd created (owner uid "
                    f"{st.st_uid}); someone replaced it. asd mounts nothing on it: look at it, "
                    "and run asd again"
                )
        yield f"/proc/{os.getpid()}/fd/{fd}"
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


class Engine:
    def __init__(self, config: Config, instance: Instance, say: Say, warn: Say) -> None:
        self.config = config
        self.instance = instance
        self.store = StateStore(instance)
        self.say = say
        self.warn = warn

    def layout(self, target: Path | str) -> TargetLayout:
        return self.instance.target(Path(target))

    # ----- undo -------------------------------------------------------------------------
    def undo_step(self, step: Step, *, lazy: bool = False) -> None:
        path = Path(step.path)
        if step.kind in ("bind-backup", "overlay", "bind-target"):
            if MountTable.read().is_mountpoint(path):
                run(mounts.umount(path, lazy=lazy))
        elif step.kind in ("ram-dir", "lower"):
            remove_tree(path)
        elif step.kind == "mkdir":
            with contextlib.suppress(FileNotFoundError):
                os.rmdir(path)
        elif step.kind == "mark":
            clear_session(path)
        elif step.kind == "copy":
            remove_tree(path)

    def undo_target(self, state: RunState, target: str, *, lazy: bool = False) -> None:
        for raw in reversed(state.actions.get(target, [])):
            step = Step.from_json(raw)
            self.undo_step(step, lazy=lazy)
            state.actions[target].remove(raw)
            self.store.save(state)
        state.actions.pop(target, None)
        self.store.save(state)
        self.layout(target).index_file.unlink(missing_ok=True)

    # ----- sync -------------------------------------------------------------------------
    def complete(self, state: RunState, target: str) -> bool:
        actions = state.actions.get(target, [])
        return (
            bool(actions)
            and actions[-1]["kind"] == "bind-target"
            and (MountTable.read().is_mountpoint(target))
        )

    def reconcile(self, state: RunState) -> None:
        """After an interrupted run on this boot: keep targets being served, undo the rest."""
        for target in list(state.actions):
            if not self.complete(state, target):
                self.warn(f"{target}: undoing what an interrupted run of asd left half done")
                self.undo_target(state, target)

    def check_target(self, layout: TargetLayout, table: MountTable) -> None:
        # A target may well be a file system of its own (/var/log on a partition); what must
        # not be there is a RAM copy of asd's that no run state accounts for.
        top = table.top_at(layout.target)
        marker = f"/{self.instance.ram_root.name}/"
        if top is not None and (top.source == "asd-overlay" or marker in top.root + "/"):
            raise StateError(
                f"{layout.target} already shows a RAM copy of asd's, but asd has no record of "
                "mounting it (was /run cleared?); asd will not mount over it. Run "
                f"'umount {layout.target}' after saving anything new in it, then sync again"
            )
        if table.is_mountpoint(layout.backup):
            raise StateError(
                f"{layout.backup} is mounted but asd has no record of it; unmount it first"
            )

    def budget(self, targets: list[TargetLayout]) -> None:
        need = {t.target: tree.disk_usage(t.target, frozenset({WORK_NAME})) for t in targets}
        total = sum(need.values())
        vfs = os.statvfs(self.config.volatile)
        free = vfs.f_bavail * vfs.f_frsize
        available = meminfo_available()
        budget = min(free, available) if available is not None else free
        for warning in devices.sync_warnings(list(need.items()), self.config.volatile, budget):
            self.warn(warning)
        if total > free or (available is not None and total > available):
            sizes = ", ".join(f"{p} {human(n)}" for p, n in need.items())
            raise SafetyError(
                f"the targets need {human(total)} of RAM ({sizes}) but {self.config.volatile} "
                f"has {human(free)} free and the system has {human(available or 0)} of memory "
                "available; nothing was copied. Make VOLATILE larger, free memory, or sync "
                "fewer targets"
            )

    def hardlinks(self, layout: TargetLayout) -> None:
        if not self.config.enable_hardlink_safety_check:
            return
        split = tree.outside_links(layout.target, frozenset({WORK_NAME}))
        if split:
            shown = ", ".join(str(layout.target / r) for r in split[:5])
            more = f" and {len(split) - 5} more" if len(split) > 5 else ""
            raise SafetyError(
                f"{layout.target} has files hard-linked to files outside it ({shown}{more}); "
                "a RAM copy would split those links. Remove the outside links, or set "
                "ENABLE_HARDLINK_SAFETY_CHECK=0 to accept that they will be split"
            )

    def execute(self, step: Step, state: RunState) -> None:
        layout = self.layout(step.target)
        path = Path(step.path)
        if step.kind == "recover":
            recover(
                layout,
                use_backups=self.config.use_backups,
                backup_limit=self.config.backup_limit,
                say=self.say,
            )
            return
        if step.kind in ("ram-dir", "lower", "mkdir") and os.path.lexists(path):
            raise SafetyError(
                f"{path} already exists, left by an earlier run of asd that was not cleaned "
                "up; asd will neither use nor delete it. Look at what it holds, move it away, "
                "and try again"
            )
        self.store.record(state, step.target, step.to_json())
        if step.kind == "mark":
            mark_session(path, {"instance": self.instance.name, "pid": os.getpid()})
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
        elif step.kind == "bind-backup":
            with pinned(Path(step.source)) as source, pinned(path, ours=True) as mount_point:
                run(mounts.bind(source, mount_point))
                # A mount point cannot be renamed (EBUSY): from here on its name is safe.
            run(mounts.make_private(path))
        elif step.kind == "ram-dir":
            secure_ram_root(self.instance.ram_root)
            path.mkdir(mode=0o700, parents=True)
        elif step.kind == "copy":
            tty = sys.stdout.isatty()
            argv = rsync.copy_tree(Path(step.source), path, exclude_top=(WORK_NAME,), progress=tty)
            run(argv, show_output=tty)
        elif step.kind == "lower":
            lower.build(Path(step.source), path, frozenset({WORK_NAME}))
        elif step.kind == "overlay":
            layout.upper.mkdir(mode=0o700)
            layout.overlay_work.mkdir(mode=0o700)
            # The merged view's root takes the upper's owner, mode and xattrs: give it the target's.
            set_dir_metadata(layout.upper, dir_metadata(Path(step.source)))
            run(mounts.overlay(Path(step.source), layout.upper, layout.overlay_work, path))
        elif step.kind == "index":
            save_index(layout, ram_index(layout))
        elif step.kind == "bind-target":
            with pinned(Path(step.source)) as ram_copy, pinned(path) as served_at:
                run(mounts.bind(ram_copy, served_at))
            served, ram = os.stat(path), os.stat(step.source)
            if (served.st_dev, served.st_ino) != (ram.st_dev, ram.st_ino):
                raise StateError(f"{path} does not show the RAM copy after mounting it")

    def sync(self) -> list[str]:
        state = self.store.load()
        if state is None:
            state = RunState("syncing", self.config.to_json())
        else:
            if state.config != self.config.to_json():
                self.warn("asd.conf changed while asd runs; the changes apply at the next start")
            self.config = Config.from_json(state.config)
            self.reconcile(state)
            state.status = "syncing"
        self.store.save(state)
        try:
            return self._sync_targets(state)
        except BaseException:
            if state.actions:  # targets synced by an earlier run stay served
                state.status = "synced"
                self.store.save(state)
            else:
                self.finish()
            raise

    def _sync_targets(self, state: RunState) -> list[str]:
        todo = [self.layout(t) for t in self.config.whattosync if not self.complete(state, str(t))]
        table = MountTable.read()
        for layout in todo:
            self.check_target(layout, table)
        # Recovery first: it finishes a crashed resync and removes asd's own leftovers (the
        # overlay lower tree is all hard links), so the checks below see the user's tree.
        plans = {layout: plan_target(layout, self.config.use_overlayfs) for layout in todo}
        for layout, steps in plans.items():
            self.execute(steps[0], state)
            self.hardlinks(layout)
        if not self.config.use_overlayfs:
            self.budget(todo)
        synced: list[str] = []
        try:
            for layout, steps in plans.items():
                for step in steps[1:]:
                    self.execute(step, state)
                synced.append(str(layout.target))
        except BaseException:
            # No success after a failure: undo this run's work on every target, newest first.
            for layout in reversed(list(plans)):
                if str(layout.target) in state.actions:
                    self.warn(f"{layout.target}: sync failed; undoing what this run did")
                    self.undo_target(state, str(layout.target))
            raise
        state.status = "synced"
        self.store.save(state)
        return synced

    # ----- resync -----------------------------------------------------------------------
    def running_state(self) -> RunState:
        state = self.store.load()
        if state is None:
            raise StateError("asd is not running for this config (no run state); run 'asd sync'")
        self.config = Config.from_json(state.config)
        return state

    def resync(self) -> list[WriteBack]:
        state = self.running_state()
        return [resync_target(self.layout(t)) for t in state.actions if self.complete(state, t)]

    # ----- unsync -----------------------------------------------------------------------
    def unsync(self, *, force: bool) -> list[str]:
        state = self.running_state()
        self.reconcile(state)
        held: dict[str, list[Holder]] = {}
        for target in list(state.actions):
            layout = self.layout(target)
            self.say(resync_target(layout).describe())
            held[target] = holders([layout.target, layout.ram_copy])
        busy = {t: h for t, h in held.items() if h}
        if busy and not force:
            lines = [h.describe() for hs in busy.values() for h in hs]
            raise StateError(
                "files in the targets are in use, so asd did not unmount anything (the disk "
                "copy is up to date, and everything stays in RAM): "
                + "; ".join(lines)
                + ". Stop those programs and run 'asd unsync' again, or use 'asd unsync --force'"
            )
        state.status = "unsyncing"
        self.store.save(state)
        done = []
        for target in list(state.actions):
            layout = self.layout(target)
            lazy = bool(held.get(target))
            actions = state.actions[target]
            top = Step.from_json(actions[-1])
            if top.kind == "bind-target":
                self.undo_step(top, lazy=lazy)
                actions.pop()
                self.store.save(state)
            if lazy:
                # Late writers still see the RAM copy through their open files: catch what
                # they wrote, then name them.
                self.say(resync_target(layout).describe())
                for h in held[target]:
                    self.warn(f"{h.describe()}; writes it makes from now on are lost")
            self.undo_target(state, target, lazy=lazy)
            done.append(target)
        self.finish()
        return done

    def finish(self) -> None:
        """Nothing is synced any more: drop the run state and asd's empty RAM directory."""
        with contextlib.suppress(OSError):
            st = os.lstat(self.instance.ram_root)
            if stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid() and not st.st_mode & 0o077:
                with contextlib.suppress(OSError):
                    os.rmdir(self.instance.ram_root / ".overlay")
                remove_empty_tree(self.instance.ram_root)
        with contextlib.suppress(OSError):
            os.rmdir(self.instance.index_dir)
        self.store.remove()


def remove_empty_tree(root: Path) -> None:
    """Remove ``root`` if it holds nothing but empty directories."""
    if not root.is_dir() or root.is_symlink():
        return
    for dirpath, _dirs, files in os.walk(root, topdown=False):
        if files:
            return
        try:
            os.rmdir(dirpath)
        except OSError:
            return


def meminfo_available(path: str = "/proc/meminfo") -> int | None:
    try:
        with open(path) as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


def describe_plan(config: Config, instance: Instance) -> Iterable[str]:
    for target in config.whattosync:
        for step in plan_target(instance.target(target), config.use_overlayfs):
            yield step.describe()
