"""The floor plan holds: no import cycles inside ``influence_bench`` (counting imports inside
functions, which hide cycles as well as any), a shallow import chain, lower layers that never import
higher ones, and no module reaching into another object's private state."""

import ast
from functools import lru_cache
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "influence_bench"

# Lower layers first; a module may import its own layer or any lower one, never a higher one.
LAYERS = [
    {"paths", "hashing", "tally", "errors", "metrics", "progress", "trust", "devices", "lazy"},
    {"spec"},
    {"data", "models"},
    {"curvature"},
    {"training"},
    {"api"},
    {"groundtruth"},
    {"reporting"},
    {"scoring"},
    {"paper"},
    {"cli", "pytest_plugin", "python_api", "__main__"},
]
MAX_DEPTH = 9  # subpackages on the longest import chain (the layers below + the public face)


def module_name(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@lru_cache(maxsize=2)
def graph(top_level_only: bool = False) -> dict[str, set[str]]:
    """Module -> the package modules it imports (anywhere in it, or only at module level)."""
    mods = {module_name(p): p for p in PKG.rglob("*.py")}
    out: dict[str, set[str]] = {}
    for name, path in mods.items():
        deps = set()
        pkg = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        tree = ast.parse(path.read_text())
        for node in (tree.body if top_level_only else ast.walk(tree)):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = pkg.split(".")
                    base = ".".join(parts[:len(parts) - node.level + 1] + ([node.module] if node.module else []))
                for a in node.names:
                    full = f"{base}.{a.name}"
                    deps.add(full if full in mods else base)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names)
        out[name] = {d for d in deps if d in mods and d != name}
    return out


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in g[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def depth(g: dict[str, set[str]], through_inits: bool = True) -> int:
    """Nodes on the longest import chain (the graph must be acyclic); ``through_inits=False`` does
    not follow imports of a subpackage's ``__init__`` (a re-export, not a step down)."""
    memo: dict[str, int] = {}

    def d(v):
        if v not in memo:
            memo[v] = 1 + max((d(w) for w in g[v] if through_inits or not _is_package_init(w)), default=0)
        return memo[v]

    return max(d(v) for v in g)


def _is_package_init(name: str) -> bool:  # importing a subpackage's __init__ re-exports, not a layer step
    return (PKG.parent / name.replace(".", "/") / "__init__.py").is_file()


def layer(name: str) -> int | None:
    parts = name.split(".")
    if len(parts) < 2:
        return None  # the package's public face may import anything
    top = parts[1]
    return next((i for i, group in enumerate(LAYERS) if top in group), None)


def test_no_import_cycles():
    assert cycles(graph()) == []


def subpackage_graph() -> dict[str, set[str]]:
    """The import graph between subpackages (and top-level modules): the floor plan itself."""
    top = lambda m: ".".join(m.split(".")[:2])  # noqa: E731
    out: dict[str, set[str]] = {}
    for m, deps in graph().items():
        if m == "influence_bench.__main__":  # `python -m influence_bench`: the entry point, no layer of its own
            continue
        out.setdefault(top(m), set()).update(top(d) for d in deps if top(d) != top(m))
    return out


def test_subpackages_form_a_shallow_acyclic_stack():
    g = subpackage_graph()
    assert cycles(g) == [] and depth(g) <= MAX_DEPTH


def test_every_module_belongs_to_a_layer():
    assert [m for m in graph() if "." in m and layer(m) is None and not m.startswith("influence_bench.estimators")] == []


def test_lower_layers_never_import_higher_ones():
    bad = [f"{m} -> {d}" for m, deps in graph().items() for d in deps
           if layer(m) is not None and layer(d) is not None and layer(d) > layer(m)]
    assert bad == []


@pytest.mark.parametrize("attr", ["_memo", "_cache"])
def test_no_private_reach_into_the_context(attr):
    offenders = []
    roots = [PKG, PKG.parent / "estimators"]
    for root in roots:
        for p in root.rglob("*.py"):
            if p.name == "context.py" and p.parent.name == "api":
                continue
            for node in ast.walk(ast.parse(p.read_text())):
                if isinstance(node, ast.Attribute) and node.attr == attr:
                    offenders.append(f"{p.relative_to(PKG.parent)}:{node.lineno}")
    assert offenders == []
