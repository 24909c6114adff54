"""`make install` from the source tree into a trixie container booting systemd.

The source tarball (out/src, what the packages are built from) is unpacked in the
container and installed with the top-level `make install` (PREFIX=/usr/local): the
units and generator land in /usr/local/lib/systemd, which systemd searches, and point
at /usr/local/bin/asd. Then the service runs from those files.
"""

from __future__ import annotations

import pytest

from tests.container.conftest import Container

pytestmark = pytest.mark.container

TARGET = "/var/lib/src-target"


def test_make_install_then_service_runs(src_box: Container) -> None:
    box = src_box
    box.run(
        "mkdir -p /root/src && tar -xzf /srv/out/src/*.tar.gz -C /root/src --strip-components=1"
        " && make -C /root/src install",
        timeout=600,
    )
    for path in (
        "/usr/local/bin/asd",
        "/usr/local/lib/systemd/system/asd.service",
        "/usr/local/lib/systemd/system-generators/asd-generator",
        "/usr/local/lib/asd/asd-has-targets",
        "/usr/local/share/man/man1/asd.1",
        "/usr/local/share/man/man5/asd.conf.5",
        "/usr/local/share/bash-completion/completions/asd",
        "/usr/local/share/zsh/site-functions/_asd",
        "/etc/asd.conf",
    ):
        assert box.run(f"test -e {path}", check=False).returncode == 0, path
    assert box.show("asd.service", "FragmentPath") == "/usr/local/lib/systemd/system/asd.service"
    assert "/usr/local/bin/asd" in box.show("asd.service", "ExecStart")

    box.run(f"mkdir -p {TARGET} && echo 'before sync' > {TARGET}/a.txt")
    box.write("/etc/asd.conf", f"WHATTOSYNC=('{TARGET}')\n")
    box.run("systemctl daemon-reload && systemctl enable --now asd.service")
    box.settle()
    assert TARGET in box.show("asd.service", "RequiresMountsFor").split()
    assert (TARGET, "tmpfs") in box.mounted_under(TARGET)
    box.run(f"echo 'in RAM' > {TARGET}/b.txt && systemctl start asd-resync.service")
    assert box.disk(f"{TARGET}/b.txt").read_text() == "in RAM\n"
    box.run(f"echo 'before stop' > {TARGET}/c.txt && systemctl stop asd.service")
    assert box.mounted_under(TARGET, "/tmp/asd-root") == []
    assert box.disk(f"{TARGET}/c.txt").read_text() == "before stop\n"

    # installing again while asd runs: asd is stopped first (the data goes to disk
    # with the code that mounted it), started again after, the config is kept
    box.run("systemctl start asd.service")
    box.settle()
    box.run(f"echo 'before reinstall' > {TARGET}/d.txt")
    box.run("make -C /root/src install", timeout=600)
    assert TARGET in box.out("cat /etc/asd.conf")
    assert box.disk(f"{TARGET}/d.txt").read_text() == "before reinstall\n"
    assert box.show("asd.service", "ActiveState") == "active"
    assert (TARGET, "tmpfs") in box.mounted_under(TARGET)
    assert box.out("find /usr -name 'anything_sync_daemon-*.dist-info' | wc -l").strip() == "1"
