"""The embedded server's life cycle, other databases, and the user's session options."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from bqx.config import load_settings
from bqx.db import EmbeddedServer, connect, pool, resolve_url
from bqx.errors import BqxError


def _bqx(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bqx.cli", *args], env=env, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PG", "BQX_"))}
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def home() -> Iterator[Path]:
    """A BQX_HOME with a running embedded server of this module's own. Outside
    /tmp/pytest-of-<user>: every pytest session that starts resets that one to 0700, which
    would lock out the server's own user (as root) mid-test."""
    path = Path(tempfile.mkdtemp(prefix="bqx-test-", dir="/tmp"))
    server = EmbeddedServer(path / "home")
    server.start()
    yield server.home
    server.destroy()
    shutil.rmtree(path, ignore_errors=True)


# -- read-only commands never start a stopped server --------------------------------------


@pytest.mark.db  # starts a server of its own
def test_read_only_commands_do_not_restart_a_stopped_server(home: Path) -> None:
    """After `bqx db stop`, status (--watch too), verify, report and db url say the server is
    stopped and how to start it, exit 1, and leave it stopped; a writing command starts it."""
    server = EmbeddedServer(home)
    env = _clean_env(BQX_HOME=str(home))
    res = _bqx(["db", "stop"], env)
    assert res.returncode == 0 and not server.is_running()
    try:
        for args in (["status", "--watch"], ["verify"], ["report", "--out", str(home / "r")],
                     ["db", "url"]):  # fmt: skip
            res = _bqx(args, env)
            assert res.returncode == 1, (args, res.stdout, res.stderr)
            assert "Traceback" not in res.stderr
            assert "stopped (by `bqx db stop`)" in res.stderr
            assert "bqx db start" in res.stderr
            assert not server.is_running(), args
        assert not (home / "r").exists()
        # the library: connect(..., start=False) refuses, the default starts it again
        settings = load_settings(home=home)
        with pytest.raises(BqxError, match="bqx db start"):
            connect(settings, start=False)
        with connect(settings) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
        assert server.is_running() and not server.stop_marker.exists()
    finally:
        server.start()


@pytest.mark.db  # starts a server of its own
def test_status_never_creates_a_server(tmp_path: Path) -> None:
    """On a fresh BQX_HOME, status says there is no database yet, and creates nothing."""
    res = _bqx(["status"], _clean_env(BQX_HOME=str(tmp_path / "fresh")))
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert "no embedded PostgreSQL" in res.stderr and "bqx db start" in res.stderr
    assert not (tmp_path / "fresh").exists()


@pytest.mark.db  # starts a server of its own
def test_db_status_and_url_of_the_embedded_server(home: Path) -> None:
    env = _clean_env(BQX_HOME=str(home))
    res = _bqx(["db", "status", "--json"], env)
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["embedded"] is True and doc["running"] is True and doc["reachable"] is True
    assert doc["server_version"].split(".")[0].isdigit()
    server = EmbeddedServer(home)
    secret = server._read_secret()
    res = _bqx(["db", "url", "--show-password"], env)
    whole = res.stdout.strip()
    assert secret in whole and "passfile" not in whole
    with psycopg.connect(whole) as conn:  # works without the passfile
        assert conn.execute("SELECT current_database()").fetchone() == ("bqx",)
    assert secret not in server.url  # what bqx db url prints and bqx uses


# -- another database ---------------------------------------------------------------------


def test_db_start_with_a_url_set_does_nothing(pg_url: str, tmp_path: Path) -> None:
    """A URL (or PG* variables) means another server: `db start` says so and starts nothing."""
    home = tmp_path / "home"
    for extra in ({"BQX_DATABASE_URL": pg_url}, {"PGHOST": "/nonexistent"}):
        res = _bqx(["db", "start"], _clean_env(BQX_HOME=str(home), **extra))
        assert res.returncode == 0, res.stderr
        assert "no embedded server started" in res.stdout
        assert not home.exists()


def test_db_status_with_a_url_checks_it(pg_url: str, tmp_path: Path) -> None:
    env = _clean_env(BQX_HOME=str(tmp_path / "home"), BQX_DATABASE_URL=pg_url)
    res = _bqx(["db", "status"], env)
    assert res.returncode == 0, res.stderr
    assert "reachable: PostgreSQL" in res.stdout
    dead = "postgresql://u:Pw0rd123@127.0.0.1:1/bqx"
    res = _bqx(["db", "status"], {**env, "BQX_DATABASE_URL": dead})
    assert res.returncode == 1
    assert "unreachable" in res.stderr and "postgresql://u:****@127.0.0.1:1/bqx" in res.stdout
    assert "Pw0rd123" not in res.stdout + res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "home").exists()


