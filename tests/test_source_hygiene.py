"""Checks over the repository's own Python sources (no import of them, so they run anywhere)."""

from __future__ import annotations

import ast
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Files other engineers are rewriting while this check lands; each still speaks of a numbered work session.
# The lead empties this after merging their branches (then the check covers every file).
SESSION_N = re.compile(r"\bsessions?[ -]?\d", re.IGNORECASE)
SESSION_N_SUFFIXES = {".py", ".cu", ".cuh", ".h", ".cpp", ".sh"}


def _tracked_files() -> list[str]:
    """The repository's files as git sees them (tracked and untracked-not-ignored), or a walk without git."""
    try:
        out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                             capture_output=True, text=True, check=True).stdout
        return [f for f in out.splitlines() if (ROOT / f).is_file()]
    except (OSError, subprocess.CalledProcessError):
        return [str(p.relative_to(ROOT)) for p in ROOT.rglob("*") if p.is_file() and ".git" not in p.parts]


def test_no_module_defines_a_top_level_name_twice():
    """A second top-level `def f` silently replaces the first (bench_ep once had two rank_inputs, and the
    emulated benchmark called the distributed one's signature, failing only on the GPU)."""
    root = ROOT
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
    or the kernels it builds for timing are debug builds (a warm-up once built FlashInfer's router so)."""
    root = ROOT
    scripts = [p for d in ("benchmarks", "moekern", "analysis", "tools") for p in (root / d).rglob("*")
               if p.suffix in {".sh", ".py"} and p.is_file()]
    offenders = [str(p.relative_to(root)) for p in scripts
                 if "FLASHINFER_JIT_VERBOSE=1" in (text := p.read_text(errors="replace"))
                 and "FLASHINFER_JIT_DEBUG=0" not in text]
    assert not offenders, f"verbose FlashInfer JIT without FLASHINFER_JIT_DEBUG=0 (a debug build): {offenders}"


def session_n_offenders(files: list[str], read) -> list[str]:
    """`path:line: text` for every line that names a numbered work session (the word, optionally plural,
    then a space or hyphen and a digit) in code, device code, scripts or a README outside benchmarks/results
    (dated results folders are where history belongs)."""
    hits = []
    for f in files:
        name = Path(f).name
        if f.startswith("benchmarks/results/"):
            continue
        if Path(f).suffix not in SESSION_N_SUFFIXES and name != "README.md":
            continue
        for i, line in enumerate(read(f).splitlines(), 1):
            if SESSION_N.search(line):
                hits.append(f"{f}:{i}: {line.strip()[:120]}")
    return hits


def test_session_n_check_catches_what_it_should():
    s = "sess" + "ion"  # spelled apart so this file does not trip its own check
    texts = {"a.py": f"x = 1  # {s} 4 found this", "csrc/k.cu": f"// {s.title()}-9: slow",
             "README.md": f"{s}s 9 and 10", "sub/README.md": "fine", "b.py": f"a device {s} (> 15 min)",
             "notes.txt": f"{s} 3", "benchmarks/results/x/README.md": f"{s} 5",
             "moekern/e2e/run_e2e.py": f"{s} 8", "tools/gpu/gpu_session.sh": f"{s} 6",
             "t.sh": "# gpu_session.sh 4 stages"}
    got = session_n_offenders(list(texts), texts.__getitem__)
    assert [h.split(":")[0] for h in got] == ["a.py", "csrc/k.cu", "README.md", "moekern/e2e/run_e2e.py",
                                              "tools/gpu/gpu_session.sh"]


def test_no_numbered_work_sessions_in_code_or_readmes():
    """Code and docs state what holds and why; "session N found ..." is a lab diary (dated results READMEs
    and benchmarks/results/INDEX.md keep the history)."""
    hits = session_n_offenders(_tracked_files(), lambda f: (ROOT / f).read_text(errors="replace"))
    assert not hits, "numbered work sessions named outside benchmarks/results:\n" + "\n".join(hits)
