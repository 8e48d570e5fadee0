"""Checks over the repository's own Python sources (no import of them, so they run anywhere)."""

from __future__ import annotations

import ast
from pathlib import Path


def test_no_module_defines_a_top_level_name_twice():
    """A second top-level `def f` silently replaces the first (bench_ep once had two rank_inputs, and the
    emulated benchmark called the distributed one's signature, failing only on the GPU)."""
    root = Path(__file__).resolve().parents[1]
    clashes = []
    for folder in ("moekern", "benchmarks", "analysis", "tests", ".ci"):
        for path in sorted((root / folder).rglob("*.py")):
            seen: dict[str, int] = {}
            for node in ast.parse(path.read_text(), filename=str(path)).body:
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    if node.name in seen:
                        clashes.append(f"{path.relative_to(root)}:{node.lineno} {node.name} (first at line "
                                       f"{seen[node.name]})")
                    seen.setdefault(node.name, node.lineno)
    assert not clashes, "top-level names defined twice:\n" + "\n".join(clashes)
