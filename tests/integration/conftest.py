"""Integration tier: real tmpfs, bind and overlay mounts and rsync, as root.

Each test gets a `World`: a disk directory on a real file system (under /var/tmp) and a
private mount namespace (`unshare -m --propagation private`) holding its own tmpfs on /run
and on VOLATILE. Commands run inside it with `nsenter`. Nothing is mounted in the host's
namespace, so from the test process the targets show their disk copies, while inside the
namespace they show the RAM copies. `power_cut()` kills every process of the namespace:
every mount and all RAM are gone, the disk stays — then `boot()` makes a fresh namespace.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

if os.geteuid() != 0 or shutil.which("unshare") is None or shutil.which("rsync") is None:
    pytest.skip("integration tier needs root, unshare and rsync", allow_module_level=True)


class World:
    def __init__(self, base: Path, overlay: bool) -> None:
        self.base = base
        self.disk = base / "disk"
        self.volatile = base / "volatile"
        self.conf = base / "asd.conf"
        self.overlay = overlay
        self.disk.mkdir()
        self.volatile.mkdir()
        self.holder: subprocess.Popen[bytes] | None = None
        self.children: list[subprocess.Popen[bytes]] = []
        self.volatile_size = "256m"

    # ----- configuration ---------------------------------------------------------------
    def target(self, name: str) -> Path:
        path = self.disk / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def write_conf(self, *targets: Path, extra: str = "") -> Path:
        listed = " ".join(f"'{t}'" for t in targets)
        self.conf.write_text(
            f'WHATTOSYNC=({listed})\nVOLATILE="{self.volatile}"\n'
            f'USE_OVERLAYFS="{"yes" if self.overlay else "no"}"\n{extra}'
        )
        return self.conf

    # ----- the namespace ---------------------------------------------------------------
    def boot(self) -> None:
        assert self.holder is None
        script = (
            "mount -t tmpfs -o mode=0755 asd-test-run /run && "
            f"mount -t tmpfs -o size={self.volatile_size},mode=1777 asd-test-volatile "
            f"{self.volatile} && echo ready && exec sleep infinity"
        )
        self.holder = subprocess.Popen(
            ["unshare", "-m", "--propagation", "private", "sh", "-c", script],
            stdout=subprocess.PIPE,
            start_new_session=True,
        )
        assert self.holder.stdout is not None
        line = self.holder.stdout.readline()
        assert line.strip() == b"ready", "could not set up the test mount namespace"

    def _enter(self, argv: list[str]) -> list[str]:
        assert self.holder is not None, "boot() first"
        return ["nsenter", f"--mount=/proc/{self.holder.pid}/ns/mnt", f"--wd={REPO}", "--", *argv]

    def run(
        self, argv: list[str], *, check: bool = False, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        full_env = {**os.environ, **(env or {})}
        full_env.pop("ASDCONF", None)
        full_env.update(env or {})
        full_env["PYTHONPATH"] = str(REPO)
        proc = subprocess.run(
            self._enter(argv),
            capture_output=True,
            text=True,
            errors="surrogateescape",  # a path in the output may not be UTF-8
            env=full_env,
            cwd=REPO,
            check=False,
            timeout=300,
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"{argv} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
            )
        return proc

    def spawn(self, argv: list[str], *, capture: bool = False) -> subprocess.Popen[bytes]:
        pipe = subprocess.PIPE if capture else None
        proc = subprocess.Popen(self._enter(argv), start_new_session=True, stdout=pipe, stderr=pipe)
        self.children.append(proc)
        return proc

    def asd(
        self,
        *args: str,
        check: bool = False,
        env: dict[str, str] | None = None,
        prefix: tuple[str, ...] = (),
    ) -> subprocess.CompletedProcess[str]:
        return self.run(
            [*prefix, sys.executable, "-m", "asd", "-c", str(self.conf), *args],
            check=check,
            env=env,
        )

    def sh(self, script: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run a shell snippet inside the namespace (where targets show the RAM copies)."""
        return self.run(["sh", "-c", script], check=check)

    def mounts(self) -> str:
        return self.run(["cat", "/proc/self/mountinfo"], check=True).stdout

    def asd_mounts(self) -> list[str]:
        keep = (str(self.base), "asd-overlay")
        return [
            line
            for line in self.mounts().splitlines()
            if any(k in line for k in keep) and "asd-test-volatile" not in line
        ]

    def mounted_at(self, path: Path) -> int:
        """How many mounts are stacked at ``path`` inside the namespace."""
        from asd.mounts import parse_mountinfo

        return sum(m.mountpoint == str(path) for m in parse_mountinfo(self.mounts()))

    @staticmethod
    def namespace_pids(ns: str) -> list[int]:
        pids = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                with contextlib.suppress(OSError):
                    if os.readlink(f"/proc/{entry}/ns/mnt") == ns:
                        pids.append(int(entry))
        return pids

    def trackers(self) -> list[int]:
        """The pids of asd change trackers running in this namespace."""
        assert self.holder is not None
        ns = os.readlink(f"/proc/{self.holder.pid}/ns/mnt")
        out = []
        for pid in self.namespace_pids(ns):
            with contextlib.suppress(OSError):
                if Path(f"/proc/{pid}/comm").read_text().strip() == "asd-tracker":
                    out.append(pid)
        return out

    def power_cut(self) -> None:
        """Every process of the namespace dies at once: mounts and RAM are gone, disk stays.
        That includes those started inside it in sessions of their own (asd's change
        tracker), found by their mount namespace."""
        if self.holder is not None:
            with contextlib.suppress(OSError):
                ns = os.readlink(f"/proc/{self.holder.pid}/ns/mnt")
                for pid in self.namespace_pids(ns):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
        for proc in [*self.children, self.holder]:
            if proc is None:
                continue
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        self.children.clear()
        self.holder = None


