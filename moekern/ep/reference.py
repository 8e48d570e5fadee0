"""Plain-PyTorch reference for expert-parallel dispatch/combine: gather every rank's tokens, compute locally.

The reference takes all W ranks' inputs at once (lists indexed by rank) and states, for each rank, what
dispatch must deliver and what combine must return:

  recv on rank d: for each source rank r ascending, each token t of r ascending that has an expert on d:
    x (dequantized when fp8), local ids (global - d*El, -1 off-rank), weights (0 off-rank), source token t.
  combine on rank r, token t: partial_d = dtype(sum over j with expert on d, j ascending, of
    w[t, j] * y[t, j] in fp32) for each rank d the token went to; out[t] = dtype(sum over d ascending of
    fp32(partial_d)). y[t, j] = expert_fn(x[t], topk_ids[t, j]).
With fp32 hidden states and dyadic inputs the two roundings vanish and this is the plain weighted sum.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch

from moekern.ep.layout import dequantize_fp8, quantize_fp8


class RecvReference(NamedTuple):
    recv_x: torch.Tensor  # [R, H]
    recv_topk_ids: torch.Tensor  # [R, k] int32, local or -1
    recv_topk_weights: torch.Tensor  # [R, k] fp32, 0 where the id is -1
    recv_src_rank: torch.Tensor  # [R] int32
    recv_src_token: torch.Tensor  # [R] int32


def payload_reference(x: torch.Tensor, fp8: bool) -> torch.Tensor:
    """What a receiver sees of x: x itself, or its per-token e4m3 round trip."""
    if not fp8:
        return x
    q, s = quantize_fp8(x)
    return dequantize_fp8(q, s, x.dtype)


def dispatch_reference(xs, topk_ids, topk_weights, num_experts: int, fp8: bool = False, ranks=None):
    """[RecvReference] per rank (None for ranks not in `ranks`, when given)."""
    W = len(xs)
    El = num_experts // W
    out = []
    for d in range(W):
        if ranks is not None and d not in ranks:
            out.append(None)
            continue
        parts = {name: [] for name in RecvReference._fields}
        for r in range(W):
            ids = topk_ids[r].long()
            local = ids - d * El
            on = (local >= 0) & (local < El)
            toks = torch.nonzero(on.any(dim=1)).flatten()
            parts["recv_x"].append(payload_reference(xs[r], fp8)[toks])
            parts["recv_topk_ids"].append(torch.where(on, local, -1)[toks].to(torch.int32))
            parts["recv_topk_weights"].append(torch.where(on, topk_weights[r].float(), 0.0)[toks])
            parts["recv_src_rank"].append(torch.full((toks.numel(),), r, dtype=torch.int32))
            parts["recv_src_token"].append(toks.to(torch.int32))
        out.append(RecvReference(*(torch.cat(parts[n]) for n in RecvReference._fields)))
    return out


def apply_experts(x: torch.Tensor, global_ids: torch.Tensor, expert_fn: Callable) -> torch.Tensor:
    """y[i] = expert_fn(x[i:i+1], global_ids[i]) computed one expert at a time; x [N, H], ids [N]."""
    y = torch.empty_like(x)
    for e in torch.unique(global_ids).tolist():
        rows = torch.nonzero(global_ids == e).flatten()
        y[rows] = expert_fn(x[rows], e)
    return y


def combine_reference(xs, topk_ids, topk_weights, num_experts: int, expert_fn: Callable, fp8: bool = False,
                      ranks=None):
    """[M_r, H] per rank (None for ranks not in `ranks`, when given): the combine contract, no communication."""
    W = len(xs)
    El = num_experts // W
    outs = []
    for r in range(W):
        if ranks is not None and r not in ranks:
            outs.append(None)
            continue
        x = payload_reference(xs[r], fp8)
        M, k = topk_ids[r].shape
        ids = topk_ids[r].long()
        y = apply_experts(x.repeat_interleave(k, 0), ids.reshape(-1), expert_fn).view(M, k, x.shape[1])
        acc = torch.zeros(M, x.shape[1], dtype=torch.float32)
        for d in range(W):
            on = (ids // El) == d
            part = torch.zeros(M, x.shape[1], dtype=torch.float32)
            for j in range(k):
                w = torch.where(on[:, j], topk_weights[r][:, j].float(), 0.0)
                part += y[:, j].float() * w.unsqueeze(1)
            acc += part.to(xs[r].dtype).float()
        outs.append(acc.to(xs[r].dtype))
    return outs
