"""Two benchmark runs side by side: ``python3 bench/compare.py BEFORE.json AFTER.json``.

Prints a Markdown table per phase (wall seconds, CPU seconds where recorded, MiB written to
the disk device) with one row per data set and mode.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

MiB = 1024 * 1024
PHASES = ("sync", "resync", "idle_resync", "resync_again", "unsync", "read_resync")


def cell(run: dict[str, Any] | None, phase: str) -> str:
    if run is None or phase not in run:
        return "–"
    p = run[phase]
    cpu = f" / {p['cpu_seconds']:.2f}" if "cpu_seconds" in p else ""
    return f"{p['seconds']:.2f}{cpu} s, {p['disk_bytes'] / MiB:.1f} MiB"


def main() -> int:
    before, after = (json.loads(Path(a).read_text()) for a in sys.argv[1:3])
    runs_b = {(r["dataset"], r["mode"]): r for r in before["runs"]}
    runs_a = {(r["dataset"], r["mode"]): r for r in after["runs"]}
    print("| data set | mode | phase | before (wall s, MiB to disk) | after (wall / CPU s, MiB) |")
    print("| --- | --- | --- | --- | --- |")
    for key in runs_a:
        for phase in PHASES:
            print(
                f"| {key[0]} | {key[1]} | {phase} | {cell(runs_b.get(key), phase)} "
                f"| {cell(runs_a[key], phase)} |"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
