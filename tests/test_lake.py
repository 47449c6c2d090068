"""Metrics into a Delta Lake table (``--sink``) and bars from Parquet or Delta (``--source``):
on the local disk and on a real S3 protocol server (moto's server mode, no mocked client),
checked against the database's own partitions bit for bit (docs/lake.md)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import psycopg
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from psycopg import sql

from bqx.api import Store
from bqx.core.layout import Layout
from conftest import alive, wait_for

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


def test_kill_9_after_the_delta_commit_then_a_rerun_leaves_every_month_exact(
    store, settings, layout, conn, make_bars, tmp_path, cli_env, pg_url
):
    """The window that matters for a lake: the month is committed to Delta but the ledger
    does not say done yet. The worker and the backfill are killed there (SIGKILL); the rerun
    redoes the job, and every month holds exactly its rows once."""
    from bqx.store import names

    _bars(make_bars)
    ref = _other(settings, layout, conn)
    sink = tmp_path / "lake"
    try:
        ref.backfill(workers=2)
        store.backfill(workers=2, sink=str(sink))
        version = _delta(str(sink)).version()
        blocker = psycopg.connect(pg_url)  # the job's attempt row waits: after the commit
        blocker.execute(
            sql.SQL("LOCK TABLE {} IN SHARE MODE").format(names.table(layout, "bqx_attempts"))
        )
        proc = subprocess.Popen(
            [sys.executable, "-m", "bqx.cli", "backfill", "--pairs", "EURUSD", "--force",
             "--workers", "1", "--executor", "local", "--sink", str(sink)],
            env=cli_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            jobs = names.table(layout, "bqx_jobs")

            def blocked() -> int | None:
                row = conn.execute(
                    sql.SQL(
                        "SELECT j.worker FROM {} j JOIN pg_stat_activity a ON a.wait_event_type"
                        " = 'Lock' AND a.query ILIKE %s WHERE j.status = 'running'"
                    ).format(jobs),
                    ("%INSERT INTO%bqx_attempts%",),
                ).fetchone()
                return int(row[0].rsplit(":", 1)[1]) if row else None

            wait_for(lambda: blocked() is not None, what="the worker to block after its commit")
            worker = blocked()
            assert _delta(str(sink)).version() == version + 1  # its month is committed
            os.kill(proc.pid, signal.SIGKILL)
            os.kill(worker, signal.SIGKILL)
            proc.wait(timeout=30)
            wait_for(lambda: not alive(worker), what="the worker to die")
        finally:
            blocker.rollback()
            blocker.close()
        run = store.backfill(workers=2)
        assert run.jobs_failed == 0 and run.jobs_done == 3  # the forced pair's three months
        for pair in PAIRS:
            _equal_bit_for_bit(_reference(ref, pair), store.read_metrics(pair))
        table = _delta(str(sink)).to_pyarrow_table(columns=["pair", "ts_utc"])
        assert table.num_rows == sum(_reference(ref, p).num_rows for p in PAIRS)  # no duplicate
        assert store.verify(full=True).ok
    finally:
        _drop(conn, ref.layout.schema)


def test_two_runs_at_once_on_s3_lose_and_duplicate_nothing(
    store, settings, layout, conn, make_bars, bucket, cli_env, aws_env
):
    """Two `bqx backfill --sink s3://…` processes at the same time, 3 worker threads each,
    committing to one table on the S3 server: concurrent commits are retried (the log's
    conditional PUTs answer 412 to the loser), every month is written, none twice, and the
    values are the database path's."""
    pairs = [*PAIRS, "gbpusd"]
    _bars(make_bars, months=3, pairs=pairs)
    ref = _other(settings, layout, conn)
    sink = f"s3://{bucket}/two/bqx"
    try:
        ref.backfill(workers=2)
        env = {**cli_env, **aws_env}
        procs = [
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "bqx.cli",
                    "backfill",
                    "--workers",
                    "3",
                    "--sink",
                    sink,
                    "--json",
                ],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )  # fmt: skip
            for _ in range(2)
        ]
        outs = [p.communicate(timeout=300) for p in procs]
        assert [p.returncode for p in procs] == [0, 0], [e[-2000:] for _, e in outs]
        import json

        runs = [json.loads(o) for o, _ in outs]
        done = sum(r["jobs_done"] for r in runs)
        assert done == 12 and all(r["jobs_failed"] == 0 for r in runs)
        for pair in pairs:
            _equal_bit_for_bit(_reference(ref, pair), _delta_rows(sink, pair))
        assert _delta(sink).version() == done  # version 0 created it; one commit per job after
        assert store.verify(full=True).ok
    finally:
        _drop(conn, ref.layout.schema)


