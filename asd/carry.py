"""What programs wrote to the old upper layer during the switch, carried into the new one.

Between the resync's walk and the moment the old layer is out of sight (`asd.shrink`),
programs keep writing to it. Once nobody sees it, those writes are copied into the new layer:

- names deleted in the old layer are deleted in the new one, names written are copied (by
  rsync, through the target, so the new layer records them as changes for the next resync);
- a name the new layer changed since it became visible is newer and kept, and so is
  everything below a name it made into something else than a directory (nothing is written
  through a symlink there); the old layer's version of such a name is saved
  (`asd.conflict`);
- what to do is worked out once, from the old layer's index at the walk (the baseline), its
  index now and the new layer's when it was first seen, and saved beside the layers
  (`plan_file`) before anything is done: an asd killed half way through finishes at its next
  run without taking its own copies for programs' writes, and saves an earlier version once.

- `carry_over(layout, nxt, start_file) -> (names written twice, directory they were saved in)`
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

from asd import conflict, index, rsync, upper
from asd.dirfd import parent_at, rel_parts, remove_at
from asd.dirmeta import O_DIR, dir_metadata, set_dir_metadata
from asd.errors import CommandError
from asd.layout import TargetLayout
from asd.run import run
from asd.state import write_json_atomic
from asd.tree import diff, is_dir


def carry_over(
    layout: TargetLayout, nxt: TargetLayout, start_file: Path
) -> tuple[list[str], str | None]:
    """Copy into the new overlay what was written to the old one after the resync's walk.
    Returns the names the new one changed too (its version is kept) and the directory at the
    top of the target where the old one's versions of them were saved (`asd.conflict`).

    What to do is worked out once and saved (`_plan`), so that an asd killed half way
    through does not, the next time, take its own copies for programs' writes."""
    path = plan_file(nxt)
    plan = _load_plan(path) or _make_plan(layout, nxt, start_file)
    if plan["done"]:
        return plan["conflicts"], plan["saved"]
    write_json_atomic(path, plan)
    # A name the new layer changed since it was first seen is left alone: a program's write,
    # or, after an interrupted attempt, this carry-over's own (then it is done already).
    start, _scope = index.load(start_file)
    seen = upper.upper_index(nxt)

    def untouched(rel: str) -> bool:
        return seen.get(rel) == start.get(rel)

    fd = os.open(layout.target, O_DIR)
    try:
        for rel in plan["deleted"]:
            if untouched(rel):
                with contextlib.suppress(FileNotFoundError):
                    parts = rel_parts(rel)
                    with parent_at(fd, parts, layout.target) as pfd:
                        remove_at(pfd, parts[-1])
    finally:
        os.close(fd)
    listed = [r for r in plan["listed"] if untouched(r)]
    if listed:
        list_file = layout.index_file.with_suffix(".carry")
        list_file.write_bytes(b"".join(os.fsencode(r) + b"\0" for r in listed))
        try:
            # Nothing can vanish from the old layer now that nobody sees it: whatever rsync
            # could not copy is an error, and the switch stays pending with that layer kept.
            run(rsync.copy_listed(layout.ram_copy, layout.target, list_file))
        except CommandError as exc:
            raise exc.reworded(
                f"{layout.target}: could not copy what was written during the switch to the "
                "next RAM layer; the switch stays pending, the previous layer is kept, and "
                "the next resync tries again"
            ) from None
        finally:
            list_file.unlink(missing_ok=True)
    if plan["root"] is not None and untouched(""):
        set_dir_metadata(layout.target, plan["root"])
    if plan["earlier"] and plan["saved"] is None:
        if plan["saving"]:
            conflict.discard(layout, plan["saving"])  # an attempt killed while it copied

        def saving(name: str) -> None:
            write_json_atomic(path, {**plan, "saving": name})

        plan["saved"] = conflict.save_earlier(layout, plan["earlier"], saving)
    plan["done"] = True
    write_json_atomic(path, plan)
    return plan["conflicts"], plan["saved"]


def _make_plan(layout: TargetLayout, nxt: TargetLayout, start_file: Path) -> dict[str, Any]:
    """What the carry-over does: names to delete and to copy, the root's metadata, and the
    names written twice, whose old-layer versions are saved."""
    plan: dict[str, Any] = {
        "conflicts": [],
        "deleted": [],
        "listed": [],
        "root": None,
        "earlier": [],
        "saving": None,
        "saved": None,
        "done": False,
    }
    baseline, _scope = index.load(nxt.baseline)
    now = upper.upper_index(layout)
    changes = diff(baseline, now)
    if changes.empty:
        return {**plan, "done": True}
    changes = upper.expand(layout, baseline, now, changes)
    # Changed in the new layer since it became visible: newer than the old layer's version.
    start, _scope = index.load(start_file)
    seen = upper.upper_index(nxt)
    newer = {rel for rel, entry in seen.items() if entry != start.get(rel)}
    # A name the new layer made into something else than a directory (a symlink where the
    # old layer had a directory, say) hides the old layer's whole subtree there.
    blocked = {rel for rel in newer if rel and not is_dir(seen[rel])}
    conflicts = [r for r in (*changes.deleted, *changes.files) if r in newer or _inside(r, blocked)]
    conflicts += [d for d in changes.dirs if d and _inside(d, blocked)]
    # A directory the new layer changed keeps its own metadata; what is below it still comes.
    skip = set(conflicts) | {d for d in changes.dirs if d in newer}
    deleted = set(changes.deleted)
    earlier = {_top(rel, blocked) for rel in conflicts if rel not in deleted}
    return {
        **plan,
        "conflicts": conflicts,
        "deleted": [r for r in changes.deleted if r not in skip],
        "listed": [r for r in (*changes.dirs, *changes.files) if r and r not in skip],
        # rsync is not given the root, and its times move when names below it do.
        "root": dir_metadata(layout.ram_copy) if seen.get("") == start.get("") else None,
        "earlier": sorted(n for n in earlier if not _inside(n.rpartition("/")[0], earlier)),
    }


def plan_file(layout: TargetLayout) -> Path:
    """Where the carry-over into ``layout``'s generation keeps its plan."""
    return layout.overlay_dir / f"carry.{layout.generation}"


def _load_plan(path: Path) -> dict[str, Any] | None:
    try:
        plan: dict[str, Any] = json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    return plan


def _top(rel: str, blocked: set[str]) -> str:
    """The highest name on the way to ``rel`` that the new layer made a non-directory, or
    ``rel`` itself: what of the old layer's version the new layer hides."""
    parts = rel.split("/")
    for i in range(1, len(parts)):
        if "/".join(parts[:i]) in blocked:
            return "/".join(parts[:i])
    return rel


def _inside(rel: str, names: set[str]) -> bool:
    """Whether ``rel`` is one of ``names`` or below one of them."""
    while rel:
        if rel in names:
            return True
        rel = rel.rpartition("/")[0]
    return False
