"""Connections to the configured database: which one, connecting, pools, retry policy.

Settings name the database: ``BQX_DATABASE_URL``, else libpq's ``PG*`` variables, else the
embedded server. Every session runs in UTC with the user's own ``options`` applied too.
"""

from __future__ import annotations

import getpass
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
from psycopg import errors as pgerrors
from psycopg_pool import ConnectionPool

from bqx.config import Settings
from bqx.core.text import first_line
from bqx.db.embedded import EmbeddedServer
from bqx.db.urls import check_url, mask_text, mask_url, session_conninfo
from bqx.errors import BqxError


def embedded(settings: Settings) -> EmbeddedServer:
    return EmbeddedServer(settings.home_dir)


def resolve_url(settings: Settings, *, start: bool = True) -> str:
    """The conninfo to use: ``BQX_DATABASE_URL``, else libpq's PG* variables, else embedded.

    ``start=False`` is for read-only commands: an embedded server that is not running is left
    so, and a BqxError says so and how to start it.
    """
    if settings.database_url is not None:
        url = settings.database_url.get_secret_value()
        check_url(url)
        return url
    if settings.uses_libpq_env():
        return ""  # libpq reads PGHOST, PGUSER, ... itself
    server = embedded(settings)
    return server.start() if start else server.running_url()


def connect(
    settings: Settings | str, *, autocommit: bool = False, start: bool = True
) -> psycopg.Connection:
    """A psycopg connection in UTC, to the configured database (starting the embedded one,
    unless ``start`` is False). The user's ``options``/PGOPTIONS apply too."""
    url = settings if isinstance(settings, str) else resolve_url(settings, start=start)
    conninfo = session_conninfo(url)
    try:
        conn = psycopg.connect(conninfo, autocommit=autocommit)
    except psycopg.Error as exc:
        shown = mask_url(url) if url else "the server named by PG* variables"
        raise BqxError(f"cannot connect to {shown}: {mask_text(first_line(exc), url)}") from None
    return conn


@contextmanager
def pool(url: str, size: int) -> Iterator[ConnectionPool]:
    """Up to ``size`` autocommit connections in UTC, shared by threads (``pool.connection()``)."""
    with ConnectionPool(
        session_conninfo(url), min_size=1, max_size=max(1, size), open=True,
        kwargs={"autocommit": True},
    ) as p:  # fmt: skip
        yield p


def server_version(settings: Settings) -> str:
    """The version of the server bqx would use (never starting the embedded one)."""
    with connect(settings, autocommit=True, start=False) as conn:
        row = conn.execute("SHOW server_version").fetchone()
    return str(row[0]) if row else "?"


def describe_target(settings: Settings) -> str:
    """A person-readable description of the database in use, password masked."""
    if settings.database_url is not None:
        return mask_url(settings.database_url.get_secret_value())
    if settings.uses_libpq_env():
        return "libpq PG* environment: " + ", ".join(
            f"{v}={os.environ[v]}" for v in ("PGHOST", "PGPORT", "PGDATABASE", "PGUSER")
            if os.environ.get(v)
        )  # fmt: skip
    return f"embedded PostgreSQL at {embedded(settings).datadir}"


def worker_id() -> str:
    """``user@host:pid`` as recorded in the ledger."""
    return f"{socket.gethostname()}:{os.getpid()}"


def current_user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no passwd entry in some containers
        return str(os.getuid())


# Errors that a retry can fix: the connection went away, the server restarted, a transaction
# lost a serialization or deadlock race. A cancelled statement (timeout, Ctrl-C) is not one.
TRANSIENT_ERRORS = (
    psycopg.OperationalError,
    pgerrors.SerializationFailure,
    pgerrors.DeadlockDetected,
    pgerrors.AdminShutdown,
    pgerrors.CannotConnectNow,
)


def is_transient(exc: BaseException) -> bool:
    """Whether retrying the work that raised ``exc`` can succeed."""
    return isinstance(exc, TRANSIENT_ERRORS) and not isinstance(exc, pgerrors.QueryCanceled)


def is_database_error(exc: BaseException) -> bool:
    """Whether ``exc`` came from the database driver (the server refused or went away)."""
    return isinstance(exc, psycopg.Error)


def ping(conn: psycopg.Connection) -> None:
    """A round trip to the server: raises when it does not answer."""
    conn.execute("SELECT 1")
