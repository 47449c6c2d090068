"""The CI workflows in the repository (.github/workflows/): valid against GitHub's schema and
clean under zizmor's audit, both offline (what `make lint` runs), and shaped as the README says:
lint and `make test` on every push and pull request, on each supported Python, one job against a
PostgreSQL service container, least privilege, no token left on disk, a tag checks the dists."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = sorted((ROOT / ".github" / "workflows").glob("*.yml"))
BIN = Path(sys.executable).parent


def _tool(name: str) -> str:
    found = BIN / name if (BIN / name).exists() else shutil.which(name)
    assert found, f"{name} is not installed: pip install -e '.[dev]'"
    return str(found)


def _load(path: Path) -> dict[str, Any]:
    return YAML(typ="safe").load(path.read_text())  # YAML 1.2: `on` stays a string


def _steps(job: dict[str, Any]) -> list[dict[str, Any]]:
    return list(job.get("steps", []))


def test_the_workflows_pass_the_schema_and_the_audit_offline():
    assert WORKFLOWS, "no workflow in .github/workflows"
    paths = [str(p) for p in WORKFLOWS]
    schema = subprocess.run(
        [_tool("check-jsonschema"), "--builtin-schema", "vendor.github-workflows", *paths],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert schema.returncode == 0, schema.stdout + schema.stderr
    audit = subprocess.run(
        [_tool("zizmor"), "--offline", "--persona", "pedantic", str(ROOT / ".github/workflows")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert audit.returncode == 0, audit.stdout + audit.stderr
    # every finding accepted in the file says why, in a comment above it
    for path in WORKFLOWS:
        lines = path.read_text().splitlines()
        for n, line in enumerate(lines):
            if "zizmor: ignore" in line:
                assert lines[n - 1].strip().startswith("#"), f"{path.name}:{n + 1}: say why"


def test_ci_runs_lint_and_make_test_on_every_push_and_pull_request():
    ci = _load(ROOT / ".github/workflows/ci.yml")
    assert {"push", "pull_request"} <= set(ci["on"])
    jobs = ci["jobs"]
    runs = {name: " ".join(s.get("run", "") for s in _steps(job)) for name, job in jobs.items()}
    assert "make lint" in runs["lint"]
    assert "make test" in runs["test"] and "make test" in runs["postgres-service"]
    # each Python that requires-python admits, up to the newest the pins have wheels for
    floor = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    versions = jobs["test"]["strategy"]["matrix"]["python"]
    assert versions[0] == floor.removeprefix(">=") and len(versions) >= 3
    # the service job reaches PostgreSQL through libpq's PG* variables
    service = jobs["postgres-service"]
    assert service["services"]["postgres"]["image"].startswith("postgres:")
    env_steps = [s for s in _steps(service) if "PGHOST" in s.get("env", {})]
    assert env_steps and "bqx backfill" in env_steps[0]["run"]
    assert {"PGHOST", "PGPORT", "PGUSER", "PGPASSWORD", "PGDATABASE"} <= set(env_steps[0]["env"])
    # a tag builds and checks the sdist and the wheel
    dist = jobs["dist"]
    assert (
        "tag" in dist["if"] and "make dist" in runs["dist"] and "make wheel-check" in runs["dist"]
    )


def test_least_privilege_and_no_token_on_disk():
    for path in WORKFLOWS:
        wf = _load(path)
        assert wf.get("permissions") == {}, f"{path.name}: the default token must hold nothing"
        for name, job in wf["jobs"].items():
            perms = job.get("permissions", {})
            assert perms in ({}, {"contents": "read"}), f"{path.name}:{name}: {perms}"
            for step in _steps(job):
                uses = step.get("uses", "")
                if uses:  # pinned to a commit, the release named beside it
                    assert re.fullmatch(r"[\w.-]+/[\w.-]+@[0-9a-f]{40}", uses), uses
                if uses.startswith("actions/checkout@"):
                    assert step["with"]["persist-credentials"] is False, f"{path.name}:{name}"
    text = (ROOT / ".github/workflows/ci.yml").read_text()
    assert all(
        re.search(r"@[0-9a-f]{40} # v\d", line) for line in text.splitlines() if "uses:" in line
    )
