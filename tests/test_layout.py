"""The package's plan: the core never reaches up into `compressor.export`, which builds on it."""

from __future__ import annotations

import ast
from pathlib import Path

import compressor

PACKAGE = Path(compressor.__file__).parent
# Above both: the entry points, which run the job and its exports, and the helpers for tests and
# benchmarks, which exercise them.
TOP = {"__init__.py", "__main__.py", "cli.py", "pipeline.py", "testing.py"}


def imported(source: str, package: str = "compressor") -> list[str]:
    """Absolute names of the compressor modules and names `source` imports (relative imports resolved
    as from a module of `package`), including imports inside functions."""
    names = []
    parts = package.split(".")
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            base = parts[: len(parts) - node.level + 1] if node.level else []
            module = ".".join([*base, *(node.module.split(".") if node.module else [])])
            names += [module] + [f"{module}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
    return [n for n in names if n.startswith("compressor")]


def test_core_modules_do_not_import_export():
    core = [p for p in PACKAGE.glob("*.py") if p.name not in TOP]
    assert len(core) > 10  # the glob found the package's modules
    upward = {p.name: [n for n in imported(p.read_text(encoding="utf-8")) if n.startswith("compressor.export")]
              for p in core}
    assert {name: found for name, found in upward.items() if found} == {}


def test_the_check_resolves_relative_imports_at_any_depth():
    source = "def f():\n    from .export.graph import export_decoder\n    from ..folder import ONNX_NAME\n"
    assert "compressor.export.graph.export_decoder" in imported(source)
    assert "compressor.folder.ONNX_NAME" in imported(source, "compressor.export")
