"""The CUDA source of every kernel in csrc/, run on the CPU by the SIMT emulator (tools/simt/), against the
plain-PyTorch references: fused_topk (every variant), route_and_align (one block and the grid tier), align (every
plan, matcher and pad writer), permute's row kernels and the gate log's snapshot.

These run in CI without a GPU, so a change to csrc/routing or csrc/dispatch that breaks ids, counts or the
layout fails here first; the GPU tests (test_cuda_ops.py, test_route_align.py) still judge timing-dependent
behaviour, memory ordering and the real compiler. Ids, counts and layouts exactly equal; weights within
rtol = atol = 1e-5 (the emulator uses the host's expf, the reference torch's).
"""

from __future__ import annotations

import os
import shutil

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moekern.dispatch.reference import align_reference, permute_reference, unpermute_reference
from moekern.models.registry import STANDARD_MODELS, get_model
from moekern.routing.reference import fused_topk_reference

if not (os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")):
    if os.environ.get("CI"):
        raise RuntimeError("CI must compile the SIMT emulation: no C++ compiler found")
    pytest.skip("no C++ compiler: the SIMT emulation cannot be built", allow_module_level=True)

from topk_inputs import ties_nan_inf_logits  # noqa: E402
from tools.simt import ops  # noqa: E402

WEIGHT_TOL = dict(rtol=1e-5, atol=1e-5)
# a kernel bug can hang a barrier: fail the test instead of the run (the emulator also aborts a 60 s spin)
pytestmark = pytest.mark.timeout(300)
VARIANTS = tuple(ops.VARIANTS)


@pytest.fixture(scope="module", autouse=True, params=ops.WAVES, ids=lambda w: f"wave{w}")
def wave(request):
    """Every test twice: the kernels' CUDA path (warps of 32) and their HIP path (wavefronts of 64)."""
    ops.set_wave(request.param)
    ops._lib()  # one build (cached by source hash) before the first test's clock starts
    yield request.param
    ops.set_wave(32)


def _model_args(model: str):
    spec = get_model(model)
    return dict(E=spec.num_experts, k=spec.top_k, scoring=spec.scoring, renormalize=spec.renormalize,
                G=spec.num_expert_group or 0, g=spec.topk_group or 0, scale=spec.routed_scaling_factor,
                has_bias=spec.correction_bias)


def _reference(logits, k, scoring, renormalize, bias, G, g, scale):
    return fused_topk_reference(logits, k, scoring=scoring, renormalize=renormalize, correction_bias=bias,
                                num_expert_group=G or None, topk_group=g or None, routed_scaling_factor=scale)


def _assert_routing(got, ref):
    w, ids, counts = got
    rw, rids, rcounts = ref
    torch.testing.assert_close(ids, rids, rtol=0, atol=0)
    torch.testing.assert_close(counts, rcounts, rtol=0, atol=0)
    torch.testing.assert_close(w, rw, equal_nan=True, **WEIGHT_TOL)


def _route(logits, k, scoring, renormalize, bias, G, g, scale, variant):
    got = ops.fused_topk(logits, k, scoring=scoring, renormalize=renormalize, correction_bias=bias,
                         num_expert_group=G, topk_group=g, routed_scaling_factor=scale, variant=variant)
    _assert_routing(got, _reference(logits, k, scoring, renormalize, bias, G, g, scale))
    return got


def _assert_align(got, ids, E, B):
    sorted_ids, block_ids, post = got[:3]
    ref = align_reference(ids.reshape(-1, 1) if ids.dim() == 1 else ids, E, B)
    torch.testing.assert_close(sorted_ids, ref.sorted_token_ids, rtol=0, atol=0)
    torch.testing.assert_close(block_ids, ref.block_expert_ids, rtol=0, atol=0)
    torch.testing.assert_close(post, ref.num_tokens_post_padded, rtol=0, atol=0)


def test_each_wave_compiles_its_own_path(wave):
    assert ops._lib().simt_warp_size() == wave
    assert ops._lib().simt_is_hip() == (1 if wave == 64 else 0)


def test_build_rewrites_every_launch_form():
    from tools.simt.build import BuildError, rewrite_launches

    src = ("k<T, V><<<static_cast<unsigned>(blocks), threads, 0, stream>>>(a);\n"
           "  kKernel<<<1, kThreads, 0, stream>>>(\n      x, y);")
    assert rewrite_launches(src) == (
        "::mk_simt::Launch(static_cast<unsigned>(blocks), threads, 0, stream)(k<T, V>, a);\n"
        "  ::mk_simt::Launch(1, kThreads, 0, stream)(kKernel, \n      x, y);")
    with pytest.raises(BuildError, match="line 2"):
        rewrite_launches("ok;\n(f())<<<1, 2>>>(x);")


# ---------------------------------------------------------------------------------------------- fused_topk
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("M", [1, 9, 70])  # 70: several grid-stride steps of the multi-block grids (4 SMs here)
@pytest.mark.parametrize("model", STANDARD_MODELS)
def test_fused_topk_every_variant_model_shapes(model, M, variant):
    a = _model_args(model)
    g = torch.Generator().manual_seed(M * 7 + a["E"])
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        logits = torch.randn(M, a["E"], generator=g).to(dtype)
        bias = torch.randn(a["E"], generator=g) * 0.1 if a["has_bias"] else None
        _route(logits, a["k"], a["scoring"], a["renormalize"], bias, a["G"], a["g"], a["scale"], variant)


@pytest.mark.parametrize("variant", ["auto", "legacy", "compact", "redux"])
def test_fused_topk_ties_nan_inf(variant):
    g = torch.Generator().manual_seed(3)
    for E, k, dtype in [(8, 2, torch.bfloat16), (128, 8, torch.float16), (256, 8, torch.float32), (60, 5, torch.bfloat16)]:
        logits = ties_nan_inf_logits(12, E, dtype, g)
        for scoring in ("softmax", "sigmoid"):
            _route(logits, k, scoring, True, None, 0, 0, 1.0, variant)
    logits = torch.randint(-1, 2, (12, 256), generator=g).to(torch.bfloat16)
    _route(logits, 8, "sigmoid", True, torch.zeros(256), 8, 4, 2.5, variant)
    _route(logits, 8, "softmax", True, None, 8, 4, 1.0, variant)


def test_fused_topk_grouped_tied_groups_go_to_the_lower_group():
    # Every group scores the same: the kept groups are the topk_group lowest, in every kernel.
    logits = torch.zeros(3, 256)
    logits[1, 7] = 1.0  # group 0 strictly best, the rest tied
    logits[2, 255] = 1.0  # the last group strictly best
    for variant in ("auto", "redux", "compact", "legacy"):
        _, ids, _ = _route(logits, 8, "sigmoid", True, torch.zeros(256), 8, 4, 1.0, variant)
        assert set((ids[0] // 32).tolist()) <= {0, 1, 2, 3}
        assert 7 in ids[1].tolist() and 255 in ids[2].tolist()


def test_fused_topk_repeated_multi_block_launches_reset_the_ticket():
    # The ticket histogram's accumulator slot must be left zeroed by every launch (graph replays rely on it).
    g = torch.Generator().manual_seed(11)
    for M in (70, 9, 33, 70):
        for variant in ("multi_block", "redux_multi", "redux_atomic"):
            logits = torch.randn(M, 128, generator=g).to(torch.bfloat16)
            _route(logits, 8, "softmax", True, None, 0, 0, 1.0, variant)


@st.composite
def _routing_case(draw):
    E = draw(st.sampled_from([1, 2, 5, 8, 12, 16, 31, 32, 60, 64, 96, 128, 160, 256, 512]))
    k = draw(st.integers(1, min(E, 16)))
    G = g = 0
    if E >= 4 and draw(st.booleans()):
        G = draw(st.sampled_from([d for d in (2, 4, 8, 16, 32) if E % d == 0 and d <= E] or [0]))
        if G:
            g = draw(st.integers(1, G))
            if (E // G) * g < k:  # fewer selectable experts than k: the API refuses it
                G = g = 0
    M = draw(st.integers(1, 20))
    kind = draw(st.sampled_from(["randn", "ties", "extremes"]))
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
    scoring = draw(st.sampled_from(["softmax", "sigmoid"]))
    return E, k, G, g, M, kind, dtype, scoring, draw(st.booleans()), draw(st.integers(0, 2**31 - 1))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=_routing_case(),
       variant=st.sampled_from(["auto", "redux", "compact", "legacy", "redux_multi", "redux_atomic"]))
def test_fused_topk_property(case, variant):
    E, k, G, g, M, kind, dtype, scoring, renormalize, seed = case
    gen = torch.Generator().manual_seed(seed)
    if kind == "randn":
        logits = torch.randn(M, E, generator=gen)
    elif kind == "ties":
        logits = torch.randint(-1, 2, (M, E), generator=gen).float()
    else:
        pool = torch.tensor([0.0, -0.0, 1.0, -1.0, 60000.0, -60000.0, 1e-30, float("inf"), float("-inf"),
                             float("nan")])
        logits = pool[torch.randint(0, len(pool), (M, E), generator=gen)]
    logits = logits.to(dtype)
    bias = torch.randn(E, generator=gen) * 0.1 if scoring == "sigmoid" and seed % 2 else None
    _route(logits, k, scoring, renormalize, bias, G, g, 1.0 + (seed % 3), variant)


# ---------------------------------------------------------------------------------------------- route_and_align
@pytest.mark.parametrize("B", [1, 16, 64])
@pytest.mark.parametrize("M", [1, 5, 16, 32])
@pytest.mark.parametrize("model", STANDARD_MODELS)
def test_route_align_one_launch_equals_routing_then_align(model, M, B):
    a = _model_args(model)
    g = torch.Generator().manual_seed(M * 13 + B)
    logits = torch.randn(M, a["E"], generator=g).to(torch.bfloat16)
    bias = torch.randn(a["E"], generator=g) * 0.1 if a["has_bias"] else None
    got = ops.route_align(logits, a["k"], B, scoring=a["scoring"], renormalize=a["renormalize"], correction_bias=bias,
                          num_expert_group=a["G"], topk_group=a["g"], routed_scaling_factor=a["scale"])
    assert got is not None, "the one launch takes every standard model at M <= 32"
    ref = _reference(logits, a["k"], a["scoring"], a["renormalize"], bias, a["G"], a["g"], a["scale"])
    _assert_routing(got[:3], ref)
    _assert_align(got[3:], ref[1], a["E"], B)


def test_route_align_skewed_and_tied():
    # every token on the same experts (one long run of pads) and ties broken by the lower index
    for E, k in [(8, 2), (64, 8), (128, 8), (256, 8)]:
        logits = torch.zeros(16, E)
        got = ops.route_align(logits, k, 16)
        ref = _reference(logits, k, "softmax", True, None, 0, 0, 1.0)
        _assert_routing(got[:3], ref)
        _assert_align(got[3:], ref[1], E, 16)
        assert got[1].unique().tolist() == list(range(k))


@pytest.mark.parametrize("B", [1, 16, 64])
@pytest.mark.parametrize("model,M", [("qwen3-30b-a3b", 33), ("qwen3-30b-a3b", 64), ("deepseek-v3", 50),
                                     ("olmoe", 64), ("mixtral", 129), ("mixtral", 256)])
def test_route_align_grid_tier(model, M, B):
    # above one block's 1024 lanes: a grid of blocks (4 resident here), each scattering its own chunk after the
    # grid barrier; chunk 0 writes the counts
    a = _model_args(model)
    g = torch.Generator().manual_seed(M * 3 + B)
    logits = torch.randn(M, a["E"], generator=g).to(torch.bfloat16)
    logits[::5, a["E"] - 1] += 30.0  # a hot expert: its run spans every chunk
    bias = torch.randn(a["E"], generator=g) * 0.1 if a["has_bias"] else None
    got = ops.route_align(logits, a["k"], B, scoring=a["scoring"], renormalize=a["renormalize"], correction_bias=bias,
                          num_expert_group=a["G"], topk_group=a["g"], routed_scaling_factor=a["scale"])
    assert got is not None
    ref = _reference(logits, a["k"], a["scoring"], a["renormalize"], bias, a["G"], a["g"], a["scale"])
    _assert_routing(got[:3], ref)
    _assert_align(got[3:], ref[1], a["E"], B)


def test_route_align_grid_tier_twice_in_a_row():
    # the barrier's arrival counter must be back at 0 after every launch
    g = torch.Generator().manual_seed(2)
    for M in (64, 40, 64):
        logits = torch.randn(M, 128, generator=g)
        got = ops.route_align(logits, 8, 16)
        ref = _reference(logits, 8, "softmax", True, None, 0, 0, 1.0)
        _assert_routing(got[:3], ref)
        _assert_align(got[3:], ref[1], 128, 16)


def test_route_align_scratch_is_the_grid_tiers_chunk_counts():
    lib = ops._lib()
    assert lib.simt_route_align_scratch_elems(32, 128) == 0  # one block: 32 x 32 lanes
    assert lib.simt_route_align_scratch_elems(33, 128) == 3 * 128  # 16 tokens per block
    assert lib.simt_route_align_scratch_elems(256, 256) == 16 * 256
    assert lib.simt_route_align_scratch_elems(257, 256) == 0  # past 16 blocks: two launches
    assert lib.simt_route_align_scratch_elems(1024, 8) == 16 * 8  # 64 tokens per block at L = 8


def test_route_align_leaves_the_rest_to_two_launches():
    # the grid tier only while its blocks can all be resident: 4 SMs x 1 block here
    assert ops.route_align(torch.randn(65, 128), 8, 16) is None  # 5 blocks of 16 tokens
    assert ops.route_align(torch.randn(257, 8), 2, 16) is None  # 5 blocks of 64 tokens
    assert ops.route_align(torch.randn(256, 8), 2, 16) is not None


# ---------------------------------------------------------------------------------------------- align
def _ids(kind: str, n_tokens: int, k: int, E: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "routed":
        return torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(n_tokens)]).to(torch.int32)
    if kind == "one_expert":
        return torch.full((n_tokens, k), E - 1, dtype=torch.int32)
    return torch.randint(0, min(E, 3), (n_tokens, k), generator=g, dtype=torch.int32)  # few experts, repeats


@pytest.mark.parametrize("plan", [(0, False, False), (1, False, False), (2, False, False), (4, True, False),
                                  (16, False, False), (0, False, True), (1, False, True)])
@pytest.mark.parametrize("kind", ["routed", "one_expert", "few_experts"])
@pytest.mark.parametrize("E,k,tokens", [(8, 2, 700), (64, 8, 3), (128, 8, 100), (256, 8, 37), (512, 16, 70)])
def test_align_every_plan(E, k, tokens, kind, plan):
    spt, ballot, thread_pads = plan
    ids = _ids(kind, tokens, k, E, seed=E + tokens)
    for B in (1, 16, 64):
        got = ops.align(ids, E, B, slots_per_thread=spt, ballot_match=ballot, thread_pads=thread_pads)
        _assert_align(got, ids, E, B)
        slot_to_row, offsets = got[3], got[4]
        counts = torch.bincount(ids.reshape(-1).long(), minlength=E)
        padded = (counts + B - 1) // B * B
        assert offsets.tolist() == [0, *torch.cumsum(padded, 0).tolist()]
        assert torch.equal(got[0][slot_to_row.long()], torch.arange(ids.numel(), dtype=torch.int32))


def test_align_with_expert_counts_and_invalid_ids():
    ids = _ids("routed", 40, 8, 128, seed=1)
    counts = torch.bincount(ids.reshape(-1).long(), minlength=128).to(torch.int32)
    _assert_align(ops.align(ids, 128, 16, expert_counts=counts), ids, 128, 16)
    bad = ids.clone().reshape(-1)
    bad[3], bad[10] = -1, 128  # out of range: skipped, slot_to_row -1
    sorted_ids, _, post, slot_to_row, _ = ops.align(bad, 128, 16)
    assert slot_to_row[3] == -1 and slot_to_row[10] == -1
    assert 3 not in sorted_ids.tolist() and 10 not in sorted_ids.tolist()
    assert int(post) == int(((torch.bincount(bad[(bad >= 0) & (bad < 128)].long(), minlength=128) + 15) // 16 * 16).sum())


def test_align_empty():
    got = ops.align(torch.empty(0, 8, dtype=torch.int32), 64, 16)
    assert got[0].numel() == 0 and int(got[2]) == 0


# ---------------------------------------------------------------------------------------------- permute rows
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("H", [1, 3, 8, 96])  # scalar words, odd rows, 16-byte vectors
def test_permute_rows(dtype, H):
    g = torch.Generator().manual_seed(H)
    M, k, E = 9, 2, 8
    hidden = torch.randn(M, H, generator=g).to(dtype)
    ids = _ids("routed", M, k, E, seed=H)
    permuted, layout = permute_reference(hidden, ids, E)
    got = ops.gather_rows(hidden, layout.sorted_slots, k)
    torch.testing.assert_close(got, permuted, rtol=0, atol=0)
    weights = torch.rand(M, k, generator=g)
    expert_out = (permuted.float() * 1.5).to(dtype)
    ref = unpermute_reference(expert_out, layout, weights)
    got = ops.unpermute(expert_out, layout.slot_to_row, weights)
    tol = 0 if dtype == torch.float32 else torch.finfo(dtype).eps
    torch.testing.assert_close(got.float(), ref.float(), rtol=max(tol, 1e-6), atol=max(tol, 1e-6))


def test_unpermute_skips_rows_past_the_output():
    backing = torch.ones(5, 8)
    backing[4] = 100.0  # the row just past expert_output, in the same memory: must never be read
    expert_out = backing[:4]
    slot_to_row = torch.tensor([0, 4, 3, -1], dtype=torch.int32)  # 4 is one past the rows; -1 an invalid slot
    out = ops.unpermute(expert_out, slot_to_row, torch.ones(2, 2))
    assert out[0].tolist() == [1.0] * 8 and out[1].tolist() == [1.0] * 8


# ---------------------------------------------------------------------------------------------- gate-log snapshot
@pytest.mark.parametrize("n_counts,n_sample", [(1, 1), (8, 0), (4 * 256, 64), (1000, 2000)])
def test_gatelog_snapshot(n_counts, n_sample):
    g = torch.Generator().manual_seed(n_counts + n_sample)
    counts = torch.randint(0, 50, (n_counts,), generator=g, dtype=torch.int32)
    sample = torch.randint(0, 8, (n_sample,), generator=g, dtype=torch.int32) if n_sample else None
    want_counts, want_sample = counts.clone(), None if sample is None else sample.clone()
    host = torch.full((n_counts,), -9, dtype=torch.int32)
    host_sample = torch.full((n_sample,), -9, dtype=torch.int32) if n_sample else None
    mark = torch.zeros(1, dtype=torch.int64)
    ops.gatelog_snapshot(counts, host, mark, 41, sample, host_sample)
    assert torch.equal(host, want_counts) and not counts.any() and int(mark) == 41
    if sample is not None:
        assert torch.equal(host_sample, want_sample) and bool((sample == -1).all())
        ops.gatelog_snapshot(counts, host, mark, 42, sample, None)  # no host sample: the reset alone
        assert int(mark) == 42 and bool((sample == -1).all())
