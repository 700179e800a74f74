"""The import structure of megatrain/ and kernels/ (installed as megatrain.kernels): no cycles, and no
import against the layer order of docs/architecture.md ("Layers").

Every module is parsed with `ast`; module-level and function-level imports both count (a lazy import
is still a dependency), imports under `if TYPE_CHECKING:` do not (they never run). `from megatrain
import kernels` is an import of megatrain.kernels, not of the package root.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Iterable, Optional

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE_DIRS = {"megatrain": REPO / "megatrain", "megatrain.kernels": REPO / "kernels"}
ROOT = "megatrain"

# Bottom first; a unit may import units of lower layers only. Keep in step with docs/architecture.md
# ("Layers"): test_layers_match_the_architecture_doc compares the two. Units of packages that do not
# exist yet (generate, rl, ttt, scaling, analysis) are declared so they land in their place.
LAYERS: list[tuple[str, ...]] = [
    (
        "megatrain.errors",
        "megatrain.constants",
        "megatrain.fields",
        "megatrain.distributed",
        "megatrain.env",
        "megatrain.files",
    ),
    ("megatrain.kernels",),
    ("megatrain.models",),
    ("megatrain.parallel", "megatrain.optim", "megatrain.data"),
    ("megatrain.config",),
    ("megatrain.engine",),
    ("megatrain.generate",),
    ("megatrain.rl", "megatrain.ttt", "megatrain.scaling", "megatrain.analysis", "megatrain.bench"),
    ("megatrain.cli", ROOT),
]

# (importing unit, imported unit) pairs allowed inside one layer: parallel, optim and data do not know
# each other; the config-field and environment parsers of layer 0 raise the user-facing errors.
PEER_IMPORTS: set[tuple[str, str]] = {("megatrain.fields", "megatrain.errors"), ("megatrain.env", "megatrain.errors")}

# Edges that break the rules today, each with who removes it. The test fails when one of them no longer
# exists, so the list cannot outlive the code it excuses.
KNOWN_EXCEPTIONS: dict[tuple[str, str], str] = {}


# ----------------------------------------------------------------------------------------------
# the graph


def discover_modules(package_dirs: dict[str, Path]) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file under each package folder."""
    modules = {}
    for package, folder in package_dirs.items():
        for path in sorted(folder.rglob("*.py")):
            rel = path.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            modules[".".join([package, *parts])] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


class _ImportCollector(ast.NodeVisitor):
    """Every import statement of a module, at any depth, except inside `if TYPE_CHECKING:`."""

    def __init__(self):
        self.nodes: list[ast.stmt] = []

    def visit_If(self, node: ast.If) -> None:
        if _is_type_checking(node.test):
            for child in node.orelse:
                self.visit(child)
            return
        self.generic_visit(node)

    def visit_Import(self, node: ast.Import) -> None:
        self.nodes.append(node)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        self.nodes.append(node)


def _known_prefix(name: str, modules: Iterable[str]) -> Optional[str]:
    """The longest known module that is `name` or a package above it."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in modules:
            return candidate
    return None


def imports_of(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The megatrain modules `module` imports (resolved to modules that exist)."""
    collector = _ImportCollector()
    collector.visit(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))
    is_package = path.name == "__init__.py"
    out = set()
    for node in collector.nodes:
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            if node.level:
                package = module if is_package else module.rpartition(".")[0]
                base_parts = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            # `from pkg import name`: the submodule pkg.name when there is one, else pkg itself.
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        for target in targets:
            found = _known_prefix(target, modules)
            if found is not None and found != module:
                out.add(found)
    return out


def import_graph(package_dirs: dict[str, Path] = PACKAGE_DIRS) -> dict[str, set[str]]:
    modules = discover_modules(package_dirs)
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


# ----------------------------------------------------------------------------------------------
# the rules


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle [a, b, ..., a] for every strongly connected component with more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def connect(v: str) -> None:  # Tarjan's algorithm
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                connect(w)
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
                components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return [_cycle_in(component, graph) for component in components]


