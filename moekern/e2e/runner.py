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
  moekern-routing-log-torch  the same, the per-step hand-off by torch calls
                       (not moekern's one-kernel snapshot; A/B of the two)     [... + GATE_LOG_SNAPSHOT=torch]
  moekern              moekern routing + experts, gate logs on                 [all + GATE_LOG_DIR]
Ratios reported: moekern / vllm output throughput from the arms' medians with the repetitions' spread
next to them (target >= 1.05), gate-log overhead = 1 - routing-log / routing (target <= 2%). Across
engines that overhead drowns in pass-to-pass noise (passes of one arm spread 14-27 % on the H100 runs);
--gate-log-paired measures it within one engine instead: a logging arm's timed passes alternate gate log
on / paused (ABBA), and the overhead comes from adjacent pairs, with a bootstrap interval over pairs.

Steady state (the first H100 run, benchmarks/results/e2e/h100-2026-11-23/, was not): every arm runs with
prefix caching off (the same prompts every repetition would otherwise skip prefill from the second one on)
and vLLM's JIT monitor in verbose mode (it logs every Triton compile after warm-up, not only the first per
kernel). Before anything is timed each arm runs discarded warm-up passes of the very workload it measures
(offline: a 16-prompt pass, a shape sweep — one forward step of every size that meets a distinct fused-MoE
tile config or divisibility variant, MOE_CONFIG_KEYS — then --warmup-reps full passes, and more, up to
--warmup-max-reps, while the last one still compiled a kernel; serve: the same shape sweep as /v1/completions
requests, then one full `vllm bench serve` run against
the same server; `vllm bench serve --num-warmups` only repeats the first prompt, so it cannot cover the
batch shapes). A marker line then splits the arm's log; the JIT compilations logged after it are stored as
`jit_during_measurement`, and a mode whose arms compiled anything while measured is reported as not steady
state (its ratios are not a valid A/B).

The moekern arms need the plugin's entry point, i.e. moekern pip-installed (`pip install -e .`); the
script checks and refuses to report plugin arms that did not load it.

    source /tmp/gpuenv/env.sh
    python moekern/e2e/preflight.py                        # ~20-40 s, no model: every vLLM hook target
    python moekern/e2e/run_e2e.py --quick --mode offline --arms vllm,moekern-routing,moekern-routing-log,moekern
                                                              # ~7 min on one H100 (estimate printed first)
Every invocation runs preflight.py first (once, in a subprocess) and starts no arm when it reports a FAIL
(--no-preflight skips it).
    python moekern/e2e/run_e2e.py --quick --mode serve --arms vllm,moekern   # ~7 min
Real checkpoint: --model-dir /path/to/Mixtral-8x7B-Instruct --load-format auto (the directory holds the
config, weights and tokenizer; --model then only names the result files).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO))

from make_configs import MODELS, attention_backend  # noqa: E402

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

# What vLLM 0.26 logs for a kernel compiled after its warm-up (vllm/utils/jit_monitor.py, "<backend> <event>
# during inference: <kernel>[ (<details>)]. This causes a latency spike; ..."; Triton, CuTeDSL, TileLang),
# and what Triton prints for an autotune run (knobs.autotuning.print, which the monitor switches on).
JIT_WARNING = "JIT compilation during inference"
AUTOTUNE_PRINT = "Triton autotuning for function"
# Written into an arm's log between its warm-up and its measured part (offline: by the child; serve: by us,
# into the server's log): the JIT events after it happened while we measured.
MEASURE_MARKER = "moekern-e2e: warm-up done, measured part starts"


# ---- workload sizing --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Workload:
    """What each arm runs. Offline: reps timed passes of num_prompts prompts (input_len random tokens,
    output_len generated, EOS ignored) after warmup_reps discarded full passes. Serve: serve_reps timed
    `vllm bench serve` runs of serve_prompts at --concurrency after one discarded run."""

    num_prompts: int
    serve_prompts: int
    input_len: int
    output_len: int
    reps: int
    serve_reps: int
    warmup_reps: int


# --quick sizes one timed pass at >= ~3 s on an H100 for mixtral-8x7b-4l (STEADY_* below) and a 4-arm offline
# or 2-arm serve call at ~7 min; the full workload is ~2.5x that per pass.
QUICK = Workload(num_prompts=512, serve_prompts=320, input_len=256, output_len=128, reps=5, serve_reps=2,
                 warmup_reps=1)
FULL = Workload(num_prompts=1024, serve_prompts=1024, input_len=512, output_len=128, reps=5, serve_reps=3,
                warmup_reps=1)

# Steady-state rates of mixtral-8x7b-4l (dummy weights, bf16, vLLM 0.26, H100 80GB HBM3) from the first run
# (benchmarks/results/e2e/h100-2026-11-23): the fastest offline passes took 0.50 s for 128 prompts x (256 in
# + 64 out) in one batch, and the served median TPOT was 5.0 ms at 64 concurrent requests. A decode step of
# 5.5 ms at batch 64-128 leaves 0.15 s for the 32768 prompt tokens: ~220k prefill tokens/s. Good to ~30%;
# other models differ (the printed plan says which model the rates are for).
STEADY_DECODE_STEP_S = 0.0055
STEADY_PREFILL_TOK_S = 220_000.0
# Fixed costs, same run: an offline arm's wall time beyond init and its timed passes (process start, vLLM
# import, pre-warm, plugin summary, shutdown) was 29-37 s; engine init 87 s for the first arm (cold
# torch.compile cache) and 15-42 s later; a serve arm's server became healthy after 106 s (first) / 66 s,
# and each `vllm bench serve` plus the server's shutdown added ~30 s beyond the timed run. Later offline arms
# of session 8 (H200, benchmarks/results/e2e/h200-2026-12-06-*) initialized in 10-38 s and took 50-84 s of
# wall time for ~20 s of passes: INIT_S_LATER stays at the upper half of both runs' range.
ARM_OVERHEAD_S = 35.0
INIT_S_FIRST, INIT_S_LATER = 90.0, 30.0
SERVER_START_S_FIRST, SERVER_START_S_LATER = 106.0, 66.0
BENCH_OVERHEAD_S, SERVER_STOP_S = 20.0, 10.0
PREFLIGHT_S = 50.0  # preflight plus the runner's own imports before the first arm
# The shape sweep's ~240 one-token steps (~470k prompt tokens offline at 16384, ~340k served at 8192): a guess
# of ~10 s per arm from the prefill rate above and ~10 ms per request, plus its compiles in the first arm.
SHAPE_SWEEP_S = 10.0
MIN_PASS_S = 3.0  # shorter timed passes let start-up noise and timer granularity into the ratio


