"""The backfill on Dask distributed: real LocalClusters, the ledger as the single source of truth."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

import numpy as np
import psutil
import psycopg
import pytest
from psycopg import sql

import bqx
from bqx import metrics
from bqx.config import load_settings
from bqx.core.layout import Layout
from bqx.core.months import Month
from bqx.core.params import Params
from bqx.db import DatabaseRef
from bqx.errors import BqxError
from bqx.pipeline.executors import dask as dask_executor
from bqx.store import names
from conftest import store_for, wait_for
from test_privileges import make_loader  # noqa: F401 - the least-privilege role fixture

COLS = metrics.metric_columns(metrics.DEFAULT_WINDOWS)
T = TypeVar("T")


@pytest.fixture(scope="module")
def cluster() -> Iterator[object]:
    """A cluster that bqx did not start (``--scheduler``): 2 worker processes, one thread each."""
    from distributed import LocalCluster

    with LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
        dashboard_address=":0", silence_logs=logging.ERROR,
    ) as c:  # fmt: skip
        yield c


@pytest.fixture
def client(cluster) -> Iterator[object]:
    from distributed import Client

    with Client(cluster, set_as_default=False) as c:
        yield c


@pytest.fixture
def bars(make_bars):
    """Two pairs over a month boundary: four (pair, month) jobs, lookback across the boundary."""
    make_bars("eurusd", "2024-07-20", 20 * 1440, seed=1, level=1.08)
    make_bars("usdjpy", "2024-07-20", 20 * 1440, seed=2, level=160.0)


def snapshot(conn: psycopg.Connection, layout: Layout, pair: str) -> tuple[np.ndarray, np.ndarray]:
    """(ts_utc in µs, every value column as raw float64 bits) ordered by time; NULL -> NaN."""
    q = sql.SQL("SELECT ts_utc, rate, {cols} FROM {t} ORDER BY ts_utc").format(
        cols=sql.SQL(", ").join(map(sql.Identifier, COLS)), t=names.target(layout, pair)
    )
    rows = conn.execute(q).fetchall()
    ts = np.array([r[0].replace(tzinfo=None) for r in rows], dtype="datetime64[us]")
    vals = np.array([[np.nan if v is None else v for v in r[1:]] for r in rows], dtype=np.float64)
    return ts, vals


def same_bits(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray]) -> bool:
    return (
        a[1].shape == b[1].shape and len(a[0]) > 0 and np.array_equal(a[0], b[0])
        and np.array_equal(a[1].view(np.int64), b[1].view(np.int64))
    )  # fmt: skip


def _q(conn: psycopg.Connection, text: str, layout: Layout, *args: object) -> list[tuple]:
    return conn.execute(
        sql.SQL(text).format(jobs=names.table(layout, "bqx_jobs"), attempts=names.table(layout, "bqx_attempts"),
                             runs=names.table(layout, "bqx_runs")),
        args,
    ).fetchall()  # fmt: skip


def test_existing_cluster_gives_the_local_executors_values_bit_for_bit(
    settings, layout, conn, bars, cluster, client
):
    local = store_for(settings, layout).backfill(workers=2)
    assert (local.jobs_done, local.jobs_failed) == (4, 0)
    expected = {p: snapshot(conn, layout, p) for p in ("eurusd", "usdjpy")}
    pids = client.run(os.getpid)  # the Dask worker processes, by address

    summary = store_for(settings, layout).backfill(workers=2, force=True, executor="dask",
                       scheduler=cluster.scheduler_address)  # fmt: skip
    assert (summary.jobs_done, summary.jobs_failed, summary.status) == (4, 0, "done")
    for pair, want in expected.items():
        assert same_bits(snapshot(conn, layout, pair), want), pair
    runs = _q(conn, "SELECT executor FROM {runs} ORDER BY run_id", layout)
    assert runs == [("threads",), ("dask",)]
    # every job names the Dask worker process that ran it, in the jobs and the attempts
    dask_ids = {f"{dask_executor._this_host()}:{pid}" for pid in pids.values()}
    workers = _q(conn, "SELECT worker FROM {attempts} WHERE run_id = %s AND status = 'done'",
                 layout, summary.run_id)  # fmt: skip
    assert len(workers) == 4 and {w for (w,) in workers} <= dask_ids
    # the user's cluster is neither stopped nor restarted
    assert client.run(os.getpid) == pids


def test_a_normal_end_lets_a_task_still_running_return_instead_of_killing_its_worker(
    cluster, client, tmp_path
):
    """At a normal end every job is done: a task that is still running (starting, or making
    its last empty claim) gets its grace and returns; its worker is not killed. The executor's
    client is not Dask's default one, and the wait must use it (it did not: the grace never
    happened and the user's workers were restarted)."""
    pids = client.run(os.getpid)
    addr = sorted(pids)[0]
    executor = dask_executor.DaskExecutor(1, scheduler=cluster.scheduler_address)
    mark = tmp_path / "returned"
    slow = executor.client.submit(
        lambda: (time.sleep(2), mark.write_text("yes")), key="bqx-test-slow", workers=[addr],
        pure=False,
    )  # fmt: skip
    worker = f"{dask_executor._this_host()}:{pids[addr]}"
    executor.tasks[slow.key] = dask_executor._Task(slow, addr, pids[addr], worker)
    assert executor.shutdown() == [worker]
    assert mark.exists()  # it waited for the task to return
    assert client.run(os.getpid) == pids  # no worker killed or restarted


