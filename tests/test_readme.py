"""Every example in README.md's ```sh blocks runs as written and exits 0.

The blocks are read from the README itself, so a new example is covered as soon as it is
written. They run in order, in one temporary directory, with `bqx` on PATH, against the test's
database (an `export BQX_DATABASE_URL=…` line names a placeholder server: the test's database
stands in for it, with a fresh schema, as "another database"). Files an example reads are
created first, small, under the README's own names (FIXTURES); a new example reading a new file
needs a fixture here.
"""

from __future__ import annotations

import gzip
import os
import re
import shlex
import subprocess
import sys
import time
import uuid
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import psycopg
import pytest
from psycopg import sql

import bqx

ROOT = Path(__file__).resolve().parents[1]
SRC = str(Path(bqx.__file__).resolve().parents[1])

# examples that cannot run here, with the reason (listed in the test's output)
SKIP: dict[str, str] = {}
# examples that work once another change lands: a failure is tolerated and listed, a pass is a
# pass (remove the entry when the change is in)
PENDING: dict[str, str] = {}  # example -> why it may fail for now (none today)


def sh_examples(text: str) -> list[list[tuple[int, str]]]:
    """The ```sh blocks: per block, its commands with their README line numbers."""
    blocks: list[list[tuple[int, str]]] = []
    current: list[tuple[int, str]] | None = None
    pending = ""
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if current is None:
            if re.fullmatch(r"```(sh|bash|shell|console)", stripped):
                current = []
            continue
        if stripped.startswith("```"):
            blocks.append(current)
            current = None
            continue
        if not stripped or stripped.startswith("#"):
            continue
        stripped = stripped.removeprefix("$ ")
        if stripped.endswith("\\"):  # a continued line
            pending += stripped[:-1].rstrip() + " "
            continue
        current.append((number, pending + stripped))
        pending = ""
    return blocks


def _minutes(start: str, n: int) -> np.ndarray:
    return np.datetime64(start, "m") + np.arange(n).astype("timedelta64[m]")


