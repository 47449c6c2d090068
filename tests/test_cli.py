"""The command line as scripts and people meet it: help, exit codes, output, JSON, progress."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
from psycopg import sql
from typer.testing import CliRunner

import bqx
import bqx.api as bqx_api
from bqx.cli import app, invocation
from bqx.core.layout import Layout
from bqx.core.text import plural
from bqx.errors import BqxError, InvalidOption
from bqx.store import names
from bqx.store.ledger import Ledger
from conftest import store_for

runner = CliRunner()
SRC = str(Path(bqx.__file__).resolve().parents[1])


def cli(*args: str, env: dict | None = None, **kw):
    return runner.invoke(app, list(args), env=env, **kw)


def run(*args: str, env: dict, cwd: Path | None = None, timeout: float = 180):
    """The CLI in a subprocess, stdout and stderr piped (not a terminal), as a script runs it."""
    env = {**env, "PYTHONPATH": os.pathsep.join([SRC, env.get("PYTHONPATH", "")])}
    return subprocess.run(
        [sys.executable, "-m", "bqx.cli", *args], env=env, cwd=cwd, capture_output=True,
        text=True, timeout=timeout,
    )  # fmt: skip


@pytest.fixture
def backfilled(settings, layout, make_bars):
    """EURUSD, 10 days over July and August 2024 (2 jobs), backfilled with one worker."""
    make_bars("eurusd", "2024-07-27", 10 * 1440, seed=1)
    return store_for(settings, layout).backfill(workers=1)


def empty_run(conn, layout) -> int:
    """A run recorded with zero jobs, as a backfill over months without bars records it."""
    params = {"jobs": [], "pairs": [], "months": [], "windows": [15, 30, 45, 60, 75],
              "mode": "bars", "max_fill": 5}  # fmt: skip
    return conn.execute(
        sql.SQL(
            "INSERT INTO {} (command, params, param_hash, status, ended_at, jobs_total, workers,"
            " executor, run_by, host) VALUES ('backfill', %s, 'x', 'done', now(), 0, 1, 'local',"
            " 'me', 'here') RETURNING run_id"
        ).format(names.table(layout, "bqx_runs")),
        (json.dumps(params),),
    ).fetchone()[0]


# -- 1. help and conventions ---------------------------------------------------------------


def test_help_keeps_defaults_and_shows_no_bool_type():
    backfill_help = cli("backfill", "--help").stdout
    assert "Workers (threads, processes or Dask tasks) [default: CPU count]." in " ".join(
        backfill_help.split()
    )
    assert "--force  " in backfill_help and "<bool>" not in backfill_help
    assert "[default: 1]" in " ".join(cli("generate", "-h").stdout.split())  # its real default
    for command in ("verify", "report"):  # one scope rule, stated in both
        text = " ".join(cli(command, "-h").stdout.split())
        assert "[default: every job in the ledger, with the latest run that did work]" in text
    for command in ("init", "generate", "backfill", "demo", "status", "verify", "report"):
        text = cli(command, "--help").stdout
        assert "<bool>" not in text and "--json" in text, command
    main = " ".join(cli("-h").stdout.split())
    for code in ("0 ok", "1 failed jobs", "2 usage error", "130 interrupted"):
        assert code in main
    assert "--install-completion" in main and "--quiet" in main and "--verbose" in main


def test_version_and_shell_completion():
    res = cli("--version")
    assert res.exit_code == 0 and res.stdout == f"bqx {bqx.__version__}\n"
    # as a person types it in bash: the completion script is for the shell it runs in
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")])}
    res = subprocess.run(
        # "; exit $?": bash stays the parent (a lone command would replace it), as at a prompt
        ["bash", "-c", f"{shlex.quote(sys.executable)} -m bqx.cli --show-completion; exit $?"],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert res.returncode == 0 and "complete " in res.stdout and "bash" in res.stdout, res.stderr


def test_shell_completion_installs_for_bash_as_the_readme_says(tmp_path):
    readme = (Path(SRC).parent / "README.md").read_text()
    assert "bqx --install-completion" in readme and "zsh" in readme and "~/.bashrc" in readme
    bindir = tmp_path / "bin"  # `bqx` as installed (the program's name is what completes)
    bindir.mkdir()
    (bindir / "bqx").write_text(f"#!{sys.executable}\nfrom bqx.cli import main\nmain()\n")
    (bindir / "bqx").chmod(0o755)
    env = {**os.environ, "HOME": str(tmp_path), "PATH": f"{bindir}:{os.environ['PATH']}",
           "PYTHONPATH": SRC}  # fmt: skip
    res = subprocess.run(["bash", "-c", "bqx --install-completion; exit $?"], env=env,
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert "source" in (tmp_path / ".bashrc").read_text()
    # a new shell: `bqx exp<Tab>` and `bqx export --co<Tab>`
    script = (
        "source ~/.bashrc; COMP_WORDS=(bqx exp); COMP_CWORD=1; _bqx_completion bqx;"
        ' echo "${COMPREPLY[@]}"; COMP_WORDS=(bqx export --co); COMP_CWORD=2;'
        ' _bqx_completion bqx; echo "${COMPREPLY[@]}"'
    )
    res = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True,
                         timeout=60)  # fmt: skip
    assert res.stdout.split() == ["export", "--columns"], (res.stdout, res.stderr)


@pytest.mark.parametrize(
    "args, culprit",
    [
        (["backfill", "--force=false"], "'--force'"),
        (["verify", "--sample", "-1"], "'--sample'"),
        (["report", "--sample", "-5"], "'--sample'"),
        (["status", "--interval", "0"], "'--interval'"),
        (["verify", "--nosuch"], "--nosuch"),
    ],
)
def test_usage_errors_are_one_line_exit_2(args, culprit, tmp_path):
    res = cli(*args)
    assert res.exit_code == 2
    assert res.stdout == ""
    assert res.stderr.count("\n") == 1 and res.stderr.startswith("error: ")
    assert culprit in res.stderr and "--help" in res.stderr
    assert not list(tmp_path.iterdir())  # nothing written


def test_report_out_naming_a_file_is_one_line_and_writes_nothing(cli_env, tmp_path):
    target = tmp_path / "notes.txt"
    target.write_text("mine")
    res = run("report", "--out", str(target), env=cli_env)
    assert res.returncode == 2  # a bad option value: a usage error
    assert res.stderr.count("\n") == 1 and "is a file" in res.stderr and str(target) in res.stderr
    assert "Traceback" not in res.stderr
    assert target.read_text() == "mine" and sorted(tmp_path.iterdir()) == [target]
    res = cli("report", "--out", str(target / "sub"), env=cli_env)  # main() prints it as above
    assert isinstance(res.exception, BqxError) and "is a file, not a directory" in str(
        res.exception
    )
    assert sorted(tmp_path.iterdir()) == [target]


def test_quiet_and_verbose(cli_env, pg_url):
    args = ["init", "--pairs", "EURUSD", "--start", "2024-07", "--end", "2024-08"]
    res = cli(*args, env=cli_env)
    assert (
        res.exit_code == 0
        and res.stdout == f"ready: 2 pair-months in schema {cli_env['BQX_SCHEMA']}\n"
    )
    res = cli("--quiet", *args, env=cli_env)
    assert res.exit_code == 0 and res.stdout == "" and res.stderr == ""
    res = cli("-v", *args, env=cli_env)
    assert res.exit_code == 0 and res.stdout.startswith("ready: 2 pair-months")
    assert f"schema {cli_env['BQX_SCHEMA']}" in res.stderr and "database: " in res.stderr
    res = cli("--quiet", *args, "--json", env=cli_env)  # --quiet never hides a JSON document
    assert json.loads(res.stdout) == {"pair_months": 2, "schema": cli_env["BQX_SCHEMA"]}
    # -q and -v work after the command too, as a newcomer types them
    for flag in ("-q", "--quiet"):
        res = cli(*args, flag, env=cli_env)
        assert res.exit_code == 0 and res.stdout == "" and res.stderr == "", res.output
    res = cli(args[0], "-v", *args[1:], env=cli_env)
    assert res.exit_code == 0 and "database: " in res.stderr
    assert res.stdout.startswith("ready: 2 pair-months")


def test_bare_bqx_prints_the_help_not_an_error(tmp_path):
    for args in ([], ["db"]):
        res = run(*args, env={**os.environ, "BQX_HOME": str(tmp_path / "home")})
        assert res.returncode == 0, res.stderr
        assert res.stdout.startswith("Usage: ") and "Commands:" in res.stdout
        assert res.stderr == "" and not res.stdout.startswith("error")
    assert not (tmp_path / "home").exists()  # and nothing was started


def test_status_shows_the_lag_readably(backfilled, cli_env, conn, layout):
    from bqx.core.text import format_duration

    assert [format_duration(s) for s in (0, 45, 725, 3780, 86400 + 4 * 3600 + 59)] == [
        "0 s", "45 s", "12 m 05 s", "1 h 03 m", "1 d 04 h",
    ]  # fmt: skip
    source = names.source(layout, "eurusd")
    conn.execute(sql.SQL("INSERT INTO {t} SELECT max(time) + interval '63 minutes', 1.1, 1.1,"
                         " 1.1, 1.1, 1 FROM {t}").format(t=source))  # fmt: skip
    (pair,) = json.loads(cli("status", "--json", env=cli_env).stdout)["pairs"]
    assert pair["lag_s"] == 3780.0  # the raw number for scripts
    text = cli("status", env=cli_env).stdout
    header = next(line for line in text.splitlines() if "newest metric" in line)
    assert [w for w in header.split() if w.isalpha()][-2:] == ["lag", "current"]
    assert "lag s" not in text
    row = next(line for line in text.splitlines() if line.strip().startswith("EURUSD"))
    assert row.split("│")[-2].strip() == "1 h 03 m" and row.split("│")[-1].strip() == "no", row


# -- 3. output -----------------------------------------------------------------------------


def test_plural():
    assert [plural(n, "job") for n in (0, 1, 2, 1234)] == [
        "0 jobs",
        "1 job",
        "2 jobs",
        "1,234 jobs",
    ]
    assert plural(1, "pair-month") == "1 pair-month" and plural(3, "box", "boxes") == "3 boxes"


def test_piped_output_is_one_line_per_event(cli_env, make_bars):
    """Not on a terminal: no hard wrap at 80 columns, one line per event, right grammar."""
    make_bars("eurusd", "2024-07-01", 20 * 1440, seed=1)
    res = run("backfill", "--workers", "1", env={**cli_env, "COLUMNS": "40"})
    assert res.returncode == 0, res.stderr
    (line,) = res.stdout.splitlines()
    assert re.fullmatch(
        r"run \d+: 1 job done, 0 skipped, 0 failed of 1 · [\d,]+ rows in [\d.]+s \([\d,]+ rows/s\)",
        line,
    ), line
    assert len(line) > 40  # longer than the console's width, yet one line


def test_no_run_message_is_a_sentence(cli_env):
    res = run("verify", env={**cli_env, "BQX_SCHEMA": "nosuch"})
    assert res.returncode == 1
    assert res.stderr == (
        "error: no backfill run is recorded in schema 'nosuch': run `bqx backfill` first\n"
    )


def test_verify_and_report_show_progress_when_piped(cli_env, backfilled, tmp_path):
    res = cli("verify", "--sample", "3", env=cli_env)
    assert res.exit_code == 0, res.stderr
    stages = [line.split(":")[1].split("(")[0].strip() for line in res.stderr.splitlines()]
    assert stages == ["partitions", "keys", "values", "recompute_sample", "ledger", "done"]
    assert all(re.fullmatch(r"verify: \w+ \([\d.]+ s\)", x) for x in res.stderr.splitlines())
    assert len(res.stdout.splitlines()) == 6 and "FAIL" not in res.stdout
    res = cli("report", "--out", str(tmp_path / "r"), "--sample", "3", env=cli_env)
    assert res.exit_code == 0, res.stderr
    lines = res.stderr.splitlines()
    assert lines[0].startswith("report: reading the ledger (")
    assert any(x.startswith("report: drawing the charts") for x in lines)
    assert len(lines) < 20  # a few lines, not one per pair
    res = cli("--quiet", "verify", "--sample", "3", env=cli_env)
    assert res.exit_code == 0 and res.stdout == "" and res.stderr == ""


def test_export_features_and_baseline_show_rate_and_eta_when_they_take_long(
    cli_env, backfilled, tmp_path, monkeypatch
):
    import bqx.progress

    # as if every step took longer than the plain-line interval (5 s)
    monkeypatch.setattr(bqx.progress, "PLAIN_EVERY_S", 0.0)
    SPLIT = "0.5,0.25,0.25"  # noqa: N806 - the 10 days start on a Saturday: no weekend split
    line = r"{}: {} \d+/\d+ · [\d,.]+(?: rows · [\d,]+ rows/s|/s) · ETA [\d:-]+ \(\d+ s\)"
    res = cli("export", "--out", str(tmp_path / "x"), "--json", env=cli_env)
    assert res.exit_code == 0, res.output
    lines = res.stderr.splitlines()
    assert lines and all(re.fullmatch(line.format("export", "writing"), x) for x in lines), lines
    assert lines[-1].startswith("export: writing 2/2 · ") and "ETA 00:00" in lines[-1]
    json.loads(res.stdout)  # the document alone on stdout
    res = cli("features", "--out", str(tmp_path / "f"), "--horizon", "15", "--split", SPLIT,
              env=cli_env)  # fmt: skip
    assert res.exit_code == 0, res.output
    lines = res.stderr.splitlines()
    assert lines and all(re.fullmatch(line.format("features", "pairs"), x) for x in lines), lines
    res = cli("baseline", "--features", str(tmp_path / "f"), "--trees", "20", env=cli_env)
    assert res.exit_code == 0, res.output
    stages = {x.split()[1] for x in res.stderr.splitlines()}
    assert {"reading", "ridge", "lightgbm", "bootstrap"} <= stages, res.stderr
    assert all(re.fullmatch(line.format("baseline", r"\w+"), x) for x in res.stderr.splitlines())
    for args in (["export", "--out", str(tmp_path / "q")],
                 ["features", "--out", str(tmp_path / "fq"), "--split", SPLIT]):  # fmt: skip
        res = cli("--quiet", *args, env=cli_env)
        assert res.exit_code == 0 and res.stderr == "", res.stderr


def test_rate_progress_on_a_terminal_shows_rate_and_eta():
    import io

    from rich.console import Console

    from bqx.progress import RateProgress, configure

    configure()  # not --quiet (an earlier command in this process may have set it)
    out = io.StringIO()
    progress = RateProgress("export", Console(file=out, force_terminal=True, width=120))
    for done in range(4):
        progress("writing", done, 4, rows=1000 * done)
        time.sleep(0.05)
    progress.close()  # the last refresh
    text = out.getvalue()
    assert "export" in text and "rows/s" in text and "ETA" in text and "3/4" in text


# -- 4. status --watch ---------------------------------------------------------------------


def test_watch_piped_prints_a_line_per_interval(cli_env):
    proc = subprocess.Popen(
        [sys.executable, "-m", "bqx.cli", "status", "--watch", "--interval", "0.2"],
        env={**cli_env, "PYTHONPATH": SRC}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        first = proc.stdout.readline()  # arrives while the watch goes on, not at its end
        second = proc.stdout.readline()
        assert proc.poll() is None
    finally:
        proc.terminate()
        proc.communicate(timeout=30)
    for line in (first, second):
        assert re.fullmatch(r"\d\d:\d\d:\d\d no backfill run recorded yet\n", line), line


def test_watch_until_done_ends_with_the_run(cli_env, make_bars, settings, layout, conn):
    make_bars("eurusd", "2024-07-01", 20 * 1440, seed=1)
    store_for(settings, layout).backfill(workers=1)
    res = run("status", "--watch", "--until-done", "--interval", "0.1", env=cli_env, timeout=60)
    assert res.returncode == 0, res.stderr
    (line,) = res.stdout.splitlines()
    assert " done · jobs 1/1 done, 0 running, 0 failed, 0 pending · " in line
    # a run that ended with a failed job: stop too, exit 1
    conn.execute(sql.SQL("UPDATE {} SET status = 'failed'").format(names.table(layout, "bqx_jobs")))
    conn.execute(sql.SQL("UPDATE {} SET status = 'failed'").format(names.table(layout, "bqx_runs")))
    res = run("status", "--watch", "--until-done", "--interval", "0.1", env=cli_env, timeout=60)
    assert res.returncode == 1 and "1 failed" in res.stdout
    res = cli("status", "--until-done", env=cli_env)  # --until-done watches by itself
    assert res.exit_code == 1 and "1 failed" in res.stdout


def test_watch_until_done_follows_a_live_run(cli_env, make_bars, conn, layout):
    make_bars("eurusd", "2024-07-01", 62 * 1440, seed=1)
    make_bars("gbpusd", "2024-07-01", 62 * 1440, seed=2)
    env = {**cli_env, "PYTHONPATH": SRC}
    proc = subprocess.Popen(
        [sys.executable, "-m", "bqx.cli", "backfill", "--workers", "1"], env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # until the run is recorded
        if (
            conn.execute(
                "SELECT 1 FROM pg_tables WHERE schemaname = %s AND tablename = 'bqx_runs'",
                (layout.schema,),
            ).fetchone()
            and conn.execute(
                sql.SQL("SELECT count(*) FROM {}").format(names.table(layout, "bqx_runs"))
            ).fetchone()[0]
        ):
            break
        time.sleep(0.05)
    res = run("status", "--watch", "--until-done", "--interval", "0.2", env=cli_env)
    assert proc.wait(timeout=120) == 0
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert " done · jobs 4/4 done" in lines[-1]
    assert len(lines) >= 2 and " running · " in lines[0]  # it followed the run to its end


# -- 5. nothing to check is not a success --------------------------------------------------


def test_a_run_with_zero_jobs_is_not_the_latest_and_not_a_pass(
    cli_env, backfilled, conn, layout, tmp_path
):
    empty = empty_run(conn, layout)
    res = cli("status", "--json", env=cli_env)
    assert json.loads(res.stdout)["run"]["run_id"] == backfilled.run_id
    res = cli("verify", "--sample", "3", "--json", env=cli_env)
    doc = json.loads(res.stdout)
    assert res.exit_code == 0 and doc["run_id"] == backfilled.run_id and doc["jobs"] == 2
    res = cli("verify", "--run", str(empty), env=cli_env)
    assert res.exit_code == 1 and "PASS" not in res.stdout
    assert res.stderr == (
        f"error: nothing to check: run {empty} planned no job (no source bars in its pairs"
        " and months)\n"
    )
    res = cli("verify", "--run", str(empty), "--json", env=cli_env)
    doc = json.loads(res.stdout)
    assert res.exit_code == 1 and doc["ok"] is False and doc["checks"] == []
    assert doc["nothing_to_check"].startswith(f"run {empty} planned no job")
    # the report of the empty run is written, and says so
    res = cli("report", "--run", str(empty), "--out", str(tmp_path / "e"), env=cli_env)
    assert res.exit_code == 0, res.stderr
    md = (tmp_path / "e" / "report.md").read_text()
    assert "**Status:** EMPTY" in md and "COMPLETE" not in md
    assert "Nothing to check: run" in md
    assert (tmp_path / "e" / "report.html").read_text().count("data:image/png;base64,") == 3
    assert "the report says EMPTY" in res.stderr
    # by default the report is of the real latest run
    res = cli("report", "--out", str(tmp_path / "d"), "--sample", "3", env=cli_env)
    assert res.exit_code == 0, res.stderr
    assert (
        f"**Run:** {backfilled.run_id} (done) · **Status:** COMPLETE"
        in (tmp_path / "d" / "report.md").read_text()
    )


def test_only_empty_runs_say_so(cli_env, conn, layout, settings):

    Ledger(layout).create(conn)
    empty = empty_run(conn, layout)
    res = run("verify", env=cli_env)
    assert res.returncode == 1 and res.stderr == (
        f"error: no backfill run with jobs is recorded in schema {layout.schema!r} (run {empty}"
        " planned no job): load bars, then run `bqx backfill`\n"
    )


# -- 6. a crashed or interrupted run is never COMPLETE --------------------------------------


def test_report_of_a_run_that_did_not_end_done(backfilled, conn, layout, tmp_path, cli_env):
    from bqx.ops.report import write_report
    from bqx.ops.verify import verify

    checked = verify(conn, layout, sample=2)  # the tables are fine: only the run's end differs
    assert checked.ok
    for status in ("interrupted", "running", "failed"):
        conn.execute(
            sql.SQL("UPDATE {} SET status = %s").format(names.table(layout, "bqx_runs")), (status,)
        )
        md_path, _, data = write_report(conn, layout, tmp_path / status, verification=checked)
        md = md_path.read_text()
        assert data.headline()["status"] == "INCOMPLETE", status
        assert "COMPLETE" not in md.replace("INCOMPLETE", ""), status
        assert f"**Status:** INCOMPLETE: run {backfilled.run_id} " in md
    res = cli("report", "--out", str(tmp_path / "cli"), "--sample", "2", "--json", env=cli_env)
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert (doc["status"], doc["run_status"]) == ("INCOMPLETE", "failed")
    assert doc["why"] == f"run {backfilled.run_id} ended failed"


def test_status_and_report_show_mode_and_windows(
    settings, layout, make_bars, conn, tmp_path, cli_env
):
    make_bars("eurusd", "2024-07-01", 3 * 1440, seed=1)
    store_for(settings, layout).backfill(workers=1, mode="clock", max_fill=3, windows=(10, 20))
    res = cli("status", env=cli_env)
    assert "clock mode, windows 10, 20, max fill 3 min" in res.stdout
    doc = json.loads(cli("status", "--json", env=cli_env).stdout)["run"]
    assert (doc["mode"], doc["windows"], doc["max_fill"]) == ("clock", [10, 20], 3)
    res = cli("report", "--out", str(tmp_path), "--sample", "2", "--json", env=cli_env)
    doc = json.loads(res.stdout)
    assert (doc["mode"], doc["windows"], doc["max_fill"]) == ("clock", [10, 20], 3)
    md = (tmp_path / "report.md").read_text()
    assert "**Parameters:** clock mode, windows 10, 20, max fill 3 min." in md


# -- 7. JSON for scripts --------------------------------------------------------------------


def test_generate_and_report_json(cli_env, tmp_path, conn, layout):
    res = cli("generate", "--pairs", "eurusd", "--start", "2024-07", "--json", env=cli_env)
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    stored = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(names.source(layout, "eurusd")))
    assert doc["bars"] == stored.fetchone()[0] > 20_000 and doc["pairs"] == ["EURUSD"]
    assert doc["months"] == ["2024-07"]
    res = cli("generate", "--pairs", "eurusd", "--start", "2024-07", env=cli_env)
    assert res.stdout.startswith(f"generated {doc['bars']:,} bars for 1 pair, 2024-07 (seed 0")


def test_demo_json_and_next_steps_run_as_printed(cli_env, tmp_path):
    args = ["demo", "--months", "1", "--pairs", "EURUSD", "--out", str(tmp_path / "rep")]
    res = run(*args, "--json", "--workers", "1", env=cli_env, cwd=tmp_path, timeout=300)
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)  # the document alone on stdout; the narration on stderr
    assert doc["ok"] is True and doc["verify"]["ok"] is True
    assert doc["run"]["jobs_total"] == 1 and doc["bars"] > 20_000
    assert doc["report"]["files"] == [str(tmp_path / "rep" / "report.md"),
                                      str(tmp_path / "rep" / "report.html")]  # fmt: skip
    lines = res.stderr.splitlines()
    assert "1/4 generating 1 pair × 1 month of bars (2024-07..2024-07)" in lines
    steps = [x.strip() for x in lines[lines.index("next steps, to run as printed:") + 1 :]]
    assert steps == doc["next"]
    assert [x.split()[-1] for x in steps[:2]] == ["status", "verify"]
    env = {**cli_env, "PYTHONPATH": SRC}
    # psql connects with the URL as printed, which shows no password on a command line (`ps`)
    assert steps[3].startswith("psql ") and "show-password" not in steps[3]
    for step in [*steps[:2], steps[3]]:  # each runs as printed, from where the demo ran
        done = subprocess.run(step, shell=True, env=env, cwd=tmp_path, capture_output=True,
                              text=True, timeout=180, stdin=subprocess.DEVNULL)  # fmt: skip
        assert done.returncode == 0, (step, done.stderr)


# -- 2. next steps as the user can type them ------------------------------------------------


def test_invocation_is_what_the_user_can_type(tmp_path):
    venv_bqx = tmp_path / ".venv" / "bin" / "bqx"
    venv_bqx.parent.mkdir(parents=True)
    venv_bqx.write_text("#!/bin/sh\n")

    def nowhere(name):
        return None

    # `make demo` runs .venv/bin/bqx, which is not on PATH
    assert invocation(".venv/bin/bqx", "/py", tmp_path, nowhere) == ".venv/bin/bqx"
    assert invocation(str(venv_bqx), "/py", tmp_path, nowhere) == ".venv/bin/bqx"
    # activated (or installed): plain bqx
    assert invocation(str(venv_bqx), "/py", tmp_path, lambda n: str(venv_bqx)) == "bqx"
    # outside the current directory: the whole path
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    assert invocation(str(venv_bqx), "/py", elsewhere, nowhere) == str(venv_bqx)
    # python -m bqx.cli
    assert invocation("/x/src/bqx/cli.py", "/my env/python", tmp_path, nowhere) == (
        shlex.quote("/my env/python") + " -m bqx.cli"
    )


SCHEMA_COMMANDS = [
    ["init", "--start", "2024-07", "--end", "2024-07"],
    ["generate", "--pairs", "EURUSD"],
    ["ingest", "{file}", "--pair", "EURUSD"],
    ["delete-bars", "--pair", "EURUSD", "--start", "2024-07", "--end", "2024-07", "--yes"],
    ["backfill"], ["update"], ["status"], ["runs"], ["verify"],
    ["report", "--out", "{out}"], ["export", "--out", "{out}"], ["features", "--out", "{out}"],
    ["demo", "--months", "1", "--out", "{out}"],
]  # fmt: skip


def test_a_system_schema_is_refused_by_every_command_before_anything_is_created(
    bqx, conn, tmp_path, monkeypatch
):
    """pg_dump leaves information_schema and pg_* out of every backup: bars, metrics and
    ledger there would be lost without a word, so no command takes such a schema."""
    bars = tmp_path / "bars.csv"
    bars.write_text("20240701 000000;1.1;1.2;1.0;1.15;0\n")
    out = tmp_path / "out"
    why = "a PostgreSQL system schema, which pg_dump leaves out of every backup: choose another"
    for schema in ("information_schema", "pg_bqx"):
        for args in SCHEMA_COMMANDS:
            args = [a.format(file=bars, out=out) for a in args]
            res = bqx([*args, "--schema", schema])
            assert res.returncode == 2, (args, res.stderr)
            assert res.stderr == f"error: invalid --schema {schema!r}: {why}\n", args
    res = bqx(["backfill", "--source-table", "information_schema.m1_{pair}"])
    assert res.returncode == 2 and res.stderr == (
        "error: invalid --source-table 'information_schema.m1_{pair}': information_schema is a"
        " PostgreSQL system schema, which pg_dump leaves out of every backup\n"
    )
    made = conn.execute(
        "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE"
        " (n.nspname = 'information_schema' OR n.nspname LIKE 'pg\\_%%')"
        " AND (c.relname LIKE 'm1\\_%%' OR c.relname LIKE 'bqx\\_%%')"
    ).fetchone()[0]
    assert made == 0 and not out.exists() and not list(tmp_path.glob("*.rejects.csv"))
    monkeypatch.setenv("BQX_SCHEMA", "pg_catalog")  # the environment's schema too
    res = bqx(["generate", "--pairs", "EURUSD"])
    assert res.returncode == 2 and "invalid --schema 'pg_catalog'" in res.stderr
    with pytest.raises(InvalidOption, match="invalid schema 'pg_toast': a PostgreSQL system"):
        bqx_api.Store(schema="pg_toast")
    assert Layout("public").schema == "public"  # public is dumped like any schema: taken


# -- 8. dropping a pair ---------------------------------------------------------------------


def _exists(conn, ident) -> bool:
    return conn.execute("SELECT to_regclass(%s)", (names.as_text(ident),)).fetchone()[0] is not None


def _ledger_rows(conn, layout, pair: str) -> list[int]:
    counts = []
    for table, where in (
        ("bqx_jobs", "pair"),
        ("bqx_attempts", "pair"),
        ("bqx_targets", "target_table"),
        ("bqx_source_versions", "source_table"),
    ):
        value = pair if where == "pair" else f"{'bqx' if table == 'bqx_targets' else 'm1'}_{pair}"
        counts.append(
            conn.execute(
                sql.SQL("SELECT count(*) FROM {} WHERE {} = %s").format(
                    names.table(layout, table), sql.Identifier(where)
                ),
                (value,),
            ).fetchone()[0]
        )
    return counts  # fmt: skip


def test_drop_a_pair_asks_refuses_a_held_job_and_drops_in_one_transaction(
    cli_env, settings, layout, make_bars, conn, tmp_path
):
    import psycopg

    from bqx.store.ledger import worker_id

    make_bars("eurusd", "2024-07-29", 4 * 1440, seed=1)
    make_bars("usdjpy", "2024-07-29", 4 * 1440, seed=2, level=160.0)
    store_for(settings, layout).backfill(workers=1)
    out = tmp_path / "x"
    store_for(settings, layout).export(out)
    src, tgt = names.source(layout, "usdjpy"), names.target(layout, "usdjpy")
    assert all(_ledger_rows(conn, layout, "usdjpy"))
    # without a terminal and without --yes: says what, drops nothing
    res = run("drop", "--pair", "USDJPY", env=cli_env)
    assert res.returncode == 1 and "not dropping without confirmation: give --yes" in res.stderr
    assert f"USDJPY: will drop {names.as_text(src)} (2 partitions, " in res.stderr
    assert "2 ledger jobs with their attempts" in res.stderr
    # a live run holds one of its jobs: refused, naming the run
    jobs = names.table(layout, "bqx_jobs")
    conn.execute(sql.SQL("UPDATE {} SET status = 'running', worker = %s, heartbeat_at = now()"
                         " WHERE pair = 'usdjpy' AND month = '2024-08-01'").format(jobs),
                 (worker_id(),))  # fmt: skip
    res = run("drop", "--pair", "USDJPY", "--yes", env=cli_env)
    assert res.returncode == 1 and res.stderr.count("\n") == 2, res.stderr  # the plan, the error
    assert "error: USDJPY: run " in res.stderr and "holds 1 of its jobs (2024-08 on" in res.stderr
    conn.execute(sql.SQL("UPDATE {} SET status = 'done', worker = NULL").format(jobs))
    # a worker inside its write transaction (the job's row locked): refused at once too
    with psycopg.connect(store_for(settings).url()) as other:
        other.execute(sql.SQL("SELECT 1 FROM {} WHERE pair = 'usdjpy' FOR UPDATE").format(jobs))
        res = run("drop", "--pair", "USDJPY", "--yes", env=cli_env, timeout=60)
        assert res.returncode == 1 and "a run is writing its jobs right now" in res.stderr
    # one transaction: a view on the metrics table makes the drop fail, and nothing goes
    view = sql.Identifier(layout.schema, "users_view")
    conn.execute(sql.SQL("CREATE VIEW {} AS SELECT * FROM {}").format(view, tgt))
    res = run("drop", "--pair", "USDJPY", "--yes", env=cli_env)
    assert res.returncode == 1 and "other objects depend on it" in res.stderr, res.stderr
    assert _exists(conn, src) and _exists(conn, tgt) and all(_ledger_rows(conn, layout, "usdjpy"))
    conn.execute(sql.SQL("DROP VIEW {}").format(view))
    res = run("drop", "--pair", "usdjpy", "--yes", "--json", env=cli_env)
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["dropped"] is True and doc["jobs"] == 2 and set(doc["tables"]) == {
        names.as_text(src), names.as_text(tgt)}  # fmt: skip
    assert not _exists(conn, src) and not _exists(conn, tgt)
    assert _ledger_rows(conn, layout, "usdjpy") == [0, 0, 0, 0]
    assert all(_ledger_rows(conn, layout, "eurusd"))  # the other pair is untouched
    res = run("drop", "--pair", "USDJPY", "--yes", env=cli_env)
    assert res.returncode == 0 and "nothing to drop" in res.stdout
    # the next export leaves no partition of the dropped pair for readers
    again = store_for(settings, layout).export(out)
    assert not (out / "pair=usdjpy").exists() and len(again.removed) == 2
    assert store_for(settings, layout).verify(sample=2).ok


def test_runs_lists_the_latest_runs_newest_first(cli_env, settings, layout, backfilled):
    noop = store_for(settings, layout).backfill(workers=1)
    res = cli("runs", "--json", env=cli_env)
    assert res.exit_code == 0, res.stderr
    runs = json.loads(res.stdout)["runs"]
    assert [r["run_id"] for r in runs] == [noop.run_id, backfilled.run_id]
    assert [(r["jobs_done"], r["jobs_total"], r["status"]) for r in runs] == [
        (0, 2, "done"), (2, 2, "done")]  # fmt: skip
    assert runs[1]["rows_written"] == backfilled.rows_written > 0
    text = cli("runs", "--limit", "1", env=cli_env).stdout.splitlines()
    assert text[0].split() == ["run", "command", "started", "(UTC)", "s", "jobs", "rows", "status"]
    assert len(text) == 2 and text[1].split()[0] == str(noop.run_id)
