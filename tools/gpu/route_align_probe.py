"""Run moekern.route_and_align (and, with --layer, the whole fused_moe) a few times at given shapes and check
each result against the torch reference: the target that compute-sanitizer (racecheck) and ncu wrap.

    python tools/gpu/route_align_probe.py [--models qwen3-30b-a3b,deepseek-v3] [--ms 1,16,256] [--iters 3] [--layer]
        [--routing]   # moekern.fused_topk alone (the routing kernel) instead of route_and_align

Exit code 1 when a result differs from the reference (ids, counts, layout exactly; weights to 1e-5).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "benchmarks"))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))


def _check_routing(got, x, top_k: int, kw: dict) -> str | None:
    """None when fused_topk's output equals the torch reference (ids and counts exactly, weights to 1e-5)."""
    from moekern.routing.reference import fused_topk_reference

    (w, ids, counts), (rw, rids, rcounts) = tuple(got), tuple(fused_topk_reference(x, top_k, **kw))
    if not torch.equal(ids.long(), rids.long()):
        return "topk_ids differ"
    if not torch.equal(counts.long(), rcounts.long()):
        return "expert_counts differ"
    if not torch.allclose(w, rw, rtol=1e-5, atol=1e-5, equal_nan=True):
        return "topk_weights differ"
    return None


def main(argv=None) -> int:
    from bench_route_align import _check, _kwargs
    from routing_variants import _spec_args

    import moekern
    from moekern.experts.configs import get_configs
    from moekern.models.registry import get_model

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="qwen3-30b-a3b,deepseek-v3,mixtral,olmoe")
    p.add_argument("--ms", default="1,16,256")
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--layer", action="store_true", help="also run fused_moe (route_and_align + experts) once per shape")
    p.add_argument("--routing", action="store_true",
                   help="run moekern.fused_topk (backend cuda) instead of route_and_align, checked the same way")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("skipped: needs a CUDA GPU", file=sys.stderr)
        return 0
    bad = 0
    for name in [m for m in args.models.split(",") if m]:
        a, spec = _spec_args(name), get_model(name)
        g = torch.Generator(device="cuda").manual_seed(0)
        bias = torch.randn(a["E"], device="cuda", generator=g).mul(0.1).to(torch.bfloat16).float() if a["has_bias"] else None
        kw = _kwargs(a, bias)
        for M in [int(m) for m in args.ms.split(",") if m]:
            x = torch.randn(M, a["E"], device="cuda", generator=g).to(torch.bfloat16)
            if args.routing:
                for _ in range(args.iters):
                    got = moekern.fused_topk(x, a["k"], backend="cuda", **kw)
                err = _check_routing(got, x, a["k"], kw)
                print(f"{name:<15} M={M:<6} routing    {'ok' if err is None else 'WRONG: ' + err}", flush=True)
                bad += err is not None
                continue
            block = get_configs(M, a["E"], a["k"], spec.intermediate_size, spec.hidden_size, torch.bfloat16,
                                torch.device("cuda"))[0].block_m
            for _ in range(args.iters):
                out = moekern.route_and_align(x, a["k"], block_size=block, backend="cuda", **kw)
            err = _check(tuple(out), x, a, bias, block)
            print(f"{name:<15} M={M:<6} block={block:<4} {'ok' if err is None else 'WRONG: ' + err}", flush=True)
            bad += err is not None
            if args.layer:
                H, inter = spec.hidden_size, spec.intermediate_size
                w13 = torch.randn(a["E"], 2 * inter, H, device="cuda", dtype=torch.bfloat16) * H ** -0.5
                w2 = torch.randn(a["E"], H, inter, device="cuda", dtype=torch.bfloat16) * inter ** -0.5
                h = torch.randn(M, H, device="cuda", dtype=torch.bfloat16)
                for _ in range(args.iters):
                    moekern.fused_moe(h, w13, w2, x, a["k"], **kw)
                del w13, w2
    torch.cuda.synchronize()
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
