"""The package's layers, checked on its source: every import (module-level or inside a function;
not those only for type annotations) goes to the importer's own layer or a lower one, siblings marked independent never import each
other, and no two modules import each other, directly or around a loop.

    cli > pipelines (demo, predict, visualize, scale, cluster) > train > inference > models
        > data | eval > labels | kernels > foundation (config, errors, safe_load)

(import-linter's layers contract says the same, but it cannot see `kernels/`, `eval/`, `cluster/`,
which install into `rlipv2_scale` from folders of their own: setup.py.)
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = {"rlipv2_scale": "rlipv2_scale", "rlipv2_scale.kernels": "kernels", "rlipv2_scale.eval": "eval",
           "rlipv2_scale.cluster": "cluster", "rlipv2_scale.recipes": "recipes"}
# Top to bottom; within a layer, a tuple of groups lists siblings that must not import each other.
LAYERS: list[tuple[tuple[str, ...], ...]] = [
    (("cli",),),
    (("demo", "predict", "visualize", "scale", "cluster", "recipes"),),
    (("train",),),
    (("inference",),),
    (("models",),),
    (("data",), ("eval",)),
    (("labels",), ("kernels",)),
    (("config", "errors", "safe_load", ""),),
]


def modules() -> dict[str, Path]:
    found = {}
    for package, folder in FOLDERS.items():
        for path in (ROOT / folder).rglob("*.py"):
            parts = [p for p in path.relative_to(ROOT / folder).with_suffix("").parts if p != "__init__"]
            if package == "rlipv2_scale" and parts and f"rlipv2_scale.{parts[0]}" in FOLDERS:
                continue
            found[".".join([package, *parts])] = path
    return found


def _runtime_nodes(tree: ast.AST):
    """Every node, but those under `if TYPE_CHECKING:` (annotations only, never executed)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and isinstance(child.test, ast.Name) and child.test.id == "TYPE_CHECKING":
                stack.extend(child.orelse)
            else:
                stack.append(child)


def imported(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The project modules `name` imports anywhere in its source."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    names: set[str] = set()
    for node in _runtime_nodes(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
            names |= {base} | {f"{base}.{a.name}" for a in node.names}
    out = set()
    for n in names:
        while n and n not in known:
            n = n.rpartition(".")[0]
        if n and n != name:
            out.add(n)
    return out


def position(module: str) -> tuple[int, int]:
    top = module.split(".")[1] if "." in module else ""
    for level, groups in enumerate(LAYERS):
        for g, group in enumerate(groups):
            if top in group:
                return level, g
    raise AssertionError(f"{module} belongs to no layer: add its top-level name to LAYERS")


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imported(name, path, known) for name, path in known.items()}


def test_imports_go_down_the_layers():
    bad = []
    for module, targets in graph().items():
        mine = position(module)
        for target in targets:
            theirs = position(target)
            if theirs[0] < mine[0] or (theirs[0] == mine[0] and theirs[1] != mine[1]):
                bad.append(f"{module} -> {target}")
    assert not bad, "imports against the layers:\n" + "\n".join(sorted(bad))


def test_no_import_cycles():
    edges = graph()
    cycles, index, low, stack, on_stack = [], {}, {}, [], set()

    def visit(v: str) -> None:   # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in edges:
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_the_check_sees_every_folder_and_a_violation():
    found = modules()
    assert {"rlipv2_scale.kernels.dispatch", "rlipv2_scale.eval.hico", "rlipv2_scale.cluster.slurm",
            "rlipv2_scale.cli", "rlipv2_scale.models.rlipv2"} <= set(found)
    assert position("rlipv2_scale.data.shards") > position("rlipv2_scale.models.rlipv2")
    assert position("rlipv2_scale.data.shards")[0] == position("rlipv2_scale.eval.hico")[0]
