"""Threads executor: N workers as threads of the driver process (docs/scaling.md).

A job spends its time in the database, in the numba kernel and in the COPY codec, all of
which release the GIL, so threads run jobs side by side as processes do. What they save is
each process's start: a fresh interpreter spends about a CPU-second importing numpy, numba
and psycopg and loading the kernel, and on a small machine that second comes out of the
cores the server needs (docs/performance.md).

A thread cannot be killed. A job past its timeout, or a run stopped by Ctrl-C, is stopped
through the database instead: the worker's session is cancelled and ended, so its write
transaction rolls back and the month stays as it was, and the worker takes no further job.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass, field
from datetime import date

import psycopg

from bqx.core.params import Params
from bqx.db.connect import DatabaseLike, worker_id
from bqx.errors import BqxError
from bqx.pipeline.job import JobRunner


@dataclass
class _Worker:
    runner: JobRunner
    error: str | None = None  # why the worker ended abnormally
    done: threading.Event = field(default_factory=threading.Event)


class ThreadExecutor:
    """N worker threads in this process, each claiming jobs from the ledger."""

    name = "threads"

    def __init__(self, workers: int) -> None:
        self.workers = max(1, workers)
        self.running: dict[str, _Worker] = {}
        self.stopped: list[_Worker] = []
        self.count = 0

    def spawn(
        self, url: DatabaseLike, params: Params, run_id: int, keys: list[tuple[str, date]]
    ) -> None:
        self.count += 1
        # host:pid#n: unique per thread, and the pid still tells a restart whether the
        # process that held a job is alive
        worker = f"{worker_id()}#{self.count}"
        w = _Worker(JobRunner(url, params, run_id, worker=worker))
        self.running[worker] = w
        name = f"bqx-worker-{self.count}"
        threading.Thread(target=self._loop, args=(w, keys), daemon=True, name=name).start()

    @staticmethod
    def _loop(w: _Worker, keys: list[tuple[str, date]]) -> None:
        runner = w.runner
        try:
            runner.loop(keys)
        except (psycopg.Error, BqxError) as exc:
            if not runner.stopped.is_set():  # the database went away between jobs
                w.error = f"lost the database ({str(exc).strip().splitlines()[0]})"
        except BaseException as exc:  # noqa: BLE001 - a bug must end the worker, not the run
            w.error = f"{type(exc).__name__}: {exc}"
        finally:
            runner.close()
            w.done.set()

    def reap(self) -> list[tuple[str, str]]:
        """Forget finished workers; return (worker id, why) of those that ended abnormally."""
        out = []
        for worker, w in list(self.running.items()):
            if w.done.is_set():
                del self.running[worker]
                if w.error is not None:
                    out.append((worker, f"worker {worker} ended: {w.error}"))
        return out

    def live(self) -> set[str]:
        return {worker for worker, w in self.running.items() if not w.done.is_set()}

    def kill(self, worker: str) -> None:
        """Stop a worker whose job timed out: cancel its statement, take no further job.

        The driver then ends its session, which rolls its write transaction back.
        """
        w = self.running.pop(worker, None)
        if w is not None:
            self._stop(w)

    def _stop(self, w: _Worker) -> None:
        w.runner.stopped.set()
        with contextlib.suppress(Exception):
            if w.runner.conn is not None and not w.runner.conn.closed:
                w.runner.conn.cancel_safe(timeout=2)
        self.stopped.append(w)

    def shutdown(self) -> list[str]:
        """Stop every worker; return their ids. The driver ends their sessions, which ends
        any statement a cancel did not reach; threads still running then are left to end."""
        ids = list(self.running)
        for w in list(self.running.values()):
            self._stop(w)
        self.running = {}
        for w in self.stopped:
            w.done.wait(timeout=5)
        self.stopped = [w for w in self.stopped if not w.done.is_set()]
        return ids
