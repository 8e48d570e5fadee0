"""Routing kernel paths side by side on one GPU: moekern cuda (auto / v1 legacy / the compact and reduction-selection
kernels forced to a single block or to a multi-block grid, with the ticket or atomic counts), moekern triton, the
one-kernel-node floor, and vLLM 0.26's routing ops when importable, on the same inputs.

    python benchmarks/routing_variants.py
    python benchmarks/routing_variants.py --models deepseek-v3 --ms 1,16,64,256,1024,4096,16384,131072
    python benchmarks/routing_variants.py --json routing_variants.json

Timing is moekern.bench.timing.time_calls: back-to-back calls captured in one CUDA graph, median over many
replays, inputs rotated over copies about twice the L2 size (the same method as `moekern bench`). Every
moekern path is first checked against the torch reference (ids and counts exactly); a path that disagrees
is reported as WRONG and not timed. vLLM: fused_topk (topk_softmax) for softmax models, the fused
grouped top-k op for DeepSeek-V3 (no histogram in either). The table gives µs per call and each moekern
path's ratio to vLLM, and at the end each path's geometric mean / min / max ratio over the shapes (the target for
auto: geomean <= 0.8, no shape above 1.0). --eager times eager calls instead of graph replays (host launch cost
included). See csrc/routing/NOTES.md for what to look for.

`floor`: the same timing of the cheapest op that still costs one kernel node: `ids.zero_()` on an [M, k] int32
tensor (one fill kernel per call; rotated over as many copies as the logits). Any routing op costs at least
this much per call on this GPU, so where 0.7 x vLLM is below the floor (column `0.7v<floor`: yes), the target
cannot be met by a faster kernel body, only by doing the work in fewer nodes (e.g. fused into a neighbour).
"cuda-compact" (--variants compact): the compact kernel with auto's grid choice but without auto's v1 shortcut for
one ungrouped token; beside "auto" it shows what that shortcut gains at M = 1. "cuda-redux_atomic" (--variants
redux_atomic): the reduction-selection kernel's multi-block grid with its counts zeroed by a memset node and added
by global atomics instead of the ticket histogram's fenced tail; beside "redux_multi" it prices that tail (two graph
nodes against one).
"""

from __future__ import annotations

import argparse
import json
import math
import sys

import torch

ISSUE_MS = (1, 16, 64, 256, 1024, 4096, 16384)
MODELS = ("mixtral", "qwen3-30b-a3b", "deepseek-v3", "olmoe")
CUDA_VARIANTS = ("auto", "legacy", "single_block", "multi_block", "compact", "redux", "redux_single", "redux_multi",
                 "redux_atomic")
SINGLE_BLOCK_MAX_M = 4096  # a forced single block grid-strides over every token: slow and pointless above this


def _spec_args(name: str):
    from moekern.models.registry import get_model

    spec = get_model(name)
    return dict(
        E=spec.num_experts, k=spec.top_k, scoring=spec.scoring, renormalize=spec.renormalize,
        G=spec.num_expert_group or 0, g=spec.topk_group or 0, scale=float(spec.routed_scaling_factor),
        has_bias=bool(spec.correction_bias),
    )


def _moekern_cuda(variant, a, bias):
    from moekern.routing.cuda_topk import fused_topk_cuda

    return lambda x: fused_topk_cuda(x, a["k"], a["scoring"], a["renormalize"], bias, a["G"], a["g"], a["scale"],
                                     variant)


def _moekern_triton(a, bias):
    import moekern

    kw = dict(scoring=a["scoring"], renormalize=a["renormalize"], routed_scaling_factor=a["scale"],
              correction_bias=bias)
    if a["G"]:
        kw.update(num_expert_group=a["G"], topk_group=a["g"])
    return lambda x: moekern.fused_topk(x, a["k"], backend="triton", **kw)


def _vllm(a, bias):
    """vLLM's routing call for this model, or a string saying why it is skipped."""
    try:
        if a["G"]:
            from vllm import _custom_ops as ops

            if a["scoring"] != "sigmoid":
                return "skipped: vLLM's fused grouped top-k is benchmarked for sigmoid only"
            b = bias if bias is not None else torch.zeros(a["E"], device="cuda")
            probe = torch.randn(2, a["E"], device="cuda", dtype=torch.bfloat16)
            try:
                ops.grouped_topk(probe, a["G"], a["g"], a["k"], a["renormalize"], a["scale"], b, 1)
            except RuntimeError:
                b = b.to(torch.bfloat16)  # some builds want the bias in the scores' dtype
            return lambda x: ops.grouped_topk(x, a["G"], a["g"], a["k"], a["renormalize"], a["scale"], b, 1)
        from vllm.model_executor.layers.fused_moe.router.fused_topk_router import fused_topk

        if a["scoring"] != "softmax":
            return "skipped: vLLM fused_topk is benchmarked for softmax only"
        return lambda x: fused_topk(x, x, a["k"], a["renormalize"])
    except Exception as exc:  # not installed or a broken install: say why, keep going
        return f"skipped: vllm unavailable ({type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''})"


