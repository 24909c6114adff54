"""rsync command lines, as data. Executing them is `asd.run`'s job; exit-code meaning is here.

Flags, and why:
  -a            recursive, symlinks, permissions, times, owner, group, devices
  -H            hard links within the tree stay hard links
  -A -X         POSIX ACLs and extended attributes
  -S            sparse files stay sparse (no ballooning in RAM, log2ram PR #217)
  --numeric-ids owners by number: the RAM copy and the disk copy are the same machine
  --modify-window=-1  compare times to the nanosecond: with the default whole-second
                compare, rsync leaves a directory's fresh mtime alone when the source's
                differs only in the fraction of the same second
"""

from __future__ import annotations

from pathlib import Path

BASE_FLAGS = ("-aHAXS", "--numeric-ids", "--modify-window=-1")
VANISHED = 24  # "some files vanished before they could be transferred": a browser pruning its cache
PARTIAL = 23  # "some files/attrs were not transferred": any error on some file, vanished or not
_GONE = "No such file or directory (2)"


def copy_listed(src: Path, dst: Path, list_file: Path) -> list[str]:
    """Copy exactly the NUL-separated relative paths in ``list_file`` (no recursion).

    ``--ignore-missing-args``: a listed name gone from RAM since the walk (a browser pruning
    its cache) is otherwise an error, exit 23, not 24; the caller finds what vanished by
    looking at what reached the stage.
    """
    argv = ["rsync", *BASE_FLAGS, "--from0", "--ignore-missing-args"]
    return [*argv, f"--files-from={list_file}", f"{src}/", f"{dst}/"]


def copy_trees(src: Path, dst: Path, list_file: Path) -> list[str]:
    """`copy_listed`, but a listed directory comes with everything below it."""
    rsync, *rest = copy_listed(src, dst, list_file)
    return [rsync, "-r", *rest]  # --files-from turns off the recursion -a implies


def ok_codes(*, allow_vanished: bool) -> tuple[int, ...]:
    return (0, VANISHED) if allow_vanished else (0,)


def only_vanished(exit_code: int | None, stderr: str) -> bool:
    """Whether a failed rsync only found files gone that it had already listed.

    A file deleted after rsync's lstat but before it reads the file's ACL or xattrs is
    reported as that read failing with ENOENT and exit 23, not as vanished (24); rsync then
    leaves the file out. Any other complaint (EIO, EACCES, a full disk, an error on the
    receiving side) is a real failure.
    """
    if exit_code != PARTIAL:
        return False
    gone = False
    for line in stderr.splitlines():
        line = line.strip()
        if not line or line.startswith(("file has vanished: ", "rsync error: ")):
            continue
        if not (line.startswith("rsync: [sender] ") and line.endswith(_GONE)):
            return False
        gone = True
    return gone
