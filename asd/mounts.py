"""What is mounted (read from /proc/self/mountinfo) and the mounts asd makes.

mountinfo escapes space, tab, newline and backslash as octal (``\\040``); they are decoded
here and nowhere else. Mount and unmount go through `asd.run` like every other command.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from asd.run import run

RAM_FSTYPES = frozenset({"tmpfs", "ramfs"})
PSEUDO_FSTYPES = frozenset(
    {
        "proc",
        "sysfs",
        "devtmpfs",
        "devpts",
        "cgroup",
        "cgroup2",
        "securityfs",
        "debugfs",
        "tracefs",
        "configfs",
        "fusectl",
        "pstore",
        "bpf",
        "mqueue",
        "hugetlbfs",
        "efivarfs",
        "binfmt_misc",
        "autofs",
        "rpc_pipefs",
        "nsfs",
    }
)
NETWORK_FSTYPES = frozenset(
    {
        "nfs",
        "nfs4",
        "cifs",
        "smb3",
        "smbfs",
        "sshfs",
        "fuse.sshfs",
        "9p",
        "ceph",
        "glusterfs",
        "fuse.glusterfs",
        "afs",
        "fuse.rclone",
        "fuse.s3fs",
        "davfs",
        "fuse.davfs2",
    }
)

_OCTAL = re.compile(r"\\([0-7]{3})")


def unescape(field: str) -> str:
    """Decode mountinfo's octal escapes (``\\040`` is a space)."""
    return _OCTAL.sub(lambda m: chr(int(m.group(1), 8)), field)


@dataclass(frozen=True)
class Mount:
    mount_id: int
    parent_id: int
    major_minor: str
    root: str
    mountpoint: str
    options: tuple[str, ...]
    propagation: tuple[str, ...]
    fstype: str
    source: str
    super_options: tuple[str, ...]

    @property
    def is_ram(self) -> bool:
        return self.fstype in RAM_FSTYPES or self.source.startswith("/dev/zram")

    @property
    def read_only(self) -> bool:
        return "ro" in self.options


def parse_mountinfo(text: str) -> list[Mount]:
    mounts = []
    for line in text.splitlines():
        if not line.strip():
            continue
        left, sep, right = line.partition(" - ")
        if not sep:
            raise ValueError(f"not a mountinfo line: {line!r}")
        f = left.split(" ")
        r = right.split(" ")
        mounts.append(
            Mount(
                mount_id=int(f[0]),
                parent_id=int(f[1]),
                major_minor=f[2],
                root=unescape(f[3]),
                mountpoint=unescape(f[4]),
                options=tuple(f[5].split(",")),
                propagation=tuple(f[6:]),
                fstype=r[0],
                source=unescape(r[1]) if len(r) > 1 else "",
                super_options=tuple(r[2].split(",")) if len(r) > 2 else (),
            )
        )
    return mounts


def overlay_layers(mount: Mount) -> tuple[list[str], str | None]:
    """The lower directories and the upper directory of an overlay mount."""
    lower: list[str] = []
    upper = None
    for option in mount.super_options:
        key, _, value = option.partition("=")
        value = unescape(value)  # mountinfo's octal escapes; overlay's own `\:` remain
        if key in ("lowerdir", "lowerdir+", "datadir+"):
            parts = re.split(r"(?<!\\):+", value)
            lower += [re.sub(r"\\(.)", r"\1", p) for p in parts if p]
        elif key == "upperdir":
            upper = re.sub(r"\\(.)", r"\1", value)
    return lower, upper


def is_layer_of(mount: Mount | None, upper: str) -> bool:
    """Whether ``mount`` shows the overlay whose upper layer is the directory ``upper``."""
    return mount is not None and mount.fstype == "overlay" and overlay_layers(mount)[1] == upper


class MountTable:
    """A snapshot of the mount table; answers which mount holds a path."""

    def __init__(self, mounts: list[Mount]) -> None:
        self.mounts = mounts

    @classmethod
    def read(cls, path: str = "/proc/self/mountinfo") -> MountTable:
        with open(path, encoding="utf-8", errors="surrogateescape") as fh:
            return cls(parse_mountinfo(fh.read()))

    def at(self, mountpoint: Path | str) -> list[Mount]:
        """Every mount stacked at exactly this mount point, bottom first. By parent, not by
        line order: a mount attached beneath another (`asd.mountapi`) is listed after it."""
        mp = os.path.normpath(str(mountpoint))
        stacked = [m for m in self.mounts if m.mountpoint == mp]
        ids = {m.mount_id for m in stacked}
        by_parent = {m.parent_id: m for m in stacked}
        bottom = [m for m in stacked if m.parent_id not in ids]
        if len(bottom) != 1:
            return stacked
        ordered = bottom
        while ordered[-1].mount_id in by_parent and len(ordered) < len(stacked):
            ordered.append(by_parent[ordered[-1].mount_id])
        return ordered

    def top_at(self, mountpoint: Path | str) -> Mount | None:
        stacked = self.at(mountpoint)
        return stacked[-1] if stacked else None

    def is_mountpoint(self, path: Path | str) -> bool:
        return bool(self.at(path))

    def holding(self, path: Path | str) -> Mount:
        """The mount whose filesystem holds ``path`` (longest mount point prefix, last wins)."""
        p = os.path.normpath(str(path))
        best: Mount | None = None
        for m in self.mounts:
            mp = m.mountpoint
            if (p == mp or p.startswith(mp.rstrip("/") + "/")) and (
                best is None or len(mp) >= len(best.mountpoint)
            ):
                best = m
        if best is None:
            raise LookupError(f"no mount holds {p}")
        return best

    def below(self, path: Path | str) -> list[Mount]:
        """Mounts strictly inside ``path``."""
        prefix = os.path.normpath(str(path)).rstrip("/") + "/"
        return [m for m in self.mounts if m.mountpoint.startswith(prefix)]


def tmpfs(target: Path, options: str) -> list[str]:
    return ["mount", "-t", "tmpfs", "-o", options, "asd", str(target)]


def overlay(lower: Path, upper: Path, work: Path, target: Path) -> list[str]:
    # index=on keeps hard links whole when one of them is copied up; redirect_dir=on lets
    # programs rename directories that came from the lower layer (EXDEV otherwise). Both are
    # safe here because asd never changes the lower layer while it is mounted.
    opts = f"lowerdir={lower},upperdir={upper},workdir={work},redirect_dir=on,index=on,metacopy=off"
    return ["mount", "-t", "overlay", "-o", opts, "asd-overlay", str(target)]


def mount(argv: list[str]) -> None:
    run(argv)
