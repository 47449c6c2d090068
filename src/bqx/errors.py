"""Errors a caller can act on, for Python callers and the command line alike.

Each says what is wrong in words both understand; the CLI prints the message on one line
(no traceback) and maps the class to its exit code. ``InvalidOption`` names the parameter
(``workers``), which the CLI shows as its flag (``--workers``).
"""

from __future__ import annotations

from typing import Any


class BqxError(Exception):
    """A problem with the user's input, configuration or environment, stated so that they can
    fix it."""


class InvalidOption(BqxError):
    """A parameter's value is refused: ``param`` is its Python name (``job_timeout``)."""

    def __init__(self, param: str, value: Any, why: str, *, shown: str | None = None) -> None:
        self.param, self.value, self.why = param, value, why
        self.shown = _show(value) if shown is None else shown
        super().__init__(f"invalid {param.replace('_', ' ')} {self.shown}: {why}")

    @property
    def flag(self) -> str:
        """The command line's name of the parameter."""
        return "--" + self.param.replace("_", "-")


def _show(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    return repr(value) if isinstance(value, str) else str(value)


class NeedsOption(BqxError):
    """Refused unless the caller asks for it: ``param`` is the parameter that does
    (``replace``), ``does`` what it does. The message ends with how to ask, in the caller's
    words: ``(replace=True overwrites them)`` from Python, ``(--replace overwrites them)`` on
    the command line."""

    def __init__(self, message: str, param: str, does: str) -> None:
        self.message, self.param, self.does = message, param, does
        super().__init__(f"{message} ({param}=True {does})")

    @property
    def flag(self) -> str:
        return "--" + self.param.replace("_", "-")

    def for_command_line(self) -> str:
        return f"{self.message} ({self.flag} {self.does})"


class NothingToDo(BqxError):
    """The command found nothing to work on (no source bars in the range, say)."""


class DatabaseLost(BqxError):
    """The database went away during the work and did not come back in time."""


class MissingExtra(BqxError):
    """An optional feature whose packages are not installed. The message, one line, names the
    extra and the pip command that installs it (raised by :func:`bqx.extras.require`)."""

    def __init__(self, message: str, extra: str = "", module: str = "") -> None:
        super().__init__(message)
        self.extra = extra
        self.module = module
