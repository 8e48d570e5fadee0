"""moekern.fused_topk: argument checks, backend choice, and the RoutingOutput it returns."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from moekern._ext import resolve_backend
from moekern.routing.reference import SCORINGS, fused_topk_reference

MAX_EXPERTS = 512  # device kernels keep a row's scores in registers/shared memory
MAX_TOPK = 16
LOGIT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class RoutingOutput(NamedTuple):
    """topk_weights: [M, k] fp32; topk_ids: [M, k] int32; expert_counts: [E] int32 (the step's gate log)."""

    topk_weights: torch.Tensor
    topk_ids: torch.Tensor
    expert_counts: torch.Tensor


def _check_int(name: str, value, low: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int; got {type(value).__name__} {value!r}")
    if low is not None and value < low:
        raise ValueError(f"{name}={value} must be >= {low}")
    return value


def validate_routing_args(
    router_logits, top_k, scoring, correction_bias, num_expert_group, topk_group, routed_scaling_factor
) -> None:
    """Raise TypeError/ValueError naming the argument, what was expected and what came."""
    if not isinstance(router_logits, torch.Tensor):
        raise TypeError(f"router_logits must be a torch.Tensor [M, E]; got {type(router_logits).__name__}")
    if router_logits.dim() != 2:
        raise ValueError(f"router_logits must be 2-D [M, E]; got shape {tuple(router_logits.shape)}")
    if router_logits.dtype not in LOGIT_DTYPES:
        raise TypeError(f"router_logits must be float32, float16 or bfloat16; got {router_logits.dtype}")
    E = router_logits.shape[1]
    if E < 1:
        raise ValueError(f"router_logits must have at least one expert column; got shape {tuple(router_logits.shape)}")
    if not isinstance(scoring, str) or scoring not in SCORINGS:
        raise ValueError(f"scoring={scoring!r} must be one of {SCORINGS}")
    _check_int("top_k", top_k, 1)
    if top_k > E:
        raise ValueError(f"top_k={top_k} must be <= num_experts={E}")
    if (num_expert_group is None) != (topk_group is None):
        raise ValueError(
            f"num_expert_group and topk_group go together; got num_expert_group={num_expert_group}, topk_group={topk_group}"
        )
    if num_expert_group is not None:
        _check_int("num_expert_group", num_expert_group, 1)
        _check_int("topk_group", topk_group, 1)
        if E % num_expert_group:
            raise ValueError(f"num_expert_group={num_expert_group} must divide num_experts={E}")
        if topk_group > num_expert_group:
            raise ValueError(f"topk_group={topk_group} must be <= num_expert_group={num_expert_group}")
        selectable = topk_group * (E // num_expert_group)
        if top_k > selectable:
            raise ValueError(
                f"top_k={top_k} must be <= the {selectable} selectable experts "
                f"(topk_group={topk_group} groups x {E // num_expert_group} experts)"
            )
    if correction_bias is not None:
        if scoring != "sigmoid":
            raise ValueError(f"correction_bias is defined for scoring='sigmoid' only; got scoring={scoring!r}")
        if not isinstance(correction_bias, torch.Tensor):
            raise TypeError(f"correction_bias must be a torch.Tensor [E]; got {type(correction_bias).__name__}")
        if tuple(correction_bias.shape) != (E,):
            raise ValueError(f"correction_bias must have shape ({E},); got {tuple(correction_bias.shape)}")
        if correction_bias.dtype != torch.float32:
            raise TypeError(f"correction_bias must be float32; got {correction_bias.dtype}")
        if correction_bias.device != router_logits.device:
            raise ValueError(
                f"correction_bias is on {correction_bias.device} but router_logits is on {router_logits.device}"
            )
    if isinstance(routed_scaling_factor, bool) or not isinstance(routed_scaling_factor, (int, float)):
        raise TypeError(f"routed_scaling_factor must be a float; got {type(routed_scaling_factor).__name__}")
    if not math.isfinite(routed_scaling_factor):
        raise ValueError(f"routed_scaling_factor={routed_scaling_factor} must be finite")


def fused_topk(
    router_logits: torch.Tensor,
    top_k: int,
    *,
    scoring: str = "softmax",
    renormalize: bool = True,
    correction_bias: torch.Tensor | None = None,
    num_expert_group: int | None = None,
    topk_group: int | None = None,
    routed_scaling_factor: float = 1.0,
    backend: str = "auto",
) -> RoutingOutput:
    """Route each token to its top_k experts and count tokens per expert, in one kernel.

    router_logits: [M, E] fp32|fp16|bf16, any M >= 0. Scores are computed in fp32.
    scoring="softmax": p = softmax(logits); the k largest p in descending order (ties -> lower expert
      index); weights = p[ids].
    scoring="sigmoid": s = sigmoid(logits); selection score s + correction_bias ([E] fp32, optional);
      weights = s[ids] (bias not included).
    num_expert_group=G, topk_group=g (DeepSeek-V3): group score = sum of the group's two largest
      selection scores (the largest alone if E/G == 1); only experts of the g best groups are chosen.
    renormalize divides each row's weights by their sum (a zero or NaN sum leaves the row as it is);
      then weights are multiplied by routed_scaling_factor.
    NaN policy, the same on every backend (tests/test_routing_nan.py): a NaN score ranks as -inf (below
      every number, tied with -inf, ties to the lower index), so ids are always distinct, in [0, E), and
      finite experts are chosen first; NaN is never hidden in the weights, so a broken router shows in the
      layer's output. Softmax: a row with a NaN (or +inf: exp(inf - inf)) logit has NaN probabilities, so
      all k weights of that row are NaN, its ids the best of its other logits; other rows are untouched.
      Grouped softmax: such a row's group scores are all NaN, so groups tie and the lowest are kept.
      Sigmoid: only a chosen NaN expert's weight is NaN; renormalize leaves a row whose weight sum is NaN
      (or 0) as it is. A NaN correction_bias entry ranks its expert as -inf; its weight stays sigmoid(logit).
    backend: "torch" (reference), "triton" (one fused Triton kernel), "cuda" (moekern._C, one launch),
      "auto" (cuda on a GPU when built, else triton on a GPU, else torch).

    Returns RoutingOutput(topk_weights [M, k] fp32, topk_ids [M, k] int32, expert_counts [E] int32), where
    expert_counts[e] is the number of (token, slot) pairs routed to expert e.
    """
    validate_routing_args(
        router_logits, top_k, scoring, correction_bias, num_expert_group, topk_group, routed_scaling_factor
    )
    M, E = router_logits.shape
    in_kernel_limits = E <= MAX_EXPERTS and top_k <= MAX_TOPK
    chosen = resolve_backend(backend, router_logits.device, cuda_ok=in_kernel_limits, triton_ok=in_kernel_limits)
    if chosen in ("cuda", "triton") and not in_kernel_limits:
        raise ValueError(
            f"backend={chosen!r} covers num_experts <= {MAX_EXPERTS} and top_k <= {MAX_TOPK}; "
            f"got num_experts={E}, top_k={top_k} (use backend='torch')"
        )
    if num_expert_group == 1:
        num_expert_group = topk_group = None  # one group holding every expert is no grouping
    scale = float(routed_scaling_factor)
    if M == 0:
        dev = router_logits.device
        return RoutingOutput(
            torch.empty(0, top_k, dtype=torch.float32, device=dev),
            torch.empty(0, top_k, dtype=torch.int32, device=dev),
            torch.zeros(E, dtype=torch.int32, device=dev),
        )
    if chosen == "torch":
        out = fused_topk_reference(
            router_logits, top_k, scoring=scoring, renormalize=renormalize, correction_bias=correction_bias,
            num_expert_group=num_expert_group, topk_group=topk_group, routed_scaling_factor=scale,
        )
    elif chosen == "triton":
        from moekern.routing.triton_topk import fused_topk_triton

        out = fused_topk_triton(
            router_logits.contiguous(), top_k, scoring, renormalize, correction_bias,
            num_expert_group or 0, topk_group or 0, scale,
        )
    else:
        from moekern.routing.cuda_topk import fused_topk_cuda

        out = fused_topk_cuda(
            router_logits.contiguous(), top_k, scoring, renormalize, correction_bias,
            num_expert_group or 0, topk_group or 0, scale,
        )
    return RoutingOutput(*out)
