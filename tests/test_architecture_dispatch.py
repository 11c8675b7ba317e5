"""The shape of dispatch, checked: its three apps import downward only.

    dispatch.overview (the site at a glance: admin home page, /health/)
        │ reads all three
    receiving ──(route_received: the one hand-over)──► routing ──(create_jobs)──► jobs

Jobs know nothing of routing or receiving; routing nothing of receiving; the
receiver hands each complete series to routing through one function and keeps its
bookkeeping in routing's `ReceivedSeries` rows; nothing below the overview imports
it. Inside jobs, the engine (claim, lease, attempt, outcomes, spool) sends no queue
message: `tasks` (the queue) calls it, services and scripts call `tasks`.

Read with `ast` only, as tests/test_architecture.py (issue 14's first half, on its
own branch when this was written) reads the whole tree: every import of our
packages, at module level and inside functions. These rules are that file's
`LAYERS` for dispatch; when both are on one branch they join its list (and this
file's copy of the graph walker goes).
"""

from __future__ import annotations

import ast
from dataclasses import dataclass, field
from fnmatch import fnmatch
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("targets", "dispatch", "querytool", "config")

APPS = ("dispatch.jobs", "dispatch.routing", "dispatch.receiving")
# The site-wide status above the three apps (home page, /health/).
SITE = ("dispatch", "dispatch.overview", "dispatch.views", "dispatch.urls")
# What the query tool may use of dispatch: queue its send jobs, read them, and
# claim its retrievals with the jobs engine's claim and lease.
QUERYTOOL_DISPATCH_ENTRIES = (
    "dispatch.jobs.services",
    "dispatch.jobs.models",
    "dispatch.jobs.lease",
)
# The one function receiving hands a complete series to routing with; the rest of
# routing it uses is its models (the rows it keeps) and the page it extends.
HAND_OVER = ("dispatch.routing.tasks", "route_received")


# What this file answers for: dispatch, and the query tool's retrievals and queue
# (the rest of the query tool and targets are tests/test_architecture.py's).
CHECKED = (
    "dispatch",
    "dispatch.*",
    "querytool.services",
    "querytool.tasks",
    "querytool.retrieval",
)


def _below(app: str) -> tuple[str, ...]:
    return (app, f"{app}.*")


@dataclass(frozen=True)
class Layer:
    """Modules matching `modules` import no module matching `forbidden` (globs),
    except those matching `allowed`; `import_time`: module-level imports only."""

    name: str
    modules: tuple[str, ...]
    forbidden: tuple[str, ...]
    allowed: tuple[str, ...] = ()
    import_time: bool = False


DISPATCH_LAYERS = [
    Layer(
        "jobs import neither routing nor receiving, nor the site overview",
        modules=_below("dispatch.jobs"),
        forbidden=(*_below("dispatch.routing"), *_below("dispatch.receiving"), *SITE),
    ),
    Layer(
        "routing imports jobs, never receiving nor the site overview",
        modules=_below("dispatch.routing"),
        forbidden=(*_below("dispatch.receiving"), *SITE),
    ),
    Layer(
        "receiving uses routing's models and its hand-over, nothing else of it",
        modules=_below("dispatch.receiving"),
        forbidden=(*_below("dispatch.routing"), *SITE),
        allowed=("dispatch.routing.models", "dispatch.routing.admin", HAND_OVER[0]),
    ),
    Layer(
        "the engine sends no queue message: only tasks (and above) do",
        modules=(
            "dispatch.jobs.models",
            "dispatch.jobs.lease",
            "dispatch.jobs.spool",
            "dispatch.jobs.outcomes",
            "dispatch.jobs.engine",
            "dispatch.jobs.status",
        ),
        forbidden=(
            "dispatch.jobs.tasks",
            "dispatch.jobs.services",
            "dispatch.jobs.direct",
            "dispatch.jobs.admin",
            "dispatch.jobs.target_admin",
            "dispatch.jobs.management.*",
        ),
    ),
    Layer(
        "querytool uses dispatch through the jobs' services, models and lease only",
        modules=("querytool", "querytool.*"),
        forbidden=("dispatch", "dispatch.*"),
        allowed=QUERYTOOL_DISPATCH_ENTRIES,
    ),
    Layer(
        "targets imports no dispatch module",
        modules=("targets", "targets.*"),
        forbidden=("dispatch", "dispatch.*"),
    ),
]


