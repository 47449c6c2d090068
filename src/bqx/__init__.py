"""bqx: backward-looking BQX metrics for forex minute bars, backfilled into PostgreSQL.

>>> import bqx
>>> store = bqx.Store()                       # the embedded server, or BQX_DATABASE_URL
>>> store.backfill(workers=2)                 # doctest: +SKIP
>>> bqx.read_metrics("EURUSD", "2024-07")     # doctest: +SKIP
>>> bqx.compute(times, prices)                # doctest: +SKIP

Everything is imported on first use, so ``import bqx`` stays light for the CLI and workers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = ["BqxError", "Settings", "Store", "compute", "read_metrics", "__version__"]

if TYPE_CHECKING:
    import pyarrow as pa

    from bqx.api import Store
    from bqx.config import Settings
    from bqx.errors import BqxError
    from bqx.metrics import compute

_LAZY = {
    "Store": "bqx.api",
    "Settings": "bqx.config",
    "BqxError": "bqx.errors",
    "compute": "bqx.metrics",
}


def read_metrics(
    pair: str, start: Any = None, end: Any = None, columns: Any = None, **store: Any
) -> pa.Table:
    """``Store(**store).read_metrics(pair, start, end, columns)``: a pair's stored metrics as a
    ``pyarrow.Table`` (settings from the environment unless given, e.g. ``schema="bqx"``)."""
    from bqx.api import Store

    return Store(**store).read_metrics(pair, start, end, columns)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'bqx' has no attribute {name!r}")