def _prices(n: int, level: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.round(level * np.exp(np.cumsum(rng.normal(0, 1e-4, n))), 5)


def histdata_zip(path: Path) -> None:
    """HistData generic ASCII M1 (EST, `YYYYMMDD HHMMSS;o;h;l;c;v`) in its zip, named as
    HistData names them: `HISTDATA_COM_ASCII_EURUSD_M1202410.zip` holding
    `DAT_ASCII_EURUSD_M1_202410.csv`."""
    times, close = _minutes("2024-10-01T00:00", 300), _prices(300, 1.09, 1)
    lines = [f"{t.astype(object):%Y%m%d %H%M%S};{c};{c + 2e-5:.5f};{c - 2e-5:.5f};{c};0"
             for t, c in zip(times, close, strict=True)]  # fmt: skip
    with zipfile.ZipFile(path, "w") as z:
        pair, month = re.fullmatch(r"HISTDATA_COM_ASCII_(\w{6})_M1(\d{6})", path.stem).groups()
        z.writestr(f"DAT_ASCII_{pair}_M1_{month}.csv", "\n".join(lines) + "\n")


def dukascopy_gz(path: Path) -> None:
    """Dukascopy export (`Gmt time,Open,High,Low,Close,Volume`, dd.mm.yyyy), gzipped."""
    times, close = _minutes("2024-11-01T00:00", 300), _prices(300, 1.08, 2)
    rows = [f"{t.astype(object):%d.%m.%Y %H:%M:%S}.000,{c},{c + 2e-5:.5f},{c - 2e-5:.5f},{c},12.5"
            for t, c in zip(times, close, strict=True)]  # fmt: skip
    path.write_bytes(gzip.compress(
        ("Gmt time,Open,High,Low,Close,Volume\n" + "\n".join(rows) + "\n").encode()))  # fmt: skip


def metatrader_csv(path: Path) -> None:
    """MetaTrader history export (`YYYY.MM.DD,HH:MM,o,h,l,c,vol`, server time)."""
    times, close = _minutes("2024-10-01T03:00", 300), _prices(300, 1.28, 3)
    rows = [f"{t.astype(object):%Y.%m.%d,%H:%M},{c},{c + 2e-5:.5f},{c - 2e-5:.5f},{c},7"
            for t, c in zip(times, close, strict=True)]  # fmt: skip
    path.write_text("\n".join(rows) + "\n")


def close_only_parquet(path: Path) -> None:
    """A generic Parquet source with a time and a close price only (`ts`, `last`)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    times = _minutes("2024-10-01T00:00", 300).astype("datetime64[us]")
    pq.write_table(pa.table({"ts": pa.array(times, pa.timestamp("us", "UTC")),
                             "last": _prices(300, 0.67, 4)}), path)  # fmt: skip


# a README file name or glob -> a fixture written under a name it matches
FIXTURES: dict[str, tuple[str, Callable[[Path], None]]] = {
    # HistData's own file name: no underscore between M1 and the month
    "HISTDATA_COM_ASCII_EURUSD_M12024*.zip": (
        "HISTDATA_COM_ASCII_EURUSD_M1202410.zip", histdata_zip),
    "EURUSD_Candlestick_1_M_BID_*.csv.gz": (
        "EURUSD_Candlestick_1_M_BID_01.11.2024-30.11.2024.csv.gz", dukascopy_gz),
    "GBPUSD1.csv": ("GBPUSD1.csv", metatrader_csv),
    "bars.parquet": ("bars.parquet", close_only_parquet),
}  # fmt: skip


def report_style_source(url: str, schema: str) -> None:
    """`bqx.m1_{pair}` as in the report's database: naive times, numeric(10,5) prices."""
    times, close = _minutes("2024-07-01T00:00", 3000), _prices(3000, 1.08, 5)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema)))
        table = sql.Identifier(schema, "m1_eurusd")
        conn.execute(sql.SQL("CREATE TABLE {} (time timestamp without time zone PRIMARY KEY,"
                             " close numeric(10,5) NOT NULL)").format(table))  # fmt: skip
        with conn.cursor().copy(sql.SQL("COPY {} (time, close) FROM STDIN").format(table)) as cp:
            for t, c in zip(times, close, strict=True):
                cp.write_row((t.astype(object), f"{c:.5f}"))


def test_readme_examples_run_as_written(pg_url, cli_env, tmp_path):
    blocks = sh_examples((ROOT / "README.md").read_text())
    assert sum(len(b) for b in blocks) >= 10  # the parser found the examples
    work = tmp_path / "work"
    (work / "bin").mkdir(parents=True)
    shim = work / "bin" / "bqx"  # `bqx` as installed: this checkout's code
    shim.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} -m bqx.cli "$@"\n')
    shim.chmod(0o755)
    for _, (name, make) in FIXTURES.items():
        make(work / name)
    env = {**cli_env, "PATH": f"{work / 'bin'}{os.pathsep}{os.environ['PATH']}",
           "PYTHONPATH": SRC}  # fmt: skip
    ran, skipped = [], []
    other_schemas: list[str] = []
    try:
        for block in blocks:
            block_env = dict(env)
            for number, command in block:
                where = f"README.md line {number}: {command}"
                if command in SKIP:
                    skipped.append(f"{where} ({SKIP[command]})")
                    continue
                exported = re.fullmatch(r"export (\w+)=(\S*).*", command)
                if exported:
                    name, value = exported.groups()
                    if name == "BQX_DATABASE_URL":
                        # a placeholder server: the test's database stands in, in a fresh
                        # schema, with the report-style source tables the block reads
                        block_env["BQX_SCHEMA"] = f"t_{uuid.uuid4().hex[:10]}"
                        other_schemas.append(block_env["BQX_SCHEMA"])
                        if "bqx" not in other_schemas:
                            report_style_source(pg_url, "bqx")
                            other_schemas.append("bqx")
                        skipped.append(f"{where} (the test's database stands in for it)")
                    else:
                        block_env[name] = os.path.expandvars(value)
                    continue
                t0 = time.monotonic()
                res = subprocess.run(
                    ["bash", "-c", command], cwd=work, env=block_env, capture_output=True,
                    text=True, timeout=900,
                )  # fmt: skip
                if res.returncode and command in PENDING:
                    skipped.append(f"{where} (pending: {PENDING[command]})")
                    continue
                assert res.returncode == 0, f"{where}\nexit {res.returncode}\n{res.stderr[-2000:]}"
                assert "Traceback" not in res.stderr, where
                ran.append(f"{where} ({time.monotonic() - t0:.1f} s)")
    finally:
        with psycopg.connect(pg_url, autocommit=True) as conn:
            for schema in other_schemas:
                conn.execute(
                    sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema))
                )
    print("\n".join(["ran:", *ran, "skipped:", *skipped]))
    assert ran


