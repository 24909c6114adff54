"""The hard-link safety check (``ENABLE_HARDLINK_SAFETY_CHECK``): files of a target that also
have a name outside it. The RAM copy holds such a file once, under the target's name; writing
it back replaces that name's file, and the outside name keeps the old content: the link is
split. asd refuses such a target unless the check is off.

A link count is in the inode, not in the directory entry, so the check has to stat every file
of the disk copy; find(1) does that walk and prints only files with more than one link. It is
about twice as fast as the same walk in Python (200 000 files on ext4 here: 0.86 s against
1.6 s with a cold cache, as at boot; 0.27 s against 0.68 s warm).

Overlay mode's lower tree (`asd.lower`) sits in the disk copy and links every one of its files
again. Once the tree has been brought up to date, every name in the disk copy has exactly one
twin there, so a file is linked only from inside when its count is twice its names in the
target: find then prints only files with more than two links.

That walk need not wait for the tree: `linked_outside_while` runs find while the tree is
brought up to date, and trusts a clean result only when nothing could have hidden from it.
Take a file with k names in the target and o links outside. If its k twins were all there when
find looked, it had 2k + o > 2 links and find printed it. If not, the tree made a twin of it,
and right after that link the file had at least k + 1 + o links (its names, the new twin):
more than 2 if o > 0 or k > 1. So when find printed nothing and every link the tree made left
its file with exactly two, no file is linked from outside; anything else (a link inside the
target, a file renamed meanwhile) has the check run again on the finished tree, as above.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Set as AbstractSet
from pathlib import Path

from asd.errors import CommandError
from asd.run import Result, run

VANISHED = "No such file or directory"  # a program removed it while find walked: not a link


def find_argv(exclude_top: AbstractSet[str], names_per_file: int) -> list[str]:
    """find, run in the root, printing inode, link count and path (NUL-terminated) of every
    non-directory with more links than ``names_per_file``; top-level names in
    ``exclude_top`` (asd's own) are skipped, and other file systems are not entered."""
    argv = ["find", ".", "-xdev"]
    for name in sorted(exclude_top):
        argv += ["-path", f"./{name}", "-prune", "-o"]
    return [*argv, "!", "-type", "d", "-links", f"+{names_per_file}", "-printf", "%i %n %P\\0"]


def split_files(found: str, names_per_file: int) -> list[str]:
    """From ``find_argv``'s output, one name (the first in sorted order) of each file that has
    more links than ``names_per_file`` times its names in the target."""
    names: dict[int, list[str]] = {}
    links: dict[int, int] = {}
    for record in found.split("\0"):
        if record:
            ino, count, rel = record.split(" ", 2)
            names.setdefault(int(ino), []).append(rel)
            links[int(ino)] = int(count)
    return sorted(min(n) for ino, n in names.items() if len(n) * names_per_file < links[ino])


def linked_outside(
    root: Path, exclude_top: AbstractSet[str] = frozenset(), names_per_file: int = 1
) -> list[str]:
    """Files under ``root`` hard-linked to files outside it. ``names_per_file``: 2 when asd's
    lower tree mirrors ``root`` on the same file system, else 1."""
    argv = find_argv(exclude_top, names_per_file)
    result = run(argv, cwd=str(root), ok_codes=(0, 1))
    _raise_unless_vanished(argv, result)
    return split_files(result.stdout, names_per_file)


def _raise_unless_vanished(argv: list[str], result: Result) -> None:
    """find fails for a file a program removed while it walked: that one is not a link."""
    errors = [line for line in result.stderr.splitlines() if not line.endswith(VANISHED)]
    if result.exit_code != 0 and errors:
        raise CommandError(argv, result.exit_code, result.stdout, result.stderr)


def linked_outside_while(
    root: Path, exclude_top: AbstractSet[str], mirror: Callable[[], int]
) -> list[str]:
    """`linked_outside` for a ``root`` whose lower tree ``mirror`` brings up to date while find
    walks (see above); ``mirror`` returns how many of the links it made left their file with
    other than two."""
    argv = find_argv(exclude_top, 2)
    shared: list[int] = []
    result = run(argv, cwd=str(root), ok_codes=(0, 1), alongside=lambda: shared.append(mirror()))
    _raise_unless_vanished(argv, result)
    if not result.stdout and shared == [0]:
        return []
    return linked_outside(root, exclude_top, 2)
