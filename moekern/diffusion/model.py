"""The LLaDA-style transformer: bidirectional attention, RMSNorm, rotary embeddings, MoE (or dense SwiGLU) FFN.

One forward maps token ids [B, T] to logits; `causal=True` runs the same layers with a causal mask (the
autoregressive baseline of `moekern diffusion bench`). The MoE FFN is routed by moekern.fused_topk (whose
expert_counts feed the gate logs at no extra kernel) and its experts run on one of three backends:

  "moekern"  moekern.fused_moe with precomputed ids (kernels: "auto" | "triton" | "cuda"; on a CPU "auto"
             resolves to the torch path, use "triton" under TRITON_INTERPRET=1 to run the kernels);
  "vllm"     vLLM's fused_experts (Triton) on the same routing, imported lazily; CUDA only;
  "torch"    the plain reference (fused_topk backend="torch" + the per-expert loop of fused_moe's torch path).

All three route identically (moekern.fused_topk), so a backend comparison times the experts, not a
different router. The layer follows HF LLaDA-MoE (modeling_lladamoe.py, as far as public descriptions tell):
pre-norm blocks, q/k RMSNorm over each head (qk_norm, LLaDA-MoE only), full rotary (rotate-half form),
softmax top-k router without renormalization (the registry's `renormalize`), no shared expert.
Weights are a plain dataclass; see moekern.diffusion.checkpoint for the tensor names.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F

MOE_BACKENDS = ("moekern", "vllm", "torch")
KERNEL_BACKENDS = ("auto", "triton", "cuda")
# Mask token ids of the published checkpoints (tokenizer special tokens); tiny models use vocab_size - 1.
KNOWN_MASK_IDS = {"llada-moe-7b": 156895, "llada-8b": 126336}
# Values of the published config.json files the registry does not carry.
KNOWN_RMS_EPS = {"llada-moe-7b": 1e-5, "llada-8b": 1e-5}
KNOWN_QK_NORM = {"llada-moe-7b": True, "llada-8b": False}


@dataclass(frozen=True)
class DiffusionConfig:
    """Shape and constants of one LLaDA-style model. `num_experts == 0` means a dense SwiGLU FFN."""

    name: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int  # per expert (dense FFN width when num_experts == 0)
    num_experts: int
    top_k: int
    mask_id: int
    rope_theta: float = 10000.0
    rms_eps: float = 1e-5
    qk_norm: bool = False
    scoring: str = "softmax"
    renormalize: bool = False
    routed_scaling_factor: float = 1.0

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    def routing_kwargs(self) -> dict:
        return {"scoring": self.scoring, "renormalize": self.renormalize,
                "routed_scaling_factor": self.routed_scaling_factor}


def config_from_registry(model: str = "llada-moe-7b", **overrides) -> DiffusionConfig:
    """A DiffusionConfig from moekern.models.get_model(model), with size overrides for tiny models.

    overrides: any DiffusionConfig field (num_layers, hidden_size, num_experts, vocab_size, ...). When
    hidden_size or num_heads is overridden and head_dim is not, head_dim = hidden_size // num_heads. The
    mask id is the checkpoint's when it fits the vocabulary, else vocab_size - 1.
    """
    from moekern.models import get_model

    spec = get_model(model)
    unknown = sorted(set(overrides) - set(DiffusionConfig.__dataclass_fields__))
    if unknown:
        raise TypeError(f"unknown config override(s) {unknown}; fields: {sorted(DiffusionConfig.__dataclass_fields__)}")
    if spec.is_mla or spec.num_shared_experts or spec.first_k_dense:
        raise ValueError(f"model={model!r}: the diffusion engine covers LLaDA-style models (plain attention, routed "
                         "experts only); this spec has MLA, shared experts or leading dense layers")
    over = {k: v for k, v in overrides.items() if v is not None}
    hidden = over.get("hidden_size", spec.hidden_size)
    heads = over.get("num_heads", spec.num_heads)
    if "head_dim" not in over:
        sized = "hidden_size" in over or "num_heads" in over
        over["head_dim"] = hidden // heads if (sized or not spec.head_dim) else spec.head_dim
    if "num_kv_heads" not in over:
        over["num_kv_heads"] = heads if spec.num_kv_heads == spec.num_heads else min(spec.num_kv_heads, heads)
    vocab = over.get("vocab_size", spec.vocab_size)
    if "mask_id" not in over:
        known = KNOWN_MASK_IDS.get(spec.name)
        over["mask_id"] = known if known is not None and known < vocab else vocab - 1
    base = dict(name=spec.name, vocab_size=spec.vocab_size, hidden_size=spec.hidden_size,
                num_layers=spec.num_layers, num_heads=spec.num_heads, num_kv_heads=spec.num_kv_heads,
                head_dim=spec.head_dim or spec.hidden_size // spec.num_heads,
                intermediate_size=spec.intermediate_size, num_experts=spec.num_experts, top_k=spec.top_k,
                mask_id=-1, rope_theta=spec.rope_theta, rms_eps=KNOWN_RMS_EPS.get(spec.name, 1e-5),
                qk_norm=KNOWN_QK_NORM.get(spec.name, False), scoring=spec.scoring,
                renormalize=spec.renormalize, routed_scaling_factor=spec.routed_scaling_factor)
    base.update(over)
    cfg = DiffusionConfig(**base)
    validate_config(cfg)
    return cfg


def validate_config(cfg: DiffusionConfig) -> None:
    for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                 "intermediate_size"):
        v = getattr(cfg, name)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name}={v!r} must be a positive int")
    if cfg.head_dim % 2:
        raise ValueError(f"head_dim={cfg.head_dim} must be even (rotary embeddings rotate pairs)")
    if cfg.num_heads % cfg.num_kv_heads:
        raise ValueError(f"num_kv_heads={cfg.num_kv_heads} must divide num_heads={cfg.num_heads}")
    if cfg.num_experts < 0:
        raise ValueError(f"num_experts={cfg.num_experts} must be >= 0 (0 = dense FFN)")
    if cfg.is_moe and not 1 <= cfg.top_k <= cfg.num_experts:
        raise ValueError(f"top_k={cfg.top_k} must be in [1, num_experts={cfg.num_experts}]")
    if not 0 <= cfg.mask_id < cfg.vocab_size:
        raise ValueError(f"mask_id={cfg.mask_id} must lie in [0, vocab_size={cfg.vocab_size})")


@dataclass
class LayerWeights:
    """One block. Shapes: norms [H]; q [nh*hd, H]; k, v [nkv*hd, H]; o [H, nh*hd]; q_norm, k_norm [hd] or
    None; MoE: router [E, H], w13 [E, 2I, H] (gate rows then up rows), w2 [E, H, I]; dense: gate_up [2I, H],
    down [H, I]. Linear weights are [out, in] as in nn.Linear."""

    input_norm: torch.Tensor
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    o: torch.Tensor
    post_norm: torch.Tensor
    q_norm: torch.Tensor | None = None
    k_norm: torch.Tensor | None = None
    router: torch.Tensor | None = None
    w13: torch.Tensor | None = None
    w2: torch.Tensor | None = None
    gate_up: torch.Tensor | None = None
    down: torch.Tensor | None = None


@dataclass
class DiffusionModel:
    """config + weights: embed [V, H], layers, final_norm [H], lm_head [V, H]."""

    config: DiffusionConfig
    embed: torch.Tensor
    layers: list[LayerWeights]
    final_norm: torch.Tensor
    lm_head: torch.Tensor

    @property
    def device(self) -> torch.device:
        return self.embed.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.dtype


def init_random(cfg: DiffusionConfig, *, device="cpu", dtype=torch.float32, seed: int = 0) -> DiffusionModel:
    """Random weights (N(0, 1/fan_in) linears, N(0, 1) embeddings, norms near 1) -- for timing and tests.

    The scale keeps activations O(1) through depth so that logits, router scores and confidences are
    spread out rather than saturated; it says nothing about a trained model's routing.
    """
    validate_config(cfg)
    g = torch.Generator(device=device).manual_seed(seed)
    H, nh, nkv, hd, inter, E = (cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                                cfg.intermediate_size, cfg.num_experts)

    def lin(*shape):
        return (torch.randn(*shape, generator=g, device=device, dtype=torch.float32) / math.sqrt(shape[-1])).to(dtype)

    def norm(n):
        return (1.0 + 0.1 * torch.randn(n, generator=g, device=device, dtype=torch.float32)).to(dtype)

    layers = []
    for _ in range(cfg.num_layers):
        lw = LayerWeights(input_norm=norm(H), q=lin(nh * hd, H), k=lin(nkv * hd, H), v=lin(nkv * hd, H),
                          o=lin(H, nh * hd), post_norm=norm(H))
        if cfg.qk_norm:
            lw.q_norm, lw.k_norm = norm(hd), norm(hd)
        if cfg.is_moe:
            lw.router, lw.w13, lw.w2 = lin(E, H), lin(E, 2 * inter, H), lin(E, H, inter)
        else:
            lw.gate_up, lw.down = lin(2 * inter, H), lin(H, inter)
        layers.append(lw)
    embed = torch.randn(cfg.vocab_size, H, generator=g, device=device, dtype=torch.float32).to(dtype)
    return DiffusionModel(cfg, embed, layers, norm(H), lin(cfg.vocab_size, H))


# ---------------------------------------------------------------------------------------- MoE backends
def moe_backend_unavailable_reason(moe_backend: str, device, kernels: str = "auto") -> str | None:
    """Why the MoE backend cannot run on `device`, or None when it can."""
    from moekern._ext import backend_unavailable_reason

    device = torch.device(device)
    if moe_backend not in MOE_BACKENDS:
        raise ValueError(f"moe_backend={moe_backend!r} must be one of {MOE_BACKENDS}")
    if kernels not in KERNEL_BACKENDS:
        raise ValueError(f"kernels={kernels!r} must be one of {KERNEL_BACKENDS}")
    if moe_backend == "torch":
        return None
    if moe_backend == "moekern":
        return None if kernels == "auto" else backend_unavailable_reason(kernels, device)
    if device.type != "cuda":
        return f"vLLM's fused_experts needs CUDA tensors; got device={device}"
    try:
        from vllm.model_executor.layers.fused_moe import fused_experts  # noqa: F401
    except Exception as exc:  # ImportError, or vLLM failing to initialise on this machine
        return f"vLLM is not importable ({type(exc).__name__}: {exc})"
    return None


@dataclass
class ForwardStats:
    """Filled by forward(): per MoE layer expert_counts [E] int32 (device tensors, from fused_topk), and
    the FFN times (CUDA event pairs on a GPU, perf_counter seconds on a CPU). `time_ffn=False` skips timing."""

    time_ffn: bool = True
    expert_counts: list[torch.Tensor] = field(default_factory=list)
    num_tokens: int = 0  # tokens through the FFN (padding excluded)
    _events: list = field(default_factory=list)
    _cpu_s: float = 0.0

    def ffn_seconds(self) -> float:
        """Total FFN time; on a GPU call after a synchronize (reads the events)."""
        return self._cpu_s + sum(a.elapsed_time(b) for a, b in self._events) / 1e3


def _moe_ffn(h: torch.Tensor, lw: LayerWeights, cfg: DiffusionConfig, moe_backend: str, kernels: str,
             stats: ForwardStats | None) -> torch.Tensor:
    import moekern

    router_logits = h @ lw.router.t()
    if moe_backend == "torch":
        stage = "torch"
    elif kernels == "auto":
        stage = "auto"
    else:
        stage = kernels
    routing = moekern.fused_topk(router_logits, cfg.top_k, backend=stage, **cfg.routing_kwargs())
    if stats is not None:
        stats.expert_counts.append(routing.expert_counts)
    if moe_backend == "vllm":
        from vllm.model_executor.layers.fused_moe import fused_experts

        return fused_experts(h, lw.w13, lw.w2, routing.topk_weights, routing.topk_ids)
    # The ids come from the router, in range by construction: skip fused_moe's host-syncing range check.
    backend = "torch" if moe_backend == "torch" else kernels
    return moekern.fused_moe(h, lw.w13, lw.w2, topk_weights=routing.topk_weights, topk_ids=routing.topk_ids,
                             expert_counts=routing.expert_counts, backend=backend, check_ids=False)


def _dense_ffn(h: torch.Tensor, lw: LayerWeights) -> torch.Tensor:
    gate, up = (h @ lw.gate_up.t()).chunk(2, dim=-1)
    return (F.silu(gate) * up) @ lw.down.t()


def _ffn(h, lw, cfg, moe_backend, kernels, stats):
    """h: [N, H] -> [N, H]; timed as one unit (router GEMM + routing + experts + combine)."""
    timing = stats is not None and stats.time_ffn
    if timing and h.is_cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
    elif timing:
        t0 = time.perf_counter()
    out = _moe_ffn(h, lw, cfg, moe_backend, kernels, stats) if cfg.is_moe else _dense_ffn(h, lw)
    if timing and h.is_cuda:
        end.record()
        stats._events.append((start, end))
    elif timing:
        stats._cpu_s += time.perf_counter() - t0
    return out


# ---------------------------------------------------------------------------------------------- layers
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x: [..., D] -> same dtype; statistics in fp32."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight


def rope_tables(positions: torch.Tensor, head_dim: int, theta: float, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """positions: [B, T] int -> (cos, sin) [B, 1, T, head_dim], rotate-half layout (HF LLaMA convention)."""
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    ang = positions.to(torch.float32)[..., None] * inv  # [B, T, hd/2]
    ang = torch.cat((ang, ang), dim=-1)[:, None]
    return ang.cos().to(dtype), ang.sin().to(dtype)


def _apply_rope(x, cos, sin):
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def _head_norm(x: torch.Tensor, w: torch.Tensor | None, eps: float) -> torch.Tensor:
    """q/k norm over each head ([hd] weight) or over the whole projection ([n*hd] weight, OLMoE-style)."""
    if w is None:
        return x
    if w.shape[0] == x.shape[-1]:
        return rms_norm(x, w, eps)
    B, T, n, hd = x.shape
    return rms_norm(x.reshape(B, T, n * hd), w, eps).reshape(B, T, n, hd)


def _attention(x, lw, cfg, cos, sin, attn_mask, causal):
    B, T, _ = x.shape
    nh, nkv, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    q = _head_norm((x @ lw.q.t()).view(B, T, nh, hd), lw.q_norm, cfg.rms_eps).transpose(1, 2)
    k = _head_norm((x @ lw.k.t()).view(B, T, nkv, hd), lw.k_norm, cfg.rms_eps).transpose(1, 2)
    v = (x @ lw.v.t()).view(B, T, nkv, hd).transpose(1, 2)
    q, k = _apply_rope(q, cos, sin), _apply_rope(k, cos, sin)
    if nkv != nh:
        k, v = k.repeat_interleave(nh // nkv, dim=1), v.repeat_interleave(nh // nkv, dim=1)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=causal and attn_mask is None)
    return out.transpose(1, 2).reshape(B, T, nh * hd) @ lw.o.t()


def forward(
    model: DiffusionModel,
    tokens: torch.Tensor,
    *,
    valid: torch.Tensor | None = None,
    causal: bool = False,
    logits_slice: slice | None = None,
    moe_backend: str = "moekern",
    kernels: str = "auto",
    stats: ForwardStats | None = None,
) -> torch.Tensor:
    """tokens: [B, T] int64 in [0, V); valid: [B, T] bool or None (False = left padding: masked out as a key,
    skipped by the FFN, positions count real tokens only); causal: causal attention (the AR baseline).
    logits_slice: the sequence positions whose logits are needed (default all) -- the LM head over a
    157k vocabulary is the largest GEMM, and denoising needs only the current block.

    Returns logits [B, T', V] fp32 for the sliced positions.
    """
    cfg = model.config
    B, T = tokens.shape
    x = model.embed[tokens]
    if valid is None or bool(valid.all()):
        valid_rows = None
        positions = torch.arange(T, device=tokens.device).expand(B, T)
        attn_mask = None  # SDPA's is_causal covers the causal case
    else:
        valid_rows = valid.reshape(-1).nonzero().squeeze(1)
        positions = (valid.long().cumsum(1) - 1).clamp_min(0)
        attn_mask = valid[:, None, None, :].expand(B, 1, T, T)
        if causal:
            attn_mask = attn_mask & torch.ones(T, T, dtype=torch.bool, device=tokens.device).tril()
    cos, sin = rope_tables(positions, cfg.head_dim, cfg.rope_theta, x.dtype)
    for lw in model.layers:
        x = x + _attention(rms_norm(x, lw.input_norm, cfg.rms_eps), lw, cfg, cos, sin, attn_mask, causal)
        h = rms_norm(x, lw.post_norm, cfg.rms_eps).reshape(B * T, -1)
        if valid_rows is None:
            x = x + _ffn(h, lw, cfg, moe_backend, kernels, stats).view(B, T, -1)
        else:
            # Padding rows skip the FFN: they would cost expert work and pollute the gate log.
            delta = torch.zeros_like(h)
            delta[valid_rows] = _ffn(h[valid_rows], lw, cfg, moe_backend, kernels, stats)
            x = x + delta.view(B, T, -1)
    if stats is not None:
        stats.num_tokens = B * T if valid_rows is None else int(valid_rows.numel())
    if logits_slice is not None:
        x = x[:, logits_slice]
    return (rms_norm(x, model.final_norm, cfg.rms_eps) @ model.lm_head.t()).float()


def with_dtype(model: DiffusionModel, dtype: torch.dtype) -> DiffusionModel:
    """A copy of the model with every weight cast to dtype."""
    cast = (lambda t: None if t is None else t.to(dtype))
    layers = [LayerWeights(**{k: cast(v) for k, v in vars(lw).items()}) for lw in model.layers]
    return replace(model, embed=cast(model.embed), layers=layers, final_norm=cast(model.final_norm),
                   lm_head=cast(model.lm_head))
