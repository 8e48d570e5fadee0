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
    python benchmarks/e2e/preflight.py                        # ~20-40 s, no model: every vLLM hook target
    python benchmarks/e2e/run_e2e.py --quick --mode offline   # ~5-7 min on one H100
Every invocation runs preflight.py first (once, in a subprocess) and starts no arm when it reports a FAIL
(--no-preflight skips it).
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


def capture_sizes(max_num_seqs: int) -> list[int]:
    """CUDA-graph batch sizes: CAPTURE_SIZES below max_num_seqs, then max_num_seqs itself (the largest decode
    batch), so every arm captures the same graphs for a given max_num_seqs (128 -> CAPTURE_SIZES)."""
    return [s for s in CAPTURE_SIZES if s < max_num_seqs] + [max_num_seqs]


def gate_log_dir(args, arm: str, out: Path) -> Path | None:
    """Where `arm` writes gate logs, or None for no gate log. --gate-log-dir DIR turns them on for every arm
    (the plugin logs vLLM's own routing too when it is installed): DIR itself when one arm runs, else
    DIR/<arm>. Without it, the arms marked as logging in ARMS write to OUT/gate_logs/<arm>."""
    if getattr(args, "gate_log_dir", None):
        base = Path(args.gate_log_dir)
        return base if getattr(args, "num_arms", 1) == 1 else base / arm
    return out / "gate_logs" / arm if ARMS[arm][2] else None


def arm_env(arm: str, out: Path, gate_dir: Path | None = None, base_env: dict | None = None) -> dict:
    """The arm's subprocess environment: ours without MOEKERN_*, plus the arm's plugin settings."""
    src = os.environ if base_env is None else base_env
    env = {k: v for k, v in src.items() if not k.startswith("MOEKERN_")}
    env.update(ARMS[arm][0])
    env["VLLM_USE_FLASHINFER_SAMPLER"] = "0"
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    if gate_dir is not None:
        env["MOEKERN_GATE_LOG_DIR"] = str(gate_dir)
    return env


def engine_kwargs(args, arm: str) -> dict:
    """vLLM engine arguments of one arm (LLM(**kw) offline; serve_command turns them into CLI flags)."""
    kw = dict(model=str(args.model_dir), load_format=args.load_format, dtype="bfloat16", seed=0,
              max_model_len=args.max_model_len, gpu_memory_utilization=args.gpu_mem,
              max_num_seqs=args.max_num_seqs, attention_backend=args.attention_backend,
              compilation_config={"cudagraph_capture_sizes": capture_sizes(args.max_num_seqs)})
    if args.max_num_batched_tokens:
        kw["max_num_batched_tokens"] = args.max_num_batched_tokens
    if args.tensor_parallel_size > 1:
        kw["tensor_parallel_size"] = args.tensor_parallel_size
    if args.enable_eplb:  # vLLM: EPLB needs expert parallelism (and TP/DP > 1, checked in check_args)
        kw.update(enable_expert_parallel=True, enable_eplb=True)
    kw.update(ARMS[arm][1])
    return kw


# engine kwarg -> `vllm serve` flag; booleans become bare flags, dicts JSON
_SERVE_FLAGS = ("load_format", "dtype", "seed", "max_model_len", "gpu_memory_utilization", "max_num_seqs",
                "max_num_batched_tokens", "tensor_parallel_size", "enable_expert_parallel", "enable_eplb",
                "attention_backend", "compilation_config", "moe_backend")


def serve_command(kw: dict, port: int) -> list[str]:
    """`vllm serve` argv for engine kwargs `kw` (from engine_kwargs) on 127.0.0.1:`port`."""
    unknown = sorted(set(kw) - set(_SERVE_FLAGS) - {"model"})
    if unknown:
        raise ValueError(f"engine kwargs {unknown} have no vllm serve flag mapping; known {_SERVE_FLAGS}")
    cmd = ["vllm", "serve", str(kw["model"]), "--host", "127.0.0.1", "--port", str(port)]
    for key in _SERVE_FLAGS:
        if key not in kw or kw[key] is None or kw[key] is False:
            continue
        flag = "--" + key.replace("_", "-")
        v = kw[key]
        cmd += [flag] if v is True else [flag, json.dumps(v) if isinstance(v, dict) else str(v)]
    return cmd


