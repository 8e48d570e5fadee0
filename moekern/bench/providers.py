"""Providers: who computes each op, how to call them on identical inputs, and how their answers are judged.

A provider is (name, op, unavailable(shape, device) -> reason or None, prepare(shape, inputs) -> zero-arg
callable, normalize(output, shape) -> canonical output, graph_ok). Everything a provider needs besides
the timed call (output buffers, re-laid-out weights, imports) happens in prepare, outside the timing.

Canonical outputs and how they are compared with the torch reference (check_output):
  routing: RoutingResult(weights [M,k] fp32, ids [M,k] int64, counts [E] or None). Ids must be distinct
    per row and in range. Selection is compared tie-aware: the reference's ranking key (fp32 logit for
    softmax, sigmoid + bias for sigmoid) gathered at the provider's ids, sorted, must equal the key at
    the reference ids exactly, so a provider may break an exact tie differently (vLLM and FlashInfer do
    not promise lower-index-wins; bf16 logits tie often) but may not pick a worse expert. Weights are
    compared per row sorted by expert id where the id sets match, and as sorted values where a tie made
    them differ; tolerance rtol=2e-2, atol=1e-4 (FlashInfer returns bf16 weights). Counts, where a
    provider returns them, must equal the histogram of its own ids.
  align: AlignResult(num_tokens_post_padded, block_expert_ids of the used blocks, sorted_token_ids of the
    used region). moekern backends follow the contract exactly (slots of one expert in slot order), so
    they are compared exactly; vLLM's kernel orders the slots inside one expert's blocks by its own
    rule, so for vLLM each expert's segment is sorted before the exact comparison (same slots, same
    padding, same block->expert map).
  moe: the output [M, H]; relative Frobenius error ||out - ref|| / ||ref|| <= 2e-2 and no NaN/inf
    (the reference accumulates in fp32; bf16 kernels round the [M*k, I] activation to bf16).
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple

import torch

from moekern.bench.shapes import Inputs, Shape

ROUTING_RTOL, ROUTING_ATOL = 2e-2, 1e-4
MOE_REL_TOL = 2e-2


class RoutingResult(NamedTuple):
    weights: torch.Tensor  # [M, k] fp32
    ids: torch.Tensor  # [M, k] int64
    counts: torch.Tensor | None  # [E] or None


class AlignResult(NamedTuple):
    num_tokens_post_padded: int
    block_expert_ids: torch.Tensor  # [num_tokens_post_padded // B] int64
    sorted_token_ids: torch.Tensor  # [num_tokens_post_padded] int64


class CheckResult(NamedTuple):
    ok: bool
    detail: str
    error: float | None = None  # max abs weight error (routing) or relative error (moe)


@dataclass(frozen=True)
class Provider:
    name: str
    op: str
    unavailable: Callable[[Shape, torch.device], str | None]
    prepare: Callable[[Shape, Inputs], Callable[[], object]]
    normalize: Callable[[object, Shape], object]
    graph_ok: bool = True  # may its calls be captured in a CUDA graph


# ---------------------------------------------------------------- availability


@functools.cache
def _import_error(module: str) -> str | None:
    """None if `module` imports, else why not (missing package or a broken install)."""
    top = module.split(".")[0]
    if importlib.util.find_spec(top) is None:
        extra = " (pip install 'moekern[vllm]')" if top in ("vllm", "flashinfer") else ""
        return f"{top} is not installed{extra}"
    if top == "flashinfer":
        _set_flashinfer_arch()
    try:
        importlib.import_module(module)
    except Exception as exc:  # a library that fails to import is skipped with its reason, not a crash
        return f"{module} failed to import: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
    return None


def _set_flashinfer_arch() -> None:
    # FlashInfer JIT-compiles for the archs in this variable; compiling only this GPU's saves minutes.
    if torch.cuda.is_available() and "FLASHINFER_CUDA_ARCH_LIST" not in os.environ:
        major, minor = torch.cuda.get_device_capability()
        os.environ["FLASHINFER_CUDA_ARCH_LIST"] = f"{major}.{minor}{'a' if major >= 9 else ''}"


def _needs_gpu(device: torch.device) -> str | None:
    return None if device.type == "cuda" else "needs a CUDA GPU"


def _moekern_unavailable(module: str, attr: str, backend: str, kernel_module: str | None = None):
    def check(shape: Shape, device: torch.device) -> str | None:
        from moekern._ext import backend_unavailable_reason

        err = _import_error(module)
        if err:
            return f"moekern.{attr} is not available in this checkout ({err})"
        if not hasattr(importlib.import_module(module), attr):
            return f"{module} has no {attr} yet"
        if kernel_module and importlib.util.find_spec(kernel_module) is None:
            return f"{kernel_module} is not in this checkout"
        return backend_unavailable_reason(backend, device)

    return check


# ---------------------------------------------------------------- normalizers


def _routing_norm(out, shape: Shape) -> RoutingResult:
    w, ids = out[0], out[1]
    counts = out[2] if len(out) > 2 and out[2] is not None and out[2].dim() == 1 else None
    return RoutingResult(w.float(), ids.long(), None if counts is None else counts.long())


def _vllm_routing_norm(out, shape: Shape) -> RoutingResult:
    return RoutingResult(out[0].float(), out[1].long(), None)  # token_expert_indices are not counts


def canonical_align(out, shape: Shape, *, exact: bool) -> AlignResult:
    """Used region of an align output; exact=False sorts each expert's segment (order-free compare)."""
    sorted_ids, blocks, post = out[0], out[1], out[2]
    npp = int(post.reshape(-1)[0])
    B = shape.block_size
    sorted_ids = sorted_ids[:npp].long()
    blocks = blocks[: npp // B].long()
    if not exact and npp:
        n_sentinel = shape.num_tokens * shape.top_k + 1
        seg = blocks.repeat_interleave(B)  # the expert each position belongs to
        order = torch.argsort(seg.clamp(min=0) * n_sentinel + sorted_ids, stable=True)
        sorted_ids = sorted_ids[order]
    return AlignResult(npp, blocks.cpu(), sorted_ids.cpu())


def _align_exact(out, shape):
    return canonical_align(out, shape, exact=True)


def _align_sets(out, shape):
    return canonical_align(out, shape, exact=False)


def _moe_norm(out, shape: Shape) -> torch.Tensor:
    return out


# ---------------------------------------------------------------- moekern (cuda / triton / torch)


def _moekern_routing(backend: str):
    def prepare(shape: Shape, inp: Inputs):
        import moekern

        kw = shape.routing_kwargs()
        logits, bias, k = inp.logits, inp.correction_bias, shape.top_k
        return lambda: moekern.fused_topk(logits, k, correction_bias=bias, backend=backend, **kw)

    return prepare


def _no_id_check(fn) -> dict:
    """check_ids=False where the API has it: the ids come from the reference routing (in range), and the
    range check is a host sync that neither vLLM nor FlashInfer pays and that CUDA graphs cannot hold."""
    import inspect

    return {"check_ids": False} if "check_ids" in inspect.signature(fn).parameters else {}


def _moekern_align(backend: str):
    def prepare(shape: Shape, inp: Inputs):
        import moekern

        ids, E, B = inp.topk_ids, shape.num_experts, shape.block_size
        kw = _no_id_check(moekern.align)
        return lambda: moekern.align(ids, E, B, backend=backend, **kw)

    return prepare


def _moekern_moe(backend: str):
    def prepare(shape: Shape, inp: Inputs):
        import moekern

        x, w13, w2, tw, ti = inp.hidden, inp.w13, inp.w2, inp.topk_weights, inp.topk_ids
        kw = _no_id_check(moekern.fused_moe)
        return lambda: moekern.fused_moe(x, w13, w2, topk_weights=tw, topk_ids=ti, backend=backend, **kw)

    return prepare


# ---------------------------------------------------------------- vLLM 0.26


def _vllm_unavailable(module: str):
    def check(shape: Shape, device: torch.device) -> str | None:
        return _needs_gpu(device) or _import_error(module)

    return check


def _vllm_routing_prepare(shape: Shape, inp: Inputs):
    logits, k = inp.logits, shape.top_k
    if shape.num_expert_group:
        # DeepSeek-V3: vLLM's fused grouped top-k CUDA op (sigmoid, bias, group top-2 sums, scaling) --
        # what vLLM's grouped_topk dispatches to on CUDA when a correction bias is present.
        from vllm import _custom_ops as ops

        if shape.scoring != "sigmoid":
            raise NotImplementedError("the fused grouped top-k op is benchmarked for sigmoid scoring only")
        bias = inp.correction_bias if inp.correction_bias is not None else torch.zeros(
            shape.num_experts, device=logits.device)
        G, g, scale, renorm = shape.num_expert_group, shape.topk_group, shape.routed_scaling_factor, shape.renormalize
        try:
            ops.grouped_topk(logits, G, g, k, renorm, scale, bias, 1)
        except RuntimeError:
            bias = bias.to(logits.dtype)  # some builds want the bias in the logits' dtype (values are bf16-exact)
        return lambda: ops.grouped_topk(logits, G, g, k, renorm, scale, bias, 1)
    from vllm.model_executor.layers.fused_moe.router.fused_topk_router import fused_topk

    if shape.scoring != "softmax":
        raise NotImplementedError(f"scoring={shape.scoring!r} without groups is not benchmarked for vLLM")
    renorm = shape.renormalize
    # vLLM's fused_topk reads only the token count from hidden_states; logits stand in for it.
    return lambda: fused_topk(logits, logits, k, renorm)


def _vllm_align_prepare(shape: Shape, inp: Inputs):
    from vllm.model_executor.layers.fused_moe.moe_align_block_size import moe_align_block_size

    ids, E, B = inp.topk_ids, shape.num_experts, shape.block_size
    return lambda: moe_align_block_size(ids, B, E)


def _vllm_moe_prepare(shape: Shape, inp: Inputs):
    from vllm.model_executor.layers.fused_moe import fused_experts

    x, w13, w2, tw, ti = inp.hidden, inp.w13, inp.w2, inp.topk_weights, inp.topk_ids
    # Triton fused_experts picks its tuned config (get_config / try_get_optimal_moe_config) by E, N, M, GPU.
    return lambda: fused_experts(x, w13, w2, tw, ti)


def vllm_block_size(shape: Shape, num_tokens: int) -> int | None:
    """BLOCK_SIZE_M vLLM's fused MoE would pick for this model at num_tokens (None without vLLM)."""
    if _import_error("vllm.model_executor.layers.fused_moe.fused_moe"):
        return None
    from vllm.model_executor.layers.fused_moe.fused_moe import try_get_optimal_moe_config

    E, H, inter = shape.num_experts, shape.hidden_size, shape.intermediate_size
    try:
        cfg = try_get_optimal_moe_config((E, 2 * inter, H), (E, H, inter), shape.top_k, None, num_tokens)
    except Exception:
        return None
    return int(cfg["BLOCK_SIZE_M"])


# ---------------------------------------------------------------- FlashInfer 0.6.14
#
# Every argument below is mapped from the FlashInfer 0.6.14 sources (wheel: flashinfer/fused_moe/*.py, JIT
# sources under flashinfer/data/csrc); the file:line cited is where the contract is stated or enforced.
# tests/test_bench.py runs these providers against a fake `flashinfer` that enforces the same contract.

# fused_moe/fused_routing_dsv3.py:63-96 (_check_dsv3_fused_routing_supported) and
# data/csrc/fused_moe/noAuxTcKernels.cu:237-242 (invokeNoAuxTc): the grouped kernel takes E <= 256,
# E / n_group <= 32, E / n_group * topk_group <= 128, topk <= 8; anything else raises.
_FI_DSV3_MAX_EXPERTS, _FI_DSV3_MAX_PER_GROUP, _FI_DSV3_MAX_SELECTED, _FI_DSV3_MAX_TOPK = 256, 32, 128, 8


def _flashinfer_routing_unavailable(shape: Shape, device: torch.device) -> str | None:
    if not shape.num_expert_group or shape.scoring != "sigmoid" or not shape.correction_bias:
        return ("FlashInfer 0.6.14 has no standalone softmax top-k routing op for sm90 (its softmax routing "
                "runs inside the trtllm-gen MoE kernels, sm100+); only DeepSeek-V3 routing "
                "(fused_topk_deepseek) is benchmarked")
    # fused_routing_dsv3.py:167-168 (step 5): weights are always sigmoid / sum(sigmoid) * scale.
    if not shape.renormalize:
        return "fused_topk_deepseek always renormalizes the top-k weights; this model does not"
    E, G, g, k = shape.num_experts, shape.num_expert_group, shape.topk_group, shape.top_k
    per_group = E // G
    if (E % G or E > _FI_DSV3_MAX_EXPERTS or per_group > _FI_DSV3_MAX_PER_GROUP
            or per_group * g > _FI_DSV3_MAX_SELECTED or k > _FI_DSV3_MAX_TOPK or g > G or g * G < k):
        return (f"fused_topk_deepseek does not cover num_experts={E}, n_group={G}, topk_group={g}, top_k={k} "
                f"(needs E % n_group == 0, E <= 256, E/n_group <= 32, E/n_group*topk_group <= 128, top_k <= 8)")
    return _needs_gpu(device) or _import_error("flashinfer.fused_moe")


def _flashinfer_routing_prepare(shape: Shape, inp: Inputs):
    from flashinfer.fused_moe import fused_topk_deepseek

    logits, M, k = inp.logits, inp.num_tokens, shape.top_k
    # fused_routing_dsv3.py:175-177: bias [E], "same dtype as scores" (the kernel, noAuxTcKernels.cu:375-440,
    # also takes fp32/fp16); ours is fp32 holding bf16-exact values, so the bf16 copy is the same numbers.
    bias = inp.correction_bias.to(logits.dtype).contiguous()
    # noAuxTcKernels.cu:348-351: topk_values has the scores' dtype, topk_indices int32; both [M, topk].
    values = torch.empty(M, k, dtype=logits.dtype, device=logits.device)
    ids = torch.empty(M, k, dtype=torch.int32, device=logits.device)
    G, g, scale = shape.num_expert_group, shape.topk_group, float(shape.routed_scaling_factor)
    # fused_routing_dsv3.py:142-153, positional order: scores, bias, n_group, topk_group, topk,
    # routed_scaling_factor, topk_values, topk_indices (launch_with_pdl keeps its default True: FlashInfer's own
    # choice on sm90). Results are written in place; the function returns None.
    # The first call runs FlashInfer's argument checks (utils.py backend_requirement); the timed calls skip
    # them (skip_check=True, popped by the same wrapper), as an engine that validated once would.
    fused_topk_deepseek(logits, bias, G, g, k, scale, values, ids)

    def call():
        fused_topk_deepseek(logits, bias, G, g, k, scale, values, ids, skip_check=True)
        return values, ids

    return call


def _flashinfer_routing_norm(out, shape: Shape) -> RoutingResult:
    # values: renormalized sigmoid weights x routed_scaling_factor (bf16), the reference's semantics exactly
    # (fused_topk_reference with renormalize=True); ids come sorted by score, not by index, and the checker
    # compares id sets per row, so the order does not matter.
    return RoutingResult(out[0].float(), out[1].long(), None)


def flashinfer_w31(w13: torch.Tensor) -> torch.Tensor:
    """[E, 2I, H] -> [E, 2I, H] with the halves swapped: ours is [gate; up], FlashInfer's CUTLASS MoE reads
    [up; gate]: data/csrc/fused_moe/cutlass_backend/cutlass_fused_moe_kernels.cuh:2164,2250-2265 take the
    gate at column offset inter_size and the linear (up) part at offset 0 (vLLM swaps likewise:
    oracle/unquantized.py, swap_w13_to_w31)."""
    inter = w13.shape[1] // 2
    return torch.cat([w13[:, inter:], w13[:, :inter]], dim=1).contiguous()


def _flashinfer_moe_prepare(shape: Shape, inp: Inputs):
    from flashinfer.fused_moe import cutlass_fused_moe

    if "flashinfer_w31" not in inp.cache:
        inp.cache["flashinfer_w31"] = flashinfer_w31(inp.w13)
    w31 = inp.cache["flashinfer_w31"]
    x, w2, tw, ti = inp.hidden, inp.w2, inp.topk_weights, inp.topk_ids
    # flashinfer_cutlass_fused_moe_binding.cu:260-271: input in the runner's activation dtype (bf16), experts
    # int32, scales fp32, both weights in the input's dtype; :296-318: fc1 [E, 2I, H], fc2 [E, H, I].
    ti = ti if ti.dtype == torch.int32 else ti.to(torch.int32)
    tw = tw if tw.dtype == torch.float32 else tw.float()
    # core.py:1008-1017: an output buffer must be exactly [M, H] of output_dtype on the input's device.
    out = torch.empty(x.shape[0], w2.shape[1], dtype=x.dtype, device=x.device)

    def call():
        # core.py:814-822, positional: input, token_selected_experts, token_final_scales, fc1_expert_weights,
        # fc2_expert_weights, output_dtype, quant_scales ([] = unquantized, as vLLM's bf16 path passes).
        # activation_type keeps its default ActivationType.Swiglu (silu(gate) * up); routing weights are
        # applied inside (token_final_scales), like the reference. It returns a Python list
        # [output, ...] (core.py:633-642; its docstring says Tensor), so the provider returns `out` itself.
        cutlass_fused_moe(x, ti, tw, w31, w2, x.dtype, [], output=out)
        return out

    _flashinfer_autotune(call, x)
    return call


def _flashinfer_autotune(call, x: torch.Tensor) -> None:
    """Pick FlashInfer's GEMM tactics for this token count before timing, as vLLM does at start-up
    (kernel_warmup.flashinfer_autotune). Untuned, core.py:547-575 fall back to tactic -1, which the binding
    maps to the first profile in its list (flashinfer_cutlass_fused_moe_binding.cu:826-831), not a tuned one.
    Only this token count is profiled (tuning_buckets=(M,), autotuner.py:465-500); outside the context the
    op maps M to its hybrid bucket (fused_moe/utils.py map_to_hybrid_bucket), which is M itself for the
    bench's token counts (powers of two <= 8192), so the timed calls find the tuned tactic. A failure leaves
    FlashInfer on its default tactic: it is printed, never fatal."""
    try:
        from flashinfer.autotuner import autotune
    except Exception as exc:  # pragma: no cover - only with a broken install
        print(f"flashinfer autotune unavailable ({type(exc).__name__}: {exc}); default tactic", flush=True)
        return
    try:
        with autotune(True, tuning_buckets=(int(x.shape[0]),)):
            call()
        if x.is_cuda:
            torch.cuda.synchronize(x.device)
    except Exception as exc:
        print(f"flashinfer autotune failed at M={x.shape[0]} ({type(exc).__name__}: "
              f"{str(exc).splitlines()[0][:200] if str(exc) else ''}); default tactic", flush=True)


FLASHINFER_JIT_ENV = "MOEKERN_FLASHINFER_JIT"  # "build": let a FlashInfer provider JIT-compile on first use


def _flashinfer_moe_unavailable(shape: Shape, device: torch.device) -> str | None:
    """Installed and on a GPU, and its CUTLASS MoE module already compiled: the first call of cutlass_fused_moe
    JIT-builds that module with nvcc, which takes over 15 minutes even on a 16-core H200 host, so a bench
    would sit in the build instead of timing. Skipped with the way out unless MOEKERN_FLASHINFER_JIT=build."""
    reason = _needs_gpu(device) or _import_error("flashinfer.fused_moe")
    if reason or os.environ.get(FLASHINFER_JIT_ENV, "") == "build":
        return reason
    try:
        from flashinfer.jit import env as jit_env

        major, minor = torch.cuda.get_device_capability(device)
    except Exception:  # another layout of FlashInfer, or no CUDA runtime: cannot tell, let the call decide
        return None
    arch = {"121": "120", "110": "100"}.get(f"{major * 10 + minor}", f"{major * 10 + minor}")
    name = f"fused_moe_{arch}"
    built = [Path(d) / name / f"{name}.so" for d in (getattr(jit_env, "FLASHINFER_JIT_DIR", None),
                                                     getattr(jit_env, "FLASHINFER_AOT_DIR", None)) if d]
    if any(p.exists() for p in built):
        return None
    return (f"FlashInfer's CUTLASS MoE module {name} is not compiled yet (its first call builds it with nvcc for "
            f"tens of minutes); build it once with `python tools/gpu/flashinfer_warmup.py`, or set "
            f"{FLASHINFER_JIT_ENV}=build to let this run build it")


def _flashinfer_unavailable_for(op: str, why: str):
    def check(shape, device):
        return why

    return check


# ---------------------------------------------------------------- registry

_FI_NO_ALIGN = "FlashInfer 0.6.14 has no moe_align_block_size equivalent (its CUTLASS MoE permutes internally)"


def _registry() -> list[Provider]:
    ps = []
    for backend, name in (("cuda", "moekern-cuda"), ("triton", "moekern-triton"), ("torch", "torch")):
        graph = backend != "torch"  # the torch reference syncs with the host (bincount, tolist, nonzero)
        ps.append(Provider(name, "routing",
                           _moekern_unavailable("moekern.routing", "fused_topk", backend,
                                                {"cuda": "moekern.routing.cuda_topk",
                                                 "triton": "moekern.routing.triton_topk"}.get(backend)),
                           _moekern_routing(backend), _routing_norm, graph))
        ps.append(Provider(name, "align", _moekern_unavailable("moekern.dispatch", "align", backend),
                           _moekern_align(backend), _align_exact, graph))
        ps.append(Provider(name, "moe", _moekern_unavailable("moekern.experts", "fused_moe", backend),
                           _moekern_moe(backend), _moe_norm, graph))
    ps += [
        Provider("vllm", "routing", _vllm_unavailable("vllm.model_executor.layers.fused_moe.router.fused_topk_router"),
                 _vllm_routing_prepare, _vllm_routing_norm),
        Provider("vllm", "align", _vllm_unavailable("vllm.model_executor.layers.fused_moe.moe_align_block_size"),
                 _vllm_align_prepare, _align_sets),
        Provider("vllm", "moe", _vllm_unavailable("vllm.model_executor.layers.fused_moe"),
                 _vllm_moe_prepare, _moe_norm),
        Provider("flashinfer", "routing", _flashinfer_routing_unavailable, _flashinfer_routing_prepare,
                 _flashinfer_routing_norm),
        Provider("flashinfer", "align", _flashinfer_unavailable_for("align", _FI_NO_ALIGN), None, None),
        Provider("flashinfer", "moe", _flashinfer_moe_unavailable, _flashinfer_moe_prepare, _moe_norm),
    ]
    return ps


PROVIDERS: list[Provider] = _registry()
PROVIDER_NAMES = ("moekern-cuda", "moekern-triton", "vllm", "flashinfer", "torch")


def get_providers(op: str, names=PROVIDER_NAMES) -> list[Provider]:
    """The providers of op, in the order of names. Unknown names raise ValueError."""
    unknown = [n for n in names if n not in PROVIDER_NAMES]
    if unknown:
        raise ValueError(f"providers {unknown} are unknown; known: {', '.join(PROVIDER_NAMES)}")
    by_name = {p.name: p for p in PROVIDERS if p.op == op}
    return [by_name[n] for n in names if n in by_name]


# ---------------------------------------------------------------- reference and checks


def reference_output(shape: Shape, inp: Inputs):
    """The canonical reference output of shape on inp (plain PyTorch, the judge of every provider)."""
    if shape.op == "routing":
        from moekern.routing.reference import fused_topk_reference

        out = fused_topk_reference(inp.logits, shape.top_k, correction_bias=inp.correction_bias,
                                   **shape.routing_kwargs())
        return _routing_norm(out, shape)
    if shape.op == "align":
        from moekern.dispatch.reference import align_reference

        return _align_exact(align_reference(inp.topk_ids, shape.num_experts, shape.block_size), shape)
    from moekern.experts.reference import fused_moe_reference

    return fused_moe_reference(inp.hidden, inp.w13, inp.w2, inp.topk_weights, inp.topk_ids)


def _ranking_key(shape: Shape, inp: Inputs) -> torch.Tensor:
    """[M, E] fp32: the score experts are selected by (NaN-free inputs here)."""
    x = inp.logits.float()
    if shape.scoring == "softmax":
        return x
    s = torch.sigmoid(x)
    return s if inp.correction_bias is None else s + inp.correction_bias.float()


def check_output(shape: Shape, inp: Inputs, ref, got) -> CheckResult:
    """Compare a provider's canonical output with the reference's (rules in the module docstring)."""
    if shape.op == "routing":
        return _check_routing(shape, inp, ref, got)
    if shape.op == "align":
        return _check_align(ref, got)
    return _check_moe(ref, got)


def _check_routing(shape: Shape, inp: Inputs, ref: RoutingResult, got: RoutingResult) -> CheckResult:
    M, k, E = inp.num_tokens, shape.top_k, shape.num_experts
    if tuple(got.ids.shape) != (M, k) or tuple(got.weights.shape) != (M, k):
        return CheckResult(False, f"shape: expected ids/weights [{M}, {k}]; got {tuple(got.ids.shape)}, "
                                  f"{tuple(got.weights.shape)}")
    ids = got.ids
    if ids.numel() and (ids.min() < 0 or ids.max() >= E):
        return CheckResult(False, f"ids out of range [0, {E}): min {int(ids.min())}, max {int(ids.max())}")
    s = ids.sort(dim=1).values
    if k > 1 and bool((s[:, 1:] == s[:, :-1]).any()):
        return CheckResult(False, "ids repeat within a row")
    key = _ranking_key(shape, inp)
    got_key = key.gather(1, ids).sort(dim=1, descending=True).values
    ref_key = key.gather(1, ref.ids).sort(dim=1, descending=True).values
    bad_rows = (got_key != ref_key).any(dim=1)
    if bool(bad_rows.any()):
        r = int(bad_rows.nonzero()[0, 0])
        return CheckResult(False, f"{int(bad_rows.sum())}/{M} rows select a worse expert set; row {r}: "
                                  f"ids {ids[r].tolist()} vs reference {ref.ids[r].tolist()}")
    same_set = (s == ref.ids.sort(dim=1).values).all(dim=1)
    # Rows with the same id set: compare weights expert by expert; rows that broke a tie differently:
    # compare the sorted weight values (tied experts have equal weights).
    gw = torch.where(same_set[:, None], got.weights.gather(1, ids.argsort(dim=1)), got.weights.sort(dim=1).values)
    rw = torch.where(same_set[:, None], ref.weights.gather(1, ref.ids.argsort(dim=1)),
                     ref.weights.sort(dim=1).values)
    err = float((gw - rw).abs().max()) if gw.numel() else 0.0
    if not torch.allclose(gw, rw, rtol=ROUTING_RTOL, atol=ROUTING_ATOL * max(1.0, shape.routed_scaling_factor)):
        return CheckResult(False, f"weights differ: max abs error {err:.3g} (rtol={ROUTING_RTOL}, "
                                  f"atol={ROUTING_ATOL})", err)
    if got.counts is not None:
        expect = torch.bincount(ids.flatten(), minlength=E)
        if not torch.equal(got.counts.cpu(), expect.cpu()):
            return CheckResult(False, "expert_counts differ from the histogram of the returned ids", err)
    ties = int((~same_set).sum())
    return CheckResult(True, f"ok ({ties} rows broke an exact tie differently)" if ties else "ok", err)


def _check_align(ref: AlignResult, got: AlignResult) -> CheckResult:
    if got.num_tokens_post_padded != ref.num_tokens_post_padded:
        return CheckResult(False, f"num_tokens_post_padded: expected {ref.num_tokens_post_padded}; "
                                  f"got {got.num_tokens_post_padded}")
    if not torch.equal(got.block_expert_ids, ref.block_expert_ids):
        return CheckResult(False, "block_expert_ids differ in the used blocks")
    if not torch.equal(got.sorted_token_ids, ref.sorted_token_ids):
        n = int((got.sorted_token_ids != ref.sorted_token_ids).sum())
        return CheckResult(False, f"sorted_token_ids differ at {n} of {ref.num_tokens_post_padded} positions")
    return CheckResult(True, "ok", 0.0)


def _check_moe(ref: torch.Tensor, got: torch.Tensor) -> CheckResult:
    if not isinstance(got, torch.Tensor) or tuple(got.shape) != tuple(ref.shape):
        return CheckResult(False, f"output shape: expected {tuple(ref.shape)}; got "
                                  f"{tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__}")
    g, r = got.float(), ref.float()
    if not bool(torch.isfinite(g).all()):
        return CheckResult(False, "output holds NaN or inf")
    denom = float(r.norm()) or 1.0
    err = float((g - r).norm()) / denom
    if err > MOE_REL_TOL:
        return CheckResult(False, f"relative error {err:.3g} > {MOE_REL_TOL}", err)
    return CheckResult(True, "ok", err)
