"""Connections to the configured database: which one, connecting, pools, retry policy.

Settings name the database (docs/configuration.md): a URL, a file holding one, an AWS Secrets
Manager secret (each optionally with RDS IAM tokens), else libpq's ``PG*`` variables, else the
embedded server. What is handed around is a :class:`DatabaseRef`, and every connection, pooled
or not, is opened by :func:`open_connection`, which resolves it: a fresh IAM token each time, a
secret fetched again when the server refuses its password. Every session runs in UTC with the
user's own ``options`` applied too.
"""

from __future__ import annotations

import getpass
import os
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Self, TypeVar

import psycopg
from psycopg import errors as pgerrors
from psycopg.rows import TupleRow
from psycopg_pool import ConnectionPool

from bqx.config import Settings
from bqx.core.text import first_line
from bqx.db.credentials import DatabaseRef, refused_password
from bqx.db.embedded import EmbeddedServer
from bqx.db.urls import check_url, mask_text, session_conninfo
from bqx.errors import BqxError

# what the pipeline hands around: a reference, or a URL / conninfo string ("" = PG* variables)
DatabaseLike = DatabaseRef | str
C = TypeVar("C")


def embedded(settings: Settings) -> EmbeddedServer:
    return EmbeddedServer(settings.home_dir)


def database_ref(settings: Settings, *, start: bool = True) -> DatabaseRef:
    """The database the settings name, as a reference (no file read, no secret fetched).

    ``start=False`` is for read-only commands: an embedded server that is not running is left
    so, and a BqxError says so and how to start it.
    """
    settings.check_credentials()
    iam = settings.database_iam
    if settings.database_url is not None:
        url = settings.database_url.get_secret_value()
        check_url(url)
        return DatabaseRef("url", url, iam)
    if settings.database_url_file is not None:  # absolute: workers may run elsewhere
        return DatabaseRef("file", str(settings.database_url_file.expanduser().absolute()), iam)
    if settings.database_secret is not None:
        return DatabaseRef("secret", settings.database_secret, iam)
    if settings.uses_libpq_env():
        return DatabaseRef("libpq")  # libpq reads PGHOST, PGUSER, ... itself
    server = embedded(settings)
    return DatabaseRef("url", server.start() if start else server.running_url())


def as_ref(target: Settings | DatabaseLike, *, start: bool = True) -> DatabaseRef:
    if isinstance(target, DatabaseRef):
        return target
    if isinstance(target, str):
        return DatabaseRef.of(target)
    return database_ref(target, start=start)


def resolve_url(settings: Settings, *, start: bool = True) -> str:
    """The conninfo to use now, resolved (it may hold a password or token: never print it)."""
    return database_ref(settings, start=start).conninfo()


def open_connection(ref: DatabaseRef, opener: Callable[[str], C]) -> C:
    """``opener(conninfo)`` with ``ref`` resolved now, in bqx's session settings: the one
    place where connections are made. A secret whose password the server refuses is fetched
    again, once, before the refusal stands (the secret may have been rotated)."""
    try:
        return opener(session_conninfo(ref.conninfo()))
    except psycopg.OperationalError as exc:
        if not (ref.refetches and refused_password(exc)):
            raise
    return opener(session_conninfo(ref.conninfo(fresh=True)))


def connect(
    target: Settings | DatabaseLike, *, autocommit: bool = False, start: bool = True
) -> psycopg.Connection:
    """A psycopg connection in UTC, to the configured database (starting the embedded one,
    unless ``start`` is False). The user's ``options``/PGOPTIONS apply too."""
    ref = as_ref(target, start=start)
    try:
        return open_connection(ref, lambda info: psycopg.connect(info, autocommit=autocommit))
    except psycopg.Error as exc:
        urls = [ref.where] if ref.source == "url" else []
        raise BqxError(
            f"cannot connect to {ref.shown()}: {mask_text(first_line(exc), *urls)}"
        ) from None


class _PooledConnection(psycopg.Connection[TupleRow]):
    """A pool's connection, opened through :func:`open_connection` like any other."""

    @classmethod
    def connect(  # type: ignore[override]
        cls, conninfo: str = "", *, database: DatabaseRef, **kwargs: Any
    ) -> Self:
        opener = super().connect
        return open_connection(database, lambda info: opener(info, **kwargs))


@contextmanager
def pool(url: DatabaseLike, size: int) -> Iterator[ConnectionPool[_PooledConnection]]:
    """Up to ``size`` autocommit connections in UTC, shared by threads (``pool.connection()``)."""
    with ConnectionPool(
        "", connection_class=_PooledConnection, min_size=1, max_size=max(1, size), open=True,
        kwargs={"autocommit": True, "database": as_ref(url)},
    ) as p:  # fmt: skip
        yield p


def server_version(settings: Settings) -> str:
    """The version of the server bqx would use (never starting the embedded one)."""
    with connect(settings, autocommit=True, start=False) as conn:
        row = conn.execute("SHOW server_version").fetchone()
    return str(row[0]) if row else "?"


def describe_target(settings: Settings) -> str:
    """A person-readable description of the database in use, password masked."""
    if settings.database_url is not None:  # shown even when malformed (masked): never raises
        url = settings.database_url.get_secret_value()
        return DatabaseRef("url", url, settings.database_iam).shown()
    if settings.credential_settings():
        return database_ref(settings, start=False).shown()
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
