"""Names, columns and DDL: the one place that turns pairs and months into SQL identifiers.

Every identifier goes through psycopg's ``sql.Identifier`` quoting; user input (pair names,
schema names, table patterns, column names) is validated first and never formatted into SQL.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime

import psycopg
from psycopg import sql

from bqx.errors import BqxError
from bqx.metrics import DEFAULT_WINDOWS, metric_columns, normalize_windows

# The 28 crosses of the report: every pair of AUD CAD CHF EUR GBP JPY NZD USD in market order.
REPORT_PAIRS: tuple[str, ...] = (
    "audcad", "audchf", "audjpy", "audnzd", "audusd", "cadchf", "cadjpy", "chfjpy",
    "euraud", "eurcad", "eurchf", "eurgbp", "eurjpy", "eurnzd", "eurusd", "gbpaud",
    "gbpcad", "gbpchf", "gbpjpy", "gbpnzd", "gbpusd", "nzdcad", "nzdchf", "nzdjpy",
    "nzdusd", "usdcad", "usdchf", "usdjpy",
)  # fmt: skip

_PAIR_RE = re.compile(r"[A-Za-z]{6}")
_IDENT_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")

TARGET_CORE_COLUMNS: tuple[str, ...] = ("ts_utc", "rate", "created_at")
SOURCE_COLUMNS: tuple[str, ...] = ("time", "open", "high", "low", "close", "volume")


def validate_pair(pair: str) -> str:
    """Return the pair lowercased, or refuse anything that is not six ASCII letters."""
    if not isinstance(pair, str) or not _PAIR_RE.fullmatch(pair.strip()):
        raise BqxError(f"invalid pair name {pair!r}: a pair is six ASCII letters, e.g. EURUSD")
    return pair.strip().lower()


def parse_pairs(text: str | Sequence[str] | None) -> list[str] | None:
    """Parse ``--pairs EURUSD,GBPUSD`` (or a list) into validated lowercase names, order kept."""
    if text is None:
        return None
    items = text.split(",") if isinstance(text, str) else list(text)
    pairs = [validate_pair(p) for p in items if p.strip()]
    if not pairs:
        raise BqxError("--pairs is empty: give at least one pair, e.g. EURUSD")
    return list(dict.fromkeys(pairs))


def validate_identifier(name: str, what: str) -> str:
    """Accept a plain SQL identifier (schema, column) so messages and catalog look-ups agree."""
    if not isinstance(name, str) or not _IDENT_RE.fullmatch(name):
        raise BqxError(f"invalid {what} {name!r}: use letters, digits and _ (at most 63)")
    return name


@dataclass(frozen=True, order=True)
class Month:
    """A calendar month in UTC; partitions and jobs are keyed by it."""

    year: int
    month: int

    def __post_init__(self) -> None:
        if not (1 <= self.month <= 12) or not (1900 <= self.year <= 2999):
            raise BqxError(f"invalid month {self.year}-{self.month:02d}")

    @classmethod
    def parse(cls, text: str) -> Month:
        """``2024-07`` (also ``2024m07`` and ``2024-07-01``)."""
        m = re.fullmatch(r"\s*(\d{4})[-m](\d{1,2})(?:-\d{1,2})?\s*", str(text))
        if not m:
            raise BqxError(f"invalid month {text!r}: expected YYYY-MM, e.g. 2024-07")
        return cls(int(m.group(1)), int(m.group(2)))

    @classmethod
    def of(cls, value: date | datetime) -> Month:
        if isinstance(value, datetime) and value.tzinfo is not None:
            value = value.astimezone(UTC)
        return cls(value.year, value.month)

    @property
    def start(self) -> datetime:
        return datetime(self.year, self.month, 1, tzinfo=UTC)

    @property
    def end(self) -> datetime:
        """Exclusive end: the first instant of the next month."""
        return self.next().start

    @property
    def first_day(self) -> date:
        return date(self.year, self.month, 1)

    @property
    def suffix(self) -> str:
        return f"{self.year:04d}m{self.month:02d}"

    def next(self) -> Month:
        return Month(self.year + self.month // 12, self.month % 12 + 1)

    def prev(self) -> Month:
        return Month(self.year - (self.month == 1), (self.month - 2) % 12 + 1)

    def __str__(self) -> str:
        return f"{self.year:04d}-{self.month:02d}"


def month_range(start: Month, end: Month) -> list[Month]:
    """Months from start to end, both included."""
    if end < start:
        raise BqxError(f"--end {end} is before --start {start}")
    out, m = [], start
    while m <= end:
        out.append(m)
        m = m.next()
    return out


@dataclass(frozen=True)
class Layout:
    """Where the tables are: schema, source table pattern and the source's time/price columns.

    ``source_table`` is a pattern with ``{pair}``, optionally schema-qualified
    (``bqx.m1_{pair}``); unqualified names live in ``schema``.
    """

    schema: str = "bqx"
    source_table: str = "m1_{pair}"
    time_column: str = "time"
    price_column: str = "close"

    def __post_init__(self) -> None:
        validate_identifier(self.schema, "schema name")
        validate_identifier(self.time_column, "time column")
        validate_identifier(self.price_column, "price column")
        parts = self.source_table.split(".")
        if len(parts) > 2 or "{pair}" not in parts[-1]:
            raise BqxError(
                f"invalid --source-table {self.source_table!r}: expected a pattern such as "
                "'bqx.m1_{pair}' with {pair} in the table name"
            )
        for part in parts:
            validate_identifier(part.replace("{pair}", "xxxxxx"), "source table pattern")

    # -- names ---------------------------------------------------------------------------
    def source_name(self, pair: str) -> tuple[str, str]:
        """(schema, table) of a pair's source bars."""
        parts = self.source_table.split(".")
        schema = parts[0] if len(parts) == 2 else self.schema
        return schema, parts[-1].replace("{pair}", validate_pair(pair))

    def source(self, pair: str) -> sql.Identifier:
        return sql.Identifier(*self.source_name(pair))

    def source_partition(self, pair: str, month: Month) -> sql.Identifier:
        schema, table = self.source_name(pair)
        return sql.Identifier(schema, f"{table}_{month.suffix}")

    def target_name(self, pair: str) -> str:
        return f"bqx_{validate_pair(pair)}"

    def target(self, pair: str) -> sql.Identifier:
        return sql.Identifier(self.schema, self.target_name(pair))

    def target_partition_name(self, pair: str, month: Month) -> str:
        return f"{self.target_name(pair)}_{month.suffix}"

    def target_partition(self, pair: str, month: Month) -> sql.Identifier:
        return sql.Identifier(self.schema, self.target_partition_name(pair, month))

    def table(self, name: str) -> sql.Identifier:
        """A bqx-owned table (ledger) in the schema."""
        return sql.Identifier(self.schema, name)

    @property
    def time(self) -> sql.Identifier:
        return sql.Identifier(self.time_column)

    @property
    def price(self) -> sql.Identifier:
        return sql.Identifier(self.price_column)