# -- the user's session options -----------------------------------------------------------


def _with_options(url: str, options: str) -> str:
    from urllib.parse import quote

    return f"{url}{'&' if '?' in url else '?'}options={quote(options)}"


def test_url_options_are_honoured(pg_url: str) -> None:
    """`options=` in the URL applies on bqx's connections, beside bqx's own timezone=UTC,
    through connect() and pool() alike."""
    url = _with_options(pg_url, "-c statement_timeout=1234 -c timezone=Asia/Tokyo")
    with connect(url) as conn:
        assert conn.execute("SHOW statement_timeout").fetchone() == ("1234ms",)
        assert conn.execute("SHOW timezone").fetchone() == ("UTC",)  # bqx's wins there
    with pool(url, 1) as conns, conns.connection() as conn:
        assert conn.execute("SHOW statement_timeout").fetchone() == ("1234ms",)
    settings = load_settings(database_url=url)
    assert resolve_url(settings) == url
    with connect(settings) as conn:
        assert conn.execute("SHOW statement_timeout").fetchone() == ("1234ms",)


def test_pgoptions_is_honoured(pg_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PGOPTIONS", "-c lock_timeout=4321 -c work_mem=7MB")
    with connect(pg_url) as conn:
        assert conn.execute("SHOW lock_timeout").fetchone() == ("4321ms",)
        assert conn.execute("SHOW work_mem").fetchone() == ("7MB",)
        assert conn.execute("SHOW timezone").fetchone() == ("UTC",)
    # options in the URL take precedence over PGOPTIONS, as in libpq
    with connect(_with_options(pg_url, "-c lock_timeout=99")) as conn:
        assert conn.execute("SHOW lock_timeout").fetchone() == ("99ms",)


def test_pgoptions_reach_the_cli(cli_env: dict[str, str], conn: psycopg.Connection) -> None:
    """PGOPTIONS applies to the CLI's connections too: a read-only session refuses `init`,
    which ends in one line (a database error, no traceback) and creates nothing."""
    env = {**cli_env, "PGOPTIONS": "-c default_transaction_read_only=on"}
    res = _bqx(["init", "--start", "2024-07", "--end", "2024-07", "--pairs", "EURUSD"], env)
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines() == [
        "error: database: cannot execute CREATE SCHEMA in a read-only transaction"
    ]
    schema = cli_env["BQX_SCHEMA"]
    found = conn.execute("SELECT 1 FROM pg_namespace WHERE nspname = %s", (schema,)).fetchone()
    assert found is None


@pytest.mark.db  # starts a server of its own
def test_db_destroy_asks_refuses_another_database_and_removes_the_embedded_one(
    pg_url: str,
) -> None:
    path = Path(tempfile.mkdtemp(prefix="bqx-test-", dir="/tmp"))
    try:
        env = _clean_env(BQX_HOME=str(path / "home"))
        res = _bqx(["db", "destroy", "--yes"], env)  # nothing there yet
        assert res.returncode == 0 and "nothing to destroy" in res.stdout, res.stderr
        assert _bqx(["db", "start"], env).returncode == 0
        server = EmbeddedServer(path / "home")
        assert server.is_running()
        # another database named: refused whatever --yes says, nothing touched
        for extra in ({"BQX_DATABASE_URL": pg_url}, {"PGHOST": "/nonexistent"}):
            res = _bqx(["db", "destroy", "--yes"], {**env, **extra})
            assert res.returncode == 1 and res.stderr.count("\n") == 1, res.stderr
            assert "never deletes another database: nothing removed" in res.stderr
        with psycopg.connect(pg_url) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
        # no terminal and no --yes: says what, deletes nothing
        res = _bqx(["db", "destroy"], env)
        assert res.returncode == 1 and f"delete {server.root}" in res.stderr
        assert "not destroying without confirmation: give --yes" in res.stderr
        assert server.is_running()
        res = _bqx(["db", "destroy", "--yes"], env)
        assert res.returncode == 0, res.stderr
        assert f"{server.root} deleted" in res.stdout
        assert not server.root.exists() and not server.is_running()
    finally:
        EmbeddedServer(path / "home").destroy()
        shutil.rmtree(path, ignore_errors=True)
