"""moekern.fused_moe: a whole MoE layer (route, align, gate-up GEMM + SiLU-and-mul, down GEMM, combine).

Backends (one argument selects all stages):
  "torch"  fused_topk(backend="torch") + moekern.experts.reference.fused_moe_reference (per-expert loop,
           fp32 math). No alignment needed.
  "triton" fused_topk(backend="triton") + moekern.align(backend="triton") + our Triton grouped GEMMs.
  "cuda"   moekern.route_and_align(backend="cuda") (routing + align in one launch at decode sizes) + our
           Triton grouped GEMMs: moekern has no CUDA GEMM of its own; "cuda" selects the compiled
           routing/align kernels only. Precomputed topk_ids: moekern.align(backend="cuda").
  "auto"   on a CUDA tensor: routing and align pick their own best ("auto"), experts run in Triton;
           on CPU: "torch" (use backend="triton" with TRITON_INTERPRET=1 to run the kernels on CPU).
"""

from __future__ import annotations

import functools

import torch

from moekern._checks import check_topk_pair
from moekern._ext import BACKENDS, backend_unavailable_reason, resolve_backend
from moekern.experts.configs import BlockConfig, get_configs
from moekern.routing.api import MAX_TOPK

WEIGHT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
ROUTING_KWARGS = ("scoring", "renormalize", "correction_bias", "num_expert_group", "topk_group",
                  "routed_scaling_factor")


