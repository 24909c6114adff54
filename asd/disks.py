"""What a disk is and what that means for asd: pure classification, no pyudev, no I/O.

`asd.devices` walks udev and sysfs and hands each block device here as a `BlockRecord` of
plain strings (udev properties and the few sysfs attributes asd reads); captured records in
``tests/data/devices/`` feed the same functions in the unit tests.

- `BlockRecord`: one block device as read (name, sysfs path, properties, attributes, slaves).
- `Disk`, `PathDevice`: the answer, frozen and JSON-ready (`to_json()`, `summary()`).
- `disk_from_record(record) -> Disk`: bus, kind, model, rotational of a whole disk.
- `overall_kind(kinds)`, `overall_rotational(values)`: one answer for several disks.
- `judgement(device, is_volatile=False) -> (sentence, is_warning)`.
- `parse_swaps(text)`: /proc/swaps as (path, type) pairs.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from asd.mounts import unescape

KINDS = ("hdd", "ssd", "nvme", "emmc", "sd", "usb-flash", "virtual", "ram", "network", "unknown")
FLASH_KINDS = frozenset({"emmc", "sd", "usb-flash"})
# When one path spans disks of different kinds (a btrfs RAID of an SSD and an SD card), the
# kind reported is the one the user most needs to hear about: fragile flash first.
_PRIORITY = ("sd", "emmc", "usb-flash", "nvme", "ssd", "hdd", "virtual", "network", "ram")

_BUS_LABELS = {
    "ata": "SATA",
    "scsi": "SCSI",
    "nvme": "NVMe",
    "usb": "USB",
    "mmc": "MMC",
    "virtio": "virtio",
    "xen": "Xen",
}
_KIND_LABELS = {
    "hdd": "a spinning hard disk",
    "ssd": "an SSD",
    "nvme": "an NVMe SSD",
    "emmc": "eMMC flash",
    "sd": "an SD card",
    "usb-flash": "a USB flash drive",
    "virtual": "a virtual disk",
    "ram": "RAM",
    "network": "a network filesystem",
    "unknown": "an unknown device",
}
# Vendor or model strings of disks that a hypervisor or cloud provides.
_VIRTUAL_MODELS = re.compile(
    r"QEMU|VBOX|VMware|Virtual[ _]disk|Msft|PersistentDisk|Amazon Elastic Block Store|"
    r"Xen|KVM|Virtio|Red Hat",
    re.IGNORECASE,
)
# The virtio "vendor" in sysfs is a PCI vendor id; name the one every hypervisor uses.
_VIRTIO_VENDORS = {"0x1af4": "Red Hat, Inc."}
_UDEV_ESCAPE = re.compile(r"\\x([0-9a-fA-F]{2})")


@dataclass(frozen=True)
class BlockRecord:
    """One block device as udev and sysfs describe it, all plain strings."""

    name: str  # kernel name: sda, sda1, nvme0n1p2, dm-0, loop3
    sys_path: str  # /sys/devices/.../block/sda
    devtype: str  # "disk" or "partition"
    node: str  # /dev/sda
    properties: Mapping[str, str] = field(default_factory=dict)
    attributes: Mapping[str, str] = field(default_factory=dict)
    slaves: tuple[str, ...] = ()
    parent: str | None = None  # for a partition: the kernel name of its disk


@dataclass(frozen=True)
class Disk:
    node: str
    model: str | None
    vendor: str | None
    bus: str | None
    removable: bool | None
    rotational: bool | None
    size_bytes: int | None
    kind: str

    @property
    def name(self) -> str:
        return self.node.rsplit("/", 1)[-1]

    def to_json(self) -> dict[str, Any]:
        return {
            "node": self.node,
            "model": self.model,
            "vendor": self.vendor,
            "bus": self.bus,
            "removable": self.removable,
            "rotational": self.rotational,
            "size_bytes": self.size_bytes,
            "kind": self.kind,
        }


@dataclass(frozen=True)
class PathDevice:
    """What holds a path: its filesystem, the chain of devices below it and the disks."""

    kind: str
    rotational: bool | None
    disks: tuple[Disk, ...]
    via: tuple[str, ...]
    fstype: str | None
    reason: str | None = None  # why the answer is (partly) unknown
    mountpoint: str | None = None
    source: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "rotational": self.rotational,
            "disks": [d.to_json() for d in self.disks],
            "via": list(self.via),
            "fstype": self.fstype,
            "mountpoint": self.mountpoint,
            "source": self.source,
            "reason": self.reason,
            "summary": self.summary(),
        }

    def summary(self) -> str:
        """One line, e.g. "nvme0n1 Samsung SSD 980, NVMe, not rotational"."""
        if self.kind == "ram" and not self.disks:
            return f"{self.fstype or 'tmpfs'}, in RAM"
        if self.kind == "network":
            return f"{self.fstype} {self.source or ''}, network".replace("  ", " ")
        if not self.disks:
            return f"unknown device: {self.reason or 'nothing found'}"
        names = " + ".join(_disk_words(d) for d in self.disks)
        if self.fstype == "overlay":
            line = f"overlay, writes go to {kind_label(self.kind)}; layers on {names}"
        elif self.kind == "ram":
            line = f"{names}, in RAM"
        else:
            buses = sorted(
                {_BUS_LABELS.get(d.bus or "", d.bus or "unknown bus") for d in self.disks}
            )
            rotation = {True: "rotational", False: "not rotational", None: "rotation unknown"}
            line = f"{names}, {'/'.join(buses)}, {rotation[self.rotational]}"
        if self.reason:
            line += f" ({self.reason})"
        return line


def _disk_words(disk: Disk) -> str:
    if disk.model:
        return f"{disk.name} {disk.model}"
    if disk.bus == "virtio":
        return f"{disk.name} virtio disk"
    return disk.name


def decode_udev(value: str) -> str:
    """Decode udev's ``\\xNN`` escapes (ID_MODEL_ENC) and trim the padding."""
    raw = _UDEV_ESCAPE.sub(lambda m: chr(int(m.group(1), 16)), value)
    return " ".join(raw.split())