def _check(fn, x, a, bias) -> str | None:
    from moekern.routing.reference import fused_topk_reference

    w, ids, counts = fn(x)
    rw, rids, rcounts = fused_topk_reference(
        x, a["k"], scoring=a["scoring"], renormalize=a["renormalize"], correction_bias=bias,
        num_expert_group=a["G"] or None, topk_group=a["g"] or None, routed_scaling_factor=a["scale"],
    )
    if not torch.equal(ids.to(torch.int32), rids):
        return "ids differ from the reference"
    if not torch.equal(counts.to(torch.int32), rcounts):
        return "counts differ from the reference"
    if not torch.allclose(w, rw, rtol=1e-5, atol=1e-5, equal_nan=True):
        return f"weights differ (max abs err {(w - rw).abs().max().item():.3g})"
    return None


def run(models, ms, dtype, variants, with_triton=True, eager=False) -> list[dict]:
    from moekern.bench.timing import rotating_copies, time_calls

    rows = []
    dev = torch.device("cuda")
    for name in models:
        a = _spec_args(name)
        g = torch.Generator(device="cuda").manual_seed(0)
        bias = torch.randn(a["E"], device="cuda", generator=g) * 0.1 if a["has_bias"] else None
        if bias is not None:
            bias = bias.to(torch.bfloat16).float()  # bf16-exact, so vLLM builds that want a bf16 bias see the same
        providers = {f"cuda-{v}": _moekern_cuda(v, a, bias) for v in variants}
        if with_triton:
            providers["triton"] = _moekern_triton(a, bias)
        vllm = _vllm(a, bias)
        if not isinstance(vllm, str):
            providers["vllm"] = vllm
        for M in ms:
            base = torch.randn(M, a["E"], device="cuda", generator=g).to(dtype)
            copies = [base.clone() for _ in range(rotating_copies(dev, base.numel() * base.element_size()))]
            row = {"model": name, "M": M, "E": a["E"], "k": a["k"], "dtype": str(dtype).replace("torch.", ""),
                   "us": {}, "notes": {}}
            if isinstance(vllm, str):
                row["notes"]["vllm"] = vllm
            try:
                outs = [torch.empty(M, a["k"], device="cuda", dtype=torch.int32) for _ in copies]
                row["us"]["floor"] = time_calls([(lambda o=o: o.zero_()) for o in outs], dev).median_us
            except Exception as exc:
                row["notes"]["floor"] = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
                torch.cuda.synchronize()
            for pname, fn in providers.items():
                if pname == "cuda-single_block" and M > SINGLE_BLOCK_MAX_M:
                    row["notes"][pname] = f"skipped above M={SINGLE_BLOCK_MAX_M}"
                    continue
                try:
                    if pname != "vllm":
                        err = _check(fn, base, a, bias)
                        if err:
                            row["notes"][pname] = f"WRONG: {err}"
                            continue
                    t = time_calls([(lambda x=x, fn=fn: fn(x)) for x in copies], dev, use_graph=not eager)
                    row["us"][pname] = t.median_us
                    if t.method != "cuda-graph" and not eager:
                        row["notes"][pname] = t.note
                except Exception as exc:
                    row["notes"][pname] = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
                    torch.cuda.synchronize()
            row["target_below_floor"] = _target_below_floor(row["us"])
            rows.append(row)
            _print_row(row, [f"cuda-{v}" for v in variants] + (["triton"] if with_triton else []))
    return rows


def ratio_summary(rows) -> dict:
    """Per provider: geometric mean, min and max of its time / vLLM's over the shapes where both were timed."""
    out = {}
    names = sorted({p for r in rows for p in r["us"] if p not in ("vllm", "floor")})
    for p in names:
        ratios = [r["us"][p] / r["us"]["vllm"] for r in rows if p in r["us"] and "vllm" in r["us"]]
        if ratios:
            out[p] = {"geomean": math.exp(sum(map(math.log, ratios)) / len(ratios)), "min": min(ratios),
                      "max": max(ratios), "n": len(ratios)}
    return out


