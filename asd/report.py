"""What asd will do or is doing, per target (`asd parse`), as text or one JSON document."""

from __future__ import annotations

import grp
import json
import os
import pwd
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from asd import snapshots, tracker, tree, upper
from asd.config import Config
from asd.disks import human_size
from asd.errors import CommandError
from asd.layout import WORK_NAME, Instance
from asd.mounts import MountTable
from asd.run import run
from asd.state import RunState


def _name(lookup: Any, ident: int) -> str:
    try:
        return str(lookup(ident)[0])
    except KeyError:
        return str(ident)


@dataclass
class TargetReport:
    path: str
    backup: str
    ram_copy: str
    in_ram: bool
    owner: str = ""
    group: str = ""
    mode: str = ""
    size_bytes: int | None = None
    overlay_upper_bytes: int | None = None
    ram_given_back: str | None = None
    snapshots: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    device: dict[str, Any] | None = None
    device_summary: str = ""
    judgement: str = ""
    waits_for: str | None = None
    kept_lower: str | None = None  # stopped: overlay mode's lower tree, kept for the next sync


def target_report(
    instance: Instance, config: Config, target: Path, state: RunState | None, table: MountTable
) -> TargetReport:
    layout = upper.current(instance.target(target))
    in_ram = state is not None and str(target) in state.actions and table.is_mountpoint(target)
    rep = TargetReport(str(target), str(layout.backup), str(layout.ram_copy), in_ram)
    try:
        st = os.stat(target)
    except OSError as exc:
        rep.warnings.append(f"{target} cannot be read: {exc.strerror}")
        return rep
    rep.owner = _name(pwd.getpwuid, st.st_uid)
    rep.group = _name(grp.getgrgid, st.st_gid)
    rep.mode = oct(st.st_mode & 0o7777)
    try:
        rep.size_bytes = tree.disk_usage(target, frozenset({WORK_NAME}))
        if in_ram and config.use_overlayfs:
            rep.overlay_upper_bytes = tree.disk_usage(layout.upper)
    except OSError as exc:
        rep.warnings.append(f"cannot measure {target}: {exc.strerror}")
    if in_ram and state is not None and str(target) in state.ram:
        rep.ram_given_back = state.ram[str(target)]
    rep.snapshots = [s.to_json() for s in snapshots.list_snapshots(target)]
    kept = target / WORK_NAME / "lower"
    if not in_ram and os.path.isdir(kept) and not os.path.islink(kept):
        rep.kept_lower = str(kept)
    return rep


def systemd_status() -> dict[str, str] | None:
    if not os.path.isdir("/run/systemd/system"):
        return None
    out: dict[str, str] = {}
    for unit in ("asd.service", "asd-resync.timer"):
        try:
            res = run(["systemctl", "is-active", unit], ok_codes=range(0, 256))
        except CommandError:
            return None
        out[unit] = res.stdout.strip() or "unknown"
    return out


def build(
    instance: Instance, config: Config, state: RunState | None, devices: bool = True
) -> dict[str, Any]:
    table = MountTable.read()
    targets = [target_report(instance, config, t, state, table) for t in config.whattosync]
    vol: dict[str, Any] = {"path": str(config.volatile)}
    try:
        held = table.holding(config.volatile)
        vfs = os.statvfs(config.volatile)
        vol.update(fstype=held.fstype, free_bytes=vfs.f_bavail * vfs.f_frsize, ram=held.is_ram)
    except (OSError, LookupError) as exc:
        vol["error"] = str(exc)
    if devices:
        _add_devices(targets, vol, table)
    return {
        "version": _version(),
        "config": str(config.path),
        "instance": instance.name,
        "running": state is not None,
        "status": state.status if state else "stopped",
        "overlayfs": config.use_overlayfs,
        "use_backups": config.use_backups,
        "backup_limit": config.backup_limit,
        "volatile": vol,
        "targets": [t.__dict__ for t in targets],
        "systemd": systemd_status(),
        "change_tracker": (
            tracker.status(instance) if state is not None and not config.use_overlayfs else None
        ),
    }