@pytest.fixture(scope="module")
def cluster():
    """A Dask cluster bqx did not start: 2 worker processes, one thread each."""
    import logging

    from distributed import LocalCluster

    with LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
        dashboard_address=":0", silence_logs=logging.ERROR,
    ) as c:  # fmt: skip
        yield c


def test_dask_workers_write_the_sink_themselves(
    store, settings, layout, conn, make_bars, tmp_path, cluster
):
    _bars(make_bars)
    ref = _other(settings, layout, conn)
    sink = tmp_path / "lake"
    try:
        ref.backfill(workers=2)
        run = store.backfill(executor="dask", scheduler=cluster.scheduler_address, workers=2,
                             sink=str(sink))  # fmt: skip
        assert run.jobs_done == 6 and run.jobs_failed == 0
        for pair in PAIRS:
            _equal_bit_for_bit(_reference(ref, pair), store.read_metrics(pair))
        workers = {int(w.split(":")[-1]) for w in _writers(str(sink))}
        from distributed import Client

        with Client(cluster, set_as_default=False) as client:
            pids = set(client.run(os.getpid).values())
        assert workers and workers <= pids and os.getpid() not in workers
    finally:
        _drop(conn, ref.layout.schema)


def _writers(uri: str) -> list[str]:
    """The ``host:pid`` of the process behind each bqx commit, from the table's history."""
    return [h["bqx.writer"] for h in _delta(uri).history() if "bqx.writer" in h]


# -- bars from Parquet and Delta ------------------------------------------------------------


def test_source_parquet_from_export_bars_equals_the_database_bars(
    store, settings, layout, conn, make_bars, tmp_path
):
    """`export --bars` writes today's bars in the shape `--source` reads; a backfill from them
    gives the database path's values bit for bit; resume notices a rewritten month from its
    file alone; `--source-check exact` redoes only the months whose bars changed."""
    _bars(make_bars)
    ref = _other(settings, layout, conn)
    data = tmp_path / "bars"
    try:
        ref.backfill(workers=2)
        out = store.export(data, bars=True)
        assert out.files == 6 and out.rows == sum(
            conn.execute(sql.SQL("SELECT count(*) FROM {}").format(
                sql.Identifier(layout.schema, f"m1_{p}"))).fetchone()[0]
            for p in PAIRS
        )  # fmt: skip
        assert sorted(p.name for p in data.iterdir()) == ["pair=EURUSD", "pair=USDJPY"]
        meta = pq.ParquetFile(data / "pair=EURUSD" / "month=2024-07" / "data.parquet").metadata
        assert "BYTE_STREAM_SPLIT" in str(meta.row_group(0).column(4).encodings)
        # the lake's own schema, so nothing in the database's source tables is read
        lake = Store(settings, schema=f"l_{uuid.uuid4().hex[:10]}")
        try:
            run = lake.backfill(workers=2, source=str(data), sink=str(tmp_path / "m"))
            assert run.jobs_done == 6 and run.jobs_failed == 0
            for pair in PAIRS:
                _equal_bit_for_bit(_reference(ref, pair), lake.read_metrics(pair))
            assert lake.verify(full=True).ok
            assert lake.backfill().jobs_done == 0  # sink and source as recorded
            status = {p.pair: p for p in lake.status().pairs}
            assert status["EURUSD"].current and status["EURUSD"].outstanding == 0
            assert status["EURUSD"].newest_bar == status["EURUSD"].newest_metric is not None
            # a corrected bar early in July: its file is rewritten
            f = data / "pair=EURUSD" / "month=2024-07" / "data.parquet"
            table = pq.read_table(f)
            close = table.column("close").to_numpy().copy()
            close[100] += 0.0001
            pq.write_table(table.set_column(4, "close", pa.array(close)), f)
            auto = {(j.pair, str(j.month)): j.reason for j in lake.plan().todo}
            assert auto == {("eurusd", "2024-07"): "source changed",
                            ("eurusd", "2024-08"): "source changed"}  # fmt: skip
            exact = {(j.pair, str(j.month)) for j in lake.plan(source_check="exact").todo}
            assert exact == {("eurusd", "2024-07")}  # August's lookback is July's last bars
            assert lake.backfill(source_check="exact").jobs_done == 1
            assert lake.backfill().jobs_done == 1  # auto: August, whose file set moved
            assert lake.verify(full=True).ok
        finally:
            _drop(conn, lake.layout.schema)
    finally:
        _drop(conn, ref.layout.schema)


