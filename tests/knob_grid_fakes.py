"""A knob-grid results folder made by the real serve-grid code (moekern.e2e.grid with a fake `vllm serve`, a
fake bench and a fake plugin), laid out as `moekern sweep analysis/specs/imbalance_grid.yaml` leaves it:
runs/ID_k{skew}_c64_drandom_r0.json + .card.yaml, gate_logs/ID/server_T/gate_log.rank0.jsonl, work/ID/.

Known effects (SYNTHETIC): output throughput grows as sqrt(max_num_seqs), falls 30 % at the hot skew and 10 %
at the moderate one, moekern +5 %; TTFT falls with max_num_batched_tokens; TPOT grows with max_num_seqs and
skew. Gate-log loads per skew (2 layers x 8 experts per step) give known CVs (SKEW_LOADS)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from e2e_fakes import JIT_MOE_VERBOSE, FakeProc, fake_server, flag_value, log_text, ready_args

from moekern.e2e.grid import run_serve_grid_arm
from moekern.e2e.grid_child import child_bench_grid

SKEWS = (("uniform", "uniform"), ("moderate", "hot:0:0.05"), ("hot", "hot:0:0.5"))
SKEW_LOADS = {"uniform": [10] * 8, "hot:0:0.05": [0, 12, 12, 12, 11, 11, 11, 11],
              "hot:0:0.5": [64, 4, 4, 2, 2, 2, 1, 1]}
SKEW_SLOWDOWN = {"uniform": 1.0, "hot:0:0.05": 0.9, "hot:0:0.5": 0.7}
SKEW_TPOT_MS = {"uniform": 0.0, "hot:0:0.05": 0.5, "hot:0:0.5": 2.0}


def throughput(seqs: int, backend: str, skew: str) -> float:
    return 1000.0 * (seqs / 8) ** 0.5 * SKEW_SLOWDOWN[skew] * (1.05 if backend == "moekern" else 1.0)


def make_knob_grid_folder(root: Path, monkeypatch, seqs=(8, 32), tokens=(2048, 8192), backends=("vllm", "moekern"),
                          outlier: str | None = None, unsteady: str | None = None, seed: int = 0) -> Path:
    """Run the serve grid once per (max_num_seqs, max_num_batched_tokens, backend) into `root` with fakes.
    `outlier`: the run_id stem (without .json) of one bench whose throughput is multiplied by 5; `unsteady`: one
    whose server logs a JIT compile while it is measured (its result says steady_state false)."""
    rng = np.random.default_rng(seed)
    state = {}

    def switch(url, skew):
        state["skew"] = skew
        return skew

    def bench(argv):
        from moekern.gatelog import GateRecord, write_records

        skew, now = state["skew"], time.time()
        recs = [GateRecord(step=state["steps"] + s, layer=l, expert_counts=SKEW_LOADS[skew], num_tokens=40,
                           top_k=2, phase="decode", time=now + 1e-4 * s) for s in range(3) for l in range(2)]
        state["steps"] += 3
        write_records(Path(state["env"]["MOEKERN_GATE_LOG_DIR"]) / "gate_log.rank0.jsonl", recs)
        time.sleep(0.002)
        name = flag_value(argv, "--result-filename")
        thr = throughput(state["seqs"], state["backend"], skew) * (1 + 0.01 * rng.standard_normal())
        if outlier is not None and name == f"{outlier}.bench.json":
            thr *= 5
        if unsteady is not None and name == f"{unsteady}.bench.json":
            state["log"].write(log_text(JIT_MOE_VERBOSE))
            state["log"].flush()
        Path(flag_value(argv, "--result-dir"), name).write_text(json.dumps({
            "duration": 64 * 128 / thr, "completed": 64, "failed": 0, "total_input_tokens": 65536,
            "total_output_tokens": 8192, "output_throughput": thr, "request_throughput": thr / 128,
            "mean_ttft_ms": 200.0 * 8192 / state["tokens"] * (1 + 0.01 * rng.standard_normal()),
            "mean_tpot_ms": 4.0 + 0.05 * state["seqs"] + SKEW_TPOT_MS[skew] + 0.02 * rng.standard_normal(),
            "max_concurrency": 64}))
        return 0

    def popen(cmd, stdout, **kw):
        if cmd[:2] == ["vllm", "serve"]:
            state.update(env=kw["env"], steps=0, skew=kw["env"]["MOEKERN_ROUTING_SKEW"], log=stdout)
            Path(kw["env"]["MOEKERN_GATE_LOG_DIR"]).mkdir(parents=True)
            return FakeProc(rc=None)
        if "moekern.e2e.grid_child" in cmd:
            return FakeProc(child_bench_grid(cmd[-1], bench=bench, switch=switch))
        Path(flag_value(cmd, "--result-dir"), flag_value(cmd, "--result-filename")).write_text("{}")  # warm-up
        return FakeProc()

    fake_server(monkeypatch, popen)
    skews = ",".join(f"{k}={v}" for k, v in SKEWS)
    for s in seqs:
        for b in tokens:
            for backend in backends:
                run_id = f"s{s}_b{b}_{backend}"
                state.update(seqs=s, tokens=b, backend=backend)
                args = ready_args(["--mode", "serve", "--arms", backend, "--max-num-seqs", str(s),
                                   "--max-num-batched-tokens", str(b), "--max-model-len", "4096",
                                   "--serve-prompts", "64", "--input-len", "1024", "--output-len", "128",
                                   "--dummy-router-seed", "0", "--concurrency-grid", "64", "--skews", skews,
                                   "--grid-prefix", run_id, "--result-dir", str(root / "runs"),
                                   "--gate-log-dir", str(root / "gate_logs" / run_id)])
                work = root / "work" / run_id
                work.mkdir(parents=True, exist_ok=True)
                r = run_serve_grid_arm(args, backend, work, deadline=time.time() + 3600)
                assert "error" not in r and len(r["points_written"]) == len(SKEWS), r
                with open(root / "sweep_status.jsonl", "a") as fh:  # as moekern sweep records each server
                    fh.write(json.dumps({"run_id": run_id, "ok": True, "reason": "", "seconds": 1.0,
                                         "benches": len(SKEWS), "expected": len(SKEWS)}) + "\n")
    return root