def python_examples(text: str) -> list[tuple[int, str]]:
    """The ```python blocks: (README line of the block, its code)."""
    found = re.finditer(r"^```python\n(.*?)^```", text, re.M | re.S)
    return [(text[: m.start()].count("\n") + 1, m.group(1)) for m in found]


def test_readme_python_examples_run_as_written(pg_url, cli_env, tmp_path):
    blocks = python_examples((ROOT / "README.md").read_text())
    assert len(blocks) >= 2 and "Store()" in blocks[0][1]  # the parser found the examples
    env = {**cli_env, "BQX_SCHEMA": f"t_{uuid.uuid4().hex[:10]}"}
    try:
        for line, code in blocks:
            res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                                 capture_output=True, text=True, timeout=900)  # fmt: skip
            assert res.returncode == 0, f"README.md:{line}\n{res.stderr[-2000:]}"
        assert (tmp_path / "bqx-report" / "report.html").exists()
    finally:
        with psycopg.connect(pg_url, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(
                sql.Identifier(env["BQX_SCHEMA"])))  # fmt: skip


def test_the_parser_reads_blocks_lines_and_continuations():
    text = "\n".join([
        "```", "make demo", "```", "```sh", "# a comment", "bqx status   # note", "",
        "bqx backfill \\", "  --workers 2", "```", "```python", "print(1)", "```",
    ])  # fmt: skip
    assert sh_examples(text) == [[(6, "bqx status   # note"), (9, "bqx backfill --workers 2")]]


@pytest.mark.parametrize("pattern", list(FIXTURES))
def test_fixture_names_match_the_readme_globs(pattern, tmp_path):
    import fnmatch

    name, _ = FIXTURES[pattern]
    assert fnmatch.fnmatch(name, pattern)


def test_the_histdata_example_matches_histdata_file_names(tmp_path):
    """HistData's downloads are named HISTDATA_COM_ASCII_EURUSD_M1202407.zip (no underscore
    before the month): the README's glob must match such a name, and its fixture be one."""
    import fnmatch

    (pattern,) = [p for p in FIXTURES if p.startswith("HISTDATA")]
    assert re.search(rf"\bbqx ingest {re.escape(pattern)} ", (ROOT / "README.md").read_text())
    real = re.compile(r"HISTDATA_COM_ASCII_[A-Z]{6}_M1\d{6}\.zip")
    for name in ("HISTDATA_COM_ASCII_EURUSD_M1202407.zip", FIXTURES[pattern][0]):
        assert real.fullmatch(name) and fnmatch.fnmatch(name, pattern), name
    path = tmp_path / FIXTURES[pattern][0]
    FIXTURES[pattern][1](path)
    assert zipfile.ZipFile(path).namelist() == ["DAT_ASCII_EURUSD_M1_202410.csv"]
