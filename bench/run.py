"""asd's benchmark: what sync, resync and unsync cost, on a real ext4 disk and a real tmpfs.

Run by `make bench` (or `make bench QUICK=1`), as root. It re-executes itself inside a private
mount namespace (`unshare -m --propagation private`): every mount it makes (the ext4 image, the
tmpfs VOLATILE, a tmpfs on /run/asd for asd's run state) lives and dies there. The only thing
outside is the loop device, which is detached at the end.

Per data set and mode (copy, overlay) it measures each phase — sync, resync after 500 changed
files, an idle resync, unsync — for wall time, bytes written to the loop device (sectors
written in /sys/block/loopN/stat, after `sync`) and RAM used in VOLATILE (tmpfs used bytes).
After unsync it remounts the ext4 image and checks that the disk holds exactly what programs
saw in RAM before the unsync. It also times `cp -a` of the same tree into the same tmpfs, and
`asd parse` on ten synced targets. Prints a table, writes out/bench.json.

This is a measurement, not a test: nothing here asserts a threshold; the goals of issue 6 are
printed beside the numbers.
"""

# The benchmark runs fixed commands (mount, losetup, asd itself) on purpose (S603, S607),
# under a fixed root-only scratch directory (S108), with seeded randomness for data (S311).
# ruff: noqa: S603, S607, S108, S311

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import resource
import shutil
import stat
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
BASE = Path("/var/tmp/asd-bench")
IN_NS = "ASD_BENCH_IN_NAMESPACE"
MiB = 1024 * 1024
AGAIN = ("sync_again", "unsync_again")  # the next session: sync, then unsync straight away


# ----- data sets ----------------------------------------------------------------------------
@dataclass(frozen=True)
class DataSet:
    name: str
    files: int
    large_share: float  # share of files drawn from the large-size range
    per_dir: int  # files per leaf directory

    def sizes(self, rng: random.Random) -> list[int]:
        out = []
        for _ in range(self.files):
            if rng.random() < self.large_share:
                out.append(int(2 ** rng.uniform(16, 22)))  # 64 KiB .. 4 MiB
            else:
                out.append(int(2 ** rng.uniform(8, 14)))  # 256 B .. 16 KiB
        return out


def datasets(quick: bool) -> list[DataSet]:
    if quick:
        return [
            DataSet("mix-5k", 5_000, 0.08, 250),
            DataSet("small-10k", 10_000, 0.0, 500),
            DataSet("small-40k", 40_000, 0.0, 500),
        ]
    return [
        DataSet("mix-20k", 20_000, 0.08, 250),  # a browser cache: ~90 % small, some large
        DataSet("small-50k", 50_000, 0.0, 500),
        DataSet("small-200k", 200_000, 0.0, 500),
    ]


_NOISE = os.urandom(8 * MiB)


