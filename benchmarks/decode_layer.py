"""The whole MoE layer with its routing at decode sizes: moekern.fused_moe against vLLM, side by side on one GPU.

    python benchmarks/decode_layer.py [--models qwen3-30b-a3b,olmoe,...] [--ms 1,2,4,8,32,64] [--json out.json]
    VLLM_TUNED_CONFIG_FOLDER=DIR python benchmarks/decode_layer.py ...   # vLLM with configs tuned for this GPU

Providers, on the same bf16 hidden states, router logits and expert weights:
  moekern  moekern.fused_moe(x, w13, w2, logits, top_k, <the model's routing>): route_and_align, two grouped GEMMs
           (SiLU-and-mul fused into the first), the weighted combine, chained by programmatic dependent launch
           (PDL) on sm_90 and later: into GEMM1 always, the kernels after it for experts of at most 16 MiB
           (moekern.experts.triton_gemm.pdl_stages)
  moekern-nopdl  the same with PDL off (MOEKERN_PDL=0); only on GPUs with PDL. pdl_speedup = its time / moekern's
  moekern-pdl    for experts above 16 MiB, PDL through the whole chain (MOEKERN_PDL=1)
  vllm     vLLM 0.26's routing (fused_topk, or the fused grouped top-k op for DeepSeek-V3) then fused_experts, with
           the config vLLM picks for the shape (its shipped table, or VLLM_TUNED_CONFIG_FOLDER's when set)
Both outputs are checked against moekern.experts.reference.fused_moe_reference on the reference routing
(||out - ref|| / ||ref|| < 1e-2, the bf16 tolerance of tests/test_moe.py); a wrong provider is reported, not timed.
Timing: moekern.bench.timing.time_calls, back-to-back calls replayed in a CUDA graph (as inside vLLM's decode
graphs), repeated over --rounds rounds that alternate the providers' order; each provider's time is the median
of its rounds, and the row keeps every round's time (`rounds_us`), so a drift between providers or runs shows.
The roofline is the time to read the weights of the experts the tokens use (3 x H x I bf16 each) plus the
activations, at the device's measured copy bandwidth; a pure read can beat a copy, so fractions a little above
100 % are possible.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from routing_variants import _spec_args  # noqa: E402

MODELS = ("qwen3-30b-a3b", "olmoe", "deepseek-v3", "mixtral")
MS = (1, 2, 4, 8, 32, 64)
REL_TOL = 1e-2


def _routing_kwargs(a, bias) -> dict:
    kw = dict(scoring=a["scoring"], renormalize=a["renormalize"], routed_scaling_factor=a["scale"],
              correction_bias=bias)
    if a["G"]:
        kw.update(num_expert_group=a["G"], topk_group=a["g"])
    return kw


def _vllm_layer(a, bias):
    """vLLM's routing + fused_experts for this model, or a string saying why it is skipped."""
    try:
        from vllm.model_executor.layers.fused_moe import fused_experts

        if a["G"]:
            from vllm import _custom_ops as ops

            b = bias if bias is not None else torch.zeros(a["E"], device="cuda")

            def route(x):
                return ops.grouped_topk(x, a["G"], a["g"], a["k"], a["renormalize"], a["scale"], b, 1)
        else:
            from vllm.model_executor.layers.fused_moe.router.fused_topk_router import fused_topk

            def route(x):
                return fused_topk(x, x, a["k"], a["renormalize"])

        def layer(x, logits, w13, w2):
            w, ids = route(logits)[:2]
            return fused_experts(x, w13, w2, w, ids)

        return layer
    except Exception as exc:
        return f"skipped: vllm unavailable ({type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''})"


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30))


def roofline_us(experts_hit: int, M: int, H: int, inter: int, bytes_per_s: float) -> float:
    """Microseconds to read the used experts' weights and the activations once, at bytes_per_s."""
    return (experts_hit * 3 * H * inter * 2 + 2 * M * H * 2) / bytes_per_s * 1e6


