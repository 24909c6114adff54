"""The .deb, installed with apt from a local repository into a clean trixie container
that boots systemd, used the way the README tells a user to, crashed, upgraded, purged.

The tests run in file order against one container and build on each other (install,
configure, enable, ... purge); each step asserts what a user would notice: bytes on
the container's disk (read from the host, below every mount made inside), what PID 1's
mountinfo shows, unit states and exit codes.
"""

from __future__ import annotations

import json
import re
import shlex
import stat

import pytest

from tests.container.conftest import Container

pytestmark = pytest.mark.container

ONE = "/srv/asd-one"
TWO = "/var/lib/asd-two"
TARGETS = (ONE, TWO)
VOLATILE = "/tmp"
CONF = f"""# written by tests/container/test_deb.py
WHATTOSYNC=('{ONE}' '{TWO}')
VOLATILE="{VOLATILE}"
"""
# The seed's drop-in, verbatim.
FREQUENCY = """[Unit]
Description=Timer for Anything-sync-daemon - 10min

[Timer]
OnUnitActiveSec=
OnUnitActiveSec=10min
"""
UNITS = ("asd.service", "asd-resync.service", "asd-resync.timer", "asd-sleep.service")


def in_ram(box: Container) -> dict[str, str]:
    return {p: t for p, t in box.mounted_under(*TARGETS) if p in TARGETS}


def asd_mounts(box: Container) -> list[tuple[str, str]]:
    """Everything asd could have left mounted: on or beside a target, or in VOLATILE."""
    beside = [f"{t.rsplit('/', 1)[0]}/.{t.rsplit('/', 1)[1]}-backup_asd" for t in TARGETS]
    return box.mounted_under(*TARGETS, *beside, f"{VOLATILE}/asd-root")


def disk_text(box: Container, path: str) -> str | None:
    f = box.disk(path)
    return f.read_text() if f.exists() else None


def timer_left_usec(box: Container) -> int:
    """Microseconds until asd-resync.timer next fires, by list-timers' wall-clock "next"."""
    # JSON "next" (and "left") hold the absolute time of the next elapse
    done = box.out("systemctl list-timers --all --output=json asd-resync.timer; date +%s%6N")
    *listing, now = done.strip().splitlines()
    timers = json.loads("\n".join(listing))
    assert len(timers) == 1, timers
    return int(timers[0]["next"]) - int(now)


def test_install_from_local_repository(deb_box: Container) -> None:
    box = deb_box
    box.run("apt-get update -o Acquire::Languages=none")
    box.run("DEBIAN_FRONTEND=noninteractive apt-get install -y anything-sync-daemon")
    assert box.out("dpkg-query -W -f '${Status}' anything-sync-daemon") == "install ok installed"
    assert "/etc/asd.conf" in box.out("dpkg-query -W -f '${Conffiles}' anything-sync-daemon")
    files = box.out("dpkg -L anything-sync-daemon").split()
    for f in (
        "/usr/bin/asd",
        "/usr/bin/anything-sync-daemon",
        "/usr/lib/systemd/system-generators/asd-generator",
        "/usr/share/man/man1/asd.1.gz",
        "/usr/share/man/man5/asd.conf.5.gz",
        "/usr/share/bash-completion/completions/asd",
        "/usr/share/zsh/vendor-completions/_asd",
        *(f"/usr/lib/systemd/system/{u}" for u in UNITS),
    ):
        assert f in files, f
    assert (
        box.out("asd --version")
        .strip()
        .endswith(box.out("dpkg-query -W -f '${Version}' anything-sync-daemon").split("-")[0])
    )
    assert "WHATTOSYNC" in box.out("MANWIDTH=80 man asd.conf 2>/dev/null")
    assert "resync" in box.out("MANWIDTH=80 man anything-sync-daemon 2>/dev/null")
    completion = box.out(
        "bash -c '. /usr/share/bash-completion/completions/asd;"
        " complete -p asd anything-sync-daemon'"
    )
    assert completion.count("-F _asd") == 2, completion
    # enabled by the package, but the stock config (no targets) skips the start
    assert box.systemctl("is-enabled", "asd.service").stdout.strip() == "enabled"
    assert box.systemctl("is-enabled", "asd-sleep.service").stdout.strip() == "enabled"
    assert box.show("asd.service", "ActiveState") == "inactive"  # not "failed"
    assert box.show("asd.service", "Result") == "exec-condition"


