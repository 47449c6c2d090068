"""The Python API: every command through ``bqx.Store``, with nothing imported but ``bqx``."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest

import bqx


def test_every_command_from_python_returns_a_typed_result(pg_url, schema_name, tmp_path):
    store = bqx.Store(database_url=pg_url, schema=schema_name, home=tmp_path / "home")

    gen = store.generate(["EURUSD", "USDJPY"], "2024-07", "2024-08", seed=4)
    assert type(gen).__name__ == "GenerateSummary"
    assert gen.bars > 50_000 and gen.as_dict()["pairs"] == ["EURUSD", "USDJPY"]
    assert gen.text().startswith(f"generated {gen.bars:,} bars for 2 pairs")

    run = store.backfill(workers=2)
    assert type(run).__name__ == "RunSummary"
    assert (run.jobs_done, run.jobs_failed, run.rows_written) == (4, 0, gen.bars)
    assert run.as_dict()["rows_written"] == gen.bars and run.text().startswith(f"run {run.run_id}")

    plan = store.plan()
    assert type(plan).__name__ == "BackfillPlan"
    assert [j.action for j in plan.jobs] == ["skip"] * 4

    checked = store.verify(sample=5)
    assert type(checked).__name__ == "Verification" and checked.ok
    assert [c.name for c in checked.checks][:3] == ["partitions", "keys", "values"]

    status = store.status()
    assert type(status).__name__ == "Status"
    assert status.jobs["done"] == 4 and status.rows == gen.bars
    assert status.as_dict()["run"]["run_id"] == run.run_id

    runs = store.runs()
    assert type(runs).__name__ == "RunList"
    assert runs.runs[0]["run_id"] == run.run_id and runs.runs[0]["command"] == "backfill"
    assert str(run.run_id) in runs.text()

    report = store.report(tmp_path / "report", sample=3, verification=checked)
    assert type(report).__name__ == "ReportResult"
    assert report.complete and report.markdown.read_text().startswith("# BQX Backfill")

    out = store.export(tmp_path / "parquet", pairs="EURUSD")
    assert type(out).__name__ == "ExportSummary"
    assert out.files == 2 and out.rows == sum(
        pq.read_table(f).num_rows for f in Path(tmp_path / "parquet").rglob("*.parquet")
    )
    table = bqx.read_metrics("EURUSD", "2024-08", columns=["rate"], database_url=pg_url,
                             schema=schema_name, home=tmp_path / "home")  # fmt: skip
    assert table.column_names == ["ts_utc", "rate"] and 0 < table.num_rows < out.rows


def test_bad_values_name_the_parameter_in_words_a_python_caller_knows(pg_url, schema_name):
    store = bqx.Store(database_url=pg_url, schema=schema_name)
    with pytest.raises(bqx.BqxError, match=r"^invalid workers 0: must be ≥ 1$") as err:
        store.backfill(workers=0)
    assert err.value.param == "workers" and err.value.flag == "--workers"
    with pytest.raises(bqx.BqxError, match=r"^invalid job timeout nan: must be a number > 0$"):
        store.backfill(job_timeout=float("nan"))
    with pytest.raises(bqx.BqxError, match=r"^invalid executor 'spark': expected one of"):
        store.backfill(executor="spark")
    with pytest.raises(bqx.BqxError, match=r"^invalid start '2024-13'"):
        store.plan(start="2024-13")