def target_columns(windows: Sequence[int] = DEFAULT_WINDOWS) -> list[str]:
    """All target columns in table order: 3 core + 6 per window + 7 aggregates."""
    return ["ts_utc", "rate", "created_at", *metric_columns(windows)]


# -- DDL ----------------------------------------------------------------------------------

LEDGER_RUNS = "bqx_runs"
LEDGER_JOBS = "bqx_jobs"
LEDGER_ATTEMPTS = "bqx_attempts"

_LEDGER_DDL = """
CREATE TABLE IF NOT EXISTS {runs} (
    run_id      bigserial PRIMARY KEY,
    command     text NOT NULL,
    params      jsonb NOT NULL,
    param_hash  text NOT NULL,
    started_at  timestamptz NOT NULL DEFAULT now(),
    ended_at    timestamptz,
    status      text NOT NULL DEFAULT 'running'
                CHECK (status IN ('running', 'done', 'failed', 'interrupted')),
    jobs_total  integer NOT NULL DEFAULT 0,
    jobs_done   integer NOT NULL DEFAULT 0,
    jobs_failed integer NOT NULL DEFAULT 0,
    jobs_skipped integer NOT NULL DEFAULT 0,
    rows_written bigint NOT NULL DEFAULT 0,
    workers     integer,
    executor    text,
    run_by      text NOT NULL,
    host        text NOT NULL
);
CREATE TABLE IF NOT EXISTS {jobs} (
    pair         text NOT NULL,
    month        date NOT NULL,
    status       text NOT NULL DEFAULT 'pending'
                 CHECK (status IN ('pending', 'running', 'done', 'failed')),
    run_id       bigint REFERENCES {runs} (run_id),
    param_hash   text,
    source_bars  bigint,
    source_sig   text,
    rows_written bigint,
    attempts     integer NOT NULL DEFAULT 0,
    started_at   timestamptz,
    finished_at  timestamptz,
    duration_s   double precision,
    worker       text,
    heartbeat_at timestamptz,
    last_error   text,
    updated_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (pair, month)
);
CREATE TABLE IF NOT EXISTS {attempts} (
    attempt_id   bigserial PRIMARY KEY,
    run_id       bigint REFERENCES {runs} (run_id),
    pair         text NOT NULL,
    month        date NOT NULL,
    attempt      integer NOT NULL,
    status       text NOT NULL CHECK (status IN ('done', 'failed', 'retried')),
    worker       text,
    started_at   timestamptz NOT NULL,
    finished_at  timestamptz NOT NULL,
    duration_s   double precision NOT NULL,
    source_bars  bigint,
    rows_written bigint,
    error        text
);
CREATE INDEX IF NOT EXISTS {attempts_run_idx} ON {attempts} (run_id, finished_at);
-- the worker's database session, so a stuck job's session can be ended with its worker
ALTER TABLE {jobs} ADD COLUMN IF NOT EXISTS backend_pid integer;
"""


