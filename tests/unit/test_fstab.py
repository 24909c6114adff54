"""fstab parsing, tag resolution and which declared mount a target waits for."""

from __future__ import annotations

from pathlib import Path

import pytest

from asd.fstab import encode_udev_name, mount_for, parse_fstab, read_fstab, resolve_source
from asd.mounts import MountTable, parse_mountinfo

FSTAB = r"""# /etc/fstab: static file system information.
#
# <file system>                            <mount point>   <type>  <options>         <dump> <pass>
UUID=3e1b5a7c-0d2f-4c8e-9b6a-1f4d7e2c5a90  /               ext4    errors=remount-ro 0      1
   # an indented comment, then a blank line

LABEL="home"                               /home           ext4    defaults,nofail   0      2
PARTUUID=c2d9e4f1-02                       /boot/efi       vfat    umask=0077        0      1
PARTLABEL=srv\040data /srv/My\040Data xfs noauto,x-systemd.automount,x-systemd.idle-timeout=60 0 0
/dev/mapper/vault	/srv/vault	ext4	noauto,x-systemd.requires=cryptsetup@vault.service
UUID=2a4c6e8b-0d1f-4a3c-9e5b-7d9f1b3d5e71  none            swap    sw                0      0
fileserver:/export/media                   /mnt/media      nfs4    _netdev,nofail
tmpfs                                      /tmp            tmpfs   size=2G,mode=1777
/dev/sdz9  /short
"""

ROOT_ONLY = MountTable(
    parse_mountinfo("26 1 8:2 / / rw,relatime shared:1 - ext4 /dev/sda2 rw,errors=remount-ro")
)


def entries() -> dict[str, object]:
    return {e.mountpoint: e for e in parse_fstab(FSTAB)}


def test_every_mount_line_is_read_and_comments_are_skipped() -> None:
    parsed = parse_fstab(FSTAB)
    assert [e.mountpoint for e in parsed] == [
        "/",
        "/home",
        "/boot/efi",
        "/srv/My Data",
        "/srv/vault",
        "none",
        "/mnt/media",
        "/tmp",
        "/short",
    ]
    assert [e.line for e in parsed][:3] == [4, 7, 8]


def test_fields_escapes_and_defaults() -> None:
    by = {e.mountpoint: e for e in parse_fstab(FSTAB)}
    data = by["/srv/My Data"]
    assert data.source == "PARTLABEL=srv data"
    assert data.tag == ("PARTLABEL", "srv data")
    assert data.fstype == "xfs"
    assert (data.freq, data.passno) == (0, 0)
    short = by["/short"]  # only two fields: the rest as mount(8) fills them
    assert (short.fstype, short.options, short.freq, short.passno) == ("auto", ("defaults",), 0, 0)
    assert by["/"].passno == 1
    assert by["/home"].tag == ("LABEL", "home")  # libmount strips the quotes of a tag


def test_options_noauto_nofail_and_systemd() -> None:
    by = {e.mountpoint: e for e in parse_fstab(FSTAB)}
    assert by["/home"].nofail and not by["/home"].noauto
    assert by["/srv/My Data"].noauto and not by["/srv/My Data"].nofail
    assert by["/srv/My Data"].systemd_options == {"automount": "", "idle-timeout": "60"}
    assert by["/srv/vault"].systemd_options == {"requires": "cryptsetup@vault.service"}
    assert by["/"].systemd_options == {}


def test_a_path_under_an_unmounted_fstab_mount_waits_for_it() -> None:
    parsed = parse_fstab(FSTAB)
    home = mount_for("/home/alice/.cache", parsed, ROOT_ONLY)
    assert home is not None
    assert home.mountpoint == "/home"
    assert home.describe() == 'LABEL="home" on /home (ext4), fstab line 7 (nofail)'
    data = mount_for(Path("/srv/My Data/www"), parsed, ROOT_ONLY)
    assert data is not None and data.mountpoint == "/srv/My Data"


def test_a_path_whose_fstab_mount_is_mounted_waits_for_nothing() -> None:
    mounted = MountTable(
        parse_mountinfo(
            "26 1 8:2 / / rw - ext4 /dev/sda2 rw\n40 26 8:3 / /home rw - ext4 /dev/sda3 rw\n"
        )
    )
    parsed = parse_fstab(FSTAB)
    assert mount_for("/home/alice", parsed, mounted) is None
    assert mount_for("/var/log", parsed, ROOT_ONLY) is None  # on /, which is mounted
    assert mount_for("/srv", parsed, ROOT_ONLY) is None  # above /srv/My Data, not under it
    assert mount_for("/srv/My", parsed, ROOT_ONLY) is None  # a prefix is not a parent


def test_swap_and_none_never_hold_a_path() -> None:
    parsed = parse_fstab("UUID=x none swap sw 0 0\n/dev/sdb1 swap swap defaults 0 0\n")
    assert mount_for("/none/x", parsed, ROOT_ONLY) is None
    assert mount_for("swap", parsed, ROOT_ONLY) is None


def test_tags_resolve_through_dev_disk(tmp_path: Path) -> None:
    (tmp_path / "sda3").touch()
    for by, name in [
        ("by-uuid", "9d3c2b1a-8e7f"),
        ("by-label", r"my\x20disk"),
        ("by-partuuid", "0b6e3c4d-01"),
        ("by-partlabel", r"srv\x20data"),
    ]:
        (tmp_path / by).mkdir()
        (tmp_path / by / name).symlink_to(tmp_path / "sda3")
    node = str(tmp_path / "sda3")
    assert resolve_source("UUID=9D3C2B1A-8E7F", tmp_path) == node  # case as blkid prints it
    assert resolve_source('LABEL="my disk"', tmp_path) == node
    assert resolve_source("PARTUUID=0b6e3c4d-01", tmp_path) == node
    assert resolve_source("PARTLABEL=srv data", tmp_path) == node
    assert resolve_source("LABEL=absent", tmp_path) is None
    assert resolve_source("fileserver:/export", tmp_path) is None


def test_unresolved_tags_ask_the_lookup(tmp_path: Path) -> None:
    asked: list[tuple[str, str]] = []

    def lookup(tag: str, value: str) -> str | None:
        asked.append((tag, value))
        return "/dev/sdq1"

    assert resolve_source("label=backup", tmp_path, lookup) == "/dev/sdq1"
    assert asked == [("LABEL", "backup")]


def test_dev_paths_resolve_to_the_node(tmp_path: Path) -> None:
    assert resolve_source("/dev/null", tmp_path) == "/dev/null"
    assert resolve_source("/dev/does-not-exist", tmp_path) is None


@pytest.mark.parametrize(
    ("value", "encoded"),
    [
        ("my disk", r"my\x20disk"),
        ("a/b", r"a\x2fb"),
        ("back\\slash", r"back\x5cslash"),
        ("ok-_.:#+=@", "ok-_.:#+=@"),
        ("Bücher", "Bücher"),
    ],
)
def test_udev_name_encoding(value: str, encoded: str) -> None:
    assert encode_udev_name(value) == encoded


def test_a_missing_fstab_is_empty(tmp_path: Path) -> None:
    assert read_fstab(tmp_path / "fstab") == []
    (tmp_path / "fstab").write_text("LABEL=x /x ext4 defaults 0 0\n")
    assert [e.mountpoint for e in read_fstab(tmp_path / "fstab")] == ["/x"]
