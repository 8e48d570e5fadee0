"""Triton kernels for dispatch and combine: align (counting sort into padded blocks), permute, unpermute.

Align is a stable counting sort of the N = M*k flattened slots by expert, each expert's run padded to a
multiple of B (B = 1 gives permute's unpadded layout, so permute reuses the same kernels). The old version
was latency-bound (global loads inside serial loops, 4-6 launches); this one keeps each program's work in
registers, loaded once (see NOTES.md for the diagnosis and the measurements):

  * rank within an expert, order-preserving: sort the unique keys expert << LOG_N | slot (a bitonic network
    like tl.sort's, O(N log^2 N) per program). In the sorted order, position q holds slot `key & (N-1)` of expert
    `key >> LOG_N`, and its destination is q + shift[expert], shift = padded offset - unpadded offset
    (+ the expert's count in earlier chunks): one tl.gather from an [E_PAD] register vector.
  * counts: tl.histogram (or the caller's exact expert_counts); padded offsets: tl.cumsum over [E_PAD].
  * blocks and sentinels, per tile of BT blocks: the owner of block b is the number of experts whose padded
    run ends at or before b; positions of b at or past offset[owner] + count[owner] (or past the used
    blocks) get the sentinel N. Real slots and sentinels are disjoint, so the kernels fill the sentinel
    themselves (no torch.full launch) and need no ordering between the scatter and the fill.

Paths, chosen from shapes only:
  1. N <= small_n: one launch. Every program histograms all ids; program 0 sorts and scatters; program t
     writes block tile t.
  2. larger: launch 1 writes per-chunk histograms [P, E] (chunks of C slots); launch 2: program p sums the
     table (earlier chunks -> prefix, all -> totals), sorts and scatters chunk p, writes block tile p.
  3. when the table would be read too many times (P * programs large): a scan launch in between turns the
     table into exclusive prefixes + totals, so launch 2 reads one row.

Nothing here reads a device value on the host: the launches can be captured in a CUDA graph. Index
arithmetic is int32 for slots (N < 2**31) and int64 for row * H offsets.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moekern.dispatch.reference import align_sizes

SMALL_N = 4096  # at or below this many slots one launch does the whole align (one program sorts all keys)
MAX_SMALL_N = 16384  # cap of small_n: one program sorts next_pow2(N) keys; above it the chunks run
MIN_CHUNK = 1024  # slots per chunk of the multi-launch path, at least ...
MAX_CHUNK = 8192  # ... and at most (a chunk's keys are sorted by one program)
TARGET_CHUNKS = 64  # the chunk size grows until there are at most this many chunks (or MAX_CHUNK)
TABLE_READS = 8192  # programs x chunks above which the scan launch runs (each program then reads one row)
SCAN_P = 64  # chunks per tile in the scan launch
MIN_E_PAD = 64  # tl.histogram bins: at least a (64-wide) warp's worth


@triton.jit
def _padded_layout(counts, BLOCK_SIZE: tl.constexpr):
    """counts [E_PAD] -> (padded counts, exclusive and inclusive prefix sums of the padded counts)."""
    padded = ((counts + BLOCK_SIZE - 1) // BLOCK_SIZE) * BLOCK_SIZE
    incl = tl.cumsum(padded, axis=0)
    return padded, incl - padded, incl


@triton.jit
def _bit(N_DIMS: tl.constexpr, J: tl.constexpr):
    """Bit J of the flat index, shaped to broadcast against the [2] * N_DIMS hypercube."""
    return tl.reshape(tl.arange(0, 2), [1] * (N_DIMS - J - 1) + [2] + [1] * J)


@triton.jit
def _bitonic_sort(x, LOG_N: tl.constexpr):
    """Ascending sort of x [2**LOG_N] int32, values < 2**30 (bitonic network on the [2]*LOG_N hypercube).

    Like tl.sort, but the partner of each element comes from a size-2 tl.sum (partner = pair sum - self)
    rather than an xor reduction: the same one exchange per step on a GPU, and a numpy sum under
    TRITON_INTERPRET (where the xor reduction runs element by element in Python, minutes per call)."""
    h = tl.reshape(x, [2] * LOG_N)
    for stage in tl.static_range(1, LOG_N + 1):
        for step in tl.static_range(stage):
            # compare-exchange across bit (stage - 1 - step) of the index; written out rather than bound to
            # a name, because a constexpr cannot be rebound across unrolled iterations when compiled
            partner = tl.sum(h, axis=LOG_N - stage + step, keep_dims=True) - h
            if stage < LOG_N:  # runs of 2**stage alternate ascending / descending (bit `stage`)
                take_max = (_bit(LOG_N, stage - 1 - step) ^ _bit(LOG_N, stage)) == 1
            else:  # the final merge is ascending everywhere
                take_max = _bit(LOG_N, stage - 1 - step) == 1
            h = tl.where(take_max, tl.maximum(h, partner), tl.minimum(h, partner))
    return tl.reshape(h, [2**LOG_N])


@triton.jit
def _sort_scatter(ids_ptr, start, n, shift, sorted_ptr, inverse_ptr,
                  N_PAD: tl.constexpr, LOG_N: tl.constexpr, E_PAD: tl.constexpr, WRITE_INVERSE: tl.constexpr):
    """Slots start..start+N_PAD (those < n): slot s of expert e with r earlier slots of e in this range goes
    to shift'[e] + r, where shift = shift' - (slots of experts < e in this range) is what the caller passes."""
    i = tl.arange(0, N_PAD)
    valid = start + i < n
    ids = tl.load(ids_ptr + start + i, mask=valid, other=0)
    keys = (tl.where(valid, ids, E_PAD) << LOG_N) | i  # unique; invalid slots sort last
    keys = _bitonic_sort(keys, LOG_N)
    expert = tl.minimum(keys >> LOG_N, E_PAD - 1)
    slot = start + (keys & (N_PAD - 1))
    dest = i + tl.gather(shift, expert, 0)
    keep = start + i < n  # sorted position q < (valid count) <=> the key at q is a real slot
    tl.store(sorted_ptr + dest, slot, mask=keep)
    if WRITE_INVERSE:
        tl.store(inverse_ptr + slot, dest, mask=keep)


@triton.jit
def _blocks_and_pads(tile, counts, excl, incl, e_mask, blocks_ptr, sorted_ptr, sentinel, num_blocks, max_padded,
                     BLOCK_SIZE: tl.constexpr, E_PAD: tl.constexpr, BT: tl.constexpr, J_TILE: tl.constexpr,
                     WRITE_PADS: tl.constexpr):
    """Blocks tile*BT .. +BT: block_expert_ids (-1 past the used blocks) and the sentinel at every position of
    these blocks that no slot fills. Empty experts end where they start, so they never own a block."""
    b = tile * BT + tl.arange(0, BT)
    b_mask = b < num_blocks
    end_blocks = incl // BLOCK_SIZE
    owner = tl.sum(((end_blocks[None, :] <= b[:, None]) & e_mask[None, :]).to(tl.int32), axis=1)
    total_blocks = tl.sum(tl.where(e_mask, incl - excl, 0), axis=0) // BLOCK_SIZE
    used = b < total_blocks
    tl.store(blocks_ptr + b, tl.where(used, owner, -1), mask=b_mask)
    if WRITE_PADS:
        o = tl.minimum(owner, E_PAD - 1)  # owner == E past the used blocks; those are all padding anyway
        real_end = tl.where(used, tl.gather(excl + counts, o, 0), 0)
        for j0 in range(0, BLOCK_SIZE, J_TILE):
            j = j0 + tl.arange(0, J_TILE)
            x = b[:, None] * BLOCK_SIZE + j[None, :]
            pad = (x >= real_end[:, None]) & (j[None, :] < BLOCK_SIZE) & b_mask[:, None] & (x < max_padded)
            tl.store(sorted_ptr + x, tl.zeros([BT, J_TILE], dtype=tl.int32) + sentinel, mask=pad)


@triton.jit
def _align_single_kernel(
    ids_ptr, counts_in_ptr, sorted_ptr, inverse_ptr, blocks_ptr, offsets_ptr, post_ptr,
    n, num_experts, num_blocks, max_padded,
    BLOCK_SIZE: tl.constexpr, N_PAD: tl.constexpr, LOG_N: tl.constexpr, E_PAD: tl.constexpr, BT: tl.constexpr,
    J_TILE: tl.constexpr, HAS_COUNTS: tl.constexpr, WRITE_INVERSE: tl.constexpr, WRITE_BLOCKS: tl.constexpr,
    WRITE_PADS: tl.constexpr,
):
    pid = tl.program_id(0)
    e = tl.arange(0, E_PAD)
    e_mask = e < num_experts
    if HAS_COUNTS:
        counts = tl.load(counts_in_ptr + e, mask=e_mask, other=0)
    else:
        i = tl.arange(0, N_PAD)
        counts = tl.histogram(tl.load(ids_ptr + i, mask=i < n, other=0), E_PAD, mask=i < n)
    padded, excl, incl = _padded_layout(counts, BLOCK_SIZE)
    if pid == 0:
        total = tl.sum(padded, axis=0)
        tl.store(offsets_ptr + e, excl, mask=e_mask)
        tl.store(offsets_ptr + num_experts, total)
        tl.store(post_ptr, total)
        unpadded_excl = tl.cumsum(counts, axis=0) - counts
        _sort_scatter(ids_ptr, 0, n, excl - unpadded_excl, sorted_ptr, inverse_ptr, N_PAD, LOG_N, E_PAD,
                      WRITE_INVERSE)
    if WRITE_BLOCKS:
        _blocks_and_pads(pid, counts, excl, incl, e_mask, blocks_ptr, sorted_ptr, n, num_blocks, max_padded,
                         BLOCK_SIZE, E_PAD, BT, J_TILE, WRITE_PADS)


@triton.jit
def _align_hist_kernel(ids_ptr, table_ptr, n, num_experts, CHUNK: tl.constexpr, E_PAD: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid * CHUNK + tl.arange(0, CHUNK)
    valid = offs < n
    hist = tl.histogram(tl.load(ids_ptr + offs, mask=valid, other=0), E_PAD, mask=valid)
    e = tl.arange(0, E_PAD)
    tl.store(table_ptr + pid * num_experts + e, hist, mask=e < num_experts)  # every row written: no zero fill


@triton.jit
def _align_scan_kernel(table_ptr, totals_ptr, num_chunks, num_experts, E_TILE: tl.constexpr, SCAN_P: tl.constexpr):
    """table[p, e] <- sum of table[:p, e] (in place); totals[e] <- the column sum."""
    e = tl.program_id(0) * E_TILE + tl.arange(0, E_TILE)
    e_mask = e < num_experts
    carry = tl.zeros([E_TILE], dtype=tl.int32)
    for p_start in range(0, num_chunks, SCAN_P):
        p = p_start + tl.arange(0, SCAN_P)
        mask = (p[:, None] < num_chunks) & e_mask[None, :]
        ptrs = table_ptr + p[:, None] * num_experts + e[None, :]
        tile = tl.load(ptrs, mask=mask, other=0)
        excl = tl.cumsum(tile, axis=0) - tile + carry[None, :]
        tl.store(ptrs, excl, mask=mask)
        carry += tl.sum(tile, axis=0)
    tl.store(totals_ptr + e, carry, mask=e_mask)


@triton.jit
def _align_chunks_kernel(
    ids_ptr, table_ptr, totals_ptr, sorted_ptr, inverse_ptr, blocks_ptr, offsets_ptr, post_ptr,
    n, num_experts, num_chunks, num_blocks, max_padded,
    BLOCK_SIZE: tl.constexpr, CHUNK: tl.constexpr, LOG_C: tl.constexpr, E_PAD: tl.constexpr, P_TILE: tl.constexpr,
    BT: tl.constexpr, J_TILE: tl.constexpr, SCANNED: tl.constexpr, WRITE_INVERSE: tl.constexpr,
    WRITE_BLOCKS: tl.constexpr, WRITE_PADS: tl.constexpr,
):
    pid = tl.program_id(0)
    e = tl.arange(0, E_PAD)
    e_mask = e < num_experts
    if SCANNED:
        totals = tl.load(totals_ptr + e, mask=e_mask, other=0)
    else:
        # totals, prefix over the chunks before pid, and chunk pid's own row, in one sweep over the table
        totals = tl.zeros([E_PAD], dtype=tl.int32)
        prefix = tl.zeros([E_PAD], dtype=tl.int32)
        own = tl.zeros([E_PAD], dtype=tl.int32)
        for p0 in range(0, num_chunks, P_TILE):
            p = p0 + tl.arange(0, P_TILE)
            tile = tl.load(table_ptr + p[:, None] * num_experts + e[None, :],
                           mask=(p[:, None] < num_chunks) & e_mask[None, :], other=0)
            totals += tl.sum(tile, axis=0)
            prefix += tl.sum(tl.where(p[:, None] < pid, tile, 0), axis=0)
            own += tl.sum(tl.where(p[:, None] == pid, tile, 0), axis=0)
    padded, excl, incl = _padded_layout(totals, BLOCK_SIZE)
    if pid == 0:
        total = tl.sum(padded, axis=0)
        tl.store(offsets_ptr + e, excl, mask=e_mask)
        tl.store(offsets_ptr + num_experts, total)
        tl.store(post_ptr, total)
    if pid < num_chunks:
        if SCANNED:
            prefix = tl.load(table_ptr + pid * num_experts + e, mask=e_mask, other=0)
            offs = pid * CHUNK + tl.arange(0, CHUNK)
            own = tl.histogram(tl.load(ids_ptr + offs, mask=offs < n, other=0), E_PAD, mask=offs < n)
        own_excl = tl.cumsum(own, axis=0) - own
        _sort_scatter(ids_ptr, pid * CHUNK, n, excl + prefix - own_excl, sorted_ptr, inverse_ptr, CHUNK, LOG_C,
                      E_PAD, WRITE_INVERSE)
    if WRITE_BLOCKS:
        _blocks_and_pads(pid, totals, excl, incl, e_mask, blocks_ptr, sorted_ptr, n, num_blocks, max_padded,
                         BLOCK_SIZE, E_PAD, BT, J_TILE, WRITE_PADS)


@triton.jit
def _permute_kernel(hidden_ptr, sorted_slots_ptr, out_ptr, hidden_dim, TOP_K: tl.constexpr, BLOCK_H: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask = cols < hidden_dim
    token = (tl.load(sorted_slots_ptr + row) // TOP_K).to(tl.int64)
    values = tl.load(hidden_ptr + token * hidden_dim + cols, mask=mask)
    tl.store(out_ptr + row.to(tl.int64) * hidden_dim + cols, values, mask=mask)


@triton.jit
def _unpermute_kernel(expert_out_ptr, slot_to_row_ptr, weights_ptr, out_ptr, hidden_dim, num_rows,
                      TOP_K: tl.constexpr, BLOCK_H: tl.constexpr):
    token = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask = cols < hidden_dim
    acc = tl.zeros([BLOCK_H], dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        slot = token * TOP_K + j
        row = tl.load(slot_to_row_ptr + slot).to(tl.int64)
        if row < num_rows:  # rows past expert_output's end (experts not computed) contribute nothing
            w = tl.load(weights_ptr + slot).to(tl.float32)
            x = tl.load(expert_out_ptr + row * hidden_dim + cols, mask=mask, other=0.0).to(tl.float32)
            acc += w * x
    tl.store(out_ptr + token.to(tl.int64) * hidden_dim + cols, acc.to(out_ptr.dtype.element_ty), mask=mask)


def _next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def _chunk_size(n: int) -> int:
    return min(MAX_CHUNK, max(MIN_CHUNK, _next_pow2(-(-n // TARGET_CHUNKS))))


def _warps(keys: int) -> int:
    """Warps for a program holding `keys` slots: never more threads than keys, so no warp holds a replica of
    another's ids (tl.histogram's cross-warp sum has had bugs with replicated inputs)."""
    return max(1, min(keys // 32, 4 if keys <= 512 else 8 if keys <= 2048 else 16))


def _counting_sort(topk_ids, num_experts, block_size, expert_counts, *, write_inverse, write_blocks,
                   chunk=None, small_n=SMALL_N, table_reads=TABLE_READS):
    """Shared by align (block_size B, blocks) and permute (B = 1, inverse). Returns
    (sorted [N + min(N, E)*(B-1)], inverse [N] or None, block_expert_ids or None, offsets [E+1], post [1]).

    chunk (a power of two), small_n (capped at MAX_SMALL_N) and table_reads choose the path; tests use them
    to reach every path at tiny sizes, the defaults pick it from N."""
    dev = topk_ids.device
    n = topk_ids.numel()
    max_padded, num_blocks = align_sizes(n, num_experts, block_size)
    num_blocks = num_blocks if write_blocks else 0
    sorted_ids = torch.empty(max_padded, dtype=torch.int32, device=dev)  # the kernels write every entry
    inverse = torch.empty(n, dtype=torch.int32, device=dev) if write_inverse else None
    blocks = torch.empty(num_blocks, dtype=torch.int32, device=dev) if write_blocks else None
    offsets = torch.empty(num_experts + 1, dtype=torch.int32, device=dev)
    post = torch.empty(1, dtype=torch.int32, device=dev)
    e_pad = max(MIN_E_PAD, _next_pow2(num_experts))
    bt = max(16, min(128, 8192 // e_pad))  # blocks per tile: the owner search is a [BT, E_PAD] compare
    j_tile = max(16, min(_next_pow2(block_size), 4096 // bt))
    n_tiles = -(-num_blocks // bt) if write_blocks else 0
    write_pads = write_blocks and block_size > 1  # B = 1: every position holds a real slot
    dummy = offsets  # stands in for pointers a constexpr flag turns off
    ids = topk_ids.reshape(-1)
    common = dict(BLOCK_SIZE=block_size, E_PAD=e_pad, BT=bt, J_TILE=j_tile, WRITE_INVERSE=write_inverse,
                  WRITE_BLOCKS=write_blocks, WRITE_PADS=write_pads)
    if n <= min(small_n, MAX_SMALL_N):
        n_pad = max(128, _next_pow2(n))  # 4 warps without replicas; tiny sorts cost nothing
        _align_single_kernel[(max(1, n_tiles),)](
            ids, expert_counts if expert_counts is not None else dummy, sorted_ids,
            inverse if write_inverse else dummy, blocks if write_blocks else dummy, offsets, post,
            n, num_experts, num_blocks, max_padded,
            N_PAD=n_pad, LOG_N=n_pad.bit_length() - 1, HAS_COUNTS=expert_counts is not None,
            num_warps=_warps(n_pad), **common,
        )
        return sorted_ids, inverse, blocks, offsets, post
    chunk = _chunk_size(n) if chunk is None else chunk
    if chunk < 16 or chunk & (chunk - 1) or chunk > MAX_CHUNK:
        raise ValueError(f"chunk={chunk} must be a power of two in [16, {MAX_CHUNK}]")
    num_chunks = -(-n // chunk)
    grid = max(num_chunks, n_tiles)
    # expert_counts, when given, must equal the column totals; the table gives them for free, so it is unused.
    table = torch.empty(num_chunks, num_experts, dtype=torch.int32, device=dev)
    _align_hist_kernel[(num_chunks,)](ids, table, n, num_experts, CHUNK=chunk, E_PAD=e_pad,
                                      num_warps=_warps(chunk))
    scanned = grid * num_chunks > table_reads
    totals = dummy
    if scanned:
        totals = torch.empty(num_experts, dtype=torch.int32, device=dev)
        e_tile = min(e_pad, 32)
        _align_scan_kernel[(-(-num_experts // e_tile),)](table, totals, num_chunks, num_experts,
                                                          E_TILE=e_tile, SCAN_P=SCAN_P)
    p_tile = max(1, min(_next_pow2(num_chunks), 8192 // e_pad))
    _align_chunks_kernel[(grid,)](
        ids, table, totals, sorted_ids, inverse if write_inverse else dummy, blocks if write_blocks else dummy,
        offsets, post, n, num_experts, num_chunks, num_blocks, max_padded,
        CHUNK=chunk, LOG_C=chunk.bit_length() - 1, P_TILE=p_tile, SCANNED=scanned, num_warps=_warps(chunk),
        **common,
    )
    return sorted_ids, inverse, blocks, offsets, post


def align_triton(topk_ids, num_experts, block_size, expert_counts, *, chunk=None, small_n=SMALL_N,
                 table_reads=TABLE_READS):
    """topk_ids [M, k] int32 contiguous, checked. Returns (sorted_token_ids, block_expert_ids, num_tokens_post_padded).

    1 launch for M*k <= small_n, else 2 (3 with the scan launch); see the module docstring."""
    sorted_ids, _, blocks, _, post = _counting_sort(
        topk_ids, num_experts, block_size, expert_counts, write_inverse=False, write_blocks=True,
        chunk=chunk, small_n=small_n, table_reads=table_reads,
    )
    return sorted_ids, blocks, post


def _block_h(hidden_dim: int) -> int:
    return min(1024, max(16, _next_pow2(hidden_dim)))


def permute_triton(hidden_states, topk_ids, num_experts, expert_counts, *, chunk=None, small_n=SMALL_N,
                   table_reads=TABLE_READS):
    """hidden_states [M, H] contiguous; topk_ids [M, k] int32 contiguous. Returns
    (permuted [M*k, H], sorted_slots [M*k], slot_to_row [M*k], expert_offsets [E+1])."""
    M, k = topk_ids.shape
    H = hidden_states.shape[1]
    sorted_slots, slot_to_row, _, offsets, _ = _counting_sort(
        topk_ids, num_experts, 1, expert_counts, write_inverse=True, write_blocks=False,
        chunk=chunk, small_n=small_n, table_reads=table_reads,
    )
    permuted = torch.empty(M * k, H, dtype=hidden_states.dtype, device=hidden_states.device)
    if M * k and H:
        bh = _block_h(H)
        _permute_kernel[(M * k, -(-H // bh))](hidden_states, sorted_slots, permuted, H, TOP_K=k, BLOCK_H=bh)
    return permuted, sorted_slots, slot_to_row, offsets


def unpermute_triton(expert_output, slot_to_row, topk_weights, num_tokens, top_k, *, out=None):
    """expert_output [N, H] contiguous (N <= M*k; slots whose row is >= N contribute nothing); slot_to_row
    [M*k] int32; topk_weights [M, k] contiguous. Returns [M, H], written into `out` when given (a contiguous
    [M, H] tensor of any float dtype: moekern.ep's peer path passes its peer-visible combine region)."""
    H = expert_output.shape[1]
    if out is None:
        out = torch.empty(num_tokens, H, dtype=expert_output.dtype, device=expert_output.device)
    if num_tokens and H:
        bh = _block_h(H)
        _unpermute_kernel[(num_tokens, -(-H // bh))](expert_output, slot_to_row, topk_weights, out, H,
                                                     expert_output.shape[0], TOP_K=top_k, BLOCK_H=bh)
    return out
