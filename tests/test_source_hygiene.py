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


def test_flashinfer_verbose_builds_stay_optimized():
    """FlashInfer 0.6.14 reads FLASHINFER_JIT_VERBOSE=1 as a debug build (-O0 --device-debug) unless
    FLASHINFER_JIT_DEBUG is set: every repo script asking for verbose JIT logs must pin FLASHINFER_JIT_DEBUG=0,
    or the kernels it builds for timing are debug builds (session 6's warm-up built FlashInfer's router so)."""
    root = Path(__file__).resolve().parents[1]
    scripts = [p for d in ("benchmarks", "moekern", "analysis") for p in (root / d).rglob("*")
               if p.suffix in {".sh", ".py"} and p.is_file()]
    offenders = [str(p.relative_to(root)) for p in scripts
                 if "FLASHINFER_JIT_VERBOSE=1" in (text := p.read_text(errors="replace"))
                 and "FLASHINFER_JIT_DEBUG=0" not in text]
    assert not offenders, f"verbose FlashInfer JIT without FLASHINFER_JIT_DEBUG=0 (a debug build): {offenders}"