def offline_pass_s(w: Workload, max_num_seqs: int = 128) -> float:
    """Estimated seconds of one offline pass at steady state: the prompts decode in waves of max_num_seqs
    sequences, output_len steps each, plus all prompt tokens at the prefill rate."""
    waves = -(-w.num_prompts // max_num_seqs)
    return waves * w.output_len * STEADY_DECODE_STEP_S + w.num_prompts * w.input_len / STEADY_PREFILL_TOK_S


def serve_run_s(w: Workload, concurrency: int, max_num_seqs: int = 128) -> float:
    """Estimated seconds of one `vllm bench serve` run: min(concurrency, max_num_seqs) requests decode side
    by side, plus all prompt tokens at the prefill rate."""
    batch = max(1, min(concurrency, max_num_seqs))
    return (w.serve_prompts * w.output_len * STEADY_DECODE_STEP_S / batch
            + w.serve_prompts * w.input_len / STEADY_PREFILL_TOK_S)


def plan_seconds(w: Workload, mode: str, num_arms: int, concurrency: int = 64, max_num_seqs: int = 128,
                 shape_sweep: bool = False) -> float:
    """Estimated wall seconds of one invocation running `num_arms` arms of `mode` ('offline' | 'serve'),
    preflight included: the first arm pays the cold compile cache, every arm its warm-up and timed passes
    (and the shape sweep when on)."""
    sweep = SHAPE_SWEEP_S if shape_sweep else 0.0
    if mode == "offline":
        per_pass = offline_pass_s(w, max_num_seqs)
        arms = [ARM_OVERHEAD_S + sweep + (INIT_S_FIRST if i == 0 else INIT_S_LATER)
                + (w.warmup_reps + w.reps) * per_pass for i in range(num_arms)]
    elif mode == "serve":
        run = serve_run_s(w, concurrency, max_num_seqs)
        arms = [(SERVER_START_S_FIRST if i == 0 else SERVER_START_S_LATER) + SERVER_STOP_S + sweep
                + (1 + w.serve_reps) * (BENCH_OVERHEAD_S + run) for i in range(num_arms)]
    else:
        raise ValueError(f"mode={mode!r} must be 'offline' or 'serve'")
    return PREFLIGHT_S + sum(arms)


# ---- steady state -----------------------------------------------------------------------------------------
def warmup_plan(num_prompts: int, output_len: int, warmup_reps: int) -> list[tuple[int, int]]:
    """The offline child's discarded passes before its timed ones, as (prompts, max_tokens): a 16-prompt
    8-token pass (small batches, the first decode shapes), then warmup_reps passes of the measured workload
    itself, which the scheduler splits into the same chunked-prefill, mixed and decode batches as every timed
    pass (same prompts, prefix caching off). warmup_reps=0: no warm-up at all (a gate-log run that must
    hold exactly the timed passes)."""
    if warmup_reps < 0:
        raise ValueError(f"warmup_reps={warmup_reps} must be >= 0")
    if warmup_reps == 0:
        return []
    return [(min(16, num_prompts), 8)] + [(num_prompts, output_len)] * warmup_reps


def warm_again(pass_jit: list[int | None], warmup_reps: int, warmup_max_reps: int) -> bool:
    """Whether the offline child runs one more discarded full pass, given the JIT compile counts of the full
    warm-up passes so far (None: not known): always up to warmup_reps, then while the last pass compiled
    something (or its count is unknown), up to warmup_max_reps. Which batch shapes a pass produces depends on
    scheduling timing, so one pass of the workload need not meet every Triton specialization of the timed ones
    (session 7: vLLM's fused_moe_kernel compiled in timed passes after one full warm-up pass)."""
    done = len(pass_jit)
    if done < warmup_reps:
        return True
    if warmup_reps == 0 or done >= warmup_max_reps:
        return False
    return pass_jit[-1] is None or pass_jit[-1] > 0


# The batch sizes (M, tokens in one forward step) that vLLM's tuned fused-MoE config files are keyed by: a step of
# M tokens runs the tile config of the nearest key, and Triton specializes each kernel also on whether its int
# arguments (M * top_k, the padded length of the sorted ids, ...) are multiples of 16. Steps above the largest
# CUDA-graph size run eagerly at their exact M, so which variants a pass meets depends on how the scheduler
# happened to cut its prefills (session 7/8: compiles inside timed passes after a quiet warm-up pass).
MOE_CONFIG_KEYS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 256, 512, 1024, 1536, 2048, 3072, 4096)
# vLLM 0.26's max_num_batched_tokens when none is given, on GPUs with >= 70 GiB other than A100
# (EngineArgs.get_batch_defaults): the LLM class and `vllm serve`.
DEFAULT_BATCHED_TOKENS = {"offline": 16384, "serve": 8192}


def shape_sweep(cap: int, keys=MOE_CONFIG_KEYS, span: int = 16) -> list[int]:
    """Step sizes M that meet every (tile config, divisibility by 16) variant up to `cap` tokens: for each
    config key k <= cap the 16 sizes k .. k+15, and the 16 largest sizes up to cap (every M above the largest
    key uses its config). Sorted, unique, within 1 .. cap."""
    if cap < 1:
        raise ValueError(f"cap={cap} must be >= 1")
    out = {k + r for k in keys if k <= cap for r in range(span)} | {cap - r for r in range(span)}
    return sorted(m for m in out if 1 <= m <= cap)


