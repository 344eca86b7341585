"""No module of actsparse imports one that imports it back, not even for type checking.

Every ``import actsparse...`` and ``from actsparse... import`` statement counts,
wherever it stands (module level, a function, an ``if TYPE_CHECKING:`` block);
``from package import name`` counts as an import of ``package.name`` when that
is a module, else of ``package`` (its ``__init__``).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(ROOT.glob("packages/*/src/actsparse/**/*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[parts.index("src") + 1 :])
        found[name.removesuffix(".__init__")] = path
    return found


def _imports(tree: ast.AST, modules: dict[str, Path]) -> set[str]:
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name in modules)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                if full in modules:
                    out.add(full)
                elif node.module in modules:
                    out.add(node.module)
    return out


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {
        name: _imports(ast.parse(path.read_text()), modules) - {name}
        for name, path in modules.items()
    }


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            # a package's __init__ importing its own submodules is how packages are built;
            # the reverse edge (a submodule importing its package) closes a real cycle
            if node == nxt.rsplit(".", 1)[0] and nxt.startswith(node + "."):
                continue
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_graph_covers_every_package() -> None:
    graph = _graph()
    for package in ("core", "masks", "hooks", "kernels", "serialize", "cli"):
        assert f"actsparse.{package}" in graph, sorted(graph)[:5]
    assert "actsparse.kernels._common.build" in graph
    assert "actsparse.hooks._threshold" in graph["actsparse.hooks._execution"]


def test_no_module_imports_one_that_imports_it_back() -> None:
    cycle = _cycle(_graph())
    assert cycle is None, " -> ".join(cycle or [])


def test_a_cycle_is_found() -> None:
    graph = {"a.x": {"a.y"}, "a.y": {"a.z"}, "a.z": {"a.x"}}
    assert _cycle(graph) == ["a.x", "a.y", "a.z", "a.x"]
