"""The arms of the A/B and what each one runs: its plugin environment, its vLLM engine arguments, the
`vllm serve` / `vllm bench serve` command lines built from them, and whether the plugin did in the arm's
workers what the arm is named for.

Arms (plugin env in brackets; all keep VLLM_USE_FLASHINFER_SAMPLER=0 and attention on Triton):
  vllm                 vLLM default (unquantized MoE -> Triton on sm90)        [MOEKERN_KERNELS=off]
  flashinfer           --moe-backend flashinfer_cutlass (bf16 CUTLASS MoE, sm90 supported in 0.26)
  moekern-routing      moekern.fused_topk routing, no gate log                 [routing]
  moekern-routing-log  the same with gate logs                                 [routing + GATE_LOG_DIR]
  moekern-routing-log-torch  the same, the per-step hand-off by torch calls
                       (not moekern's one-kernel snapshot; A/B of the two)     [... + GATE_LOG_SNAPSHOT=torch]
  moekern              moekern routing + experts, gate logs on                 [all + GATE_LOG_DIR]
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

# The directory that holds the moekern package: the checkout in a source tree, site-packages when installed.
# The arms' processes get it on PYTHONPATH, so `python -m moekern.e2e....` finds this very copy of moekern.
PACKAGE_ROOT = Path(__file__).resolve().parents[2]

# arm -> (plugin environment, engine kwargs over engine_kwargs' common ones, writes gate logs by default)
ARMS = {
    "vllm": ({"MOEKERN_KERNELS": "off"}, {}, False),
    # vLLM 0.26, checked against its sources: moe_backend is a KernelConfig field (config/kernel.py:122-139,
    # :184), mapped for unquantized layers to FLASHINFER_CUTLASS (fused_moe/oracle/unquantized.py:155), i.e.
    # FlashInferExperts, which takes sm90 with no quantization (experts/flashinfer_cutlass_moe.py:131-165) and
    # calls FlashInfer's cutlass_fused_moe with quant_scales=[] (:371); the w13 halves are swapped to
    # FlashInfer's [up; gate] at load (unquantized.py:325). No VLLM_USE_FLASHINFER_MOE_* variable gates the bf16
    # path. Needs nvcc on PATH (utils/flashinfer.py has_flashinfer) and FlashInfer's fused-MoE JIT build in
    # ~/.cache/flashinfer (tools/gpu/flashinfer_warmup.py; built inside the arm it would outlast --arm-timeout);
    # vLLM then autotunes FlashInfer's tactics at warm-up (kernel_warmup.flashinfer_autotune; on at -O2).
    "flashinfer": ({"MOEKERN_KERNELS": "off"}, {"moe_backend": "flashinfer_cutlass"}, False),
    "moekern-routing": ({"MOEKERN_KERNELS": "routing"}, {}, False),
    "moekern-routing-log": ({"MOEKERN_KERNELS": "routing"}, {}, True),
    "moekern-routing-log-torch": ({"MOEKERN_KERNELS": "routing", "MOEKERN_GATE_LOG_SNAPSHOT": "torch"}, {}, True),
    "moekern": ({"MOEKERN_KERNELS": "all"}, {}, True),
}
OFFLINE_ARMS = ["vllm", "flashinfer", "moekern-routing", "moekern-routing-log", "moekern"]
SERVE_ARMS = ["vllm", "flashinfer", "moekern"]
CAPTURE_SIZES = [1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128]  # the same for every arm; max_num_seqs=128


def plugin_entry_point() -> str | None:
    """moekern's vllm.general_plugins entry point ("moekern.vllm:register"), None when moekern is not installed."""
    from importlib.metadata import entry_points

    for ep in entry_points(group="vllm.general_plugins"):
        if ep.name == "moekern":
            return ep.value
    return None


def capture_sizes(max_num_seqs: int) -> list[int]:
    """CUDA-graph batch sizes: CAPTURE_SIZES below max_num_seqs, then max_num_seqs itself (the largest decode
    batch), so every arm captures the same graphs for a given max_num_seqs (128 -> CAPTURE_SIZES)."""
    return [s for s in CAPTURE_SIZES if s < max_num_seqs] + [max_num_seqs]


def gate_log_dir(args, arm: str, out: Path, round_no: int | None = None) -> Path | None:
    """Where `arm` writes gate logs, or None for no gate log. --gate-log-dir DIR turns them on for every arm
    (the plugin logs vLLM's own routing too when it is installed): DIR itself when one arm runs, else
    DIR/<arm>. Without it, the arms marked as logging in ARMS write to OUT/gate_logs/<arm>. With --rounds,
    round k of an arm writes to a round<k> folder inside that."""
    if getattr(args, "gate_log_dir", None):
        base = Path(args.gate_log_dir)
        d = base if getattr(args, "num_arms", 1) == 1 else base / arm
    elif ARMS[arm][2]:
        d = out / "gate_logs" / arm
    else:
        return None
    return d if round_no is None else d / f"round{round_no}"


