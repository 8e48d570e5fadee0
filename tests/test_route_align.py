"""moekern.route_and_align against its definition: fused_topk followed by align(..., expert_counts=) on the same
inputs, judged by the plain-PyTorch references (ids, counts and the layout exactly; weights within 1e-5).

CPU: every argument check, M = 0, and hypothesis properties on the torch backend and the triton backend under
TRITON_INTERPRET=1 (small shapes). GPU (`gpu` mark): the one-launch kernel and the two-kernel path at the
registry shapes, ties/NaN/skew extremes, odd sizes, and CUDA-graph replay.
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import moekern
from moekern import _ext
from moekern.dispatch.reference import align_reference
from moekern.models.registry import STANDARD_MODELS, get_model
from moekern.routing.reference import fused_topk_reference

WEIGHT_TOL = dict(rtol=1e-5, atol=1e-5)
HAS_GPU_KERNELS = torch.cuda.is_available() and _ext.cuda_kernels_available()
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def _reference(logits, top_k, block_size, **kw):
    w, ids, counts = fused_topk_reference(logits, top_k, **kw)
    return (w, ids, counts, *align_reference(ids, logits.shape[1], block_size))


def _assert_equal(got, want):
    assert isinstance(got, moekern.RouteOutput)
    w, ids, counts, sorted_ids, block_ids, post_pad = got
    rw, rids, rcounts, rsorted, rblocks, rpost = want
    for name, a, b in (("topk_ids", ids, rids), ("expert_counts", counts, rcounts),
                       ("sorted_token_ids", sorted_ids, rsorted), ("block_expert_ids", block_ids, rblocks),
                       ("num_tokens_post_padded", post_pad, rpost)):
        assert a.dtype == torch.int32, name
        torch.testing.assert_close(a.cpu(), b.cpu(), rtol=0, atol=0, msg=lambda m, n=name: f"{n}: {m}")
    assert w.dtype == torch.float32
    torch.testing.assert_close(w.cpu(), rw.cpu(), equal_nan=True, **WEIGHT_TOL)


def _routing_kwargs(model: str, E: int, device="cpu", seed=0) -> dict:
    spec = get_model(model)
    kw = dict(scoring=spec.scoring, renormalize=spec.renormalize, routed_scaling_factor=spec.routed_scaling_factor)
    if spec.num_expert_group:
        kw.update(num_expert_group=spec.num_expert_group, topk_group=spec.topk_group)
    if spec.correction_bias:
        g = torch.Generator(device=device).manual_seed(seed)
        kw["correction_bias"] = torch.randn(E, generator=g, device=device) * 0.1
    return kw


# ------------------------------------------------------------------------------------------ argument checks


@pytest.mark.parametrize("block_size, err, match", [
    (0, ValueError, "block_size=0 must be a power of two >= 1"),
    (48, ValueError, "block_size=48 must be a power of two"),
    (16.0, TypeError, "block_size must be an int"),
    (True, TypeError, "block_size must be an int"),
])
def test_bad_block_size(block_size, err, match):
    with pytest.raises(err, match=match):
        moekern.route_and_align(torch.randn(4, 8), 2, block_size=block_size)


def test_routing_arguments_are_checked_before_any_kernel():
    with pytest.raises(ValueError, match="top_k=9 must be <= num_experts=8"):
        moekern.route_and_align(torch.randn(4, 8), 9, block_size=16)
    with pytest.raises(TypeError, match="router_logits must be float32, float16 or bfloat16"):
        moekern.route_and_align(torch.zeros(4, 8, dtype=torch.int32), 2, block_size=16)
    with pytest.raises(ValueError, match="num_expert_group=3 must divide num_experts=8"):
        moekern.route_and_align(torch.randn(4, 8), 2, block_size=16, num_expert_group=3, topk_group=1)
    with pytest.raises(ValueError, match="backend='fast' must be one of"):
        moekern.route_and_align(torch.randn(4, 8), 2, block_size=16, backend="fast")


def test_block_size_must_be_given():
    with pytest.raises(TypeError):
        moekern.route_and_align(torch.randn(4, 8), 2)  # keyword-only, no default: the GEMM's tile decides it


@pytest.mark.parametrize("block_size", [1, 16, 128])
def test_no_tokens(block_size):
    got = moekern.route_and_align(torch.randn(0, 64), 8, block_size=block_size, backend="torch")
    _assert_equal(got, _reference(torch.randn(0, 64), 8, block_size))
    assert got.num_tokens_post_padded.item() == 0 and (got.block_expert_ids == -1).all()
    assert (got.sorted_token_ids == 0).all()  # the sentinel is M*k = 0


def test_worked_example():
    # Two tokens, four experts, top-2, blocks of 2. Token 0 picks experts 2, 0; token 1 picks 2, 3.
    # Slots (token*k + j): 0 -> e2, 1 -> e0, 2 -> e2, 3 -> e3. Expert runs in index order, slots ascending:
    # e0: [1] + pad, e2: [0, 2], e3: [3] + pad; sentinel = 4; padded total 6.
    logits = torch.tensor([[2.0, -1.0, 3.0, 0.0], [-2.0, -1.0, 3.0, 1.0]])
    got = moekern.route_and_align(logits, 2, block_size=2, backend="torch")
    assert got.topk_ids.tolist() == [[2, 0], [2, 3]]
    assert got.expert_counts.tolist() == [1, 0, 2, 1]
    assert got.sorted_token_ids.tolist()[:6] == [1, 4, 0, 2, 3, 4]
    assert got.block_expert_ids.tolist()[:3] == [0, 2, 3] and got.num_tokens_post_padded.tolist() == [6]


# ------------------------------------------------------------------------------------------ properties (CPU)

BACKENDS = ["torch"] + (["triton"] if INTERPRET else [])


@st.composite
def _cases(draw):
    E = draw(st.sampled_from([1, 2, 3, 8, 12, 16, 64]))
    k = draw(st.integers(1, min(E, 8)))
    M = draw(st.integers(1, 24))  # M = 0 is its own test
    block = draw(st.sampled_from([1, 2, 16, 64]))
    kind = draw(st.sampled_from(["randn", "ties", "skew", "extreme"]))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    if kind == "randn":
        x = torch.randn(M, E, generator=g)
    elif kind == "ties":  # few distinct values: ties go to the lower expert index
        x = torch.randint(-1, 2, (M, E), generator=g).float()
    elif kind == "skew":  # one expert wins every row
        x = torch.randn(M, E, generator=g)
        x[:, E // 2] += 50.0
    else:
        vals = torch.tensor([float("-inf"), -3e38, -1.0, -0.0, 0.0, 1e-30, 1.0, 3e38])
        x = vals[torch.randint(0, len(vals), (M, E), generator=g)]
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
    scoring = draw(st.sampled_from(["softmax", "sigmoid"]))
    renorm = draw(st.booleans())
    return x.to(dtype), k, block, dict(scoring=scoring, renormalize=renorm)


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=60 if not INTERPRET else 25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=_cases())
def test_equals_fused_topk_then_align(backend, case):
    x, k, block, kw = case
    got = moekern.route_and_align(x, k, block_size=block, backend=backend, **kw)
    _assert_equal(got, _reference(x, k, block, **kw))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("model", STANDARD_MODELS)
def test_standard_models_small(backend, model):
    spec = get_model(model)
    E, k = spec.num_experts, spec.top_k
    kw = _routing_kwargs(model, E)
    x = torch.randn(5, E, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    got = moekern.route_and_align(x, k, block_size=16, backend=backend, **kw)
    _assert_equal(got, _reference(x, k, 16, **kw))


# ------------------------------------------------------------------------------------------ GPU

needs_gpu = pytest.mark.skipif(not HAS_GPU_KERNELS, reason="skipped: needs a GPU and moekern._C built with device kernels")


def _cuda(x, k, block, two_kernels=False, **kw):
    groups = kw.get("num_expert_group") or 0
    return moekern.RouteOutput(*torch.ops.moekern.route_and_align(
        x, k, 0 if kw.get("scoring", "softmax") == "softmax" else 1, kw.get("renormalize", True),
        kw.get("correction_bias"), groups, kw.get("topk_group") or 0, kw.get("routed_scaling_factor", 1.0), block,
        two_kernels))


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("model", STANDARD_MODELS)
@pytest.mark.parametrize("M", [1, 2, 16, 64, 255, 256, 257, 1024, 5000])
@pytest.mark.parametrize("block", [16, 64, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cuda_standard_shapes(model, M, block, dtype):
    spec = get_model(model)
    E, k = spec.num_experts, spec.top_k
    kw = _routing_kwargs(model, E, device="cuda")
    g = torch.Generator(device="cuda").manual_seed(M)
    x = torch.randn(M, E, device="cuda", generator=g).to(dtype)
    want = _reference(x, k, block, **kw)
    _assert_equal(moekern.route_and_align(x, k, block_size=block, backend="cuda", **kw), want)
    _assert_equal(_cuda(x, k, block, two_kernels=True, **kw), want)


@pytest.mark.gpu
@needs_gpu
def test_cuda_ties_nan_skew_and_odd_sizes():
    g = torch.Generator(device="cuda").manual_seed(5)
    for E, k in ((1, 1), (3, 2), (8, 2), (12, 5), (60, 8), (128, 8), (200, 16), (256, 8), (512, 16)):
        for M in (1, 3, 33, 256):
            ties = torch.randint(-1, 2, (M, E), device="cuda", generator=g).float()
            skew = torch.randn(M, E, device="cuda", generator=g)
            skew[:, E - 1] += 40.0
            nan = torch.randn(M, E, device="cuda", generator=g)
            nan[0, 0] = float("nan")
            nan[-1, -1] = float("-inf")
            for x in (ties, skew, nan):
                for kw in (dict(scoring="softmax", renormalize=True), dict(scoring="sigmoid", renormalize=False)):
                    # 2-16: one thread writes each expert's pads at E >= 64; 1 and 32: one warp does
                    for block in (1, 2, 8, 16, 32):
                        _assert_equal(_cuda(x.to(torch.bfloat16), k, block, **kw),
                                      _reference(x.to(torch.bfloat16), k, block, **kw))


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("E,k,M", [(8, 5, 128), (8, 8, 128), (16, 16, 64), (16, 9, 60), (5, 5, 128), (8, 2, 128)])
def test_cuda_one_launch_at_two_slots_per_thread(E, k, M):
    """Small expert counts route up to 128 tokens in the one launch (M x L <= 1024 lanes), so M * k reaches 513-1024
    slots: the scatter's two-slots-per-thread plan (and, at (8, 2, 128), one slot per thread at the lane limit)."""
    g = torch.Generator(device="cuda").manual_seed(E * 1000 + M)
    x = torch.randn(M, E, device="cuda", generator=g).to(torch.bfloat16)
    x[::7, E - 1] += 30.0  # a hot expert: long runs next to short ones
    for kw in (dict(scoring="softmax", renormalize=True), dict(scoring="sigmoid", renormalize=False)):
        for block in (1, 16, 64):
            want = _reference(x, k, block, **kw)
            _assert_equal(_cuda(x, k, block, **kw), want)
            _assert_equal(_cuda(x, k, block, two_kernels=True, **kw), want)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("model", STANDARD_MODELS)
@pytest.mark.parametrize("M", [32, 256])  # one block; the grid tier (its barrier must reset between replays)
def test_cuda_graph_replay(model, M):
    spec = get_model(model)
    E, k = spec.num_experts, spec.top_k
    kw = _routing_kwargs(model, E, device="cuda")
    x = torch.randn(M, E, device="cuda").to(torch.bfloat16)
    moekern.route_and_align(x, k, block_size=16, backend="cuda", **kw)  # warm-up outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = moekern.route_and_align(x, k, block_size=16, backend="cuda", **kw)
    for seed in range(3):
        x.copy_(torch.randn(M, E, device="cuda", generator=torch.Generator(device="cuda").manual_seed(seed)))
        graph.replay()
        torch.cuda.synchronize()
        _assert_equal(moekern.RouteOutput(*out), _reference(x, k, 16, **kw))
