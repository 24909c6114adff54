"""sync, resync and unsync: the engine that runs the steps (`asd.steps`) of every target.

A sync of one target is a fixed list of small steps (`steps.plan_target`). Each step is
recorded in the run state before it runs, so undo — after a failure, and at unsync — replays
exactly what was done, backwards, checking the mount table and skipping what did not happen.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
from collections.abc import Callable
from pathlib import Path

from asd import devices, index, links, lower, shrink, steps, tracker, tree, upper
from asd.config import Config
from asd.dirfd import remove_empty_tree
from asd.disks import human_size, meminfo_available
from asd.errors import AsdError, SafetyError, StateError
from asd.holders import Holder, holders
from asd.layout import WORK_NAME, Instance, TargetLayout
from asd.mounts import MountTable
from asd.recovery import recover
from asd.run import require
from asd.state import RunState, StateStore
from asd.steps import Step, plan_target
from asd.writeback import WriteBack, resync_target

log = logging.getLogger(__name__)

Say = Callable[[str], None]


class Engine:
    def __init__(self, config: Config, instance: Instance, say: Say, warn: Say) -> None:
        self.config = config
        self.instance = instance
        self.store = StateStore(instance)
        self.say = say
        self.warn = warn

    def layout(self, target: Path | str) -> TargetLayout:
        """The target's paths, at the generation of its RAM layer now mounted."""
        return upper.current(self.instance.target(Path(target)))

    # ----- undo -------------------------------------------------------------------------
    def undo_step(self, step: Step, *, lazy: bool = False) -> None:
        steps.undo(step, lazy=lazy)

    def undo_target(self, state: RunState, target: str, *, lazy: bool = False) -> None:
        """Take the target down. The caller has written its RAM copy back, or it has nothing
        the disk copy lacks (`retire`)."""
        if target in state.served:
            state.served.remove(target)
            self.store.save(state)
        for raw in reversed(state.actions.get(target, [])):
            step = Step.from_json(raw)
            self.undo_step(step, lazy=lazy)
            state.actions[target].remove(raw)
            self.store.save(state)
        state.actions.pop(target, None)
        self.store.save(state)
        layout = self.layout(target)
        layout.index_file.unlink(missing_ok=True)
        tracker.token_file(layout).unlink(missing_ok=True)
        index.delta_file(layout.index_file).unlink(missing_ok=True)

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
                self.retire(state, target)

    def retire(self, state: RunState, target: str) -> None:
        """Undo a target that is not (or no longer) shown from RAM. One whose sync finished is
        written back first, walking all of its RAM copy: a program may have written to it
        before its bind mount went (an unsync stopped after the unmount, or somebody's
        umount), and the tracker cannot vouch for a window it may not have watched. If that
        fails, nothing is taken down. A half-done sync's RAM copy is never written back."""
        if target in state.served:
            self.warn(f"{target}: no longer shown from RAM; writing its RAM copy back first")
            self.say(resync_target(self.layout(target), full=True).describe())
        else:
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
            sizes = ", ".join(f"{p} {human_size(n)}" for p, n in need.items())
            memory = human_size(available or 0)
            raise SafetyError(
                f"the targets need {human_size(total)} of RAM ({sizes}) but "
                f"{self.config.volatile} has {human_size(free)} free and the system has {memory} "
                "of memory available; nothing was copied. Make VOLATILE larger, free memory, or "
                "sync fewer targets"
            )

    def hardlinks(self, layout: TargetLayout) -> None:
        """Copy mode: refuse a target with files hard-linked to outside it (`asd.links`),
        before anything is mounted."""
        if self.config.enable_hardlink_safety_check:
            self.refuse_split(layout, links.linked_outside(layout.target, frozenset({WORK_NAME})))

    def lower(self, step: Step, layout: TargetLayout) -> str:
        """Overlay mode: bring the lower tree up to date (`asd.lower`) while the hard-link
        check's find walks the disk copy (`links.linked_outside_while`), and refuse a target
        with files linked to outside it before the overlay is mounted."""
        if not self.config.enable_hardlink_safety_check:
            return f"{layout.target}: {steps.refresh_lower(step, layout).describe()}"
        done: list[lower.Refresh] = []

        def mirror() -> int:
            done.append(steps.refresh_lower(step, layout))
            return done[0].shared

        split = links.linked_outside_while(Path(step.source), frozenset({WORK_NAME}), mirror)
        if split:
            with steps.own_work(layout) as work:  # asd's own, not the user's
                lower.discard(work / layout.lower.name, work / layout.lower_record.name)
            self.refuse_split(layout, split)
        return f"{layout.target}: {done[0].describe()}"

    @staticmethod
    def refuse_split(layout: TargetLayout, split: list[str]) -> None:
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
        if step.kind == "recover":  # not recorded: it has nothing to undo
            recover(
                layout,
                use_backups=self.config.use_backups,
                backup_limit=self.config.backup_limit,
                say=self.say,
                keep_lower=self.config.use_overlayfs,
            )
            return
        steps.refuse_leftover(step)
        self.store.record(state, step.target, step.to_json())
        if step.kind == "lower":
            self.say(self.lower(step, layout))
        else:
            steps.perform(step, layout)
            if step.kind == "bind-target":
                state.served.append(step.target)
                self.store.save(state)

    def sync(self) -> list[str]:
        require(
            "mount",
            "rsync",
            *([] if self.config.use_overlayfs else ["cp"]),
            # Recovery after a crash snapshots the disk copy before anything is mounted.
            *(["tar", "zstd"] if self.config.use_backups else []),
            *(["find"] if self.config.enable_hardlink_safety_check else []),
        )
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
        # Recovery first: it finishes a crashed resync and removes asd's own leftovers, so the
        # checks below see the user's tree. Overlay mode checks links once its lower tree is
        # up to date (`execute`): the tree links every file of the disk copy again.
        plans = {layout: plan_target(layout, self.config.use_overlayfs) for layout in todo}
        for plan in plans.values():
            self.execute(plan[0], state)
        if not self.config.use_overlayfs:
            for layout in todo:
                self.hardlinks(layout)
            self.budget(todo)
        # Every RAM copy is made before any target's sync point is taken: the first index
        # starts copy mode's change tracker, which would take each file copied for a later
        # target for a change, more of them than it keeps (the first resync would walk).
        point = {layout: [s.kind for s in plan].index("index") for layout, plan in plans.items()}
        try:
            for layout, plan in plans.items():
                for step in plan[1 : point[layout]]:
                    self.execute(step, state)
            for layout, plan in plans.items():
                for step in plan[point[layout] :]:
                    self.execute(step, state)
        except BaseException:
            # No success after a failure: undo this run's work on every target, newest first.
            for layout in reversed(list(plans)):
                target = str(layout.target)
                if target not in state.actions:
                    continue
                self.warn(f"{target}: sync failed; undoing what this run did")
                try:
                    if target in state.served:  # shown from RAM for a while: written back
                        self.unbind(state, target)
                    self.retire(state, target)
                except (AsdError, OSError) as exc:
                    self.warn(f"{target}: stays in RAM, 'asd unsync' takes it down: {exc}")
            raise
        state.status = "synced"
        self.store.save(state)
        return [str(layout.target) for layout in plans]

    # ----- resync -----------------------------------------------------------------------
    def running_state(self) -> RunState:
        state = self.store.load()
        if state is None:
            raise StateError("asd is not running for this config (no run state); run 'asd sync'")
        self.config = Config.from_json(state.config)
        return state

    def resync(self) -> list[WriteBack | shrink.Shrink]:
        """Write every target back; in overlay mode, then give its upper layer's RAM back.
        A switch of RAM layers that fails leaves that target as it was and the others go on;
        the first such failure is raised at the end."""
        state = self.running_state()
        results: list[WriteBack | shrink.Shrink] = []
        failed: list[AsdError] = []
        for target in [t for t in state.actions if self.complete(state, t)]:
            try:
                self.finish_switch(state, target)
            except AsdError as exc:
                failed.append(exc)
                continue
            layout = self.layout(target)
            written = resync_target(layout)
            results.append(written)
            if upper.is_overlay(layout):
                try:
                    done = shrink.shrink_target(layout, state, self.store, bool(written.vanished))
                except AsdError as exc:
                    state.ram[target] = f"RAM not given back yet: {exc}"
                    self.store.save(state)
                    failed.append(exc)
                    continue
                state.ram[target] = done.describe()
                self.store.save(state)
                results.append(done)
        if failed:
            raise failed[0]
        return results

    def finish_switch(self, state: RunState, target: str) -> None:
        """A switch to the next RAM layer that an earlier run left waiting: finish it first,
        so that what is written back is what the target shows."""
        if shrink.pending_step(state, target) is not None:
            try:
                done = shrink.resume(self.layout(target), state, self.store)
            except AsdError as exc:
                state.ram[target] = f"RAM not given back yet: {exc}"
                self.store.save(state)
                raise
            state.ram[target] = done.describe()
            self.store.save(state)
            if done.outcome != "done" or done.detail:  # not done, or names written twice
                self.warn(done.describe())

    # ----- unsync -----------------------------------------------------------------------
    def unsync(self, *, force: bool) -> list[str]:
        state = self.running_state()
        self.reconcile(state)
        held: dict[str, list[Holder]] = {}
        last: dict[str, WriteBack] = {}
        for target in list(state.actions):
            self.finish_switch(state, target)
            layout = self.layout(target)
            held[target] = holders([layout.target, layout.ram_copy])
            # While a program holds a file open or mapped in the target, its writes may not
            # have made an event yet (one through a mapping makes it only when the file is
            # closed): the last write-back then walks all of the RAM copy. With nothing held,
            # every write ended in an event the change tracker has read (`asd.tracker`).
            last[target] = resync_target(layout, full=bool(held[target]))
            self.say(last[target].describe())
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
        for target in list(state.actions):
            layout = self.layout(target)
            lazy = bool(held.get(target))
            self.unbind(state, target, lazy=lazy)
            # From here until undo_target, the target is served but not bound: an asd stopped
            # in between writes it back at its next run (`retire`).
            if lazy:
                # Late writers still see the RAM copy through their open files: catch what
                # they wrote, then name them.
                self.say(resync_target(layout, full=True).describe())
                for h in held[target]:
                    self.warn(f"{h.describe()}; writes it makes from now on are lost")
            elif not last[target].walked:
                # What a program wrote between that write-back and the unmount: the tracker
                # names it (or, in overlay mode, the upper layer holds it), so looking costs
                # what it wrote. A walk for it would double a stop without a tracker.
                late = resync_target(layout)
                if late.changes or late.deleted:
                    self.say(late.describe())
        # Every target is written back and no longer shown: the tracker has nothing left to
        # tell, and while its mark is on VOLATILE every file removed below makes an event
        # (a fifth of the time rm takes for 200k files).
        tracker.stop(self.instance)
        done = []
        for target in list(state.actions):
            self.undo_target(state, target, lazy=bool(held.get(target)))
            done.append(target)
        self.finish()
        return done

    def unbind(self, state: RunState, target: str, *, lazy: bool = False) -> None:
        """Unmount what shows the RAM copy at the target, if asd's record still has it."""
        actions = state.actions[target]
        top = Step.from_json(actions[-1])
        if top.kind == "bind-target":
            self.undo_step(top, lazy=lazy)
            actions.pop()
            self.store.save(state)

    def finish(self) -> None:
        """Nothing is synced any more: stop the change tracker, drop the run state and asd's
        empty RAM directory."""
        tracker.stop(self.instance)
        with contextlib.suppress(OSError):
            st = os.lstat(self.instance.ram_root)
            if stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid() and not st.st_mode & 0o077:
                with contextlib.suppress(OSError):
                    os.rmdir(self.instance.ram_root / ".overlay")
                remove_empty_tree(self.instance.ram_root)
        with contextlib.suppress(OSError):
            os.rmdir(self.instance.index_dir)
        self.store.remove()
