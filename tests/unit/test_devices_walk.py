"""The walk from a path to its disks: layers, chains, and never a traceback."""

from __future__ import annotations

import os

from asd.devices import describe_node, describe_path
from asd.disks import BlockRecord, PathDevice
from asd.mounts import MountTable, overlay_layers, parse_mountinfo
from asd.stack import DeviceUnreadable, resolve_path
from tests.unit.devfixtures import scenario

VM = "/var/tmp/asd-capture/mnt"


def walk(name: str, path: str) -> PathDevice:
    source, mounts = scenario(name)
    return resolve_path(path, mounts, source, os.path.normpath)


class MemorySource:
    """A few hand-made records, for the cases no machine should ever show."""

    def __init__(self, *records: BlockRecord) -> None:
        self.records = {r.name: r for r in records}

    def by_name(self, name: str) -> BlockRecord:
        if name not in self.records:
            raise DeviceUnreadable(f"block device {name} cannot be read: gone")
        return self.records[name]

    def by_devnum(self, major_minor: str) -> BlockRecord:
        for record in self.records.values():
            if record.attributes.get("dev") == major_minor:
                return record
        raise DeviceUnreadable(f"block device {major_minor} cannot be read: gone")

    def by_node(self, node: str) -> BlockRecord:
        return self.by_name(node.rsplit("/", 1)[-1])

    def btrfs_members(self, name: str) -> tuple[str, ...]:
        return ()


def table(*lines: str) -> MountTable:
    return MountTable(parse_mountinfo("\n".join(lines)))


def loop(name: str, dev: str, backing: str | None) -> BlockRecord:
    attrs = {"dev": dev} | ({"loop/backing_file": backing} if backing else {})
    return BlockRecord(
        name, f"/sys/devices/virtual/block/{name}", "disk", f"/dev/{name}", {}, attrs
    )


def test_luks_on_nvme_goes_through_the_mapper_to_the_partition_and_disk() -> None:
    source, mounts = scenario("luks-on-nvme")
    device = resolve_path("/home/u/.mozilla", mounts, source, os.path.normpath)
    assert device.via == (
        "btrfs /home",
        "dm-0 (LUKS luks-5a1e7c3b-9d2f-4e8a-8c1b-0d3f5e7a9c2b)",
        "nvme0n1p3",
        "nvme0n1",
    )
    assert device.fstype == "btrfs"
    assert device.source == "/dev/mapper/luks-5a1e7c3b-9d2f-4e8a-8c1b-0d3f5e7a9c2b"


def test_lvm_shows_the_logical_volume() -> None:
    source, mounts = scenario("lvm-on-ssd")
    device = resolve_path("/home", mounts, source, os.path.normpath)
    assert device.via == ("ext4 /home", "dm-1 (LVM vg0-home)", "sda3", "sda")


def test_md_raid1_reaches_both_disks() -> None:
    source, mounts = scenario("md-raid1-hdd")
    device = resolve_path("/srv/data", mounts, source, os.path.normpath)
    assert device.via == ("ext4 /srv/data", "md0 (raid1)", "sda1", "sda", "sdb1", "sdb")
    assert [d.kind for d in device.disks] == ["hdd", "hdd"]


def test_loop_goes_to_its_backing_file_and_the_disk_holding_it() -> None:
    source, mounts = scenario("vm")
    device = resolve_path(f"{VM}/ext4/data", mounts, source, os.path.normpath)
    assert device.via == (
        f"ext4 {VM}/ext4",
        "loop0 → /var/tmp/asd-capture/ext4.img",
        "ext4 /",
        "vda",
    )
    assert device.kind == "virtual"
    assert [d.node for d in device.disks] == ["/dev/vda"]


def test_btrfs_raid1_over_two_loops_lists_both_members() -> None:
    source, mounts = scenario("vm")
    device = resolve_path(f"{VM}/btrfs", mounts, source, os.path.normpath)
    assert "loop1 → /var/tmp/asd-capture/btrfs-a.img" in device.via
    assert "loop2 → /var/tmp/asd-capture/btrfs-b.img" in device.via
    assert [d.node for d in device.disks] == ["/dev/vda"]  # both images live on vda
    assert device.kind == "virtual"


