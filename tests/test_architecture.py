"""The package layering, checked from the source: no import cycle, no import from a layer above.

Every module under ``appo/`` is parsed (nothing is imported); each ``import appo...`` or
``from appo... import ...`` it contains, at module level or inside a function, is an edge.
:data:`LAYERS` lists the packages from the floor up: a module may import from its own layer and
the layers below it, never from one above. A new package must be placed in :data:`LAYERS`.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: From the floor up. ``appo.config`` imports nothing of appo; the stages and the command line
#: sit on top. Packages of one layer may import each other (but never in a cycle).
LAYERS: tuple[tuple[str, ...], ...] = (
    ("appo.config",),
    ("appo.io", "appo.mlflow_setup", "appo.stats", "appo.tables"),
    ("appo.data", "appo.models", "appo.tracking", "appo.headline", "appo.pipeline",
     "appo.workspace"),
    ("appo.engine", "appo.train"),
    ("appo.rl",),
    ("appo.eval",),
    ("appo.stages",),
    ("appo.experiment", "appo.compare", "appo.cli", "appo.__main__", "appo"),
)


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted((ROOT / "appo").rglob("*.py"))}


def imports_of(path: Path, modules: dict[str, Path]) -> set[str]:
    """The appo modules ``path`` imports (``from appo.x import y`` counts as ``appo.x.y`` when
    that is a module, else as ``appo.x``)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "appo"}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module \
                and node.module.split(".")[0] == "appo":
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                out.add(sub if sub in modules else node.module)
    return out - {module_name(path)}


def import_graph() -> dict[str, set[str]]:
    modules = all_modules()
    return {name: imports_of(path, modules) for name, path in modules.items()}


def layer_of(module: str) -> int:
    """Index in :data:`LAYERS` of the longest entry that is ``module`` or a package above it
    (the root package ``appo`` is only itself: an unplaced module must not fall into it)."""
    best, best_len = -1, -1
    for i, layer in enumerate(LAYERS):
        for entry in layer:
            inside = module.startswith(entry + ".") and entry != "appo"
            if (module == entry or inside) and len(entry) > best_len:
                best, best_len = i, len(entry)
    return best


def test_every_module_has_a_layer() -> None:
    unplaced = sorted(m for m in all_modules() if layer_of(m) < 0)
    assert not unplaced, f"modules in no layer of LAYERS: {unplaced}"


def test_no_module_imports_from_a_layer_above() -> None:
    upward = sorted(f"{m} ({layer_of(m)}) -> {d} ({layer_of(d)})"
                    for m, deps in import_graph().items() for d in deps
                    if layer_of(d) > layer_of(m))
    assert not upward, "upward imports:\n" + "\n".join(upward)


def test_config_is_the_floor() -> None:
    assert import_graph()["appo.config"] == set()


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a list of nodes (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return stack[stack.index(dep):] + [dep]
            if dep not in state and (cycle := visit(dep)) is not None:
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)) is not None:
            return cycle
    return None


def test_no_import_cycle() -> None:
    graph = import_graph()
    # a package's __init__ is not a dependency of its own modules
    graph = {m: {d for d in deps if not m.startswith(d + ".")} for m, deps in graph.items()}
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_checks_see_a_cycle_and_an_upward_import() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    assert layer_of("appo.rl.trainer") > layer_of("appo.engine.rollout") > layer_of("appo.config")


# --------------------------------------------------------------------------------------------
# dvc.yaml deps: a stage reruns when any code that shapes its outputs changes

#: Modules a stage imports that do not shape its outputs (logging, the runner's environment,
#: the stage wrapper's error messages): left out of the deps so that editing them retrains
#: nothing (dvc.yaml's header says so).
NOT_SHAPING = {"appo.tracking", "appo.mlflow_setup", "appo.pipeline", "appo.stages"}


def stage_closure(module: str, graph: dict[str, set[str]]) -> set[str]:
    """``module``, everything it imports transitively, and the packages above each of them
    (their ``__init__`` runs on import); modules in :data:`NOT_SHAPING` are not followed."""
    seen: set[str] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        if name in seen or name in NOT_SHAPING:
            continue
        seen.add(name)
        parts = name.split(".")
        todo += [".".join(parts[:i]) for i in range(2, len(parts))]  # parent packages
        todo += sorted(graph.get(name, ()))
    return seen


def test_dvc_deps_cover_each_stages_imports() -> None:
    """Every file a stage's module imports (transitively) is a dep of the stage, or inside a
    dep folder: a new import cannot leave a stage's deps stale."""
    import re

    import yaml

    modules = all_modules()
    graph = import_graph()
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    missing = []
    for name, stage in stages.items():
        body = stage.get("do", stage)
        cmd = " ".join(body["cmd"]) if isinstance(body["cmd"], list) else body["cmd"]
        found = re.search(r"python -m (appo\.stages\.\w+)", cmd)
        assert found, f"stage {name}: no `python -m appo.stages.<stage>` in its cmd"
        deps = [str(d).rstrip("/") for d in body.get("deps", [])]
        for mod in sorted(stage_closure(found.group(1), graph)):
            path = modules[mod].relative_to(ROOT).as_posix()
            if not any(path == d or path.startswith(d + "/") for d in deps):
                missing.append(f"{name}: {path}")
    assert not missing, "dvc.yaml deps miss imported code:\n" + "\n".join(missing)


def test_the_dvc_deps_check_follows_imports_and_parents() -> None:
    graph = {"appo.stages.x": {"appo.a.b", "appo.tracking"}, "appo.a.b": {"appo.c"}}
    assert stage_closure("appo.stages.x", graph) == {"appo.stages.x", "appo.a.b", "appo.a",
                                                     "appo.c"}
