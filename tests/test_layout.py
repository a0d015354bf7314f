"""The house rules of the layout (README, "How it fits together"): imports between fastwsss's modules form no cycle,
every part imports only the parts below it, nothing imports inside a function to dodge that, and the kernels import
nothing of the rest of fastwsss. Read from the source (ast), not by importing it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# the parts, bottom to top: a module may import its own part and the parts below it, never one above
LAYERS = [
    {"config", "_compat", "runtime", "visualize", "files", "checkpoint", "configs"},
    {"kernels"},
    {"data"},
    {"models"},
    {"pseudo"},
    {"methods"},
    {"inference"},
    {"training"},
    {"cli", "train", "infer", "evaluate", "plot"},  # the commands
]
# imports inside functions that are not about the layout: the Triton modules are loaded on first launch (importing
# triton is slow and optional), and a package's __main__ is the command itself
LAZY_OK = {"fastwsss.kernels.affinity._triton", "fastwsss.kernels.attention._triton", "fastwsss.kernels.lattice._triton",
           "fastwsss.kernels.par._triton"}


def module_files() -> dict[str, Path]:
    """Module name -> file, with kernels/ and configs/ mapped into the package as setuptools does."""
    out = {}
    for top, package in ((ROOT / "fastwsss", "fastwsss"), (ROOT / "kernels", "fastwsss.kernels"),
                         (ROOT / "configs", "fastwsss.configs")):
        for f in top.rglob("*.py"):
            parts = list(f.relative_to(top).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([package, *parts])] = f
    return out


def _resolve(module: str, is_package: bool, level: int, name: str | None) -> str:
    if level == 0:
        return name or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([name] if name else []))


def imports(modules: dict[str, Path]) -> list[tuple[str, str, bool, int]]:
    """(importer, imported fastwsss module, inside a function?, line) for every import statement."""
    edges = []
    for mod, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        is_package = path.name == "__init__.py"
        func_lines = {n.lineno for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                      for n in ast.walk(f) if isinstance(n, (ast.Import, ast.ImportFrom))}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(mod, is_package, node.level, node.module)
                # `from pkg import sub` imports the submodule when there is one
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            else:
                continue
            for t in targets:
                if t == "fastwsss" or t.startswith("fastwsss."):
                    edges.append((mod, t, node.lineno in func_lines, node.lineno))
    return edges


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the directed graph (as a list of nodes, first = last), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state and (c := visit(m)):
                return c
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (c := visit(n)):
            return c
    return None


def part(module: str) -> str:
    return module.split(".")[1] if "." in module else "fastwsss"


def rank(module: str) -> int:
    p = part(module)
    return -1 if p == "fastwsss" else next(i for i, layer in enumerate(LAYERS) if p in layer)


MODULES = module_files()
EDGES = imports(MODULES)


def test_every_module_belongs_to_a_layer():
    unknown = sorted({part(m) for m in MODULES} - set().union(*LAYERS) - {"fastwsss"})
    assert not unknown, f"parts missing from LAYERS (say where they sit): {unknown}"


def test_no_import_cycle():
    graph: dict[str, set[str]] = {}
    for a, b, _, _ in EDGES:
        if a != b:
            graph.setdefault(a, set()).add(b)
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_imports_only_go_down():
    up = [f"{MODULES[a].relative_to(ROOT)}:{line} imports {b}" for a, b, _, line in EDGES
          if part(a) != part(b) and rank(b) > rank(a)]
    assert not up, "imports that go up a layer:\n" + "\n".join(up)


def test_no_function_level_imports_of_fastwsss():
    lazy = [f"{MODULES[a].relative_to(ROOT)}:{line} imports {b} inside a function" for a, b, inside, line in EDGES
            if inside and b not in LAZY_OK]
    assert not lazy, "\n".join(lazy)


def test_kernels_import_nothing_of_the_rest():
    out = [f"{MODULES[a].relative_to(ROOT)}:{line} imports {b}" for a, b, _, line in EDGES
           if part(a) == "kernels" and part(b) != "kernels"]
    assert not out, "\n".join(out)


@pytest.mark.parametrize("graph, has_cycle", [
    ({"a": {"b"}, "b": {"c"}}, False),
    ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, True),
    ({"a": {"b", "c"}, "b": {"d"}, "c": {"d"}}, False),
    ({"a": {"b"}, "b": {"b2"}, "b2": {"b"}}, True),
])
def test_the_cycle_finder(graph, has_cycle):
    assert (find_cycle(graph) is not None) == has_cycle


def test_the_layer_rule_sees_an_upward_import():
    """The same check on a made-up edge: models importing training would be reported."""
    assert rank("fastwsss.training.loop") > rank("fastwsss.models.network")
    assert part("fastwsss.models.network") != part("fastwsss.training.loop")
