"""Read the block device fixtures of tests/data/devices/ (see the README there).

A scenario directory holds, per block device, ``NAME.udevadm`` (``udevadm info --query=all``)
and ``NAME.sysfs`` (``grep -H .`` over sysfs attributes plus ``slaves/X`` lines), and once a
``mountinfo``, optionally ``btrfs`` ("FSID: member ...") and ``swaps``. `FixtureSource` serves
them to the pure walk in `asd.stack` exactly as `asd.devices.UdevSource` serves live ones.
"""

from __future__ import annotations

from pathlib import Path

from asd.disks import BlockRecord
from asd.mounts import MountTable, parse_mountinfo
from asd.stack import DeviceUnreadable

DATA = Path(__file__).resolve().parents[1] / "data" / "devices"


def parse_udevadm(text: str) -> tuple[str, dict[str, str], list[str]]:
    """(sysfs path, properties, device links) from ``udevadm info --query=all``."""
    devpath, links = "", []
    props: dict[str, str] = {}
    for line in text.splitlines():
        tag, _, value = line.partition(": ")
        if tag == "P":
            devpath = value
        elif tag == "S":
            links.append("/dev/" + value)
        elif tag == "E":
            key, _, val = value.partition("=")
            props[key] = val
    return "/sys" + devpath, props, links


def parse_sysfs(text: str) -> tuple[dict[str, str], tuple[str, ...]]:
    """(attributes, slaves) from the ``.sysfs`` dump; values keep their padding."""
    attrs: dict[str, str] = {}
    slaves = []
    for line in text.splitlines():
        if line.startswith("slaves/"):
            slaves.append(line[len("slaves/") :])
            continue
        name, sep, value = line.partition(":")
        if sep:
            attrs[name] = value
    return attrs, tuple(slaves)


def load_record(directory: Path, name: str) -> tuple[BlockRecord, list[str]]:
    sys_path, props, links = parse_udevadm((directory / f"{name}.udevadm").read_text())
    attrs, slaves = parse_sysfs((directory / f"{name}.sysfs").read_text())
    devtype = props.get("DEVTYPE", "disk")
    record = BlockRecord(
        name=name,
        sys_path=sys_path,
        devtype=devtype,
        node=props.get("DEVNAME", f"/dev/{name}"),
        properties=props,
        attributes={k: v.strip() for k, v in attrs.items()},
        slaves=slaves,
        parent=Path(sys_path).parent.name if devtype == "partition" else None,
    )
    return record, links


class FixtureSource:
    """A `BlockSource` over one scenario directory."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.records: dict[str, BlockRecord] = {}
        self.nodes: dict[str, str] = {}
        for path in sorted(directory.glob("*.udevadm")):
            record, links = load_record(directory, path.stem)
            self.records[record.name] = record
            for node in [record.node, *links]:
                self.nodes[node] = record.name
        self.btrfs: list[tuple[str, ...]] = []
        if (directory / "btrfs").exists():
            for line in (directory / "btrfs").read_text().splitlines():
                self.btrfs.append(tuple(line.partition(":")[2].split()))

    def by_name(self, name: str) -> BlockRecord:
        if name not in self.records:
            raise DeviceUnreadable(f"block device {name} cannot be read: no such device")
        return self.records[name]

    def by_devnum(self, major_minor: str) -> BlockRecord:
        for record in self.records.values():
            props = record.properties
            if f"{props.get('MAJOR')}:{props.get('MINOR')}" == major_minor:
                return record
        raise DeviceUnreadable(f"block device {major_minor} cannot be read: no such device")

    def by_node(self, node: str) -> BlockRecord:
        if node not in self.nodes:
            raise DeviceUnreadable(f"{node} cannot be read: no such device")
        return self.records[self.nodes[node]]

    def btrfs_members(self, name: str) -> tuple[str, ...]:
        return next((members for members in self.btrfs if name in members), ())


def scenario(name: str) -> tuple[FixtureSource, MountTable]:
    directory = DATA / name
    mounts = MountTable(parse_mountinfo((directory / "mountinfo").read_text()))
    return FixtureSource(directory), mounts


def scenarios() -> list[str]:
    return sorted(p.name for p in DATA.iterdir() if (p / "mountinfo").exists())
