"""Credentials from where operators keep them (docs/configuration.md): a URL file, an AWS Secrets
Manager secret (moto's server on 127.0.0.1, reached through the standard endpoint variables),
RDS IAM tokens, and the precedence between them. Backfills run against the real server; the IAM
tests talk to a small server speaking PostgreSQL's protocol, which records the password each
connection sends (RDS itself cannot be reached from here)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import parse_qs, quote, urlsplit

import boto3
import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict

from bqx.api import Store
from bqx.config import load_settings
from bqx.core.months import Month
from bqx.db import DatabaseRef, connect, pool
from bqx.db import credentials as creds
from bqx.errors import BqxError
from bqx.store import names
from conftest import store_for, wait_for
from test_dask import same_bits, snapshot, watching_the_scheduler
from test_privileges import make_loader  # noqa: F401 - the least-privilege role fixture

BQX = [sys.executable, "-m", "bqx.cli"]
URL_VARS = ("BQX_DATABASE_URL", "BQX_DATABASE_URL_FILE", "BQX_DATABASE_SECRET", "BQX_DATABASE_IAM")


# -- helpers ------------------------------------------------------------------------------


def login_of(url: str) -> dict[str, object]:
    """The RDS-shaped login of a URL: its password read from the passfile it names, if any."""
    p = conninfo_to_dict(url)
    password = p.get("password")
    if not password and p.get("passfile"):
        line = [x for x in Path(str(p["passfile"])).read_text().splitlines() if x.strip()][-1]
        password = line.split(":", 4)[4]
    return {"username": p.get("user"), "password": password, "host": p.get("host") or "",
            "port": int(str(p.get("port") or 5432)), "dbname": p.get("dbname")}  # fmt: skip


def as_url(login: dict[str, object]) -> str:
    """The same login as a plain ``postgresql://`` URL (a socket directory goes in the query)."""
    auth = f"{quote(str(login['username']), safe='')}:{quote(str(login['password']), safe='')}"
    host, port, db = str(login["host"]), login["port"], quote(str(login["dbname"]), safe="")
    if host.startswith("/"):
        return f"postgresql://{auth}@/{db}?host={quote(host, safe='/')}&port={port}"
    return f"postgresql://{auth}@{host}:{port}/{db}"


@pytest.fixture
def secrets(aws_env) -> Iterator[object]:
    """A Secrets Manager client of the test server; the secrets this process fetched are
    forgotten before and after."""
    creds.forget_secrets()
    yield boto3.client("secretsmanager")
    creds.forget_secrets()


def new_secret(client: object, value: str | dict[str, object]) -> str:
    name = f"bqx/test/{uuid.uuid4().hex[:8]}"
    text = value if isinstance(value, str) else json.dumps(value)
    client.create_secret(Name=name, SecretString=text)
    return name


def cli_env_without_url(
    schema: str, home: Path, aws_env: dict[str, str] | None = None, **more: str
) -> dict[str, str]:
    """An environment naming no database at all (no BQX_DATABASE_*, no PG*), with the test's
    schema and home; AWS reached through the service's own endpoint variable."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PG", "BQX_", "AWS_"))}
    env |= {"BQX_SCHEMA": schema, "BQX_HOME": str(home)}
    if aws_env is not None:
        env |= {k: v for k, v in aws_env.items() if k != "AWS_ENDPOINT_URL"}
        env["AWS_ENDPOINT_URL_SECRETS_MANAGER"] = aws_env["AWS_ENDPOINT_URL"]
    return env | more


def bqx(env: dict[str, str], *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([*BQX, *args], env=env, capture_output=True, text=True, timeout=timeout)


def one_error_line(res: subprocess.CompletedProcess) -> str:
    lines = res.stderr.splitlines()
    assert res.returncode == 1 and len(lines) == 1, (res.returncode, res.stderr)
    assert lines[0].startswith("error: ") and "Traceback" not in res.stderr
    return lines[0]


def schema_state(conn: psycopg.Connection, schema: str) -> list[tuple]:
    """Every relation of the schema with its row count: what "nothing stored changed" means."""
    rels = conn.execute(
        "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE n.nspname = %s AND c.relkind IN ('r', 'p') ORDER BY 1",
        (schema,),
    ).fetchall()
    return [
        (
            r,
            conn.execute(
                sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(schema, r))
            ).fetchone()[0],
        )  # fmt: skip
        for (r,) in rels
    ]


@pytest.fixture
def loader_secret(make_loader, secrets) -> tuple[str, dict[str, object], str]:  # noqa: F811
    """A least-privilege role of this test and a secret holding its login (RDS JSON):
    ``(role, login, secret name)``."""
    role, url = make_loader()
    login = login_of(url)
    return role, login, new_secret(secrets, login)


@pytest.fixture
def bars(make_bars):
    """EURUSD over July and August 2024: two jobs, the second's lookback in the first."""
    make_bars("eurusd", "2024-07-15", 31 * 1440, seed=3, level=1.08)


