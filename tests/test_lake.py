"""Metrics into a Delta Lake table (``--sink``) and bars from Parquet or Delta (``--source``):
on the local disk and on a real S3 protocol server (moto's server mode, no mocked client),
checked against the database's own partitions bit for bit (docs/lake.md)."""

from __future__ import annotations

import uuid

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
