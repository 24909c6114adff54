"""Device detection on this machine's real devices, in private mount namespaces.

Each test writes a small bash script that builds a storage stack under its tmp_path (image
files on the root disk, loop devices, ext4/btrfs, tmpfs, zram, bind and overlay mounts)
inside ``unshare -m --propagation private``, runs ``python -m asd.devices`` on paths in it
and prints the JSON. Nothing is mounted in the host's namespace; loop and zram devices (which
are global) are released by the script's trap and, should it be killed, by the test.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from asd.devices import UdevSource, describe_node, describe_path, find_by_tag

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]

if shutil.which("losetup") is None or shutil.which("mkfs.ext4") is None:
    pytest.skip("needs losetup and mkfs.ext4", allow_module_level=True)

PRELUDE = r"""
set -euo pipefail
cd "$WORK"
: >mounts; : >loops; : >zrams
cleanup() {
    set +e
    tac mounts | while read -r m; do umount "$m"; done
    while read -r l; do losetup -d "$l"; done <loops
    while read -r z; do echo "$z" >/sys/class/zram-control/hot_remove; done <zrams
}
trap cleanup EXIT
mnt() { mount "$@"; echo "${@: -1}" >>mounts; }
newloop() { local l; l=$(losetup -f --show "$1"); echo "$l" >>loops; echo "$l"; }
image() { truncate -s "$2" "$1"; }
"""


def root_disk() -> str:
    """The whole disk under /, found from sysfs without asd's code."""
    dev = os.stat("/").st_dev
    path = os.path.realpath(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}")
    if os.path.exists(os.path.join(path, "partition")):
        path = os.path.dirname(path)
    return os.path.basename(path)


def root_is_virtio() -> bool:
    return "/virtio" in os.path.realpath(f"/sys/class/block/{root_disk()}")


