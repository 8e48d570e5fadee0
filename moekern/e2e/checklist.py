"""A list of named checks, each passing, failing or skipped with one line of detail: what the preflight runs.
Pure Python; tested on CPU."""

from __future__ import annotations

import importlib
import inspect
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path


class Skip(Exception):
    """Raised by a check that cannot run here; the message says why."""


@dataclass
class Result:
    name: str
    status: str  # "PASS" | "FAIL" | "SKIP"
    detail: str = ""
    seconds: float = 0.0

    def line(self) -> str:
        return f"{self.status} {self.name}: {self.detail}" if self.detail else f"{self.status} {self.name}"


def collector(checks: list):
    """`add(name)`: a decorator appending (name, fn) to `checks`."""
    def add(name: str):
        def deco(fn):
            checks.append((name, fn))
            return fn
        return deco
    return add


def check_signature(fn, positional: list[str], keyword_only: list[str] = (), label: str | None = None) -> str:
    """Assert fn's parameters start with `positional` (positional-or-keyword, in order) and include the
    `keyword_only` names as keyword-only. Raises AssertionError naming expected and got."""
    label = label or getattr(fn, "__qualname__", repr(fn))
    params = list(inspect.signature(fn).parameters.values())
    pos = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    kwo = {p.name for p in params if p.kind == p.KEYWORD_ONLY}
    var_kw = any(p.kind == p.VAR_KEYWORD for p in params)
    if pos[: len(positional)] != list(positional):
        raise AssertionError(f"{label}: expected positional parameters {list(positional)}, got {pos}")
    missing = [k for k in keyword_only if k not in kwo and not var_kw]
    if missing:
        raise AssertionError(f"{label}: expected keyword-only {missing}, got keyword-only {sorted(kwo)}")
    return f"{label}{inspect.signature(fn)}"


def resolve(module_name: str, dotted: str):
    """importlib.import_module(module_name) then getattr along `dotted`; AssertionError names what is missing."""
    obj = importlib.import_module(module_name)
    for part in dotted.split(".") if dotted else ():
        if not hasattr(obj, part):
            raise AssertionError(f"{module_name}:{dotted}: no attribute {part!r} on {obj!r}")
        obj = getattr(obj, part)
    return obj


def source_has(obj, *needles: str) -> None:
    src = inspect.getsource(obj)
    missing = [n for n in needles if n not in src]
    if missing:
        raise AssertionError(f"{getattr(obj, '__qualname__', obj)} source lacks {missing}")


def run_checks(checks, stop_if_failed: dict | None = None) -> list[Result]:
    """Run (name, fn) checks in order; fn returns a detail string, raises Skip (SKIP) or anything else (FAIL).
    stop_if_failed maps a check name to a reason: when that check fails, later checks are skipped with it."""
    results, blocked = [], None
    for name, fn in checks:
        if blocked:
            results.append(Result(name, "SKIP", blocked))
            continue
        t0 = time.perf_counter()
        try:
            detail = fn() or ""
            status = "PASS"
        except Skip as exc:
            status, detail = "SKIP", str(exc)
        except Exception as exc:  # the report is the product: keep going, name the failure
            status = "FAIL"
            detail = f"{type(exc).__name__}: {exc}".strip()
            tb = traceback.extract_tb(exc.__traceback__)
            if tb and not isinstance(exc, AssertionError):
                detail += f" (at {Path(tb[-1].filename).name}:{tb[-1].lineno})"
        results.append(Result(name, status, " ".join(str(detail).split())[:600], time.perf_counter() - t0))
        if status == "FAIL" and stop_if_failed and name in stop_if_failed:
            blocked = stop_if_failed[name]
    return results


def report(results: list[Result], out=None) -> int:
    """Print the PASS/FAIL/SKIP list and a summary line; return the exit code (1 on any FAIL)."""
    out = out or sys.stdout
    for r in results:
        print(r.line(), file=out)
    n = {s: sum(r.status == s for r in results) for s in ("PASS", "FAIL", "SKIP")}
    print(f"preflight: {n['PASS']} pass, {n['FAIL']} fail, {n['SKIP']} skip", file=out)
    return 1 if n["FAIL"] else 0


def failures(text: str) -> list[str]:
    """The FAIL lines of a preflight output."""
    return [line for line in text.splitlines() if line.startswith("FAIL ")]
