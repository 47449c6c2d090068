"""Quoted SQL identifiers of everything bqx touches: the one place that builds SQL names.

Every name goes through psycopg's ``sql.Identifier``; the parts come from a validated
``Layout`` and validated symbols, and are never formatted into SQL text.
"""

from __future__ import annotations

from psycopg import sql

from bqx.core.layout import TARGET_RATE, TARGET_TIME, Layout
from bqx.core.months import Month


def source(layout: Layout, pair: str) -> sql.Identifier:
    """A pair's source bar table."""
    return sql.Identifier(*layout.source_name(pair))


def source_partition(layout: Layout, pair: str, month: Month) -> sql.Identifier:
    return sql.Identifier(*layout.source_partition_name(pair, month))


def target(layout: Layout, pair: str) -> sql.Identifier:
    """A pair's metrics table."""
    return sql.Identifier(layout.schema, layout.target_name(pair))


def target_partition(layout: Layout, pair: str, month: Month) -> sql.Identifier:
    return sql.Identifier(layout.schema, layout.target_partition_name(pair, month))


def table(layout: Layout, name: str) -> sql.Identifier:
    """A bqx-owned table (ledger, versions) in the schema."""
    return sql.Identifier(layout.schema, name)


def in_schema(schema: str, name: str) -> sql.Identifier:
    return sql.Identifier(schema, name)


def time(layout: Layout) -> sql.Identifier:
    """The source's time column."""
    return sql.Identifier(layout.time_column)


def price(layout: Layout) -> sql.Identifier:
    """The source's price column."""
    return sql.Identifier(layout.price_column)


def column(name: str) -> sql.Identifier:
    """A column, by its (validated) name."""
    return sql.Identifier(name)


def bare(name: str) -> sql.Identifier:
    """An unqualified object of bqx's own making: a schema, a trigger, an index, a temp table."""
    return sql.Identifier(name)


def columns(names: list[str] | tuple[str, ...]) -> sql.Composed:
    """``"a", "b", …``: a comma list of quoted columns."""
    return sql.SQL(", ").join(map(sql.Identifier, names))


TS = sql.Identifier(TARGET_TIME)
RATE = sql.Identifier(TARGET_RATE)


def as_text(ident: sql.Composable) -> str:
    """An identifier as SQL text, for functions such as ``to_regclass`` that take a name."""
    return ident.as_string(None)