def test_source_one_file_per_pair_and_a_delta_table_of_bars_on_s3(
    store, settings, layout, conn, make_bars, tmp_path, bucket
):
    _bars(make_bars)
    ref = _other(settings, layout, conn)
    try:
        ref.backfill(workers=2)
        # one file per pair, other column names, naive times, decimal prices
        files = tmp_path / "files"
        files.mkdir()
        stored = {}
        for pair in PAIRS:
            stored[pair] = rows = conn.execute(
                sql.SQL("SELECT time, close FROM {} ORDER BY time").format(
                    sql.Identifier(layout.schema, f"m1_{pair}")
                )
            ).fetchall()
            t = pa.array([r[0].replace(tzinfo=None) for r in rows], pa.timestamp("us"))
            p = pa.array([r[1] for r in rows]).cast(pa.decimal128(12, 5))
            pq.write_table(pa.table({"ts": t, "mid": p}), files / f"{pair.upper()}.parquet")
        one = Store(settings, schema=f"l_{uuid.uuid4().hex[:10]}", time_column="ts",
                    price_column="mid")  # fmt: skip
        # a Delta table of bars on the S3 server, partitioned by pair
        uri = f"s3://{bucket}/bars"
        from bqx.core.uris import LakeURI

        for pair in PAIRS:
            rows = stored[pair]
            table = pa.table({"pair": [pair.upper()] * len(rows),
                              "time": pa.array([r[0] for r in rows], pa.timestamp("us", "UTC")),
                              "close": pa.array([r[1] for r in rows], pa.float64())})  # fmt: skip
            deltalake.write_deltalake(
                uri,
                table,
                partition_by=["pair"],
                mode="append",
                storage_options=LakeURI.parse(uri).storage_options(),
            )
        delta = Store(settings, schema=f"l_{uuid.uuid4().hex[:10]}")
        try:
            a = one.backfill(workers=2, source=str(files), sink=str(tmp_path / "a"))
            b = delta.backfill(workers=2, source=uri, sink=f"s3://{bucket}/metrics")
            assert a.jobs_done == b.jobs_done == 6
            for pair in PAIRS:
                _equal_bit_for_bit(_reference(ref, pair), one.read_metrics(pair))
                _equal_bit_for_bit(_reference(ref, pair), delta.read_metrics(pair))
            assert delta.backfill().jobs_done == 0
            # bars appended to the Delta table: the months they touch, and only those
            extra = pa.table({"pair": ["EURUSD"], "time": pa.array(
                np.array(["2024-10-01T00:00"], "datetime64[us]"), pa.timestamp("us", tz="UTC")),
                "close": [1.1]})  # fmt: skip
            deltalake.write_deltalake(
                uri, extra, mode="append", storage_options=LakeURI.parse(uri).storage_options()
            )
            todo = {(j.pair, str(j.month)) for j in delta.plan().todo}
            assert todo == {("eurusd", "2024-10")}
        finally:
            _drop(conn, one.layout.schema)
            _drop(conn, delta.layout.schema)
    finally:
        _drop(conn, ref.layout.schema)


