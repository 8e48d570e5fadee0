"""Steady state: the discarded warm-up passes, the shape sweep, and counting the JIT compiles that happened
while an arm was timed.

Before anything is timed each arm runs discarded warm-up passes of the very workload it measures (offline: a
16-prompt pass, a shape sweep — one forward step of every size that meets a distinct fused-MoE tile config or
divisibility variant, MOE_CONFIG_KEYS — then --warmup-reps full passes, and more, up to --warmup-max-reps,
while the last one still compiled a kernel; serve: the same shape sweep as /v1/completions requests, then one
full `vllm bench serve` run against the same server; `vllm bench serve --num-warmups` only repeats the first
prompt, so it cannot cover the batch shapes). A marker line then splits the arm's log; the JIT compilations
logged after it are stored as `jit_during_measurement`, and a mode whose arms compiled anything while measured
is reported as not steady state (its ratios are not a valid A/B).
"""

from __future__ import annotations


# What vLLM 0.26 logs for a kernel compiled after its warm-up (vllm/utils/jit_monitor.py, "<backend> <event>
# during inference: <kernel>[ (<details>)]. This causes a latency spike; ..."; Triton, CuTeDSL, TileLang),
# and what Triton prints for an autotune run (knobs.autotuning.print, which the monitor switches on).
JIT_WARNING = "JIT compilation during inference"
AUTOTUNE_PRINT = "Triton autotuning for function"
# Written into an arm's log between its warm-up and its measured part (offline: by the child; serve: by us,
# into the server's log): the JIT events after it happened while we measured.
MEASURE_MARKER = "moekern-e2e: warm-up done, measured part starts"

# A serve grid's bench child writes these around each point into the server's log (grid.py), so the JIT events
# of each point are counted apart.
GRID_POINT_START = "moekern-e2e: grid point starts:"
GRID_POINT_END = "moekern-e2e: grid point ends:"


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
    (vLLM's fused_moe_kernel has compiled in timed passes after one full warm-up pass)."""
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
# happened to cut its prefills (compiles have happened inside timed passes after a quiet warm-up pass).
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


def sweep_spec(args, mode: str) -> dict | None:
    """The shape sweep's bounds for `mode` (None with --no-shape-sweep): the batch-token budget (given, or vLLM's
    default for the mode), max_model_len and max_num_seqs."""
    if not getattr(args, "shape_sweep", True):
        return None
    cap = getattr(args, "max_num_batched_tokens", None) or DEFAULT_BATCHED_TOKENS[mode]
    return {"cap": int(cap), "max_model_len": int(getattr(args, "max_model_len", 2048)),
            "max_num_seqs": int(getattr(args, "max_num_seqs", 128))}


def count_jit_between(log_text: str, start: str, end: str) -> dict | None:
    """count_jit_events of the text between the first `start` line and the next `end` line after it; None
    when `start` is missing (an unterminated segment runs to the end of the log)."""
    at = log_text.find(start)
    if at < 0:
        return None
    seg = log_text[at + len(start):]
    stop = seg.find(end)
    return count_jit_events(seg if stop < 0 else seg[:stop], marker=None)