def assert_equals_a_forced_recompute(settings, layout, conn) -> None:
    """The stored metrics are bit for bit those of ``backfill --force`` over the plain URL."""
    got = snapshot(conn, layout, "eurusd")
    store_for(settings, layout).backfill(force=True, workers=1)
    assert same_bits(got, snapshot(conn, layout, "eurusd"))


# -- precedence: two sources at once are an error ------------------------------------------


def test_two_credential_sources_at_once_are_one_error_and_an_option_wins(tmp_path, monkeypatch):
    for name in (*URL_VARS, "PGHOST", "PGSERVICE", "PGUSER", "PGDATABASE"):
        monkeypatch.delenv(name, raising=False)
    url_file = tmp_path / "url"
    url_file.write_text("postgresql://app@db.example/bqx\n")
    url_file.chmod(0o600)
    combos = {
        ("BQX_DATABASE_URL", "BQX_DATABASE_URL_FILE"): "are both set",
        ("BQX_DATABASE_URL_FILE", "BQX_DATABASE_SECRET"): "are both set",
        ("BQX_DATABASE_URL", "BQX_DATABASE_URL_FILE", "BQX_DATABASE_SECRET"): "are all set",
    }
    values = {"BQX_DATABASE_URL": "postgresql://u:S3cret@db.example/bqx",
              "BQX_DATABASE_URL_FILE": str(url_file), "BQX_DATABASE_SECRET": "prod/bqx"}  # fmt: skip
    for combo, words in combos.items():
        with monkeypatch.context() as m:
            for name in combo:
                m.setenv(name, values[name])
            with pytest.raises(BqxError) as err:
                load_settings()
            text = str(err.value)
            assert words in text and all(n in text for n in combo), text
            assert "S3cret" not in text and "docs/configuration.md" in text
            # a URL given by the caller (--database-url) wins over the environment's
            assert load_settings(database_url="postgresql://x@h/db").credential_settings() == [
                "BQX_DATABASE_URL"
            ]
    # naming the database in use never raises, even for a malformed URL, and masks it
    shown = repr(Store(database_url="postgresql://u:S3cret@[::1/db"))
    assert "S3cret" not in shown and "u:****@" in shown
    monkeypatch.setenv("BQX_DATABASE_IAM", "1")
    with pytest.raises(BqxError, match="BQX_DATABASE_IAM is set but no database is named"):
        load_settings()
    # the command line: one line, exit 1, before anything else
    env = cli_env_without_url("bqx", tmp_path / "home", BQX_DATABASE_URL=values["BQX_DATABASE_URL"],
                              BQX_DATABASE_URL_FILE=str(url_file))  # fmt: skip
    line = one_error_line(bqx(env, "status"))
    assert "BQX_DATABASE_URL and BQX_DATABASE_URL_FILE are both set" in line
    assert "S3cret" not in line and not (tmp_path / "home").exists()


# -- a URL in a file -----------------------------------------------------------------------


def test_a_url_file_is_read_like_pgpass_refused_when_others_can_read_it(tmp_path):
    f = tmp_path / "db-url"
    f.write_text("postgresql://app:S3cret@db.example:5432/bqx\n")
    ref = DatabaseRef("file", str(f))
    for mode in (0o644, 0o640, 0o604, 0o660):
        f.chmod(mode)
        with pytest.raises(BqxError) as err:
            ref.conninfo()
        text = str(err.value)
        assert str(f) in text and f"chmod 600 {f}" in text and f"mode {mode:04o}" in text
        assert "S3cret" not in text and "\n" not in text
    for mode in (0o600, 0o400):
        f.chmod(mode)
        assert ref.conninfo() == "postgresql://app:S3cret@db.example:5432/bqx"
    assert "S3cret" not in repr(ref) and str(f) in repr(ref)
    # a file is read again for each connection: a rotated mounted secret is picked up
    f.chmod(0o600)
    f.write_text("postgresql://app:N3w@db.example:5432/bqx")
    assert "N3w" in ref.conninfo()
    bad = {
        "": "is empty",
        "a\nb\n": "holds 2 lines",
        "postgresql://u:S3cret@[::1/db": "holds an invalid database URL",
    }
    for text, words in bad.items():
        f.write_text(text)
        with pytest.raises(BqxError) as err:
            ref.conninfo()
        assert words in str(err.value) and "S3cret" not in str(err.value), str(err.value)
    with pytest.raises(BqxError, match="No such file"):
        DatabaseRef("file", str(tmp_path / "missing")).conninfo()
    with pytest.raises(BqxError, match="not a regular file"):
        DatabaseRef("file", str(tmp_path)).conninfo()


