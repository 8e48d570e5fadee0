"""Running a sweep (`moekern sweep SPEC.yaml`): the points of moekern.analysis.study.sweep's plan whose result is
missing, one subprocess each, within an optional time budget; the spec, the plan and the result annotation are
in sweep.py. A point whose run fails is recorded in sweep_status.jsonl and retried on the next invocation.
"""

from __future__ import annotations

import json
import math
import shlex
import subprocess
import sys
import time

from moekern.analysis.study.sweep import BUDGET_LEFT, SweepPoint, SweepSpec, _annotate, ensure_datasets, plan
from moekern.errors import UsageError


def select_points(points: list[SweepPoint], spec: SweepSpec, only: dict | None) -> list[SweepPoint]:
    """The points whose params match `only` ({grid key: [values, as strings]}); UsageError for a key that
    is no grid key or a value the grid does not have."""
    if not only:
        return points
    for key, vals in only.items():
        if key not in spec.grid:
            raise UsageError(f"--only {key}=...: {key!r} is no grid key; the grid has {list(spec.grid)}")
        have = {str(v) for v in spec.grid[key]}
        bad = [v for v in vals if v not in have]
        if bad:
            raise UsageError(f"--only {key}={','.join(vals)}: {bad[0]!r} is not among {sorted(have)}")
    return [p for p in points if all(str(p.params[k]) in vals for k, vals in only.items())]


def parse_only(items) -> dict:
    """`--only KEY=V1,V2` items -> {KEY: [V1, V2]}; UsageError for a malformed item."""
    out: dict = {}
    for item in items or []:
        key, eq, vals = str(item).partition("=")
        values = [v.strip() for v in vals.split(",") if v.strip()]
        if not eq or not key.strip() or not values:
            raise UsageError(f"--only {item!r} must be KEY=V1[,V2...]")
        out.setdefault(key.strip(), []).extend(values)
    return out


def _with_budget(cmd: list[str], left_s: float | None, timeout_s) -> list[str]:
    fill = str(int(left_s)) if left_s is not None else str(int(timeout_s or 86400))
    return [a.replace(BUDGET_LEFT, fill) for a in cmd]


def run_point(cmd: list[str], log, cwd, timeout: float | None, grace_s: float = 60.0) -> int:
    """Run one point's command (output to the open file `log`); past `timeout`, SIGTERM it and allow `grace_s`
    for it to stop what it started (moekern e2e stops its servers on SIGTERM) before SIGKILL, then raise
    subprocess.TimeoutExpired. Returns the exit code."""
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=cwd)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.terminate()
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        raise


def run_sweep(spec: SweepSpec, dry_run: bool = False, progress: bool = True, out=None, budget_s: float | None = None,
              only: dict | None = None) -> dict:
    """Run the points whose result is missing (those matching `only`), starting none with less than
    spec.min_point_s of `budget_s` left. Returns {"planned", "skipped", "ran", "failed", "left"}."""
    out = out or sys.stdout
    if budget_s is not None and not budget_s > 0:
        raise UsageError(f"budget_s={budget_s} must be > 0")
    t_start = time.time()
    ensure_datasets(spec)
    points = select_points(plan(spec), spec, only)
    todo = [p for p in points if not p.done]
    summary = {"planned": len(points), "skipped": len(points) - len(todo), "ran": 0, "failed": 0, "left": 0}
    if dry_run:
        print(f"sweep {spec.name!r}: {len(points)} points, {summary['skipped']} done (skipped), "
              f"{len(todo)} to run; results -> {spec.out_dir / 'runs'}", file=out)
        for p in points:
            extra = f" ({len(p.expected)} benches on one server)" if p.expected else ""
            print(f"[{'done' if p.done else 'todo'}] {p.run_id}{extra}: "
                  f"{shlex.join(_with_budget(p.command, budget_s, spec.timeout_s))}", file=out)
        return summary
    for sub in ("runs", "logs", "gate_logs"):
        (spec.out_dir / sub).mkdir(parents=True, exist_ok=True)
    bar = None
    if progress:
        try:
            from tqdm import tqdm

            bar = tqdm(total=len(points), initial=summary["skipped"], desc=f"sweep {spec.name}", unit="run")
        except ImportError:
            bar = None
    status_path = spec.out_dir / "sweep_status.jsonl"
    for i, p in enumerate(todo):
        left = None if budget_s is None else budget_s - (time.time() - t_start)
        if left is not None and left < spec.min_point_s:
            summary["left"] = len(todo) - i
            print(f"sweep {spec.name!r}: {left:.0f} s of the {budget_s:.0f} s budget left, under min_point_s "
                  f"{spec.min_point_s:.0f}: stopping; {summary['left']} point(s) left for the next invocation",
                  file=out)
            break
        p.gate_log_dir.mkdir(parents=True, exist_ok=True)
        run_dir = spec.out_dir / "work" / p.run_id
        run_dir.mkdir(parents=True, exist_ok=True)
        t0 = time.time()
        log = spec.out_dir / "logs" / f"{p.run_id}.log"
        # the runner stops itself by {budget_left_s}; this timeout only catches a hung one
        timeout = spec.timeout_s if left is None else min(spec.timeout_s or math.inf, left + 120.0)
        if bar is None:  # no tqdm bar (--no-progress, or a log file): one line per point
            print(f"sweep {spec.name!r}: [{summary['skipped'] + i + 1}/{len(points)}] {p.run_id}"
                  + (f" ({left:.0f} s of budget left)" if left is not None else ""), file=out, flush=True)
        try:
            with open(log, "w", encoding="utf-8") as fh:
                rc = run_point(_with_budget(p.command, left, spec.timeout_s), fh, spec.base_dir,
                               None if timeout == math.inf else timeout)
            reason = "" if rc == 0 else f"exit code {rc}"
        except subprocess.TimeoutExpired:
            rc, reason = -1, f"timed out after {timeout:.0f} s"
        except OSError as exc:
            rc, reason = -1, f"could not start: {exc}"
        if p.expected:
            have = [f for f in p.expected if f.exists()]
            ok = rc == 0 and len(have) == len(p.expected)
            if not ok and not reason:
                reason = f"{len(p.expected) - len(have)} of {len(p.expected)} bench results missing"
            for f in have:  # finished benches stay: the runner skips them on the next invocation
                _annotate(p, spec, f)
            summary["ran" if ok else "failed"] += 1
            with open(status_path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps({"run_id": p.run_id, "ok": ok, "reason": reason, "seconds": time.time() - t0,
                                     "log": str(log), "benches": len(have), "expected": len(p.expected)}) + "\n")
            if bar is not None:
                bar.update(1)
            continue
        if rc == 0 and spec.collect and not p.result.exists():
            hits = sorted(run_dir.glob(spec.collect))
            if hits:
                p.result.write_bytes(hits[0].read_bytes())
        ok = rc == 0 and p.result.exists()
        if rc == 0 and not p.result.exists():
            reason = f"exit code 0 but no result file {p.result}"
        if ok:
            _annotate(p, spec)
            summary["ran"] += 1
        else:
            summary["failed"] += 1
            if p.result.exists():  # a partial result must not make the next invocation skip this point
                p.result.rename(p.result.with_suffix(".failed.json"))
        with open(status_path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"run_id": p.run_id, "ok": ok, "reason": reason, "seconds": time.time() - t0,
                                 "log": str(log)}) + "\n")
        if bar is not None:
            bar.update(1)
            bar.set_postfix(failed=summary["failed"])
    if bar is not None:
        bar.close()
    return summary
