"""Property tests: whatever asd.conf holds, parse() answers with a Config or a ConfigError
whose every problem names a real line, and never runs anything."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from asd.config import SETTINGS, Config, parse
from asd.errors import ConfigError

CONF = Path("/etc/asd.conf")
SENTINEL = Path("/tmp/asd-config-fuzz-pwned")  # a fixed name, so fragments can refer to it
PREFIX = re.compile(rf"^{re.escape(str(CONF))}:([0-9]+): ")

# A word list reads best packed, hence fmt: skip.
FRAGMENTS = [
    "WHATTOSYNC", "VOLATILE", "USE_OVERLAYFS", "USE_BACKUPS", "BACKUP_LIMIT",
    "ENABLE_HARDLINK_SAFETY_CHECK", "whattosync", "WHATTOSNYC", "export ", "=", "+=", " = ",
    "(", ")", "( ", " )", "'", '"', "\\", "\\\n", "$", "$(", "${", "}", "`", "$'", '$"', "$HOME",
    "#", "# comment\n", "\n", "\n\n", " ", "\t", ";", "&&", "||", "|", "&", ">", "<", "~", "*",
    "?", "[", "{", ",", "..", "/", "/srv/http", "/tmp", "/dev/shm", "/proc", "yes", "no", "1",
    "0", "-1", "5", "!", "\r\n", "\x00", "é", "\udcff", f"touch {SENTINEL}",
    f"$(touch {SENTINEL})", f"`touch {SENTINEL}`", f"; touch {SENTINEL}", f"> {SENTINEL}",
    "rm -rf /",
]  # fmt: skip
PATHS = [
    "/srv/http", "/srv/http/", "/srv", "/srv/http/x", "/srv/a b", "/tmp", "/tmp/x", "/dev/shm",
    "/run/ram", "/run/ram/x", "/proc/x", "/", "//", "rel/x", "/a/../b", "/a/./b", "",
]  # fmt: skip
pieces = st.lists(st.sampled_from(FRAGMENTS) | st.text(max_size=3), max_size=10).map("".join)
bashish = st.lists(st.sampled_from(FRAGMENTS) | st.text(max_size=3), max_size=40).map("".join)
# Lines shaped like settings reach further in than free text: values, lists, path checks.
path_words = st.builds(
    str.format, st.sampled_from(["{}", "'{}'", '"{}"', "{}#x"]), st.sampled_from(PATHS)
)
words = path_words | pieces | st.sampled_from(["yes", "No", "0", "1", "5", "-1", "x"])
lists = st.builds(
    "({}{})".format, st.sampled_from(["", "\n"]), st.lists(words, max_size=5).map(" \n".join)
)
setting_lines = st.builds(
    "{}{}{}{}".format,
    st.sampled_from(["", "export ", " "]),
    st.sampled_from([s.name for s in SETTINGS] + ["whattosync", "WHATTOSNYC", "X"]),
    st.sampled_from(["=", "=", "+=", " ="]),
    words | lists,
)
settingish = st.lists(setting_lines | pieces, max_size=8).map("\n".join)


@pytest.fixture
def no_processes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make starting any process from Python a test failure."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"asd.config started a process: {args!r}")

    monkeypatch.setattr(subprocess, "Popen", refuse)
    for name in ("system", "posix_spawn", "posix_spawnp", "fork", "execv", "execve", "popen"):
        monkeypatch.setattr(os, name, refuse)


def check_parse(text: str) -> None:
    """parse() returns a Config or raises ConfigError naming valid lines; nothing else."""
    try:
        conf = parse(text, CONF)
    except ConfigError as exc:
        assert exc.problems
        for problem in exc.problems:
            match = PREFIX.match(problem)
            assert match, problem
            assert 1 <= int(match.group(1)) <= text.count("\n") + 1, problem
            assert "\n" not in problem, problem
    else:
        assert all(p.is_absolute() for p in conf.whattosync)
        assert conf.volatile.is_absolute()
        assert conf.backup_limit >= 0


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text())
@pytest.mark.usefixtures("no_processes")
def test_any_text(text: str) -> None:
    check_parse(text)


@settings(max_examples=500, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(bashish)
@example(f"VOLATILE=$(touch {SENTINEL})")
@example("WHATTOSYNC=(\n'/a\n")
@example("X='\n\n")
@pytest.mark.usefixtures("no_processes")
def test_bashish_text(text: str) -> None:
    SENTINEL.unlink(missing_ok=True)
    check_parse(text)
    assert not SENTINEL.exists()


@settings(max_examples=500, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(settingish)
@pytest.mark.usefixtures("no_processes")
def test_settingish_text(text: str) -> None:
    SENTINEL.unlink(missing_ok=True)
    check_parse(text)
    assert not SENTINEL.exists()


# --- round trip: a Config written out the ways a person might, read back unchanged ---

component = st.text(
    st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters="/"),
    min_size=1,
    max_size=6,
).filter(lambda c: c not in (".", ".."))


def quoted(path: str, style: int) -> str:
    """``path`` as bash would read it back, in single, double or no quotes."""
    if style == 0 and "'" not in path:
        return f"'{path}'"
    if style == 1:
        return '"' + re.sub(r'([$`"\\])', r"\\\1", path) + '"'
    return "".join(c if c.isascii() and (c.isalnum() or c in "/._-") else "\\" + c for c in path)


@st.composite
def configs_and_text(draw: st.DrawFn) -> tuple[Config, str]:
    tails = draw(st.lists(st.lists(component, max_size=3), max_size=4))
    targets = ["/".join(["", "srv", f"t{i}", *tail]) for i, tail in enumerate(tails)]
    volatile = "/".join(["", "run", "ram", *draw(st.lists(component, max_size=2))])
    flags = draw(st.tuples(st.booleans(), st.booleans(), st.booleans()))
    limit = draw(st.integers(0, 10_000))

    def word(path: str) -> str:
        return quoted(path + draw(st.sampled_from(["", "/", "//"])), draw(st.integers(0, 2)))

    def spelling(value: bool) -> str:
        options = ["yes", "y", "true", "on", "1"] if value else ["no", "n", "false", "off", "0"]
        return draw(st.sampled_from(options).map(lambda w: draw(st.sampled_from([w, w.upper()]))))

    entries = [word(t) for t in targets]
    lists = (
        f"WHATTOSYNC=({' '.join(entries)})",
        "WHATTOSYNC=(\n" + "".join(f"  {e}  # entry\n\n" for e in entries) + ")",
        "WHATTOSYNC=()\n" + "".join(f"WHATTOSYNC+=( {e} )\n" for e in entries),
    )
    text = "\n".join(
        [
            "# generated",
            draw(st.sampled_from(lists)),
            f"VOLATILE={word(volatile)}",
            f"USE_OVERLAYFS={spelling(flags[0])}",
            f"USE_BACKUPS={spelling(flags[1])}  # comment",
            f'BACKUP_LIMIT="{limit}"',
            f"export ENABLE_HARDLINK_SAFETY_CHECK={spelling(flags[2])}",
        ]
    )
    conf = Config(
        CONF,
        tuple(map(Path, targets)),
        Path(volatile),
        use_overlayfs=flags[0],
        use_backups=flags[1],
        backup_limit=limit,
        enable_hardlink_safety_check=flags[2],
    )
    return conf, text


@given(configs_and_text())
def test_written_out_configs_read_back_unchanged(case: tuple[Config, str]) -> None:
    conf, text = case
    assert parse(text, CONF) == conf


@given(configs_and_text())
def test_json_round_trip(case: tuple[Config, str]) -> None:
    conf, _ = case
    assert Config.from_json(json.loads(json.dumps(conf.to_json()))) == conf
