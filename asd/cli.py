"""Command line: arguments, output, exit codes. The only place that decides an exit status.

0 success; 1 failure; 2 usage or configuration error; 128+N after cleanup on signal N.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

from asd import __version__, config, report, snapshots
from asd.errors import AsdError, CommandError, ConfigError, SafetyError, StateError
from asd.layout import WORK_NAME, Instance
from asd.mounts import MountTable
from asd.state import StateStore, locked

if TYPE_CHECKING:
    from asd.sync import Engine

log = logging.getLogger("asd")


class Interrupted(BaseException):
    """SIGINT or SIGTERM arrived; raised so every layer can undo before exiting."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(signal.Signals(signum).name)


class Output:
    """User-facing lines: stdout for progress, stderr for warnings and errors."""

    def __init__(self) -> None:
        self.colour = sys.stderr.isatty() and "NO_COLOR" not in os.environ

    def _paint(self, code: str, text: str) -> str:
        return f"\033[{code}m{text}\033[0m" if self.colour else text

    def say(self, text: str) -> None:
        print(text, flush=True)

    def warn(self, text: str) -> None:
        print(self._paint("33", f"asd: warning: {text}"), file=sys.stderr, flush=True)

    def error(self, text: str) -> None:
        print(self._paint("31", f"asd: error: {text}"), file=sys.stderr, flush=True)


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "-c",
        "--config",
        type=Path,
        default=argparse.SUPPRESS,
        help="config file (default: $ASDCONF or /etc/asd.conf)",
    )
    common.add_argument(
        "--debug",
        action="store_true",
        default=argparse.SUPPRESS,
        help="log every command run, and show tracebacks",
    )
    p = argparse.ArgumentParser(
        prog="asd",
        parents=[common],
        description="anything-sync-daemon: keep directories in RAM and write them back to disk",
        epilog="settings in asd.conf:\n"
        + "\n".join(f"  {s.name:30} {s.help}" for s in config.SETTINGS),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"asd {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def cmd(name: str, help: str, aliases: Sequence[str] = ()) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, aliases=list(aliases), parents=[common])

    for name, text in (
        ("sync", "copy the targets into RAM and mount them there"),
        ("resync", "write what changed in RAM back to the disk copies"),
    ):
        cmd(name, text).add_argument("--dry-run", action="store_true", help="print the plan only")
    un = cmd("unsync", "write back, unmount, and leave the targets as plain directories")
    un.add_argument("--dry-run", action="store_true", help="print the plan only")
    un.add_argument(
        "--force",
        action="store_true",
        help="unmount even while programs hold files (names them; used at shutdown)",
    )
    pa = cmd("parse", "show what asd will do or is doing", aliases=("p", "preview"))
    pa.add_argument("--json", action="store_true", help="one JSON document")
    cl = cmd(
        "clean",
        "delete the configured targets' crash-recovery snapshots and the lower trees overlay "
        "mode keeps in stopped targets",
    )
    cl.add_argument(
        "--lower-trees",
        action="store_true",
        help="only the kept lower trees; the snapshots stay (what package removal runs)",
    )
    rs = cmd("restore", "restore a target from a crash-recovery snapshot (asd must be stopped)")
    rs.add_argument("what", nargs="?", help="a snapshot file, or a target (its newest snapshot)")
    su = cmd("suggest", "find directories worth keeping in RAM")
    su.add_argument("--watch", type=float, metavar="SECONDS", help="measure writes this long")
    su.add_argument("--json", action="store_true", help="one JSON document")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    debug = bool(getattr(args, "debug", False))
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.WARNING,
        format="asd: %(levelname)s: %(message)s",
    )
    logging.getLogger("sh").setLevel(logging.WARNING)  # sh's own tracing is not for users
    out = Output()

    def interrupted(signum: int, _frame: FrameType | None) -> None:
        raise Interrupted(signum)

    signal.signal(signal.SIGTERM, interrupted)
    signal.signal(signal.SIGINT, interrupted)
    try:
        return dispatch(args, out)
    except Interrupted as exc:
        out.error(f"stopped by {exc}; what this run started was undone or left consistent")
        return 128 + exc.signum
    except ConfigError as exc:
        for problem in exc.problems:
            out.error(problem)
        return 2
    except (CommandError, StateError, SafetyError, AsdError) as exc:
        if debug:
            log.exception("details")
        out.error(str(exc))
        return 1
    except OSError as exc:
        if debug:
            log.exception("details")
        out.error(f"{exc.strerror or exc}{': ' + str(exc.filename) if exc.filename else ''}")
        return 1


def load_config(args: argparse.Namespace) -> config.Config:
    path = getattr(args, "config", None) or config.default_path(os.environ)
    return config.load(Path(os.path.abspath(path)))


def dispatch(args: argparse.Namespace, out: Output) -> int:
    conf = load_config(args)
    instance = Instance(conf.path, conf.volatile)
    store = StateStore(instance)
    command = {"p": "parse", "preview": "parse"}.get(args.command, args.command)
    if command == "parse":
        state = store.load()
        shown = config.Config.from_json(state.config) if state else conf
        doc = report.build(Instance(conf.path, shown.volatile), shown, state)
        out.say(report.render_json(doc) if args.json else report.render_text(doc))
        return 0
    if command == "suggest":
        from asd import suggest

        out.say(suggest.run_suggest(conf, args.watch, args.json))
        return 0
    if os.geteuid() != 0:
        raise StateError(f"'asd {command}' changes mounts and must run as root (try sudo)")
    # Imported here, not at the top: parse is what users and monitoring run, and it needs none
    # of the machinery that changes mounts.
    from asd.sync import Engine

    engine = Engine(conf, instance, out.say, out.warn)
    if getattr(args, "dry_run", False):
        return dry_run(command, engine, out)
    with locked(instance, command, say=out.say):
        return act(command, args, engine, out)


