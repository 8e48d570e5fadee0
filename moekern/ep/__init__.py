"""moekern.ep: expert-parallel dispatch/combine over W ranks (E/W contiguous experts per rank).

    out, handle = moekern.ep.dispatch(x, topk_ids, topk_weights, num_experts, group=pg)   # backend="nccl"
    y = my_experts(out.expert_x, out.expert_offsets)       # [S, H], rows grouped by local expert
    x_out = moekern.ep.combine(y, handle)                   # [M, H] back on the source rank

Two backends behind one interface: "nccl" (torch.distributed all_to_all_single; gloo on CPU works too)
and "peer" (Triton kernels storing into peers' receive buffers through a table of base addresses; torch
symmetric memory on a node, PeerWorld.emulated + dispatch_emulated/combine_emulated on one device).
The received layout and the combine rounding are stated in DispatchOutput, combine and ep.reference.
Received rows are grouped by local expert with moekern.dispatch.permute's layout, and combine's local
reduce is moekern.dispatch.unpermute (moekern/ep/common.py). Imports run one way: api (the facade) ->
nccl / peer / lowlat -> common -> layout.
Decode: dispatch_ll/combine_ll (+ _emulated) on an LLWorld use a fixed receive layout [El, W*cap, H] with
in-band device counts: no host sync, CUDA-graph capturable (moekern/ep/lowlat.py).
"""

from moekern.ep.api import DispatchOutput, EpHandle, combine, dispatch
from moekern.ep.reference import combine_reference, dispatch_reference


# The low-latency (decode) mode: fixed receive layout, no host sync, CUDA-graph capturable (ep/lowlat.py).
_LOWLAT = ("LLWorld", "LLDispatchOutput", "LLHandle", "dispatch_ll", "combine_ll", "dispatch_ll_emulated",
           "combine_ll_emulated")


def __getattr__(name):
    # The peer path imports Triton; load it on first use.
    if name in ("PeerWorld", "dispatch_emulated", "combine_emulated"):
        from moekern.ep import peer

        return getattr(peer, name)
    if name in _LOWLAT:
        from moekern.ep import lowlat

        return getattr(lowlat, name)
    raise AttributeError(f"module 'moekern.ep' has no attribute {name!r}")


__all__ = ["DispatchOutput", "EpHandle", "combine", "dispatch", "combine_reference", "dispatch_reference",
           "PeerWorld", "dispatch_emulated", "combine_emulated", *_LOWLAT]
