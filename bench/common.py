"""What the benchmarks share: a store for a settings object and a layout."""

from __future__ import annotations

from bqx.api import Store
from bqx.config import Settings
from bqx.core.layout import Layout


def store_for(settings: Settings, layout: Layout | None = None) -> Store:
    """The ``bqx.Store`` of ``settings``, in another layout's schema and source if given."""
    if layout is None:
        return Store(settings)
    return Store(settings, schema=layout.schema, source_table=layout.source_table,
                 time_column=layout.time_column, price_column=layout.price_column)  # fmt: skip