def dry_run(command: str, engine: Engine, out: Output) -> int:
    from asd.steps import describe_plan
    from asd.writeback import pending

    state = engine.store.load()
    if command == "sync":
        if state is not None:
            out.say(
                "asd is already running for this config; sync would only finish what is missing"
            )
        for line in describe_plan(engine.config, engine.instance):
            out.say(f"would {line}")
    elif command in ("resync", "unsync"):
        state = engine.running_state()
        for target in state.actions:
            ch = pending(engine.layout(target))
            out.say(
                f"would write back {target}: {len(ch.files)} files, {len(ch.dirs)} directories, "
                f"{len(ch.deleted)} deletions"
            )
            if command == "unsync":
                out.say(f"would unmount {target} and leave it a plain directory")
    return 0


def act(command: str, args: argparse.Namespace, engine: Engine, out: Output) -> int:
    if command == "sync":
        if engine.store.load() is None:
            if not engine.config.whattosync:
                out.say(f"no sync targets: WHATTOSYNC in {engine.config.path} is empty")
                return 0
            config.check_paths(engine.config, MountTable.read())
        done = engine.sync()
        for target in done:
            out.say(f"{target}: now served from RAM")
        if not done:
            out.say("asd is already running; every target is in RAM")
    elif command == "resync":
        for result in engine.resync():
            out.say(result.describe())
            for rel in getattr(result, "vanished", ()):
                out.warn(f"{result.target / rel} vanished while it was being copied")
    elif command == "unsync":
        for target in engine.unsync(force=args.force):
            if os.path.lexists(Path(target) / WORK_NAME):
                out.say(
                    f"{target}: back on disk; {WORK_NAME} keeps overlay mode's lower tree for "
                    "the next start ('asd clean' deletes it)"
                )
            else:
                out.say(f"{target}: back on disk, nothing of asd left")
    elif command == "clean":
        return clean(engine, out, snapshots_too=not args.lower_trees)
    elif command == "restore":
        return restore(args.what, engine, out)
    return 0


def clean(engine: Engine, out: Output, *, snapshots_too: bool = True) -> int:
    """Crash-recovery snapshots of every configured target, and the lower tree overlay mode
    keeps in a stopped target (not in one asd runs: it is the overlay's lower layer). A tree
    that cannot go (a crashed session's journal beside it) is said and the others still go:
    exit 1 if any stayed."""
    from asd import recovery

    if snapshots_too:
        removed = [p for t in engine.config.whattosync for p in snapshots.clean(t)]
        for path in removed:
            out.say(f"deleted {path}")
        if not removed:
            out.say("no crash-recovery snapshots to delete")
    state = engine.store.load()
    mounts = MountTable.read()
    refused = deleted = 0
    for target in engine.config.whattosync:
        if (state is not None and str(target) in state.actions) or mounts.is_mountpoint(target):
            if engine.config.use_overlayfs:
                out.say(f"{target}: asd runs for it, so its lower tree is in use and stays")
            continue
        if not os.path.isdir(target) or os.path.islink(target):
            continue
        try:
            if recovery.discard_kept(target):
                deleted += 1
                out.say(
                    f"deleted {target / WORK_NAME} (the lower tree overlay mode kept between "
                    "sessions; the next sync builds it again)"
                )
        except (StateError, SafetyError) as exc:
            out.error(str(exc))
            refused += 1
    if not snapshots_too and not deleted and not refused:
        out.say("no kept lower trees to delete")
    return 1 if refused else 0


def restore(what: str | None, engine: Engine, out: Output) -> int:
    targets = list(engine.config.whattosync)
    snapshot: Path | None = None
    if what:
        given = Path(os.path.abspath(what))
        if given in targets:
            targets = [given]
        else:
            snapshot = given
            targets = [
                t
                for t in targets
                if given.parent == t.parent
                and given.name.startswith(engine.layout(t).snapshot_prefix)
            ]
            if not targets:
                raise SafetyError(
                    f"{given} is not a crash-recovery snapshot of a configured target"
                )
    else:
        targets = [t for t in targets if snapshots.list_snapshots(t)]
        if len(targets) != 1:
            names = ", ".join(str(t) for t in targets) or "none"
            raise SafetyError(
                f"say which target to restore ('asd restore TARGET' or a snapshot file); "
                f"targets with snapshots: {names}"
            )
    target = targets[0]
    state = engine.store.load()
    layout = engine.layout(target)
    if state is not None or MountTable.read().is_mountpoint(target) or layout.backup.exists():
        raise StateError(
            f"asd is running (or did not stop cleanly) for {target}; stop it first "
            "('systemctl stop asd' or 'asd unsync') and make sure no .backup_asd directory is left"
        )
    result = snapshots.restore(target, snapshot)
    out.say(snapshots.describe(result))
    if result.moved_aside is not None:
        from asd import recovery

        # Overlay mode's kept lower tree is root's and only links to the files beside it: not
        # something to leave in the directory its owner will look through and delete.
        with contextlib.suppress(StateError, SafetyError):
            if recovery.discard_kept(result.moved_aside):
                out.say(f"deleted the lower tree overlay mode kept in {result.moved_aside}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
