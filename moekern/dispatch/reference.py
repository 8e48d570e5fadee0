"""Plain-PyTorch references for dispatch and combine: align, permute, unpermute.

Flattened slots: slot i = token * top_k + j is token `token`'s j-th choice, expert topk_ids[token, j].
Every backend orders the slots of one expert by i (token order), experts by index.

align (for blocked grouped GEMMs, the layout vLLM's moe_align_block_size also produces):
  sorted_token_ids [M*k + min(M*k, E)*(B-1)] int32: expert 0's slots, padded with the sentinel M*k up to a
    multiple of B, then expert 1's, ...; experts with no slots take no blocks; entries past
    num_tokens_post_padded are also the sentinel. (At most min(M*k, E) experts hold slots and each pads
    fewer than B: the length holds every layout, and is short at decode sizes, where the expert GEMMs launch
    a program per block of it.)
  block_expert_ids [ceil(len(sorted_token_ids) / B)] int32: the expert of each block; -1 past the used blocks.
  num_tokens_post_padded [1] int32: sum over experts of ceil(count_e / B) * B.
  The sizes are fixed by (M, k, E, B) alone, so the outputs can live in CUDA-graph-captured buffers.

permute/unpermute (for token-contiguous expert inputs):
  permuted [M*k, H]: row r holds hidden_states[sorted_slots[r] // k]; rows grouped by expert.
  layout.sorted_slots [M*k] int32: the flattened slot of each permuted row.
  layout.slot_to_row [M*k] int32: the inverse, the permuted row of each slot.
  layout.expert_offsets [E+1] int32: expert e's rows are expert_offsets[e]:expert_offsets[e+1].
  unpermute: out[t] = sum_j topk_weights[t, j] * expert_output[slot_to_row[t*k + j]], fp32 accumulation
  over j ascending, returned in expert_output's dtype. expert_output may hold only the first N rows
  (unpermute(..., skip_missing_rows=True)): slots whose row is >= N contribute nothing. Expert parallelism
  uses this: the slots of experts on other ranks are sorted last (an extra expert) and never computed.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class AlignOutput(NamedTuple):
    sorted_token_ids: torch.Tensor  # [M*k + min(M*k, E)*(B-1)] int32, sentinel M*k
    block_expert_ids: torch.Tensor  # [ceil(len(sorted_token_ids) / B)] int32, -1 past the used blocks
    num_tokens_post_padded: torch.Tensor  # [1] int32


class PermuteLayout(NamedTuple):
    sorted_slots: torch.Tensor  # [M*k] int32
    slot_to_row: torch.Tensor  # [M*k] int32
    expert_offsets: torch.Tensor  # [E+1] int32
    num_tokens: int
    top_k: int


def align_sizes(num_slots: int, num_experts: int, block_size: int) -> tuple[int, int]:
    """(len(sorted_token_ids), len(block_expert_ids)) for M*k = num_slots: at most min(num_slots, num_experts)
    experts hold slots, and each pads fewer than block_size."""
    max_padded = num_slots + min(num_slots, num_experts) * (block_size - 1)
    return max_padded, -(-max_padded // block_size)


def align_reference(topk_ids: torch.Tensor, num_experts: int, block_size: int) -> AlignOutput:
    M, k = topk_ids.shape
    n = M * k
    flat = topk_ids.reshape(-1).long()
    max_padded, max_blocks = align_sizes(n, num_experts, block_size)
    dev = topk_ids.device
    sorted_ids = torch.full((max_padded,), n, dtype=torch.int32, device=dev)
    block_experts = torch.full((max_blocks,), -1, dtype=torch.int32, device=dev)
    order = torch.argsort(flat, stable=True)  # slots grouped by expert, in slot order within one
    counts = torch.bincount(flat, minlength=num_experts).tolist()
    src = dst = block = 0
    for e, c in enumerate(counts):
        if c == 0:
            continue
        sorted_ids[dst:dst + c] = order[src:src + c].to(torch.int32)
        nblocks = -(-c // block_size)
        block_experts[block:block + nblocks] = e
        src += c
        dst += nblocks * block_size
        block += nblocks
    return AlignOutput(sorted_ids, block_experts, torch.tensor([dst], dtype=torch.int32, device=dev))


def permute_reference(hidden_states: torch.Tensor, topk_ids: torch.Tensor, num_experts: int):
    M, k = topk_ids.shape
    flat = topk_ids.reshape(-1).long()
    sorted_slots = torch.argsort(flat, stable=True)
    slot_to_row = torch.empty_like(sorted_slots)
    slot_to_row[sorted_slots] = torch.arange(M * k, device=flat.device)
    counts = torch.bincount(flat, minlength=num_experts)
    offsets = torch.zeros(num_experts + 1, dtype=torch.int32, device=flat.device)
    offsets[1:] = torch.cumsum(counts, 0).to(torch.int32)
    permuted = hidden_states[torch.div(sorted_slots, k, rounding_mode="floor")]
    layout = PermuteLayout(sorted_slots.to(torch.int32), slot_to_row.to(torch.int32), offsets, M, k)
    return permuted, layout


def unpermute_reference(expert_output: torch.Tensor, layout: PermuteLayout, topk_weights: torch.Tensor):
    """out[t] = sum over j ascending of topk_weights[t, j] * expert_output[slot_to_row[t*k + j]], in fp32, one
    product and one add at a time; rows at or past expert_output.shape[0] contribute nothing."""
    M, k = layout.num_tokens, layout.top_k
    num_rows, H = expert_output.shape
    padded = torch.cat([expert_output, expert_output.new_zeros(1, H)])  # row num_rows: a zero row
    rows = layout.slot_to_row.long().view(M, k)
    rows = torch.where(rows >= num_rows, torch.full_like(rows, num_rows), rows)
    weights = topk_weights.float()
    out = torch.zeros(M, H, dtype=torch.float32, device=expert_output.device)
    for j in range(k):
        out += padded[rows[:, j]].float() * weights[:, j:j + 1]
    return out.to(expert_output.dtype)
