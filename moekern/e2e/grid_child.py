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


def child_bench_grid(spec_path: str, bench=None) -> int:
    """The bench process of one server's grid (spec: points [{name, argv}], marker_fd, deadline, progress,
    in_process). Per point: a start marker into the server log, the bench, an end marker, one progress line
    {name, start, end, rc, error}. A point that would end after `deadline` (now + its estimate) and all after
    it are recorded as skipped. `bench(argv) -> rc` replaces the real bench (tests). Exit 3: in-process
    requested but vLLM's bench could not be imported (nothing ran; the parent falls back to subprocesses)."""
    spec = json.loads(Path(spec_path).read_text())
    if bench is None:
        bench = bench_in_process() if spec.get("in_process", True) else bench_subprocess
        if bench is None:
            return 3
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
            mark(f"{GRID_POINT_START} {pt['name']}")
            t0 = time.time()
            try:
                rc, err = int(bench(pt["argv"]) or 0), ""
            except BaseException as exc:  # SystemExit from argparse too: record it, go on with the next point
                rc, err = 1, f"{type(exc).__name__}: {exc}"[:2000]
            t1 = time.time()
            mark(f"{GRID_POINT_END} {pt['name']}")
            prog.write(json.dumps({"name": pt["name"], "start": t0, "end": t1, "rc": rc, "error": err}) + "\n")
            prog.flush()
    return 0


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
