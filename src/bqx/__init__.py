"""bqx: backward-looking BQX metrics for forex minute bars, backfilled into PostgreSQL."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = ["read_metrics"]

if TYPE_CHECKING:
    from bqx.export import read_metrics


def __getattr__(name: str) -> Any:
    # lazy, so `import bqx` stays light for the CLI and workers
    if name == "read_metrics":
        from bqx.export import read_metrics

        return read_metrics
    raise AttributeError(f"module 'bqx' has no attribute {name!r}")