def sweep_batches(cap: int, max_model_len: int, max_num_seqs: int) -> list[list[int]]:
    """Prompt lengths per sweep step: prompts of at most max_model_len - 1 tokens (one is generated) summing
    to M, at most max_num_seqs of them, so that the scheduler prefills them all in one step of exactly M
    tokens. M is capped at what max_num_seqs such prompts hold."""
    longest = max_model_len - 1
    if longest < 1 or max_num_seqs < 1:
        raise ValueError(f"max_model_len={max_model_len} and max_num_seqs={max_num_seqs} leave no room")
    cap = min(cap, longest * max_num_seqs)
    batches = []
    for m in shape_sweep(cap):
        n = -(-m // longest)  # fewest prompts; spread the tokens evenly over them
        batches.append([m // n + (1 if i < m % n else 0) for i in range(n)])
    return batches


def new_jit_lines(log_path: str | None, offset: int) -> tuple[int | None, int]:
    """(JIT compile warnings in the log from byte `offset` on, the log's new end offset); (None, offset)
    without a readable log. The engine's processes append to the same file as the child's stdout."""
    if not log_path:
        return None, offset
    try:
        with open(log_path, "rb") as fh:
            fh.seek(offset)
            data = fh.read()
    except OSError:
        return None, offset
    return data.decode(errors="replace").count(JIT_WARNING), offset + len(data)


def count_jit_events(log_text: str, marker: str | None = MEASURE_MARKER) -> dict | None:
    """JIT events in an arm's log after `marker` (the whole text for marker=None): `jit` vLLM monitor
    warnings (one per compile in verbose mode), `autotune` Triton autotune runs, `kernels` {name: count}.
    None when the marker is missing (the arm never reached its measured part, or an older log)."""
    if marker is not None:
        at = log_text.find(marker)
        if at < 0:
            return None
        log_text = log_text[at + len(marker):]
    kernels: dict[str, int] = {}
    jit = autotune = 0
    for line in log_text.splitlines():
        if JIT_WARNING in line:
            jit += 1
            name = line.split(JIT_WARNING, 1)[1].lstrip(": ").split(" ", 1)[0].split("(", 1)[0].rstrip(".")
            kernels[name or "?"] = kernels.get(name or "?", 0) + 1
        elif AUTOTUNE_PRINT in line:
            autotune += 1
    return {"jit": jit, "autotune": autotune, "kernels": kernels}


def jit_fields(log_text: str) -> dict:
    """The result fields an arm gets from its log: jit_during_measurement (None: unknown), the autotune
    count and the kernels compiled."""
    c = count_jit_events(log_text)
    if c is None:
        return {"jit_during_measurement": None, "jit_note": f"no {MEASURE_MARKER!r} line in the log"}
    return {"jit_during_measurement": c["jit"], "autotune_during_measurement": c["autotune"],
            "jit_kernels": c["kernels"]}


def arm_stats(values) -> dict | None:
    """median, min, max, n and spread = (max - min) / median of one arm's timed repetitions (spread None
    for one repetition); None for no values."""
    vals = sorted(v for v in values if v is not None)
    if not vals:
        return None
    med = statistics.median(vals)
    spread = (vals[-1] - vals[0]) / med if len(vals) > 1 and med else None
    return {"median": med, "min": vals[0], "max": vals[-1], "n": len(vals), "spread": spread}


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
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
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


def sweep_spec(args, mode: str) -> dict | None:
    """The shape sweep's bounds for `mode` (None with --no-shape-sweep): the batch-token budget (given, or vLLM's
    default for the mode), max_model_len and max_num_seqs."""
    if not getattr(args, "shape_sweep", True):
        return None
    cap = getattr(args, "max_num_batched_tokens", None) or DEFAULT_BATCHED_TOKENS[mode]
    return {"cap": int(cap), "max_model_len": int(getattr(args, "max_model_len", 2048)),
            "max_num_seqs": int(getattr(args, "max_num_seqs", 128))}


def offline_spec(args, arm: str, res_path: Path, prompt_token_ids: list[list[int]] | None = None) -> dict:
    """What the offline child runs: engine kwargs and the workload (random token prompts of input_len from
    `seed`, or the given prompt token ids)."""
    spec = {"engine": engine_kwargs(args, arm), "seed": 0, "vocab": args.vocab, "input_len": args.input_len,
            "output_len": args.output_len, "num_prompts": args.num_prompts, "reps": args.reps,
            "warmup_reps": getattr(args, "warmup_reps", 1),
            "warmup_max_reps": getattr(args, "warmup_max_reps", None) or getattr(args, "warmup_reps", 1),
            "shape_sweep": sweep_spec(args, "offline"), "ignore_eos": True, "result": str(res_path),
            "gate_log_paired": bool(getattr(args, "gate_log_paired", False)) and ARMS[arm][2]}
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
    warmup, pass_jit = [], []
    warmup_reps = spec.get("warmup_reps", 1)
    max_reps = max(warmup_reps, spec.get("warmup_max_reps", warmup_reps))
    plan = warmup_plan(len(prompts), spec["output_len"], warmup_reps)[:1]  # the small pre-warm pass, if any

    def discard(n: int, max_tokens: int) -> None:
        t0 = time.perf_counter()
        llm.generate(prompts[:n], SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True,
                                                 detokenize=False), use_tqdm=False)
        warmup.append({"prompts": n, "max_tokens": max_tokens, "seconds": time.perf_counter() - t0})

    for n, max_tokens in plan:
        discard(n, max_tokens)
    sys.stdout.flush()
    _, offset = new_jit_lines(spec.get("log"), 0)  # compiles are counted from here on, per warm-up step
    sweep = None
    if spec.get("shape_sweep") and warmup_reps > 0:
        sw = spec["shape_sweep"]
        t0 = time.perf_counter()
        rng = np.random.default_rng(spec["seed"] + 1)
        one = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True, detokenize=False)
        batches = sweep_batches(sw["cap"], sw["max_model_len"], sw["max_num_seqs"])
        try:
            for lens in batches:
                llm.generate([TokensPrompt(prompt_token_ids=rng.integers(100, spec["vocab"] - 100, k).tolist())
                              for k in lens], one, use_tqdm=False)
            err = None
        except Exception as exc:  # the timed part still counts its compiles; say why the sweep stopped
            err = f"{type(exc).__name__}: {exc}"[:500]
        time.sleep(0.5)
        jit, offset = new_jit_lines(spec.get("log"), offset)
        sweep = {"steps": len(batches), "cap": sw["cap"], "seconds": time.perf_counter() - t0, "jit": jit,
                 "error": err}
    while warm_again(pass_jit, warmup_reps, max_reps):
        discard(len(prompts), spec["output_len"])
        time.sleep(0.5)  # the engine process's warnings reach the shared log file
        jit, offset = new_jit_lines(spec.get("log"), offset)
        warmup[-1]["jit"] = jit
        pass_jit.append(jit)
    print(MEASURE_MARKER, flush=True)  # the engine's own logs share this file: later JIT warnings are ours
    runs, token_ids = [], None
    plan = paired_plan(spec["reps"]) if spec.get("gate_log_paired") else [None] * spec["reps"]
    for on in plan:
        if on is not None:  # between passes, outside the timing: every worker's gate log on or paused
            got = llm.collective_rpc("moekern_gate_log", args=(on,))
            if any(g.get("gate_log") is not on for g in got):
                raise RuntimeError(f"--gate-log-paired: workers answered {got} to gate_log={on}")
        wall0, t0 = time.time(), time.perf_counter()  # wall clock: to line passes up with gpu_clocks.csv
        outs = llm.generate(prompts, sp, use_tqdm=False)
        dt = time.perf_counter() - t0
        n_out = sum(len(o.outputs[0].token_ids) for o in outs)
        runs.append({"start": wall0, "seconds": dt, "output_tokens": n_out, "output_tok_s": n_out / dt,
                     "total_tok_s": (n_out + n_in) / dt, **({} if on is None else {"gate_log": on})})
        token_ids = [list(o.outputs[0].token_ids) for o in outs]
    paired = None
    if spec.get("gate_log_paired"):
        llm.collective_rpc("moekern_gate_log", args=(True,))
        paired = {"pairs": paired_passes(runs)}
        paired.update(paired_overhead(paired["pairs"]) or {})
        runs = [r for r in runs if r["gate_log"]]  # the arm's own numbers: gate log on, as its name says
    try:
        # By method name: vLLM 0.26 msgpack-encodes collective_rpc's method and refuses a function unless
        # VLLM_ALLOW_INSECURE_SERIALIZATION=1; the plugin adds Worker.moekern_plugin_summary (hooks.py).
        summary = llm.collective_rpc("moekern_plugin_summary")
    except Exception as exc:  # plugin off (the vllm/flashinfer arms): no such method
        summary = f"unavailable: {exc!r}"
    stats = arm_stats([r["output_tok_s"] for r in runs])
    result = {"init_s": init_s, "warmup": warmup, "shape_sweep": sweep, "runs": runs, "output_tok_s": stats["median"],
              "output_tok_s_stats": stats, "seconds_stats": arm_stats([r["seconds"] for r in runs]),
              "plugin": summary}
    if paired is not None:
        result["gate_log_paired"] = paired
    if spec.get("save_tokens"):
        result["token_ids"] = token_ids
    Path(spec["result"]).write_text(json.dumps(result))
    return 0


def run_offline_arm(args, arm: str, out: Path, extra_spec: dict | None = None, round_no: int | None = None) -> dict:
    """One offline arm in a fresh process (files offline_<arm>[.r<round>].*; with a round number its gate log
    goes to a round<k> folder of the arm's gate-log directory)."""
    tag = arm if round_no is None else f"{arm}.r{round_no}"
    res_path = out / f"offline_{tag}.json"
    res_path.unlink(missing_ok=True)
    ids = read_dataset_prompts(args.dataset, _hf_encode(args.model_dir), args.num_prompts) if args.dataset else None
    spec = {**offline_spec(args, arm, res_path, ids), **(extra_spec or {})}
    spec_path = out / f"offline_{tag}.spec.json"
    log = out / f"offline_{tag}.log"
    spec["log"] = str(log)
    spec_path.write_text(json.dumps(spec))
    gdir = _fresh_gate_dir(args, arm, out, round_no)
    t0 = time.time()
    with open(log, "w") as fh:
        proc = subprocess.Popen([sys.executable, __file__, "--child-offline", str(spec_path)],
                                env=arm_env(arm, out, gdir, router_seed=args.dummy_router_seed,
                                            moe_configs=getattr(args, "moe_configs", None)),
                                stdout=fh, stderr=subprocess.STDOUT, start_new_session=True, cwd=REPO)
        rc = _wait_group(proc, args.arm_timeout)
    r = {"arm": arm, "rc": rc, "wall_s": round(time.time() - t0, 1), "log": str(log)}
    if rc == 0 and res_path.exists():
        r.update(json.loads(res_path.read_text()))
        r["plugin_check"] = plugin_check(arm, r.get("plugin"))
        r.update(jit_fields(log.read_text(errors="replace")))
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


def _fresh_gate_dir(args, arm: str, out: Path, round_no: int | None = None) -> Path | None:
    d = gate_log_dir(args, arm, out, round_no)
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


SERVE_KEYS_PER_RUN = ("duration", "completed", "output_throughput", "request_throughput", "median_ttft_ms",
                      "p90_ttft_ms", "median_tpot_ms", "p90_tpot_ms", "median_itl_ms")


def _bench(args, port: int, out: Path, env: dict, name: str) -> tuple[dict | None, str]:
    """One `vllm bench serve` run writing out/<name>.json and its log out/<name>.log: (result, error)."""
    (out / f"{name}.json").unlink(missing_ok=True)
    cmd = bench_command(args, port, out, f"{name}.json")
    with open(out / f"{name}.log", "w") as fh:
        b = subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        rc = _wait_group(b, args.arm_timeout)
    if rc == 0 and (out / f"{name}.json").exists():
        return json.loads((out / f"{name}.json").read_text()), ""
    return None, f"bench {name} exited {rc}: " + _tail(out / f"{name}.log")


def median_run(runs: list[dict], key: str = "output_throughput") -> int:
    """Index of the run holding the (lower) median of `key`: the run an arm reports in full."""
    order = sorted(range(len(runs)), key=lambda i: runs[i][key])
    return order[(len(order) - 1) // 2]


def _wait_healthy(server: subprocess.Popen, port: int, t0: float, timeout: float) -> bool:
    """Poll the server's /health every 2 s until it answers 200 (True), exits or `timeout` s pass since t0."""
    while time.time() - t0 < timeout:
        if server.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as resp:
                if resp.status == 200:
                    return True
        except Exception:
            pass
        time.sleep(2)
    return False


def serve_shape_sweep(port: int, model: str, sw: dict, vocab: int, post=None) -> dict:
    """The shape sweep against a running server: one /v1/completions request per step size, its prompts as
    token-id lists (vLLM schedules a request's prompts together), one token each. Errors end the sweep and are
    reported, not raised: the JIT count of the measured part still tells whether it was enough."""
    import random

    post = post or _post_json
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


def _post_json(url: str, body: dict, timeout: float = 120.0) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read())


def _healthy_then_warm(server, port, t0, args, r, fh, log, bench_args, out, env, name):
    """Wait for the started server, run the discarded warm-up bench, then mark the server log: returns the
    warm-up's result, or None with r["error"] set. The marker goes through the server's own open log file
    (shared offset), so it lands between its lines and splits warm-up from measurement for the JIT count."""
    ready = _wait_healthy(server, port, t0, args.server_timeout)
    r["startup_s"] = round(time.time() - t0, 1)
    if not ready:
        r["error"] = "server did not become healthy: " + _tail(log)
        return None
    sw = sweep_spec(args, "serve")
    if sw is not None:
        r["shape_sweep"] = serve_shape_sweep(port, str(args.model_dir), sw, args.vocab)
    t1 = time.time()
    warm, err = _bench(bench_args, port, out, env, name)
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
    port = _free_port()
    cmd = serve_command(engine_kwargs(args, arm), port)
    env = arm_env(arm, out, _fresh_gate_dir(args, arm, out), router_seed=args.dummy_router_seed,
                  moe_configs=getattr(args, "moe_configs", None))
    log = out / f"serve_{arm}.server.log"
    (out / f"serve_{arm}.bench.json").unlink(missing_ok=True)
    r = {"arm": arm, "cmd": " ".join(cmd)}
    t0 = time.time()
    with open(log, "w") as fh:
        server = subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True, cwd=REPO)
        try:
            r["bench_cmd"] = " ".join(bench_command(args, port, out, f"serve_{arm}.rep0.json"))
            warm = _healthy_then_warm(server, port, t0, args, r, fh, log, args, out, env, f"serve_{arm}.warmup")
            if warm is None:
                return r
            r["warmup_duration"] = warm.get("duration")
            runs = []
            for i in range(args.serve_reps):
                res, err = _bench(args, port, out, env, f"serve_{arm}.rep{i}")
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
            _kill_group(server)
            r["server_stopped"] = server.poll() is not None
    r.update(jit_fields(log.read_text(errors="replace")))
    return r


