"""moekern.fused_moe against moekern.experts.reference.fused_moe_reference (per-expert loop, fp32 math).

Tolerances. fp32: the Triton path uses IEEE fp32 dots (no TF32) and keeps the intermediate in fp32, so it
differs from the reference only in summation order: rtol 1e-4, atol 1e-5. fp16/bf16: the intermediate and
per-slot outputs are rounded to the activation dtype, so we compare the norm-relative error
||out - ref|| / ||ref|| (ref computed in fp32 from the same low-precision inputs) < 1e-2.

CPU runs the kernels under TRITON_INTERPRET=1 (set by conftest) at tiny shapes; on a GPU the same tests run
the compiled kernels, and the `gpu` tests add the standard model shapes in bf16.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import moekern
from moekern.experts.reference import fused_moe_reference
from moekern.experts import BlockConfig, default_configs, get_configs
from moekern.models import get_model
from moekern.routing import fused_topk_reference

H, I = 32, 16
# Backends with kernels of their own. backend="torch" runs fused_topk_reference + fused_moe_reference, the
# references these tests compare with, so it is left out of comparisons ("auto" is "torch" on CPU).
KERNEL_BACKENDS = ("triton", "cuda") if torch.cuda.is_available() else ("triton",)
FP32_TOL = dict(rtol=1e-4, atol=1e-5)
LOWP_REL_TOL = 1e-2


def _weights(E, h=H, inter=I, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    w13 = (torch.randn(E, 2 * inter, h, generator=g) / h**0.5).to(dtype).to(device)
    w2 = (torch.randn(E, h, inter, generator=g) / inter**0.5).to(dtype).to(device)
    return w13, w2


def _inputs(M, E, h=H, dtype=torch.float32, device="cpu", seed=1):
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(M, h, generator=g).to(dtype).to(device)
    logits = torch.randn(M, E, generator=g).to(device)
    return x, logits


def _route(logits, k, **kw):
    w, ids = fused_topk_reference(logits, k, **kw)[:2]
    return w, ids


def _rel_err(out, ref):
    return ((out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30)).item()


def _spy(monkeypatch, module, name: str) -> list:
    """Wrap module.name (looked up at call time by the code under test) so it records each call's (args, kwargs)
    and then runs as before."""
    calls = []
    real = getattr(module, name)

    def spy(*args, **kwargs):
        calls.append((args, kwargs))
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, spy)
    return calls


@pytest.mark.parametrize("E", [4, 8, 60])
@pytest.mark.parametrize("k", [1, 2, 4])
@pytest.mark.parametrize("M", [1, 8])
def test_triton_matches_reference_fp32(E, k, M, device):
    w13, w2 = _weights(E, device=device)
    x, logits = _inputs(M, E, device=device)
    w, ids = _route(logits, k)
    out = moekern.fused_moe(x, w13, w2, topk_weights=w, topk_ids=ids, backend="triton")
    ref = fused_moe_reference(x, w13, w2, w, ids)
    assert out.shape == (M, H) and out.dtype == x.dtype
    torch.testing.assert_close(out, ref, **FP32_TOL)


@pytest.mark.parametrize(
    "h,inter,cfg",
    [
        (40, 24, BlockConfig(16, 16, 16, 1, 4, 1)),  # K and N not multiples of the tiles (masks, wrapped cols)
        (32, 16, BlockConfig(32, 16, 32, 1, 4, 1)),  # block_m 32
        (32, 48, BlockConfig(16, 32, 16, 4, 4, 1)),  # GROUP_M > 1, several N tiles, odd N tile count
    ],
)
def test_block_config_override(h, inter, cfg, device):
    E, k, M = 4, 2, 8
    w13, w2 = _weights(E, h, inter, device=device)
    x, logits = _inputs(M, E, h, device=device)
    w, ids = _route(logits, k)
    out = moekern.fused_moe(x, w13, w2, topk_weights=w, topk_ids=ids, backend="triton", block_config=cfg)
    torch.testing.assert_close(out, fused_moe_reference(x, w13, w2, w, ids), **FP32_TOL)


def test_gemm_pair_override(device):
    E, k, M = 4, 2, 6
    w13, w2 = _weights(E, device=device)
    x, logits = _inputs(M, E, device=device)
    w, ids = _route(logits, k)
    pair = (BlockConfig(16, 16, 32, 1, 4, 1), BlockConfig(16, 32, 16, 2, 4, 1))
    out = moekern.fused_moe(x, w13, w2, topk_weights=w, topk_ids=ids, backend="triton", block_config=pair)
    torch.testing.assert_close(out, fused_moe_reference(x, w13, w2, w, ids), **FP32_TOL)


def test_router_logits_path(device):
    E, k, M = 8, 2, 7
    w13, w2 = _weights(E, device=device)
    x, logits = _inputs(M, E, device=device)
    w, ids = _route(logits, k)
    ref = fused_moe_reference(x, w13, w2, w, ids)
    for backend in KERNEL_BACKENDS:
        out = moekern.fused_moe(x, w13, w2, logits, k, backend=backend)
        torch.testing.assert_close(out, ref, **FP32_TOL)


def test_routing_kwargs_pass_through(device):
    """Sigmoid + correction bias + grouped selection + scaling: must reach fused_topk unchanged."""
    E, k, M = 16, 4, 6
    w13, w2 = _weights(E, device=device)
    x, logits = _inputs(M, E, device=device)
    kw = dict(scoring="sigmoid", renormalize=True, num_expert_group=4, topk_group=2,
              routed_scaling_factor=2.5, correction_bias=torch.linspace(-0.5, 0.5, E, device=device))
    w, ids = _route(logits, k, **kw)
    ref = fused_moe_reference(x, w13, w2, w, ids)
    plain = fused_moe_reference(x, w13, w2, *_route(logits, k))
    assert _rel_err(plain, ref) > 1e-2  # the kwargs change the answer, so passing them is tested
    for backend in KERNEL_BACKENDS:
        out = moekern.fused_moe(x, w13, w2, logits, k, backend=backend, **kw)
        torch.testing.assert_close(out, ref, **FP32_TOL)


@pytest.mark.parametrize("k", [1, 2])
def test_skew_all_tokens_one_expert(k, device):
    """Every token to expert 3 (and 5 for k=2): one long run spanning several blocks, other experts empty."""
    E, M = 8, 40
    w13, w2 = _weights(E, device=device)
    x, _ = _inputs(M, E, device=device)
    ids = torch.tensor([3, 5][:k], dtype=torch.int32, device=device).expand(M, k).contiguous()
    w = torch.rand(M, k, device=device)
    out = moekern.fused_moe(x, w13, w2, topk_weights=w, topk_ids=ids, backend="triton")
    torch.testing.assert_close(out, fused_moe_reference(x, w13, w2, w, ids), **FP32_TOL)


@pytest.mark.parametrize("backend", ["torch", "triton", "auto"])
def test_zero_tokens(backend, device):
    E = 4
    w13, w2 = _weights(E, device=device)
    x = torch.empty(0, H, device=device)
    out = moekern.fused_moe(x, w13, w2, torch.empty(0, E, device=device), 2, backend=backend)
    assert out.shape == (0, H) and out.dtype == torch.float32
    out = moekern.fused_moe(x, w13, w2, topk_weights=torch.empty(0, 2, device=device),
                            topk_ids=torch.empty(0, 2, dtype=torch.int32, device=device), backend=backend)
    assert out.shape == (0, H)


@pytest.mark.gpu
def test_auto_backend(device):
    """On a GPU "auto" runs the kernels (routing and align on their own best backend, Triton experts); on CPU it
    is the reference itself, so the test is GPU-only."""
    E, k, M = 8, 2, 5
    w13, w2 = _weights(E, device=device)
    x, logits = _inputs(M, E, device=device)
    w, ids = _route(logits, k)
    out = moekern.fused_moe(x, w13, w2, logits, k)
    torch.testing.assert_close(out, fused_moe_reference(x, w13, w2, w, ids), **FP32_TOL)


def test_int64_ids_and_noncontiguous_hidden(device):
    E, k, M = 4, 2, 5
    w13, w2 = _weights(E, device=device)
    x_wide, logits = _inputs(M, E, h=2 * H, device=device)
    x = x_wide[:, ::2]  # stride (2H, 2): must be copied, not misread
    w, ids = _route(logits, k)
    out = moekern.fused_moe(x, w13, w2, topk_weights=w, topk_ids=ids.long(), backend="triton")
    torch.testing.assert_close(out, fused_moe_reference(x, w13, w2, w, ids), **FP32_TOL)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision(dtype, device):
    if device == "cpu" and dtype == torch.bfloat16:
        pytest.skip("triton 3.7's CPU interpreter returns garbage for bf16 (numpy has no bfloat16); runs on a GPU")
    E, k, M = 8, 2, 8
    w13, w2 = _weights(E, dtype=dtype, device=device)
    x, logits = _inputs(M, E, dtype=dtype, device=device)
    w, ids = _route(logits, k)
    out = moekern.fused_moe(x, w13, w2, topk_weights=w, topk_ids=ids, backend="triton")
    ref = fused_moe_reference(x.float(), w13.float(), w2.float(), w, ids)
    assert out.dtype == dtype
    assert _rel_err(out, ref) < LOWP_REL_TOL


def _rounded_reference(x, w13, w2, topk_weights, topk_ids):
    """fused_moe_reference with the kernel's documented rounding points (fused_moe's docstring): silu(gate)*up
    rounded to x's dtype, each slot's weighted down-projection rounded to x's dtype, the k slots of a token
    summed in fp32 and rounded once. All other math fp32."""
    M, H = x.shape
    inter = w13.shape[1] // 2
    out = torch.zeros(M, H, dtype=torch.float32, device=x.device)
    for e in range(w13.shape[0]):
        tok, slot = torch.nonzero(topk_ids == e, as_tuple=True)
        if tok.numel():
            h = x[tok].float() @ w13[e].float().t()
            a = (torch.nn.functional.silu(h[:, :inter]) * h[:, inter:]).to(x.dtype).float()
            y = (a @ w2[e].float().t()) * topk_weights[tok, slot].float().unsqueeze(1)
            out.index_add_(0, tok, y.to(x.dtype).float())
    return out.to(x.dtype)


def _combine_case(dtype, device, seed, E, M, h, inter):
    w13, w2 = _weights(E, h, inter, dtype=dtype, device=device, seed=seed)
    x, logits = _inputs(M, E, h, dtype=dtype, device=device, seed=seed + 100)
    w, ids = _route(logits, 8)
    out = moekern.fused_moe(x, w13, w2, topk_weights=w, topk_ids=ids, backend="triton")
    return out, _rounded_reference(x, w13, w2, w, ids), fused_moe_reference(x.float(), w13.float(), w2.float(), w, ids)


# The k-way combine sums in fp32 and rounds once. Against the fp32 reference that is invisible: rounding the
# per-slot outputs already costs ~3.4e-4 (fp16), and a combine summing the k = 8 slots one after another in
# fp16 only raises that to ~6.2e-4. Against _rounded_reference, which rounds where the kernel does, the right
# combine differs only where a GEMM's fp32 summation order flips a rounding. Measured norm-relative errors,
# CPU interpreter, fp16, these inputs (seeds 0, 1, 2; E = k = 8, M = 16, H = 64, I = 32):
#   right combine 0, 0, 0 (other inputs of this size: up to 2.1e-5);  sequential fp16 combine 5.9e-4, 6.1e-4,
#   5.9e-4. 1e-4 sits 5x above the worst right value seen and 6x below the best wrong one.
COMBINE_FP16_TOL = 1e-4


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_combine_k8_fp16_sums_in_fp32(seed, device):
    out, rounded, ref32 = _combine_case(torch.float16, device, seed, E=8, M=16, h=64, inter=32)
    assert out.dtype == torch.float16
    assert _rel_err(out, ref32) < LOWP_REL_TOL
    assert _rel_err(out, rounded) < COMBINE_FP16_TOL


# bf16 on a GPU (the interpreter has no bf16), olmoe-like widths (E = 64, k = 8, M = 256, H = 1024, I = 512).
# Measured on an H100, norm-relative vs _rounded_reference, seeds 0, 1, 2: right kernel 4.2e-4, 4.6e-4,
# 4.5e-4 (bf16 rounding flips from the GEMMs' order); sequential bf16 combine 4.49e-3, 4.49e-3, 4.47e-3.
# The fp32 reference cannot tell them apart (2.9e-3 vs 4.8e-3, both < LOWP_REL_TOL). 1.5e-3 sits 3.3x above
# the worst right value and 3x below the best wrong one.
COMBINE_BF16_TOL = 1.5e-3


@pytest.mark.gpu
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_combine_k8_bf16_sums_in_fp32(seed):
    out, rounded, ref32 = _combine_case(torch.bfloat16, "cuda", seed, E=64, M=256, h=1024, inter=512)
    assert out.dtype == torch.bfloat16
    assert _rel_err(out, ref32) < LOWP_REL_TOL
    assert _rel_err(out, rounded) < COMBINE_BF16_TOL


# Kernel variants (BlockConfig.fuse_silu / persistent / tma / group_m): each must give the same answer as the
# reference within the same tolerances as the default kernel.
VARIANTS = {
    "fused": dict(),
    "unfused": dict(fuse_silu=False),
    "fused-persistent": dict(persistent=2),
    "unfused-persistent-group": dict(fuse_silu=False, persistent=1, group_m=4),
    "fused-tma": dict(tma=True),
    "unfused-tma-persistent": dict(fuse_silu=False, tma=True, persistent=2),
    # gemm1 over K shares into fp32 partials, reduced with SiLU-and-mul by gemm2's A loads; with 8 shares of 2-3 K
    # blocks most shares are empty and must still count (as zeros)
    "split-k2": dict(fuse_silu=False, split_k=2),
    "split-k8": dict(fuse_silu=False, split_k=8),
}


def _variant(name, block_m=16, block_n=16, block_k=16, group_m=1):
    """(gemm1, gemm2) of a variant: gemm2 the same tile without gemm1's split_k."""
    kw = {"group_m": group_m, **VARIANTS[name]}  # a variant's own group_m wins
    g1 = BlockConfig(block_m, block_n, block_k, kw.pop("group_m"), 4, 1, **kw)
    return g1, dataclasses.replace(g1, split_k=1)