def test_tmpfs_and_zram_are_ram() -> None:
    source, mounts = scenario("vm")
    tmpfs = resolve_path(f"{VM}/tmpfs", mounts, source, os.path.normpath)
    assert (tmpfs.kind, tmpfs.rotational, tmpfs.disks) == ("ram", False, ())
    zram = resolve_path(f"{VM}/zram", mounts, source, os.path.normpath)
    assert zram.kind == "ram"
    assert [(d.node, d.kind, d.rotational) for d in zram.disks] == [("/dev/zram1", "ram", False)]
    assert zram.summary() == "zram1 zram, in RAM"


def test_a_bind_mount_resolves_to_its_source_filesystem() -> None:
    source, mounts = scenario("vm")
    device = resolve_path(f"{VM}/bind", mounts, source, os.path.normpath)
    assert device.via[0] == f"ext4 {VM}/bind (bind of /sub)"
    assert device.via[1:] == ("loop0 → /var/tmp/asd-capture/ext4.img", "ext4 /", "vda")


def test_a_btrfs_subvolume_is_not_called_a_bind_mount() -> None:
    source, mounts = scenario("luks-on-nvme")
    assert "bind" not in resolve_path("/", mounts, source, os.path.normpath).via[0]


def test_an_overlay_is_judged_by_its_upper_and_lists_its_lower() -> None:
    source, mounts = scenario("vm")
    device = resolve_path(f"{VM}/overlay/f", mounts, source, os.path.normpath)
    assert device.kind == "ram"  # writes land in the upper, on tmpfs
    assert device.via[:3] == (
        f"overlay {VM}/overlay",
        f"upper {VM}/tmpfs/upper",
        f"tmpfs {VM}/tmpfs",
    )
    assert f"lower {VM}/ext4/lower" in device.via
    assert [d.node for d in device.disks] == ["/dev/vda"]  # the lower's disk
    assert device.summary().startswith("overlay, writes go to RAM; layers on vda")


def test_a_read_only_overlay_is_judged_by_its_lower() -> None:
    source, mounts = scenario("vm")
    lines = [
        "47 46 254:0 / / rw - ext4 /dev/vda rw",
        "80 47 0:50 / /ro rw - overlay none rw,lowerdir=/a:/b",
    ]
    device = resolve_path("/ro", table(*lines), source, os.path.normpath)
    assert device.kind == "virtual"
    assert device.via == ("overlay /ro", "lower /a", "ext4 /", "vda", "lower /b", "ext4 /", "vda")


def test_overlay_layers_decode_both_escapes() -> None:
    line = (
        r"71 47 0:40 / /m rw - overlay ov rw,lowerdir=/t/lo\040w1:/t/lo\134:2,"
        r"upperdir=/t/up\134\054x,workdir=/t/wk,uuid=on"
    )
    (mount,) = parse_mountinfo(line)
    assert overlay_layers(mount) == (["/t/lo w1", "/t/lo:2"], "/t/up,x")


def test_network_filesystems_are_network() -> None:
    for path, fstype in [
        ("/home/pi", "nfs4"),
        ("/mnt/share/x", "cifs"),
        ("/home/pi/remote", "fuse.sshfs"),
    ]:
        device = walk("network", path)
        assert device.kind == "network", path
        assert device.fstype == fstype


def test_a_local_fuse_filesystem_follows_its_source_directory() -> None:
    source, mounts = scenario("network")
    device = resolve_path("/home/pi/vault", mounts, source, os.path.normpath)
    assert device.via == ("fuse.gocryptfs /home/pi/vault", "source /home/pi/.vault", "nfs4 /home")
    assert device.kind == "network"


def test_a_device_that_is_gone_is_unknown_with_the_reason() -> None:
    source, mounts = scenario("sata-hdd")  # the root disk of that machine was not captured
    device = resolve_path("/etc", mounts, source, os.path.normpath)
    assert device.kind == "unknown"
    assert device.rotational is None
    assert device.reason == "block device 259:2 cannot be read: no such device"
    assert device.summary().startswith("unknown device: block device 259:2")