# ---- serve grid: many benches against one server ----------------------------------------------------------
# A server start costs 60-110 s (torch.compile, CUDA graphs), a quick bench 1-10 s: with --concurrency-grid
# each serve arm starts its server once, runs one discarded warm-up bench (the largest concurrency, first
# dataset), then every grid point (rep outermost, then dataset, then concurrency: drift spreads over reps).
# The points run in ONE bench process per server (--child-bench-grid) that imports vLLM's bench once and calls
# its main() per point (a `vllm bench serve` process per point would add ~15-20 s of imports each); when that
# import fails it falls back to one `vllm bench serve` subprocess per point. The child writes a start and an
# end marker per point into the server's log through the server's own stdout descriptor (shared offset, so
# the lines interleave, never overwrite), so the JIT events of each point are counted apart; it records the
# wall-clock window [time.time() before, after] of each point for the gate-log CV (moekern.analysis.serving.metrics).
# The per-point result files are written by this process after the server stopped (temp file + rename: a
# point is either complete or absent); a point whose result file exists is skipped (resume).
GRID_POINT_START = "moekern-e2e: grid point starts:"
GRID_POINT_END = "moekern-e2e: grid point ends:"


def grid_points(args, arm: str) -> list[dict]:
    """The arm's bench grid: dicts name, concurrency, dataset (Path | None), rep, result (Path)."""
    from moekern.analysis.study.sweep import grid_point_name

    prefix = args.grid_prefix or grid_prefix(args, arm)
    datasets = args.datasets or [None]
    return [{"name": grid_point_name(prefix, c, d, r), "concurrency": c, "dataset": d, "rep": r,
             "result": Path(args.result_dir) / f"{grid_point_name(prefix, c, d, r)}.json"}
            for r in range(args.grid_reps) for d in datasets for c in args.concurrency_grid]


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


def _point_args(args, concurrency: int, dataset) -> argparse.Namespace:
    return argparse.Namespace(**{**vars(args), "concurrency": concurrency, "dataset": dataset})


def dataset_input_len(path) -> float | None:
    """Mean "prompt_len" of a `moekern datasets generate` file (the predictor's tokens; the estimate's input
    length), None when the lines carry none."""
    lens = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            v = json.loads(line).get("prompt_len")
        except (json.JSONDecodeError, AttributeError):
            continue
        if isinstance(v, (int, float)):
            lens.append(float(v))
    return sum(lens) / len(lens) if lens else None


def grid_timing():
    """sweep.GridTiming with this runner's measured constants (the same numbers; a test keeps them equal)."""
    from moekern.analysis.study.sweep import GridTiming

    return GridTiming(server_start_first_s=SERVER_START_S_FIRST, server_start_later_s=SERVER_START_S_LATER,
                      server_stop_s=SERVER_STOP_S, decode_step_s=STEADY_DECODE_STEP_S,
                      prefill_tok_s=STEADY_PREFILL_TOK_S, preflight_s=PREFLIGHT_S)


def grid_plan_estimate(args, num_arms: int) -> float:
    """Estimated wall seconds of this invocation's serve grid (sweep.grid_plan_seconds)."""
    from moekern.analysis.study.sweep import grid_plan_seconds

    lens = [dataset_input_len(d) for d in args.datasets or []]
    lens = [x for x in lens if x is not None]
    in_len = sum(lens) / len(lens) if lens else args.input_len
    return grid_plan_seconds(num_arms, args.concurrency_grid, len(args.datasets or [None]), args.grid_reps,
                             args.serve_prompts, in_len, args.output_len, args.max_num_seqs, grid_timing(),
                             preflight=not args.no_preflight)


def count_jit_between(log_text: str, start: str, end: str) -> dict | None:
    """count_jit_events of the text between the first `start` line and the next `end` line after it; None
    when `start` is missing (an unterminated segment runs to the end of the log)."""
    at = log_text.find(start)
    if at < 0:
        return None
    seg = log_text[at + len(start):]
    stop = seg.find(end)
    return count_jit_events(seg if stop < 0 else seg[:stop], marker=None)


def child_bench_grid(spec_path: str, bench=None) -> int:
    """The bench process of one server's grid (spec: points [{name, argv}], marker_fd, deadline, progress,
    in_process). Per point: a start marker into the server log, the bench, an end marker, one progress line
    {name, start, end, rc, error}. A point that would end after `deadline` (now + its estimate) and all after
    it are recorded as skipped. `bench(argv) -> rc` replaces the real bench (tests). Exit 3: in-process
    requested but vLLM's bench could not be imported (nothing ran; the parent falls back to subprocesses)."""
    spec = json.loads(Path(spec_path).read_text())
    if bench is None:
        bench = _bench_in_process() if spec.get("in_process", True) else _bench_subprocess
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
                    prog.write(json.dumps({"name": rest["name"], "skipped": f"time budget: would end after the "
                                                                           f"deadline"}) + "\n")
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


def _bench_in_process():
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


def _bench_subprocess(argv) -> int:
    return subprocess.run(["vllm", "bench", "serve", *argv]).returncode


def _read_progress(path: Path) -> dict:
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
    pargs = _point_args(args, pt["concurrency"], pt["dataset"])
    pargs.result = pt["result"]
    meta = result_metadata(pargs, arm, gate_dir)
    meta.update(arm=arm, max_concurrency=pt["concurrency"], queue_depth="client --max-concurrency; server "
                f"max_num_seqs={args.max_num_seqs}", rep=pt["rep"], run_id=pt["name"], server_id=server_id,
                bench_start=prog["start"], bench_end=prog["end"], grid_point=True)
    if pt["dataset"] is not None:
        meta["dataset_path"] = str(pt["dataset"])
    if "gate_log" in meta:
        meta["gate_log_window"] = [prog["start"], prog["end"]]
    if jit is None:
        meta.update(jit_during_measurement=None, steady_state=False)
    else:
        meta.update(jit_during_measurement=jit["jit"], autotune_during_measurement=jit["autotune"],
                    jit_kernels=jit["kernels"], steady_state=not jit["jit"] and not jit["autotune"])
    return meta


def _write_json_atomic(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


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
    port = _free_port()
    cmd = serve_command(engine_kwargs(args, arm), port)
    t0 = time.time()
    server_id = f"{arm}@{t0:.0f}"
    # One gate-log folder per server start, never cleared: result files of an earlier (resumed) invocation
    # point into theirs, by window.
    base = gate_log_dir(args, arm, out)
    gdir = None if base is None else base / f"server_{t0:.0f}"
    env = arm_env(arm, out, gdir, router_seed=args.dummy_router_seed,
                  moe_configs=getattr(args, "moe_configs", None))
    log = out / f"serve_{arm}.server.log"
    r["cmd"] = " ".join(cmd)
    progress = work / "progress.jsonl"
    progress.unlink(missing_ok=True)
    with open(log, "w") as fh:
        server = subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True, cwd=REPO)
        try:
            warm_args = _point_args(args, max(args.concurrency_grid), (args.datasets or [None])[0])
            if _healthy_then_warm(server, port, t0, args, r, fh, log, warm_args, work, env, "warmup") is None:
                return r
            from moekern.analysis.study.sweep import bench_run_seconds

            timing = grid_timing()
            points = []
            for pt in todo:
                pa = _point_args(args, pt["concurrency"], pt["dataset"])
                in_len = dataset_input_len(pt["dataset"]) if pt["dataset"] else args.input_len
                est = bench_run_seconds(args.serve_prompts, in_len or args.input_len, args.output_len,
                                        pt["concurrency"], args.max_num_seqs, timing) + timing.point_overhead_s
                points.append({"name": pt["name"], "estimate_s": est,
                               "argv": bench_command(pa, port, work, f"{pt['name']}.bench.json")[3:]})
            # the server's stop comes after the deadline check of the last point
            spec = {"points": points, "marker_fd": fh.fileno(), "deadline": deadline - SERVER_STOP_S,
                    "progress": str(progress), "in_process": True}
            for in_process in (True, False):
                spec["in_process"] = in_process
                spec_path = work / "grid.spec.json"
                spec_path.write_text(json.dumps(spec))
                with open(work / "bench_child.log", "a") as ch:
                    child = subprocess.Popen([sys.executable, __file__, "--child-bench-grid", str(spec_path)],
                                             env=env, stdout=ch, stderr=subprocess.STDOUT, start_new_session=True,
                                             cwd=REPO, pass_fds=(fh.fileno(),))
                    rc = _wait_group(child, max(1.0, deadline - time.time()) + 60)
                r["bench_child_rc"] = rc
                r["bench_in_process"] = in_process
                if rc != 3:
                    break
        finally:
            _kill_group(server)
            r["server_stopped"] = server.poll() is not None
    text = log.read_text(errors="replace")
    prog = _read_progress(progress)
    r["jit_during_measurement"] = (count_jit_events(text) or {}).get("jit")
    r["gate_log_dir"] = str(gdir) if gdir is not None else None
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
        _write_json_atomic(pt["result"], obj)
        r["points_written"].append(str(pt["result"]))
        if not obj["moekern"]["steady_state"]:
            r["not_steady_points"].append(pt["result"].stem)
    return r


