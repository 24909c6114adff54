"""The warnings at sync, on recorded machines."""

from __future__ import annotations

from pathlib import Path

from asd.devices import sync_warnings
from asd.disks import human_size, parse_swaps
from asd.mounts import MountTable, parse_mountinfo
from tests.unit.devfixtures import DATA, scenario

GiB = 2**30


def warnings_for(
    name: str, targets: list[tuple[str, int]], volatile: str, budget: int = 8 * GiB
) -> list[str]:
    source, mounts = scenario(name)
    swaps = DATA / name / "swaps"
    return sync_warnings(
        [(Path(p), size) for p, size in targets],
        Path(volatile),
        budget,
        mounts=mounts,
        source=source,
        swaps_text=swaps.read_text() if swaps.exists() else "",
    )


def test_a_plain_target_on_an_ssd_gets_no_warning() -> None:
    assert warnings_for("sata-ssd", [("/var/log", 10 * 2**20)], "/tmp") == []


def test_a_target_already_in_ram_is_a_warning() -> None:
    (warning,) = warnings_for("sata-ssd", [("/tmp/cache", 1)], "/run")
    assert warning.startswith("/tmp/cache: Already in RAM (tmpfs, in RAM)")
    assert "remove it from WHATTOSYNC" in warning


def test_a_target_on_a_network_filesystem_is_a_warning() -> None:
    (warning,) = warnings_for("network", [("/home/pi/.cache", 1)], "/run")
    assert warning.startswith("/home/pi/.cache: On a network filesystem (nfs4 fileserver.lan")
    assert "loses every change since the last resync" in warning


def test_a_target_bigger_than_half_the_budget_is_a_warning() -> None:
    assert warnings_for("nvme", [("/var/log", 4 * GiB)], "/run") == []
    (warning,) = warnings_for("nvme", [("/var/log", 4 * GiB + 1)], "/run")
    assert warning.startswith(f"/var/log: it holds {human_size(4 * GiB + 1)}, more than half")
    assert "(8.0 GiB)" in warning


def test_swap_partition_on_the_same_emmc_as_a_target_warns_for_a_tmpfs_volatile() -> None:
    (warning,) = warnings_for("emmc", [("/var/log", 1)], "/tmp")
    assert warning.startswith("VOLATILE /tmp is a tmpfs, which the kernel may swap out")
    assert "swap /dev/mmcblk0p3 is on eMMC flash mmcblk0" in warning
    assert "holds /var/log" in warning


def test_a_swap_file_on_the_sd_card_warns_too() -> None:
    (warning,) = warnings_for("sd-card", [("/var/log", 1), ("/home/pi/.cache", 1)], "/run")
    assert "swap /var/swap is on an SD card mmcblk0" in warning
    assert "holds /var/log, /home/pi/.cache" in warning


def test_no_swap_warning_without_swap_or_without_a_flash_target() -> None:
    source, mounts = scenario("emmc")
    quiet = sync_warnings(
        [(Path("/var/log"), 1)], Path("/tmp"), GiB, mounts=mounts, source=source, swaps_text=""
    )
    assert quiet == []
    # The same swap, but the target is on an SSD the swap does not touch.
    ssd_source, ssd_mounts = scenario("sata-ssd")
    assert (
        sync_warnings(
            [(Path("/var/log"), 1)],
            Path("/tmp"),
            GiB,
            mounts=ssd_mounts,
            source=ssd_source,
            swaps_text=(DATA / "emmc" / "swaps").read_text(),
        )
        == []
    )


def test_no_swap_warning_when_volatile_is_not_a_tmpfs() -> None:
    source, _ = scenario("emmc")
    text = (DATA / "emmc" / "mountinfo").read_text()
    text += "90 24 0:60 / /run/asd rw - ramfs ramfs rw\n"
    mounts = MountTable(parse_mountinfo(text))
    swaps = (DATA / "emmc" / "swaps").read_text()
    kw = {"mounts": mounts, "source": source, "swaps_text": swaps}
    assert sync_warnings([(Path("/var/log"), 1)], Path("/run/asd"), GiB, **kw) == []  # type: ignore[arg-type]


def test_parse_swaps_decodes_escapes_and_skips_the_header() -> None:
    text = (
        "Filename\t\t\t\tType\t\tSize\t\tUsed\t\tPriority\n"
        "/dev/zram0                              partition\t4194300\t\t0\t\t100\n"
        "/swap\\040file                          file\t\t1048572\t\t0\t\t-2\n"
    )
    assert parse_swaps(text) == [("/dev/zram0", "partition"), ("/swap file", "file")]
