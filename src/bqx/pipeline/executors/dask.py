"""Dask executor: workers are tasks on a Dask distributed cluster (docs/scaling.md).

Each task runs the same loop as a local worker process: claim a job from the ledger, run it,
until none is claimable. The ledger decides which job runs where, so a task that Dask runs twice
can never write a month twice. One bqx task runs on a Dask worker process at a time and is
pinned to it, so the ledger's worker id ``host:pid`` names that Dask worker process, and a job
that times out is stopped by killing that process (its nanny starts a fresh one).

Without a scheduler address bqx starts a ``LocalCluster`` of ``workers`` processes and closes
it at the end whatever happens; with one it connects to the user's cluster and never stops it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date
from typing import Any

from bqx.core.layout import Layout
from bqx.core.params import Params
from bqx.db.connect import DatabaseLike, as_ref, connect, ping, worker_id
from bqx.db.credentials import DatabaseRef
from bqx.errors import BqxError
from bqx.extras import require
from bqx.pipeline.executors import ExecutorLost

# at a normal end, how long the last tasks get to return by themselves: every job is done, so
# a task still running is starting (importing bqx on a loaded worker takes seconds) or making
# its final, empty claim; killing it would restart a worker of the user's cluster
FINISH_GRACE_S = 30.0
NO_WORKER_TIMEOUT_S = 60.0  # a cluster without any usable worker for this long is an error
CONNECT_TIMEOUT_S = 15.0
# Dask's nannies start workers with MALLOC_TRIM_THRESHOLD_=65536, which also pins glibc's mmap
# threshold: every array of a job (tens of MB) is then fresh mmap'd pages, and jobs ran 2-3x
# slower than in a plain process (docs/scaling.md). None unsets it for the workers bqx starts.
NO_MALLOC_TRIM = {"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None}
FEATURE = "the Dask executor (--executor dask)"  # what needs the "dask" extra


# -- what runs on the workers -------------------------------------------------------------


@dataclass(frozen=True)
class WorkArgs:
    """A task's arguments. The database travels as a reference that the worker resolves
    itself (a file, a secret, an IAM token: docs/configuration.md); a URL given as such is
    masked in every repr, and task arguments end up in reprs (a failed task's repr is written
    to the worker log). Task keys are explicit names that never contain it."""

    database: DatabaseRef
    params: Params
    run_id: int
    keys: list[tuple[str, date]]

    def __repr__(self) -> str:  # keep worker logs short: no job list
        return f"WorkArgs(run {self.run_id}, {len(self.keys)} jobs, {self.database!r})"


def work(args: WorkArgs) -> int:
    """A Dask task: claim and run jobs among ``args.keys`` until none is claimable.

    Returns how many jobs it ran. Every write is guarded by the job's claim in the ledger.
    """
    from bqx.pipeline.job import JobRunner

    runner = JobRunner(args.database, args.params, args.run_id)
    try:
        return runner.loop(args.keys)
    finally:
        runner.close()


def probe(database: DatabaseRef) -> dict[str, Any]:
    """Run on each Dask worker before any job: its bqx version, identity and database access."""
    import bqx

    out: dict[str, Any] = {
        "version": bqx.__version__, "worker": worker_id(), "host": socket.gethostname(),
        "error": None,
    }  # fmt: skip
    try:
        with connect(database) as conn:
            ping(conn)
    except BqxError as exc:
        out["error"] = str(exc)
    return out


def _die() -> None:
    """Run on a Dask worker whose job timed out: end the process now (its nanny restarts it)."""
    os.kill(os.getpid(), signal.SIGKILL)


# -- preflight ----------------------------------------------------------------------------


def is_unix_socket(url: DatabaseLike) -> bool:
    """True when the database is reached through a Unix socket (a path, or libpq's default)."""
    try:
        host = str(as_ref(url).params().get("host") or os.environ.get("PGHOST") or "")
    except Exception:  # a malformed URL, an unreadable secret: reported at connect
        return False
    return not host or any(h.startswith(("/", "@")) for h in host.split(","))


def check_workers(
    url: DatabaseLike, version: str, local_host: str, probes: dict[str, Any]
) -> dict[str, dict[str, Any]]:
    """The probes of usable workers; a one-line BqxError for the first misconfigured one."""
    ok: dict[str, dict[str, Any]] = {}
    for addr, res in sorted(probes.items()):
        if isinstance(res, BaseException):
            raise BqxError(
                f"Dask worker {addr} cannot run bqx: {type(res).__name__}: "
                f"{str(res).strip().splitlines()[0] if str(res).strip() else ''} "
                f"(install bqx-metrics[dask]=={version} on every worker, see docs/scaling.md)"
            )
        if res["version"] != version:
            raise BqxError(
                f"Dask worker {addr} runs bqx {res['version']}, this run bqx {version}: "
                "install the same version on every worker (docs/scaling.md)"
            )
        if res["host"] != local_host and is_unix_socket(url):
            raise BqxError(
                f"Dask worker {addr} runs on host {res['host']} but the database URL is a Unix"
                " socket on this host: give a TCP address (postgresql://user@host:5432/db, through"
                " BQX_DATABASE_URL, BQX_DATABASE_URL_FILE or the secret's host) that every"
                " worker can reach (docs/scaling.md)"
            )
        if res["error"]:
            hint = (
                " (give the database a TCP address every worker can reach)"
                if is_unix_socket(url)
                else ""
            )
            raise BqxError(f"Dask worker {addr} cannot reach the database: {res['error']}{hint}")
        ok[addr] = res
    return ok


# -- the executor -------------------------------------------------------------------------


@dataclass
class _Task:
    future: Any  # distributed.Future
    addr: str
    pid: int
    worker: str  # the ledger's worker id: host:pid of the Dask worker process


class DaskExecutor:
    """Workers as tasks on a Dask cluster: a LocalCluster it owns, or the user's scheduler."""

    name = "dask"

    def __init__(self, workers: int, scheduler: str | None = None) -> None:
        self.workers = max(1, workers)
        self.scheduler = scheduler
        self.cluster: Any = None
        self.client: Any = None
        self.tasks: dict[str, _Task] = {}
        self.known: dict[str, tuple[int, str | None]] = {}  # addr -> (pid, worker id or None)
        self.database: DatabaseRef | None = None
        self.layout: Layout | None = None
        self.token = uuid.uuid4().hex[:8]
        self.count = 0
        self.closed = False
        self.starved_since: float | None = None
        try:
            self._connect()
        except BaseException:
            self.shutdown()
            raise

    # -- cluster --------------------------------------------------------------------------

    def _connect(self) -> None:
        dask = require("dask", "dask", FEATURE)
        distributed = require("dask", "distributed", FEATURE)
        Client, LocalCluster = distributed.Client, distributed.LocalCluster

        if self.scheduler is None:
            with dask.config.set(NO_MALLOC_TRIM):
                self.cluster = LocalCluster(
                    n_workers=self.workers, threads_per_worker=1, processes=True,
                    host="127.0.0.1", scheduler_port=0, dashboard_address=":0",
                    worker_dashboard_address=None, silence_logs=logging.ERROR,
                )  # fmt: skip
            self.client = Client(self.cluster, set_as_default=False)
            return
        try:
            self.client = Client(self.scheduler, timeout=CONNECT_TIMEOUT_S, set_as_default=False)
        except (OSError, TimeoutError, ValueError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise BqxError(
                f"cannot reach the Dask scheduler at {self.scheduler}: {first}"
            ) from None
        try:
            self.client.wait_for_workers(1, timeout=CONNECT_TIMEOUT_S)
        except TimeoutError:
            raise BqxError(
                f"the Dask scheduler at {self.scheduler} has no worker: start some with"
                f" `dask worker {self.scheduler} --nthreads 1` (docs/scaling.md)"
            ) from None
        # one bqx task per Dask worker process: never ask for more than the cluster has
        self.workers = min(self.workers, len(self.client.scheduler_info()["workers"]))

    def _workers_now(self) -> dict[str, int]:
        """addr -> pid of every worker the scheduler knows now (one round trip).

        The pid tells a worker restarted on the same address from the one that died there. A
        lambda travels by value, so the scheduler needs no bqx installed.
        """
        with self._scheduler_calls():
            return self.client.run_on_scheduler(
                lambda dask_scheduler: {a: int(w.pid) for a, w in dask_scheduler.workers.items()}
            )

    def _probe(self, addrs: list[str]) -> dict[str, Any]:
        assert self.database is not None
        with self._scheduler_calls():
            return self.client.run(probe, self.database, workers=addrs, on_error="return")

    @contextlib.contextmanager
    def _scheduler_calls(self) -> Iterator[None]:
        """A scheduler that went away (killed, its host lost) is one ``ExecutorLost``, not a
        traceback from deep inside the client."""
        try:
            yield
        except (OSError, TimeoutError, asyncio.CancelledError) as exc:
            where = self.scheduler or "the local Dask cluster"
            text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ExecutorLost(f"lost the Dask scheduler at {where} ({text})") from None

    def _refresh(self) -> dict[str, int]:
        """Learn the worker id of new (or restarted) workers; return addr -> pid."""
        now = self._workers_now()
        new = [a for a, pid in now.items() if self.known.get(a, (None,))[0] != pid]
        if new and self.database is not None:
            import bqx

            for addr, res in self._probe(new).items():
                try:
                    ok = check_workers(self.database, bqx.__version__, _this_host(),
                                       {addr: res})  # fmt: skip
                    self.known[addr] = (now[addr], ok[addr]["worker"])
                except BqxError:
                    self.known[addr] = (now[addr], None)  # not usable; preflight said why
        for addr in set(self.known) - set(now):
            del self.known[addr]
        return now

    def _preflight(self) -> None:
        """Before any job: every worker imports the same bqx and reaches the database."""
        import bqx

        now = self._workers_now()
        ok = check_workers(
            self.database or "", bqx.__version__, _this_host(),
            self._probe(sorted(now)),
        )  # fmt: skip
        self.known = {a: (now[a], ok[a]["worker"]) for a in ok if a in now}

    # -- the Executor interface -----------------------------------------------------------

    def spawn(
        self, url: DatabaseLike, params: Params, run_id: int, keys: list[tuple[str, date]]
    ) -> None:
        """Start one more task on a Dask worker that runs none of ours (none free: next tick)."""
        if self.database is None:
            self.database, self.layout = as_ref(url), params.layout
            self._preflight()
        now = self._refresh()
        busy = {t.addr for t in self.tasks.values()}
        free = [a for a, (pid, wid) in sorted(self.known.items())
                if wid is not None and a not in busy and now.get(a) == pid]  # fmt: skip
        if not free:
            self._starving(now)
            return
        self.starved_since = None
        addr = free[0]
        self.count += 1
        key = f"bqx-backfill-{self.token}-{self.count}"  # never the arguments: no URL in keys
        with self._scheduler_calls():
            future = self.client.submit(
                work, WorkArgs(self.database, params, run_id, keys), key=key, workers=[addr],
                allow_other_workers=False, pure=False, retries=0,
            )  # fmt: skip
        pid, wid = self.known[addr]
        assert wid is not None
        self.tasks[key] = _Task(future, addr, pid, wid)

    def _starving(self, now: dict[str, int]) -> None:
        usable = [a for a, (_, wid) in self.known.items() if wid is not None and a in now]
        if usable or self.tasks:
            self.starved_since = None
            return
        if self.starved_since is None:
            self.starved_since = time.monotonic()
        elif time.monotonic() - self.starved_since > NO_WORKER_TIMEOUT_S:
            where = self.scheduler or "the local Dask cluster"
            raise BqxError(f"no usable Dask worker at {where} for {NO_WORKER_TIMEOUT_S:g}s")

    def reap(self) -> list[tuple[str, str]]:
        """Forget ended tasks; return (worker id, why) for tasks whose worker died or failed."""
        if self.closed or not self.tasks:
            return []
        now = self._refresh()
        out = []
        for key, t in list(self.tasks.items()):
            if now.get(t.addr) != t.pid:  # the process is gone (killed, crashed, restarted)
                t.future.cancel()
                del self.tasks[key]
                out.append((t.worker, f"Dask worker {t.worker} ({t.addr}) died"))
            elif t.future.done():
                del self.tasks[key]
                if t.future.status != "finished":
                    exc = t.future.exception() if t.future.status == "error" else None
                    why = f"{type(exc).__name__}: {exc}" if exc is not None else t.future.status
                    out.append((t.worker, f"Dask worker {t.worker}: {why}"))
        return out

    def live(self) -> set[str]:
        return {t.worker for t in self.tasks.values() if not t.future.done()}

    def kill(self, worker: str) -> None:
        """Kill the Dask worker process running ``worker``'s task; its nanny starts a new one."""
        for key, t in list(self.tasks.items()):
            if t.worker == worker:
                t.future.cancel()
                self._kill_process(t)
                del self.tasks[key]

    def _kill_process(self, t: _Task) -> None:
        if t.pid <= 0:
            return
        if t.worker.rsplit(":", 1)[0] == _this_host():
            with contextlib.suppress(ProcessLookupError):
                os.kill(t.pid, signal.SIGKILL)
        else:
            with contextlib.suppress(Exception):
                self.client.run(_die, workers=[t.addr], wait=False)

    def shutdown(self) -> list[str]:
        """Stop every task (killing the processes that run one), close what we started."""
        distributed = require("dask", "distributed", FEATURE)

        if self.closed:
            return []
        self.closed = True
        tasks = list(self.tasks.values())
        if sys.exc_info()[0] is None and self.client is not None:
            # a normal end: the last tasks are only making their final (empty) claim; killing
            # them would cost a worker restart. On Ctrl-C or an error they are stopped at once.
            # ``wait`` finds the client through the default one, which ours is not (without
            # as_current it raised at once and the grace never happened)
            with contextlib.suppress(Exception), self.client.as_current():
                distributed.wait([t.future for t in tasks], timeout=FINISH_GRACE_S)
        running = [t for t in tasks if not t.future.done()]
        self.tasks = {}
        try:
            if self.cluster is not None:  # ours: its nannies must not restart what we kill
                for nanny in list(getattr(self.cluster, "workers", {}).values()):
                    with contextlib.suppress(Exception):
                        nanny.close_gracefully(reason="bqx-shutdown")
            if self.client is not None and tasks:
                with contextlib.suppress(Exception):
                    self.client.cancel([t.future for t in tasks], force=True)
                for t in running:  # cancelling does not stop a running task: its process dies
                    self._kill_process(t)
                self._wait_gone(running)
                self._end_sessions([t.worker for t in running])
        finally:
            if self.client is not None:
                with contextlib.suppress(Exception):
                    self.client.close(timeout=10)
            if self.cluster is not None:
                pids = self._cluster_pids()
                with contextlib.suppress(Exception):
                    self.cluster.close(timeout=20)
                _kill_children(pids)  # the cluster is ours: none of its processes may stay
        return [t.worker for t in tasks]

    def _end_sessions(self, workers: list[str]) -> None:
        """End the database sessions of the killed workers' jobs.

        A session waiting on a lock does not notice that its client is gone: it would keep its
        job's row locked, and handing the job back would wait for it.
        """
        if not workers or self.database is None or self.layout is None:
            return
        from bqx.store.ledger import Ledger

        with contextlib.suppress(Exception), connect(self.database, autocommit=True) as c:
            Ledger(self.layout).end_sessions(c, workers)

    def _cluster_pids(self) -> list[int]:
        """Pids of our LocalCluster's worker processes, restarted ones included."""
        pids = {pid for pid, _ in self.known.values() if pid > 0}
        for nanny in getattr(self.cluster, "workers", {}).values():
            with contextlib.suppress(Exception):
                if nanny.pid:
                    pids.add(int(nanny.pid))
        return sorted(pids)

    def _wait_gone(self, tasks: list[_Task], timeout_s: float = 15.0) -> None:
        """Until the scheduler sees each killed process gone, so no write can land after."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                now = self._workers_now()
            except Exception:
                return
            if all(now.get(t.addr) != t.pid for t in tasks):
                return
            time.sleep(0.1)


def _kill_children(pids: list[int]) -> None:
    """SIGKILL those of ``pids`` that are still children of this process (never another's)."""
    psutil = require("dask", "psutil", FEATURE)

    for pid in pids:
        with contextlib.suppress(psutil.Error):
            proc = psutil.Process(pid)
            if proc.ppid() == os.getpid():
                proc.kill()
                proc.wait(timeout=5)


def _this_host() -> str:
    return socket.gethostname()
