"""Where the database's credentials come from: a reference that travels, resolved where used.

A :class:`DatabaseRef` names the database the way the user did (docs/configuration.md): a URL,
a file holding one (``BQX_DATABASE_URL_FILE``), an AWS Secrets Manager secret
(``BQX_DATABASE_SECRET``) or libpq's own variables, optionally with RDS IAM authentication
(``BQX_DATABASE_IAM``). The driver hands the reference, never what it resolves to, to its
worker threads, processes and Dask tasks; each resolves it when it opens a connection:

- a file is read again for every connection, so a rotated mounted secret is picked up;
- a secret is fetched once per process, and again when the server refuses its password (a
  rotation), as AWS's own caching client does;
- an IAM token is signed for every connection: tokens live 15 minutes, a run may last hours.

Only a URL given as such travels as itself (masked wherever it is shown).
"""

from __future__ import annotations

import json
import os
import stat
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from psycopg.conninfo import make_conninfo

from bqx.core.text import first_line
from bqx.db.urls import check_url, mask_url
from bqx.errors import BqxError

SECRET_FEATURE = "a database secret (BQX_DATABASE_SECRET)"
IAM_FEATURE = "RDS IAM authentication (BQX_DATABASE_IAM)"
IAM_TOKEN_LIFETIME_S = 900  # what RDS grants a token: why each connection signs its own
DEFAULT_PORT = 5432
SOURCES = ("url", "file", "secret", "libpq")
# the keys of the JSON that RDS (and its rotation functions) write into a secret
RDS_KEYS = {"username": "user", "password": "password", "host": "host", "port": "port",
            "dbname": "dbname"}  # fmt: skip


@dataclass(frozen=True)
class DatabaseRef:
    """Which database, and where its credentials are: never a password it can fetch itself.

    ``source`` is ``url`` (``where`` is the URL, or conninfo), ``file`` (``where`` is the
    file's path), ``secret`` (its name or ARN) or ``libpq`` (libpq reads ``PG*`` itself).
    """

    source: str
    where: str = ""
    iam: bool = False

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ValueError(f"unknown credential source {self.source!r}")

    @classmethod
    def of(cls, url: str) -> DatabaseRef:
        """A URL or conninfo; the empty string is libpq's ``PG*`` variables."""
        return cls("url", url) if url else cls("libpq")

    def __repr__(self) -> str:  # task arguments end up in logs: never the password
        return f"<database {self.shown()}>"

    __str__ = __repr__

    def shown(self) -> str:
        """The reference for a person: a URL masked, a file's path, a secret's name."""
        base = {
            "url": lambda: mask_url(self.where),
            "file": lambda: f"the URL in {self.where}",
            "secret": lambda: f"AWS Secrets Manager secret {self.where!r}",
            "libpq": lambda: "the server named by PG* variables",
        }[self.source]()
        return base + (" with RDS IAM tokens" if self.iam else "")

    @property
    def refetches(self) -> bool:
        """Whether a refused password is worth resolving again (a secret may have rotated)."""
        return self.source == "secret"

    def base_conninfo(self, *, fresh: bool = False) -> str:
        """The URL or conninfo named, before any IAM token; ``fresh`` fetches a secret again."""
        if self.source == "url":
            return self.where
        if self.source == "file":
            return read_url_file(Path(self.where))
        if self.source == "secret":
            return secret_conninfo(self.where, fresh=fresh, iam=self.iam)
        return ""

    def conninfo(self, *, fresh: bool = False) -> str:
        """The conninfo of one new connection, resolved now: a file read, a secret fetched
        (once per process unless ``fresh``), an IAM token signed."""
        info = self.base_conninfo(fresh=fresh)
        return with_iam_token(info, self.shown()) if self.iam else info

    def params(self) -> dict[str, str]:
        """The connection parameters named (host, port, …), without a password or token."""
        params = check_url(self.base_conninfo())
        params.pop("password", None)
        return params


# -- a URL in a file ------------------------------------------------------------------------


