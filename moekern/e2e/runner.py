"""The driver of one invocation: preflight, the model directory, every arm of every mode in turn (rounds
alternating), the results JSON and the printed summary."""

from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

from moekern.e2e.arms import PACKAGE_ROOT, arm_env, gate_log_dir, plugin_entry_point
from moekern.e2e.grid import grid_points, run_serve_grid_arm
from moekern.e2e.make_configs import config_path
from moekern.e2e.offline import run_offline_arm
from moekern.e2e.plan import plan_text
from moekern.e2e.results import check_gate_logs, copy_moe_configs, write_result
from moekern.e2e.serve import run_serve_arm
from moekern.e2e.stats import merge_rounds
from moekern.e2e.summary import format_summary, summarize
from moekern.e2e.warmup import sweep_spec, warmup_plan


def preflight_command(args) -> list[str]:
    """`python -m moekern.e2e.preflight` for the arms and modes this invocation will run."""
    arms = list(dict.fromkeys(a for arms in args.arm_plan.values() for a in arms))
    modes = list(args.arm_plan)
    mode = "both" if len(modes) > 1 else modes[0]
    return [sys.executable, "-m", "moekern.e2e.preflight", "--arms", ",".join(arms), "--mode", mode,
            "--model", args.model]


def run_preflight(args, run=subprocess.run, timeout: float = 240) -> tuple[bool, str]:
    """Run the preflight once in a subprocess (the arms' environment, plugin off). Returns (ok, output);
    a preflight that cannot run at all (timeout, crash) is a failure too."""
    env = arm_env("vllm", Path("."))
    try:
        proc = run(preflight_command(args), env=env, cwd=PACKAGE_ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        return False, f"FAIL preflight: timed out after {timeout}s\n{exc.stdout or ''}"
    text = (proc.stdout or "") + (proc.stderr or "")
    if proc.returncode != 0 and not any(line.startswith("FAIL ") for line in text.splitlines()):
        text += f"\nFAIL preflight: exited {proc.returncode} without a report"
    return proc.returncode == 0, text


def prepare_model_dir(args, out: Path) -> None:
    """Point args.model_dir at the checkpoint (--model-dir) or at OUT/models/<model>/ holding the model's
    committed dummy-weight config.json and, when one is found, its tokenizer; set args.has_tokenizer."""
    if args.model_dir:
        args.model_dir = Path(args.model_dir)
        args.has_tokenizer = any((args.model_dir / f).exists()
                                 for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))
        return
    src = config_path(args.model)
    d = out / "models" / args.model
    d.mkdir(parents=True, exist_ok=True)
    shutil.copy(src, d / "config.json")
    tok = args.tokenizer or (os.environ.get("GPUENV_MIXTRAL_TOKENIZER") if args.model.startswith("mixtral") else None)
    if tok and Path(tok).is_dir():
        for f in Path(tok).iterdir():
            if f.is_file():
                shutil.copy(f, d / f.name)
        args.has_tokenizer = True
    args.model_dir = d


def default_out() -> Path:
    """benchmarks/results/e2e/<today>/ of the checkout moekern runs from, else of the current directory."""
    root = PACKAGE_ROOT if (PACKAGE_ROOT / "benchmarks").is_dir() else Path.cwd()
    return root / "benchmarks" / "results" / "e2e" / _dt.date.today().isoformat()


