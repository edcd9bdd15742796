"""Each room has one job (STYLE.md), checked on the source itself: no import cycle among the
project's modules, no file too long to be one room, and few untyped dicts in the application
and the analysis, each saying why it stays a dict.

Imports are read with `ast`, at module level and inside functions alike (an import inside a
function still ties the two modules together; it only hides the cycle); those under
`if TYPE_CHECKING:` are left out, since they never run.
"""

from __future__ import annotations

import ast
import io
import tokenize
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("idlebuf", "probes", "analysis", "workloads")
MAX_PYTHON_LINES = 600
MAX_BPF_LINES = 500
MAX_UNTYPED_DICTS = 10  # dict[str, Any] in idlebuf/ and analysis/
SKIPPED_DIRS = {"tests", "__pycache__", "build", "dist"}


@dataclass(frozen=True)
class Edge:
    target: str
    where: str  # path:line of the import


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_modules() -> dict[str, Path]:
    return {
        module_name(path): path
        for package in PACKAGES
        for path in sorted((ROOT / package).rglob("*.py"))
        if "__pycache__" not in path.parts
    }


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(node: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import statement under `node`, in functions too, except under TYPE_CHECKING."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and _is_type_checking(child.test):
            for other in child.orelse:
                yield from _imports(ast.Module(body=[other], type_ignores=[]))
            continue
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            yield child
        yield from _imports(child)


def _known(name: str, modules: Collection[str]) -> str | None:
    """`name`, or the longest prefix of it that is a project module."""
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in modules:
            return candidate
        parts.pop()
    return None


def import_edges(
    module: str, source: str, is_package: bool, modules: Collection[str], shown: str
) -> list[Edge]:
    """The project modules `module` (whose text is `source`, shown as `shown` in messages)
    imports. `import a.b` imports a.b; `from pkg import name` imports pkg.name when that is
    a module, and pkg itself whenever pkg is a module (the statement runs pkg's __init__ and
    takes names from it: how `idlebuf.reporters.html` depended on `idlebuf.reporters`).
    The packages around a dotted name are not counted beyond that: Python loads them before
    the module by construction, and a package that gathers its submodules in __init__ would
    always be a cycle. Relative imports are resolved against the module's package."""
    package = module if is_package else module.rpartition(".")[0]
    edges = []
    for node in _imports(ast.parse(source, shown)):
        targets: list[str | None] = []
        if isinstance(node, ast.Import):
            targets = [_known(alias.name, modules) for alias in node.names]
        else:
            base = node.module or ""
            if node.level:
                anchor = package.split(".") if package else []
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        for target in targets:
            if target in modules and target != module:
                edges.append(Edge(target, f"{shown}:{node.lineno}"))
    return edges


def import_graph() -> dict[str, list[Edge]]:
    modules = project_modules()
    return {
        m: import_edges(
            m, path.read_text(), path.name == "__init__.py", modules, str(path.relative_to(ROOT))
        )
        for m, path in modules.items()
    }


def strongly_connected(graph: dict[str, list[Edge]]) -> list[list[str]]:
    """Tarjan's strongly connected components of more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    found: list[list[str]] = []
    counter = 0

    def visit(start: str) -> None:  # iterative: no recursion limit on deep chains
        nonlocal counter
        work = [(start, iter(graph[start]))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, edges = work[-1]
            advanced = False
            for edge in edges:
                if edge.target not in index:
                    index[edge.target] = low[edge.target] = counter
                    counter += 1
                    stack.append(edge.target)
                    on_stack.add(edge.target)
                    work.append((edge.target, iter(graph[edge.target])))
                    advanced = True
                    break
                if edge.target in on_stack:
                    low[node] = min(low[node], index[edge.target])
            if advanced:
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return sorted(found)


def a_cycle(component: list[str], graph: dict[str, list[Edge]]) -> list[Edge]:
    """One cycle through the component's first module, as the imports that make it."""
    members = set(component)
    start = component[0]
    paths: dict[str, list[Edge]] = {start: []}
    queue = [start]
    while queue:
        node = queue.pop(0)
        for edge in graph[node]:
            if edge.target == start:
                return [*paths[node], edge]
            if edge.target in members and edge.target not in paths:
                paths[edge.target] = [*paths[node], edge]
                queue.append(edge.target)
    raise AssertionError(f"no cycle through {start}")  # a component always has one


def test_no_import_cycle() -> None:
    graph = import_graph()
    cycles = []
    for component in strongly_connected(graph):
        steps = a_cycle(component, graph)
        names = [component[0], *(e.target for e in steps)]
        cycles.append(
            " -> ".join(names)
            + " (imports at "
            + ", ".join(e.where for e in steps)
            + (f"; tied with them: {', '.join(component)})" if len(component) > 2 else ")")
        )
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_walk_sees_the_imports_that_hide_a_cycle() -> None:
    """Imports inside functions and relative ones count; TYPE_CHECKING ones do not; `from
    pkg import name` is pkg.name when that is a module, and pkg when that is one."""
    sources = {
        "pkg": ("from . import a\nfrom .c import helper\n", True),
        "pkg.a": ("def f():\n    from .b import g\n", False),
        "pkg.b": ("from pkg.a import f\nimport json\n", False),
        "pkg.c": ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import d\n"
                  "else:\n    import pkg.sub.e\n", False),
        "pkg.d": ("import pkg.c\nfrom pkg import VERSION\n", False),
        "pkg.sub": ("", True),
        "pkg.sub.e": ("from .. import d\nfrom ..d import x\n", False),
    }  # fmt: skip
    graph = {
        m: import_edges(m, text, is_package, sources.keys(), m)
        for m, (text, is_package) in sources.items()
    }
    targets = {m: [e.target for e in edges] for m, edges in graph.items()}
    assert targets == {
        "pkg": ["pkg.a", "pkg.c"],  # its own name is no edge
        "pkg.a": ["pkg.b"],
        "pkg.b": ["pkg.a"],
        "pkg.c": ["pkg.sub.e"],  # not pkg.sub nor pkg: loaded first by construction
        "pkg.d": ["pkg.c", "pkg"],
        "pkg.sub": [],
        "pkg.sub.e": ["pkg", "pkg.d", "pkg.d"],
    }
    assert strongly_connected(graph) == [["pkg", "pkg.c", "pkg.d", "pkg.sub.e"], ["pkg.a", "pkg.b"]]
    assert [e.where for e in a_cycle(["pkg.a", "pkg.b"], graph)] == ["pkg.a:2", "pkg.b:1"]