def _clean(value: str | None) -> str | None:
    if value is None:
        return None
    text = " ".join(value.split())
    return text or None


def _flag(value: str | None) -> bool | None:
    if value is None or value.strip() not in ("0", "1"):
        return None
    return value.strip() == "1"


def bus_of(record: BlockRecord) -> str | None:
    """The bus of a whole disk, from where it sits in sysfs (udev's ID_BUS as a fallback)."""
    path = record.sys_path
    if re.search(r"/usb\d+/", path):
        return "usb"  # before scsi: a USB stick is a SCSI disk behind a USB port
    if "/nvme/" in path or "/nvme-subsystem/" in path or re.fullmatch(r"nvme\d+n\d+", record.name):
        return "nvme"
    if "/mmc_host/" in path:
        return "mmc"
    if re.search(r"/virtio\d+/block/", path):
        return "virtio"
    if "/vbd-" in path or record.name.startswith("xvd"):
        return "xen"
    if re.search(r"/ata\d+/", path):
        return "ata"
    if re.search(r"/host\d+/", path):
        return "scsi"
    bus = record.properties.get("ID_BUS")
    return bus or None


def _model(record: BlockRecord) -> str | None:
    props = record.properties
    if props.get("ID_MODEL_ENC"):
        return decode_udev(props["ID_MODEL_ENC"]) or None
    # Without ID_MODEL_ENC, ID_MODEL is the raw attribute (NVMe) or the card name (MMC).
    attrs = record.attributes
    for value in (props.get("ID_MODEL"), props.get("ID_NAME"), attrs.get("device/model")):
        if value and value.strip():
            return _clean(value)
    return _clean(attrs.get("device/name"))


def _vendor(record: BlockRecord) -> str | None:
    props = record.properties
    if props.get("ID_VENDOR_ENC"):
        return decode_udev(props["ID_VENDOR_ENC"]) or None
    if props.get("ID_VENDOR"):
        return _clean(props["ID_VENDOR"])
    vendor = _clean(record.attributes.get("device/vendor"))
    return _VIRTIO_VENDORS.get(vendor or "", vendor)


