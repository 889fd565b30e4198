"""The layering of the repository, checked on the source: every import of ``popri``, ``server``, ``client``,
``benchmark`` and ``deploy`` (module level, inside functions, relative, and ``__import__`` / ``import_module`` calls)
must run the right way.

The rules (DESIGN.md, "Architecture"):

- the core ``popri.*`` imports nothing from ``flwr``, ``server``, ``client``, ``benchmark`` or ``deploy``; the
  CLI modules (``popri.cli``, ``popri.cli.*``) may import anything, but only inside a function (lazily), so that
  importing them stays cheap;
- nothing imports ``popri.cli`` back (it is an entry point, not a library);
- ``server`` and ``client`` import ``popri`` and ``flwr``, never ``benchmark`` or ``deploy``, and not each other,
  except the edges in :data:`ALLOWED_SERVER_TO_CLIENT`;
- ``benchmark`` may import ``popri``, ``server`` and ``client`` (and ``flwr``), never ``deploy``;
- ``deploy`` imports ``popri`` (its config) only: never ``benchmark``, ``server``, ``client`` or ``flwr`` (it runs
  Flower's command lines as processes).

Run with ``-s`` to print the edge counts per package pair.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("popri", "server", "client", "benchmark", "deploy")
CLI = "popri.cli"
FLOWER = "flwr"
NON_LITERAL = "<non-literal>"  # a dynamic import whose module name is computed: this test cannot follow it
# `popri run` launches Flower's simulation of both apps, so the simulation module builds the ClientApp too.
ALLOWED_SERVER_TO_CLIENT = frozenset({("server.simulation", "client.app")})


@dataclass(frozen=True)
class ImportEdge:
    """One import statement (or dynamic import call): ``source`` imports ``target`` at ``path:line``."""

    source: str
    target: str
    path: str  # relative to the scanned root
    line: int
    lazy: bool  # inside a function body (runs only when the function is called)

    def __str__(self) -> str:
        where = " (inside a function)" if self.lazy else ""
        return f"{self.path}:{self.line}: {self.source} -> {self.target}{where}"


def module_name(path: Path, root: Path) -> str:
    """``popri/config.py`` -> ``popri.config``; ``deploy/__init__.py`` -> ``deploy``."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


class _ImportCollector(ast.NodeVisitor):
    """Every import of one module, with its line and whether it sits inside a function."""

    def __init__(self, module: str, is_package: bool, path: str, known_modules: frozenset[str]) -> None:
        self.module, self.path, self.known = module, path, known_modules
        self.package_parts = module.split(".") if is_package else module.split(".")[:-1]
        self.depth = 0
        self.edges: list[ImportEdge] = []

    def _add(self, target: str, node: ast.AST) -> None:
        line = getattr(node, "lineno", 0)
        self.edges.append(ImportEdge(self.module, target, self.path, line, self.depth > 0))

    def _nested(self, node: ast.AST) -> None:
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _nested

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(alias.name, node)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level:  # relative: ``from . import x`` / ``from ..a import b``
            keep = len(self.package_parts) - (node.level - 1)
            base = ".".join([*self.package_parts[: max(keep, 0)], *([node.module] if node.module else [])])
        else:
            base = node.module or ""
        targets = []  # one edge per imported module, however many names come from it
        for alias in node.names:
            submodule = f"{base}.{alias.name}"
            target = submodule if submodule in self.known else base  # ``from popri import cli`` -> popri.cli
            if target not in targets:
                targets.append(target)
        for target in targets:
            self._add(target, node)

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
        if name in ("__import__", "import_module") and node.args:
            first = node.args[0]
            literal = isinstance(first, ast.Constant) and isinstance(first.value, str)
            self._add(str(first.value) if literal else NON_LITERAL, node)  # type: ignore[attr-defined]
        self.generic_visit(node)


