"""Serve grid (--concurrency-grid): many benches against one server per arm.

A server start costs 60-110 s (torch.compile, CUDA graphs), a quick bench 1-10 s: with --concurrency-grid
each serve arm starts its server once, runs one discarded warm-up bench (the largest concurrency, first
dataset), then every grid point (rep outermost, then dataset, then concurrency: drift spreads over reps).
The points run in ONE bench process per server (grid_child.py) that imports vLLM's bench once and calls
its main() per point (a `vllm bench serve` process per point would add ~15-20 s of imports each); when that
import fails it falls back to one `vllm bench serve` subprocess per point. The child writes a start and an
end marker per point into the server's log through the server's own stdout descriptor (shared offset, so
the lines interleave, never overwrite), so the JIT events of each point are counted apart; it records the
wall-clock window [time.time() before, after] of each point for the gate-log CV
(moekern.analysis.serving.metrics). The per-point result files are written by this process after the server stopped (temp file + rename: a
point is either complete or absent); a point whose result file exists is skipped (resume).

Routing skews (--skews NAME=SKEW,...) are a factor INSIDE one server: it starts with the first skew
(MOEKERN_ROUTING_SKEW, so its CUDA graphs capture the bias add) and VLLM_SERVER_DEV_MODE=1, and the child
switches skews between benches through vLLM serve's POST /collective_rpc (grid_child.switch_skew: gate log
paused, Worker.moekern_routing_skew rewrites every layer's bias in place, gate log resumed). Points run rep,
then skew, then dataset, then concurrency, so a server switches len(skews) times per rep. Each point's result
carries its skew, the skew the workers reported, its measured CV by both of the prior study's methods
(measured_cv_step, measured_cv_agg: moekern.analysis.imbalance.metrics.seed_summary over the gate-log records
inside its window) and a workload card (cards.py) beside it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from moekern.e2e import procs
from moekern.e2e.cards import environment_info, window_cv, workload_card, write_card
from moekern.e2e.arms import PACKAGE_ROOT, arm_env, bench_command, engine_kwargs, gate_log_dir, serve_command
from moekern.e2e.plan import SERVER_STOP_S, dataset_input_len, grid_timing
from moekern.e2e.results import result_metadata, write_json_atomic
from moekern.e2e.serve import healthy_then_warm
from moekern.e2e.warmup import GRID_POINT_END, GRID_POINT_START, count_jit_between, count_jit_events


def grid_points(args, arm: str) -> list[dict]:
    """The arm's bench grid: dicts name, concurrency, dataset (Path | None), rep, skew ((name, skew) | None),
    result (Path); in run order (rep, skew, dataset, concurrency)."""
    from moekern.analysis.study.sweep import grid_point_name

    prefix = args.grid_prefix or grid_prefix(args, arm)
    datasets = args.datasets or [None]
    skews = getattr(args, "skews", None) or [None]
    points = []
    for r in range(args.grid_reps):
        for k in skews:
            for d in datasets:
                for c in args.concurrency_grid:
                    name = grid_point_name(prefix, c, d, r, skew=k[0] if k else None)
                    points.append({"name": name, "concurrency": c, "dataset": d, "rep": r, "skew": k,
                                   "result": Path(args.result_dir) / f"{name}.json"})
    return points


def grid_prefix(args, arm: str) -> str:
    """Default result-name prefix of an arm's grid: the arm and the server-level settings."""
    p = f"{arm}_s{args.max_num_seqs}"
    if args.max_num_batched_tokens:
        p += f"_b{args.max_num_batched_tokens}"
    if args.tensor_parallel_size > 1:
        p += f"_tp{args.tensor_parallel_size}"
    if args.enable_expert_parallel and not args.enable_eplb:
        p += "_ep"
    if args.enable_eplb:
        p += "_eplb1"
    return p


def point_args(args, concurrency: int, dataset) -> argparse.Namespace:
    return argparse.Namespace(**{**vars(args), "concurrency": concurrency, "dataset": dataset})


def read_progress(path: Path) -> dict:
    out = {}
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            out[row["name"]] = row
    return out


def grid_result_metadata(args, arm: str, pt: dict, prog: dict, gate_dir: Path | None, jit: dict | None,
                         server_id: str) -> dict:
    """The "moekern" block of one grid point's result file: result_metadata's keys plus max_concurrency
    (client queue depth), dataset_path, rep, the bench's wall-clock window (bench_start/bench_end, also
    gate_log_window for the CV) and the point's JIT counts (steady_state False when anything compiled)."""
    pargs = point_args(args, pt["concurrency"], pt["dataset"])
    pargs.result = pt["result"]
    meta = result_metadata(pargs, arm, gate_dir)
    meta.update(arm=arm, max_concurrency=pt["concurrency"], queue_depth="client --max-concurrency; server "
                f"max_num_seqs={args.max_num_seqs}", rep=pt["rep"], run_id=pt["name"], server_id=server_id,
                bench_start=prog["start"], bench_end=prog["end"], grid_point=True)
    if pt["dataset"] is not None:
        meta["dataset_path"] = str(pt["dataset"])
    if "gate_log" in meta:
        meta["gate_log_window"] = [prog["start"], prog["end"]]
    if pt.get("skew"):
        meta.update(routing_skew=pt["skew"][0], routing_skew_spec=pt["skew"][1],
                    routing_skew_in_force=prog.get("skew_in_force"))
    if jit is None:
        meta.update(jit_during_measurement=None, steady_state=False)
    else:
        meta.update(jit_during_measurement=jit["jit"], autotune_during_measurement=jit["autotune"],
                    jit_kernels=jit["kernels"], steady_state=not jit["jit"] and not jit["autotune"])
    return meta


