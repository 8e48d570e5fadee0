"""Argument checks shared by the public ops (errors name the argument, what was expected and what came)."""

from __future__ import annotations

import torch


def check_topk_pair(topk_ids, topk_weights, num_tokens: int) -> int:
    """Check a routing result handed in by the caller; return k.

    topk_ids: [M, k] int32|int64, topk_weights: [M, k] floating point, M = num_tokens, k >= 1. Raises
    TypeError for a non-tensor or a wrong dtype, ValueError for a wrong shape. Value ranges (ids within
    [0, E)) need a device sync and are left to the caller.
    """
    M = num_tokens
    for name, t in (("topk_ids", topk_ids), ("topk_weights", topk_weights)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor [M, k]; got {type(t).__name__}")
        if t.dim() != 2 or t.shape[0] != M:
            raise ValueError(f"{name} must have shape [M={M}, k]; got {tuple(t.shape)}")
    if topk_weights.shape != topk_ids.shape:
        raise ValueError(f"topk_weights and topk_ids must have the same shape; got {tuple(topk_weights.shape)} "
                         f"and {tuple(topk_ids.shape)}")
    if topk_ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"topk_ids must be int32 or int64; got {topk_ids.dtype}")
    if topk_ids.shape[1] < 1:
        raise ValueError(f"topk_ids must have at least one column (k >= 1); got shape {tuple(topk_ids.shape)}")
    if not topk_weights.is_floating_point():
        raise TypeError(f"topk_weights must be a float tensor; got {topk_weights.dtype}")
    return topk_ids.shape[1]