def disk_kind(
    record: BlockRecord, bus: str | None, rotational: bool | None, removable: bool | None
) -> str:
    """Classify one whole disk as one of `KINDS`."""
    name, props, attrs = record.name, record.properties, record.attributes
    if re.fullmatch(r"(zram|ram)\d+", name):
        return "ram"
    if re.fullmatch(r"(nbd|rbd)\d+", name) or re.search(r"/session\d+/", record.sys_path):
        return "network"  # network block devices and iSCSI
    words = " ".join(filter(None, [_vendor(record), _model(record)]))
    if bus in ("virtio", "xen") or _VIRTUAL_MODELS.search(words):
        return "virtual"
    if bus == "mmc":
        card = (attrs.get("device/type") or "").strip().upper()
        if card == "SD":
            return "sd"
        if card == "MMC":
            return "emmc"
        return "unknown"
    if bus == "nvme":
        return "nvme"
    if props.get("ID_DRIVE_FLASH_SD") == "1" or props.get("ID_DRIVE_MEDIA_FLASH_SD") == "1":
        return "sd"  # an SD card in a USB or SCSI card reader
    if bus == "usb":
        # USB sticks set the removable-media bit; USB hard disks and SSDs do not. Most sticks
        # also claim to rotate, because they cannot answer the kernel's question.
        if removable:
            return "usb-flash"
        if rotational is None:
            return "unknown"
        return "hdd" if rotational else "ssd"
    rpm = props.get("ID_ATA_ROTATION_RATE_RPM")
    if rpm is not None and rpm.isdigit():
        return "hdd" if int(rpm) > 0 else "ssd"
    if bus in ("ata", "scsi") or bus is None:
        if rotational is True:
            return "hdd"
        if rotational is False:
            return "ssd"
    return "unknown"


def disk_from_record(record: BlockRecord) -> Disk:
    """A whole disk (not a partition, dm or loop device) as asd reports it."""
    attrs = record.attributes
    bus = bus_of(record)
    rotational = _flag(attrs.get("queue/rotational"))
    removable = _flag(attrs.get("removable"))
    size = attrs.get("size", "").strip()
    kind = disk_kind(record, bus, rotational, removable)
    model = _model(record)
    if model is None and kind == "ram":
        model = record.name.rstrip("0123456789")
    return Disk(
        node=record.node,
        model=model,
        vendor=_vendor(record),
        bus=bus,
        removable=removable,
        rotational=False if kind == "ram" else rotational,
        size_bytes=int(size) * 512 if size.isdigit() else None,
        kind=kind,
    )


def overall_kind(kinds: Iterable[str]) -> str:
    """One kind for a path spanning several leaves (disks, RAM, network)."""
    found = set(kinds)
    for kind in _PRIORITY:
        if kind in found:
            return kind
    return "unknown"


def overall_rotational(values: Iterable[bool | None]) -> bool | None:
    """True only when every disk rotates; False when any does not; None when unknown."""
    seen = list(values)
    if not seen:
        return None
    if any(v is False for v in seen):
        return False
    if all(v is True for v in seen):
        return True
    return None


def kind_label(kind: str) -> str:
    return _KIND_LABELS.get(kind, kind)


def judgement(device: PathDevice, *, is_volatile: bool = False) -> tuple[str, bool]:
    """The sentence a user can act on, and whether it is a warning."""
    kind, what = device.kind, device.summary()
    if is_volatile:
        if kind == "ram":
            return f"VOLATILE is in RAM ({device.fstype or 'zram'}), as it must be.", False
        return (
            f"VOLATILE is on {kind_label(kind)} ({what}), not in RAM: asd refuses to sync into "
            "it; set VOLATILE to a tmpfs such as /run or /dev/shm.",
            True,
        )
    if kind in FLASH_KINDS:
        return (
            f"On {kind_label(kind)} ({what}): flash wears out with writes; asd spares it by "
            "keeping them in RAM.",
            False,
        )
    if kind == "hdd":
        return f"On {kind_label(kind)} ({what}): asd saves it seeks and write latency.", False
    if kind in ("ssd", "nvme"):
        return f"On {kind_label(kind)} ({what}): asd saves it write wear and latency.", False
    if kind == "virtual":
        return (
            f"On {kind_label(kind)} ({what}): the host's storage takes the writes; asd saves "
            "I/O and latency, what it spares depends on the host.",
            False,
        )
    if kind == "ram":
        return (
            f"Already in RAM ({what}): asd gains nothing here; remove it from WHATTOSYNC.",
            True,
        )
    if kind == "network":
        return (
            f"On {kind_label(kind)} ({what}): asd hides network latency, but a crash or power "
            "cut loses every change since the last resync, and other machines see the old "
            "copy until then.",
            True,
        )
    return f"Device unknown ({what}): asd cannot tell what it spares.", False


def parse_swaps(text: str) -> list[tuple[str, str]]:
    """The (filename, type) of each active swap in /proc/swaps (octal escapes decoded)."""
    swaps = []
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) >= 2:
            swaps.append((unescape(fields[0]), fields[1]))
    return swaps


def human_size(n: int) -> str:
    """Bytes in binary units with one decimal: 512 B, 3.1 GiB."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(size) < 1024 or unit == "TiB":
            return f"{int(size)} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")  # pragma: no cover


def meminfo_available(path: str = "/proc/meminfo") -> int | None:
    try:
        with open(path) as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None