def test_update_on_a_sink_equals_a_forced_recompute_and_a_noop_commits_nothing(
    store, settings, layout, conn, make_bars, tmp_path
):
    """New bars in a new month and a partly filled one, a corrected bar of July: `update`
    brings the Delta months to what the database path computes from the same bars, one commit
    per changed month; rows whose values did not change keep their created_at; an update with
    nothing new commits nothing."""
    from bqx.store.bars import load_bars
    from conftest import random_walk_bars

    times, ohlcv = random_walk_bars("2024-06-25", 60 * 24 * 65, seed=3)
    cut = int(np.searchsorted(times, np.datetime64("2024-08-10T00:00", "us")))
    load_bars(conn, layout, "eurusd", times[:cut], ohlcv[:cut], mode="replace")
    sink = tmp_path / "lake"
    store.backfill(workers=2, sink=str(sink))
    before = _delta(str(sink)).to_pyarrow_table(
        filters=[("pair", "=", "EURUSD"), ("month", "=", "2024-06")]
    )
    ohlcv = ohlcv.copy()
    fix = int(np.searchsorted(times, np.datetime64("2024-07-20T10:00", "us")))
    ohlcv[fix, 3] += 0.0002  # a corrected close in July
    july = int(np.searchsorted(times, np.datetime64("2024-07-01T00:00", "us")))
    load_bars(conn, layout, "eurusd", times[july:], ohlcv[july:], mode="merge")  # + August
    version = _delta(str(sink)).version()
    result = store.update()
    assert result.pairs[0].months == ["2024-07", "2024-08"]
    assert result.pairs[0].new_rows == len(times) - cut
    assert _delta(str(sink)).version() == version + 2  # one commit per changed month
    ref = _other(settings, layout, conn)
    try:
        ref.backfill(workers=2)
        _equal_bit_for_bit(_reference(ref, "eurusd"), store.read_metrics("eurusd"))
        after = _delta(str(sink)).to_pyarrow_table(
            filters=[("pair", "=", "EURUSD"), ("month", "=", "2024-06")]
        )
        assert after.column("created_at").equals(before.column("created_at"))  # June untouched
        assert store.update().rows == 0
        assert _delta(str(sink)).version() == version + 2  # nothing new: no commit
        assert store.verify(full=True).ok
    finally:
        _drop(conn, ref.layout.schema)


def test_bad_sinks_and_sources_are_one_line_and_write_nothing(
    store, layout, conn, make_bars, tmp_path, bqx, monkeypatch
):
    _bars(make_bars, pairs=["eurusd"])
    cases = [
        (
            ["backfill", "--sink", "ftp://host/x"],
            2,
            "invalid --sink 'ftp://host/x': unknown scheme",
        ),
        (["backfill", "--sink", "s3://AKIAX:hunter2@bucket/x"], 2, "holds a credential"),
        (["backfill", "--source", str(tmp_path / "nothing")], 1, "no bars at"),
    ]
    for args, code, text in cases:
        out = bqx(args)
        assert out.returncode == code and text in out.stderr, (args, out.stderr)
        assert len(out.stderr.strip().splitlines()) == 1 and "hunter2" not in out.stderr
    # a table of other windows: refused before any job
    sink = tmp_path / "lake"
    assert store.backfill(sink=str(sink), windows=(15, 30)).jobs_done == 3
    out = bqx(["backfill", "--sink", str(sink), "--windows", "15,30,60", "--force"])
    assert out.returncode == 1 and "has other columns than windows 15,30,60" in out.stderr
    # without the lake extra: one line naming it
    monkeypatch.setitem(sys.modules, "deltalake", None)
    out = bqx(["backfill", "--sink", str(tmp_path / "other"), "--force"])
    assert out.returncode == 1 and 'needs the "lake" extra' in out.stderr, out.stderr
    assert not (tmp_path / "other").exists()