def _source_files() -> Iterator[Path]:
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT).parts
        if any(p.startswith(".") or p in SKIPPED_DIRS or p.endswith(".egg-info") for p in parts):
            continue
        yield path


def test_no_file_too_long_for_one_room() -> None:
    too_long = [
        f"{path.relative_to(ROOT)}: {n} lines (at most {MAX_PYTHON_LINES})"
        for path in _source_files()
        if (n := len(path.read_text().splitlines())) > MAX_PYTHON_LINES
    ]
    too_long += [
        f"{path.relative_to(ROOT)}: {n} lines (at most {MAX_BPF_LINES})"
        for path in sorted((ROOT / "probes" / "bpf").glob("*.c"))
        if (n := len(path.read_text().splitlines())) > MAX_BPF_LINES
    ]
    assert not too_long, "files too long to be one room:\n" + "\n".join(too_long)


def _is_untyped_dict(node: ast.AST) -> bool:
    """dict[str, Any] (or typing's Dict, Any however it is spelled)."""
    if not isinstance(node, ast.Subscript):
        return False
    base = node.value
    name = base.id if isinstance(base, ast.Name) else getattr(base, "attr", None)
    if name not in ("dict", "Dict") or not isinstance(node.slice, ast.Tuple):
        return False
    if len(node.slice.elts) != 2:
        return False
    key, value = node.slice.elts
    key_name = key.id if isinstance(key, ast.Name) else None
    value_name = value.id if isinstance(value, ast.Name) else getattr(value, "attr", None)
    return key_name == "str" and value_name == "Any"


def _comments(text: str) -> dict[int, tuple[str, bool]]:
    """line -> (comment, whether the comment is the whole line)"""
    out = {}
    lines = text.splitlines()
    for token in tokenize.generate_tokens(io.StringIO(text).readline):
        if token.type == tokenize.COMMENT:
            row = token.start[0]
            whole = not lines[row - 1][: token.start[1]].strip()
            out[row] = (token.string.lstrip("#").strip(), whole)
    return out


def _says_why(comment: str) -> bool:
    """A sentence, not a pragma (type: ignore, noqa, fmt)."""
    words = comment.split()
    return len(words) >= 3 and not comment.startswith(("type:", "noqa", "fmt:", "pragma"))


def test_untyped_dicts_are_few_and_say_why() -> None:
    found, silent = [], []
    for package in ("idlebuf", "analysis"):
        for path in sorted((ROOT / package).rglob("*.py")):
            text = path.read_text()
            comments = _comments(text)
            nodes = sorted(
                ast.walk(ast.parse(text, str(path))), key=lambda n: getattr(n, "lineno", 0)
            )
            for node in nodes:
                if not _is_untyped_dict(node):
                    continue
                assert isinstance(node, ast.Subscript)
                where = f"{path.relative_to(ROOT)}:{node.lineno}"
                found.append(where)
                first, last = node.lineno, node.end_lineno or node.lineno
                reasons = [comments[n][0] for n in range(first, last + 1) if n in comments]
                above = []  # the block of comment lines right above, read as one
                row = first - 1
                while row in comments and comments[row][1]:
                    above.insert(0, comments[row][0])
                    row -= 1
                if not any(_says_why(r) for r in [*reasons, " ".join(above)]):
                    silent.append(where)
    problems = []
    if len(found) > MAX_UNTYPED_DICTS:
        problems.append(
            f"{len(found)} dict[str, Any] in idlebuf/ and analysis/ (at most "
            f"{MAX_UNTYPED_DICTS}): " + ", ".join(found)
        )
    if silent:
        problems.append(
            "dict[str, Any] with no comment saying why (same or previous line): "
            + ", ".join(silent)
        )
    assert not problems, "\n".join(problems)
