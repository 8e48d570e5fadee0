"""What both expert-parallel backends share: the types dispatch returns, the checks, and the grouping.

Imports run one way: api (the facade that picks a backend) -> nccl, peer, lowlat -> common -> layout and
moekern.dispatch. Nothing here imports a backend.

Grouping by local expert is moekern.dispatch's permute layout (EpHandle.grouping) with one extra expert: a
received slot whose expert lives on another rank (local id -1) is sorted into expert El, after the real
ones. So expert_offsets[:El+1] are the local experts' row ranges, the first S = expert_offsets[El] rows
are the ones a rank computes (DispatchOutput.expert_x), and combine is moekern.dispatch.unpermute with
skip_missing_rows=True: the other ranks' slots have no row and add nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moekern._checks import check_topk_pair
from moekern.dispatch import PermuteLayout, permute, unpermute

HIDDEN_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
DTYPE_CODE = {torch.bfloat16: 1, torch.float16: 2, torch.float32: 3}  # the dtype's entry in the status row


@dataclass
class DispatchOutput:
    """What one rank receives.

    recv_x: [R, H] hidden_states' dtype (dequantized when fp8=True), received tokens, source rank
      ascending, source token ascending within a source.
    recv_topk_ids: [R, k] int32, local expert ids in [0, El), -1 where that expert is on another rank.
    recv_topk_weights: [R, k] fp32, the router weights, 0.0 where the id is -1. Feed these two to
      moekern.fused_moe(recv_x, w13_local, w2_local, topk_weights=..., topk_ids=...) if it accepts -1,
      or use the grouping below.
    recv_src_rank, recv_src_token: [R] int32, where each received token came from.
    expert_x: [S, H] received tokens repeated once per local expert, grouped by local expert (None when
      dispatch(..., group_by_expert=False)); S = expert_offsets[-1].
    expert_offsets: [El+1] int32; expert_counts: [El] int32.
    """

    recv_x: torch.Tensor
    recv_topk_ids: torch.Tensor
    recv_topk_weights: torch.Tensor
    recv_src_rank: torch.Tensor
    recv_src_token: torch.Tensor
    expert_x: torch.Tensor | None
    expert_offsets: torch.Tensor
    expert_counts: torch.Tensor


@dataclass
class EpHandle:
    """Everything combine needs; opaque to callers."""

    backend: str
    rank: int
    world_size: int
    num_experts: int
    num_tokens: int
    top_k: int
    dtype: torch.dtype
    send_counts: list[int]
    recv_counts: list[int]
    send_token_idx: torch.Tensor  # [N] int64
    dest_rows: torch.Tensor | None  # [M, W] int32 (peer path)
    grouping: PermuteLayout  # received slots grouped by local expert, other ranks' slots last (see above)
    expert_rows: int  # S: rows of expert_x, the rows combine(layout="expert") takes
    recv_topk_weights: torch.Tensor
    hidden: int
    group: object = None
    world: object = None  # PeerWorld for the peer path


# ----------------------------------------------------------------------------------------------- checks


def check_int(name, value, low):
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int; got {type(value).__name__} {value!r}")
    if value < low:
        raise ValueError(f"{name}={value} must be >= {low}")


def describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"tensor of shape {tuple(x.shape)} {x.dtype}"
    return type(x).__name__


def validate_dispatch_args(hidden_states, topk_ids, topk_weights, num_experts, world_size) -> None:
    """Structural checks, identical on every rank for a correct program; raise before any communication."""
    if not isinstance(hidden_states, torch.Tensor) or hidden_states.dim() != 2:
        raise ValueError(f"hidden_states must be a 2-D tensor [M, H]; got {describe(hidden_states)}")
    if hidden_states.dtype not in HIDDEN_DTYPES:
        raise TypeError(f"hidden_states must be bfloat16, float16 or float32; got {hidden_states.dtype}")
    check_topk_pair(topk_ids, topk_weights, hidden_states.shape[0])
    for name, t in (("topk_ids", topk_ids), ("topk_weights", topk_weights)):
        if t.device != hidden_states.device:
            raise ValueError(f"{name} is on {t.device} but hidden_states is on {hidden_states.device}")
    check_int("num_experts", num_experts, 1)
    if num_experts % world_size:
        raise ValueError(f"num_experts={num_experts} must be divisible by the world size W={world_size}")


def validate_combine_args(expert_output, handle, layout) -> None:
    if layout not in ("expert", "token"):
        raise ValueError(f"layout={layout!r} must be 'expert' or 'token'")
    if not isinstance(handle, EpHandle):
        raise TypeError(f"handle must be the EpHandle dispatch returned; got {type(handle).__name__}")
    R = handle.recv_topk_weights.shape[0]
    rows = handle.expert_rows if layout == "expert" else R
    if not isinstance(expert_output, torch.Tensor) or expert_output.dim() != 2 or expert_output.shape[0] != rows:
        raise ValueError(f"expert_output must be [{rows}, H] for layout={layout!r}; got {describe(expert_output)}")
    H = handle.hidden
    if expert_output.shape[1] != H:
        raise ValueError(f"expert_output must have H={H} columns; got {expert_output.shape[1]}")
    if expert_output.dtype != handle.dtype:
        raise TypeError(f"expert_output must be {handle.dtype} (hidden_states' dtype); got {expert_output.dtype}")


def ids_out_of_range(topk_ids: torch.Tensor, num_experts: int) -> bool:
    if topk_ids.numel() == 0:
        return False
    return bool(((topk_ids < 0) | (topk_ids >= num_experts)).any())


def group_info(group) -> tuple[int, int]:
    """(rank, world size) of group; (0, 1) when torch.distributed is not initialized."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        if group is not None:
            raise ValueError("group was given but torch.distributed is not initialized")
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def status_row(send_counts: torch.Tensor, hidden: int, top_k: int, dtype: torch.dtype, bad: bool) -> torch.Tensor:
    """[W + 4] int64 on the CPU: tokens for each rank, H, k, dtype code, bad-ids flag (what ranks exchange)."""
    return torch.cat([send_counts.cpu(), torch.tensor([hidden, top_k, DTYPE_CODE[dtype], int(bad)])]).to(torch.int64)


