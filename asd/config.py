"""asd.conf: the bash-style settings file, read as data and never executed.

The file may use this much of bash and no more: comments, ``NAME=value``, ``NAME=( ... )``
lists over any number of lines, ``NAME+=( ... )``, and single, double or no quotes with
bash's backslash rules. Whatever bash would expand or run (``$``, backticks, ``;``, pipes,
redirections, wildcards in lists, any other command) is an error, so reading the file can
never do anything. Every problem is collected and reported at once with its line.

(One module of ~500 lines on purpose: the scanner, its message table and the settings
table are one grammar; apart, each would reach into the others' internals.)
"""

from __future__ import annotations

import bisect
import difflib
import os
import re
import stat
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from asd.errors import ConfigError
from asd.mounts import PSEUDO_FSTYPES, Mount, MountTable

DEFAULT_PATH = Path("/etc/asd.conf")
DEFAULT_VOLATILE = Path("/tmp")  # noqa: S108  # upstream's default; asd checks it is a tmpfs

Kind = Literal["paths", "path", "bool", "count"]


@dataclass(frozen=True)
class Setting:
    name: str
    kind: Kind
    default: object
    help: str

    @property
    def field(self) -> str:
        return self.name.lower()


# One row per setting, laid out by hand (hence fmt: skip), so the table reads as a table.
SETTINGS: tuple[Setting, ...] = (
    Setting("WHATTOSYNC", "paths", (),
            "Directories to keep in RAM, as a list: WHATTOSYNC=('/srv/http' '/var/lib/foo')."),
    Setting("VOLATILE", "path", DEFAULT_VOLATILE,
            "A tmpfs directory that holds the RAM copies, such as /dev/shm."),
    Setting("USE_OVERLAYFS", "bool", False,
            "Keep only changed files in RAM, over the disk copy (needs the overlay module)."),
    Setting("USE_BACKUPS", "bool", True,
            "After a crash, snapshot the last good copy before putting it back."),
    Setting("BACKUP_LIMIT", "count", 5,
            "How many crash-recovery snapshots to keep per target; 0 keeps none."),
    Setting("ENABLE_HARDLINK_SAFETY_CHECK", "bool", True,
            "Refuse a target that holds hard links, which syncing would break apart."),
)  # fmt: skip
_BY_NAME = {s.name: s for s in SETTINGS}
# Upstream's is_truthy() spellings, and their opposites (upstream took anything else as no).
_TRUE = frozenset({"1", "y", "yes", "t", "true", "on", "enable", "enabled", "use"})
_FALSE = frozenset({"0", "n", "no", "f", "false", "off", "disable", "disabled"})
_PSEUDO_ROOTS = ("/proc", "/sys", "/dev")

