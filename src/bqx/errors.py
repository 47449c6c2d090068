"""Errors a user can act on: the CLI prints their message on one line, without a traceback."""


class BqxError(Exception):
    """A problem with the user's input or configuration, stated so that they can fix it."""


class MissingExtra(BqxError):
    """An optional feature whose packages are not installed. The message, one line, names the
    extra and the pip command that installs it (raised by :func:`bqx.extras.require`)."""

    def __init__(self, message: str, extra: str = "", module: str = "") -> None:
        super().__init__(message)
        self.extra = extra
        self.module = module
