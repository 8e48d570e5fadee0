"""GPU tests of the cuda backend (moekern._C) against the plain-PyTorch references: fused_topk, moe_align,
permute, unpermute at the four standard model shapes and M in {1, 8, 64, 4096}, plus ties, NaN/-inf,
skewed routings (every slot on one expert, most experts empty), odd sizes and every chunking path of
align (torch.ops.moekern.align_plan: one CTA, 512-, 2048- and 8192-slot chunks), and every plan the benchmarks
can force (moe_align_variant).

Ids, counts, indices and copied rows must be exactly equal; weights within rtol=atol=1e-5 (fp32 math in a
different summation order); unpermute within one rounding of the output dtype.
"""

from __future__ import annotations

import pytest
import torch

from moekern import _ext
from moekern.dispatch.reference import align_reference, align_sizes, permute_reference, unpermute_reference
from moekern.models.registry import STANDARD_MODELS, get_model
from moekern.routing.reference import fused_topk_reference
from topk_inputs import ties_nan_inf_logits

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not (torch.cuda.is_available() and _ext.cuda_kernels_available()),
        reason="skipped: needs a GPU and moekern._C built with device kernels",
    ),
]

MS = (1, 8, 64, 4096)
WEIGHT_TOL = dict(rtol=1e-5, atol=1e-5)


def _routing_args(model: str):
    spec = get_model(model)
    groups = spec.num_expert_group or 0
    return spec.num_experts, spec.top_k, spec.scoring, spec.renormalize, groups, spec.topk_group or 0, \
        spec.routed_scaling_factor, spec.correction_bias


def _run_topk(logits, top_k, scoring, renormalize, bias, groups, topk_group, scale, variant="auto"):
    from moekern.routing.cuda_topk import fused_topk_cuda

    got = fused_topk_cuda(logits, top_k, scoring, renormalize, bias, groups, topk_group, scale, variant)
    ref = fused_topk_reference(
        logits, top_k, scoring=scoring, renormalize=renormalize, correction_bias=bias,
        num_expert_group=groups or None, topk_group=topk_group or None, routed_scaling_factor=scale,
    )
    return got, ref


def _assert_routing_equal(got, ref):
    w, ids, counts = got
    rw, rids, rcounts = ref
    assert ids.dtype == torch.int32 and counts.dtype == torch.int32 and w.dtype == torch.float32
    torch.testing.assert_close(ids, rids, rtol=0, atol=0)
    torch.testing.assert_close(counts, rcounts, rtol=0, atol=0)
    torch.testing.assert_close(w, rw, equal_nan=True, **WEIGHT_TOL)


# ---------------------------------------------------------------------------------------------- fused_topk
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("M", MS)
@pytest.mark.parametrize("model", STANDARD_MODELS)
def test_fused_topk_standard_shapes(model, M, dtype):
    E, k, scoring, renorm, groups, topk_group, scale, has_bias = _routing_args(model)
    g = torch.Generator(device="cuda").manual_seed(M * 1000 + E)
    logits = torch.randn(M, E, device="cuda", generator=g).to(dtype)
    bias = torch.randn(E, device="cuda", generator=g) * 0.1 if has_bias else None
    _assert_routing_equal(*_run_topk(logits, k, scoring, renorm, bias, groups, topk_group, scale))


@pytest.mark.parametrize("model", STANDARD_MODELS)
def test_fused_topk_ties_go_to_lower_index(model):
    E, k, scoring, renorm, groups, topk_group, scale, has_bias = _routing_args(model)
    g = torch.Generator(device="cuda").manual_seed(7)
    logits = torch.randint(-2, 3, (512, E), device="cuda", generator=g).float()  # many exact ties
    logits[:3] = 0.0  # every expert tied
    logits[3] = -0.0
    bias = torch.zeros(E, device="cuda") if has_bias else None
    _assert_routing_equal(*_run_topk(logits, k, scoring, renorm, bias, groups, topk_group, scale))


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
def test_fused_topk_nan_and_inf(scoring):
    E, k = 64, 8
    logits = torch.randn(40, E, device="cuda")
    logits[0, 5] = float("nan")
    logits[1, :] = float("-inf")
    logits[2, :] = float("nan")
    logits[3, 7] = float("inf")
    logits[4, ::2] = float("-inf")
    logits[5, 10:20] = float("nan")
    _assert_routing_equal(*_run_topk(logits, k, scoring, True, None, 0, 0, 1.0))


