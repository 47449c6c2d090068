"""A least-privilege role runs bqx on a shared database: exactly the GRANTs of docs/privileges.md."""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

import psycopg
import pytest
from psycopg import errors as pgerrors
from psycopg import sql

from bqx.config import load_settings
from bqx.core.layout import Layout
from bqx.core.months import Month
from bqx.db import connect
from bqx.ops.report import write_report
from bqx.ops.status import status
from bqx.ops.verify import verify
from bqx.store import names
from conftest import store_for

DOC = Path(__file__).resolve().parents[1] / "docs" / "privileges.md"


def admin_sql(schema: str, role: str, password: str) -> list[str]:
    """The first SQL block of docs/privileges.md, for this test's schema and role."""
    block = re.search(r"```sql\n(.*?)```", DOC.read_text(), re.S)
    assert block is not None, "docs/privileges.md lost its SQL block"
    text = re.sub(r"--[^\n]*", "", block.group(1))
    text = re.sub(r"\bbqx_loader\b", role, text)
    text = re.sub(r"\bbqx\b", schema, text)
    text = text.replace("'change-me'", "'" + password.replace("'", "''") + "'")
    return [s.strip() for s in text.split(";") if s.strip()]


def url_as(url: str, role: str, password: str) -> str:
    """``url`` with its user and password replaced."""
    parts = urlsplit(url)
    host = parts.netloc.rsplit("@", 1)[-1]
    netloc = f"{quote(role)}:{quote(password, safe='')}@{host}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


@pytest.fixture
def make_loader(
    pg_url: str, conn: psycopg.Connection, schema_name: str
) -> Iterator[Callable[[], tuple[str, str]]]:
    """Set up a fresh login role with the admin SQL of the docs: ``make_loader() -> (role, url)``.

    The URL carries the role's password, so it works whether the server trusts local
    connections or asks for a password.
    """
    roles: list[str] = []

    def make() -> tuple[str, str]:
        role = f"bqx_loader_{uuid.uuid4().hex[:8]}"
        password = f"pw-{uuid.uuid4().hex}"
        roles.append(role)
        for stmt in admin_sql(schema_name, role, password):
            conn.execute(stmt)  # the admin's SQL from the docs, names substituted
        return role, url_as(pg_url, role, password)

    yield make
    with psycopg.connect(pg_url, autocommit=True) as admin:
        for role in roles:
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s", (role,)
            )
            admin.execute(
                sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema_name))
            )
            admin.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
            admin.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


def test_loader_role_runs_backfill_status_verify_report_and_cannot_write_sources(
    make_bars, conn, schema_name, make_loader, tmp_path
):
    make_bars("eurusd", "2024-07-25", 12 * 1440, seed=1)  # sources exist before the grants
    role, url = make_loader()
    # the grants also reach source tables the admin creates later (ALTER DEFAULT PRIVILEGES)
    make_bars("usdjpy", "2024-07-25", 12 * 1440, seed=2, level=150.0)
    me = conn.execute("SELECT rolsuper, rolcreatedb, rolcreaterole FROM pg_roles WHERE rolname = %s",
                      (role,)).fetchone()  # fmt: skip
    assert me == (False, False, False)

    src = sql.Identifier(schema_name, "m1_eurusd")
    bars_before = conn.execute(
        sql.SQL("SELECT count(*), sum(close) FROM {}").format(src)
    ).fetchone()
    settings = load_settings(database_url=url, schema_name=schema_name, home=tmp_path / "home")
    layout = Layout(schema=schema_name)
    summary = store_for(settings, layout).backfill(workers=2)
    assert (summary.jobs_done, summary.jobs_failed, summary.status) == (4, 0, "done")
    with connect(settings, autocommit=True) as mine:
        assert mine.execute("SELECT current_user").fetchone()[0] == role
        st = status(mine, layout).as_dict()
        assert st["jobs"]["done"] == 4 and st["jobs"]["failed"] == 0
        result = verify(mine, layout)
        assert result.ok, [c for c in result.checks if not c.ok]
        md, html, _ = write_report(mine, layout, tmp_path / "report")
        assert md.stat().st_size > 0 and html.stat().st_size > 0
        # the targets and the ledger belong to the role, in the schema it was given
        owners = mine.execute(
            "SELECT DISTINCT pg_get_userbyid(c.relowner) FROM pg_class c JOIN pg_namespace n"
            " ON n.oid = c.relnamespace WHERE n.nspname = %s AND c.relname ~ '^bqx_'"
            # the source versions go with the source tables: kept by whoever loads bars
            " AND c.relname !~ '^bqx_source_versions'",
            (schema_name,),
        ).fetchall()
        assert owners == [(role,)]

        part = names.source_partition(Layout(schema=schema_name), "eurusd", Month(2024, 7))
        writes = [
            sql.SQL("INSERT INTO {} (time, open, high, low, close) VALUES"
                    " ('2030-01-01', 1, 1, 1, 1)").format(src),
            sql.SQL("UPDATE {} SET close = close + 1").format(src),
            sql.SQL("DELETE FROM {}").format(src),
            sql.SQL("TRUNCATE {}").format(src),
            sql.SQL("UPDATE {} SET close = 2").format(part),
            sql.SQL("TRUNCATE {}").format(part),
            sql.SQL("DROP TABLE {}").format(src),
            sql.SQL("UPDATE {} SET close = 2").format(sql.Identifier(schema_name, "m1_usdjpy")),
        ]  # fmt: skip
        for stmt in writes:
            with pytest.raises(pgerrors.InsufficientPrivilege):
                mine.execute(stmt)
        with pytest.raises(pgerrors.InsufficientPrivilege):  # nothing outside its schema
            mine.execute("CREATE SCHEMA bqx_elsewhere")
    after = conn.execute(sql.SQL("SELECT count(*), sum(close) FROM {}").format(src)).fetchone()
    assert after == bars_before and after[0] > 0
