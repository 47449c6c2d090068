"""Where metrics go: the seam between a job's computed rows and the store that keeps them.

A destination takes a month of computed rows and makes the store hold exactly them
(``replace_month``: a backfill job), or the rows from a time on (``upsert_range``: an
update), inside the write transaction of the job's ledger row, so that the ledger never says
"done" for rows that are not there. ``PostgresPartitions`` (the database's monthly
partitions) and ``DeltaLake`` (one Delta Lake table on a disk or S3, ``delta.py``) implement
it; ``bqx.pipeline.plan.default_destination`` picks one from the parameters (docs/architecture.md,
docs/lake.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Protocol

import numpy as np
import psycopg

from bqx.core.months import Month
from bqx.core.params import Job, Params

JobKey = tuple[str, Month]


class Destination(Protocol):
    """What the pipeline needs from a place that keeps metric rows."""

    name: str

    def check(self, conn: psycopg.Connection, params: Params, pair: str) -> None:
        """Refuse, before anything is written, to write ``params``' columns for ``pair``."""

    def prepare(self, conn: psycopg.Connection, params: Params, jobs: Sequence[Job]) -> None:
        """Create what the jobs will write into (tables, partitions); idempotent. ``conn`` is
        in no transaction: the work may be committed in parts (a transaction per pair)."""

    def month_states(
        self, conn: psycopg.Connection, params: Params, keys: Sequence[JobKey]
    ) -> dict[JobKey, str]:
        """'ok', 'missing' or 'empty' per (pair, month): resume redoes what is not 'ok'."""

    def month_versions(
        self, conn: psycopg.Connection, params: Params, pairs: Sequence[str]
    ) -> dict[JobKey, int]:
        """The version of each month's stored metrics (a new one for every write, bqx's or
        anyone's), for the months that have one."""

    def month_stamps(
        self, conn: psycopg.Connection, params: Params, pairs: Sequence[str]
    ) -> dict[JobKey, str]:
        """A stamp per stored month that moves with any write to it, even one that bypasses
        the versions (write counters, a table version): what ``verify`` compares to know a
        month is unchanged since it was last verified."""

    def month_version(
        self, cur: psycopg.Cursor, params: Params, pair: str, month: Month
    ) -> int | None:
        """The month's version as this transaction sees it (after its own write)."""

    def replace_month(
        self, cur: psycopg.Cursor, params: Params, pair: str, month: Month, times: np.ndarray,
        matrix: np.ndarray,
    ) -> int:  # fmt: skip
        """Make the month hold exactly these rows (matrix: rate, then the metric columns, ×
        rows); return the rows written."""

    def upsert_range(
        self, cur: psycopg.Cursor, params: Params, pair: str, month: Month, lo: datetime,
        times: np.ndarray, matrix: np.ndarray,
    ) -> tuple[int, int, int]:  # fmt: skip
        """Make the month's rows at or after ``lo`` these rows (matrix as for
        ``replace_month``); return (inserted, updated, deleted)."""

    def count_month(self, cur: psycopg.Cursor, params: Params, pair: str, month: Month) -> int:
        """Rows the month holds now."""

    def read_month(
        self, conn: psycopg.Connection, params: Params, pair: str, month: Month
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The month's rows as stored: (times datetime64[us], values, nulls), values and nulls
        (1 + metric columns) × rows (the rate, then the metric columns), NaN where NULL."""