def bench_command(args, port: int, result_dir: Path, result_file: str) -> list[str]:
    """`vllm bench serve` argv: random token prompts, or --dataset's prompts as vLLM's custom dataset
    (JSONL with a "prompt" per line; no chat template, so the server sees the same text as offline mode;
    every request generates exactly output_len tokens)."""
    cmd = ["vllm", "bench", "serve", "--backend", "vllm", "--base-url", f"http://127.0.0.1:{port}",
           "--model", str(args.model_dir), "--tokenizer", str(args.model_dir)]
    if args.dataset:
        cmd += ["--dataset-name", "custom", "--dataset-path", str(args.dataset), "--custom-output-len",
                str(args.output_len), "--skip-chat-template"]
    else:
        cmd += ["--dataset-name", "random", "--random-input-len", str(args.input_len), "--random-output-len",
                str(args.output_len)]
    return cmd + ["--num-prompts", str(args.serve_prompts), "--max-concurrency", str(args.concurrency),
                  "--request-rate", "inf", "--ignore-eos", "--seed", "0", "--num-warmups", "4",
                  "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,90,99",
                  "--save-result", "--result-dir", str(result_dir), "--result-filename", result_file,
                  "--disable-tqdm"]


def read_dataset_prompts(path, encode, num_prompts: int) -> list[list[int]]:
    """Token ids of the first `num_prompts` prompts of a `moekern datasets generate` JSONL file (cycled when
    the file has fewer), `encode(text) -> list[int]` being the model's tokenizer (with its BOS, as the server
    adds it). Raises ValueError naming the line for a line without a "prompt" string."""
    texts = []
    for i, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"--dataset {str(path)!r} line {i}: not JSON ({exc})") from exc
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
            raise ValueError(f"--dataset {str(path)!r} line {i}: expected an object with a \"prompt\" string")
        texts.append(row["prompt"])
    if not texts:
        raise ValueError(f"--dataset {str(path)!r} holds no prompts")
    return [list(encode(texts[i % len(texts)])) for i in range(num_prompts)]


def _hf_encode(model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    return lambda text: tok(text).input_ids


def offline_spec(args, arm: str, res_path: Path, prompt_token_ids: list[list[int]] | None = None) -> dict:
    """What the offline child runs: engine kwargs and the workload (random token prompts of input_len from
    `seed`, or the given prompt token ids)."""
    spec = {"engine": engine_kwargs(args, arm), "seed": 0, "vocab": args.vocab, "input_len": args.input_len,
            "output_len": args.output_len, "num_prompts": args.num_prompts, "reps": args.reps,
            "ignore_eos": True, "result": str(res_path)}
    if prompt_token_ids is not None:
        spec["prompt_token_ids"] = prompt_token_ids
        spec["num_prompts"] = len(prompt_token_ids)
    return spec


# ---- offline child: runs inside the arm's subprocess ------------------------------------------------------
def child_offline(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    import numpy as np
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    t_init = time.perf_counter()
    llm = LLM(skip_tokenizer_init=True, **spec["engine"])
    init_s = time.perf_counter() - t_init
    ids = spec.get("prompt_token_ids")
    if ids is None:
        rng = np.random.default_rng(spec["seed"])
        ids = [rng.integers(100, spec["vocab"] - 100, spec["input_len"]).tolist() for _ in range(spec["num_prompts"])]
    prompts = [TokensPrompt(prompt_token_ids=p) for p in ids]
    n_in = sum(len(p) for p in ids)
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
                     "total_tok_s": (n_out + n_in) / dt})
        token_ids = [list(o.outputs[0].token_ids) for o in outs]
    try:
        # By method name: vLLM 0.26 msgpack-encodes collective_rpc's method and refuses a function unless
        # VLLM_ALLOW_INSECURE_SERIALIZATION=1; the plugin adds Worker.moekern_plugin_summary (hooks.py).
        summary = llm.collective_rpc("moekern_plugin_summary")
    except Exception as exc:  # plugin off (the vllm/flashinfer arms): no such method
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
    ids = read_dataset_prompts(args.dataset, _hf_encode(args.model_dir), args.num_prompts) if args.dataset else None
    spec = {**offline_spec(args, arm, res_path, ids), **(extra_spec or {})}
    spec_path = out / f"offline_{arm}.spec.json"
    spec_path.write_text(json.dumps(spec))
    log = out / f"offline_{arm}.log"
    t0 = time.time()
    with open(log, "w") as fh:
        proc = subprocess.Popen([sys.executable, __file__, "--child-offline", str(spec_path)],
                                env=arm_env(arm, out, _fresh_gate_dir(args, arm, out)),
                                stdout=fh, stderr=subprocess.STDOUT, start_new_session=True, cwd=REPO)
        rc = _wait_group(proc, args.arm_timeout)
    r = {"arm": arm, "rc": rc, "wall_s": round(time.time() - t0, 1), "log": str(log)}
    if rc == 0 and res_path.exists():
        r.update(json.loads(res_path.read_text()))
        r["plugin_check"] = plugin_check(arm, r.get("plugin"))
    else:
        r["error"] = _tail(log)
    return r