def collect_imports(root: Path, packages: Iterable[str] = PACKAGES) -> list[ImportEdge]:
    """Parse every module of ``packages`` under ``root`` and return all their import edges."""
    files = sorted(p for package in packages for p in (root / package).rglob("*.py") if "__pycache__" not in p.parts)
    known = frozenset(module_name(p, root) for p in files)
    edges: list[ImportEdge] = []
    for path in files:
        rel = path.relative_to(root).as_posix()
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=rel)
        collector = _ImportCollector(module_name(path, root), path.name == "__init__.py", rel, known)
        collector.visit(tree)
        edges += collector.edges
    return edges


def layer(module: str) -> str:
    """The package a module belongs to for the rules: ``popri.cli`` is a layer of its own."""
    if module == NON_LITERAL:
        return NON_LITERAL
    if module == CLI or module.startswith(CLI + "."):
        return CLI
    top = module.split(".")[0]
    return top if top in (*PACKAGES, FLOWER) else "other"  # "other": the standard library, other third parties


def broken_rule(edge: ImportEdge) -> str | None:
    """The rule ``edge`` breaks, or None when it runs the right way."""
    source, target = layer(edge.source), layer(edge.target)
    upper = {FLOWER, "server", "client", "benchmark", "deploy"}
    if target == NON_LITERAL and source != CLI:
        return "a dynamic import outside the CLI must name its module literally (this test cannot follow it)"
    if target == CLI and source != CLI:
        return "nothing imports popri.cli back: move what you need into a core module"
    if source == "popri" and target in upper:
        return "the core popri.* imports no flwr, server, client, benchmark or deploy"
    if source == CLI and target in upper and not edge.lazy:
        return "the CLI imports flwr/server/client/benchmark/deploy only inside a function (lazily)"
    if source in ("server", "client"):
        other = "client" if source == "server" else "server"
        if target in ("benchmark", "deploy"):
            return f"{source} imports popri and flwr, never {target}"
        if target == other and (edge.source, edge.target) not in ALLOWED_SERVER_TO_CLIENT:
            return f"{source} does not import {other} (allowed: {sorted(ALLOWED_SERVER_TO_CLIENT)})"
    if source == "benchmark" and target == "deploy":
        return "benchmark imports popri, server and client, never deploy"
    if source == "deploy" and target in {"benchmark", "server", "client", FLOWER}:
        return "deploy imports popri (config) only: never benchmark, server, client or flwr"
    return None


def violations(edges: Iterable[ImportEdge]) -> list[str]:
    return [f"{edge}   [{rule}]" for edge in edges if (rule := broken_rule(edge)) is not None]


def edge_summary(edges: Iterable[ImportEdge]) -> str:
    """Counts per (source package -> target package), first-party and Flower targets only."""
    counts: Counter[tuple[str, str]] = Counter()
    lazy: Counter[tuple[str, str]] = Counter()
    for edge in edges:
        pair = (layer(edge.source), layer(edge.target))
        if pair[1] == "other":
            continue
        counts[pair] += 1
        lazy[pair] += edge.lazy
    lines = ["import edges per package pair (source -> target: count, of which inside functions):"]
    lines += [f"  {s} -> {t}: {n} ({lazy[(s, t)]} lazy)" for (s, t), n in sorted(counts.items())]
    return "\n".join(lines)


def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


# -- the repository ----------------------------------------------------------------------------------------------


def test_no_import_runs_against_the_layering() -> None:
    # Prepare
    edges = collect_imports(ROOT)
    print("\n" + edge_summary(edges))

    # Execute
    found = violations(edges)

    # Assert
    assert {layer(e.source) for e in edges} >= set(PACKAGES), "a package was not scanned"
    assert not found, f"{len(found)} import(s) run the wrong way (file:line: module -> import):\n" + "\n".join(found)


