"""The typed failures asd raises; `cli.main` alone turns them into exit codes."""

from __future__ import annotations

import re


class AsdError(Exception):
    """A failure the user can act on; its message is a complete sentence."""


class ConfigError(AsdError):
    """asd.conf (or the command line) is not usable. Carries every problem found."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


class CommandError(AsdError):
    """An external command failed, or could not be started."""

    def __init__(
        self,
        argv: list[str],
        exit_code: int | None,
        stdout: str = "",
        stderr: str = "",
        message: str | None = None,
    ) -> None:
        self.argv = list(argv)
        self.exit_code = exit_code
        self.stdout = stdout
        self.stderr = stderr
        if message is None:
            message = f"{argv[0]} exited with status {exit_code}: {summary(stderr)}"
        super().__init__(message)

    def reworded(self, message: str) -> CommandError:
        """The same failure, told in terms of the user's files: ``message``, then the tool's
        first complaint (the cause) without the ``/proc/<pid>/fd/<n>`` names asd gave it."""
        lines = self.stderr.strip().splitlines()
        detail = re.sub(r"/proc/\d+/fd/\d+\s*:\s*", "", lines[0] if lines else str(self))
        return CommandError(
            self.argv, self.exit_code, self.stdout, self.stderr, f"{message}: {detail}"
        )

    def showing(self, alias: str, path: str) -> CommandError:
        """The same error with ``alias`` (a ``/proc/self/fd/N`` name) shown as ``path``."""

        def fix(text: str) -> str:
            return text.replace(alias, path)

        return CommandError(
            [fix(a) for a in self.argv],
            self.exit_code,
            fix(self.stdout),
            fix(self.stderr),
            message=fix(str(self)),
        )


def summary(stderr: str) -> str:
    """The lines of a tool's error output worth showing: the first names what failed (rsync:
    the file and the errno), the last is the tool's verdict ("rsync error: … (code 11)")."""
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    if not lines:
        return "no error output"
    return lines[0] if len(lines) == 1 else f"{lines[0]} ({lines[-1]})"


class StateError(AsdError):
    """The run state, the lock, or what is mounted does not allow the operation."""


class SafetyError(AsdError):
    """asd refused to do something that could lose or expose data."""
