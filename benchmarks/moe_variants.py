"""A/B the grouped-GEMM variants and tile configs of moekern.fused_moe against vLLM's fused_experts, in one
GPU run, and print the winners (the tile table itself is JSON: moekern/experts/tiles/sm90.json).

    python benchmarks/moe_variants.py --out benchmarks/results/<run>/        # GPU, < 6 min on an H100
    python benchmarks/moe_variants.py --host --out DIR                       # GPU: eager host overhead, M=1
    python benchmarks/moe_variants.py --compile-only                         # CPU: sm_90 AOT compile of every
                                                                             # candidate (shared memory check)

What is timed: the experts with precomputed routing (moekern.fused_moe(topk_weights=, topk_ids=,
check_ids=False, block_config=candidate): align + GEMM1 (+ SiLU-and-mul) + GEMM2 + combine) and vLLM's
fused_experts(x, w13, w2, topk_weights, topk_ids) with its default configs, on the same inputs, each as
back-to-back calls in a CUDA graph (moekern.bench.timing.time_calls). Every output is checked against
moekern.experts.reference.fused_moe_reference in fp32 (it visits the used experts only):
||out - ref|| / ||ref|| < 1e-2, the bf16 tolerance of tests/test_moe.py; a candidate that fails is
reported and never chosen.

Candidates (<= 12 per shape; triton_gemm.py's module doc describes the variants): the current TUNED
entry for the nearest M bucket, the heuristic default, and for prefill (M >= 1024) a small grid around
them: fused vs unfused (fuse_silu=False) GEMM1, block_m 64/128, group_m 8, num_stages 3/4, a persistent
and a TMA version of the vLLM-like unfused config. Decode (M <= 64) is at the HBM roofline already; its
few candidates only guard against a regression. Geomean of (ours / vLLM) is printed over the shapes run,
for "tuned" (today's table) and "best" (the winners).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from moekern.experts.configs import TUNED, BlockConfig, default_configs  # noqa: E402

MODELS = ("mixtral", "qwen3-30b-a3b", "deepseek-v3", "olmoe")
TOKENS = (1, 64, 1024, 4096, 8192)
REL_TOL = 1e-2
MAX_CANDIDATES = 12
B = BlockConfig


def _tuned_pair(E, inter, H, M):
    rows = TUNED.get((E, inter, H))
    if not rows:
        return None
    log_m = math.log2(max(M, 1))
    return rows[min(rows, key=lambda b: (abs(math.log2(b) - log_m), b))]


def candidates(E: int, k: int, inter: int, H: int, M: int) -> list[tuple[str, tuple[BlockConfig, BlockConfig]]]:
    """Named (gemm1, gemm2) pairs for one shape; the first is today's pick (TUNED, else the heuristic)."""
    out: list[tuple[str, tuple[BlockConfig, BlockConfig]]] = []

    def add(name, g1, g2):
        if g1.block_m != g2.block_m:
            raise AssertionError(f"candidate {name}: block_m differs")
        g1.validate(name)
        g2.validate(name)
        if all((g1, g2) != pair for _, pair in out):
            out.append((name, (g1, g2)))

    tuned = _tuned_pair(E, inter, H, M)
    heur = default_configs(M, E, k, inter, H, torch.bfloat16)
    if tuned:
        add("tuned", *tuned)
    add("heuristic", *heur)
    base1, base2 = tuned or heur
    rep = dataclasses.replace
    if M <= 256:
        add("tuned-tma", rep(base1, tma=True), rep(base2, tma=True))
        add("tuned-persistent", rep(base1, persistent=2), rep(base2, persistent=2))
        add("bk128-s4", rep(base1, block_k=128, num_stages=4), rep(base2, block_k=128, num_stages=4))
        return out[:MAX_CANDIDATES]
    g2_128 = B(128, 128, 64, 8, 8, 3)
    g2_64 = B(64, 128, 64, 8, 4, 4)
    unf = dict(fuse_silu=False)
    add("vllm-like-unfused-128", B(128, 128, 64, 8, 8, 3, **unf), g2_128)
    add("unfused-128-s4", B(128, 128, 64, 8, 8, 4, **unf), B(128, 128, 64, 8, 8, 4))
    add("unfused-128-bn256", B(128, 256, 64, 8, 8, 3, **unf), g2_128)
    add("unfused-128-bk128", B(128, 128, 128, 8, 8, 3, **unf), B(128, 128, 128, 8, 8, 3))
    add("unfused-64-g8", B(64, 128, 64, 8, 4, 4, **unf), g2_64)
    add("fused-128-g8", B(128, 64, 64, 8, 8, 3), g2_128)
    add("fused-64-g8", B(64, 64, 128, 8, 8, 4), g2_64)
    add("tuned-g8", rep(base1, group_m=8), rep(base2, group_m=8))
    add("unfused-128-persistent", B(128, 128, 64, 8, 8, 3, persistent=1, **unf), rep(g2_128, persistent=1))
    add("unfused-128-tma", B(128, 128, 64, 8, 8, 3, tma=True, **unf), rep(g2_128, tma=True))
    return out[:MAX_CANDIDATES]


