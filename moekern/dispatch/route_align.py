"""moekern.route_and_align: routing and the blocked dispatch layout in one call (one launch at decode sizes).

Exactly `fused_topk(...)` followed by `align(topk_ids, E, block_size, expert_counts=...)` on the same inputs.
On the cuda backend it is ONE kernel launch (csrc/dispatch/route_align.cu): one block while M x L <= 1024 token
lanes (L = 32 lanes per token for E >= 32: M <= 32; L = 16 for E <= 16: M <= 64; L = 8 for E <= 8: M <= 128), which
routes every token, counts in shared memory and scatters the slots; above, a grid of up to 16 blocks that each
route 512 / L tokens and scatter their own chunk after a grid barrier (M <= 256 for E >= 32, M <= 1024 for E <= 8);
past that, the routing kernel then align's kernel. The torch and triton backends run fused_topk
and align on that backend."""

from __future__ import annotations

from typing import NamedTuple

import torch

from moekern._ext import extension_error, resolve_backend
from moekern.dispatch.reference import align_sizes
from moekern.routing.api import MAX_EXPERTS, MAX_TOPK, validate_routing_args

_EXT_ERROR = extension_error()

if _EXT_ERROR is None:
    try:
        torch.ops.moekern.route_and_align
    except (AttributeError, RuntimeError):  # a _C built before the op existed still imports
        _HAS_OP = False
    else:
        _HAS_OP = True

        @torch.library.register_fake("moekern::route_and_align")
        def _route_and_align_fake(logits, top_k, scoring, renormalize, bias, num_groups, topk_group, scale,
                                  block_size, two_kernels=False):
            M, E = logits.shape
            max_padded, max_blocks = align_sizes(M * top_k, E, block_size)
            i32 = dict(dtype=torch.int32)
            return (logits.new_empty((M, top_k), dtype=torch.float32), logits.new_empty((M, top_k), **i32),
                    logits.new_empty((E,), **i32), logits.new_empty((max_padded,), **i32),
                    logits.new_empty((max_blocks,), **i32), logits.new_empty((1,), **i32))
else:
    _HAS_OP = False


class RouteOutput(NamedTuple):
    """fused_topk's three outputs, then align's three (see moekern.align)."""

    topk_weights: torch.Tensor  # [M, k] fp32
    topk_ids: torch.Tensor  # [M, k] int32
    expert_counts: torch.Tensor  # [E] int32
    sorted_token_ids: torch.Tensor  # [M*k + min(M*k, E)*(B-1)] int32, sentinel M*k
    block_expert_ids: torch.Tensor  # [ceil(len(sorted_token_ids) / B)] int32, -1 past the used blocks
    num_tokens_post_padded: torch.Tensor  # [1] int32


def route_and_align(
    router_logits: torch.Tensor,
    top_k: int,
    *,
    block_size: int,
    scoring: str = "softmax",
    renormalize: bool = True,
    correction_bias: torch.Tensor | None = None,
    num_expert_group: int | None = None,
    topk_group: int | None = None,
    routed_scaling_factor: float = 1.0,
    backend: str = "auto",
) -> RouteOutput:
    """Route each token to its top_k experts and lay the (token, slot) pairs out by expert in blocks.

    router_logits: [M, E] fp32|fp16|bf16, M >= 0; top_k and the routing keywords: as moekern.fused_topk.
    block_size: B, a power of two >= 1 (the grouped GEMM's M tile; vLLM's moe_align_block_size block size).
    backend: "auto" | "torch" | "triton" | "cuda" (auto: cuda on a GPU when built, else triton on a GPU, else
      torch).

    Returns RouteOutput(topk_weights [M, k] fp32, topk_ids [M, k] int32, expert_counts [E] int32,
    sorted_token_ids, block_expert_ids, num_tokens_post_padded): the values of fused_topk followed by
    align(topk_ids, E, block_size, expert_counts=expert_counts), ids and layout exactly.
    """
    validate_routing_args(router_logits, top_k, scoring, correction_bias, num_expert_group, topk_group,
                          routed_scaling_factor)
    if isinstance(block_size, bool) or not isinstance(block_size, int):
        raise TypeError(f"block_size must be an int; got {type(block_size).__name__} {block_size!r}")
    if block_size < 1 or block_size & (block_size - 1):
        raise ValueError(f"block_size={block_size} must be a power of two >= 1")
    M, E = router_logits.shape
    max_padded, _ = align_sizes(M * top_k, E, block_size)
    if max_padded >= 2**31:
        raise ValueError(f"M*top_k + min(M*top_k, num_experts)*(block_size-1) = {max_padded} must be < 2^31")
    in_limits = E <= MAX_EXPERTS and top_k <= MAX_TOPK
    chosen = resolve_backend(backend, router_logits.device, cuda_ok=in_limits and _HAS_OP, triton_ok=in_limits)
    if chosen in ("cuda", "triton") and not in_limits:
        raise ValueError(f"backend={chosen!r} covers num_experts <= {MAX_EXPERTS} and top_k <= {MAX_TOPK}; got "
                         f"num_experts={E}, top_k={top_k} (use backend='torch')")
    if chosen == "cuda" and not _HAS_OP:
        raise RuntimeError("backend='cuda' needs a moekern._C built with route_and_align (rebuild: pip install -e .)")
    if chosen == "cuda" and M > 0:
        groups = 0 if num_expert_group in (None, 1) else num_expert_group  # one group of every expert: none
        out = torch.ops.moekern.route_and_align(
            router_logits.contiguous(), int(top_k), 0 if scoring == "softmax" else 1, bool(renormalize),
            correction_bias, int(groups), int(topk_group or 0) if groups else 0, float(routed_scaling_factor),
            int(block_size))
        return RouteOutput(*out)
    from moekern.dispatch.api import align
    from moekern.routing.api import fused_topk

    r = fused_topk(router_logits, top_k, scoring=scoring, renormalize=renormalize, correction_bias=correction_bias,
                   num_expert_group=num_expert_group, topk_group=topk_group,
                   routed_scaling_factor=routed_scaling_factor, backend=chosen)
    a = align(r.topk_ids, E, block_size, expert_counts=r.expert_counts, backend=chosen, check_ids=False)
    return RouteOutput(*r, *a)
