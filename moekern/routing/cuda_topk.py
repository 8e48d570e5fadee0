"""The cuda backend of moekern.fused_topk: torch.ops.moekern.fused_topk (csrc/routing/fused_topk.cu).

One kernel launch per call at every M, no memset (csrc/routing/NOTES.md has the design; the v1 fallback and the
"legacy" and "redux_atomic" variants below add one). Importing this
module registers the op's fake implementation, so the op traces under torch.compile and CUDA-graph
capture. moekern.fused_topk validates the arguments; the op re-checks the ones a kernel relies on.

Concurrency: the multi-block path keeps a per-(device, stream) accumulator slot in device memory. Calls
that can run at the same time must be issued (or captured into a CUDA graph) on different streams; two
graphs captured on one stream must not be replayed concurrently.

`variant` (internal, for tests and benchmarks/routing_variants.py) forces a kernel path: "auto" (what
moekern.fused_topk uses: the reduction-selection kernel, csrc/routing/redux_topk.cuh, where its group geometry
fits and it measured faster on an H100, else the compact kernel; the table is in csrc/routing/fused_topk.cu), "redux" / "redux_single" / "redux_multi" (the reduction-selection kernel with its
own grid choice, or forced to one block / to the ticket grid), "redux_atomic" (its grid with a memset of the counts
and global atomics in place of the ticket), "compact" (the compact kernel: one block while
M x team lanes <= 256, else the multi-block grid), "single_block" / "multi_block" (the compact kernel forced to
one grid), "legacy" (the v1 kernel: memset + one warp per token). csrc/routing/NOTES.md has the measurements.
"""

from __future__ import annotations

import torch

from moekern._ext import extension_error, has_op
from moekern.routing.reference import empty_routing_outputs

SCORING_CODES = {"softmax": 0, "sigmoid": 1}
VARIANT_CODES = {"auto": 0, "legacy": 1, "single_block": 2, "multi_block": 3, "compact": 4, "redux": 5,
                 "redux_single": 6, "redux_multi": 7, "redux_atomic": 8}

# Checked once at import: the wrappers then read a constant, which torch.compile traces through.
_EXT_ERROR = extension_error()

if _EXT_ERROR is None:

    @torch.library.register_fake("moekern::fused_topk")
    def _fused_topk_fake(logits, top_k, scoring, renormalize, bias, num_groups, topk_group, scale):
        return empty_routing_outputs(logits, top_k)

    if has_op("fused_topk_variant"):

        @torch.library.register_fake("moekern::fused_topk_variant")
        def _fused_topk_variant_fake(logits, top_k, scoring, renormalize, bias, num_groups, topk_group, scale,
                                     variant):
            return _fused_topk_fake(logits, top_k, scoring, renormalize, bias, num_groups, topk_group, scale)


def fused_topk_cuda(
    logits: torch.Tensor,
    top_k: int,
    scoring: str,
    renormalize: bool,
    bias: torch.Tensor | None,
    num_groups: int,
    topk_group: int,
    scale: float,
    variant: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits: [M, E] fp32|fp16|bf16 CUDA, E <= 512, top_k <= 16; bias: [E] fp32 (sigmoid only) or None;
    num_groups: 0 (or 1) for no grouped selection, else G dividing E with topk_group in [1, G].

    Returns (topk_weights [M, k] fp32, topk_ids [M, k] int32, expert_counts [E] int32), the semantics of
    moekern.routing.reference.fused_topk_reference (ids and counts exactly). variant: see the module
    docstring ("auto" unless comparing kernel paths).
    """
    if _EXT_ERROR is not None:
        raise RuntimeError(f"fused_topk_cuda needs moekern._C: {_EXT_ERROR}")
    if scoring not in SCORING_CODES:
        raise ValueError(f"scoring={scoring!r} must be one of {tuple(SCORING_CODES)}")
    if variant not in VARIANT_CODES:
        raise ValueError(f"variant={variant!r} must be one of {tuple(VARIANT_CODES)}")
    args = (logits, int(top_k), SCORING_CODES[scoring], bool(renormalize), bias, int(num_groups or 0),
            int(topk_group or 0), float(scale))
    if variant == "auto":
        return torch.ops.moekern.fused_topk(*args)
    return torch.ops.moekern.fused_topk_variant(*args, VARIANT_CODES[variant])