def _add_devices(targets: list[TargetReport], vol: dict[str, Any], table: MountTable) -> None:
    from asd import devices, fstab

    entries = fstab.read_fstab()
    for t in targets:
        # While a target is in RAM its path shows the RAM copy; the disk copy is beside it.
        where = Path(t.backup) if t.in_ram else Path(t.path)
        waits = fstab.mount_for(t.path, entries, table)
        if waits is not None:
            node = fstab.resolve_source(waits.source, lookup=devices.find_by_tag)
            dev = (
                devices.describe_node(node, table) if node else devices.describe_path(where, table)
            )
            t.waits_for = waits.describe()
            t.warnings.append(
                f"{t.path} lives on {waits.describe()}, which is not mounted yet; asd.service "
                "waits for it at boot"
            )
        else:
            dev = devices.describe_path(where, table)
        t.device = dev.to_json()
        t.device_summary = dev.summary()
        t.judgement, is_warning = devices.judgement(dev)
        if is_warning:
            t.warnings.append(t.judgement)
    vdev = devices.describe_path(Path(vol["path"]), table)
    vol["device"] = vdev.to_json()
    vol["judgement"], is_warning = devices.judgement(vdev, is_volatile=True)
    if is_warning:
        vol.setdefault("warnings", []).append(vol["judgement"])


def _version() -> str:
    from asd import __version__

    return __version__


def render_json(doc: dict[str, Any]) -> str:
    return json.dumps(doc, indent=2, sort_keys=False)


def render_text(doc: dict[str, Any]) -> str:
    lines = [
        f"anything-sync-daemon v{doc['version']} — config {doc['config']}",
        f"  status: {doc['status']}"
        + (f" ({'overlayfs' if doc['overlayfs'] else 'full copy'} mode)"),
    ]
    if doc["systemd"]:
        lines.append("  systemd: " + ", ".join(f"{u} {s}" for u, s in doc["systemd"].items()))
    vol = doc["volatile"]
    free = human_size(vol["free_bytes"]) + " free" if "free_bytes" in vol else vol.get("error", "")
    lines.append(f"  VOLATILE: {vol['path']} ({vol.get('fstype', '?')}, {free})")
    if vol.get("judgement"):
        lines.append(f"            {vol['judgement']}")
    if doc.get("change_tracker"):
        lines.append(f"  change tracker: {doc['change_tracker']}")
    backups = f"yes, keep {doc['backup_limit']}" if doc["use_backups"] else "no"
    lines.append(f"  crash-recovery snapshots: {backups}")
    if not doc["targets"]:
        lines.append("  no targets: set WHATTOSYNC in the config")
    for t in doc["targets"]:
        lines += ["", f"  target:     {t['path']}"]
        lines.append(f"  owner:      {t['owner']}:{t['group']} {t['mode']}")
        lines.append(f"  status:     {'in RAM' if t['in_ram'] else 'on disk'}")
        lines.append(f"  disk copy:  {t['backup']}")
        lines.append(f"  RAM copy:   {t['ram_copy']}")
        if t["size_bytes"] is not None:
            lines.append(f"  size:       {human_size(t['size_bytes'])}")
        if t["overlay_upper_bytes"] is not None:
            lines.append(f"  overlay upper size: {human_size(t['overlay_upper_bytes'])}")
        if t.get("ram_given_back"):
            lines.append(f"  last resync: {t['ram_given_back']}")
        if t["waits_for"]:
            lines.append(f"  waits for:  {t['waits_for']}")
        if t["device_summary"]:
            lines.append(f"  device:     {t['device_summary']}")
            lines.append(f"              {t['judgement']}")
        for s in t["snapshots"]:
            lines.append(f"  snapshot:   {s['path']} ({human_size(s['size_bytes'])})")
        if t.get("kept_lower"):
            lines.append(
                f"  kept:       {t['kept_lower']} (overlay mode's lower tree, hard links reused "
                "by the next sync; 'asd clean' deletes it)"
            )
        for w in t["warnings"]:
            if w != t["judgement"]:
                lines.append(f"  warning:    {w}")
    return "\n".join(lines)
