"""A tree's full observable state: what a program using the target would notice."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

SKIP_TOP = {".asd-work"}
KEPT = {
    "lower",
    "lower.json",
    "spare",
    "CACHEDIR.TAG",
}  # asd.layout.KEPT, spelled out: the tests say what they expect


def asd_left(target: Path) -> list[str]:
    """What asd left of its journal directory in a plain target, beyond what overlay mode
    keeps for the next session (its lower tree, the tree's record and spare links)."""
    work = target / ".asd-work"
    if not work.exists():
        return []
    if work.is_symlink() or not work.is_dir():
        return [".asd-work"]
    return sorted(set(os.listdir(work)) - KEPT)


def manifest(root: Path, *, times: bool = True) -> dict[str, Any]:
    """Per path: type, mode, owner, size, content, symlink target, xattrs (incl. ACLs),
    mtime, sparseness, and which paths share an inode (hard links)."""
    out: dict[str, Any] = {}
    inode_names: dict[int, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        rel_dir = os.path.relpath(dirpath, root)
        for name in [*dirnames, *sorted(filenames), *([] if rel_dir != "." else [""])]:
            path = Path(dirpath, name) if name else Path(dirpath)
            rel = os.path.normpath(os.path.join(rel_dir, name))
            st = os.lstat(path)
            rec: dict[str, Any] = {
                "type": stat.S_IFMT(st.st_mode),
                "mode": stat.S_IMODE(st.st_mode),
                "uid": st.st_uid,
                "gid": st.st_gid,
                "xattrs": {
                    n: os.getxattr(path, n, follow_symlinks=False)
                    for n in sorted(os.listxattr(path, follow_symlinks=False))
                },
            }
            if times and not stat.S_ISLNK(st.st_mode):
                rec["mtime_ns"] = st.st_mtime_ns
            if stat.S_ISREG(st.st_mode):
                rec["size"] = st.st_size
                rec["data"] = path.read_bytes()
                rec["sparse"] = st.st_blocks * 512 < st.st_size
                rec["link_group"] = inode_names.setdefault(st.st_ino, rel)
            elif stat.S_ISLNK(st.st_mode):
                rec["target"] = os.readlink(path)
            out[rel] = rec
        if rel_dir == ".":
            dirnames[:] = [d for d in dirnames if d not in SKIP_TOP]
            for d in SKIP_TOP:
                out.pop(d, None)
    # Hard links are names sharing an inode *within the tree* (overlay mode's lower tree adds
    # links outside it, which a program using the target cannot see as names).
    groups: dict[str, int] = {}
    for rec in out.values():
        if "link_group" in rec:
            groups[rec["link_group"]] = groups.get(rec["link_group"], 0) + 1
    for rec in out.values():
        if "link_group" in rec and groups[rec["link_group"]] < 2:
            del rec["link_group"]
    return out


def differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """Readable list of what differs between two manifests (for assertion messages)."""
    out = []
    for key in sorted(set(a) | set(b)):
        if key not in a or key not in b:
            out.append(f"{key}: only in {'second' if key in b else 'first'}")
        elif a[key] != b[key]:
            fields = sorted(k for k in set(a[key]) | set(b[key]) if a[key].get(k) != b[key].get(k))
            shown = [f"{f} {a[key].get(f)!r:.60} vs {b[key].get(f)!r:.60}" for f in fields]
            out.append(f"{key}: {', '.join(shown)}")
    return out