def test_fused_topk_skewed_one_expert_wins_everywhere():
    E, k, M = 128, 8, 4096
    logits = torch.randn(M, E, device="cuda")
    logits[:, 17] += 100.0
    logits[:, 3] += 50.0
    got, ref = _run_topk(logits, k, "softmax", True, None, 0, 0, 1.0)
    _assert_routing_equal(got, ref)
    assert got[2][17] == M and got[2][3] == M


@pytest.mark.parametrize(
    "E,k,scoring,groups,topk_group",
    [(1, 1, "softmax", 0, 0), (33, 5, "softmax", 0, 0), (512, 16, "softmax", 0, 0), (512, 16, "sigmoid", 8, 3),
     (256, 8, "softmax", 8, 4), (64, 4, "sigmoid", 64, 6), (96, 6, "sigmoid", 3, 1), (160, 6, "softmax", 0, 0)],
)
@pytest.mark.parametrize("M", [3, 257])
def test_fused_topk_odd_sizes(E, k, scoring, groups, topk_group, M):
    g = torch.Generator(device="cuda").manual_seed(E * 31 + k)
    logits = torch.randn(M, E, device="cuda", generator=g)
    bias = torch.randn(E, device="cuda", generator=g) * 0.05 if scoring == "sigmoid" else None
    for renorm in (True, False):
        _assert_routing_equal(*_run_topk(logits, k, scoring, renorm, bias, groups, topk_group, 1.5))


def test_fused_topk_grouped_respects_dropped_groups():
    # Group 0 holds the best single expert but a poor second, so top-2-sum drops it.
    E, G, k = 16, 4, 2
    logits = torch.full((1, E), -5.0, device="cuda")
    logits[0, 0] = 10.0
    logits[0, 4:6] = 3.0
    logits[0, 8:10] = 2.0
    got, ref = _run_topk(logits, k, "sigmoid", True, None, G, 2, 1.0)
    _assert_routing_equal(got, ref)
    assert 0 not in got[1].tolist()[0]


def test_fused_topk_counts_zeroed_every_call():
    logits = torch.randn(100, 64, device="cuda")
    from moekern.routing.cuda_topk import fused_topk_cuda

    a = fused_topk_cuda(logits, 8, "softmax", True, None, 0, 0, 1.0)[2].clone()
    b = fused_topk_cuda(logits, 8, "softmax", True, None, 0, 0, 1.0)[2]
    assert torch.equal(a, b) and int(b.sum()) == 100 * 8