def test_units_verify_clean(deb_box: Container) -> None:
    units = " ".join(f"/usr/lib/systemd/system/{u}" for u in UNITS)
    done = deb_box.run(f"systemd-analyze verify {units}", check=False)
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip() == "", done.stderr


def test_config_error_fails_the_unit_and_generator_writes_nothing(deb_box: Container) -> None:
    box = deb_box
    box.write("/etc/asd.conf", "WHATTOSYNC=('/srv/x')\nNOT_A_SETTING=1\n")
    box.run("systemctl daemon-reload")
    assert box.run("ls /run/systemd/generator/asd.service.d/", check=False).stdout == ""
    assert box.show("asd.service", "RequiresMountsFor") == ""
    # the condition lets a broken config through to `asd sync`, which refuses it
    assert box.systemctl("start", "asd.service", check=False).returncode != 0
    assert box.show("asd.service", "ActiveState") == "failed"
    assert box.show("asd.service", "ExecMainStatus") == "2"
    assert "/etc/asd.conf:2" in box.out("journalctl -b -u asd.service --no-pager -o cat")
    box.run("systemctl reset-failed asd.service")


def test_generator_output_reads_back_exactly_in_systemd(deb_box: Container) -> None:
    """A path with a space, a quote, a backslash and a % survives the drop-in."""
    box = deb_box
    odd = '/srv/odd name "q" back\\slash 100%'
    box.write("/root/odd.conf", f"WHATTOSYNC=('{odd}')\nVOLATILE=/tmp\n")
    box.run(
        "ASDCONF=/root/odd.conf /usr/lib/systemd/system-generators/asd-generator /root/gen"
        " && mkdir -p /run/systemd/system"
        " && printf '[Service]\\nType=oneshot\\nExecStart=/bin/true\\n'"
        " > /run/systemd/system/asd-odd.service"
        " && cp -r /root/gen/asd.service.d /run/systemd/system/asd-odd.service.d"
        " && systemctl daemon-reload"
    )
    # systemctl show quotes a word with spaces again, C-style
    needs = shlex.split(box.show("asd-odd.service", "RequiresMountsFor"))
    assert sorted(needs) == sorted([odd, "/tmp"])
    box.run("rm -r /run/systemd/system/asd-odd.service* /root/gen && systemctl daemon-reload")


def test_generator_adds_mount_dependencies(deb_box: Container) -> None:
    box = deb_box
    box.write("/etc/asd.conf", CONF)
    box.write(f"{ONE}/hello.txt", "one: written before sync")
    box.write(f"{TWO}/deep/er/file.txt", "two: written before sync")
    box.run("systemctl daemon-reload")
    needs = box.show("asd.service", "RequiresMountsFor").split()
    assert set(needs) >= {ONE, TWO, VOLATILE}
    # systemd-analyze runs the generators itself here, and has nothing to say
    done = box.run("systemd-analyze verify --generators=yes asd.service", check=False)
    assert (done.returncode, done.stderr.strip()) == (0, "")


def test_enable_now_serves_targets_from_ram(deb_box: Container) -> None:
    box = deb_box
    box.run("systemctl enable --now asd.service")
    box.settle()
    assert box.show("asd.service", "ActiveState") == "active"
    assert in_ram(box) == {ONE: "tmpfs", TWO: "tmpfs"}
    assert box.out(f"cat {ONE}/hello.txt") == "one: written before sync"
    assert box.out(f"cat {TWO}/deep/er/file.txt") == "two: written before sync"
    # the resync that asd.service wants ran, and it started the timer
    assert int(box.show("asd-resync.service", "ExecMainStartTimestampMonotonic")) > 0
    assert box.show("asd-resync.service", "Result") == "success"
    assert box.show("asd-resync.timer", "ActiveState") == "active"
    # The change tracker outlived `asd sync`, in asd.service's own cgroup, and the resync
    # that ran from another unit did not take it down.
    assert "change tracker: running" in box.out("asd parse")
    pid = box.out("pgrep -x asd-tracker").strip()
    assert "/asd.service" in box.out(f"cat /proc/{pid}/cgroup")


def test_resync_puts_ram_writes_on_disk(deb_box: Container) -> None:
    box = deb_box
    box.write(f"{ONE}/new.txt", "one: written in RAM")
    assert disk_text(box, f"{ONE}/new.txt") is None  # only in RAM so far
    box.run("systemctl start asd-resync.service")
    assert box.show("asd-resync.service", "Result") == "success"
    assert disk_text(box, f"{ONE}/new.txt") == "one: written in RAM"
    assert disk_text(box, f"{TWO}/deep/er/file.txt") == "two: written before sync"
    assert in_ram(box) == {ONE: "tmpfs", TWO: "tmpfs"}


