"""The shape of the code: no import cycle, no module over 400 lines, integrations that only translate, and a CLI
that reports the library's refusals in one line."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from infoflow_rag.cli import main
from infoflow_rag.errors import InfoFlowError, UnsupportedModelError
from infoflow_rag.store import CorruptEntryError

ROOT = Path(__file__).parent.parent
PACKAGE = ROOT / "infoflow_rag"
INTEGRATIONS = ROOT / "integrations"
MAX_LINES = 400


def _python_files(*roots: Path) -> list[Path]:
    return sorted(p for root in roots for p in root.rglob("*.py") if ".egg-info" not in str(p))


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking_only(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """Modules of ``modules`` that ``path`` imports, at any depth (function-level imports are edges too; imports
    under ``if TYPE_CHECKING`` are not: they never run)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if _type_checking_only(node):
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, base] if base else parent)
            if node.module:  # `from . import module` names modules of the package, not the package
                found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)  # `from pkg import module`
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(encoding="utf-8")))
    return {m for m in found if m in modules and m != name}


def import_graph() -> dict[str, set[str]]:
    files = _python_files(PACKAGE)
    modules = {_module_name(p) for p in files}
    return {_module_name(p): _imports(p, modules) for p in files}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def dfs(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := dfs(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := dfs(node)):
            return cycle
    return None


def test_no_import_cycle():
    graph = import_graph()
    assert "infoflow_rag.engine.facade" in graph["infoflow_rag.engine"]  # the graph sees package re-exports
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_module_over_400_lines():
    long = {
        str(p.relative_to(ROOT)): n
        for p in _python_files(PACKAGE, INTEGRATIONS)
        if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES
    }
    assert not long, f"split these by job: {long}"


def test_integrations_import_only_the_pipeline_and_the_options():
    allowed = {
        "infoflow_rag",  # the options type (QueryOptions and its fields) and DEFAULT_MODEL
        "infoflow_rag.pipeline",
        "infoflow_rag.index.passage_index",  # the retriever searches the pipeline's index
        "infoflow_rag.index.embedder",  # the offline embedder, wrapped as a LlamaIndex embedding
    }
    for path in _python_files(INTEGRATIONS):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("infoflow_rag"):
                assert node.module in allowed, f"{path.relative_to(ROOT)} imports {node.module}"
                if node.module == "infoflow_rag":
                    assert {a.name for a in node.names} <= {"DEFAULT_MODEL", "OptionFields", "QueryOptions"}


def test_every_refusal_is_an_infoflow_error():
    assert issubclass(CorruptEntryError, InfoFlowError)


def test_cli_reports_an_infoflow_error_in_one_line(monkeypatch, capsys):
    from infoflow_rag.cli import options

    def refuse(name, **settings):
        raise UnsupportedModelError(
            f"model {name!r} uses dynamic-NTK RoPE\nwhich cannot be re-rotated; use another model"
        )

    monkeypatch.setattr(options.Engine, "load", staticmethod(refuse))
    assert main(["check", "--model", "weird"]) == 2
    err = capsys.readouterr().err
    assert err == (
        "infoflow-rag: error: model 'weird' uses dynamic-NTK RoPE; which cannot be re-rotated; use another model\n"
    )


@pytest.mark.parametrize("module", ["infoflow_rag.engine.options", "infoflow_rag.cli"])
def test_entry_modules_import_alone(module):
    """Each in a fresh interpreter: an import-order dependence (a hidden cycle) would fail here."""
    import subprocess
    import sys

    subprocess.run([sys.executable, "-c", f"import {module}"], check=True, cwd=ROOT)
