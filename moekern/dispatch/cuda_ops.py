"""The cuda backend of moekern.align / permute / unpermute: torch.ops.moekern.{moe_align, permute,
unpermute} (csrc/dispatch/align.cu, permute.cu).

Importing this module registers the ops' fake implementations (output sizes depend only on the input
shapes, so the ops work under torch.compile and CUDA-graph capture). moekern.dispatch.api validates the
arguments (ids in range, counts consistent); the ops re-check shapes, dtypes and devices.

Launches: align and the permute layout are one kernel up to 512 slots (M*k; 1,024 for E <= 128, 4,096 for
E <= 8) and two above (a per-chunk histogram, then scan + stable scatter over many CTAs), measured on an H100
(csrc/dispatch/align_plan.h; torch.ops.moekern.align_plan(n, E, B) gives [slots per thread, chunks, pads by
thread]); permute adds one row-gather kernel, unpermute is one kernel.
expert_counts (the routing kernel's histogram) spares the cross-chunk total; the per-chunk counts that
keep the order stable are still needed, so it does not remove the histogram launch.
"""

from __future__ import annotations

import torch

from moekern._ext import extension_error, has_op
from moekern.dispatch.reference import align_sizes

# Checked once at import: the wrappers then read a constant, which torch.compile traces through.
_EXT_ERROR = extension_error()

if _EXT_ERROR is None:

    @torch.library.register_fake("moekern::moe_align")
    def _moe_align_fake(topk_ids, num_experts, block_size, expert_counts):
        max_padded, max_blocks = align_sizes(topk_ids.numel(), num_experts, block_size)
        return (
            topk_ids.new_empty((max_padded,), dtype=torch.int32),
            topk_ids.new_empty((max_blocks,), dtype=torch.int32),
            topk_ids.new_empty((1,), dtype=torch.int32),
        )

    @torch.library.register_fake("moekern::permute")
    def _permute_fake(hidden, topk_ids, num_experts, expert_counts):
        n = topk_ids.numel()
        return (
            hidden.new_empty((n, hidden.shape[1])),
            topk_ids.new_empty((n,), dtype=torch.int32),
            topk_ids.new_empty((n,), dtype=torch.int32),
            topk_ids.new_empty((num_experts + 1,), dtype=torch.int32),
        )

    @torch.library.register_fake("moekern::unpermute")
    def _unpermute_fake(expert_output, slot_to_row, topk_weights):
        return expert_output.new_empty((topk_weights.shape[0], expert_output.shape[1]))


if _EXT_ERROR is None and has_op("moe_align_variant"):

    @torch.library.register_fake("moekern::moe_align_variant")
    def _moe_align_variant_fake(topk_ids, num_experts, block_size, expert_counts, slots_per_thread, ballot_match,
                                thread_pads=False):
        return _moe_align_fake(topk_ids, num_experts, block_size, expert_counts)


def _require_extension(name: str) -> None:
    if _EXT_ERROR is not None:
        raise RuntimeError(f"{name} needs moekern._C: {_EXT_ERROR}")


def align_cuda(
    topk_ids: torch.Tensor, num_experts: int, block_size: int, expert_counts: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """topk_ids: [M, k] int32 CUDA in [0, E); E <= 512; block_size >= 1; expert_counts: [E] int32 or None.

    Returns (sorted_token_ids [M*k + min(M*k, E)*(B-1)] int32, block_expert_ids [ceil(that / B)] int32,
    num_tokens_post_padded [1] int32), equal to moekern.dispatch.reference.align_reference.
    """
    _require_extension("align_cuda")
    return torch.ops.moekern.moe_align(topk_ids, int(num_experts), int(block_size), expert_counts)


def permute_cuda(
    hidden: torch.Tensor, topk_ids: torch.Tensor, num_experts: int, expert_counts: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """hidden: [M, H] CUDA (any dtype: rows are copied as bytes); topk_ids: [M, k] int32 in [0, E).

    Returns (permuted [M*k, H] hidden's dtype, sorted_slots [M*k] int32, slot_to_row [M*k] int32,
    expert_offsets [E+1] int32), as moekern.dispatch.reference.permute_reference.
    """
    _require_extension("permute_cuda")
    return torch.ops.moekern.permute(hidden, topk_ids, int(num_experts), expert_counts)


def unpermute_cuda(expert_output: torch.Tensor, slot_to_row, topk_weights: torch.Tensor) -> torch.Tensor:
    """expert_output: [N, H] fp32|fp16|bf16 CUDA, N <= M*k (slots whose row is >= N contribute nothing: the
    kernel bounds every row by expert_output's size); slot_to_row: [M*k] int32 tensor, or the PermuteLayout
    permute returned (its slot_to_row is used); topk_weights: [M, k] float (computed in fp32).

    Returns [M, H] in expert_output's dtype: out[t] = sum_j w[t, j] * expert_output[slot_to_row[t*k + j]].
    """
    _require_extension("unpermute_cuda")
    if not isinstance(slot_to_row, torch.Tensor):
        slot_to_row = slot_to_row.slot_to_row  # a PermuteLayout
    return torch.ops.moekern.unpermute(expert_output, slot_to_row, topk_weights)