# ---- preflight --------------------------------------------------------------------------------------------
def preflight_command(args) -> list[str]:
    """moekern/e2e/preflight.py for the arms and modes this invocation will run."""
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


# the number each mode compares arms by (higher is better), and where the arm keeps its repetitions' stats
MODE_METRIC = {"offline": ("output_tok_s", "output_tok_s_stats"), "serve": ("output_throughput",
                                                                          "output_throughput_stats")}


def merge_rounds(rounds: list[dict]) -> dict:
    """One offline arm's result from its --rounds runs (each a fresh process; the arms alternate round by round,
    so a slow drift of the machine hits every arm alike): the timed passes of every round pooled (median and
    spread over all of them), JIT counts summed (unknown if any round's is), each round's own median under
    "rounds". A round that failed is listed and left out; all failed: the first failure."""
    ok = [r for r in rounds if "error" not in r and r.get("runs")]
    if not ok:
        return dict(rounds[0])
    runs = [x for r in ok for x in r["runs"]]
    stats = arm_stats([x["output_tok_s"] for x in runs])
    jits = [r.get("jit_during_measurement") for r in ok]
    kernels: dict[str, int] = {}
    for r in ok:
        for k, n in (r.get("jit_kernels") or {}).items():
            kernels[k] = kernels.get(k, 0) + n
    merged = {**ok[-1], "runs": runs, "output_tok_s": stats["median"], "output_tok_s_stats": stats,
              "seconds_stats": arm_stats([x["seconds"] for x in runs]),
              "wall_s": round(sum(r.get("wall_s", 0) for r in rounds), 1),
              "jit_during_measurement": None if None in jits else sum(jits),
              "autotune_during_measurement": sum(r.get("autotune_during_measurement") or 0 for r in ok),
              "jit_kernels": kernels,
              "plugin_check": next((r["plugin_check"] for r in ok if not (r.get("plugin_check") or {}).get("ok", True)),
                                   ok[-1].get("plugin_check")),
              "rounds": [{"round": i, "output_tok_s": r.get("output_tok_s"), "jit": r.get("jit_during_measurement"),
                          "wall_s": r.get("wall_s"), "log": r.get("log"), "gate_log": r.get("gate_log"),
                          **({"error": r["error"][-400:]} if "error" in r else {})}
                         for i, r in enumerate(rounds)]}
    merged.pop("token_ids", None)
    merged["gate_log_cost"] = [gate_log_cost(r) for r in ok]
    pairs = [pr for r in ok for pr in (r.get("gate_log_paired") or {}).get("pairs", [])]
    if pairs:
        merged["gate_log_paired"] = {"pairs": pairs, **(paired_overhead(pairs) or {})}
    if None in jits:
        merged["jit_note"] = "a round's JIT count is unknown"
    return merged


def gate_log_cost(result: dict | None) -> dict | None:
    """The gate log's own cost in one arm run, from its workers' plugin summaries: host us per step on the
    model thread (mean over workers) and the hand-off used. None without a gate log."""
    plugin = (result or {}).get("plugin")
    logs = [w.get("gate_log") for w in plugin if isinstance(w, dict)] if isinstance(plugin, list) else []
    logs = [g for g in logs if g and g.get("host_us_per_step") is not None]
    if not logs:
        return None
    return {"host_us_per_step": round(statistics.fmean(g["host_us_per_step"] for g in logs), 2),
            "hand_off": sorted({g.get("snapshot") or "torch calls" for g in logs})}


def round_ratios(mine: list | None, base: list | None, ndigits: int | None = 4) -> list | None:
    """Each round's own output tok/s of one arm over the base arm's (the same comparison within each round,
    merge_rounds' "rounds" lists), rounded to ndigits (None: not rounded); None unless both ran the same
    number of rounds; a round without a value on either side: None in its place."""
    if not mine or not base or len(mine) != len(base):
        return None
    ratios = [a["output_tok_s"] / b["output_tok_s"] if a.get("output_tok_s") and b.get("output_tok_s") else None
              for a, b in zip(mine, base)]
    return ratios if ndigits is None else [None if x is None else round(x, ndigits) for x in ratios]


def steady_state(results: dict, mode: str) -> tuple[bool, dict]:
    """(steady, why per arm): a mode is steady state when every arm that ran logged zero JIT compilations
    and zero Triton autotune runs in its timed part. An arm with an unknown count (no marker: older run,
    crash) makes the mode not steady too; skipped and failed arms are left out."""
    why = {}
    for arm, r in (results.get(mode) or {}).items():
        if not r or "skipped" in r or "error" in r:
            continue
        jit = r.get("jit_during_measurement")
        if jit is None:
            why[arm] = r.get("jit_note") or "JIT count unknown"
        elif jit or r.get("autotune_during_measurement"):
            kernels = ", ".join(f"{k} x{n}" for k, n in sorted((r.get("jit_kernels") or {}).items()))
            why[arm] = (f"{jit} JIT compilation(s) and {r.get('autotune_during_measurement', 0)} autotune run(s) "
                        f"while timed" + (f": {kernels}" if kernels else ""))
    return not why, why


def summarize(results: dict) -> dict:
    def thr(mode, arm, key):
        r = results.get(mode, {}).get(arm) or {}
        return r.get(key)

    s = {}
    for mode, (key, stats_key) in MODE_METRIC.items():
        if not any(r and "skipped" not in r for r in (results.get(mode) or {}).values()):
            continue
        def median(arm):  # over the timed repetitions; a single value for results without stats
            return (thr(mode, arm, stats_key) or {}).get("median") or thr(mode, arm, key)

        base = median("vllm")
        base_spread = (thr(mode, "vllm", stats_key) or {}).get("spread")
        for arm in ("flashinfer", "moekern", "moekern-routing"):
            v = median(arm)
            if base and v:
                s[f"{mode}.{arm}_vs_vllm"] = round(v / base, 4)  # from the arms' medians
                spread = (thr(mode, arm, stats_key) or {}).get("spread")
                if spread is not None and base_spread is not None:
                    # the wider of the two arms' (max - min) / median: a ratio closer to 1 than this is noise
                    s[f"{mode}.{arm}_vs_vllm_spread"] = round(max(spread, base_spread), 4)
                ci = ratio_ci(_tok_s(thr(mode, "vllm", "runs")), _tok_s(thr(mode, arm, "runs"))) \
                    if mode == "offline" else None
                if ci:
                    s[f"{mode}.{arm}_vs_vllm_ci95"] = list(ci)
            if mode == "serve" and v and base:
                # the median over timed runs of each run's median TPOT; < 1: the arm decodes faster than vllm
                st, stb = thr(mode, arm, "median_tpot_ms_stats") or {}, thr(mode, "vllm", "median_tpot_ms_stats") or {}
                t = st.get("median") or thr(mode, arm, "median_tpot_ms")
                tb = stb.get("median") or thr(mode, "vllm", "median_tpot_ms")
                if t and tb:
                    s[f"serve.{arm}_tpot_vs_vllm"] = round(t / tb, 4)
                    if st.get("spread") is not None and stb.get("spread") is not None:
                        s[f"serve.{arm}_tpot_vs_vllm_spread"] = round(max(st["spread"], stb["spread"]), 4)
        steady, why = steady_state(results, mode)
        s[f"{mode}.steady_state"] = steady
        if why:
            s[f"{mode}.not_steady"] = why
    for arm, r in (results.get("offline") or {}).items():
        check = (r or {}).get("plugin_check") or {}
        if not check.get("ok", True):  # its ratio above measures vLLM, not moekern
            s[f"offline.{arm}_plugin_check_failed"] = check.get("why")
    for arm in ("flashinfer", "moekern", "moekern-routing", "moekern-routing-log"):
        by_round = round_ratios(thr("offline", arm, "rounds"), thr("offline", "vllm", "rounds"))
        if by_round:
            s[f"offline.{arm}_vs_vllm_by_round"] = by_round
    for arm, r in (results.get("offline") or {}).items():
        costs = [c for c in ((r or {}).get("gate_log_cost") or [gate_log_cost(r)]) if c]
        if costs:  # per round
            s[f"offline.{arm}_gate_log_host_us_per_step"] = [c["host_us_per_step"] for c in costs]
            s[f"offline.{arm}_gate_log_hand_off"] = sorted({h for c in costs for h in c["hand_off"]})
        paired = (r or {}).get("gate_log_paired") or {}
        if paired.get("overhead") is not None:
            s[f"offline.{arm}_gate_log_overhead_paired"] = paired["overhead"]
            s[f"offline.{arm}_gate_log_overhead_paired_n"] = paired["n_pairs"]
            if paired.get("ci95"):
                s[f"offline.{arm}_gate_log_overhead_paired_ci95"] = paired["ci95"]
    # gate-log overhead = 1 - log arm / moekern-routing; the -torch arm's is the torch-call hand-off's
    for log_arm, key in (("moekern-routing-log", "offline.gate_log_overhead"),
                         ("moekern-routing-log-torch", "offline.gate_log_overhead_torch")):
        a, b = thr("offline", "moekern-routing", "output_tok_s"), thr("offline", log_arm, "output_tok_s")
        if not (a and b):
            continue
        s[key] = round(1 - b / a, 4)
        # How far apart one arm's repetitions are ((max - min) / median of output tok/s, the worse of the two
        # arms): an overhead smaller than this is not resolved by the run.
        spreads = [rep_spread(thr("offline", arm, "runs")) for arm in ("moekern-routing", log_arm)]
        if all(x is not None for x in spreads):
            s[f"{key}_noise"] = round(max(spreads), 4)
        ci = ratio_ci(_tok_s(thr("offline", "moekern-routing", "runs")), _tok_s(thr("offline", log_arm, "runs")))
        if ci:  # overhead = 1 - ratio, so the ratio's upper bound is the overhead's lower one
            s[f"{key}_ci95"] = [round(1 - ci[1], 4), round(1 - ci[0], 4)]
    return s