def test_backfill_from_a_url_file_600_and_644_refused(
    settings, layout, conn, bars, pg_url, schema_name, tmp_path
):
    f = tmp_path / "secrets" / "bqx-url"
    f.parent.mkdir()
    f.write_text(pg_url + "\n")
    f.chmod(0o644)
    env = cli_env_without_url(schema_name, tmp_path / "home", BQX_DATABASE_URL_FILE=str(f))
    before = schema_state(conn, schema_name)
    line = one_error_line(bqx(env, "backfill", "--workers", "2"))
    assert str(f) in line and f"chmod 600 {f}" in line
    assert schema_state(conn, schema_name) == before  # nothing created, nothing written
    f.chmod(0o600)
    res = bqx(env, "backfill", "--workers", "2", "--executor", "local")
    assert res.returncode == 0, res.stderr
    assert not (tmp_path / "home" / "pg").exists()  # no embedded server was started
    assert_equals_a_forced_recompute(settings, layout, conn)


def test_a_python_caller_names_the_database_by_a_url_file_and_it_replaces_the_environments(
    settings, layout, conn, bars, pg_url, schema_name, tmp_path, monkeypatch
):
    """``Store(database_url_file=...)`` as ``BQX_DATABASE_URL_FILE`` would: the caller's
    choice wins over a URL in the environment or in the settings given; two at once are one
    error."""
    f = tmp_path / "bqx-url"
    f.write_text(pg_url + "\n")
    f.chmod(0o600)
    monkeypatch.setenv("BQX_DATABASE_URL", "postgresql://nobody:S3cret@127.0.0.1:9/none")
    store = Store(database_url_file=f, schema=schema_name, home=tmp_path / "home")
    assert store.database_ref().source == "file" and "S3cret" not in repr(store)
    assert store.backfill(workers=1).jobs_failed == 0  # it reached the real database
    assert_equals_a_forced_recompute(settings, layout, conn)
    again = Store(settings, database_url_file=f)  # settings naming a URL: the file replaces it
    assert again.database_ref().source == "file" and again.status().pairs
    with pytest.raises(BqxError, match="are both set") as err:
        Store(database_url_file=f, database_secret="prod/bqx")
    assert "S3cret" not in str(err.value)
    f.chmod(0o644)
    with pytest.raises(BqxError, match="chmod 600"):
        Store(database_url_file=f, schema=schema_name).status()


# -- AWS Secrets Manager -------------------------------------------------------------------


def test_secret_shapes_rds_json_and_url(secrets):
    login = {"username": "app", "password": "p@ss:w/rd", "host": "db.example", "port": 6543,
             "dbname": "markets", "engine": "postgres", "dbInstanceIdentifier": "db-1"}  # fmt: skip
    rds = creds.parse_secret("s", json.dumps(login))
    assert conninfo_to_dict(rds) == {"user": "app", "password": "p@ss:w/rd", "host": "db.example",
                                     "port": "6543", "dbname": "markets"}  # fmt: skip
    url = creds.parse_secret("s", " postgresql://app:pw@db.example:6543/markets\n")
    assert url == "postgresql://app:pw@db.example:6543/markets"
    # RDS-managed master secrets hold only the user and password: libpq's PG* name the rest
    assert conninfo_to_dict(creds.parse_secret("s", '{"username": "a", "password": "b"}')) == {
        "user": "a", "password": "b"}  # fmt: skip
    for text in ("hunter2", "not json {", "{broken", "[1, 2]", "postgresql://u:hunter2@[::1/db"):
        with pytest.raises(BqxError) as err:
            creds.parse_secret("prod/bqx", text)
        assert "'prod/bqx'" in str(err.value) and "hunter2" not in str(err.value)
        assert "broken" not in str(err.value)
    # through the server, by name and by ARN
    name = new_secret(secrets, login)
    arn = secrets.describe_secret(SecretId=name)["ARN"]
    assert arn.split(":")[3] == "us-east-1"
    for ref in (DatabaseRef("secret", name), DatabaseRef("secret", arn)):
        assert conninfo_to_dict(ref.conninfo())["password"] == "p@ss:w/rd"
        assert "p@ss" not in repr(ref) and ref.params()["host"] == "db.example"
        assert "password" not in ref.params()


