"""Packaging: the extras of pyproject.toml and what a missing one looks like (no database).

A missing extra is simulated by making its package unimportable: ``sys.modules[name] = None``
makes ``import name`` raise ImportError. The wheel as a user installs it is checked by
``make wheel-check`` (tools/wheel_check.sh), not here.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest

from bqx import extras
from bqx.errors import BqxError, MissingExtra

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "bqx"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]
NAME = PROJECT["name"]
EXTRAS: dict[str, list[str]] = PROJECT["optional-dependencies"]
IMPORT_NAME = {"scikit-learn": "sklearn"}  # distribution -> module, where they differ
FEATURE_EXTRAS = (
    "dask",
    "ml",
    "service",
    "aws",
    "lake",
)  # each brings a feature; "all" is them all


def dist_name(requirement: str) -> str:
    """``"psycopg[binary]==3.3.9"`` -> ``psycopg``; names normalised as PEP 503 does."""
    name = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", requirement.strip())
    assert name, requirement
    return re.sub(r"[-_.]+", "-", name.group(0)).lower()


def expand(requirements: list[str], seen: frozenset[str] = frozenset()) -> set[str]:
    """The requirements with this project's own extras (``bqx-metrics[all]``) replaced by theirs."""
    out: set[str] = set()
    for req in requirements:
        own = re.fullmatch(rf"{re.escape(NAME)}\[([\w,\s-]+)\]", req.strip())
        if own is None:
            out.add(req.strip())
            continue
        for extra in (e.strip() for e in own.group(1).split(",")):
            assert extra in EXTRAS, f"{req} names an extra pyproject.toml does not define"
            assert extra not in seen, f"the extras include each other: {req}"
            out |= expand(EXTRAS[extra], seen | {extra})
    return out


def assert_names_the_extra(exc: BaseException, extra: str) -> None:
    message = str(exc)
    assert isinstance(exc, MissingExtra) and isinstance(exc, BqxError)
    assert exc.extra == extra
    assert "\n" not in message
    assert f'"{extra}" extra' in message
    assert message.endswith(f"pip install 'bqx-metrics[{extra}]'"), message


def hide(monkeypatch: pytest.MonkeyPatch, *modules: str) -> None:
    """Make ``modules`` (and any submodule already imported) unimportable for this test."""
    for name in modules:
        for loaded in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
            monkeypatch.setitem(sys.modules, loaded, None)
        monkeypatch.setitem(sys.modules, name, None)


# -- require -------------------------------------------------------------------------------


def test_require_returns_the_module_when_it_imports():
    assert extras.require("ml", "json", "a feature") is sys.modules["json"]


def test_require_names_the_extra_and_keeps_the_import_error(monkeypatch):
    hide(monkeypatch, "json")
    with pytest.raises(MissingExtra) as err:
        extras.require("service", "json", "the thing")
    expected = "the thing needs the \"service\" extra: pip install 'bqx-metrics[service]'"
    assert str(err.value) == expected
    assert err.value.module == "json"
    assert isinstance(err.value.__cause__, ImportError)


# -- the three extras, missing -----------------------------------------------------------


def test_dask_executor_without_the_dask_extra(monkeypatch):
    from bqx.pipeline.executors import check_executor
    from bqx.pipeline.executors import dask as dask_executor

    hide(monkeypatch, "distributed")
    # refused with the other options, before a run is recorded
    with pytest.raises(MissingExtra) as err:
        check_executor("dask")
    assert_names_the_extra(err.value, "dask")
    assert "Dask executor" in str(err.value)
    check_executor("threads")  # the other executors do not need it
    # and where the executor imports it (its shutdown runs on the way out: same error)
    with pytest.raises(MissingExtra) as err:
        dask_executor.DaskExecutor(1)
    assert_names_the_extra(err.value, "dask")


def test_dask_executor_without_psutil(monkeypatch):
    from bqx.pipeline.executors import dask as dask_executor

    hide(monkeypatch, "psutil")
    with pytest.raises(MissingExtra) as err:
        dask_executor._kill_children([])
    assert_names_the_extra(err.value, "dask")


def test_cli_backfill_on_dask_without_the_extra_is_one_line(tmp_path):
    """The whole command: exit 1, one stderr line, and no database reached (the URL is dead)."""
    code = (
        "import sys; sys.modules['distributed'] = None; from bqx.cli import main;"
        " sys.argv = ['bqx', 'backfill', '--executor', 'dask']; main()"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BQX_", "PG"))}
    env |= {"BQX_HOME": str(tmp_path / "home"), "PYTHONPATH": str(SRC.parent),
            "BQX_DATABASE_URL": "postgresql://nobody@127.0.0.1:1/none?connect_timeout=1"}  # fmt: skip
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert res.returncode == 1, res.stderr
    lines = res.stderr.splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0] == (
        'error: the Dask executor (--executor dask) needs the "dask" extra:'
        " pip install 'bqx-metrics[dask]'"
    )


