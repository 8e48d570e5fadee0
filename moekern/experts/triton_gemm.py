"""Grouped GEMMs of the MoE expert MLP, blocked over moekern.align's sorted slots.

Algorithm. Slot s = token * top_k + j is token's j-th expert choice. moekern.align groups the M*k slots by
expert and pads each expert's run to a multiple of BLOCK_M with the sentinel M*k, so every BLOCK_M-long
block of sorted_token_ids belongs to exactly one expert (block_expert_ids). Each program takes one such
block and one BLOCK_N column tile:
  GEMM1  A rows = hidden_states[slot // top_k] (gathered), B = w13[e] gate rows n and up rows I + n;
         two fp32 accumulators; epilogue writes silu(gate) * up to intermediate[slot]. Fusing SiLU-and-mul
         halves the intermediate's write and read and drops a launch.
  GEMM2  A rows = intermediate[slot], B = w2[e]; epilogue multiplies by topk_weights[slot] and writes
         per_slot_out[slot]. The combine (_combine_kernel) then sums the k rows of each token in fp32 and
         rounds once.
Programs whose block starts past num_tokens_post_padded return at once; sentinel rows are masked on load
(A) and store (C). The grid covers the worst-case number of blocks, which depends on (M, k, E, BLOCK_M)
only, so no host sync is needed to launch. Programs are ordered in groups of GROUP_M M-blocks per N tile,
so the M-blocks of one expert read a weight tile while it is still in L2.

Variants, chosen by BlockConfig fields so that one benchmark run can A/B them (configs.py):
  fuse_silu (gemm1; default True)  False: GEMM1 is a plain grouped GEMM over all 2I columns (one
         accumulator, so a wider N tile fits) into a [slots, 2I] buffer, then _silu_and_mul_kernel
         writes the [slots, I] intermediate - vLLM's structure. Costs one [slots, 2I] write + read and a
         launch; pays when the two-accumulator tile is what limits the MMA rate (large M, small I).
  persistent (programs per SM; default 0 = off)  a fixed grid of SMs x persistent programs walks the
         used tiles (num_tokens_post_padded / BLOCK_M blocks, read on the device), GROUP_M-swizzled the
         same way: no programs for padded blocks, no partial last wave.
  split_k (gemm1; default 1)  > 1: split_k programs per GEMM1 tile, each over its share of K (H), write fp32
         gate/up partials [split_k, slots, 2I] (no epilogue); GEMM2 (A_SPLIT) sums the partials, applies
         SiLU-and-mul and rounds to the weights' dtype as it loads its A tiles. More programs stream the same
         weights at decode sizes, where 8 slots give GEMM1 96 programs for 132 SMs; no counters, no extra launch.
         Needs fuse_silu=False, persistent=0, tma=False; gemm2's split_k stays 1, and its num_stages is cut to what
         fits the partial tiles in shared memory (split_a_stages). Measured on an H100 it lost at every decode
         shape tried (Qwen3-30B-A3B M=1: 77 us with 2 shares vs 36.5 fused), before align's layout was cut to
         the used experts, which removes the likely cause (experts/NOTES.md).
  tma (default False)  weight tiles through a host-made TensorDescriptor (Hopper TMA) over w viewed as
         [E * N_total, K]; the A side stays a pointer gather (rows by slot). Needs K * itemsize % 16 == 0.

Programmatic dependent launch (sm_90+, CUDA; pdl_stages, use_pdl): every kernel here launches with
launch_pdl and its PDL constexpr set, starts with gdc_wait() (the GEMMs and the SiLU-and-mul first let their own
successor launch), so its blocks are resident while the kernel before it finishes and touch memory only after
it has. Experts larger than 16 MiB keep PDL for GEMM1 alone (pdl_stages): the overlap of GEMM1 with GEMM2 costs
there at M = 1.

Bounds. Weights must be contiguous ([E, 2I, H], [E, H, I], K stride 1); A rows may have any row stride.
Row and expert offsets are int64 (DeepSeek-V3's w13 has 7.5e9 elements). Accumulation is fp32 through
tl.dot; fp32 inputs use input_precision="ieee" so tests compare to an fp32 reference without TF32 error.

Memory access: plain pointer loads by default. The tma variant uses triton.tools.tensor_descriptor
.TensorDescriptor made on the host (same API in triton 3.6 and 3.7, runs in the interpreter, needs no
device allocator unlike tl.make_tensor_descriptor), for the weight side only.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from moekern._ext import interpreting
from moekern.experts.configs import BlockConfig

try:  # griddepcontrol (programmatic dependent launch) from Triton 3.3 on
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # pragma: no cover - older Triton: PDL stays off
    gdc_launch_dependents = gdc_wait = None


@triton.jit
def _gemm_tile(
    a_ptr, b_ptr, b_desc, c_ptr, topk_weights_ptr, sorted_token_ids_ptr, block_expert_ids_ptr,
    pid_m, pid_n, N, K, num_slots, stride_am, stride_as, stride_be, stride_bn, stride_cm, rows_per_expert,
    kb_lo, kb_hi,
    A_DIV: tl.constexpr, FUSE_SILU: tl.constexpr, MUL_WEIGHT: tl.constexpr, IEEE_FP32: tl.constexpr,
    EVEN_K: tl.constexpr, USE_TMA: tl.constexpr, A_SPLIT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One [BLOCK_M, BLOCK_N] output tile of M-block pid_m (a used block: its expert is >= 0), summed over the K
    blocks [kb_lo, kb_hi). A_SPLIT > 0: a holds A_SPLIT fp32 partial [slots, 2K] gate/up products of a split-K
    GEMM1 (stride_as apart); the A tile is silu(sum of gates) * (sum of ups), rounded to the weights' dtype."""
    expert = tl.load(block_expert_ids_ptr + pid_m).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    slots = tl.load(sorted_token_ids_ptr + offs_m).to(tl.int64)
    row_ok = slots < num_slots
    a_rows = slots // A_DIV

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + a_rows[:, None] * stride_am + (kb_lo * BLOCK_K + offs_k)[None, :]
    if USE_TMA:
        # Rows of the [E * rows_per_expert, K] weight view; a tile that runs past N reads the next rows
        # (up rows, or the next expert's): valid memory, masked on store. The K tail is zero-filled.
        b_row = (expert * rows_per_expert + pid_n * BLOCK_N).to(tl.int32)
        b_ptrs = b_ptr  # unused
    else:
        # Wrapped columns load valid weight rows; their results are masked on store. Saves a mask per load.
        offs_bn = (offs_n % N).to(tl.int64)
        b_ptrs = b_ptr + expert * stride_be + offs_bn[None, :] * stride_bn + (kb_lo * BLOCK_K + offs_k)[:, None]
        b_row = 0
    up_shift = N * stride_bn  # fused GEMM1: the up projection's rows follow the gate's

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(kb_lo, kb_hi):
        if EVEN_K:
            a_ok = row_ok[:, None]
        else:
            k_ok = offs_k < K - kb * BLOCK_K
            a_ok = row_ok[:, None] & k_ok[None, :]
        if A_SPLIT > 0:
            gate = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
            up = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
            for s in tl.static_range(A_SPLIT):
                gate += tl.load(a_ptrs + s * stride_as, mask=a_ok, other=0.0)
                up += tl.load(a_ptrs + s * stride_as + K, mask=a_ok, other=0.0)
            a = (gate * tl.sigmoid(gate) * up).to(b_ptr.dtype.element_ty)
        else:
            a = tl.load(a_ptrs, mask=a_ok, other=0.0)
        if USE_TMA:
            b = tl.trans(b_desc.load([b_row, kb * BLOCK_K]))
        elif EVEN_K:
            b = tl.load(b_ptrs)
        else:
            b = tl.load(b_ptrs, mask=k_ok[:, None], other=0.0)
        if IEEE_FP32:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
        if FUSE_SILU:
            if USE_TMA:
                b_up = tl.trans(b_desc.load([b_row + N, kb * BLOCK_K]))
            elif EVEN_K:
                b_up = tl.load(b_ptrs + up_shift)
            else:
                b_up = tl.load(b_ptrs + up_shift, mask=k_ok[:, None], other=0.0)
            if IEEE_FP32:
                acc_up = tl.dot(a, b_up, acc_up, input_precision="ieee")
            else:
                acc_up = tl.dot(a, b_up, acc_up)
        a_ptrs += BLOCK_K
        if not USE_TMA:
            b_ptrs += BLOCK_K

    if FUSE_SILU:
        acc = acc * tl.sigmoid(acc) * acc_up
    if MUL_WEIGHT:
        w = tl.load(topk_weights_ptr + slots, mask=row_ok, other=0.0)
        acc = acc * w[:, None]
    c_ptrs = c_ptr + slots[:, None] * stride_cm + offs_n[None, :]
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _swizzle(tile, num_m_blocks, num_n_blocks, GROUP_M: tl.constexpr):
    """Tile index -> (pid_m, pid_n): GROUP_M consecutive M-blocks per N tile, so the M-blocks of one expert
    (adjacent in align's order) read the same weight tile back to back, while it is in L2."""
    programs_per_group = GROUP_M * num_n_blocks
    first_m = (tile // programs_per_group) * GROUP_M
    group_size = tl.minimum(num_m_blocks - first_m, GROUP_M)
    pid_m = first_m + (tile % programs_per_group) % group_size
    pid_n = (tile % programs_per_group) // group_size
    return pid_m, pid_n


# num_slots and num_m_blocks change with M on every call; specializing on them (== 1, % 16) would only
# compile more variants of the kernel (seconds each) on an eager server's first calls.
@triton.jit(do_not_specialize=["num_slots", "num_m_blocks"])
def _grouped_gemm_kernel(
    a_ptr,  # [rows, K]; row of slot s is s // A_DIV
    b_ptr,  # [E, N_total, K], K contiguous
    b_desc,  # USE_TMA: a TensorDescriptor over b viewed [E * N_total, K], block [BLOCK_N, BLOCK_K]
    c_ptr,  # [num_slots, N], row per slot
    topk_weights_ptr,  # [num_slots] fp32 (read when MUL_WEIGHT)
    sorted_token_ids_ptr,
    block_expert_ids_ptr,
    num_tokens_post_padded_ptr,
    N,  # output columns (I for the fused GEMM1, whose up rows start at row N of b)
    K,
    num_slots,  # M * top_k; also the sentinel value
    num_m_blocks,  # len(block_expert_ids): the grid's worst case
    stride_am,
    stride_as,  # A_SPLIT: between A's partial products
    stride_be,
    stride_bn,
    stride_cm,
    stride_cs,  # SPLIT_K > 1: between C's partial products
    rows_per_expert,  # N_total = b.shape[1]
    A_DIV: tl.constexpr,
    FUSE_SILU: tl.constexpr,
    MUL_WEIGHT: tl.constexpr,
    IEEE_FP32: tl.constexpr,
    EVEN_K: tl.constexpr,
    USE_TMA: tl.constexpr,
    PERSISTENT: tl.constexpr,
    SPLIT_K: tl.constexpr,  # > 1: programs per tile, each over its share of K, into C's SPLIT_K partials (fp32)
    A_SPLIT: tl.constexpr,  # > 0: A is a split-K GEMM1's partials (see _gemm_tile)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    PDL: tl.constexpr,
):
    if PDL:
        # Launched with programmatic dependent launch: this grid's blocks start while the previous kernel (route_and_align,
        # align or GEMM1) still runs, and wait here, before any memory access, until it has finished. The next kernel
        # (GEMM2, the combine) may start its own blocks as soon as all of these have started.
        gdc_launch_dependents()
        gdc_wait()
    pid = tl.program_id(0)
    num_n_blocks = tl.cdiv(N, BLOCK_N)
    k_blocks = tl.cdiv(K, BLOCK_K)
    if PERSISTENT:
        # A fixed grid walks the used tiles only (align pads num_tokens_post_padded to BLOCK_M).
        used_m_blocks = tl.load(num_tokens_post_padded_ptr) // BLOCK_M
        for tile in range(pid, used_m_blocks * num_n_blocks, tl.num_programs(0)):
            pid_m, pid_n = _swizzle(tile, used_m_blocks, num_n_blocks, GROUP_M)
            _gemm_tile(a_ptr, b_ptr, b_desc, c_ptr, topk_weights_ptr, sorted_token_ids_ptr, block_expert_ids_ptr,
                       pid_m, pid_n, N, K, num_slots, stride_am, stride_as, stride_be, stride_bn, stride_cm,
                       rows_per_expert, 0, k_blocks,
                       A_DIV, FUSE_SILU, MUL_WEIGHT, IEEE_FP32, EVEN_K, USE_TMA, A_SPLIT, BLOCK_M, BLOCK_N, BLOCK_K)
    else:
        # SPLIT_K consecutive programs share a tile, split s taking K blocks [s * per, (s + 1) * per): a split past
        # K's end sums nothing and still writes its (zero) partial, which the reader adds.
        split = pid % SPLIT_K
        per = tl.cdiv(k_blocks, SPLIT_K)
        pid_m, pid_n = _swizzle(pid // SPLIT_K, num_m_blocks, num_n_blocks, GROUP_M)
        # align's contract: every block below num_tokens_post_padded has a real expert (>= 0).
        if pid_m * BLOCK_M < tl.load(num_tokens_post_padded_ptr):
            _gemm_tile(a_ptr, b_ptr, b_desc, c_ptr + split * stride_cs, topk_weights_ptr, sorted_token_ids_ptr,
                       block_expert_ids_ptr, pid_m, pid_n, N, K, num_slots, stride_am, stride_as, stride_be,
                       stride_bn, stride_cm, rows_per_expert, split * per, tl.minimum(split * per + per, k_blocks),
                       A_DIV, FUSE_SILU, MUL_WEIGHT, IEEE_FP32, EVEN_K, USE_TMA, A_SPLIT, BLOCK_M, BLOCK_N, BLOCK_K)


@triton.jit
def _silu_and_mul_kernel(gate_up_ptr, out_ptr, N, stride_in, stride_out, BLOCK: tl.constexpr, PDL: tl.constexpr):
    """out[r, n] = silu(gate_up[r, n]) * gate_up[r, N + n], in fp32, rounded once to out's dtype."""
    if PDL:  # between the unfused GEMM1 and GEMM2 of a PDL chain (see _grouped_gemm_kernel)
        gdc_launch_dependents()
        gdc_wait()
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < N
    gate = tl.load(gate_up_ptr + row * stride_in + offs, mask=ok, other=0.0).to(tl.float32)
    up = tl.load(gate_up_ptr + row * stride_in + N + offs, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_out + offs, (gate * tl.sigmoid(gate) * up).to(out_ptr.dtype.element_ty), mask=ok)


SILU_BLOCK = 1024  # columns per program of the unfused SiLU-and-mul


@triton.jit
def _combine_kernel(per_slot_ptr, out_ptr, H, stride_in, stride_out, TOP_K: tl.constexpr, BLOCK: tl.constexpr,
                    PDL: tl.constexpr):
    """out[t, h] = sum over j < TOP_K of per_slot[t * TOP_K + j, h], in fp32, rounded once to out's dtype."""
    if PDL:
        gdc_wait()  # GEMM2 writes per_slot
    t = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < H
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        acc += tl.load(per_slot_ptr + (t * TOP_K + j) * stride_in + offs, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + t * stride_out + offs, acc.to(out_ptr.dtype.element_ty), mask=ok)


COMBINE_BLOCK = 512  # columns per program of the combine (Qwen3 M=1: 4 programs of 8 loads each)


@functools.lru_cache(maxsize=None)
def _pdl_capable(device_index: int | None) -> bool:
    if gdc_wait is None or torch.version.hip is not None or interpreting():
        return False
    return torch.cuda.get_device_capability(device_index)[0] >= 9


def _pdl_device(device: torch.device) -> bool:
    return device.type == "cuda" and _pdl_capable(device.index)


# Programmatic dependent launch pays where the layer is a chain of short kernels; with large experts only its first
# overlap does. Measured on an H100 (benchmarks/results/fastpath/h100-2026-12-07-pdl/decode_layer.json and
# ../h100-2026-12-07-pdl-stages/decode_layer.json, CUDA graphs, 3 alternating rounds within 1 %): the whole chain
# with PDL made Qwen3-30B-A3B (6.3 MB of w13 per expert) and OLMoE (8.4 MB) 0.2-5.3 % faster at every M from 1 to
# 64 (Qwen3 M=1 37.5 vs 39.7 us), but Mixtral (235 MB) and DeepSeek-V3 (59 MB) up to 9 % slower at M = 1 (Mixtral
# 260.8 vs 239.2 us). With PDL into GEMM1 alone those two are never slower than without PDL (Mixtral M=1 239.2,
# DeepSeek-V3 M=1 241.2 vs 242.4 us): the cost is GEMM2 starting its blocks while GEMM1's long blocks still hold
# the SMs. Expert sizes between the two groups were not measured; the threshold sits between them.
PDL_MAX_EXPERT_BYTES = 16 << 20


def use_pdl(device: torch.device, w13: torch.Tensor | None = None) -> bool:
    """Whether the kernels after GEMM1 (SiLU-and-mul, GEMM2, the combine) launch with programmatic dependent launch
    on `device` for experts `w13` ([E, 2I, H]): CUDA, sm_90 or later, and experts of at most PDL_MAX_EXPERT_BYTES
    each (w13 None: the device alone). MOEKERN_PDL=1 turns it on for every expert size, MOEKERN_PDL=0 or gemm1
    off; read at every call, so a benchmark can time the settings in one process. GEMM1's own launch: pdl_stages."""
    if not _pdl_device(device):
        return False
    switch = os.environ.get("MOEKERN_PDL", "")
    if switch in ("0", "1", "gemm1"):
        return switch == "1"
    return w13 is None or w13[0].numel() * w13.element_size() <= PDL_MAX_EXPERT_BYTES


def pdl_stages(device: torch.device, w13: torch.Tensor | None = None) -> tuple[bool, bool]:
    """(GEMM1, the rest): whether GEMM1 launches with PDL (on for every expert size where the device has PDL, unless
    MOEKERN_PDL=0; its blocks start during the tail of the kernel before it where that kernel triggers early:
    route_and_align or the CUDA align's last kernel), and whether the kernels after it do (use_pdl;
    MOEKERN_PDL=gemm1 keeps GEMM1's alone for every expert size)."""
    first = _pdl_device(device) and os.environ.get("MOEKERN_PDL") != "0"
    return first, use_pdl(device, w13)



@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 2  # interpreter: a small fixed grid still exercises the persistent loop


@functools.lru_cache(maxsize=None)
def _max_shared_mem(device: torch.device) -> int | None:
    """Bytes of shared memory one program may use on `device` (Triton's own limit); None off a GPU."""
    if device.type != "cuda" or interpreting():
        return None
    return triton.runtime.driver.active.utils.get_device_properties(device.index or 0)["max_shared_mem"]


def split_a_stages(cfg: BlockConfig, a_split: int, b_itemsize: int, smem_limit: int | None) -> int:
    """GEMM2's pipeline depth when it reduces a split-K GEMM1's partials. Triton keeps num_stages - 1 copies of each
    loaded tile in shared memory (its pipelining of plain loads, as at the decode tiles' block_m 16), and GEMM2's A
    side is then 2 * a_split fp32 tiles per K block, so a deep pipeline overflows it (split 8, 16 x 128 tiles, 3
    stages: 288 KiB against an H100's 227 KiB). The depth is cut to what fits beside a margin of one B tile and one
    A tile in the weights' dtype (the dot operands, the epilogue's layout conversion), at least 1 (no pipelining);
    smem_limit None leaves cfg.num_stages."""
    if smem_limit is None:
        return cfg.num_stages
    per_stage = cfg.block_n * cfg.block_k * b_itemsize + 2 * a_split * cfg.block_m * cfg.block_k * 4
    usable = smem_limit - (cfg.block_n + cfg.block_m) * cfg.block_k * b_itemsize
    return max(1, min(cfg.num_stages, 1 + max(usable, 0) // per_stage))


def _launch(a, b, c, topk_weights, sorted_token_ids, block_expert_ids, num_tokens_post_padded, *, n, k,
            num_slots, a_div, fuse_silu, mul_weight, cfg: BlockConfig, pdl: bool = False, a_split: int = 0):
    """One grouped GEMM: c[slot, :n] = epilogue(a[slot // a_div] @ b[expert]^T). fuse_silu: b holds 2n rows.
    cfg.split_k > 1: c is [split_k, slots, n] fp32, one partial product per K share. a_split > 0: a is such a
    GEMM1's [a_split, slots, 2k] partials, reduced with SiLU-and-mul as the A tiles load."""
    num_m_blocks = block_expert_ids.numel()
    tiles = num_m_blocks * triton.cdiv(n, cfg.block_n)
    if cfg.persistent:
        grid = (max(1, min(tiles, _num_sms(a.device) * cfg.persistent)),)
    else:
        grid = (tiles * cfg.split_k,)
    stride_as, stride_am = (a.stride(0), a.stride(1)) if a_split else (0, a.stride(0))
    stride_cs, stride_cm = (c.stride(0), c.stride(1)) if cfg.split_k > 1 else (0, c.stride(0))
    stages = split_a_stages(cfg, a_split, b.element_size(), _max_shared_mem(a.device)) if a_split else cfg.num_stages
    b_desc = b
    if cfg.tma:
        from triton.tools.tensor_descriptor import TensorDescriptor

        if (k * b.element_size()) % 16 or b.data_ptr() % 16:
            raise ValueError(f"block_config.tma needs K * itemsize % 16 == 0 and a 16-byte aligned weight; got K={k}, "
                             f"itemsize={b.element_size()}")
        b_desc = TensorDescriptor.from_tensor(b.view(-1, k), [cfg.block_n, cfg.block_k])
    _grouped_gemm_kernel[grid](
        a, b, b_desc, c, topk_weights, sorted_token_ids, block_expert_ids, num_tokens_post_padded,
        n, k, num_slots, num_m_blocks,
        stride_am, stride_as, b.stride(0), b.stride(1), stride_cm, stride_cs, b.shape[1],
        A_DIV=a_div, FUSE_SILU=fuse_silu, MUL_WEIGHT=mul_weight,
        IEEE_FP32=b.dtype == torch.float32, EVEN_K=k % cfg.block_k == 0, USE_TMA=cfg.tma,
        PERSISTENT=cfg.persistent > 0, SPLIT_K=cfg.split_k, A_SPLIT=a_split,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m, PDL=pdl,
        num_warps=cfg.num_warps, num_stages=stages, **_pdl_option(pdl),
    )


def silu_and_mul(gate_up: torch.Tensor, out: torch.Tensor, pdl: bool = False) -> torch.Tensor:
    """out [rows, I] = silu(gate_up[:, :I]) * gate_up[:, I:], fp32 math; gate_up: [rows, 2I], K stride 1."""
    rows, inter = out.shape
    if rows:
        block = min(SILU_BLOCK, triton.next_power_of_2(inter))
        _silu_and_mul_kernel[(rows, triton.cdiv(inter, block))](gate_up, out, inter, gate_up.stride(0),
                                                               out.stride(0), BLOCK=block, PDL=pdl, **_pdl_option(pdl))
    return out


def _pdl_option(pdl: bool) -> dict:
    """The launch option, passed only when on: Triton's AMD backend has no launch_pdl and rejects the keyword."""
    return {"launch_pdl": True} if pdl else {}


def gemm1(hidden_states, w13, inter: int, topk_weights, sorted_token_ids, block_expert_ids, num_tokens_post_padded,
          top_k: int, cfg: BlockConfig, pdl: bool = False, pdl_silu: bool | None = None) -> torch.Tensor:
    """GEMM2's A: silu(x W_gate^T) * (x W_up^T) per slot as [slots, I] in x's dtype, fused or split by
    cfg.fuse_silu; with cfg.split_k > 1 the unreduced fp32 gate/up partials [split_k, slots, 2I] instead.
    pdl: the GEMM's launch; pdl_silu: the unfused SiLU-and-mul's (None: as pdl)."""
    num_slots, hidden = hidden_states.shape[0] * top_k, hidden_states.shape[1]
    dev, dtype = hidden_states.device, hidden_states.dtype
    if cfg.fuse_silu:
        intermediate = torch.empty(num_slots, inter, dtype=dtype, device=dev)
        _launch(hidden_states, w13, intermediate, topk_weights, sorted_token_ids, block_expert_ids,
                num_tokens_post_padded, n=inter, k=hidden, num_slots=num_slots, a_div=top_k, fuse_silu=True,
                mul_weight=False, cfg=cfg, pdl=pdl)
        return intermediate
    split = cfg.split_k > 1
    gate_up = (torch.empty(cfg.split_k, num_slots, 2 * inter, dtype=torch.float32, device=dev) if split
               else torch.empty(num_slots, 2 * inter, dtype=dtype, device=dev))
    _launch(hidden_states, w13, gate_up, topk_weights, sorted_token_ids, block_expert_ids,
            num_tokens_post_padded, n=2 * inter, k=hidden, num_slots=num_slots, a_div=top_k, fuse_silu=False,
            mul_weight=False, cfg=cfg, pdl=pdl)
    if split:  # GEMM2 reduces the partials with SiLU-and-mul as it loads its A tiles
        return gate_up
    return silu_and_mul(gate_up, torch.empty(num_slots, inter, dtype=dtype, device=dev),
                        pdl=pdl if pdl_silu is None else pdl_silu)


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
    topk_weights: [M*k] (or [M, k]) fp32 contiguous. Returns [M, H] in hidden_states' dtype. Arguments are checked by
    moekern.fused_moe; this function assumes them valid.
    """
    M, H = hidden_states.shape
    inter = w2.shape[2]
    num_slots = M * top_k
    dev, dtype = hidden_states.device, hidden_states.dtype
    pdl_first, pdl = pdl_stages(dev, w13)
    intermediate = gemm1(hidden_states, w13, inter, topk_weights, sorted_token_ids, block_expert_ids,
                         num_tokens_post_padded, top_k, cfg1, pdl=pdl_first, pdl_silu=pdl)
    per_slot = torch.empty(num_slots, H, dtype=dtype, device=dev)
    _launch(intermediate, w2, per_slot, topk_weights, sorted_token_ids, block_expert_ids,
            num_tokens_post_padded, n=H, k=inter, num_slots=num_slots, a_div=1, fuse_silu=False,
            mul_weight=True, cfg=cfg2, pdl=pdl, a_split=cfg1.split_k if cfg1.split_k > 1 else 0)
    if top_k == 1:
        return per_slot
    out = torch.empty(M, H, dtype=dtype, device=dev)
    if M:
        block = min(COMBINE_BLOCK, triton.next_power_of_2(H))
        _combine_kernel[(M, triton.cdiv(H, block))](per_slot, out, H, per_slot.stride(0), out.stride(0), TOP_K=top_k,
                                                    BLOCK=block, PDL=pdl, **_pdl_option(pdl))
    return out