def format_summary(results: dict, summary: dict) -> str:
    """The printed summary: per mode one line per arm (median, min-max, n, JIT while timed), the ratios
    with their spread, and a NOT STEADY STATE line naming the arms when the mode's ratios are no valid A/B."""
    lines = []
    for mode, (key, stats_key) in MODE_METRIC.items():
        arms = results.get(mode) or {}
        if not arms:
            continue
        unit = "output tok/s" if mode == "offline" else "output tok/s (served)"
        lines.append(f"{mode}: {unit}, median [min-max] over n timed repetitions")
        for arm, r in arms.items():
            r = r or {}
            if "skipped" in r or "error" in r:
                lines.append(f"  {arm:20s} {'skipped: ' + r['skipped'] if 'skipped' in r else 'FAILED'}")
                continue
            st = r.get(stats_key) or ({"median": r[key], "min": r[key], "max": r[key], "n": 1}
                                      if r.get(key) else None)
            if st is None:
                lines.append(f"  {arm:20s} no result")
                continue
            extra = f"  median TPOT {r['median_tpot_ms']:.2f} ms" if r.get("median_tpot_ms") else ""
            jit = r.get("jit_during_measurement")
            lines.append(f"  {arm:20s} {st['median']:10.0f} [{st['min']:.0f}-{st['max']:.0f}] n={st['n']}"
                         f"  JIT while timed: {'?' if jit is None else jit}{extra}")
        for k, v in summary.items():
            if k.startswith(mode + ".") and k.endswith("_vs_vllm"):
                sp = summary.get(k + "_spread")
                ci = summary.get(k + "_ci95")
                lines.append(f"  {k.split('.', 1)[1]} = {v:.3f}" + (f" (rep spread {sp:.1%})" if sp is not None else
                                                                    " (spread unknown: one repetition)")
                             + (f", 95 % CI {ci[0]:.3f}-{ci[1]:.3f}" if ci else ""))
                by_round = summary.get(k + "_by_round")
                if by_round:
                    lines.append("    by round: " + ", ".join("-" if x is None else f"{x:.3f}" for x in by_round))
        for name in ("gate_log_overhead", "gate_log_overhead_torch"):
            if mode != "offline" or summary.get(f"offline.{name}") is None:
                continue
            ov, ci = summary[f"offline.{name}"], summary.get(f"offline.{name}_ci95")
            noise = summary.get(f"offline.{name}_noise")
            lines.append(f"  {name} = {ov:.1%}" + (f" (rep spread {noise:.1%})" if noise is not None else "")
                         + (f", 95 % CI {ci[0]:.1%} to {ci[1]:.1%}" if ci else ""))
        for arm in arms if mode == "offline" else ():
            host = summary.get(f"offline.{arm}_gate_log_host_us_per_step")
            if host:
                lines.append(f"  {arm}: gate log on the model thread " + ", ".join(f"{x:.0f}" for x in host)
                             + " us/step (by round; " + "; ".join(summary[f"offline.{arm}_gate_log_hand_off"]) + ")")
            ov = summary.get(f"offline.{arm}_gate_log_overhead_paired")
            if ov is not None:
                ci = summary.get(f"offline.{arm}_gate_log_overhead_paired_ci95")
                lines.append(f"  {arm}: gate-log overhead, paired passes in one engine = {ov:.1%} over "
                             f"{summary[f'offline.{arm}_gate_log_overhead_paired_n']} pairs"
                             + (f", 95 % CI {ci[0]:.1%} to {ci[1]:.1%}" if ci else ""))
        if summary.get(f"{mode}.steady_state") is False:
            lines.append(f"  NOT STEADY STATE: the {mode} ratios above are not a valid A/B:")
            lines += [f"    {arm}: {why}" for arm, why in summary.get(f"{mode}.not_steady", {}).items()]
    return "\n".join(lines)


def ratio_ci(base: list[float], other: list[float], n_boot: int = 10000, seed: int = 0,
             level: float = 0.95) -> tuple[float, float] | None:
    """Bootstrap confidence interval of median(other) / median(base): both samples resampled with replacement,
    n_boot times, from a seeded generator (the same inputs give the same interval). None with fewer than two
    values on a side (nothing to resample)."""
    import random

    base, other = [float(x) for x in base if x], [float(x) for x in other if x]
    if len(base) < 2 or len(other) < 2:
        return None
    rng = random.Random(seed)
    ratios = sorted(statistics.median(rng.choices(other, k=len(other)))
                    / statistics.median(rng.choices(base, k=len(base))) for _ in range(n_boot))
    lo = ratios[int((1 - level) / 2 * n_boot)]
    hi = ratios[min(n_boot - 1, int((1 + level) / 2 * n_boot))]
    return round(lo, 4), round(hi, 4)


def paired_plan(reps: int) -> list[bool]:
    """--gate-log-paired: gate log on (True) or paused for each timed pass, in ABBA blocks (on, off, off, on,
    on, off, ...), so a drift that is linear over a block hits both sides alike."""
    return [i % 4 in (0, 3) for i in range(reps)]


def paired_passes(runs: list[dict]) -> list[list[float]]:
    """[on, off] output tok/s of adjacent passes: the k-th gate-log-on pass with the k-th paused one (with
    paired_plan's order: passes (0, 1), (3, 2), (4, 5), ...); an unmatched last pass is left out."""
    on = [r["output_tok_s"] for r in runs if r.get("gate_log") is True]
    off = [r["output_tok_s"] for r in runs if r.get("gate_log") is False]
    return [[a, b] for a, b in zip(on, off)]


def paired_overhead(pairs: list, n_boot: int = 10000, seed: int = 0, level: float = 0.95) -> dict | None:
    """Gate-log overhead from paired passes of one engine: 1 - geometric mean of on/off over the pairs, with a
    bootstrap interval over pairs (seeded). None without a pair; no interval with one pair."""
    from moekern.analysis.stats import bootstrap_ci

    logs = [math.log(a / b) for a, b in pairs if a and b]
    if not logs:
        return None
    est = bootstrap_ci(logs, n_boot=n_boot, level=level, seed=seed)  # mean log(on / off), percentile interval
    out = {"n_pairs": len(logs), "overhead": round(1 - math.exp(est.value), 4)}
    if len(logs) >= 2:
        out["ci95"] = [round(1 - math.exp(est.high), 4), round(1 - math.exp(est.low), 4)]
    return out


def _tok_s(runs) -> list[float]:
    return [r["output_tok_s"] for r in runs or [] if r.get("output_tok_s")]


