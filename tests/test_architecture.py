"""The map of docs/architecture.md, kept true: the rooms of the product import each other without a
cycle, the lower rooms never reach up into the cycle, the driver, the control plane, the simulation or
the Serve applications, and only loop/cluster.py talks to Ray Serve's application lifecycle. Imports
are walked statically, the ones inside functions included (a lazy import is still a dependency)."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOWER = ("config", "suites", "traces", "lineage", "data", "serving")
"""Rooms that import nothing from UPPER."""
UPPER = ("cycle", "driver", "control", "sim", "serve_apps", "cli", "run_report", "cluster")
SERVE_LIFECYCLE = ("serve.run(", "serve.status(", "serve.delete(", "get_deployment_handle(", "serve.shutdown(",
                   "serve.start(")
"""Calls only the owner of the Ray wiring makes (tests and benchmarks aside)."""


def modules(root: Path = ROOT) -> dict[str, Path]:
    out = {}
    for base in ("loop", "serve_apps"):
        for path in (root / base).rglob("*.py"):
            name = ".".join(path.relative_to(root).with_suffix("").parts)
            out[name.removesuffix(".__init__")] = path
    return out


def room(module: str) -> str:
    """`loop.<room>...` is a room (a package or a top-level module); each Serve application module is
    its own (they are entry points, as jobs/ are: one may build on the cluster owner, which builds the other)."""
    parts = module.split(".")
    if parts[0] == "serve_apps":
        return module
    return parts[1] if len(parts) > 1 else "loop"


def imports(source: str, module: str, is_package: bool, known) -> list[tuple[str, int]]:
    """(imported product module, line) of every import in `source`, at any depth."""
    package = module if is_package else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name and name != module:
                found.append((name, node.lineno))
    return found


def room_edges(root: Path = ROOT) -> dict[tuple[str, str], list[str]]:
    mods = modules(root)
    edges: dict[tuple[str, str], list[str]] = {}
    for name, path in mods.items():
        for target, line in imports(path.read_text(), name, path.name == "__init__.py", mods):
            if room(name) != room(target):
                edges.setdefault((room(name), room(target)), []).append(f"{path.relative_to(root)}:{line} -> {target}")
    return edges


def cycles(edges) -> list[list[str]]:
    """Strongly connected components of more than one room (Tarjan)."""
    graph: dict[str, set[str]] = {}
    for a, b in edges:
        graph.setdefault(a, set()).add(b)
        graph.setdefault(b, set())
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            scc = []
            while True:
                w = stack.pop()
                on.discard(w)
                scc.append(w)
                if w == v:
                    break
            if len(scc) > 1:
                out.append(sorted(scc))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_walk_sees_the_product():
    edges = room_edges()
    assert len(modules()) > 80
    # Known edges, lazy and top-level, relative and absolute: the walk would see a violation.
    assert ("cycle", "train") in edges and ("cluster", "serve_apps.gateway_app") in edges
    assert ("serve_apps.cluster_app", "cluster") in edges  # inside a function


def test_the_rooms_import_each_other_without_a_cycle():
    edges = room_edges()
    found = cycles(edges)
    detail = {f"{a} -> {b}": w[:2] for a, b in edges for c in found if a in c and b in c for w in [edges[a, b]]}
    assert found == [], f"import cycles between rooms {found}: {detail}"


def test_the_lower_rooms_never_reach_up():
    bad = {f"{a} -> {b}": w[:3] for (a, b), w in room_edges().items()
           if a in LOWER and (b in UPPER or b.startswith("serve_apps"))}
    assert bad == {}, f"a lower room imports the cycle, driver, control plane, simulation or Serve apps: {bad}"


def serve_lifecycle_calls(root: Path = ROOT) -> dict[str, list[str]]:
    found = {}
    for path in modules(root).values():
        if path == root / "loop" / "cluster.py":
            continue
        calls = {ast.unparse(n.func) + "(" for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.Call)}
        if hits := sorted(c for c in calls if any(c.endswith(s) for s in SERVE_LIFECYCLE)):
            found[str(path.relative_to(root))] = hits
    return found


def test_only_the_cluster_module_runs_serve_applications():
    found = serve_lifecycle_calls()
    assert found == {}, f"Serve's application lifecycle outside loop/cluster.py (ask it instead): {found}"


def test_the_checks_catch_what_they_guard(tmp_path):
    for name, text in {"loop/__init__.py": "", "loop/traces/__init__.py": "",
                       "loop/traces/log.py": "def f():\n    from loop.cycle import run\n",
                       "loop/cycle/__init__.py": "from ..traces import log\n",
                       "serve_apps/__init__.py": "", "loop/cluster.py": "serve.run(app)\n",
                       "serve_apps/app.py": "from ray import serve\nserve.status()\n"}.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    edges = room_edges(tmp_path)
    assert set(edges) == {("traces", "cycle"), ("cycle", "traces")}
    assert cycles(edges) == [["cycle", "traces"]]
    assert serve_lifecycle_calls(tmp_path) == {"serve_apps/app.py": ["serve.status("]}
