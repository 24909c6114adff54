"""Overlay mode gives its RAM back: after a resync, the upper layer is replaced by an empty one.

An overlay's upper layer holds a full copy of every file a program changed since sync, and
nothing can be taken out of it while it is mounted. Once a resync has written it all to the
disk copy, asd builds the next generation of the target's overlay:

1. a delta on the disk copy's file system (`asd.delta`): the names the upper layer held, as
   the disk copy now has them, over the lower tree made at sync;
2. a new overlay over ``delta:lower``, its upper layer in RAM holding only the files changed
   at this resync and the one before (a log, a database: kept so that the next resync can
   patch their disk file in place, which a file the delta links cannot be), made without a
   mount point, and attached *beneath* the bind mount that shows the old overlay at the
   target (`asd.mountapi`); up to here nobody sees anything of it;
3. the old bind mount is unmounted — never lazily. That fails while a process has a file,
   a working directory or a mapping under the target (EBUSY): then nothing changed for
   anybody, the new overlay waits beneath, and the next resync tries again ("pending").
   asd asks /proc who holds files first and does not start while anybody does ("deferred");
4. the old upper layer is now out of everybody's sight. What programs wrote to it after the
   resync's walk, before the switch, is copied into the new overlay. A name the new overlay
   changed since it became visible is newer and kept, and so is everything below a name it
   made into something else than a directory (nothing is written through a symlink there);
   the old layer's version of such a name is not dropped but saved, with its path, under
   ``asd-conflict-<UTC time>`` at the top of the target, which the next resync writes to disk;
5. the overlay at the RAM copy's path is replaced too, the new layer's index becomes the
   sync point (with what it copied from the old layer as the resync wrote it to disk, so a
   write after the walk is still found), and the old upper layer, work directory and delta
   are removed: the RAM is free.

The run state records the new overlay before it is attached (a "beneath" action), so an asd
interrupted at any point finishes the switch at its next run, or unmounts it at unsync, and
never mistakes a mount of the user's for it. A power cut loses RAM as at any other moment; the
disk copy is the last resync's and the delta is removed with the rest of ``.asd-work``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from asd import carry, coreutils, delta, index, mapped, mountapi, upper
from asd.dirfd import open_private_dir, remove_at, remove_unmounted
from asd.dirmeta import O_DIR, dir_metadata, set_dir_metadata
from asd.disks import human_size
from asd.errors import AsdError, SafetyError
from asd.holders import holders
from asd.layout import TargetLayout
from asd.mounts import Mount, MountTable, is_layer_of
from asd.run import run
from asd.state import RunState, StateStore, write_json_atomic
from asd.steps import Step
from asd.tree import Index, disk_usage

log = logging.getLogger(__name__)

MIN_BYTES = 1 << 20  # less than this in the upper layer is not worth a delta on disk
OPTIONS = {"source": "asd-overlay", "redirect_dir": "on", "index": "on", "metacopy": "off"}
KERNEL = "giving RAM back needs Linux 6.8 or later; it stays in use until unsync"
WAIT = (0.05, 0.1, 0.2, 0.4, 0.8)  # retries of an unmount that was busy, seconds


@dataclass(frozen=True)
class Shrink:
    target: Path
    outcome: str  # "done", "small", "deferred", "pending", "kept" (the kernel cannot)
    freed: int = 0
    detail: str = ""

    def describe(self) -> str:
        if self.outcome == "done":
            text = f"{self.target}: gave {human_size(self.freed)} of RAM back"
            return text + (f" ({self.detail})" if self.detail else "")
        if self.outcome == "small":
            return f"{self.target}: {human_size(self.freed)} in RAM, kept"
        if self.outcome == "kept":
            return f"{self.target}: {human_size(self.freed)} of RAM kept: {self.detail}"
        return f"{self.target}: RAM not given back yet: {self.detail}"


def pending_step(state: RunState, target: str) -> Step | None:
    for raw in state.actions.get(target, []):
        if raw["kind"] == "beneath":
            return Step.from_json(raw)
    return None


def _is_layer(mount: Mount | None, upper_dir: Path) -> bool:
    return is_layer_of(mount, str(upper_dir))


def shrink_target(
    layout: TargetLayout, state: RunState, store: StateStore, vanished: bool = False
) -> Shrink:
    """Give ``layout``'s upper layer back (its generation is the one mounted), or say why not.
    ``vanished``: the resync could not copy some files; they are not on disk, so the new
    layer would have to get them from the old one in the carry-over. Not this time."""
    if pending_step(state, str(layout.target)) is not None:
        return resume(layout, state, store)
    if vanished:
        why = "files vanished while the resync copied them; the next resync writes them first"
        return Shrink(layout.target, "deferred", 0, why)
    if layout.generation:
        # A switch interrupted after it was done leaves the layer before it: remove it.
        _remove_generation(dataclasses.replace(layout, generation=layout.generation - 1))
    used = disk_usage(layout.upper)
    if used < MIN_BYTES:
        return Shrink(layout.target, "small", used)
    held = holders([layout.target, layout.ram_copy])
    if held:
        shown = "; ".join(h.describe() for h in held[:3])
        return Shrink(layout.target, "deferred", 0, f"in use: {shown}")
    baseline, scope = index.load(layout.index_file)
    if scope != "upper":  # not an index of the upper layer: the next resync will save one
        return Shrink(layout.target, "small", used)
    nxt = dataclasses.replace(layout, generation=layout.generation + 1)
    _remove_generation(nxt)  # an attempt interrupted before it was recorded
    try:
        hot = _hot(layout, baseline)
        with _disk_dirs(layout) as (disk_fd, work_fd):
            work = Path(f"/proc/self/fd/{work_fd}")
            previous = work / layout.delta.name if layout.generation else None
            held_names, opaque = delta.names(baseline, previous)
            os.mkdir(nxt.delta.name, 0o700, dir_fd=work_fd)
            out_fd = os.open(nxt.delta.name, O_DIR, dir_fd=work_fd)
            try:
                delta.build(disk_fd, layout.backup, out_fd, held_names - hot, opaque, hot)
            finally:
                os.close(out_fd)
        nxt.upper.mkdir(mode=0o700)
        nxt.overlay_work.mkdir(mode=0o700)
        copied = _keep(layout, nxt, hot)
        # Copied after the resync's walk: whatever the old layer shows now that differs from
        # what the resync wrote may be in the copies and not on disk. The new sync point will
        # give those names the resync's entries, so that the next resync writes them.
        after = upper.upper_index(layout)
        stale = {r: baseline[r] for r in copied if r in baseline and after.get(r) != baseline[r]}
        index.save(_stale(nxt), stale, "upper")
        index.save(nxt.baseline, baseline, "upper")
    except (OSError, AsdError) as exc:
        # Nothing is mounted or recorded yet: the next layer is only files of asd's own.
        _remove_generation(nxt)
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        return Shrink(layout.target, "kept", used, f"could not build the next layer: {why}")
    try:
        made = mountapi.overlay(nxt.lowers, nxt.upper, nxt.overlay_work, OPTIONS)
    except OSError as exc:
        _remove_generation(nxt)
        return Shrink(layout.target, "kept", used, f"{exc.strerror}; {KERNEL}")
    with _disk_dirs(layout) as (_disk_fd, work_fd):
        own = upper.mounted_over(nxt.upper, Path(f"/proc/self/fd/{work_fd}") / nxt.delta.name)
    if not own:
        os.close(made)  # never attached: dropped
        _remove_generation(nxt)
        raise SafetyError(
            f"{layout.disk_work} was replaced while asd made the next RAM layer of "
            f"{layout.target}, which would have shown something else; it was dropped and the "
            "target keeps its RAM. Someone who can write to the target did this: look at it"
        )
    actions = state.actions[str(layout.target)]
    step = Step("beneath", str(layout.target), str(layout.target), str(nxt.upper))
    with mountapi.descriptor(made) as fd:
        _look_up(fd, copied)
        index.save(_start(nxt), upper.upper_index(nxt), "upper")  # what it is when first seen
        actions.insert(len(actions) - 1, step.to_json())
        store.save(state)
        try:
            with mountapi.descriptor(mountapi.clone(fd=fd)) as bind:
                mountapi.attach(bind, layout.target, beneath=True)
        except OSError as exc:
            failed: OSError | None = exc
        else:
            failed = None
    if failed is not None:
        actions.remove(step.to_json())
        store.save(state)
        _remove_generation(nxt)
        return Shrink(layout.target, "kept", used, f"{failed.strerror}; {KERNEL}")
    return resume(layout, state, store, used)


def _hot(layout: TargetLayout, baseline: Index) -> set[str]:
    """Files changed again since the last switch, that had changed before it too: a log, a
    database, an RRD file, changed in place all the time. They stay in RAM, in the new upper
    layer, so that the disk copy's file keeps one name and the next resync can patch it in
    place (`asd.patch`) rather than write it whole every time. So do files the resync smudged
    (`asd.mapped`): a program may have written them through a mapping after the resync copied
    them, which no time shows, so the old layer may hold what the disk does not."""
    smudged = {
        rel
        for rel, entry in baseline.items()
        if rel and entry[0] == stat.S_IFREG and entry[7] == mapped.SMUDGED
    }
    if not layout.generation:
        return smudged
    start, _scope = index.load(_start(layout))
    return smudged | {
        rel
        for rel, entry in baseline.items()
        if rel
        and entry[0] == stat.S_IFREG
        and entry != start.get(rel)
        and (rel in start or os.path.lexists(layout.delta / rel))
    }


def _keep(layout: TargetLayout, nxt: TargetLayout, hot: set[str]) -> set[str]:
    """The new upper layer: its root, and the ``hot`` files with their directories, copied
    from the old one (which shows them as the merged view does) without overlayfs's own
    attributes, which belong to the old layer's origins. Returns the names it copied."""
    dirs = {""}
    for rel in sorted(hot):
        parts = rel.split("/")
        for i in range(1, len(parts)):
            sub = "/".join(parts[:i])
            if sub not in dirs:
                os.mkdir(nxt.upper / sub, 0o700)
                dirs.add(sub)
        run(coreutils.copy_tree(layout.upper / rel, nxt.upper / rel))
        for name in os.listxattr(nxt.upper / rel, follow_symlinks=False):
            if name.startswith("trusted.overlay."):
                os.removexattr(nxt.upper / rel, name, follow_symlinks=False)
    for sub in sorted(dirs, reverse=True):
        set_dir_metadata(nxt.upper / sub if sub else nxt.upper, _own_metadata(layout.upper / sub))
    return dirs | hot