def run(args) -> int:
    """One invocation with args from moekern.e2e.args.parse_args (or check_args): exit code 0 when every
    requested result was written."""
    t_start = time.time()
    print(plan_text(args), flush=True)
    if args.plan_only:
        return 0
    out = args.out or default_out()
    out.mkdir(parents=True, exist_ok=True)
    if not args.no_preflight:
        print("preflight:", " ".join(preflight_command(args)[1:]), flush=True)
        ok, text = run_preflight(args)
        (out / "preflight.log").write_text(text)
        print(text.rstrip(), flush=True)
        if not ok:
            failed = [line for line in text.splitlines() if line.startswith("FAIL ")]
            print(f"preflight FAILED ({len(failed)}): no arm started; fix these or pass --no-preflight:",
                  file=sys.stderr)
            for line in failed:
                print("  " + line, file=sys.stderr)
            return 1
    prepare_model_dir(args, out)
    moe_configs = copy_moe_configs(args.moe_configs, out)
    ep = plugin_entry_point()
    meta = {"model": args.model, "model_dir": str(args.model_dir), "load_format": args.load_format,
            "attention_backend": args.attention_backend, "plugin_entry_point": ep, "argv": sys.argv,
            "workload": {**asdict(args.workload), "concurrency": args.concurrency,
                         "max_model_len": args.max_model_len},
            "steady_state_measures": {"enable_prefix_caching": False, "jit_monitor_verbose": True,
                                      "offline_warmup": warmup_plan(args.num_prompts, args.output_len,
                                                                    args.warmup_reps),
                                      "offline_warmup_max_reps": max(args.warmup_reps, args.warmup_max_reps),
                                      "shape_sweep": {m: sweep_spec(args, m) for m in ("offline", "serve")},
                                      "serve_warmup_runs": 1},
            "engine": {"max_num_seqs": args.max_num_seqs, "max_num_batched_tokens": args.max_num_batched_tokens,
                       "tensor_parallel_size": args.tensor_parallel_size,
                       "expert_parallel": bool(args.enable_expert_parallel),
                       "eplb": bool(args.enable_eplb)},
            "dataset": str(args.dataset) if args.dataset else None,
            "gate_log_dir": str(args.gate_log_dir) if args.gate_log_dir else None,
            "dummy_router_seed": args.dummy_router_seed,
            "moe_configs": moe_configs,
            "result": str(args.result) if args.result else None,
            "serve_grid": ({"concurrency": args.concurrency_grid, "datasets": [str(d) for d in args.datasets or []],
                            "reps": args.grid_reps, "result_dir": str(args.result_dir),
                            "skews": [list(k) for k in args.skews] if args.skews else None,
                            "queue_depth": "client --max-concurrency; server max_num_seqs fixed per server"}
                           if args.concurrency_grid else None)}
    try:
        import torch
        import vllm

        meta.update(vllm=vllm.__version__, torch=torch.__version__,
                    gpu=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
    except Exception as exc:
        meta["versions_error"] = repr(exc)
    results: dict = {"meta": meta, "offline": {}, "serve": {}}
    rounds = getattr(args, "rounds", 1)
    for mode, arms in args.arm_plan.items():
        order = [(arm, k) for k in range(rounds) for arm in arms] if mode == "offline" and rounds > 1 else \
            [(arm, None) for arm in arms]
        per_round: dict[str, list] = {}
        for arm, round_no in order:
            if (arm.startswith("moekern") or getattr(args, "skews", None)) and ep is None:
                # --skews needs the plugin in every arm: it applies and switches the skew
                results[mode][arm] = {"skipped": "moekern's vllm.general_plugins entry point is not installed "
                                                 "(pip install --no-build-isolation -e .)"}
                continue
            if mode == "serve" and not args.has_tokenizer and args.load_format == "dummy":
                results[mode][arm] = {"skipped": "serve needs a tokenizer (--tokenizer or $GPUENV_MIXTRAL_TOKENIZER)"}
                continue
            if mode == "offline" and args.dataset and not args.has_tokenizer:
                results[mode][arm] = {"skipped": "--dataset needs the model's tokenizer (--tokenizer, "
                                                 "$GPUENV_MIXTRAL_TOKENIZER or a --model-dir holding one)"}
                continue
            if time.time() - t_start > args.budget_s:
                if round_no is None or not per_round.get(arm):
                    results[mode][arm] = {"skipped": f"time budget {args.budget_s}s spent"}
                continue
            print(f"[{time.time() - t_start:6.0f}s] {mode} {arm}"
                  f"{'' if round_no is None else f' (round {round_no + 1} of {rounds})'} ...", flush=True)
            if mode == "serve" and args.concurrency_grid:
                r = run_serve_grid_arm(args, arm, out, t_start + args.budget_s)
                if r.get("gate_log_dir") and "error" not in r and r["points_written"]:
                    r["gate_log"] = check_gate_logs(Path(r["gate_log_dir"]))
                results[mode][arm] = r
                print(f"[{time.time() - t_start:6.0f}s]   -> grid: {len(r['points_written'])} written, "
                      f"{r['already_done']} already there, {len(r['points_skipped'])} skipped (budget), "
                      f"{len(r['points_failed'])} failed, "
                      f"not steady: {r.get('not_steady_points')}" + (f"; error {r['error'][:400]}"
                                                                     if r.get("error") else ""), flush=True)
                (out / f"e2e_{args.model}.json").write_text(json.dumps(results, indent=1, default=str))
                continue
            if mode == "serve":
                r = run_serve_arm(args, arm, out)
            else:
                r = run_offline_arm(args, arm, out, round_no=round_no)
            gdir = gate_log_dir(args, arm, out, round_no)
            if gdir is not None and "error" not in r:
                r["gate_log"] = check_gate_logs(gdir)
            this_round = None
            if round_no is not None:
                per_round.setdefault(arm, []).append(r)
                this_round = r.get("output_tok_s")
                r = merge_rounds(per_round[arm])
            if mode == "serve" and args.result is not None and "error" not in r:
                r["result"] = str(write_result(args, arm, out / f"serve_{arm}.bench.json", gdir))
            results[mode][arm] = r
            brief = {k: r.get(k) for k in ("rc", "output_tok_s", "output_throughput", "median_ttft_ms",
                                           "median_tpot_ms", "jit_during_measurement", "error") if r.get(k) is not None}
            if this_round is not None and len(per_round[arm]) > 1:  # output_tok_s above pools the rounds so far
                brief = {"round_output_tok_s": this_round, "pooled_output_tok_s": brief.pop("output_tok_s", None),
                         **brief}
            if not (r.get("plugin_check") or {}).get("ok", True):
                brief["plugin_check"] = r["plugin_check"]["why"]
            print(f"[{time.time() - t_start:6.0f}s]   -> {json.dumps(brief)[:600]}", flush=True)
            (out / f"e2e_{args.model}.json").write_text(json.dumps(results, indent=1, default=str))
    results["summary"] = summarize(results)
    (out / f"e2e_{args.model}.json").write_text(json.dumps(results, indent=1, default=str))
    print(json.dumps(results["summary"], indent=1))
    print(format_summary(results, results["summary"]))
    print("results:", out / f"e2e_{args.model}.json")
    if args.result is not None and not args.result.exists():
        print(f"--result {args.result} was not written (the serve arm failed or was skipped)", file=sys.stderr)
        return 1
    if args.concurrency_grid:
        missing = [pt["name"] for arm in args.arm_plan["serve"] for pt in grid_points(args, arm)
                   if not pt["result"].exists()]
        if missing:  # a sweep re-runs this invocation; the written points are skipped then
            print(f"serve grid incomplete: {len(missing)} result(s) missing, e.g. {missing[0]}", file=sys.stderr)
            return 1
    return 0
