"""The bench process of one server's grid: `python -m moekern.e2e.grid_child SPEC` (grid.run_serve_grid_arm
starts it with the server's log descriptor passed in, so its markers land between the server's lines)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from moekern.e2e.warmup import GRID_POINT_END, GRID_POINT_START


def child_bench_grid(spec_path: str, bench=None, switch=None) -> int:
    """The bench process of one server's grid (spec: points [{name, argv, skew?}], marker_fd, deadline, progress,
    in_process, rpc_url). Per point: a start marker into the server log, the bench, an end marker, one progress
    line {name, start, end, rc, error[, skew]}. A point whose `skew` differs from the one in force is preceded by
    a switch (`switch(rpc_url, skew) -> the workers' description`, default switch_skew: gate log paused, skew
    re-drawn, gate log resumed); a failed switch fails that point, and the next point tries again. A point that
    would end after `deadline` (now + its estimate) and all after it are recorded as skipped. `bench(argv) -> rc`
    replaces the real bench (tests). Exit 3: in-process requested but vLLM's bench could not be imported
    (nothing ran; the parent falls back to subprocesses)."""
    spec = json.loads(Path(spec_path).read_text())
    if bench is None:
        bench = bench_in_process() if spec.get("in_process", True) else bench_subprocess
        if bench is None:
            return 3
    switch = switch or switch_skew
    in_force = None
    skew_now = None  # the server starts with the first skew, but it is switched to explicitly: checked early
    fd = spec.get("marker_fd")

    def mark(text: str) -> None:
        if fd is not None:
            os.write(fd, f"\n{text}\n".encode())

    with open(spec["progress"], "a", encoding="utf-8") as prog:
        for i, pt in enumerate(spec["points"]):
            if time.time() + pt.get("estimate_s", 0.0) > spec["deadline"]:
                for rest in spec["points"][i:]:
                    skipped = {"name": rest["name"], "skipped": "time budget: would end after the deadline"}
                    prog.write(json.dumps(skipped) + "\n")
                break
            row = {}
            if pt.get("skew") is not None and pt["skew"] != skew_now:
                t0 = time.time()
                try:
                    in_force = switch(spec["rpc_url"], pt["skew"])
                    skew_now = pt["skew"]
                    row["skew_switch_s"] = round(time.time() - t0, 3)
                    print(f"skew -> {pt['skew']} ({in_force}) in {row['skew_switch_s']} s", flush=True)
                except Exception as exc:
                    skew_now = None
                    err = f"skew switch to {pt['skew']!r} failed: {type(exc).__name__}: {exc}"[:2000]
                    print(err, flush=True)
                    prog.write(json.dumps({"name": pt["name"], "start": t0, "end": time.time(), "rc": 1,
                                           "error": err}) + "\n")
                    prog.flush()
                    continue
            if pt.get("skew") is not None:
                row.update(skew=skew_now, skew_in_force=in_force)  # what the workers reported at the switch
            mark(f"{GRID_POINT_START} {pt['name']}")
            t0 = time.time()
            try:
                rc, err = int(bench(pt["argv"]) or 0), ""
            except BaseException as exc:  # SystemExit from argparse too: record it, go on with the next point
                rc, err = 1, f"{type(exc).__name__}: {exc}"[:2000]
            t1 = time.time()
            mark(f"{GRID_POINT_END} {pt['name']}")
            prog.write(json.dumps({"name": pt["name"], "start": t0, "end": t1, "rc": rc, "error": err, **row}) + "\n")
            prog.flush()
            print(f"[{i + 1}/{len(spec['points'])}] {pt['name']}: rc {rc} in {t1 - t0:.1f} s", flush=True)
    return 0


def switch_skew(rpc_url: str, skew: str, post=None) -> str:
    """Switch a running `vllm serve` (started with VLLM_SERVER_DEV_MODE=1, the moekern plugin and a
    MOEKERN_ROUTING_SKEW) to routing skew `skew` through its POST /collective_rpc (vLLM 0.26:
    entrypoints/serve/dev/rpc/api_router.py; args travel as JSON strings): pause every worker's gate log,
    re-draw the skew (Worker.moekern_routing_skew), resume the gate log, even when the switch failed. Returns
    the skew the workers report (RoutingSkew.describe()); RuntimeError when they disagree or report none.
    `post(url, body) -> dict` replaces the HTTP call (tests)."""
    if post is None:
        from moekern.e2e.procs import post_json as post
    post(rpc_url, {"method": "moekern_gate_log", "args": ["false"]})
    try:
        res = post(rpc_url, {"method": "moekern_routing_skew", "args": [skew]})
    finally:
        post(rpc_url, {"method": "moekern_gate_log", "args": ["true"]})
    results = (res or {}).get("results") if isinstance(res, dict) else None
    if not isinstance(results, list) or not results or not all(isinstance(r, dict) for r in results):
        raise RuntimeError(f"moekern_routing_skew({skew!r}) answered {str(res)[:300]}: is the moekern plugin "
                           "installed in the server?")
    now = {r.get("skew") for r in results}
    if len(now) != 1 or None in now:
        raise RuntimeError(f"workers report skews {sorted(map(str, now))} after moekern_routing_skew({skew!r})")
    return now.pop()


def bench_in_process():
    """A bench(argv) calling vLLM's `vllm bench serve` main() in this process, or None when it cannot be
    imported (vLLM 0.26: vllm.benchmarks.serve.add_cli_args/main, the `vllm bench serve` entry point's own)."""
    try:
        from vllm.benchmarks.serve import add_cli_args, main as bench_main
        from vllm.utils.argparse_utils import FlexibleArgumentParser
    except Exception as exc:
        print(f"in-process bench unavailable: {exc!r}", file=sys.stderr, flush=True)
        return None

    def run(argv):
        parser = FlexibleArgumentParser()
        add_cli_args(parser)
        bench_main(parser.parse_args(argv))
        return 0

    return run


def bench_subprocess(argv) -> int:
    return subprocess.run(["vllm", "bench", "serve", *argv]).returncode


if __name__ == "__main__":
    sys.exit(child_bench_grid(sys.argv[1]))