def test_every_allowed_server_to_client_edge_is_still_in_the_code() -> None:
    # Prepare / Execute
    present = {(e.source, e.target) for e in collect_imports(ROOT, ("server",))}

    # Assert: an allowance nobody needs any more must go, so it cannot hide a new edge
    unused = ALLOWED_SERVER_TO_CLIENT - present
    assert not unused, f"remove {sorted(unused)} from ALLOWED_SERVER_TO_CLIENT in tests/test_layering.py"


@pytest.mark.parametrize("module", ["popri.config", "popri.logs", "popri.cli", "deploy", "deploy.cli"])
def test_importing_a_light_module_pulls_neither_torch_nor_flower(module: str) -> None:
    # Prepare: a fresh interpreter in the checkout, so this checkout's packages are the ones imported
    code = (
        "import importlib, json, sys; m = importlib.import_module(sys.argv[1]); "
        "print(json.dumps({'file': m.__file__, 'heavy': sorted({k.split('.')[0] for k in sys.modules} & "
        "{'torch', 'flwr'})}))"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}

    # Execute
    proc = subprocess.run(
        [sys.executable, "-c", code, module], cwd=ROOT, env=env, capture_output=True, text=True, check=False
    )

    # Assert
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert Path(result["file"]).resolve().is_relative_to(ROOT)
    assert result["heavy"] == [], f"`import {module}` imported {result['heavy']}: move those imports into functions"


# -- the checker itself, on small trees ----------------------------------------------------------------------------


def test_collector_finds_imports_inside_functions_relative_ones_and_literal_dynamic_ones(tmp_path: Path) -> None:
    # Prepare
    _write(
        tmp_path,
        {
            "popri/__init__.py": "",
            "popri/cli.py": "",
            "popri/core.py": (
                "import json\n"
                "from . import cli\n"
                "from .cli import main\n"
                "def load():\n"
                "    from flwr.app import Message\n"
                "    return __import__('benchmark.run')\n"
                "x = lambda: __import__(name)\n"
            ),
        },
    )

    # Execute
    edges = collect_imports(tmp_path, ("popri",))

    # Assert
    found = {(e.target, e.path, e.line, e.lazy) for e in edges if e.source == "popri.core"}
    assert found == {
        ("json", "popri/core.py", 1, False),
        ("popri.cli", "popri/core.py", 2, False),
        ("popri.cli", "popri/core.py", 3, False),
        ("flwr.app", "popri/core.py", 5, True),
        ("benchmark.run", "popri/core.py", 6, True),
        (NON_LITERAL, "popri/core.py", 7, True),
    }


def test_each_wrong_way_import_is_reported_with_its_file_line_and_rule(tmp_path: Path) -> None:
    # Prepare: one module per rule, plus the imports the rules allow
    _write(
        tmp_path,
        {
            "popri/__init__.py": "",
            "popri/core.py": "def f():\n    import flwr\n",
            "popri/cli.py": "import server.app\ndef main():\n    import benchmark.run\n",
            "server/__init__.py": "",
            "server/app.py": "import flwr\nimport popri.core\nfrom client import app\n",
            "server/simulation.py": "def run():\n    from client.app import make\n",
            "client/__init__.py": "",
            "client/app.py": "import popri.cli\n",
            "benchmark/__init__.py": "",
            "benchmark/run.py": "import server.app\nimport client.app\nimport deploy.cli\n",
            "deploy/__init__.py": "",
            "deploy/cli.py": "from popri.core import f\nimport flwr\n",
        },
    )

    # Execute
    found = violations(collect_imports(tmp_path))

    # Assert: exactly the wrong-way edges, each named by file, line, modules and rule
    assert [line.split("   [")[0] for line in found] == [
        "benchmark/run.py:3: benchmark.run -> deploy.cli",
        "client/app.py:1: client.app -> popri.cli",
        "deploy/cli.py:2: deploy.cli -> flwr",
        "popri/cli.py:1: popri.cli -> server.app",
        "popri/core.py:2: popri.core -> flwr (inside a function)",
        "server/app.py:3: server.app -> client.app",
    ]
    assert all(line.endswith("]") and "   [" in line for line in found)