_ASSIGN = re.compile(r"(?:export[ \t]+)?([A-Za-z_][A-Za-z0-9_]*)(\+?=)")
_SPACED = re.compile(r"(?:export[ \t]+)?[A-Za-z_][A-Za-z0-9_]*[ \t]+\+?=")
_META = frozenset(" \t\n;&|<>()")
_OPERATORS = ("&&", "||", ";", "|", "&", "<", ">", "(", ")")  # longest first
# One piece of a shell word. Whatever bash would expand gets a group of its own, so it is
# refused rather than read; a lone "$" that bash leaves alone is plain text.
_SEGMENT = re.compile(
    r"'(?P<single>[^']*)'"
    r'|"(?P<double>(?:[^"\\]|\\[\s\S])*)"'
    r"|\\(?P<escaped>[\s\S]?)"
    r"|(?P<substitution>\$\((?:[^()\n]|\([^()\n]*\))*\)?|`[^`\n]*`?)"
    r"|(?P<variable>\$(?:\{[^}\n]*\}?|[A-Za-z_][A-Za-z0-9_]*|[0-9@*#?$!-]))"
    r"""|(?P<dollar_quote>\$'[^']*'?|\$"[^"]*"?)"""
    r"""|(?P<plain>[^ \t\n;&|<>()'"\\`$]+|\$)"""
)
_DQ_ESCAPE = re.compile(r'\\([$`"\\\n])')
_DQ_EXPANSION = re.compile(r"\\[\s\S]|(\$\(|`|\$[{A-Za-z0-9_@*#?$!-])")
_NO_COMMANDS = "asd.conf holds settings, one per line, and asd never runs commands from it"
# Every problem asd.conf's text can have: (what is wrong, what to do about it), by hand.
_MESSAGES = {
    "command": ("this line is not a setting", _NO_COMMANDS),
    "spaced": ("this line is not a setting", "write no spaces around '='"),
    "&&": ("'&&' would run another command", _NO_COMMANDS),
    "||": ("'||' would run another command", _NO_COMMANDS),
    ";": ("';' would start another command", _NO_COMMANDS),
    "|": ("'|' would pipe into a command", _NO_COMMANDS),
    "&": ("'&' would run a command in the background", _NO_COMMANDS),
    "<": ("'<' is a redirection", _NO_COMMANDS),
    ">": ("'>' is a redirection, which would write to a file", _NO_COMMANDS),
    "(": ("'(' is not allowed here", "write a list as NAME=( ... )"),
    ")": ("')' has no matching '('", "write a list as NAME=( ... )"),
    "trailing": ("unexpected text after the value", "put each setting on its own line, "
                 "write no spaces around '=', and quote a value that contains spaces"),
    "list_open": ("this list is never closed", "add a ')' after its last entry"),
    "list_char": ("{char!r} is not allowed inside a list", "quote a path that contains it"),
    "quote_open": ("this {quote} quote is never closed",
                   "add the closing {quote}, or put a path holding {quote} in the other quotes"),
    "tilde": ("'~' would be replaced by a home directory", "write the full path instead"),
    "pattern": ("an unquoted *, ?, [ or {{ in a list would be expanded as a pattern",
                "list each directory, and quote a path whose name holds one of them"),
    "substitution": ("command substitution is not allowed",
                     f"{_NO_COMMANDS}; write the value out literally"),
    "variable": ("variables are not expanded in asd.conf",
                 "write the value out in full, or use single quotes for a literal $"),
    "dollar_quote": ("$'...' and $\"...\" quoting is not supported", "use plain quotes"),
    "glue": ("{name}+= with a plain value would glue text onto the first entry",
             "write {name}+=('{value}') to add a directory"),
    "not_list": ("{name} takes one value, not a list", 'write {name}="value"'),
    "append": ("'+=' only adds to a list", 'write {name}="value"'),
    "lower": ("setting names are upper case", "write {upper}"),
    "unknown": ("{name} is not a setting", "{suggestion}"),
    "bool": ("{name} must be yes or no",
             "write yes or no (y/n, true/false, on/off and 1/0 also work)"),
    "count": ("{name} must be a whole number, 0 or more",
              "write how many snapshots to keep, such as {name}=5"),
    "empty": ("{label} is empty", "remove the empty entry, or write a full path"),
    "control": ("{label} contains a newline or another control character", "remove it"),
    "relative": ("{label} is not an absolute path", "write the full path, starting with /"),
    "dotdot": ("{label} contains '..'", "write the path without '..'"),
    "root": ("{label} is the root directory", "name the directory to keep in RAM"),
    "pseudo": ("WHATTOSYNC entry is on a kernel pseudo filesystem",
               "/proc, /sys and /dev belong to the kernel; remove it"),
    "twice": ("WHATTOSYNC lists {path} twice",
              "remove one of them (the other is on line {line})"),
    "nested": ("WHATTOSYNC entries {outer} and {inner} overlap",
               "{outer} already includes {inner} (see line {line}); keep only {outer}"),
    "in_volatile": ("WHATTOSYNC entry overlaps VOLATILE ({volatile})",
                    "asd keeps its RAM copies in VOLATILE, so the two must be apart"),
    "crlf": ("the file has Windows line endings", "convert it with dos2unix and try again"),
}  # fmt: skip


@dataclass(frozen=True)
class Config:
    path: Path
    whattosync: tuple[Path, ...] = ()
    volatile: Path = DEFAULT_VOLATILE
    use_overlayfs: bool = False
    use_backups: bool = True
    backup_limit: int = 5
    enable_hardlink_safety_check: bool = True

    def to_json(self) -> dict[str, object]:
        data: dict[str, object] = {"path": str(self.path)}
        for s in SETTINGS:
            value = getattr(self, s.field)
            if s.kind == "paths":
                value = [str(p) for p in value]
            data[s.field] = str(value) if s.kind == "path" else value
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, object]) -> Config:
        """The inverse of to_json, for the configuration kept in the run state."""
        kinds: dict[str, Kind] = {"path": "path", **{s.field: s.kind for s in SETTINGS}}
        values = {key: _from_json_value(kind, data.get(key)) for key, kind in kinds.items()}
        if bad := [key for key, value in values.items() if value is None]:
            hint = "the run state is damaged or was written by another version of asd"
            raise ConfigError(
                [
                    f"the saved configuration has an invalid {key}: {data.get(key)!r}; {hint}"
                    for key in bad
                ]
            )
        return cls(**values)  # type: ignore[arg-type]  # each value was checked against its kind


