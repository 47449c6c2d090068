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
-- the run's driver process and its liveness: a run whose driver died is marked interrupted
ALTER TABLE {runs} ADD COLUMN IF NOT EXISTS pid integer;
ALTER TABLE {runs} ADD COLUMN IF NOT EXISTS heartbeat_at timestamptz;
-- the source versions a done job was computed from (resume with --source-check version)
ALTER TABLE {jobs} ADD COLUMN IF NOT EXISTS source_ver text;
-- the parameters each target table's rows were computed with, so a run with other ones is
-- refused instead of silently replacing them month by month
CREATE TABLE IF NOT EXISTS {targets} (
    target_table text PRIMARY KEY,
    params       jsonb NOT NULL,
    param_hash   text NOT NULL,
    run_id       bigint,
    updated_at   timestamptz NOT NULL DEFAULT now()
);
"""

LEDGER_TARGETS = "bqx_targets"
SOURCE_VERSIONS = "bqx_source_versions"

_SOURCE_VERSIONS_DDL = """
CREATE TABLE IF NOT EXISTS {versions} (
    source_table text NOT NULL,
    month        date NOT NULL,
    version      bigint NOT NULL,
    bars         bigint NOT NULL,
    changed_at   timestamptz NOT NULL,
    PRIMARY KEY (source_table, month)
);
-- A new version for one month: the row is locked first, so the bar count, taken by a later
-- statement (a fresh snapshot under READ COMMITTED), includes every write committed before.
CREATE OR REPLACE FUNCTION {bump}(sch text, src text, m date) RETURNS void
LANGUAGE plpgsql AS $f$
DECLARE
    part text := src || '_' || to_char(m, 'YYYY"m"MM');
BEGIN
    IF to_regclass(format('%I.%I', sch, part)) IS NULL THEN
        RETURN;
    END IF;
    EXECUTE format('INSERT INTO %I.bqx_source_versions VALUES ($1, $2, 0, 0, clock_timestamp())'
                   ' ON CONFLICT DO NOTHING', sch) USING src, m;
    EXECUTE format('SELECT 1 FROM %I.bqx_source_versions WHERE source_table = $1 AND month = $2'
                   ' FOR UPDATE', sch) USING src, m;
    EXECUTE format('UPDATE %1$I.bqx_source_versions SET version ='
                   ' pg_current_xact_id()::text::bigint, bars = (SELECT count(*) FROM %1$I.%2$I),'
                   ' changed_at = clock_timestamp() WHERE source_table = $1 AND month = $2',
                   sch, part) USING src, m;
END
$f$;
-- Fired once per statement that writes a source table or one of its month partitions, by
-- whoever writes it (bqx, or plain SQL): the months touched get a new version, in the same
-- transaction as the change. Arguments: source table, time column[, month of a partition].
CREATE OR REPLACE FUNCTION {func}() RETURNS trigger LANGUAGE plpgsql AS $f$
DECLARE
    src text := TG_ARGV[0];
    m date;
    months date[];
BEGIN
    IF TG_NARGS > 2 THEN
        months := ARRAY[TG_ARGV[2]::date];
    ELSIF TG_OP = 'TRUNCATE' THEN
        EXECUTE format('SELECT array_agg(month) FROM %I.bqx_source_versions'
                       ' WHERE source_table = $1', TG_TABLE_SCHEMA) INTO months USING src;
    ELSIF TG_OP = 'INSERT' THEN
        EXECUTE format('SELECT array_agg(DISTINCT date_trunc(''month'', %I)::date)'
                       ' FROM new_rows', TG_ARGV[1]) INTO months;
    ELSIF TG_OP = 'DELETE' THEN
        EXECUTE format('SELECT array_agg(DISTINCT date_trunc(''month'', %I)::date)'
                       ' FROM old_rows', TG_ARGV[1]) INTO months;
    ELSE
        EXECUTE format('SELECT array_agg(DISTINCT k) FROM (SELECT date_trunc(''month'', %1$I)'
                       '::date AS k FROM new_rows UNION ALL SELECT date_trunc(''month'', %1$I)'
                       '::date FROM old_rows) x', TG_ARGV[1]) INTO months;
    END IF;
    FOREACH m IN ARRAY coalesce(months, '{{}}'::date[]) LOOP
        CONTINUE WHEN m IS NULL;
        PERFORM {bump}(TG_TABLE_SCHEMA, src, m);
    END LOOP;
    RETURN NULL;