def _shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def _validate_weights(hidden_states, w13, w2) -> tuple[int, int, int, int]:
    """Returns (M, H, E, I); raises TypeError/ValueError naming the argument, expected and got."""
    for name, t in (("hidden_states", hidden_states), ("w13", w13), ("w2", w2)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor; got {type(t).__name__}")
    if hidden_states.dim() != 2:
        raise ValueError(f"hidden_states must be 2-D [M, H]; got shape {_shape(hidden_states)}")
    if w13.dim() != 3:
        raise ValueError(f"w13 must be 3-D [E, 2I, H]; got shape {_shape(w13)}")
    if w2.dim() != 3:
        raise ValueError(f"w2 must be 3-D [E, H, I]; got shape {_shape(w2)}")
    M, H = hidden_states.shape
    E, two_i, w13_h = w13.shape
    if E < 1:
        raise ValueError(f"w13 must hold at least one expert; got shape {_shape(w13)}")
    if two_i < 2 or two_i % 2:
        raise ValueError(f"w13.shape[1] = 2I (gate rows then up rows) must be even and >= 2; got {two_i}")
    inter = two_i // 2
    if w13_h != H:
        raise ValueError(f"w13 must have shape [E, 2I, H={H}] (H from hidden_states); got {_shape(w13)}")
    if _shape(w2) != (E, H, inter):
        raise ValueError(f"w2 must have shape [E={E}, H={H}, I={inter}] to match w13 {_shape(w13)}; got {_shape(w2)}")
    if hidden_states.dtype not in WEIGHT_DTYPES:
        raise TypeError(f"hidden_states must be bfloat16, float16 or float32; got {hidden_states.dtype}")
    for name, t in (("w13", w13), ("w2", w2)):
        if t.dtype != hidden_states.dtype:
            raise TypeError(f"{name}.dtype must equal hidden_states.dtype={hidden_states.dtype}; got {t.dtype}")
        if t.device != hidden_states.device:
            raise ValueError(f"{name} is on {t.device} but hidden_states is on {hidden_states.device}")
        if not t.is_contiguous():
            # A silent copy of an expert weight stack can be gigabytes; make the caller decide.
            raise ValueError(f"{name} must be contiguous; got strides {t.stride()} for shape {_shape(t)}")
    return M, H, E, inter


def _validate_precomputed(topk_weights, topk_ids, M: int, E: int, top_k, check_range: bool) -> int:
    if topk_weights is None or topk_ids is None:
        raise ValueError("topk_weights and topk_ids go together; got only "
                         + ("topk_ids" if topk_weights is None else "topk_weights"))
    k = check_topk_pair(topk_ids, topk_weights, M)
    if k > E:
        raise ValueError(f"top_k={k} (topk_ids.shape[1]) must be <= num_experts={E}")
    if top_k is not None and top_k != k:
        raise ValueError(f"top_k={top_k} disagrees with topk_ids.shape[1]={k}")
    if check_range and topk_ids.numel():
        lo, hi = int(topk_ids.min()), int(topk_ids.max())
        if lo < 0 or hi >= E:
            raise ValueError(f"topk_ids must lie in [0, num_experts={E}); got values in [{lo}, {hi}]")
    return k


def fused_moe(
    hidden_states: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    router_logits: torch.Tensor | None = None,
    top_k: int | None = None,
    *,
    topk_weights: torch.Tensor | None = None,
    topk_ids: torch.Tensor | None = None,
    expert_counts: torch.Tensor | None = None,
    backend: str = "auto",
    block_config: BlockConfig | tuple[BlockConfig, BlockConfig] | None = None,
    check_ids: bool = True,
    **routing_kwargs,
) -> torch.Tensor:
    """One MoE layer: out[t] = sum_j w[t,j] * (silu(x_t W_gate[e]^T) * (x_t W_up[e]^T)) W_down[e]^T, e = ids[t,j].

    hidden_states: [M, H] bf16|fp16|fp32 (fp32 for tests; the Triton path runs fp32 dots in IEEE mode).
    w13: [E, 2I, H], gate rows 0:I then up rows I:2I (vLLM's layout); w2: [E, H, I]; both contiguous and
      of hidden_states' dtype and device.
    Routing, either
      router_logits: [M, E] fp32|fp16|bf16 and top_k, routed by moekern.fused_topk with routing_kwargs
        (scoring, renormalize, correction_bias, num_expert_group, topk_group, routed_scaling_factor), or
      topk_weights: [M, k] float and topk_ids: [M, k] int32|int64 precomputed (benchmarks isolate the
        experts this way); ids must lie in [0, E) (checked on CPU tensors and on the torch backend; on
        the GPU kernel path the check would cost a host sync, so it is the caller's duty).
      expert_counts: [E] int32, optional with precomputed ids: the histogram of topk_ids (fused_topk's
        expert_counts), so align skips its histogram pass. Compared with bincount(topk_ids) when
        check_ids is on; otherwise the caller vouches for it (a wrong histogram misplaces tokens).
    backend: "auto" | "torch" | "triton" | "cuda" (see the module doc; "cuda" runs our Triton experts).
    block_config: a BlockConfig for both GEMMs or a (gemm1, gemm2) pair with equal block_m; default:
      moekern.experts.configs.get_configs.
    check_ids: range-check precomputed topk_ids (one min/max: a host sync on a GPU). Pass False for
      CUDA-graph capture or benchmarks when the ids are known good: an id outside [0, E) then reads and
      writes out of bounds. Ids made by the routing stage are in range by construction and never checked.

    Returns [M, H] in hidden_states' dtype. Intermediates (silu(gate)*up, per-slot outputs) are rounded to
    that dtype; accumulation is fp32 and the k-way combine sums in fp32.
    """
    M, H, E, inter = _validate_weights(hidden_states, w13, w2)
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} must be one of {BACKENDS}")
    unknown = sorted(set(routing_kwargs) - set(ROUTING_KWARGS))
    if unknown:
        raise TypeError(f"fused_moe got unexpected keyword argument(s) {unknown}; routing takes {ROUTING_KWARGS}")
    dev = hidden_states.device

    if backend == "auto":
        if dev.type == "cuda" and backend_unavailable_reason("triton", dev) is None:
            expert_backend, stage_backend = "triton", "auto"
        else:
            expert_backend = stage_backend = "torch"
    else:
        if backend == "cuda":  # CUDA routing and align, then Triton GEMMs: both must run here
            resolve_backend("cuda", dev)
        resolve_backend("triton" if backend == "cuda" else backend, dev)  # raises when unavailable
        expert_backend = "torch" if backend == "torch" else "triton"
        stage_backend = backend

    precomputed = topk_weights is not None or topk_ids is not None
    if precomputed:
        if router_logits is not None:
            raise ValueError("pass either router_logits (+ top_k) or precomputed topk_weights/topk_ids, not both")
        if routing_kwargs:
            raise ValueError(f"routing arguments {sorted(routing_kwargs)} have no effect with precomputed topk_ids")
        k = _validate_precomputed(topk_weights, topk_ids, M, E, top_k, check_ids)
        expert_counts = _validate_counts(expert_counts, topk_ids, E, check_ids)
        for name, t in (("topk_weights", topk_weights), ("topk_ids", topk_ids)):
            if t.device != dev:
                raise ValueError(f"{name} is on {t.device} but hidden_states is on {dev}")
    else:
        if router_logits is None:
            raise ValueError("fused_moe needs router_logits [M, E] with top_k, or topk_weights and topk_ids")
        if top_k is None:
            raise ValueError("top_k is required when router_logits is given")
        if not isinstance(router_logits, torch.Tensor):
            raise TypeError(f"router_logits must be a torch.Tensor [M, E]; got {type(router_logits).__name__}")
        if router_logits.dim() != 2 or _shape(router_logits) != (M, E):
            raise ValueError(f"router_logits must have shape [M={M}, E={E}]; got {_shape(router_logits)}")
        if router_logits.device != dev:
            raise ValueError(f"router_logits is on {router_logits.device} but hidden_states is on {dev}")
        if expert_counts is not None:
            raise ValueError("expert_counts goes with precomputed topk_ids; routing from router_logits makes its own")
        k = top_k

    # top_k that is not an int >= 1 gets no configs: the routing call below raises the error that names it
    valid_k = isinstance(k, int) and k >= 1
    cfg1, cfg2 = get_configs(M, E, k, inter, H, hidden_states.dtype, dev, block_config) if valid_k else (None, None)
    aligned = None
    if not precomputed:
        if (valid_k and k <= MAX_TOPK and expert_backend == "triton"
                and _align_backend(stage_backend, dev, E) == "cuda"):
            # routing and align in one launch at decode sizes (moekern.route_and_align); past the routing kernels'
            # top_k limit fused_topk's "auto" falls back to torch, so the branch below routes
            from moekern.dispatch.route_align import route_and_align

            r = route_and_align(router_logits, top_k, block_size=cfg1.block_m, backend="cuda", **routing_kwargs)
            topk_weights, topk_ids, expert_counts, aligned = r.topk_weights, r.topk_ids, r.expert_counts, r[3:]
        else:
            from moekern.routing import fused_topk

            routing = fused_topk(router_logits, top_k, backend=stage_backend, **routing_kwargs)
            topk_weights, topk_ids, expert_counts = routing.topk_weights, routing.topk_ids, routing.expert_counts
    if M == 0:
        return hidden_states.new_empty(0, H)
    if expert_backend == "torch":
        from moekern.experts.reference import fused_moe_reference

        return fused_moe_reference(hidden_states, w13, w2, topk_weights, topk_ids)
    if hidden_states.stride(1) != 1:
        hidden_states = hidden_states.contiguous()
    return _fused_moe_impl(hidden_states, w13, w2, topk_weights, topk_ids, expert_counts, cfg1, cfg2,
                           _align_backend(stage_backend, dev, E), aligned)


