"""The portable expert-parallel path ("nccl"): torch.distributed collectives, any device (gloo on CPU too).

Per rank, three exchanges in all:
  1. status: an all_gather of [W + 4] int64 per rank (tokens for each rank, H, k, dtype code, bad-ids
     flag). Every rank then knows the whole counts matrix (receive sizes) and whether any rank's input was
     bad, so a data error raises on every rank instead of leaving peers blocked in a collective.
  2. payload: all_to_all_single of the tokens (raw bytes, so gloo needs no bf16/fp8 support) and of one
     int32 metadata row per token (local ids, weights, source token), plus fp8 scales when asked.
  3. combine: the receiver reduces its local experts (fp32, moekern.dispatch.unpermute), casts to the
     payload dtype, and an all_to_all_single sends each partial row back; the source adds them per rank in
     rank order (fp32).
The per-rank steps around the collectives (pack, unpack, sum_partials) are public so that a benchmark can
replay the path with the collectives replaced by local copies.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from moekern.ep import layout as L
from moekern.ep.common import (
    EpHandle, check_status, finish_dispatch, ids_out_of_range, local_combine, status_row,
)


class Packed(NamedTuple):
    """One source rank's send buffers, rows in send order (destination rank ascending, token ascending).

    x: [N, H] tokens (float8_e4m3fn when fp8); meta: [N, 2k+1] int32 rows (layout.local_meta);
    scale: [N] fp32 per-token scales or None; lay: the SendLayout; status: [W + 4] int64 (common.status_row).
    """

    x: torch.Tensor
    meta: torch.Tensor
    scale: torch.Tensor | None
    lay: L.SendLayout
    status: torch.Tensor


def pack(x, topk_ids, topk_weights, num_experts: int, world_size: int, fp8: bool = False) -> Packed:
    """x [M, H], topk_ids [M, k] int32|int64 global ids, topk_weights [M, k] -> what this rank sends.

    Out-of-range ids are clamped (the layout stays valid) and flagged in the status row, so that every rank
    raises after the status exchange."""
    W = world_size
    El = num_experts // W
    bad = ids_out_of_range(topk_ids, num_experts)
    if bad:
        topk_ids = topk_ids.clamp(0, num_experts - 1)
    lay = L.send_layout(topk_ids, El, W)
    status = status_row(lay.send_counts, x.shape[1], topk_ids.shape[1], x.dtype, bad)
    dest = torch.repeat_interleave(torch.arange(W, device=x.device), lay.send_counts)
    meta = L.local_meta(topk_ids, topk_weights, lay.send_token_idx, dest, El)
    send_x, scale = x[lay.send_token_idx], None
    if fp8:
        send_x, scale = L.quantize_fp8(send_x)
    return Packed(send_x, meta, scale, lay, status)


def unpack(packed: Packed, recv_x, recv_meta, recv_scale, *, rank: int, send_counts: list[int],
           recv_counts: list[int], num_experts: int, dtype, group_by_expert: bool = True, group=None):
    """What rank `rank` received (rows in source-rank order; recv_scale [R] fp32 or None) and what it sent
    (packed, send_counts) -> (DispatchOutput, EpHandle)."""
    if recv_scale is not None:
        recv_x = L.dequantize_fp8(recv_x, recv_scale, dtype)
    W, k = len(recv_counts), packed.meta.shape[1] // 2
    ids, weights, src_token = L.split_meta(recv_meta, k)
    src_rank = torch.repeat_interleave(torch.arange(W, dtype=torch.int32, device=recv_x.device),
                                       torch.tensor(recv_counts, device=recv_x.device))
    handle_kw = dict(backend="nccl", rank=rank, world_size=W, num_experts=num_experts,
                     num_tokens=packed.lay.rank_mask.shape[0], top_k=k, dtype=dtype, send_counts=send_counts,
                     recv_counts=recv_counts, send_token_idx=packed.lay.send_token_idx, dest_rows=None, group=group)
    return finish_dispatch(recv_x, ids, weights, src_rank, src_token, num_experts // W, group_by_expert, handle_kw)


def sum_partials(back: torch.Tensor, send_token_idx: torch.Tensor, send_counts: list[int], num_tokens: int,
                 dtype) -> torch.Tensor:
    """The source's sum: back [N, H] holds the partial of each sent row (send order); returns [M, H] dtype,
    the partials added per destination rank in rank order, in fp32."""
    out = torch.zeros(num_tokens, back.shape[1], dtype=torch.float32, device=back.device)
    start = 0
    for n in send_counts:  # rank order; indices are distinct within one rank's chunk
        out.index_add_(0, send_token_idx[start:start + n], back[start:start + n].float())
        start += n
    return out.to(dtype)


def _status_exchange(vec: torch.Tensor, group, W: int) -> torch.Tensor:
    """[W, len(vec)] int64: every rank's status vector."""
    if W == 1:
        return vec.unsqueeze(0)
    import torch.distributed as dist

    gathered = [torch.empty_like(vec) for _ in range(W)]
    dist.all_gather(gathered, vec, group=group)
    return torch.stack(gathered)


def _all_to_all_rows(x: torch.Tensor, send_counts: list[int], recv_counts: list[int], group, W: int):
    """all_to_all_single over dim 0, moving raw bytes so any dtype works on any backend."""
    if W == 1:
        return x.clone()
    import torch.distributed as dist

    src = x.contiguous().view(torch.uint8)  # [N, C] -> [N, C * itemsize]; x is always 2-D here
    out = src.new_empty(sum(recv_counts), src.shape[1])
    dist.all_to_all_single(out, src, output_split_sizes=recv_counts, input_split_sizes=send_counts, group=group)
    return out.view(x.dtype)


def _backend_is_nccl(group, W) -> bool:
    if W == 1:
        return False
    import torch.distributed as dist

    return dist.get_backend(group) == "nccl"


def nccl_dispatch(x, topk_ids, topk_weights, num_experts, rank, W, group, fp8, group_by_expert):
    """One rank of the portable path (arguments checked by moekern.ep.dispatch)."""
    p = pack(x, topk_ids, topk_weights, num_experts, W, fp8)
    comm_dev = x.device if _backend_is_nccl(group, W) else torch.device("cpu")
    all_status = _status_exchange(p.status.to(comm_dev), group, W).cpu()
    check_status(all_status, W, num_experts)
    send_counts = all_status[rank, :W].tolist()
    recv_counts = all_status[:, rank].tolist()
    recv_x = _all_to_all_rows(p.x, send_counts, recv_counts, group, W)
    recv_meta = _all_to_all_rows(p.meta, send_counts, recv_counts, group, W)
    recv_scale = None
    if fp8:
        recv_scale = _all_to_all_rows(p.scale.unsqueeze(1), send_counts, recv_counts, group, W).flatten()
    return unpack(p, recv_x, recv_meta, recv_scale, rank=rank, send_counts=send_counts, recv_counts=recv_counts,
                  num_experts=num_experts, dtype=x.dtype, group_by_expert=group_by_expert, group=group)


def nccl_combine(expert_output, handle: EpHandle, layout: str) -> torch.Tensor:
    partial = local_combine(expert_output, handle) if layout == "expert" else expert_output
    back = _all_to_all_rows(partial, handle.recv_counts, handle.send_counts, handle.group, handle.world_size)
    return sum_partials(back, handle.send_token_idx, handle.send_counts, handle.num_tokens, handle.dtype)
