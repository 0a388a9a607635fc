"""Package structure: the import graph of ``lorahub`` has no cycle, and no module imports another's private names.

Why: a cycle (also one through a function-level import) means two modules each need the other to make sense,
so neither is the one place of its concept; a private name (``_x``, or anything from a private module such as
``lorahub._x``) imported elsewhere is an interface that its own module does not admit to.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "lorahub"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_modules() -> dict[str, tuple[Path, bool]]:
    """Module name -> (file, is a package ``__init__``), for every ``lorahub/**/*.py`` (data folders have none)."""
    return {_module_name(p): (p, p.name == "__init__.py") for p in sorted(PACKAGE.rglob("*.py"))}


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def imports_of(module: str, path: Path, is_package: bool, known: set[str]) -> list[tuple[str, str | None, int]]:
    """Every import in ``path`` (module level, in functions, under TYPE_CHECKING) of a ``lorahub`` module:
    (imported module, the name taken from it or None, line). ``from pkg import sub`` gives the submodule."""
    here = module if is_package else module.rpartition(".")[0]  # what a level-1 relative import is relative to
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out += [(a.name, None, node.lineno) for a in node.names if a.name.split(".")[0] == "lorahub"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here.split(".")[: len(here.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "lorahub":
                continue
            for a in node.names:
                sub = f"{target}.{a.name}"
                out.append((sub, None, node.lineno) if sub in known else (target, a.name, node.lineno))
    return out


def import_graph() -> tuple[dict[str, set[str]], list[str]]:
    """(module -> the lorahub modules it imports, private-name imports across modules as readable lines)."""
    modules = package_modules()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    private = []
    for module, (path, is_package) in modules.items():
        rel = path.relative_to(PACKAGE.parent)
        for target, name, line in imports_of(module, path, is_package, set(modules)):
            if target == module:
                continue
            graph[module].add(target)
            bad_module = next((p for p in target.split(".") if _is_private(p)), None)
            if bad_module or (name and _is_private(name)):
                what = f"{target}.{name}" if name else target
                why = f" (private module {bad_module})" if bad_module else ""
                private.append(f"{rel}:{line} imports {what}{why}")
    return graph, private


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each as a sorted list."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in graph:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def test_graph_sees_relative_and_function_level_imports():
    graph, _ = import_graph()
    assert "lorahub.errors" in graph["lorahub.api"]  # from .errors import ...
    assert "lorahub.bench.bbh" in graph["lorahub.bench.runner"]  # from . import bbh
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles():
    graph, _ = import_graph()
    cycles = find_cycles(graph)
    detail = [" <-> ".join(c) + ": " + "; ".join(f"{m} -> {sorted(graph[m] & set(c))}" for m in c) for c in cycles]
    assert not cycles, "import cycles:\n" + "\n".join(detail)


def test_no_private_names_across_modules():
    _, private = import_graph()
    assert not private, "private names imported across modules:\n" + "\n".join(private)