def arm_env(arm: str, out: Path, gate_dir: Path | None = None, base_env: dict | None = None,
            router_seed: int | None = None, moe_configs: str | None = None) -> dict:
    """The arm's subprocess environment: ours without MOEKERN_*, plus the arm's plugin settings (and
    MOEKERN_DUMMY_ROUTER_SEED when router_seed is given: every arm, so all of them run the same weights;
    MOEKERN_MOE_CONFIGS when moe_configs is given: read only where moekern's experts run)."""
    src = os.environ if base_env is None else base_env
    env = {k: v for k, v in src.items() if not k.startswith("MOEKERN_")}
    env.update(ARMS[arm][0])
    env["VLLM_USE_FLASHINFER_SAMPLER"] = "0"
    # Unbuffered prints (Triton's autotune report among them) land in the log in the order they happen, so
    # the measurement marker splits the log at the right place.
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([str(PACKAGE_ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    if gate_dir is not None:
        env["MOEKERN_GATE_LOG_DIR"] = str(gate_dir)
    if router_seed is not None:
        env["MOEKERN_DUMMY_ROUTER_SEED"] = str(router_seed)
    if moe_configs:
        env["MOEKERN_MOE_CONFIGS"] = moe_configs
    return env


def engine_kwargs(args, arm: str) -> dict:
    """vLLM engine arguments of one arm (LLM(**kw) offline; serve_command turns them into CLI flags)."""
    kw = dict(model=str(args.model_dir), load_format=args.load_format, dtype="bfloat16", seed=0,
              max_model_len=args.max_model_len, gpu_memory_utilization=args.gpu_mem,
              max_num_seqs=args.max_num_seqs, attention_backend=args.attention_backend,
              compilation_config={"cudagraph_capture_sizes": capture_sizes(args.max_num_seqs)},
              # Steady state: identical prompts every pass must be prefilled every pass, and every post-warm-up
              # compile must be logged (the monitor's default logs only the first per kernel).
              enable_prefix_caching=False, jit_monitor_verbose=True)
    if args.max_num_batched_tokens:
        kw["max_num_batched_tokens"] = args.max_num_batched_tokens
    if args.tensor_parallel_size > 1:
        kw["tensor_parallel_size"] = args.tensor_parallel_size
    if args.enable_expert_parallel:  # also set by --enable-eplb (parse_args): EPLB needs expert parallelism
        kw["enable_expert_parallel"] = True
    if args.enable_eplb:
        kw["enable_eplb"] = True
    kw.update(ARMS[arm][1])
    return kw


# engine kwarg -> `vllm serve` flag; True becomes a bare flag, dicts JSON, False is left out except for the
# flags in _NEGATED_WHEN_FALSE, whose vLLM default is on (argparse.BooleanOptionalAction: --no-<flag>)
_SERVE_FLAGS = ("load_format", "dtype", "seed", "max_model_len", "gpu_memory_utilization", "max_num_seqs",
                "max_num_batched_tokens", "tensor_parallel_size", "enable_expert_parallel", "enable_eplb",
                "attention_backend", "compilation_config", "moe_backend", "enable_prefix_caching",
                "jit_monitor_verbose")
_NEGATED_WHEN_FALSE = ("enable_prefix_caching",)


def serve_command(kw: dict, port: int) -> list[str]:
    """`vllm serve` argv for engine kwargs `kw` (from engine_kwargs) on 127.0.0.1:`port`."""
    unknown = sorted(set(kw) - set(_SERVE_FLAGS) - {"model"})
    if unknown:
        raise ValueError(f"engine kwargs {unknown} have no vllm serve flag mapping; known {_SERVE_FLAGS}")
    cmd = ["vllm", "serve", str(kw["model"]), "--host", "127.0.0.1", "--port", str(port)]
    for key in _SERVE_FLAGS:
        if key not in kw or kw[key] is None:
            continue
        flag = "--" + key.replace("_", "-")
        v = kw[key]
        if v is False:
            if key in _NEGATED_WHEN_FALSE:
                cmd.append("--no-" + key.replace("_", "-"))
            continue
        cmd += [flag] if v is True else [flag, json.dumps(v) if isinstance(v, dict) else str(v)]
    return cmd


def bench_command(args, port: int, result_dir: Path, result_file: str) -> list[str]:
    """`vllm bench serve` argv: random token prompts, or --dataset's prompts as vLLM's custom dataset
    (JSONL with a "prompt" per line; no chat template, so the server sees the same text as offline mode;
    every request generates exactly output_len tokens, greedily as offline). The warm-up run and the timed
    runs use this same command (same seed, so the same prompts; prefix caching is off on the server)."""
    cmd = ["vllm", "bench", "serve", "--backend", "vllm", "--base-url", f"http://127.0.0.1:{port}",
           "--model", str(args.model_dir), "--tokenizer", str(args.model_dir)]
    if args.dataset:
        cmd += ["--dataset-name", "custom", "--dataset-path", str(args.dataset), "--custom-output-len",
                str(args.output_len), "--skip-chat-template"]
    else:
        cmd += ["--dataset-name", "random", "--random-input-len", str(args.input_len), "--random-output-len",
                str(args.output_len)]
    return cmd + ["--num-prompts", str(args.serve_prompts), "--max-concurrency", str(args.concurrency),
                  "--request-rate", "inf", "--ignore-eos", "--temperature", "0", "--seed", "0", "--num-warmups", "4",
                  "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,90,99",
                  "--save-result", "--result-dir", str(result_dir), "--result-filename", result_file,
                  "--disable-tqdm"]


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


def fresh_gate_dir(args, arm: str, out: Path, round_no: int | None = None) -> Path | None:
    """gate_log_dir, emptied first; None for no gate log."""
    d = gate_log_dir(args, arm, out, round_no)
    if d is not None:  # an old run's records must not mix into this one's
        shutil.rmtree(d, ignore_errors=True)
    return d
