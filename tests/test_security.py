"""The embedded server is private to its owner, and no password reaches a screen or a log.

Every test here runs against the real embedded server: the session's, or one of their own under
a temporary BQX_HOME whose path holds an apostrophe and a space.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict

from bqx.db import EmbeddedServer, connect, mask_text, mask_url
from bqx.db.embedded import conf_string, scram_verifier
from bqx.db.urls import check_url
from bqx.errors import BqxError

SECRET = "S3cretPw"
AS_ROOT = os.geteuid() == 0


def _session_server(pg_url: str) -> EmbeddedServer:
    params = conninfo_to_dict(pg_url)
    if "passfile" not in params:
        pytest.skip("the suite runs against an external PostgreSQL (BQX_TEST_DATABASE_URL)")
    return EmbeddedServer(Path(str(params["passfile"])).parent.parent)


def _as_nobody(args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        args, user="nobody", group="nogroup", extra_groups=[], capture_output=True, text=True,
        timeout=60, cwd="/", env={"PATH": "/usr/bin:/bin", "PGCONNECT_TIMEOUT": "5"},
    )  # fmt: skip


@contextmanager
def _outside_pytest_tmp() -> Iterator[Path]:
    """A temporary directory outside /tmp/pytest-of-<user>: every pytest session that starts
    resets that one to 0700, which would lock out the server's own user (as root) mid-test."""
    path = Path(tempfile.mkdtemp(prefix="bqx-test-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def own_server() -> Iterator[EmbeddedServer]:
    """A server of this module's own, under a BQX_HOME with an apostrophe and a space."""
    with _outside_pytest_tmp() as tmp:
        server = EmbeddedServer(tmp / "it's a home")
        server.start()
        yield server
        server.destroy()


# -- nobody else gets in ------------------------------------------------------------------


@pytest.mark.skipif(not AS_ROOT, reason="switching to another user needs root")
def test_other_local_user_cannot_connect(pg_url: str) -> None:
    """As uid `nobody`, the embedded server's socket can't be reached, while bqx connects."""
    server = _session_server(pg_url)
    sock = server.socket_dir / ".s.PGSQL.5432"
    assert sock.exists()
    bare = f"postgresql://postgres@/bqx?host={server.socket_dir}"  # the issue's own attack
    if Path("/usr/bin/psql").exists():
        res = _as_nobody(["/usr/bin/psql", bare, "-c", "SELECT 1"])
        assert res.returncode != 0
        assert "Permission denied" in res.stderr, res.stderr
    else:  # no psql: a raw socket, from the system's Python (the venv's may be out of reach)
        probe = (
            "import socket, sys\n"
            "s = socket.socket(socket.AF_UNIX)\n"
            "try:\n    s.connect(sys.argv[1])\nexcept PermissionError:\n    print('denied')\n"
            "else:\n    print('connected')\n"
        )
        res = _as_nobody(["/usr/bin/python3", "-c", probe, str(sock)])
        assert res.stdout.strip() == "denied", res.stderr
    with connect(pg_url) as conn:  # while bqx gets in
        assert conn.execute("SELECT current_user").fetchone() == ("postgres",)


def test_password_is_required_even_where_the_socket_is_reachable(pg_url: str) -> None:
    """Directory modes are not the only lock: without the password (or with a wrong one) the
    server refuses; the password lives in a 0600 passfile, directories and socket are 0700."""
    server = _session_server(pg_url)
    host = str(server.socket_dir)
    for url in (
        f"postgresql://postgres@/bqx?host={host}",
        f"postgresql://postgres:wrong@/bqx?host={host}",
    ):
        with pytest.raises(psycopg.OperationalError, match="password"):
            psycopg.connect(url, connect_timeout=5, passfile="/nonexistent").close()
    assert stat.S_IMODE(server.passfile.stat().st_mode) == 0o600
    for d in (server.root, server.datadir, server.socket_dir):
        assert stat.S_IMODE(d.stat().st_mode) == 0o700, d
    assert stat.S_IMODE((server.socket_dir / ".s.PGSQL.5432").stat().st_mode) == 0o700
    hba = (server.datadir / "pg_hba.conf").read_text()
    methods = {line.split()[-1] for line in hba.splitlines() if line and line[0] != "#"}
    assert methods == {"scram-sha-256"}
    assert "passfile=" in pg_url and server._read_secret() not in pg_url


@pytest.mark.db  # starts a server of its own
def test_home_with_apostrophe_is_quoted(own_server: EmbeddedServer) -> None:
    """A BQX_HOME with an apostrophe and a space starts a real server: the socket directory
    reaches postgresql.conf quoted, exactly."""
    assert "'" in str(own_server.socket_dir)
    with connect(own_server.url, autocommit=True) as conn:
        shown = conn.execute("SHOW unix_socket_directories").fetchone()
    assert shown == (f'"{own_server.socket_dir}"',)


def test_conf_string_cannot_be_escaped() -> None:
    """A crafted value can't end the string and add a setting: quotes are doubled, backslashes
    and control characters escaped (PostgreSQL's configuration string rules)."""
    assert conf_string("/a'b") == "'/a''b'"
    assert conf_string("x\\' port = 1") == "'x\\\\'' port = 1'"
    assert conf_string("a\nlisten_addresses = '*'") == "'a\\012listen_addresses = ''*'''"


@pytest.mark.db  # starts a server of its own
def test_old_trust_cluster_is_upgraded(own_server: EmbeddedServer) -> None:
    """A cluster from an older bqx (trust, no passfile, socket line unquoted in
    postgresql.conf, open socket directory) gets a password on the next start, keeps its data."""
    with connect(own_server.url, autocommit=True) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS keep_me (x int)")
        conn.execute("INSERT INTO keep_me VALUES (42)")
    hba = own_server.datadir / "pg_hba.conf"
    hba.write_text(hba.read_text().replace("scram-sha-256", "trust"))
    own_server.stop(mark=False)
    conf = own_server.datadir / "postgresql.conf"
    old_conf = conf.read_text().replace("include 'bqx.conf'", "")
    # what the old code wrote: unquoted, so this apostrophe broke the server
    conf.write_text(old_conf + f"unix_socket_directories = '{own_server.socket_dir}'\n")
    (own_server.datadir / "bqx.conf").unlink()
    own_server.passfile.unlink()
    os.chmod(own_server.socket_dir, 0o755)
    own_server.start()
    assert not any("trust" in line.split("#")[0].split() for line in hba.read_text().splitlines())
    assert stat.S_IMODE(own_server.socket_dir.stat().st_mode) == 0o700
    with pytest.raises(psycopg.OperationalError, match="password"):
        psycopg.connect(
            host=str(own_server.socket_dir), user="postgres", dbname="bqx", passfile="/nonexistent"
        ).close()
    with connect(own_server.url) as conn:
        assert conn.execute("SELECT x FROM keep_me").fetchall() == [(42,)]


@pytest.mark.db  # starts a server of its own
def test_lost_passfile_gets_a_new_password(own_server: EmbeddedServer) -> None:
    """A deleted passfile is not a lock-out: the next start sets a new password."""
    old = own_server._read_secret()
    own_server.passfile.unlink()
    own_server.start()
    new = own_server._read_secret()
    assert new != old
    with connect(own_server.url) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    with pytest.raises(psycopg.OperationalError, match="password"):
        psycopg.connect(own_server._url("bqx", old)).close()


@pytest.mark.db  # starts a server of its own
def test_long_home_gets_a_short_private_socket_dir() -> None:
    """A BQX_HOME too long for a Unix socket path (107 bytes), or with a comma, gets its socket
    in a private directory under /tmp, named from a hash of BQX_HOME, mode 0700."""
    # libpq reads host as a comma list: a comma alone also moves the socket
    assert EmbeddedServer(Path("/srv/a,b")).socket_dir.parent == Path("/tmp")
    with _outside_pytest_tmp() as tmp:
        server = EmbeddedServer(tmp / ("h" * 60) / ("o," * 30))
        assert len(str(server.root / "run" / ".s.PGSQL.5432")) > 107
        try:
            server.start()
            assert server.socket_dir.parent == Path("/tmp")
            assert server.socket_dir.name.startswith("bqx-")
            assert stat.S_IMODE(server.socket_dir.stat().st_mode) == 0o700
            with connect(server.url) as conn:
                assert conn.execute("SELECT 1").fetchone() == (1,)
        finally:
            server.destroy()
        assert not server.socket_dir.exists()


@pytest.mark.db  # starts a server of its own
@pytest.mark.skipif(not AS_ROOT, reason="making a directory of another user needs root")
def test_squatted_short_socket_dir_is_refused(tmp_path: Path) -> None:
    """Another user's directory at the /tmp socket path is refused, not used."""
    server = EmbeddedServer(tmp_path / ("s" * 120))
    squat = server.socket_dir
    squat.mkdir(mode=0o777)
    try:
        shutil.chown(squat, "nobody")
        with pytest.raises(BqxError, match="belongs to another user"):
            server.start()
        assert not (server.datadir / "PG_VERSION").exists()
    finally:
        squat.rmdir()


# -- bad homes: one line each -------------------------------------------------------------


def _bqx(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bqx.cli", *args], env=env, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PG", "BQX_"))}
    env.update(extra)
    return env