def test_sleep_unit_resyncs(deb_box: Container) -> None:
    box = deb_box
    assert "asd-sleep.service" in box.show("sleep.target", "Wants").split()
    box.write(f"{TWO}/before-suspend.txt", "two: written before suspend")
    box.run("systemctl start asd-sleep.service")
    assert box.show("asd-sleep.service", "Result") == "success"
    assert disk_text(box, f"{TWO}/before-suspend.txt") == "two: written before suspend"


def test_frequency_dropin_takes_effect(deb_box: Container) -> None:
    box = deb_box
    assert "OnUnitActiveUSec=1h" in box.show("asd-resync.timer", "TimersMonotonic")
    assert timer_left_usec(box) > 10 * 60 * 1_000_000
    box.write("/etc/systemd/system/asd-resync.timer.d/frequency.conf", FREQUENCY)
    box.run("systemctl daemon-reload")
    timers = box.show("asd-resync.timer", "TimersMonotonic")
    assert "OnUnitActiveUSec=10min" in timers
    assert "OnUnitActiveUSec=1h" not in timers  # (next_elapse= is a time since boot)
    assert 0 < timer_left_usec(box) <= 10 * 60 * 1_000_000


def test_stop_leaves_latest_data_on_disk_and_nothing_mounted(deb_box: Container) -> None:
    box = deb_box
    box.write(f"{ONE}/at-stop.txt", "one: written just before stop")
    box.run("systemctl stop asd.service")
    assert box.show("asd.service", "ActiveState") == "inactive"
    assert box.show("asd-resync.timer", "ActiveState") == "inactive"
    assert asd_mounts(box) == []
    assert box.run("pgrep -x asd-tracker", check=False).returncode == 1, "tracker left running"
    assert disk_text(box, f"{ONE}/at-stop.txt") == "one: written just before stop"
    assert box.out(f"cat {ONE}/at-stop.txt") == "one: written just before stop"
    # a manual resync while asd is stopped is skipped, and starts no timer
    box.run("systemctl start asd-resync.service")
    assert box.show("asd-resync.service", "Result") == "exec-condition"
    assert box.show("asd-resync.timer", "ActiveState") == "inactive"
    box.run("systemctl start asd.service")
    box.settle()
    assert in_ram(box) == {ONE: "tmpfs", TWO: "tmpfs"}
    assert box.show("asd-resync.timer", "ActiveState") == "active"


def test_crash_then_boot_recovers_last_resync(deb_box: Container) -> None:
    box = deb_box
    box.write(f"{ONE}/resynced.txt", "one: in the last resync")
    # `asd resync` itself, not `systemctl start asd-resync.service`: a resync the timer (or
    # the sleep unit) started just before would satisfy that start without seeing this write.
    # The unit path is checked by test_resync_puts_ram_writes_on_disk.
    box.run("asd resync")
    box.write(f"{ONE}/lost.txt", "one: after the last resync")
    box.write(f"{ONE}/resynced.txt", "one: changed after the last resync")
    assert box.out(f"ls -A {ONE.rsplit('/', 1)[0]}").count("crashrecovery") == 0

    box.kill_and_start()  # power cut: RAM (the container's tmpfs) is gone
    state = box.wait_booted()
    assert box.show("asd.service", "ActiveState") == "active", box.out(
        "journalctl -b -u asd.service --no-pager"
    )
    assert state == "running", box.out("systemctl --failed --no-pager")
    assert in_ram(box) == {ONE: "tmpfs", TWO: "tmpfs"}
    assert box.out(f"cat {ONE}/resynced.txt") == "one: in the last resync"
    assert box.run(f"test -e {ONE}/lost.txt", check=False).returncode == 1
    assert box.out(f"cat {TWO}/before-suspend.txt") == "two: written before suspend"

    parent = box.disk(ONE).parent
    snapshots = sorted(parent.glob(".asd-one-backup_asd-crashrecovery-*.tar.zstd"))
    assert len(snapshots) == 1, sorted(p.name for p in parent.iterdir())
    assert re.search(r"-\d{8}_\d{6}\.tar\.zstd$", snapshots[0].name)
    assert stat.S_IMODE(snapshots[0].stat().st_mode) == 0o600
    listing = box.out(f"tar --zstd -tf {ONE.rsplit('/', 1)[0]}/{snapshots[0].name}")
    assert "resynced.txt" in listing