END
$f$;
"""

BUMP_FUNCTION = "bqx_bump_source_version"
SOURCE_TRIGGER = "bqx_version"  # on each month partition; the parent's end in _ins/_upd/_del/_trunc
PARENT_TRIGGERS = {
    "ins": "AFTER INSERT ON {t} REFERENCING NEW TABLE AS new_rows",
    "upd": "AFTER UPDATE ON {t} REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows",
    "del": "AFTER DELETE ON {t} REFERENCING OLD TABLE AS old_rows",
    "trunc": "AFTER TRUNCATE ON {t}",
}


def record_source_version(cur: psycopg.Cursor, layout: Layout, pair: str, month: Month) -> None:
    """Inside the transaction that wrote a month of source bars: give that month a new version.

    The version (the writing transaction's id) and the month's bar count commit or roll back
    with the bars, so a resume compares versions instead of hashing every bar
    (``--source-check auto``, docs/guarantees.md). The first call also installs statement
    triggers on the source table and the month's partition, so later writes by plain SQL
    (UPDATE, INSERT, DELETE, TRUNCATE, COPY) bump the version too.
    """
    schema, table = layout.source_name(pair)
    versions = sql.Identifier(schema, SOURCE_VERSIONS)
    parent, part = layout.source(pair), layout.source_partition(pair, month)
    bump = sql.Identifier(schema, BUMP_FUNCTION)
    have = cur.execute(
        "SELECT to_regclass(%s) IS NOT NULL AND to_regproc(%s) IS NOT NULL, (SELECT count(*)"
        " FROM pg_trigger WHERE tgrelid IN (to_regclass(%s), to_regclass(%s))"
        " AND tgname LIKE 'bqx\\_version%%')",
        (versions.as_string(cur), bump.as_string(cur), parent.as_string(cur),
         part.as_string(cur)),
    ).fetchone()  # fmt: skip
    if not have[0] or have[1] < 1 + len(PARENT_TRIGGERS):
        # concurrent first loads (generate's threads) would race on CREATE … IF NOT EXISTS
        cur.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (versions.as_string(cur),))
        func = sql.Identifier(schema, "bqx_source_changed")
        cur.execute(sql.SQL(_SOURCE_VERSIONS_DDL).format(versions=versions, func=func, bump=bump))
        args = [sql.Literal(table), sql.Literal(layout.time_column)]
        for suffix, when in PARENT_TRIGGERS.items():
            cur.execute(
                sql.SQL("CREATE OR REPLACE TRIGGER {name} " + when + " FOR EACH STATEMENT"
                        " EXECUTE FUNCTION {func}({args})").format(
                    name=sql.Identifier(f"{SOURCE_TRIGGER}_{suffix}"), t=parent, func=func,
                    args=sql.SQL(", ").join(args),
                )
            )  # fmt: skip
        cur.execute(
            sql.SQL(
                "CREATE OR REPLACE TRIGGER {name} AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE"
                " ON {t} FOR EACH STATEMENT EXECUTE FUNCTION {func}({args})"
            ).format(
                name=sql.Identifier(SOURCE_TRIGGER), t=part, func=func,
                args=sql.SQL(", ").join([*args, sql.Literal(str(month.first_day))]),
            )
        )  # fmt: skip
    cur.execute(
        sql.SQL("SELECT {}(%s, %s, %s)").format(bump),
        (schema, table, month.first_day),
    )


def create_schema(conn: psycopg.Connection, layout: Layout) -> None:
    # only when missing: even with IF NOT EXISTS, CREATE SCHEMA needs CREATE on the database,
    # which a least-privilege role lacks (docs/privileges.md)
    found = "SELECT 1 FROM pg_namespace WHERE nspname = %s"
    if conn.execute(found, (layout.schema,)).fetchone() is None:
        conn.execute(
            sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(layout.schema))
        )


def lock_schema_ddl(conn: psycopg.Connection, layout: Layout) -> None:
    """Serialise bqx's DDL in a schema until the transaction ends.

    ``CREATE … IF NOT EXISTS`` is not safe against itself: two first runs at once can both
    find a table missing and one then fails on a duplicate catalog key.
    """
    conn.execute(
        "SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))", (f"bqx-ddl:{layout.schema}",)
    )


# the newest column of each ledger table: when all are there, the ledger needs no DDL
_LEDGER_NEWEST = (
    (LEDGER_RUNS, "heartbeat_at"), (LEDGER_RUNS, "pid"), (LEDGER_JOBS, "source_ver"),
    (LEDGER_JOBS, "backend_pid"), (LEDGER_ATTEMPTS, "error"), (LEDGER_TARGETS, "params"),
)  # fmt: skip


def ledger_is_current(conn: psycopg.Connection, layout: Layout) -> bool:
    """True when every ledger table and column exists (a catalog read, no lock taken)."""
    found = conn.execute(
        "SELECT count(*) FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid"
        " JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = %s"
        " AND NOT a.attisdropped AND (c.relname, a.attname) IN"
        " (SELECT * FROM unnest(%s::text[], %s::text[]))",
        (layout.schema, [t for t, _ in _LEDGER_NEWEST], [c for _, c in _LEDGER_NEWEST]),
    ).fetchone()[0]
    return int(found) == len(_LEDGER_NEWEST)


def create_ledger(conn: psycopg.Connection, layout: Layout) -> None:
    """The run/job/attempt ledger that status, verify and report read.

    Only when something is missing: ``ALTER TABLE … ADD COLUMN IF NOT EXISTS`` takes an
    exclusive lock even when the column exists, which would deadlock with an ``update`` or
    another run writing the ledger.
    """
    if ledger_is_current(conn, layout):
        return
    lock_schema_ddl(conn, layout)
    create_schema(conn, layout)
    conn.execute(
        sql.SQL(_LEDGER_DDL).format(
            runs=layout.table(LEDGER_RUNS),
            jobs=layout.table(LEDGER_JOBS),
            attempts=layout.table(LEDGER_ATTEMPTS),
            targets=layout.table(LEDGER_TARGETS),
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
            # open, high and low may be NULL: close-only sources (docs/ingest.md)
            " open double precision, high double precision,"
            " low double precision, close double precision NOT NULL,"
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
