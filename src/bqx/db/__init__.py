"""Talking to PostgreSQL: URLs (masked), the embedded server, connections and binary COPY.

- ``urls``: masking passwords, checking URLs, bqx's session options;
- ``embedded``: the private server bqx runs when no database is configured;
- ``connect``: which database, connections, pools, what errors a retry can fix;
- ``copy``: the one way rows move between the server and numpy (binary COPY).
"""

from bqx.db.connect import (
    connect,
    current_user,
    describe_target,
    embedded,
    is_transient,
    pool,
    resolve_url,
    server_version,
    worker_id,
)
from bqx.db.embedded import EmbeddedServer
from bqx.db.urls import mask_text, mask_url

__all__ = [
    "EmbeddedServer", "connect", "current_user", "describe_target", "embedded",
    "is_transient", "mask_text", "mask_url", "pool", "resolve_url", "server_version",
    "worker_id",
]  # fmt: skip