def test_shutdown_writes_back_and_boot_syncs_again(deb_box: Container) -> None:
    box = deb_box
    box.write(f"{TWO}/at-shutdown.txt", "two: only in RAM when shutdown starts")
    box.stop()
    # read from the stopped container's own layer: asd's stop wrote it to disk
    assert (
        box.upper(f"{TWO}/at-shutdown.txt").read_text() == "two: only in RAM when shutdown starts"
    )
    box.start()
    assert box.wait_booted() == "running", box.out("systemctl --failed --no-pager")
    assert in_ram(box) == {ONE: "tmpfs", TWO: "tmpfs"}
    assert box.out(f"cat {TWO}/at-shutdown.txt") == "two: only in RAM when shutdown starts"
    # a clean shutdown is no crash: still only the one snapshot
    assert len(list(box.disk(ONE).parent.glob(".asd-one-backup_asd-crashrecovery-*"))) == 1


def test_upgrade_while_running_loses_nothing(deb_box: Container) -> None:
    box = deb_box
    old = box.out("dpkg-query -W -f '${Version}' anything-sync-daemon")
    box.write(f"{TWO}/before-upgrade.txt", "two: only in RAM when the upgrade starts")
    box.run(
        "printf 'Types: deb\\nURIs: file:/srv/out/deb-upgrade\\nSuites: ./\\nTrusted: yes\\n'"
        " > /etc/apt/sources.list.d/asd-upgrade.sources"
        " && apt-get update -o Acquire::Languages=none"
        " && DEBIAN_FRONTEND=noninteractive apt-get install -y anything-sync-daemon"
    )
    new = box.out("dpkg-query -W -f '${Version}' anything-sync-daemon")
    assert new != old and new.endswith("+upgrade1"), (old, new)
    assert box.show("asd.service", "ActiveState") == "active"
    assert in_ram(box) == {ONE: "tmpfs", TWO: "tmpfs"}
    # the old version's stop wrote it back before dpkg replaced the files
    assert disk_text(box, f"{TWO}/before-upgrade.txt") == "two: only in RAM when the upgrade starts"
    assert box.out(f"cat {TWO}/before-upgrade.txt") == "two: only in RAM when the upgrade starts"
    assert box.out(f"cat {ONE}/resynced.txt") == "one: in the last resync"
    journal = box.out("journalctl -b -u asd.service --no-pager -o cat")
    assert "Stopping" in journal or "Stopped" in journal, journal


def test_purge_stops_first_data_on_disk_nothing_mounted(deb_box: Container) -> None:
    """In overlay mode, so that the stop keeps a lower tree in each target: the removal
    deletes those, and leaves the crash-recovery snapshot alone."""
    box = deb_box
    box.run(
        "systemctl stop asd.service && echo 'USE_OVERLAYFS=\"yes\"' >> /etc/asd.conf"
        " && systemctl start asd.service"
    )
    box.settle()
    assert in_ram(box) == {ONE: "overlay", TWO: "overlay"}
    assert box.disk(f"{ONE}/.asd-work/lower").is_dir()
    box.write(f"{ONE}/before-purge.txt", "one: only in RAM when purge starts")
    box.run("DEBIAN_FRONTEND=noninteractive apt-get purge -y anything-sync-daemon")
    assert box.run("dpkg-query -W anything-sync-daemon", check=False).stdout.strip() in (
        "",
        "anything-sync-daemon\t",
    )
    assert asd_mounts(box) == []
    assert box.run("test -e /etc/asd.conf", check=False).returncode == 1
    assert box.run("command -v asd", check=False).returncode != 0
    # the prerm ran asd after py3clean: it must not have left bytecode behind
    assert box.run("test -e /usr/lib/python3/dist-packages/asd", check=False).returncode == 1
    for path, text in (
        (f"{ONE}/before-purge.txt", "one: only in RAM when purge starts"),
        (f"{ONE}/resynced.txt", "one: in the last resync"),
        (f"{TWO}/before-upgrade.txt", "two: only in RAM when the upgrade starts"),
        (f"{TWO}/deep/er/file.txt", "two: written before sync"),
    ):
        assert disk_text(box, path) == text, path
    leftovers = [p.name for p in box.disk("/srv").iterdir() if p.name.endswith("-backup_asd")]
    assert leftovers == []
    for target in TARGETS:
        assert not box.disk(f"{target}/.asd-work").exists(), target
    assert len(list(box.disk(ONE).parent.glob(".asd-one-backup_asd-crashrecovery-*"))) == 1
