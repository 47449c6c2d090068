"""Shared fixtures: one real PostgreSQL per test session, one fresh schema per test.

By default the embedded server that bqx ships with is started under a temporary BQX_HOME;
set BQX_TEST_DATABASE_URL to run the suite against another PostgreSQL instead.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from bqx.config import Settings, load_settings
from bqx.db import EmbeddedServer, connect
from bqx.schema import Layout


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
