"""Layout arithmetic shared by both expert-parallel backends (plain torch ops, any device).

Conventions (the contract of moekern.ep, see moekern/ep/__init__.py):
- W ranks, E experts, El = E / W; rank d owns global experts [d*El, (d+1)*El).
- Token t of source rank r goes to rank d once when any of its k experts lives on d.
- Rank d receives source rank 0's tokens first, then rank 1's, ...; within a source, ascending token index.
- Metadata sent with each token is one int32 row [2k+1]: k local ids (global - d*El, or -1 when the expert
  is not on d), k fp32 weight bit patterns (0.0 where the id is -1), and the source token index.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

FP8_MAX = 448.0  # largest finite float8_e4m3fn


class SendLayout(NamedTuple):
    """Where each token of one source rank goes.

    rank_mask: [M, W] bool, token t goes to rank d.
    send_counts: [W] int64 (on the tokens' device), tokens to each rank.
    send_token_idx: [N] int64, tokens in send order (rank-major, ascending token within a rank).
    """

    rank_mask: torch.Tensor
    send_counts: torch.Tensor
    send_token_idx: torch.Tensor


def send_layout(topk_ids: torch.Tensor, experts_per_rank: int, world_size: int) -> SendLayout:
    M = topk_ids.shape[0]
    mask = torch.zeros(M, world_size, dtype=torch.bool, device=topk_ids.device)
    if M:
        mask.scatter_(1, torch.div(topk_ids.long(), experts_per_rank, rounding_mode="floor"), True)
    _, token_idx = torch.nonzero(mask.t(), as_tuple=True)
    return SendLayout(mask, mask.sum(0), token_idx)


def dest_rows(rank_mask: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """[M, W] int32: the row of token t in rank d's receive buffer (base[d] + its place), or -1.

    base: [W] int64, rows on rank d taken by lower source ranks.
    """
    pos = torch.cumsum(rank_mask.to(torch.int32), 0) - 1 + base.to(torch.int32).unsqueeze(0)
    return torch.where(rank_mask, pos, torch.full_like(pos, -1)).to(torch.int32)


def local_meta(
    topk_ids: torch.Tensor, topk_weights: torch.Tensor, token_idx: torch.Tensor, dest_rank: torch.Tensor,
    experts_per_rank: int,
) -> torch.Tensor:
    """[N, 2k+1] int32 metadata rows for tokens token_idx sent to ranks dest_rank ([N] each)."""
    ids = topk_ids[token_idx].long()
    local = ids - dest_rank.long().unsqueeze(1) * experts_per_rank
    on_rank = (local >= 0) & (local < experts_per_rank)
    local = torch.where(on_rank, local, torch.full_like(local, -1)).to(torch.int32)
    w = torch.where(on_rank, topk_weights[token_idx].float(), torch.zeros((), device=ids.device))
    return torch.cat([local, w.view(torch.int32), token_idx.to(torch.int32).unsqueeze(1)], dim=1)


def split_meta(meta: torch.Tensor, top_k: int):
    """[R, 2k+1] int32 -> (local ids [R, k] int32, weights [R, k] fp32, source token [R] int32)."""
    return (
        meta[:, :top_k].contiguous(),
        meta[:, top_k:2 * top_k].contiguous().view(torch.float32),
        meta[:, 2 * top_k].contiguous(),
    )


class ExpertGrouping(NamedTuple):
    """The received tokens' local slots grouped by local expert.

    sorted_slots: [S] int64, flattened recv slot (i*k + j) of each grouped row, experts ascending, slots
      ascending within one; S = number of (received token, local expert) pairs.
    slot_to_row: [R*k] int32, grouped row of each recv slot, -1 for slots whose expert is not local.
    expert_offsets: [El+1] int32, local expert e's rows are expert_offsets[e]:expert_offsets[e+1].
    """

    sorted_slots: torch.Tensor
    slot_to_row: torch.Tensor
    expert_offsets: torch.Tensor


def group_by_local_expert(recv_topk_ids: torch.Tensor, experts_per_rank: int) -> ExpertGrouping:
    flat = recv_topk_ids.reshape(-1).long()
    key = torch.where(flat < 0, torch.full_like(flat, experts_per_rank), flat)
    order = torch.argsort(key, stable=True)
    counts = torch.bincount(key, minlength=experts_per_rank + 1)[:experts_per_rank]
    offsets = torch.zeros(experts_per_rank + 1, dtype=torch.int32, device=flat.device)
    offsets[1:] = torch.cumsum(counts, 0).to(torch.int32)
    num_rows = int(offsets[-1])
    sorted_slots = order[:num_rows]
    slot_to_row = torch.full_like(flat, -1, dtype=torch.int32)
    slot_to_row[sorted_slots] = torch.arange(num_rows, dtype=torch.int32, device=flat.device)
    return ExpertGrouping(sorted_slots, slot_to_row, offsets)


def local_reduce(expert_output: torch.Tensor, slot_to_row: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """[R, H] fp32: partial[i] = sum_j weights[i, j] * expert_output[slot_to_row[i*k + j]] (j ascending).

    Slots with row -1 add nothing. One j at a time keeps the temporary at [R, H] instead of [R, k, H].
    """
    R, k = weights.shape
    H = expert_output.shape[1]
    acc = torch.zeros(R, H, dtype=torch.float32, device=expert_output.device)
    if R == 0:
        return acc
    padded = torch.cat([expert_output, expert_output.new_zeros(1, H)])
    rows = slot_to_row.view(R, k).long()
    rows = torch.where(rows < 0, torch.full_like(rows, expert_output.shape[0]), rows)
    for j in range(k):
        acc += padded[rows[:, j]].float() * weights[:, j:j + 1].float()
    return acc


def quantize_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token e4m3: x [N, H] -> (q [N, H] float8_e4m3fn, scale [N] fp32), x ~ q * scale."""
    amax = x.float().abs().amax(dim=1) if x.shape[1] else x.new_zeros(x.shape[0], dtype=torch.float32)
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    q = (x.float() / scale.unsqueeze(1)).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q, scale


def dequantize_fp8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (q.float() * scale.unsqueeze(1)).to(dtype)
