"""Loading real weights: safetensors files in a directory, HF LLaDA-MoE tensor names.

Expected names (HF `LLaDAMoEModelLM`, as published descriptions of inclusionAI/LLaDA-MoE-7B-A1B give them;
not verified against a downloaded index -- unmatched names are reported, never ignored). Linear weights
are [out, in] (nn.Linear):

    model.embed_tokens.weight                              [V, H]       -> embed
    model.norm.weight                                      [H]          -> final_norm
    lm_head.weight                                         [V, H]       -> lm_head
    model.layers.{i}.input_layernorm.weight                [H]          -> layers[i].input_norm
    model.layers.{i}.post_attention_layernorm.weight       [H]          -> layers[i].post_norm
    model.layers.{i}.self_attn.{q,k,v,o}_proj.weight       [nh*hd, H].. -> layers[i].q / k / v / o
    model.layers.{i}.self_attn.{q,k}_norm.weight           [hd]         -> layers[i].q_norm / k_norm (qk_norm)
    model.layers.{i}.mlp.gate.weight                       [E, H]       -> layers[i].router
    model.layers.{i}.mlp.experts.{e}.gate_proj.weight      [I, H]   \\
    model.layers.{i}.mlp.experts.{e}.up_proj.weight        [I, H]    } -> layers[i].w13 [E, 2I, H] = [gate; up]
    model.layers.{i}.mlp.experts.{e}.down_proj.weight      [H, I]   /-> layers[i].w2  [E, H, I]
    dense models: model.layers.{i}.mlp.{gate,up,down}_proj.weight   -> layers[i].gate_up [2I, H], down [H, I]

LLaDA-8B (OLMo-style names, GSAI-ML/LLaDA-8B-Base) is accepted through this rename (also unverified):
    model.transformer.wte.weight -> model.embed_tokens.weight; model.transformer.ln_f.weight -> model.norm.weight;
    model.transformer.ff_out.weight -> lm_head.weight; model.transformer.blocks.{i}.X -> model.layers.{i}.Y with
    attn_norm -> input_layernorm, ff_norm -> post_attention_layernorm, {q,k,v}_proj -> self_attn.{q,k,v}_proj,
    attn_out -> self_attn.o_proj, ff_proj -> mlp.gate_proj, up_proj -> mlp.up_proj, ff_out -> mlp.down_proj.

A config.json next to the weights (HF keys hidden_size, num_hidden_layers, num_attention_heads,
num_key_value_heads, vocab_size, num_experts, num_experts_per_tok, expert_intermediate_size /
moe_intermediate_size / intermediate_size, rope_theta, rms_norm_eps, mask_token_id) overrides the
registry shape; shapes are then checked tensor by tensor.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from moekern.diffusion.model import DiffusionConfig, DiffusionModel, LayerWeights, validate_config

_OLMO_TOP = {"model.transformer.wte.weight": "model.embed_tokens.weight",
             "model.transformer.ln_f.weight": "model.norm.weight",
             "model.transformer.ff_out.weight": "lm_head.weight"}
_OLMO_BLOCK = {"attn_norm": "input_layernorm", "ff_norm": "post_attention_layernorm", "q_proj": "self_attn.q_proj",
               "k_proj": "self_attn.k_proj", "v_proj": "self_attn.v_proj", "attn_out": "self_attn.o_proj",
               "ff_proj": "mlp.gate_proj", "up_proj": "mlp.up_proj", "ff_out": "mlp.down_proj"}
_OLMO_RE = re.compile(r"^model\.transformer\.blocks\.(\d+)\.(\w+)\.weight$")
_HF_CONFIG_KEYS = {"hidden_size": "hidden_size", "num_hidden_layers": "num_layers",
                   "num_attention_heads": "num_heads", "num_key_value_heads": "num_kv_heads",
                   "vocab_size": "vocab_size", "num_experts": "num_experts", "num_experts_per_tok": "top_k",
                   "rope_theta": "rope_theta", "rms_norm_eps": "rms_eps", "mask_token_id": "mask_id",
                   "head_dim": "head_dim"}


def canonical_name(name: str) -> str:
    """Map an OLMo/LLaDA-8B tensor name to the HF LLaDA-MoE name (others pass unchanged)."""
    if name in _OLMO_TOP:
        return _OLMO_TOP[name]
    m = _OLMO_RE.match(name)
    if m and m.group(2) in _OLMO_BLOCK:
        return f"model.layers.{m.group(1)}.{_OLMO_BLOCK[m.group(2)]}.weight"
    return name


def state_dict(model: DiffusionModel) -> dict[str, torch.Tensor]:
    """The model's weights under the expected names (experts unstacked), contiguous CPU tensors."""
    cfg = model.config
    out = {"model.embed_tokens.weight": model.embed, "model.norm.weight": model.final_norm,
           "lm_head.weight": model.lm_head}
    I = cfg.intermediate_size
    for i, lw in enumerate(model.layers):
        p = f"model.layers.{i}."
        out[p + "input_layernorm.weight"] = lw.input_norm
        out[p + "post_attention_layernorm.weight"] = lw.post_norm
        for n in ("q", "k", "v", "o"):
            out[p + f"self_attn.{n}_proj.weight"] = getattr(lw, n)
        if lw.q_norm is not None:
            out[p + "self_attn.q_norm.weight"] = lw.q_norm
            out[p + "self_attn.k_norm.weight"] = lw.k_norm
        if cfg.is_moe:
            out[p + "mlp.gate.weight"] = lw.router
            for e in range(cfg.num_experts):
                out[p + f"mlp.experts.{e}.gate_proj.weight"] = lw.w13[e, :I]
                out[p + f"mlp.experts.{e}.up_proj.weight"] = lw.w13[e, I:]
                out[p + f"mlp.experts.{e}.down_proj.weight"] = lw.w2[e]
        else:
            out[p + "mlp.gate_proj.weight"] = lw.gate_up[:I]
            out[p + "mlp.up_proj.weight"] = lw.gate_up[I:]
            out[p + "mlp.down_proj.weight"] = lw.down
    return {k: v.detach().to("cpu").contiguous() for k, v in out.items()}


