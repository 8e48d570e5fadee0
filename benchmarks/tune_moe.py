"""Tune the grouped-GEMM tiles of moekern.fused_moe on this GPU; keep the winners in the tile table (JSON).

    python benchmarks/tune_moe.py [--models mixtral,olmoe] [--tokens 1,64,1024] [--json out.json]
    python benchmarks/tune_moe.py apply RESULTS.json [--tiles PATH] [--min-gain 0.02] [--dry-run]
    python benchmarks/tune_moe.py holes [--models ...] [--max-m 1024] [--json out.json]

The tuned table is data: moekern/experts/tiles/sm90.json (H100 and H200), read by moekern/experts/configs.py.
The first form (GPU) prints one JSON line per (model, M) with the winning gemm1/gemm2 fields. The second form
(CPU) merges the winners of benchmarks/tune_moe_shapes.py (its tune_moe_shapes.json) into the tile file: a
winner replaces its (E, I, H, M) row when it beats today's pick by --min-gain, and its row's note records the
candidate, the times and the GPU (apply_results; configs.merge_tuned). The third form (CPU) looks for holes in
the table: decode batch sizes whose row's block_m makes the kernel read each used expert's weights clearly
more than once (find_holes). The pure helpers below (vLLM's default rule for comparison, shape candidates,
tile arithmetic) are shared by tune_moe_shapes.py and tested on CPU in tests/test_tune_moe.py.

For each (model, M) it routes random logits with the model's routing, aligns once per candidate block_m,
times each GEMM's candidates separately with triton.testing.do_bench (the two GEMMs are independent given
block_m), and keeps the block_m whose best pair is fastest. It also times the whole layer with the tuned
pair and with the heuristic default, and reports the decode roofline: bytes of the experts' weights that
must be read (used experts only) over the time, against the device's copy bandwidth. GPU only.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import os
import sys
from dataclasses import dataclass

import torch

# This checkout's moekern (not an installed copy): `apply` writes the tile file of the package it imports.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from moekern.experts.configs import (  # noqa: E402
    SM90_TILES,
    BlockConfig,
    TileRow,
    default_configs,
    load_results,
    merge_tuned,
    read_tiles,
    table_of,
    tiles_json,
    tuned_bucket,
    tuned_table,
)

H100_SMS = 132
SMEM_PER_SM = 228 * 1024  # bytes an H100 SM shares among resident programs (227 KiB max for one)
REGS_PER_SM = 65536

# (model, M) where moekern-triton lost to vLLM 0.26 default-config fused_experts, or was within 10 %, on an
# H100 bench before the tile table had rows above M = 1024 (moekern/experts/NOTES.md, "Where we lose to vLLM");
# the default shape list of tune_moe_shapes.py.
LOSING_SHAPES: tuple[tuple[str, int], ...] = (
    ("mixtral", 256), ("mixtral", 4096), ("mixtral", 8192),
    ("qwen3-30b-a3b", 4096), ("qwen3-30b-a3b", 8192),
    ("deepseek-v3", 256), ("deepseek-v3", 1024), ("deepseek-v3", 4096), ("deepseek-v3", 8192),
    ("olmoe", 256),
)


def vllm_default_bf16(num_tokens: int, num_experts: int) -> dict:
    """The tile vLLM 0.26's get_default_config picks for bf16/fp16 without a tuned JSON file (the case on an
    H100 for every shape here), in its own dict keys. Our reading of its rule, for use where vLLM cannot be
    imported; on a GPU host tune_moe_shapes.py asks vLLM itself and records whether the two agree.
    Note that it keys on M = tokens, not on tokens per expert, and uses one config for both GEMMs."""
    M = num_tokens
    block_m = 16 if M <= 32 else 32 if M <= 96 else 64 if M <= 512 else 128
    return {
        "BLOCK_SIZE_M": block_m,
        "BLOCK_SIZE_N": 64 if M <= 64 else 128,
        "BLOCK_SIZE_K": 128 if M <= 64 else 64,
        "GROUP_SIZE_M": 16 if M // max(num_experts, 1) > 128 else 1,
        "num_warps": 4 if M <= 128 else 8,
        "num_stages": 4 if M <= 32 else 3,
    }


def from_vllm_config(cfg: dict) -> tuple[BlockConfig, BlockConfig]:
    """vLLM's structure as our (gemm1, gemm2): one accumulator over 2I columns (fuse_silu=False) + SiLU-and-mul,
    the same tile for the down GEMM. SPLIT_K (always 1 for bf16) has no counterpart."""
    base = BlockConfig(cfg["BLOCK_SIZE_M"], cfg["BLOCK_SIZE_N"], cfg["BLOCK_SIZE_K"], cfg.get("GROUP_SIZE_M", 1),
                       cfg.get("num_warps", 4), cfg.get("num_stages", 3))
    return dataclasses.replace(base, fuse_silu=False), base


def today_pair(num_tokens: int, num_experts: int, top_k: int, inter: int, hidden: int,
               table=None) -> tuple[str, tuple[BlockConfig, BlockConfig]]:
    """What fused_moe picks on an H100 in bf16 (the table's bucket, else the heuristic), without a device."""
    table = tuned_table() if table is None else table
    rows = table.get((num_experts, inter, hidden))
    if rows:
        b = tuned_bucket(rows, num_tokens)
        return f"tuned[{b}]", rows[b]
    return "heuristic", default_configs(num_tokens, num_experts, top_k, inter, hidden, torch.bfloat16)


def shape_candidates(num_tokens: int, num_experts: int, top_k: int, inter: int, hidden: int,
                     vllm_cfg: dict | None = None, max_candidates: int = 12,
                     table=None) -> list[tuple[str, tuple[BlockConfig, BlockConfig]]]:
    """<= max_candidates named (gemm1, gemm2) pairs for one shape, most informative first (a time budget cuts
    from the end): today's pick, vLLM's default (as its unfused structure, and as our fused kernel at the
    same shared memory per stage), at decode sizes (M <= 16) today's pick with half the N tile (at M <= 4 also
    split-K GEMM1s over 4, 2 and 8 K shares, half of GEMM1's N tile alone, and a quarter of both), the
    heuristic, the table rows of the neighbouring buckets, then one-step neighbours of today's pick (block_m x2
    and /2, group_m, warps, stages, fused/unfused)."""
    table = tuned_table() if table is None else table
    vllm_cfg = vllm_cfg or vllm_default_bf16(num_tokens, num_experts)
    out: list[tuple[str, tuple[BlockConfig, BlockConfig]]] = []

    def add(name, g1, g2):
        if g1.block_m != g2.block_m:
            g2 = dataclasses.replace(g2, block_m=g1.block_m)
        pair = (g1, g2)
        try:
            g1.validate(name)
            g2.validate(name)
        except ValueError:
            return
        if len(out) < max_candidates and all(pair != p for _, p in out):
            out.append((name, pair))

    today_name, (t1, t2) = today_pair(num_tokens, num_experts, top_k, inter, hidden, table)
    add(f"today:{today_name}", t1, t2)
    v1, v2 = from_vllm_config(vllm_cfg)
    add("vllm-default", v1, v2)
    add("vllm-tile-fused", dataclasses.replace(v1, fuse_silu=True, block_n=max(16, v1.block_n // 2)), v2)
    rep = dataclasses.replace
    if num_tokens <= 16:
        # decode sizes: few M-blocks, so the N tiles set the program count (Qwen3 M=1: 96 programs of 16 x 64 left
        # 91 % of the warps idle under ncu, and vLLM's own tuner picks BLOCK_N 32 there)
        add("today-bn-div2", rep(t1, block_n=max(16, t1.block_n // 2)), rep(t2, block_n=max(16, t2.block_n // 2)))
        if num_tokens <= 4:
            # about one slot per expert: more GEMM1 programs over the same weights, either by K shares (split-K:
            # fp32 partials over 2I columns, the unfused tile twice as wide, reduced by GEMM2's loads) or by a
            # narrower N tile of GEMM1 alone (GEMM2 as today, so GEMM1's program count is what changes)
            wide = min(256, 2 * t1.block_n) if t1.fuse_silu else t1.block_n
            for splits in (4, 2, 8):
                add(f"today-split{splits}", rep(t1, fuse_silu=False, block_n=wide, split_k=splits, persistent=0,
                                                tma=False), t2)
            add("today-g1-bn-div2", rep(t1, block_n=max(16, t1.block_n // 2)), t2)
            add("today-bn-div4", rep(t1, block_n=max(16, t1.block_n // 4)), rep(t2, block_n=max(16, t2.block_n // 4)))
    add("heuristic", *default_configs(num_tokens, num_experts, top_k, inter, hidden, torch.bfloat16))
    rows = table.get((num_experts, inter, hidden), {})
    if rows:
        here = tuned_bucket(rows, num_tokens)
        for b in sorted(rows, key=lambda b: abs(math.log2(b) - math.log2(max(num_tokens, 1)))):
            if b != here:
                add(f"tuned[{b}]", *rows[b])
                break
    up = min(128, t1.block_m * 2)  # 256-row tiles with two fp32 accumulators spill registers
    add("today-bm-x2", rep(t1, block_m=up, num_warps=max(t1.num_warps, 8 if up >= 128 else 4)),
        rep(t2, block_m=up, num_warps=max(t2.num_warps, 8 if up >= 128 else 4)))
    add("today-g8", rep(t1, group_m=8), rep(t2, group_m=8))
    add("vllm-default-g8", rep(v1, group_m=8), rep(v2, group_m=8))
    add("today-unfused", rep(t1, fuse_silu=False, block_n=min(256, 2 * t1.block_n)), t2)
    add("today-bm-div2", rep(t1, block_m=max(16, t1.block_m // 2)), rep(t2, block_m=max(16, t1.block_m // 2)))
    add("today-warps", rep(t1, num_warps=12 - t1.num_warps if t1.num_warps in (4, 8) else 4),
        rep(t2, num_warps=12 - t2.num_warps if t2.num_warps in (4, 8) else 4))
    add("today-stages", rep(t1, num_stages=7 - t1.num_stages if t1.num_stages in (3, 4) else 3),
        rep(t2, num_stages=7 - t2.num_stages if t2.num_stages in (3, 4) else 3))
    return out


@dataclass(frozen=True)
class TileStats:
    """Work of one grouped GEMM under one alignment (what a launch of _grouped_gemm_kernel really does)."""

    used_m_blocks: int  # sum over experts of ceil(count / block_m)
    padded_rows: int  # used_m_blocks * block_m - slots
    pad_frac: float  # padded_rows / slots
    n_tiles: int  # ceil(N_out / block_n); N_out = 2I for an unfused GEMM1
    tiles: int  # used_m_blocks * n_tiles: programs that do work
    grid: int  # programs launched (worst-case block count x n_tiles; the rest return at once)
    waves: float  # tiles / (SMs x programs per SM)
    weight_reads: float  # M-blocks per used expert: weight bytes read (from L2 or HBM) / weight bytes once


def tile_stats(counts, block_m: int, n_out: int, block_n: int, programs_per_sm: int = 1,
               sms: int = H100_SMS) -> TileStats:
    """counts: tokens (slots) per expert. Pure arithmetic, no device."""
    counts = [int(c) for c in counts]
    slots = sum(counts)
    used = sum(-(-c // block_m) for c in counts)
    experts_used = sum(1 for c in counts if c)
    n_tiles = -(-n_out // block_n)
    worst_blocks = -(-(slots + len(counts) * (block_m - 1)) // block_m)
    return TileStats(used, used * block_m - slots, (used * block_m - slots) / max(slots, 1), n_tiles,
                     used * n_tiles, worst_blocks * n_tiles, used * n_tiles / (sms * programs_per_sm),
                     used / max(experts_used, 1))


def smem_estimate(cfg: BlockConfig, fused: bool, itemsize: int = 2) -> int:
    """Shared memory bytes of the software pipeline: num_stages buffers of the A tile and the B tile(s).
    An estimate (Triton may keep num_stages - 1 or num_stages buffers; epilogue scratch is ignored); the
    AOT compile of benchmarks/moe_variants.py --compile-only reports the exact number for our kernels."""
    b_tiles = 2 if fused else 1
    return cfg.num_stages * (cfg.block_m * cfg.block_k + b_tiles * cfg.block_n * cfg.block_k) * itemsize


def programs_per_sm(cfg: BlockConfig, fused: bool) -> int:
    """Resident programs per SM, bounded by shared memory and by the fp32 accumulators' registers (plus an
    assumed 64 registers of addresses and loop state per thread); an estimate, see smem_estimate."""
    by_smem = SMEM_PER_SM // max(smem_estimate(cfg, fused), 1)
    threads = 32 * cfg.num_warps
    regs = (2 if fused else 1) * cfg.block_m * cfg.block_n // threads + 64
    by_regs = REGS_PER_SM // (min(regs, 255) * threads)
    return max(1, min(by_smem, by_regs, 32 // cfg.num_warps))


# ------------------------------------------------------------------ holes in the table (CPU)
MAX_BLOCK_M = 128  # the largest M tile the kernels are tuned over (_candidates)
def decode_sizes(max_m: int = 1024) -> list[int]:
    """The batch sizes a vLLM decode step runs at under CUDA graphs (1, 2, 4, then every 8; vLLM 0.26's
    default capture sizes), and powers of two up to max_m."""
    sizes = {1, 2, 4, *range(8, min(max_m, 512) + 1, 8)}
    m = 1
    while m <= max_m:
        sizes.add(m)
        m *= 2
    return sorted(x for x in sizes if x <= max_m)


def expected_weight_reads(num_tokens: int, num_experts: int, top_k: int, block_m: int, draws: int = 16,
                          seed: int = 0) -> float:
    """Mean over random routings (each token: top_k distinct experts, uniform) of M-blocks per used expert,
    tile_stats' weight_reads: how many times a weight-bound (decode) step reads each used expert's weights."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + num_tokens)
    total = 0.0
    for _ in range(draws):
        ids = torch.rand(num_tokens, num_experts, generator=g).topk(top_k, dim=1).indices
        counts = torch.bincount(ids.flatten(), minlength=num_experts).tolist()
        total += tile_stats(counts, block_m, 1, 1).weight_reads
    return total / draws


def find_holes(models, table=None, max_m: int = 1024, ratio: float = 1.25, max_per_expert: float = 128) -> list[dict]:
    """Decode batch sizes where the table's row makes each used expert's weights be read `ratio` times or more
    as often as the next larger block_m would (expected over random routings), in the weight-bound regime
    (at most max_per_expert slots per expert). Mixtral M = 128 was one such hole before the table had an
    M = 128 row: it took the M = 64 row (block_m 32: 32 slots per expert on average, so about half the experts need two M-blocks;
    weights read ~1.5 times, 1246 us against 938 us with block_m 64). A hole is a candidate to tune, not a
    proof: compute, padding and the other tile sizes also count; the GPU decides (tune_moe_shapes.py)."""
    from moekern.models import get_model

    table = tuned_table() if table is None else table
    out = []
    for name in models:
        spec = get_model(name)
        E, k, key = spec.num_experts, spec.top_k, (spec.num_experts, spec.intermediate_size, spec.hidden_size)
        rows = table.get(key)
        if not rows:
            continue
        for m in decode_sizes(max_m):
            per_expert = m * k / E
            if per_expert > max_per_expert:
                continue
            bucket = tuned_bucket(rows, m)
            bm = rows[bucket][0].block_m
            if bucket == m or 2 * bm > MAX_BLOCK_M or per_expert <= bm / 2:
                continue  # a measured row; no larger tile; or one M-block per expert for nearly every routing
            reads = expected_weight_reads(m, E, k, bm)
            bigger = expected_weight_reads(m, E, k, 2 * bm)
            if reads >= ratio * bigger:
                out.append({"model": name, "M": m, "row": bucket, "block_m": bm, "slots_per_expert": round(per_expert, 1),
                            "weight_reads": round(reads, 3), "block_m_x2": 2 * bm, "weight_reads_x2": round(bigger, 3)})
    return out


def main_holes(argv) -> int:
    ap = argparse.ArgumentParser(prog="python benchmarks/tune_moe.py holes",
                                 description="decode batch sizes where the tile table's block_m re-reads expert "
                                             "weights (CPU; candidates for tune_moe_shapes.py)")
    ap.add_argument("--models", default="mixtral,qwen3-30b-a3b,deepseek-v3,olmoe")
    ap.add_argument("--max-m", type=int, default=1024)
    ap.add_argument("--ratio", type=float, default=1.25, help="flag when block_m reads weights this many times "
                                                              "as often as 2 x block_m (default 1.25)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.max_m < 1 or args.ratio <= 1:
        ap.error("--max-m must be >= 1 and --ratio > 1")
    from moekern.experts.configs import active_table

    holes = find_holes(args.models.split(","), active_table(), args.max_m, args.ratio)
    for h in holes:
        print(f"{h['model']:15s} M={h['M']:5d}  row {h['row']:5d}  block_m {h['block_m']:3d}  "
              f"{h['slots_per_expert']:6.1f} slots/expert  weights read {h['weight_reads']:.2f}x  "
              f"(block_m {h['block_m_x2']}: {h['weight_reads_x2']:.2f}x)")
    print(f"{len(holes)} hole(s) at ratio >= {args.ratio}" + (": tune these M with benchmarks/tune_moe_shapes.py"
                                                             if holes else ""))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(holes, f, indent=1)
    return 0


# ------------------------------------------------------------------ applying measured winners (CPU)


def cfg_text(c: BlockConfig) -> str:
    """One BlockConfig, compact: the six positional fields, then the variant fields that differ from default."""
    extra = "".join(f", {f.name}={getattr(c, f.name)!r}" for f in dataclasses.fields(c)[6:]
                    if getattr(c, f.name) != f.default)
    return f"({c.block_m}, {c.block_n}, {c.block_k}, {c.group_m}, {c.num_warps}, {c.num_stages}{extra})"


def winner_note(row: dict, meta: dict) -> str:
    """A tile row's note for a tune_moe_shapes.py winner: candidate, its time, the time of the pick it replaces
    and vLLM's (us), and the GPU and versions from the result file's meta."""
    v = row.get("vllm_us")
    where = ", ".join(str(meta[k]) if k == "device" else f"{k} {meta[k]}"
                      for k in ("device", "torch", "triton") if meta.get(k))
    return (f"{row['best']['name']}: {row['best']['us']:.0f} us, was {row['today_us']:.0f}"
            + (f", vLLM {v:.0f}" if v else "") + (f" ({where})" if where else ""))


def apply_results(results_path: str, tiles_path: str = SM90_TILES, min_gain: float = 0.02,
                  dry_run: bool = False) -> tuple[list, str]:
    """Merge tune_moe_shapes.py's JSON into a tile file (configs.SM90_TILES by default; in place unless dry_run
    or nothing changed). Returns (the (E, I, H, M) rows changed, the new file's text). A changed row gets a note
    from winner_note; the other rows, their notes and the file's meta stay as they were."""
    try:
        meta, rows = load_results(results_path)
    except (OSError, ValueError) as exc:
        raise ValueError(f"{results_path}: cannot read tune_moe_shapes.py results: {exc}") from exc
    tiles_meta, tile_rows = read_tiles(tiles_path)
    old = {r.key: r for r in tile_rows}
    models = {r.key[:3]: r.model for r in tile_rows if r.model}  # a new row takes its shape's model name
    table, applied, changed = table_of(tile_rows), [], {}
    for r in rows:  # one at a time, so each changed row's note comes from the result row that won it
        table, done = merge_tuned(table, [r], min_gain)
        for key in done:
            g1, g2 = table[key[:3]][key[3]]
            changed[key] = TileRow(*key, g1, g2, models.get(key[:3], str(r.get("model", ""))), winner_note(r, meta))
        applied += done
    out_rows = [changed.get(r.key, r) for r in tile_rows] + [r for k, r in changed.items() if k not in old]
    text = tiles_json(tiles_meta, out_rows)
    if not dry_run and applied:
        tmp = f"{tiles_path}.tmp"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, tiles_path)  # a reader never sees half a table
    return applied, text


def _candidates(block_m: int, gemm: int):
    warps = (4, 8) if block_m >= 64 else (4,)
    group = (1, 8) if block_m >= 128 else (1,)
    for bn, bk, stages, nw, gm in itertools.product((32, 64, 128), (64, 128), (3, 4), warps, group):
        if gemm == 1 and block_m >= 128 and bn >= 128 and stages == 4:
            continue  # two accumulators of 128x128 plus 4 stages exceed shared memory
        yield BlockConfig(block_m, bn, bk, gm, nw, stages)


def tune_one(name: str, num_tokens: int, w13, w2, spec, rep_ms: int = 20) -> dict:
    import triton
    import triton.testing

    import moekern
    from moekern.experts.triton_gemm import _launch

    E, k, H, inter = spec.num_experts, spec.top_k, spec.hidden_size, spec.intermediate_size
    torch.manual_seed(0)
    x = torch.randn(num_tokens, H, dtype=torch.bfloat16, device="cuda")
    logits = torch.randn(num_tokens, E, device="cuda")
    w, ids, counts = moekern.fused_topk(logits, k, **spec.routing_kwargs())
    wf = w.reshape(-1).contiguous()
    per_expert = num_tokens * k / E
    block_ms = [bm for bm in (16, 32, 64, 128) if bm <= max(16, 2 * triton.next_power_of_2(int(per_expert) + 1))]
    inter_buf = torch.empty(num_tokens * k, inter, dtype=torch.bfloat16, device="cuda")
    out_buf = torch.empty(num_tokens * k, H, dtype=torch.bfloat16, device="cuda")
    best = None
    for bm in block_ms:
        al = moekern.align(ids, E, bm, expert_counts=counts, check_ids=False)
        picks = []
        for gemm in (1, 2):
            times = []
            for cfg in _candidates(bm, gemm):
                if gemm == 1:
                    fn = lambda cfg=cfg: _launch(x, w13, inter_buf, wf, *al, n=inter, k=H, num_slots=num_tokens * k,  # noqa: E731
                                                 a_div=k, fuse_silu=True, mul_weight=False, cfg=cfg)
                else:
                    fn = lambda cfg=cfg: _launch(inter_buf, w2, out_buf, wf, *al, n=H, k=inter, num_slots=num_tokens * k,  # noqa: E731
                                                 a_div=1, fuse_silu=False, mul_weight=True, cfg=cfg)
                try:
                    times.append((triton.testing.do_bench(fn, warmup=5, rep=rep_ms), cfg))
                except Exception as exc:  # out of resources for this tile: skip it  # noqa: BLE001
                    if "OutOfResources" not in type(exc).__name__ and "resources" not in str(exc):
                        raise
            picks.append(min(times, key=lambda t: t[0]))
        total = picks[0][0] + picks[1][0]
        if best is None or total < best[0]:
            best = (total, picks[0][1], picks[1][1])
    _, c1, c2 = best

    def layer(cfgs):
        return lambda: moekern.fused_moe(x, w13, w2, topk_weights=w, topk_ids=ids, block_config=cfgs, check_ids=False)

    t_tuned = triton.testing.do_bench(layer((c1, c2)), warmup=10, rep=100)
    t_default = triton.testing.do_bench(layer(default_configs(num_tokens, E, k, inter, H, torch.bfloat16)),
                                        warmup=10, rep=100)
    used = int((counts > 0).sum())
    weight_bytes = used * (3 * inter * H) * 2
    return dict(model=name, M=num_tokens, E=E, I=inter, H=H, top_k=k, experts_used=used,
                gemm1=c1.__dict__, gemm2=c2.__dict__, layer_ms_tuned=t_tuned, layer_ms_default=t_default,
                weight_GBps_tuned=weight_bytes / t_tuned / 1e6,
                tflops_tuned=2 * num_tokens * k * 3 * inter * H / t_tuned / 1e9)


def main_apply(argv) -> None:
    ap = argparse.ArgumentParser(prog="python benchmarks/tune_moe.py apply",
                                 description="merge tune_moe_shapes.py winners into a tile file (JSON)")
    ap.add_argument("results", help="tune_moe_shapes.json written by benchmarks/tune_moe_shapes.py")
    ap.add_argument("--tiles", default=SM90_TILES, help=f"the tile file to update (default {SM90_TILES})")
    ap.add_argument("--min-gain", type=float, default=0.02, help="apply a winner only if this much faster")
    ap.add_argument("--dry-run", action="store_true", help="print the new file, write nothing")
    args = ap.parse_args(argv)
    try:
        applied, text = apply_results(args.results, args.tiles, args.min_gain, args.dry_run)
    except ValueError as exc:  # an unreadable file or a bad row, named in the message
        ap.error(str(exc))
    if args.dry_run:
        print(text, end="")
    print(f"{'would change' if args.dry_run else 'changed'} {len(applied)} rows of {args.tiles}: {applied}")


def main(argv=None) -> None:
    from moekern.models import get_model

    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "apply":
        return main_apply(argv[1:])
    if argv and argv[0] == "holes":
        return main_holes(argv[1:])
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="mixtral,qwen3-30b-a3b,deepseek-v3,olmoe")
    ap.add_argument("--tokens", default="1,64,1024")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    print("device:", torch.cuda.get_device_name(), "torch", torch.__version__)
    rows = []
    for name in args.models.split(","):
        spec = get_model(name)
        E, H, inter = spec.num_experts, spec.hidden_size, spec.intermediate_size
        torch.manual_seed(0)
        w13 = torch.randn(E, 2 * inter, H, dtype=torch.bfloat16, device="cuda").mul_(H**-0.5)
        w2 = torch.randn(E, H, inter, dtype=torch.bfloat16, device="cuda").mul_(inter**-0.5)
        for m in (int(t) for t in args.tokens.split(",")):
            row = tune_one(name, m, w13, w2, spec)
            rows.append(row)
            print(json.dumps(row), flush=True)
        del w13, w2
        torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