def rep_spread(runs) -> float | None:
    """(max - min) / median of the repetitions' output tok/s (arm_stats' spread); None for fewer than two."""
    stats = arm_stats(r.get("output_tok_s") for r in runs or [])
    return stats["spread"] if stats else None


def _int_list(text: str) -> list[int]:
    try:
        vals = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints; got {text!r}") from None
    if not vals or any(v < 1 for v in vals):
        raise argparse.ArgumentTypeError(f"expected comma-separated ints >= 1; got {text!r}")
    return list(dict.fromkeys(vals))


def _path_list(text: str) -> list[Path]:
    vals = [Path(x.strip()) for x in text.split(",") if x.strip()]
    if not vals:
        raise argparse.ArgumentTypeError(f"expected comma-separated files; got {text!r}")
    return vals


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--child-offline", help=argparse.SUPPRESS)
    p.add_argument("--model", default="mixtral-8x7b-4l", choices=sorted(MODELS))
    p.add_argument("--model-dir", help="a real checkpoint directory (use with --load-format auto)")
    p.add_argument("--load-format", default="dummy")
    p.add_argument("--tokenizer", help="tokenizer directory for serve mode (default: $GPUENV_MIXTRAL_TOKENIZER)")
    p.add_argument("--mode", default="both", choices=("offline", "serve", "both"))
    p.add_argument("--arms", help=f"comma list (default offline {OFFLINE_ARMS}, serve {SERVE_ARMS})")
    p.add_argument("--quick", action="store_true",
                   help=f"the workload sized for one ~8-minute GPU call: {QUICK} (default {FULL})")
    p.add_argument("--out", type=Path)
    p.add_argument("--num-prompts", type=int)
    p.add_argument("--serve-prompts", type=int)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--input-len", type=int)
    p.add_argument("--output-len", type=int)
    p.add_argument("--reps", type=int, help="timed offline passes per arm")
    p.add_argument("--warmup-reps", type=int,
                   help="discarded full offline passes before the timed ones (0: none, not even the 16-prompt one)")
    p.add_argument("--warmup-max-reps", type=int, default=4,
                   help="offline: after --warmup-reps passes, more discarded full passes while the last one "
                        "JIT-compiled a kernel, up to this many in all (default 4; each arm's JSON lists the "
                        "compiles per warm-up pass)")
    p.add_argument("--rounds", type=int, default=1,
                   help="offline: run the arms this many times in turn (A B A B ...), each run a fresh process, and "
                        "pool every round's timed passes per arm: a drift of the machine over the call then hits "
                        "every arm alike; the per-round ratios are reported too (default 1)")
    p.add_argument("--gate-log-paired", action="store_true",
                   help="offline, arms with gate logs: the timed passes alternate gate log on / paused in one "
                        "engine (ABBA blocks; Worker.moekern_gate_log between passes) and the arm reports the "
                        "overhead over adjacent pairs with a bootstrap interval; its own numbers are the on "
                        "passes. Needs an even --reps >= 2. Measures the per-step host side; the layers' "
                        "in-graph count adds run in both halves")
    p.add_argument("--shape-sweep", action=argparse.BooleanOptionalAction, default=True,
                   help="before the warm-up passes (offline) or the warm-up bench (serve), one forward step of "
                        "each size M that meets every fused-MoE tile config and divisibility variant up to the "
                        "batch-token budget (MOE_CONFIG_KEYS; ~300 one-token requests); on by default")
    p.add_argument("--serve-reps", type=int, help="timed `vllm bench serve` runs per arm (after one warm-up run)")
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--gpu-mem", type=float, default=0.85)
    p.add_argument("--max-num-seqs", type=int, default=128,
                   help="vLLM max_num_seqs (CUDA graphs are captured up to it); default 128")
    p.add_argument("--max-num-batched-tokens", type=int, help="vLLM max_num_batched_tokens (default: vLLM's)")
    p.add_argument("--tensor-parallel-size", type=int, default=1)
    p.add_argument("--enable-expert-parallel", action="store_true",
                   help="vLLM expert parallelism: the MoE layers' experts split over the --tensor-parallel-size "
                        "ranks (each rank's gate log then holds its own routed tokens; needs "
                        "--tensor-parallel-size > 1)")
    p.add_argument("--enable-eplb", action="store_true",
                   help="vLLM expert-parallel load balancing (turns on expert parallelism; needs "
                        "--tensor-parallel-size > 1)")
    p.add_argument("--dataset", type=Path,
                   help="JSONL of prompts from `moekern datasets generate` instead of random tokens: tokenized "
                        "with the model's tokenizer offline, vLLM's custom dataset in serve mode")
    p.add_argument("--dummy-router-seed", type=int, default=None, metavar="SEED",
                   help="study tool for dummy weights: re-draw each MoE layer's router from its own seed in every "
                        "arm (MOEKERN_DUMMY_ROUTER_SEED; vLLM's dummy loader gives all layers the same router)")
    p.add_argument("--gate-log-dir", type=Path,
                   help="gate logs of every arm go here (one arm) or to DIR/<arm> (several)")
    p.add_argument("--result", type=Path,
                   help="copy the serve bench JSON here with a 'moekern' block describing the run "
                        "(needs --mode serve and one arm; what `moekern sweep` and `moekern report` read)")
    p.add_argument("--concurrency-grid", type=_int_list, metavar="C1,C2,...",
                   help="serve grid: per arm, ONE server, one warm-up bench, then a bench per (rep, dataset, "
                        "concurrency); the concurrency is the client's --max-concurrency (client-side queue depth; "
                        "the server keeps --max-num-seqs); one result JSON per bench in --result-dir")
    p.add_argument("--datasets", type=_path_list, metavar="A.jsonl,B.jsonl",
                   help="serve grid: the datasets (`moekern datasets generate` files); default random tokens")
    p.add_argument("--grid-reps", type=int, default=1, help="serve grid: repetitions of every point (default 1)")
    p.add_argument("--grid-prefix", help="serve grid: result-name prefix (default ARM_sMAXNUMSEQS[...]; one arm only)")
    p.add_argument("--result-dir", type=Path, help="serve grid: where the per-bench result JSON files go")
    p.add_argument("--plan-only", action="store_true", help="print the plan and its time estimate; run nothing")
    p.add_argument("--child-bench-grid", help=argparse.SUPPRESS)
    p.add_argument("--moe-configs", metavar=f"A.json[{os.pathsep}B.json]",
                   help="tune_moe_shapes.py result files laid over moekern.fused_moe's tile table in every arm "
                        "(MOEKERN_MOE_CONFIGS; copied to OUT/moe_configs/ and named in the results)")
    p.add_argument("--arm-timeout", type=float, default=300)
    p.add_argument("--server-timeout", type=float, default=300)
    p.add_argument("--budget-s", type=float, default=560, help="skip arms that would start after this many seconds")
    p.add_argument("--no-preflight", action="store_true",
                   help="skip moekern/e2e/preflight.py (run first by default; a FAIL there stops the run)")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    """Parsed, defaulted and checked arguments; argparse errors (exit 2) name the bad flag. Touches no
    files except reading the model's committed config.json for its vocab size."""
    p = build_parser()
    args = p.parse_args(argv)
    if args.child_offline or args.child_bench_grid:
        return args
    if args.dummy_router_seed is not None and args.dummy_router_seed < 0:
        p.error(f"--dummy-router-seed must be >= 0; got {args.dummy_router_seed}")
    base = QUICK if args.quick else FULL
    for field in ("num_prompts", "serve_prompts", "input_len", "output_len", "reps", "serve_reps", "warmup_reps"):
        v = getattr(args, field)
        if v is None:
            setattr(args, field, getattr(base, field))
        elif v < (0 if field == "warmup_reps" else 1):
            p.error(f"--{field.replace('_', '-')}={v} must be >= {0 if field == 'warmup_reps' else 1}")
    if args.warmup_max_reps < 0:
        p.error(f"--warmup-max-reps={args.warmup_max_reps} must be >= 0")
    if args.rounds < 1:
        p.error(f"--rounds={args.rounds} must be >= 1")
    if args.gate_log_paired and (args.reps < 2 or args.reps % 2):
        p.error(f"--gate-log-paired needs an even --reps >= 2 (on/off pairs); got --reps {args.reps}")
    args.workload = Workload(**{f: getattr(args, f) for f in Workload.__dataclass_fields__})
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
    for flag in ("max_num_seqs", "max_num_batched_tokens", "tensor_parallel_size", "concurrency"):
        v = getattr(args, flag)
        if v is not None and v < 1:
            p.error(f"--{flag.replace('_', '-')}={v} must be >= 1")
    if args.enable_expert_parallel and args.tensor_parallel_size < 2:
        p.error(f"--enable-expert-parallel needs --tensor-parallel-size > 1 (the ranks the experts are split over); "
                f"got --tensor-parallel-size={args.tensor_parallel_size}")
    if args.enable_eplb and args.tensor_parallel_size < 2:
        p.error(f"--enable-eplb needs --tensor-parallel-size > 1 (vLLM's EPLB balances across the EP group); "
                f"got --tensor-parallel-size={args.tensor_parallel_size}")
    args.enable_expert_parallel = args.enable_expert_parallel or args.enable_eplb  # EPLB balances EP ranks
    if args.dataset is not None and not args.dataset.is_file():
        p.error(f"--dataset {str(args.dataset)!r} is not a file")
    if args.result is not None and (modes != ["serve"] or len(args.arm_plan["serve"]) != 1):
        p.error(f"--result holds one serve run: it needs --mode serve and one arm in --arms; got --mode "
                f"{args.mode} and arms {args.arm_plan}")
    _check_grid_args(p, args, modes)
    if args.moe_configs:
        from moekern.experts.configs import table_from_files

        try:
            table_from_files(args.moe_configs)
        except ValueError as exc:
            p.error(f"--moe-configs: {exc}")
    if args.input_len + args.output_len > args.max_model_len:
        p.error(f"--input-len {args.input_len} + --output-len {args.output_len} must be <= --max-model-len "
                f"{args.max_model_len}")
    return args


