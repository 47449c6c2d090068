"""Where the tables are: schema, source table pattern, and the names of every table bqx uses.

Plain names only (strings); ``bqx.store.names`` turns them into quoted SQL identifiers. User
input (schema names, table patterns, column names) is validated here, before it is used.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from bqx.core.months import Month
from bqx.core.symbols import display, validate_pair
from bqx.errors import BqxError, InvalidOption
from bqx.metrics import DEFAULT_WINDOWS, metric_columns

_IDENT_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")
NAME_BYTES = 63  # PostgreSQL truncates longer identifiers (NAMEDATALEN - 1)
PARTITION_SUFFIX = len("_2024m07")

# The target table's own columns: the bar's time, its price, when the row was written.
TARGET_TIME = "ts_utc"
TARGET_RATE = "rate"
TARGET_CORE_COLUMNS: tuple[str, ...] = (TARGET_TIME, TARGET_RATE, "created_at")
# Source bars as bqx creates them; a user's own table needs only a time and a price column.
SOURCE_COLUMNS: tuple[str, ...] = ("time", "open", "high", "low", "close", "volume")
DEFAULT_SOURCE_TABLE = "m1_{pair}"


def validate_identifier(name: str, what: str) -> str:
    """Accept a plain SQL identifier (schema, column) so messages and catalog look-ups agree."""
    if not isinstance(name, str) or not _IDENT_RE.fullmatch(name):
        raise InvalidOption(what, name, "use letters, digits and _ (at most 63)")
    return name


def is_system_schema(name: str) -> bool:
    """PostgreSQL's own schemas: ``pg_dump`` leaves them out of every backup."""
    return name.lower() == "information_schema" or name.lower().startswith("pg_")


_SYSTEM_SCHEMA = "a PostgreSQL system schema, which pg_dump leaves out of every backup"


def target_columns(windows: Sequence[int] = DEFAULT_WINDOWS) -> list[str]:
    """All target columns in table order: 3 core + 6 per window + 7 aggregates."""
    return [*TARGET_CORE_COLUMNS, *metric_columns(windows)]


@dataclass(frozen=True)
class Layout:
    """Schema, source table pattern and the source's time/price columns.

    ``source_table`` is a pattern with ``{pair}``, optionally schema-qualified
    (``bqx.m1_{pair}``); unqualified names live in ``schema``.
    """

    schema: str = "bqx"
    source_table: str = DEFAULT_SOURCE_TABLE
    time_column: str = "time"
    price_column: str = "close"

    def __post_init__(self) -> None:
        validate_identifier(self.schema, "schema")
        if is_system_schema(self.schema):  # bars, metrics and ledger would miss every backup
            raise InvalidOption("schema", self.schema, f"{_SYSTEM_SCHEMA}: choose another")
        validate_identifier(self.time_column, "time_column")
        validate_identifier(self.price_column, "price_column")
        parts = self.source_table.split(".")
        if len(parts) > 2 or "{pair}" not in parts[-1]:
            raise InvalidOption(
                "source_table", self.source_table,
                "expected a pattern such as 'bqx.m1_{pair}' with {pair} in the table name",
            )  # fmt: skip
        for part in parts:
            try:
                validate_identifier(part.replace("{pair}", "xxxxxx"), "source_table")
            except BqxError:
                raise InvalidOption(
                    "source_table", self.source_table, "use letters, digits and _ around {pair}"
                ) from None
        if len(parts) == 2 and is_system_schema(parts[0]):  # ingest and generate write there
            raise InvalidOption(
                "source_table", self.source_table, f"{parts[0]} is {_SYSTEM_SCHEMA}"
            )

    def source_name(self, pair: str) -> tuple[str, str]:
        """(schema, table) of a pair's source bars; refused when its partitions' names would
        be longer than PostgreSQL keeps (a long symbol in a long pattern)."""
        parts = self.source_table.split(".")
        schema = parts[0] if len(parts) == 2 else self.schema
        table = parts[-1].replace("{pair}", validate_pair(pair))
        if len(table.encode()) + PARTITION_SUFFIX > NAME_BYTES:
            raise BqxError(
                f"symbol {display(pair.strip())} is too long for the source table pattern"
                f" {self.source_table!r}: its partitions ({table}_2024m07) would pass"
                f" PostgreSQL's {NAME_BYTES}-byte names; use a shorter pattern"
            )
        return schema, table

    def source_schema(self) -> str:
        return self.source_name("xxxxxx")[0]

    def source_affixes(self) -> tuple[str, str]:
        """The text before and after ``{pair}`` in the source table's name."""
        prefix, suffix = self.source_table.split(".")[-1].split("{pair}")
        return prefix, suffix

    def source_partition_name(self, pair: str, month: Month) -> tuple[str, str]:
        schema, table = self.source_name(pair)
        return schema, f"{table}_{month.suffix}"

    def target_name(self, pair: str) -> str:
        return f"bqx_{validate_pair(pair)}"

    def target_partition_name(self, pair: str, month: Month) -> str:
        return f"{self.target_name(pair)}_{month.suffix}"

    def with_source(
        self, source_table: str | None, time_column: str | None, price_column: str | None
    ) -> Layout:
        """This layout with another source table or columns (None keeps this one's)."""
        return Layout(
            self.schema, source_table or self.source_table, time_column or self.time_column,
            price_column or self.price_column,
        )  # fmt: skip
