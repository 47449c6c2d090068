"""``bqx.Store``: every command of bqx as a method, for Python callers and the CLI alike.

>>> import bqx
>>> store = bqx.Store()                        # doctest: +SKIP
>>> store.generate(start="2024-07")            # doctest: +SKIP
>>> run = store.backfill(workers=2)            # doctest: +SKIP
>>> store.verify().ok                          # doctest: +SKIP

A store is one database and schema: the source bars, the metrics and the ledger. Settings come
from the arguments, then the environment (``BQX_DATABASE_URL``, ``BQX_DATABASE_URL_FILE``,
``BQX_DATABASE_SECRET``, libpq's ``PG*``, ``BQX_SCHEMA``, ``BQX_HOME``; docs/configuration.md),
then defaults (the embedded server). Each method opens what it needs and closes
it again, and returns a typed result with ``as_dict()`` (the ``--json`` document) and
``text()`` (what the CLI prints). Errors are ``bqx.BqxError`` subclasses.
"""

from __future__ import annotations

import os
import shlex
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bqx.config import CREDENTIAL_SETTINGS, Settings, load_settings
from bqx.core.layout import DEFAULT_SOURCE_TABLE, Layout
from bqx.core.months import Month, MonthLike, as_month, month_range
from bqx.core.params import BackfillPlan, Params, RunSummary, check_windows
from bqx.core.symbols import REPORT_PAIRS, parse_pairs, validate_pair
from bqx.core.text import format_bytes, plural
from bqx.errors import BqxError, InvalidOption
from bqx.metrics import DEFAULT_WINDOWS

if TYPE_CHECKING:
    import psycopg
    import pyarrow as pa

    from bqx.db.credentials import DatabaseRef
    from bqx.ml.features import FeaturesSummary
    from bqx.ops.export import ExportSummary
    from bqx.ops.status import Status
    from bqx.ops.verify import Verification
    from bqx.pipeline.update import UpdateResult
    from bqx.sources.generate import GenerateSummary
    from bqx.sources.ingest import IngestSummary
    from bqx.store.bars import DeleteResult

PairsLike = str | Sequence[str] | None
StepFn = Callable[..., None]


# -- results the store returns beside those of its modules ------------------------------


@dataclass
class InitResult:
    pair_months: int
    schema: str

    def as_dict(self) -> dict[str, Any]:
        return {"pair_months": self.pair_months, "schema": self.schema}

    def text(self) -> str:
        return f"ready: {plural(self.pair_months, 'pair-month')} in schema {self.schema}"


@dataclass
class DeletePlan:
    """The bars a ``delete_bars`` would remove, per month (``YYYY-MM`` -> bars)."""

    pair: str
    start: datetime
    end: datetime
    months: dict[str, int]

    @property
    def bars(self) -> int:
        return sum(self.months.values())

    def text(self) -> str:
        span = f"{self.start:%Y-%m-%d %H:%M} to {self.end:%Y-%m-%d %H:%M} UTC (end excluded)"
        if not self.bars:
            return f"{self.pair.upper()}: no bars from {span}: nothing to delete"
        months = ", ".join(f"{m} ({n:,})" for m, n in self.months.items())
        return f"{self.pair.upper()}: will delete {self.bars:,} bars from {span}: {months}"


@dataclass
class DropPlan:
    """What ``drop_pair`` removes: the pair's tables (name -> partitions, bytes) and its
    ledger jobs per status."""

    pair: str
    tables: dict[str, tuple[int, int]] = field(default_factory=dict)
    jobs: dict[str, int] = field(default_factory=dict)
    dropped: bool = False

    @property
    def empty(self) -> bool:
        return not self.tables and not self.jobs

    def as_dict(self) -> dict[str, Any]:
        return {
            "pair": self.pair.upper(), "dropped": self.dropped,
            "tables": {t: {"partitions": n, "bytes": b} for t, (n, b) in self.tables.items()},
            "jobs": sum(self.jobs.values()),
        }  # fmt: skip

    def text(self) -> str:
        if self.empty:
            return f"{self.pair.upper()}: no table and no ledger job: nothing to drop"
        tables = [f"{t} ({plural(n, 'partition')}, {format_bytes(b)})" for t, (n, b) in
                  self.tables.items()]  # fmt: skip
        jobs = sum(self.jobs.values())
        what = ", ".join([*tables, f"{plural(jobs, 'ledger job')} with their attempts"])
        verb = "dropped" if self.dropped else "will drop"
        return f"{self.pair.upper()}: {verb} {what}"


@dataclass
class ReportResult:
    markdown: Path
    html: Path
    headline: dict[str, Any]

    @property
    def complete(self) -> bool:
        return self.headline["status"] == "COMPLETE"

    def as_dict(self) -> dict[str, Any]:
        return {"markdown": str(self.markdown), "html": str(self.html), **self.headline}

    def text(self) -> str:
        return f"report: {self.markdown}\n        {self.html}"