def _check_grid_args(p, args, modes) -> None:
    grid_only = [f for f in ("datasets", "grid_prefix", "result_dir") if getattr(args, f) is not None]
    if args.concurrency_grid is None:
        if grid_only or args.grid_reps != 1:
            p.error(f"--{(grid_only or ['grid_reps'])[0].replace('_', '-')} belongs to a serve grid: it needs "
                    f"--concurrency-grid")
        return
    if modes != ["serve"]:
        p.error(f"--concurrency-grid needs --mode serve; got --mode {args.mode}")
    if args.result is not None or args.dataset is not None:
        p.error("--concurrency-grid writes one result per bench to --result-dir and takes --datasets: drop "
                f"{'--result' if args.result is not None else '--dataset'}")
    if args.result_dir is None:
        p.error("--concurrency-grid needs --result-dir (one result JSON per bench goes there)")
    if args.grid_reps < 1:
        p.error(f"--grid-reps={args.grid_reps} must be >= 1")
    if args.grid_prefix is not None and len(args.arm_plan["serve"]) != 1:
        p.error(f"--grid-prefix names one arm's results: it needs one arm in --arms; got {args.arm_plan['serve']}")
    for d in args.datasets or []:
        if not d.is_file():
            p.error(f"--datasets: {str(d)!r} is not a file")
    if len({d.stem for d in args.datasets or []}) != len(args.datasets or []):
        p.error("--datasets: two files share a name stem (the result names would collide)")


def plan_text(args) -> str:
    """One line per mode: the workload and the estimated wall time of this invocation (rates of
    mixtral-8x7b-4l on an H100), with a warning when it exceeds --budget-s."""
    lines = []
    if getattr(args, "concurrency_grid", None):
        arms = args.arm_plan["serve"]
        est = grid_plan_estimate(args, len(arms))
        n = len(args.concurrency_grid) * len(args.datasets or [None]) * args.grid_reps
        lines.append(f"plan serve grid: {len(arms)} arm(s) x one server each, 1 warm-up + {n} benches per server "
                     f"(concurrency {args.concurrency_grid} x {len(args.datasets or [None])} dataset(s) x "
                     f"{args.grid_reps} rep(s)), {args.serve_prompts} prompts x {args.output_len} out each; "
                     f"~{est / 60:.1f} min in all{'' if args.no_preflight else ' with preflight'} (estimate "
                     f"from mixtral-8x7b-4l on an H100)")
        if est > args.budget_s:
            lines.append(f"  warning: the estimate exceeds --budget-s {args.budget_s:.0f}: the last points may be skipped")
        return "\n".join(lines)
    for mode, arms in args.arm_plan.items():
        n_runs = len(arms) * (getattr(args, "rounds", 1) if mode == "offline" else 1)
        est = plan_seconds(args.workload, mode, n_runs, args.concurrency, args.max_num_seqs,
                           shape_sweep=getattr(args, "shape_sweep", False))
        per = (offline_pass_s(args.workload, args.max_num_seqs) if mode == "offline"
               else serve_run_s(args.workload, args.concurrency, args.max_num_seqs))
        w = args.workload
        what = (f"{w.num_prompts} prompts x ({w.input_len} in + {w.output_len} out), {w.warmup_reps} warm-up + "
                f"{w.reps} timed passes" if mode == "offline" else
                f"{w.serve_prompts} prompts x ({w.input_len} in + {w.output_len} out) at concurrency "
                f"{args.concurrency}, 1 warm-up + {w.serve_reps} timed runs")
        rounds = f" x {args.rounds} rounds" if mode == "offline" and getattr(args, "rounds", 1) > 1 else ""
        lines.append(f"plan {mode}: {len(arms)} arm(s){rounds}, {what}; ~{per:.1f} s per timed "
                     f"{'pass' if mode == 'offline' else 'run'}, ~{est / 60:.1f} min "
                     f"in all (estimate from mixtral-8x7b-4l on an H100)")
        if est > args.budget_s:
            lines.append(f"  warning: the estimate exceeds --budget-s {args.budget_s:.0f}: later arms may be skipped")
    return "\n".join(lines)


def result_metadata(args, arm: str, gate_dir: Path | None) -> dict:
    """The 'moekern' block of a --result file, in the keys moekern.analysis.serving.metrics groups by
    (moe_backend, max_num_seqs, max_num_batched_tokens, eplb) plus dataset, predicted_score and gate_log
    (relative to the result file, so a results folder can move as a whole)."""
    from moekern.analysis.study.sweep import predicted_score_from_name

    meta = {"moe_backend": arm, "max_num_seqs": args.max_num_seqs,
            "max_num_batched_tokens": args.max_num_batched_tokens, "eplb": bool(args.enable_eplb),
            "tensor_parallel_size": args.tensor_parallel_size,
            "expert_parallel": bool(args.enable_expert_parallel), "model": args.model,
            "load_format": args.load_format, "concurrency": args.concurrency, "num_prompts": args.serve_prompts,
            "output_len": args.output_len, "runner": "moekern/e2e/run_e2e.py"}
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


def copy_moe_configs(paths: str | None, out: Path) -> dict | None:
    """Copy the --moe-configs files into OUT/moe_configs/ (what the arms ran with stays beside the results);
    returns {"files": [...], "rows": [(E, I, H, M) laid over the table]} or None."""
    if not paths:
        return None
    from moekern.experts.configs import TUNED, read_rows
    from moekern.experts.configs import merge_tuned

    dest = out / "moe_configs"
    dest.mkdir(parents=True, exist_ok=True)
    files = []
    for i, src in enumerate(p for p in paths.split(os.pathsep) if p):
        target = dest / f"{i}_{Path(src).name}"
        shutil.copyfile(src, target)
        files.append({"source": src, "copy": str(target)})
    _, applied = merge_tuned(TUNED, read_rows(paths), min_gain=-math.inf)
    return {"files": files, "rows": [list(r) for r in applied]}


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child_offline:
        return child_offline(args.child_offline)
    if args.child_bench_grid:
        return child_bench_grid(args.child_bench_grid)
    t_start = time.time()
    print(plan_text(args), flush=True)
    if args.plan_only:
        return 0
    out = args.out or REPO / "benchmarks" / "results" / "e2e" / _dt.date.today().isoformat()
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


def check_gate_logs(path: Path) -> dict:
    from moekern.gatelog import read_gate_log

    try:
        records, skipped = read_gate_log(path)
    except FileNotFoundError:
        return {"ok": False, "error": f"no gate log under {path}"}
    bad = sum(1 for r in records if r.top_k and sum(r.expert_counts) != r.num_tokens * r.top_k)
    phases: dict = {}
    ranks: dict = {}
    for r in records:
        phases[r.phase] = phases.get(r.phase, 0) + 1
        ranks[r.rank] = ranks.get(r.rank, 0) + 1
    metas = [json.loads(m.read_text()) for m in sorted(path.glob("*.meta.json"))]
    return {"ok": bool(records) and not skipped and not bad, "records": len(records), "skipped_lines": len(skipped),
            "steps": len({(r.rank, r.step) for r in records}), "phases": phases, "ranks": ranks,
            "sum_mismatch": bad,
            "dropped_steps": sum(m.get("dropped_steps", 0) for m in metas),
            # the recorder's own cost, measured where it is spent (per rank: step hooks on the model's thread,
            # the writer thread's CPU time)
            "host_us_per_step": [m.get("host_us_per_step") for m in metas],
            "host_split_us_per_step": [m.get("host_split_us_per_step") for m in metas],
            "writer_cpu_seconds": [m.get("writer_cpu_seconds") for m in metas]}


if __name__ == "__main__":
    sys.exit(main())
