"""Reliability tier: the integration tier's World, driven much harder.

Sampled by default so the whole directory stays within a few minutes; ``ASD_RELIABILITY=full``
runs the long versions (every crash point, 500 resyncs). Each test records what it checked in
``out/reliability.json`` (merged across tests), which ``RESULTS.md`` is written from.
"""

from __future__ import annotations

import fcntl
import json
import os

import pytest

from tests.integration.conftest import REPO, World, copy_world, overlay_world, world

__all__ = ["copy_world", "overlay_world", "world", "World", "FULL", "record", "sample", "OUT"]

FULL = os.environ.get("ASD_RELIABILITY") == "full"
OUT = REPO / "out" / "reliability.json"


def sample(items: list[object], wanted: int) -> list[object]:
    """Every item in full mode; otherwise ``wanted`` of them, spread evenly, first and last kept."""
    if FULL or len(items) <= wanted:
        return items
    if wanted == 1:
        return [items[-1]]
    step = (len(items) - 1) / (wanted - 1)
    return [items[round(i * step)] for i in range(wanted)]


def record(section: str, key: str, value: object) -> None:
    """Merge ``{section: {key: value}}`` into out/reliability.json, and print it."""
    print(f"reliability: {section}: {key}: {json.dumps(value)}")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    with open(OUT.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            data = json.loads(OUT.read_text())
        except (FileNotFoundError, ValueError):
            data = {}
        data.setdefault(section, {})[key] = value
        data.setdefault("_mode", {})["last_run"] = "full" if FULL else "sampled"
        tmp = OUT.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
        os.replace(tmp, OUT)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "overlay_in_full: the overlay variant runs only with ASD_RELIABILITY=full"
    )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Sampled runs keep overlay variants of `overlay_in_full` tests for the full run."""
    if FULL:
        return
    skip = pytest.mark.skip(reason="overlay variant: ASD_RELIABILITY=full runs it")
    for item in items:
        callspec = getattr(item, "callspec", None)
        if (
            item.get_closest_marker("overlay_in_full")
            and callspec is not None
            and callspec.params.get("world") == "overlay"
        ):
            item.add_marker(skip)