def save_checkpoint(model: DiffusionModel, directory) -> Path:
    """Write model.safetensors (expected names) into directory; returns its path."""
    from safetensors.torch import save_file

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    path = d / "model.safetensors"
    save_file(state_dict(model), str(path))
    return path


def config_overrides_from_hf(directory) -> dict:
    """DiffusionConfig overrides read from directory/config.json (empty when there is none)."""
    p = Path(directory) / "config.json"
    if not p.is_file():
        return {}
    obj = json.loads(p.read_text(encoding="utf-8"))
    over = {field: obj[key] for key, field in _HF_CONFIG_KEYS.items() if obj.get(key) is not None}
    for key in ("expert_intermediate_size", "moe_intermediate_size", "intermediate_size"):
        if obj.get(key) is not None:
            over["intermediate_size"] = obj[key]
            break
    if "norm_topk_prob" in obj:
        over["renormalize"] = bool(obj["norm_topk_prob"])
    return over


def _read_tensors(directory) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    d = Path(directory)
    if not d.is_dir():
        raise FileNotFoundError(f"checkpoint directory {str(d)!r} does not exist")
    files = sorted(d.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in checkpoint directory {str(d)!r}")
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        for name, t in load_file(str(f)).items():
            key = canonical_name(name)
            if key in tensors:
                raise ValueError(f"tensor {key!r} appears twice in {str(d)!r} (second time in {f.name} as {name!r})")
            tensors[key] = t
    return tensors


def load_checkpoint(directory, config: DiffusionConfig, *, device="cpu", dtype=torch.bfloat16) -> DiffusionModel:
    """Load safetensors weights from `directory` into a DiffusionModel of `config` (shapes checked).

    Raises ValueError listing missing and unexpected tensor names, or the first shape mismatch.
    """
    validate_config(config)
    cfg = config
    H, nh, nkv, hd, I, E = (cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size,
                            cfg.num_experts)
    tensors = _read_tensors(directory)
    used: set[str] = set()

    def take(name: str, shape: tuple[int, ...], optional: bool = False):
        t = tensors.get(name)
        if t is None:
            if optional:
                return None
            missing.append(name)
            return None
        used.add(name)
        if tuple(t.shape) != shape:
            raise ValueError(f"tensor {name!r} must have shape {list(shape)} for config {cfg.name} "
                             f"(H={H}, heads={nh}/{nkv}, head_dim={hd}, I={I}, E={E}, V={cfg.vocab_size}); "
                             f"got {list(t.shape)}")
        return t.to(device=device, dtype=dtype)

    missing: list[str] = []
    embed = take("model.embed_tokens.weight", (cfg.vocab_size, H))
    final_norm = take("model.norm.weight", (H,))
    lm_head = take("lm_head.weight", (cfg.vocab_size, H))
    layers = []
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        lw = LayerWeights(input_norm=take(p + "input_layernorm.weight", (H,)),
                          q=take(p + "self_attn.q_proj.weight", (nh * hd, H)),
                          k=take(p + "self_attn.k_proj.weight", (nkv * hd, H)),
                          v=take(p + "self_attn.v_proj.weight", (nkv * hd, H)),
                          o=take(p + "self_attn.o_proj.weight", (H, nh * hd)),
                          post_norm=take(p + "post_attention_layernorm.weight", (H,)))
        if cfg.qk_norm:
            # per-head [hd] (LLaDA-MoE) or whole-projection [n*hd] (OLMoE) q/k norms
            for n, width in (("q", nh * hd), ("k", nkv * hd)):
                name = p + f"self_attn.{n}_norm.weight"
                shape = (hd,) if name in tensors and tuple(tensors[name].shape) == (hd,) else (width,)
                setattr(lw, f"{n}_norm", take(name, shape))
        if cfg.is_moe:
            lw.router = take(p + "mlp.gate.weight", (E, H))
            gates = [take(p + f"mlp.experts.{e}.gate_proj.weight", (I, H)) for e in range(E)]
            ups = [take(p + f"mlp.experts.{e}.up_proj.weight", (I, H)) for e in range(E)]
            downs = [take(p + f"mlp.experts.{e}.down_proj.weight", (H, I)) for e in range(E)]
            if not missing:
                lw.w13 = torch.stack([torch.cat([g, u]) for g, u in zip(gates, ups)]).contiguous()
                lw.w2 = torch.stack(downs).contiguous()
        else:
            g, u = take(p + "mlp.gate_proj.weight", (I, H)), take(p + "mlp.up_proj.weight", (I, H))
            lw.down = take(p + "mlp.down_proj.weight", (H, I))
            if not missing:
                lw.gate_up = torch.cat([g, u]).contiguous()
        layers.append(lw)
    unexpected = sorted(set(tensors) - used)
    if missing or unexpected:
        def few(names):
            return ", ".join(names[:6]) + (f", ... ({len(names)} in all)" if len(names) > 6 else "")
        raise ValueError(f"checkpoint {str(directory)!r} does not match config {cfg.name} "
                         f"({cfg.num_layers} layers, E={E}, qk_norm={cfg.qk_norm}): "
                         f"missing [{few(missing)}]; unexpected [{few(unexpected)}]")
    return DiffusionModel(cfg, embed, layers, final_norm, lm_head)
