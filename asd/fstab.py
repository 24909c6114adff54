"""/etc/fstab: which declared mount a target waits for, and which device that mount is.

Pure parsing, and resolution of tag sources through ``/dev/disk/by-*``; no pyudev here (pass
`asd.devices.find_by_tag` as ``lookup`` to fall back to udev). Public API:

- `parse_fstab(text) -> list[FstabEntry]` — escapes (``\\040`` is a space), comments, blank
  lines, optional fields as libmount fills them (type ``auto``, options ``defaults``, 0 0).
- `read_fstab(path="/etc/fstab") -> list[FstabEntry]` — empty when there is no fstab.
- `resolve_source(source, dev_disk=Path("/dev/disk"), lookup=None) -> str | None` — the
  device node behind ``UUID=``, ``LABEL=``, ``PARTUUID=``, ``PARTLABEL=`` or a /dev path.
- `mount_for(path, fstab_entries, mounts) -> FstabEntry | None` — the fstab mount that would
  hold ``path`` but is not mounted now (a separate /home, an encrypted /srv). The packaging
  issue orders the service after it (``RequiresMountsFor=``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from asd.mounts import MountTable, unescape

TAGS = {
    "UUID": "by-uuid",
    "LABEL": "by-label",
    "PARTUUID": "by-partuuid",
    "PARTLABEL": "by-partlabel",
}
# Lines that declare no mount point a target could live under.
_NOT_MOUNTS = frozenset({"swap", "none", ""})
_UDEV_SAFE = frozenset("#+-.:=@_")


@dataclass(frozen=True)
class FstabEntry:
    source: str  # as written, escapes decoded: "UUID=0a1b...", "/dev/sda3", "srv:/export"
    mountpoint: str
    fstype: str
    options: tuple[str, ...]
    freq: int
    passno: int
    line: int  # 1-based line number in the file

    @property
    def noauto(self) -> bool:
        """Not mounted at boot: a target under it waits until someone mounts it."""
        return "noauto" in self.options

    @property
    def nofail(self) -> bool:
        """Boot goes on without it: the target may then be the empty directory below it."""
        return "nofail" in self.options

    @property
    def systemd_options(self) -> dict[str, str]:
        """The ``x-systemd.*`` options, name without the prefix → value ("" for a flag)."""
        found = {}
        for option in self.options:
            if option.startswith("x-systemd."):
                name, _, value = option[len("x-systemd.") :].partition("=")
                found[name] = value
        return found

    @property
    def tag(self) -> tuple[str, str] | None:
        """(``UUID``, value) for a tag source, None for a path or a network source."""
        name, sep, value = self.source.partition("=")
        if sep and name.upper() in TAGS:
            return name.upper(), _unquote(value)
        return None

    def describe(self) -> str:
        flags = [f for f in ("noauto", "nofail") if f in self.options]
        extra = f" ({', '.join(flags)})" if flags else ""
        return f"{self.source} on {self.mountpoint} ({self.fstype}), fstab line {self.line}{extra}"


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
        return value[1:-1]
    return value


def _number(field: str) -> int:
    return int(field) if field.isdigit() else 0


def parse_fstab(text: str) -> list[FstabEntry]:
    """Every mount line of an fstab; malformed lines (a lone field) are skipped, as mount does."""
    entries = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        fields = line.split()
        if len(fields) < 2:
            continue
        fields += ["auto", "defaults", "0", "0"][len(fields) - 2 :]
        source, mountpoint, fstype, options = (unescape(f) for f in fields[:4])
        if mountpoint not in _NOT_MOUNTS and mountpoint.startswith("/"):
            mountpoint = os.path.normpath(mountpoint)
        entries.append(
            FstabEntry(
                source=source,
                mountpoint=mountpoint,
                fstype=fstype,
                options=tuple(o for o in options.split(",") if o),
                freq=_number(fields[4]),
                passno=_number(fields[5]),
                line=number,
            )
        )
    return entries


def read_fstab(path: str | Path = "/etc/fstab") -> list[FstabEntry]:
    try:
        with open(path, encoding="utf-8", errors="surrogateescape") as fh:
            return parse_fstab(fh.read())
    except FileNotFoundError:
        return []


def encode_udev_name(value: str) -> str:
    """A tag value as udev spells it in /dev/disk/by-label (a space is ``\\x20``)."""
    out = []
    for char in value:
        if char.isalnum() and char.isascii() or char in _UDEV_SAFE:
            out.append(char)
        elif not char.isascii() and char.isprintable():
            out.append(char)  # udev keeps valid multibyte UTF-8 as it is
        else:
            out.append("".join(f"\\x{b:02x}" for b in char.encode("utf-8")))
    return "".join(out)


def resolve_source(
    source: str,
    dev_disk: Path = Path("/dev/disk"),
    lookup: Callable[[str, str], str | None] | None = None,
) -> str | None:
    """The device node an fstab source names, or None (network source, not present)."""
    name, sep, value = source.partition("=")
    if sep and name.upper() in TAGS:
        tag, value = name.upper(), _unquote(value)
        by = dev_disk / TAGS[tag]
        for spelling in dict.fromkeys([value, value.lower()] if "UUID" in tag else [value]):
            link = by / encode_udev_name(spelling)
            if link.exists():
                return os.path.realpath(link)
        return lookup(tag, value) if lookup is not None else None
    if source.startswith("/dev/"):
        return os.path.realpath(source) if os.path.exists(source) else None
    return None


def mount_for(
    path: Path | str, fstab_entries: Sequence[FstabEntry], mounts: MountTable
) -> FstabEntry | None:
    """The fstab mount that would hold ``path`` and is not mounted now, else None.

    The deepest fstab mount point at or above ``path`` decides: when it is mounted, ``path``
    already sits where fstab puts it; when it is not, that entry is what ``path`` waits for.
    """
    target = os.path.normpath(str(path))
    best: FstabEntry | None = None
    for entry in fstab_entries:
        mp = entry.mountpoint
        if mp in _NOT_MOUNTS or not mp.startswith("/") or entry.fstype == "swap":
            continue
        inside = target == mp or target.startswith(mp.rstrip("/") + "/")
        if inside and (best is None or len(mp) > len(best.mountpoint)):
            best = entry
    if best is None or mounts.is_mountpoint(best.mountpoint):
        return None
    return best
