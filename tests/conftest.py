"""Shared fixtures: one real PostgreSQL per test session, one fresh schema per test.

By default the embedded server that bqx ships with is started under a temporary BQX_HOME;
set BQX_TEST_DATABASE_URL to run the suite against another PostgreSQL instead.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import psycopg
import pytest
from psycopg import sql

from bqx.api import Store
from bqx.config import Settings, load_settings
from bqx.core.layout import Layout
from bqx.db import EmbeddedServer, connect


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test that reaches a PostgreSQL server is marked ``db``: those using the session's
    server (the ``pg_url`` fixture, directly or through another) here, those that start their
    own with ``@pytest.mark.db``. ``pytest -m "not db"`` runs the rest in seconds."""
    for item in items:
        if "pg_url" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.db)


@pytest.fixture(scope="session")
def pg_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """URL of a running PostgreSQL for the whole session."""
    external = os.environ.get("BQX_TEST_DATABASE_URL")
    if external:
        yield external
        return
    server = EmbeddedServer(Path(tmp_path_factory.mktemp("bqxhome")))
    url = server.start()
    try:
        yield url
    finally:
        server.stop()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def aws_server() -> Iterator[str]:
    """A real S3 and Secrets Manager protocol server for the session: moto's server mode on
    127.0.0.1 (no mocked client). Returns its endpoint URL."""
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture
def aws_env(aws_server: str, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The standard AWS variables pointing at the test server, set for this test (and given
    back, for subprocesses)."""
    env = {
        "AWS_ENDPOINT_URL": aws_server, "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_REGION": "us-east-1",
    }  # fmt: skip
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return env


@pytest.fixture
def schema_name(pg_url: str) -> Iterator[str]:
    """A fresh, empty schema name; dropped after the test."""
    name = f"t_{uuid.uuid4().hex[:10]}"
    yield name
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(name)))


@pytest.fixture
def settings(pg_url: str, schema_name: str, tmp_path: Path) -> Settings:
    """Settings pointing bqx at the session's server and the test's own schema."""
    return load_settings(database_url=pg_url, schema_name=schema_name, home=tmp_path / "home")


@pytest.fixture
def layout(schema_name: str) -> Layout:
    return Layout(schema=schema_name)


def store_for(settings: Settings, layout: Layout | None = None) -> Store:
    """The ``bqx.Store`` of a test's settings, with another layout's schema and source."""
    if layout is None:
        return Store(settings)
    return Store(settings, schema=layout.schema, source_table=layout.source_table,
                 time_column=layout.time_column, price_column=layout.price_column)  # fmt: skip


@pytest.fixture
def store(settings: Settings, layout: Layout) -> Store:
    """The test's store: its own schema on the session's server."""
    return store_for(settings, layout)


@pytest.fixture
def conn(settings: Settings) -> Iterator[psycopg.Connection]:
    """An autocommit connection for test set-up and assertions."""
    with connect(settings, autocommit=True) as c:
        yield c


@pytest.fixture
def cli_env(pg_url: str, schema_name: str, tmp_path: Path) -> dict[str, str]:
    """Environment for running the ``bqx`` CLI against the test's database and schema."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PG", "BQX_"))}
    env.update(BQX_DATABASE_URL=pg_url, BQX_SCHEMA=schema_name, BQX_HOME=str(tmp_path / "home"))
    return env


@pytest.fixture
def bqx(cli_env, monkeypatch, capsys):
    """Run the CLI in this process (its ``main``, as the ``bqx`` script does): fast. Gives a
    ``CompletedProcess`` with the exit code, stdout and stderr."""
    from bqx.cli import main

    for key in list(os.environ):
        if key.startswith(("PG", "BQX_")):
            monkeypatch.delenv(key)
    for key, value in cli_env.items():
        if key.startswith("BQX_"):
            monkeypatch.setenv(key, value)

    def run(args: list[str], env: object = None) -> subprocess.CompletedProcess:
        capsys.readouterr()
        monkeypatch.setattr(sys, "argv", ["bqx", *args])
        try:
            main()
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(args, code, out, err)

    return run


@contextmanager
def held_run(
    pg_url: str,
    layout: Layout,
    conn: psycopg.Connection,
    cli_env: dict[str, str],
    args: Sequence[str],
) -> Iterator[tuple[subprocess.Popen, list[int]]]:
    """``bqx backfill ARGS`` as a process whose two workers are held inside their first jobs
    by a lock on the attempts table: yields (the process, its workers' pids). On the way out
    the lock is released and the process killed if it is still there."""
    from bqx.store import names

    blocker = psycopg.connect(pg_url)
    blocker.execute(
        sql.SQL("LOCK TABLE {} IN SHARE MODE").format(names.table(layout, "bqx_attempts"))
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "bqx.cli", "backfill", *args],
        env=cli_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    running = sql.SQL("SELECT worker FROM {} WHERE status = 'running'").format(
        names.table(layout, "bqx_jobs")
    )
    try:
        wait_for(lambda: len(conn.execute(running).fetchall()) == 2, what="two running jobs")
        workers = [  # host:pid, or host:pid#n for a thread of the driver
            int(w.rsplit(":", 1)[1].split("#")[0]) for (w,) in conn.execute(running)
        ]
        yield proc, workers
    finally:
        blocker.rollback()
        blocker.close()
        if proc.poll() is None:
            proc.kill()


def wait_for(predicate, timeout: float = 60.0, what: str = "condition") -> None:
    """Poll ``predicate`` every 0.1 s until it holds; fail the test after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def alive(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie (killed, nobody has reaped it)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def random_walk_bars(
    start: str, minutes: int, *, seed: int = 0, level: float = 1.08, missing: float = 0.03
) -> tuple[np.ndarray, np.ndarray]:
    """Minute bars with weekend gaps and a few missing minutes: (times datetime64[us], ohlcv)."""
    rng = np.random.default_rng(seed)
    t = np.datetime64(start, "m") + np.arange(minutes).astype("timedelta64[m]")
    # forex week: drop Friday 22:00 .. Sunday 22:00 UTC (minute_of_week 0 = Monday 00:00)
    minute_of_week = ((t.astype(np.int64) + 3 * 1440) % (7 * 1440)).astype(np.int64)
    closed = (minute_of_week >= 4 * 1440 + 22 * 60) & (minute_of_week < 6 * 1440 + 22 * 60)
    keep = ~closed & (rng.random(minutes) >= missing)
    t = t[keep].astype("datetime64[us]")
    close = np.round(level * np.exp(np.cumsum(rng.normal(0, 1e-4, len(t)))), 5)
    opn = np.concatenate(([close[0]], close[:-1]))
    high = np.maximum(opn, close) + 0.00002
    low = np.minimum(opn, close) - 0.00002
    vol = rng.integers(1, 100, len(t)).astype(np.float64)
    return t, np.column_stack([opn, high, low, close, vol])


@pytest.fixture
def make_bars(conn: psycopg.Connection, layout: Layout):
    """Store random-walk bars for a pair: make_bars('eurusd', '2024-07-01', minutes, seed=1)."""
    from bqx.store.bars import load_bars

    def make(pair: str, start: str, minutes: int, **kw: object) -> tuple[np.ndarray, np.ndarray]:
        times, ohlcv = random_walk_bars(start, minutes, **kw)
        load_bars(conn, layout, pair, times, ohlcv, mode="replace")
        return times, ohlcv

    return make