def _rel_err(out, ref) -> float:
    return ((out.float() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def _vllm_fused_experts():
    try:
        from vllm.model_executor.layers.fused_moe import fused_experts
    except Exception as exc:  # noqa: BLE001  (ImportError, or vLLM failing to initialise)
        print(f"vllm: skipped: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
        return None
    return fused_experts


def _model_weights(spec):
    torch.manual_seed(0)
    E, H, inter = spec.num_experts, spec.hidden_size, spec.intermediate_size
    w13 = torch.randn(E, 2 * inter, H, dtype=torch.bfloat16, device="cuda").mul_(H ** -0.5)
    w2 = torch.randn(E, H, inter, dtype=torch.bfloat16, device="cuda").mul_(inter ** -0.5)
    return w13, w2


def _inputs(spec, M):
    import moekern

    torch.manual_seed(M)
    x = torch.randn(M, spec.hidden_size, dtype=torch.bfloat16, device="cuda")
    logits = torch.randn(M, spec.num_experts, device="cuda")
    w, ids, _ = moekern.fused_topk(logits, spec.top_k, **spec.routing_kwargs())
    return x, w, ids


def run_search(models, tokens, out_dir, budget_s: float) -> None:
    import moekern
    from moekern.bench.timing import time_calls
    from moekern.experts.reference import fused_moe_reference
    from moekern.models import get_model

    t_start = time.perf_counter()
    fused_experts = _vllm_fused_experts()
    dev = torch.device("cuda")
    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                triton=__import__("triton").__version__, vllm=None)
    if fused_experts is not None:
        import vllm

        meta["vllm"] = vllm.__version__
    print(json.dumps(meta), flush=True)
    rows, winners = [], {}
    n_shapes = len(models) * len(tokens)
    done_shapes = 0
    for name in models:
        spec = get_model(name)
        E, k, H, inter = spec.num_experts, spec.top_k, spec.hidden_size, spec.intermediate_size
        w13, w2 = _model_weights(spec)
        for M in tokens:
            x, w, ids = _inputs(spec, M)
            ref = fused_moe_reference(x.float(), w13, w2, w, ids).float()
            flops = 2 * M * k * 3 * inter * H
            # Time left for this shape, shared fairly by the shapes still to run.
            shape_budget = (budget_s - (time.perf_counter() - t_start)) / max(1, n_shapes - done_shapes)
            shape_start = time.perf_counter()
            row = dict(model=name, M=M, E=E, top_k=k, H=H, I=inter, results=[])
            if fused_experts is not None:
                try:
                    out = fused_experts(x, w13, w2, w, ids)
                    err = _rel_err(out, ref)
                    t = time_calls([lambda: fused_experts(x, w13, w2, w, ids)], dev)
                    row["vllm_us"], row["vllm_rel_err"], row["vllm_method"] = t.median_us, err, t.method
                except Exception as exc:  # noqa: BLE001
                    row["vllm_error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
            cands = candidates(E, k, inter, H, M)
            for i, (cname, pair) in enumerate(cands):
                # Always time today's pick (first) and the heuristic; drop the rest when over budget.
                if i >= 2 and time.perf_counter() - shape_start > shape_budget:
                    row["results"].append(dict(name=cname, skipped="time budget"))
                    continue
                res = dict(name=cname, gemm1=dataclasses.asdict(pair[0]), gemm2=dataclasses.asdict(pair[1]))
                try:
                    fn = lambda pair=pair: moekern.fused_moe(x, w13, w2, topk_weights=w, topk_ids=ids,  # noqa: E731
                                                             block_config=pair, check_ids=False)
                    res["rel_err"] = _rel_err(fn(), ref)
                    t = time_calls([fn], dev)
                    res.update(us=t.median_us, method=t.method, tflops=flops / t.median_us / 1e6,
                               ok=res["rel_err"] < REL_TOL)
                except Exception as exc:  # noqa: BLE001  (out of resources, compile error: report, go on)
                    res["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
                    torch.cuda.synchronize()
                row["results"].append(res)
            good = [r for r in row["results"] if r.get("ok")]
            if good:
                best = min(good, key=lambda r: r["us"])
                row["best"] = best["name"]
                row["best_us"] = best["us"]
                winners[(name, M)] = (best, (E, inter, H))
            tuned = next((r for r in row["results"] if r.get("ok") and r["name"] in ("tuned", "heuristic")), None)
            row["today_us"] = tuned["us"] if tuned else None
            rows.append(row)
            done_shapes += 1
            v = row.get("vllm_us")
            line = f"{name:14s} M={M:5d} vllm={v if v is None else round(v, 1)} "
            for r in row["results"]:
                if "us" in r:
                    ratio = f" ({r['us'] / v:.2f}x)" if v else ""
                    line += f"| {r['name']}={r['us']:.1f}{ratio}{'' if r['ok'] else ' BAD'} "
                elif "error" in r:
                    line += f"| {r['name']}=ERR "
            print(line, flush=True)
            del x, w, ids, ref
        del w13, w2
        torch.cuda.empty_cache()

    def geomean(key):
        ratios = [r[key] / r["vllm_us"] for r in rows if r.get(key) and r.get("vllm_us")]
        return (math.exp(sum(map(math.log, ratios)) / len(ratios)), len(ratios)) if ratios else (None, 0)

    print("\nmodel           M      vllm_us  today_us  best_us  today/vllm  best/vllm  best")
    for r in rows:
        v, t, b = r.get("vllm_us"), r.get("today_us"), r.get("best_us")
        fmt = lambda a: f"{a:9.1f}" if a else f"{'-':>9s}"  # noqa: E731
        rt = f"{t / v:10.3f}" if v and t else f"{'-':>10s}"
        rb = f"{b / v:10.3f}" if v and b else f"{'-':>10s}"
        print(f"{r['model']:14s} {r['M']:5d} {fmt(v)} {fmt(t)} {fmt(b)} {rt} {rb}  {r.get('best')}")
    g_today, n = geomean("today_us")
    g_best, _ = geomean("best_us")
    print(f"geomean over {n} shapes: today/vllm = {g_today}, best/vllm = {g_best}  (target <= 0.9)")

    print("\n# ---- measured winners (gemm1, gemm2 BlockConfig fields). The tile table is data:")
    print("# moekern/experts/tiles/sm90.json; to keep a winner, run benchmarks/tune_moe_shapes.py on its shape and")
    print("# `python benchmarks/tune_moe.py apply RESULTS.json` (or point MOEKERN_MOE_CONFIGS at the results) ----")
    from tune_moe import cfg_text

    for (name, M), (best, key) in winners.items():
        g1, g2 = BlockConfig(**best["gemm1"]), BlockConfig(**best["gemm2"])
        print(f"{name} {key} M={M}: {cfg_text(g1)}, {cfg_text(g2)}  # {best['name']} {best['us']:.1f} us")
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "moe_variants.json"), "w") as f:
            json.dump(dict(meta=meta, geomean_today=g_today, geomean_best=g_best, rows=rows,
                           elapsed_s=time.perf_counter() - t_start), f, indent=1)
        print("wrote", os.path.join(out_dir, "moe_variants.json"))


def run_host(models, out_dir, calls: int = 200) -> None:
    """Eager wall time per call at M=1 (host overhead + kernels), ours (backend auto, check_ids=False) vs
    vLLM fused_experts, next to the CUDA-graph time of the same call."""
    import moekern
    from moekern.bench.timing import time_calls
    from moekern.models import get_model

    fused_experts = _vllm_fused_experts()
    rows = []
    for name in models:
        spec = get_model(name)
        w13, w2 = _model_weights(spec)
        x, w, ids = _inputs(spec, 1)
        provs = {"moekern": lambda: moekern.fused_moe(x, w13, w2, topk_weights=w, topk_ids=ids, check_ids=False)}
        if fused_experts is not None:
            provs["vllm"] = lambda: fused_experts(x, w13, w2, w, ids)
        for pname, fn in provs.items():
            for _ in range(20):
                fn()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            torch.cuda.synchronize()
            eager = (time.perf_counter() - t0) / calls * 1e6
            graph = time_calls([fn], torch.device("cuda")).median_us
            rows.append(dict(model=name, provider=pname, M=1, eager_us=eager, graph_us=graph))
            print(f"{name:14s} {pname:8s} eager {eager:7.1f} us/call   graph {graph:7.1f} us/call", flush=True)
        del w13, w2
        torch.cuda.empty_cache()
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "moe_host_overhead.json"), "w") as f:
            json.dump(rows, f, indent=1)