def test_killed_dask_worker_is_restarted_and_its_job_redone_exactly(
    settings, layout, conn, bars, pg_url
):
    store_for(settings, layout).backfill(workers=1)
    expected = {p: snapshot(conn, layout, p) for p in ("eurusd", "usdjpy")}
    # a reader holding one partition makes that job's TRUNCATE wait: its worker sits mid-job
    blocker = psycopg.connect(pg_url)
    part = names.target_partition(layout, "eurusd", Month(2024, 7))
    blocker.execute(sql.SQL("LOCK TABLE {} IN ACCESS SHARE MODE").format(part))
    children_before = cluster_children()
    result: dict[str, object] = {}

    def run() -> None:
        try:
            result["summary"] = store_for(settings, layout).backfill(
                workers=2, force=True, executor="dask"
            )
        except BaseException as exc:  # reported by the assertion below
            result["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    try:

        def stuck() -> str | None:
            rows = _q(conn, "SELECT j.worker FROM {jobs} j JOIN pg_stat_activity a ON"
                      " a.pid = j.backend_pid AND a.wait_event_type = 'Lock'"
                      " WHERE j.status = 'running' AND j.pair = 'eurusd'"
                      " AND j.month = '2024-07-01'", layout)  # fmt: skip
            return rows[0][0] if rows else None

        wait_for(lambda: stuck() is not None, what="the job to block mid-write")
        victim = stuck()
        assert victim is not None
        pid = int(victim.rsplit(":", 1)[1])
        assert pid in {p.pid for p in psutil.Process().children(recursive=True)}  # a Dask worker
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: stuck() != victim, what="the dead worker's job to be handed back")
    finally:
        blocker.rollback()
        blocker.close()
        thread.join(timeout=120)
    assert "error" not in result, result.get("error")
    summary = result["summary"]
    assert (summary.jobs_done, summary.jobs_failed, summary.status) == (4, 0, "done")
    for pair, want in expected.items():
        assert same_bits(snapshot(conn, layout, pair), want), pair
    lost = _q(conn, "SELECT status, error FROM {attempts} WHERE run_id = %s AND worker = %s",
              layout, summary.run_id, victim)  # fmt: skip
    assert lost and lost[0][0] == "retried" and "died" in lost[0][1]
    redone = _q(conn, "SELECT worker, attempts FROM {jobs} WHERE pair = 'eurusd'"
                " AND month = '2024-07-01'", layout)  # fmt: skip
    assert redone[0][0] != victim and redone[0][1] == 2
    # the LocalCluster bqx started is closed: none of its processes (restarted one included) stays
    wait_for(lambda: cluster_children() <= children_before, timeout=20,
              what="the cluster's processes to end")  # fmt: skip


