"""The binary COPY path: encoded rows read back equal, from any layout, FREEZE where allowed."""

from __future__ import annotations

import struct

import numpy as np
import psycopg
import pytest
from psycopg import sql

from bqx.db.copy import (
    _COPY_HEADER,
    copy_in,
    copy_in_columns,
    encode_copy_binary,
    select_series,
    to_pg_us,
)
from bqx.errors import BqxError


def _encode_by_hand(times_us: np.ndarray, rows: np.ndarray) -> bytes:
    """The COPY BINARY format written out with struct, one field at a time."""
    out = [_COPY_HEADER]
    for t, row in zip(times_us.tolist(), rows, strict=True):
        out.append(struct.pack(">hiq", len(row) + 1, 8, t))
        for x in row.tolist():
            out.append(b"\xff\xff\xff\xff" if x != x else struct.pack(">id", 8, x))
    out.append(b"\xff\xff")
    return b"".join(out)


def _data(n: int, k: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    values = rng.normal(size=(n, k)) * 10.0 ** rng.integers(-8, 8, size=(n, k))
    values[rng.random((n, k)) < 0.2] = np.nan
    values[0, 0], values[1, 1] = -0.0, np.inf
    times = np.datetime64("2024-07-01T00:00", "us") + (
        np.arange(n) * 60_000_000 + rng.integers(0, 59_999_999, n)
    ).astype("timedelta64[us]")
    return times, values


def test_encoding_matches_the_format_byte_for_byte():
    times, values = _data(50, 5)
    want = _encode_by_hand(to_pg_us(times), values)
    assert encode_copy_binary(to_pg_us(times), values) == want


@pytest.fixture
def table(conn: psycopg.Connection, layout) -> sql.Composable:
    name = sql.Identifier(layout.schema, "copy_t")
    conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(layout.schema)))
    conn.execute(
        sql.SQL("CREATE TABLE {} (ts timestamptz PRIMARY KEY, a float8, b float8, c float8)")
        .format(name)
    )  # fmt: skip
    return name


def _read_back(conn: psycopg.Connection, table: sql.Composable) -> tuple[np.ndarray, np.ndarray]:
    rows = conn.execute(sql.SQL("SELECT ts, a, b, c FROM {} ORDER BY ts").format(table)).fetchall()
    times = np.array([r[0].replace(tzinfo=None) for r in rows], dtype="datetime64[us]")
    vals = np.array([[np.nan if x is None else x for x in r[1:]] for r in rows], dtype=float)
    return times, vals


@pytest.mark.parametrize("layout_kind", ["rows", "columns", "column slice"])
def test_rows_read_back_equal_from_any_layout(conn, table, layout_kind):
    times, values = _data(120, 3, seed=1)
    names = ["ts", "a", "b", "c"]
    with conn.transaction(), conn.cursor() as cur:
        if layout_kind == "rows":  # (n × k), small chunks: header and trailer once each
            assert copy_in(cur, table, names, times, values, chunk_rows=7) == 120
        elif layout_kind == "columns":
            cols = np.ascontiguousarray(values.T)
            assert copy_in_columns(cur, table, names, times, cols, chunk_rows=50) == 120
        else:  # rows 1..3 of a wider column-major matrix, from bar 20 on
            wide = np.vstack([np.zeros(140), np.concatenate([np.zeros((20, 3)), values]).T])
            got = copy_in_columns(cur, table, names, times, wide[1:, 20:], chunk_rows=33)
            assert got == 120
    back_t, back_v = _read_back(conn, table)
    assert np.array_equal(back_t, times)
    assert np.array_equal(back_v, values, equal_nan=True)  # bit-exact floats, NaN as NULL
    assert np.signbit(back_v[0, 0]) and back_v[1, 1] == np.inf


def test_freeze_needs_the_table_truncated_in_the_same_transaction(conn, table):
    times, values = _data(10, 3, seed=2)
    names = ["ts", "a", "b", "c"]
    with conn.transaction(), conn.cursor() as cur:
        cur.execute(sql.SQL("TRUNCATE {}").format(table))
        copy_in_columns(cur, table, names, times, values.T, freeze=True)
    assert len(_read_back(conn, table)[0]) == 10
    with pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState, match="FREEZE"):
        with conn.transaction(), conn.cursor() as cur:
            copy_in_columns(cur, table, names, times, values.T, freeze=True)
    assert len(_read_back(conn, table)[0]) == 10  # nothing lost


def test_empty_copy_writes_nothing(conn, table):
    with conn.transaction(), conn.cursor() as cur:
        n = copy_in_columns(cur, table, ["ts", "a", "b", "c"],
                            np.array([], dtype="datetime64[us]"), np.empty((3, 0)))  # fmt: skip
    assert n == 0 and len(_read_back(conn, table)[0]) == 0


def test_select_series_reads_sorted_bars_and_refuses_nulls(conn, table):
    times, values = _data(300, 3, seed=3)
    values[:, 0] = np.abs(np.nan_to_num(values[:, 0], posinf=2.0)) + 1.0
    with conn.transaction(), conn.cursor() as cur:
        copy_in(cur, table, ["ts", "a", "b", "c"], times[::-1], values[::-1])  # unsorted in
    query = sql.SQL("SELECT ts, a FROM {}").format(table)
    with conn.cursor() as cur:
        got_t, got_p = select_series(cur, query)
        assert np.array_equal(got_t, times) and np.array_equal(got_p, values[:, 0])
        empty = select_series(cur, sql.SQL("SELECT ts, a FROM {} WHERE false").format(table))
        assert len(empty[0]) == 0 and len(empty[1]) == 0
        conn.execute(
            sql.SQL("UPDATE {} SET a = NULL WHERE ts = %s").format(table), (times[5].item(),)
        )
        with pytest.raises(BqxError, match="NULL time or price"):
            select_series(cur, query)
