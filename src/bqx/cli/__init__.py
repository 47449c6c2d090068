"""The ``bqx`` command line: parse options, call ``bqx.Store``, print the result.

``app`` holds the frame (options, output, errors, exit codes, signals); each sibling module
adds the commands of one area. No SQL and no database driver here.
"""

from bqx.cli import data, db, operate, out, run  # noqa: F401  (each registers its commands)
from bqx.cli.app import app, main
from bqx.cli.run import invocation

__all__ = ["app", "invocation", "main"]
