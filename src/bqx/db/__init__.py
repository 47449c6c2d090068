"""Talking to PostgreSQL: URLs (masked), the embedded server, connections and binary COPY.

- ``urls``: masking passwords, checking URLs, bqx's session options;
- ``embedded``: the private server bqx runs when no database is configured;
- ``credentials``: where credentials come from (a URL, a file, an AWS secret, IAM tokens), as
  a reference that workers resolve themselves;
- ``connect``: which database, connections, pools, what errors a retry can fix;
- ``copy``: the one way rows move between the server and numpy (binary COPY).
"""

from bqx.db.connect import (
    DatabaseLike,
    connect,
    current_user,
    database_ref,
    describe_target,
    embedded,
    is_transient,
    pool,
    resolve_url,
    server_version,
    worker_id,
)
from bqx.db.credentials import DatabaseRef
from bqx.db.embedded import EmbeddedServer
from bqx.db.urls import mask_text, mask_url

__all__ = [
    "DatabaseLike", "DatabaseRef", "EmbeddedServer", "connect", "current_user", "database_ref",
    "describe_target", "embedded",
    "is_transient", "mask_text", "mask_url", "pool", "resolve_url", "server_version",
    "worker_id",
]  # fmt: skip
