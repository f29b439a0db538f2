"""The repository's layout, read with `ast`: how packages import each other and how large the
product code is.

The import graph counts every import: at module level, inside functions and under `try`.
`from X import Y` is an import of the module X.Y when X.Y is a module, else of X. Edges are
between this repository's own modules; packages are compared by their top-level name.

- no cycle between top-level packages;
- no product package imports `demo`, `tests`, `tiny` or `benchmarks` (they sit above it);
- product modules are at most 400 lines (cli.py exempt) and product functions at most 60.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PRODUCT = ("shards", "autolabel", "dataset_stats", "curate", "t2i", "costs", "evals")
PACKAGES = (*PRODUCT, "tiny", "demo", "cli")  # the graph's nodes, by top-level name
ABOVE_PRODUCT = ("demo", "tests", "tiny", "benchmarks")
SIZED = (*PRODUCT, "tiny", "demo", "cli")  # what the size limits cover: every installed package
MAX_MODULE_LINES, MAX_FUNCTION_LINES = 400, 60
MODULE_LIMIT_EXEMPT = ("cli",)


def module_files(root: Path = ROOT, packages=PACKAGES) -> dict[str, Path]:
    """{dotted module name: file} for every module of `packages` under `root`."""
    found = {}
    for top in packages:
        single = root / f"{top}.py"
        if single.is_file():
            found[top] = single
            continue
        for path in sorted((root / top).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _own_module(name: str, modules: dict[str, Path]) -> str | None:
    """The longest prefix of `name` that is one of our modules (None for third-party names)."""
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in modules:
            return ".".join(parts[:n])
    return None


def _imported_names(tree: ast.AST, module: str, is_package: bool) -> list[tuple[str, str | None, int]]:
    """(dotted name, submodule candidate or None, line) of everything `tree` imports, anywhere in
    it: `import X.Y` gives ("X.Y", None); `from X import Y` gives ("X", "X.Y")."""
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [(a.name, None, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                package = module.split(".") if is_package else module.split(".")[:-1]
                package = package[: len(package) - (node.level - 1)]
                base = ".".join([*package, base] if base else package)
            names += [(base, f"{base}.{a.name}".strip("."), node.lineno) for a in node.names]
    return names


def import_edges(root: Path = ROOT, packages=PACKAGES) -> list[tuple[str, str, str]]:
    """(importer module, imported module, "path:line") for every import between the modules of
    `packages`, plus imports of `tests` or `benchmarks` modules (named by their top-level name)."""
    modules = module_files(root, packages)
    outside = {p.stem: "tests" for p in (root / "tests").glob("*.py")} | {"tests": "tests", "benchmarks": "benchmarks"}
    edges = []
    for module, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        for name, submodule, line in _imported_names(tree, module, path.name == "__init__.py"):
            target = submodule if submodule in modules else _own_module(name, modules) or outside.get(top(name))
            if target and target != module:
                edges.append((module, target, f"{path.relative_to(root)}:{line}"))
    return edges


def top(module: str) -> str:
    return module.split(".")[0]


def package_cycles(edges) -> list[list[str]]:
    """Strongly connected components (more than one package) of the top-level package graph."""
    graph = defaultdict(set)
    for a, b, _ in edges:
        if top(a) != top(b):
            graph[top(a)].add(top(b))
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):  # Tarjan
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
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
                out.append(sorted(component))

    for v in sorted(set(graph) | {w for ws in graph.values() for w in ws}):
        if v not in index:
            visit(v)
    return out


def _listing(edges) -> str:
    by_pair = defaultdict(list)
    for a, b, where in edges:
        by_pair[(top(a), top(b))].append(f"{a} -> {b} ({where})")
    lines = []
    for (pa, pb), found in sorted(by_pair.items()):
        lines.append(f"  {pa} -> {pb}:")
        lines += [f"    {x}" for x in sorted(set(found))]
    return "\n".join(lines)


def test_the_graph_sees_imports_inside_functions_submodules_and_relative_imports(tmp_path):
    """The graph's own check, on a made-up repository."""
    files = {
        "a/__init__.py": "",
        "a/x.py": "import json\n\ndef f():\n    from b import y, helper\n    from .z import g\n",
        "a/z.py": "try:\n    import b.y.deep\nexcept ImportError:\n    pass\n",
        "b/__init__.py": "def helper(): ...\n",
        "b/y.py": "from . import helper\n\nclass K:\n    def m(self):\n        import a.z\n",
        "c.py": "import conftest\n",
        "tests/conftest.py": "",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    edges = {(a, b) for a, b, _ in import_edges(tmp_path, ("a", "b", "c"))}
    assert edges == {("a.x", "b.y"), ("a.x", "b"), ("a.x", "a.z"), ("a.z", "b.y"), ("b.y", "b"), ("b.y", "a.z"), ("c", "tests")}
    assert package_cycles(import_edges(tmp_path, ("a", "b", "c"))) == [["a", "b"]]


def test_no_cycle_between_top_level_packages():
    edges = import_edges()
    cycles = package_cycles(edges)
    inside = [e for e in edges if any(top(e[0]) in c and top(e[1]) in c and top(e[0]) != top(e[1]) for c in cycles)]
    assert not cycles, (
        "import cycles between top-level packages: " + "; ".join(" <-> ".join(c) for c in cycles)
        + "\nthe imports that make them (importer -> imported, where):\n" + _listing(inside)
    )


def test_product_packages_never_import_demo_tests_or_tiny():
    bad = [e for e in import_edges() if top(e[0]) in PRODUCT and top(e[1]) in ABOVE_PRODUCT]
    assert not bad, "product code imports what sits above it:\n" + _listing(bad)


def _sized_files() -> dict[str, Path]:
    return {m: p for m, p in module_files().items() if top(m) in SIZED}


def test_product_modules_are_at_most_400_lines():
    long = sorted((len(p.read_text().splitlines()), str(p.relative_to(ROOT))) for m, p in _sized_files().items()
                  if top(m) not in MODULE_LIMIT_EXEMPT)
    over = [f"  {path}: {n} lines" for n, path in reversed(long) if n > MAX_MODULE_LINES]
    assert not over, f"product modules over {MAX_MODULE_LINES} lines:\n" + "\n".join(over)


def test_product_functions_are_at_most_60_lines():
    over = []
    for module, path in _sized_files().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    over.append((n, f"{path.relative_to(ROOT)}:{node.lineno} {node.name}"))
    listing = [f"  {where}: {n} lines" for n, where in sorted(over, reverse=True)]
    assert not over, f"product functions over {MAX_FUNCTION_LINES} lines:\n" + "\n".join(listing)


def test_cli_lines_are_at_most_120_columns():
    """cli.py only maps flags: its lines stay readable (issue 28's limit)."""
    wide = [f"  cli.py:{i}: {len(line)} columns" for i, line in enumerate((ROOT / "cli.py").read_text().splitlines(), 1)
            if len(line) > 120]
    assert not wide, "cli.py lines over 120 columns:\n" + "\n".join(wide)