@dataclass
class RunList:
    """The latest runs, newest first (``bqx runs``)."""

    runs: list[dict[str, Any]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"runs": self.runs}

    def text(self) -> str:
        if not self.runs:
            return "no run recorded yet"
        lines = [f"{'run':>5}  {'command':8}  {'started (UTC)':19}  {'s':>8}  {'jobs':>11}"
                 f"  {'rows':>12}  status"]  # fmt: skip
        for r in self.runs:
            jobs = f"{r['jobs_done']}/{r['jobs_total']}"
            lines.append(
                f"{r['run_id']:>5}  {r['command']:8}  {r['started_at'][:19].replace('T', ' ')}"
                f"  {r['duration_s']:>8.1f}  {jobs:>11}  {r['rows_written']:>12,}  {r['status']}"
            )
        return "\n".join(lines)


@dataclass
class DatabaseStatus:
    """Which database bqx uses and whether it answers (``bqx db status``)."""

    database: str
    embedded: bool
    running: bool | None
    datadir: str | None
    reachable: bool = False
    server_version: str | None = None
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return dict(vars(self))

    def text(self) -> str:
        lines = [f"database: {self.database}"]
        if self.embedded:
            lines.append(f"embedded server: {'running' if self.running else 'stopped'}")
        if self.reachable:
            lines.append(f"reachable: PostgreSQL {self.server_version}")
        return "\n".join(lines)


