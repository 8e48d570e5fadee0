"""Write the dummy-weight config.json files under moekern/e2e/configs/<name>/ (run once; they are committed).

Configs come from moekern.models.hf_config (one registry, one config writer); layers are reduced so each
model fits one 80 GB GPU with room for a KV cache. DeepSeek-V2-Lite is not in the registry and hf_config has
no DeepseekV2 writer, so its shape is written out here. Classic config keys only (rope_theta, not
rope_parameters), which every transformers version vLLM 0.26 accepts reads.

    python -m moekern.e2e.make_configs

The files ship with the package (pyproject.toml package-data); config_path(name) finds one.
"""

from __future__ import annotations

import json
from pathlib import Path

from moekern.models import get_model, hf_config

CONFIGS_DIR = Path(__file__).resolve().parent / "configs"

# name -> (registry key or None, layers kept, attention backend vLLM should use on the GPU machine)
MODELS = {
    "mixtral-8x7b-4l": ("mixtral", 4, "TRITON_ATTN"),
    "qwen3-30b-a3b-8l": ("qwen3-30b-a3b", 8, "TRITON_ATTN"),
    # full depth (~61 GB of bf16 weights: fits one 80 GB GPU with a small KV cache): single-stream decode, where the
    # 8-layer model is host-bound
    "qwen3-30b-a3b-48l": ("qwen3-30b-a3b", 48, "TRITON_ATTN"),
    "olmoe-1b-7b": ("olmoe", 16, "TRITON_ATTN"),
    "deepseek-v2-lite-8l": (None, 8, "TRITON_MLA"),
    "deepseek-v3-2l": ("deepseek-v3", 2, "TRITON_MLA"),
}


def config_for(name: str) -> dict:
    """The config.json dict of `name` (a MODELS key)."""
    key, layers, _ = MODELS[name]
    if key is not None:
        c = hf_config(get_model(key), num_layers=layers)
        c["_moekern_note"] = f"{name}: {c['_moekern_note']}; written by moekern/e2e/make_configs.py"
        return c
    # DeepSeek-V2-Lite (deepseek-ai/DeepSeek-V2-Lite): softmax routing, one expert group
    c = {"architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2", "hidden_size": 2048,
         "intermediate_size": 10944, "moe_intermediate_size": 1408, "num_hidden_layers": layers,
         "num_attention_heads": 16, "num_key_value_heads": 16, "n_routed_experts": 64, "n_shared_experts": 2,
         "num_experts_per_tok": 6, "first_k_dense_replace": 1, "moe_layer_freq": 1, "n_group": 1,
         "topk_group": 1, "topk_method": "greedy", "norm_topk_prob": False, "routed_scaling_factor": 1.0,
         "scoring_func": "softmax", "q_lora_rank": None, "kv_lora_rank": 512, "qk_nope_head_dim": 128,
         "qk_rope_head_dim": 64, "v_head_dim": 128, "vocab_size": 102400, "max_position_embeddings": 163840,
         "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "rope_scaling": None, "hidden_act": "silu",
         "attention_bias": False, "torch_dtype": "bfloat16", "tie_word_embeddings": False,
         "bos_token_id": 100000, "eos_token_id": 100001,
         "_moekern_note": f"dummy-weight shape of {name} written by moekern/e2e/make_configs.py"}
    return c


def attention_backend(name: str) -> str:
    """The attention backend vLLM runs `name` (a MODELS key) with on the GPU machine."""
    return MODELS[name][2]


def config_path(name: str) -> Path:
    """The committed config.json of `name` (a MODELS key)."""
    if name not in MODELS:
        from moekern.errors import UsageError

        raise UsageError(f"model={name!r} must be one of {sorted(MODELS)}")
    return CONFIGS_DIR / name / "config.json"


def main() -> None:
    for name in MODELS:
        d = CONFIGS_DIR / name
        d.mkdir(parents=True, exist_ok=True)
        (d / "config.json").write_text(json.dumps(config_for(name), indent=2) + "\n")
        print("wrote", d / "config.json")


if __name__ == "__main__":
    main()
