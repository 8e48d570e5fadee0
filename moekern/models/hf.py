"""Dummy-weight Hugging Face `config.json` from a registry spec (vLLM `--load-format dummy` reads it).

`hf_config(spec, num_layers=None) -> dict` for the architectures Mixtral, Qwen3-MoE, Qwen2-MoE
(Qwen1.5-MoE, Qwen2-57B), OLMoE, DeepSeek-V3 and DBRX. Classic keys only (`rope_theta`, not
`rope_parameters`) so every transformers version vLLM 0.26 accepts reads them. `num_layers` cuts the
model short (a dummy model that fits one GPU); DeepSeek keeps min(first_k_dense, num_layers - 1) leading
dense layers so at least one MoE layer remains. Token ids and context lengths are the checkpoints' own
where the registry has them, else plausible defaults: a dummy model never decodes real text.
"""

from __future__ import annotations

from moekern.models.registry import ModelSpec

SUPPORTED = ("MixtralForCausalLM", "Qwen3MoeForCausalLM", "Qwen2MoeForCausalLM", "OlmoeForCausalLM",
             "DeepseekV3ForCausalLM", "DbrxForCausalLM")


def hf_config(spec: ModelSpec, num_layers: int | None = None) -> dict:
    """A config.json dict for `spec` with `num_layers` layers (default: all). Raises ValueError for an
    architecture outside SUPPORTED or num_layers < 1."""
    if spec.architecture not in SUPPORTED:
        raise ValueError(f"spec.architecture={spec.architecture!r} ({spec.name}) has no config writer; "
                         f"supported: {SUPPORTED}")
    layers = spec.num_layers if num_layers is None else num_layers
    if not isinstance(layers, int) or layers < 1:
        raise ValueError(f"num_layers={num_layers!r} must be an int >= 1")
    s = spec
    base = {"architectures": [s.architecture], "vocab_size": s.vocab_size, "torch_dtype": "bfloat16",
            "tie_word_embeddings": s.tie_word_embeddings, "max_position_embeddings": s.max_position_embeddings,
            "rope_theta": s.rope_theta, "_moekern_note": f"dummy-weight shape of registry model {s.name!r} "
                                                         f"({s.hf_id}), {layers} layer(s); moekern.models.hf_config"}
    if s.architecture == "DbrxForCausalLM":
        base.pop("max_position_embeddings")
        base.pop("rope_theta")
        return {**base, "model_type": "dbrx", "d_model": s.hidden_size, "n_heads": s.num_heads, "n_layers": layers,
                "max_seq_len": s.max_position_embeddings,
                "attn_config": {"kv_n_heads": s.num_kv_heads, "clip_qkv": 8, "rope_theta": s.rope_theta,
                                "attn_pdrop": 0.0},
                "ffn_config": {"ffn_hidden_size": s.intermediate_size, "moe_num_experts": s.num_experts,
                               "moe_top_k": s.top_k, "moe_jitter_eps": 0.0, "moe_loss_weight": 0.05,
                               "moe_normalize_expert_weights": 1.0 if s.renormalize else None,
                               "ffn_act_fn": {"name": "silu"}},
                "bos_token_id": 100257, "eos_token_id": 100257}
    c = {**base, "hidden_size": s.hidden_size, "num_hidden_layers": layers, "num_attention_heads": s.num_heads,
         "num_key_value_heads": s.num_kv_heads, "hidden_act": "silu", "rms_norm_eps": 1e-6,
         "num_experts_per_tok": s.top_k}
    if s.architecture == "MixtralForCausalLM":
        c.update(model_type="mixtral", intermediate_size=s.intermediate_size, num_local_experts=s.num_experts,
                 rms_norm_eps=1e-5, sliding_window=None, bos_token_id=1, eos_token_id=2)
    elif s.architecture == "Qwen3MoeForCausalLM":
        c.update(model_type="qwen3_moe", intermediate_size=s.dense_intermediate_size or 4 * s.intermediate_size,
                 moe_intermediate_size=s.intermediate_size, head_dim=s.head_dim or s.hidden_size // s.num_heads,
                 num_experts=s.num_experts, norm_topk_prob=s.renormalize, decoder_sparse_step=1, mlp_only_layers=[],
                 attention_bias=False, bos_token_id=151643, eos_token_id=151645)
    elif s.architecture == "Qwen2MoeForCausalLM":
        c.update(model_type="qwen2_moe", intermediate_size=s.shared_intermediate_size or 4 * s.intermediate_size,
                 moe_intermediate_size=s.intermediate_size, shared_expert_intermediate_size=s.shared_intermediate_size,
                 num_experts=s.num_experts, norm_topk_prob=s.renormalize, decoder_sparse_step=1, mlp_only_layers=[],
                 use_sliding_window=False, bos_token_id=151643, eos_token_id=151643)
    elif s.architecture == "OlmoeForCausalLM":
        c.update(model_type="olmoe", intermediate_size=s.intermediate_size, num_experts=s.num_experts,
                 norm_topk_prob=s.renormalize, rms_norm_eps=1e-5, clip_qkv=None, pad_token_id=1, eos_token_id=50279)
    else:  # DeepseekV3ForCausalLM
        dense = min(s.first_k_dense, layers - 1)
        c.update(model_type="deepseek_v3", intermediate_size=s.dense_intermediate_size,
                 moe_intermediate_size=s.intermediate_size, n_routed_experts=s.num_experts,
                 n_shared_experts=s.num_shared_experts, first_k_dense_replace=dense, moe_layer_freq=1,
                 n_group=s.num_expert_group, topk_group=s.topk_group,
                 topk_method="noaux_tc" if s.correction_bias else "greedy", norm_topk_prob=s.renormalize,
                 routed_scaling_factor=s.routed_scaling_factor, scoring_func=s.scoring,
                 q_lora_rank=s.q_lora_rank or None, kv_lora_rank=s.kv_lora_rank,
                 qk_nope_head_dim=s.qk_nope_head_dim, qk_rope_head_dim=s.qk_rope_head_dim, v_head_dim=s.v_head_dim,
                 rope_scaling=None, attention_bias=False, bos_token_id=0, eos_token_id=1)
    return c


def write_hf_config(spec: ModelSpec, out_dir, num_layers: int | None = None):
    """Write `out_dir/config.json` for `spec`; returns its path."""
    import json
    from pathlib import Path

    d = Path(out_dir)
    d.mkdir(parents=True, exist_ok=True)
    p = d / "config.json"
    p.write_text(json.dumps(hf_config(spec, num_layers), indent=2) + "\n", encoding="utf-8")
    return p
