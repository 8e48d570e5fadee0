"""Parameter counts and weight bytes per GPU of a registry model, under TP, EP and hybrid layouts.

Counted (weights only; biases, norms and the Qwen2-MoE shared-expert gate, each < 0.1% of a model, are
left out):
- attention per layer, standard MHA/GQA: q = H*nh*hd, k = v = H*nkv*hd, o = nh*hd*H (hd = head_dim, or
  H / nh when None).
- attention per layer, MLA (DeepSeek-V3; approximate: the low-rank norms are ignored):
  q = H*q_lora + q_lora*nh*(nope+rope)   (q = H*nh*(nope+rope) when q_lora_rank is 0)
  kv = H*(kv_lora + rope) + kv_lora*nh*(nope + v),  o = nh*v*H.
- FFN: gated (SwiGLU) 3*H*I for every routed expert, shared FFN (width = shared_intermediate_size) and
  leading dense layer; the dense model's FFN is 3*H*I too.
- router: H*E per MoE layer. Embedding V*H, LM head V*H (once if tie_word_embeddings).
Active parameters: per token, top_k routed experts + everything else (embedding and LM head included, as
the published "active" numbers of Mixtral, Qwen and DeepSeek do).

Layouts (`weight_bytes_per_gpu(spec, tp, ep)`), as vLLM shards them:
- TP (tp=N, ep=1): attention heads, FFN widths, vocab split N ways; KV heads are replicated when
  N > num_kv_heads (each GPU keeps ceil(nkv / N) of them). Routed experts are split along I.
- EP (tp=1, ep=N): attention, embeddings, dense and shared FFNs replicated on every GPU (data-parallel
  attention); routed experts split whole, ceil((E + R) / N) per GPU (the busiest GPU's count: 60 experts
  over 8 ranks puts 8 on some).
- hybrid (tp=T, ep=N, N a multiple of T: vLLM's `-tp T -dp N/T --enable-expert-parallel`): attention
  and dense parts split T ways, routed experts split whole over N ranks.
The router is replicated in every layout. MLA under TP splits the per-head projections (q_b, kv_b, o)
and replicates the low-rank down projections (q_a, kv_a), as vLLM does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from moekern.models.registry import ModelSpec


@dataclass(frozen=True)
class ParamCounts:
    """Parameter counts (not bytes) of one model; `total` and `active` are the headline numbers."""

    total: int
    active: int
    attention: int  # all layers
    routed_experts: int  # all layers, all experts
    shared_experts: int
    dense_ffn: int  # dense model FFN or leading dense layers of an MoE model
    router: int
    embeddings: int  # embedding + LM head

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def _head_dim(spec: ModelSpec) -> int:
    return spec.head_dim or spec.hidden_size // spec.num_heads


def _attention_parts(spec: ModelSpec) -> tuple[int, int, int]:
    """(params split by TP, params replicated under TP, kv params split by TP with replication) per layer."""
    h, nh = spec.hidden_size, spec.num_heads
    if spec.is_mla:
        qk = spec.qk_nope_head_dim + spec.qk_rope_head_dim
        if spec.q_lora_rank:
            q_rep, q_split = h * spec.q_lora_rank, spec.q_lora_rank * nh * qk
        else:
            q_rep, q_split = 0, h * nh * qk
        kv_rep = h * (spec.kv_lora_rank + spec.qk_rope_head_dim)
        kv_split = spec.kv_lora_rank * nh * (spec.qk_nope_head_dim + spec.v_head_dim)
        o = nh * spec.v_head_dim * h
        return q_split + kv_split + o, q_rep + kv_rep, 0
    hd = _head_dim(spec)
    return h * nh * hd * 2, 0, 2 * h * spec.num_kv_heads * hd


def param_counts(spec: ModelSpec) -> ParamCounts:
    """Total and active parameter counts of `spec` (see the module docstring for what is counted)."""
    h, L = spec.hidden_size, spec.num_layers
    split, rep, kv = _attention_parts(spec)
    attention = L * (split + rep + kv)
    expert = 3 * h * spec.intermediate_size
    emb = spec.vocab_size * h * (1 if spec.tie_word_embeddings else 2)
    if not spec.is_moe:
        dense = L * expert
        total = attention + dense + emb
        return ParamCounts(total, total, attention, 0, 0, dense, 0, emb)
    moe_l = spec.num_moe_layers
    routed = moe_l * spec.num_experts * expert
    shared = moe_l * 3 * h * spec.shared_intermediate_size
    dense = spec.first_k_dense * 3 * h * spec.dense_intermediate_size
    router = moe_l * h * spec.num_experts
    total = attention + routed + shared + dense + router + emb
    active = attention + moe_l * spec.top_k * expert + shared + dense + router + emb
    return ParamCounts(total, active, attention, routed, shared, dense, router, emb)


def weight_bytes_per_gpu(spec: ModelSpec, tp: int = 1, ep: int = 1, dtype_bytes: float = 2,
                         num_redundant: int = 0) -> dict:
    """Weight bytes on the busiest GPU of a TP / EP / hybrid layout (module docstring), `dtype_bytes` per
    parameter (2 = bf16, 1 = fp8). `num_redundant` EPLB replica slots add to the experts under EP.

    Returns {"layout", "tp", "ep", "gpus", "experts_per_gpu", "expert_bytes", "other_bytes", "total_bytes"}.
    """
    for name, v in (("tp", tp), ("ep", ep)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{name}={v!r} must be an int >= 1")
    if ep > 1 and ep % tp:
        raise ValueError(f"ep={ep} must be a multiple of tp={tp} (EP spans the tp * dp GPUs)")
    if ep > 1 and not spec.is_moe:
        raise ValueError(f"model={spec.name!r} is dense; ep={ep} does not apply")
    if num_redundant < 0 or (num_redundant and ep == 1):
        raise ValueError(f"num_redundant={num_redundant} must be >= 0 and needs ep > 1")
    h, L = spec.hidden_size, spec.num_layers
    split, rep, kv = _attention_parts(spec)
    kv_per_gpu = kv * math.ceil(spec.num_kv_heads / tp) / spec.num_kv_heads if kv else 0.0
    attn = L * (split / tp + rep + kv_per_gpu)
    emb = spec.vocab_size * h * (1 if spec.tie_word_embeddings else 2) / tp
    expert = 3 * h * spec.intermediate_size
    if not spec.is_moe:
        other = attn + emb + L * expert / tp
        return {"layout": "TP" if tp > 1 else "single", "tp": tp, "ep": 1, "gpus": tp, "experts_per_gpu": 0,
                "expert_bytes": 0.0, "other_bytes": other * dtype_bytes, "total_bytes": other * dtype_bytes}
    moe_l = spec.num_moe_layers
    shared = moe_l * 3 * h * spec.shared_intermediate_size / tp
    dense = spec.first_k_dense * 3 * h * spec.dense_intermediate_size / tp
    router = moe_l * h * spec.num_experts
    if ep > 1:
        per_gpu = math.ceil((spec.num_experts + num_redundant) / ep)
        experts = moe_l * per_gpu * expert
        layout = "EP" if tp == 1 else "hybrid"
    else:
        per_gpu = spec.num_experts
        experts = moe_l * spec.num_experts * expert / tp
        layout = "TP" if tp > 1 else "single"
    other = attn + emb + shared + dense + router
    return {"layout": layout, "tp": tp, "ep": ep, "gpus": max(tp, ep), "experts_per_gpu": per_gpu,
            "expert_bytes": experts * dtype_bytes, "other_bytes": other * dtype_bytes,
            "total_bytes": (experts + other) * dtype_bytes}


def standard_layouts(spec: ModelSpec, gpus: int) -> dict[str, tuple[int, int]]:
    """The layouts `moekern models` tabulates for `gpus` GPUs: {name: (tp, ep)}; EP and hybrid only for
    MoE models."""
    out = {f"TP{gpus}": (gpus, 1)}
    if spec.is_moe and gpus > 1:
        out[f"EP{gpus}"] = (1, gpus)
        out[f"TP{gpus}+EP{gpus}"] = (gpus, gpus)
    return out