def bench_inputs(name: str, ms, device="cuda"):
    """This bench's tensors for one model: (w13 [E, 2I, H] bf16, w2 [E, H, I] bf16, bias [E] fp32 or None,
    steps {M: (x [M, H] bf16, logits [M, E] bf16)}), drawn from one generator seeded 0 in this order: w13, w2,
    the bias (models with a correction bias), then x and logits for each M in `ms` order. So the same `ms` list
    gives the same tensors to every script that calls this (benchmarks/tune_vllm.py times vLLM's configs on them)."""
    from moekern.models.registry import get_model

    a, spec = _spec_args(name), get_model(name)
    E, H, inter = a["E"], spec.hidden_size, spec.intermediate_size
    g = torch.Generator(device=device).manual_seed(0)
    w13 = (torch.randn(E, 2 * inter, H, device=device, generator=g, dtype=torch.bfloat16) * H ** -0.5)
    w2 = (torch.randn(E, H, inter, device=device, generator=g, dtype=torch.bfloat16) * inter ** -0.5)
    bias = torch.randn(E, device=device, generator=g).mul(0.1).to(torch.bfloat16).float() if a["has_bias"] else None
    steps = {}
    for M in ms:
        x = torch.randn(M, H, device=device, generator=g, dtype=torch.bfloat16)
        steps[M] = (x, torch.randn(M, E, device=device, generator=g, dtype=torch.bfloat16))
    return w13, w2, bias, steps


def reference_layer(name: str, bias, x, logits, w13, w2):
    """The model's reference routing of logits and the reference layer output on it:
    (topk_weights [M, k] fp32, topk_ids [M, k], out [M, H])."""
    from moekern.experts.reference import fused_moe_reference
    from moekern.routing.reference import fused_topk_reference

    a = _spec_args(name)
    rw, rids, _ = fused_topk_reference(logits, a["k"], scoring=a["scoring"], renormalize=a["renormalize"],
                                       correction_bias=bias, num_expert_group=a["G"] or None,
                                       topk_group=a["g"] or None, routed_scaling_factor=a["scale"])
    return rw, rids, fused_moe_reference(x, w13, w2, rw, rids)


def pdl_providers(device: torch.device, w13) -> dict[str, bool]:
    """The PDL settings timed beside fused_moe's default for experts w13 ({provider: MOEKERN_PDL on?}): none where
    the default launches anything with PDL, and the whole chain where the default stops after GEMM1 (large experts);
    nothing on a device without PDL."""
    from moekern.experts.triton_gemm import pdl_stages, use_pdl

    first, rest = pdl_stages(device, w13)
    out = {}
    if first or rest:
        out["moekern-nopdl"] = False
    if first and not rest and use_pdl(device):  # capable, and the size rule (or the switch) stopped the chain
        out["moekern-pdl"] = True
    return out


def _with_pdl(on: bool, fn, *args, **kwargs):
    """fn(*args, **kwargs) with programmatic dependent launch forced on or off (MOEKERN_PDL=1/0, read by fused_moe at
    every call; inside a CUDA-graph capture the captured launches keep the setting)."""
    before = os.environ.get("MOEKERN_PDL")
    os.environ["MOEKERN_PDL"] = "1" if on else "0"
    try:
        return fn(*args, **kwargs)
    finally:
        if before is None:
            del os.environ["MOEKERN_PDL"]
        else:
            os.environ["MOEKERN_PDL"] = before


def interleaved_medians(timers: dict, rounds: int) -> tuple[dict, dict]:
    """timers: name -> zero-argument call returning one timing (us). Runs `rounds` rounds, the providers in order on
    even rounds and reversed on odd ones (neither always goes first after a warm or a cold GPU); returns (median
    per name, every round's times per name)."""
    if rounds < 1:
        raise ValueError(f"rounds={rounds} must be >= 1")
    names = list(timers)
    times = {n: [] for n in names}
    for r in range(rounds):
        for n in (names if r % 2 == 0 else names[::-1]):
            times[n].append(timers[n]())
    return {n: statistics.median(t) for n, t in times.items()}, times


