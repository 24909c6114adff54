"""The pure classification, on records of real machines (tests/data/devices/README.md)."""

from __future__ import annotations

import os

import pytest

from asd.disks import (
    BlockRecord,
    Disk,
    PathDevice,
    bus_of,
    decode_udev,
    disk_from_record,
    judgement,
    overall_kind,
    overall_rotational,
)
from asd.stack import resolve_path
from tests.unit.devfixtures import DATA, load_record, scenario, scenarios

# scenario, a path on it, kind, rotational, disk nodes, bus of the first disk, its model
CASES = [
    ("sata-hdd", "/srv/www", "hdd", True, ["/dev/sda"], "ata", "WDC WD40EFRX-68N32N0"),
    ("sata-ssd", "/home/u", "ssd", False, ["/dev/sda"], "ata", "Samsung SSD 860 EVO 500GB"),
    ("nvme", "/var/log", "nvme", False, ["/dev/nvme0n1"], "nvme", "Samsung SSD 980 1TB"),
    ("luks-on-nvme", "/home/u", "nvme", False, ["/dev/nvme0n1"], "nvme", "WD_BLACK SN770 1TB"),
    ("lvm-on-ssd", "/home/u", "ssd", False, ["/dev/sda"], "ata", "CT1000MX500SSD1"),
    (
        "md-raid1-hdd",
        "/srv/data/db",
        "hdd",
        True,
        ["/dev/sda", "/dev/sdb"],
        "ata",
        "ST4000VN008-2DR166",
    ),
    ("emmc", "/var/log", "emmc", False, ["/dev/mmcblk0"], "mmc", "DF4064"),
    ("sd-card", "/var/log", "sd", False, ["/dev/mmcblk0"], "mmc", "SC32G"),
    ("usb-stick", "/media/pi/MY STICK/x", "usb-flash", True, ["/dev/sdb"], "usb", "Cruzer Blade"),
    ("usb-hdd", "/mnt/backup", "hdd", True, ["/dev/sdc"], "usb", "Elements 25A3"),
    ("qemu-scsi", "/var/lib", "virtual", True, ["/dev/sda"], "scsi", "QEMU HARDDISK"),
    ("vm", "/var/cache", "virtual", True, ["/dev/vda"], "virtio", None),
]


@pytest.mark.parametrize(("name", "path", "kind", "rotational", "nodes", "bus", "model"), CASES)
def test_each_machine_classifies_as_its_kind(
    name: str,
    path: str,
    kind: str,
    rotational: bool,
    nodes: list[str],
    bus: str,
    model: str | None,
) -> None:
    source, mounts = scenario(name)
    device = resolve_path(path, mounts, source, os.path.normpath)
    assert device.kind == kind
    assert device.rotational is rotational
    assert [d.node for d in device.disks] == nodes
    assert device.disks[0].bus == bus
    assert device.disks[0].model == model
    assert device.reason is None


def test_every_scenario_is_covered() -> None:
    covered = {case[0] for case in CASES} | {"network"}
    assert covered == set(scenarios())


def test_the_summary_reads_like_the_issue_example() -> None:
    source, mounts = scenario("nvme")
    device = resolve_path("/", mounts, source, os.path.normpath)
    assert device.summary() == "nvme0n1 Samsung SSD 980 1TB, NVMe, not rotational"


def test_md_raid_summary_names_both_disks() -> None:
    source, mounts = scenario("md-raid1-hdd")
    line = resolve_path("/srv/data", mounts, source, os.path.normpath).summary()
    assert line == "sda ST4000VN008-2DR166 + sdb ST4000VN008-2DR166, SATA, rotational"


def test_disk_json_has_the_documented_keys() -> None:
    source, mounts = scenario("usb-stick")
    data = resolve_path("/media/pi/MY STICK", mounts, source, os.path.normpath).to_json()
    assert {"kind", "rotational", "disks", "via", "fstype"} <= data.keys()
    disk = data["disks"][0]
    assert disk["node"] == "/dev/sdb"
    assert disk["model"] == "Cruzer Blade"
    assert disk["vendor"] == "SanDisk"
    assert disk["bus"] == "usb"
    assert disk["removable"] is True
    assert disk["rotational"] is True
    assert disk["size_bytes"] == 30031872 * 512
    assert data["via"] == ["vfat /media/pi/MY STICK", "sdb1", "sdb"]
    assert data["fstype"] == "vfat"


def test_sysfs_alone_classifies_when_there_is_no_udev_database() -> None:
    # The same SATA SSD with only what the kernel's uevent gives (a container, no udev db).
    record, _ = load_record(DATA / "sata-ssd", "sda")
    bare = BlockRecord(
        record.name,
        record.sys_path,
        "disk",
        record.node,
        {k: v for k, v in record.properties.items() if not k.startswith(("ID_", "DEV"))},
        record.attributes,
    )
    disk = disk_from_record(bare)
    assert (disk.kind, disk.bus, disk.model, disk.vendor) == (
        "ssd",
        "ata",
        "Samsung SSD 860",
        "ATA",
    )


