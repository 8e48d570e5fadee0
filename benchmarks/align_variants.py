"""Standalone GPU timing of align variants on identical inputs: moekern triton (its default path, and the
single-launch / chunked paths forced), moekern cuda (if built) and vLLM's moe_align_block_size (if importable).

    python benchmarks/align_variants.py                      # model shapes x M in {1, 64, 4096} x B in {16, 64, 128}
    python benchmarks/align_variants.py --small-n-sweep      # single-launch vs chunked crossover (sets SMALL_N)
    python benchmarks/align_variants.py --plans              # every plan of the cuda align (moe_align_variant)
    python benchmarks/align_variants.py --json out.json      # also write the rows

Timing: each provider's call is captured `--inner` times back to back in one CUDA graph; the graph is replayed
`--reps` times, each replay timed with CUDA events; the time per call is the median replay / inner. Inputs
are routed like a real router (top-k of random logits: distinct experts per token), the same tensor for every
provider. Every provider's output is checked before timing: moekern exactly against the torch reference,
vLLM on num_tokens_post_padded, the used block ids and the set of slots of each expert (its order within an
expert is not stable).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from moekern import _ext  # noqa: E402
from moekern.dispatch import triton_ops  # noqa: E402
from moekern.dispatch.reference import align_reference  # noqa: E402

MODELS = {"mixtral": (8, 2), "qwen3-30b-a3b": (128, 8), "deepseek-v3": (256, 8), "olmoe": (64, 8)}  # E, k


def routed_ids(M: int, E: int, k: int, seed: int) -> torch.Tensor:
    gen = torch.Generator(device="cuda").manual_seed(seed)
    logits = torch.randn(M, E, device="cuda", generator=gen)
    return torch.topk(logits, k, dim=1).indices.to(torch.int32)


# --plans: the cuda align with its slots per thread forced (0 = its default plan; 1-16: chunks of 512 x that
# many slots, one launch for one chunk, a histogram launch first for several), the ballot matcher ("b") and the
# pads written by one thread per expert ("t").
PLANS = [(spt, ballot, pads) for spt in (0, 1, 2, 4, 8, 16) for ballot, pads in
         ((False, False), (True, False), (False, True))]


def plan_name(spt: int, ballot: bool, pads: bool = False) -> str:
    return f"cuda-p{spt}{'b' if ballot else ''}{'t' if pads else ''}"


def plan_providers():
    """The cuda align's plans, then vLLM's moe_align_block_size: name -> (make, reason)."""
    if not _ext.cuda_kernels_available():
        why = f"skipped: {_ext.extension_error() or 'built without device kernels'}"
        return {plan_name(*p): (None, why) for p in PLANS}
    out = {}
    for spt, ballot, pads in PLANS:
        out[plan_name(spt, ballot, pads)] = (
            lambda ids, E, B, spt=spt, ballot=ballot, pads=pads: (
                lambda: torch.ops.moekern.moe_align_variant(ids, E, B, None, spt, ballot, pads)), "")
    out["vllm"] = providers(False)["vllm"]
    return out


def providers(small_n_sweep: bool):
    """name -> (make(ids, E, B) -> zero-arg call, or None, reason)."""
    out = {}

    def triton(**kw):
        return lambda ids, E, B: (lambda: triton_ops.align_triton(ids, E, B, None, **kw))

    out["moekern-triton"] = (triton(), "")
    if small_n_sweep:
        out["triton-1launch"] = (triton(small_n=triton_ops.MAX_SMALL_N), "")
        out["triton-chunked"] = (triton(small_n=0), "")
    if _ext.cuda_kernels_available():
        from moekern.dispatch.cuda_ops import align_cuda

        out["moekern-cuda"] = (lambda ids, E, B: (lambda: align_cuda(ids, E, B, None)), "")
    else:
        out["moekern-cuda"] = (None, f"skipped: {_ext.extension_error() or 'built without device kernels'}")
    try:
        from vllm.model_executor.layers.fused_moe.moe_align_block_size import moe_align_block_size

        out["vllm"] = (lambda ids, E, B: (lambda: moe_align_block_size(ids, B, E)), "")
    except Exception as exc:  # noqa: BLE001 - any import failure means: not available here
        out["vllm"] = (None, f"skipped: vllm not importable ({type(exc).__name__}: {exc})")
    return out


def check(name: str, got, ids: torch.Tensor, E: int, B: int) -> None:
    want = align_reference(ids, E, B)
    post = int(want[2])
    if name.startswith(("moekern", "triton", "cuda")):
        for field, x, y in zip(("sorted_token_ids", "block_expert_ids", "num_tokens_post_padded"), want, got):
            if not torch.equal(x, y):
                raise AssertionError(f"{name}: {field} differs from the reference (E={E}, B={B}, M*k={ids.numel()})")
        return
    if int(got[2]) != post:
        raise AssertionError(f"{name}: num_tokens_post_padded {int(got[2])} != {post}")
    used = post // B
    if not torch.equal(got[1][:used], want[1][:used]):
        raise AssertionError(f"{name}: block_expert_ids differ in the used blocks")
    g = got[0][:post].view(-1, B).sort(dim=1).values  # per block, order-free
    w = want[0][:post].view(-1, B).sort(dim=1).values
    if not torch.equal(g, w):
        raise AssertionError(f"{name}: the slots of some block differ")


def time_graph(fn, inner: int, reps: int) -> float:
    """Median µs per call over `reps` replays of a graph holding `inner` calls."""
    for _ in range(3):
        fn()  # compile / autotune outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(inner):
            fn()
    for _ in range(10):
        graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000.0 / inner)
    return statistics.median(times)


def run(shapes, block_sizes, provs, inner, reps, baseline="vllm"):
    rows = []
    for label, M, E, k in shapes:
        ids = routed_ids(M, E, k, seed=M * 1000 + E)
        for B in block_sizes:
            row = dict(shape=label, M=M, E=E, k=k, slots=M * k, B=B)
            for name, (make, _why) in provs.items():
                if make is None:
                    row[name] = None
                    continue
                fn = make(ids, E, B)
                check(name, fn(), ids, E, B)
                row[name] = time_graph(fn, inner, reps)
            rows.append(row)
            print(format_row(row, provs, baseline), flush=True)
    return rows


def format_header(provs, baseline):
    names = list(provs)
    head = f"{'shape':<16}{'M':>6}{'slots':>7}{'B':>5}" + "".join(f"{n:>17}" for n in names)
    ratios = [n for n in names if n != baseline]
    return head + "".join(f"{n + '/' + baseline:>26}" for n in ratios)


def format_row(row, provs, baseline):
    names = list(provs)
    line = f"{row['shape']:<16}{row['M']:>6}{row['slots']:>7}{row['B']:>5}"
    line += "".join(f"{row[n]:>17.2f}" if row[n] is not None else f"{'-':>17}" for n in names)
    base = row.get(baseline)
    for n in names:
        if n == baseline:
            continue
        ok = row[n] is not None and base
        line += f"{row[n] / base:>26.2f}" if ok else f"{'-':>26}"
    return line


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small-n-sweep", action="store_true",
                    help="time the forced single-launch and chunked triton paths from 512 to 16K slots")
    ap.add_argument("--plans", action="store_true",
                    help="time every plan of the cuda align (slots per thread, matcher, pads) from 8 to 32K slots")
    ap.add_argument("--block-sizes", type=int, nargs="+", default=[16, 64, 128])
    ap.add_argument("--inner", type=int, default=20, help="calls per captured graph")
    ap.add_argument("--reps", type=int, default=200, help="graph replays (the median is reported)")
    ap.add_argument("--json", type=Path, help="write the rows here")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("skipped: align_variants.py needs a CUDA GPU")
        return 0
    if args.small_n_sweep and args.plans:
        ap.error("--small-n-sweep and --plans are two different sweeps: pick one")
    provs = plan_providers() if args.plans else providers(args.small_n_sweep)
    for name, (make, why) in provs.items():
        if make is None:
            print(f"{name}: {why}")
    if args.small_n_sweep:
        shapes = [(f"E{E} k8", n // 8, E, 8) for E in (8, 64, 128, 256) for n in (512, 1024, 2048, 4096, 8192, 16384)]
        baseline = "triton-chunked"
    elif args.plans:
        shapes = [(f"E{E} k{k}", M, E, k) for E, k in ((8, 2), (64, 8), (128, 8), (256, 8))
                  for M in (1, 16, 64, 128, 256, 512, 1024, 2048, 4096)]
        baseline = plan_name(0, False, False)
    else:
        shapes = [(m, M, *MODELS[m]) for m in MODELS for M in (1, 64, 4096)]
        baseline = "vllm"
    triton_version = __import__("triton").__version__
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton_version}"
          f"  SMALL_N={triton_ops.SMALL_N}  inner={args.inner} reps={args.reps}  (µs per call, median)")
    print(format_header(provs, baseline))
    rows = run(shapes, args.block_sizes, provs, args.inner, args.reps, baseline)
    if args.json:
        meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                    triton=triton_version, small_n=triton_ops.SMALL_N, inner=args.inner,
                    reps=args.reps)
        args.json.write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
