"""Plain-PyTorch reference for the experts stage: the whole expert MLP of a MoE layer, one expert at a time.

moekern.fused_moe(backend="torch") runs it, and every other backend is tested against it (fp32 math, so it
is the tolerance's yardstick, not one more kernel under test).
"""

from __future__ import annotations

import torch


def fused_moe_reference(hidden_states, w13, w2, topk_weights, topk_ids):
    """Per-expert loop: out[t] = sum_j w[t,j] * (silu(x W_gate^T) * (x W_up^T)) W_down^T, fp32 math.

    w13: [E, 2I, H] (gate rows 0:I, up rows I:2I); w2: [E, H, I]. Returns hidden_states' dtype.
    """
    M, H = hidden_states.shape
    E, two_i, _ = w13.shape
    inter = two_i // 2
    out = torch.zeros(M, H, dtype=torch.float32, device=hidden_states.device)
    x = hidden_states.float()
    for e in range(E):
        tok, slot = torch.nonzero(topk_ids == e, as_tuple=True)
        if tok.numel() == 0:
            continue
        h = x[tok] @ w13[e].float().t()
        a = torch.nn.functional.silu(h[:, :inter]) * h[:, inter:]
        y = a @ w2[e].float().t()
        out.index_add_(0, tok, y * topk_weights[tok, slot].float().unsqueeze(1))
    return out.to(hidden_states.dtype)