def read_url_file(path: Path) -> str:
    """The URL a file holds; refused, as libpq refuses such a ``.pgpass``, when anyone but its
    owner may read it."""
    try:
        st = path.stat()  # follows the symlinks that Kubernetes mounts secrets through
        if not stat.S_ISREG(st.st_mode):
            raise BqxError(f"the database URL file {path} is not a regular file")
        mode = stat.S_IMODE(st.st_mode)
        if mode & 0o077:
            raise BqxError(
                f"the database URL file {path} can be read by others than its owner (mode"
                f" {mode:04o}): run `chmod 600 {path}` (bqx, like libpq with .pgpass, reads"
                " credentials only from a file its owner alone can read)"
            )
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise BqxError(f"cannot read the database URL file {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise BqxError(f"the database URL file {path} is not UTF-8 text") from None
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if len(lines) != 1:
        what = "is empty" if not lines else f"holds {len(lines)} lines"
        raise BqxError(f"the database URL file {path} {what}: it should hold one URL")
    try:
        check_url(lines[0])
    except BqxError as exc:
        raise BqxError(f"the database URL file {path} holds an {exc}") from None
    return lines[0]


# -- AWS: Secrets Manager and RDS IAM tokens --------------------------------------------------

_lock = threading.RLock()
_clients: dict[tuple[str, str | None], Any] = {}
_secrets: dict[str, str] = {}  # secret id -> conninfo, for this process


def _aws_errors(feature: str) -> Any:
    from bqx.extras import require

    return require("aws", "botocore.exceptions", feature)


def _client(service: str, feature: str, region: str | None = None) -> Any:
    """A boto3 client, one per process and region: region, credentials and endpoint come from
    the standard AWS configuration (``AWS_REGION``, profiles, ``AWS_ENDPOINT_URL_*``)."""
    from bqx.extras import require

    with _lock:
        if (service, region) not in _clients:
            boto3 = require("aws", "boto3", feature)
            config = require("aws", "botocore.config", feature)
            errors = _aws_errors(feature)
            try:  # boto3's default session is not thread-safe: a session of our own, locked
                _clients[service, region] = boto3.session.Session().client(
                    service, region_name=region,
                    config=config.Config(connect_timeout=5, read_timeout=10),
                )  # fmt: skip
            except errors.NoRegionError:
                raise BqxError(
                    f"{feature} needs an AWS region: set AWS_REGION or AWS_DEFAULT_REGION, or"
                    " a region in the AWS profile"
                ) from None
            except errors.BotoCoreError as exc:
                raise BqxError(f"{feature}: {first_line(exc)}") from None
        return _clients[service, region]


def _arn_region(secret_id: str) -> str | None:
    """The region an ARN names (``arn:aws:secretsmanager:REGION:…``): where its secret is."""
    parts = secret_id.split(":")
    return (parts[3] or None) if len(parts) > 6 and parts[0] == "arn" else None


def fetch_secret(secret_id: str) -> str:
    """The secret's text, fetched now. Errors name the secret, never its value."""
    client = _client("secretsmanager", SECRET_FEATURE, _arn_region(secret_id))
    errors = _aws_errors(SECRET_FEATURE)
    where = f"AWS Secrets Manager secret {secret_id!r}"
    try:
        response = client.get_secret_value(SecretId=secret_id)
    except errors.ClientError as exc:
        error = exc.response.get("Error", {})
        code, message = error.get("Code", ""), first_line(error.get("Message", "") or "")
        if code == "ResourceNotFoundException":
            region = client.meta.region_name
            raise BqxError(f"{where} does not exist (region {region})") from None
        raise BqxError(f"{where}: {code}: {message}".rstrip(": ")) from None
    except errors.NoCredentialsError:
        raise BqxError(
            f"{where}: no AWS credentials (set AWS_PROFILE or AWS_ACCESS_KEY_ID, or run where"
            " an IAM role provides them)"
        ) from None
    except errors.EndpointConnectionError as exc:
        endpoint = exc.kwargs.get("endpoint_url", "its endpoint")
        raise BqxError(f"{where}: cannot reach AWS Secrets Manager at {endpoint}") from None
    except errors.BotoCoreError as exc:
        raise BqxError(f"{where}: {first_line(exc)}") from None
    text = response.get("SecretString")
    if text is None:
        raise BqxError(f"{where} holds binary data: store the RDS JSON or a URL as its string")
    return str(text)


def parse_secret(secret_id: str, text: str) -> str:
    """The conninfo of a secret's text: the JSON that RDS writes (``username``, ``password``,
    ``host``, ``port``, ``dbname``; keys it lacks are left to libpq's ``PG*`` variables) or a
    ``postgresql://`` URL. Nothing of the text is ever quoted in an error."""
    where = f"AWS Secrets Manager secret {secret_id!r}"
    shapes = "the RDS JSON (username, password, host, port, dbname) or a postgresql:// URL"
    text = text.strip()
    if text.startswith("{"):
        try:
            doc = json.loads(text)
        except ValueError:
            raise BqxError(f"{where} is not valid JSON: it should hold {shapes}") from None
        if not isinstance(doc, dict):
            raise BqxError(f"{where} holds neither {shapes}")
        params = {key: str(doc[k]) for k, key in RDS_KEYS.items() if doc.get(k) not in (None, "")}
        return make_conninfo("", **params)
    if not text.startswith(("postgresql://", "postgres://")):
        raise BqxError(f"{where} holds neither {shapes}")
    try:
        check_url(text)
    except BqxError:
        raise BqxError(
            f"{where} holds a URL that libpq cannot read: it should hold {shapes}"
        ) from None
    return text


def secret_conninfo(secret_id: str, *, fresh: bool = False, iam: bool = False) -> str:
    """The secret's conninfo: fetched on first use in this process, or again when ``fresh``.

    Without IAM it must hold a password; with IAM it must not (the token is the password).
    """
    with _lock:
        if fresh or secret_id not in _secrets:
            info = parse_secret(secret_id, fetch_secret(secret_id))
            has_password = bool(check_url(info).get("password"))
            if not iam and not has_password:
                raise BqxError(
                    f"AWS Secrets Manager secret {secret_id!r} holds no password (give it one,"
                    " or set BQX_DATABASE_IAM=1 to sign in with RDS IAM tokens)"
                )
            _secrets[secret_id] = info
        return _secrets[secret_id]


def with_iam_token(conninfo: str, shown: str) -> str:
    """``conninfo`` with a fresh RDS IAM token as its password, and ``sslmode=require``
    unless the user chose one (RDS accepts tokens over TLS only)."""
    params = check_url(conninfo)
    if params.get("password"):
        raise BqxError(
            f"{shown} holds a password, but RDS IAM authentication signs in with a token:"
            " remove the password, or unset BQX_DATABASE_IAM"
        )
    missing = [k for k in ("host", "user", "dbname") if not params.get(k)]
    if missing:
        raise BqxError(
            f"{shown} names no {', '.join(missing)}: RDS IAM authentication needs the host,"
            " port, user and database"
        )
    host, user = params["host"], params["user"]
    if host.startswith("/") or "," in host:
        raise BqxError(f"{shown}: RDS IAM authentication needs one TCP host, not {host!r}")
    port = int(params.get("port") or DEFAULT_PORT)
    client = _client("rds", IAM_FEATURE)
    errors = _aws_errors(IAM_FEATURE)
    try:
        token = client.generate_db_auth_token(DBHostname=host, Port=port, DBUsername=user)
    except errors.NoCredentialsError:
        raise BqxError(
            f"cannot sign an RDS IAM token for {user}@{host}:{port}: no AWS credentials (set"
            " AWS_PROFILE or AWS_ACCESS_KEY_ID, or run where an IAM role provides them)"
        ) from None
    except errors.BotoCoreError as exc:
        raise BqxError(
            f"cannot sign an RDS IAM token for {user}@{host}:{port}: {first_line(exc)}"
        ) from None
    sslmode = params.get("sslmode") or os.environ.get("PGSSLMODE") or "require"
    return make_conninfo(conninfo, password=token, sslmode=sslmode)


def refused_password(exc: BaseException) -> bool:
    """Whether a failed connection was refused for its password (or token)."""
    if getattr(exc, "sqlstate", None) == "28P01":  # invalid_password
        return True
    text = str(exc)
    return "password authentication failed" in text or "PAM authentication failed" in text


def forget_secrets() -> None:
    """Drop what this process fetched (the next connection fetches again)."""
    with _lock:
        _secrets.clear()