def plugin_check(arm: str, summary) -> dict:
    """Whether the plugin did in the arm's workers what the arm is named for, from the workers'
    moekern_plugin_summary list: installed, MoE layers hooked, every layer routed by moekern (routing arms)
    and running moekern's experts (the moekern arm). Plugin-off arms need nothing."""
    kernels = ARMS[arm][0].get("MOEKERN_KERNELS", "off")
    if kernels == "off":
        return {"ok": True, "why": "plugin off"}
    if not isinstance(summary, list) or not summary or not all(isinstance(s, dict) for s in summary):
        return {"ok": False, "why": f"no plugin summary from the workers: {str(summary)[:300]}"}
    problems = []
    for rank, s in enumerate(summary):
        layers = s.get("layers") or []
        if not s.get("installed") or s.get("kernels") != kernels:
            problems.append(f"worker {rank}: installed={s.get('installed')} kernels={s.get('kernels')}")
        if not layers:
            problems.append(f"worker {rank}: no MoE layer hooked")
        fallback = [l["name"] for l in layers if not any(v for v in (l.get("moekern_routing") or {}).values())]
        if fallback:
            problems.append(f"worker {rank}: {len(fallback)} layer(s) kept vLLM routing, e.g. {fallback[0]}")
        if kernels == "all":
            not_ours = [l["name"] for l in layers if l.get("moekern_experts") is not True]
            if not_ours:
                problems.append(f"worker {rank}: {len(not_ours)} layer(s) kept vLLM experts, e.g. {not_ours[0]}")
    n = sum(len(s.get("layers") or []) for s in summary)
    return {"ok": not problems, "why": "; ".join(problems) or f"{n} MoE layer(s) on moekern {kernels}"}


def _fresh_gate_dir(args, arm: str, out: Path) -> Path | None:
    d = gate_log_dir(args, arm, out)
    if d is not None:  # an old run's records must not mix into this one's
        shutil.rmtree(d, ignore_errors=True)
    return d


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
    cmd = serve_command(engine_kwargs(args, arm), port)
    env = arm_env(arm, out, _fresh_gate_dir(args, arm, out))
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
            bench = bench_command(args, port, out, result_file)
            r["bench_cmd"] = " ".join(bench)
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


# ---- preflight --------------------------------------------------------------------------------------------
def preflight_command(args) -> list[str]:
    """benchmarks/e2e/preflight.py for the arms and modes this invocation will run."""
    arms = list(dict.fromkeys(a for arms in args.arm_plan.values() for a in arms))
    modes = list(args.arm_plan)
    mode = "both" if len(modes) > 1 else modes[0]
    return [sys.executable, str(HERE / "preflight.py"), "--arms", ",".join(arms), "--mode", mode,
            "--model", args.model]


def run_preflight(args, run=subprocess.run, timeout: float = 240) -> tuple[bool, str]:
    """Run the preflight once in a subprocess (the arms' environment, plugin off). Returns (ok, output);
    a preflight that cannot run at all (timeout, crash) is a failure too."""
    env = arm_env("vllm", Path("."))
    try:
        proc = run(preflight_command(args), env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        return False, f"FAIL preflight: timed out after {timeout}s\n{exc.stdout or ''}"
    text = (proc.stdout or "") + (proc.stderr or "")
    if proc.returncode != 0 and not any(line.startswith("FAIL ") for line in text.splitlines()):
        text += f"\nFAIL preflight: exited {proc.returncode} without a report"
    return proc.returncode == 0, text


# ---- driver -----------------------------------------------------------------------------------------------
def prepare_model_dir(args, out: Path) -> None:
    if args.model_dir:
        args.model_dir = Path(args.model_dir)
        args.has_tokenizer = any((args.model_dir / f).exists()
                                 for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))
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
    for arm, r in (results.get("offline") or {}).items():
        check = (r or {}).get("plugin_check") or {}
        if not check.get("ok", True):  # its ratio above measures vLLM, not moekern
            s[f"offline.{arm}_plugin_check_failed"] = check.get("why")
    a, b = thr("offline", "moekern-routing", "output_tok_s"), thr("offline", "moekern-routing-log", "output_tok_s")
    if a and b:
        s["offline.gate_log_overhead"] = round(1 - b / a, 4)
        # How far apart one arm's repetitions are ((max - min) / median of output tok/s, the worse of the two
        # arms): an overhead smaller than this is not resolved by the run.
        spreads = [rep_spread(thr("offline", arm, "runs")) for arm in ("moekern-routing", "moekern-routing-log")]
        if all(x is not None for x in spreads):
            s["offline.gate_log_overhead_noise"] = round(max(spreads), 4)
    return s