def _from_json_value(kind: Kind, value: object) -> object | None:
    if kind == "paths":
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return tuple(Path(v) for v in value)
    elif kind == "path":
        if isinstance(value, str):
            return Path(value)
    elif kind == "bool":
        if isinstance(value, bool):
            return value
    elif isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return None


def default_path(environ: Mapping[str, str]) -> Path:
    """``$ASDCONF`` if set and not empty (as upstream's ``${ASDCONF:-...}``), else /etc/asd.conf."""
    return Path(environ.get("ASDCONF") or DEFAULT_PATH)


def load(path: Path) -> Config:
    try:
        data = path.read_bytes()
    except OSError as exc:
        hint = "create it" if isinstance(exc, FileNotFoundError) else "make it a file root can read"
        raise ConfigError(
            [f"cannot read {path}: {exc.strerror or exc}; {hint}, or set ASDCONF to another file"]
        ) from None
    # Paths are bytes on Linux: undecodable bytes survive as surrogates, as in os.fsdecode.
    return parse(data.decode("utf-8", "surrogateescape"), path)


def parse(text: str, path: Path) -> Config:
    """Read asd.conf's text. Touches no file; raises ConfigError listing every problem."""
    parser = _Parser(text, path)
    parser.scan()
    values = parser.values()
    if parser.problems:
        if "\r" in text:
            parser.problem(text.index("\r"), "crlf", parser.line_text(text.index("\r")))
        raise ConfigError([message for _, message in sorted(parser.problems, key=lambda p: p[0])])
    return Config(path=path, **values)  # type: ignore[arg-type]  # values() types them per kind


def _segment_problem(kind: str, body: str, *, first: bool, in_array: bool) -> str | None:
    """The _MESSAGES key for a word segment that bash would expand, or None."""
    if kind in ("substitution", "variable", "dollar_quote"):
        return kind
    if kind == "double":
        found = next((m.group(1) for m in _DQ_EXPANSION.finditer(body) if m.group(1)), None)
        if found:
            return "substitution" if found in ("$(", "`") else "variable"
    if kind == "plain" and first and body.startswith("~"):
        return "tilde"
    if kind == "plain" and in_array and any(c in body for c in "*?[{"):
        return "pattern"
    return None


def _show(text: str) -> str:
    return text if text and text.isprintable() else repr(text)


def _inside(path: str, parent: str) -> bool:
    return path == parent or path.startswith(parent + "/")