@settings(max_examples=12, deadline=None)
@given(
    M=st.integers(0, 6),
    E=st.integers(1, 8),
    k=st.integers(1, 3),
    block_m=st.sampled_from([16, 32]),
    variant=st.sampled_from(sorted(VARIANTS)),
    seed=st.integers(0, 2**16),
)
def test_property_random_ids(M, E, k, block_m, variant, seed):
    """Any ids (repeats within a row included) and any weights: triton == reference."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    k = min(k, E)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, E, (M, k), generator=g, dtype=torch.int32).to(device)
    w = torch.randn(M, k, generator=g).to(device)
    w13, w2 = _weights(E, device=device, seed=seed)
    x = torch.randn(M, H, generator=g).to(device)
    cfg = _variant(variant, block_m=block_m, block_k=32)
    out = moekern.fused_moe(x, w13, w2, topk_weights=w, topk_ids=ids, backend="triton", block_config=cfg)
    torch.testing.assert_close(out, fused_moe_reference(x, w13, w2, w, ids), **FP32_TOL)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize(
    "h,inter,M,E,k,block_m",
    [
        (40, 24, 9, 4, 2, 16),  # K and N not multiples of the tiles; several N tiles
        (32, 16, 40, 8, 2, 32),  # skew below: one expert spans several blocks
    ],
)
def test_variants_match_reference(variant, h, inter, M, E, k, block_m, device):
    w13, w2 = _weights(E, h, inter, device=device)
    x, logits = _inputs(M, E, h, device=device)
    w, ids = _route(logits, k)
    if M == 40:
        ids[: M // 2, 0] = 3  # half the tokens' first choice on expert 3: a multi-block run
        ids[:, 1] = torch.where(ids[:, 1] == 3, torch.full_like(ids[:, 1], 5), ids[:, 1])
    cfg = _variant(variant, block_m=block_m, group_m=2)
    out = moekern.fused_moe(x, w13, w2, topk_weights=w, topk_ids=ids, backend="triton", block_config=cfg)
    torch.testing.assert_close(out, fused_moe_reference(x, w13, w2, w, ids), **FP32_TOL)


@pytest.mark.parametrize("variant", ["fused", "unfused", "unfused-tma-persistent", "split-k2"])
def test_variants_low_precision(variant, device):
    if device == "cpu" and variant.endswith("tma-persistent"):
        pytest.skip("fp16 descriptor loads in the interpreter add nothing over the fp32 test; runs on a GPU")
    dtype = torch.float16
    E, k, M = 8, 2, 8
    w13, w2 = _weights(E, dtype=dtype, device=device)
    x, logits = _inputs(M, E, dtype=dtype, device=device)
    w, ids = _route(logits, k)
    out = moekern.fused_moe(x, w13, w2, topk_weights=w, topk_ids=ids, backend="triton",
                            block_config=_variant(variant, block_k=32))
    ref = fused_moe_reference(x.float(), w13.float(), w2.float(), w, ids)
    assert out.dtype == dtype and _rel_err(out, ref) < LOWP_REL_TOL


def test_silu_and_mul_kernel(device):
    from moekern.experts.triton_gemm import silu_and_mul

    g = torch.Generator().manual_seed(3)
    gate_up = torch.randn(5, 2 * 24, generator=g).to(device) * 4
    out = silu_and_mul(gate_up, torch.empty(5, 24, device=device))
    ref = torch.nn.functional.silu(gate_up[:, :24]) * gate_up[:, 24:]
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


def test_fast_path_noncontiguous_routing(device):
    """_fused_moe_impl copies only what is not already in the kernels' layout: strided ids/weights and fp16
    weights must still give the reference's answer."""
    E, k, M = 8, 2, 7
    w13, w2 = _weights(E, device=device)
    x, logits = _inputs(M, E, device=device)
    w, ids = _route(logits, k)
    ids_strided = torch.stack([ids, ids], dim=2)[:, :, 0]  # stride (2k, 2)
    w_strided = w.t().contiguous().t()  # column-major [M, k]
    assert not ids_strided.is_contiguous() and not w_strided.is_contiguous()
    ref = fused_moe_reference(x, w13, w2, w, ids)
    out = moekern.fused_moe(x, w13, w2, topk_weights=w_strided, topk_ids=ids_strided.long(), backend="triton")
    torch.testing.assert_close(out, ref, **FP32_TOL)
    out = moekern.fused_moe(x, w13, w2, topk_weights=w.half(), topk_ids=ids, backend="triton")
    torch.testing.assert_close(out, fused_moe_reference(x, w13, w2, w.half().float(), ids), **FP32_TOL)


