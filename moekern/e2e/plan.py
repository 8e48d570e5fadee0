"""Workload sizes and the wall-time estimate printed before anything runs (`--plan-only` prints only that).

The rates are those of mixtral-8x7b-4l with dummy weights on an H100 (benchmarks/results/e2e/h100-2026-11-23)
and an H200 (benchmarks/results/e2e/h200-2026-12-06-*); other models differ, and the printed plan says which
model the rates are for. The serve-grid estimate is moekern.analysis.study.sweep's, fed these constants.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


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
# of the H200 runs (benchmarks/results/e2e/h200-2026-12-06-*) initialized in 10-38 s and took 50-84 s of
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
    # a skew switch is two RPCs between benches (~0.1 s): each skew counts as one more pass over the datasets
    num_blocks = len(args.datasets or [None]) * len(getattr(args, "skews", None) or [None])
    return grid_plan_seconds(num_arms, args.concurrency_grid, num_blocks, args.grid_reps,
                             args.serve_prompts, in_len, args.output_len, args.max_num_seqs, grid_timing(),
                             preflight=not args.no_preflight)


def plan_text(args) -> str:
    """One line per mode: the workload and the estimated wall time of this invocation (rates of
    mixtral-8x7b-4l on an H100), with a warning when it exceeds --budget-s."""
    lines = []
    if getattr(args, "concurrency_grid", None):
        arms = args.arm_plan["serve"]
        est = grid_plan_estimate(args, len(arms))
        skews = getattr(args, "skews", None) or []
        n = len(args.concurrency_grid) * len(args.datasets or [None]) * max(1, len(skews)) * args.grid_reps
        sk = f" x {len(skews)} skew(s) {[k for k, _ in skews]}" if skews else ""
        lines.append(f"plan serve grid: {len(arms)} arm(s) x one server each, 1 warm-up + {n} benches per server "
                     f"(concurrency {args.concurrency_grid} x {len(args.datasets or [None])} dataset(s){sk} x "
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
