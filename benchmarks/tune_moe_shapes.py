"""Bounded config search for the fused_moe shapes where moekern loses to vLLM: one GPU call, JSON out, the
winners merged into the tile table (moekern/experts/tiles/sm90.json) by `python benchmarks/tune_moe.py apply`.

    python benchmarks/tune_moe_shapes.py --out DIR                      # GPU: the 10 shapes of LOSING_SHAPES
    python benchmarks/tune_moe_shapes.py --shapes mixtral:256,olmoe:256 --max-candidates 12 --budget-s 120
    python benchmarks/tune_moe_shapes.py --explain                      # CPU: tile/padding/wave arithmetic
    python benchmarks/tune_moe.py apply DIR/tune_moe_shapes.json       # CPU: merge winners into the tile JSON

Per shape (model, M): the inputs are the bench's own (moekern.bench.shapes.make_inputs with the bench's
seed and max_tokens, sliced to M), so times compare with `moekern bench --ops moe` rows. vLLM's fused_experts (its
default config: vLLM 0.26 ships no bf16 H100 file for these shapes) is timed before and after our
candidates, in the same process, on the same tensors, each a CUDA graph of back-to-back calls
(moekern.bench.timing.time_calls); the mean of the two vLLM times is the reference, their spread is
reported as drift. Candidates: tune_moe.shape_candidates (today's pick, vLLM's default as
our unfused and fused kernel, the heuristic, the table's next bucket, one-step neighbours), at most
--max-candidates (default 8). Correctness: each output's first --ref-rows tokens against
fused_moe_reference in fp32 (rows are independent, so a row subset is a full check of those rows) and the
whole output against vLLM's: rel. Frobenius error < 1e-2 for both, else the candidate is reported BAD
and never chosen.

Budget: Triton compiles each new kernel on first use (~2-4 s on an H100 host; 2-3 kernels per
candidate; kernels are shared across M of one model). --budget-s (default 280) is checked before every
candidate after the first two of a shape (today's pick and vLLM's default always run); the JSON is
rewritten after every shape, so a run cut short (or killed) leaves the shapes done so far.
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

from moekern.experts.configs import BlockConfig  # noqa: E402
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tune_moe import (  # noqa: E402
    LOSING_SHAPES,
    cfg_text,
    from_vllm_config,
    programs_per_sm,
    shape_candidates,
    tile_stats,
    today_pair,
    vllm_default_bf16,
)

REL_TOL = 1e-2
BENCH_MAX_TOKENS = 8192  # the bench builds moe inputs once per model at its largest M (8192), seed 0
BENCH_SEED = 0


def parse_shapes(text: str | None) -> list[tuple[str, int]]:
    """'mixtral:256,deepseek-v3:4096' -> [(model, M)]; None -> LOSING_SHAPES."""
    if not text:
        return list(LOSING_SHAPES)
    out = []
    for item in text.split(","):
        name, sep, m = item.strip().partition(":")
        if not sep or not m.isdigit() or int(m) < 1:
            raise ValueError(f"--shapes item {item!r} must be MODEL:M with M >= 1 (e.g. mixtral:256)")
        out.append((name, int(m)))
    return out


def _rel_err(out, ref) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30)).item()


def _vllm():
    """(fused_experts, get_default_config or None, version) or (None, None, reason)."""
    try:
        import vllm
        from vllm.model_executor.layers.fused_moe import fused_experts
    except Exception as exc:  # noqa: BLE001  (ImportError, or vLLM failing to initialise)
        return None, None, f"skipped: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    try:
        from vllm.model_executor.layers.fused_moe.fused_moe import try_get_optimal_moe_config
    except Exception:  # noqa: BLE001
        try_get_optimal_moe_config = None
    return fused_experts, try_get_optimal_moe_config, vllm.__version__


def _vllm_config(try_get, spec, M):
    """(config dict vLLM will use, source): vLLM's own answer when importable, else our reading of its rule."""
    E, H, inter, k = spec.num_experts, spec.hidden_size, spec.intermediate_size, spec.top_k
    ours = vllm_default_bf16(M, E)
    if try_get is None:
        return ours, "tune_moe.vllm_default_bf16 (vLLM not importable)"
    try:
        cfg = dict(try_get((E, 2 * inter, H), (E, H, inter), k, None, M))
    except Exception as exc:  # noqa: BLE001
        return ours, f"vllm_default_bf16 (vLLM's try_get_optimal_moe_config failed: {type(exc).__name__})"
    keys = ("BLOCK_SIZE_M", "BLOCK_SIZE_N", "BLOCK_SIZE_K", "GROUP_SIZE_M", "num_warps", "num_stages")
    agree = all(cfg.get(kk, ours[kk]) == ours[kk] for kk in keys)
    return cfg, "vLLM try_get_optimal_moe_config" + ("" if agree else f" (differs from our reading {ours})")