def test_pseudo_filesystems_and_unmounted_paths_are_unknown() -> None:
    mounts = table("22 27 0:21 / /proc rw - proc proc rw")
    proc = describe_path("/proc/1", mounts, source=MemorySource())
    assert proc.reason == "proc is a kernel pseudo filesystem, not storage"
    nothing = describe_path("/srv", table(), source=MemorySource())
    assert (nothing.kind, nothing.reason) == ("unknown", "no mount holds /srv")


def test_a_loop_without_backing_file_or_with_a_deleted_one_is_unknown() -> None:
    source = MemorySource(loop("loop3", "7:3", None), loop("loop4", "7:4", "/img (deleted)"))
    mounts = table(
        "60 1 7:3 / /a rw - ext4 /dev/loop3 rw",
        "61 1 7:4 / /b rw - ext4 /dev/loop4 rw",
    )
    assert describe_path("/a", mounts, source=source).reason == "loop3 has no backing file"
    deleted = describe_path("/b", mounts, source=source)
    assert deleted.reason == "the backing file of loop4 was deleted"
    assert deleted.kind == "unknown"


def test_a_loop_backed_by_a_file_on_itself_stops_at_the_first_repeat() -> None:
    source = MemorySource(loop("loop5", "7:5", "/l/img"))
    mounts = table("62 1 7:5 / /l rw - ext4 /dev/loop5 rw")
    device = describe_path("/l", mounts, source=source)
    assert device.kind == "unknown"
    assert device.reason == "/l/img leads back to /l, which it is a layer of"


def test_a_partition_whose_disk_cannot_be_read_keeps_what_was_found() -> None:
    part = BlockRecord(
        "sdz1", "/sys/x/block/sdz/sdz1", "partition", "/dev/sdz1", {}, {"dev": "8:1"}, (), "sdz"
    )
    device = describe_path(
        "/x", table("63 1 8:1 / /x rw - ext4 /dev/sdz1 rw"), source=MemorySource(part)
    )
    assert device.via == ("ext4 /x", "sdz1")
    assert device.reason == "block device sdz cannot be read: gone"


def test_describe_node_resolves_a_swap_partition() -> None:
    source, mounts = scenario("emmc")
    device = describe_node("/dev/mmcblk0p3", mounts, source=source)
    assert device.kind == "emmc"
    assert device.via == ("mmcblk0p3", "mmcblk0")
    missing = describe_node("/dev/sdq2", mounts, source=source)
    assert (missing.kind, missing.reason) == ("unknown", "/dev/sdq2 cannot be read: no such device")


def test_an_overlay_layer_given_as_a_relative_path_is_not_guessed() -> None:
    source, _ = scenario("vm")
    mounts = table(
        "47 46 254:0 / / rw - ext4 /dev/vda rw",
        "80 47 0:50 / /ov rw - overlay none rw,lowerdir=lo,upperdir=up,workdir=wk",
    )
    device = resolve_path("/ov", mounts, source, os.path.normpath)
    assert device.kind == "unknown"
    assert device.reason is not None
    assert "the relative path up, which cannot be followed" in device.reason


def test_a_container_root_overlay_whose_layers_are_outside_it_ends() -> None:
    """Docker's / is an overlay whose layer directories live on the host, invisible inside:
    each resolves back to / itself. The walk must stop there, not follow it again."""
    source, _ = scenario("vm")
    layers = ":".join(f"/var/lib/docker/overlay2/l/L{i}" for i in range(5))
    lines = [
        f"600 500 0:90 / / rw - overlay overlay rw,lowerdir={layers},"
        "upperdir=/var/lib/docker/overlay2/x/diff,workdir=/var/lib/docker/overlay2/x/work",
        "601 600 0:91 / /tmp rw - tmpfs tmpfs rw",
    ]
    device = resolve_path("/srv/target", table(*lines), source, os.path.normpath)
    assert device.kind == "unknown"
    assert device.reason is not None and "leads back to /" in device.reason
    assert len(device.via) < 20, "the walk went round the overlay again"