def _look_up(mount_fd: int, names: set[str]) -> None:
    """Look up the names asd copied into the new upper layer through the new overlay, before
    anybody else does: overlayfs marks upper directories with attributes of its own on their
    first lookup (origin, impure), which moves their ctime; done now, that is not taken for
    a program's change at the next resync."""
    base = Path(f"/proc/self/fd/{mount_fd}")
    for rel in sorted(names):
        path = base / rel if rel else base
        with contextlib.suppress(OSError):
            if stat.S_ISDIR(os.lstat(path).st_mode):
                os.listdir(path)


def _stale(layout: TargetLayout) -> Path:
    return layout.overlay_dir / f"stale.{layout.generation}"


def _own_metadata(path: Path) -> dict[str, object]:
    """A directory's metadata without overlayfs's own attributes (its origin, for one)."""
    meta = dir_metadata(path)
    xattrs: dict[str, str] = meta["xattrs"]  # type: ignore[assignment]
    meta["xattrs"] = {k: v for k, v in xattrs.items() if not k.startswith("trusted.overlay.")}
    return meta


def _start(layout: TargetLayout) -> Path:
    return layout.overlay_dir / f"start.{layout.generation}"


def resume(layout: TargetLayout, state: RunState, store: StateStore, used: int = 0) -> Shrink:
    """Finish a recorded switch to the next generation; each part is skipped once done."""
    target = str(layout.target)
    step = pending_step(state, target)
    if step is None:
        return Shrink(layout.target, "small", 0)
    nxt = dataclasses.replace(layout, generation=layout.generation + 1)
    table = MountTable.read()
    if not any(_is_layer(m, nxt.upper) for m in table.at(target)):
        # Recorded, then interrupted before it was attached: nothing to finish.
        state.actions[target].remove(step.to_json())
        store.save(state)
        _remove_generation(nxt)
        return Shrink(layout.target, "deferred", 0, "an earlier attempt was interrupted")
    used = used or disk_usage(layout.upper)
    if not _is_layer(table.top_at(target), nxt.upper) and not _unmount_when_free(layout.target):
        held = holders([layout.target])
        shown = "; ".join(h.describe() for h in held[:3]) or "a file was opened meanwhile"
        return Shrink(layout.target, "pending", 0, f"in use: {shown}")
    conflicts, saved = carry.carry_over(layout, nxt, _start(nxt))
    top = MountTable.read().top_at(layout.ram_copy)
    if not _is_layer(top, nxt.upper):
        if not mountapi.unmount(layout.ram_copy):
            mountapi.take_off(layout.ram_copy, lazy=True)  # only asd's own path: root-only
        with mountapi.descriptor(mountapi.clone(layout.target)) as fd:
            mountapi.attach(fd, layout.ram_copy)
    # The new sync point: the new layer as first seen, but names it copied from the old one
    # after they were written again as the resync wrote them to disk (see `shrink_target`).
    start, _scope = index.load(_start(nxt))
    stale, _scope = index.load(_stale(nxt))
    point = {**start, **stale}
    index.save(layout.index_file, point, "upper")
    write_json_atomic(layout.generation_file, nxt.generation)
    state.actions[target].remove(step.to_json())
    store.save(state)
    _remove_generation(layout)
    detail = ""
    if conflicts:
        names = f"{len(conflicts)} name" + ("s" if len(conflicts) > 1 else "")
        detail = f"{names} written during the switch and again after it: the later version kept"
        detail += f", the earlier one saved in {layout.target / saved}" if saved else ""
        for rel in conflicts:
            log.warning("%s: written during the switch and again after it; kept the later", rel)
    return Shrink(layout.target, "done", used, detail)


