"""Import direction of llmql's packages (DESIGN.md): imports point down, and no package cycles.

connectors, spark, cli (the top) → optimizer → udfs → ordering, engine → kernels;
`settings` is a leaf any layer may use. Every `import` in every module counts, including
imports inside functions and under TYPE_CHECKING.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "llmql"
TOP = 4
LAYERS = {
    "": TOP,  # llmql/__init__.py
    "cli": TOP,  # with llmql/__main__.py
    "connectors": TOP,
    "spark": TOP,
    "notebook": TOP,
    "serve": TOP,
    "optimizer": 3,
    "udfs": 2,
    "ordering": 1,
    "engine": 1,
    "kernels": 0,
}
LEAVES = {"settings"}  # NOTE: may be imported by anyone; imports no llmql module itself


def _package(module: str) -> str:
    """The package a dotted module name `llmql.x.y` belongs to: `x` ('' for the root)."""
    parts = module.split(".")
    if len(parts) == 1:
        return ""
    return "cli" if parts[1] == "__main__" else parts[1]


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every llmql import in a file."""
    module = _module_name(path)
    is_package = path.name == "__init__.py"
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.extend((node.lineno, a.name) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            out.append((node.lineno, name))
    return [(line, name) for line, name in out if name == "llmql" or name.startswith("llmql.")]


def _edges() -> list[tuple[str, str, str]]:
    """(importing package, imported package, 'file:line') for every cross-package import."""
    edges = []
    for path in sorted(ROOT.rglob("*.py")):
        src = _package(_module_name(path))
        for line, name in _imports(path):
            dst = _package(name)
            if dst != src:
                edges.append((src, dst, f"{path.relative_to(ROOT.parent)}:{line}"))
    return edges


def _violation(src: str, dst: str) -> str | None:
    if dst in LEAVES:
        return None
    if src in LEAVES:
        return "settings must import no llmql module"
    for name in (src, dst):
        if name not in LAYERS:
            return f"package llmql.{name} has no layer; add it to LAYERS in tests/test_layering.py"
    if LAYERS[src] == TOP and LAYERS[dst] == TOP:
        return None  # NOTE: the top layer's entry points may use each other (cycles checked below)
    if LAYERS[src] <= LAYERS[dst]:
        return f"llmql.{src} (layer {LAYERS[src]}) imports llmql.{dst} (layer {LAYERS[dst]})"
    return None


def test_imports_point_down():
    bad = [f"{where}: {msg}" for src, dst, where in _edges() if (msg := _violation(src, dst))]
    assert not bad, "upward or sideways imports:\n" + "\n".join(bad)


def test_no_package_cycles():
    graph: dict[str, set[str]] = {}
    for src, dst, _ in _edges():
        graph.setdefault(src, set()).add(dst)
    cycle = _find_cycle(graph)
    assert cycle is None, "package import cycle: " + " → ".join(f"llmql.{p}" for p in cycle)


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done

    def visit(node: str, stack: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt):], nxt]
            if nxt not in state and (found := visit(nxt, [*stack, nxt])):
                return found
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start, [start])):
            return found
    return None


@pytest.mark.parametrize(("graph", "cyclic"), [
    ({"a": {"b"}, "b": {"c"}}, False),
    ({"a": {"b"}, "b": {"a"}}, True),
    ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, True),
])
def test_cycle_finder(graph, cyclic):
    assert (_find_cycle(graph) is not None) is cyclic


def test_violation_rule():
    assert _violation("udfs", "optimizer")  # upward
    assert _violation("ordering", "engine")  # sideways, same layer
    assert _violation("settings", "udfs")
    assert _violation("optimizer", "ordering") is None
    assert _violation("connectors", "engine") is None
    assert _violation("kernels", "settings") is None
