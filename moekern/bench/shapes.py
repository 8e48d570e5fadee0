"""Benchmark shapes and inputs: one table that `moekern bench` and `pytest benchmarks/` both read.

Shapes come from the model registry (moekern.models, STANDARD_MODELS). Inputs are built once per
(op, model) at the largest token count and sliced for smaller ones, so the expert weights of a model
(DeepSeek-V3's w13 alone is 15 GB in bf16) are allocated once and freed before the next model.

The CPU demo uses "tiny" versions of the same models: the routing parameters (E, k, groups, scoring,
bias, scale) are the real ones, the hidden/expert widths are shrunk so the Triton interpreter finishes
in seconds.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from moekern.models import STANDARD_MODELS, ModelSpec, get_model
from moekern.models.registry import routing_kwargs

OPS = ("routing", "align", "moe")

# Token counts (M) per op. Modest on purpose: a GPU run of every op over the four standard models is
# meant to take a few minutes. moe includes 128, the CUDA-graph decode size of vLLM at max_num_seqs = 128: the
# size end-to-end runs spend most of their time at, and the one the table once served badly (experts/NOTES.md).
DEFAULT_TOKENS = {
    "routing": (1, 16, 64, 256, 1024, 4096, 16384),
    "align": (1, 64, 1024, 4096, 16384),
    "moe": (1, 8, 64, 128, 256, 1024, 4096, 8192),
}
DEFAULT_BLOCK_SIZES = (64,)

# CPU demo: tiny shapes the Triton interpreter runs in seconds.
DEMO_TOKENS = {"routing": (1, 6), "align": (5, 37), "moe": (3,)}
DEMO_BLOCK_SIZES = (16,)
DEMO_HIDDEN, DEMO_INTERMEDIATE = 128, 64


@dataclass(frozen=True)
class Shape:
    """One benchmarked problem. block_size is used by op="align" only (0 otherwise)."""

    op: str
    model: str
    num_tokens: int
    num_experts: int
    top_k: int
    hidden_size: int
    intermediate_size: int
    scoring: str = "softmax"
    renormalize: bool = True
    num_expert_group: int | None = None
    topk_group: int | None = None
    routed_scaling_factor: float = 1.0
    correction_bias: bool = False
    block_size: int = 0
    dtype: str = "bfloat16"

    @property
    def key(self) -> str:
        """Stable name, also the pytest-benchmark group: 'routing/mixtral/M=64', 'align/olmoe/M=64/B=64'."""
        k = f"{self.op}/{self.model}/M={self.num_tokens}"
        return k + (f"/B={self.block_size}" if self.op == "align" else "")

    def routing_kwargs(self) -> dict:
        """Keyword arguments for moekern.fused_topk besides logits, top_k and correction_bias (the registry's
        rule, moekern.models.registry.routing_kwargs, applied to this shape's routing fields)."""
        return routing_kwargs(self)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def tiny_spec(spec: ModelSpec) -> ModelSpec:
    """The same routing problem with hidden/expert widths small enough for the CPU interpreter."""
    return dataclasses.replace(spec, name=f"tiny-{spec.name}", hidden_size=DEMO_HIDDEN,
                               intermediate_size=DEMO_INTERMEDIATE, aliases=())


def resolve_model(name: str, *, tiny: bool = False) -> ModelSpec:
    """Registry model by name or alias; 'tiny-<name>' (or tiny=True) gives the shrunk demo version."""
    if name.startswith("tiny-"):
        return tiny_spec(get_model(name[len("tiny-"):]))
    spec = get_model(name)
    if not spec.is_moe:
        raise ValueError(f"model={name!r} is dense (num_experts=0); the bench needs an MoE model")
    return tiny_spec(spec) if tiny else spec


def make_shape(op: str, spec: ModelSpec, num_tokens: int, block_size: int = 0) -> Shape:
    if op not in OPS:
        raise ValueError(f"op={op!r} must be one of {OPS}")
    return Shape(
        op=op, model=spec.name, num_tokens=int(num_tokens), num_experts=spec.num_experts, top_k=spec.top_k,
        hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size, scoring=spec.scoring,
        renormalize=spec.renormalize, num_expert_group=spec.num_expert_group, topk_group=spec.topk_group,
        routed_scaling_factor=float(spec.routed_scaling_factor), correction_bias=spec.correction_bias,
        block_size=int(block_size) if op == "align" else 0,
    )


def bench_shapes(
    ops=OPS, models=STANDARD_MODELS, tokens: dict | tuple | None = None, block_sizes=DEFAULT_BLOCK_SIZES,
    *, tiny: bool = False,
) -> list[Shape]:
    """Every shape to measure, ordered op -> model -> M (-> block size), the order inputs are built in.

    tokens: None (DEFAULT_TOKENS, or DEMO_TOKENS when tiny), a tuple for every op, or {op: tuple}.
    """
    out = []
    for op in ops:
        if op not in OPS:
            raise ValueError(f"op={op!r} must be one of {OPS}")
        if tokens is None:
            op_tokens = (DEMO_TOKENS if tiny else DEFAULT_TOKENS)[op]
        elif isinstance(tokens, dict):
            op_tokens = tokens[op]
        else:
            op_tokens = tuple(tokens)
        for name in models:
            spec = resolve_model(name, tiny=tiny)
            for m in sorted(set(op_tokens)):
                if m < 1:
                    raise ValueError(f"tokens must be >= 1; got {m}")
                for b in (block_sizes if op == "align" else (0,)):
                    out.append(make_shape(op, spec, m, b))
    return out


@dataclass
class Inputs:
    """Tensors for one (op, model), first num_tokens rows. Built by make_inputs, sliced by .first(M).

    logits: [M, E] bf16 router logits; correction_bias: [E] fp32 (bf16-representable, so a library that
    takes a bf16 bias sees the same numbers) or None; topk_weights [M, k] fp32 / topk_ids [M, k] int32:
    the reference routing of logits (inputs of align and moe); hidden: [M, H] bf16, w13: [E, 2I, H] bf16
    (gate rows 0:I, up rows I:2I), w2: [E, H, I] bf16 for op="moe" (None otherwise).
    cache: per-model derived tensors a provider builds once (FlashInfer's [up; gate] weights).
    """

    num_tokens: int
    logits: torch.Tensor
    correction_bias: torch.Tensor | None
    topk_weights: torch.Tensor
    topk_ids: torch.Tensor
    hidden: torch.Tensor | None = None
    w13: torch.Tensor | None = None
    w2: torch.Tensor | None = None
    cache: dict = field(default_factory=dict)

    def first(self, m: int) -> Inputs:
        """Views of the first m tokens; weights, bias and cache are shared."""
        return Inputs(m, self.logits[:m], self.correction_bias, self.topk_weights[:m], self.topk_ids[:m],
                      None if self.hidden is None else self.hidden[:m], self.w13, self.w2, self.cache)

    def copy_activations(self) -> Inputs:
        """Fresh copies of the per-token tensors (new addresses; same values), for rotating inputs."""
        return Inputs(self.num_tokens, self.logits.clone(), self.correction_bias, self.topk_weights.clone(),
                      self.topk_ids.clone(), None if self.hidden is None else self.hidden.clone(),
                      self.w13, self.w2, self.cache)

    def activation_bytes(self, op: str) -> int:
        """Bytes of the tensors op reads per call, besides weights."""
        if op == "routing":
            return self.logits.numel() * self.logits.element_size()
        if op == "align":
            return self.topk_ids.numel() * 4
        return self.hidden.numel() * self.hidden.element_size() + self.topk_ids.numel() * 8


def make_inputs(shape: Shape, max_tokens: int, device, seed: int = 0) -> Inputs:
    """Random inputs for shape's (op, model) with max_tokens rows; deterministic in seed."""
    from moekern.routing.reference import fused_topk_reference

    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    E, k = shape.num_experts, shape.top_k
    logits = torch.randn(max_tokens, E, generator=gen, device=device, dtype=torch.float32).to(torch.bfloat16)
    bias = None
    if shape.correction_bias:
        bias = (0.1 * torch.randn(E, generator=gen, device=device)).to(torch.bfloat16).float()
    w, ids, _ = fused_topk_reference(logits, k, correction_bias=bias, **shape.routing_kwargs())
    inp = Inputs(max_tokens, logits, bias, w, ids)
    if shape.op == "moe":
        H, inter = shape.hidden_size, shape.intermediate_size
        # The CPU demo runs Triton's interpreter, whose bf16 dot products are not faithful: fp32 there.
        act = torch.bfloat16 if device.type == "cuda" else torch.float32
        inp.hidden = torch.randn(max_tokens, H, generator=gen, device=device, dtype=act)
        # Scaled so every layer's output stays O(1): relative errors then mean what they say.
        inp.w13 = torch.randn(E, 2 * inter, H, generator=gen, device=device, dtype=act).mul_(H ** -0.5)
        inp.w2 = torch.randn(E, H, inter, generator=gen, device=device, dtype=act).mul_(inter ** -0.5)
    return inp