def run_serve_grid_arm(args, arm: str, out: Path, deadline: float) -> dict:
    """One server for `arm`, one warm-up bench, then every grid point not yet written (module comment above);
    result files to --result-dir. Returns the arm's summary: points written/skipped/failed, JIT per point."""
    work = out / f"grid_{arm}"
    work.mkdir(parents=True, exist_ok=True)
    every = grid_points(args, arm)
    todo = [pt for pt in every if not pt["result"].exists()]
    r = {"arm": arm, "grid": True, "points": len(every), "already_done": len(every) - len(todo),
         "points_written": [], "points_skipped": [], "points_failed": {}, "not_steady_points": []}
    if not todo:
        return r
    port = procs.free_port()
    cmd = serve_command(engine_kwargs(args, arm), port)
    t0 = time.time()
    server_id = f"{arm}@{t0:.0f}"
    # One gate-log folder per server start, never cleared: result files of an earlier (resumed) invocation
    # point into theirs, by window.
    base = gate_log_dir(args, arm, out)
    gdir = None if base is None else base / f"server_{t0:.0f}"
    env = arm_env(arm, out, gdir, router_seed=args.dummy_router_seed,
                  moe_configs=getattr(args, "moe_configs", None))
    skews = getattr(args, "skews", None)
    if skews:
        env["MOEKERN_ROUTING_SKEW"] = skews[0][1]  # a bias add in the captured graphs; switched per point
        env["VLLM_SERVER_DEV_MODE"] = "1"  # mounts POST /collective_rpc (and vLLM's other dev endpoints)
    log = out / f"serve_{arm}.server.log"
    r["cmd"] = " ".join(cmd)
    progress = work / "progress.jsonl"
    progress.unlink(missing_ok=True)
    with open(log, "w") as fh:
        server = subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True,
                                  cwd=PACKAGE_ROOT)
        try:
            warm_args = point_args(args, max(args.concurrency_grid), (args.datasets or [None])[0])
            if healthy_then_warm(server, port, t0, args, r, fh, log, warm_args, work, env, "warmup") is None:
                return r
            from moekern.analysis.study.sweep import bench_run_seconds

            timing = grid_timing()
            points = []
            for pt in todo:
                pa = point_args(args, pt["concurrency"], pt["dataset"])
                in_len = dataset_input_len(pt["dataset"]) if pt["dataset"] else args.input_len
                est = bench_run_seconds(args.serve_prompts, in_len or args.input_len, args.output_len,
                                        pt["concurrency"], args.max_num_seqs, timing) + timing.point_overhead_s
                points.append({"name": pt["name"], "estimate_s": est,
                               "skew": pt["skew"][1] if pt.get("skew") else None,
                               "argv": bench_command(pa, port, work, f"{pt['name']}.bench.json")[3:]})
            # the server's stop comes after the deadline check of the last point
            spec = {"points": points, "marker_fd": fh.fileno(), "deadline": deadline - SERVER_STOP_S,
                    "progress": str(progress), "in_process": True,
                    "rpc_url": f"http://127.0.0.1:{port}/collective_rpc"}
            for in_process in (True, False):
                spec["in_process"] = in_process
                spec_path = work / "grid.spec.json"
                spec_path.write_text(json.dumps(spec))
                with open(work / "bench_child.log", "a") as ch:
                    child = subprocess.Popen([sys.executable, "-m", "moekern.e2e.grid_child", str(spec_path)],
                                             env=env, stdout=ch, stderr=subprocess.STDOUT, start_new_session=True,
                                             cwd=PACKAGE_ROOT, pass_fds=(fh.fileno(),))
                    rc = procs.wait_group(child, max(1.0, deadline - time.time()) + 60)
                r["bench_child_rc"] = rc
                r["bench_in_process"] = in_process
                if rc != 3:
                    break
        finally:
            procs.kill_group(server)
            r["server_stopped"] = server.poll() is not None
    text = log.read_text(errors="replace")
    prog = read_progress(progress)
    r["jit_during_measurement"] = (count_jit_events(text) or {}).get("jit")
    r["gate_log_dir"] = str(gdir) if gdir is not None else None
    env_info = environment_info()
    logs: dict = {}  # the server's gate log, parsed once for all its points' windows
    for pt in todo:
        row = prog.get(pt["name"])
        raw = work / f"{pt['name']}.bench.json"
        if row is None or "skipped" in row:
            r["points_skipped"].append(pt["name"])
            continue
        if row.get("rc") or not raw.exists():
            r["points_failed"][pt["name"]] = row.get("error") or f"bench rc {row.get('rc')}, no {raw.name}"
            continue
        jit = count_jit_between(text, f"{GRID_POINT_START} {pt['name']}\n", f"{GRID_POINT_END} {pt['name']}\n")
        obj = json.loads(raw.read_text())
        obj["moekern"] = {**obj.get("moekern", {}),
                          **grid_result_metadata(args, arm, pt, row, gdir, jit, server_id)}
        if gdir is not None:
            obj["moekern"].update(window_cv(gdir, (row["start"], row["end"]), logs))
        write_card(pt["result"], workload_card(args, arm, obj, env_info))
        write_json_atomic(pt["result"], obj)
        r["points_written"].append(str(pt["result"]))
        if not obj["moekern"]["steady_state"]:
            r["not_steady_points"].append(pt["result"].stem)
    return r