def _target_below_floor(us: dict) -> bool | None:
    """Whether 0.7 x vLLM's time is below one kernel node's cost (None when either was not measured)."""
    if "vllm" not in us or "floor" not in us:
        return None
    return 0.7 * us["vllm"] < us["floor"]


_HEADER_DONE = False


def _print_row(row, moekern_cols):
    global _HEADER_DONE
    cols = list(moekern_cols) + ["floor", "vllm"]
    if not _HEADER_DONE:
        print(f"{'model':<15}{'M':>7}  " + "".join(f"{c:>18}" for c in cols)
              + f"{'auto/vllm':>11}{'<=0.7':>7}{'0.7v<floor':>12}")
        _HEADER_DONE = True
    us = row["us"]
    cells = []
    for c in cols:
        if c in us:
            ratio = f" ({us[c] / us['vllm']:.2f})" if "vllm" in us and c.startswith("cuda") else ""
            cells.append(f"{us[c]:.2f}{ratio}")
        else:
            cells.append("WRONG" if row["notes"].get(c, "").startswith("WRONG") else "-")
    ratio = us["cuda-auto"] / us["vllm"] if "cuda-auto" in us and "vllm" in us else None
    below = row.get("target_below_floor")
    print(f"{row['model']:<15}{row['M']:>7}  " + "".join(f"{c:>18}" for c in cells)
          + (f"{ratio:>11.2f}{'yes' if ratio <= 0.7 else 'no':>7}" if ratio is not None else f"{'-':>11}{'-':>7}")
          + f"{'-' if below is None else ('yes' if below else 'no'):>12}")
    for k, v in row["notes"].items():
        if not v.startswith("skipped above"):
            print(f"{'':<24}{k}: {v}")


def _print_floor_summary(rows) -> None:
    """One line per model: at which M the 0.7 x vLLM target is below the one-node floor."""
    by_model: dict[str, list] = {}
    for r in rows:
        by_model.setdefault(r["model"], []).append(r)
    print("\nfloor = one fill kernel node on an [M, k] int32 tensor, same CUDA-graph timing;"
          " 0.7v<floor: the <=0.7x vLLM target is below what any one-node op costs")
    for model, rs in by_model.items():
        if all(r.get("target_below_floor") is None for r in rs):
            print(f"  {model}: not decided ({rs[0]['notes'].get('vllm') or rs[0]['notes'].get('floor') or 'no vLLM'})")
            continue
        below = [r["M"] for r in rs if r.get("target_below_floor")]
        above = [r["M"] for r in rs if r.get("target_below_floor") is False]
        print(f"  {model}: target below the floor at M={below or 'none'}; reachable in principle at M={above or 'none'}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--ms", default=",".join(map(str, ISSUE_MS)))
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--variants", default=",".join(CUDA_VARIANTS))
    p.add_argument("--no-triton", action="store_true")
    p.add_argument("--eager", action="store_true", help="time eager calls (host launch cost included), no CUDA graph")
    p.add_argument("--json", default=None, help="also write the rows (and the GPU name) to this file")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("skipped: needs a CUDA GPU", file=sys.stderr)
        return 0
    from moekern import _ext

    if not _ext.cuda_kernels_available():
        print("skipped: moekern._C has no device kernels (pip install --no-build-isolation -e . on this GPU box)",
              file=sys.stderr)
        return 0
    print(f"GPU: {torch.cuda.get_device_name()}  torch {torch.__version__}")
    rows = run([m for m in args.models.split(",") if m], [int(m) for m in args.ms.split(",") if m],
               getattr(torch, args.dtype), [v for v in args.variants.split(",") if v], not args.no_triton, args.eager)
    _print_floor_summary(rows)
    summary = ratio_summary(rows)
    print("\ntime / vLLM over the shapes (target for auto: geomean <= 0.8, max <= 1.0):")
    for name, v in summary.items():
        print(f"  {name:<20} geomean {v['geomean']:.3f}  min {v['min']:.3f}  max {v['max']:.3f}  ({v['n']} shapes)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "eager": args.eager,
                       "rows": rows, "summary": summary}, f, indent=1)
    wrong = [(r["model"], r["M"], k) for r in rows for k, v in r["notes"].items() if v.startswith("WRONG")]
    if wrong:
        print(f"WRONG results (not timed): {wrong}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
