"""Dispatch and combine: align (blocked layout for grouped GEMMs), route_and_align (routing + align in one
launch), permute and unpermute."""

from moekern.dispatch.api import align, permute, unpermute
from moekern.dispatch.reference import AlignOutput, PermuteLayout
from moekern.dispatch.route_align import RouteOutput, route_and_align

__all__ = ["align", "permute", "unpermute", "route_and_align", "AlignOutput", "PermuteLayout", "RouteOutput"]