def test_noncontiguous_int32_ids_on_triton():
    # int32 ids that are already the kernels' dtype but strided (a column slice): made contiguous, same answer
    E, k, M = 8, 2, 5
    w13, w2 = _weights(E)
    x, logits = _inputs(M, E)
    w, ids = _route(logits, k)
    ids32 = torch.stack([ids, ids], dim=2)[:, :, 0].to(torch.int32)
    ids32 = torch.stack([ids32, ids32], dim=2)[:, :, 0]
    assert ids32.dtype == torch.int32 and not ids32.is_contiguous()
    out = moekern.fused_moe(x, w13, w2, topk_weights=w, topk_ids=ids32, backend="triton")
    torch.testing.assert_close(out, fused_moe_reference(x, w13, w2, w, ids), **FP32_TOL)


def test_weight_messages_name_the_argument():
    E, M = 4, 3
    w13, w2 = _weights(E)
    x, _ = _inputs(M, E)
    pre = dict(topk_weights=torch.ones(M, 1), topk_ids=torch.zeros(M, 1, dtype=torch.int32), backend="torch")
    for args, msg in [((x.tolist(), w13, w2), "hidden_states must be a torch.Tensor; got list"),
                      ((x, w13.tolist(), w2), "w13 must be a torch.Tensor; got list"),
                      ((x, w13, w2.tolist()), "w2 must be a torch.Tensor; got list"),
                      ((x, w13, w2.half()), "w2.dtype must equal hidden_states.dtype=torch.float32; got torch.float16")]:
        with pytest.raises((TypeError, ValueError), match="^" + re.escape(msg) + "$"):
            moekern.fused_moe(*args, **pre)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_one_expert_and_an_intermediate_of_one(backend):
    # the smallest layer the checks allow: E = 1, I = 1 (w13 has 2 rows: gate, up)
    w13, w2 = _weights(1, inter=1)
    x, _ = _inputs(3, 1)
    w, ids = torch.ones(3, 1), torch.zeros(3, 1, dtype=torch.int32)
    out = moekern.fused_moe(x, w13, w2, topk_weights=w, topk_ids=ids, backend=backend)
    torch.testing.assert_close(out, fused_moe_reference(x, w13, w2, w, ids), **FP32_TOL)


def test_torch_and_default_backend_on_cpu_are_the_reference():
    # backend defaults to "auto", which on CPU tensors is the torch reference itself, bit for bit (the Triton
    # kernels under the interpreter sum in another order, so they would not pass)
    E, k, M = 8, 2, 5
    w13, w2 = _weights(E)
    x, logits = _inputs(M, E)
    w, ids = _route(logits, k)
    want = fused_moe_reference(x, w13, w2, w, ids)
    assert torch.equal(moekern.fused_moe(x, w13, w2, topk_weights=w, topk_ids=ids), want)
    assert torch.equal(moekern.fused_moe(x, w13, w2, logits, k), want)
    assert torch.equal(moekern.fused_moe(x, w13, w2, logits, k, backend="torch"), want)


def test_precomputed_routing_on_another_device_is_named():
    # a meta tensor stands in for another device (check_ids=False: a meta tensor has no values to range-check)
    E, k, M = 4, 2, 3
    w13, w2 = _weights(E)
    x, logits = _inputs(M, E)
    w, ids = _route(logits, k)
    for name, pre in [("topk_weights", dict(topk_weights=w.to("meta"), topk_ids=ids)),
                      ("topk_ids", dict(topk_weights=w, topk_ids=ids.to("meta")))]:
        msg = f"{name} is on meta but hidden_states is on cpu"
        with pytest.raises(ValueError, match="^" + re.escape(msg) + "$"):
            moekern.fused_moe(x, w13, w2, **pre, backend="torch", check_ids=False)


def test_torch_backend_runs_without_triton(monkeypatch):
    # backend="torch" asks nothing of Triton: with the interpreter off, CPU tensors still run on the reference,
    # while backend="triton" is refused (which shows the interpreter really is off)
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # read when the backend is checked, not at import
    E, k, M = 8, 2, 5
    w13, w2 = _weights(E)
    x, logits = _inputs(M, E)
    w, ids = _route(logits, k)
    want = fused_moe_reference(x, w13, w2, w, ids)
    assert torch.equal(moekern.fused_moe(x, w13, w2, logits, k, backend="torch"), want)
    assert torch.equal(moekern.fused_moe(x, w13, w2, topk_weights=w, topk_ids=ids, backend="torch"), want)
    with pytest.raises(RuntimeError, match=r"^backend='triton' is unavailable on this machine: the triton backend"):
        moekern.fused_moe(x, w13, w2, logits, k, backend="triton")


def test_unknown_routing_keyword_is_named():
    E, M = 4, 3
    w13, w2 = _weights(E)
    x, logits = _inputs(M, E)
    msg = ("fused_moe got unexpected keyword argument(s) ['renormalise']; routing takes ('scoring', 'renormalize', "
           "'correction_bias', 'num_expert_group', 'topk_group', 'routed_scaling_factor')")
    with pytest.raises(TypeError, match="^" + re.escape(msg) + "$"):
        moekern.fused_moe(x, w13, w2, logits, 2, renormalise=True)


def test_triton_past_512_experts_is_refused_by_align():
    # the Triton experts have no E limit of their own; align's kernels stop at 512 and say so
    E, k, M = 513, 2, 2
    w13, w2 = _weights(E, h=4, inter=2)
    x, _ = _inputs(M, E, h=4)
    ids = torch.tensor([[0, 512], [1, 2]], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"^backend='triton' covers num_experts <= 512; got num_experts=513"):
        moekern.fused_moe(x, w13, w2, topk_weights=torch.ones(M, k), topk_ids=ids, backend="triton")


def test_config_lookup_cached():
    from moekern.experts.configs import _lookup_in

    dev = torch.device("cpu")
    first = get_configs(3, 8, 2, 16, 32, torch.float32, dev)
    hits = _lookup_in.cache_info().hits
    assert get_configs(3, 8, 2, 16, 32, torch.float32, dev) is first
    assert _lookup_in.cache_info().hits == hits + 1
    assert first == default_configs(3, 8, 2, 16, 32, torch.float32)


