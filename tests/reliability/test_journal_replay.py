"""Rolling a commit record forward twice (a crash after its renames, before it is removed)
must leave what one apply leaves — also when one name is deleted and recreated."""

from __future__ import annotations

import os
from pathlib import Path

from asd.dirmeta import dir_metadata
from asd.journal import Journal
from asd.state import write_json_atomic
from asd.tree import Changes
from tests.integration.manifest import manifest


def test_replayed_record_keeps_type_changes(tmp_path: Path) -> None:
    disk = tmp_path / "disk"
    (disk / "d").mkdir(parents=True)
    (disk / "d" / "x").write_text("old x\n")
    (disk / "f").write_text("old f\n")
    os.symlink("d", disk / "l")
    journal = Journal(disk)
    with journal.new_stage():  # a test writes the stage by name; asd writes through the fd
        pass
    stage = journal.stage
    (stage / "d").write_text("now a file\n")
    (stage / "f").mkdir()
    (stage / "f" / "y").write_text("y\n")
    (stage / "l").mkdir()
    (stage / "l" / "z").write_text("z\n")
    changes = Changes(("d", "f", "l"), ("d", "f/y", "l/z"), ("", "f", "l"))
    journal.commit(changes, {"": dir_metadata(disk)})
    once = manifest(disk)
    assert (disk / "d").read_text() == "now a file\n" and (disk / "l" / "z").exists()
    # The crash: every rename done, the record not yet removed.
    record = {
        "deleted": list(changes.deleted),
        "dirs": {rel: dir_metadata(disk / rel if rel else disk) for rel in changes.dirs},
        "files": list(changes.files),
    }
    write_json_atomic(journal.record, record)
    assert journal.recover() is not None
    assert manifest(disk) == once, "rolling forward again lost what the first apply wrote"