def test_file_as_home_gives_one_line(tmp_path: Path) -> None:
    home = tmp_path / "afile"
    home.write_text("not a directory")
    for args in (["generate", "--pairs", "EURUSD"], ["status"]):
        res = _bqx(args, _clean_env(BQX_HOME=str(home)))
        assert res.returncode == 1
        assert "Traceback" not in res.stderr
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and "is a file, not a directory" in lines[0], res.stderr
    assert home.read_text() == "not a directory"


@pytest.mark.db  # starts a server of its own
def test_shell_characters_in_home_are_refused(tmp_path: Path) -> None:
    """pg_ctl passes paths through /bin/sh: a home with $( ) is refused, nothing runs; a
    newline too (one line, the path shown escaped)."""
    canary = tmp_path / "ran"
    home = tmp_path / f"$(touch {canary})"
    res = _bqx(["db", "start"], _clean_env(BQX_HOME=str(home)))
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert "BQX_HOME" in res.stderr and "'$'" in res.stderr
    assert not canary.exists() and not home.exists()
    res = _bqx(["db", "start"], _clean_env(BQX_HOME=str(tmp_path / "a\nb")))
    assert res.returncode == 1 and len(res.stderr.strip().splitlines()) == 1
    assert "'\\n'" in res.stderr and not (tmp_path / "a\nb").exists()


