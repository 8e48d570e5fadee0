"""`moekern bench`: every provider on identical inputs, checked against the reference, then timed.

On a machine without a GPU (or with --demo) it runs a small honest demo instead: tiny versions of the
model shapes, the torch reference vs the Triton interpreter, correctness only; CPU wall-clock times
are recorded but say nothing about kernel speed.
"""

from __future__ import annotations

import json
import os
import sys

from moekern.errors import UsageError
from moekern.models import STANDARD_MODELS

_DEMO_NOTE = (
    "No CUDA GPU here (or --demo): this is a correctness demo at tiny shapes -- the torch reference vs\n"
    "moekern's Triton kernels in the Triton interpreter. Times below are CPU wall clock of the\n"
    "interpreter, NOT kernel performance; real timings need a GPU (run `moekern bench` there)."
)


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _ints(text: str) -> list[int]:
    """argparse type of --tokens: a comma list of ints >= 1."""
    import argparse

    try:
        values = [int(t) for t in _csv(text)]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma list of ints >= 1 (e.g. 1,64,4096)")
    return values


def add_parser(subparsers) -> None:
    from moekern.bench.providers import PROVIDER_NAMES
    from moekern.bench.shapes import DEFAULT_TOKENS, OPS

    p = subparsers.add_parser(
        "bench", help="benchmark routing / align / fused MoE against vLLM, FlashInfer and torch",
        description=__doc__)
    p.add_argument("--ops", default=",".join(OPS), help=f"comma-separated subset of {','.join(OPS)}")
    p.add_argument("--models", default=",".join(STANDARD_MODELS), help="registry names or aliases")
    p.add_argument("--tokens", type=_ints, default=None,
                   help="token counts M for every op (default per op: "
                        + "; ".join(f"{k} {','.join(map(str, v))}" for k, v in DEFAULT_TOKENS.items()) + ")")
    p.add_argument("--providers", default=",".join(PROVIDER_NAMES),
                   help="comma-separated subset of " + ",".join(PROVIDER_NAMES)
                        + " (FlashInfer JIT-compiles for minutes on first use: leave it out to skip that)")
    p.add_argument("--block-sizes", default="64,vllm",
                   help="align block sizes; 'vllm' adds the BLOCK_SIZE_M vLLM's fused MoE picks per (model, M)")
    p.add_argument("--out", default=None,
                   help="output folder (default ~/.cache/moekern/bench/<gpu>-<date>, printed; a run to commit "
                        "goes to benchmarks/results/<gpu>-<date>)")
    p.add_argument("--demo", action="store_true", help="run the CPU demo even when a GPU is present")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--budget-s", type=float, default=None,
                   help="start no new (op, model) group after this many seconds; the rest is reported as "
                        "skipped (for time-limited GPU calls); every row is also appended to OUT/rows.partial.jsonl "
                        "as it is measured")
    p.set_defaults(func=run_command)


