"""The package's import order (docs/architecture.md, "The layers").

Every ``import`` of a ``threedistill`` module anywhere in a module (top level or inside a function)
must point to the same layer or one below. Within a layer, the imports must form no circle. A
module that is in no layer fails the test, so a new module has to be placed on purpose.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Set, Tuple

PACKAGE = Path(__file__).resolve().parent.parent / "threedistill"

#: Highest first. A module belongs to the first prefix (package path) that it starts with.
LAYERS: List[Tuple[str, Tuple[str, ...]]] = [
    ("front ends", ("threedistill.cli", "threedistill.app", "threedistill.batch", "threedistill.__main__")),
    ("pipeline", ("threedistill.pipeline", "threedistill.inputs", "threedistill.preview")),
    ("loop", ("threedistill.distill", "threedistill.export", "threedistill.plots")),
    ("runs", ("threedistill.runs", "threedistill.config")),
    ("components", ("threedistill.guidance", "threedistill.representations", "threedistill.shapes")),
    ("base", ("threedistill.priors", "threedistill.groups", "threedistill.checkpoint", "threedistill.cameras",
              "threedistill.atomic", "threedistill.errors", "threedistill.devices", "threedistill.meshio",
              "threedistill.text", "threedistill")),
]


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def layer_of(module: str) -> int:
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if p == "threedistill" and module != "threedistill":
                continue
            if module == p or module.startswith(p + "."):
                return i
    raise AssertionError(f"module {module} is in no layer: add it to tests/test_layers.py and docs/architecture.md")


def imports_of(path: Path) -> List[Tuple[str, int]]:
    """(imported threedistill module, line) for every import statement in the file."""
    me = module_name(path)
    is_pkg = path.name == "__init__.py"
    out: List[Tuple[str, int]] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names if a.name.split(".")[0] == "threedistill"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = me.split(".") if is_pkg else me.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.split(".")[0] != "threedistill":
                continue
            # "from pkg import sub" imports the submodule when there is one.
            for a in node.names:
                sub = f"{mod}.{a.name}"
                out.append((sub if _exists(sub) else mod, node.lineno))
    return out


def _exists(module: str) -> bool:
    p = PACKAGE.parent / Path(*module.split("."))
    return p.with_suffix(".py").is_file() or (p / "__init__.py").is_file()


def _graph() -> Dict[str, Set[str]]:
    graph: Dict[str, Set[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        me = module_name(path)
        graph.setdefault(me, set())
        for mod, _ in imports_of(path):
            if mod != me:
                graph[me].add(mod)
    return graph


def test_every_import_points_down_or_sideways():
    bad = []
    for path in sorted(PACKAGE.rglob("*.py")):
        me = module_name(path)
        mine = layer_of(me)
        for mod, line in imports_of(path):
            if layer_of(mod) < mine:
                bad.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {me} ({LAYERS[mine][0]}) imports "
                           f"{mod} ({LAYERS[layer_of(mod)][0]})")
    assert not bad, "upward imports:\n" + "\n".join(bad)


def test_no_import_circles():
    graph = _graph()
    # A package's __init__ importing its own submodules is how packages register their members;
    # the submodules' imports of the package itself would close a trivial circle, so edges from a
    # package to its own submodules are left out.
    def edges(m: str) -> Set[str]:
        return {d for d in graph.get(m, ()) if not d.startswith(m + ".")}

    cycles: List[List[str]] = []
    state: Dict[str, int] = {}
    stack: List[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(edges(m)):
            if state.get(d) == 1:
                cycles.append(stack[stack.index(d):] + [d])
            elif d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert not cycles, "import circles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_layer_map_matches_the_modules():
    # Every module is placed (layer_of raises otherwise) and every prefix names something that exists.
    for path in PACKAGE.rglob("*.py"):
        layer_of(module_name(path))