def test_backfill_from_a_secret_in_either_shape_with_no_url_anywhere(
    settings, layout, conn, bars, pg_url, schema_name, tmp_path, secrets, aws_env
):
    login = login_of(pg_url)  # the session server's own credentials
    for shape, value in (("rds json", login), ("url", as_url(login))):
        name = new_secret(secrets, value)
        env = cli_env_without_url(schema_name, tmp_path / "home", aws_env,
                                  BQX_DATABASE_SECRET=name)  # fmt: skip
        assert not any(k.startswith("PG") or k == "BQX_DATABASE_URL" for k in env)
        res = bqx(env, "-v", "backfill", "--workers", "2", "--executor", "local", "--force")
        assert res.returncode == 0, (shape, res.stderr)
        assert f"database: AWS Secrets Manager secret '{name}'" in res.stderr, shape
        assert str(login["password"]) not in res.stdout + res.stderr, shape
        assert not (tmp_path / "home" / "pg").exists(), shape  # no embedded server started
        assert_equals_a_forced_recompute(settings, layout, conn)
        if shape != "rds json":
            continue
        db = bqx(env, "db", "status", "--json")
        assert db.returncode == 0 and json.loads(db.stdout)["reachable"] is True, db.stderr
        shown = bqx(env, "db", "url")
        assert shown.returncode == 0 and str(login["password"]) not in shown.stdout
        whole = bqx(env, "db", "url", "--show-password")  # the JSON as a conninfo
        with psycopg.connect(whole.stdout.strip()) as c:  # for scripts: usable as printed
            assert c.execute("SELECT 1").fetchone() == (1,)


def test_secret_errors_are_one_line_naming_the_secret_and_change_nothing(
    conn, bars, pg_url, schema_name, tmp_path, secrets, aws_env
):
    login = login_of(pg_url)
    no_password = {k: v for k, v in login.items() if k != "password"}
    missing = f"bqx/test/missing-{uuid.uuid4().hex[:6]}"
    empty = new_secret(secrets, no_password)
    with socket.socket() as s:  # a port where nothing listens
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    cases = {
        "missing": (missing, {}, "does not exist"),
        "no password": (empty, {}, "holds no password"),
        "unreachable": (empty, {"AWS_ENDPOINT_URL_SECRETS_MANAGER": dead, "AWS_MAX_ATTEMPTS": "1"},
                        f"cannot reach AWS Secrets Manager at {dead}"),
    }  # fmt: skip
    before = schema_state(conn, schema_name)
    for case, (name, more, words) in cases.items():
        env = cli_env_without_url(schema_name, tmp_path / "home", aws_env,
                                  BQX_DATABASE_SECRET=name, **more)  # fmt: skip
        for command in (["backfill"], ["status"])[: 2 if case == "missing" else 1]:
            line = one_error_line(bqx(env, *command))
            assert f"AWS Secrets Manager secret '{name}'" in line and words in line, (case, line)
        assert schema_state(conn, schema_name) == before, case
    assert not (tmp_path / "home" / "pg").exists()