def run_command(args) -> int:
    import torch

    demo = args.demo or not torch.cuda.is_available()
    if demo:
        # Must precede the first @triton.jit definition: moekern's kernels import lazily, after this.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from moekern.bench import report, runner
    from moekern.bench.providers import PROVIDER_NAMES, vllm_block_size
    from moekern.bench.shapes import DEMO_BLOCK_SIZES, OPS, bench_shapes, make_shape, resolve_model

    ops = _csv(args.ops)
    bad = [o for o in ops if o not in OPS]
    if bad:
        raise UsageError(f"--ops {','.join(bad)} unknown; expected a comma list of {','.join(OPS)}")
    providers = _csv(args.providers)
    bad = [p for p in providers if p not in PROVIDER_NAMES]
    if bad:
        raise UsageError(f"--providers {','.join(bad)} unknown; expected a comma list of {','.join(PROVIDER_NAMES)}")
    models = _csv(args.models)
    try:
        for m in models:
            resolve_model(m)
    except (KeyError, ValueError) as exc:
        raise UsageError(f"--models: {exc.args[0]}") from None
    tokens = args.tokens
    block_args = _csv(args.block_sizes)
    bad = [b for b in block_args if b != "vllm" and not (b.isdigit() and int(b) >= 1)]
    if bad:
        raise UsageError(f"--block-sizes {args.block_sizes!r}: {','.join(bad)} is not an int >= 1 or 'vllm'")
    numeric_blocks = tuple(int(b) for b in block_args if b != "vllm") or (64,)
    if demo:
        numeric_blocks = DEMO_BLOCK_SIZES if args.block_sizes == "64,vllm" else numeric_blocks
    shapes = bench_shapes(ops, models, tokens, numeric_blocks, tiny=demo)
    if "vllm" in block_args and not demo and "align" in ops:
        shapes = _with_vllm_block_sizes(shapes, make_shape, resolve_model, vllm_block_size)
    device = torch.device("cpu" if demo else "cuda")
    if demo:
        print(_DEMO_NOTE, flush=True)
    print(f"moekern bench: {len(shapes)} shapes x {len(providers)} providers on "
          f"{torch.cuda.get_device_name() if not demo else 'CPU'}", flush=True)
    out_dir = args.out or report.default_out_dir(runner.environment(device))
    print(f"output folder: {out_dir}", flush=True)
    os.makedirs(out_dir, exist_ok=True)
    partial = os.path.join(out_dir, "rows.partial.jsonl")
    with open(partial, "w") as f:  # each row as soon as it is measured: survives a killed run

        def on_row(row, f=f):
            f.write(json.dumps(row, default=str) + "\n")
            f.flush()

        result = runner.run(shapes, providers, device, seed=args.seed, progress=not args.no_progress,
                            on_row=on_row, budget_s=args.budget_s)
    data = result.to_dict()
    data["environment"]["demo"] = demo
    path = report.write_json(data, out_dir)
    timed, rest = report.tables(data)
    env = data["environment"]
    print(f"\n{env.get('gpu') or 'CPU demo'} | driver {env.get('driver')} | torch {env['torch']} | triton "
          f"{env['triton']} | vllm {env['vllm']} | flashinfer {env['flashinfer']} | {env['date']}")
    ceil = env.get("ceilings") or {}
    if ceil.get("hbm_GBps"):
        print(f"measured ceilings: HBM copy {ceil['hbm_GBps']:.0f} GB/s, bf16 matmul {ceil['bf16_matmul_TFLOPs']:.0f} TFLOP/s")
    print(timed)
    if rest:
        print("\nnot timed:\n" + rest)
    with open(os.path.join(out_dir, "table.txt"), "w") as f:
        f.write(timed + ("\n\nnot timed:\n" + rest if rest else "") + "\n")
    written = [path, os.path.join(out_dir, "table.txt")]
    if not args.no_plots:
        written += report.plot(data, out_dir)
    print("\nwrote " + ", ".join(written))
    if demo:
        print("\nCPU demo: outputs were checked against the torch reference; the times are the interpreter's "
              "wall clock, not kernel performance. Timings need a GPU.")
    bad_rows = [r for r in data["rows"] if r["status"] in ("wrong", "error")]
    if bad_rows:
        print(f"\n{len(bad_rows)} measurement(s) wrong or failed (see 'not timed' above)", file=sys.stderr)
        return 1
    return 0


def _with_vllm_block_sizes(shapes, make_shape, resolve_model, vllm_block_size):
    """After each align shape, the same shape at the block size vLLM would pick, if that one is new."""
    seen = set(shapes)
    result = []
    for s in shapes:
        result.append(s)
        if s.op != "align":
            continue
        b = vllm_block_size(s, s.num_tokens)
        if b:
            extra = make_shape("align", resolve_model(s.model), s.num_tokens, b)
            if extra not in seen:
                seen.add(extra)
                result.append(extra)
    return result
