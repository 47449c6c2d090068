"""Database URLs: masking passwords in anything shown, checking, and bqx's session options.

No password is ever printed or stored: every URL or message shown to a person goes through
``mask_url`` or ``mask_text`` first.
"""

from __future__ import annotations

import os
import re
from urllib.parse import quote, unquote, urlsplit, urlunsplit

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from bqx.core.text import first_line
from bqx.errors import BqxError

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
    try:  # a key=value value runs to the next space: an RDS IAM token holds '&' and '?'
        whole = conninfo_to_dict(url).get("password")
    except Exception:  # malformed: the patterns above are all there is
        whole = None
    if whole:
        found.append(str(whole))
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


def check_url(url: str) -> dict[str, str]:
    """The parameters of a URL or key=value conninfo; a BqxError (password masked) if invalid."""
    try:
        return {k: str(v) for k, v in conninfo_to_dict(url).items() if v is not None}
    except psycopg.Error as exc:
        raise BqxError(
            f"invalid database URL {mask_url(url)!r}: {mask_text(first_line(exc), url)}"
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
