"""Unit tier: pure code only. Any attempt to run a real command is a test failure."""

from __future__ import annotations

import importlib
import pkgutil
import sys
from typing import Any

import pytest

import asd
import asd.run


@pytest.fixture(autouse=True)
def _no_real_commands(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(argv: list[str], **_: Any) -> Any:
        raise AssertionError(f"unit test tried to run a command: {argv}")

    for info in pkgutil.iter_modules(asd.__path__, "asd."):
        if info.name != "asd.__main__":
            importlib.import_module(info.name)
    for attr in ("run", "run_together"):
        real = getattr(asd.run, attr)
        monkeypatch.setattr(asd.run, attr, refuse)
        # Modules that did `from asd.run import run` hold their own reference: replace it too.
        for name, module in list(sys.modules.items()):
            if name.startswith("asd.") and getattr(module, attr, None) is real:
                monkeypatch.setattr(module, attr, refuse)
