"""Metrics in a Delta Lake table, on a local disk or S3-compatible object storage (docs/lake.md).

One table for every pair, partitioned by ``pair`` (upper case, as bqx shows pairs) and
``month`` (``YYYY-MM``), with the columns of the database's target (``ts_utc``, ``rate``,
``created_at``, the metric columns; NULL where the database has NULL). A job replaces exactly
its (pair, month) in ONE Delta commit (an overwrite whose predicate names the partition), so
a reader sees the month before or after, never half of it; a worker killed before the commit
leaves the month as it was, one killed after it leaves the new month, which the next run
rewrites identically (the ledger did not say done).

The ledger stays in PostgreSQL. The write happens while the job's transaction holds its ledger
row, so no two bqx writers commit the same month at once; commits of different months from any
number of workers are retried by delta-rs on conflict (``max_commit_retries``), never lost. A
month's version is a digest of the files the Delta log lists for it: a job records it after its
commit, and any later commit that touches the month (another writer, a DELETE, OPTIMIZE)
changes it, so resume redoes that month; a month whose files are gone from storage is
``missing``.

``deltalake`` is the ``lake`` extra, imported through ``bqx.extras.require``.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import psycopg
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from bqx.core.layout import TARGET_RATE, TARGET_TIME
from bqx.core.months import Month
from bqx.core.params import Job, Params
from bqx.core.uris import LakeURI
from bqx.db.connect import worker_id
from bqx.errors import BqxError
from bqx.extras import require
from bqx.store.ddl import lock_key

JobKey = tuple[str, Month]
FEATURE = "a Delta Lake sink or source"
PARTITIONS = ["pair", "month"]
MAX_COMMIT_RETRIES = 200  # commits of other months conflict only in the log: retry, never lose
COMMIT_ATTEMPTS = 5  # a conflict delta-rs does not resolve itself: reread the log, try again
ROW_GROUP_ROWS = 1 << 17  # a month of minute bars (~31,000) is one row group


def deltalake() -> Any:
    """The ``deltalake`` package, or one line naming the ``lake`` extra."""
    return require("lake", "deltalake", FEATURE)


def parquet_options(columns: Sequence[str]) -> dict[str, Any]:
    """``pyarrow.parquet.write_table`` options of a month's file: Parquet that pays for
    float columns. Byte-stream-split (each byte plane of the doubles compresses on its own,
    so zstd finds the slowly varying exponent and high mantissa bytes), no dictionary (every
    value differs), zstd level 1 (level 3 saves 0.5 % of the bytes for half again the CPU);
    sorted times delta-encoded; ``created_at`` (one value per file) dictionary-encoded; one
    row group per month; statistics for ``ts_utc`` only (a month is read whole; those of 38
    float columns cost CPU on every write)."""
    floats = [c for c in columns if c not in (TARGET_TIME, "created_at")]
    return {
        "compression": "zstd", "compression_level": 1, "use_dictionary": ["created_at"],
        "column_encoding": {**dict.fromkeys(floats, "BYTE_STREAM_SPLIT"),
                            TARGET_TIME: "DELTA_BINARY_PACKED"},
        "row_group_size": ROW_GROUP_ROWS, "write_statistics": [TARGET_TIME],
    }  # fmt: skip


def _stat_time(t: datetime, *, up: bool) -> str:
    """A time as Delta statistics write it (ISO, milliseconds, UTC), rounded outwards so
    that pruning never skips a row."""
    t = t.astimezone(UTC) if t.tzinfo else t.replace(tzinfo=UTC)
    ms = t.replace(microsecond=t.microsecond // 1000 * 1000)
    if up and ms < t:
        ms += timedelta(milliseconds=1)
    return ms.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ms.microsecond // 1000:03d}Z"


def schema(columns: Sequence[str]) -> Any:
    """The table's Arrow schema: partition columns, then the database target's columns."""
    ts = pa.timestamp("us", tz="UTC")
    return pa.schema([
        pa.field("pair", pa.string(), nullable=False), pa.field("month", pa.string(), False),
        pa.field(TARGET_TIME, ts, False), pa.field(TARGET_RATE, pa.float64(), False),
        pa.field("created_at", ts, False),
        *(pa.field(c, pa.float64(), True) for c in columns),
    ])  # fmt: skip


def _quote(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def partition_predicate(pair: str, month: Month) -> str:
    return f"pair = {_quote(pair.upper())} AND month = {_quote(str(month))}"


def _digest(paths: Sequence[str]) -> int:
    """A 63-bit version of a month from the files that hold it (never 0: that is "none")."""
    text = "\n".join(sorted(paths)).encode()
    return int.from_bytes(hashlib.sha256(text).digest()[:8], "big") >> 1 or 1


def arrow_rows(
    params: Params, pair: str, month: Month, times: np.ndarray, matrix: np.ndarray,
    created: datetime | None = None,
) -> Any:  # fmt: skip
    """A month's computed rows as an Arrow table of the sink's schema (NULL where NaN)."""
    n = len(times)
    ts = pa.timestamp("us", tz="UTC")
    now = pa.scalar((created or datetime.now(UTC)).astimezone(UTC), ts)
    arrays = [
        pa.repeat(pa.scalar(pair.upper()), n), pa.repeat(pa.scalar(str(month)), n),
        pa.array(np.asarray(times, "datetime64[us]"), ts), pa.array(matrix[0]),
        pa.repeat(now, n),
    ]  # fmt: skip
    nan = np.isnan(matrix[1:])  # one pass for every column; masks only where a NaN is
    has = nan.any(axis=1)
    for row, mask, any_nan in zip(matrix[1:], nan, has, strict=True):
        arrays.append(pa.array(row, mask=mask if any_nan else None))
    return pa.Table.from_arrays(arrays, schema=schema(params.columns))


class DeltaLake:
    """Metric rows in one Delta table at ``uri`` (a local path or ``s3://bucket/prefix``)."""

    name = "delta"

    def __init__(self, uri: str | LakeURI) -> None:
        self.lake = uri if isinstance(uri, LakeURI) else LakeURI.parse(uri)
        self.uri = self.lake.uri
        self.options = self.lake.storage_options()
        self._table: Any = None  # this worker's DeltaTable, kept current by its own writes
        # one DeltaTable per object, used by one thread at a time (verify reads months from
        # several threads: concurrent refreshes of one table object hang on S3)
        self._lock = threading.RLock()
        self.last_commit: int | None = None  # the table version of this object's last write

    def __repr__(self) -> str:
        return f"DeltaLake({self.uri!r})"

    # -- the table -----------------------------------------------------------------------

    def table(self, *, fresh: bool = True) -> Any | None:
        """The table at its latest version (None when there is none yet)."""
        with self._lock:
            return self._load(fresh)

    def _load(self, fresh: bool) -> Any | None:
        dl = deltalake()
        if self._table is not None:
            if fresh:
                self._table.update_incremental()
            return self._table
        try:
            self._table = dl.DeltaTable(self.uri, storage_options=self.options)
        except dl.exceptions.TableNotFoundError:
            return None
        except OSError as exc:
            raise BqxError(f"cannot read the Delta table at {self.uri}: {_one_line(exc)}") from None
        return self._table

    def files(self, pairs: Sequence[str] | None = None) -> dict[JobKey, list[tuple[str, int]]]:
        """(pair, month) -> [(file path, rows)] as the latest version of the log lists them."""
        with self._lock:
            dt = self.table()
            return {} if dt is None else _listed(dt, pairs)

    def _stored(self) -> set[str]:
        """The data files present in storage (one listing of the table's directory tree)."""
        import pyarrow.fs as pafs

        fs, root = self.lake.filesystem()
        infos = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
        start = len(root.rstrip("/")) + 1
        return {i.path[start:] for i in infos if i.type == pafs.FileType.File}

    # -- Destination ---------------------------------------------------------------------

    def check(self, conn: psycopg.Connection, params: Params, pair: str) -> None:
        """Refuse a table whose columns are not the parameters' (other windows)."""
        with self._lock:
            dt = self.table()
            if dt is None:
                return
            have = pa.schema(dt.schema()).names
            want = schema(params.columns).names
            if have != want:
                missing = [c for c in want if c not in have]
                extra = [c for c in have if c not in want]
                raise BqxError(
                    f"the Delta table at {self.uri} has other columns than windows"
                    f" {','.join(map(str, params.windows))} give (missing:"
                    f" {', '.join(missing) or '-'};"
                    f" extra: {', '.join(extra) or '-'}): use another sink or the windows it holds"
                )

    def prepare(self, conn: psycopg.Connection, params: Params, jobs: Sequence[Job]) -> None:
        """Create the empty, partitioned table when there is none. Two runs on one ledger
        create it one at a time (an advisory lock in the ledger's database), so the second
        finds the first's: delta-rs's ``mode="ignore"`` alone still commits a second version
        of the table's metadata when it loses that race."""
        if self.table() is not None:
            return
        dl = deltalake()
        with conn.transaction():
            lock_key(conn, f"bqx delta create {self.uri}")
            if self.table() is not None:
                return
            try:
                dl.DeltaTable.create(self.uri, schema(params.columns), partition_by=PARTITIONS,
                                     mode="ignore", storage_options=self.options)  # fmt: skip
            except OSError as exc:
                raise BqxError(
                    f"cannot create the Delta table at {self.uri}: {_one_line(exc)}"
                ) from None
        self._table = None
        self.check(conn, params, jobs[0].pair if jobs else "")

    def month_states(
        self, conn: psycopg.Connection, params: Params, keys: Sequence[JobKey]
    ) -> dict[JobKey, str]:
        """'missing' (no file in the log, or a listed file gone from storage), 'empty' or
        'ok' per month asked."""
        if not keys:
            return {}
        files = self.files(sorted({p for p, _ in keys}))
        stored = self._stored() if any(k in files for k in keys) else set()
        out = {}
        for key in keys:
            listed = files.get(key, [])
            if not listed or any(path not in stored for path, _ in listed):
                out[key] = "missing"
            else:
                out[key] = "ok" if sum(rows for _, rows in listed) else "empty"
        return out

    def month_versions(
        self, conn: psycopg.Connection, params: Params, pairs: Sequence[str]
    ) -> dict[JobKey, int]:
        return {k: _digest([p for p, _ in v]) for k, v in self.files(pairs).items()}

    def month_stamps(
        self, conn: psycopg.Connection, params: Params, pairs: Sequence[str]
    ) -> dict[JobKey, str]:
        return {k: f"delta:{_digest([p for p, _ in v])}" for k, v in self.files(pairs).items()}

    def month_version(
        self, cur: psycopg.Cursor | None, params: Params, pair: str, month: Month
    ) -> int | None:
        """The month's version as this object's last commit left it (else the latest)."""
        with self._lock:
            dt = self.table(fresh=self.last_commit is None)
            if dt is None:
                return None
            if self.last_commit is not None and dt.version() != self.last_commit:
                dt = deltalake().DeltaTable(self.uri, version=self.last_commit,
                                            storage_options=self.options)  # fmt: skip
            listed = _listed(dt, [pair]).get((pair.lower(), month))
            return _digest([p for p, _ in listed]) if listed else None

    def replace_month(
        self, cur: psycopg.Cursor | None, params: Params, pair: str, month: Month,
        times: np.ndarray, matrix: np.ndarray,
    ) -> int:  # fmt: skip
        """One commit that makes the (pair, month) partition hold exactly these rows."""
        self.commit(params, pair, month, arrow_rows(params, pair, month, times, matrix))
        return len(times)

    def commit(self, params: Params, pair: str, month: Month, rows: Any) -> int:
        """Replace the partition with ``rows`` in one commit; the table version committed.

        The month's file is written first (by pyarrow: the same Parquet as delta-rs writes,
        for half its CPU), under a name no other write uses; then one commit adds it and
        removes the month's current files. The table is brought to its latest version before
        the commit, and a commit that still conflicts (another writer of the same month
        outside bqx) is tried again on the newer version. A file whose commit never happens
        is in no version: no reader sees it, and a vacuum removes it."""
        dl = deltalake()
        props = dl.CommitProperties(
            max_commit_retries=MAX_COMMIT_RETRIES,
            # which process wrote it: the table's history names the worker (host:pid)
            custom_metadata={"bqx.pair": pair.upper(), "bqx.month": str(month),
                             "bqx.writer": worker_id()},
        )  # fmt: skip
        add = self._write_file(pair, month, rows) if rows.num_rows else None
        with self._lock:
            dt: Any = None
            for attempt in range(COMMIT_ATTEMPTS):
                dt = self.table()
                if dt is None:
                    raise BqxError(f"no Delta table at {self.uri}: it was removed during the run")
                try:
                    if add is not None:
                        dt.create_write_transaction(
                            [add], mode="overwrite", schema=dt.schema(), partition_by=PARTITIONS,
                            partition_filters=[("pair", "=", pair.upper()),
                                               ("month", "=", str(month))],
                            commit_properties=props,
                        )  # fmt: skip
                    elif _listed(dt, [pair]).get((pair.lower(), month)):
                        dt.delete(partition_predicate(pair, month), commit_properties=props)
                    break
                except dl.exceptions.CommitFailedError:
                    if attempt == COMMIT_ATTEMPTS - 1:
                        raise
                except OSError as exc:
                    raise BqxError(f"{pair.upper()} {month}: writing {self.uri} failed:"
                                   f" {_one_line(exc)}") from None  # fmt: skip
            dt.update_incremental()  # the version this commit made (or a later one)
            self.last_commit = dt.version()
            return int(self.last_commit)

    def _write_file(self, pair: str, month: Month, rows: Any) -> Any:
        """Write the month's Parquet file into its partition folder; its add action."""
        body = rows.drop_columns([c for c in PARTITIONS if c in rows.column_names])
        name = f"pair={pair.upper()}/month={month}/part-{uuid.uuid4().hex}-bqx.zstd.parquet"
        fs, root = self.lake.filesystem()
        try:
            fs.create_dir(f"{root}/pair={pair.upper()}/month={month}", recursive=True)
            with fs.open_output_stream(f"{root}/{name}") as out:
                pq.write_table(body, out, **parquet_options(body.column_names))
            size = fs.get_file_info(f"{root}/{name}").size
        except OSError as exc:
            raise BqxError(f"{pair.upper()} {month}: writing {self.uri} failed:"
                           f" {_one_line(exc)}") from None  # fmt: skip
        times = body.column(TARGET_TIME)
        lo, hi = pc.min_max(times).values()
        stats = {
            "numRecords": body.num_rows,
            "minValues": {TARGET_TIME: _stat_time(lo.as_py(), up=False)},
            "maxValues": {TARGET_TIME: _stat_time(hi.as_py(), up=True)},
            "nullCount": {TARGET_TIME: 0},
        }
        return deltalake().transaction.AddAction(
            path=name, size=int(size), partition_values={"pair": pair.upper(),
                                                         "month": str(month)},
            modification_time=int(time.time() * 1000), data_change=True,
            stats=json.dumps(stats),
        )  # fmt: skip

    def upsert_range(
        self, cur: psycopg.Cursor | None, params: Params, pair: str, month: Month, lo: datetime,
        times: np.ndarray, matrix: np.ndarray,
    ) -> tuple[int, int, int]:  # fmt: skip
        """The month's rows at or after ``lo`` made these rows, in one commit of the whole
        month (so updates never leave small files): rows before ``lo`` and rows whose values
        did not change keep their ``created_at``. Nothing is committed when nothing changed."""
        old = self.read_table(pair, month.start, month.end)
        new = arrow_rows(params, pair, month, times, matrix).drop_columns(PARTITIONS)
        merged, counts = merge_rows(old, new, lo, params.columns)
        if sum(counts):
            self.commit(params, pair, month, with_partitions(merged, pair, month))
        else:
            self.last_commit = None  # nothing committed: the month's version is today's
        return counts

    def count_month(
        self, cur: psycopg.Cursor | None, params: Params, pair: str, month: Month
    ) -> int:
        return sum(rows for _, rows in self.files([pair]).get((pair.lower(), month), []))

    def read_month(
        self, conn: psycopg.Connection | None, params: Params, pair: str, month: Month
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        cols = [TARGET_RATE, *params.columns]
        table = self.read_table(pair, month.start, month.end, cols)
        times = np.asarray(table.column(TARGET_TIME).to_numpy(), "datetime64[us]")
        values = np.empty((len(cols), table.num_rows))
        nulls = np.zeros((len(cols), table.num_rows), dtype=bool)
        for i, c in enumerate(cols):
            col = table.column(c)
            nulls[i] = col.is_null().to_numpy(zero_copy_only=False)
            values[i] = col.fill_null(np.nan).to_numpy()
        return times, values, nulls

    # -- readers -------------------------------------------------------------------------

    def read_table(
        self, pair: str, lo: datetime | None = None, hi: datetime | None = None,
        columns: Sequence[str] | None = None,
    ) -> Any:  # fmt: skip
        """A pair's rows with ``lo <= ts_utc < hi`` as an Arrow table sorted by ``ts_utc``:
        ``ts_utc`` then ``columns`` (default every column but the partition ones)."""
        cols = None if columns is None else [TARGET_TIME, *columns]
        filters: list[tuple[str, str, Any]] = [("pair", "=", pair.upper())]
        months = _months_between(lo, hi)
        if months is not None:
            filters.append(("month", "in", [str(m) for m in months]))
        with self._lock:
            dt = self.table()
            dataset = None if dt is None else dt.to_pyarrow_dataset(file_pruning_predicate=filters)
        if dataset is None:
            table = schema([]).empty_table()
        else:
            expr = None
            for op, bound in ((">=", lo), ("<", hi)):
                if bound is not None:
                    ts = pa.scalar(bound.astimezone(UTC) if bound.tzinfo else bound.replace(
                        tzinfo=UTC), pa.timestamp("us", tz="UTC"))  # fmt: skip
                    e = pc.field(TARGET_TIME) >= ts if op == ">=" else pc.field(TARGET_TIME) < ts
                    expr = e if expr is None else expr & e
            table = dataset.to_table(columns=cols, filter=expr)
        if cols is None:
            table = table.drop_columns([c for c in PARTITIONS if c in table.column_names])
        return table.sort_by(TARGET_TIME)

    def rows_at(
        self, pair: str, columns: Sequence[str], times: Sequence[datetime]
    ) -> list[tuple[Any, ...]]:
        """(ts_utc, rate, *columns) of the stored rows at ``times``, None where NULL."""
        if not times:
            return []
        table = self.read_table(pair, min(times), max(times) + timedelta(microseconds=1),
                                [TARGET_RATE, *columns])  # fmt: skip
        wanted = pa.array([t.astimezone(UTC) for t in times], pa.timestamp("us", tz="UTC"))
        table = table.filter(pc.is_in(table.column(TARGET_TIME), value_set=wanted))
        return [tuple(r.values()) for r in table.to_pylist()]

    def newest(self, pair: str) -> datetime | None:
        """The newest ``ts_utc`` of a pair (from the log's file statistics)."""
        with self._lock:
            dt = self.table()
            if dt is None:
                return None
            actions = pa.table(dt.get_add_actions(flatten=True))
            key = f"max.{TARGET_TIME}"
            if key not in actions.column_names:
                return None
            best = None
            for p, t in zip(actions.column("partition.pair").to_pylist(),
                            actions.column(key).to_pylist(), strict=True):  # fmt: skip
                if p == pair.upper() and t is not None and (best is None or t > best):
                    best = t
            if best is None:
                return None
            return best if best.tzinfo else best.replace(tzinfo=UTC)

    def columns(self) -> list[str] | None:
        """``rate`` and the metric columns of the table, in table order (None: no table)."""
        with self._lock:
            dt = self.table()
            if dt is None:
                return None
            return [n for n in pa.schema(dt.schema()).names
                    if n not in (*PARTITIONS, TARGET_TIME, "created_at")]  # fmt: skip

    def pairs(self) -> list[str]:
        return sorted({p for p, _ in self.files()})


def _listed(dt: Any, pairs: Sequence[str] | None) -> dict[JobKey, list[tuple[str, int]]]:
    """(pair, month) -> [(file path, rows)] of a table version's add actions."""
    actions = pa.table(dt.get_add_actions(flatten=True))
    want = None if pairs is None else {p.upper() for p in pairs}
    out: dict[JobKey, list[tuple[str, int]]] = {}
    cols = [actions.column(c).to_pylist() for c in
            ("partition.pair", "partition.month", "path", "num_records")]  # fmt: skip
    for pair, month, path, rows in zip(*cols, strict=True):
        if want is None or pair in want:
            out.setdefault((pair.lower(), Month.parse(month)), []).append((path, int(rows or 0)))
    return out


def with_partitions(table: Any, pair: str, month: Month) -> Any:
    """``table`` with the partition columns in front."""
    n = table.num_rows
    table = table.add_column(0, "month", pa.array([str(month)] * n, pa.string()))
    return table.add_column(0, "pair", pa.array([pair.upper()] * n, pa.string()))


def _months_between(lo: datetime | None, hi: datetime | None) -> list[Month] | None:
    if lo is None or hi is None:
        return None
    from bqx.core.months import month_range

    last = Month.of(hi) if hi > Month.of(hi).start else Month.of(hi).prev()
    first = Month.of(lo)
    return month_range(first, last) if first <= last else []


def merge_rows(
    old: Any, new: Any, lo: datetime, columns: Sequence[str]
) -> tuple[Any, tuple[int, int, int]]:  # fmt: skip
    """The month after an upsert from ``lo``: ``old`` rows before ``lo``, then ``new``'s rows
    (which start at ``lo``), each keeping its old ``created_at`` when its values are bit for
    bit the old ones. Returns (table, (inserted, updated, deleted))."""
    at = np.datetime64(lo.astimezone(UTC).replace(tzinfo=None), "us")
    old_t = np.asarray(old.column(TARGET_TIME).to_numpy(), "datetime64[us]")
    keep = old_t < at
    tail = old.filter(pa.array(~keep))
    tail_t = old_t[~keep]
    new_t = np.asarray(new.column(TARGET_TIME).to_numpy(), "datetime64[us]")
    _, io, ino = np.intersect1d(tail_t, new_t, return_indices=True)
    same = np.ones(len(io), dtype=bool)
    for c in [TARGET_RATE, *columns]:
        a, b = tail.column(c).take(io), new.column(c).take(ino)
        an, bn = a.is_null().to_numpy(zero_copy_only=False), b.is_null().to_numpy(
            zero_copy_only=False)  # fmt: skip
        av = a.fill_null(0.0).to_numpy().view(np.int64)
        bv = b.fill_null(0.0).to_numpy().view(np.int64)
        same &= (an == bn) & ((av == bv) | an)
    created = new.column("created_at").to_numpy().copy()
    created[ino[same]] = tail.column("created_at").to_numpy()[io[same]]
    ts = pa.timestamp("us", tz="UTC")
    new = new.set_column(new.schema.get_field_index("created_at"), "created_at",
                         pa.array(np.asarray(created, "datetime64[us]"), ts))  # fmt: skip
    inserted = len(new_t) - len(io)
    updated = int((~same).sum())
    deleted = len(tail_t) - len(io)
    head = old.filter(pa.array(keep)).select(new.column_names)
    merged = pa.concat_tables([head.cast(new.schema), new])
    return merged, (inserted, updated, deleted)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:300] if text else type(exc).__name__
