"""The structure, asserted from the code's own imports (parsed with `ast`; imports inside functions and under
TYPE_CHECKING count too): no import cycle among harmonia's modules, no module importing from a layer above its own,
and no SQL outside harmonia/store/ (and migrations/).

When a new module does not fit a layer, give it one in LAYERS (and say why in its docstring); do not loosen a check.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# Bottom first. A module may import from its own layer and the layers below it, never from a layer above. A module
# belongs to the longest prefix listed ("harmonia" alone is the package's __init__ only).
LAYERS: list[tuple[str, ...]] = [
    ("harmonia", "harmonia.domain", "harmonia.config", "harmonia.paths", "harmonia.metrics"),  # shared types, settings
    ("harmonia.store",),                                   # all SQL outside migrations/
    ("harmonia.db",),                                      # connections, the embedded server
    ("harmonia.groundtruth", "harmonia.vocabulary", "harmonia.sources", "harmonia.export",  # data in and out
     "harmonia.kinds",                                     # what each source set is (config + declarations)
     "harmonia.text"),                                     # lab names and drug strings read (pure text)
    ("harmonia.embedding",),
    ("harmonia.retrieval",),
    ("harmonia.rerank",),
    ("harmonia.pipeline",),                                # retrieve -> rerank -> route, persist, queue workers
    ("harmonia.evaluation",),                              # benchmark sets, runs, calibration
    ("harmonia.review",),                                  # the review service and its web page
    ("harmonia.cli",),
]

SQL_HOMES = ("harmonia.store",)  # plus migrations/, which holds no Python

# Calls that run SQL (a `.copy(` with arguments: psycopg's COPY, not a dict's or an array's copy()).
SQL_CALLS = {"execute", "executemany", "cursor", "copy"}
SQL_TEXT = re.compile(
    r"\b(SELECT\b[\s\S]+\bFROM|INSERT\s+INTO|UPDATE\s+[\w.]+\s+SET|DELETE\s+FROM|CREATE\s+(UNIQUE\s+)?"
    r"(TABLE|INDEX|DATABASE|SCHEMA|EXTENSION)|ALTER\s+TABLE|DROP\s+(TABLE|INDEX|SCHEMA|DATABASE)|"
    r"LISTEN\s+\w|NOTIFY\s+\w|COPY\s+[\w.]+\s*\(|SET\s+LOCAL)\b")


# ------------------------------------------------------------------------------------------------ the checkers


def modules(root: Path, package: str = "harmonia") -> dict[str, Path]:
    """Every module of the package under root: dotted name -> file."""
    out = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def imports(name: str, path: Path, known: set[str]) -> Iterator[tuple[str, int]]:
    """(imported harmonia module, line) for every import in the file, wherever it stands."""
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield from ((m, node.lineno) for m in [alias.name] if m in known)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            for alias in node.names:
                target = f"{module}.{alias.name}"
                if target in known:  # `from harmonia.store import vocab`: the submodule
                    yield target, node.lineno
                elif module in known:
                    yield module, node.lineno


def graph(root: Path) -> tuple[dict[str, set[str]], dict[tuple[str, str], int]]:
    mods = modules(root)
    edges: dict[str, set[str]] = {m: set() for m in mods}
    lines: dict[tuple[str, str], int] = {}
    for name, path in mods.items():
        for target, line in imports(name, path, set(mods)):
            if target != name:
                edges[name].add(target)
                lines.setdefault((name, target), line)
    return edges, lines


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
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

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def layer_of(module: str, layers: list[tuple[str, ...]] = LAYERS) -> int:
    best, found = -1, -1
    for i, prefixes in enumerate(layers):
        for p in prefixes:
            matches = module == p if p == "harmonia" else (module == p or module.startswith(p + "."))
            if matches and len(p) > best:
                best, found = len(p), i
    if found < 0:
        raise AssertionError(f"{module} is in no layer: add it to LAYERS in tests/test_architecture.py")
    return found


def upward_imports(root: Path, layers: list[tuple[str, ...]] = LAYERS) -> list[str]:
    edges, lines = graph(root)
    out = []
    for src, targets in sorted(edges.items()):
        for dst in sorted(targets):
            if layer_of(dst, layers) > layer_of(src, layers):
                out.append(f"{src} (line {lines[(src, dst)]}) imports {dst}, a layer above it")
    return out


def _docstrings(tree: ast.AST) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                ids.add(id(first.value))
    return ids


def sql_in(path: Path, root: Path) -> list[str]:
    """Where one file runs or composes SQL."""
    out = []
    tree = ast.parse(path.read_text(), str(path))
    docs = _docstrings(tree)
    for node in ast.walk(tree):
        where = f"{path.relative_to(root)}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in SQL_CALLS:
            if node.func.attr != "copy" or node.args:
                out.append(f"{where}: .{node.func.attr}(...)")
        elif isinstance(node, ast.ImportFrom) and node.module == "psycopg" and \
                any(a.name == "sql" for a in node.names):
            out.append(f"{where}: psycopg.sql composes SQL")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs \
                and SQL_TEXT.search(node.value):
            out.append(f"{where}: SQL text {node.value[:60]!r}")
    return out


def sql_outside_store(root: Path, homes: tuple[str, ...] = SQL_HOMES) -> list[str]:
    out = []
    for name, path in modules(root).items():
        if not any(name == h or name.startswith(h + ".") for h in homes):
            out += sql_in(path, root)
    return out


def script_problems(root: Path, folder: str = "benchmark") -> list[str]:
    """The scripts under `folder` import harmonia as an installed package: no sys.path edits, every
    `from harmonia.x import y` names something that exists, any other import is installed or a file beside the
    script; and they hold no SQL (it belongs in harmonia/store/)."""
    import importlib
    import importlib.util

    def found(module: str) -> bool:
        try:
            return importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):  # a parent is missing or is not a package
            return False

    out = []
    scripts = sorted((root / folder).glob("*.py"))
    siblings = {p.stem for p in scripts}
    for path in scripts:
        where = path.relative_to(root)
        out += sql_in(path, root)
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Attribute) and node.attr == "path" and isinstance(node.value, ast.Name) \
                    and node.value.id == "sys":
                out.append(f"{where}:{node.lineno}: touches sys.path")
            elif isinstance(node, ast.Import):
                out += [f"{where}:{node.lineno}: cannot import {a.name}" for a in node.names
                        if a.name.split(".")[0] not in siblings and not found(a.name)]
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                if node.module.split(".")[0] in siblings:
                    continue
                if not found(node.module):
                    out.append(f"{where}:{node.lineno}: cannot import {node.module}")
                elif node.module.split(".")[0] == "harmonia":
                    module = importlib.import_module(node.module)
                    out += [f"{where}:{node.lineno}: {node.module} has no {a.name}" for a in node.names
                            if not hasattr(module, a.name) and not found(f"{node.module}.{a.name}")]
    return out


# ------------------------------------------------------------------------------------------------ the code


def test_no_import_cycle_among_harmonia_modules() -> None:
    edges, _ = graph(REPO)
    assert len(edges) > 50  # the checker sees the package
    assert cycles(edges) == []


def test_no_module_imports_from_a_layer_above_its_own() -> None:
    assert upward_imports(REPO) == []


def test_every_module_has_a_layer() -> None:
    for name in modules(REPO):
        layer_of(name)


def test_sql_lives_only_in_the_store() -> None:
    assert sql_outside_store(REPO) == []
    assert any(sql_outside_store(REPO, homes=()))  # the checker does see the store's SQL


def test_benchmark_scripts_import_the_package_without_sys_path_edits_and_hold_no_sql() -> None:
    assert script_problems(REPO) == []


# ------------------------------------------------------------------------------------------------ the checkers fail


def _package(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


@pytest.fixture
def bad_tree(tmp_path: Path) -> Path:
    """A package that breaks every rule: a cycle through a function-level import, a bottom module importing the
    top one under TYPE_CHECKING, SQL in the pipeline."""
    return _package(tmp_path, {
        "harmonia/__init__.py": "",
        "harmonia/domain.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from harmonia.cli import app\n",
        "harmonia/store/__init__.py": "",
        "harmonia/store/queue.py": "def f(conn):\n    return conn.execute('SELECT 1 FROM x')\n",
        "harmonia/pipeline/__init__.py": "",
        "harmonia/pipeline/run.py": "from harmonia.pipeline import worker\n",
        "harmonia/pipeline/worker.py": (
            "def g(conn):\n    from harmonia.pipeline.run import x\n"
            "    q = 'UPDATE harmonia.source_queue SET state = 1'\n    return conn.execute(q)\n"),
        "harmonia/cli/__init__.py": "from .app import app\n",
        "harmonia/cli/app.py": "from ..store import queue\napp = 1\n",
    })


def test_the_checkers_catch_a_cycle_an_upward_import_and_sql_outside_the_store(bad_tree: Path) -> None:
    edges, _ = graph(bad_tree)
    assert cycles(edges) == [["harmonia.pipeline.run", "harmonia.pipeline.worker"]]
    assert "harmonia.store.queue" in edges["harmonia.cli.app"]  # relative imports resolve
    assert upward_imports(bad_tree) == ["harmonia.domain (line 3) imports harmonia.cli.app, a layer above it"]
    found = sql_outside_store(bad_tree)
    assert len(found) == 2 and all("pipeline/worker.py" in f for f in found)
    assert not any("store/queue.py" in f for f in found)


def test_the_script_checker_catches_sys_path_edits_missing_names_and_sql(tmp_path: Path) -> None:
    _package(tmp_path, {
        "benchmark/_helper.py": "X = 1\n",
        "benchmark/bad.py": (
            "import sys\nsys.path.insert(0, '.')\nfrom _helper import X\nfrom harmonia.config import NoSuchThing\n"
            "from harmonia.nowhere import y\n\ndef f(conn):\n    return conn.execute('SELECT 1 FROM t')\n"),
        "benchmark/good.py": "from _helper import X\nfrom harmonia.store import server\nfrom harmonia import config\n",
    })
    found = script_problems(tmp_path)
    assert sorted(f.split(": ", 1)[1] for f in found) == [
        ".execute(...)", "SQL text 'SELECT 1 FROM t'", "cannot import harmonia.nowhere",
        "harmonia.config has no NoSuchThing", "touches sys.path"], found
    assert all(f.startswith("benchmark/bad.py:") for f in found)


# ------------------------------------------------------------------------------------------------ suppressions

SUPPRESSION = re.compile(r"#\s*(noqa(?::\s*[A-Z]+[0-9]+(?:\s*,\s*[A-Z]+[0-9]+)*)?"
                         r"|type:\s*ignore(?:\[[\w\-, ]+\])?)(.*)$")


def unexplained_suppressions(root: Path, folders: tuple[str, ...] = ("harmonia", "benchmark", "scripts", "tests")
                             ) -> list[str]:
    """`# noqa` and `# type: ignore` lines that do not say why: a reason after the directive on the same line
    (`# noqa: BLE001 - why`, `# type: ignore[x]  # why`) or a comment on the line above."""
    out = []
    for folder in folders:
        for path in sorted((root / folder).rglob("*.py")):
            lines = path.read_text().splitlines()
            for i, line in enumerate(lines):
                m = SUPPRESSION.search(line)
                if m is None or "SUPPRESSION" in line:
                    continue
                reason = m.group(2).strip().lstrip("-#—: ").strip()
                above = lines[i - 1].strip() if i else ""
                if not reason and not above.startswith("#"):
                    out.append(f"{path.relative_to(root)}:{i + 1}: {line.strip()}")
    return out


def test_every_noqa_and_type_ignore_says_why() -> None:
    assert unexplained_suppressions(REPO) == []


def test_the_suppression_checker_sees_a_bare_one(tmp_path: Path) -> None:
    _package(tmp_path, {"harmonia/a.py": (
        "x = 1  # type: ignore[assignment]\n"
        "y = 2  # type: ignore[assignment]  # the stub is wrong\n"
        "# a reason above\nz = 3  # noqa: E501\n"
        "w = 4  # noqa: BLE001 - why\n"
        "v = 5  # noqa\n")})
    assert unexplained_suppressions(tmp_path, ("harmonia",)) == [
        "harmonia/a.py:1: x = 1  # type: ignore[assignment]", "harmonia/a.py:6: v = 5  # noqa"]