class _Parser:
    """A scanner for the assignment-only subset of bash; it records problems and goes on."""

    def __init__(self, text: str, path: Path) -> None:
        self.text = text
        self.path = path
        self.pos = 0
        self.starts = [0, *(m.end() for m in re.finditer("\n", text))]
        self.problems: list[tuple[int, str]] = []
        self.scalars: dict[str, tuple[int, str]] = {}  # name: (where it starts, raw value)
        self.targets: list[tuple[int, str]] = []

    def line(self, pos: int) -> int:
        return bisect.bisect_right(self.starts, pos)

    def end_of_line(self, pos: int) -> int:
        end = self.text.find("\n", pos)
        return end if end >= 0 else len(self.text)

    def line_text(self, pos: int) -> str:
        start = self.starts[self.line(pos) - 1]
        return self.text[start : self.end_of_line(start)].strip(" \t")

    def problem(self, pos: int, key: str, shown: str, **fields: object) -> None:
        what, hint = (part.format(**fields) for part in _MESSAGES[key])
        line = self.line(pos)
        self.problems.append((line, f"{self.path}:{line}: {what}: {_show(shown)}; {hint}"))

    def skip(self, chars: str) -> None:
        while self.pos < len(self.text) and self.text[self.pos] in chars:
            self.pos += 1

    def scan(self) -> None:
        while self.pos < len(self.text):
            self.skip(" \t\n")
            if self.text.startswith("#", self.pos):
                self.pos = self.end_of_line(self.pos)
            elif self.pos < len(self.text):
                self.statement()

    def statement(self) -> None:
        start, before = self.pos, len(self.problems)
        match = _ASSIGN.match(self.text, start)
        if match is None:
            key = "spaced" if _SPACED.match(self.text, start) else "command"
            self.problem(start, key, self.line_text(start))
            self.pos = self.end_of_line(start)
            return
        name, op = match.groups()
        self.pos = match.end()
        value: str | list[tuple[int, str]] | None = ""
        if self.text.startswith("(", self.pos):
            value = self.array()
        elif self.pos < len(self.text) and self.text[self.pos] not in " \t\n":
            value = self.word(in_array=False)
        self.skip(" \t")
        rest = self.text[self.pos : self.end_of_line(self.pos)]
        if rest and not rest.startswith("#"):
            key = next((t for t in _OPERATORS if rest.startswith(t)), "trailing")
            self.problem(self.pos, key, rest)
        self.pos = self.end_of_line(self.pos)
        if value is not None and len(self.problems) == before:
            self.assign(start, name, op, value)

    def array(self) -> list[tuple[int, str]] | None:
        opened, ok = self.pos, True
        items: list[tuple[int, str]] = []
        self.pos += 1
        while True:
            self.skip(" \t\n")
            if self.pos >= len(self.text):
                self.problem(opened, "list_open", self.line_text(opened))
                return None
            char = self.text[self.pos]
            if char == ")":
                self.pos += 1
                return items if ok else None
            if char == "#":
                self.pos = self.end_of_line(self.pos)
            elif char in _META:
                self.problem(self.pos, "list_char", self.line_text(self.pos), char=char)
                self.pos += 1
                ok = False
            else:
                at, value = self.pos, self.word(in_array=True)
                if value is None and self.pos >= len(self.text):
                    return None  # an unclosed quote swallowed the rest; that is the problem
                ok = ok and value is not None
                items.append((at, value or ""))

    def word(self, *, in_array: bool) -> str | None:
        """One shell word, quotes and escapes resolved; None if it had a problem."""
        start, ok = self.pos, True
        out: list[str] = []
        while segment := _SEGMENT.match(self.text, self.pos):
            at, kind, body = self.pos, str(segment.lastgroup), segment.group()
            self.pos = segment.end()
            key = _segment_problem(kind, body, first=at == start, in_array=in_array)
            if key:
                self.problem(at, key, body)
                ok = False
            elif kind == "double":
                out.append(_DQ_ESCAPE.sub(lambda m: m.group(1).strip("\n"), segment.group(kind)))
            elif kind == "escaped":
                out.append(segment.group(kind).strip("\n") if segment.group(kind) else "\\")
            else:
                out.append(segment.group(kind))
        if self.text.startswith(("'", '"'), self.pos):  # a quote that _SEGMENT could not close
            quote = self.text[self.pos]
            self.problem(self.pos, "quote_open", self.line_text(self.pos), quote=quote)
            self.pos = len(self.text)
            return None
        return "".join(out) if ok else None

    def assign(self, start: int, name: str, op: str, value: str | list[tuple[int, str]]) -> None:
        shown, setting = self.line_text(start), _BY_NAME.get(name)
        if setting is None:
            self.unknown(start, name)
        elif setting.kind == "paths":
            if isinstance(value, list):
                self.targets = (self.targets if op == "+=" else []) + value
            elif op == "+=":
                self.problem(start, "glue", shown, name=name, value=_show(value))
            else:  # bash makes a plain value a one-entry list; an empty one means no entries
                self.targets = [(start, value)] if value else []
        elif isinstance(value, list):
            self.problem(start, "not_list", shown, name=name)
        elif op == "+=":
            self.problem(start, "append", shown, name=name)
        else:
            self.scalars[name] = (start, value)

    def unknown(self, start: int, name: str) -> None:
        shown, upper = self.line_text(start), name.upper()
        if name != upper and upper in _BY_NAME:
            self.problem(start, "lower", shown, upper=upper)
        else:
            close = difflib.get_close_matches(upper, list(_BY_NAME), n=1)
            known = f"the settings are {', '.join(_BY_NAME)}"
            suggestion = f"did you mean {close[0]}?" if close else known
            self.problem(start, "unknown", shown, name=name, suggestion=suggestion)

    def values(self) -> dict[str, object]:
        """Each setting's checked value (its default when unset or empty), by field name."""
        values: dict[str, object] = {}
        for s in SETTINGS:
            pos, raw = self.scalars.get(s.name, (0, ""))
            low = raw.lower()
            if s.kind == "paths" or raw == "":
                values[s.field] = s.default
            elif s.kind == "bool" and low in _TRUE | _FALSE:
                values[s.field] = low in _TRUE
            elif s.kind == "count" and re.fullmatch(r"0*[0-9]{1,9}", raw):
                values[s.field] = int(raw)
            elif s.kind in ("bool", "count"):
                self.problem(pos, s.kind, raw, name=s.name)
            else:
                checked = self.checked_path(pos, s.name, raw)
                values[s.field] = Path(checked) if checked else None
        volatile = values["volatile"]
        values["whattosync"] = self.checked_targets(str(volatile) if volatile else None)
        return values

    def checked_path(self, pos: int, label: str, raw: str) -> str | None:
        """``raw`` without trailing slashes, ``//`` and ``/./``; None if it is unusable."""
        norm = "/" + "/".join(p for p in raw.split("/") if p not in ("", "."))
        if not raw:
            key = "empty"
        elif any(ord(c) < 32 or ord(c) == 127 for c in raw):
            key = "control"
        elif not raw.startswith("/"):
            key = "relative"
        elif ".." in raw.split("/"):
            key = "dotdot"
        elif norm == "/":
            key = "root"
        else:
            return norm
        self.problem(pos, key, raw, label=label)
        return None

    def checked_targets(self, volatile: str | None) -> tuple[Path, ...]:
        """The targets, each checked alone, against the others and against VOLATILE."""
        seen: dict[str, int] = {}
        for pos, raw in self.targets:
            norm = self.checked_path(pos, "WHATTOSYNC entry", raw)
            if norm is None:
                continue
            if any(_inside(norm, root) for root in _PSEUDO_ROOTS):
                self.problem(pos, "pseudo", raw)
                continue
            if norm in seen:
                self.problem(pos, "twice", raw, path=norm, line=self.line(seen[norm]))
                continue
            for other, other_pos in seen.items():
                if _inside(norm, other) or _inside(other, norm):
                    outer, inner = sorted((norm, other), key=len)
                    line = self.line(other_pos)
                    self.problem(pos, "nested", raw, outer=outer, inner=inner, line=line)
            if volatile and (_inside(norm, volatile) or _inside(volatile, norm)):
                self.problem(pos, "in_volatile", raw, volatile=volatile)
            seen[norm] = pos
        return tuple(Path(p) for p in seen)


