"""The one place asd runs other programs (through the `sh` library).

Every call is logged at debug level as a line that can be pasted into a shell, runs with
``LC_ALL=C``, stdin from /dev/null and stdout to a pipe (not sh's default pseudo-terminal, for
which programs such as find rewrite unusual characters in what they print), names the exit
codes it accepts, and fails with a single exception type, `CommandError`, that carries argv,
exit code, stdout and stderr.
"""

from __future__ import annotations

import codecs
import contextlib
import logging
import os
import shlex
import shutil
from collections.abc import Callable, Collection, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

from asd.errors import CommandError

log = logging.getLogger(__name__)

# Entered with a running command's pid, left when it ends (`asd.progress.watching`).
Watch = Callable[[int], AbstractContextManager[None]]


@dataclass(frozen=True)
class Result:
    argv: list[str]
    exit_code: int
    stdout: str
    stderr: str


# Arguments are mostly paths, and a path on Linux is bytes: a name that is not UTF-8 (a
# target in Latin-1, say) reaches Python as surrogate escapes, as `os.fsdecode` makes them.
# sh encodes every argument with the codec its ``_encoding`` names, in strict mode; this one
# gives back the very bytes, as `os.fsencode` would, and decodes output the same way.
FS_CODEC = "asd_fs"


def _fs_codec(name: str) -> codecs.CodecInfo | None:
    if name != FS_CODEC:
        return None
    return codecs.CodecInfo(
        lambda text, errors="strict": codecs.utf_8_encode(text, "surrogateescape"),
        lambda data, errors="strict": codecs.utf_8_decode(data, "surrogateescape", True),
        name=FS_CODEC,
    )


codecs.register(_fs_codec)


def fd_path(fd: int) -> str:
    """A path another process can open to reach the very file ``fd`` refers to."""
    return f"/proc/{os.getpid()}/fd/{fd}"


def command_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LC_")}
    env["LC_ALL"] = "C"
    env.setdefault("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
    if extra:
        env.update(extra)
    return env


def require(*programs: str) -> None:
    """Fail now, before anything is done, if one of ``programs`` is missing: a step that
    mounted something must be able to unmount it again."""
    for name in programs:
        if shutil.which(name, path=command_env()["PATH"]) is None:
            raise _not_installed([name])


def _not_installed(argv: list[str]) -> CommandError:
    message = f"{argv[0]} is not installed (or not on PATH); install it and try again."
    return CommandError(argv, None, message=message)


def run(
    argv: list[str],
    *,
    ok_codes: Collection[int] = (0,),
    env: Mapping[str, str] | None = None,
    cwd: str | None = None,
    pass_fds: Collection[int] = (),
    watch: Watch | None = None,
    alongside: Callable[[], object] | None = None,
) -> Result:
    """Run ``argv`` to completion; raise `CommandError` unless its exit code is in ``ok_codes``.

    ``pass_fds``: descriptors the command inherits, under the same numbers (for
    ``/proc/self/fd/N`` paths); every other one is closed. ``watch``: entered with the
    command's pid while it runs (progress on a terminal, `asd.progress`). ``alongside``:
    called in this process while the command runs; should it raise, the command is killed
    and waited for before the exception goes on. It must not start a command itself (use
    `run_together`): sh runs Python in the child between fork and exec, and a lock one of
    its threads for the running command held at the fork stays locked there for good.
    """
    import sh  # here, not at the top: it pulls in asyncio, a third of `asd parse`'s time

    log.debug("run: %s", shlex.join(argv))
    try:
        program = sh.Command(argv[0])
    except sh.CommandNotFound:
        raise _not_installed(argv) from None
    options: dict[str, Any] = {
        "_env": command_env(env),
        "_cwd": cwd,
        "_in": os.devnull,
        "_tty_out": False,
        "_ok_code": list(ok_codes),
        "_return_cmd": True,
        "_encoding": FS_CODEC,
        "_decode_errors": "surrogateescape",
    }
    if pass_fds:
        options["_pass_fds"] = set(pass_fds)
    for fd in pass_fds:
        os.set_inheritable(fd, True)  # sh keeps them open, but exec would close a CLOEXEC one
    try:
        if watch is None and alongside is None:
            proc = program(*argv[1:], **options)
        else:
            proc = program(*argv[1:], _bg=True, _bg_exc=False, **options)
            with watch(proc.pid) if watch else contextlib.nullcontext():
                if alongside is not None:
                    try:
                        alongside()
                    except BaseException:
                        with contextlib.suppress(ProcessLookupError, sh.ErrorReturnCode):
                            proc.kill()
                            proc.wait()
                        raise
                proc.wait()
    except sh.ErrorReturnCode as exc:
        if exc.exit_code < 0:
            raise CommandError(
                argv,
                exc.exit_code,
                message=f"{argv[0]} was killed by signal {-exc.exit_code}",
            ) from None
        raise CommandError(
            argv,
            exc.exit_code,
            exc.stdout.decode("utf-8", "surrogateescape"),
            exc.stderr.decode("utf-8", "surrogateescape"),
        ) from None
    finally:
        for fd in pass_fds:
            os.set_inheritable(fd, False)
    result = Result(argv, int(proc.exit_code), str(proc), proc.stderr.decode("utf-8", "replace"))
    if result.exit_code != 0:
        log.debug("%s exited %d (accepted)", argv[0], result.exit_code)
    return result


def run_together(argvs: list[list[str]]) -> None:
    """Run ``argvs`` at once, wait for all, and raise `CommandError` for the first (in the
    given order) that did not exit 0. They are started by `subprocess`, whose fork and exec
    happen in C: sh runs Python in the child, and a second sh command started while the
    first one's threads run could hang in its child before exec (an unsync hung so, waiting
    for the second rm of its RAM copy)."""
    import subprocess

    started: list[tuple[list[str], subprocess.Popen[bytes]]] = []
    try:
        for argv in argvs:
            log.debug("run: %s", shlex.join(argv))
            try:
                proc = subprocess.Popen(  # noqa: S603 - argv built by asd's own argv functions, no shell
                    [os.fsencode(a) for a in argv],
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    env=command_env(),
                )
            except FileNotFoundError:
                raise _not_installed(argv) from None
            started.append((argv, proc))
    except BaseException:
        for _argv, proc in started:
            proc.kill()
            proc.wait()
        raise
    failed: CommandError | None = None
    for argv, proc in started:
        out, err = proc.communicate()
        if proc.returncode != 0 and failed is None:
            stdout, stderr = (b.decode("utf-8", "surrogateescape") for b in (out, err))
            failed = (
                CommandError(
                    argv,
                    proc.returncode,
                    message=f"{argv[0]} was killed by signal {-proc.returncode}",
                )
                if proc.returncode < 0
                else CommandError(argv, proc.returncode, stdout, stderr)
            )
    if failed is not None:
        raise failed
