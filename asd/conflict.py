"""Where the old layer's version of a name written twice during overlay mode's switch goes.

A program can write a name in the old upper layer after the resync's walk (the switch window)
and again in the new one before asd carries the window's writes over (`asd.shrink`). The new
layer's version is the later one and stays; the earlier one is not dropped with the old
layer but copied, at its path, into ``asd-conflict-<UTC time>/`` at the top of the target,
which the next resync writes to disk like any other new file.

- `save_earlier(layout, names, noted) -> str | None`: copy them; the directory's name, or None.
- `discard(layout, name)`: remove what an attempt killed while it copied left of its directory.
"""

from __future__ import annotations

import errno
import os
import stat
import time
from collections.abc import Callable
from pathlib import Path

from asd import rsync
from asd.dirfd import remove_at
from asd.dirmeta import O_DIR
from asd.errors import CommandError, SafetyError
from asd.layout import TargetLayout
from asd.run import run

PREFIX = "asd-conflict"


def save_earlier(
    layout: TargetLayout, names: list[str], noted: Callable[[str], None] | None = None
) -> str | None:
    """Copy the old layer's version of ``names`` (none below another; directories with
    everything below them) from the RAM copy's path, which still shows the old overlay, into a
    new directory at the top of the target; then give it the target's owner and mode. rsync
    writes into it by descriptor, and it is closed to everyone until rsync is done, so nothing
    the owner does meanwhile can send the copy elsewhere. Returns its name, or None if none of
    them was left to save. ``noted`` is told the directory's name before anything is copied
    into it, so that what an attempt killed meanwhile left can be removed (`discard`)."""
    list_file = layout.index_file.with_suffix(".conflicts")
    fd = os.open(layout.target, O_DIR)
    try:
        name, out = _fresh_dir(fd, layout.target)
        try:
            if noted is not None:
                noted(name)
            list_file.write_bytes(b"".join(os.fsencode(r) + b"\0" for r in names))
            alias = Path(f"/proc/self/fd/{out}")
            try:
                run(rsync.copy_trees(layout.ram_copy, alias, list_file), pass_fds=(out,))
            except CommandError as exc:
                remove_at(fd, name)
                raise exc.reworded(
                    f"{layout.target}: could not save the earlier version of names written "
                    "during the switch to the next RAM layer and again after it; the switch "
                    "stays pending, the previous layer is kept, and the next resync tries again"
                ) from None
            if not os.listdir(out):  # gone from the old layer too (vanished meanwhile)
                os.rmdir(name, dir_fd=fd)
                return None
            owner = os.fstat(fd)
            os.fchown(out, owner.st_uid, owner.st_gid)
            os.fchmod(out, stat.S_IMODE(owner.st_mode))
        finally:
            os.close(out)
    finally:
        list_file.unlink(missing_ok=True)
        os.close(fd)
    return name


def discard(layout: TargetLayout, name: str) -> None:
    """Remove ``name`` at the top of the target if it is still what `save_earlier` makes
    before it is done: a directory of root's, closed to everyone else."""
    fd = os.open(layout.target, O_DIR)
    try:
        try:
            st = os.stat(name, dir_fd=fd, follow_symlinks=False)
        except FileNotFoundError:
            return
        if stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid() and st.st_mode & 0o077 == 0:
            remove_at(fd, name)
    finally:
        os.close(fd)


def _fresh_dir(fd: int, shown: Path) -> tuple[str, int]:
    """A new directory of asd's own (0700) in ``fd``, named after the time, and its fd."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    for n in range(1, 100):
        name = f"{PREFIX}-{stamp}" + (f"-{n}" if n > 1 else "")
        try:
            os.mkdir(name, 0o700, dir_fd=fd)
        except FileExistsError:
            continue
        out = os.open(name, O_DIR, dir_fd=fd)
        st = os.fstat(out)
        if st.st_uid == os.geteuid() and stat.S_IMODE(st.st_mode) == 0o700:
            return name, out
        os.close(out)  # replaced by someone else's between the mkdir and the open
        raise SafetyError(
            f"{shown / name} was replaced while asd made it; asd does not write into it"
        )
    raise FileExistsError(errno.EEXIST, "too many directories of that name", str(shown / name))
