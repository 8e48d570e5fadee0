"""Greedy outputs with MOEKERN_KERNELS=routing must equal the plugin-off outputs, token for token.

Runs the dummy-weight model three times in fresh subprocesses (identical seeded weights): plugin off twice
(vLLM's own run-to-run determinism, the baseline) and MOEKERN_KERNELS=routing with gate logs; compares
the generated token ids of every prompt. Writes <out>/check_equal.json; exit 1 when routing differs.

    python -m moekern.e2e.check_equal --model mixtral-8x7b-4l --out /tmp/eq
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from moekern.e2e import arms
from moekern.e2e.args import parse_args
from moekern.e2e.make_configs import MODELS
from moekern.e2e.offline import run_offline_arm
from moekern.e2e.results import check_gate_logs
from moekern.e2e.runner import prepare_model_dir


def engine_args(args) -> argparse.Namespace:
    """The runner's own parsed arguments for the offline runs of this check (so every field run_offline_arm
    reads is there, defaulted as in `moekern e2e`): one greedy pass per arm, no warm-up, no router reseed."""
    return parse_args(["--model", args.model, "--mode", "offline", "--arms", "vllm,moekern-routing-log",
                      "--num-prompts", str(args.num_prompts), "--input-len", str(args.input_len),
                      "--output-len", str(args.output_len), "--reps", "1", "--warmup-reps", "0",
                      "--max-model-len", "1024", "--gpu-mem", "0.8", "--arm-timeout", "400",
                      "--no-preflight", "--tensor-parallel-size", str(args.tensor_parallel_size)]
                      + (["--enable-expert-parallel"] if args.enable_expert_parallel else []))


def rank_check(gate_log: dict, world: int) -> dict:
    """Every rank 0..world-1 wrote its gate log (with tensor parallelism every rank routes every token; with
    expert parallelism each routes its own), and each one's records passed check_gate_logs."""
    ranks = sorted(gate_log.get("ranks", {}))
    return {"ok": bool(gate_log.get("ok")) and ranks == list(range(world)), "ranks": ranks, "want": list(range(world))}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m moekern.e2e.check_equal", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="mixtral-8x7b-4l")
    p.add_argument("--out", type=Path, default=Path("/tmp/moekern_check_equal"))
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--input-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--no-baseline", action="store_true", help="skip the second plugin-off run")
    p.add_argument("--tensor-parallel-size", type=int, default=1,
                   help="GPUs per engine; every rank writes gate_log.rank{R}.jsonl, checked to cover 0..R-1")
    p.add_argument("--enable-expert-parallel", action="store_true",
                   help="vLLM expert parallelism over those ranks (needs --tensor-parallel-size > 1)")
    args = p.parse_args(argv)
    if args.model == "mixtral":
        args.model = "mixtral-8x7b-4l"
    if args.model not in MODELS:
        raise SystemExit(f"--model={args.model!r} must be one of {sorted(MODELS)}")
    if args.tensor_parallel_size < 1:
        p.error(f"--tensor-parallel-size={args.tensor_parallel_size} must be >= 1")
    if args.enable_expert_parallel and args.tensor_parallel_size < 2:
        p.error("--enable-expert-parallel needs --tensor-parallel-size > 1")
    if arms.plugin_entry_point() is None:
        raise SystemExit("moekern's vllm.general_plugins entry point is not installed (pip install -e .)")
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    ns = engine_args(args)
    prepare_model_dir(ns, out)
    arm_order = ["vllm"] + ([] if args.no_baseline else ["vllm"]) + ["moekern-routing-log"]
    tokens, results = [], []
    for arm in arm_order:
        t0 = time.time()
        r = run_offline_arm(ns, arm, out, extra_spec={"save_tokens": True})
        print(f"{arm}: rc={r['rc']} {time.time() - t0:.0f}s", flush=True)
        if r["rc"] != 0:
            print(r.get("error", ""))
            (out / "check_equal.json").write_text(json.dumps({"equal": False, "error": f"{arm} failed", "run": r}))
            return 1
        tokens.append(r["token_ids"])
        results.append({k: v for k, v in r.items() if k != "token_ids"})

    def compare(a, b):
        diff = [i for i, (x, y) in enumerate(zip(a, b)) if x != y]
        first = None
        if diff:
            x, y = a[diff[0]], b[diff[0]]
            first = {"prompt": diff[0], "position": next((j for j, (u, v) in enumerate(zip(x, y)) if u != v),
                                                         min(len(x), len(y)))}
        return {"prompts_differing": len(diff), "of": len(a), "first_difference": first}

    gate_log = check_gate_logs(out / "gate_logs" / "moekern-routing-log")
    report = {"model": args.model, "tensor_parallel_size": args.tensor_parallel_size,
              "expert_parallel": args.enable_expert_parallel,
              "routing_vs_off": compare(tokens[0], tokens[-1]),
              "off_vs_off": None if args.no_baseline else compare(tokens[0], tokens[1]),
              "gate_log": gate_log, "gate_log_ranks": rank_check(gate_log, args.tensor_parallel_size),
              "plugin": results[-1].get("plugin"), "runs": results}
    report["equal"] = report["routing_vs_off"]["prompts_differing"] == 0
    (out / "check_equal.json").write_text(json.dumps(report, indent=1))
    print(json.dumps({k: report[k] for k in ("equal", "routing_vs_off", "off_vs_off", "gate_log", "gate_log_ranks")},
                     indent=1))
    return 0 if report["equal"] and report["gate_log_ranks"]["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
