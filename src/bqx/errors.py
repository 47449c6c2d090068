"""Errors a user can act on: the CLI prints their message on one line, without a traceback."""


class BqxError(Exception):
    """A problem with the user's input or configuration, stated so that they can fix it."""