# Kernel paths of the cuda backend (csrc/routing/NOTES.md): "auto" is what moekern.fused_topk runs; the others
# force v1 ("legacy"), one block, or the multi-block grid with its ticket reduction (or, "redux_atomic", a memset
# and global atomics), so all are checked here.
# "compact" names the v2 kernel alone (auto = compact, except v1 for one ungrouped token):
# test_fused_topk_grids_bit_identical runs it.
VARIANTS = ("auto", "legacy", "single_block", "multi_block", "compact", "redux_single", "redux_multi", "redux_atomic")


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("M", [1, 33, 3000])
@pytest.mark.parametrize("k", [1, 2, 3, 8, 16])  # 3: the run-time round loop at a k that is not a power of two
@pytest.mark.parametrize("E", [1, 8, 16, 60, 128, 256, 512])
def test_fused_topk_every_path_every_E(E, k, M, variant):
    if k > E:
        pytest.skip("top_k > num_experts")
    g = torch.Generator(device="cuda").manual_seed(E * 100 + k * 10 + M)
    dtype = torch.bfloat16 if (E + k) % 2 else torch.float32  # both the 32-bit and the 64-bit key paths
    logits = torch.randn(M, E, device="cuda", generator=g).to(dtype)
    _assert_routing_equal(*_run_topk(logits, k, "softmax", True, None, 0, 0, 1.0, variant))
    bias = torch.randn(E, device="cuda", generator=g) * 0.1
    _assert_routing_equal(*_run_topk(logits, k, "sigmoid", False, bias, 0, 0, 2.0, variant))


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("M", [1, 8, 9, 64, 256, 257, 4096])  # 256 / 257: auto's grid switch for Mixtral (L = 1)
@pytest.mark.parametrize("model", STANDARD_MODELS)
def test_fused_topk_paths_standard_shapes(model, M, dtype, variant):
    E, k, scoring, renorm, groups, topk_group, scale, has_bias = _routing_args(model)
    g = torch.Generator(device="cuda").manual_seed(M * 7 + E)
    logits = torch.randn(M, E, device="cuda", generator=g).to(dtype)
    bias = torch.randn(E, device="cuda", generator=g) * 0.1 if has_bias else None
    _assert_routing_equal(*_run_topk(logits, k, scoring, renorm, bias, groups, topk_group, scale, variant))


@pytest.mark.parametrize("variant", VARIANTS)
def test_fused_topk_paths_ties_nan_inf(variant):
    g = torch.Generator(device="cuda").manual_seed(3)
    cases = [(8, 2, torch.bfloat16), (128, 8, torch.float16), (256, 8, torch.float32), (60, 5, torch.bfloat16)]
    for E, k, dtype in cases:
        logits = ties_nan_inf_logits(300, E, dtype, g)
        for scoring in ("softmax", "sigmoid"):
            _assert_routing_equal(*_run_topk(logits, k, scoring, True, None, 0, 0, 1.0, variant))
    logits = torch.randint(-1, 2, (300, 256), device="cuda", generator=g).to(torch.bfloat16)
    _assert_routing_equal(*_run_topk(logits, 8, "sigmoid", True, torch.zeros(256, device="cuda"), 8, 4, 2.5, variant))
    _assert_routing_equal(*_run_topk(logits, 8, "softmax", True, None, 8, 4, 1.0, variant))



