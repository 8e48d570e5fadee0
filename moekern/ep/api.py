"""moekern.ep.dispatch / combine: argument checks, the portable all-to-all path, and the peer path's entry.

Portable path ("nccl"), per rank, three all-to-alls in all:
  1. status exchange: an all_gather of [W + 4] int64 per rank (tokens for each rank, H, k, dtype code,
     bad-ids flag). Every rank then knows the whole counts matrix (receive sizes) and whether any rank's
     input was bad, so a data error raises on every rank instead of leaving peers blocked in a collective.
  2. payload: all_to_all_single of the tokens (raw bytes, so gloo needs no bf16/fp8 support) and of one
     int32 metadata row per token (local ids, weights, source token), plus fp8 scales when asked.
  3. combine: the receiver reduces its local experts (fp32), casts to the payload dtype, and an
     all_to_all_single sends each partial row back; the source adds them per rank in rank order (fp32).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from moekern._checks import check_topk_pair
from moekern.ep import layout as L

HIDDEN_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
BACKENDS = ("auto", "nccl", "peer")
_DTYPE_CODE = {torch.bfloat16: 1, torch.float16: 2, torch.float32: 3}


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
    grouping: L.ExpertGrouping
    recv_topk_weights: torch.Tensor
    group: object = None
    world: object = None  # PeerWorld for the peer path
    extras: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------- checks


def _check_int(name, value, low):
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int; got {type(value).__name__} {value!r}")
    if value < low:
        raise ValueError(f"{name}={value} must be >= {low}")


def validate_dispatch_args(hidden_states, topk_ids, topk_weights, num_experts, world_size) -> None:
    """Structural checks, identical on every rank for a correct program; raise before any communication."""
    if not isinstance(hidden_states, torch.Tensor) or hidden_states.dim() != 2:
        raise ValueError(f"hidden_states must be a 2-D tensor [M, H]; got {_desc(hidden_states)}")
    if hidden_states.dtype not in HIDDEN_DTYPES:
        raise TypeError(f"hidden_states must be bfloat16, float16 or float32; got {hidden_states.dtype}")
    check_topk_pair(topk_ids, topk_weights, hidden_states.shape[0])
    for name, t in (("topk_ids", topk_ids), ("topk_weights", topk_weights)):
        if t.device != hidden_states.device:
            raise ValueError(f"{name} is on {t.device} but hidden_states is on {hidden_states.device}")
    _check_int("num_experts", num_experts, 1)
    if num_experts % world_size:
        raise ValueError(f"num_experts={num_experts} must be divisible by the world size W={world_size}")


def ids_out_of_range(topk_ids: torch.Tensor, num_experts: int) -> bool:
    if topk_ids.numel() == 0:
        return False
    return bool(((topk_ids < 0) | (topk_ids >= num_experts)).any())


def _desc(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"tensor of shape {tuple(x.shape)} {x.dtype}"
    return type(x).__name__


def _group_info(group):
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        if group is not None:
            raise ValueError("group was given but torch.distributed is not initialized")
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def _check_backend(backend, group, device, world) -> str:
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} must be one of {BACKENDS}")
    if backend == "auto":
        backend = "peer" if world is not None else "nccl"
    if backend == "peer":
        import torch.distributed as dist

        if world is None:
            raise ValueError("backend='peer' needs world=PeerWorld.symmetric(group, ...) (its receive buffers)")
        if device.type != "cuda":
            raise ValueError(f"backend='peer' needs CUDA tensors; got device={device}")
        if dist.is_initialized() and dist.get_world_size(group) > 1:
            got = dist.get_backend(group)
            if got != "nccl":
                raise ValueError(f"backend='peer' needs an NCCL process group (GPU peers); got a {got!r} group")
    return backend


# --------------------------------------------------------------------------------------------- public


def dispatch(
    hidden_states: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    num_experts: int,
    *,
    group=None,
    backend: str = "auto",
    fp8: bool = False,
    group_by_expert: bool = True,
    world=None,
) -> tuple[DispatchOutput, EpHandle]:
    """Send each token once to every rank owning one of its experts; group what arrives by local expert.

    hidden_states: [M, H] bf16|fp16|fp32 (M may differ between ranks, 0 included).
    topk_ids: [M, k] int32|int64 global expert ids in [0, num_experts).
    topk_weights: [M, k] float (used in fp32).
    num_experts: E, divisible by the group's size W; rank r owns experts [r*E/W, (r+1)*E/W).
    group: a torch.distributed process group (None: the default group; no group initialized: W = 1).
    backend: "nccl" (portable all_to_all_single; gloo works on CPU), "peer" (Triton kernels writing into
      peers' buffers; needs world=PeerWorld.symmetric(...)), "auto" ("peer" when world is given).
    fp8: send an e4m3 payload with one fp32 scale per token; recv_x is dequantized to hidden_states.dtype.
    Returns (DispatchOutput, EpHandle); the handle goes to combine.
    """
    rank, W = _group_info(group)
    validate_dispatch_args(hidden_states, topk_ids, topk_weights, num_experts, W)
    chosen = _check_backend(backend, group, hidden_states.device, world)
    if chosen == "peer":
        from moekern.ep.peer import peer_dispatch

        return peer_dispatch(world, hidden_states, topk_ids, topk_weights, num_experts, fp8=fp8,
                             group_by_expert=group_by_expert, group=group)
    return _nccl_dispatch(hidden_states, topk_ids, topk_weights, num_experts, rank, W, group, fp8, group_by_expert)


def combine(expert_output: torch.Tensor, handle: EpHandle, *, layout: str = "expert") -> torch.Tensor:
    """Return [M, H] on the source rank: each token's expert outputs weighted and summed.

    layout="expert": expert_output [S, H] holds one row per row of DispatchOutput.expert_x (unweighted
      expert results); combine applies recv_topk_weights.
    layout="token": expert_output [R, H] holds one row per received token, already weighted and summed over
      that rank's experts (e.g. fused_moe(recv_x, ..., recv_topk_weights, recv_topk_ids)).
    Accumulation is fp32: each rank's partial is rounded once to the payload dtype before it travels; the
    source sums partials in rank order in fp32 and returns hidden_states' dtype.
    """
    validate_combine_args(expert_output, handle, layout)
    if handle.backend == "peer":
        from moekern.ep.peer import peer_combine

        return peer_combine(expert_output, handle, layout=layout)
    return _nccl_combine(expert_output, handle, layout)


def validate_combine_args(expert_output, handle, layout) -> None:
    if layout not in ("expert", "token"):
        raise ValueError(f"layout={layout!r} must be 'expert' or 'token'")
    if not isinstance(handle, EpHandle):
        raise TypeError(f"handle must be the EpHandle dispatch returned; got {type(handle).__name__}")
    R = handle.recv_topk_weights.shape[0]
    rows = int(handle.grouping.expert_offsets[-1]) if layout == "expert" else R
    if not isinstance(expert_output, torch.Tensor) or expert_output.dim() != 2 or expert_output.shape[0] != rows:
        raise ValueError(f"expert_output must be [{rows}, H] for layout={layout!r}; got {_desc(expert_output)}")
    H = handle.extras["hidden"]
    if expert_output.shape[1] != H:
        raise ValueError(f"expert_output must have H={H} columns; got {expert_output.shape[1]}")
    if expert_output.dtype != handle.dtype:
        raise TypeError(f"expert_output must be {handle.dtype} (hidden_states' dtype); got {expert_output.dtype}")


# ------------------------------------------------------------------------------------------ nccl path


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


def check_status(status: torch.Tensor, W: int, num_experts: int) -> None:
    """Raise the same error on every rank when any rank's inputs were bad or mismatched."""
    bad = torch.nonzero(status[:, W + 3]).flatten().tolist()
    if bad:
        raise ValueError(f"topk_ids on rank(s) {bad} are out of range [0, num_experts={num_experts})")
    for col, name in ((W, "H (hidden size)"), (W + 1, "k (top_k)"), (W + 2, "hidden_states dtype")):
        if len(set(status[:, col].tolist())) > 1:
            raise ValueError(f"ranks disagree on {name}: {status[:, col].tolist()}")


def _nccl_dispatch(x, topk_ids, topk_weights, num_experts, rank, W, group, fp8, group_by_expert):
    M, H = x.shape
    k = topk_ids.shape[1]
    El = num_experts // W
    bad = ids_out_of_range(topk_ids, num_experts)
    if bad:  # keep the layout valid; the status exchange makes every rank raise
        topk_ids = topk_ids.clamp(0, num_experts - 1)
    lay = L.send_layout(topk_ids, El, W)
    status = torch.cat([
        lay.send_counts.cpu(),
        torch.tensor([H, k, _DTYPE_CODE[x.dtype], int(bad)]),
    ]).to(torch.int64)
    comm_dev = x.device if _backend_is_nccl(group, W) else torch.device("cpu")
    all_status = _status_exchange(status.to(comm_dev), group, W).cpu()
    check_status(all_status, W, num_experts)
    send_counts = all_status[rank, :W].tolist()
    recv_counts = all_status[:, rank].tolist()

    dest = torch.repeat_interleave(torch.arange(W, device=x.device), lay.send_counts)
    meta = L.local_meta(topk_ids, topk_weights, lay.send_token_idx, dest, El)
    send_x = x[lay.send_token_idx]
    if fp8:
        send_x, send_scale = L.quantize_fp8(send_x)
    recv_x = _all_to_all_rows(send_x, send_counts, recv_counts, group, W)
    recv_meta = _all_to_all_rows(meta, send_counts, recv_counts, group, W)
    if fp8:
        recv_scale = _all_to_all_rows(send_scale.unsqueeze(1), send_counts, recv_counts, group, W).flatten()
        recv_x = L.dequantize_fp8(recv_x, recv_scale, x.dtype)
    ids, weights, src_token = L.split_meta(recv_meta, k)
    src_rank = torch.repeat_interleave(
        torch.arange(W, dtype=torch.int32, device=x.device), torch.tensor(recv_counts, device=x.device))
    return _finish_dispatch(
        recv_x, ids, weights, src_rank, src_token, El, group_by_expert,
        dict(backend="nccl", rank=rank, world_size=W, num_experts=num_experts, num_tokens=M, top_k=k,
             dtype=x.dtype, send_counts=send_counts, recv_counts=recv_counts, send_token_idx=lay.send_token_idx,
             dest_rows=None, group=group),
        H,
    )


def _finish_dispatch(recv_x, ids, weights, src_rank, src_token, El, group_by_expert, handle_kw, H):
    grouping = L.group_by_local_expert(ids, El)
    k = ids.shape[1]
    expert_x = recv_x[torch.div(grouping.sorted_slots, k, rounding_mode="floor")] if group_by_expert else None
    counts = (grouping.expert_offsets[1:] - grouping.expert_offsets[:-1]).to(torch.int32)
    out = DispatchOutput(recv_x, ids, weights, src_rank, src_token, expert_x, grouping.expert_offsets, counts)
    handle = EpHandle(grouping=grouping, recv_topk_weights=weights, extras={"hidden": H}, **handle_kw)
    return out, handle


def _backend_is_nccl(group, W) -> bool:
    if W == 1:
        return False
    import torch.distributed as dist

    return dist.get_backend(group) == "nccl"


def _nccl_combine(expert_output, handle: EpHandle, layout: str) -> torch.Tensor:
    dev = expert_output.device
    H = expert_output.shape[1]
    if layout == "expert":
        partial = L.local_reduce(expert_output, handle.grouping.slot_to_row, handle.recv_topk_weights)
        partial = partial.to(handle.dtype)
    else:
        partial = expert_output
    back = _all_to_all_rows(partial, handle.recv_counts, handle.send_counts, handle.group, handle.world_size)
    out = torch.zeros(handle.num_tokens, H, dtype=torch.float32, device=dev)
    start = 0
    for n in handle.send_counts:  # rank order; indices are distinct within one rank's chunk
        idx = handle.send_token_idx[start:start + n]
        out.index_add_(0, idx, back[start:start + n].float())
        start += n
    return out.to(handle.dtype)