def test_variant_config_errors():
    dev = torch.device("cpu")
    for bad, match in [(BlockConfig(persistent=-1), "persistent=-1"), (BlockConfig(persistent=True), "persistent=True"),
                       (BlockConfig(fuse_silu=1), "fuse_silu=1 must be a bool"), (BlockConfig(tma="yes"), "tma='yes'")]:
        with pytest.raises(ValueError, match=match):
            get_configs(4, 4, 2, 16, 32, torch.float32, dev, bad)


def test_tma_needs_aligned_k(device):
    E, k, M, h = 4, 2, 3, 34  # 34 * 4 bytes is not a multiple of 16
    w13, w2 = _weights(E, h, device=device)
    x, logits = _inputs(M, E, h, device=device)
    w, ids = _route(logits, k)
    with pytest.raises(ValueError, match="tma needs K"):
        moekern.fused_moe(x, w13, w2, topk_weights=w, topk_ids=ids, backend="triton",
                          block_config=BlockConfig(16, 16, 16, 1, 4, 1, tma=True))


def test_default_configs():
    g1, g2 = default_configs(1, 256, 8, 2048, 7168, torch.bfloat16)
    assert g1.block_m == g2.block_m == 16  # decode: small M tile
    g1, g2 = default_configs(8192, 8, 2, 14336, 4096, torch.bfloat16)
    assert g1.block_m == g2.block_m == 128 and g1.group_m > 1
    g1, g2 = default_configs(4, 4, 2, 16, 32, torch.float32)  # tiny shapes: tiles clamp to the problem
    assert (g1.block_n, g1.block_k, g2.block_n, g2.block_k) == (16, 32, 32, 16)
    for cfg in (g1, g2):
        cfg.validate()


def test_tuned_table_entries_valid():
    from moekern.experts.configs import TUNED

    for key, rows in TUNED.items():
        for bucket, (g1, g2) in rows.items():
            g1.validate(f"TUNED{key}[{bucket}].gemm1")
            g2.validate(f"TUNED{key}[{bucket}].gemm2")
            assert g1.block_m == g2.block_m, (key, bucket)


def test_block_config_errors():
    dev = torch.device("cpu")
    with pytest.raises(ValueError, match=r"block_config\[gemm1\].block_m=24 must be a power of two"):
        get_configs(4, 4, 2, 16, 32, torch.float32, dev, BlockConfig(block_m=24))
    with pytest.raises(ValueError, match=r"block_config\[gemm2\].num_warps=3"):
        get_configs(4, 4, 2, 16, 32, torch.float32, dev, (BlockConfig(), BlockConfig(num_warps=3)))
    for bad in ((BlockConfig(),) * 3, (BlockConfig(), {"block_m": 16}), [BlockConfig(), BlockConfig()]):
        with pytest.raises(TypeError, match="block_config must be"):
            get_configs(4, 4, 2, 16, 32, torch.float32, dev, bad)
    with pytest.raises(ValueError, match="must be equal"):
        get_configs(4, 4, 2, 16, 32, torch.float32, dev, (BlockConfig(block_m=16), BlockConfig(block_m=32)))
    with pytest.raises(TypeError, match="block_config must be"):
        get_configs(4, 4, 2, 16, 32, torch.float32, dev, {"block_m": 16})
    split = BlockConfig(fuse_silu=False, split_k=4)
    assert get_configs(4, 4, 2, 16, 32, torch.float32, dev, (split, BlockConfig()))[0] is split
    with pytest.raises(ValueError, match="gemm2.split_k=4 must be 1"):  # one config for both GEMMs
        get_configs(4, 4, 2, 16, 32, torch.float32, dev, split)
    for bad, match in ((dict(split_k=3), "split_k=3 must be 1, 2, 4 or 8"),
                       (dict(split_k=True), "split_k=True must be 1, 2, 4 or 8"),
                       (dict(split_k=2), "split_k=2 needs fuse_silu=False"),
                       (dict(split_k=2, fuse_silu=False, persistent=1), "split_k=2 needs fuse_silu=False, persistent=0"),
                       (dict(split_k=2, fuse_silu=False, tma=True), "split_k=2 needs")):
        with pytest.raises(ValueError, match=match):
            get_configs(4, 4, 2, 16, 32, torch.float32, dev, (BlockConfig(**bad), BlockConfig()))


def _bad_cases():
    E, M, k = 4, 3, 2
    w13, w2 = _weights(E)
    x, logits = _inputs(M, E)
    w, ids = _route(logits, k)
    pre = dict(topk_weights=w, topk_ids=ids)
    return [
        ("w2 shape", (x, w13, _weights(E, inter=8)[1]), pre, ValueError, "w2 must have shape"),
        ("w13 H", (x, _weights(E, h=16)[0], w2), pre, ValueError, r"w13 must have shape \[E, 2I, H=32\]"),
        ("odd 2I", (x, torch.randn(E, 5, H), w2), pre, ValueError, "must be even"),
        ("expert count", (x, w13, _weights(E + 1)[1]), pre, ValueError, "w2 must have shape"),
        ("hidden 1-D", (x[0], w13, w2), pre, ValueError, "hidden_states must be 2-D"),
        ("dtype", (x.half(), w13, w2), pre, TypeError, "w13.dtype must equal"),
        ("int hidden", (x.int(), w13.int(), w2.int()), pre, TypeError, "hidden_states must be bfloat16"),
        ("noncontig w13", (x, w13.transpose(1, 2).contiguous().transpose(1, 2), w2), pre, ValueError,
         "w13 must be contiguous"),
        ("no routing", (x, w13, w2), {}, ValueError, "needs router_logits"),
        ("top_k missing", (x, w13, w2, logits), {}, ValueError, "top_k is required"),
        ("both", (x, w13, w2, logits, k), pre, ValueError, "not both"),
        ("only ids", (x, w13, w2), dict(topk_ids=ids), ValueError, "go together"),
        ("ids range", (x, w13, w2), dict(topk_weights=w, topk_ids=ids + E), ValueError, r"must lie in \[0, num_experts=4\)"),
        ("ids negative", (x, w13, w2), dict(topk_weights=w, topk_ids=ids - E), ValueError, "must lie in"),
        ("id at E", (x, w13, w2), dict(topk_weights=w, topk_ids=torch.tensor([[0, 1], [2, 3], [1, E]])), ValueError,
         r"got values in \[0, 4\]"),
        ("ids rows", (x, w13, w2), dict(topk_weights=w[:2], topk_ids=ids[:2]), ValueError, r"shape \[M=3, k\]"),
        ("ids/weights shape", (x, w13, w2), dict(topk_weights=w[:, :1], topk_ids=ids), ValueError, "same shape"),
        ("float ids", (x, w13, w2), dict(topk_weights=w, topk_ids=ids.float()), TypeError, "int32 or int64"),
        ("k > E", (x, w13, w2), dict(topk_weights=torch.rand(M, 5), topk_ids=torch.zeros(M, 5, dtype=torch.int32)),
         ValueError, "must be <= num_experts=4"),
        ("top_k disagrees", (x, w13, w2, None, 3), pre, ValueError, "disagrees"),
        ("logits shape", (x, w13, w2, logits[:, :3], k), {}, ValueError, r"router_logits must have shape \[M=3, E=4\]"),
        ("kwargs with ids", (x, w13, w2), dict(pre, scoring="sigmoid"), ValueError, "no effect"),
        ("unknown kwarg", (x, w13, w2, logits, k), dict(renormalise=True), TypeError, "unexpected keyword"),
        ("backend", (x, w13, w2, logits, k), dict(backend="cutlass"), ValueError, "backend='cutlass'"),
        ("routing check", (x, w13, w2, logits, 5), {}, ValueError, "top_k=5 must be <= num_experts=4"),
        # not an int: no configs are looked up for it, so routing's own check is the one that speaks
        ("top_k str", (x, w13, w2, logits, "2"), {}, TypeError, r"^top_k must be an int; got str '2'$"),
    ]


@pytest.mark.parametrize("case", _bad_cases(), ids=lambda c: c[0])
def test_bad_inputs(case):
    _, args, kwargs, exc, match = case
    kwargs = {"backend": "torch", **kwargs}
    with pytest.raises(exc, match=match):
        moekern.fused_moe(*args, **kwargs)