@dataclass(frozen=True)
class Edge:
    importer: str
    imported: str
    line: int
    module_level: bool  # False: inside a function (or a lazy dotted path)

    def __str__(self) -> str:
        where = "" if self.module_level else " (in a function)"
        return f"{self.importer}:{self.line} imports {self.imported}{where}"

    @property
    def key(self) -> str:
        return f"{self.importer} -> {self.imported}"


@dataclass
class Graph:
    modules: dict[str, Path] = field(default_factory=dict)
    edges: list[Edge] = field(default_factory=list)


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _resolve(graph: Graph, importer: str, is_package: bool, node: ast.AST) -> list[str]:
    """The modules of ours an import statement names."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        assert isinstance(node, ast.ImportFrom)
        base = node.module or ""
        if node.level:
            package = importer.split(".")
            if not is_package:
                package = package[:-1]
            package = package[: len(package) - (node.level - 1)]
            base = ".".join([*package, base] if base else package)
        names = []
        for alias in node.names:
            full = f"{base}.{alias.name}"
            names.append(full if full in graph.modules else base)
    found = []
    for name in names:
        while name and name not in graph.modules:
            name = name.rpartition(".")[0]
        if name:
            found.append(name)
    return found


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _walk(graph: Graph, importer: str, path: Path) -> None:
    tree = ast.parse(path.read_text(), str(path))
    is_package = path.name == "__init__.py"

    def visit(node: ast.AST, module_level: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for other in child.orelse:
                    visit(other, module_level)
                continue
            if isinstance(child, ast.Import | ast.ImportFrom):
                for name in _resolve(graph, importer, is_package, child):
                    if name != importer:
                        graph.edges.append(
                            Edge(importer, name, child.lineno, module_level)
                        )
            inner = module_level and not isinstance(
                child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda
            )
            visit(child, inner)

    visit(tree, True)


@cache
def graph() -> Graph:
    found = Graph()
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            if "migrations" not in path.parts:
                found.modules[_module_name(path)] = path
    for name, path in found.modules.items():
        _walk(found, name, path)
    return found


def _matches(module: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch(module, p) for p in patterns)


def _cycles(edges: list[Edge]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    succ: dict[str, set[str]] = {}
    for e in edges:
        succ.setdefault(e.importer, set()).add(e.imported)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def strongconnect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(succ.get(v, ())):
            if w not in index:
                strongconnect(w)
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
                found.append(sorted(component))

    for v in sorted(succ):
        if v not in index:
            strongconnect(v)
    return found


# -- the tests -----------------------------------------------------------------------


def test_the_graph_is_read():
    keys = {e.key for e in graph().edges}
    # A module-level import and a function-local one.
    assert "dispatch.routing.services -> dispatch.jobs.services" in keys
    assert "dispatch.overview -> dispatch.receiving.status" in keys
    assert {"dispatch.jobs.engine", "dispatch.routing.tasks"} <= set(graph().modules)


def test_no_import_cycle_through_dispatch():
    edges = graph().edges
    cycles = [c for c in _cycles(edges) if any(_matches(m, CHECKED) for m in c)]
    details = []
    for component in cycles:
        inside = [
            e for e in edges if e.importer in component and e.imported in component
        ]
        details.append(" / ".join(str(e) for e in inside))
    assert not cycles, "import cycles:\n" + "\n".join(details)


def test_dispatch_layers_import_only_downward():
    problems = []
    for layer in DISPATCH_LAYERS:
        for e in graph().edges:
            if layer.import_time and not e.module_level:
                continue
            if not _matches(e.importer, layer.modules):
                continue
            if _matches(e.imported, layer.forbidden) and not _matches(
                e.imported, layer.allowed
            ):
                problems.append(f"{layer.name}: {e}")
    assert not problems, "\n".join(problems)


def test_receiving_hands_series_to_routing_through_one_function():
    module, function = HAND_OVER
    taken = set()
    for name, path in graph().modules.items():
        if not _matches(name, _below("dispatch.receiving")):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == module:
                taken |= {alias.name for alias in node.names}
    assert taken == {function}


def test_every_app_has_its_models_and_migrations():
    for app in APPS:
        folder = ROOT.joinpath(*app.split("."))
        assert (folder / "models.py").is_file(), app
        assert (folder / "apps.py").is_file(), app
        assert (folder / "migrations" / "0001_initial.py").is_file(), app
