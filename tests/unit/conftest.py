"""Unit tier: pure code only. Any attempt to run a real command is a test failure."""

from __future__ import annotations

from typing import Any

import pytest


@pytest.fixture(autouse=True)
def _no_real_commands(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(argv: list[str], **_: Any) -> Any:
        raise AssertionError(f"unit test tried to run a command: {argv}")

    monkeypatch.setattr("asd.run.run", refuse)
    for mod in ("asd.mounts", "asd.sync", "asd.snapshots", "asd.devices", "asd.report"):
        try:
            __import__(mod)
        except ImportError:
            continue
        if hasattr(__import__(mod, fromlist=["run"]), "run"):
            monkeypatch.setattr(f"{mod}.run", refuse)