def test_a_password_rotated_between_two_jobs_does_not_stop_the_run(
    settings, layout, conn, bars, pg_url, schema_name, tmp_path, secrets, aws_env, loader_secret
):
    role, login, name = loader_secret
    env = cli_env_without_url(schema_name, tmp_path / "home", aws_env, BQX_DATABASE_SECRET=name)
    first = bqx(env, "backfill", "--workers", "1")  # as the role: its tables, its partitions
    assert first.returncode == 0, first.stderr
    # August's partition held by a reader: its job waits inside its write transaction
    blocker = psycopg.connect(pg_url)
    august = names.target_partition(layout, "eurusd", Month(2024, 8))
    blocker.execute(sql.SQL("LOCK TABLE {} IN ACCESS SHARE MODE").format(august))
    proc = subprocess.Popen([*BQX, "backfill", "--force", "--workers", "1", "--executor", "local"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    jobs = names.table(layout, "bqx_jobs")
    try:

        def july_done_and_august_waiting() -> bool:
            rows = dict(conn.execute(sql.SQL(
                "SELECT j.month, j.status FROM {} j WHERE j.run_id = (SELECT max(run_id) FROM {})"
            ).format(jobs, jobs)).fetchall())  # fmt: skip
            waiting = conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE usename = %s"
                " AND wait_event_type = 'Lock'", (role,),
            ).fetchone()[0]  # fmt: skip
            return rows.get(Month(2024, 7).first_day) == "done" and waiting == 1

        wait_for(july_done_and_august_waiting, what="July done and August's job waiting")
        # the rotation: PostgreSQL first, then the secret; then every session of the role ends,
        # so each connection the run makes from now on needs the new password
        new_password = f"pw-{uuid.uuid4().hex}"
        conn.execute(sql.SQL("ALTER ROLE {} PASSWORD {}").format(
            sql.Identifier(role), sql.Literal(new_password)))  # fmt: skip
        secrets.put_secret_value(
            SecretId=name, SecretString=json.dumps(login | {"password": new_password})
        )
        conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s",
                     (role,))  # fmt: skip
        blocker.rollback()
        out, err = proc.communicate(timeout=180)
    finally:
        blocker.close()
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert str(login["password"]) not in out + err and new_password not in out + err
    states = conn.execute(sql.SQL(
        "SELECT status, count(*) FROM {} WHERE run_id = (SELECT max(run_id) FROM {}) GROUP BY 1"
    ).format(jobs, jobs)).fetchall()  # fmt: skip
    assert states == [("done", 2)]
    assert_equals_a_forced_recompute(settings, layout, conn)


def test_a_refused_password_fetches_the_secret_once_more_then_fails(
    conn, pg_url, secrets, loader_secret
):
    role, login, name = loader_secret
    ref = DatabaseRef("secret", name)
    with connect(ref) as c:  # fetched now, kept for the process
        assert c.execute("SELECT current_user").fetchone() == (role,)
    conn.execute(sql.SQL("ALTER ROLE {} PASSWORD 'rotated-1'").format(sql.Identifier(role)))
    secrets.put_secret_value(
        SecretId=name, SecretString=json.dumps(login | {"password": "rotated-1"})
    )
    with connect(ref) as c:  # the kept password is refused: fetched again, once
        assert c.execute("SELECT current_user").fetchone() == (role,)
    with pool(ref, 2) as p, p.connection() as c:  # pools open their connections the same way
        assert c.execute("SELECT current_user").fetchone() == (role,)
    conn.execute(sql.SQL("ALTER ROLE {} PASSWORD 'rotated-2'").format(sql.Identifier(role)))
    with pytest.raises(BqxError) as err:  # the secret was not rotated: the refusal stands
        connect(ref)
    text = str(err.value)
    assert f"secret '{name}'" in text and "password authentication failed" in text
    assert "rotated" not in text and str(login["password"]) not in text


# -- RDS IAM tokens ------------------------------------------------------------------------


def _recv(c: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = c.recv(n - len(out))
        if not chunk:
            raise ConnectionError("client hung up")
        out += chunk
    return out


def _msg(tag: bytes, body: bytes) -> bytes:
    return tag + struct.pack("!i", len(body) + 4) + body


class PasswordCatcher:
    """A TCP server speaking just enough of PostgreSQL's protocol to ask each client for a
    cleartext password (as RDS receives an IAM token) and record it with the time, then let it
    in or refuse it."""

    def __init__(self, refuse: bool = False) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.refuse = refuse
        self.logins: list[dict[str, object]] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def close(self) -> None:
        self.sock.close()

    def _serve(self) -> None:
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._session, args=(c,), daemon=True).start()

    def _session(self, c: socket.socket) -> None:
        login: dict[str, object] = {"at": time.time(), "ssl_requested": False}
        self.logins.append(login)
        with c, contextlib.suppress(ConnectionError, OSError):
            while True:
                n, code = struct.unpack("!ii", _recv(c, 8))
                body = _recv(c, n - 8)
                if code not in (80877103, 80877104):  # SSLRequest, GSSENCRequest
                    break
                login["ssl_requested"] = login["ssl_requested"] or code == 80877103
                c.sendall(b"N")  # no TLS here
            items = body.split(b"\0")
            login["params"] = {
                k.decode(): v.decode() for k, v in zip(items[0::2], items[1::2], strict=False) if k
            }
            c.sendall(_msg(b"R", struct.pack("!i", 3)))  # AuthenticationCleartextPassword
            _recv(c, 1)
            (n,) = struct.unpack("!i", _recv(c, 4))
            login["password"] = _recv(c, n - 4).rstrip(b"\0").decode()
            if self.refuse:
                fields = (
                    b'SFATAL\0VFATAL\0C28P01\0Mpassword authentication failed for user "app"\0\0'
                )
                c.sendall(_msg(b"E", fields))
                return
            status = b"".join(_msg(b"S", k + b"\0" + v + b"\0") for k, v in (
                (b"server_version", b"16.4"), (b"client_encoding", b"UTF8"),
                (b"standard_conforming_strings", b"on"), (b"TimeZone", b"UTC"),
                (b"integer_datetimes", b"on"), (b"DateStyle", b"ISO, MDY")))  # fmt: skip
            c.sendall(_msg(b"R", struct.pack("!i", 0)) + status
                      + _msg(b"K", struct.pack("!ii", 1, 2)) + _msg(b"Z", b"I"))  # fmt: skip
            while c.recv(1024):  # until Terminate and hang-up
                pass