def blob(rng: random.Random, size: int) -> bytes:
    """Incompressible bytes, different per call (a slice of a random buffer at a random offset)."""
    out = bytearray()
    while len(out) < size:
        n = min(size - len(out), len(_NOISE) // 2)
        off = rng.randrange(len(_NOISE) - n)
        out += _NOISE[off : off + n]
    return bytes(out)


def populate(root: Path, ds: DataSet, rng: random.Random) -> int:
    """Write the data set under root (two levels of hex directories, like cache2/Cache_Data)."""
    total = 0
    for i, size in enumerate(ds.sizes(rng)):
        d = root / f"{(i // ds.per_dir) // 16:02x}" / f"{(i // ds.per_dir) % 16:x}"
        if i % ds.per_dir == 0:
            d.mkdir(parents=True, exist_ok=True)
        (d / f"{rng.getrandbits(64):016x}").write_bytes(blob(rng, size))
        total += size
    (root / "index").write_bytes(blob(rng, 4096))
    os.symlink("index", root / "index.lnk")
    return total


def change(
    root: Path, files: list[str], rng: random.Random, n: int = 500
) -> tuple[dict[str, int], set[str]]:
    """What a program does between two resyncs: n files rewritten, appended, created, deleted
    (40 %, 20 %, 20 %, 20 %). ``files``, the target's regular files (relative), is the
    benchmark's own list, kept up to date here: a program knows its files, and a walk through
    the target to find them would look up every file, whose cost (the kernel freeing what the
    lookups cached) is measured apart (``read_resync``). Returns the bytes written and
    the sizes of the files touched, and every path whose entry changed (files and their
    directories)."""
    picked = rng.sample(files, n - n // 5)
    n_rewrite, n_append = (2 * n) // 5, n // 5
    rewrite, append = picked[:n_rewrite], picked[n_rewrite : n_rewrite + n_append]
    delete = picked[n_rewrite + n_append :]
    written = touched = 0
    for rel in rewrite:
        p = root / rel
        size = p.stat().st_size
        p.write_bytes(blob(rng, size))  # truncate and write, as a cache rewriting an entry
        written += size
        touched += size
    for rel in append:
        p = root / rel
        extra = blob(rng, 4096)
        with open(p, "ab") as fh:
            fh.write(extra)
        written += len(extra)
        touched += p.stat().st_size
    created = []
    for i in range(n // 5):
        d = os.path.dirname(rng.choice(files))
        data = blob(rng, int(2 ** rng.uniform(10, 14)))
        rel = os.path.join(d, f"new-{i:04d}-{rng.getrandbits(32):08x}")
        (root / rel).write_bytes(data)
        created.append(rel)
        written += len(data)
        touched += len(data)
    for rel in delete:
        (root / rel).unlink()
    gone = set(delete)
    files[:] = sorted([f for f in files if f not in gone] + created)
    paths = {*picked, *created}
    paths |= {os.path.dirname(p) or "." for p in paths}
    workload = {"changed_files": n, "changed_bytes": written, "changed_file_bytes": touched}
    return workload, paths


# ----- measuring ----------------------------------------------------------------------------
def sh(*argv: str, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, check=True, text=True, capture_output=True, **kw)


def sectors_written(loop: str) -> int:
    fields = Path(f"/sys/block/{Path(loop).name}/stat").read_text().split()
    return int(fields[6]) * 512


def tmpfs_used(path: Path) -> int:
    vfs = os.statvfs(path)
    return (vfs.f_blocks - vfs.f_bfree) * vfs.f_frsize


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def tree_bytes(root: Path) -> int:
    total = 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d != ".asd-work"]
        for f in filenames:
            total += os.lstat(os.path.join(dirpath, f)).st_size
    return total


def manifest(root: Path) -> dict[str, tuple[Any, ...]]:
    """Everything a program sees: type, mode, owner, size, mtime, content hash, link target.
    asd's own ``.asd-work`` at the top (overlay mode's kept lower tree) is not the target's."""
    out: dict[str, tuple[Any, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        if dirpath == str(root):
            dirnames[:] = [d for d in dirnames if d != ".asd-work"]
        for name in ["", *dirnames, *filenames]:
            if name == "" and dirpath != str(root):
                continue
            path = os.path.join(dirpath, name) if name else dirpath
            out[os.path.relpath(path, root)] = entry(path)
    return out


def entry(path: str) -> tuple[Any, ...]:
    st = os.lstat(path)
    data: Any = None
    if stat.S_ISREG(st.st_mode):
        # O_NOATIME: the first read of a file after it was written would move its atime
        # (relatime), and ext4 would write the inode: the benchmark's own reads must not
        # count as what asd wrote.
        with os.fdopen(os.open(path, os.O_RDONLY | os.O_NOATIME), "rb") as fh:
            data = hashlib.file_digest(fh, "sha1").hexdigest()
    elif stat.S_ISLNK(st.st_mode):
        data = os.readlink(path)
    mtime = None if stat.S_ISLNK(st.st_mode) else st.st_mtime_ns
    size = None if stat.S_ISDIR(st.st_mode) else st.st_size  # tmpfs and ext4 differ
    return (st.st_mode, st.st_uid, st.st_gid, size, mtime, data)


def update(expected: dict[str, tuple[Any, ...]], root: Path, paths: set[str]) -> None:
    """What programs now see at ``paths`` (looked up through the target), into ``expected``."""
    for rel in paths:
        try:
            expected[rel] = entry(os.path.join(root, rel))
        except FileNotFoundError:
            expected.pop(rel, None)


class Bench:
    def __init__(self, quick: bool) -> None:
        self.quick = quick
        self.base = BASE
        self.img = self.base / "disk.img"
        self.disk = self.base / "disk"
        self.volatile = self.base / "volatile"
        self.loop = ""
        self.results: dict[str, Any] = {
            "quick": quick,
            "runs": [],
            "cp_a": [],
            "direct": [],
            "parse": {},
        }

    # --- the machine --------------------------------------------------------------------
    def setup(self, image_size: str) -> None:
        self.base.mkdir(parents=True, exist_ok=True)
        for d in (self.disk, self.volatile):
            d.mkdir(exist_ok=True)
        self.img.unlink(missing_ok=True)
        sh("truncate", "-s", image_size, str(self.img))
        self.loop = sh("losetup", "--find", "--show", str(self.img)).stdout.strip()
        # Initialise inode tables and journal now, so no background writes count later.
        sh("mkfs.ext4", "-q", "-E", "lazy_itable_init=0,lazy_journal_init=0", self.loop)
        sh("mount", self.loop, str(self.disk))
        sh(
            "mount",
            "-t",
            "tmpfs",
            "-o",
            "size=8g,mode=1777",
            "asd-bench-volatile",
            str(self.volatile),
        )
        Path("/run/asd").mkdir(exist_ok=True)
        sh("mount", "-t", "tmpfs", "-o", "mode=0755", "asd-bench-run", "/run/asd")

    def teardown(self) -> None:
        for m in ("/run/asd", str(self.volatile), str(self.disk)):
            subprocess.run(["umount", m], capture_output=True, check=False)
        if self.loop:
            subprocess.run(["losetup", "-d", self.loop], check=False)
            self.loop = ""
        self.img.unlink(missing_ok=True)

    def remount_disk(self) -> None:
        """Read the disk back from the device itself, not from what the page cache holds."""
        sh("umount", str(self.disk))
        drop_caches()
        sh("mount", self.loop, str(self.disk))

    def asd(self, conf: Path, *args: str) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        env.pop("ASDCONF", None)
        proc = subprocess.run(
            [sys.executable, "-m", "asd", "-c", str(conf), *args],
            capture_output=True,
            text=True,
            env=env,
            check=False,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"asd {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
        return proc

    def phase(self, conf: Path, *args: str) -> dict[str, float]:
        os.sync()
        before = sectors_written(self.loop)
        cpu = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.monotonic()
        self.asd(conf, *args)
        wall = time.monotonic() - started
        cpu_after = resource.getrusage(resource.RUSAGE_CHILDREN)
        os.sync()
        used = cpu_after.ru_utime + cpu_after.ru_stime - cpu.ru_utime - cpu.ru_stime
        return {
            "seconds": round(wall, 3),
            "cpu_seconds": round(used, 3),  # asd and what it ran (rsync): less noisy under load
            "disk_bytes": sectors_written(self.loop) - before,
            "ram_bytes": tmpfs_used(self.volatile),
            "index_bytes": tmpfs_used(Path("/run/asd")),
        }

    # --- one data set -------------------------------------------------------------------
    def run_dataset(self, ds: DataSet, modes: list[str]) -> None:
        rng = random.Random(ds.name)
        target = self.disk / "cache"
        target.mkdir()
        t0 = time.monotonic()
        populate(target, ds, rng)
        size = tree_bytes(target)
        print(
            f"== {ds.name}: {ds.files} files, {size / MiB:.0f} MiB "
            f"(written in {time.monotonic() - t0:.0f} s)",
            flush=True,
        )
        self.cp_a(ds, target, size)
        # What the disk holds now, then each change as programs see it through the target:
        # after unsync the disk must hold exactly that.
        expected = manifest(target)
        files = sorted(rel for rel, e in expected.items() if stat.S_ISREG(e[0]))
        for mode in modes:
            conf = self.base / f"asd-{mode}.conf"
            conf.write_text(
                f"WHATTOSYNC=('{target}')\nVOLATILE=\"{self.volatile}\"\n"
                f'USE_OVERLAYFS="{"yes" if mode == "overlay" else "no"}"\n'
            )
            drop_caches()
            run: dict[str, Any] = {
                "dataset": ds.name,
                "files": ds.files,
                "bytes": size,
                "mode": mode,
            }
            run["sync"] = self.phase(conf, "sync")
            run["workload"] = self.change(target, files, rng, expected)
            run["resync"] = self.phase(conf, "resync")
            run["idle_resync"] = self.phase(conf, "resync")
            # A session is mostly later resyncs: in overlay mode the first one after sync
            # replaces files the lower layer still links, later ones can patch in place.
            run["workload_again"] = self.change(target, files, rng, expected)
            run["resync_again"] = self.phase(conf, "resync")
            run["unsync"] = self.phase(conf, "unsync")
            self.remount_disk()
            got = manifest(target)
            diff = sorted(set(expected) ^ set(got)) + sorted(
                k for k in expected.keys() & got.keys() if expected[k] != got[k]
            )
            run["verified"] = not diff
            run["mismatches"] = diff[:20]
            litter = [p.name for p in self.disk.iterdir() if p.name not in ("cache", "lost+found")]
            run["litter"] = litter
            # The next session, on a cold cache (as at boot): overlay mode brings up to date
            # the lower tree it kept at the last stop instead of building it again. The check
            # above read every file back, so the cache is dropped again (runs before def431f
            # did not, and took this sync warm).
            drop_caches()
            run["sync_again"] = self.phase(conf, "sync")
            # It shows the disk copy: read every file through the target, as a program might
            # (a backup, a search). Then 500 changes, and a resync: in overlay mode its switch
            # of RAM layers frees what that read cached.
            shown_again = manifest(target) == got
            run["read_resync"] = self.phase_after_change(conf, target, files, rng, got)
            run["unsync_again"] = self.phase(conf, "unsync")
            self.remount_disk()
            run["verified_again"] = shown_again and manifest(target) == got
            self.results["runs"].append(run)
            print_run(run, flush=True)
            expected = got
        self.direct(ds, target, files, rng)
        shutil.rmtree(target)

    def change(
        self,
        target: Path,
        files: list[str],
        rng: random.Random,
        expected: dict[str, tuple[Any, ...]],
    ) -> dict[str, int]:
        workload, paths = change(target, files, rng)
        update(expected, target, paths)
        return workload

    def phase_after_change(
        self,
        conf: Path,
        target: Path,
        files: list[str],
        rng: random.Random,
        expected: dict[str, tuple[Any, ...]],
    ) -> dict[str, Any]:
        workload = self.change(target, files, rng, expected)
        return {**self.phase(conf, "resync"), "changed": workload}

    def direct(self, ds: DataSet, target: Path, files: list[str], rng: random.Random) -> None:
        """The same kind of 500 changes written by a program straight to the disk, without
        asd: what ext4 itself writes for them, metadata and journal included."""
        os.sync()
        before = sectors_written(self.loop)
        workload, _paths = change(target, files, rng)
        os.sync()
        took = sectors_written(self.loop) - before
        self.results["direct"].append({"dataset": ds.name, "disk_bytes": took, **workload})
        print(
            f"-- {ds.name} without asd: 500 changes wrote {mib(workload['changed_bytes'])} MiB, "
            f"the disk took {mib(took)} MiB",
            flush=True,
        )

    def cp_a(self, ds: DataSet, target: Path, size: int) -> None:
        dest = self.volatile / "cp-a"
        drop_caches()
        started = time.monotonic()
        sh("cp", "-a", str(target), str(dest))
        wall = time.monotonic() - started
        # What the kernel itself takes, without asd, for three things asd cannot skip: freeing
        # a RAM copy of the tree (copy mode's unsync), reading every inode of the disk copy
        # from a cold cache (overlay mode's sync counts each file's links), and a durable tree
        # of hard links to every file beside it (what overlay mode's first sync builds).
        started = time.monotonic()
        sh("rm", "-rf", "--one-file-system", str(dest))
        freed = time.monotonic() - started
        drop_caches()
        started = time.monotonic()
        sh("find", str(target), "-xdev", "!", "-type", "d", "-links", "+2", "-printf", "%i\\n")
        stat_all = time.monotonic() - started
        links = self.disk / "cp-al"
        drop_caches()
        before = sectors_written(self.loop)
        started = time.monotonic()
        sh("cp", "-al", str(target), str(links))
        sh("sync", "-f", str(links))
        linked = time.monotonic() - started
        os.sync()
        link_bytes = sectors_written(self.loop) - before
        sh("rm", "-rf", "--one-file-system", str(links))
        self.results["cp_a"].append(
            {
                "dataset": ds.name,
                "seconds": round(wall, 3),
                "bytes": size,
                "mib_per_s": round(size / MiB / wall, 1),
                "rm_rf_seconds": round(freed, 3),
                "cold_find_seconds": round(stat_all, 3),
                "cp_al_seconds": round(linked, 3),
                "cp_al_disk_bytes": link_bytes,
            }
        )

    # --- asd parse on ten targets -------------------------------------------------------
    def parse_ten(self) -> None:
        rng = random.Random("parse")
        root = self.disk / "ten"
        targets = []
        for i in range(10):
            t = root / f"t{i}"
            t.mkdir(parents=True)
            populate(t, DataSet("p", 1000, 0.0, 250), rng)
            targets.append(t)
        conf = self.base / "asd-ten.conf"
        listed = " ".join(f"'{t}'" for t in targets)
        conf.write_text(f'WHATTOSYNC=({listed})\nVOLATILE="{self.volatile}"\n')
        out: dict[str, float] = {}
        for when in ("unsynced", "synced"):
            if when == "synced":
                self.asd(conf, "sync")
            times = []
            for _ in range(3):
                started = time.monotonic()
                self.asd(conf, "parse")
                times.append(time.monotonic() - started)
            out[when] = round(min(times), 3)
        self.asd(conf, "unsync")
        shutil.rmtree(root)
        self.results["parse"] = out
        print(
            f"== asd parse, ten targets of 1000 files: {out['unsynced']:.2f} s unsynced, "
            f"{out['synced']:.2f} s synced",
            flush=True,
        )


# ----- the table ----------------------------------------------------------------------------
def mib(n: float) -> str:
    return f"{n / MiB:.2f}" if n < 10 * MiB else f"{n / MiB:.0f}"


def print_run(run: dict[str, Any], flush: bool = False) -> None:
    w = run["workload"]
    print(
        f"-- {run['dataset']} {run['mode']}: 500 changes wrote {mib(w['changed_bytes'])} MiB "
        f"(files touched {mib(w['changed_file_bytes'])} MiB); "
        f"verified={run['verified']} litter={run['litter']}",
        flush=flush,
    )
    phases = ("sync", "resync", "idle_resync", "resync_again", "unsync", "sync_again")
    for ph in (*phases, "read_resync", "unsync_again"):
        if ph not in run:
            continue  # a JSON of a run from before these phases
        p = run[ph]
        print(
            f"   {ph:12} {p['seconds']:8.2f} s ({p.get('cpu_seconds', 0):6.2f} s CPU)  "
            f"disk {mib(p['disk_bytes']):>8} MiB  "
            f"RAM {mib(p['ram_bytes']):>8} MiB  index {mib(p['index_bytes']):>6} MiB",
            flush=flush,
        )


def verified(run: dict[str, Any]) -> bool:
    """The disk held what programs saw, nothing else was left, and the next sync showed it."""
    return bool(run["verified"] and run.get("verified_again", True) and not run["litter"])


def table(results: dict[str, Any]) -> str:
    cp = {c["dataset"]: c for c in results["cp_a"]}
    head = (
        "| data set | mode | sync s | sync disk MiB | RAM after sync MiB | resync s "
        "| resync disk MiB (changed) | idle resync s "
        "| next session: resync after reading every file s "
        "| unsync s | unsync disk MiB "
        "| RAM after resync MiB | 2nd resync disk MiB (changed) | sync vs cp -a "
        "| next sync s | next sync disk MiB | its unsync s | its unsync disk MiB | verified |"
    )
    lines = [head, "| " + " | ".join(["---"] * (head.count("|") - 1)) + " |"]
    for r in results["runs"]:
        c = cp[r["dataset"]]
        sync_rate = r["bytes"] / MiB / max(r["sync"]["seconds"], 1e-6)
        lines.append(
            f"| {r['dataset']} | {r['mode']} | {r['sync']['seconds']:.2f} "
            f"| {mib(r['sync']['disk_bytes'])} | {mib(r['sync']['ram_bytes'])} "
            f"| {r['resync']['seconds']:.2f} "
            f"| {mib(r['resync']['disk_bytes'])} ({mib(r['workload']['changed_bytes'])}) "
            f"| {r['idle_resync']['seconds']:.2f} "
            + (f"| {r['read_resync']['seconds']:.2f} " if "read_resync" in r else "| ")
            + f"| {r['unsync']['seconds']:.2f} "
            f"| {mib(r['unsync']['disk_bytes'])} | {mib(r['idle_resync']['ram_bytes'])} "
            f"| {mib(r['resync_again']['disk_bytes'])} "
            f"({mib(r['workload_again']['changed_bytes'])}) "
            f"| {100 * sync_rate / c['mib_per_s']:.0f} % "
            + "".join(
                f"| {r[ph]['seconds']:.2f} | {mib(r[ph]['disk_bytes'])} " if ph in r else "| | "
                for ph in AGAIN
            )
            + f"| {'yes' if verified(r) else 'NO'} |"
        )
    lines.append("")
    lines.append(
        "cp -a into the same tmpfs: "
        + ", ".join(
            f"{c['dataset']} {c['seconds']:.2f} s ({c['mib_per_s']:.0f} MiB/s)"
            for c in results["cp_a"]
        )
    )
    lines.append(
        "Without asd, rm -rf of that copy / find reading every inode of the disk side from "
        "a cold cache / cp -al of the tree beside it and sync: "
        + ", ".join(
            f"{c['dataset']} {c['rm_rf_seconds']:.2f} s / {c['cold_find_seconds']:.2f} s / "
            f"{c['cp_al_seconds']:.2f} s, {mib(c['cp_al_disk_bytes'])} MiB"
            for c in results["cp_a"]
        )
    )
    if results.get("direct"):
        lines.append(
            "500 changes of the same kind written straight to the disk, without asd: "
            + ", ".join(
                f"{d['dataset']} {mib(d['disk_bytes'])} MiB ({mib(d['changed_bytes'])} changed)"
                for d in results["direct"]
            )
        )
    p = results.get("parse") or {}
    if p:
        lines.append(
            f"asd parse, ten targets: {p['unsynced']:.2f} s (unsynced), "
            f"{p['synced']:.2f} s (synced)"
        )
    return "\n".join(lines)


def goals(results: dict[str, Any]) -> str:
    """Issue 6's goals next to the measured numbers."""
    runs = {(r["dataset"], r["mode"]): r for r in results["runs"]}
    names = [d["dataset"] for d in results["cp_a"]]
    small, big = names[1], names[2]
    out = []
    for mode in ("copy", "overlay"):
        a, b = runs.get((small, mode)), runs.get((big, mode))
        if not a or not b:
            continue
        for ph in ("resync", "idle_resync"):
            ratio = b[ph]["seconds"] / max(a[ph]["seconds"], 1e-6)
            out.append(f"{mode}: {ph} {big}/{small} = {ratio:.2f}x (goal <= 1.5x)")
        if "read_resync" in a and "read_resync" in b:
            ratio = b["read_resync"]["seconds"] / max(a["read_resync"]["seconds"], 1e-6)
            out.append(f"{mode}: resync after reading every file {big}/{small} = {ratio:.2f}x")
        direct = {d["dataset"]: d for d in results.get("direct", [])}
        floors = {c["dataset"]: c for c in results["cp_a"]}  # the same work without asd
        for r in (a, b, runs.get((names[0], mode))):
            if r is None:
                continue
            ratio = r["resync"]["disk_bytes"] / max(r["workload"]["changed_bytes"], 1)
            again = r["resync_again"]["disk_bytes"] / max(r["workload_again"]["changed_bytes"], 1)
            d = direct.get(r["dataset"])
            floor = d["disk_bytes"] / max(d["changed_bytes"], 1) if d else float("nan")
            out.append(
                f"{mode} {r['dataset']}: resync wrote {ratio:.2f}x the changed bytes, "
                f"the next one {again:.2f}x (goal <= 1.5x; written without asd: {floor:.2f}x); "
                f"sync wrote {mib(r['sync']['disk_bytes'])} MiB, "
                f"unsync {mib(r['unsync']['disk_bytes'])} MiB (goal <= 1 MiB each); "
                f"unsync {r['unsync']['seconds']:.2f} s (goal <= 0.2 s"
                + (
                    f"; rm -rf of a copy without asd: {floors[r['dataset']]['rm_rf_seconds']:.2f}"
                    " s)"
                    if mode == "copy"
                    else ")"
                )
            )
        for r in (a, b, runs.get((names[0], mode))):
            if r is not None and "sync_again" in r:
                out.append(
                    f"{mode} {r['dataset']}, next session: sync "
                    f"{r['sync_again']['seconds']:.2f} s, {mib(r['sync_again']['disk_bytes'])} "
                    f"MiB; unsync {r['unsync_again']['seconds']:.2f} s, "
                    f"{mib(r['unsync_again']['disk_bytes'])} MiB"
                )
        if mode == "overlay":
            f = floors[big]
            out.append(
                f"overlay: sync of {big} {b['sync']['seconds']:.2f} s, the next session's "
                f"{b['sync_again']['seconds']:.2f} s (goal <= 0.2 s; reading every inode from "
                f"a cold cache without asd: {f['cold_find_seconds']:.2f} s)"
            )
            out.append(
                f"overlay: without asd, cp -al of {big} beside it and sync: "
                f"{f['cp_al_seconds']:.2f} s, {mib(f['cp_al_disk_bytes'])} MiB (the first sync "
                f"builds such a tree: {b['sync']['seconds']:.2f} s, "
                f"{mib(b['sync']['disk_bytes'])} MiB)"
            )
        else:
            c = {x["dataset"]: x for x in results["cp_a"]}
            for r in (runs.get((n, mode)) for n in names):
                if r:
                    rate = r["bytes"] / MiB / max(r["sync"]["seconds"], 1e-6)
                    out.append(
                        f"copy {r['dataset']}: sync {rate:.0f} MiB/s = "
                        f"{100 * rate / c[r['dataset']]['mib_per_s']:.0f} % of cp -a "
                        "(goal >= 70 %)"
                    )
    p = results.get("parse") or {}
    if p:
        out.append(f"asd parse on ten targets: {p['synced']:.2f} s (goal <= 0.3 s)")
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller data sets (a few minutes)")
    ap.add_argument("--out", type=Path, default=REPO / "out" / "bench.json")
    ap.add_argument("--modes", default="copy,overlay")
    ap.add_argument("--only", default="", help="comma-separated data set names")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("the benchmark needs root (loop devices, mounts)", file=sys.stderr)
        return 2
    if os.environ.get(IN_NS) != "1":
        env = {**os.environ, IN_NS: "1"}
        argv = ["unshare", "-m", "--propagation", "private", sys.executable, *sys.argv]
        return subprocess.run(argv, env=env, check=False).returncode
    # asd as packaged: dh_python3 and Arch's python packages ship byte-compiled modules, and
    # this shell may set PYTHONDONTWRITEBYTECODE, which would time the compiler at every phase.
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(REPO / "asd")], check=True)
    bench = Bench(args.quick)
    sets = datasets(args.quick)
    if args.only:
        sets = [d for d in sets if d.name in args.only.split(",")]
    started = time.monotonic()
    bench.results["loadavg_start"] = Path("/proc/loadavg").read_text().split()[:3]
    try:
        bench.setup("4g" if args.quick else "12g")
        for ds in sets:
            bench.run_dataset(ds, args.modes.split(","))
        bench.parse_ten()
    finally:
        bench.teardown()
    res = bench.results
    res["seconds"] = round(time.monotonic() - started, 1)
    res["loadavg_end"] = Path("/proc/loadavg").read_text().split()[:3]
    res["commit"] = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    res["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1) + "\n")
    print()
    print(table(res))
    if len(res["cp_a"]) == 3:
        print()
        print(goals(res))
    print(
        f"\n{res['seconds']:.0f} s in all; load average {' '.join(res['loadavg_start'])} at the "
        f"start, {' '.join(res['loadavg_end'])} at the end (wall times need a quiet machine; "
        f"bytes and RAM do not); JSON in {args.out}"
    )
    ok = all(r["verified"] and not r["litter"] for r in res["runs"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