def rep_spread(runs) -> float | None:
    """(max - min) / median of the repetitions' output tok/s; None for fewer than two repetitions."""
    vals = sorted(r["output_tok_s"] for r in runs or [] if r.get("output_tok_s"))
    if len(vals) < 2:
        return None
    return (vals[-1] - vals[0]) / vals[len(vals) // 2]


def build_parser() -> argparse.ArgumentParser:
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
    p.add_argument("--max-num-seqs", type=int, default=128,
                   help="vLLM max_num_seqs (CUDA graphs are captured up to it); default 128")
    p.add_argument("--max-num-batched-tokens", type=int, help="vLLM max_num_batched_tokens (default: vLLM's)")
    p.add_argument("--tensor-parallel-size", type=int, default=1)
    p.add_argument("--enable-eplb", action="store_true",
                   help="vLLM expert-parallel load balancing (turns on expert parallelism; needs "
                        "--tensor-parallel-size > 1)")
    p.add_argument("--dataset", type=Path,
                   help="JSONL of prompts from `moekern datasets generate` instead of random tokens: tokenized "
                        "with the model's tokenizer offline, vLLM's custom dataset in serve mode")
    p.add_argument("--gate-log-dir", type=Path,
                   help="gate logs of every arm go here (one arm) or to DIR/<arm> (several)")
    p.add_argument("--result", type=Path,
                   help="copy the serve bench JSON here with a 'moekern' block describing the run "
                        "(needs --mode serve and one arm; what `moekern sweep` and `moekern report` read)")
    p.add_argument("--arm-timeout", type=float, default=300)
    p.add_argument("--server-timeout", type=float, default=300)
    p.add_argument("--budget-s", type=float, default=560, help="skip arms that would start after this many seconds")
    p.add_argument("--no-preflight", action="store_true",
                   help="skip benchmarks/e2e/preflight.py (run first by default; a FAIL there stops the run)")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    """Parsed, defaulted and checked arguments; argparse errors (exit 2) name the bad flag. Touches no
    files except reading the model's committed config.json for its vocab size."""
    p = build_parser()
    args = p.parse_args(argv)
    if args.child_offline:
        return args
    q = args.quick
    args.num_prompts = args.num_prompts or (128 if q else 256)
    args.serve_prompts = args.serve_prompts or (128 if q else 256)
    args.input_len = args.input_len or (256 if q else 512)
    args.output_len = args.output_len or (64 if q else 128)
    args.reps = args.reps or 5  # repetitions are cheap next to an arm's start-up (~1 min)
    args.attention_backend = attention_backend(args.model)
    args.vocab = json.loads((HERE / "configs" / args.model / "config.json").read_text())["vocab_size"]
    args.has_tokenizer = False
    modes = ["offline", "serve"] if args.mode == "both" else [args.mode]
    args.arm_plan = {m: (args.arms.split(",") if args.arms else (OFFLINE_ARMS if m == "offline" else SERVE_ARMS))
                     for m in modes}
    for arms in args.arm_plan.values():
        for arm in arms:
            if arm not in ARMS:
                p.error(f"--arms: unknown arm {arm!r}; known {sorted(ARMS)}")
    args.num_arms = len({a for arms in args.arm_plan.values() for a in arms})
    for flag in ("max_num_seqs", "max_num_batched_tokens", "tensor_parallel_size"):
        v = getattr(args, flag)
        if v is not None and v < 1:
            p.error(f"--{flag.replace('_', '-')}={v} must be >= 1")
    if args.enable_eplb and args.tensor_parallel_size < 2:
        p.error(f"--enable-eplb needs --tensor-parallel-size > 1 (vLLM's EPLB balances across the EP group); "
                f"got --tensor-parallel-size={args.tensor_parallel_size}")
    if args.dataset is not None and not args.dataset.is_file():
        p.error(f"--dataset {str(args.dataset)!r} is not a file")
    if args.result is not None and (modes != ["serve"] or len(args.arm_plan["serve"]) != 1):
        p.error(f"--result holds one serve run: it needs --mode serve and one arm in --arms; got --mode "
                f"{args.mode} and arms {args.arm_plan}")
    return args


def result_metadata(args, arm: str, gate_dir: Path | None) -> dict:
    """The 'moekern' block of a --result file, in the keys moekern.analysis.serving groups by
    (moe_backend, max_num_seqs, max_num_batched_tokens, eplb) plus dataset, predicted_score and gate_log
    (relative to the result file, so a results folder can move as a whole)."""
    from moekern.analysis.sweep import predicted_score_from_name

    meta = {"moe_backend": arm, "max_num_seqs": args.max_num_seqs,
            "max_num_batched_tokens": args.max_num_batched_tokens, "eplb": bool(args.enable_eplb),
            "tensor_parallel_size": args.tensor_parallel_size, "model": args.model,
            "load_format": args.load_format, "concurrency": args.concurrency, "num_prompts": args.serve_prompts,
            "output_len": args.output_len, "runner": "benchmarks/e2e/run_e2e.py"}
    if args.dataset:
        meta["dataset"] = Path(args.dataset).name
        score = predicted_score_from_name(args.dataset)
        if score is not None:
            meta["predicted_score"] = score
    else:
        meta["input_len"] = args.input_len
    if gate_dir is not None and args.result is not None and Path(gate_dir).exists():
        meta["gate_log"] = os.path.relpath(Path(gate_dir).resolve(), Path(args.result).resolve().parent)
    return meta


def write_result(args, arm: str, bench_json: Path, gate_dir: Path | None) -> Path:
    """Copy a serve arm's bench JSON to --result with the run's 'moekern' block."""
    obj = json.loads(bench_json.read_text())
    obj["moekern"] = {**obj.get("moekern", {}), **result_metadata(args, arm, gate_dir)}
    args.result.parent.mkdir(parents=True, exist_ok=True)
    args.result.write_text(json.dumps(obj, indent=1))
    return args.result


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child_offline:
        return child_offline(args.child_offline)
    out = args.out or REPO / "benchmarks" / "results" / "e2e" / _dt.date.today().isoformat()
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
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
    ep = plugin_entry_point()
    meta = {"model": args.model, "model_dir": str(args.model_dir), "load_format": args.load_format,
            "attention_backend": args.attention_backend, "plugin_entry_point": ep, "argv": sys.argv,
            "workload": {k: getattr(args, k) for k in ("num_prompts", "serve_prompts", "concurrency", "input_len",
                                                       "output_len", "reps", "max_model_len")},
            "engine": {"max_num_seqs": args.max_num_seqs, "max_num_batched_tokens": args.max_num_batched_tokens,
                       "tensor_parallel_size": args.tensor_parallel_size, "eplb": bool(args.enable_eplb)},
            "dataset": str(args.dataset) if args.dataset else None,
            "gate_log_dir": str(args.gate_log_dir) if args.gate_log_dir else None,
            "result": str(args.result) if args.result else None}
    try:
        import torch
        import vllm

        meta.update(vllm=vllm.__version__, torch=torch.__version__,
                    gpu=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
    except Exception as exc:
        meta["versions_error"] = repr(exc)
    results: dict = {"meta": meta, "offline": {}, "serve": {}}
    for mode, arms in args.arm_plan.items():
        for arm in arms:
            if arm.startswith("moekern") and ep is None:
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
                results[mode][arm] = {"skipped": f"time budget {args.budget_s}s spent"}
                continue
            print(f"[{time.time() - t_start:6.0f}s] {mode} {arm} ...", flush=True)
            r = run_offline_arm(args, arm, out) if mode == "offline" else run_serve_arm(args, arm, out)
            gdir = gate_log_dir(args, arm, out)
            if gdir is not None and "error" not in r:
                r["gate_log"] = check_gate_logs(gdir)
            if mode == "serve" and args.result is not None and "error" not in r:
                r["result"] = str(write_result(args, arm, out / f"serve_{arm}.bench.json", gdir))
            results[mode][arm] = r
            brief = {k: r.get(k) for k in ("rc", "output_tok_s", "output_throughput", "mean_ttft_ms", "mean_tpot_ms",
                                           "error") if r.get(k) is not None}
            if not (r.get("plugin_check") or {}).get("ok", True):
                brief["plugin_check"] = r["plugin_check"]["why"]
            print(f"[{time.time() - t_start:6.0f}s]   -> {json.dumps(brief)[:600]}", flush=True)
            (out / f"e2e_{args.model}.json").write_text(json.dumps(results, indent=1, default=str))
    results["summary"] = summarize(results)
    (out / f"e2e_{args.model}.json").write_text(json.dumps(results, indent=1, default=str))
    print(json.dumps(results["summary"], indent=1))
    print("results:", out / f"e2e_{args.model}.json")
    if args.result is not None and not args.result.exists():
        print(f"--result {args.result} was not written (the serve arm failed or was skipped)", file=sys.stderr)
        return 1
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
