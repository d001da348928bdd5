"""The package's import graph: no cycles, arrows only point down the layers, and a torch-free runtime.

Every import counts, also those inside functions: a deferred import still ties the modules together."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "edgediff"

# Top to bottom, as the README's layout: a module may import from its own layer and the layers below it.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("edgediff.__main__", "edgediff.cli"),
    ("edgediff.tools",),
    ("edgediff.api",),
    ("edgediff.frontend",),
    ("edgediff.zoo",),
    ("edgediff.passes",),
    ("edgediff.linear_attention",),
    ("edgediff.npu",),
    ("edgediff.precision",),
    ("edgediff.kernels",),
    ("edgediff.schedules",),
    ("edgediff.backend",),
    ("edgediff.targets",),
    ("edgediff.runtime",),
    ("edgediff.errors",),
)


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Each module of the package and the package modules it imports (anywhere in the file)."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        deps: set[str] = set()
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + [base])
                    base = base.rstrip(".")
                targets = [f"{base}.{alias.name}" for alias in node.names]
                deps |= {t for t in targets if t in modules} or ({base} if base in modules else set())
            elif isinstance(node, ast.Import):
                deps |= {alias.name for alias in node.names if alias.name in modules}
        graph[name] = deps - {name, "edgediff"}
    return graph


def layer_of(module: str) -> int:
    for index, prefixes in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return index
    raise AssertionError(f"{module} is in no layer of LAYERS: add it where it belongs in the layout")


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` as a path that returns to its start, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return path[path.index(dep) :] + [dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_graph_is_read_from_the_package() -> None:
    graph = import_graph()
    assert "edgediff.api" in graph and "edgediff.frontend.capture" in graph["edgediff.api"]


def test_no_import_cycle() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_find_cycle_reports_one() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_arrows_point_down_the_layers() -> None:
    upward = [
        f"{module} -> {dep}"
        for module, deps in import_graph().items()
        for dep in sorted(deps)
        if layer_of(dep) < layer_of(module)
    ]
    assert not upward, "imports from a lower layer up to a higher one:\n" + "\n".join(upward)


@pytest.mark.parametrize("module", ["edgediff.runtime"])
def test_runtime_imports_only_itself_and_errors(module: str) -> None:
    outside = [
        f"{name} -> {dep}"
        for name, deps in import_graph().items()
        if name == module or name.startswith(module + ".")
        for dep in sorted(deps)
        if not (dep == module or dep.startswith(module + ".") or dep == "edgediff.errors")
    ]
    assert not outside, "runtime/ must stay torch-free and self-contained:\n" + "\n".join(outside)