@pytest.mark.parametrize("model", STANDARD_MODELS)
def test_fused_topk_grids_bit_identical(model):
    # compact, single_block and multi_block run one kernel on different grids; a token's result must not depend
    # on which block or grid-stride step handled it: equal, not just close. auto runs that kernel too, except for
    # one ungrouped token (v1, measured faster there): it is held to the reference.
    from moekern.routing.cuda_topk import fused_topk_cuda

    E, k, scoring, renorm, groups, topk_group, scale, has_bias = _routing_args(model)
    g = torch.Generator(device="cuda").manual_seed(21)
    bias = torch.randn(E, device="cuda", generator=g) * 0.1 if has_bias else None
    for M in (1, 7, 300, 5000):
        for dtype in (torch.bfloat16, torch.float32):
            logits = torch.randn(M, E, device="cuda", generator=g).to(dtype)
            want = fused_topk_reference(
                logits, k, scoring=scoring, renormalize=renorm, correction_bias=bias,
                num_expert_group=groups or None, topk_group=topk_group or None, routed_scaling_factor=scale)
            _assert_routing_equal(fused_topk_cuda(logits, k, scoring, renorm, bias, groups, topk_group, scale, "auto"),
                                  want)
            a = fused_topk_cuda(logits, k, scoring, renorm, bias, groups, topk_group, scale, "compact")
            _assert_routing_equal(a, want)
            for variant in ("single_block", "multi_block"):
                c = fused_topk_cuda(logits, k, scoring, renorm, bias, groups, topk_group, scale, variant)
                for x, y in zip(a, c):
                    torch.testing.assert_close(y, x, rtol=0, atol=0, equal_nan=True)
            r = fused_topk_cuda(logits, k, scoring, renorm, bias, groups, topk_group, scale, "redux_single")
            _assert_routing_equal(r, want)
            for variant in ("redux_multi", "redux_atomic"):
                c = fused_topk_cuda(logits, k, scoring, renorm, bias, groups, topk_group, scale, variant)
                for x, y in zip(r, c):  # the reduction kernel on every grid: one token's result, bit for bit
                    torch.testing.assert_close(y, x, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("model", STANDARD_MODELS)
def test_fused_topk_repeated_calls_reset_the_ticket(model):
    # The multi-block path leaves its accumulator slot zeroed; grids of different sizes follow each other on
    # one stream, so a stale counter or accumulator would show up as wrong counts in a later call.
    E, k, scoring, renorm, groups, topk_group, scale, has_bias = _routing_args(model)
    g = torch.Generator(device="cuda").manual_seed(11)
    bias = torch.randn(E, device="cuda", generator=g) * 0.1 if has_bias else None
    for M in (4096, 9, 300, 1, 20000, 4096, 64, 4096):
        for variant in ("auto", "multi_block", "redux_multi", "redux_atomic"):
            logits = torch.randn(M, E, device="cuda", generator=g).to(torch.bfloat16)
            _assert_routing_equal(*_run_topk(logits, k, scoring, renorm, bias, groups, topk_group, scale, variant))


@pytest.mark.parametrize(
    "variant", ["auto", "multi_block", "single_block", "redux_single", "redux_multi", "redux_atomic"])
@pytest.mark.parametrize("model", STANDARD_MODELS)
def test_fused_topk_graph_replays_count_correctly(model, variant):
    E, k, scoring, renorm, groups, topk_group, scale, has_bias = _routing_args(model)
    from moekern.routing.cuda_topk import fused_topk_cuda

    g = torch.Generator(device="cuda").manual_seed(5)
    bias = torch.randn(E, device="cuda", generator=g) * 0.1 if has_bias else None
    M = 2048
    logits = torch.randn(M, E, device="cuda", generator=g).to(torch.bfloat16)
    run = lambda: fused_topk_cuda(logits, k, scoring, renorm, bias, groups, topk_group, scale, variant)  # noqa: E731
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        run()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run()
    for i in range(5):  # every replay must count from zero
        logits.copy_(torch.randn(M, E, device="cuda", generator=g).to(torch.bfloat16))
        graph.replay()
        torch.cuda.synchronize()
        ref = fused_topk_reference(logits, k, scoring=scoring, renormalize=renorm, correction_bias=bias,
                                   num_expert_group=groups or None, topk_group=topk_group or None,
                                   routed_scaling_factor=scale)
        _assert_routing_equal([t.clone() for t in out], ref)
        eager = run()  # an eager call on the same stream between replays
        _assert_routing_equal(eager, ref)


def test_fused_topk_two_streams_at_once():
    # Launches on different streams get different accumulator slots, so they may overlap.
    from moekern.routing.cuda_topk import fused_topk_cuda

    g = torch.Generator(device="cuda").manual_seed(9)
    streams = [torch.cuda.Stream() for _ in range(4)]
    inputs = [torch.randn(50000, 128, device="cuda", generator=g).to(torch.bfloat16) for _ in streams]
    torch.cuda.synchronize()
    outs = []
    for _ in range(3):
        for s, x in zip(streams, inputs):
            with torch.cuda.stream(s):
                outs.append((x, fused_topk_cuda(x, 8, "softmax", True, None, 0, 0, 1.0)))
    torch.cuda.synchronize()
    for x, got in outs:
        _assert_routing_equal(got, fused_topk_reference(x, 8))


@pytest.mark.parametrize("model", STANDARD_MODELS)
def test_fused_topk_large_M_many_blocks(model):
    E, k, scoring, renorm, groups, topk_group, scale, has_bias = _routing_args(model)
    g = torch.Generator(device="cuda").manual_seed(13)
    M = 131072 + 17  # grid-stride over a grid capped at SMs x occupancy, a partial last warp
    logits = torch.randn(M, E, device="cuda", generator=g).to(torch.bfloat16)
    bias = torch.randn(E, device="cuda", generator=g) * 0.1 if has_bias else None
    _assert_routing_equal(*_run_topk(logits, k, scoring, renorm, bias, groups, topk_group, scale))


def test_fused_topk_unaligned_rows_use_scalar_loads():
    # A base pointer off 16 bytes (and E * 2 bytes not a multiple of 16) must take the scalar-load path.
    g = torch.Generator(device="cuda").manual_seed(17)
    for E in (128, 60, 8):
        buf = torch.randn(500 * E + 1, device="cuda", generator=g).to(torch.bfloat16)
        logits = buf[1:].view(500, E)
        for variant in ("auto", "legacy"):
            _assert_routing_equal(*_run_topk(logits, 8, "softmax", True, None, 0, 0, 1.0, variant))


def test_fused_topk_bad_variant():
    from moekern.routing.cuda_topk import fused_topk_cuda

    x = torch.randn(4, 8, device="cuda")
    with pytest.raises(ValueError, match="variant='fast' must be one of"):
        fused_topk_cuda(x, 2, "softmax", True, None, 0, 0, 1.0, "fast")
    with pytest.raises(RuntimeError, match="variant=99 must be 0"):
        torch.ops.moekern.fused_topk_variant(x, 2, 0, True, None, 0, 0, 1.0, 99)


# Each C++ op's argument check, run in a fresh interpreter: a check that crashed the process (a signal) instead
# of raising RuntimeError would otherwise take the whole pytest worker with it.
_CPP_ERRORS = {
    "topk_variant": ("torch.ops.moekern.fused_topk_variant(x, 2, 0, True, None, 0, 0, 1.0, 99)", "variant=99"),
    "topk_k": ("torch.ops.moekern.fused_topk(x, 9, 0, True, None, 0, 0, 1.0)", "top_k=9"),
    "topk_cpu": ("torch.ops.moekern.fused_topk(x.cpu(), 2, 0, True, None, 0, 0, 1.0)", "CPU tensors"),
    "align_E": ("torch.ops.moekern.moe_align(ids, 0, 16, None)", "num_experts=0"),
    "permute_counts": ("torch.ops.moekern.permute(x, ids, 8, ids[0])", "expert_counts must have shape"),
}


@pytest.mark.parametrize("case", sorted(_CPP_ERRORS))
def test_cpp_check_raises_without_crashing(case):
    import subprocess
    import sys

    call, message = _CPP_ERRORS[case]
    code = (
        "import torch, moekern._C\n"
        "x = torch.randn(4, 8, device='cuda')\n"
        "ids = torch.zeros(4, 2, dtype=torch.int32, device='cuda')\n"
        f"try:\n    {call}\nexcept RuntimeError as e:\n    print('RAISED', e)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"exit {proc.returncode} (negative = killed by that signal)\n{proc.stderr[-2000:]}"
    assert "RAISED" in proc.stdout and message in proc.stdout, proc.stdout[-2000:]


# ---------------------------------------------------------------------------------------------- align
def _ids(kind: str, M: int, k: int, E: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator(device="cuda").manual_seed(seed)
    if kind == "routed":  # distinct per row, like real routing
        return torch.rand(M, E, device="cuda", generator=g).topk(k, dim=1).indices.to(torch.int32)
    if kind == "uniform":
        return torch.randint(0, E, (M, k), device="cuda", generator=g, dtype=torch.int32)
    if kind == "one_expert":  # every slot on one expert, all others empty
        return torch.full((M, k), E - 1, device="cuda", dtype=torch.int32)
    if kind == "few_experts":  # most experts empty
        return torch.randint(E // 2, min(E, E // 2 + 2), (M, k), device="cuda", generator=g, dtype=torch.int32)
    raise ValueError(kind)


def _assert_align(ids, E, B, counts=None):
    from moekern.dispatch.cuda_ops import align_cuda

    got = align_cuda(ids, E, B, counts)
    ref = align_reference(ids, E, B)
    max_padded, max_blocks = align_sizes(ids.numel(), E, B)
    assert got[0].shape == (max_padded,) and got[1].shape == (max_blocks,) and got[2].shape == (1,)
    for a, b in zip(got, ref):
        assert a.dtype == torch.int32
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["routed", "one_expert", "few_experts"])
@pytest.mark.parametrize("B", [4, 16, 64, 128])  # <= 16: pads by thread at E >= 64 and <= 1024 slots
@pytest.mark.parametrize("M", MS)
@pytest.mark.parametrize("model", STANDARD_MODELS)
def test_align_standard_shapes(model, M, B, kind):
    spec = get_model(model)
    ids = _ids(kind, M, spec.top_k, spec.num_experts, seed=M + B)
    _assert_align(ids, spec.num_experts, B)


@pytest.mark.parametrize("model", STANDARD_MODELS)
def test_align_with_expert_counts(model):
    spec = get_model(model)
    for M in (8, 4096, 70000):  # one CTA, 512-slot chunks, 8192-slot chunks (torch.ops.moekern.align_plan)
        ids = _ids("routed", M, spec.top_k, spec.num_experts, seed=M)
        counts = torch.bincount(ids.flatten(), minlength=spec.num_experts).to(torch.int32)
        _assert_align(ids, spec.num_experts, 64, counts)


@pytest.mark.parametrize("M,k", [(65, 8), (1024, 8), (1025, 8), (4096, 1), (4097, 1), (4096, 8), (4097, 8), (65536, 8),
                                 (65537, 8), (131072, 8)])
@pytest.mark.parametrize("E", [8, 256, 512])
def test_align_chunking_paths(M, k, E):
    # E = 8: one CTA up to 4096 slots, 512-slot chunks above; E >= 256: 512-slot chunks from 513 slots; past 32K
    # slots 2048-slot chunks, and 8192-slot chunks past 524288 (torch.ops.moekern.align_plan).
    for kind in ("uniform", "one_expert"):
        _assert_align(_ids(kind, M, k, E, seed=M), E, 16)
    _assert_align(_ids("uniform", M, k, E, seed=1), E, 1)


# (slots per thread, ballot match, pads by thread): every variant moe_align_variant can force
ALIGN_PLANS = [(spt, ballot, pads) for spt in (0, 1, 2, 4, 8, 16) for ballot, pads in
               ((False, False), (True, False), (False, True))]


@pytest.mark.parametrize("E", [1, 8, 128, 256, 512])
def test_align_every_plan_gives_the_reference(E):
    """Every forced plan (slots per thread 1-16: one CTA, or a histogram launch and several CTAs; hardware or
    ballot match; pads by warp or by thread) lays out the same slots as the reference, at the slot counts where
    a plan changes its slots per thread (512, 1024, 2048, 4096, 8192) and one past each, with and without
    expert_counts."""
    for n in (1, 300, 512, 513, 1024, 1025, 2048, 2049, 4096, 4100, 8192, 8193, 20000):
        for kind in ("uniform", "one_expert"):
            ids = _ids(kind, n, 1, E, seed=n + E)
            B = 16 if n % 2 else 64
            ref = align_reference(ids, E, B)
            counts = torch.bincount(ids.flatten().long(), minlength=E).to(torch.int32)
            for spt, ballot, pads in ALIGN_PLANS:
                got = torch.ops.moekern.moe_align_variant(ids, E, B, counts if kind == "uniform" else None, spt,
                                                          ballot, pads)
                for a, b, name in zip(got, ref, ("sorted", "blocks", "post_pad")):
                    assert torch.equal(a, b), (n, kind, E, spt, ballot, pads, name)


def test_align_variant_refuses_a_bad_plan():
    ids = _ids("uniform", 8, 2, 8)
    with pytest.raises(RuntimeError, match="slots_per_thread=3"):
        torch.ops.moekern.moe_align_variant(ids, 8, 16, None, 3, False)
    with pytest.raises(RuntimeError, match="separate variants"):
        torch.ops.moekern.moe_align_variant(ids, 8, 16, None, 0, True, True)
    with pytest.raises(RuntimeError, match="moe_align"):  # 2^21 slots at one per thread: 4097 chunks
        torch.ops.moekern.moe_align_variant(torch.zeros(2**21 + 512, 1, dtype=torch.int32, device="cuda"), 8, 1,
                                            None, 1, False)


@pytest.mark.parametrize("B", [1, 3, 256])
def test_align_odd_block_sizes_and_empty(B):
    _assert_align(_ids("uniform", 37, 3, 7), 7, B)
    _assert_align(_ids("uniform", 37, 3, 128), 128, B)  # E >= 64: the thread writer where B <= 16
    _assert_align(torch.empty(0, 4, dtype=torch.int32, device="cuda"), 16, B)


# ---------------------------------------------------------------------------------------------- permute
def _assert_permute(hidden, ids, E, counts=None):
    from moekern.dispatch.cuda_ops import permute_cuda

    permuted, sorted_slots, slot_to_row, offsets = permute_cuda(hidden, ids, E, counts)
    ref_permuted, layout = permute_reference(hidden, ids, E)
    torch.testing.assert_close(sorted_slots, layout.sorted_slots, rtol=0, atol=0)
    torch.testing.assert_close(slot_to_row, layout.slot_to_row, rtol=0, atol=0)
    torch.testing.assert_close(offsets, layout.expert_offsets, rtol=0, atol=0)
    assert permuted.dtype == hidden.dtype
    assert torch.equal(permuted, ref_permuted)
    return slot_to_row, layout


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("kind", ["routed", "one_expert", "few_experts"])
@pytest.mark.parametrize("M", MS)
@pytest.mark.parametrize("model", STANDARD_MODELS)
def test_permute_unpermute_standard_shapes(model, M, kind, dtype):
    from moekern.dispatch.cuda_ops import unpermute_cuda

    spec = get_model(model)
    E, k, H = spec.num_experts, spec.top_k, spec.hidden_size
    g = torch.Generator(device="cuda").manual_seed(M)
    hidden = torch.randn(M, H, device="cuda", generator=g).to(dtype)
    ids = _ids(kind, M, k, E, seed=M)
    slot_to_row, layout = _assert_permute(hidden, ids, E)
    expert_output = torch.randn(M * k, H, device="cuda", generator=g).to(dtype)
    weights = torch.rand(M, k, device="cuda", generator=g)
    got = unpermute_cuda(expert_output, slot_to_row, weights)
    ref = unpermute_reference(expert_output, layout, weights)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1.6e-2, atol=1e-2)
    assert got.dtype == dtype and got.shape == (M, H)
    torch.testing.assert_close(got, ref, **tol)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_unpermute_rows_past_the_output_contribute_nothing(dtype):
    """expert_output may hold fewer rows than slots (a caller that computed only the first N rows): slots whose row
    is >= N add nothing, the row exactly at N included. The rows past N exist in memory here (a view of a larger
    tensor, filled with large values), so reading one of them changes the result."""
    from moekern.dispatch.cuda_ops import unpermute_cuda

    M, k, E, H = 33, 4, 8, 64
    g = torch.Generator(device="cuda").manual_seed(11)
    ids = _ids("uniform", M, k, E, seed=11)
    slot_to_row, layout = _assert_permute(torch.randn(M, H, device="cuda", generator=g).to(dtype), ids, E)
    weights = torch.rand(M, k, device="cuda", generator=g)
    for N in (M * k - 1, M * k // 2, 1, 0):
        backing = torch.full((M * k + 1, H), 1000.0, device="cuda", dtype=dtype)
        backing[:N] = torch.randn(N, H, device="cuda", generator=g).to(dtype)
        expert_output = backing[:N]
        got = unpermute_cuda(expert_output, slot_to_row, weights)
        ref = unpermute_reference(expert_output, layout, weights)
        tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1.6e-2, atol=1e-2)
        torch.testing.assert_close(got, ref, **tol, msg=lambda m, N=N: f"N={N}: {m}")


@pytest.mark.parametrize("dtype,H", [(torch.float16, 7), (torch.float32, 3), (torch.bfloat16, 1), (torch.float16, 12),
                                     (torch.bfloat16, 4104), (torch.float32, 4100)])
def test_permute_unpermute_odd_hidden_sizes(dtype, H):
    from moekern.dispatch.cuda_ops import permute_cuda, unpermute_cuda

    M, k, E = 300, 4, 16
    hidden = torch.randn(M, H, device="cuda").to(dtype)
    ids = _ids("uniform", M, k, E)
    slot_to_row, layout = _assert_permute(hidden, ids, E)
    # A base pointer off 16-byte alignment takes the narrow-copy path.
    buf = torch.empty(M * H + 1, device="cuda", dtype=dtype)
    shifted = buf[1:].view(M, H)
    shifted.copy_(hidden)
    assert torch.equal(permute_cuda(shifted, ids, E)[0], hidden[layout.sorted_slots.long() // k])
    expert_output = torch.randn(M * k, H, device="cuda").to(dtype)
    weights = torch.rand(M, k, device="cuda")
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1.6e-2, atol=1e-2)
    torch.testing.assert_close(unpermute_cuda(expert_output, slot_to_row, weights),
                               unpermute_reference(expert_output, layout, weights), **tol)


def test_permute_then_unpermute_is_identity():
    from moekern.dispatch.cuda_ops import permute_cuda, unpermute_cuda

    M, k, E, H = 513, 8, 64, 256
    hidden = torch.randn(M, H, device="cuda")
    ids = _ids("routed", M, k, E)
    permuted, _, slot_to_row, _ = permute_cuda(hidden, ids, E)
    weights = torch.full((M, k), 1.0 / k, device="cuda")
    torch.testing.assert_close(unpermute_cuda(permuted, slot_to_row, weights), hidden, rtol=1e-6, atol=1e-6)


def test_permute_with_expert_counts_and_large_M():
    M, k, E, H = 70000, 8, 256, 64
    hidden = torch.randn(M, H, device="cuda", dtype=torch.bfloat16)
    ids = _ids("routed", M, k, E)
    counts = torch.bincount(ids.flatten(), minlength=E).to(torch.int32)
    _assert_permute(hidden, ids, E, counts)


# ---------------------------------------------------------------------------------------------- tracing
def test_ops_trace_under_torch_compile():
    from moekern.dispatch.cuda_ops import align_cuda, permute_cuda, unpermute_cuda
    from moekern.routing.cuda_topk import fused_topk_cuda

    def layer(x, logits):
        w, ids, counts = fused_topk_cuda(logits, 8, "softmax", True, None, 0, 0, 1.0)
        sorted_ids, blocks, post = align_cuda(ids, 64, 16, counts)
        permuted, _, slot_to_row, _ = permute_cuda(x, ids, 64, counts)
        return unpermute_cuda(permuted * 2, slot_to_row, w), sorted_ids, blocks, post

    x, logits = torch.randn(33, 128, device="cuda"), torch.randn(33, 64, device="cuda")
    eager = layer(x, logits)
    compiled = torch.compile(layer, fullgraph=True)(x, logits)
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_ops_replay_in_cuda_graph():
    from moekern.dispatch.cuda_ops import align_cuda
    from moekern.routing.cuda_topk import fused_topk_cuda

    logits = torch.randn(64, 256, device="cuda")
    bias = torch.randn(256, device="cuda") * 0.1
    run = lambda: align_cuda(fused_topk_cuda(logits, 8, "sigmoid", True, bias, 8, 4, 2.5)[1], 256, 64)  # noqa: E731
    run()  # warm-up outside capture (allocator, lazy init)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run()
    logits.copy_(torch.randn(64, 256, device="cuda"))
    graph.replay()
    torch.cuda.synchronize()
    ids = fused_topk_reference(logits, 8, scoring="sigmoid", correction_bias=bias, num_expert_group=8, topk_group=4,
                               routed_scaling_factor=2.5)[1]
    for a, b in zip(out, align_reference(ids, 256, 64)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
