"""The typed failures asd raises; `cli.main` alone turns them into exit codes."""

from __future__ import annotations


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
            detail = stderr.strip().splitlines()[-1] if stderr.strip() else "no error output"
            message = f"{argv[0]} exited with status {exit_code}: {detail}"
        super().__init__(message)


class StateError(AsdError):
    """The run state, the lock, or what is mounted does not allow the operation."""


class SafetyError(AsdError):
    """asd refused to do something that could lose or expose data."""