def test_baseline_without_the_ml_extra(monkeypatch):
    from bqx.ml import baseline

    x, y = np.zeros((20, 2)), np.zeros(20)
    hide(monkeypatch, "sklearn")
    with pytest.raises(MissingExtra) as err:
        baseline._fit_ridge(x, y, x, y)
    assert_names_the_extra(err.value, "ml")
    hide(monkeypatch, "lightgbm")
    with pytest.raises(MissingExtra) as err:
        baseline._fit_gbm(x, y, x, y, trees=10, seed=0, n_jobs=1)
    assert_names_the_extra(err.value, "ml")
    assert "bqx baseline" in str(err.value)


def test_a_database_secret_or_iam_without_the_aws_extra(monkeypatch):
    """Asking for a secret, or for IAM tokens, without boto3: one line naming the extra."""
    from bqx.db import credentials
    from bqx.db.connect import connect

    hide(monkeypatch, "boto3")
    monkeypatch.setattr(credentials, "_clients", {})
    with pytest.raises(MissingExtra) as err:
        connect(credentials.DatabaseRef("secret", "prod/bqx"))
    assert_names_the_extra(err.value, "aws")
    assert "BQX_DATABASE_SECRET" in str(err.value)
    iam = credentials.DatabaseRef("url", "postgresql://app@db.example:5432/bqx", iam=True)
    with pytest.raises(MissingExtra) as err:
        connect(iam)
    assert_names_the_extra(err.value, "aws")
    assert "BQX_DATABASE_IAM" in str(err.value)


def test_metrics_port_without_the_service_extra(monkeypatch):
    from bqx.service.follow import _Metrics

    hide(monkeypatch, "prometheus_client")
    with pytest.raises(MissingExtra) as err:
        _Metrics(0)
    assert_names_the_extra(err.value, "service")
    assert "--metrics-port" in str(err.value)


# -- pyproject.toml ----------------------------------------------------------------------


def test_the_distribution_is_bqx_metrics_and_the_command_bqx():
    assert NAME == extras.DISTRIBUTION == "bqx-metrics"
    assert PROJECT["scripts"] == {"bqx": "bqx.cli:main"}
    assert "py.typed" in PYPROJECT["tool"]["setuptools"]["package-data"]["bqx"]
    assert (SRC / "py.typed").is_file()


def test_dev_covers_every_other_extra():
    dev = expand(EXTRAS["dev"])
    for extra, requirements in EXTRAS.items():
        missing = expand(requirements) - dev
        assert not missing, f"[dev] lacks {sorted(missing)} of [{extra}]"
    assert expand(EXTRAS["all"]) == expand(
        EXTRAS["dask"] + EXTRAS["ml"] + EXTRAS["service"] + EXTRAS["aws"] + EXTRAS["lake"]
    )


def test_every_requirement_is_pinned_and_the_core_holds_no_extra():
    for req in [*PROJECT["dependencies"], *(r for rs in EXTRAS.values() for r in expand(rs))]:
        assert re.fullmatch(r"[\w.\-]+(\[[\w,]+\])?==[\w.]+", req), f"not an exact pin: {req}"
    core = {dist_name(r) for r in PROJECT["dependencies"]}
    for extra in FEATURE_EXTRAS:
        both = core & {dist_name(r) for r in expand(EXTRAS[extra])}
        assert not both, f"{sorted(both)} of [{extra}] are in the core dependencies"


def _extra_modules() -> dict[str, str]:
    """Module -> extra, for every package of the extras that bring a feature."""
    return {
        IMPORT_NAME.get(dist_name(r), dist_name(r).replace("-", "_")): extra
        for extra in FEATURE_EXTRAS
        for r in expand(EXTRAS[extra])
    }


def test_the_extras_packages_are_imported_only_through_require():
    modules = _extra_modules()
    assert {"dask", "distributed", "psutil", "sklearn", "lightgbm", "prometheus_client",
            "boto3", "botocore", "deltalake"} <= set(modules)  # fmt: skip
    plain, asked = [], []
    for path in sorted(SRC.rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for name in names:
                if name.split(".")[0] in modules:
                    plain.append(f"{path.relative_to(ROOT)}:{node.lineno}: import {name}")
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id == "require"
                and len(node.args) >= 2
                and all(isinstance(a, ast.Constant) for a in node.args[:2])
            ):
                extra, module = node.args[0].value, node.args[1].value
                asked.append((extra, module))
                where = f"{path.relative_to(ROOT)}:{node.lineno}"
                assert extra in EXTRAS, f"{where}: require() names no extra of pyproject: {extra}"
                assert modules.get(module.split(".")[0]) == extra, (
                    f"{where}: {module} is not a package of the {extra!r} extra"
                )
    assert not plain, "import these through bqx.extras.require:\n" + "\n".join(plain)
    assert {extra for extra, _ in asked} == set(FEATURE_EXTRAS)


def test_docs_install_the_distribution_not_the_other_bqx():
    """``pip install bqx`` would bring an unrelated BigQuery tool from PyPI."""
    wrong = []
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"pip install\s+(-\S+\s+)*['\"]?bqx(?![-\w])", line):
                wrong.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
            for extra in re.findall(r"bqx-metrics\[([\w,]+)\]", line):
                if not set(extra.split(",")) <= set(EXTRAS):
                    wrong.append(f"{path.relative_to(ROOT)}:{n}: no extra [{extra}]")
    assert not wrong, "\n".join(wrong)
