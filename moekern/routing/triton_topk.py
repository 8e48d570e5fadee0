"""Fused top-k routing in one Triton kernel: scores, (grouped) selection, renormalization, scaling and
the per-expert histogram in a single launch.

Algorithm. Each program owns BLOCK_M tokens and holds their whole score rows in registers as a
[BLOCK_M, BLOCK_G, BLOCK_P] tile: expert e = group * P + p, with P = E / G experts per group (G = 1, P = E
when ungrouped, so the tile is [BLOCK_M, 1, next_pow2(E)]). Logits are loaded in their own dtype and
upcast to fp32. Scores: softmax (max-subtracted exp / row sum) or sigmoid 1 / (1 + exp(-x)) plus the
optional correction bias. Selection runs on an order-preserving int32 key of the fp32 selection score
(the logit for softmax, sigmoid + bias for sigmoid): non-negative floats keep their bits, negative floats
get their low 31 bits flipped, -0.0 is first folded into +0.0, NaN takes -inf's key. Experts outside the
kept groups get INT32_MIN + 1 and padding columns INT32_MIN, so they rank strictly below -inf and NaN.
Top-k is k rounds of: the row's max key, then the min expert index holding it (ties -> lower index),
then that expert's key is knocked out to INT32_MIN. Grouped selection (DeepSeek-V3) first scores each
group by the sum of its two largest selection scores (NaN read as -inf, the largest alone when P == 1;
+inf + -inf = NaN also reads as -inf) and keeps the topk_group best groups by the same max-key /
min-index rounds. The k chosen weights are gathered in the same rounds, renormalized when their sum is
> 0, scaled, and stored; each program adds its tile's histogram of chosen ids to the zeroed counts
buffer with one vector atomic_add (relaxed), so counts need no second pass.

Bounds. E <= 512 and k <= 16 (moekern.routing.api checks both): the tile is BLOCK_M x BLOCK_G x BLOCK_P
fp32 values in registers, with BLOCK_G * BLOCK_P <= 4 * E, and the k rounds are unrolled. The work per
row is O(k * E) compares, which is small next to the O(E) bytes it reads; the kernel is latency-bound at
decode sizes and bandwidth-bound at prefill sizes. Selection on softmax is on the logits themselves, so
ids are bit-exact against the torch reference; sigmoid scores and softmax group scores come from exp
and can differ from torch's in the last bits, so only near-ties (a few ulps apart) may be ordered
differently there. Exact ties (equal inputs) are always broken to the lower index.

Registered as the torch custom op moekern::fused_topk_triton with a fake implementation, so
moekern.fused_topk traces under torch.compile(fullgraph=True) and captures in CUDA graphs: no host
syncs, no .item(); the counts buffer is zeroed by a captured memset.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
import triton
import triton.language as tl

from moekern.routing.reference import empty_routing_outputs

_INT32_MIN = tl.constexpr(-2147483648)
_NEG_INF_KEY = tl.constexpr(-2139095041)  # order key of -inf: 0xFF800000 ^ 0x7FFFFFFF as int32


@triton.jit
def _order_key(v):
    """int32 key with key(a) < key(b) iff a < b for fp32 a, b; -0.0 == +0.0; NaN -> key(-inf)."""
    v = tl.where(v == 0.0, 0.0, v)  # -0.0 and +0.0 are equal scores: give them one key
    bits = v.to(tl.int32, bitcast=True)
    key = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    return tl.where(v != v, _NEG_INF_KEY, key)


@triton.jit
def _fused_topk_kernel(
    logits_ptr,  # [M, E] fp32|fp16|bf16, contiguous
    bias_ptr,  # [E] fp32 (unused unless HAS_BIAS)
    weights_ptr,  # [M, TOP_K] fp32 out
    ids_ptr,  # [M, TOP_K] int32 out
    counts_ptr,  # [E] int32, zeroed, accumulated with atomics
    M,
    scale,
    E: tl.constexpr,
    G: tl.constexpr,  # groups (1 when ungrouped)
    P: tl.constexpr,  # experts per group, E // G
    TOP_K: tl.constexpr,
    TOPK_GROUP: tl.constexpr,
    SOFTMAX: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    RENORMALIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    offs_g = tl.arange(0, BLOCK_G)
    offs_p = tl.arange(0, BLOCK_P)
    expert = offs_g[:, None] * P + offs_p[None, :]  # [BG, BP]; padding may alias a real index: mask it
    col_ok = (offs_g[:, None] < G) & (offs_p[None, :] < P)
    expert3 = expert[None, :, :]
    col_ok3 = col_ok[None, :, :]
    row_ok3 = row_ok[:, None, None]

    ptrs = logits_ptr + rows.to(tl.int64)[:, None, None] * E + expert3
    x = tl.load(ptrs, mask=row_ok3 & col_ok3, other=0.0).to(tl.float32)

    if SOFTMAX:
        xm = tl.where(col_ok3, x, float("-inf"))
        row_max = tl.max(tl.max(xm, axis=2), axis=1)
        num = tl.where(col_ok3, tl.exp(xm - row_max[:, None, None]), 0.0)
        den = tl.sum(tl.sum(num, axis=2), axis=1)
        weight_src = num / den[:, None, None]  # a NaN or +inf logit makes the whole row NaN, as in torch
        sel = x  # softmax is increasing: selecting on logits is exact
        group_src = weight_src
    else:
        weight_src = 1.0 / (1.0 + tl.exp(-x))
        sel = weight_src
        if HAS_BIAS:
            bias = tl.load(bias_ptr + expert, mask=col_ok, other=0.0)
            sel = weight_src + bias[None, :, :]
        group_src = sel

    key = _order_key(sel)

    if G > 1:
        gs = tl.where(col_ok3 & (group_src == group_src), group_src, float("-inf"))
        top1 = tl.max(gs, axis=2)  # [BM, BG]
        if P > 1:
            offs_p3 = offs_p[None, None, :]
            first = tl.min(tl.where(gs == top1[:, :, None], offs_p3, BLOCK_P), axis=2)
            top2 = tl.max(tl.where(offs_p3 == first[:, :, None], float("-inf"), gs), axis=2)
            group_score = top1 + top2  # +inf + -inf is NaN: _order_key ranks it as -inf
        else:
            group_score = top1
        gkey = tl.where(offs_g[None, :] < G, _order_key(group_score), _INT32_MIN)
        kept = tl.zeros([BLOCK_M, BLOCK_G], dtype=tl.int1)
        for _ in tl.static_range(TOPK_GROUP):
            best = tl.max(gkey, axis=1)
            pick = tl.min(tl.where(gkey == best[:, None], offs_g[None, :], BLOCK_G), axis=1)
            hit_g = offs_g[None, :] == pick[:, None]
            kept = kept | hit_g
            gkey = tl.where(hit_g, _INT32_MIN, gkey)
        key = tl.where(kept[:, :, None], key, _INT32_MIN + 1)
    key = tl.where(col_ok3, key, _INT32_MIN)

    offs_k = tl.arange(0, BLOCK_K)
    out_w = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
    out_i = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.int32)
    hist = tl.zeros([BLOCK_G, BLOCK_P], dtype=tl.int32)
    for i in tl.static_range(TOP_K):
        best = tl.max(tl.max(key, axis=2), axis=1)
        cand = tl.where((key == best[:, None, None]) & col_ok3, expert3, E)
        idx = tl.min(tl.min(cand, axis=2), axis=1)  # the lowest index among the row's best keys
        hit = (expert3 == idx[:, None, None]) & col_ok3
        w = tl.sum(tl.sum(tl.where(hit, weight_src, 0.0), axis=2), axis=1)
        key = tl.where(hit, _INT32_MIN, key)
        out_w = tl.where(offs_k[None, :] == i, w[:, None], out_w)
        out_i = tl.where(offs_k[None, :] == i, idx[:, None], out_i)
        hist += tl.sum((hit & row_ok3).to(tl.int32), axis=0)

    if RENORMALIZE:
        row_sum = tl.sum(out_w, axis=1)  # unused slots hold 0.0
        out_w = tl.where(row_sum[:, None] > 0, out_w / row_sum[:, None], out_w)
    out_w = out_w * scale

    out_off = rows[:, None] * TOP_K + offs_k[None, :]
    out_mask = row_ok[:, None] & (offs_k[None, :] < TOP_K)
    tl.store(weights_ptr + out_off, out_w, mask=out_mask)
    tl.store(ids_ptr + out_off, out_i, mask=out_mask)
    tl.atomic_add(counts_ptr + expert, hist, mask=col_ok & (hist > 0), sem="relaxed")


def _launch_config(M: int, tile_width: int) -> tuple[int, int]:
    """(BLOCK_M, num_warps) keyed on the padded row width: about 2048 scores per program at most,
    fewer rows when M is small so that the rows spread over more programs (SMs) instead of padding."""
    cap = max(1, min(64, 2048 // tile_width))
    spread = triton.next_power_of_2(max(1, triton.cdiv(M, 128)))
    block_m = min(cap, spread)
    tile = block_m * tile_width
    num_warps = 1 if tile <= 256 else 2 if tile <= 1024 else 4
    return block_m, num_warps


@torch.library.custom_op("moekern::fused_topk_triton", mutates_args=())
def _fused_topk_triton_op(
    logits: torch.Tensor,
    top_k: int,
    scoring: str,
    renormalize: bool,
    bias: Optional[torch.Tensor],
    num_groups: int,
    topk_group: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    logits = logits.contiguous()
    M, E = logits.shape
    dev = logits.device
    weights = torch.empty(M, top_k, dtype=torch.float32, device=dev)
    ids = torch.empty(M, top_k, dtype=torch.int32, device=dev)
    counts = torch.zeros(E, dtype=torch.int32, device=dev)
    if M == 0:
        return weights, ids, counts
    G = num_groups if num_groups > 1 else 1
    P = E // G
    block_g = triton.next_power_of_2(G)
    block_p = triton.next_power_of_2(P)
    block_m, num_warps = _launch_config(M, block_g * block_p)
    bias_arg = bias.contiguous() if bias is not None else logits  # never read without HAS_BIAS
    grid = (triton.cdiv(M, block_m),)
    with torch.cuda.device(dev) if dev.type == "cuda" else contextlib.nullcontext():
        _fused_topk_kernel[grid](
            logits, bias_arg, weights, ids, counts, M, float(scale),
            E=E, G=G, P=P, TOP_K=top_k, TOPK_GROUP=topk_group if G > 1 else 0,
            SOFTMAX=scoring == "softmax", HAS_BIAS=bias is not None, RENORMALIZE=bool(renormalize),
            BLOCK_M=block_m, BLOCK_G=block_g, BLOCK_P=block_p, BLOCK_K=triton.next_power_of_2(top_k),
            num_warps=num_warps,
        )
    return weights, ids, counts


@_fused_topk_triton_op.register_fake
def _(logits, top_k, scoring, renormalize, bias, num_groups, topk_group, scale):
    return empty_routing_outputs(logits, top_k)


def fused_topk_triton(
    logits: torch.Tensor,
    top_k: int,
    scoring: str,
    renormalize: bool,
    bias: torch.Tensor | None,
    num_groups: int,
    topk_group: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton backend of moekern.fused_topk; arguments are already validated by it.

    logits: [M, E] fp32|fp16|bf16 (CUDA, or CPU under TRITON_INTERPRET=1), E <= 512; top_k <= 16;
    scoring: "softmax"|"sigmoid"; bias: [E] fp32 or None (sigmoid only); num_groups: G (0 or 1 =
    ungrouped), topk_group: g; scale: routed_scaling_factor.
    Returns (topk_weights [M, k] fp32, topk_ids [M, k] int32, expert_counts [E] int32).
    """
    return torch.ops.moekern.fused_topk_triton(
        logits, int(top_k), str(scoring), bool(renormalize), bias, int(num_groups), int(topk_group), float(scale)
    )
