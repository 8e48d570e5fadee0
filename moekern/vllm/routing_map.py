"""From a vLLM router object to moekern.fused_topk arguments, and a step's phase: pure, no vLLM import.

vLLM 0.26 builds one router per MoE layer (vllm/model_executor/layers/fused_moe/router/router_factory.py).
Those whose semantics moekern.fused_topk reproduces exactly are mapped; every other one keeps vLLM's
routing (the plugin logs the reason once per layer):

  FusedTopKRouter(scoring_func softmax|sigmoid, renormalize)      Mixtral, Qwen2/3-MoE, OLMoE
      -> fused_topk(scoring, renormalize), no scaling (vLLM applies none here)
  FusedTopKBiasRouter(sigmoid, e_score_correction_bias, renormalize, routed_scaling_factor)
      -> fused_topk(scoring="sigmoid", correction_bias, renormalize, routed_scaling_factor)
      (softmax without bias maps too; softmax + bias, sqrtsoftplus, hash tables and fused shared-expert
       slots do not)
  GroupedTopKRouter(num_expert_group G, topk_group g, ...)        DeepSeek-V2/V3
      with e_score_correction_bias (V3 noaux_tc, sigmoid): group score = sum of the group's top-2 biased
        scores, as ours -> fused_topk(sigmoid, correction_bias, G, g, renormalize, scaling)
      without bias vLLM scores a group by its max (V2 group_limited_greedy): moekern has only the top-2
        sum, so such layers fall back, unless grouping selects nothing (G == 1 or g == G: every group
        kept), which is plain top-k -> fused_topk(scoring, renormalize, scaling) (DeepSeek-V2-Lite)
      E <= G or E % G != 0: vLLM routes ungrouped (softmax without bias, whatever scoring_func says;
        scoring_func with bias) and so do we.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

SCORINGS = ("softmax", "sigmoid")


@dataclass(frozen=True)
class RoutingPlan:
    """What to call: fused_topk(logits, top_k, correction_bias=<router's bias if uses_bias>, **kwargs)."""

    top_k: int
    kwargs: dict = field(default_factory=dict)
    uses_bias: bool = False
    why: str = ""


def _get(router, name, default=None):
    return getattr(router, name, default)


def plan_routing(router, num_experts: int) -> tuple[RoutingPlan | None, str]:
    """(plan, reason). plan is None when the layer must keep vLLM's routing; reason says why (or what)."""
    cls = type(router).__name__
    top_k = _get(router, "top_k")
    if not isinstance(top_k, int) or top_k < 1:
        return None, f"{cls}: no usable top_k ({top_k!r})"
    if top_k > num_experts:
        return None, f"{cls}: top_k={top_k} > num_experts={num_experts}"
    if _get(router, "num_fused_shared_experts", 0):
        return None, f"{cls}: fused shared-expert slots (num_fused_shared_experts>0) are not routed by moekern"
    scoring = _get(router, "scoring_func", "softmax")
    renorm = bool(_get(router, "renormalize", True))
    scale = float(_get(router, "routed_scaling_factor", 1.0) or 1.0)
    bias = _get(router, "e_score_correction_bias")

    if cls == "FusedTopKRouter":
        if scoring not in SCORINGS:
            return None, f"{cls}: scoring_func={scoring!r} is not one of {SCORINGS}"
        return RoutingPlan(top_k, {"scoring": scoring, "renormalize": renorm}, False,
                           f"{cls}: {scoring} top-{top_k}, renormalize={renorm}"), "mapped"

    if cls == "FusedTopKBiasRouter":
        if _get(router, "_hash_indices_table") is not None:
            return None, f"{cls}: hash-table routing (DeepSeek-V4) is not supported"
        if scoring == "sigmoid":
            return RoutingPlan(top_k, {"scoring": "sigmoid", "renormalize": renorm, "routed_scaling_factor": scale},
                               bias is not None, f"{cls}: sigmoid{'+bias' if bias is not None else ''} top-{top_k}, "
                               f"renormalize={renorm}, scale={scale}"), "mapped"
        if scoring == "softmax" and bias is None:
            return RoutingPlan(top_k, {"scoring": "softmax", "renormalize": renorm, "routed_scaling_factor": scale},
                               False, f"{cls}: softmax top-{top_k}, renormalize={renorm}, scale={scale}"), "mapped"
        return None, f"{cls}: scoring_func={scoring!r} with{'' if bias is not None else 'out'} bias is not supported"

    if cls == "GroupedTopKRouter":
        G, g = _get(router, "num_expert_group"), _get(router, "topk_group")
        if not isinstance(G, int) or not isinstance(g, int) or G < 1 or g < 1:
            return None, f"{cls}: num_expert_group={G!r}, topk_group={g!r} are not positive ints"
        if not (num_experts > G and num_experts % G == 0):
            # vLLM's GroupedTopKRouter routes ungrouped here (its valid_grouping() is False).
            if bias is not None:
                if scoring != "sigmoid":
                    return None, f"{cls}: ungrouped fallback with scoring_func={scoring!r} + bias is not supported"
                return RoutingPlan(top_k, {"scoring": "sigmoid", "renormalize": renorm,
                                           "routed_scaling_factor": scale}, True,
                                   f"{cls}: E={num_experts} not groupable by G={G}: sigmoid+bias top-{top_k}"), "mapped"
            return RoutingPlan(top_k, {"scoring": "softmax", "renormalize": renorm}, False,
                               f"{cls}: E={num_experts} not groupable by G={G}: softmax top-{top_k}"), "mapped"
        if scoring not in SCORINGS:
            return None, f"{cls}: scoring_func={scoring!r} is not one of {SCORINGS}"
        if bias is not None:
            if scoring != "sigmoid":
                return None, f"{cls}: softmax scoring with e_score_correction_bias is not supported"
            kw = {"scoring": "sigmoid", "renormalize": renorm, "routed_scaling_factor": scale}
            if G > 1 and g < G:
                kw.update(num_expert_group=G, topk_group=g)
            if top_k > g * (num_experts // G):
                return None, f"{cls}: top_k={top_k} exceeds the {g * (num_experts // G)} selectable experts"
            return RoutingPlan(top_k, kw, True, f"{cls}: sigmoid+bias grouped (G={G}, g={g}, top-2-sum) "
                                                f"top-{top_k}, renormalize={renorm}, scale={scale}"), "mapped"
        if G == 1 or g >= G:
            return RoutingPlan(top_k, {"scoring": scoring, "renormalize": renorm, "routed_scaling_factor": scale},
                               False, f"{cls}: G={G}, g={g} keeps every group: {scoring} top-{top_k}, "
                               f"renormalize={renorm}, scale={scale}"), "mapped"
        return None, (f"{cls}: group score without bias is max-of-group in vLLM (DeepSeek-V2 "
                      f"group_limited_greedy, G={G}, g={g}); moekern supports top-2-sum only")

    return None, f"{cls}: router type not mapped (vLLM keeps routing this layer)"


def classify_phase(scheduler_output, prompt_lens: dict, fast: bool = True) -> str:
    """'prefill' | 'decode' | 'mixed' for one vLLM SchedulerOutput; updates prompt_lens (req_id -> length).

    A request's scheduled tokens are prefill while its computed tokens are below its prompt length (new
    requests, chunked prefill, recompute after preemption) and decode after. Prompt lengths come from the
    step that scheduled the request first; a request seen only later is judged by its scheduled count
    (more than 1 + its speculative tokens: prefill).

    fast=False judges every running request in a Python loop: the reference the fast path (used when no
    request is resumed and every prompt length is known) is tested against.
    """
    for rid in getattr(scheduler_output, "finished_req_ids", None) or ():
        prompt_lens.pop(rid, None)
    spec = getattr(scheduler_output, "scheduled_spec_decode_tokens", None) or {}
    sched = getattr(scheduler_output, "num_scheduled_tokens", None) or {}
    kinds = set()
    for req in getattr(scheduler_output, "scheduled_new_reqs", None) or ():
        n = None
        if getattr(req, "prompt_token_ids", None) is not None:
            n = len(req.prompt_token_ids)
        elif getattr(req, "prompt_embeds", None) is not None:
            n = int(req.prompt_embeds.shape[0])
        if n is not None:
            prompt_lens[req.req_id] = n
        computed = getattr(req, "num_computed_tokens", 0) or 0
        kinds.add("prefill" if n is None or computed < n else "decode")
    cached = getattr(scheduler_output, "scheduled_cached_reqs", None)
    if cached is not None:
        resumed = getattr(cached, "resumed_req_ids", None) or set()
        computed_list = getattr(cached, "num_computed_tokens", None) or []
        req_ids = getattr(cached, "req_ids", None) or ()
        if fast and not resumed and len(computed_list) == len(req_ids):
            # The common case (this runs on the model's thread every step, for every running request):
            # every prompt length known, no resumed request -> prefill iff computed < prompt, done in C.
            # A request seen first mid-flight has no prompt length (KeyError): the loop below judges them all.
            # Otherwise the answer cannot depend on one: any() stops at the first prefill, all() at the
            # first decode, and prefill + decode is "mixed" whatever the rest are.
            lens = prompt_lens.__getitem__
            try:
                prefill = any(map(operator.lt, computed_list, map(lens, req_ids)))
                decode = not prefill or not all(map(operator.lt, computed_list, map(lens, req_ids)))
            except KeyError:
                pass
            else:
                if req_ids:
                    if prefill:
                        kinds.add("prefill")
                    if decode:
                        kinds.add("decode")
                req_ids = ()  # judged
        for i, rid in enumerate(req_ids):
            n_new = sched.get(rid, 0) - len(spec.get(rid, ()))
            n_prompt = prompt_lens.get(rid)
            computed = computed_list[i] if i < len(computed_list) else None
            if rid in resumed and n_new > 1:
                kinds.add("prefill")
            elif n_prompt is not None and computed is not None:
                kinds.add("prefill" if computed < n_prompt else "decode")
            else:
                kinds.add("prefill" if n_new > 1 else "decode")
    if not kinds:
        return "unknown"
    return kinds.pop() if len(kinds) == 1 else "mixed"