def cluster_children() -> set[int]:
    """Child processes of this test, but multiprocessing's resource tracker, which Python starts
    once per process on first use of the spawn method and which ends with its parent."""
    return {
        p.pid for p in psutil.Process().children(recursive=True)
        if not any("resource_tracker" in a for a in p.cmdline())
    }  # fmt: skip


def test_ctrl_c_cancels_hands_jobs_back_and_leaves_no_process(
    settings, layout, conn, bars, cli_env, pg_url, tmp_path
):
    # hold both workers inside their first jobs' write, then press Ctrl-C
    store_for(settings, layout).backfill(pairs=["eurusd"], start=Month(2024, 7), end=Month(2024, 7))
    blocker = psycopg.connect(pg_url)
    blocker.execute(
        sql.SQL("LOCK TABLE {} IN SHARE MODE").format(names.table(layout, "bqx_attempts"))
    )
    # stderr to a file, not a pipe: a pipe nobody reads fills up with progress lines and
    # blocks the backfill's writes, so it could not exit
    errfile = (tmp_path / "stderr.txt").open("w+")
    proc = subprocess.Popen(
        [sys.executable, "-m", "bqx.cli", "backfill", "--executor", "dask", "--workers", "2"],
        env=cli_env, stdout=subprocess.DEVNULL, stderr=errfile, text=True,
    )  # fmt: skip
    try:
        # both inside their write transaction, holding their job rows, waiting on the lock
        blocked = (
            "SELECT count(*) FROM {jobs} j JOIN pg_stat_activity a ON a.pid ="
            " j.backend_pid AND a.wait_event_type = 'Lock' WHERE j.status = 'running'"
        )
        wait_for(lambda: _q(conn, blocked, layout)[0][0] == 2, timeout=120,
                  what="two jobs blocked mid-write")  # fmt: skip
        family = psutil.Process(proc.pid).children(recursive=True)
        assert len(family) >= 2  # the Dask worker processes (and whatever else Dask started)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 130
    finally:
        blocker.rollback()
        blocker.close()
        if proc.poll() is None:
            proc.kill()
    errfile.seek(0)
    assert "Traceback" not in errfile.read()
    errfile.close()
    gone, alive = psutil.wait_procs(family, timeout=10)
    assert alive == [], [p.pid for p in alive]
    assert _q(conn, "SELECT status FROM {runs} ORDER BY run_id DESC LIMIT 1", layout) == [
        ("interrupted",)
    ]
    states = _q(conn, "SELECT status, count(*) FROM {jobs} GROUP BY 1 ORDER BY 1", layout)
    assert states == [("done", 1), ("pending", 3)]  # handed back, not left for a heartbeat


def watching_the_scheduler(client, body: Callable[[], T]) -> tuple[T, set[str], list]:
    """``body()``, and what the scheduler knew while it ran: every task key and spec (as
    text), and the task stream."""
    from distributed import get_task_stream

    keys: set[str] = set()
    with get_task_stream(client) as stream:
        watching = threading.Event()

        def watch() -> None:
            while not watching.is_set():
                keys.update(client.run_on_scheduler(
                    lambda dask_scheduler: [repr(k) + repr(t.run_spec)
                                            for k, t in dask_scheduler.tasks.items()]
                ))  # fmt: skip
                time.sleep(0.05)

        watcher = threading.Thread(target=watch)
        watcher.start()
        try:
            result = body()
        finally:
            watching.set()
            watcher.join()
    return result, keys, stream.data