def create_schema(conn: psycopg.Connection, layout: Layout) -> None:
    # only when missing: even with IF NOT EXISTS, CREATE SCHEMA needs CREATE on the database,
    # which a least-privilege role lacks (docs/privileges.md)
    found = "SELECT 1 FROM pg_namespace WHERE nspname = %s"
    if conn.execute(found, (layout.schema,)).fetchone() is None:
        conn.execute(
            sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(layout.schema))
        )


def create_ledger(conn: psycopg.Connection, layout: Layout) -> None:
    """The run/job/attempt ledger that status, verify and report read."""
    create_schema(conn, layout)
    conn.execute(
        sql.SQL(_LEDGER_DDL).format(
            runs=layout.table(LEDGER_RUNS),
            jobs=layout.table(LEDGER_JOBS),
            attempts=layout.table(LEDGER_ATTEMPTS),
            attempts_run_idx=sql.Identifier(f"{LEDGER_ATTEMPTS}_run_idx"),
        )
    )


def create_source_table(conn: psycopg.Connection, layout: Layout, pair: str) -> None:
    """``m1_{pair}``: minute bars, range-partitioned by month on ``time``."""
    schema, _ = layout.source_name(pair)
    conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema)))
    conn.execute(
        sql.SQL(
            "CREATE TABLE IF NOT EXISTS {t} ("
            " {time} timestamptz NOT NULL PRIMARY KEY,"
            " open double precision NOT NULL, high double precision NOT NULL,"
            " low double precision NOT NULL, close double precision NOT NULL,"
            " volume double precision"
            ") PARTITION BY RANGE ({time})"
        ).format(t=layout.source(pair), time=layout.time)
    )


