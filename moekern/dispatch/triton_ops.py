"""Triton kernels for dispatch and combine: align (counting sort into padded blocks), permute, unpermute.

Align is a stable counting sort of the N = M*k flattened slots by expert, each expert's run padded to a
multiple of B (B = 1 gives permute's unpadded layout, so permute reuses the same kernels):

  1. chunk pass: the slots are cut into chunks of CHUNK; for each slot, its rank among the earlier slots
     of the same expert in its chunk comes from a [CHUNK, CHUNK] equality matrix (no atomics, so the
     result is deterministic and order-preserving). The last slot of each expert in a chunk writes the
     chunk's count for that expert into counts[chunk, e].
  2. scan pass: per expert, an exclusive prefix sum of counts over chunks (tiles of SCAN_P chunks,
     tl.cumsum along the chunk axis, carried between tiles); the column total is the expert's count.
  3. blocks pass: padded counts ceil(c/B)*B, their exclusive prefix sum over experts (E <= 512 fits one
     vector), num_tokens_post_padded, and for every block the expert whose padded run covers it
     (#experts whose run ends at or before the block), -1 past the used blocks.
  4. scatter pass: slot i of expert e, chunk p, in-chunk rank r goes to offset[e] + prefix[p, e] + r.

For small N (<= SMALL_N) one program does all of it, walking the chunks in order with a per-expert
cursor kept in global scratch (tl.debug_barrier orders the cursor's reads and writes within the
program); one launch beats four when the launch cost dominates (decode).

Nothing here reads a device value on the host: sizes come from shapes only, so the launches can be
captured in a CUDA graph. Index arithmetic is int32 for slots (N < 2**31) and int64 for row * H offsets.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

CHUNK = 256  # slots per chunk; the in-chunk rank costs CHUNK**2 compares
SMALL_N = 1024  # at or below this many slots one program does the whole align
SCAN_P = 64  # chunks per tile in the scan pass
BLOCKS_TILE = 64  # blocks per program in the blocks pass
RANK_COLS = 32  # columns of the in-chunk equality matrix compared at a time


@triton.jit
def _chunk_ranks(ids_ptr, start, n, CHUNK: tl.constexpr, RANK_COLS: tl.constexpr):
    """Load one chunk of ids; return (ids, slot index, valid mask, rank among same-id earlier slots, is last).

    The [CHUNK, CHUNK] equality matrix is walked RANK_COLS columns at a time (columns re-read from global
    memory, where they are cached) so that no program holds all CHUNK**2 compares in registers."""
    offs = start + tl.arange(0, CHUNK)
    valid = offs < n
    ids = tl.load(ids_ptr + offs, mask=valid, other=-1)
    rank = tl.zeros([CHUNK], dtype=tl.int32)
    total = tl.zeros([CHUNK], dtype=tl.int32)
    for c0 in tl.static_range(0, CHUNK, RANK_COLS):
        cols = start + c0 + tl.arange(0, RANK_COLS)
        col_ids = tl.load(ids_ptr + cols, mask=cols < n, other=-2)  # -2 never equals a row's id
        same = ids[:, None] == col_ids[None, :]
        earlier = cols[None, :] < offs[:, None]
        rank += tl.sum((same & earlier).to(tl.int32), axis=1)
        total += tl.sum(same.to(tl.int32), axis=1)
    is_last = valid & (rank == total - 1)
    return ids, offs, valid, rank, is_last


@triton.jit
def _padded_offsets(counts, BLOCK_SIZE: tl.constexpr):
    """counts [E_PAD] -> (padded counts, inclusive prefix sum of the padded counts)."""
    padded = ((counts + BLOCK_SIZE - 1) // BLOCK_SIZE) * BLOCK_SIZE
    return padded, tl.cumsum(padded, axis=0)


@triton.jit
def _write_blocks(block_expert_ids_ptr, ends, e_mask, num_blocks, b_start, BLOCK_SIZE: tl.constexpr,
                  BLOCKS_TILE: tl.constexpr):
    """Owner expert of blocks b_start..b_start+BLOCKS_TILE: the number of experts whose padded run ends at or
    before the block's first slot (empty experts end where they start, so they are skipped); -1 past the end."""
    blocks = b_start + tl.arange(0, BLOCKS_TILE)
    end_blocks = ends // BLOCK_SIZE
    owner = tl.sum(((end_blocks[None, :] <= blocks[:, None]) & e_mask[None, :]).to(tl.int32), axis=1)
    total_blocks = tl.max(tl.where(e_mask, end_blocks, 0), axis=0)  # ends are non-decreasing
    owner = tl.where(blocks < total_blocks, owner, -1)
    tl.store(block_expert_ids_ptr + blocks, owner, mask=blocks < num_blocks)


