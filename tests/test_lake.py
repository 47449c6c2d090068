"""Metrics into a Delta Lake table (``--sink``) and bars from Parquet or Delta (``--source``):
on the local disk and on a real S3 protocol server (moto's server mode, no mocked client),
checked against the database's own partitions bit for bit (docs/lake.md)."""

from __future__ import annotations

import uuid
from pathlib import Path

import numpy as np
import psycopg
import pyarrow as pa
import pytest
from psycopg import sql

from bqx.api import Store
from bqx.core.layout import Layout

deltalake = pytest.importorskip("deltalake")

PAIRS = ["eurusd", "usdjpy"]


def _bars(make_bars, months: int = 2, pairs=PAIRS) -> None:
    for i, pair in enumerate(pairs):
        make_bars(pair, "2024-06-25", 60 * 24 * (30 * months + 5), seed=i + 1,
                  level=1.08 if i % 2 == 0 else 157.3)  # fmt: skip


def _other(settings, layout: Layout, conn: psycopg.Connection) -> Store:
    """A store on another schema of the same server that reads the test schema's bars: the
    database-partition reference the lake is compared with."""
    name = f"r_{uuid.uuid4().hex[:10]}"
    return Store(settings, schema=name, source_table=f"{layout.schema}.m1_{{pair}}")


def _drop(conn: psycopg.Connection, schema: str) -> None:
    conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))


def _delta(uri: str):
    from bqx.core.uris import LakeURI

    lake = LakeURI.parse(uri)
    return deltalake.DeltaTable(lake.uri, storage_options=lake.storage_options())


def _equal_bit_for_bit(ref: pa.Table, got: pa.Table) -> None:
    """Every row and column equal: times exactly, floats bit for bit, NULL where NULL."""
    assert got.num_rows == ref.num_rows > 0
    assert got.column("ts_utc").equals(ref.column("ts_utc").cast(got.column("ts_utc").type))
    for name in ref.column_names[1:]:
        a, b = ref.column(name), got.column(name)
        assert a.null_count == b.null_count, name
        an = a.is_null().to_numpy(zero_copy_only=False)
        assert np.array_equal(an, b.is_null().to_numpy(zero_copy_only=False)), name
        av = a.fill_null(0.0).to_numpy().view(np.int64)
        bv = b.fill_null(0.0).to_numpy().view(np.int64)
        assert np.array_equal(av, bv), name


def _delta_rows(uri: str, pair: str) -> pa.Table:
    table = _delta(uri).to_pyarrow_table(filters=[("pair", "=", pair.upper())])
    return table.drop_columns(["pair", "month", "created_at"]).sort_by("ts_utc")


def _reference(ref: Store, pair: str) -> pa.Table:
    return ref.read_metrics(pair)


def test_local_sink_equals_the_database_bit_for_bit_and_a_rerun_commits_nothing(
    store, settings, layout, conn, make_bars, tmp_path
):
    _bars(make_bars)
    ref = _other(settings, layout, conn)
    try:
        done = ref.backfill(workers=2)
        assert done.jobs_failed == 0 and done.jobs_done == 6
        sink = tmp_path / "lake" / "bqx"
        run = store.backfill(workers=2, sink=str(sink))
        assert run.jobs_done == 6 and run.jobs_failed == 0
        assert run.rows_written == done.rows_written
        for pair in PAIRS:
            _equal_bit_for_bit(_reference(ref, pair), _delta_rows(str(sink), pair))
            # read_metrics finds the sink the pair was written to without being told
            _equal_bit_for_bit(_reference(ref, pair), store.read_metrics(pair))
        # the database's partitions were not written
        assert not conn.execute(
            "SELECT to_regclass(%s) IS NOT NULL", (f"{layout.schema}.bqx_eurusd",)
        ).fetchone()[0]
        version = _delta(str(sink)).version()
        again = store.backfill(workers=2)  # the sink is the recorded one
        assert again.jobs_done == 0 and again.jobs_skipped == 6
        assert _delta(str(sink)).version() == version  # nothing committed
    finally:
        _drop(conn, ref.layout.schema)


@pytest.fixture
def bucket(aws_env: dict[str, str]) -> str:
    """A fresh bucket on the test's S3 protocol server."""
    import boto3

    name = f"bqx-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=aws_env["AWS_ENDPOINT_URL"]).create_bucket(Bucket=name)
    return name


def test_s3_sink_equals_the_database_bit_for_bit_and_a_rerun_commits_nothing(
    store, settings, layout, conn, make_bars, bucket
):
    _bars(make_bars)
    ref = _other(settings, layout, conn)
    try:
        assert ref.backfill(workers=2).jobs_done == 6
        sink = f"s3://{bucket}/metrics/bqx"
        run = store.backfill(workers=3, sink=sink)
        assert run.jobs_done == 6 and run.jobs_failed == 0
        for pair in PAIRS:
            _equal_bit_for_bit(_reference(ref, pair), _delta_rows(sink, pair))
            _equal_bit_for_bit(_reference(ref, pair), store.read_metrics(pair))
        version = _delta(sink).version()
        assert store.backfill(workers=2, sink=sink).jobs_done == 0
        assert _delta(sink).version() == version
    finally:
        _drop(conn, ref.layout.schema)