def _cycle_in(component: list[str], graph: dict[str, set[str]]) -> list[str]:
    """A closed path through the first module of a strongly connected component."""
    members, start = set(component), component[0]
    paths = {start: [start]}
    frontier = [start]
    while frontier:  # breadth-first: the shortest way back to start
        nxt = []
        for v in frontier:
            for w in sorted(graph.get(v, ())):
                if w == start:
                    return paths[v] + [start]
                if w in members and w not in paths:
                    paths[w] = paths[v] + [w]
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"no cycle through {start} in {component}")


def unit_of(module: str, layers: list[tuple[str, ...]] = LAYERS) -> Optional[str]:
    """The declared unit a module belongs to (a package or a top-level module), or None."""
    for layer in layers:
        for unit in layer:
            if unit == ROOT:
                if module == ROOT:
                    return unit
            elif module == unit or module.startswith(unit + "."):
                return unit
    return None


def layer_violations(
    graph: dict[str, set[str]], layers: list[tuple[str, ...]] = LAYERS, peers: set[tuple[str, str]] = PEER_IMPORTS
) -> list[str]:
    """One line per module outside every layer and per import that goes up or sideways."""
    level = {unit: i for i, layer in enumerate(layers) for unit in layer}
    problems = []
    for module in sorted(graph):
        if unit_of(module, layers) is None:
            problems.append(
                f"{module} belongs to no layer: add its package to LAYERS here and to docs/architecture.md (Layers)"
            )
    for module in sorted(graph):
        src = unit_of(module, layers)
        for target in sorted(graph[module]):
            dst = unit_of(target, layers)
            if src is None or dst is None or src == dst:
                continue
            if level[dst] > level[src]:
                problems.append(
                    f"{module} imports {target}: {dst} (layer {level[dst]}) is above {src} (layer {level[src]})"
                )
            elif level[dst] == level[src] and (src, dst) not in peers:
                problems.append(
                    f"{module} imports {target}: {src} and {dst} share layer {level[src]} and "
                    f"must not import each other (or declare the pair in PEER_IMPORTS)"
                )
    return problems