@pytest.fixture
def catcher() -> Iterator[PasswordCatcher]:
    server = PasswordCatcher()
    yield server
    server.close()


def token_fields(token: str) -> dict[str, str]:
    """The query of an RDS IAM token (a SigV4-presigned ``host:port/?Action=connect&…``)."""
    return {k: v[0] for k, v in parse_qs(urlsplit("https://" + token).query).items()}


def assert_fresh_token(login: dict[str, object], port: int, user: str) -> dict[str, str]:
    token = str(login["password"])
    assert token.startswith(f"127.0.0.1:{port}/?"), token[:40]
    f = token_fields(token)
    assert f["Action"] == "connect" and f["DBUser"] == user and f["X-Amz-Expires"] == "900"
    assert "/us-east-1/rds-db/aws4_request" in f["X-Amz-Credential"] and f["X-Amz-Signature"]
    signed = datetime.strptime(f["X-Amz-Date"], "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
    assert abs(signed.timestamp() - float(str(login["at"]))) < 3  # signed for this connection
    return f


def test_iam_signs_a_fresh_token_for_every_connection(aws_env, catcher, monkeypatch):
    ref = DatabaseRef("url", f"postgresql://app@127.0.0.1:{catcher.port}/bqx?sslmode=disable",
                      iam=True)  # fmt: skip
    for _ in range(2):
        connect(ref).close()
        time.sleep(1.1)  # tokens are signed to the second
    with pool(ref, 2) as p, p.connection():
        time.sleep(1.1)
        with p.connection():  # the pool's second connection, opened later
            pass
    assert len(catcher.logins) == 4
    tokens = [assert_fresh_token(login, catcher.port, "app") for login in catcher.logins]
    # each signed at its own connection's time (checked above): one token per second of
    # connecting, whatever the age of the process or the pool
    dates = {t["X-Amz-Date"] for t in tokens}
    assert len(dates) >= 3 and len({t["X-Amz-Signature"] for t in tokens}) == len(dates)
    assert all(login["params"]["user"] == "app" for login in catcher.logins)
    assert not any(login["ssl_requested"] for login in catcher.logins)  # the user's sslmode kept
    assert "X-Amz" not in repr(ref) and "X-Amz" not in ref.shown()
    # through a secret without a password, and PGSSLMODE chosen by the user
    monkeypatch.setenv("PGSSLMODE", "disable")
    creds.forget_secrets()
    name = new_secret(boto3.client("secretsmanager"), {"username": "svc", "host": "127.0.0.1",
                      "port": catcher.port, "dbname": "bqx"})  # fmt: skip
    connect(DatabaseRef("secret", name, iam=True)).close()
    assert_fresh_token(catcher.logins[-1], catcher.port, "svc")


def test_iam_asks_for_tls_unless_the_user_chose_and_a_refusal_shows_no_token(aws_env):
    server = PasswordCatcher(refuse=True)
    try:
        tls = DatabaseRef("url", f"postgresql://app@127.0.0.1:{server.port}/bqx", iam=True)
        with pytest.raises(BqxError) as err:
            connect(tls)
        assert "SSL" in str(err.value) and "X-Amz" not in str(err.value)
        assert server.logins[-1]["ssl_requested"] and "password" not in server.logins[-1]
        plain = DatabaseRef("url", f"postgresql://app@127.0.0.1:{server.port}/bqx?sslmode=disable",
                            iam=True)  # fmt: skip
        with pytest.raises(BqxError) as err:
            connect(plain)
        token = str(server.logins[-1]["password"])
        assert "X-Amz-Signature" in token
        text = str(err.value)
        assert "password authentication failed" in text and "\n" not in text
        assert token not in text and "X-Amz" not in text and "with RDS IAM tokens" in text
    finally:
        server.close()


def test_a_worker_process_signs_its_own_token(aws_env, catcher):
    """The local executor hands its worker the reference: the token is signed in the worker."""
    from bqx.core.layout import Layout
    from bqx.core.params import Params
    from bqx.pipeline.executors.local import LocalExecutor

    catcher.refuse = True
    ref = DatabaseRef("url", f"postgresql://app@127.0.0.1:{catcher.port}/bqx?sslmode=disable",
                      iam=True)  # fmt: skip
    params = Params.build(Layout("bqx"), (15, 30), "bars", 5)
    executor = LocalExecutor(1)
    executor.spawn(ref, params, 1, [("eurusd", Month(2024, 7).first_day)])
    wait_for(lambda: all(p.process.poll() is not None for p in executor.procs), 60,
             "the worker to end")  # fmt: skip
    executor.shutdown()
    assert catcher.logins, "the worker never connected"
    assert_fresh_token(catcher.logins[0], catcher.port, "app")


def test_iam_settings_that_cannot_work_are_one_line(aws_env, monkeypatch):
    cases = {
        "postgresql://app:S3cret@db.example:5432/bqx": "holds a password",
        "postgresql://db.example:5432/bqx": "names no user",
        "postgresql://app@/bqx?host=/var/run/postgresql": "needs one TCP host",
    }
    for url, words in cases.items():
        with pytest.raises(BqxError) as err:
            DatabaseRef("url", url, iam=True).conninfo()
        assert words in str(err.value) and "S3cret" not in str(err.value), str(err.value)
    for name in ("AWS_REGION", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setattr(creds, "_clients", {})
    with pytest.raises(BqxError, match="needs an AWS region: set AWS_REGION"):
        DatabaseRef("url", "postgresql://app@db.example:5432/bqx", iam=True).conninfo()


def test_db_url_with_iam_masks_the_token_unless_asked(aws_env, tmp_path):
    env = cli_env_without_url("bqx", tmp_path / "home", aws_env,
                              BQX_DATABASE_URL="postgresql://app@db.example:5432/bqx",
                              BQX_DATABASE_IAM="1")  # fmt: skip
    masked = bqx(env, "db", "url")
    assert masked.returncode == 0, masked.stderr
    assert "password=****" in masked.stdout and "X-Amz" not in masked.stdout
    assert "sslmode=require" in masked.stdout
    whole = bqx(env, "db", "url", "--show-password")
    token = conninfo_to_dict(whole.stdout.strip())["password"]
    assert token_fields(str(token))["DBUser"] == "app"


# -- secrets travel as references: no password in anything bqx shows or hands around --------


def _processes_text(seen: dict[int, str], stop: threading.Event) -> None:
    """Until ``stop``: the command line and environment of every process, as ``ps`` shows."""
    while not stop.is_set():
        for proc in Path("/proc").glob("[0-9]*"):
            with contextlib.suppress(OSError):
                text = (proc / "cmdline").read_bytes() + b"\n" + (proc / "environ").read_bytes()
                seen[int(proc.name)] = text.replace(b"\0", b" ").decode(errors="replace")
        time.sleep(0.05)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_no_password_in_any_output_log_process_ledger_report_or_metrics_page(
    layout, conn, bars, schema_name, tmp_path, secrets, aws_env, loader_secret
):
    _role, login, name = loader_secret
    password = str(login["password"])
    env = cli_env_without_url(schema_name, tmp_path / "home", aws_env, BQX_DATABASE_SECRET=name)
    texts: dict[str, str] = {}
    procs: dict[int, str] = {}
    stop = threading.Event()
    scanner = threading.Thread(target=_processes_text, args=(procs, stop))
    scanner.start()
    try:
        run = bqx(env, "-v", "backfill", "--executor", "local", "--workers", "2")
    finally:
        stop.set()
        scanner.join()
    assert run.returncode == 0, run.stderr
    assert any("bqx._worker" in t for t in procs.values())  # the workers were seen running
    texts["process list"] = "\n".join(procs.values())
    texts["backfill output"] = run.stdout + run.stderr
    for command in (["status", "--json"], ["verify", "--json"], ["runs", "--json"],
                    ["db", "status", "--json"], ["db", "url"],
                    ["report", "--out", str(tmp_path / "report"), "--json"]):  # fmt: skip
        res = bqx(env, "-v", *command)
        assert res.returncode == 0, (command, res.stderr)
        texts[" ".join(command)] = res.stdout + res.stderr
        if command[0] == "status":
            assert json.loads(res.stdout)["jobs"]["done"] == 2
    texts["report"] = "".join(p.read_text() for p in (tmp_path / "report").iterdir())
    texts["ledger"] = "\n".join(
        str(row)
        for t in ("bqx_runs", "bqx_jobs", "bqx_attempts")
        for row in conn.execute(sql.SQL("SELECT x::text FROM {} x").format(names.table(layout, t)))
    )
    assert "eurusd" in texts["ledger"] and "COMPLETE" in texts["report"]
    # the Prometheus page of a follower, and what it logs
    port = _free_port()
    follower = subprocess.Popen([*BQX, "update", "--follow", "0.5", "--metrics-port", str(port)],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        page = ""

        def scraped() -> bool:
            nonlocal page
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
                    page = r.read().decode()
            return "bqx_last_poll_timestamp_seconds" in page

        wait_for(scraped, 60, "the metrics page")
        follower.send_signal(signal.SIGTERM)
        out, err = follower.communicate(timeout=30)
    finally:
        if follower.poll() is None:
            follower.kill()
    texts["metrics page"] = page
    texts["follow output"] = out + err
    # an exception: the server refuses another password from a secret
    wrong = f"wrong-{uuid.uuid4().hex}"
    bad_env = env | {"BQX_DATABASE_SECRET": new_secret(secrets, login | {"password": wrong})}
    texts["refused login"] = one_error_line(bqx(bad_env, "backfill"))
    assert "password authentication failed" in texts["refused login"]
    for where, text in texts.items():
        assert password not in text and wrong not in text, where


def test_dask_workers_fetch_the_secret_themselves_and_no_password_reaches_dask(
    layout, conn, bars, settings, schema_name, tmp_path, secrets, aws_env, loader_secret
):
    import pickle

    from distributed import Client, LocalCluster

    from bqx import metrics
    from bqx.core.layout import Layout
    from bqx.core.params import Params
    from bqx.pipeline.executors import dask as dask_executor

    _role, login, name = loader_secret
    password = str(login["password"])
    ref = DatabaseRef("secret", name)
    bad = dask_executor.WorkArgs(ref, Params.build(Layout("bqx_no_such_schema"),
                                 metrics.DEFAULT_WINDOWS, "bars", 5), 1,
                                 [("eurusd", Month(2024, 7).first_day)])  # fmt: skip
    assert password.encode() not in pickle.dumps(bad)  # what travels to a worker
    own = load_settings(database_secret=name, schema_name=schema_name, home=tmp_path / "h")
    # the workers start with the AWS settings of this test: they fetch the secret themselves
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address=":0", silence_logs=50) as cluster, \
            Client(cluster, set_as_default=False) as client:  # fmt: skip
        summary, keys, stream = watching_the_scheduler(client, lambda: store_for(own, layout)
            .backfill(workers=2, executor="dask", scheduler=cluster.scheduler_address))  # fmt: skip
        assert (summary.jobs_done, summary.jobs_failed) == (2, 0)
        failed = client.submit(dask_executor.work, bad, key="bqx-backfill-fails", pure=False)
        with pytest.raises(Exception):  # noqa: B017 - any error: the schema does not exist
            failed.result(timeout=60)
        fetched = client.run(lambda: sorted(creds._secrets))  # each worker's own fetch
        texts = {
            "scheduler tasks": " ".join(sorted(keys)),
            "task stream": repr(stream),
            "logs": repr(client.get_worker_logs()) + repr(client.get_scheduler_logs()),
            "events": repr(
                client.run_on_scheduler(lambda dask_scheduler: dask_scheduler.get_events())
            ),
        }
    assert all(names == [name] for names in fetched.values()), fetched
    assert "bqx-backfill" in texts["scheduler tasks"] and "Compute Failed" in texts["logs"]
    # the failed task's arguments, as a reference; the worker reached the database with it
    assert "AWS Secrets Manager secret" in texts["logs"] and name in texts["logs"]
    assert "bqx_no_such_schema.bqx_jobs" in texts["logs"]
    for where, text in texts.items():
        assert password not in text, where
    assert_equals_a_forced_recompute(settings, layout, conn)
