"""moekern.route_and_align against vLLM's routing + moe_align_block_size, side by side on one GPU.

    python benchmarks/bench_route_align.py [--models ...] [--ms 1,16,64,256,1024,4096] [--json out.json]

Providers, on the same inputs and block size (the block_m moekern.fused_moe picks for the shape):
  moekern-one   moekern.route_and_align(backend="cuda"): one launch (one block, or the grid tier while its blocks fit
                the GPU at once: csrc/dispatch/route_align.cu)
  moekern-two   the same op forced to two launches (routing kernel, then align's)
  vllm          vLLM 0.26's fused_topk (grouped_topk for DeepSeek-V3) then moe_align_block_size
moekern paths are checked against the torch reference (ids, counts, layout exactly; weights 1e-5) before they are
timed; a wrong path is reported as WRONG. Timing: moekern.bench.timing.time_calls (CUDA-graph replay of
back-to-back calls, inputs rotated over ~2x L2). The targets: moekern-one <= 0.5x vLLM at M <= 256, <= 0.7x above.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from routing_variants import MODELS, _spec_args  # noqa: E402

MS = (1, 16, 64, 256, 1024, 4096)


def _kwargs(a, bias) -> dict:
    kw = dict(scoring=a["scoring"], renormalize=a["renormalize"], routed_scaling_factor=a["scale"],
              correction_bias=bias)
    if a["G"]:
        kw.update(num_expert_group=a["G"], topk_group=a["g"])
    return kw


def _vllm(a, bias, block):
    """vLLM's routing + align for this model, or a string saying why it is skipped."""
    try:
        from vllm.model_executor.layers.fused_moe.moe_align_block_size import moe_align_block_size

        if a["G"]:
            from vllm import _custom_ops as ops

            b = bias if bias is not None else torch.zeros(a["E"], device="cuda")

            def route(x):
                return ops.grouped_topk(x, a["G"], a["g"], a["k"], a["renormalize"], a["scale"], b, 1)
        else:
            from vllm.model_executor.layers.fused_moe.router.fused_topk_router import fused_topk

            def route(x):
                return fused_topk(x, x, a["k"], a["renormalize"])

        def call(x):
            w, ids = route(x)[:2]
            return w, ids, moe_align_block_size(ids, block, a["E"])

        return call
    except Exception as exc:
        return f"skipped: vllm unavailable ({type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''})"


def _check(out, x, a, bias, block) -> str | None:
    from moekern.dispatch.reference import align_reference
    from moekern.routing.reference import fused_topk_reference

    kw = _kwargs(a, bias)
    rw, rids, rcounts = fused_topk_reference(x, a["k"], scoring=kw["scoring"], renormalize=kw["renormalize"],
                                             correction_bias=bias, num_expert_group=a["G"] or None,
                                             topk_group=a["g"] or None, routed_scaling_factor=a["scale"])
    want = (rids, rcounts, *align_reference(rids, a["E"], block))
    for name, got, ref in zip(("ids", "counts", "sorted", "blocks", "post_pad"), out[1:], want):
        if not torch.equal(got, ref):
            return f"{name} differ from the reference"
    if not torch.allclose(out[0], rw, rtol=1e-5, atol=1e-5, equal_nan=True):
        return "weights differ"
    return None


def run(models, ms, dtype) -> list[dict]:
    import moekern
    from moekern.bench.timing import rotating_copies, time_calls
    from moekern.experts.configs import get_configs
    from moekern.models.registry import get_model

    rows, dev = [], torch.device("cuda")
    for name in models:
        a = _spec_args(name)
        spec = get_model(name)
        g = torch.Generator(device="cuda").manual_seed(0)
        bias = torch.randn(a["E"], device="cuda", generator=g) * 0.1 if a["has_bias"] else None
        if bias is not None:
            bias = bias.to(torch.bfloat16).float()
        kw = _kwargs(a, bias)
        for M in ms:
            block = get_configs(M, a["E"], a["k"], spec.intermediate_size, spec.hidden_size, torch.bfloat16, dev)[0].block_m
            base = torch.randn(M, a["E"], device="cuda", generator=g).to(dtype)
            copies = [base.clone() for _ in range(rotating_copies(dev, base.numel() * base.element_size()))]
            row = {"model": name, "M": M, "E": a["E"], "k": a["k"], "block_size": block, "us": {}, "notes": {}}
            providers = {
                "moekern-one": lambda x: moekern.route_and_align(x, a["k"], block_size=block, backend="cuda", **kw),
                "moekern-two": lambda x: torch.ops.moekern.route_and_align(
                    x, a["k"], 0 if a["scoring"] == "softmax" else 1, a["renormalize"], bias, a["G"], a["g"],
                    a["scale"], block, True),
            }
            vllm = _vllm(a, bias, block)
            if isinstance(vllm, str):
                row["notes"]["vllm"] = vllm
            else:
                providers["vllm"] = vllm
            for pname, fn in providers.items():
                try:
                    if pname != "vllm":
                        err = _check(fn(base), base, a, bias, block)
                        if err:
                            row["notes"][pname] = f"WRONG: {err}"
                            continue
                    row["us"][pname] = time_calls([(lambda x=x, fn=fn: fn(x)) for x in copies], dev).median_us
                except Exception as exc:
                    row["notes"][pname] = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
                    torch.cuda.synchronize()
            us = row["us"]
            if "vllm" in us:
                row["ratio"] = {p: us[p] / us["vllm"] for p in ("moekern-one", "moekern-two") if p in us}
            rows.append(row)
            cells = "  ".join(f"{p} {us[p]:7.2f}" + (f" ({us[p] / us['vllm']:.2f}x)" if "vllm" in us and p != "vllm"
                                                     else "") for p in us)
            print(f"{name:<15}{M:>7} B={block:<4} {cells}  {'; '.join(f'{k}: {v}' for k, v in row['notes'].items())}")
    return rows


def summary(rows) -> dict:
    """Geometric means of moekern-one / vLLM at M <= 256 and above (the two targets)."""
    out = {}
    for label, pick in (("m_le_256", lambda r: r["M"] <= 256), ("m_gt_256", lambda r: r["M"] > 256)):
        ratios = [r["ratio"]["moekern-one"] for r in rows if pick(r) and "moekern-one" in r.get("ratio", {})]
        if ratios:
            out[label] = {"geomean": math.exp(sum(map(math.log, ratios)) / len(ratios)), "max": max(ratios),
                          "n": len(ratios)}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--ms", default=",".join(map(str, MS)))
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("skipped: needs a CUDA GPU", file=sys.stderr)
        return 0
    print(f"GPU: {torch.cuda.get_device_name()}  torch {torch.__version__}")
    rows = run([m for m in args.models.split(",") if m], [int(m) for m in args.ms.split(",") if m],
               getattr(torch, args.dtype))
    s = summary(rows)
    for k, v in s.items():
        print(f"moekern-one / vLLM, {k}: geomean {v['geomean']:.3f}, max {v['max']:.3f} over {v['n']} shapes")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows, "summary": s},
                      f, indent=1)
    wrong = [(r["model"], r["M"], k) for r in rows for k, v in r["notes"].items() if v.startswith("WRONG")]
    if wrong:
        print(f"WRONG results (not timed): {wrong}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