@pytest.mark.db  # starts a server of its own
def test_home_made_under_umask_000_is_private() -> None:
    """BQX_HOME and the directories bqx makes for it are 0700 whatever the umask (as root the
    server's user may traverse them: o+x only); nothing under it is writable by others."""
    with _outside_pytest_tmp() as tmp:
        home = tmp / "made" / "by" / "bqx"
        env = _clean_env(BQX_HOME=str(home))
        try:
            for args in (["db", "start"], ["db", "stop"]):
                res = subprocess.run([sys.executable, "-m", "bqx.cli", *args], env=env,
                                     capture_output=True, text=True, timeout=120, umask=0)  # fmt: skip
                assert res.returncode == 0, res.stderr
            above = 0o701 if AS_ROOT else 0o700  # as root the server's user traverses them
            for d in (tmp / "made", tmp / "made" / "by", home):
                assert stat.S_IMODE(d.stat().st_mode) == above, d
            assert stat.S_IMODE((home / "pg").stat().st_mode) == 0o700
            shared = [
                str(p) for p in home.rglob("*")
                if not p.is_symlink() and p.stat().st_mode & (stat.S_IWGRP | stat.S_IWOTH)
            ]  # fmt: skip
            assert shared == []
        finally:
            EmbeddedServer(home).destroy()


# -- no password on screen ----------------------------------------------------------------

BAD_URLS = [
    pytest.param(f"x:{SECRET}@/bqx", "invalid database URL", id="no-scheme"),
    pytest.param(f"postgresql://u:{SECRET}@[::1/db", "invalid database URL", id="broken-ipv6"),
    pytest.param(f"postgresql://u:{SECRET}@127.0.0.1:1/db", "cannot connect", id="refused"),
]


@pytest.mark.parametrize(("url", "says"), BAD_URLS)
def test_password_never_printed_env(url: str, says: str, tmp_path: Path) -> None:
    """BQX_DATABASE_URL with a password: malformed, or naming a dead server. One line, exit 1,
    no traceback, the password nowhere."""
    res = _bqx(["backfill"], _clean_env(BQX_DATABASE_URL=url, BQX_HOME=str(tmp_path)))
    assert res.returncode == 1
    out = res.stdout + res.stderr
    assert SECRET not in out and "Traceback" not in out
    assert len(res.stderr.strip().splitlines()) == 1 and says in res.stderr, res.stderr


def test_password_never_printed_option(tmp_path: Path) -> None:
    """Through --database-url, in status and in db status (which checks reachability)."""
    env = _clean_env(BQX_HOME=str(tmp_path))
    for url in (f"postgresql://u:{SECRET}@[::1/db",):
        res = _bqx(["status", "--database-url", url], env)
        assert res.returncode == 1
        out = res.stdout + res.stderr
        assert SECRET not in out and "Traceback" not in out and "****" in out
    res = _bqx(["db", "status"], {**env, "BQX_DATABASE_URL": BAD_URLS[2].values[0]})
    assert res.returncode == 1 and SECRET not in res.stdout + res.stderr


