"""The backfill: plan (pair, month) jobs, run them on workers, record everything in the ledger.

The way a job goes, one module each:

- ``plan``: parameters, preflight checks, the (pair, month) jobs and their source signatures;
- ``ledger``: the runs, jobs and attempts tables, and claiming a job;
- ``job``: one job: read bars with their lookback, compute, atomically replace the month;
- ``executors``: where jobs run (``local`` processes, or a Dask cluster);
- ``run``: a whole run: preflight, plan, execute, watch, summarise.
"""

from bqx.backfill.job import JobRunner, compute_month, read_series
from bqx.backfill.ledger import HEARTBEAT_INTERVAL_S, STALE_AFTER_S, Ledger, worker_is_dead
from bqx.backfill.plan import (
    MODES,
    SOURCE_CHECKS,
    BackfillPlan,
    Job,
    NothingToPlan,
    Params,
    RunSummary,
    init,
    plan_backfill,
    preflight,
)
from bqx.backfill.run import backfill

__all__ = [
    "HEARTBEAT_INTERVAL_S", "MODES", "STALE_AFTER_S", "Job", "JobRunner", "Ledger", "Params",
    "RunSummary", "backfill", "compute_month", "init", "preflight", "read_series",
    "SOURCE_CHECKS", "BackfillPlan", "NothingToPlan", "plan_backfill",
    "worker_is_dead",
]  # fmt: skip
