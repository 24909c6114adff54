"""Which devices hold a path: /proc/self/mountinfo, then pyudev down to the whole disks.

This is the only module that imports pyudev. Public API:

- `describe_path(path, mounts=None, context=None) -> PathDevice` — the filesystem holding
  ``path`` and the disks below it. Never raises for a device it cannot read (gone, no udev
  database, permission): the answer is then kind ``unknown`` with a ``reason``.
- `describe_node(node, context=None) -> PathDevice` — the same for a block device node
  (a swap partition, the resolved source of an fstab line).
- `judgement(device, is_volatile=False) -> (sentence, is_warning)` and the `PathDevice` and
  `Disk` dataclasses, defined in the pure `asd.disks` and re-exported here.
- `sync_warnings(targets, volatile, ram_budget_bytes) -> list[str]` — the warnings at sync.
- `find_by_tag(tag, value, context=None) -> str | None` — the node udev knows as ``UUID=``,
  ``LABEL=``, ``PARTUUID=`` or ``PARTLABEL=`` (for `asd.fstab.resolve_source`).
- ``python -m asd.devices PATH...`` prints the device of each path as JSON.

The walk itself (partition → disk, dm/md → slaves, loop → backing file, btrfs members,
bind, overlay) is the pure `asd.stack`; `UdevSource` here is its `BlockSource` over pyudev
(udev properties when a udev database exists) and sysfs (always).
"""

from __future__ import annotations

import functools
import json
import os
import stat
import sys
from collections.abc import Sequence
from pathlib import Path

import pyudev

from asd.disks import (
    FLASH_KINDS,
    BlockRecord,
    Disk,
    PathDevice,
    human_size,
    judgement,
    kind_label,
    parse_swaps,
)
from asd.mounts import MountTable
from asd.stack import BlockSource, DeviceUnreadable, resolve_block, resolve_path

__all__ = [
    "BlockSource",
    "DeviceUnreadable",
    "Disk",
    "PathDevice",
    "UdevSource",
    "describe_node",
    "describe_path",
    "find_by_tag",
    "judgement",
    "resolve_path",
    "sync_warnings",
]

# The sysfs attributes the classification reads, relative to the block device.
ATTRIBUTES = (
    "size",
    "removable",
    "ro",
    "queue/rotational",
    "device/model",
    "device/vendor",
    "device/type",
    "device/name",
    "loop/backing_file",
    "dm/name",
    "dm/uuid",
    "md/level",
)
_TAG_PROPERTIES = {
    "UUID": ("ID_FS_UUID",),
    "LABEL": ("ID_FS_LABEL",),
    "PARTUUID": ("ID_PART_ENTRY_UUID",),
    "PARTLABEL": ("ID_PART_ENTRY_NAME", "PARTNAME"),
}


class UdevSource:
    """Records from pyudev: udev properties when a udev database exists, sysfs always."""

    def __init__(self, context: pyudev.Context | None = None) -> None:
        self.context = context if context is not None else pyudev.Context()
        self.sys_path = str(self.context.sys_path)

    def _record(self, device: pyudev.Device) -> BlockRecord:
        attributes = {}
        for name in ATTRIBUTES:
            value = device.attributes.get(name)
            if value is not None:
                attributes[name] = bytes(value).decode("utf-8", "replace").strip()
        sys_path = str(device.sys_path)
        try:
            slaves = tuple(sorted(os.listdir(os.path.join(sys_path, "slaves"))))
        except OSError:
            slaves = ()
        parent = None
        if device.device_type == "partition":
            disk = device.find_parent("block", "disk")
            parent = None if disk is None else str(disk.sys_name)
        return BlockRecord(
            name=str(device.sys_name),
            sys_path=sys_path,
            devtype=str(device.device_type or "disk"),
            node=str(device.device_node or f"/dev/{device.sys_name}"),
            properties={str(k): str(v) for k, v in device.properties.items()},
            attributes=attributes,
            slaves=slaves,
            parent=parent,
        )

    def by_devnum(self, major_minor: str) -> BlockRecord:
        major, _, minor = major_minor.partition(":")
        try:
            number = os.makedev(int(major), int(minor))
            return self._record(pyudev.Devices.from_device_number(self.context, "block", number))
        except (pyudev.DeviceNotFoundError, ValueError, OSError) as exc:
            raise DeviceUnreadable(f"block device {major_minor} cannot be read: {exc}") from None

    def by_name(self, name: str) -> BlockRecord:
        try:
            return self._record(pyudev.Devices.from_name(self.context, "block", name))
        except (pyudev.DeviceNotFoundError, OSError) as exc:
            raise DeviceUnreadable(f"block device {name} cannot be read: {exc}") from None

    def by_node(self, node: str) -> BlockRecord:
        try:
            st = os.stat(node)
        except OSError:
            return self.by_name(os.path.basename(node))  # a container without that node
        if not stat.S_ISBLK(st.st_mode):
            raise DeviceUnreadable(f"{node} is not a block device")
        return self.by_devnum(f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}")

    def btrfs_members(self, name: str) -> tuple[str, ...]:
        root = os.path.join(self.sys_path, "fs", "btrfs")
        try:
            for fsid in sorted(os.listdir(root)):
                devices = os.path.join(root, fsid, "devices")
                if os.path.isdir(devices) and name in os.listdir(devices):
                    return tuple(sorted(os.listdir(devices)))
        except OSError:
            return ()
        return ()


