"""No import cycle among the modules of cdgfast (cdgfast/kernels/ included), function-level imports
included: a lazy `import` inside a function still ties two modules together, and such a pair has to be
imported in the right order, which is how issue 11's _cuda <-> fisher.accumulator knot went unnoticed."""
import ast
from pathlib import Path
from typing import Dict, List, Tuple

ROOT = Path(__file__).resolve().parent.parent
# (source folder, the package it is installed as)
PACKAGES = ((ROOT / "cdgfast", "cdgfast"),)

# Cycles known when this test was written and owned elsewhere, as frozensets of module names, each with
# the issue that removes it. None today: add one only with that comment; any other cycle fails.
EXPECTED_CYCLES: set = set()


def _modules() -> Dict[str, Tuple[Path, bool]]:
    """module name -> (file, is a package __init__)."""
    mods = {}
    for base, pkg in PACKAGES:
        for path in sorted(base.rglob("*.py")):
            parts = [pkg, *path.relative_to(base).with_suffix("").parts]
            is_pkg = parts[-1] == "__init__"
            mods[".".join(parts[:-1] if is_pkg else parts)] = (path, is_pkg)
    return mods


def _known(name: str, mods) -> str:
    """The longest prefix of a dotted name that is one of our modules ("" if none: torch, numpy, ...)."""
    while name and name not in mods:
        name = name.rpartition(".")[0]
    return name


def import_graph() -> Dict[str, Dict[str, str]]:
    """module -> {imported module: "file:line" of the first import statement}, over every import statement
    anywhere in the module (top level, functions, classes, branches), absolute and relative, and every
    `triton_or_composite("<kernel module>", ...)` (cdgfast._dispatch imports that module lazily)."""
    mods = _modules()
    graph: Dict[str, Dict[str, str]] = {}
    for name, (path, is_pkg) in mods.items():
        package = name if is_pkg else name.rpartition(".")[0]
        edges = graph.setdefault(name, {})
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            targets: List[str] = []
            if isinstance(node, ast.Import):
                targets = [_known(a.name, mods) for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[:len(package.split(".")) - node.level + 1]
                    module = ".".join(base + ([node.module] if node.module else []))
                else:
                    module = node.module or ""
                # `from pkg import sub` imports the submodule pkg.sub; `from mod import name` imports mod
                targets = [f"{module}.{a.name}" if f"{module}.{a.name}" in mods else _known(module, mods)
                           for a in node.names]
            elif (isinstance(node, ast.Call) and getattr(node.func, "id", None) == "triton_or_composite"
                  and node.args and isinstance(node.args[0], ast.Constant)):
                # the ops' dispatch helper imports cdgfast.kernels.<first argument> on first use
                targets = [f"cdgfast.kernels.{node.args[0].value}"]
            for target in targets:
                if target and target != name:
                    edges.setdefault(target, f"{path.relative_to(ROOT)}:{node.lineno}")
    return graph


def cycles(graph) -> List[List[str]]:
    """One cycle [m0, m1, ..., m0] per strongly connected component of more than one module (Tarjan):
    the shortest one through the component's first module."""
    index, low, stack, on_stack, comps = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, {}):
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
                comps.append(set(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [_shortest_cycle(graph, comp, min(comp)) for comp in comps]


def _shortest_cycle(graph, comp, start) -> List[str]:
    """Breadth-first inside the component: every module of a strongly connected component lies on a cycle."""
    prev, frontier = {start: None}, [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v]):
                if w == start:
                    path = [v]
                    while prev[path[-1]] is not None:
                        path.append(prev[path[-1]])
                    return path[::-1] + [start]
                if w in comp and w not in prev:
                    prev[w] = v
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"no cycle through {start} in {sorted(comp)}")


def _describe(graph, cycle) -> str:
    return "\n".join(f"  {a} -> {b}   ({graph[a][b]})" for a, b in zip(cycle, cycle[1:]))