def _duckdb():
    """DuckDB with its delta extension (the duckdb-ext-delta package ships it: no download)."""
    duckdb = pytest.importorskip("duckdb")
    ext = pytest.importorskip("duckdb_ext")
    found = sorted(Path(list(ext.__path__)[0]).rglob("delta.duckdb_extension"))
    assert found, "duckdb-ext-delta ships no extension file"
    con = duckdb.connect()
    con.execute(f"LOAD '{found[0]}'")
    return con


def test_status_verify_report_polars_and_duckdb_on_a_sink(
    store, layout, conn, make_bars, tmp_path, bqx
):
    _bars(make_bars)
    sink = tmp_path / "lake"
    run = store.backfill(workers=2, sink=str(sink))
    assert run.jobs_done == 6
    # the CLI finds the sink recorded for the pairs: no --sink again
    check = store.verify(full=True)
    assert check.ok, check.lines()
    assert check.checks[2].counts["rows"] == run.rows_written
    status = store.status()
    assert [p.current for p in status.pairs] == [True, True]
    newest = {p.pair: p.newest_metric for p in status.pairs}
    assert newest["EURUSD"] is not None and newest["EURUSD"] == status.pairs[0].newest_bar
    out = bqx(["report", "--out", str(tmp_path / "report")])
    assert out.returncode == 0, out.stderr
    md = (tmp_path / "report" / "report.md").read_text()
    assert "**Status:** COMPLETE" in md and f"the Delta table `{sink}`" in md
    assert "Partitions present in the catalog: 6 of 6" in md
    # readers: polars and DuckDB see exactly the rows the database path computes
    import polars as pl

    ref = store.read_metrics("eurusd")
    scanned = pl.scan_delta(str(sink)).filter(pl.col("pair") == "EURUSD").sort("ts_utc").collect()
    assert scanned.height == ref.num_rows
    assert scanned["w60_bqx_avg"].to_arrow().equals(ref.column("w60_bqx_avg").combine_chunks())
    con = _duckdb()
    got = con.execute(
        "SELECT pair, count(*), sum(agg_bqx_max) FROM delta_scan(?) GROUP BY pair ORDER BY pair",
        [str(sink)],
    ).fetchall()
    want = [(p.upper(), store.read_metrics(p).num_rows,
             sum(x for x in store.read_metrics(p).column("agg_bqx_max").to_pylist() if x))
            for p in PAIRS]  # fmt: skip
    assert [(p, n) for p, n, _ in got] == [(p, n) for p, n, _ in want]
    assert all(abs(a[2] - b[2]) <= 1e-9 * abs(b[2]) for a, b in zip(got, want, strict=True))
    # a corrupted value in the table is caught by verify and named
    month = store.read_metrics("usdjpy", "2024-07", "2024-08")
    bad = month.set_column(month.schema.get_field_index("w15_bqx_max"), "w15_bqx_max",
                           pa.array([v * (1 + 1e-12) if v else v for v in
                                     month.column("w15_bqx_max").to_pylist()]))  # fmt: skip
    _overwrite(str(sink), "USDJPY", "2024-07", bad)
    failed = store.verify()
    assert not failed.ok
    assert any(f.column == "w15_bqx_max" and f.month == "2024-07" for c in failed.checks
               for f in c.failures)  # fmt: skip


def _overwrite(uri: str, pair: str, month: str, rows: pa.Table) -> None:
    """Another writer (not bqx) replaces a month of the sink."""
    from bqx.core.uris import LakeURI

    lake = LakeURI.parse(uri)
    n = rows.num_rows
    table = rows.add_column(0, "month", pa.array([month] * n)).add_column(
        0, "pair", pa.array([pair] * n))  # fmt: skip
    table = table.add_column(
        4, "created_at", pa.array(np.full(n, np.datetime64("2025-01-01T00:00:00", "us")),
                                  pa.timestamp("us", tz="UTC")))  # fmt: skip
    dt = deltalake.DeltaTable(lake.uri, storage_options=lake.storage_options())
    table = table.cast(pa.schema(dt.schema()))
    deltalake.write_deltalake(dt, table, mode="overwrite",
                              predicate=f"pair = '{pair}' AND month = '{month}'")  # fmt: skip


def test_resume_redoes_a_month_whose_files_are_gone_or_that_another_writer_rewrote(
    store, settings, layout, conn, make_bars, tmp_path
):
    _bars(make_bars)
    ref = _other(settings, layout, conn)
    try:
        ref.backfill(workers=2)
        sink = tmp_path / "lake"
        store.backfill(workers=2, sink=str(sink))
        # a month's file deleted behind Delta's back; another month rewritten by someone else
        files = sorted((sink / "pair=EURUSD" / "month=2024-07").glob("*.parquet"))
        assert len(files) == 1
        files[0].unlink()
        other = store.read_metrics("usdjpy", "2024-08", "2024-09")
        _overwrite(str(sink), "USDJPY", "2024-08", other.slice(0, 100))
        plan = store.plan()
        why = {(j.pair, str(j.month)): j.reason for j in plan.todo}
        assert why == {("eurusd", "2024-07"): "partition missing",
                       ("usdjpy", "2024-08"): "metrics written by another writer"}  # fmt: skip
        run = store.backfill(workers=2)
        assert run.jobs_done == 2 and run.jobs_skipped == 4
        for pair in PAIRS:
            _equal_bit_for_bit(_reference(ref, pair), store.read_metrics(pair))
        assert store.backfill().jobs_done == 0
    finally:
        _drop(conn, ref.layout.schema)