def _unknown(reason: str) -> PathDevice:
    return PathDevice("unknown", None, (), (), None, reason)


def _source(context: pyudev.Context | None) -> BlockSource | str:
    return _default_source() if context is None else UdevSource(context)


@functools.cache
def _default_source() -> BlockSource | str:
    """One for the process: each pyudev.Context loads libudev again (`asd parse` asks for ten
    targets and VOLATILE)."""
    try:
        return UdevSource()
    except ImportError as exc:  # pyudev raises it when libudev cannot be loaded
        return f"libudev is not available: {exc}"


def describe_path(
    path: Path | str,
    mounts: MountTable | None = None,
    context: pyudev.Context | None = None,
    *,
    source: BlockSource | None = None,
) -> PathDevice:
    """What holds ``path``; kind ``unknown`` with a reason when something cannot be read."""
    try:
        table = mounts if mounts is not None else MountTable.read()
    except OSError as exc:
        return _unknown(f"the mount table cannot be read: {exc}")
    blocks = source if source is not None else _source(context)
    if isinstance(blocks, str):
        return _unknown(blocks)
    return resolve_path(path, table, blocks)


def describe_node(
    node: str,
    mounts: MountTable | None = None,
    context: pyudev.Context | None = None,
    *,
    source: BlockSource | None = None,
) -> PathDevice:
    """What a block device node (``/dev/sda2``, ``/dev/mapper/home``) sits on."""
    blocks = source if source is not None else _source(context)
    if isinstance(blocks, str):
        return _unknown(blocks)
    try:
        table = mounts if mounts is not None else MountTable.read()
        record = blocks.by_node(node)
    except (OSError, DeviceUnreadable) as exc:
        return _unknown(str(exc))
    return resolve_block(record, table, blocks)


def find_by_tag(tag: str, value: str, context: pyudev.Context | None = None) -> str | None:
    """The device node whose udev properties carry ``TAG=value`` (needs a udev database)."""
    keys = _TAG_PROPERTIES.get(tag.upper())
    if keys is None:
        return None
    try:
        ctx = context if context is not None else pyudev.Context()
        for device in ctx.list_devices(subsystem="block"):
            props = device.properties
            if any(props.get(key) == value for key in keys) and device.device_node:
                return str(device.device_node)
    except (ImportError, pyudev.DeviceNotFoundError, OSError):
        return None
    return None


def _read_swaps() -> str:
    try:
        with open("/proc/swaps", encoding="utf-8") as fh:
            return fh.read()
    except OSError:
        return ""


def sync_warnings(
    targets: Sequence[tuple[Path, int]],
    volatile: Path,
    ram_budget_bytes: int,
    *,
    mounts: MountTable | None = None,
    context: pyudev.Context | None = None,
    source: BlockSource | None = None,
    swaps_text: str | None = None,
) -> list[str]:
    """The warnings to print at sync; none of them stops it.

    ``targets`` are (path, size in bytes). Warns for a target already in RAM, on a network
    filesystem, or bigger than half of ``ram_budget_bytes``, and for VOLATILE on a tmpfs
    (which can be swapped out) while swap sits on the flash device holding a target. VOLATILE
    not in RAM is left to the core, which refuses it.
    """
    table = mounts if mounts is not None else MountTable.read()

    def look(path: Path) -> PathDevice:
        return describe_path(path, table, context, source=source)

    warnings = []
    flash_disks: dict[str, list[Path]] = {}
    for path, size in targets:
        device = look(path)
        sentence, is_warning = judgement(device)
        if is_warning:
            warnings.append(f"{path}: {sentence}")
        if size > ram_budget_bytes // 2:
            warnings.append(
                f"{path}: it holds {human_size(size)}, more than half of the RAM budget "
                f"({human_size(ram_budget_bytes)}); it leaves little room to grow, consider "
                "a smaller directory or USE_OVERLAYFS."
            )
        for disk in device.disks:
            if disk.kind in FLASH_KINDS:
                flash_disks.setdefault(disk.node, []).append(path)
    vol = look(volatile)
    if vol.fstype != "tmpfs" or not flash_disks:
        return warnings
    swaps = parse_swaps(swaps_text if swaps_text is not None else _read_swaps())
    for filename, kind in swaps:
        if kind == "partition":
            swap = describe_node(filename, table, context, source=source)
        else:
            swap = look(Path(filename))
        for disk in swap.disks:
            if disk.node in flash_disks:
                held = ", ".join(str(p) for p in flash_disks[disk.node])
                warnings.append(
                    f"VOLATILE {volatile} is a tmpfs, which the kernel may swap out, and swap "
                    f"{filename} is on {kind_label(disk.kind)} {disk.name}, the device that "
                    f"holds {held}: under memory pressure the RAM copies are written to the "
                    "flash asd should spare; move swap to zram or another disk."
                )
    return warnings


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m asd.devices PATH...``: the device of each path, as JSON."""
    paths = list(sys.argv[1:] if argv is None else argv)
    if not paths:
        print("usage: python -m asd.devices PATH...", file=sys.stderr)
        return 2
    mounts = MountTable.read()
    print(json.dumps({p: describe_path(Path(p), mounts).to_json() for p in paths}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
