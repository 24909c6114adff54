"""cp and rm command lines, as data: copying a target into RAM, and removing asd's trees.

Why cp and not rsync for this one copy: into an empty tmpfs there is nothing to compare, and
GNU cp moves each file's data inside the kernel (copy_file_range) in one process, where
rsync pipes every byte from its sender to its receiver and, with -S, scans it for zeros.
On large files cp is about three times as fast (bench/RESULTS.md). Resyncs stay with rsync.

Flags, and why:
  --no-dereference --recursive   symlinks stay symlinks; devices, fifos, sockets are made
  --preserve=mode,ownership,timestamps,links,xattr
                permissions and POSIX ACLs, owner and group by number, times to the
                nanosecond, hard links within the tree, extended attributes. Named one by
                one, not `-a`: `-a` does not fail when an xattr cannot be set; this does
  --sparse=auto a sparse file stays sparse (its holes are found, not its zeros)
  --no-target-directory   copy ``src``'s contents into the existing ``dst``, which takes
                ``src``'s own attributes
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

FLAGS = (
    "--no-dereference",
    "--recursive",
    "--preserve=mode,ownership,timestamps,links,xattr",
    "--sparse=auto",
    "--no-target-directory",
)


def copy_tree(src: Path, dst: Path) -> list[str]:
    """Copy all of ``src`` into the existing directory ``dst`` (cp has no exclude: the caller
    removes from ``dst`` what it did not want)."""
    return ["cp", *FLAGS, "--", str(src), str(dst)]


def remove_tree(*paths: Path | str) -> list[str]:
    """Remove each of ``paths`` and everything under it, never crossing into another file
    system (a mount left below it is refused, not emptied); absent is fine. For asd's own
    trees, the RAM copy and the overlay's lower tree: hundreds of thousands of files, where
    Python's `shutil.rmtree` adds its own time per file to the kernel's."""
    return ["rm", "--recursive", "--force", "--one-file-system", "--", *map(str, paths)]


def shares(paths: Sequence[str], n: int) -> list[list[str]]:
    """``paths`` dealt out to ``n`` removers, in turn, so that neighbours (alike in size, as
    the subdirectories of one directory tend to be) go to different ones; none empty."""
    return [share for share in (list(paths[i::n]) for i in range(n)) if share]