# ---------------------------------------------------------------------------------------------- GPU
MODEL_SHAPES = ["mixtral", "qwen3-30b-a3b", "deepseek-v3", "olmoe"]
_GPU_WEIGHTS: dict = {}


def _model_weights(name):
    """bf16 weights made on the GPU (DeepSeek-V3's w13 is 15 GB), scaled so activations stay O(1); one model
    is held at a time."""
    spec = get_model(name)
    if name not in _GPU_WEIGHTS:
        _GPU_WEIGHTS.clear()
        torch.cuda.empty_cache()
        torch.manual_seed(0)
        E, h, inter = spec.num_experts, spec.hidden_size, spec.intermediate_size
        w13 = torch.randn(E, 2 * inter, h, dtype=torch.bfloat16, device="cuda").mul_(h**-0.5)
        w2 = torch.randn(E, h, inter, dtype=torch.bfloat16, device="cuda").mul_(inter**-0.5)
        _GPU_WEIGHTS[name] = (spec, w13, w2)
    return _GPU_WEIGHTS[name]


@pytest.mark.gpu
@pytest.mark.parametrize("name", MODEL_SHAPES)
@pytest.mark.parametrize("M", [1, 64, 1024])
def test_model_shapes_bf16(name, M):
    spec, w13, w2 = _model_weights(name)
    E, k = spec.num_experts, spec.top_k
    torch.manual_seed(M)
    x = torch.randn(M, spec.hidden_size, dtype=torch.bfloat16, device="cuda")
    logits = torch.randn(M, E, device="cuda")
    routing_kw = spec.routing_kwargs()
    if spec.correction_bias:
        routing_kw["correction_bias"] = torch.randn(E, device="cuda") * 0.1
    w, ids, _ = moekern.fused_topk(logits, k, backend="torch", **routing_kw)
    out = moekern.fused_moe(x, w13, w2, topk_weights=w, topk_ids=ids, backend="triton")
    # The reference loops over experts with at least one token only, in fp32, one expert at a time.
    ref = fused_moe_reference(x.float(), w13, w2, w, ids)
    assert out.dtype == torch.bfloat16 and out.shape == x.shape
    assert _rel_err(out, ref) < LOWP_REL_TOL


@pytest.mark.gpu
@pytest.mark.parametrize("name", MODEL_SHAPES)
def test_model_layer_from_logits_bf16(name):
    """The whole layer from logits, with routing and align on the GPU's own backends ("auto")."""
    spec, w13, w2 = _model_weights(name)
    E, k, M = spec.num_experts, spec.top_k, 256
    torch.manual_seed(1)
    x = torch.randn(M, spec.hidden_size, dtype=torch.bfloat16, device="cuda")
    logits = torch.randn(M, E, device="cuda")
    routing_kw = spec.routing_kwargs()
    if spec.correction_bias:
        routing_kw["correction_bias"] = torch.randn(E, device="cuda") * 0.1
    w, ids, _ = moekern.fused_topk(logits, k, **routing_kw)
    out = moekern.fused_moe(x, w13, w2, logits, k, **routing_kw)
    ref = fused_moe_reference(x.float(), w13, w2, w, ids)
    assert _rel_err(out, ref) < LOWP_REL_TOL


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["qwen3-30b-a3b", "deepseek-v3"])
@pytest.mark.parametrize("cfg", [
    BlockConfig(128, 128, 64, 8, 8, 3, fuse_silu=False),
    BlockConfig(128, 128, 64, 8, 8, 3, fuse_silu=False, persistent=1),
    BlockConfig(64, 64, 128, 8, 8, 4, tma=True),
], ids=["unfused", "unfused-persistent", "fused-tma"])
def test_model_shapes_variants_bf16(name, cfg):
    """The prefill variants benchmarks/moe_variants.py times, compiled for the GPU at the real shapes."""
    spec, w13, w2 = _model_weights(name)
    E, k, M = spec.num_experts, spec.top_k, 1024
    torch.manual_seed(2)
    x = torch.randn(M, spec.hidden_size, dtype=torch.bfloat16, device="cuda")
    w, ids, _ = moekern.fused_topk(torch.randn(M, E, device="cuda"), k, backend="torch", **spec.routing_kwargs())
    g2 = BlockConfig(cfg.block_m, 128, 64, 8, 8, 3, persistent=cfg.persistent, tma=cfg.tma)
    out = moekern.fused_moe(x, w13, w2, topk_weights=w, topk_ids=ids, block_config=(cfg, g2), check_ids=False)
    assert _rel_err(out, fused_moe_reference(x.float(), w13, w2, w, ids)) < LOWP_REL_TOL


# ------------------------------------------------------------------- precomputed expert_counts
@pytest.mark.parametrize("check_ids", [True, False])
def test_precomputed_expert_counts_match_recount(check_ids, device):
    """Routing's histogram handed to fused_moe gives the same result as letting align recount it."""
    E, k, M = 8, 2, 7
    w13, w2 = _weights(E, device=device)
    x, logits = _inputs(M, E, device=device)
    w, ids, counts = fused_topk_reference(logits, k)
    with_counts = moekern.fused_moe(x, w13, w2, topk_weights=w, topk_ids=ids, expert_counts=counts,
                                    backend="triton", check_ids=check_ids)
    recounted = moekern.fused_moe(x, w13, w2, topk_weights=w, topk_ids=ids, backend="triton")
    torch.testing.assert_close(with_counts, recounted, rtol=0, atol=0)
    torch.testing.assert_close(with_counts, fused_moe_reference(x, w13, w2, w, ids), **FP32_TOL)


def test_precomputed_expert_counts_errors():
    E, k, M = 8, 2, 5
    w13, w2 = _weights(E)
    x, logits = _inputs(M, E)
    w, ids, counts = fused_topk_reference(logits, k)
    wrong = counts.clone()
    wrong[0] += 1
    wrong[1] -= 1
    with pytest.raises(ValueError, match=r"expert_counts must equal bincount\(topk_ids, minlength=8\)"):
        moekern.fused_moe(x, w13, w2, topk_weights=w, topk_ids=ids, expert_counts=wrong, backend="torch")
    with pytest.raises(TypeError, match="expert_counts must be int32; got torch.int64"):
        moekern.fused_moe(x, w13, w2, topk_weights=w, topk_ids=ids, expert_counts=counts.long(), backend="torch")
    with pytest.raises(ValueError, match=r"expert_counts must have shape \(8,\); got \(4,\)"):
        moekern.fused_moe(x, w13, w2, topk_weights=w, topk_ids=ids, expert_counts=counts[:4], backend="torch")
    with pytest.raises(TypeError, match="expert_counts must be a torch.Tensor"):
        moekern.fused_moe(x, w13, w2, topk_weights=w, topk_ids=ids, expert_counts=[1] * E, backend="torch")
    with pytest.raises(ValueError, match="expert_counts goes with precomputed topk_ids"):
        moekern.fused_moe(x, w13, w2, logits, k, expert_counts=counts, backend="torch")


def test_precomputed_expert_counts_reach_align(monkeypatch, device):
    """The histogram is handed on to align (which then skips its own count), not dropped."""
    import moekern.dispatch.triton_ops as triton_ops

    aligns = _spy(monkeypatch, triton_ops, "align_triton")
    E, k, M = 8, 2, 6
    w13, w2 = _weights(E, device=device)
    x, logits = _inputs(M, E, device=device)
    w, ids, counts = fused_topk_reference(logits, k)
    moekern.fused_moe(x, w13, w2, topk_weights=w, topk_ids=ids, expert_counts=counts, backend="triton")
    assert len(aligns) == 1 and aligns[0][0][3] is counts