def _unmount_when_free(path: Path) -> bool:
    if mountapi.unmount(path):
        return True
    for delay in WAIT:
        time.sleep(delay)
        if mountapi.unmount(path):
            return True
    return False


@contextlib.contextmanager
def _disk_dirs(layout: TargetLayout) -> Iterator[tuple[int, int]]:
    """Descriptors of the disk copy and of asd's journal directory in it (refused unless it
    is root's own): its owner can rename anything inside, ``.asd-work`` included."""
    disk_fd = os.open(layout.backup, O_DIR)  # a mount point: its name cannot be moved
    try:
        work = Path(f"/proc/self/fd/{disk_fd}") / layout.disk_work.name
        work_fd = open_private_dir(work, shown=layout.disk_work)
        try:
            yield disk_fd, work_fd
        finally:
            os.close(work_fd)
    finally:
        os.close(disk_fd)


def _remove_generation(layout: TargetLayout) -> None:
    """Remove a generation's RAM layer, work directory, delta and indexes."""
    for path in (layout.upper, layout.overlay_work):
        remove_unmounted(path)
    if layout.generation:
        with contextlib.suppress(FileNotFoundError), _disk_dirs(layout) as (_disk, work_fd):
            remove_at(work_fd, layout.delta.name)
    for path in (layout.baseline, _start(layout), _stale(layout), carry.plan_file(layout)):
        path.unlink(missing_ok=True)
