"""Grouped GEMMs of the MoE expert MLP, blocked over moekern.align's sorted slots.

Algorithm. Slot s = token * top_k + j is token's j-th expert choice. moekern.align groups the M*k slots by
expert and pads each expert's run to a multiple of BLOCK_M with the sentinel M*k, so every BLOCK_M-long
block of sorted_token_ids belongs to exactly one expert (block_expert_ids). Each program takes one such
block and one BLOCK_N column tile:
  GEMM1  A rows = hidden_states[slot // top_k] (gathered), B = w13[e] gate rows n and up rows I + n;
         two fp32 accumulators; epilogue writes silu(gate) * up to intermediate[slot]. Fusing SiLU-and-mul
         halves the intermediate's write and read and drops a launch.
  GEMM2  A rows = intermediate[slot], B = w2[e]; epilogue multiplies by topk_weights[slot] and writes
         per_slot_out[slot]. The combine is then a sum over k of per_slot_out viewed as [M, k, H] (fp32).
Programs whose block starts past num_tokens_post_padded return at once; sentinel rows are masked on load
(A) and store (C). The grid covers the worst-case number of blocks, which depends on (M, k, E, BLOCK_M)
only, so no host sync is needed to launch. Programs are ordered in groups of GROUP_M M-blocks per N tile,
so the M-blocks of one expert read a weight tile while it is still in L2.

Bounds. Weights must be contiguous ([E, 2I, H], [E, H, I], K stride 1); A rows may have any row stride.
Row and expert offsets are int64 (DeepSeek-V3's w13 has 7.5e9 elements). Accumulation is fp32 through
tl.dot; fp32 inputs use input_precision="ieee" so tests compare to an fp32 reference without TF32 error.

Memory access: plain pointer loads, no TMA tensor descriptors. tl.make_tensor_descriptor's API and its
interpreter support differ between triton 3.6 and 3.7, and the A side is a gather (rows by slot), which a
2-D descriptor does not express; the weight side alone did not justify two code paths.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moekern.experts.configs import BlockConfig


@triton.jit
def _grouped_gemm_kernel(
    a_ptr,  # [rows, K]; row of slot s is s // A_DIV
    b_ptr,  # [E, N_total, K], K contiguous
    c_ptr,  # [num_slots, N], row per slot
    topk_weights_ptr,  # [num_slots] fp32 (read when MUL_WEIGHT)
    sorted_token_ids_ptr,
    block_expert_ids_ptr,
    num_tokens_post_padded_ptr,
    N,  # output columns (I for GEMM1, whose up rows start at row N of b)
    K,
    num_slots,  # M * top_k; also the sentinel value
    num_m_blocks,  # len(block_expert_ids): the grid's worst case
    stride_am,
    stride_be,
    stride_bn,
    stride_cm,
    A_DIV: tl.constexpr,
    FUSE_SILU: tl.constexpr,
    MUL_WEIGHT: tl.constexpr,
    IEEE_FP32: tl.constexpr,
    EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid = tl.program_id(0)
    num_n_blocks = tl.cdiv(N, BLOCK_N)
    programs_per_group = GROUP_M * num_n_blocks
    first_m = (pid // programs_per_group) * GROUP_M
    group_size = tl.minimum(num_m_blocks - first_m, GROUP_M)
    pid_m = first_m + (pid % programs_per_group) % group_size
    pid_n = (pid % programs_per_group) // group_size

    if pid_m * BLOCK_M >= tl.load(num_tokens_post_padded_ptr):
        return
    # align's contract: every block below num_tokens_post_padded has a real expert (>= 0).
    expert = tl.load(block_expert_ids_ptr + pid_m).to(tl.int64)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    slots = tl.load(sorted_token_ids_ptr + offs_m).to(tl.int64)
    row_ok = slots < num_slots
    a_rows = slots // A_DIV

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = offs_n < N
    # Wrapped columns load valid weight rows; their results are masked on store. Saves a mask per load.
    offs_bn = (offs_n % N).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)

    a_ptrs = a_ptr + a_rows[:, None] * stride_am + offs_k[None, :]
    b_ptrs = b_ptr + expert * stride_be + offs_bn[None, :] * stride_bn + offs_k[:, None]
    up_shift = N * stride_bn  # GEMM1: the up projection's rows follow the gate's

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(0, tl.cdiv(K, BLOCK_K)):
        if EVEN_K:
            a = tl.load(a_ptrs, mask=row_ok[:, None], other=0.0)
            b = tl.load(b_ptrs)
        else:
            k_ok = offs_k < K - kb * BLOCK_K
            a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=k_ok[:, None], other=0.0)
        if IEEE_FP32:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
        if FUSE_SILU:
            if EVEN_K:
                b_up = tl.load(b_ptrs + up_shift)
            else:
                b_up = tl.load(b_ptrs + up_shift, mask=k_ok[:, None], other=0.0)
            if IEEE_FP32:
                acc_up = tl.dot(a, b_up, acc_up, input_precision="ieee")
            else:
                acc_up = tl.dot(a, b_up, acc_up)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K

    if FUSE_SILU:
        acc = acc * tl.sigmoid(acc) * acc_up
    if MUL_WEIGHT:
        w = tl.load(topk_weights_ptr + slots, mask=row_ok, other=0.0)
        acc = acc * w[:, None]
    c_ptrs = c_ptr + slots[:, None] * stride_cm + offs_n[None, :]
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def _launch(a, b, c, topk_weights, sorted_token_ids, block_expert_ids, num_tokens_post_padded, *, n, k,
            num_slots, a_div, fuse_silu, mul_weight, cfg: BlockConfig):
    num_m_blocks = block_expert_ids.numel()
    grid = (num_m_blocks * triton.cdiv(n, cfg.block_n),)
    _grouped_gemm_kernel[grid](
        a, b, c, topk_weights, sorted_token_ids, block_expert_ids, num_tokens_post_padded,
        n, k, num_slots, num_m_blocks,
        a.stride(0), b.stride(0), b.stride(1), c.stride(0),
        A_DIV=a_div, FUSE_SILU=fuse_silu, MUL_WEIGHT=mul_weight,
        IEEE_FP32=a.dtype == torch.float32, EVEN_K=k % cfg.block_k == 0,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )


def moe_experts_triton(
    hidden_states: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    sorted_token_ids: torch.Tensor,
    block_expert_ids: torch.Tensor,
    num_tokens_post_padded: torch.Tensor,
    top_k: int,
    cfg1: BlockConfig,
    cfg2: BlockConfig,
) -> torch.Tensor:
    """Expert MLP + weighted combine over an alignment made with block size cfg1.block_m (== cfg2.block_m).

    hidden_states: [M, H] (K stride 1); w13: [E, 2I, H]; w2: [E, H, I], contiguous, same dtype;
    topk_weights: [M*k] fp32 contiguous. Returns [M, H] in hidden_states' dtype. Arguments are checked by
    moekern.fused_moe; this function assumes them valid.
    """
    M, H = hidden_states.shape
    inter = w2.shape[2]
    num_slots = M * top_k
    dev, dtype = hidden_states.device, hidden_states.dtype
    intermediate = torch.empty(num_slots, inter, dtype=dtype, device=dev)
    _launch(hidden_states, w13, intermediate, topk_weights, sorted_token_ids, block_expert_ids,
            num_tokens_post_padded, n=inter, k=H, num_slots=num_slots, a_div=top_k, fuse_silu=True,
            mul_weight=False, cfg=cfg1)
    per_slot = torch.empty(num_slots, H, dtype=dtype, device=dev)
    _launch(intermediate, w2, per_slot, topk_weights, sorted_token_ids, block_expert_ids,
            num_tokens_post_padded, n=H, k=inter, num_slots=num_slots, a_div=1, fuse_silu=False,
            mul_weight=True, cfg=cfg2)
    if top_k == 1:
        return per_slot
    return per_slot.view(M, top_k, H).sum(dim=1, dtype=torch.float32).to(dtype)
