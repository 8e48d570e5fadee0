"""What travels between ranks, shared by both expert-parallel backends (plain torch ops, any device): where
each token goes (send layout, receive rows), the metadata row sent with it, the fp8 payload.

Grouping what arrives by local expert is not here: it is moekern.dispatch's permute layout (moekern/ep/common.py).

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


def quantize_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token e4m3: x [N, H] -> (q [N, H] float8_e4m3fn, scale [N] fp32), x ~ q * scale."""
    amax = x.float().abs().amax(dim=1) if x.shape[1] else x.new_zeros(x.shape[0], dtype=torch.float32)
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    q = (x.float() / scale.unsqueeze(1)).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q, scale


def dequantize_fp8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (q.float() * scale.unsqueeze(1)).to(dtype)