def test_an_sd_card_in_a_usb_reader_is_an_sd_card() -> None:
    record, _ = load_record(DATA / "usb-stick", "sdb")
    reader = BlockRecord(
        record.name,
        record.sys_path,
        "disk",
        record.node,
        {**record.properties, "ID_DRIVE_FLASH_SD": "1"},
        record.attributes,
    )
    assert disk_from_record(reader).kind == "sd"


@pytest.mark.parametrize(
    ("sys_path", "name", "bus"),
    [
        (
            "/sys/devices/pci0000:00/0000:00:14.0/usb2/2-1/2-1:1.0/host6/target6:0:0/6:0:0:0/block/sdb",
            "sdb",
            "usb",
        ),  # noqa: E501
        ("/sys/devices/virtual/nvme-subsystem/nvme-subsys0/nvme0n1", "nvme0n1", "nvme"),
        (
            "/sys/devices/platform/soc/fe340000.mmc/mmc_host/mmc0/mmc0:0001/block/mmcblk0",
            "mmcblk0",
            "mmc",
        ),  # noqa: E501
        ("/sys/devices/pci0000:00/0000:00:04.0/virtio1/block/vda", "vda", "virtio"),
        ("/sys/devices/vbd-51712/block/xvda", "xvda", "xen"),
        (
            "/sys/devices/pci0000:00/0000:00:1f.2/ata3/host2/target2:0:0/2:0:0:0/block/sda",
            "sda",
            "ata",
        ),  # noqa: E501
        (
            "/sys/devices/pci0000:00/0000:00:10.0/host32/target32:0:0/32:0:0:0/block/sda",
            "sda",
            "scsi",
        ),  # noqa: E501
        ("/sys/devices/virtual/block/loop0", "loop0", None),
    ],
)
def test_bus_comes_from_where_the_disk_sits(sys_path: str, name: str, bus: str | None) -> None:
    assert bus_of(BlockRecord(name, sys_path, "disk", f"/dev/{name}")) == bus


def test_iscsi_and_network_block_devices_are_network() -> None:
    iscsi = "/sys/devices/platform/host3/session1/target3:0:0/3:0:0:0/block/sdd"
    attrs = {"queue/rotational": "1", "device/vendor": "LIO-ORG", "device/model": "disk1"}
    assert disk_from_record(BlockRecord("sdd", iscsi, "disk", "/dev/sdd", {}, attrs)).kind == (
        "network"
    )
    nbd = BlockRecord("nbd0", "/sys/devices/virtual/block/nbd0", "disk", "/dev/nbd0")
    assert disk_from_record(nbd).kind == "network"


def test_cloud_nvme_volumes_are_virtual() -> None:
    record = BlockRecord(
        "nvme1n1",
        "/sys/devices/pci0000:00/0000:00:1f.0/nvme/nvme1/nvme1n1",
        "disk",
        "/dev/nvme1n1",
        {"ID_MODEL": "Amazon Elastic Block Store"},
        {"queue/rotational": "0"},
    )
    assert disk_from_record(record).kind == "virtual"


def test_udev_escapes_decode_and_trim() -> None:
    assert decode_udev(r"WDC\x20WD40EFRX-68N32N0\x20\x20\x20") == "WDC WD40EFRX-68N32N0"
    assert decode_udev(r"MY\x20STICK") == "MY STICK"


def test_combined_kind_warns_about_the_most_fragile_disk() -> None:
    assert overall_kind(["ssd", "sd"]) == "sd"
    assert overall_kind(["hdd", "nvme"]) == "nvme"
    assert overall_kind(["unknown", "hdd"]) == "hdd"
    assert overall_kind([]) == "unknown"


def test_rotational_is_true_only_when_every_disk_rotates() -> None:
    assert overall_rotational([True, True]) is True
    assert overall_rotational([True, False]) is False
    assert overall_rotational([True, None]) is None
    assert overall_rotational([]) is None


def _device(kind: str, **kw: object) -> PathDevice:
    disk = Disk("/dev/x", "M", None, "ata", False, kind == "hdd", 1, kind)
    return PathDevice(kind, kind == "hdd", (disk,), ("x",), "ext4", **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kind", "words", "warning"),
    [
        ("sd", "flash wears out", False),
        ("emmc", "flash wears out", False),
        ("usb-flash", "flash wears out", False),
        ("hdd", "seeks and write latency", False),
        ("ssd", "wear and latency", False),
        ("nvme", "wear and latency", False),
        ("virtual", "host's storage", False),
        ("ram", "remove it from WHATTOSYNC", True),
        ("network", "a crash or power cut loses every change", True),
        ("unknown", "cannot tell", False),
    ],
)
def test_judgement_says_what_asd_does_for_each_kind(kind: str, words: str, warning: bool) -> None:
    sentence, is_warning = judgement(_device(kind))
    assert words in sentence
    assert is_warning is warning


def test_volatile_must_be_ram() -> None:
    tmpfs = PathDevice("ram", False, (), ("tmpfs /tmp",), "tmpfs")
    assert judgement(tmpfs, is_volatile=True) == (
        "VOLATILE is in RAM (tmpfs), as it must be.",
        False,
    )
    sentence, warning = judgement(_device("sd"), is_volatile=True)
    assert warning
    assert sentence.startswith("VOLATILE is on an SD card")
    assert "not in RAM" in sentence
