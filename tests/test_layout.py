"""The package's house rules, read from the source with ``ast``: no import cycle, inference never imports
evaluation, and the low modules stay low."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "gen_sr"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """Every gen_sr module that ``path`` imports, anywhere in the file (inside functions too), resolved to a module
    (``from gen_sr.eval import cases`` is ``gen_sr.eval.cases``)."""
    found = set()
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base
                                                                                                      else []))
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        for name in names:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name.startswith("gen_sr"):
                found.add(name)
    return found


def _graph(with_parents: bool = False) -> dict[str, set[str]]:
    """Module -> the gen_sr modules it imports. ``with_parents``: also an edge to each enclosing package, since
    importing ``a.b.c`` runs ``a/b/__init__.py`` first (a package importing its own submodules is no cycle, so the
    cycle check leaves these edges out)."""
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    modules = set(files)
    graph = {m: _imports(p, modules) - {m} for m, p in files.items()}
    for m in modules if with_parents else ():
        for n in list(graph[m]):
            while (n := n.rpartition(".")[0]) in modules:
                graph[m].add(n)
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph.get(m, ())):
            if state.get(n) == 1:
                return [*stack[stack.index(n):], n]
            if n not in state and (found := visit(n)):
                return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def _reaches(graph: dict[str, set[str]], start: str, prefix: str) -> list[str] | None:
    """An import path from ``start`` to a module under ``prefix``, or ``None``."""
    seen, todo = {start}, [[start]]
    while todo:
        path = todo.pop()
        for n in sorted(graph.get(path[-1], ())):
            if n == prefix or n.startswith(prefix + "."):
                return [*path, n]
            if n not in seen:
                seen.add(n)
                todo.append([*path, n])
    return None


def test_the_checker_finds_a_planted_cycle() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None
    assert _reaches({"a": {"b"}, "b": {"x.y"}}, "a", "x") == ["a", "b", "x.y"]


def test_no_import_cycle_in_the_package() -> None:
    assert _cycle(_graph()) is None


@pytest.mark.parametrize(("low", "high"), [("gen_sr.pipelines", "gen_sr.eval"), ("gen_sr.eval", "gen_sr.pipelines"),
                                           ("gen_sr.pipelines", "gen_sr.audit"), ("gen_sr.eval", "gen_sr.audit")])
def test_layers_do_not_import_each_other(low: str, high: str) -> None:
    graph = _graph(with_parents=True)
    for module in (m for m in graph if m == low or m.startswith(low + ".")):
        assert _reaches(graph, module, high) is None, f"{module} imports {high}: {_reaches(graph, module, high)}"


@pytest.mark.parametrize("low", ["gen_sr.io", "gen_sr.risk", "gen_sr.model_card", "gen_sr.errors"])
def test_low_modules_import_no_layer(low: str) -> None:
    graph = _graph(with_parents=True)
    for layer in ("gen_sr.pipelines", "gen_sr.eval", "gen_sr.audit", "gen_sr.training", "gen_sr.cli"):
        assert _reaches(graph, low, layer) is None
