"""SYNTHETIC expert loads and bench results, for tests and the shipped sample report only.

Nothing here is measured. Loads are drawn so that a `skew` in [0, 1] controls imbalance: expert
popularity p ~ Dirichlet(alpha) with alpha = 10 ** (1 - 3 * skew) (skew 0: near-uniform, skew 1: a few hot
experts), the same p for every step of a layer (hot experts stay hot, as in real routing), and each step's
tokens drawn multinomially from p.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from moekern.gatelog import GateRecord, write_records


def synthetic_counts(num_steps: int, num_layers: int, num_experts: int, top_k: int, tokens_per_step,
                     skew: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """`counts: [S, L, E]` int64 and `num_tokens: [S]` int64; tokens_per_step: int or [S] ints."""
    rng = np.random.default_rng(seed)
    alpha = 10.0 ** (1.0 - 3.0 * float(skew))
    pops = rng.dirichlet(np.full(num_experts, alpha), size=num_layers)  # [L, E]
    pops = np.clip(pops, 1e-9, None)
    pops /= pops.sum(axis=1, keepdims=True)
    nt = np.broadcast_to(np.asarray(tokens_per_step, dtype=np.int64), (num_steps,)).copy()
    counts = np.zeros((num_steps, num_layers, num_experts), dtype=np.int64)
    for s in range(num_steps):
        for l in range(num_layers):
            counts[s, l] = rng.multinomial(nt[s] * top_k, pops[l])
    return counts, nt


def write_synthetic_gate_log(path: str | os.PathLike, num_steps: int = 40, num_layers: int = 4,
                             num_experts: int = 8, top_k: int = 2, tokens_per_step=64, skew: float = 0.5,
                             seed: int = 0, warmup_tokens: int | None = 4096, model: str = "synthetic") -> Path:
    """Write a moekern.gatelog/1 file (rank 0). With `warmup_tokens`, step 0 is a uniform profiling batch
    of that many tokens, which the default max_tokens=1000 filter drops, as with real vLLM logs."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    if p.exists():
        p.unlink()
    counts, nt = synthetic_counts(num_steps, num_layers, num_experts, top_k, tokens_per_step, skew, seed)
    recs = []
    offset = 0
    if warmup_tokens:
        offset = 1
        per = warmup_tokens * top_k // num_experts
        for l in range(num_layers):
            recs.append(GateRecord(0, l, [per] * num_experts, warmup_tokens, phase="prefill", top_k=top_k,
                                   model=model))
    for s in range(num_steps):
        for l in range(num_layers):
            recs.append(GateRecord(s + offset, l, counts[s, l].tolist(), int(nt[s]), phase="decode", top_k=top_k,
                                   model=model))
    write_records(p, recs)
    return p