def run_compile_only(models, tokens) -> None:
    """CPU: compile every candidate's kernels for sm_90 (triton's bundled ptxas, no GPU) and report the
    shared memory each needs (an H100 block may use 227 KiB), so impossible candidates show before a GPU run."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    import triton

    from moekern.experts import triton_gemm as tg
    from moekern.models import get_model

    target = GPUTarget("cuda", 90, 32)
    params = list(tg._grouped_gemm_kernel.arg_names)
    divisible = {"a_ptr", "b_ptr", "c_ptr", "topk_weights_ptr", "sorted_token_ids_ptr", "block_expert_ids_ptr",
                 "num_tokens_post_padded_ptr", "N", "K", "stride_am", "stride_be", "stride_bn", "stride_cm",
                 "rows_per_expert"}
    seen = {}
    worst = 0
    for name in models:
        spec = get_model(name)
        E, k, H, inter = spec.num_experts, spec.top_k, spec.hidden_size, spec.intermediate_size
        for M in tokens:
            for cname, pair in candidates(E, k, inter, H, M):
                for gemm, cfg in ((1, pair[0]), (2, pair[1])):
                    fuse = gemm == 1 and cfg.fuse_silu
                    key = (cfg, gemm, fuse, (H if gemm == 1 else inter) % cfg.block_k == 0)
                    if key in seen:
                        continue
                    const = dict(A_DIV=k if gemm == 1 else 1, FUSE_SILU=fuse, MUL_WEIGHT=gemm == 2, IEEE_FP32=False,
                                 EVEN_K=key[3], USE_TMA=cfg.tma, PERSISTENT=cfg.persistent > 0, BLOCK_M=cfg.block_m,
                                 BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m, PDL=False)
                    sig = {}
                    for p in params:
                        if p in const:
                            sig[p] = "constexpr"
                        elif p == "b_desc" and cfg.tma:
                            sig[p] = f"tensordesc<bf16[{cfg.block_n}, {cfg.block_k}]>"
                        elif p.endswith("_ptr") or p == "b_desc":
                            sig[p] = "*fp32" if p == "topk_weights_ptr" else "*i32" if "ids" in p or "post" in p else "*bf16"
                        else:
                            sig[p] = "i64" if p == "stride_be" else "i32"
                    consts = {(params.index(p),): v for p, v in const.items()}
                    attrs = {(params.index(p),): [["tt.divisibility", 16]] for p in divisible}
                    try:
                        kern = triton.compile(ASTSource(tg._grouped_gemm_kernel, sig, consts, attrs), target=target,
                                              options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages))
                        smem = kern.metadata.shared
                        status = "ok" if smem <= 227 * 1024 else "TOO MUCH SHARED MEMORY"
                    except Exception as exc:  # noqa: BLE001
                        smem, status = -1, f"FAILED {type(exc).__name__}: {str(exc)[:160]}"
                    seen[key] = (smem, status)
                    worst = max(worst, smem)
                    print(f"{name:14s} M={M:5d} {cname:24s} gemm{gemm} smem={smem:7d} {status}  {cfg}",
                          flush=True)
    bad = [s for s in seen.values() if s[1] != "ok"]
    print(f"{len(seen)} kernels compiled for sm_90; {len(bad)} not ok; max shared memory {worst} bytes")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--tokens", default=",".join(map(str, TOKENS)))
    ap.add_argument("--out", default=None, help="directory for moe_variants.json / moe_host_overhead.json")
    ap.add_argument("--budget-s", type=float, default=300.0, help="wall-time budget of the search")
    ap.add_argument("--host", action="store_true", help="measure eager host overhead at M=1 instead")
    ap.add_argument("--compile-only", action="store_true", help="CPU: AOT-compile candidates for sm_90")
    args = ap.parse_args(argv)
    models = args.models.split(",")
    tokens = [int(t) for t in args.tokens.split(",")]
    if args.compile_only:
        os.environ.pop("TRITON_INTERPRET", None)
        return run_compile_only(models, tokens)
    if not torch.cuda.is_available():
        print("skipped: needs a CUDA GPU (use --compile-only on a CPU)")
        return
    if args.host:
        return run_host(models, args.out)
    run_search(models, tokens, args.out, args.budget_s)


if __name__ == "__main__":
    main()