# ------------------------------------------------------------------- which kernels run
def test_triton_backend_runs_each_stage_in_triton(monkeypatch):
    """backend="triton" from router_logits: fused_topk's Triton kernel, align's Triton kernel with gemm1's block_m,
    then the grouped GEMMs with get_configs' pick for this call (block_config=None), each once. The answer alone
    cannot tell: routing by the reference or other tiles give it too."""
    import moekern.dispatch.triton_ops as triton_ops
    import moekern.experts.triton_gemm as triton_gemm
    import moekern.routing.triton_topk as triton_topk

    E, k, M, inter = 8, 2, 5, 24
    w13, w2 = _weights(E, inter=inter)
    x, logits = _inputs(M, E)
    # fp32 and fp16 tiles differ here in num_stages only, which the interpreter ignores: only the configs show it
    cfgs = get_configs(M, E, k, inter, H, torch.float32, torch.device("cpu"))
    assert cfgs != get_configs(M, E, k, inter, H, torch.float16, torch.device("cpu"))
    routing = _spy(monkeypatch, triton_topk, "fused_topk_triton")
    aligns = _spy(monkeypatch, triton_ops, "align_triton")
    experts = _spy(monkeypatch, triton_gemm, "moe_experts_triton")
    out = moekern.fused_moe(x, w13, w2, logits, k, backend="triton")
    assert len(routing) == 1 and [args[2] for args, _ in aligns] == [cfgs[0].block_m]
    assert [args[-2:] for args, _ in experts] == [cfgs]
    torch.testing.assert_close(out, fused_moe_reference(x, w13, w2, *_route(logits, k)), **FP32_TOL)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "auto"])
def test_gpu_cuda_stages_feed_the_triton_experts(backend, monkeypatch):
    """On CUDA tensors "cuda" and "auto" route and align in one route_and_align call (block size: gemm1's block_m)
    and run the Triton experts on that layout, with no second align; with precomputed ids, align_cuda gets the
    caller's expert_counts. The answer alone cannot tell: the reference, a second align or a recount give it too."""
    import moekern.dispatch.cuda_ops as cuda_ops
    import moekern.dispatch.route_align as route_align
    import moekern.experts.triton_gemm as triton_gemm

    E, k, M = 8, 2, 7
    w13, w2 = _weights(E, device="cuda")
    x, logits = _inputs(M, E, device="cuda")
    w, ids, counts = fused_topk_reference(logits, k)
    ref = fused_moe_reference(x, w13, w2, w, ids)
    block_m = get_configs(M, E, k, I, H, torch.float32, x.device)[0].block_m
    fused = _spy(monkeypatch, route_align, "route_and_align")
    aligns = _spy(monkeypatch, cuda_ops, "align_cuda")
    experts = _spy(monkeypatch, triton_gemm, "moe_experts_triton")
    out = moekern.fused_moe(x, w13, w2, logits, k, backend=backend)
    assert [kw["block_size"] for _, kw in fused] == [block_m] and aligns == [] and len(experts) == 1
    torch.testing.assert_close(out, ref, **FP32_TOL)
    out = moekern.fused_moe(x, w13, w2, topk_weights=w, topk_ids=ids, expert_counts=counts, backend=backend)
    assert len(fused) == 1 and len(aligns) == 1 and aligns[0][0][3] is counts and len(experts) == 2
    torch.testing.assert_close(out, ref, **FP32_TOL)


def test_split_a_stages_fit_the_partial_tiles_in_shared_memory():
    """GEMM2 over split-K partials: num_stages - 1 pipelined copies of the B tile (bf16) and 2 * split fp32 A tiles
    must fit; the H100 run that failed (split 8, 16 x 64 x 128, 3 stages: 288 KiB > 227 KiB) gets 2 stages."""
    from moekern.experts.triton_gemm import split_a_stages

    h100 = 232448
    cfg = BlockConfig(16, 64, 128, 1, 4, 3)
    assert split_a_stages(cfg, 8, 2, h100) == 2      # (16 + 128) KiB per stage
    assert split_a_stages(cfg, 4, 2, h100) == 3      # (16 + 64) KiB: 2 copies fit, 3 stages kept
    assert split_a_stages(dataclasses.replace(cfg, num_stages=4), 4, 2, h100) == 3   # the tune's M=2 failure
    assert split_a_stages(dataclasses.replace(cfg, num_stages=5), 2, 2, h100) == 5   # (16 + 32) KiB x 4 fits
    assert split_a_stages(BlockConfig(64, 256, 256, 1, 4, 4), 8, 2, h100) == 1       # nothing fits twice
    assert split_a_stages(cfg, 8, 2, None) == 3      # no device limit known (CPU, interpreter): as configured


@pytest.mark.gpu
@pytest.mark.parametrize("name,M", [("qwen3-30b-a3b", 1), ("qwen3-30b-a3b", 4), ("olmoe", 2), ("deepseek-v3", 1)])
@pytest.mark.parametrize("split_k", [2, 4, 8])
def test_gpu_split_k_gemm1_at_model_shapes(name, M, split_k):
    """Split-K GEMM1 (fp32 partials) with gemm2 reducing them as it loads, compiled for the GPU at decode shapes."""
    spec, w13, w2 = _model_weights(name)
    torch.manual_seed(M + split_k)
    x = torch.randn(M, spec.hidden_size, dtype=torch.bfloat16, device="cuda")
    w, ids, _ = moekern.fused_topk(torch.randn(M, spec.num_experts, device="cuda"), spec.top_k, backend="torch",
                                   **spec.routing_kwargs())
    pair = (BlockConfig(16, 64, 128, 1, 4, 3, fuse_silu=False, split_k=split_k), BlockConfig(16, 64, 128, 1, 4, 3))
    out = moekern.fused_moe(x, w13, w2, topk_weights=w, topk_ids=ids, backend="triton", block_config=pair)
    plain = moekern.fused_moe(x, w13, w2, topk_weights=w, topk_ids=ids, backend="triton",
                              block_config=(BlockConfig(16, 64, 128, 1, 4, 3), BlockConfig(16, 64, 128, 1, 4, 3)))
    ref = fused_moe_reference(x.float(), w13, w2, w, ids)
    assert _rel_err(out, ref) < LOWP_REL_TOL and _rel_err(out, plain) < LOWP_REL_TOL


@pytest.mark.gpu
def test_gpu_auto_past_the_routing_kernels_top_k_limit():
    """top_k = 17 (past the routing kernels' 16) on CUDA with "auto": routing falls back as fused_topk's "auto" does,
    instead of route_and_align(backend="cuda") refusing the k."""
    E, k, M = 32, 17, 5
    w13, w2 = _weights(E, device="cuda")
    x, logits = _inputs(M, E, device="cuda")
    w, ids, _ = fused_topk_reference(logits, k)
    out = moekern.fused_moe(x, w13, w2, logits, k, backend="auto")
    torch.testing.assert_close(out, fused_moe_reference(x, w13, w2, w, ids), **FP32_TOL)


def _tune_row(M, us, today_us, block_m=64, E=8, inter=14336, H=4096):
    cfg = dataclasses.asdict(BlockConfig(block_m, 128, 64, 1, 4, 3))
    return dict(model="mixtral", M=M, E=E, I=inter, H=H, today_us=today_us,
                best=dict(name="x", gemm1=cfg, gemm2=cfg, us=us))


def test_moe_configs_env_overlays_tuned(tmp_path, monkeypatch):
    """MOEKERN_MOE_CONFIGS lays tune_moe_shapes.py winners over TUNED (later files win), even a winner that
    is today's pick (a new bucket row); unset, the table is TUNED itself."""
    from moekern.experts.configs import CONFIGS_ENV, TUNED, _lookup_in, active_table

    monkeypatch.delenv(CONFIGS_ENV, raising=False)
    assert active_table() is TUNED
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps({"rows": [_tune_row(160, 900.0, 1200.0), _tune_row(112, 1000.0, 1000.0)]}))
    b.write_text(json.dumps([_tune_row(160, 890.0, 1200.0, block_m=32), {"model": "x", "M": 8, "E": 8}]))
    monkeypatch.setenv(CONFIGS_ENV, f"{a}{os.pathsep}{b}")
    table = active_table()
    rows = table[(8, 14336, 4096)]
    assert rows[160][0].block_m == 32 and rows[112][0].block_m == 64  # b's row won; equal time still applied
    assert set(rows) == set(TUNED[(8, 14336, 4096)]) | {112, 160}
    assert 160 not in TUNED[(8, 14336, 4096)]  # the package's table is untouched
    # the lookup cache is keyed on the files, so changing the variable takes effect
    before = _lookup_in.cache_info().currsize
    get_configs(3, 8, 2, 16, 32, torch.float32, torch.device("cpu"))
    assert _lookup_in.cache_info().currsize == before + 1


