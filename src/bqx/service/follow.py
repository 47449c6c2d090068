"""``bqx update --follow``: a service that keeps the metrics current (docs/update.md).

Update, then wait ``interval_s`` (or wake early on a NOTIFY from bqx's own loads), until told
to stop; a lost database is retried with backoff. Optionally serves Prometheus metrics on
127.0.0.1. SIGTERM and Ctrl-C stop it after the current transaction.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
from collections.abc import Callable, Sequence

import numpy as np
import psycopg
import tenacity

from bqx import metrics
from bqx.core.layout import Layout
from bqx.core.symbols import validate_pair
from bqx.core.text import format_duration
from bqx.db.connect import DatabaseLike, connect, is_transient
from bqx.errors import BqxError, InvalidOption
from bqx.extras import require
from bqx.pipeline.update import DEFAULT_RECHECK_S, Updater, UpdateResult
from bqx.store.bars import listen_for_bars

log = logging.getLogger("bqx.update")

# -- follow -------------------------------------------------------------------------------


class _Metrics:
    """Prometheus metrics on http://127.0.0.1:PORT/metrics (prometheus_client)."""

    def __init__(self, port: int) -> None:
        prom = require("service", "prometheus_client", "--metrics-port (Prometheus metrics)")
        CollectorRegistry, Counter, Gauge = prom.CollectorRegistry, prom.Counter, prom.Gauge
        start_http_server = prom.start_http_server

        self.registry = CollectorRegistry()
        self.lag = Gauge("bqx_target_lag_seconds", "Newest source bar time minus newest metric"
                         " row time.", ["pair"], registry=self.registry)  # fmt: skip
        self.rows = Counter("bqx_rows_written", "Target rows written (inserted, changed or"
                            " deleted) by update.", ["pair"], registry=self.registry)  # fmt: skip
        self.errors = Counter("bqx_update_errors", "Polls that failed (then retried).",
                              registry=self.registry)  # fmt: skip
        self.pair_errors = Counter("bqx_pair_errors", "Polls in which a pair could not be"
                                   " brought up to date (retried each poll; the other pairs go"
                                   " on).", ["pair"], registry=self.registry)  # fmt: skip
        self.last_poll = Gauge("bqx_last_poll_timestamp_seconds", "Unix time of the last"
                               " completed poll.", registry=self.registry)  # fmt: skip
        try:
            self.server, self.thread = start_http_server(
                port, addr="127.0.0.1", registry=self.registry
            )
        except OSError as exc:
            raise BqxError(f"metrics port {port}: cannot listen on 127.0.0.1: {exc}") from None

    def observe(self, result: UpdateResult) -> None:
        for p in result.pairs:
            if p.lag_s is not None:
                self.lag.labels(pair=p.pair.upper()).set(p.lag_s)
            self.rows.labels(pair=p.pair.upper()).inc(p.written)
            if p.error:
                self.pair_errors.labels(pair=p.pair.upper()).inc()
        self.last_poll.set(time.time())

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _describe(exc: BaseException | None) -> str:
    text = str(exc).strip().splitlines()[0] if exc is not None and str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if exc is not None else "error"


def _transient(exc: BaseException) -> bool:
    return is_transient(exc) or (isinstance(exc, BqxError) and "cannot connect" in str(exc))


def check_follow_options(interval_s: float, metrics_port: int | None) -> None:
    if not 0 < interval_s < 86400 * 365:
        raise InvalidOption("follow", interval_s, "must be > 0 seconds")
    if metrics_port is not None and not 0 < metrics_port < 65536:
        raise InvalidOption("metrics_port", metrics_port, "a TCP port is 1 to 65535")


