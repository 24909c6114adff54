"""The storage stack under a path: from the filesystem holding it down to the whole disks.

Pure: every device lookup goes through a `BlockSource` (in production `asd.devices.UdevSource`
over pyudev and sysfs, in the unit tests captured records), every mount lookup through a
`MountTable`. `asd.devices` is the front door; this is the walk:

partition → its disk; device-mapper (LUKS, LVM) and md RAID → their slaves, recursively;
loop → its backing file → the filesystem and devices holding that file; btrfs → every member
device; a bind mount → its source filesystem (the same device number, ``bind of`` in `via`);
overlay → its upper and lower layers; tmpfs, ramfs, zram → RAM; nfs, cifs, sshfs and other
network filesystems → network; anything unreadable → a leaf of kind ``unknown`` with a reason.

- `resolve_path(path, mounts, source) -> PathDevice`
- `resolve_block(record, mounts, source) -> PathDevice`
- `overlay_layers(mount) -> (lower directories, upper directory)`
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from asd.disks import (
    BlockRecord,
    Disk,
    PathDevice,
    disk_from_record,
    overall_kind,
    overall_rotational,
)
from asd.mounts import (
    NETWORK_FSTYPES,
    PSEUDO_FSTYPES,
    RAM_FSTYPES,
    Mount,
    MountTable,
    overlay_layers,
)

MAX_DEPTH = 12  # loop on a file on a loop on ...; real stacks are 3 or 4 deep


class DeviceUnreadable(Exception):
    """A device could not be found or read; the message says which and why."""


class BlockSource(Protocol):
    """Where the walk gets its records; every method raises `DeviceUnreadable`."""

    def by_devnum(self, major_minor: str) -> BlockRecord: ...
    def by_name(self, name: str) -> BlockRecord: ...
    def by_node(self, node: str) -> BlockRecord: ...
    def btrfs_members(self, name: str) -> tuple[str, ...]: ...


def _dm_label(record: BlockRecord) -> str:
    attrs = record.attributes
    if "dm/name" in attrs:
        uuid = attrs.get("dm/uuid", "")
        kinds = (("CRYPT-LUKS", "LUKS"), ("CRYPT-", "dm-crypt"), ("LVM-", "LVM"))
        kind = next((k for prefix, k in kinds if uuid.startswith(prefix)), "device-mapper")
        kind = "multipath" if uuid.startswith("mpath-") else kind
        return f"{record.name} ({kind} {attrs['dm/name']})"
    if attrs.get("md/level"):
        return f"{record.name} ({attrs['md/level']})"
    return record.name


def _is_network(mount: Mount) -> bool:
    if mount.fstype in NETWORK_FSTYPES or mount.fstype.split(".")[0] in NETWORK_FSTYPES:
        return True
    # FUSE network mounts (sshfs, rclone, s3fs...) name a remote as their source.
    return mount.fstype.startswith("fuse") and bool(
        re.match(r"[\w.@-]+:", mount.source) or mount.source.startswith("//")
    )


class _Walk:
    """One resolution: collects the via chain, the disks and the leaves' kinds."""

    def __init__(
        self,
        mounts: MountTable,
        source: BlockSource,
        realpath: Callable[[str], str] = os.path.realpath,
        depth: int = 0,
        chain: frozenset[int] = frozenset(),
    ) -> None:
        self.mounts, self.source, self.realpath, self.depth = mounts, source, realpath, depth
        # Mounts already on the way down: an overlay layer whose directory is not visible
        # here (a container's own root, /var/lib/docker/... outside it) resolves back to the
        # overlay itself, and following it again would repeat the walk at every level.
        self.chain = chain
        self.via: list[str] = []
        self.disks: list[Disk] = []
        self.leaves: list[tuple[str, bool | None]] = []
        self.reasons: list[str] = []

    def unknown(self, reason: str) -> None:
        self.leaves.append(("unknown", None))
        self.reasons.append(reason)

    def path(self, path: str) -> Mount | None:
        real = self.realpath(path)
        try:
            mount = self.mounts.holding(real)
        except LookupError:
            self.unknown(f"no mount holds {real}")
            return None
        if mount.mount_id in self.chain:
            self.unknown(f"{path} leads back to {mount.mountpoint}, which it is a layer of")
            return None
        self.chain = self.chain | {mount.mount_id}
        label = f"{mount.fstype} {mount.mountpoint}"
        subvol = next((o[7:] for o in mount.super_options if o.startswith("subvol=")), "/")
        if mount.root not in ("/", subvol):
            label += f" (bind of {mount.root})"
        self.via.append(label)
        self.filesystem(mount)
        return mount

    def filesystem(self, mount: Mount) -> None:
        if self.depth >= MAX_DEPTH:
            self.unknown(f"devices under {mount.mountpoint} nest deeper than {MAX_DEPTH}")
        elif mount.fstype in RAM_FSTYPES:
            self.leaves.append(("ram", False))
        elif _is_network(mount):
            self.leaves.append(("network", None))
        elif mount.fstype == "overlay":
            self.overlay(mount)
        elif mount.fstype.startswith("fuse") and mount.source.startswith("/"):
            # gocryptfs, bindfs, mergerfs...: the data lives in the source directories.
            for directory in mount.source.split(":"):
                self.via.append(f"source {directory}")
                self.nested(directory)
        elif mount.fstype in PSEUDO_FSTYPES:
            self.unknown(f"{mount.fstype} is a kernel pseudo filesystem, not storage")
        else:
            self.block_filesystem(mount)

    def block_filesystem(self, mount: Mount) -> None:
        anonymous = mount.major_minor.startswith("0:")  # btrfs, FUSE, zfs, ...
        try:
            if not anonymous:
                first = self.source.by_devnum(mount.major_minor)
            elif mount.source.startswith("/dev/"):
                first = self.source.by_node(mount.source)
            else:
                self.unknown(f"{mount.fstype} {mount.source!r} shows no block device to follow")
                return
            members = self.source.btrfs_members(first.name) if mount.fstype == "btrfs" else ()
        except DeviceUnreadable as exc:
            self.unknown(str(exc))
            return
        if not members:
            self.block(first)
        for name in members:
            self.block_named(name)

    def block_named(self, name: str) -> None:
        try:
            record = self.source.by_name(name)
        except DeviceUnreadable as exc:
            self.unknown(str(exc))
            return
        self.block(record)

    def block(self, record: BlockRecord) -> None:
        if record.devtype == "partition":
            self.via.append(record.name)
            if record.parent is None:
                self.unknown(f"the disk holding partition {record.name} is not known")
            else:
                self.block_named(record.parent)
        elif re.fullmatch(r"loop\d+", record.name):
            self.loop(record)
        elif record.slaves:
            self.via.append(_dm_label(record))
            for slave in record.slaves:
                self.block_named(slave)
        else:
            disk = disk_from_record(record)
            self.via.append(record.name)
            self.disks.append(disk)
            self.leaves.append((disk.kind, disk.rotational))

    def loop(self, record: BlockRecord) -> None:
        backing = record.attributes.get("loop/backing_file")
        if not backing:
            self.via.append(record.name)
            self.unknown(f"{record.name} has no backing file")
            return
        self.via.append(f"{record.name} → {backing}")
        if backing.endswith(" (deleted)"):
            self.unknown(f"the backing file of {record.name} was deleted")
            return
        self.nested(backing)

    def nested(self, path: str) -> _Walk:
        child = _Walk(self.mounts, self.source, self.realpath, self.depth + 1, self.chain)
        if os.path.isabs(path):
            child.path(path)
        else:  # the kernel keeps what the mounter wrote, relative to a cwd long gone
            child.unknown(f"the kernel shows the relative path {path}, which cannot be followed")
        self.via += child.via
        self.disks += child.disks
        self.leaves += child.leaves
        self.reasons += child.reasons
        return child

    def overlay(self, mount: Mount) -> None:
        lower, upper = overlay_layers(mount)
        if not lower:
            self.unknown(f"overlay {mount.mountpoint} shows no lower directory")
            return
        # Writes land in the upper layer, so it alone decides the kind; a read-only overlay
        # (no upper) is judged by its lower layers.
        upper_leaves: list[tuple[str, bool | None]] = []
        if upper is not None:
            self.via.append(f"upper {upper}")
            upper_leaves = list(self.nested(upper).leaves)
        for directory in lower:
            self.via.append(f"lower {directory}")
            self.nested(directory)
        if upper_leaves:
            self.leaves = upper_leaves

    def result(self, top: Mount | None) -> PathDevice:
        disks = tuple({d.node: d for d in self.disks}.values())
        kinds = [kind for kind, _ in self.leaves]
        return PathDevice(
            kind=overall_kind(kinds),
            rotational=overall_rotational(rot for _, rot in self.leaves),
            disks=disks,
            via=tuple(self.via),
            fstype=None if top is None else top.fstype,
            reason="; ".join(self.reasons) or None,
            mountpoint=None if top is None else top.mountpoint,
            source=None if top is None else top.source,
        )


def resolve_path(
    path: Path | str,
    mounts: MountTable,
    source: BlockSource,
    realpath: Callable[[str], str] = os.path.realpath,
) -> PathDevice:
    """The walk behind `describe_path`, on a given mount table and record source.

    ``realpath`` resolves symlinks in each path met (the target, a loop's backing file, an
    overlay's layers); tests that replay another machine pass `os.path.normpath`.
    """
    walk = _Walk(mounts, source, realpath)
    return walk.result(walk.path(str(path)))


def resolve_block(
    record: BlockRecord,
    mounts: MountTable,
    source: BlockSource,
    realpath: Callable[[str], str] = os.path.realpath,
) -> PathDevice:
    """The walk from one block device (a swap partition, an fstab source) to its disks."""
    walk = _Walk(mounts, source, realpath)
    walk.block(record)
    return walk.result(None)
