"""Container tier: the built packages, installed into clean systemd containers.

pytest-docker starts the services of docker/compose.yml (systemd as PID 1, network
none) once per session. Before that, these fixtures make sure that a Docker engine
answers (docker/engine.sh starts Debian's dockerd --bridge=none when none does), that
the images exist and are fresh (docker/images.sh), and that out/ holds the packages
(docker/build.sh; `make test-container` builds them first and sets
ASD_PACKAGES_BUILT=1 so they are not built twice).

`--privileged` is refused on hosts whose capability bounding set lacks a capability
(CAP_SYS_RESOURCE on our CI hosts), so the containers get `cap_add` of every
capability this process's bounding set holds and the engine knows, from a compose
override written at run time.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import time
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

TOP = Path(__file__).resolve().parents[2]
DOCKER = TOP / "docker"
OUT = Path(os.environ.get("ASD_OUT", str(TOP / "out")))
LABEL = "asd.container-test"

# Bit number -> name, as in linux/capability.h.
_CAPABILITY_TABLE = (
    "CHOWN DAC_OVERRIDE DAC_READ_SEARCH FOWNER FSETID KILL SETGID SETUID SETPCAP "
    "LINUX_IMMUTABLE NET_BIND_SERVICE NET_BROADCAST NET_ADMIN NET_RAW IPC_LOCK IPC_OWNER "
    "SYS_MODULE SYS_RAWIO SYS_CHROOT SYS_PTRACE SYS_PACCT SYS_ADMIN SYS_BOOT SYS_NICE "
    "SYS_RESOURCE SYS_TIME SYS_TTY_CONFIG MKNOD LEASE AUDIT_WRITE AUDIT_CONTROL SETFCAP "
    "MAC_OVERRIDE MAC_ADMIN SYSLOG WAKE_ALARM BLOCK_SUSPEND AUDIT_READ PERFMON BPF "
    "CHECKPOINT_RESTORE"
)
CAPABILITIES = tuple(_CAPABILITY_TABLE.split())


def sh(
    argv: list[str], *, check: bool = True, timeout: float = 900
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv, capture_output=True, text=True, check=check, timeout=timeout, stdin=subprocess.DEVNULL
    )


def bounding_capabilities(status: str) -> list[str]:
    match = re.search(r"^CapBnd:\s*([0-9a-fA-F]+)$", status, re.MULTILINE)
    assert match, "no CapBnd line in /proc/self/status"
    mask = int(match.group(1), 16)
    return [name for bit, name in enumerate(CAPABILITIES) if mask >> bit & 1]


def engine_capabilities(wanted: list[str], image: str) -> list[str]:
    """The capabilities in `wanted` that the engine accepts (an old engine knows fewer)."""
    caps = list(wanted)
    for _ in range(len(CAPABILITIES)):
        argv = ["docker", "create", "--network", "none"]
        argv += [f"--cap-add={c}" for c in caps] + [image, "true"]
        done = sh(argv, check=False)
        if done.returncode == 0:
            sh(["docker", "rm", done.stdout.strip()])
            return caps
        unknown = re.search(r'unknown capability: "?(?:CAP_)?([A-Z_]+)', done.stderr)
        if not unknown or unknown.group(1) not in caps:
            raise RuntimeError(f"docker create failed: {done.stderr.strip()}")
        caps.remove(unknown.group(1))
    raise RuntimeError("could not find a capability set the engine accepts")


# The tests of a module build on each other (install, configure, ... purge): after the
# first failure the rest of that module is skipped, so a hung asd costs one timeout,
# not one per test (the tier must stay inside CI's budget).
_FAILED: dict[str, str] = {}


def pytest_runtest_setup(item: pytest.Item) -> None:
    failed = _FAILED.get(str(item.path))
    if failed:
        pytest.skip(f"an earlier step of this module failed: {failed}")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.failed and call.when in ("setup", "call"):
        _FAILED.setdefault(str(item.path), item.name)
    return report


@pytest.fixture(scope="session")
def asd_engine() -> None:
    if os.geteuid() != 0:
        pytest.skip("the container tier needs root (it may start a Docker engine)")
    done = sh([str(DOCKER / "engine.sh")], check=False)
    if done.returncode != 0:
        pytest.skip(f"no Docker engine could be started: {done.stderr.strip()[-500:]}")
    # containers left behind by an interrupted run: their project is named after a
    # pytest process that no longer exists (a concurrent run's are left alone)
    listed = sh(
        [
            "docker",
            "ps",
            "-a",
            "--filter",
            f"label={LABEL}",
            "--format",
            '{{.ID}} {{.Label "com.docker.compose.project"}}',
        ]
    ).stdout
    stale = []
    for line in listed.splitlines():
        cid, _, project = line.partition(" ")
        pid = project.rpartition("-")[2]
        if not (pid.isdigit() and Path(f"/proc/{pid}").exists()):
            stale.append(cid)
    if stale:
        sh(["docker", "rm", "-f", *stale])


@pytest.fixture(scope="session")
def asd_images(asd_engine: None) -> None:
    sh([str(DOCKER / "images.sh"), "all"], timeout=3600)


def _newer(a: Path, b: Path) -> bool:
    return a.exists() and (not b.exists() or a.stat().st_mtime > b.stat().st_mtime)


@pytest.fixture(scope="session")
def asd_packages(asd_images: None) -> Path:
    """out/ with deb/, deb-upgrade/ and arch/ built from this tree."""
    built = os.environ.get("ASD_PACKAGES_BUILT") == "1"
    if not (built and (OUT / "deb" / "Packages").exists()):
        sh([str(DOCKER / "build.sh"), "deb"], timeout=3600)
    if not (built and list((OUT / "arch").glob("*.pkg.tar.*"))):
        sh([str(DOCKER / "build.sh"), "arch"], timeout=3600)
    if not (OUT / "deb-upgrade" / "Packages").exists() or _newer(
        OUT / "deb" / "Packages", OUT / "deb-upgrade" / "Packages"
    ):
        sh([str(DOCKER / "build.sh"), "deb-upgrade"], timeout=3600)
    return OUT


@pytest.fixture(scope="session")
def docker_compose_command() -> str:
    if sh(["docker", "compose", "version"], check=False).returncode == 0:
        return "docker compose"
    return "docker-compose"


@pytest.fixture(scope="session")
def docker_setup() -> list[str]:
    # no --build (the images are built above, without a registry) and no --wait
    # (compose v1 lacks it; Container.wait_booted waits for systemd instead)
    return ["up -d"]


@pytest.fixture(scope="session")
def docker_cleanup() -> list[str]:
    return ["down -v --timeout 30"]


@pytest.fixture(scope="session")
def docker_compose_project_name() -> str:
    return f"asd-container-{os.getpid()}"


@pytest.fixture(scope="session")
def docker_compose_file(
    asd_packages: Path, docker_compose_command: str, tmp_path_factory: pytest.TempPathFactory
) -> list[str]:
    caps = engine_capabilities(
        bounding_capabilities(Path("/proc/self/status").read_text()), "asd-test:trixie"
    )
    service: dict[str, object] = {"cap_add": caps}
    if docker_compose_command == "docker compose":
        # compose v2 knows the cgroup namespace setting; v1 leaves it to the engine,
        # whose default on a cgroup v1 host (and ours, started by engine.sh) is host
        service["cgroup"] = "host"
    services = {name: service for name in ("deb", "arch", "src")}
    override = {"version": "2.4", "services": services}
    path = tmp_path_factory.mktemp("compose") / "capabilities.yml"
    path.write_text(json.dumps(override, indent=2))  # JSON is YAML
    os.environ["ASD_OUT"] = str(asd_packages)
    return [str(DOCKER / "compose.yml"), str(path)]


@dataclass
class Container:
    """One running compose service: run commands in it, look at its disk from outside."""

    id: str

    def run(
        self, script: str, *, check: bool = True, timeout: float = 300
    ) -> subprocess.CompletedProcess[str]:
        done = sh(["docker", "exec", self.id, "sh", "-ec", script], check=False, timeout=timeout)
        if check and done.returncode != 0:
            raise AssertionError(
                f"in {self.id[:12]}: {script!r} exited {done.returncode}\n"
                f"stdout:\n{done.stdout}\nstderr:\n{done.stderr}"
            )
        return done

    def write(self, path: str, text: str) -> None:
        """Create `path` (and its parents) in the container holding exactly `text`."""
        script = 'mkdir -p "$(dirname "$1")" && cat > "$1"'
        argv = ["docker", "exec", "-i", self.id, "sh", "-ec", script, "sh", path]
        subprocess.run(argv, input=text, text=True, check=True, capture_output=True, timeout=60)

    def out(self, script: str) -> str:
        return self.run(script).stdout

    def systemctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.run("systemctl " + shlex.join(args), check=check)

    def show(self, unit: str, prop: str) -> str:
        return self.out(f"systemctl show -P {prop} {shlex.quote(unit)}").strip()

    def wait_booted(self, timeout: float = 120) -> str:
        """Wait until systemd has finished booting; return its state (running/degraded)."""
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            done = sh(["docker", "exec", self.id, "systemctl", "is-system-running"], check=False)
            state = done.stdout.strip()
            if state in ("running", "degraded"):
                return state
            time.sleep(0.5)
        raise AssertionError(f"systemd did not finish booting in {timeout} s (state {state!r})")

    def settle(self, timeout: float = 300) -> None:
        """Wait until systemd has no job queued or running.

        `systemctl start asd.service` returns when asd.service is up, while the resync
        it wants may still be running: a file written then could miss that resync, and a
        `systemctl start asd-resync.service` would join it instead of starting a new one.
        """
        deadline = time.monotonic() + timeout
        while self.out("systemctl list-jobs --no-legend").strip():
            assert time.monotonic() < deadline, self.out("systemctl list-jobs")
            time.sleep(0.2)

    def mounts(self) -> list[tuple[str, str]]:
        """(mount point, fstype) of every mount PID 1 sees, octal escapes decoded."""
        result = []
        for line in self.out("cat /proc/1/mountinfo").splitlines():
            fields = line.split(" ")
            sep = fields.index("-")
            point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4])
            result.append((point, fields[sep + 1]))
        return result

    def mounted_under(self, *paths: str) -> list[tuple[str, str]]:
        return [
            (p, t)
            for p, t in self.mounts()
            if any(p == x or p.startswith(x.rstrip("/") + "/") for x in paths)
        ]

    def disk(self, path: str) -> Path:
        """`path` on the container's root filesystem itself, below any mount made inside.

        The engine mounts the container's root in the host's mount namespace; asd's
        mounts live in the container's, so from here we see exactly what is on disk.
        """
        merged = sh(["docker", "inspect", "-f", "{{.GraphDriver.Data.MergedDir}}", self.id]).stdout
        return Path(merged.strip()) / path.lstrip("/")

    def upper(self, path: str) -> Path:
        """`path` in the container's writable layer: what it wrote to disk, even stopped."""
        upper = sh(["docker", "inspect", "-f", "{{.GraphDriver.Data.UpperDir}}", self.id]).stdout
        return Path(upper.strip()) / path.lstrip("/")

    def stop(self) -> None:
        """A clean shutdown: the engine sends the stop signal, SIGRTMIN+3, to systemd."""
        sh(["docker", "stop", "--time", "120", self.id], timeout=180)

    def start(self) -> None:
        sh(["docker", "start", self.id])

    def kill_and_start(self) -> None:
        sh(["docker", "kill", "--signal", "KILL", self.id])
        deadline = time.monotonic() + 60
        while (
            sh(["docker", "inspect", "-f", "{{.State.Running}}", self.id]).stdout.strip() == "true"
        ):
            assert time.monotonic() < deadline, "container did not die"
            time.sleep(0.2)
        sh(["docker", "start", self.id])


def _box(service: str) -> Callable[..., Iterator[Container]]:
    """A module-scoped fixture ``<service>_box``: the booted container of that compose service."""

    @pytest.fixture(scope="module", name=f"{service}_box")
    def box(
        docker_services: object,
        docker_compose_command: str,
        docker_compose_file: list[str],
        docker_compose_project_name: str,
    ) -> Iterator[Container]:
        argv = shlex.split(docker_compose_command)
        argv += [a for f in docker_compose_file for a in ("-f", f)]
        argv += ["-p", docker_compose_project_name, "ps", "-q", service]
        cid = sh(argv).stdout.strip()
        assert cid, f"compose service {service} has no container"
        container = Container(cid)
        container.wait_booted()
        yield container

    return box


deb_box = _box("deb")
arch_box = _box("arch")
src_box = _box("src")