@pytest.mark.parametrize("content,match", [
    (None, "cannot read tuned rows"),
    ("{not json", "cannot read tuned rows"),
    ('{"rows": 3}', "cannot read tuned rows"),
    (json.dumps([{**_tune_row(128, 1.0, 2.0), "best": {"gemm1": {"block_m": 48}, "gemm2": {}, "us": 1.0}}]),
     "bad row"),
])
def test_moe_configs_env_errors(tmp_path, monkeypatch, content, match):
    from moekern.experts.configs import CONFIGS_ENV, active_table

    path = tmp_path / "rows.json"
    if content is not None:
        path.write_text(content)
    monkeypatch.setenv(CONFIGS_ENV, str(path))
    with pytest.raises(ValueError, match=match) as err:
        active_table()
    assert CONFIGS_ENV in str(err.value)


@pytest.mark.parametrize("interpret", ["0", "1"])
def test_cuda_backend_on_cpu_names_cuda_not_triton(interpret, monkeypatch):
    # backend="cuda" runs the CUDA routing/align stages: on CPU tensors the error is about those, with or without
    # the Triton interpreter, and it never blames the triton backend the user did not ask for.
    monkeypatch.setenv("TRITON_INTERPRET", interpret)  # read when the backend is checked, not at import
    x, logits = _inputs(4, 8)
    w13, w2 = _weights(8)
    with pytest.raises(RuntimeError) as exc:
        moekern.fused_moe(x, w13, w2, router_logits=logits, top_k=2, backend="cuda")
    msg = str(exc.value)
    assert "backend='cuda'" in msg and "CUDA" in msg and "triton" not in msg.lower(), msg


def test_pdl_only_on_cuda_for_small_experts_unless_switched(monkeypatch):
    """Programmatic dependent launch: never on CPU tensors; on a capable CUDA device for experts of at most
    PDL_MAX_EXPERT_BYTES (Qwen3's 6.3 MB yes, Mixtral's 235 MB no); MOEKERN_PDL=1 / 0 force it on / off for every
    size, read at every call (decode_layer.py times both in one process)."""
    import moekern.experts.triton_gemm as tg

    cuda = torch.device("cuda", 0)
    small = torch.empty(2, 1536, 2048, dtype=torch.bfloat16, device="meta")     # Qwen3-30B-A3B's w13
    large = torch.empty(2, 28672, 4096, dtype=torch.bfloat16, device="meta")    # Mixtral-8x7B's
    edge = torch.empty(2, 4096, 2048, dtype=torch.bfloat16, device="meta")      # exactly 16 MiB per expert
    monkeypatch.delenv("MOEKERN_PDL", raising=False)
    assert not tg.use_pdl(torch.device("cpu"), small)
    monkeypatch.setattr(tg, "_pdl_capable", lambda index: True)
    assert tg.use_pdl(cuda, small) and tg.use_pdl(cuda, edge) and tg.use_pdl(cuda)
    assert not tg.use_pdl(cuda, large)
    assert not tg.use_pdl(cuda, torch.empty(2, 4097, 2048, dtype=torch.bfloat16, device="meta"))
    monkeypatch.setenv("MOEKERN_PDL", "0")
    assert not tg.use_pdl(cuda, small) and not tg.use_pdl(cuda)
    monkeypatch.setenv("MOEKERN_PDL", "1")
    assert tg.use_pdl(cuda, large) and not tg.use_pdl(torch.device("cpu"), large)
    monkeypatch.setattr(tg, "_pdl_capable", lambda index: False)
    assert not tg.use_pdl(cuda, small)


def test_pdl_stages_gemm1_for_every_size_the_rest_for_small_experts(monkeypatch):
    """GEMM1 launches with PDL on a capable device for every expert size, the kernels after it only for small
    experts; MOEKERN_PDL=gemm1 keeps GEMM1's alone, =1 all, =0 none; never on CPU or a device without PDL."""
    import moekern.experts.triton_gemm as tg

    cuda = torch.device("cuda", 0)
    small = torch.empty(2, 1536, 2048, dtype=torch.bfloat16, device="meta")
    large = torch.empty(2, 28672, 4096, dtype=torch.bfloat16, device="meta")
    monkeypatch.setattr(tg, "_pdl_capable", lambda index: True)
    monkeypatch.delenv("MOEKERN_PDL", raising=False)
    assert tg.pdl_stages(cuda, small) == (True, True) and tg.pdl_stages(cuda, large) == (True, False)
    assert tg.pdl_stages(torch.device("cpu"), small) == (False, False)
    monkeypatch.setenv("MOEKERN_PDL", "gemm1")
    assert tg.pdl_stages(cuda, small) == (True, False) and tg.pdl_stages(cuda, large) == (True, False)
    assert not tg.use_pdl(cuda, small)
    monkeypatch.setenv("MOEKERN_PDL", "1")
    assert tg.pdl_stages(cuda, large) == (True, True)
    monkeypatch.setenv("MOEKERN_PDL", "0")
    assert tg.pdl_stages(cuda, small) == (False, False)
    monkeypatch.setattr(tg, "_pdl_capable", lambda index: False)
    monkeypatch.setenv("MOEKERN_PDL", "gemm1")
    assert tg.pdl_stages(cuda, small) == (False, False)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["1", "gemm1", None])
@pytest.mark.parametrize("name", ["qwen3-30b-a3b", "mixtral"])
@pytest.mark.parametrize("M", [1, 4, 64, 300])  # 64: route_and_align's grid tier at E >= 32 (300: Mixtral's)
def test_gpu_pdl_layer_replayed_in_a_cuda_graph(name, M, mode, monkeypatch):
    """The layer from logits captured once in a CUDA graph, replayed on new inputs: with programmatic dependent launch
    (route_and_align -> GEMM1 -> GEMM2 -> combine, each waiting for the one before; MOEKERN_PDL=1, =gemm1 and the
    default, which is GEMM1 alone for Mixtral) it gives what the same layer gives without it, and the reference. On
    sm_90 the GEMM must really have been compiled with griddepcontrol."""
    import moekern.experts.triton_gemm as tg

    spec, w13, w2 = _model_weights(name)
    E, k, hidden = spec.num_experts, spec.top_k, spec.hidden_size
    x = torch.zeros(M, hidden, dtype=torch.bfloat16, device="cuda")
    logits = torch.zeros(M, E, device="cuda")
    kw = spec.routing_kwargs()

    def set_mode():
        if mode is None:
            monkeypatch.delenv("MOEKERN_PDL", raising=False)
        else:
            monkeypatch.setenv("MOEKERN_PDL", mode)

    set_mode()
    moekern.fused_moe(x, w13, w2, logits, k, **kw)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = moekern.fused_moe(x, w13, w2, logits, k, **kw)
    for seed in (3, 4):
        torch.manual_seed(seed)
        x.copy_(torch.randn_like(x))
        logits.copy_(torch.randn_like(logits))
        graph.replay()
        torch.cuda.synchronize()
        monkeypatch.setenv("MOEKERN_PDL", "0")
        plain = moekern.fused_moe(x, w13, w2, logits, k, **kw)
        set_mode()
        w, ids, _ = moekern.fused_topk(logits, k, backend="torch", **kw)
        ref = fused_moe_reference(x.float(), w13, w2, w, ids)
        assert _rel_err(out, ref) < LOWP_REL_TOL
        torch.testing.assert_close(out, plain, rtol=0, atol=0)
    if mode == "1" and torch.cuda.get_device_capability()[0] >= 9 and torch.version.hip is None:
        assert tg.use_pdl(x.device)
        for kernel in (tg._grouped_gemm_kernel, tg._combine_kernel):
            compiled = [kern for cache in kernel.device_caches.values() for kern in cache[0].values()]
            assert any(kern.metadata.launch_pdl and "griddepcontrol.wait" in kern.asm.get("ptx", "")
                       for kern in compiled), f"{kernel.fn.__name__}: no variant compiled and launched with PDL"


class _LaunchSpy:
    """Stands in for a Triton kernel: records each launch's (name, grid, keywords), runs nothing."""

    def __init__(self, name, launches):
        self.name, self.launches = name, launches

    def __getitem__(self, grid):
        return lambda *args, **kw: self.launches.append((self.name, grid, kw))