def check_status(status: torch.Tensor, W: int, num_experts: int) -> None:
    """Raise the same error on every rank when any rank's inputs were bad or mismatched."""
    bad = torch.nonzero(status[:, W + 3]).flatten().tolist()
    if bad:
        raise ValueError(f"topk_ids on rank(s) {bad} are out of range [0, num_experts={num_experts})")
    for col, name in ((W, "H (hidden size)"), (W + 1, "k (top_k)"), (W + 2, "hidden_states dtype")):
        if len(set(status[:, col].tolist())) > 1:
            raise ValueError(f"ranks disagree on {name}: {status[:, col].tolist()}")


# ---------------------------------------------------------------------------------------------- grouping


def group_by_local_expert(recv_topk_ids: torch.Tensor, experts_per_rank: int) -> PermuteLayout:
    """recv_topk_ids [R, k] int32 (local ids, -1 off-rank) -> PermuteLayout over El + 1 experts, the last
    holding the off-rank slots (see the module docstring). Only the layout is computed: no rows move."""
    El = experts_per_rank
    keys = torch.where(recv_topk_ids < 0, torch.full_like(recv_topk_ids, El), recv_topk_ids)
    no_rows = torch.empty(keys.shape[0], 0, dtype=torch.float32, device=keys.device)
    _, layout = permute(no_rows, keys, El + 1, check_ids=False)
    return layout


def finish_dispatch(recv_x, ids, weights, src_rank, src_token, El, group_by_expert, handle_kw):
    """Group the received rows by local expert; returns (DispatchOutput, EpHandle)."""
    layout = group_by_local_expert(ids, El)
    k = ids.shape[1]
    offsets = layout.expert_offsets[:El + 1]
    rows = int(offsets[-1])
    expert_x = recv_x[torch.div(layout.sorted_slots[:rows].long(), k, rounding_mode="floor")] if group_by_expert else None
    counts = (offsets[1:] - offsets[:-1]).to(torch.int32)
    out = DispatchOutput(recv_x, ids, weights, src_rank, src_token, expert_x, offsets, counts)
    handle = EpHandle(grouping=layout, expert_rows=rows, recv_topk_weights=weights, hidden=recv_x.shape[1],
                      **handle_kw)
    return out, handle


def local_combine(expert_output: torch.Tensor, handle: EpHandle) -> torch.Tensor:
    """[R, H] expert_output's dtype: each received token's local experts' rows, weighted and summed in fp32
    (j ascending), rounded once (moekern.dispatch.unpermute; the off-rank slots add nothing)."""
    return unpermute(expert_output, handle.grouping, handle.recv_topk_weights, skip_missing_rows=True)
