"""The database's own monthly partitions: ``bqx_{pair}`` partitioned by month on ``ts_utc``."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

import numpy as np
import psycopg

from bqx.core.layout import TARGET_RATE, Layout
from bqx.core.months import Month
from bqx.core.params import Job, Params
from bqx.store import catalog, ddl, targets, versions

JobKey = tuple[str, Month]


class PostgresPartitions:
    """Metric rows in ``{schema}.bqx_{pair}``, one partition per month, written in the same
    transaction as the job's ledger row (so the write and "done" commit together)."""

    name = "postgres"

    def __init__(self, layout: Layout) -> None:
        self.layout = layout

    def check(self, conn: psycopg.Connection, params: Params, pair: str) -> None:
        catalog.check_target_columns(conn, self.layout, pair, params.windows)

    def prepare(self, conn: psycopg.Connection, params: Params, jobs: Sequence[Job]) -> None:
        """The targets and partitions the jobs write into, each with the triggers that version
        its months, those missing only: one transaction
        per pair (``conn`` must not be in one), so a run over hundreds of instruments never
        holds more locks than one pair's DDL takes (a lock per new table and index, held to
        the commit: 6,000 new partitions in one transaction exhaust the server's lock table,
        64 × max_connections by default)."""
        months: dict[str, list[Month]] = {}
        for job in jobs:
            months.setdefault(job.pair, []).append(job.month)
        existing = catalog.target_partitions(conn, self.layout, sorted(months))
        for pair, wanted in sorted(months.items()):
            table = self.layout.target_name(pair)
            missing = [m for m in wanted
                       if self.layout.target_partition_name(pair, m) not in existing]  # fmt: skip
            if table in existing and not missing:
                continue
            with conn.transaction():
                ddl.lock_key(conn, f"bqx target {self.layout.schema}.{table} ddl")
                if table not in existing:
                    ddl.create_target_table(conn, self.layout, pair, params.windows)
                for month in missing:
                    ddl.ensure_target_partition(conn, self.layout, pair, month)
        unguarded: dict[str, list[Month]] = {}
        for pair, month in versions.unguarded_targets(
            conn, self.layout, [(j.pair, j.month) for j in jobs]
        ):
            unguarded.setdefault(pair, []).append(month)
        for pair, wanted in sorted(unguarded.items()):
            with conn.transaction(), conn.cursor() as cur:
                for month in wanted:
                    versions.install_target(cur, self.layout, pair, month)

    def ensure_month(
        self, conn: psycopg.Connection, params: Params, pair: str, month: Month
    ) -> None:
        """The pair's table and the month's partition, each only when missing (DDL takes
        strong locks even in its IF NOT EXISTS forms)."""
        if not catalog.has_target(conn, self.layout, pair):
            with conn.transaction():
                ddl.create_target_table(conn, self.layout, pair, params.windows)
        name = self.layout.target_partition_name(pair, month)
        if name not in catalog.target_partitions(conn, self.layout, [pair]):
            with conn.transaction():  # its own short transaction: it locks the parent table
                ddl.ensure_target_partition(conn, self.layout, pair, month)
        if versions.unguarded_targets(conn, self.layout, [(pair, month)]):
            with conn.transaction(), conn.cursor() as cur:
                versions.install_target(cur, self.layout, pair, month)

    def month_states(
        self, conn: psycopg.Connection, params: Params, keys: Sequence[JobKey]
    ) -> dict[JobKey, str]:
        return catalog.partition_states(conn, self.layout, keys)

    def month_versions(
        self, conn: psycopg.Connection, params: Params, pairs: Sequence[str]
    ) -> dict[JobKey, int]:
        return versions.target_versions(conn, self.layout, pairs)

    def month_stamps(
        self, conn: psycopg.Connection, params: Params, pairs: Sequence[str]
    ) -> dict[JobKey, str]:
        return versions.target_counters(conn, self.layout, pairs)

    def month_version(
        self, cur: psycopg.Cursor, params: Params, pair: str, month: Month
    ) -> int | None:
        return versions.target_version(cur, self.layout, pair, month)

    def replace_month(
        self, cur: psycopg.Cursor, params: Params, pair: str, month: Month, times: np.ndarray,
        matrix: np.ndarray,
    ) -> int:  # fmt: skip
        return targets.replace_month(cur, self.layout, params, pair, month, times, matrix)

    def upsert_range(
        self, cur: psycopg.Cursor, params: Params, pair: str, month: Month, lo: datetime,
        times: np.ndarray, matrix: np.ndarray,
    ) -> tuple[int, int, int]:  # fmt: skip
        return targets.upsert_range(cur, self.layout, params, pair, month, lo, times, matrix)

    def count_month(self, cur: psycopg.Cursor, params: Params, pair: str, month: Month) -> int:
        return targets.count_month(cur, self.layout, pair, month)

    def read_month(
        self, conn: psycopg.Connection, params: Params, pair: str, month: Month
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        cols = [TARGET_RATE, *params.columns]
        return targets.read_columns(conn, self.layout, pair, cols, month.start, month.end,
                                    ordered=False)  # fmt: skip