def _write(path, payload) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=1)
    os.replace(tmp, path)


def run(shapes, out_dir: str, budget_s: float, max_candidates: int, ref_rows: int) -> dict:
    import moekern
    from moekern.bench.shapes import make_inputs, make_shape
    from moekern.bench.timing import time_calls
    from moekern.experts.reference import fused_moe_reference
    from moekern.models import get_model

    t0 = time.perf_counter()
    dev = torch.device("cuda")
    fused_experts, try_get, vllm_version = _vllm()
    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                triton=__import__("triton").__version__, vllm=vllm_version, budget_s=budget_s,
                max_candidates=max_candidates, ref_rows=ref_rows, shapes=[f"{n}:{m}" for n, m in shapes])
    print(json.dumps(meta), flush=True)
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "tune_moe_shapes.json")
    payload = dict(meta=meta, rows=[], complete=False)
    _write(path, payload)

    by_model: dict[str, list[int]] = {}
    for name, M in shapes:
        by_model.setdefault(name, []).append(M)
    for name, tokens in by_model.items():
        spec = get_model(name)
        E, k, H, inter = spec.num_experts, spec.top_k, spec.hidden_size, spec.intermediate_size
        max_m = max(BENCH_MAX_TOKENS, max(tokens))
        full = make_inputs(make_shape("moe", spec, max_m), max_m, dev, BENCH_SEED)
        for M in tokens:
            elapsed = time.perf_counter() - t0
            row = dict(model=name, M=M, E=E, I=inter, H=H, top_k=k, results=[])
            if elapsed > budget_s:
                row["skipped"] = f"time budget {budget_s:g} s spent before this shape"
                payload["rows"].append(row)
                _write(path, payload)
                print(f"{name:14s} M={M:5d} skipped: budget", flush=True)
                continue
            inp = full.first(M)
            x, w, ids, w13, w2 = inp.hidden, inp.topk_weights, inp.topk_ids, inp.w13, inp.w2
            r = min(M, ref_rows)
            ref = fused_moe_reference(x[:r], w13, w2, w[:r], ids[:r]).float()
            vcfg, vsrc = _vllm_config(try_get, spec, M)
            row.update(vllm_config=vcfg, vllm_config_source=vsrc)
            counts = torch.bincount(ids.reshape(-1).long(), minlength=E)
            row["experts_used"] = int((counts > 0).sum())
            row["max_count"] = int(counts.max())
            flops = 2 * M * k * 3 * inter * H
            vllm_times = []

            def time_vllm():
                if fused_experts is None:
                    return
                try:
                    fn = lambda: fused_experts(x, w13, w2, w, ids)  # noqa: E731
                    if "vllm_rel_err" not in row:
                        out = fn()
                        row["vllm_rel_err"] = _rel_err(out[:r], ref)
                        row["_vllm_out"] = out
                    vllm_times.append(time_calls([fn], dev).median_us)
                except Exception as exc:  # noqa: BLE001
                    row["vllm_error"] = f"{type(exc).__name__}: {str(exc)[:200]}"

            time_vllm()
            cands = shape_candidates(M, E, k, inter, H, vllm_cfg=vcfg, max_candidates=max_candidates)
            for i, (cname, pair) in enumerate(cands):
                res = dict(name=cname, gemm1=dataclasses.asdict(pair[0]), gemm2=dataclasses.asdict(pair[1]),
                           src=f"({cfg_text(pair[0])}, {cfg_text(pair[1])})")
                if i >= 2 and time.perf_counter() - t0 > budget_s:
                    res["skipped"] = "time budget"
                    row["results"].append(res)
                    continue
                c0 = time.perf_counter()
                try:
                    fn = lambda pair=pair: moekern.fused_moe(x, w13, w2, topk_weights=w, topk_ids=ids,  # noqa: E731
                                                             block_config=pair, check_ids=False)
                    out = fn()
                    torch.cuda.synchronize()
                    res["first_call_s"] = time.perf_counter() - c0  # mostly Triton compile when new
                    res["rel_err"] = _rel_err(out[:r], ref)
                    if "_vllm_out" in row:
                        res["rel_err_vs_vllm"] = _rel_err(out, row["_vllm_out"])
                    res["ok"] = res["rel_err"] < REL_TOL and res.get("rel_err_vs_vllm", 0.0) < REL_TOL
                    t = time_calls([fn], dev)
                    res.update(us=t.median_us, tflops=flops / t.median_us / 1e6, method=t.method)
                except Exception as exc:  # noqa: BLE001  (out of resources, compile error: report, go on)
                    res["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
                    res["ok"] = False
                    torch.cuda.synchronize()
                row["results"].append(res)
            time_vllm()
            row.pop("_vllm_out", None)
            if vllm_times:
                row["vllm_us"] = sum(vllm_times) / len(vllm_times)
                row["vllm_us_runs"] = vllm_times
                row["vllm_drift"] = (max(vllm_times) - min(vllm_times)) / min(vllm_times)
            today = row["results"][0] if row["results"] else {}
            row["today_us"] = today.get("us") if today.get("ok") else None
            good = [x_ for x_ in row["results"] if x_.get("ok") and x_.get("us")]
            if good:
                best = min(good, key=lambda x_: x_["us"])
                row["best"] = dict(name=best["name"], gemm1=best["gemm1"], gemm2=best["gemm2"], us=best["us"])
            payload["rows"].append(row)
            payload["elapsed_s"] = time.perf_counter() - t0
            _write(path, payload)
            _print_row(row)
            del x, w, ids, ref, inp
        del full
        torch.cuda.empty_cache()
    payload["complete"] = True
    payload["elapsed_s"] = time.perf_counter() - t0
    _write(path, payload)
    _print_summary(payload["rows"])
    print("wrote", path, f"in {payload['elapsed_s']:.0f} s")
    return payload


def _print_row(row) -> None:
    v = row.get("vllm_us")
    line = f"{row['model']:14s} M={row['M']:5d} vllm={v if v is None else round(v, 1)}"
    for r in row["results"]:
        if "us" in r:
            line += f" | {r['name']}={r['us']:.1f}" + (f" ({r['us'] / v:.2f}x)" if v else "") + ("" if r["ok"] else " BAD")
        elif "error" in r:
            line += f" | {r['name']}=ERR"
    print(line, flush=True)


def _print_summary(rows) -> None:
    print("\nmodel           M      vllm_us  today_us  best_us  today/vllm  best/vllm  best")
    ratios_t, ratios_b = [], []
    for r in rows:
        v, t, b = r.get("vllm_us"), r.get("today_us"), (r.get("best") or {}).get("us")
        f = lambda a: f"{a:9.1f}" if a else f"{'-':>9s}"  # noqa: E731
        rt = f"{t / v:10.3f}" if v and t else f"{'-':>10s}"
        rb = f"{b / v:10.3f}" if v and b else f"{'-':>10s}"
        if v and t and b:
            ratios_t.append(t / v)
            ratios_b.append(b / v)
        print(f"{r['model']:14s} {r['M']:5d} {f(v)} {f(t)} {f(b)} {rt} {rb}  {(r.get('best') or {}).get('name')}")
    if ratios_t:
        g = lambda xs: math.exp(sum(map(math.log, xs)) / len(xs))  # noqa: E731
        print(f"geomean over {len(ratios_t)} shapes: today/vllm {g(ratios_t):.3f}, best/vllm {g(ratios_b):.3f}")
    print("\n# ---- winners, (block_m, block_n, block_k, group_m, num_warps, num_stages) per GEMM; merge them into "
          "the tile table with: python benchmarks/tune_moe.py apply JSON ----")
    for r in rows:
        b = r.get("best")
        if b:
            g1, g2 = BlockConfig(**b["gemm1"]), BlockConfig(**b["gemm2"])
            print(f"    ({r['E']}, {r['I']}, {r['H']}) {r['model']}:  {r['M']}: "
                  f"gemm1 {cfg_text(g1)}, gemm2 {cfg_text(g2)}"
                  f"  # {b['name']} {b['us']:.1f} us, today {r.get('today_us') or float('nan'):.1f}, "
                  f"vLLM {r.get('vllm_us') or float('nan'):.1f}")


# ------------------------------------------------------------------ CPU: the arithmetic behind the gap


def routing_counts(spec, M: int, device="cpu", seed: int = BENCH_SEED, max_tokens: int = BENCH_MAX_TOKENS):
    """Tokens per expert for the bench's routing recipe (make_inputs' first two draws: logits, bias) at M.
    On a CUDA device this is the bench's exact draw; on a CPU the same distribution, a different sample."""
    from moekern.routing.reference import fused_topk_reference

    gen = torch.Generator(device=device).manual_seed(seed)
    max_tokens = max(max_tokens, M)
    logits = torch.randn(max_tokens, spec.num_experts, generator=gen, device=device).to(torch.bfloat16)
    bias = None
    if spec.correction_bias:
        bias = (0.1 * torch.randn(spec.num_experts, generator=gen, device=device)).to(torch.bfloat16).float()
    kw = dict(scoring=spec.scoring, renormalize=spec.renormalize, num_expert_group=spec.num_expert_group,
              topk_group=spec.topk_group, routed_scaling_factor=spec.routed_scaling_factor)
    _, ids, _ = fused_topk_reference(logits[:M], spec.top_k, correction_bias=bias, **kw)
    return torch.bincount(ids.reshape(-1).long(), minlength=spec.num_experts).tolist()


def explain(shapes) -> list[dict]:
    """Per shape, for today's pick and vLLM's default: blocks, padding, tiles, waves, weight re-reads."""
    from moekern.models import get_model

    out = []
    hdr = (f"{'model':13s} {'M':>5s} {'who':9s} {'cfg gemm1 | gemm2':64s} {'blk':>5s} {'pad%':>5s} "
           f"{'tiles1':>6s} {'wav1':>5s} {'tiles2':>6s} {'wav2':>5s} {'rd/exp':>6s} {'p/SM':>4s}")
    print(hdr)
    print("blk: used M-blocks; pad%: padded rows / slots; tilesN/wavN: programs doing work and waves of them on "
          "132 SMs x p/SM (estimated residency); rd/exp: M-blocks per used expert (weight re-reads without L2 reuse)")
    for name, M in shapes:
        spec = get_model(name)
        E, k, H, inter = spec.num_experts, spec.top_k, spec.hidden_size, spec.intermediate_size
        counts = routing_counts(spec, M)
        tname, today = today_pair(M, E, k, inter, H)
        for who, (g1, g2) in ((tname.replace("tuned", "ours"), today),
                              ("vllm", from_vllm_config(vllm_default_bf16(M, E)))):
            n1 = inter if g1.fuse_silu else 2 * inter
            bn1 = g1.block_n
            p1, p2 = programs_per_sm(g1, g1.fuse_silu), programs_per_sm(g2, False)
            s1 = tile_stats(counts, g1.block_m, n1, bn1, p1)
            s2 = tile_stats(counts, g2.block_m, H, g2.block_n, p2)
            rec = dict(model=name, M=M, who=who, gemm1=cfg_text(g1), gemm2=cfg_text(g2),
                       experts_used=sum(1 for c in counts if c), max_count=max(counts),
                       gemm1_stats=dataclasses.asdict(s1), gemm2_stats=dataclasses.asdict(s2),
                       programs_per_sm=(p1, p2))
            out.append(rec)
            print(f"{name[:13]:13s} {M:5d} {who[:9]:9s} {cfg_text(g1) + ' | ' + cfg_text(g2):64s} "
                  f"{s1.used_m_blocks:5d} {100 * s1.pad_frac:5.0f} {s1.tiles:6d} {s1.waves:5.1f} {s2.tiles:6d} "
                  f"{s2.waves:5.1f} {s1.weight_reads:6.2f} {p1:>2d}/{p2:<1d}")
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default=None, help="MODEL:M,... (default: the 10 losing shapes)")
    ap.add_argument("--out", default=os.path.join("benchmarks", "results", "tune-moe-shapes"))
    ap.add_argument("--budget-s", type=float, default=280.0, help="stop starting new candidates after this")
    ap.add_argument("--max-candidates", type=int, default=8, help="per shape, <= 12")
    ap.add_argument("--ref-rows", type=int, default=256, help="tokens checked against the fp32 reference")
    ap.add_argument("--explain", action="store_true", help="CPU: print the tile arithmetic, no GPU")
    ap.add_argument("--apply", action="store_true",
                    help="after the run, merge the winners into the package's tile table (tune_moe.py apply)")
    args = ap.parse_args(argv)
    shapes = parse_shapes(args.shapes)
    if not 1 <= args.max_candidates <= 12:
        raise SystemExit(f"--max-candidates={args.max_candidates} must be in [1, 12]")
    if args.explain:
        os.environ.setdefault("TRITON_INTERPRET", "1")
        explain(shapes)
        return
    if not torch.cuda.is_available():
        print("skipped: needs a CUDA GPU (use --explain on a CPU)")
        return
    run(shapes, args.out, args.budget_s, args.max_candidates, args.ref_rows)
    if args.apply:
        from tune_moe import apply_results

        from moekern.experts.configs import SM90_TILES

        applied, _ = apply_results(os.path.join(args.out, "tune_moe_shapes.json"), SM90_TILES)
        print(f"applied {len(applied)} rows to {SM90_TILES}: {applied}")


if __name__ == "__main__":
    main()