def create_target_table(
    conn: psycopg.Connection, layout: Layout, pair: str, windows: Sequence[int]
) -> None:
    """``bqx_{pair}``: one row per source bar, PK ``ts_utc`` (also its only time index)."""
    create_schema(conn, layout)
    metric_defs = sql.SQL(", ").join(
        sql.SQL("{} double precision").format(sql.Identifier(c)) for c in metric_columns(windows)
    )
    conn.execute(
        sql.SQL(
            "CREATE TABLE IF NOT EXISTS {t} ("
            " ts_utc timestamptz NOT NULL,"
            " rate double precision NOT NULL,"
            " created_at timestamptz NOT NULL DEFAULT now(),"
            " {metrics},"
            " PRIMARY KEY (ts_utc)"
            ") PARTITION BY RANGE (ts_utc)"
        ).format(t=layout.target(pair), metrics=metric_defs)
    )


def _ensure_partition(
    conn: psycopg.Connection, parent: sql.Identifier, part: sql.Identifier, month: Month
) -> None:
    conn.execute(
        sql.SQL(
            "CREATE TABLE IF NOT EXISTS {part} PARTITION OF {parent}"
            " FOR VALUES FROM ({lo}) TO ({hi})"
        ).format(
            part=part,
            parent=parent,
            lo=sql.Literal(month.start.isoformat()),
            hi=sql.Literal(month.end.isoformat()),
        )
    )


def ensure_source_partition(
    conn: psycopg.Connection, layout: Layout, pair: str, month: Month
) -> None:
    _ensure_partition(conn, layout.source(pair), layout.source_partition(pair, month), month)


def ensure_target_partition(
    conn: psycopg.Connection, layout: Layout, pair: str, month: Month
) -> None:
    _ensure_partition(conn, layout.target(pair), layout.target_partition(pair, month), month)


# -- catalog ------------------------------------------------------------------------------


def table_columns(conn: psycopg.Connection, schema: str, table: str) -> dict[str, str] | None:
    """Column name -> type of a table, or None if the table does not exist."""
    rows = conn.execute(
        "SELECT a.attname, format_type(a.atttypid, a.atttypmod)"
        " FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid"
        " JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE n.nspname = %s AND c.relname = %s AND a.attnum > 0 AND NOT a.attisdropped"
        " ORDER BY a.attnum",
        (schema, table),
    ).fetchall()
    return {name: typ for name, typ in rows} if rows else None


def check_target_columns(
    conn: psycopg.Connection, layout: Layout, pair: str, windows: Sequence[int]
) -> None:
    """Refuse to write into a target whose columns don't match the configured windows."""
    have = table_columns(conn, layout.schema, layout.target_name(pair))
    if have is None:
        return
    want = target_columns(normalize_windows(windows))
    missing = [c for c in want if c not in have]
    extra = [c for c in have if c not in want]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing)}")
        if extra:
            parts.append(f"unexpected {', '.join(extra)}")
        raise BqxError(
            f"target table {layout.schema}.{layout.target_name(pair)} does not match windows "
            f"{','.join(map(str, normalize_windows(windows)))}: {'; '.join(parts)}"
            " (use the windows it was created with, or drop the table)"
        )


def source_pairs(conn: psycopg.Connection, layout: Layout) -> list[str]:
    """Pairs that have a source table matching the pattern (partitions excluded)."""
    schema, _ = layout.source_name("xxxxxx")
    pattern = layout.source_table.split(".")[-1]
    prefix, suffix = pattern.split("{pair}")
    rows = conn.execute(
        "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE n.nspname = %s AND c.relkind IN ('r', 'p', 'v', 'm', 'f')"
        " AND NOT c.relispartition",
        (schema,),
    ).fetchall()
    pairs = []
    for (name,) in rows:
        if name.startswith(prefix) and name.endswith(suffix):
            core = name[len(prefix) : len(name) - len(suffix)]
            if _PAIR_RE.fullmatch(core) and core == core.lower():
                pairs.append(core)
    return sorted(pairs)


def iter_pair_months(pairs: Iterable[str], months: Iterable[Month]) -> Iterator[tuple[str, Month]]:
    months = list(months)
    for pair in pairs:
        for month in months:
            yield pair, month
