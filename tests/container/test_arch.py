"""The Arch package: built by makepkg from packaging/arch/PKGBUILD, installed by pacman.

No Arch userland is reachable from here, so this runs on Debian trixie with Debian's
makepkg and pacman 7 (the asd-build image, booting systemd). What it covers:
- makepkg builds the package from the PKGBUILD (build() with python -m build
  --wheel --no-isolation, check() with the unit tier, package() with python -m
  installer), with --nodeps because pacman's database knows no Arch packages;
- the package's .PKGINFO (name, version, arch, depends, backup) and its file list;
- `pacman -U --nodeps --nodeps` installs it (twice: skip the dependency checks
  entirely, as pacman's database holds none of them) and runs the .install
  scriptlet; then asd.service from the installed files syncs (in overlay mode),
  resyncs and unsyncs real data, and `pacman -R` stops asd first.
What it does not cover: Arch's python (the code runs on Debian's python3 from
/usr/lib/python3/dist-packages, see docker/build-arch.sh), Arch's python-sh and
python-pyudev, or pacman resolving the dependencies.
"""

from __future__ import annotations

import pytest

from tests.container.conftest import Container

pytestmark = pytest.mark.container

TARGET = "/srv/arch-target"
DEPENDS = [
    "python",
    "python-pyudev",
    "python-sh",
    "coreutils",
    "findutils",
    "rsync",
    "zstd",
    "tar",
    "util-linux",
]


def package(box: Container) -> str:
    found = box.out("ls /srv/out/arch/*.pkg.tar.*").split()
    assert len(found) == 1, found
    return found[0]


def pkginfo(box: Container) -> dict[str, list[str]]:
    info: dict[str, list[str]] = {}
    for line in box.out(f"bsdtar -xOf {package(box)} .PKGINFO").splitlines():
        if " = " in line and not line.startswith("#"):
            key, value = line.split(" = ", 1)
            info.setdefault(key, []).append(value)
    return info


def test_pkginfo(arch_box: Container) -> None:
    info = pkginfo(arch_box)
    version = arch_box.out("sed -n 's/^pkgver=//p' /srv/out/arch/PKGBUILD").strip()
    assert info["pkgname"] == ["anything-sync-daemon"]
    assert info["pkgver"] == [f"{version}-1"]
    assert info["arch"] == ["any"]
    assert info["depend"] == DEPENDS
    assert info["backup"] == ["etc/asd.conf"]
    assert {"python-build", "python-installer", "python-wheel"} <= set(info["makedepend"])


def test_file_list(arch_box: Container) -> None:
    files = set(arch_box.out(f"bsdtar -tf {package(arch_box)}").split())
    for f in (
        "etc/asd.conf",
        "usr/bin/asd",
        "usr/bin/anything-sync-daemon",
        "usr/lib/systemd/system/asd.service",
        "usr/lib/systemd/system/asd-resync.service",
        "usr/lib/systemd/system/asd-resync.timer",
        "usr/lib/systemd/system/asd-sleep.service",
        "usr/lib/systemd/system-generators/asd-generator",
        "usr/lib/asd/asd-has-targets",
        "usr/share/man/man1/asd.1.gz",
        "usr/share/man/man1/anything-sync-daemon.1.gz",
        "usr/share/man/man5/asd.conf.5.gz",
        "usr/share/bash-completion/completions/asd",
        "usr/share/zsh/site-functions/_asd",
        ".INSTALL",
    ):
        assert f in files, f
    assert any(f.endswith("/asd/cli.py") and f.startswith("usr/lib/python3") for f in files)
    assert not any(f.startswith("usr/local/") for f in files)


def test_pacman_install_and_run(arch_box: Container) -> None:
    box = arch_box
    box.run(f"pacman -U --noconfirm --nodeps --nodeps {package(box)}")
    assert "anything-sync-daemon" in box.out("pacman -Q anything-sync-daemon")
    owned = box.out("pacman -Qlq anything-sync-daemon").split()
    assert "/usr/lib/systemd/system/asd.service" in owned
    box.run(f"mkdir -p {TARGET} && echo 'on disk before sync' > {TARGET}/a.txt")
    # overlay mode here (the .deb test covers copy mode): the upper dir lives on the
    # container's /tmp tmpfs, over a lower tree on the container's disk
    box.write("/etc/asd.conf", f"WHATTOSYNC=('{TARGET}')\nUSE_OVERLAYFS=yes\n")
    box.run("systemctl daemon-reload")
    assert TARGET in box.show("asd.service", "RequiresMountsFor").split()

    box.run("systemctl enable --now asd.service")
    box.settle()
    assert box.show("asd.service", "ActiveState") == "active"
    assert (TARGET, "overlay") in box.mounted_under(TARGET)
    box.run(f"echo 'written in RAM' > {TARGET}/b.txt")
    assert not box.disk(f"{TARGET}/b.txt").exists()
    box.run("systemctl start asd-resync.service")
    assert box.disk(f"{TARGET}/b.txt").read_text() == "written in RAM\n"
    # 2 MB in the upper layer: the resync gives that RAM back, under systemd, and the target
    # shows the same file from the next overlay (its upper layer is upper.1).
    box.run(
        f"head -c 2000000 /dev/urandom > {TARGET}/big.bin && sha256sum {TARGET}/big.bin > /root/sum"
    )
    box.run("systemctl start asd-resync.service")
    assert "of RAM back" in box.out("journalctl -u asd-resync.service --no-pager")
    assert "/upper.1," in box.out(f"grep ' {TARGET} ' /proc/self/mountinfo")
    box.run("sha256sum -c /root/sum")

    box.run(f"echo 'written before stop' > {TARGET}/c.txt")
    box.run("systemctl stop asd.service")
    assert box.mounted_under(TARGET, "/tmp/asd-root") == []
    assert box.disk(f"{TARGET}/c.txt").read_text() == "written before stop\n"
    assert box.disk(f"{TARGET}/a.txt").read_text() == "on disk before sync\n"
    assert box.disk(f"{TARGET}/big.bin").stat().st_size == 2000000


def test_pacman_remove_stops_asd_first(arch_box: Container) -> None:
    box = arch_box
    box.run("systemctl start asd.service")
    box.settle()
    assert (TARGET, "overlay") in box.mounted_under(TARGET)
    box.run(f"echo 'only in RAM at removal' > {TARGET}/d.txt")
    box.run("pacman -R --noconfirm anything-sync-daemon")
    assert box.mounted_under(TARGET, "/tmp/asd-root") == []
    assert box.disk(f"{TARGET}/d.txt").read_text() == "only in RAM at removal\n"
    # the stop kept overlay mode's lower tree; the removal deleted it
    assert not box.disk(f"{TARGET}/.asd-work").exists()
    # backup= keeps the edited config as .pacsave
    assert box.run("test -e /etc/asd.conf.pacsave", check=False).returncode == 0