def test_password_is_in_no_task_key_task_stream_or_worker_log(
    make_loader,  # noqa: F811 - the fixture imported above
    conn,
    layout,
    schema_name,
    bars,
    cluster,
    client,
    tmp_path,  # noqa: F811
):
    role, url = make_loader()
    password = url.split("@", 1)[0].rsplit(":", 1)[1]
    assert len(password) > 10 and password in url
    settings = load_settings(database_url=url, schema_name=schema_name, home=tmp_path / "h")
    summary, keys, stream = watching_the_scheduler(client, lambda: store_for(settings, layout)
        .backfill(workers=2, executor="dask", scheduler=cluster.scheduler_address))  # fmt: skip
    assert (summary.jobs_done, summary.jobs_failed) == (4, 0)
    # a task that fails has its repr written to the worker log: give it the same arguments
    nowhere = Layout(schema="bqx_no_such_schema")
    bad = dask_executor.WorkArgs(
        DatabaseRef.of(url),
        Params.build(nowhere, metrics.DEFAULT_WINDOWS, "bars", 5),
        1,
        [("eurusd", Month(2024, 7).first_day)],
    )
    failed = client.submit(dask_executor.work, bad, key="bqx-backfill-test-fails", pure=False)
    with pytest.raises(Exception):  # noqa: B017 - any error: the ledger is missing its run
        failed.result(timeout=60)
    stream_text = repr(stream)
    logs = repr(client.get_worker_logs()) + repr(client.get_scheduler_logs())
    events = repr(client.run_on_scheduler(lambda dask_scheduler: dask_scheduler.get_events()))
    seen = " ".join(sorted(keys))
    assert "bqx-backfill" in seen and "bqx-backfill" in stream_text  # we did watch the tasks
    assert "Compute Failed" in logs and "bqx-backfill-test-fails" in logs
    for where, text in (("scheduler tasks", seen), ("task stream", stream_text),
                        ("worker logs", logs), ("scheduler events", events)):  # fmt: skip
        assert password not in text, where


def test_preflight_refuses_a_socket_url_for_workers_on_other_hosts(
    settings, layout, conn, bars, cluster, pg_url, monkeypatch
):
    if not dask_executor.is_unix_socket(pg_url):
        pytest.skip("the test database is reached over TCP")
    # the workers now look as if they ran on another machine than this backfill
    monkeypatch.setattr(dask_executor, "_this_host", lambda: "somewhere-else")
    with pytest.raises(BqxError) as err:
        store_for(settings, layout).backfill(executor="dask", scheduler=cluster.scheduler_address)
    text = str(err.value)
    assert "\n" not in text and "give a TCP address" in text and "BQX_DATABASE_URL_FILE" in text
    assert "somewhere-else" not in text and "runs on host" in text
    left = _q(conn, "SELECT status, count(*) FROM {jobs} GROUP BY 1", layout)
    assert left == [("pending", 4)]  # no job ran


def test_preflight_refuses_workers_with_another_bqx_version(
    settings, layout, conn, bars, cluster, monkeypatch
):
    monkeypatch.setattr(bqx, "__version__", "0.0.0-other")  # this side only: workers keep theirs
    with pytest.raises(BqxError) as err:
        store_for(settings, layout).backfill(executor="dask", scheduler=cluster.scheduler_address)
    assert "\n" not in str(err.value) and "this run bqx 0.0.0-other" in str(err.value)
    assert _q(conn, "SELECT count(*) FROM {jobs} WHERE status <> 'pending'", layout) == [(0,)]


def test_preflight_names_a_worker_that_cannot_import_bqx_or_reach_the_database():
    url = "postgresql://bob:s3cret@db.example:5432/x"
    broken = {"tcp://10.0.0.7:4000": ModuleNotFoundError("No module named 'bqx'")}
    with pytest.raises(BqxError) as err:
        dask_executor.check_workers(url, "0.1.0", "here", broken)
    assert "tcp://10.0.0.7:4000 cannot run bqx" in str(err.value) and "0.1.0" in str(err.value)
    unreachable = {
        "tcp://10.0.0.7:4000": {
            "version": "0.1.0",
            "worker": "w:1",
            "host": "w",
            "error": "cannot connect to bob:****@db.example",
        }
    }
    with pytest.raises(BqxError) as err:
        dask_executor.check_workers(url, "0.1.0", "here", unreachable)
    assert "cannot reach the database" in str(err.value) and "s3cret" not in str(err.value)
    assert dask_executor.is_unix_socket("postgresql://u@/bqx?host=/tmp/run")
    assert dask_executor.is_unix_socket("host=/var/run/postgresql dbname=x")
    assert not dask_executor.is_unix_socket(url)
    assert "s3cret" not in repr(DatabaseRef.of(url))


