"""The one path bars and metrics take between PostgreSQL and numpy: binary COPY.

Rows move in PostgreSQL's binary COPY format, encoded and decoded with numpy/numba so that no
Python code runs per row: timestamps are int64 microseconds since 2000-01-01 UTC on the wire,
prices float8, NULL where a float is NaN.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import psycopg
from psycopg import sql

from bqx.errors import BqxError

_PG_EPOCH_US = np.datetime64("2000-01-01T00:00:00", "us").astype(np.int64)
_COPY_HEADER = b"PGCOPY\n\xff\r\n\x00" + b"\x00\x00\x00\x00" + b"\x00\x00\x00\x00"
_COPY_TRAILER = b"\xff\xff"


def to_pg_us(times: np.ndarray) -> np.ndarray:
    """datetime64 (any unit) -> int64 microseconds since 2000-01-01, PostgreSQL's wire time."""
    return times.astype("datetime64[us]").astype(np.int64) - _PG_EPOCH_US


def from_pg_us(us: np.ndarray) -> np.ndarray:
    return (us.astype(np.int64) + _PG_EPOCH_US).astype("datetime64[us]")


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
    from bqx.core import kernels  # numba: imported when rows are first encoded

    pos += kernels._encode_rows(ts, columns, bits, out[pos:])
    if last:
        out[pos : pos + 2] = 0xFF
        pos += 2
    return memoryview(out.data)[:pos]


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


def select_series(
    cur: psycopg.Cursor, query: sql.Composable, params: Sequence[object] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Run ``query`` selecting (timestamptz, float8) rows and return them sorted by time as
    (datetime64[us], float64).

    The server packs the rows into one bytea (``timestamptz_send || float8send``, the COPY
    binary wire encodings) that arrives as one binary value: COPY TO STDOUT would send one
    message per row, each costing a Python iteration in the client (60 ms a month of bars).
    """
    times, prices, _ = select_series_with(cur, query, params)
    return times, prices


def select_series_with(
    cur: psycopg.Cursor, query: sql.Composable, params: Sequence[object] | None = None,
    extra: sql.Composable | None = None,
) -> tuple[np.ndarray, np.ndarray, tuple[Any, ...]]:  # fmt: skip
    """``select_series``, and the values of ``extra`` (aggregates over ``s.t``, ``s.p``)
    computed in the same scan."""
    # no ORDER BY in the aggregate: rows come in index order almost always, and sorting them
    # here only when they do not costs the client far less than a sort on the server
    stmt = sql.SQL(
        "SELECT count(*), string_agg(timestamptz_send(s.t) || float8send(s.p), ''::bytea){extra}"
        " FROM ({query}) s(t, p)"
    ).format(query=query, extra=sql.SQL(", ") + extra if extra is not None else sql.SQL(""))
    row = cur.execute(stmt, params, binary=True).fetchone()
    count, packed = row[:2] if row is not None else (0, b"")
    rest = tuple(row[2:]) if row is not None else ()
    packed = packed or b""
    if len(packed) != 16 * count:  # string_agg skips a row whose time or price is NULL
        raise BqxError("unexpected NULL time or price in the source bars")
    rows = np.frombuffer(packed, dtype=np.dtype([("t", ">i8"), ("p", ">f8")]))
    us, prices = rows["t"].astype(np.int64), rows["p"].astype(np.float64)
    if len(us) > 1 and not (us[1:] >= us[:-1]).all():
        order = np.argsort(us, kind="stable")
        us, prices = us[order], prices[order]
    return from_pg_us(us), prices, rest


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
    from bqx.core import kernels  # numba: imported when rows are first decoded

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
        rows, pos, status = kernels._decode_columns(view, start, nfields, ts, bits, nulls)
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