@contextmanager
def booted_world(*, overlay: bool) -> Iterator[World]:
    """A fresh World, booted; afterwards its namespace is gone and its directory removed."""
    base = Path(tempfile.mkdtemp(prefix="asd-it-", dir="/var/tmp"))
    base.chmod(0o755)  # the unprivileged "local user" of some tests must reach VOLATILE
    w = World(base, overlay=overlay)
    w.boot()
    try:
        yield w
    finally:
        if w.holder is not None:
            w.power_cut()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(params=["copy", "overlay"])
def world(request: pytest.FixtureRequest) -> Iterator[World]:
    with booted_world(overlay=request.param == "overlay") as w:
        yield w


@pytest.fixture
def copy_world() -> Iterator[World]:
    with booted_world(overlay=False) as w:
        yield w


@pytest.fixture
def overlay_world() -> Iterator[World]:
    with booted_world(overlay=True) as w:
        yield w


def snapshot_of_v1_and_v2_in_ram(world: World, name: str) -> Path:
    """A target whose file ``f`` read "v1" when a crash left its snapshot (taken by the
    recovery at the next sync) and reads "v2" in RAM now."""
    target = world.target(name)
    (target / "f").write_text("v1\n")
    world.write_conf(target)
    world.asd("sync", check=True)
    world.power_cut()
    world.boot()
    world.asd("sync", check=True)  # recovery takes the snapshot of v1
    world.sh(f"echo v2 > {target}/f")
    return target


def populate(root: Path) -> None:
    """A tree with everything guarantee 1 names: owners, modes, times, xattrs, ACLs,
    symlinks, sparse files and hard links, plus awkward names."""
    (root / "docs" / "deep" / "er").mkdir(parents=True)
    (root / "docs" / "a.txt").write_text("alpha\n")
    (root / "docs" / "deep" / "er" / "b.txt").write_text("bravo\n" * 100)
    (root / "name with spaces").write_text("spaces\n")
    (root / os.fsdecode(b"latin-\xe9")).write_text("not utf-8\n")
    (root / "empty-dir").mkdir()
    private = root / "private"
    private.write_text("secret\n")
    os.chmod(private, 0o600)
    os.chown(private, 1234, 1234)
    (root / "exec.sh").write_text("#!/bin/sh\n")
    os.chmod(root / "exec.sh", 0o4755)  # noqa: S103 - a setuid bit must survive the round trip
    os.symlink("docs/a.txt", root / "rel-link")
    os.symlink("/etc/hostname", root / "abs-link")
    os.symlink("nowhere", root / "dangling")
    with open(root / "sparse.img", "wb") as fh:
        fh.truncate(32 * 1024 * 1024)
        fh.seek(4096)
        fh.write(b"data in the middle")
    with open(root / "app.log", "w") as fh:  # large enough to be patched in place (asd.patch)
        fh.writelines(f"{i:06d} a service said something\n" for i in range(4000))
    (root / "hard1").write_text("linked\n")
    os.link(root / "hard1", root / "docs" / "hard2")
    os.setxattr(root / "docs" / "a.txt", "user.colour", b"blue")
    subprocess.run(["setfacl", "-m", "u:1234:r", str(root / "docs" / "a.txt")], check=True)
    subprocess.run(["setfacl", "-d", "-m", "u:1234:rx", str(root / "docs")], check=True)
    os.utime(root / "docs" / "a.txt", ns=(1_600_000_000_000_000_000, 1_500_000_000_123_456_789))
    os.utime(root / "docs", ns=(1_600_000_000_000_000_000, 1_400_000_000_000_000_000))
    os.utime(root, ns=(1_600_000_000_000_000_000, 1_300_000_000_000_000_000))


# A user's session in RAM: modify, append, chmod, xattr, ACL, new hard link, rename,
# delete (file and tree), new directory tree, type change, new symlink.
CHANGES = r"""
set -e
cd "$1"
echo changed > docs/a.txt
echo "one more line" >> app.log
printf 'in the middle' | dd of=sparse.img bs=1 seek=16777216 conv=notrunc status=none
echo more >> name\ with\ spaces
chmod 640 docs/deep/er/b.txt
setfattr -n user.mood -v happy docs/deep/er/b.txt
setfacl -m u:4321:rw private
ln docs/deep/er/b.txt b-link
mv exec.sh renamed.sh
rm docs/hard2
rm -r empty-dir
mkdir -p new/tree && echo fresh > new/tree/file && chown 1234:1234 new/tree/file
rm rel-link && mkdir rel-link && echo now-a-dir > rel-link/x
ln -s new/tree/file new-link
touch -d '2001-02-03 04:05:06' new/tree
"""