def test_not_a_url_gives_one_line(tmp_path: Path) -> None:
    res = _bqx(["status", "--database-url", "not a url"], _clean_env(BQX_HOME=str(tmp_path)))
    assert res.returncode == 1 and "Traceback" not in res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: invalid database URL 'not a url'")


def test_db_url_masks_unless_asked(tmp_path: Path) -> None:
    url = f"postgresql://u:{SECRET}@db.example.com:5433/bqx?sslmode=require"
    env = _clean_env(BQX_DATABASE_URL=url, BQX_HOME=str(tmp_path))
    res = _bqx(["db", "url"], env)
    assert res.returncode == 0 and SECRET not in res.stdout
    assert res.stdout.strip() == "postgresql://u:****@db.example.com:5433/bqx?sslmode=require"
    res = _bqx(["db", "url", "--show-password"], env)
    assert res.stdout.strip() == url


def test_mask_functions_never_raise_and_never_leak() -> None:
    for url in (
        f"x:{SECRET}@/bqx",
        f"postgresql://u:{SECRET}@[::1/db",
        f"postgresql://u:{SECRET}@h/db?password={SECRET}",
        f"host=h password='{SECRET}' user=u",
        f"postgresql://u:{SECRET.replace('P', '%50')}@h/db",
    ):
        assert SECRET not in mask_url(url) and "%50" not in mask_url(url), url
        message = f'could not parse "{url}" near {SECRET}'
        assert SECRET not in mask_text(message, url)
    with pytest.raises(BqxError) as err:
        check_url(f"postgresql://u:{SECRET}@[::1/db")
    assert SECRET not in str(err.value)


def test_scram_verifier_is_accepted_by_the_server(conn: psycopg.Connection, pg_url: str) -> None:
    """The server stores the verifier bqx computes and then accepts the plain password."""
    role = "t_scram_probe"
    conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))
    conn.execute(
        sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
            sql.Identifier(role), sql.Literal(scram_verifier("pw-for-test"))
        )
    )
    try:
        host = conninfo_to_dict(pg_url).get("host")
        if not host or not str(host).startswith("/"):
            pytest.skip("needs the embedded server's socket")
        url = f"postgresql://{role}:pw-for-test@/postgres?host={host}"
        with psycopg.connect(url) as c:
            assert c.execute("SELECT current_user").fetchone() == (role,)
    finally:
        conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


def _system_python() -> str | None:
    """A Python outside /root that runs this interpreter's packages (same minor version)."""
    exe = f"/usr/bin/python{sys.version_info.major}.{sys.version_info.minor}"
    return exe if Path(exe).exists() else None


@pytest.mark.skipif(
    not AS_ROOT or _system_python() is None, reason="needs root and /usr/bin/python"
)
@pytest.mark.db  # starts a server of its own
def test_works_unchanged_as_an_ordinary_user() -> None:
    """Run as uid `nobody`, the same code creates, starts, stops and restarts a private server
    of its own (no bqx_postgres, no chown), and connects with the generated password."""
    import site

    import bqx

    paths = [str(Path(bqx.__file__).parent.parent), *site.getsitepackages()]
    if any(not os.access(p, os.R_OK) or p.startswith("/root") for p in paths):
        pytest.skip("this interpreter's packages are out of other users' reach")
    home = Path(tempfile.mkdtemp(prefix="bqx-user-", dir="/tmp"))
    shutil.chown(home, "nobody", "nogroup")
    script = (
        "import sys, stat; sys.path[:0] = sys.argv[2:]\n"
        "from pathlib import Path\n"
        "from bqx.db import EmbeddedServer, connect\n"
        "s = EmbeddedServer(Path(sys.argv[1]) / 'bqx')\n"
        "with connect(s.start()) as c: print(c.execute('SELECT current_user').fetchone()[0])\n"
        "s.stop()\n"
        "with connect(s.start()) as c: print(c.execute('SELECT 1').fetchone()[0])\n"
        "print(oct(stat.S_IMODE(s.passfile.stat().st_mode)), s.passfile.stat().st_uid)\n"
        "s.destroy()\n"
    )
    try:
        res = subprocess.run(
            [str(_system_python()), "-c", script, str(home), *paths],
            user="nobody", group="nogroup", extra_groups=[], capture_output=True, text=True,
            timeout=300, cwd="/tmp",
            env={"PATH": "/usr/bin:/bin", "HOME": str(home), "NUMBA_CACHE_DIR": str(home)},
        )  # fmt: skip
        assert res.returncode == 0, res.stderr[-2000:]
        import pwd

        nobody = pwd.getpwnam("nobody").pw_uid
        assert res.stdout.split() == ["postgres", "1", "0o600", str(nobody)]
    finally:
        shutil.rmtree(home, ignore_errors=True)
