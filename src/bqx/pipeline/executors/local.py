"""Local executor: N worker processes on this machine, watched by the parent."""

from __future__ import annotations

import contextlib
import pickle
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import date

import psycopg

from bqx.core.params import Params
from bqx.db.connect import DatabaseLike, worker_id
from bqx.errors import BqxError
from bqx.pipeline.job import JobRunner

# -- local worker processes ---------------------------------------------------------------


def _die_with_parent() -> None:
    """Linux: the kernel kills this worker when the parent dies, so none is ever orphaned."""
    if sys.platform.startswith("linux"):
        import ctypes

        with contextlib.suppress(Exception):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def worker_main(
    url: DatabaseLike, params: Params, run_id: int, keys: list[tuple[str, date]]
) -> None:
    """A worker process: claim and run jobs among ``keys`` until none is claimable."""
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and stops us
    runner = JobRunner(url, params, run_id)
    try:
        runner.loop(keys)
    except (psycopg.Error, BqxError):
        # the database went away between jobs: the parent sees the exit code, hands the job
        # back and says so once; a traceback per worker would only bury that line
        sys.exit(LOST_DATABASE_EXIT)
    finally:
        runner.close()


LOST_DATABASE_EXIT = 3


@dataclass
class _Proc:
    process: subprocess.Popen[bytes]
    worker: str = ""


class LocalExecutor:
    """N worker processes on this machine (``python -m bqx._worker``), watched by the parent.

    Workers are fresh interpreters fed their arguments on stdin, rather than multiprocessing
    children, so that a caller's ``__main__`` is never re-imported and nothing is inherited.
    """

    name = "local"

    def __init__(self, workers: int) -> None:
        self.workers = max(1, workers)
        self.procs: list[_Proc] = []

    def spawn(
        self, url: DatabaseLike, params: Params, run_id: int, keys: list[tuple[str, date]]
    ) -> None:
        p = subprocess.Popen(
            [sys.executable, "-m", "bqx._worker"],
            stdin=subprocess.PIPE,
            close_fds=True,
            process_group=0,  # Ctrl-C at a terminal is the parent's: it stops the workers
        )
        assert p.stdin is not None
        p.stdin.write(pickle.dumps((url, params, run_id, keys)))
        p.stdin.close()
        host = worker_id().rsplit(":", 1)[0]
        self.procs.append(_Proc(p, f"{host}:{p.pid}"))

    def reap(self) -> list[tuple[str, str]]:
        """Forget finished processes; return (worker id, why) of those that died abnormally."""
        dead = [pr for pr in self.procs if pr.process.poll() is not None]
        self.procs = [pr for pr in self.procs if pr.process.poll() is None]
        return [
            (pr.worker, f"worker {pr.worker} died (exit code {pr.process.returncode})")
            for pr in dead
            if pr.process.returncode != 0
        ]

    def live(self) -> set[str]:
        return {pr.worker for pr in self.procs}

    def kill(self, worker: str) -> None:
        """Kill a worker (its job timed out); it is then no longer watched."""
        for pr in [p for p in self.procs if p.worker == worker]:
            pr.process.kill()
            pr.process.wait(timeout=10)
            self.procs.remove(pr)

    def shutdown(self) -> list[str]:
        """Stop every worker (terminate, then kill); returns their worker ids."""
        ids = [pr.worker for pr in self.procs]
        for pr in self.procs:
            if pr.process.poll() is None:
                pr.process.terminate()
        deadline = time.monotonic() + 5
        for pr in self.procs:
            try:
                pr.process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pr.process.kill()
                pr.process.wait(timeout=10)
        self.procs = []
        return ids
