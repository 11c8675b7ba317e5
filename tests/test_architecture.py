"""The shape of the code, checked: the import graph of Courier's apps and its layers.

Read with `ast` only (nothing is imported, no Django needed): every `import` of
`targets`, `dispatch`, `querytool` and `config`, at module level and inside
functions (an import in a function is a cycle postponed, not removed), and the
dotted paths the target proxies name (imported lazily by `import_string`).
`if TYPE_CHECKING:` imports are left out: they never run.

To add a rule, add a `Layer` to `LAYERS`. A violation that another piece of work
removes may be excused only in `KNOWN_UNTIL_14B`, which that work empties; an
excuse that no longer matches anything fails the test, so the set only shrinks.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass, field
from fnmatch import fnmatch
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("targets", "dispatch", "querytool", "config")
LONG_MODULE_LINES = 500
LONG_MODULE_NOTE = "# Why this module is long:"

# Protocol code and the contracts it works with: no model, admin, service or other
# Django app module of ours, so it can be used (and tested) without any of them.
FOUNDATION = {
    "config.safetext",
    "targets.dicomnet",
    "targets.dicomnet.check",
    "targets.dicomnet.commitment",
    "targets.dicomnet.identity",
    "targets.dicomnet.outgoing",
    "targets.dicomnet.sockets",
    "targets.dicomnet.status",
    "targets.dicomnet.transcode",
    "targets.dicomnet.vr",
    "targets.http",
    "targets.kinds.base",
    "targets.dicomnet.scp",
    "targets.dicomnet.scu",
    "targets.paths",
    "targets.query",
    "targets.series",
    "targets.ssh",
    "targets.validators",
}

# What the query tool may use of dispatch: queue its send jobs and read them, and
# claim its retrievals with the jobs engine's claim and lease.
QUERYTOOL_DISPATCH_ENTRIES = (
    "dispatch.jobs.services",
    "dispatch.jobs.models",
    "dispatch.jobs.lease",
)

# Dispatch is three apps, each importing only those before it (jobs <- routing <-
# receiving); the site's status (`dispatch.overview`, the admin's home page and
# /health/) reads all three and none imports it.
DISPATCH_APPS = ("dispatch.jobs", "dispatch.routing", "dispatch.receiving")
DISPATCH_SITE = ("dispatch", "dispatch.overview", "dispatch.views", "dispatch.urls")
# The functions receiving hands series to routing with (complete; still arriving,
# for the rules that forward as instances arrive); the rest of routing it uses is
# its models (the rows it keeps) and the page it extends.
HAND_OVER = (
    "dispatch.routing.tasks",
    {"route_received", "forward_received"},
)


def _app(name: str) -> tuple[str, str]:
    return (name, f"{name}.*")


@dataclass(frozen=True)
class Layer:
    """Modules matching `modules` import no module matching `forbidden` (globs),
    except those matching `allowed`; `import_time`: module-level imports only."""

    name: str
    modules: tuple[str, ...]
    forbidden: tuple[str, ...]
    allowed: tuple[str, ...] = ()
    import_time: bool = False


LAYERS = [
    Layer(
        "protocol code and contracts import no model or app module",
        modules=tuple(sorted(FOUNDATION)),
        forbidden=tuple(f"{p}.*" for p in PACKAGES) + PACKAGES,
        allowed=tuple(sorted(FOUNDATION)),
    ),
    Layer(
        "targets imports neither querytool nor dispatch",
        modules=("targets", "targets.*"),
        forbidden=("querytool", "querytool.*", "dispatch", "dispatch.*"),
    ),
    Layer(
        "querytool uses dispatch through the jobs' services, models and lease only",
        modules=("querytool", "querytool.*"),
        forbidden=("dispatch", "dispatch.*"),
        allowed=QUERYTOOL_DISPATCH_ENTRIES,
    ),
    Layer(
        "jobs import neither routing nor receiving, nor the site's status",
        modules=_app("dispatch.jobs"),
        forbidden=(*_app("dispatch.routing"), *_app("dispatch.receiving"))
        + DISPATCH_SITE,
    ),
    Layer(
        "routing imports jobs, never receiving nor the site's status",
        modules=_app("dispatch.routing"),
        forbidden=_app("dispatch.receiving") + DISPATCH_SITE,
    ),
    Layer(
        "receiving uses routing's models and its hand-over, nothing else of it",
        modules=_app("dispatch.receiving"),
        forbidden=_app("dispatch.routing") + DISPATCH_SITE,
        allowed=("dispatch.routing.models", "dispatch.routing.admin", HAND_OVER[0]),
    ),
    Layer(
        "the jobs engine sends no queue message: only tasks (and above) do",
        modules=(
            "dispatch.jobs.models",
            "dispatch.jobs.lease",
            "dispatch.jobs.spool",
            "dispatch.jobs.outcomes",
            "dispatch.jobs.engine",
            "dispatch.jobs.running",
            "dispatch.jobs.status",
            "dispatch.jobs.growing",
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
        "settings import no app module",
        modules=("config.settings",),
        forbidden=tuple(f"{p}.*" for p in PACKAGES if p != "config"),
        allowed=tuple(sorted(FOUNDATION)),
    ),
]

# Violations excused until another piece of work removes them: "importer ->
# imported" (an edge excused from the layer rules and the cycle check) or "long:
# module". Issue 14's second half emptied it; nothing may be excused.
KNOWN_UNTIL_14B: set[str] = set()


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


_DOTTED = re.compile(r"^(targets(?:\.\w+)+)\.\w+$")


def _lazy_edges(graph: Graph) -> None:
    """What the proxies name by dotted path: `targets.models` imports it lazily."""
    tree = ast.parse((ROOT / "targets" / "models.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            match = _DOTTED.match(node.value)
            if match and match.group(1) in graph.modules:
                graph.edges.append(
                    Edge("targets.models", match.group(1), node.lineno, False)
                )


@cache
def graph() -> Graph:
    found = Graph()
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            if "migrations" not in path.parts:
                found.modules[_module_name(path)] = path
    for name, path in found.modules.items():
        _walk(found, name, path)
    _lazy_edges(found)
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


def _excused(edge: Edge) -> bool:
    return edge.key in KNOWN_UNTIL_14B


# -- the tests -----------------------------------------------------------------------


def test_the_graph_is_read():
    g = graph()
    assert {"targets.models", "targets.kinds.base", "querytool.services"} <= set(
        g.modules
    )
    keys = {e.key for e in g.edges}
    # A module-level import, a function-local one and a proxy's dotted path.
    assert "querytool.services -> targets.query" in keys
    assert "dispatch.routing.services -> dispatch.jobs.services" in keys
    assert "targets.admin -> targets.ssh" in keys
    assert "targets.models -> targets.kinds.dicom.handler" in keys


def test_no_import_cycle_between_modules():
    edges = [e for e in graph().edges if not _excused(e)]
    cycles = _cycles(edges)
    details = []
    for component in cycles:
        inside = [
            e for e in edges if e.importer in component and e.imported in component
        ]
        details.append(" / ".join(str(e) for e in inside))
    assert not cycles, "import cycles:\n" + "\n".join(details)


def test_layers_import_only_downward():
    problems = []
    for layer in LAYERS:
        for e in graph().edges:
            if layer.import_time and not e.module_level:
                continue
            if not _matches(e.importer, layer.modules):
                continue
            if _matches(e.imported, layer.forbidden) and not _matches(
                e.imported, layer.allowed
            ):
                if not _excused(e):
                    problems.append(f"{layer.name}: {e}")
    assert not problems, "\n".join(problems)


def test_the_model_loads_no_handler_or_query_source_at_import_time():
    g = graph()
    named = {
        e.imported
        for e in g.edges
        if e.importer == "targets.models" and not e.module_level
    }
    named = {m for m in named if m.startswith("targets.kinds.")}
    assert named, "the proxies name their handlers by dotted path"
    # Everything `import targets.models` runs, following module-level imports.
    module_level: dict[str, set[str]] = {}
    for e in g.edges:
        if e.module_level:
            module_level.setdefault(e.importer, set()).add(e.imported)
    seen, todo = set(), ["targets.models"]
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo.extend(module_level.get(module, ()))
    assert not seen & named, sorted(seen & named)


# No `if kind == ...` outside the proxies: a kind's facts live on its proxy.
_KIND_BRANCH = re.compile(
    r"""\bkind\s*(==|!=)|\bkind\s+(not\s+)?in\s*[(\[{]|\bKind\.[A-Z_]+\b"""
    r"""|(==|!=)\s*["'](dicom|dicom_tls|dicomweb|folder|rsync|s3|sftp|xnat)["']"""
)
KIND_BRANCH_ALLOWED = {"targets.models"}


def test_nothing_outside_the_proxies_branches_on_a_kind():
    found = []
    for name, path in graph().modules.items():
        if name in KIND_BRANCH_ALLOWED:
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if _KIND_BRANCH.search(code):
                found.append(f"{name}:{number}: {line.strip()}")
    assert not found, "\n".join(found)


def test_a_long_module_says_why_at_its_top():
    unexplained = []
    for name, path in graph().modules.items():
        lines = path.read_text().splitlines()
        if len(lines) <= LONG_MODULE_LINES:
            continue
        top = "\n".join(lines[:40])
        if LONG_MODULE_NOTE not in top and f"long: {name}" not in KNOWN_UNTIL_14B:
            unexplained.append(f"{name} ({len(lines)} lines)")
    assert not unexplained, (
        f"over {LONG_MODULE_LINES} lines without '{LONG_MODULE_NOTE}' near the "
        "top: " + ", ".join(unexplained)
    )


def test_every_excuse_still_applies():
    keys = {e.key for e in graph().edges}
    long = {
        f"long: {name}"
        for name, path in graph().modules.items()
        if len(path.read_text().splitlines()) > LONG_MODULE_LINES
    }
    stale = sorted(KNOWN_UNTIL_14B - keys - long)
    assert not stale, f"excused but no longer there (remove them): {stale}"


def test_receiving_hands_series_to_routing_through_its_door():
    module, functions = HAND_OVER
    taken = set()
    for name, path in graph().modules.items():
        if not _matches(name, _app("dispatch.receiving")):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == module:
                taken |= {alias.name for alias in node.names}
    assert taken == functions


def test_each_dispatch_app_has_its_models_and_migrations():
    for app in DISPATCH_APPS:
        folder = ROOT.joinpath(*app.split("."))
        for part in ("apps.py", "models.py", "migrations/0001_initial.py"):
            assert (folder / part).is_file(), f"{app}: {part}"