def test_the_graph_sees_relative_lazy_and_package_imports():
    """The walker itself: modules it must find and edges it must draw (it would pass vacuously otherwise)."""
    graph = import_graph()
    assert {"cdgfast", "cdgfast.fisher", "cdgfast.fisher.accumulator", "cdgfast.kernels",
            "cdgfast.kernels.dc", "cdgfast._cuda"} <= set(graph)
    assert "cdgfast.fisher.accumulator" in graph["cdgfast.fisher"]  # relative: from .accumulator import ...
    assert "cdgfast.params" in graph["cdgfast.fisher"]  # absolute from-import of a module
    assert "cdgfast.kernels.dc" in graph["cdgfast.ops.dc"]  # lazy, through the dispatch helper
    assert "cdgfast.kernels.fisher_update" in graph["cdgfast.fisher.accumulator"]  # lazy, inside a function
    fake = {"a": {"b": "a.py:1"}, "b": {"c": "b.py:2"}, "c": {"a": "c.py:3", "d": "c.py:4"}, "d": {}}
    assert cycles(fake) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b": "x"}, "b": {}}) == []


def test_no_import_cycles():
    graph = import_graph()
    found = [c for c in cycles(graph) if frozenset(c) not in EXPECTED_CYCLES]
    msg = "\n\n".join(f"import cycle {' -> '.join(c)}:\n{_describe(graph, c)}" for c in found)
    assert not found, msg
    stale = [sorted(c) for c in EXPECTED_CYCLES if c not in {frozenset(x) for x in cycles(graph)}]
    assert not stale, f"EXPECTED_CYCLES lists cycles that are gone, remove them: {stale}"


# The architecture as an import rule: data flows one way, data -> train -> methods -> fisher/ops -> kernels.
# A module may import modules of its own package, of a LOWER layer, and (only in the foundation layer) of its
# own layer. A new top-level module or package must be given a layer here.
LAYERS: Tuple[Tuple[str, ...], ...] = (
    ("cdgfast._validation", "cdgfast._dispatch", "cdgfast.params", "cdgfast._cuda",
     "cdgfast.parallel", "cdgfast.diffusion", "cdgfast.sampling",
     "cdgfast.serialization"),                                         # foundation
    ("cdgfast.kernels",),                                              # Triton / CUDA launchers
    ("cdgfast.ops",),                                                  # drop-in ops
    ("cdgfast.fisher",),                                               # Fisher estimators, accumulator
    ("cdgfast.data", "cdgfast.models", "cdgfast.metrics"),             # data sets, model presets, metrics
    ("cdgfast.methods",),                                              # consolidation methods
    ("cdgfast.analysis", "cdgfast.train"),                             # drivers
    ("cdgfast.analyze",),                                              # command aliases
)


def _unit(module: str) -> str:
    """The top-level module or package of cdgfast a module belongs to (cdgfast.ops.dc -> cdgfast.ops)."""
    return ".".join(module.split(".")[:2])


def _layer(unit: str) -> int:
    for i, units in enumerate(LAYERS):
        if unit in units:
            return i
    raise AssertionError(f"{unit} has no layer in tests/test_import_graph.py::LAYERS: give it one")


def layer_violations(graph) -> List[str]:
    bad = []
    for src, targets in graph.items():
        if src == "cdgfast":  # the package root only re-exports its version
            continue
        for dst, where in targets.items():
            a, b = _unit(src), _unit(dst)
            if a == b or dst == "cdgfast":
                continue
            la, lb = _layer(a), _layer(b)
            if lb > la or (lb == la and la != 0):
                bad.append(f"{src} (layer {la}) imports {dst} (layer {lb}) at {where}")
    return sorted(bad)


def test_imports_follow_the_layers():
    """No module in cdgfast/kernels/ imports ops/, no module in ops/ or fisher/ imports methods/ or train/, ..."""
    bad = layer_violations(import_graph())
    assert not bad, "imports against the data flow:\n" + "\n".join(bad)


def test_the_layer_rule_catches_an_upward_import():
    fake = {"cdgfast.ops.dc": {"cdgfast.methods.base": "ops/dc.py:3"}, "cdgfast.methods.base": {},
            "cdgfast.data.a": {"cdgfast.models.unet": "data/a.py:1"}, "cdgfast.models.unet": {},
            "cdgfast.sampling": {"cdgfast.diffusion": "sampling.py:1"}, "cdgfast.diffusion": {}}
    assert layer_violations(fake) == [
        "cdgfast.data.a (layer 4) imports cdgfast.models.unet (layer 4) at data/a.py:1",
        "cdgfast.ops.dc (layer 2) imports cdgfast.methods.base (layer 5) at ops/dc.py:3"]