@triton.jit
def _align_small_kernel(
    ids_ptr, counts_in_ptr, cursor_ptr, sorted_ptr, inverse_ptr, block_expert_ids_ptr, offsets_ptr, post_ptr,
    n, num_experts, num_blocks,
    BLOCK_SIZE: tl.constexpr, E_PAD: tl.constexpr, CHUNK: tl.constexpr, RANK_COLS: tl.constexpr,
    BLOCKS_TILE: tl.constexpr, HAS_COUNTS: tl.constexpr, WRITE_INVERSE: tl.constexpr, WRITE_BLOCKS: tl.constexpr,
):
    e = tl.arange(0, E_PAD)
    e_mask = e < num_experts
    if HAS_COUNTS:
        counts = tl.load(counts_in_ptr + e, mask=e_mask, other=0)
    else:
        # histogram: each chunk's last slot of an expert adds the chunk's count to the cursor
        tl.store(cursor_ptr + e, tl.zeros([E_PAD], dtype=tl.int32), mask=e_mask)
        tl.debug_barrier()
        for start in range(0, n, CHUNK):
            ids, offs, valid, rank, is_last = _chunk_ranks(ids_ptr, start, n, CHUNK, RANK_COLS)
            old = tl.load(cursor_ptr + ids, mask=is_last, other=0)
            tl.debug_barrier()
            tl.store(cursor_ptr + ids, old + rank + 1, mask=is_last)
            tl.debug_barrier()
        counts = tl.load(cursor_ptr + e, mask=e_mask, other=0)
    padded, incl = _padded_offsets(counts, BLOCK_SIZE)
    excl = incl - padded
    tl.store(offsets_ptr + e, excl, mask=e_mask)
    tl.store(offsets_ptr + num_experts, tl.sum(padded, axis=0))
    tl.store(post_ptr, tl.sum(padded, axis=0))
    tl.debug_barrier()  # the histogram's last reads of the cursor come before it is reset to the offsets
    tl.store(cursor_ptr + e, excl, mask=e_mask)
    if WRITE_BLOCKS:
        for b_start in range(0, num_blocks, BLOCKS_TILE):
            _write_blocks(block_expert_ids_ptr, incl, e_mask, num_blocks, b_start, BLOCK_SIZE, BLOCKS_TILE)
    tl.debug_barrier()
    for start in range(0, n, CHUNK):
        ids, offs, valid, rank, is_last = _chunk_ranks(ids_ptr, start, n, CHUNK, RANK_COLS)
        base = tl.load(cursor_ptr + ids, mask=valid, other=0)
        dest = base + rank
        tl.store(sorted_ptr + dest, offs, mask=valid)
        if WRITE_INVERSE:
            tl.store(inverse_ptr + offs, dest, mask=valid)
        tl.debug_barrier()
        tl.store(cursor_ptr + ids, dest + 1, mask=is_last)
        tl.debug_barrier()


@triton.jit
def _align_count_kernel(ids_ptr, chunk_counts_ptr, rank_ptr, n, num_experts, CHUNK: tl.constexpr,
                        RANK_COLS: tl.constexpr):
    pid = tl.program_id(0)
    ids, offs, valid, rank, is_last = _chunk_ranks(ids_ptr, pid * CHUNK, n, CHUNK, RANK_COLS)
    tl.store(rank_ptr + offs, rank, mask=valid)
    tl.store(chunk_counts_ptr + pid * num_experts + ids, rank + 1, mask=is_last)


@triton.jit
def _align_scan_kernel(chunk_counts_ptr, totals_ptr, num_chunks, num_experts,
                       E_TILE: tl.constexpr, SCAN_P: tl.constexpr):
    e = tl.program_id(0) * E_TILE + tl.arange(0, E_TILE)
    e_mask = e < num_experts
    carry = tl.zeros([E_TILE], dtype=tl.int32)
    for p_start in range(0, num_chunks, SCAN_P):
        p = p_start + tl.arange(0, SCAN_P)
        mask = (p[:, None] < num_chunks) & e_mask[None, :]
        ptrs = chunk_counts_ptr + p[:, None] * num_experts + e[None, :]
        tile = tl.load(ptrs, mask=mask, other=0)
        excl = tl.cumsum(tile, axis=0) - tile + carry[None, :]
        tl.store(ptrs, excl, mask=mask)
        carry += tl.sum(tile, axis=0)
    tl.store(totals_ptr + e, carry, mask=e_mask)


