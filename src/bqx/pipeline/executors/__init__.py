"""Where jobs run. Every executor only starts workers that claim jobs from the ledger; the
ledger, not the executor, decides which job runs where, so an executor that runs a task twice
can never write a month twice."""

from __future__ import annotations

from datetime import date
from typing import TYPE_CHECKING, Protocol

from bqx.errors import BqxError, InvalidOption

if TYPE_CHECKING:
    from bqx.core.params import Params
    from bqx.db.connect import DatabaseLike

EXECUTORS = ("local", "threads", "dask")


class ExecutorLost(BqxError):
    """The place where the workers run went away mid-run (a Dask scheduler killed): the run
    stops, recorded interrupted, and the same command resumes it."""


class Executor(Protocol):
    """What the run needs from a place where workers run.

    A worker claims jobs among ``keys`` from the ledger until none is claimable, then ends.
    Worker ids are the ``worker`` column of the ledger (``host:pid`` for local processes).
    """

    name: str
    workers: int  # how many workers to keep running while jobs are claimable

    def spawn(
        self, url: DatabaseLike, params: Params, run_id: int, keys: list[tuple[str, date]]
    ) -> None:
        """Start one more worker."""

    def reap(self) -> list[tuple[str, str]]:
        """Forget finished workers; return (worker id, why) of those that ended abnormally."""

    def live(self) -> set[str]:
        """Ids of the workers running now."""

    def kill(self, worker: str) -> None:
        """Stop a worker at once (its job timed out); its transaction dies with it."""

    def shutdown(self) -> list[str]:
        """Stop every worker; return their ids. Idempotent."""


def check_executor(name: str, scheduler: str | None = None) -> None:
    """Refuse an unknown executor, a scheduler without Dask, or Dask without the "dask"
    extra, before anything is done."""
    if name not in EXECUTORS:
        raise InvalidOption("executor", name, f"expected one of {', '.join(EXECUTORS)}")
    if scheduler is not None and name != "dask":
        raise InvalidOption("scheduler", scheduler, 'a scheduler goes with executor "dask"')
    if name == "dask":  # without the "dask" extra: one line now, not after the run is recorded
        from bqx.extras import require
        from bqx.pipeline.executors.dask import FEATURE

        require("dask", "distributed", FEATURE)


def make_executor(name: str, workers: int, scheduler: str | None = None) -> Executor:
    """The executor called ``name`` with room for ``workers`` workers."""
    check_executor(name, scheduler)
    if name == "local":
        from bqx.pipeline.executors.local import LocalExecutor

        return LocalExecutor(workers)
    if name == "threads":
        from bqx.pipeline.executors.threads import ThreadExecutor

        return ThreadExecutor(workers)
    from bqx.pipeline.executors.dask import DaskExecutor

    return DaskExecutor(workers, scheduler)
