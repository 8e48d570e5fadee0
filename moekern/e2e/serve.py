"""Served arms: `vllm serve` on 127.0.0.1, the shape sweep as /v1/completions requests, one discarded
`vllm bench serve` run, then the timed ones (TTFT, TPOT, ITL, request and output throughput from vLLM's
result JSON)."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

from moekern.e2e import procs
from moekern.e2e.arms import PACKAGE_ROOT, arm_env, bench_command, engine_kwargs, fresh_gate_dir, serve_command
from moekern.e2e.stats import arm_stats, median_run
from moekern.e2e.warmup import MEASURE_MARKER, jit_fields, sweep_batches, sweep_spec


SERVE_KEYS_PER_RUN = ("duration", "completed", "output_throughput", "request_throughput", "median_ttft_ms",
                      "p90_ttft_ms", "median_tpot_ms", "p90_tpot_ms", "median_itl_ms")


def run_bench(args, port: int, out: Path, env: dict, name: str) -> tuple[dict | None, str]:
    """One `vllm bench serve` run writing out/<name>.json and its log out/<name>.log: (result, error)."""
    (out / f"{name}.json").unlink(missing_ok=True)
    cmd = bench_command(args, port, out, f"{name}.json")
    with open(out / f"{name}.log", "w") as fh:
        b = subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        rc = procs.wait_group(b, args.arm_timeout)
    if rc == 0 and (out / f"{name}.json").exists():
        return json.loads((out / f"{name}.json").read_text()), ""
    return None, f"bench {name} exited {rc}: " + procs.tail(out / f"{name}.log")


def serve_shape_sweep(port: int, model: str, sw: dict, vocab: int, post=None) -> dict:
    """The shape sweep against a running server: one /v1/completions request per step size, its prompts as
    token-id lists (vLLM schedules a request's prompts together), one token each. Errors end the sweep and are
    reported, not raised: the JIT count of the measured part still tells whether it was enough."""
    import random

    post = post or procs.post_json
    rng = random.Random(1)
    batches = sweep_batches(sw["cap"], sw["max_model_len"], sw["max_num_seqs"])
    t0, err = time.time(), None
    for lens in batches:
        body = {"model": model, "prompt": [[rng.randrange(100, vocab - 100) for _ in range(k)] for k in lens],
                "max_tokens": 1, "temperature": 0.0}
        try:
            post(f"http://127.0.0.1:{port}/v1/completions", body)
        except Exception as exc:
            err = f"step of {sum(lens)} tokens: {type(exc).__name__}: {exc}"[:500]
            break
    return {"steps": len(batches), "cap": sw["cap"], "seconds": round(time.time() - t0, 1), "error": err}


def healthy_then_warm(server, port, t0, args, r, fh, log, bench_args, out, env, name):
    """Wait for the started server, run the discarded warm-up bench, then mark the server log: returns the
    warm-up's result, or None with r["error"] set. The marker goes through the server's own open log file
    (shared offset), so it lands between its lines and splits warm-up from measurement for the JIT count."""
    ready = procs.wait_healthy(server, port, t0, args.server_timeout)
    r["startup_s"] = round(time.time() - t0, 1)
    if not ready:
        r["error"] = "server did not become healthy: " + procs.tail(log)
        return None
    sw = sweep_spec(args, "serve")
    if sw is not None:
        r["shape_sweep"] = serve_shape_sweep(port, str(args.model_dir), sw, args.vocab)
    t1 = time.time()
    warm, err = run_bench(bench_args, port, out, env, name)
    r["warmup_s"] = round(time.time() - t1, 1)
    if warm is None:
        r["error"] = "warm-up " + err
        return None
    fh.write(f"\n{MEASURE_MARKER}\n")
    fh.flush()
    return warm


def run_serve_arm(args, arm: str, out: Path) -> dict:
    """Start `vllm serve` for `arm`, wait for /health, run one discarded warm-up bench and serve_reps timed
    ones (serve_<arm>.warmup.json, serve_<arm>.rep<i>.json; the median run copied to serve_<arm>.bench.json),
    mark the server log between them, stop the server, count the JIT events logged while timed."""
    port = procs.free_port()
    cmd = serve_command(engine_kwargs(args, arm), port)
    env = arm_env(arm, out, fresh_gate_dir(args, arm, out), router_seed=args.dummy_router_seed,
                  moe_configs=getattr(args, "moe_configs", None))
    log = out / f"serve_{arm}.server.log"
    (out / f"serve_{arm}.bench.json").unlink(missing_ok=True)
    r = {"arm": arm, "cmd": " ".join(cmd)}
    t0 = time.time()
    with open(log, "w") as fh:
        server = subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True,
                                  cwd=PACKAGE_ROOT)
        try:
            r["bench_cmd"] = " ".join(bench_command(args, port, out, f"serve_{arm}.rep0.json"))
            warm = healthy_then_warm(server, port, t0, args, r, fh, log, args, out, env, f"serve_{arm}.warmup")
            if warm is None:
                return r
            r["warmup_duration"] = warm.get("duration")
            runs = []
            for i in range(args.serve_reps):
                res, err = run_bench(args, port, out, env, f"serve_{arm}.rep{i}")
                if res is None:
                    r["error"] = err
                    return r
                runs.append({k: res.get(k) for k in SERVE_KEYS_PER_RUN} | {"file": f"serve_{arm}.rep{i}.json"})
            best = median_run(runs)
            shutil.copy(out / runs[best]["file"], out / f"serve_{arm}.bench.json")
            res = json.loads((out / f"serve_{arm}.bench.json").read_text())
            keys = [k for k in res if k.endswith("_ms") or "throughput" in k or k in ("completed", "duration")]
            r.update({k: res[k] for k in keys})
            r["runs"] = runs
            r["output_throughput_stats"] = arm_stats([x["output_throughput"] for x in runs])
            r["median_tpot_ms_stats"] = arm_stats([x["median_tpot_ms"] for x in runs])
            r["bench_rc"] = 0
        finally:
            procs.kill_group(server)
            r["server_stopped"] = server.poll() is not None
    r.update(jit_fields(log.read_text(errors="replace")))
    return r
