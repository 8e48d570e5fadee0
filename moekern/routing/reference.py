"""Plain-PyTorch reference for fused top-k routing: slow, obvious, and the judge of every backend.

Selection order everywhere in moekern: larger score first; equal scores go to the lower expert index;
NaN ranks as -inf (below every number, tied with -inf); experts outside the kept groups rank below
everything, NaN and -inf included, so they are never chosen while a kept expert is left.

For softmax scoring, experts are selected on the fp32 logit itself: softmax is strictly increasing, so the
k largest probabilities are the k largest logits, and selecting on logits is exact on every backend
(probabilities computed by two libraries can differ in the last bit and flip near-ties). Group scores
(grouped selection) are sums of probabilities, as the definition asks: a sum of logits orders groups
differently.

NaN: under softmax a row holding any NaN logit has NaN probabilities, so its weights are NaN; its ids are
still the k best of its logits, NaN ranked last. Under sigmoid only the NaN experts' scores are NaN.
"""

from __future__ import annotations

import torch

SCORINGS = ("softmax", "sigmoid")


def empty_routing_outputs(logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Uninitialized (topk_weights [M, k] fp32, topk_ids [M, k] int32, expert_counts [E] int32) on logits'
    device: the shapes and dtypes of the routing contract, as the kernels' fake (meta) implementations return."""
    M, E = logits.shape
    return (logits.new_empty((M, top_k), dtype=torch.float32), logits.new_empty((M, top_k), dtype=torch.int32),
            logits.new_empty((E,), dtype=torch.int32))


def _rank_key(x: torch.Tensor) -> torch.Tensor:
    """fp32 scores with NaN mapped to -inf: the value that orders them."""
    return torch.where(torch.isnan(x), torch.full_like(x, float("-inf")), x)


def _stable_topk_desc(key: torch.Tensor, allowed: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k best entries per row of key ([M, N]); disallowed entries rank last.

    A stable descending sort keeps equal keys in index order, so ties go to the lower index. Disallowed
    entries are ordered after all allowed ones by sorting on (allowed, key) lexicographically.
    """
    order = torch.argsort(key, dim=-1, descending=True, stable=True)
    allowed_sorted = torch.gather(allowed, -1, order)
    # A second stable sort on the allowed flag moves disallowed entries to the end, keeping key order.
    order2 = torch.argsort(allowed_sorted.to(torch.int8), dim=-1, descending=True, stable=True)
    return torch.gather(order, -1, order2)[..., :k]


def fused_topk_reference(
    router_logits: torch.Tensor,
    top_k: int,
    *,
    scoring: str = "softmax",
    renormalize: bool = True,
    correction_bias: torch.Tensor | None = None,
    num_expert_group: int | None = None,
    topk_group: int | None = None,
    routed_scaling_factor: float = 1.0,
):
    """Reference routing. Returns (topk_weights [M,k] fp32, topk_ids [M,k] int32, expert_counts [E] int32).

    Arguments are assumed valid (moekern.fused_topk validates before calling any backend).
    """
    logits = router_logits.float()
    M, E = logits.shape
    if scoring == "softmax":
        probs = torch.softmax(logits, dim=-1)
        score = probs  # the selection score the definition speaks of
        key = _rank_key(logits)  # the same order as probs, computed exactly
    elif scoring == "sigmoid":
        probs = torch.sigmoid(logits)
        score = probs if correction_bias is None else probs + correction_bias.float()
        key = _rank_key(score)
    else:
        raise ValueError(f"scoring={scoring!r} must be one of {SCORINGS}")
    allowed = torch.ones_like(key, dtype=torch.bool)

    if num_expert_group is not None and num_expert_group > 1:
        G, g = num_expert_group, topk_group
        per_group = E // G
        grouped = _rank_key(score).view(M, G, per_group)
        if per_group == 1:
            group_score = grouped[..., 0]
        else:
            top2 = torch.sort(grouped, dim=-1, descending=True).values[..., :2]
            group_score = _rank_key(top2.sum(dim=-1))  # +inf + -inf is NaN: ranks as -inf
        kept = _stable_topk_desc(group_score, torch.ones_like(group_score, dtype=torch.bool), g)
        group_mask = torch.zeros(M, G, dtype=torch.bool, device=logits.device)
        group_mask.scatter_(1, kept, True)
        allowed = group_mask.repeat_interleave(per_group, dim=1)

    topk_ids = _stable_topk_desc(key, allowed, top_k)
    topk_weights = torch.gather(probs, 1, topk_ids)
    if renormalize:
        row_sum = topk_weights.sum(dim=-1, keepdim=True)
        # A zero (or NaN) sum leaves the row as it is rather than dividing by it.
        topk_weights = torch.where(row_sum > 0, topk_weights / row_sum, topk_weights)
    topk_weights = topk_weights * routed_scaling_factor
    expert_counts = torch.bincount(topk_ids.flatten(), minlength=E).to(torch.int32)
    return topk_weights, topk_ids.to(torch.int32), expert_counts