def _spied_layer_launches(monkeypatch, cfg1, cfg2, E=4, k=2, M=3, h=H, inter=I):
    """moe_experts_triton on a routed layer with every Triton kernel replaced by a _LaunchSpy: its launches."""
    import moekern.experts.triton_gemm as tg

    launches = []
    for name in ("_grouped_gemm_kernel", "_combine_kernel", "_silu_and_mul_kernel"):
        monkeypatch.setattr(tg, name, _LaunchSpy(name, launches))
    w13, w2 = _weights(E, h=h, inter=inter)
    x, logits = _inputs(M, E, h=h)
    w, ids = _route(logits, k)
    al = moekern.align(ids, E, cfg1.block_m, backend="torch")
    tg.moe_experts_triton(x, w13, w2, w.reshape(-1), al[0], al[1], al[2], k, cfg1, cfg2)
    return launches, w13, al


@pytest.mark.parametrize("pdl", [True, False])
@pytest.mark.parametrize("fuse_silu", [True, False])
def test_every_launch_pairs_the_pdl_constexpr_with_launch_pdl(pdl, fuse_silu, monkeypatch):
    """A kernel compiled with PDL=True must be launched with launch_pdl (else its blocks wait for nothing and the
    chain is serial), and launch_pdl must not be passed when off (Triton's AMD backend rejects the keyword)."""
    import moekern.experts.triton_gemm as tg

    asked = []
    monkeypatch.setattr(tg, "pdl_stages", lambda device, w13=None: asked.append(w13) or (pdl, pdl))
    cfg = BlockConfig(16, 32, 32, 1, 4, 2, fuse_silu=fuse_silu)
    launches, w13, _ = _spied_layer_launches(monkeypatch, cfg, dataclasses.replace(cfg, fuse_silu=False))
    names = [n for n, _, _ in launches]
    assert names == ["_grouped_gemm_kernel"] + ([] if fuse_silu else ["_silu_and_mul_kernel"]) + \
        ["_grouped_gemm_kernel", "_combine_kernel"]
    for name, _, kw in launches:
        assert kw["PDL"] is pdl and kw.get("launch_pdl", False) is pdl and ("launch_pdl" in kw) == pdl, name
    assert len(asked) == 1 and asked[0] is w13  # the expert-size rule sees the layer's own weights


@pytest.mark.parametrize("E,k,M,B", [(128, 8, 1, 16), (256, 8, 2, 16), (8, 2, 1, 16), (64, 8, 64, 16)])
def test_gemm_grids_cover_the_used_blocks_bound_only(E, k, M, B, monkeypatch):
    """At decode sizes both GEMMs launch programs for at most min(M*k, E) padded runs (align's layout length), not
    for every expert's: Qwen3-30B-A3B at M = 1 gets 8 M-blocks per N tile, where n + E*(B-1) gave 121."""
    cfg = BlockConfig(B, 32, 32, 1, 4, 2)
    launches, _, al = _spied_layer_launches(monkeypatch, cfg, cfg, E=E, k=k, M=M, h=32, inter=32)
    n = M * k
    blocks = -(-(n + min(n, E) * (B - 1)) // B)
    assert al[1].numel() == blocks
    grids = [grid for name, grid, _ in launches if name == "_grouped_gemm_kernel"]
    assert grids == [(blocks * 1,), (blocks * 1,)]  # one N tile of 32 for 2I = 64 fused / H = 32
    if (E, M) == (128, 1):
        assert blocks == 8


@pytest.mark.parametrize("fuse_silu", [True, False])
def test_pdl_gemm1_mode_launches_gemm1_alone_with_pdl(fuse_silu, monkeypatch):
    """pdl_stages (True, False): GEMM1 compiled and launched with PDL, the SiLU-and-mul, GEMM2 and the combine
    without (each then starts after the kernel before it has finished)."""
    import moekern.experts.triton_gemm as tg

    monkeypatch.setattr(tg, "pdl_stages", lambda device, w13=None: (True, False))
    cfg = BlockConfig(16, 32, 32, 1, 4, 2, fuse_silu=fuse_silu)
    launches, _, _ = _spied_layer_launches(monkeypatch, cfg, dataclasses.replace(cfg, fuse_silu=False))
    pdl = [kw["PDL"] for _, _, kw in launches]
    assert pdl == [True] + [False] * (len(launches) - 1) and len(launches) == 4 - fuse_silu
    assert [("launch_pdl" in kw) for _, _, kw in launches] == pdl


@pytest.mark.parametrize("field,good,bad", [
    ("block_m", (16, 256), (8, 24, 512, True, 16.0)),
    ("block_n", (16, 256), (0, 48, 512, "64")),
    ("block_k", (16, 256), (15, 257, 512)),
    ("group_m", (1, 64), (0, -1, True, 1.5)),
    ("num_warps", (1, 2, 16), (0, 3, 12, 32, True)),
    ("num_stages", (1, 7), (0, -2, False)),
    ("persistent", (0, 1, 8), (-1, 9, True)),
    ("split_k", (1,), (0, 3, 16, True)),
])
def test_block_config_validate_boundaries(field, good, bad):
    """Each field's last valid and first invalid values (and wrong types): what the kernels can compile. The
    message starts with the config's name (block_config unless the caller names it)."""
    for v in good:
        dataclasses.replace(BlockConfig(), **{field: v}).validate()
    for v in bad:
        with pytest.raises(ValueError, match=rf"^block_config[. ].*{field}={re.escape(repr(v))}"):
            dataclasses.replace(BlockConfig(), **{field: v}).validate()
        with pytest.raises(ValueError, match=rf"^gemm9[. ].*{field}="):
            dataclasses.replace(BlockConfig(), **{field: v}).validate("gemm9")


# default_configs' rule (configs.py): block_m by tokens per expert (M*k/E) with M <= 32 always 16; GROUP_M 8 from
# 256 tokens per expert; one tile shape per block_m; fp32 halves the tiles; N/K tiles shrink to tiny problems.
_BM16 = (BlockConfig(16, 128, 128, 1, 4, 3), BlockConfig(16, 64, 128, 1, 4, 4))
_BM32 = (BlockConfig(32, 128, 128, 1, 4, 3), BlockConfig(32, 128, 128, 1, 4, 4))
_BM64 = (BlockConfig(64, 64, 128, 1, 4, 4), BlockConfig(64, 128, 128, 1, 4, 4))


def _bm128(group_m):
    return (BlockConfig(128, 128, 64, group_m, 8, 3), BlockConfig(128, 128, 64, group_m, 8, 3))


@pytest.mark.parametrize("M,E,k,want", [
    (32, 1, 1, _BM16),     # M <= 32: 16 whatever the tokens per expert (32 here)
    (33, 1, 1, _BM64),     # 33 per expert
    (48, 8, 2, _BM16),     # 12 per expert
    (49, 8, 2, _BM32),     # 12.25
    (96, 8, 2, _BM32),     # 24
    (97, 8, 2, _BM64),     # 24.25
    (383, 8, 2, _BM64),    # 95.75
    (384, 8, 2, _bm128(1)),   # 96
    (1023, 8, 2, _bm128(1)),  # 255.75
    (1024, 8, 2, _bm128(8)),  # 256: GROUP_M 8
])
def test_default_configs_rule(M, E, k, want):
    assert default_configs(M, E, k, 14336, 4096, torch.bfloat16) == want
    assert default_configs(M, E, k, 14336, 4096, torch.float16) == want
    g1, g2 = default_configs(M, E, k, 14336, 4096, torch.float32)  # fp32: N <= 64, K 32, 4 warps, 2 stages
    for got, base in ((g1, want[0]), (g2, want[1])):
        assert got == BlockConfig(base.block_m, min(base.block_n, 64), 32, base.group_m, 4, 2)


def test_default_configs_shrink_to_tiny_problems():
    # gemm1: N = I, K = H; gemm2: N = H, K = I; each tile at most the next power of two of its side, at least 16
    g1, g2 = default_configs(4, 8, 2, 24, 40, torch.bfloat16)
    assert (g1.block_n, g1.block_k, g2.block_n, g2.block_k) == (32, 64, 64, 32)
    g1, g2 = default_configs(4, 8, 2, 8, 16, torch.bfloat16)
    assert (g1.block_n, g1.block_k, g2.block_n, g2.block_k) == (16, 16, 16, 16)
    g1, g2 = default_configs(4, 8, 2, 129, 4096, torch.bfloat16)
    assert (g1.block_n, g1.block_k, g2.block_n, g2.block_k) == (128, 128, 64, 128)
    g1, g2 = default_configs(4, 8, 2, 17, 33, torch.bfloat16)  # one past a power of two rounds up
    assert (g1.block_n, g1.block_k, g2.block_n, g2.block_k) == (32, 64, 64, 32)
