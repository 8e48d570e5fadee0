"""Fused top-k routing: scores, selection, renormalization and the per-expert histogram in one kernel."""

from moekern.routing.api import MAX_EXPERTS, MAX_TOPK, RoutingOutput, fused_topk, validate_routing_args
from moekern.routing.reference import fused_topk_reference

__all__ = ["MAX_EXPERTS", "MAX_TOPK", "RoutingOutput", "fused_topk", "fused_topk_reference", "validate_routing_args"]