def without_known_exceptions(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    return {m: {t for t in targets if (m, t) not in KNOWN_EXCEPTIONS} for m, targets in graph.items()}


# ----------------------------------------------------------------------------------------------
# the real package


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return import_graph()


def test_every_module_is_parsed(graph):
    for name in (
        "megatrain",
        "megatrain.config",
        "megatrain.models.config",
        "megatrain.kernels",
        "megatrain.kernels.reference",
        "megatrain.engine.load",
        "megatrain.cli",
    ):
        assert name in graph, name
    assert "megatrain.models.layers" in graph["megatrain.models.config"]
    assert "megatrain.kernels" in graph["megatrain.models.layers"]  # `from megatrain import kernels`
    assert "megatrain.engine.load" in graph["megatrain"]  # the lazy import in megatrain.load counts


def test_no_import_cycles(graph):
    cycles = find_cycles(without_known_exceptions(graph))
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_imports_follow_the_layer_order(graph):
    problems = layer_violations(without_known_exceptions(graph))
    assert not problems, "imports against docs/architecture.md (Layers):\n" + "\n".join(problems)


def test_known_exceptions_still_exist(graph):
    gone = [f"{a} -> {b} ({why})" for (a, b), why in KNOWN_EXCEPTIONS.items() if b not in graph.get(a, ())]
    assert not gone, "these imports are gone: remove them from KNOWN_EXCEPTIONS:\n" + "\n".join(gone)


def test_layers_match_the_architecture_doc():
    """The order written in docs/architecture.md's Layers table is the one this test enforces."""
    text = (REPO / "docs" / "architecture.md").read_text(encoding="utf-8")
    section = text.split("\n## Layers", 1)[1].split("\n## ", 1)[0]
    documented: dict[int, tuple[str, ...]] = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 2 and cells[0].isdigit():
            documented[int(cells[0])] = tuple(re.findall(r"`(megatrain(?:\.\w+)?)`", cells[1]))
    assert [documented.get(i) for i in range(len(documented))] == LAYERS


# ----------------------------------------------------------------------------------------------
# the checker itself, on planted mistakes


def test_a_planted_cycle_is_found_and_printed():
    graph = {
        "megatrain.models.a": {"megatrain.models.b"},
        "megatrain.models.b": {"megatrain.models.c"},
        "megatrain.models.c": {"megatrain.models.a", "megatrain.errors"},
        "megatrain.errors": set(),
    }
    assert find_cycles(graph) == [
        ["megatrain.models.a", "megatrain.models.b", "megatrain.models.c", "megatrain.models.a"]
    ]
    graph["megatrain.models.c"] = {"megatrain.errors"}
    assert find_cycles(graph) == []


def test_a_planted_back_import_and_peer_import_are_refused():
    graph = {
        "megatrain.models.transformer": {"megatrain.engine.checkpoint", "megatrain.kernels"},
        "megatrain.engine.checkpoint": set(),
        "megatrain.kernels": set(),
        "megatrain.data.sampler": {"megatrain.optim.galore"},
        "megatrain.optim.galore": set(),
        "megatrain.cli": {"megatrain.engine.checkpoint"},
        "megatrain.extras.x": set(),
    }
    problems = layer_violations(graph)
    assert len(problems) == 3, problems
    assert any(p.startswith("megatrain.extras.x belongs to no layer") for p in problems)
    assert any(
        p.startswith(
            "megatrain.models.transformer imports megatrain.engine.checkpoint: megatrain.engine "
            "(layer 5) is above megatrain.models (layer 2)"
        )
        for p in problems
    )
    assert any(p.startswith("megatrain.data.sampler imports megatrain.optim.galore") for p in problems)
    allowed = layer_violations(graph, peers={("megatrain.data", "megatrain.optim")})
    assert len(allowed) == 2


def test_the_parser_on_a_planted_package(tmp_path):
    """Function-level and relative imports count, `from megatrain import kernels` names the subpackage,
    TYPE_CHECKING imports and third-party imports do not count."""
    pkg, kern = tmp_path / "megatrain", tmp_path / "kernels"
    (pkg / "models").mkdir(parents=True)
    kern.mkdir()
    files = {
        pkg / "__init__.py": "def load():\n    from megatrain.engine import load\n",
        pkg / "config.py": "",
        pkg / "engine.py": "",
        pkg / "models" / "__init__.py": "",
        pkg / "models" / "layers.py": (
            "import torch\nfrom typing import TYPE_CHECKING\nfrom megatrain import kernels\n"
            "if TYPE_CHECKING:\n    from megatrain.config import Config\n"
            "def f():\n    import megatrain.engine as e\n"
        ),
        pkg / "models" / "attention.py": "from . import layers\nfrom .layers import f\n",
        kern / "__init__.py": "from . import reference\nfrom ._utils import g\n",
        kern / "_utils.py": "def g():\n    pass\n",
        kern / "reference.py": "from megatrain.kernels._utils import g\n",
    }
    for path, text in files.items():
        path.write_text(text)
    graph = import_graph({"megatrain": pkg, "megatrain.kernels": kern})
    assert graph["megatrain"] == {"megatrain.engine"}
    assert graph["megatrain.models.layers"] == {"megatrain.kernels", "megatrain.engine"}
    assert graph["megatrain.models.attention"] == {"megatrain.models.layers"}
    assert graph["megatrain.kernels"] == {"megatrain.kernels.reference", "megatrain.kernels._utils"}
    assert graph["megatrain.kernels.reference"] == {"megatrain.kernels._utils"}
    assert [p.split(":")[0] for p in layer_violations(graph)] == ["megatrain.models.layers imports megatrain.engine"]
