"""Every path asd uses, derived from a target, VOLATILE and the config's instance. Pure.

For a target ``/foo/bar`` and the default config:

- ``/foo/.bar-backup_asd``          the disk copy, bind-mounted beside the target (upstream's name)
- ``VOLATILE/asd-root/foo/bar``     the RAM copy (copy mode) or the overlay's merged view
- ``VOLATILE/asd-root/.overlay/foo/bar/{upper,work}``  overlay mode's RAM layers; after the
                                    n-th time they were given back (`asd.shrink`),
                                    ``upper.n`` and ``work.n``, the number in ``generation``
- ``<disk copy>/.asd-work/``        asd's journal inside the disk copy: session marker, staged
                                    files of a resync, commit record, overlay mode's lower tree
                                    and, after a shrink, its delta ``delta.n`` over that tree.
                                    Hidden under the RAM copy while asd runs; a clean stop or
                                    the recovery at the next start removes it, all but the lower
                                    tree, its record and the last delta (as ``spare``) (``KEPT``),
                                    which the next sync reuses.
- ``/run/asd/<instance>.json`` and ``.lock``   run state and lock
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

DEFAULT_CONFIG = Path("/etc/asd.conf")
RUN_DIR = Path("/run/asd")
WORK_NAME = ".asd-work"
# What of WORK_NAME outlives a session (`asd.lower`): the tree, its record, the last delta
# kept as its spare links, its cache tag.
KEPT = frozenset({"lower", "lower.json", "spare", "CACHEDIR.TAG"})
SNAPSHOT_MARK = "-backup_asd-crashrecovery-"


def instance_name(config_path: Path) -> str:
    """``asd`` for /etc/asd.conf, ``asd-<hash>`` for any other config (independent instances)."""
    if config_path == DEFAULT_CONFIG:
        return "asd"
    digest = hashlib.sha256(str(config_path).encode("utf-8", "surrogateescape")).hexdigest()
    return f"asd-{digest[:10]}"


def hidden_name(name: str) -> str:
    """Upstream's dot rule: ``bar`` → ``.bar``, ``.cache`` stays ``.cache``."""
    return name if name.startswith(".") else f".{name}"


def backup_path(target: Path) -> Path:
    """Where the disk copy of ``target`` is reachable while asd runs (upstream's name)."""
    return target.parent / f"{hidden_name(target.name)}-backup_asd"


@dataclass(frozen=True)
class Instance:
    config_path: Path
    volatile: Path
    run_dir: Path = RUN_DIR

    @property
    def name(self) -> str:
        return instance_name(self.config_path)

    @property
    def state_file(self) -> Path:
        return self.run_dir / f"{self.name}.json"

    @property
    def lock_file(self) -> Path:
        return self.run_dir / f"{self.name}.lock"

    @property
    def index_dir(self) -> Path:
        return self.run_dir / f"{self.name}.index"

    @property
    def ram_root(self) -> Path:
        suffix = "" if self.name == "asd" else self.name[3:]
        return self.volatile / f"asd-root{suffix}"

    def target(self, target: Path) -> TargetLayout:
        return TargetLayout(self, target)


@dataclass(frozen=True)
class TargetLayout:
    """The paths of one target. Those that walks ask for once per file are computed once
    (a frozen dataclass: they cannot go stale; `dataclasses.replace` makes a new layout)."""

    instance: Instance
    target: Path
    generation: int = 0  # overlay mode: how many times the RAM layer was replaced

    @cached_property
    def _rel(self) -> Path:
        return self.target.relative_to("/")

    @cached_property
    def backup(self) -> Path:
        return backup_path(self.target)

    @cached_property
    def ram_copy(self) -> Path:
        return self.instance.ram_root / self._rel

    @cached_property
    def overlay_dir(self) -> Path:
        return self.instance.ram_root / ".overlay" / self._rel

    def _numbered(self, name: str) -> str:
        return f"{name}.{self.generation}" if self.generation else name

    @cached_property
    def upper(self) -> Path:
        return self.overlay_dir / self._numbered("upper")

    @cached_property
    def overlay_work(self) -> Path:
        return self.overlay_dir / self._numbered("work")

    @property
    def generation_file(self) -> Path:
        """Which generation of the RAM layer is mounted (absent: the first, 0)."""
        return self.overlay_dir / "generation"

    @property
    def baseline(self) -> Path:
        """The index of the upper layer that this generation's delta was built from."""
        return self.overlay_dir / f"baseline.{self.generation}"

    @cached_property
    def disk_work(self) -> Path:
        """asd's journal directory inside the disk copy, reached through the backup bind."""
        return self.backup / WORK_NAME

    @property
    def session_marker(self) -> Path:
        return self.disk_work / "session.json"

    @property
    def stage(self) -> Path:
        return self.disk_work / "stage"

    @property
    def commit_record(self) -> Path:
        return self.disk_work / "commit.json"

    @cached_property
    def lower(self) -> Path:
        return self.disk_work / "lower"

    @cached_property
    def lower_record(self) -> Path:
        """What the lower tree was made from, per directory (`asd.lower`)."""
        return self.disk_work / "lower.json"

    @cached_property
    def delta(self) -> Path:
        """What changed between the lower tree and the disk copy when this generation began:
        hard links to the disk copy's files, whiteouts, opaque directories."""
        return self.disk_work / f"delta.{self.generation}"

    @property
    def lowers(self) -> list[Path]:
        """The overlay's lower layers, topmost first."""
        return [self.delta, self.lower] if self.generation else [self.lower]

    @property
    def index_file(self) -> Path:
        digest = hashlib.sha256(str(self.target).encode("utf-8", "surrogateescape")).hexdigest()
        return self.instance.index_dir / f"{digest[:16]}.json"

    @property
    def snapshot_prefix(self) -> str:
        return f"{hidden_name(self.target.name)}{SNAPSHOT_MARK}"