def test_unreachable_scheduler_is_one_line(settings, layout, bars, monkeypatch):
    monkeypatch.setattr(dask_executor, "CONNECT_TIMEOUT_S", 1.0)
    with pytest.raises(BqxError) as err:
        store_for(settings, layout).backfill(executor="dask", scheduler="tcp://127.0.0.1:9")
    assert "\n" not in str(err.value)
    assert "cannot reach the Dask scheduler at tcp://127.0.0.1:9" in str(err.value)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_an_unreachable_scheduler_leaves_the_ledger_untouched(settings, layout, conn, bars,
                                                              monkeypatch):  # fmt: skip
    """Reached before the ledger: no run recorded, no done job flipped back to pending."""
    store = store_for(settings, layout)
    store.backfill(workers=1)
    before = _q(conn, "SELECT run_id, status FROM {runs} ORDER BY run_id", layout)
    monkeypatch.setattr(dask_executor, "CONNECT_TIMEOUT_S", 1.0)
    with pytest.raises(BqxError, match="cannot reach the Dask scheduler at tcp://127.0.0.1:9"):
        store.backfill(executor="dask", scheduler="tcp://127.0.0.1:9", force=True)
    assert _q(conn, "SELECT run_id, status FROM {runs} ORDER BY run_id", layout) == before
    assert _q(conn, "SELECT DISTINCT status FROM {jobs}", layout) == [("done",)]
    assert store.verify(sample=3).ok


def test_a_killed_scheduler_is_one_line_and_the_run_is_recorded_interrupted(
    settings, layout, conn, bars, cli_env, pg_url, tmp_path
):
    port = _free_port()
    address = f"tcp://127.0.0.1:{port}"
    scheduler = subprocess.Popen(
        [sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1",
         "--port", str(port), "--dashboard-address", ":0"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    workers = subprocess.Popen(
        [sys.executable, "-m", "distributed.cli.dask_worker", address, "--nworkers", "2",
         "--nthreads", "1", "--dashboard-address", ":0"],
        env=cli_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip
    blocker = psycopg.connect(pg_url)
    errfile = (tmp_path / "stderr.txt").open("w+")
    proc = None
    try:
        from distributed import Client

        with Client(address, timeout=60, set_as_default=False) as c:
            c.wait_for_workers(2, timeout=60)
        store_for(settings, layout).backfill(pairs=["eurusd"], start=Month(2024, 7),
                                             end=Month(2024, 7))  # fmt: skip
        blocker.execute(
            sql.SQL("LOCK TABLE {} IN SHARE MODE").format(names.table(layout, "bqx_attempts"))
        )
        proc = subprocess.Popen(
            [sys.executable, "-m", "bqx.cli", "backfill", "--executor", "dask", "--scheduler",
             address, "--workers", "2"],
            env=cli_env, stdout=subprocess.DEVNULL, stderr=errfile, text=True,
        )  # fmt: skip
        blocked = (
            "SELECT count(*) FROM {jobs} j JOIN pg_stat_activity a ON a.pid ="
            " j.backend_pid AND a.wait_event_type = 'Lock' WHERE j.status = 'running'"
        )
        wait_for(lambda: _q(conn, blocked, layout)[0][0] == 2, timeout=120,
                 what="two jobs blocked mid-write")  # fmt: skip
        os.killpg(scheduler.pid, signal.SIGKILL)
        code = proc.wait(timeout=120)
    finally:
        blocker.rollback()
        blocker.close()
        for p in (proc, scheduler, workers):
            if p is not None and p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    if p is proc:
                        p.kill()
                    else:
                        os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    errfile.seek(0)
    err = errfile.read()
    errfile.close()
    assert code == 1, err
    assert "Traceback" not in err
    (last,) = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert re.fullmatch(
        rf"error: lost the Dask scheduler at {address} \(.*\) during run \d+: run the same"
        r" command again to resume \(jobs already running on the workers finish by"
        r" themselves\)", last,
    ), last  # fmt: skip
    assert _q(conn, "SELECT status FROM {runs} ORDER BY run_id DESC LIMIT 1", layout) == [
        ("interrupted",)
    ]
    # the same command, on a cluster that is there (here: the threads), finishes exactly
    run = store_for(settings, layout).backfill(workers=2)
    assert run.jobs_failed == 0
    assert store_for(settings, layout).verify(sample=3, full=True).ok