@triton.jit
def _align_blocks_kernel(totals_ptr, block_expert_ids_ptr, offsets_ptr, post_ptr, num_experts, num_blocks,
                         BLOCK_SIZE: tl.constexpr, E_PAD: tl.constexpr, BLOCKS_TILE: tl.constexpr,
                         WRITE_BLOCKS: tl.constexpr):
    pid = tl.program_id(0)
    e = tl.arange(0, E_PAD)
    e_mask = e < num_experts
    counts = tl.load(totals_ptr + e, mask=e_mask, other=0)
    padded, incl = _padded_offsets(counts, BLOCK_SIZE)
    if pid == 0:
        tl.store(offsets_ptr + e, incl - padded, mask=e_mask)
        tl.store(offsets_ptr + num_experts, tl.sum(padded, axis=0))
        tl.store(post_ptr, tl.sum(padded, axis=0))
    if WRITE_BLOCKS:
        _write_blocks(block_expert_ids_ptr, incl, e_mask, num_blocks, pid * BLOCKS_TILE, BLOCK_SIZE, BLOCKS_TILE)


@triton.jit
def _align_scatter_kernel(ids_ptr, chunk_counts_ptr, rank_ptr, offsets_ptr, sorted_ptr, inverse_ptr,
                          n, num_experts, CHUNK: tl.constexpr, WRITE_INVERSE: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid * CHUNK + tl.arange(0, CHUNK)
    valid = offs < n
    ids = tl.load(ids_ptr + offs, mask=valid, other=0)
    rank = tl.load(rank_ptr + offs, mask=valid, other=0)
    base = tl.load(offsets_ptr + ids, mask=valid, other=0)
    prefix = tl.load(chunk_counts_ptr + pid * num_experts + ids, mask=valid, other=0)
    dest = base + prefix + rank
    tl.store(sorted_ptr + dest, offs, mask=valid)
    if WRITE_INVERSE:
        tl.store(inverse_ptr + offs, dest, mask=valid)


@triton.jit
def _permute_kernel(hidden_ptr, sorted_slots_ptr, out_ptr, hidden_dim, TOP_K: tl.constexpr, BLOCK_H: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask = cols < hidden_dim
    token = (tl.load(sorted_slots_ptr + row) // TOP_K).to(tl.int64)
    values = tl.load(hidden_ptr + token * hidden_dim + cols, mask=mask)
    tl.store(out_ptr + row.to(tl.int64) * hidden_dim + cols, values, mask=mask)


@triton.jit
def _unpermute_kernel(expert_out_ptr, slot_to_row_ptr, weights_ptr, out_ptr, hidden_dim,
                      TOP_K: tl.constexpr, BLOCK_H: tl.constexpr):
    token = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask = cols < hidden_dim
    acc = tl.zeros([BLOCK_H], dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        slot = token * TOP_K + j
        row = tl.load(slot_to_row_ptr + slot).to(tl.int64)
        w = tl.load(weights_ptr + slot).to(tl.float32)
        x = tl.load(expert_out_ptr + row * hidden_dim + cols, mask=mask, other=0.0).to(tl.float32)
        acc += w * x
    tl.store(out_ptr + token.to(tl.int64) * hidden_dim + cols, acc.to(out_ptr.dtype.element_ty), mask=mask)


def _next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def _counting_sort(topk_ids, num_experts, block_size, expert_counts, *, write_inverse, write_blocks,
                   chunk=CHUNK, small_n=SMALL_N):
    """Shared by align (block_size B, blocks) and permute (B = 1, inverse). Returns
    (sorted [N + E*(B-1)], inverse [N] or None, block_expert_ids or None, offsets [E+1], post [1])."""
    dev = topk_ids.device
    n = topk_ids.numel()
    max_padded = n + num_experts * (block_size - 1)
    num_blocks = -(-max_padded // block_size) if write_blocks else 0
    sorted_ids = (torch.full((max_padded,), n, dtype=torch.int32, device=dev) if block_size > 1
                  else torch.empty(max_padded, dtype=torch.int32, device=dev))
    inverse = torch.empty(n, dtype=torch.int32, device=dev) if write_inverse else None
    blocks = torch.empty(num_blocks, dtype=torch.int32, device=dev) if write_blocks else None
    offsets = torch.empty(num_experts + 1, dtype=torch.int32, device=dev)
    post = torch.empty(1, dtype=torch.int32, device=dev)
    e_pad = max(16, _next_pow2(num_experts))  # tiny vectors trip some Triton versions
    dummy = offsets  # stands in for pointers a constexpr flag turns off
    ids = topk_ids.reshape(-1)
    if n <= small_n:
        chunk = min(chunk, max(16, _next_pow2(n)))
        cursor = torch.empty(num_experts, dtype=torch.int32, device=dev)
        _align_small_kernel[(1,)](
            ids, expert_counts if expert_counts is not None else dummy, cursor, sorted_ids,
            inverse if write_inverse else dummy, blocks if write_blocks else dummy, offsets, post,
            n, num_experts, num_blocks,
            BLOCK_SIZE=block_size, E_PAD=e_pad, CHUNK=chunk, RANK_COLS=min(chunk, RANK_COLS), BLOCKS_TILE=BLOCKS_TILE,
            HAS_COUNTS=expert_counts is not None, WRITE_INVERSE=write_inverse, WRITE_BLOCKS=write_blocks,
            num_warps=8 if chunk >= 256 else 4,
        )
        return sorted_ids, inverse, blocks, offsets, post
    num_chunks = -(-n // chunk)
    chunk_counts = torch.zeros(num_chunks, num_experts, dtype=torch.int32, device=dev)
    ranks = torch.empty(n, dtype=torch.int32, device=dev)
    totals = torch.empty(num_experts, dtype=torch.int32, device=dev)
    _align_count_kernel[(num_chunks,)](ids, chunk_counts, ranks, n, num_experts, CHUNK=chunk,
                                       RANK_COLS=min(chunk, RANK_COLS), num_warps=8 if chunk >= 256 else 4)
    e_tile = min(e_pad, 32)
    _align_scan_kernel[(-(-num_experts // e_tile),)](chunk_counts, totals, num_chunks, num_experts,
                                                      E_TILE=e_tile, SCAN_P=SCAN_P)
    # expert_counts, when given, must equal the column totals; using it only saves nothing here, so the
    # totals the scan just computed are used (they are exact by construction).
    grid_blocks = max(1, -(-num_blocks // BLOCKS_TILE))
    _align_blocks_kernel[(grid_blocks,)](totals, blocks if write_blocks else dummy, offsets, post, num_experts,
                                         num_blocks, BLOCK_SIZE=block_size, E_PAD=e_pad, BLOCKS_TILE=BLOCKS_TILE,
                                         WRITE_BLOCKS=write_blocks)
    _align_scatter_kernel[(num_chunks,)](ids, chunk_counts, ranks, offsets, sorted_ids,
                                         inverse if write_inverse else dummy, n, num_experts, CHUNK=chunk,
                                         WRITE_INVERSE=write_inverse)
    return sorted_ids, inverse, blocks, offsets, post


def align_triton(topk_ids, num_experts, block_size, expert_counts, *, chunk=CHUNK, small_n=SMALL_N):
    """topk_ids [M, k] int32 contiguous, checked. Returns (sorted_token_ids, block_expert_ids, num_tokens_post_padded)."""
    sorted_ids, _, blocks, _, post = _counting_sort(
        topk_ids, num_experts, block_size, expert_counts, write_inverse=False, write_blocks=True,
        chunk=chunk, small_n=small_n,
    )
    return sorted_ids, blocks, post


def _block_h(hidden_dim: int) -> int:
    return min(1024, max(16, _next_pow2(hidden_dim)))


def permute_triton(hidden_states, topk_ids, num_experts, expert_counts, *, chunk=CHUNK, small_n=SMALL_N):
    """hidden_states [M, H] contiguous; topk_ids [M, k] int32 contiguous. Returns
    (permuted [M*k, H], sorted_slots [M*k], slot_to_row [M*k], expert_offsets [E+1])."""
    M, k = topk_ids.shape
    H = hidden_states.shape[1]
    sorted_slots, slot_to_row, _, offsets, _ = _counting_sort(
        topk_ids, num_experts, 1, expert_counts, write_inverse=True, write_blocks=False,
        chunk=chunk, small_n=small_n,
    )
    permuted = torch.empty(M * k, H, dtype=hidden_states.dtype, device=hidden_states.device)
    if M * k and H:
        bh = _block_h(H)
        _permute_kernel[(M * k, -(-H // bh))](hidden_states, sorted_slots, permuted, H, TOP_K=k, BLOCK_H=bh)
    return permuted, sorted_slots, slot_to_row, offsets


def unpermute_triton(expert_output, slot_to_row, topk_weights, num_tokens, top_k):
    """expert_output [M*k, H] contiguous; slot_to_row [M*k] int32; topk_weights [M, k] contiguous. Returns [M, H]."""
    H = expert_output.shape[1]
    out = torch.empty(num_tokens, H, dtype=expert_output.dtype, device=expert_output.device)
    if num_tokens and H:
        bh = _block_h(H)
        _unpermute_kernel[(num_tokens, -(-H // bh))](expert_output, slot_to_row, topk_weights, out, H,
                                                     TOP_K=top_k, BLOCK_H=bh)
    return out
