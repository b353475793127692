"""The layout's rules, checked over ``src/inferpool`` (issue 26): no import circle between modules (lazy
imports inside functions count; imports under ``if TYPE_CHECKING:`` do not run, so they do not), and
only settings read the environment."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

SOURCE = Path(__file__).resolve().parent.parent / "src" / "inferpool"


def _module_name(path: Path) -> str:
    parts = path.relative_to(SOURCE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _runtime_imports(tree: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            yield from (
                n for branch in node.orelse for n in _runtime_imports(ast.Module(body=[branch], type_ignores=[]))
            )
            continue
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        yield from _runtime_imports(node)


def import_graph() -> dict[str, set[str]]:
    modules = {_module_name(path): path for path in SOURCE.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for node in _runtime_imports(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif node.module is not None and node.level == 0:
                # ``from package import module`` imports that module; ``from module import name``, the module.
                submodules = [f"{node.module}.{alias.name}" for alias in node.names]
                targets = [s for s in submodules if s in modules] or [node.module]
            else:
                continue
            graph[name] |= {target for target in targets if target in modules and target != name}
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm, iteratively)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    found: list[list[str]] = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
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
    return found


def test_no_module_imports_itself_round_a_circle() -> None:
    assert circles(import_graph()) == []


def test_the_circle_check_finds_a_circle() -> None:
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def _environment_reads(tree: ast.AST) -> list[int]:
    """Lines that read the environment: ``os.environ.get``, ``os.environ[...]``, ``os.getenv``, ``**os.environ``
    (setting a variable for a library or a child process is not reading one)."""
    lines = []
    for node in ast.walk(tree):
        text = ast.unparse(node) if isinstance(node, ast.Call | ast.Subscript | ast.Dict) else ""
        if (
            (isinstance(node, ast.Call) and text.startswith(("os.environ.get(", "os.getenv(")))
            or (isinstance(node, ast.Subscript) and text.startswith("os.environ[") and isinstance(node.ctx, ast.Load))
            or (
                isinstance(node, ast.Dict)
                and any(
                    k is None and ast.unparse(v) == "os.environ" for k, v in zip(node.keys, node.values, strict=True)
                )
            )
        ):
            lines.append(node.lineno)
    return lines


#: Where the environment may be read: settings (the rule), and the local pool, which passes its own
#: environment on to the processes it starts (their settings read it there).
ENVIRONMENT_READERS = ["plumbing/settings.py", "plumbing/local_pool.py"]


def test_only_settings_read_the_environment() -> None:
    readers = sorted(str(path.relative_to(SOURCE)) for path in SOURCE.rglob("*.py")
                     if _environment_reads(ast.parse(path.read_text(encoding="utf-8"))))  # fmt: skip
    assert readers == sorted(ENVIRONMENT_READERS)


def test_the_environment_check_sees_reads() -> None:
    assert _environment_reads(ast.parse("import os\nos.environ.get('X')\nos.environ['Y']\n{**os.environ}\n")) == [
        2,
        3,
        4,
    ]
    assert _environment_reads(ast.parse("import os\nos.environ['X'] = '1'\nos.environ.setdefault('Y', '1')\n")) == []


#: What each room may import (besides itself): the wire knows only fixed names and errors; state builds on
#: the wire and the plumbing; client and workers never import each other.
ALLOWED = {
    "inferpool.wire": {"inferpool.constants", "inferpool._exceptions"},
    "inferpool.affinity": {"inferpool.constants", "inferpool._exceptions", "inferpool.wire"},
    "inferpool.state": {"inferpool.constants", "inferpool._exceptions", "inferpool.wire", "inferpool.plumbing"},
}
FORBIDDEN = {
    "inferpool.client": {"inferpool.workers", "inferpool.residency"},
    "inferpool.workers": {"inferpool.client", "inferpool.residency"},
    # Detection reads sources and the registry; workers, clients and commands build on it, never the reverse.
    "inferpool.detection": {
        "inferpool.workers",
        "inferpool.client",
        "inferpool.residency",
        "inferpool.scheduler",
        "inferpool.gateway",
        "inferpool.cli",
        "inferpool.state",
    },
    "inferpool.model_registry": {"inferpool.detection"},
}  # residency builds on workers


def _room(module: str) -> str:
    return ".".join(module.split(".")[:2])


def test_rooms_import_only_what_they_may() -> None:
    wrong = []
    for module, targets in import_graph().items():
        room = _room(module)
        for target in targets:
            other = _room(target)
            if other == room:
                continue
            if room in ALLOWED and other not in ALLOWED[room]:
                wrong.append(f"{module} -> {target}")
            if other in FORBIDDEN.get(room, set()):
                wrong.append(f"{module} -> {target}")
    assert wrong == []
