"""moekern.ep.dispatch / combine: the facade. Checks the arguments, picks the backend, calls it.

Backends: "nccl" (moekern/ep/nccl.py: torch.distributed all_to_all_single, gloo on CPU too) and "peer"
(moekern/ep/peer.py: Triton kernels storing into peers' symmetric-memory buffers). What both share (the
returned types, the checks, grouping by local expert) is moekern/ep/common.py; imports run one way, from
here to the backends to common.
"""

from __future__ import annotations

import torch

from moekern.ep.common import (
    DispatchOutput, EpHandle, group_info, validate_combine_args, validate_dispatch_args,
)
from moekern.ep.nccl import nccl_combine, nccl_dispatch

BACKENDS = ("auto", "nccl", "peer")


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
    rank, W = group_info(group)
    validate_dispatch_args(hidden_states, topk_ids, topk_weights, num_experts, W)
    chosen = _check_backend(backend, group, hidden_states.device, world)
    if chosen == "peer":
        from moekern.ep.peer import peer_dispatch  # Triton: loaded on first use

        return peer_dispatch(world, hidden_states, topk_ids, topk_weights, num_experts, fp8=fp8,
                             group_by_expert=group_by_expert, group=group)
    return nccl_dispatch(hidden_states, topk_ids, topk_weights, num_experts, rank, W, group, fp8, group_by_expert)


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
    return nccl_combine(expert_output, handle, layout)