@functools.lru_cache(maxsize=64)
def _align_backend(stage_backend: str, device: torch.device, num_experts: int) -> str:
    """The backend align would choose (moekern.dispatch.api._choose), resolved once per (backend, device, E)."""
    from moekern.dispatch.api import MAX_EXPERTS

    in_limits = num_experts <= MAX_EXPERTS
    chosen = resolve_backend(stage_backend, device, cuda_ok=in_limits, triton_ok=in_limits)
    # Out of the kernels' limits: the public align (called with this backend) raises as it always did.
    return chosen if in_limits else f"public:{chosen}"


def _validate_counts(expert_counts, topk_ids, E: int, check: bool):
    """The same checks moekern.align makes of expert_counts; the histogram comparison only when check."""
    from moekern.dispatch.api import _check_counts_match, _check_expert_counts

    expert_counts = _check_expert_counts(expert_counts, E, topk_ids)
    if expert_counts is not None and check:
        _check_counts_match(expert_counts, topk_ids, E)
    return expert_counts


def _fused_moe_impl(hidden_states, w13, w2, topk_weights, topk_ids, expert_counts, cfg1: BlockConfig,
                    cfg2: BlockConfig, align_backend: str, aligned=None) -> torch.Tensor:
    """The Triton path after fused_moe validated everything once: no checks, no host syncs, no copies of
    inputs that are already in the kernels' layout. hidden_states: [M>0, H] with K stride 1. aligned: the
    align outputs for block size cfg1.block_m when route_and_align already made them."""
    from moekern.experts.triton_gemm import moe_experts_triton

    num_experts = w13.shape[0]
    top_k = topk_ids.shape[1]
    if topk_ids.dtype != torch.int32:
        topk_ids = topk_ids.to(torch.int32)
    if not topk_ids.is_contiguous():
        topk_ids = topk_ids.contiguous()
    # Ranges were checked by fused_moe (or hold by construction); align must not sync again.
    if aligned is not None:
        pass
    elif align_backend == "cuda":
        from moekern.dispatch.cuda_ops import align_cuda

        aligned = align_cuda(topk_ids, num_experts, cfg1.block_m, expert_counts)
    elif align_backend == "triton":
        from moekern.dispatch.triton_ops import align_triton

        aligned = align_triton(topk_ids, num_experts, cfg1.block_m, expert_counts)
    else:
        from moekern.dispatch import align

        aligned = align(topk_ids, num_experts, cfg1.block_m, expert_counts=expert_counts,
                        backend=align_backend.removeprefix("public:"), check_ids=False)
    # The kernels read topk_weights as a flat [M*k] fp32 vector: a contiguous [M, k] fp32 tensor is one.
    if topk_weights.dtype != torch.float32:
        topk_weights = topk_weights.to(torch.float32)
    if not topk_weights.is_contiguous():
        topk_weights = topk_weights.contiguous()
    return moe_experts_triton(hidden_states, w13, w2, topk_weights, aligned[0], aligned[1], aligned[2], top_k,
                              cfg1, cfg2)
