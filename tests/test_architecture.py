"""The shape of the code (docs/architecture.md), kept by tests: who holds SQL, who owns the
ledger, who builds SQL names, that the CLI only parses and renders, no import cycle, and no
function too complex to read."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PKG = SRC / "bqx"
SQL_WORDS = re.compile(r"\b(SELECT|INSERT INTO|DELETE FROM|UPDATE \w+ SET|TRUNCATE {|CREATE TABLE)")
LEDGER_TABLES = re.compile(r"bqx_(runs|jobs|attempts|targets)\b")


def modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PKG.rglob("*.py")):
        name = ".".join(path.relative_to(SRC).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = path
    return out


def strings(path: Path) -> list[str]:
    """The string constants of a module (SQL lives in them), docstrings left out."""
    tree = ast.parse(path.read_text())
    docs = {
        id(n.body[0].value)
        for n in ast.walk(tree)
        if isinstance(n, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
        and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)
    }  # fmt: skip
    return [
        n.value for n in ast.walk(tree)
        if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docs
    ]  # fmt: skip


def test_sql_only_in_store_and_db() -> None:
    holders = {
        name for name, path in modules().items()
        if any(SQL_WORDS.search(s) for s in strings(path))
    }  # fmt: skip
    assert holders, "the pattern finds nothing: the test is broken"
    assert {h for h in holders if not h.startswith(("bqx.store.", "bqx.db."))} == set()


def test_only_the_ledger_module_names_the_ledger_tables() -> None:
    named = {name for name, path in modules().items() if LEDGER_TABLES.search(path.read_text())}
    assert named == {"bqx.store.ledger"}


def test_only_store_names_builds_identifiers() -> None:
    builders = {
        name for name, path in modules().items() if "sql.Identifier(" in path.read_text()
    }  # fmt: skip
    assert builders - {"bqx.db.embedded", "bqx.db.copy"} == {"bqx.store.names"}


def test_the_cli_holds_no_sql_and_no_driver() -> None:
    for name, path in modules().items():
        if not name.startswith("bqx.cli"):
            continue
        text = path.read_text()
        assert not re.search(r"^\s*(import psycopg|from psycopg)", text, re.M), name
        assert not any(SQL_WORDS.search(s) for s in strings(path)), name


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """bqx modules ``name`` imports, anywhere in it (inside functions too)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*parts, base] if base else parts)
            targets = [base, *(f"{base}.{a.name}" for a in node.names)]
        else:
            continue
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name and t != "bqx" and not name.startswith(t + "."):
                out.add(t)
    return out


def test_no_import_cycle() -> None:
    mods = modules()
    graph = {name: _imports(name, path, set(mods)) for name, path in mods.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = path[path.index(nxt) :] + [nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert graph["bqx.api"], "no import seen: the test is broken"


def test_no_function_worse_than_c_but_the_numba_kernels() -> None:
    from radon.complexity import cc_visit

    worse = []
    for name, path in modules().items():
        if name == "bqx.core.kernels":  # compiled loops, one per kernel on purpose
            continue
        for block in cc_visit(path.read_text()):
            if block.complexity > 20:  # radon's grade C ends at 20
                worse.append(f"{name}.{block.name}: {block.complexity}")
    assert worse == []
