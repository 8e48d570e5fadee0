"""End-to-end A/B on vLLM 0.26 with dummy weights: vLLM's Triton MoE vs FlashInfer CUTLASS MoE vs moekern.

One invocation runs the same workload through each arm, offline (LLM.generate, output tokens/s; every arm
in a fresh subprocess so its environment applies) and served (`vllm serve` on 127.0.0.1 + `vllm bench
serve` with random token prompts: TTFT, TPOT, ITL, request and output throughput from vLLM's result
JSON), and writes everything to --out (default benchmarks/results/e2e/<date>/).

Arms (plugin env in brackets; all keep VLLM_USE_FLASHINFER_SAMPLER=0 and attention on Triton):
  vllm                 vLLM default (unquantized MoE -> Triton on sm90)        [MOEKERN_KERNELS=off]
  flashinfer           --moe-backend flashinfer_cutlass (bf16 CUTLASS MoE, sm90 supported in 0.26)
  moekern-routing      moekern.fused_topk routing, no gate log                 [routing]
  moekern-routing-log  the same with gate logs                                 [routing + GATE_LOG_DIR]
  moekern              moekern routing + experts, gate logs on                 [all + GATE_LOG_DIR]
Ratios reported: moekern / vllm output throughput (target >= 1.05), gate-log overhead =
1 - routing-log / routing (target <= 2%).

The moekern arms need the plugin's entry point, i.e. moekern pip-installed (`pip install -e .`); the
script checks and refuses to report plugin arms that did not load it.

    source /tmp/gpuenv/env.sh
    python benchmarks/e2e/run_e2e.py --quick --mode offline   # ~5-7 min on one H100
    python benchmarks/e2e/run_e2e.py --quick --mode serve     # ~5-7 min
Real checkpoint: --model-dir /path/to/Mixtral-8x7B-Instruct --load-format auto (the directory holds the
config, weights and tokenizer; --model then only names the result files).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO))

from make_configs import MODELS, attention_backend  # noqa: E402

ARMS = {
    "vllm": ({"MOEKERN_KERNELS": "off"}, {}, False),
    "flashinfer": ({"MOEKERN_KERNELS": "off"}, {"moe_backend": "flashinfer_cutlass"}, False),
    "moekern-routing": ({"MOEKERN_KERNELS": "routing"}, {}, False),
    "moekern-routing-log": ({"MOEKERN_KERNELS": "routing"}, {}, True),
    "moekern": ({"MOEKERN_KERNELS": "all"}, {}, True),
}
OFFLINE_ARMS = ["vllm", "flashinfer", "moekern-routing", "moekern-routing-log", "moekern"]
SERVE_ARMS = ["vllm", "flashinfer", "moekern"]
CAPTURE_SIZES = [1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128]  # the same for every arm; max_num_seqs=128


def plugin_entry_point() -> str | None:
    from importlib.metadata import entry_points

    for ep in entry_points(group="vllm.general_plugins"):
        if ep.name == "moekern":
            return ep.value
    return None


def arm_env(arm: str, out: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MOEKERN_")}
    plugin_env, _, log = ARMS[arm]
    env.update(plugin_env)
    env["VLLM_USE_FLASHINFER_SAMPLER"] = "0"
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    if log:
        d = out / "gate_logs" / arm
        shutil.rmtree(d, ignore_errors=True)
        env["MOEKERN_GATE_LOG_DIR"] = str(d)
    return env


def engine_kwargs(args, arm: str) -> dict:
    kw = dict(model=str(args.model_dir), load_format=args.load_format, dtype="bfloat16", seed=0,
              max_model_len=args.max_model_len, gpu_memory_utilization=args.gpu_mem, max_num_seqs=128,
              attention_backend=args.attention_backend,
              compilation_config={"cudagraph_capture_sizes": CAPTURE_SIZES})
    kw.update(ARMS[arm][1])
    return kw


# ---- offline child: runs inside the arm's subprocess ------------------------------------------------------
def child_offline(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    import numpy as np
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    t_init = time.perf_counter()
    llm = LLM(skip_tokenizer_init=True, **spec["engine"])
    init_s = time.perf_counter() - t_init
    rng = np.random.default_rng(spec["seed"])
    vocab = spec["vocab"]
    prompts = [TokensPrompt(prompt_token_ids=rng.integers(100, vocab - 100, spec["input_len"]).tolist())
               for _ in range(spec["num_prompts"])]
    sp = SamplingParams(temperature=0.0, max_tokens=spec["output_len"], ignore_eos=spec["ignore_eos"],
                        detokenize=False)
    llm.generate(prompts[: min(16, len(prompts))], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True,
                                                                   detokenize=False), use_tqdm=False)
    runs, token_ids = [], None
    for _ in range(spec["reps"]):
        t0 = time.perf_counter()
        outs = llm.generate(prompts, sp, use_tqdm=False)
        dt = time.perf_counter() - t0
        n_out = sum(len(o.outputs[0].token_ids) for o in outs)
        runs.append({"seconds": dt, "output_tokens": n_out, "output_tok_s": n_out / dt,
                     "total_tok_s": (n_out + spec["num_prompts"] * spec["input_len"]) / dt})
        token_ids = [list(o.outputs[0].token_ids) for o in outs]
    try:
        from moekern.vllm.hooks import plugin_summary  # importable by reference in vLLM's worker processes

        summary = llm.collective_rpc(plugin_summary)
    except Exception as exc:
        summary = f"unavailable: {exc!r}"
    result = {"init_s": init_s, "runs": runs,
              "output_tok_s": sorted(r["output_tok_s"] for r in runs)[len(runs) // 2],
              "plugin": summary}
    if spec.get("save_tokens"):
        result["token_ids"] = token_ids
    Path(spec["result"]).write_text(json.dumps(result))
    return 0


def run_offline_arm(args, arm: str, out: Path, extra_spec: dict | None = None) -> dict:
    res_path = out / f"offline_{arm}.json"
    res_path.unlink(missing_ok=True)
    spec = {"engine": engine_kwargs(args, arm), "seed": 0, "vocab": args.vocab, "input_len": args.input_len,
            "output_len": args.output_len, "num_prompts": args.num_prompts, "reps": args.reps,
            "ignore_eos": True, "result": str(res_path), **(extra_spec or {})}
    spec_path = out / f"offline_{arm}.spec.json"
    spec_path.write_text(json.dumps(spec))
    log = out / f"offline_{arm}.log"
    t0 = time.time()
    with open(log, "w") as fh:
        proc = subprocess.Popen([sys.executable, __file__, "--child-offline", str(spec_path)], env=arm_env(arm, out),
                                stdout=fh, stderr=subprocess.STDOUT, start_new_session=True, cwd=REPO)
        rc = _wait_group(proc, args.arm_timeout)
    r = {"arm": arm, "rc": rc, "wall_s": round(time.time() - t0, 1), "log": str(log)}
    if rc == 0 and res_path.exists():
        r.update(json.loads(res_path.read_text()))
    else:
        r["error"] = _tail(log)
    return r


# ---- served -----------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_group(proc: subprocess.Popen, timeout: float) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        return 124


def _kill_group(proc: subprocess.Popen, grace: float = 20.0) -> None:
    """SIGTERM the process group we started, then SIGKILL after a bounded wait."""
    if proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _tail(path: Path, n: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


def run_serve_arm(args, arm: str, out: Path) -> dict:
    port = _free_port()
    kw = engine_kwargs(args, arm)
    cmd = ["vllm", "serve", kw.pop("model"), "--host", "127.0.0.1", "--port", str(port), "--load-format",
           kw.pop("load_format"), "--dtype", kw.pop("dtype"), "--seed", "0", "--max-model-len", str(kw.pop("max_model_len")),
           "--gpu-memory-utilization", str(kw.pop("gpu_memory_utilization")), "--max-num-seqs", str(kw.pop("max_num_seqs")),
           "--attention-backend", kw.pop("attention_backend"),
           "--compilation-config", json.dumps(kw.pop("compilation_config"))]
    if "moe_backend" in kw:
        cmd += ["--moe-backend", kw.pop("moe_backend")]
    env = arm_env(arm, out)
    log = out / f"serve_{arm}.server.log"
    result_file = f"serve_{arm}.bench.json"
    (out / result_file).unlink(missing_ok=True)
    r = {"arm": arm, "cmd": " ".join(cmd)}
    t0 = time.time()
    with open(log, "w") as fh:
        server = subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True, cwd=REPO)
        try:
            ready = False
            while time.time() - t0 < args.server_timeout:
                if server.poll() is not None:
                    break
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as resp:
                        if resp.status == 200:
                            ready = True
                            break
                except Exception:
                    pass
                time.sleep(2)
            r["startup_s"] = round(time.time() - t0, 1)
            if not ready:
                r["error"] = "server did not become healthy: " + _tail(log)
                return r
            bench = ["vllm", "bench", "serve", "--backend", "vllm", "--base-url", f"http://127.0.0.1:{port}",
                     "--model", str(args.model_dir), "--tokenizer", str(args.model_dir), "--dataset-name", "random",
                     "--random-input-len", str(args.input_len), "--random-output-len", str(args.output_len),
                     "--num-prompts", str(args.serve_prompts), "--max-concurrency", str(args.concurrency),
                     "--request-rate", "inf", "--ignore-eos", "--seed", "0", "--num-warmups", "4",
                     "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,90,99",
                     "--save-result", "--result-dir", str(out), "--result-filename", result_file, "--disable-tqdm"]
            blog = out / f"serve_{arm}.bench.log"
            with open(blog, "w") as bfh:
                b = subprocess.Popen(bench, env=env, stdout=bfh, stderr=subprocess.STDOUT, start_new_session=True)
                rc = _wait_group(b, args.arm_timeout)
            r["bench_rc"] = rc
            if rc == 0 and (out / result_file).exists():
                res = json.loads((out / result_file).read_text())
                keys = [k for k in res if k.endswith("_ms") or "throughput" in k or k in ("completed", "duration")]
                r.update({k: res[k] for k in keys})
            else:
                r["error"] = "bench failed: " + _tail(blog)
        finally:
            _kill_group(server)
            r["server_stopped"] = server.poll() is not None
    return r


# ---- driver -----------------------------------------------------------------------------------------------
def prepare_model_dir(args, out: Path) -> None:
    if args.model_dir:
        args.model_dir = Path(args.model_dir)
        return
    src = HERE / "configs" / args.model / "config.json"
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


def summarize(results: dict) -> dict:
    def thr(mode, arm, key):
        r = results.get(mode, {}).get(arm) or {}
        return r.get(key)

    s = {}
    for mode, key in (("offline", "output_tok_s"), ("serve", "output_throughput")):
        base = thr(mode, "vllm", key)
        for arm in ("flashinfer", "moekern", "moekern-routing"):
            v = thr(mode, arm, key)
            if base and v:
                s[f"{mode}.{arm}_vs_vllm"] = round(v / base, 4)
    a, b = thr("offline", "moekern-routing", "output_tok_s"), thr("offline", "moekern-routing-log", "output_tok_s")
    if a and b:
        s["offline.gate_log_overhead"] = round(1 - b / a, 4)
    return s


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--child-offline", help=argparse.SUPPRESS)
    p.add_argument("--model", default="mixtral-8x7b-4l", choices=sorted(MODELS))
    p.add_argument("--model-dir", help="a real checkpoint directory (use with --load-format auto)")
    p.add_argument("--load-format", default="dummy")
    p.add_argument("--tokenizer", help="tokenizer directory for serve mode (default: $GPUENV_MIXTRAL_TOKENIZER)")
    p.add_argument("--mode", default="both", choices=("offline", "serve", "both"))
    p.add_argument("--arms", help=f"comma list (default offline {OFFLINE_ARMS}, serve {SERVE_ARMS})")
    p.add_argument("--quick", action="store_true", help="smaller workload for a short GPU call")
    p.add_argument("--out", type=Path)
    p.add_argument("--num-prompts", type=int)
    p.add_argument("--serve-prompts", type=int)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--input-len", type=int)
    p.add_argument("--output-len", type=int)
    p.add_argument("--reps", type=int)
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--gpu-mem", type=float, default=0.85)
    p.add_argument("--arm-timeout", type=float, default=300)
    p.add_argument("--server-timeout", type=float, default=300)
    p.add_argument("--budget-s", type=float, default=560, help="skip arms that would start after this many seconds")
    args = p.parse_args(argv)
    if args.child_offline:
        return child_offline(args.child_offline)

    q = args.quick
    args.num_prompts = args.num_prompts or (128 if q else 256)
    args.serve_prompts = args.serve_prompts or (128 if q else 256)
    args.input_len = args.input_len or (256 if q else 512)
    args.output_len = args.output_len or (64 if q else 128)
    args.reps = args.reps or (2 if q else 3)
    args.attention_backend = attention_backend(args.model)
    args.vocab = json.loads((HERE / "configs" / args.model / "config.json").read_text())["vocab_size"]
    args.has_tokenizer = False
    out = args.out or REPO / "benchmarks" / "results" / "e2e" / _dt.date.today().isoformat()
    out.mkdir(parents=True, exist_ok=True)
    prepare_model_dir(args, out)
    ep = plugin_entry_point()
    t_start = time.time()
    meta = {"model": args.model, "model_dir": str(args.model_dir), "load_format": args.load_format,
            "attention_backend": args.attention_backend, "plugin_entry_point": ep, "argv": sys.argv,
            "workload": {k: getattr(args, k) for k in ("num_prompts", "serve_prompts", "concurrency", "input_len",
                                                       "output_len", "reps", "max_model_len")}}
    try:
        import torch
        import vllm

        meta.update(vllm=vllm.__version__, torch=torch.__version__,
                    gpu=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
    except Exception as exc:
        meta["versions_error"] = repr(exc)
    results: dict = {"meta": meta, "offline": {}, "serve": {}}
    modes = ["offline", "serve"] if args.mode == "both" else [args.mode]
    for mode in modes:
        arms = args.arms.split(",") if args.arms else (OFFLINE_ARMS if mode == "offline" else SERVE_ARMS)
        for arm in arms:
            if arm not in ARMS:
                raise SystemExit(f"--arms: unknown arm {arm!r}; known {sorted(ARMS)}")
            if arm.startswith("moekern") and ep is None:
                results[mode][arm] = {"skipped": "moekern's vllm.general_plugins entry point is not installed "
                                                 "(pip install --no-build-isolation -e .)"}
                continue
            if mode == "serve" and not args.has_tokenizer and args.load_format == "dummy":
                results[mode][arm] = {"skipped": "serve needs a tokenizer (--tokenizer or $GPUENV_MIXTRAL_TOKENIZER)"}
                continue
            if time.time() - t_start > args.budget_s:
                results[mode][arm] = {"skipped": f"time budget {args.budget_s}s spent"}
                continue
            print(f"[{time.time() - t_start:6.0f}s] {mode} {arm} ...", flush=True)
            r = run_offline_arm(args, arm, out) if mode == "offline" else run_serve_arm(args, arm, out)
            if ARMS[arm][2] and "error" not in r:
                r["gate_log"] = check_gate_logs(out / "gate_logs" / arm)
            results[mode][arm] = r
            brief = {k: r.get(k) for k in ("rc", "output_tok_s", "output_throughput", "mean_ttft_ms", "mean_tpot_ms",
                                           "error") if r.get(k) is not None}
            print(f"[{time.time() - t_start:6.0f}s]   -> {json.dumps(brief)[:600]}", flush=True)
            (out / f"e2e_{args.model}.json").write_text(json.dumps(results, indent=1))
    results["summary"] = summarize(results)
    (out / f"e2e_{args.model}.json").write_text(json.dumps(results, indent=1))
    print(json.dumps(results["summary"], indent=1))
    print("results:", out / f"e2e_{args.model}.json")
    return 0


def check_gate_logs(path: Path) -> dict:
    from moekern.gatelog import read_gate_log

    try:
        records, skipped = read_gate_log(path)
    except FileNotFoundError:
        return {"ok": False, "error": f"no gate log under {path}"}
    bad = sum(1 for r in records if r.top_k and sum(r.expert_counts) != r.num_tokens * r.top_k)
    phases: dict = {}
    for r in records:
        phases[r.phase] = phases.get(r.phase, 0) + 1
    metas = [json.loads(m.read_text()) for m in sorted(path.glob("*.meta.json"))]
    return {"ok": bool(records) and not skipped and not bad, "records": len(records), "skipped_lines": len(skipped),
            "steps": len({(r.rank, r.step) for r in records}), "phases": phases, "sum_mismatch": bad,
            "dropped_steps": sum(m.get("dropped_steps", 0) for m in metas)}


if __name__ == "__main__":
    sys.exit(main())