def check_paths(config: Config, mounts: MountTable) -> None:
    """Check the targets and VOLATILE against the filesystem; raise ConfigError listing all."""
    problems = [f"{config.path}: {problem}" for problem in _filesystem_problems(config, mounts)]
    if problems:
        raise ConfigError(problems)


def _filesystem_problems(config: Config, mounts: MountTable) -> Iterator[str]:
    for target in config.whattosync:
        label = f"WHATTOSYNC entry {target}"
        if problem := _directory_problem(label, target, "create it, or remove it from WHATTOSYNC"):
            yield problem
        elif (fs := _holding(mounts, target)) and fs.fstype in PSEUDO_FSTYPES:
            yield f"{label} is on {fs.fstype}, a kernel filesystem; remove it from WHATTOSYNC"
        else:
            yield from (
                f"{label} has {m.fstype} ({m.source}) mounted inside it at {m.mountpoint}; "
                f"make {m.mountpoint} its own target or unmount it"
                for m in mounts.below(target)
            )
    label = f"VOLATILE {config.volatile}"
    if problem := _directory_problem(label, config.volatile, "create it, or set it to /dev/shm"):
        yield problem
    elif not (fs := _holding(mounts, config.volatile)) or not fs.is_ram:
        where = f"{fs.fstype} (mounted at {fs.mountpoint})" if fs else "no known mount"
        yield (
            f"{label} is on {where}, not in RAM, so asd would gain nothing; "
            "mount a tmpfs there or set VOLATILE to a tmpfs such as /dev/shm"
        )


def _holding(mounts: MountTable, path: Path) -> Mount | None:
    try:
        return mounts.holding(path)
    except LookupError:
        return None


def _directory_problem(label: str, path: Path, missing: str) -> str | None:
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return f"{label} does not exist; {missing}"
    except OSError as exc:
        return f"cannot look at {label}: {exc.strerror}; check its parent directories"
    real = os.path.realpath(path)
    if stat.S_ISLNK(mode):
        return f"{label} is a symbolic link to {real}; use the real path {real} instead"
    if not stat.S_ISDIR(mode):
        return f"{label} is not a directory; asd keeps whole directories in RAM, so name one"
    if real != str(path):
        return f"{label} goes through a symbolic link; use its real path {real} instead"
    return None
