"""Where a lake lives: a local path or ``s3://bucket/prefix``, and how to reach it.

S3 settings are the standard AWS variables (``AWS_ENDPOINT_URL`` or ``AWS_ENDPOINT_URL_S3``,
``AWS_REGION``, keys or a profile), read by delta-rs and pyarrow themselves: a URI never
carries a credential, and none is copied into the options bqx builds, so nothing bqx prints or
records can hold one. Used by the Delta destination (``--sink``) and the Parquet source
(``--source``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from bqx.errors import InvalidOption

SCHEMES = ("s3", "s3a", "file")


def endpoint() -> str | None:
    """The S3 endpoint the AWS variables name (None: AWS itself)."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def region() -> str | None:
    return os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or None


@dataclass(frozen=True)
class LakeURI:
    """A parsed lake location: ``s3://bucket/prefix`` or an absolute local path."""

    uri: str  # as delta-rs takes it: s3://bucket/prefix, or an absolute path
    bucket: str | None = None  # S3 only
    key: str = ""  # S3: the prefix inside the bucket; local: the absolute path

    @classmethod
    def parse(cls, text: str | Path, param: str = "sink") -> LakeURI:
        """``s3://bucket/prefix`` (``s3a://`` too) or a local path (``file://`` or plain,
        made absolute). Refused: another scheme, a URI with a user or password in it (the AWS
        variables hold credentials), an S3 URI without a bucket."""
        raw = str(text).strip()
        if not raw:
            raise InvalidOption(param, text, "give a local path or s3://bucket/prefix")
        parts = urlsplit(raw)
        scheme = parts.scheme.lower()
        if len(scheme) == 1 or not scheme:  # a plain path (a Windows drive letter too)
            return cls(str(Path(raw).expanduser().resolve()), None, str(Path(raw).resolve()))
        if scheme not in SCHEMES:
            raise InvalidOption(
                param, raw, f"unknown scheme {scheme}://: give a local path or s3://bucket/prefix"
            )
        if parts.username or parts.password:
            raise InvalidOption(
                param, f"{scheme}://****@{parts.hostname or ''}{parts.path}",
                "holds a credential: put keys in the AWS variables (AWS_ACCESS_KEY_ID, …) or"
                " a profile, never in the URI",
            )  # fmt: skip
        if scheme == "file":
            path = str(Path(parts.path).resolve())
            return cls(path, None, path)
        if not parts.netloc:
            raise InvalidOption(param, raw, "names no bucket: s3://bucket/prefix")
        key = parts.path.strip("/")
        return cls(f"s3://{parts.netloc}/{key}".rstrip("/"), parts.netloc, key)

    @property
    def is_s3(self) -> bool:
        return self.bucket is not None

    def __str__(self) -> str:
        return self.uri

    def join(self, *names: str) -> LakeURI:
        """A location inside this one."""
        tail = "/".join(n.strip("/") for n in names if n)
        if self.is_s3:
            key = f"{self.key}/{tail}".strip("/")
            return LakeURI(f"s3://{self.bucket}/{key}", self.bucket, key)
        path = str(Path(self.key, tail))
        return LakeURI(path, None, path)

    # -- how delta-rs and pyarrow reach it ----------------------------------------------

    def storage_options(self) -> dict[str, str]:
        """Options for delta-rs beyond what it reads from the environment itself: plain HTTP
        when the endpoint is ``http://`` (a local MinIO or test server), and conditional PUTs
        for the commit log (``If-None-Match``: two writers can never both create the same log
        entry, so concurrent commits need no lock service) unless the user chose a locking
        provider (``AWS_S3_LOCKING_PROVIDER=dynamodb``)."""
        if not self.is_s3:
            return {}
        opts: dict[str, str] = {}
        url = endpoint()
        if url and url.lower().startswith("http://"):
            opts["AWS_ALLOW_HTTP"] = "true"
        if region() and not os.environ.get("AWS_REGION"):
            opts["AWS_REGION"] = region() or ""
        if not os.environ.get("AWS_S3_LOCKING_PROVIDER"):
            opts["aws_conditional_put"] = "etag"
        return opts

    def filesystem(self) -> tuple[Any, str]:
        """(pyarrow filesystem, path inside it) of this location."""
        import pyarrow.fs as pafs

        if not self.is_s3:
            return pafs.LocalFileSystem(), self.key
        kw: dict[str, Any] = {}
        url = endpoint()
        if url:
            split = urlsplit(url)
            kw["endpoint_override"] = split.netloc or url
            kw["scheme"] = split.scheme or "https"
        if region():
            kw["region"] = region()
        return pafs.S3FileSystem(**kw), f"{self.bucket}/{self.key}".rstrip("/")
