"""The pieces of giving overlay RAM back that need no mount: the delta, the stacking order of
mounts at one path, generations of the layout, the run state's record."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from asd import delta, mapped, shrink, upper
from asd.layout import Instance
from asd.mounts import MountTable, is_layer_of, parse_mountinfo
from asd.state import RunState
from asd.tree import OPAQUE, REDIRECT, WHITEOUT_ENTRY, Entry


def _can_make_whiteouts() -> bool:
    """Root with CAP_MKNOD and trusted xattrs (a package build's container may have neither)."""
    import tempfile

    if os.geteuid() != 0:
        return False
    with tempfile.TemporaryDirectory() as tmp:
        try:
            os.mknod(os.path.join(tmp, "w"), stat.S_IFCHR | 0o600, 0)
            os.setxattr(tmp, "trusted.asd-probe", b"y")
        except OSError:
            return False
    return True


root_only = pytest.mark.skipif(
    not _can_make_whiteouts(), reason="whiteouts and trusted xattrs need root with CAP_MKNOD"
)


def build(disk: Path, out: Path, held: set[str], opaque: set[str]) -> int:
    """`delta.build` through descriptors, as `asd.shrink` calls it."""
    out.mkdir()
    disk_fd = os.open(disk, os.O_RDONLY | os.O_DIRECTORY)
    out_fd = os.open(out, os.O_RDONLY | os.O_DIRECTORY)
    try:
        return delta.build(disk_fd, disk, out_fd, held, opaque)
    finally:
        os.close(disk_fd)
        os.close(out_fd)


DIR: Entry = (stat.S_IFDIR, 0o755, 0, 0, 0, 0, 0, 0, 1, 0)
FILE: Entry = (stat.S_IFREG, 0o644, 0, 0, 5, 0, 0, 0, 1, 0)


def disk_tree(disk: Path) -> None:
    (disk / "kept" / "inner").mkdir(parents=True)
    (disk / "kept" / "inner" / "f").write_text("new\n")
    (disk / "kept" / "untouched").write_text("old\n")
    (disk / "replaced").mkdir()
    (disk / "replaced" / "only").write_text("only\n")
    (disk / "moved").mkdir()
    (disk / "moved" / "a").write_text("a\n")
    (disk / "moved" / "b").write_text("b\n")
    os.symlink("kept", disk / "link")
    os.utime(disk / "kept", ns=(1, 1_000_000_000))


@root_only
def test_a_delta_mirrors_the_disk_copy_for_the_names_the_upper_layer_held(tmp_path: Path) -> None:
    disk = tmp_path / "disk"
    disk.mkdir()
    disk_tree(disk)
    index = {
        "": DIR,
        "kept": DIR,
        "kept/inner": DIR,
        "kept/inner/f": FILE,
        "gone": WHITEOUT_ENTRY,
        "replaced": (stat.S_IFDIR | OPAQUE, *DIR[1:]),
        "replaced/only": FILE,
        "moved": (stat.S_IFDIR | REDIRECT, *DIR[1:]),
        "link": (stat.S_IFLNK, *FILE[1:]),
    }
    held, opaque = delta.names(index, None)
    assert opaque == {"replaced", "moved"}
    out = tmp_path / "delta"
    count = build(disk, out, held, opaque)
    # A file is the disk copy's own inode; a symlink too (a hard link to it).
    assert os.lstat(out / "kept/inner/f").st_ino == os.lstat(disk / "kept/inner/f").st_ino
    assert os.readlink(out / "link") == "kept"
    # Only the names held: the untouched file comes from the lower tree, not from here.
    assert not os.path.lexists(out / "kept/untouched")
    # A name the disk copy no longer has is a whiteout.
    gone = os.lstat(out / "gone")
    assert stat.S_ISCHR(gone.st_mode) and gone.st_rdev == 0
    # A redirected directory becomes opaque and whole: its lower-tree content was elsewhere.
    assert sorted(os.listdir(out / "moved")) == ["a", "b"]
    assert os.getxattr(out / "moved", delta.OPAQUE_XATTR) == b"y"
    assert os.getxattr(out / "replaced", delta.OPAQUE_XATTR) == b"y"
    with pytest.raises(OSError):
        os.getxattr(out / "kept", delta.OPAQUE_XATTR)
    # Directories carry the disk copy's times, set after their contents.
    assert os.lstat(out / "kept").st_mtime_ns == 1_000_000_000
    assert count == 10  # 8 names held, the whiteout among them, and 2 below "moved"

    # The next delta carries the previous one's names (and their opacity) forward.
    (disk / "kept" / "inner" / "f").unlink()
    held2, opaque2 = delta.names({"": DIR, "link": (stat.S_IFLNK, *FILE[1:])}, out)
    assert {"kept/inner/f", "moved/a", "gone"} <= held2 and opaque2 == {"replaced", "moved"}
    out2 = tmp_path / "delta2"
    build(disk, out2, held2, opaque2)
    assert stat.S_ISCHR(os.lstat(out2 / "kept/inner/f").st_mode)


@root_only
def test_nothing_is_made_below_a_name_that_is_no_directory(tmp_path: Path) -> None:
    disk = tmp_path / "disk"
    disk.mkdir()
    (disk / "was-dir").write_text("a file now\n")
    held = {"was-dir", "was-dir/child", "absent", "absent/child"}
    out = tmp_path / "delta"
    build(disk, out, held, set())
    assert sorted(os.listdir(out)) == ["absent", "was-dir"]
    assert os.path.isfile(out / "was-dir")


MOUNTINFO_BENEATH = (
    "1 0 0:1 / / rw - ext4 /dev/vda rw\n"
    # The old bind is listed first, though it sits on top of the one attached beneath it.
    "69 70 0:40 / /srv/t rw - overlay asd-overlay rw,lowerdir=/l,upperdir=/v/upper,workdir=/v/w\n"
    "70 1 0:43 / /srv/t rw - overlay asd-overlay rw,lowerdir+=/d,lowerdir+=/l,"
    "upperdir=/v/upper.1,workdir=/v/work.1\n"
)


def test_the_top_mount_is_found_by_parent_not_by_line_order() -> None:
    table = MountTable(parse_mountinfo(MOUNTINFO_BENEATH))
    assert [m.mount_id for m in table.at("/srv/t")] == [70, 69]
    top = table.top_at("/srv/t")
    assert top is not None and top.mount_id == 69
    assert is_layer_of(top, "/v/upper") and not is_layer_of(top, "/v/upper.1")
    assert is_layer_of(table.at("/srv/t")[0], "/v/upper.1")
    assert not is_layer_of(table.top_at("/"), "/v/upper")


def test_generations_name_their_layers_and_the_current_one_is_read_back(tmp_path: Path) -> None:
    layout = Instance(tmp_path / "asd.conf", tmp_path / "vol").target(Path("/srv/t"))
    assert layout.upper.name == "upper" and layout.lowers == [layout.lower]
    layout.overlay_dir.mkdir(parents=True)
    layout.generation_file.write_text("3\n")
    now = upper.current(layout)
    assert now.generation == 3
    assert (now.upper.name, now.overlay_work.name, now.delta.name) == (
        "upper.3",
        "work.3",
        "delta.3",
    )
    assert now.lowers == [now.delta, now.lower]
    layout.generation_file.write_text("garbage")
    assert upper.current(layout).generation == 0


def test_the_run_state_keeps_what_each_resync_did_with_the_ram() -> None:
    state = RunState("synced", {}, ram={"/srv/t": "RAM not given back yet: in use"})
    again = RunState.from_json(state.to_json())
    assert again.ram == state.ram
    assert RunState.from_json({**state.to_json(), "ram": None} | {"ram": {}}).ram == {}


def test_a_file_smudged_for_a_mapping_stays_in_ram_at_the_switch(tmp_path: Path) -> None:
    """A program may have written it through a mapping after the resync copied it (no time
    shows that), so the new layer takes the old layer's version (`asd.mapped`)."""
    layout = Instance(tmp_path / "asd.conf", tmp_path / "vol").target(Path("/srv/t"))
    plain: Entry = (stat.S_IFREG, 7, 0o100644, 0, 0, 10, 1, 2, 1, 0)
    baseline = {
        "": (stat.S_IFDIR, 2, 0o40755, 0, 0, 0, 1, 2, 2, 0),
        "mapped": mapped.smudge_entry(plain),
        "plain": plain,
    }
    assert shrink._hot(layout, baseline) == {"mapped"}