def run(models, ms, rounds: int = 3) -> tuple[list[dict], float]:
    import moekern
    from moekern.bench.timing import measure_hbm_bandwidth, time_calls
    from moekern.models.registry import get_model

    dev = torch.device("cuda")
    bw = measure_hbm_bandwidth(dev)
    rows = []
    for name in models:
        a, spec = _spec_args(name), get_model(name)
        E, H, inter = a["E"], spec.hidden_size, spec.intermediate_size
        w13, w2, bias, steps = bench_inputs(name, ms)
        kw = _routing_kwargs(a, bias)
        vllm = _vllm_layer(a, bias)
        providers = {"moekern": lambda x, lg: moekern.fused_moe(x, w13, w2, lg, a["k"], **kw)}
        for pname, on in pdl_providers(dev, w13).items():
            providers[pname] = lambda x, lg, on=on: _with_pdl(on, moekern.fused_moe, x, w13, w2, lg, a["k"], **kw)
        if not isinstance(vllm, str):
            providers["vllm"] = lambda x, lg: vllm(x, lg, w13, w2)
        for M in ms:
            x, logits = steps[M]
            rw, rids, ref = reference_layer(name, bias, x, logits, w13, w2)
            hit = int(torch.unique(rids).numel())
            roof = roofline_us(hit, M, H, inter, bw)
            row = {"model": name, "M": M, "E": E, "k": a["k"], "H": H, "I": inter, "experts_hit": hit,
                   "roofline_us": roof, "us": {}, "roofline_fraction": {}, "rel_err": {}, "notes": {}}
            if isinstance(vllm, str):
                row["notes"]["vllm"] = vllm
            timers = {}
            for pname, fn in providers.items():
                try:
                    err = rel_err(fn(x, logits), ref)
                    row["rel_err"][pname] = err
                    if not err < REL_TOL:
                        row["notes"][pname] = f"WRONG: relative error {err:.3g} >= {REL_TOL}"
                        continue

                    def timer(fn=fn, pname=pname):
                        t = time_calls([lambda: fn(x, logits)], dev)
                        if t.method != "cuda-graph":
                            row["notes"][pname] = t.note
                        return t.median_us

                    timers[pname] = timer  # compiled by the check above; each timing captures its own graph
                except Exception as exc:
                    row["notes"][pname] = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
                    torch.cuda.synchronize()
            if timers:
                medians, per_round = interleaved_medians(timers, rounds)
                row["rounds_us"] = per_round
                for pname, t in medians.items():
                    row["us"][pname] = t
                    row["roofline_fraction"][pname] = roof / t
            us = row["us"]
            if "moekern" in us and "vllm" in us:
                row["ratio"] = us["moekern"] / us["vllm"]
            if "moekern" in us and "moekern-nopdl" in us:
                row["pdl_speedup"] = us["moekern-nopdl"] / us["moekern"]
            rows.append(row)
            cells = "  ".join(f"{p} {us[p]:7.2f} us ({100 * row['roofline_fraction'][p]:.0f} %)" for p in us)
            ratio = f"  moekern/vllm {row['ratio']:.3f}" if "ratio" in row else ""
            print(f"{name:<15}{M:>4} hit {hit:>3}  roof {roof:6.2f} us  {cells}{ratio}  "
                  + "; ".join(f"{k}: {v}" for k, v in row["notes"].items()), flush=True)
        del w13, w2
        torch.cuda.empty_cache()
    return rows, bw


def summary(rows) -> dict:
    """Geometric mean and max of moekern / vLLM, per model and over all rows."""
    out = {}
    groups = {"all": rows, **{m: [r for r in rows if r["model"] == m] for m in dict.fromkeys(r["model"] for r in rows)}}
    for label, rs in groups.items():
        ratios = [r["ratio"] for r in rs if "ratio" in r]
        if ratios:
            out[label] = {"geomean": statistics.geometric_mean(ratios), "max": max(ratios),
                          "n": len(ratios)}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--ms", default=",".join(map(str, MS)))
    p.add_argument("--json", default=None)
    p.add_argument("--rounds", type=int, default=3,
                   help="timings per provider and shape, in alternating provider order; the median is reported")
    args = p.parse_args(argv)
    if args.rounds < 1:
        p.error(f"--rounds must be >= 1; got {args.rounds}")
    if not torch.cuda.is_available():
        print("skipped: needs a CUDA GPU", file=sys.stderr)
        return 0
    tuned = os.environ.get("VLLM_TUNED_CONFIG_FOLDER") or None
    print(f"GPU: {torch.cuda.get_device_name()}  torch {torch.__version__}  vLLM configs: {tuned or 'shipped'}")
    rows, bw = run([m for m in args.models.split(",") if m], [int(m) for m in args.ms.split(",") if m],
                   args.rounds)
    s = summary(rows)
    for k, v in s.items():
        print(f"moekern / vLLM, {k}: geomean {v['geomean']:.3f}, max {v['max']:.3f} over {v['n']} shapes")
    gains = [r["pdl_speedup"] for r in rows if "pdl_speedup" in r]
    if gains:
        print(f"PDL: time without / with geomean {statistics.geometric_mean(gains):.3f}, "
              f"min {min(gains):.3f}, max {max(gains):.3f} over {len(gains)} shapes")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "copy_bytes_per_s": bw,
                       "vllm_tuned_config_folder": tuned, "rounds": args.rounds, "rows": rows, "summary": s}, f,
                      indent=1)
    wrong = [(r["model"], r["M"], k) for r in rows for k, v in r["notes"].items() if v.startswith("WRONG")]
    if wrong:
        print(f"WRONG results (not timed): {wrong}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