class Database:
    """The database a store uses: the embedded server's life, and its URL."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def describe(self) -> str:
        """A person-readable name of the database in use, password masked."""
        from bqx.db.connect import describe_target

        return describe_target(self.settings)

    def other(self) -> str | None:
        """How the user named another database, or None when bqx uses its embedded server."""
        if self.settings.database_url is not None:
            return "a database URL is set (BQX_DATABASE_URL or --database-url)"
        if self.settings.database_url_file is not None:
            return "a database URL file is set (BQX_DATABASE_URL_FILE)"
        if self.settings.database_secret is not None:
            return "a database secret is set (BQX_DATABASE_SECRET)"
        if self.settings.uses_libpq_env():
            return "libpq PG* variables name the database"
        return None

    def start(self) -> str:
        """Start the embedded server (initialising it on first use); its URL (no password)."""
        from bqx.db.connect import embedded

        other = self.other()
        if other:
            return f"{other}: bqx uses {self.describe()}; no embedded server started"
        server = embedded(self.settings)
        server.start()
        return f"embedded PostgreSQL running: {server.url}"

    def stop(self) -> bool:
        """Stop the embedded server; True if it was running. Read-only commands then leave it
        stopped."""
        from bqx.db.connect import embedded

        return embedded(self.settings).stop()

    def status(self) -> DatabaseStatus:
        """Whether the database answers, never starting an embedded server that is stopped."""
        from bqx.db.connect import embedded, server_version
        from bqx.db.urls import mask_text

        server = embedded(self.settings)
        uses_embedded = self.settings.uses_embedded()
        doc = DatabaseStatus(
            self.describe(), uses_embedded, server.is_running() if uses_embedded else None,
            str(server.datadir) if uses_embedded else None,
        )  # fmt: skip
        if doc.running is not False:
            try:
                doc.server_version = server_version(self.settings)
                doc.reachable = True
            except BqxError as exc:
                doc.error = mask_text(str(exc))
        elif not server.exists():
            doc.error = "no embedded server yet: `bqx db start` creates it"
        elif server.stop_marker.exists():
            doc.error = "embedded server stopped by `bqx db stop`: start it with `bqx db start`"
        else:
            doc.error = "embedded server not running: start it with `bqx db start`"
        return doc

    def to_destroy(self) -> Path | None:
        """The embedded server's directory that ``destroy`` would delete (None: there is
        none); refused when bqx uses another database."""
        from bqx.db.connect import embedded

        other = self.other()
        if other:
            raise BqxError(
                f"{other}: bqx uses {self.describe()}, not its embedded database, and never"
                " deletes another database: nothing removed"
            )
        root = embedded(self.settings).root
        return root if root.exists() else None

    def destroy(self) -> Path | None:
        """Stop the embedded server and delete its directory (``BQX_HOME/pg``: every schema,
        bar, metric and ledger in it, and its password). The path deleted, or None."""
        from bqx.db.connect import embedded

        root = self.to_destroy()
        if root is not None:
            embedded(self.settings).destroy()
        return root

    def url(self, *, show_password: bool = False) -> str:
        """The URL in use, password masked unless ``show_password``. The embedded server's URL
        names its password file instead of carrying the password; a file or secret is read
        now, and with IAM a fresh token (valid 15 minutes) is the password."""
        from bqx.db.connect import embedded, resolve_url
        from bqx.db.urls import mask_url

        url = resolve_url(self.settings, start=False)
        if not url:
            raise BqxError("no URL: the server is given by libpq PG* environment variables")
        if show_password and self.settings.uses_embedded():
            return embedded(self.settings).url_with_password()
        return url if show_password else mask_url(url)


# -- the store ----------------------------------------------------------------------------


def _months(start: MonthLike | None, end: MonthLike | None) -> tuple[Month | None, Month | None]:
    return as_month(start, "start"), as_month(end, "end")


class Store:
    """One database and schema of bars, metrics and ledger: a method per command."""

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        database_url: str | None = None,
        database_url_file: str | Path | None = None,
        database_secret: str | None = None,
        database_iam: bool | None = None,
        schema: str | None = None,
        home: str | Path | None = None,
        source_table: str | None = None,
        time_column: str | None = None,
        price_column: str | None = None,
    ) -> None:
        """The database as the command line names it (``database_url``, a URL file, an AWS
        secret, IAM tokens: docs/configuration.md), else as the environment does."""
        given = {"database_url": database_url, "database_url_file": database_url_file,
                 "database_secret": database_secret, "database_iam": database_iam,
                 "schema_name": schema, "home": home}  # fmt: skip
        overrides = {k: v for k, v in given.items() if v is not None}
        if settings is None:
            settings = load_settings(**overrides)
        elif overrides:
            base = _given(settings)
            if overrides.keys() & CREDENTIAL_SETTINGS:  # the database given replaces the old
                base = {k: v for k, v in base.items() if k not in CREDENTIAL_SETTINGS}
            settings = load_settings(**{**base, **overrides})
        self.settings = settings
        self.layout = Layout(settings.schema_name).with_source(
            source_table or DEFAULT_SOURCE_TABLE, time_column, price_column
        )
        self.db = Database(settings)

    def __repr__(self) -> str:
        return f"Store({self.db.describe()!r}, schema={self.layout.schema!r})"

    # -- plumbing ------------------------------------------------------------------------

    def url(self, *, start: bool = True) -> str:
        """The conninfo in use (it may hold a password: never print it; see ``db.url()``)."""
        from bqx.db.connect import resolve_url

        return resolve_url(self.settings, start=start)

    def database_ref(self, *, start: bool = True) -> DatabaseRef:
        """The database as a reference for workers: a URL file, a secret and IAM tokens are
        resolved by each worker when it connects, never handed to it resolved."""
        from bqx.db.connect import database_ref

        return database_ref(self.settings, start=start)

    @contextmanager
    def connect(self, *, start: bool = True) -> Iterator[psycopg.Connection]:
        """An autocommit connection in UTC; ``start=False`` never starts a stopped embedded
        server (read-only commands)."""
        from bqx.db.connect import connect

        with connect(self.settings, autocommit=True, start=start) as conn:
            yield conn

    def params(self, windows: Sequence[int] = DEFAULT_WINDOWS, mode: str = "bars",
               max_fill: int = 5, *, sink: str | None = None,
               source: str | None = None) -> Params:  # fmt: skip
        return Params.build(self.layout, windows, mode, max_fill, sink=sink,
                            bars=_lake_uri(source, "source"))  # fmt: skip

    def _lake_params(
        self, pairs: PairsLike, windows: Sequence[int], mode: str, max_fill: int,
        sink: str | None, source: str | None,
    ) -> Params:  # fmt: skip
        """Parameters with the sink resolved: the one given, else the one the pairs' metrics
        are recorded in (docs/lake.md)."""
        from bqx.pipeline.plan import resolve_sink

        _lake_uri(sink, "sink")  # a bad URI is refused before any connection
        _lake_uri(source, "source")
        with self.connect() as conn:
            where = resolve_sink(conn, self.layout, parse_pairs(pairs), sink)
            bars = resolve_sink(conn, self.layout, parse_pairs(pairs), source, "source")
        return self.params(windows, mode, max_fill, sink=where, source=bars)

    # -- data in -------------------------------------------------------------------------

    def init(
        self, pairs: PairsLike = None, start: MonthLike | None = None,
        end: MonthLike | None = None, *, windows: Sequence[int] = DEFAULT_WINDOWS,
    ) -> InitResult:  # fmt: skip
        """Schema, source and target tables, monthly partitions and the ledger; idempotent."""
        from bqx.pipeline.plan import init_tables

        first, last = _months(start, end)
        if first is None or last is None:
            raise InvalidOption("start", start, "init needs a start and an end month (YYYY-MM)")
        months = month_range(first, last)
        params = self.params(check_windows(windows))
        with self.connect() as conn:
            n = init_tables(conn, self.layout, parse_pairs(pairs) or list(REPORT_PAIRS), months,
                            params)  # fmt: skip
        return InitResult(n, self.layout.schema)

    def generate(
        self, pairs: PairsLike = None, start: MonthLike = "2024-07",
        end: MonthLike | None = None, *, seed: int = 0, workers: int = 1,
        replace: bool = False, progress: Callable[[str, int], None] | None = None,
        instruments: int | None = None,
    ) -> GenerateSummary:  # fmt: skip
        """Synthetic minute bars for the report's 28 crosses (or ``pairs``, or the first
        ``instruments`` of a universe of mixed kinds: forex, metals, indices, crypto, futures,
        stocks) into ``m1_{pair}``; a month's bars depend only on the seed. A month holding
        bars bqx did not generate is refused (``NeedsOption``, nothing written) unless
        ``replace``; a month that already holds these bars is left as it is."""
        from bqx.core.params import check_positive
        from bqx.sources.generate import generate
        from bqx.sources.universe import symbol_of, universe

        first, last = _months(start, end or start)
        assert first is not None and last is not None
        check_positive("workers", workers, integer=True)
        chosen = parse_pairs(pairs) or list(REPORT_PAIRS)
        if instruments is not None:
            check_positive("instruments", instruments, integer=True)
            if pairs is not None:
                raise InvalidOption(
                    "instruments", instruments, "give pairs or instruments, not both"
                )
            chosen = [symbol_of(i) for i in universe(instruments, seed)]
        return generate(self.database_ref(), self.layout, chosen, first, last, seed=seed,
                        workers=workers, replace=replace,
                        progress=progress)  # fmt: skip

    def ingest(
        self, files: Sequence[str | Path], pair: str, *, fmt: str = "auto",
        tz: str | None = None, columns: str | None = None, time_format: str | None = None,
        rejects: str | Path | None = None, allow_mismatch: bool = False,
        drop_flat: bool = False, ticks: bool = False, tick_price: str = "auto",
        progress: Callable[[str], None] | None = None,
    ) -> IngestSummary:  # fmt: skip
        """Real minute-bar files into ``m1_{pair}``; bad rows go to a rejects file
        (docs/ingest.md). ``ticks``: the files hold ticks, aggregated into minute bars, each
        tick priced by ``tick_price`` (``auto``: the mid of bid and ask, else the last
        price; ``mid``, ``bid``, ``ask``, ``last``)."""
        from bqx.sources.formats import Mapping
        from bqx.sources.ingest import ingest_files

        if tick_price != "auto" and not ticks:
            raise InvalidOption("tick_price", tick_price, "prices ticks: ask for ticks too")
        mapping = Mapping.parse(columns, time_format, ticks=tick_price if ticks else None)
        return ingest_files(
            self.database_ref(), self.layout, files, pair, fmt=fmt, tz=tz, mapping=mapping,
            rejects_path=rejects,
            allow_mismatch=allow_mismatch, drop_flat=drop_flat, progress=progress,
        )  # fmt: skip

    def bars_to_delete(self, pair: str, start: str | datetime, end: str | datetime) -> DeletePlan:
        """What ``delete_bars`` would remove, without removing it."""
        from bqx.store.bars import bars_in_range

        pair, lo, hi = self._bounds(pair, start, end)
        with self.connect() as conn:
            return DeletePlan(pair, lo, hi, bars_in_range(conn, self.layout, pair, lo, hi))

    def delete_bars(self, pair: str, start: str | datetime, end: str | datetime) -> DeleteResult:
        """Undo an ingest: delete a pair's bars in [start, end) and their metrics, in one
        transaction. A month left without bars loses its ledger job too; the next backfill
        redoes the months whose bars changed."""
        from bqx.store import bars
        from bqx.store.ledger import Ledger
        from bqx.store.versions import publish_counters

        pair, lo, hi = self._bounds(pair, start, end)
        with self.connect() as conn:
            if not bars.bars_in_range(conn, self.layout, pair, lo, hi):
                return bars.DeleteResult()
            with conn.transaction(), conn.cursor() as cur:
                result = bars.delete_bars(cur, self.layout, pair, lo, hi)
                Ledger(self.layout).forget_months(
                    cur, pair, [Month.parse(m) for m in result.emptied]
                )
            publish_counters(conn)
        return result

    def pair_to_drop(self, pair: str) -> DropPlan:
        """What ``drop_pair`` would remove, without removing it."""
        from bqx.store.ddl import pair_tables
        from bqx.store.ledger import Ledger

        pair = validate_pair(pair)
        with self.connect() as conn:
            return DropPlan(pair, pair_tables(conn, self.layout, pair),
                            Ledger(self.layout).pair_jobs(conn, pair))  # fmt: skip

    def drop_pair(self, pair: str) -> DropPlan:
        """Drop a pair: its source and target tables (every month of bars and metrics) and
        its ledger jobs, attempts and recorded parameters, in one transaction. Refused while a
        run holds its jobs."""
        from bqx.store import ddl, versions
        from bqx.store.ledger import Ledger

        plan = self.pair_to_drop(pair)
        if plan.empty:
            return plan
        ledger = Ledger(self.layout)
        with self.connect() as conn, conn.transaction(), conn.cursor() as cur:
            ledger.hold_pair(cur, plan.pair)  # first: a worker's write is never cut in two
            ddl.drop_pair_tables(cur, self.layout, plan.pair)
            versions.forget_source(cur, self.layout, plan.pair)
            ledger.forget_pair(cur, plan.pair)
        plan.dropped = True
        return plan

    def _bounds(
        self, pair: str, start: str | datetime, end: str | datetime
    ) -> tuple[str, datetime, datetime]:
        from bqx.core.months import parse_bound

        pair = validate_pair(pair)
        lo, hi = parse_bound(start, "start"), parse_bound(end, "end", end=True)
        if hi <= lo:
            raise InvalidOption("end", end, f"is not after start {start}")
        return pair, lo, hi

    # -- the pipeline --------------------------------------------------------------------

    def backfill(
        self, pairs: PairsLike = None, start: MonthLike | None = None,
        end: MonthLike | None = None, *, windows: Sequence[int] = DEFAULT_WINDOWS,
        mode: str = "bars", max_fill: int = 5, workers: int | None = None, force: bool = False,
        job_timeout: float = 600.0, executor: str = "threads", scheduler: str | None = None,
        source_check: str = "auto", progress: bool | Any = False, max_attempts: int = 3,
        reconnect_within_s: float = 30.0, sink: str | None = None, source: str | None = None,
    ) -> RunSummary:  # fmt: skip
        """Compute the metrics of every (pair, month) job with source bars; resumable, one
        transaction per job (docs/guarantees.md). ``progress=True`` draws a progress bar on
        stderr; raises ``NothingToDo`` when no month has bars in the range. A job is tried
        ``max_attempts`` times; a database that goes away is waited for
        ``reconnect_within_s`` seconds before the run stops.

        ``sink``: a Delta table (a local path or ``s3://bucket/prefix``) instead of the
        database's partitions; by default the one the pairs were last written to.
        ``source``: bars from a Parquet dataset or Delta table instead of the source tables
        (docs/lake.md)."""
        from bqx.pipeline.plan import default_destination
        from bqx.pipeline.run import RunOptions, run_backfill
        from bqx.progress import BackfillProgress

        options = RunOptions(
            workers=workers,
            executor=executor,
            scheduler=scheduler,
            job_timeout=job_timeout,
            force=force,
            source_check=source_check,
            max_attempts=max_attempts,
            reconnect_within_s=reconnect_within_s,
        )
        options.check()  # before anything is done, even starting a server
        params = self._lake_params(pairs, windows, mode, max_fill, sink, source)
        first, last = _months(start, end)
        reporter = BackfillProgress() if progress is True else (progress or None)
        return run_backfill(self.database_ref(), params, default_destination(params),
                            parse_pairs(pairs), first, last, options, reporter)  # fmt: skip

    def plan(
        self, pairs: PairsLike = None, start: MonthLike | None = None,
        end: MonthLike | None = None, *, windows: Sequence[int] = DEFAULT_WINDOWS,
        mode: str = "bars", max_fill: int = 5, force: bool = False, source_check: str = "auto",
        sink: str | None = None, source: str | None = None,
    ) -> BackfillPlan:  # fmt: skip
        """What ``backfill`` would do and why (``--dry-run``); writes nothing at all."""
        from bqx.pipeline.plan import default_destination, plan_backfill

        params = self._lake_params(pairs, windows, mode, max_fill, sink, source)
        first, last = _months(start, end)
        with self.connect() as conn:
            return plan_backfill(conn, params, parse_pairs(pairs), first, last,
                                 dest=default_destination(params), force=force,
                                 source_check=source_check)  # fmt: skip

    def _updater(
        self, pairs: PairsLike, recheck: str | float, windows: Sequence[int] | None,
        mode: str | None, max_fill: int | None, sink: str | None = None,
    ) -> Any:  # fmt: skip
        from bqx.pipeline.update import Updater, parse_duration

        return Updater(self.database_ref(), self.layout, pairs=parse_pairs(pairs),
                       recheck_s=parse_duration(recheck),
                       windows=check_windows(windows) if windows else None, mode=mode,
                       max_fill=max_fill, sink=_lake_uri(sink, "sink"))  # fmt: skip

    def update(
        self, pairs: PairsLike = None, *, recheck: str | float = "1d",
        windows: Sequence[int] | None = None, mode: str | None = None,
        max_fill: int | None = None, sink: str | None = None,
    ) -> UpdateResult:  # fmt: skip
        """Compute only the bars newer than each pair's metrics hold, and late or corrected
        ones within ``recheck`` (seconds, or ``30m``, ``6h``, ``1d``), by upsert. A pair
        written to a Delta sink is updated there (``sink``: that table; by default the one
        each pair was written to): each changed month in one commit of the whole month."""
        from bqx.pipeline.update import update_once

        return update_once(self._updater(pairs, recheck, windows, mode, max_fill, sink))

    def follow(
        self, interval: float, *, pairs: PairsLike = None, recheck: str | float = "1d",
        metrics_port: int | None = None, stop: threading.Event | None = None,
        on_poll: Callable[[UpdateResult], None] | None = None, listen: bool = True,
        windows: Sequence[int] | None = None, mode: str | None = None,
        max_fill: int | None = None,
    ) -> None:  # fmt: skip
        """Keep the metrics current until ``stop`` is set: update, wait ``interval`` seconds
        (or until bqx's own loads commit bars), repeat; Prometheus metrics on
        ``metrics_port`` (the ``service`` extra)."""
        from bqx.pipeline.update import parse_duration
        from bqx.service.follow import follow

        follow(self.database_ref(), self.layout, interval, pairs=parse_pairs(pairs),
               recheck_s=parse_duration(recheck), metrics_port=metrics_port, listen=listen,
               stop=stop, on_poll=on_poll, windows=check_windows(windows) if windows else None,
               mode=mode, max_fill=max_fill)  # fmt: skip

    # -- reading the ledger --------------------------------------------------------------

    def status(self, *, errors: int = 10) -> Status:
        """Progress of the latest run with jobs, from the ledger; never starts a stopped
        embedded server."""
        from bqx.ops.status import status

        with self.connect(start=False) as conn:
            return status(conn, self.layout, errors=errors)

    def watch_status(self, interval: float = 1.5) -> Iterator[Status | BqxError]:
        """``status()`` every ``interval`` seconds, for ever; while the database is away,
        the error instead (the connection is reopened when it is back)."""
        from bqx.db.connect import connect
        from bqx.ops.status import status

        conn: Any = connect(self.settings, autocommit=True, start=False)  # a bad setup fails now
        try:
            while True:
                try:
                    if conn is None or conn.closed:
                        conn = connect(self.settings, autocommit=True, start=False)
                    yield status(conn, self.layout)
                except BqxError as exc:
                    conn = _closed(conn)
                    yield exc
                except Exception as exc:  # psycopg.OperationalError: the server went away
                    if not _is_operational(exc):
                        raise
                    conn = _closed(conn)
                    yield BqxError(str(exc).strip().splitlines()[0] if str(exc).strip() else
                                   "database unreachable")  # fmt: skip
                time.sleep(interval)
        finally:
            _closed(conn)

    def runs(self, limit: int = 20) -> RunList:
        """The latest runs (id, command, start, duration, jobs, rows, status), newest first."""
        from bqx.store.ledger import Ledger

        with self.connect(start=False) as conn:
            records = Ledger(self.layout).recent_runs(conn, limit)
        return RunList([
            {"run_id": r.run_id, "command": r.command, "status": r.status,
             "started_at": r.started_at.isoformat(timespec="seconds"),
             "ended_at": r.ended_at.isoformat(timespec="seconds") if r.ended_at else None,
             "duration_s": round(r.elapsed_s, 3), "jobs_total": r.jobs_total,
             "jobs_done": r.jobs_done, "jobs_failed": r.jobs_failed,
             "jobs_skipped": r.jobs_skipped, "rows_written": r.rows_written,
             "workers": r.workers, "executor": r.executor, "run_by": r.run_by, "host": r.host}
            for r in records
        ])  # fmt: skip

    def verify(
        self, *, full: bool = False, sample: int = 50, seed: int = 0, run: int | None = None,
        workers: int | None = None, progress: StepFn | None = None,
    ) -> Verification:  # fmt: skip
        """Every stored value recomputed and compared bit for bit, with the structure and the
        ledger (docs/guarantees.md); ``ok`` is True only when every check passes.

        Only the months written or changed since they last passed are read again, unless
        ``full``; they are checked ``workers`` at a time (default: the CPU count)."""
        from bqx.core.params import check_positive
        from bqx.ops.verify import verify

        _check_count("sample", sample)
        if workers is not None:
            check_positive("workers", workers, integer=True)
        with self.connect(start=False) as conn:
            return verify(conn, self.layout, sample=sample, seed=seed, run_id=run,
                          progress=progress, full=full, url=self.database_ref(start=False),
                          workers=workers or os.cpu_count() or 1)  # fmt: skip

    def report(
        self, out: str | Path = "bqx-report", *, run: int | None = None, sample: int = 20,
        verification: Verification | None = None, progress: StepFn | None = None,
    ) -> ReportResult:  # fmt: skip
        """The completion report: ``out/report.md`` and ``out/report.html`` with charts."""
        from bqx.ops.outdir import check_out_dir
        from bqx.ops.report import REPORT_FILES, write_report

        _check_count("sample", sample)
        out = Path(out)
        check_out_dir(out, REPORT_FILES)  # before any work: a bad directory writes nothing
        with self.connect(start=False) as conn:
            md, html, data = write_report(
                conn, self.layout, out, run_id=run, sample=sample, verification=verification,
                progress=progress, url=self.database_ref(start=False), workers=os.cpu_count() or 1,
            )  # fmt: skip
        return ReportResult(md, html, data.headline())

    # -- data out ------------------------------------------------------------------------

    def read_metrics(
        self, pair: str, start: Any = None, end: Any = None,
        columns: str | Sequence[str] | None = None, *, sink: str | None = None,
    ) -> pa.Table:  # fmt: skip
        """A pair's stored rows as a ``pyarrow.Table``: ``ts_utc`` (timestamp[us, UTC]), then
        ``rate`` and the metric columns (or ``columns``: a list, a name, or a comma list),
        NULL where the database has NULL.

        ``start`` is inclusive and ``end`` exclusive: ``read_metrics("EURUSD", "2024-07",
        "2024-08")`` is July 2024; an end before the start is refused. Times may be ISO text,
        datetimes (naive = UTC), numpy or pandas. A pair written to a Delta sink is read from
        it (``sink``: that table, by default the one recorded for the pair)."""
        from bqx.ops.export import read_metrics_conn, read_metrics_lake

        with self.connect() as conn:
            lake = self._lake(conn, [validate_pair(pair)], sink)
            if lake is not None:
                return read_metrics_lake(lake, pair, start, end, columns)
            return read_metrics_conn(conn, self.layout, pair, start, end, columns)

    def _lake(self, conn: psycopg.Connection, pairs: Sequence[str] | None,
              sink: str | None) -> Any:  # fmt: skip
        """The Delta sink the pairs' metrics are in (``sink``, else as recorded), or None."""
        from bqx.pipeline.plan import resolve_sink

        where = resolve_sink(conn, self.layout, pairs, sink)
        if where is None:
            return None
        from bqx.destinations.delta import DeltaLake

        return DeltaLake(where)

    def export(
        self, out: str | Path, *, pairs: PairsLike = None, start: MonthLike | None = None,
        end: MonthLike | None = None, columns: str | Sequence[str] | None = None,
        compression: str = "zstd", progress: StepFn | None = None, bars: bool = False,
        sink: str | None = None,
    ) -> ExportSummary:  # fmt: skip
        """The metrics as Parquet, ``out/pair=…/month=…/data.parquet``, one month at a time;
        afterwards ``out`` holds exactly the table's partitions for the pairs and months
        exported (those the table no longer holds are removed). ``columns``: a subset of the
        metric columns (``ts_utc`` always comes first). ``progress(label, done, total,
        rows=…)`` is called as the months go. Metrics in a Delta sink are read from it
        (``sink``, by default the one recorded for the pairs).

        ``bars``: the source bars instead, as ``out/pair=EURUSD/month=…/data.parquet``
        (``time``, ``open``, ``high``, ``low``, ``close``, ``volume``), the shape
        ``backfill(source=out)`` reads."""
        from bqx.core.months import check_span
        from bqx.ops.export import export, export_bars, export_lake
        from bqx.ops.outdir import check_out_dir

        first, last = _months(start, end)
        check_span(first, last)
        check_out_dir(out, "pair=…/month=… Parquet files", home=self.settings.home_dir)
        with self.connect() as conn:
            if bars:
                if columns is not None:
                    raise InvalidOption("columns", columns, "goes with metrics, not with bars")
                return export_bars(conn, self.layout, Path(out), pairs=parse_pairs(pairs),
                                   start=first, end=last, progress=progress)  # fmt: skip
            lake = self._lake(conn, parse_pairs(pairs), sink)
            if lake is not None:
                return export_lake(lake, Path(out), pairs=parse_pairs(pairs), start=first,
                                   end=last, columns=columns, compression=compression,
                                   progress=progress)  # fmt: skip
            return export(conn, self.layout, Path(out), pairs=parse_pairs(pairs), start=first,
                          end=last, columns=columns, compression=compression,
                          progress=progress)  # fmt: skip

    def features(
        self, out: str | Path, *, pairs: PairsLike = None, start: MonthLike | None = None,
        end: MonthLike | None = None, target: str = "w60_bqx_return", horizon: int = 60,
        split: str | Sequence[float] = "0.7,0.15,0.15", progress: StepFn | None = None,
    ) -> FeaturesSummary:  # fmt: skip
        """ML features per bar, a target ``horizon`` bars ahead, chronological splits with an
        embargo (docs/ml.md). ``progress(label, done, total, rows=…)`` pair by pair."""
        from bqx.ml.features import write_features
        from bqx.ops.outdir import check_out_dir

        first, last = _months(start, end)
        check_out_dir(out, "the split files and manifest.json", home=self.settings.home_dir)
        with self.connect() as conn:
            return write_features(conn, self.layout, Path(out), pairs=parse_pairs(pairs),
                                  start=first, end=last, target=target, horizon=horizon,
                                  split=split, progress=progress)  # fmt: skip

    def baseline(
        self, features: str | Path, *, out: str | Path | None = None, seed: int = 0,
        trees: int = 300, progress: StepFn | None = None,
    ) -> BaselineResult:  # fmt: skip
        """Ridge and LightGBM against a random and a mean baseline on a ``features``
        directory, with a significance test (the ``ml`` extra)."""
        return baseline(features, out=out, seed=seed, trees=trees, progress=progress)

    # -- the tour ------------------------------------------------------------------------

    def demo(
        self, months: int = 3, *, pairs: PairsLike = None, workers: int | None = None,
        out: str | Path = "bqx-report", seed: int = 0, say: Callable[[str], None] = print,
        progress: bool = True, bqx: str = "bqx", replace: bool = False,
    ) -> DemoResult:  # fmt: skip
        """The tour: synthetic bars, backfill, verify, report (docs in README.md). Months
        holding bars bqx did not generate are refused unless ``replace`` (as ``generate``)."""
        return run_demo(self, months=months, pairs=parse_pairs(pairs), workers=workers,
                        out=Path(out), seed=seed, say=say, progress=progress, bqx=bqx,
                        replace=replace)  # fmt: skip


@dataclass
class BaselineResult:
    """The baseline's verdict (``bqx baseline --json``) and the files it wrote."""

    doc: dict[str, Any]
    files: list[Path] = field(default_factory=list)

    @property
    def beats_baselines(self) -> bool:
        return bool(self.doc["beats_baselines"])

    def as_dict(self) -> dict[str, Any]:
        return self.doc

    def text(self) -> str:
        from bqx.ml.baseline import markdown

        return markdown(self.doc)


def baseline(
    features: str | Path, *, out: str | Path | None = None, seed: int = 0, trees: int = 300,
    progress: StepFn | None = None,
) -> BaselineResult:  # fmt: skip
    """``Store.baseline`` without a store: it reads only the features directory.
    ``progress(label, done, total)`` is called as its stages go."""
    from bqx.ml.baseline import OUT_FILES, run_baseline, write_outputs
    from bqx.ops.outdir import check_out_dir

    if out is not None:
        check_out_dir(out, OUT_FILES)  # before the fits: a bad directory wastes no minutes
    doc, arrays = run_baseline(Path(features), seed=seed, trees=trees, progress=progress)
    files = write_outputs(doc, arrays, Path(out)) if out is not None else []
    return BaselineResult(doc, files)


# -- the tour -------------------------------------------------------------------------

DEMO_START = Month(2024, 7)  # the report's first month


@dataclass
class DemoResult:
    bars: int
    generate_s: float
    run: RunSummary
    verify_ok: bool | None = None
    verify: Verification | None = None
    report_dir: Path | None = None
    report_files: list[Path] = field(default_factory=list)
    next_steps: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.run.jobs_failed and self.verify_ok is not False

    def as_dict(self) -> dict[str, Any]:
        """The ``bqx demo --json`` document."""
        return {
            "ok": self.ok, "bars": self.bars, "generate_s": round(self.generate_s, 3),
            "run": self.run.as_dict(),
            "verify": self.verify.as_dict() if self.verify is not None else None,
            "report": {"dir": str(self.report_dir), "files": [str(f) for f in self.report_files]},
            "next": self.next_steps,
        }  # fmt: skip


def run_demo(
    store: Store,
    *,
    months: int = 3,
    pairs: Sequence[str] | None = None,
    workers: int | None = None,
    out: Path = Path("bqx-report"),
    seed: int = 0,
    say: Callable[[str], None] = print,
    progress: bool = True,
    bqx: str = "bqx",
    replace: bool = False,
) -> DemoResult:
    """Generate ``months`` months from 2024-07 for ``pairs`` (default the report's 28), backfill,
    verify and write the report into ``out``. ``bqx`` is how the user runs bqx (the next steps
    are printed with it, so that they run as printed)."""
    pairs = list(pairs or REPORT_PAIRS)
    end = DEMO_START.plus(months - 1)
    say(
        f"1/4 generating {plural(len(pairs), 'pair')} × {plural(months, 'month')} of bars"
        f" ({DEMO_START}..{end})"
    )
    t0 = time.monotonic()
    gen = store.generate(pairs, DEMO_START, end, seed=seed, workers=workers or 2, replace=replace)
    gen_s = time.monotonic() - t0
    say(f"    {plural(gen.bars, 'bar')} in {gen_s:.1f}s")
    say("2/4 backfilling BQX metrics")
    run = store.backfill(pairs, DEMO_START, end, workers=workers, progress=progress)
    result = DemoResult(gen.bars, gen_s, run)
    say(f"    {run.text()}")
    say("3/4 verifying (exact counts, keys, NULLs, recomputed samples, ledger)")
    check = store.verify(sample=20)
    result.verify_ok, result.verify = check.ok, check
    for _ok, line in check.lines():
        say(f"    {line}")
    say("4/4 writing the completion report")
    report = store.report(out, verification=check)
    result.report_dir = out
    result.report_files = [report.markdown, report.html]
    say(f"    {report.markdown}\n    {report.html}  (open it in a browser)")
    result.next_steps = [
        f"{bqx} status", f"{bqx} verify", f"{bqx} report --out {shlex.quote(str(out))}",
        # the URL names the password file: psql reads it, and `ps` shows no password
        f'psql "$({bqx} db url)"',
    ]  # fmt: skip
    say("next steps, to run as printed:")
    for step in result.next_steps:
        say(f"    {step}")
    return result


def _lake_uri(uri: str | Path | None, param: str) -> str | None:
    """A lake location normalised (an absolute path, or s3://bucket/prefix); None stays."""
    if uri is None:
        return None
    from bqx.core.uris import LakeURI

    return LakeURI.parse(uri, param).uri


def _check_count(param: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidOption(param, value, "must be a whole number ≥ 0")


def _given(settings: Settings) -> dict[str, Any]:
    """The settings' values as overrides (the URL unmasked), to build new settings from."""
    url = settings.database_url.get_secret_value() if settings.database_url else None
    return {"database_url": url, "schema_name": settings.schema_name, "home": settings.home,
            "database_url_file": settings.database_url_file,
            "database_secret": settings.database_secret,
            "database_iam": settings.database_iam}  # fmt: skip


def _closed(conn: Any) -> Any:
    """Close ``conn`` if open (a broken one may fail to close); None, to assign."""
    if conn is not None:
        try:
            conn.close()
        except Exception:  # noqa: BLE001 - closing a broken connection may fail too
            pass
    return None


def _is_operational(exc: BaseException) -> bool:
    import psycopg

    return isinstance(exc, psycopg.OperationalError)


__all__ = ["Database", "Store", "baseline"]