class Follower:
    """The follow loop's state: the updater, the NOTIFY listener, the metrics server."""

    def __init__(
        self, url: DatabaseLike, updater: Updater, interval_s: float, stop: threading.Event,
        metrics_port: int | None, listen: bool, on_poll: Callable[[UpdateResult], None] | None,
    ) -> None:  # fmt: skip
        self.url, self.updater, self.interval_s, self.stop = url, updater, interval_s, stop
        self.listen, self.on_poll = listen, on_poll
        self.prom = _Metrics(metrics_port) if metrics_port is not None else None
        self.listener: psycopg.Connection | None = None
        self.quiet_since = 0.0
        self.next_full = 0.0
        self.failing: dict[str, tuple[str, float]] = {}  # pair -> (error, when last logged)

    def run(self) -> None:
        woken: set[str] | None = None  # pairs a NOTIFY named; None: a full poll is due
        try:
            while not self.stop.is_set():
                full = woken is None or time.monotonic() >= self.next_full
                result = self._poll(None if full else woken)
                if result is None:
                    break
                if full:
                    self.next_full = time.monotonic() + self.interval_s
                self._observe(result, full)
                woken = _wait(self.listener, self.stop, self.next_full)
        finally:
            self.close()

    def _poll(self, only: set[str] | None) -> UpdateResult | None:
        """One poll, retried with backoff while the database is away; None when stopped."""
        try:
            for attempt in tenacity.Retrying(
                retry=tenacity.retry_if_exception(_transient),
                wait=tenacity.wait_exponential(multiplier=0.5, max=15),
                stop=tenacity.stop_when_event_set(self.stop),
                sleep=self._sleep,
                before_sleep=self._note_error,
                reraise=True,
            ):
                with attempt:
                    result = self.updater.poll(only, self.stop)
                    if self.listen and (self.listener is None or self.listener.closed
                                        or self.listener.broken):  # fmt: skip
                        self.listener = _listen(self.url)
                    return result
        except Exception as exc:
            if self.stop.is_set() and _transient(exc):
                return None
            raise
        return None  # pragma: no cover - tenacity returns or raises

    def _sleep(self, seconds: float) -> None:
        """Wait before the next try, waking at once when told to stop."""
        self.stop.wait(seconds)

    def _note_error(self, rs: tenacity.RetryCallState) -> None:
        exc = rs.outcome.exception() if rs.outcome else None
        wait = rs.next_action.sleep if rs.next_action else 0
        log.warning("database error, retrying in %.1f s: %s", wait, _describe(exc))
        if self.prom is not None:
            self.prom.errors.inc()
        self.updater.close()

    def _observe(self, result: UpdateResult, full: bool) -> None:
        if self.prom is not None:
            self.prom.observe(result)
        if self.on_poll is not None:
            self.on_poll(result)
        self._log_pair_errors(result)
        if result.rows:
            log.info("%s", result.summary())
        elif full and time.monotonic() - self.quiet_since >= 60:
            self.quiet_since = time.monotonic()
            log.info("nothing new (%d pairs, lag max %s; next such line in a minute"
                     " at most)", len(result.pairs), format_duration(result.lag_max_s))  # fmt: skip

    def _log_pair_errors(self, result: UpdateResult) -> None:
        """A line when a pair starts failing or its error changes (then once a minute while
        it lasts), and one when it is back."""
        now = time.monotonic()
        for p in result.pairs:
            last = self.failing.get(p.pair)
            if p.error and (last is None or last[0] != p.error or now - last[1] >= 60):
                log.warning("%s: %s (the other pairs go on; retried each poll)",
                            p.pair.upper(), p.error)  # fmt: skip
                self.failing[p.pair] = (p.error, now)
            elif not p.error and last is not None:
                log.info("%s: brought up to date again", p.pair.upper())
                del self.failing[p.pair]

    def close(self) -> None:
        if self.listener is not None:
            with contextlib.suppress(Exception):
                self.listener.close()
        self.updater.close()
        if self.prom is not None:
            self.prom.close()


def follow(
    url: DatabaseLike,
    layout: Layout,
    interval_s: float,
    *,
    pairs: Sequence[str] | None = None,
    recheck_s: float = DEFAULT_RECHECK_S,
    metrics_port: int | None = None,
    listen: bool = True,
    stop: threading.Event | None = None,
    on_poll: Callable[[UpdateResult], None] | None = None,
    windows: Sequence[int] | None = None,
    mode: str | None = None,
    max_fill: int | None = None,
) -> None:
    """Update, then wait ``interval_s`` (or wake on a NOTIFY from bqx's own loads), until
    ``stop`` is set; a lost database is retried with backoff."""
    check_follow_options(interval_s, metrics_port)
    updater = Updater(url, layout, pairs=pairs, recheck_s=recheck_s, windows=windows, mode=mode,
                      max_fill=max_fill)  # fmt: skip
    updater.connection()  # a configuration error fails here, at once
    warm_up()
    Follower(url, updater, interval_s, stop or threading.Event(), metrics_port, listen,
             on_poll).run()  # fmt: skip


def warm_up() -> None:
    """Load the compiled kernels now, not when the first new bar is waiting for them."""
    times = np.datetime64("2024-07-01T00:00", "us") + np.arange(100) * np.timedelta64(1, "m")
    for mode in metrics.MODES:
        metrics.compute_matrix(times, np.linspace(1.0, 1.1, 100), mode=mode)


def _listen(url: DatabaseLike) -> psycopg.Connection:
    conn = connect(url, autocommit=True)
    listen_for_bars(conn)
    return conn


def _wait(
    listener: psycopg.Connection | None, stop: threading.Event, until: float
) -> set[str] | None:
    """Sleep until ``until`` (monotonic), a NOTIFY (returns its pairs) or ``stop``.

    Returns None when a full poll is due. Waits in short slices so a signal stops it soon.
    """
    while not stop.is_set():
        left = until - time.monotonic()
        if left <= 0:
            return None
        if listener is None or listener.closed or listener.broken:
            stop.wait(min(left, 0.5))
            continue
        pairs: set[str] = set()
        try:
            for n in listener.notifies(timeout=min(left, 0.5), stop_after=1):
                pairs.add(n.payload)
            if pairs:  # take the rest of a burst of commits along (20 ms)
                for n in listener.notifies(timeout=0.02):
                    pairs.add(n.payload)
        except psycopg.Error:
            with contextlib.suppress(Exception):
                listener.close()
            return None  # the poll finds the server gone and backs off
        valid = set()
        for p in pairs:
            with contextlib.suppress(BqxError):
                valid.add(validate_pair(p))
        if valid:
            return valid
    return None


def stop_on_signals() -> threading.Event:
    """An event set by SIGTERM or SIGINT (Ctrl-C): the loop ends after its current transaction."""
    stop = threading.Event()

    def handler(signum: int, _frame: object) -> None:
        log.info("%s received: stopping after the current transaction",
                 signal.Signals(signum).name)  # fmt: skip
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    return stop
