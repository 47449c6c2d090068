"""What the benchmarks share: a store for a settings object and a layout, and timing a
whole process."""

from __future__ import annotations

import resource
import subprocess
import time

from bqx.api import Store
from bqx.config import Settings
from bqx.core.layout import Layout


def store_for(settings: Settings, layout: Layout | None = None) -> Store:
    """The ``bqx.Store`` of ``settings``, in another layout's schema and source if given."""
    if layout is None:
        return Store(settings)
    return Store(settings, schema=layout.schema, source_table=layout.source_table,
                 time_column=layout.time_column, price_column=layout.price_column)  # fmt: skip


def run(args: list[str]) -> tuple[float, str, float]:
    """(wall seconds, stdout, CPU seconds user + sys of the process and its children)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    res = subprocess.run(args, capture_output=True, text=True, timeout=4 * 3600)
    dt = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if res.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed ({res.returncode}): {res.stderr.strip()}")
    return dt, res.stdout.strip(), cpu
