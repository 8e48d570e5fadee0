"""Dispatch and combine: align (blocked layout for grouped GEMMs), permute and unpermute."""

from moekern.dispatch.api import align, permute, unpermute
from moekern.dispatch.reference import AlignOutput, PermuteLayout

__all__ = ["align", "permute", "unpermute", "AlignOutput", "PermuteLayout"]