@pytest.fixture
def work(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path
    # Should the script die before its trap, release what it attached.
    for image in tmp_path.glob("*.img"):
        out = subprocess.run(["losetup", "-j", str(image)], capture_output=True, text=True)
        for line in out.stdout.splitlines():
            subprocess.run(["losetup", "-d", line.split(":", 1)[0]], check=False)
    zrams = tmp_path / "zrams"
    if zrams.exists():
        for z in zrams.read_text().split():
            if Path(f"/sys/block/zram{z}").exists():
                Path("/sys/class/zram-control/hot_remove").write_text(z)


def devices(work: Path, setup: str, *paths: str) -> dict[str, Any]:
    """Run ``setup`` in a private mount namespace, then asd.devices on ``paths`` there."""
    quoted = " ".join(f"'{p}'" for p in paths)
    script = PRELUDE + setup + f'\n"$PYTHON" -m asd.devices {quoted} >out.json\n'
    env = {**os.environ, "WORK": str(work), "PYTHON": sys.executable, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        ["unshare", "-m", "--propagation", "private", "bash", "-c", script],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    result: dict[str, Any] = json.loads((work / "out.json").read_text())
    return result


EXT4_LOOP = """
image ext4.img 64M
mkfs.ext4 -q -F ext4.img
mkdir -p m/ext4
mnt "$(newloop ext4.img)" m/ext4
"""


def nodes(device: dict[str, Any]) -> list[str]:
    return [d["node"] for d in device["disks"]]


def test_ext4_on_a_loop_resolves_through_the_image_to_the_root_disk(work: Path) -> None:
    out = devices(work, EXT4_LOOP, f"{work}/m/ext4/some/dir")
    device = out[f"{work}/m/ext4/some/dir"]
    assert device["fstype"] == "ext4"
    assert nodes(device) == [f"/dev/{root_disk()}"]
    loop_layer = next(v for v in device["via"] if v.startswith("loop"))
    assert loop_layer.endswith(f"→ {work}/ext4.img")
    assert device["via"][-1] == root_disk()
    if root_is_virtio():
        assert device["kind"] == "virtual"
    assert device["reason"] is None


def test_btrfs_raid1_over_two_loops_lists_both_loops(work: Path) -> None:
    if shutil.which("mkfs.btrfs") is None:
        pytest.skip("needs btrfs-progs")
    setup = """
image a.img 256M; image b.img 256M
la=$(newloop a.img); lb=$(newloop b.img)
mkfs.btrfs -q -f -d raid1 -m raid1 "$la" "$lb" >/dev/null
mkdir -p m/btrfs
mnt "$la" m/btrfs
"""
    device = devices(work, setup, f"{work}/m/btrfs")[f"{work}/m/btrfs"]
    assert device["fstype"] == "btrfs"
    backing = sorted(v.split(" → ")[1] for v in device["via"] if " → " in v)
    assert backing == [f"{work}/a.img", f"{work}/b.img"]
    assert nodes(device) == [f"/dev/{root_disk()}"]


def test_tmpfs_is_ram(work: Path) -> None:
    setup = "mkdir -p m/t; mnt -t tmpfs -o size=8m asd-test m/t\n"
    device = devices(work, setup, f"{work}/m/t/x")[f"{work}/m/t/x"]
    assert (device["kind"], device["rotational"], device["disks"]) == ("ram", False, [])
    assert device["summary"] == "tmpfs, in RAM"


def test_zram_is_ram(work: Path) -> None:
    if not os.access("/sys/class/zram-control/hot_add", os.W_OK):
        pytest.skip("no zram on this kernel")
    setup = """
z=$(cat /sys/class/zram-control/hot_add); echo "$z" >>zrams
echo 32M >/sys/block/zram$z/disksize
mkfs.ext4 -q -F /dev/zram$z
mkdir -p m/z
mnt /dev/zram$z m/z
echo "zram$z" >zname
"""
    device = devices(work, setup, f"{work}/m/z")[f"{work}/m/z"]
    name = (work / "zname").read_text().strip()
    assert device["kind"] == "ram"
    assert [(d["node"], d["kind"]) for d in device["disks"]] == [(f"/dev/{name}", "ram")]


def test_a_bind_mount_resolves_to_its_source(work: Path) -> None:
    setup = EXT4_LOOP + "mkdir -p m/ext4/sub m/bind; mnt --bind m/ext4/sub m/bind\n"
    device = devices(work, setup, f"{work}/m/bind")[f"{work}/m/bind"]
    assert device["via"][0] == f"ext4 {work}/m/bind (bind of /sub)"
    assert any(v.startswith("loop") and v.endswith("ext4.img") for v in device["via"])
    assert nodes(device) == [f"/dev/{root_disk()}"]


def test_an_overlay_resolves_its_upper_and_lower(work: Path) -> None:
    setup = EXT4_LOOP + (
        "mkdir -p m/t m/ov m/ov2; mnt -t tmpfs asd-test m/t\n"
        "mkdir -p m/t/up m/t/wk m/t/lo m/ext4/lo m/ext4/up m/ext4/wk\n"
        'mnt -t overlay -o "lowerdir=$WORK/m/ext4/lo,upperdir=$WORK/m/t/up,'
        'workdir=$WORK/m/t/wk" ov m/ov\n'
        'mnt -t overlay -o "lowerdir=$WORK/m/t/lo,upperdir=$WORK/m/ext4/up,'
        'workdir=$WORK/m/ext4/wk" ov m/ov2\n'
        # The kernel keeps layers as written: relative ones cannot be followed later.
        "mkdir -p m/rel\n"
        "mnt -t overlay -o lowerdir=m/t/lo,upperdir=m/t/up,workdir=m/t/wk ov m/rel\n"
    )
    out = devices(work, setup, f"{work}/m/ov", f"{work}/m/ov2", f"{work}/m/rel")
    ram_upper, disk_upper = out[f"{work}/m/ov"], out[f"{work}/m/ov2"]
    assert ram_upper["kind"] == "ram"  # writes go to the tmpfs upper
    assert f"upper {work}/m/t/up" in ram_upper["via"]
    assert f"lower {work}/m/ext4/lo" in ram_upper["via"]
    assert nodes(ram_upper) == [f"/dev/{root_disk()}"]  # the lower's disk
    assert disk_upper["kind"] != "ram"  # writes go to the ext4 on the loop
    assert nodes(disk_upper) == [f"/dev/{root_disk()}"]
    if root_is_virtio():
        assert disk_upper["kind"] == "virtual"
    relative = out[f"{work}/m/rel"]
    assert relative["kind"] == "unknown"
    assert "relative path m/t/up" in relative["reason"]


def test_a_loop_whose_image_was_deleted_is_unknown_with_the_reason(work: Path) -> None:
    setup = EXT4_LOOP + "rm ext4.img\n"
    device = devices(work, setup, f"{work}/m/ext4")[f"{work}/m/ext4"]
    assert device["kind"] == "unknown"
    assert "was deleted" in device["reason"]


def test_udev_source_reads_sysfs_without_a_udev_database() -> None:
    source = UdevSource()
    record = source.by_name(root_disk())
    assert record.sys_path == os.path.realpath(f"/sys/class/block/{root_disk()}")
    assert record.attributes["queue/rotational"] in ("0", "1")
    assert int(record.attributes["size"]) > 0
    device = describe_node(f"/dev/{root_disk()}")
    assert [d.node for d in device.disks] == [f"/dev/{root_disk()}"]
    assert describe_path("/").disks == device.disks


def test_tags_without_a_udev_database_resolve_to_nothing() -> None:
    if os.path.isdir("/run/udev/data"):
        pytest.skip("this machine has a udev database")
    assert find_by_tag("UUID", "00000000-0000-0000-0000-000000000000") is None
