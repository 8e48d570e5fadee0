"""moekern.fused_topk: the torch reference against hand-worked examples, the Triton (and CUDA) backends
against the reference, properties under hypothesis, and argument checks.

On a machine without a GPU, conftest.py sets TRITON_INTERPRET=1 and the Triton kernel runs on CPU tensors
at tiny shapes; GPU-only tests are marked `gpu`.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import moekern
from moekern._ext import cuda_kernels_available
from moekern.models.registry import STANDARD_MODELS, get_model
from moekern.routing.reference import fused_topk_reference

HAS_GPU = torch.cuda.is_available()
DEVICE = "cuda" if HAS_GPU else "cpu"
NAN, INF = float("nan"), float("inf")

# The Triton interpreter evaluates NaN/inf rows with numpy, which warns; the results are what we check.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

# Weights: fp32 math on both sides, different exp/sum implementations -> rtol 1e-5. The atol only covers
# weights in fp32's denormal range (GPUs flush them to zero).
W_RTOL, W_ATOL = 1e-5, 1e-30


def _ids(rows):
    return torch.tensor(rows, dtype=torch.int32)


def _check_hand(out, ids, weights, counts, rtol=1e-6):
    torch.testing.assert_close(out[1], _ids(ids), rtol=0, atol=0)
    torch.testing.assert_close(out[0], torch.tensor(weights, dtype=torch.float32), rtol=rtol, atol=1e-7,
                               equal_nan=True)
    torch.testing.assert_close(out[2], _ids(counts), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------
# 1. The reference against examples worked by hand.
# ---------------------------------------------------------------------------------------------------


def test_reference_softmax_k2():
    # softmax(log p) = p for p summing to 1.
    logits = torch.log(torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.5, 0.125, 0.125, 0.25]]))
    out = fused_topk_reference(logits, 2)
    _check_hand(out, [[3, 2], [0, 3]], [[4 / 7, 3 / 7], [2 / 3, 1 / 3]], [1, 0, 1, 2])


def test_reference_renormalize_off_and_scaling():
    logits = torch.log(torch.tensor([[0.1, 0.2, 0.3, 0.4]]))
    _check_hand(fused_topk_reference(logits, 2, renormalize=False), [[3, 2]], [[0.4, 0.3]], [0, 0, 1, 1])
    _check_hand(fused_topk_reference(logits, 2, routed_scaling_factor=2.0), [[3, 2]], [[8 / 7, 6 / 7]],
                [0, 0, 1, 1])
    _check_hand(fused_topk_reference(logits, 2, renormalize=False, routed_scaling_factor=2.0), [[3, 2]],
                [[0.8, 0.6]], [0, 0, 1, 1])


def test_reference_sigmoid_bias():
    # sigmoid: [0.5, 0.5, 0.75, 0.25]; + bias [0, .3, 0, .6] -> selection [0.5, 0.8, 0.75, 0.85]: ids 3, 1.
    # Weights are sigmoid without bias: [0.25, 0.5] -> renormalized [1/3, 2/3] -> x2.5.
    logits = torch.tensor([[0.0, 0.0, math.log(3), -math.log(3)]])
    bias = torch.tensor([0.0, 0.3, 0.0, 0.6])
    out = fused_topk_reference(logits, 2, scoring="sigmoid", correction_bias=bias, routed_scaling_factor=2.5)
    _check_hand(out, [[3, 1]], [[2.5 / 3, 5 / 3]], [0, 1, 0, 1])
    out = fused_topk_reference(logits, 2, scoring="sigmoid", correction_bias=bias, renormalize=False)
    _check_hand(out, [[3, 1]], [[0.25, 0.5]], [0, 1, 0, 1])


def test_reference_grouped_deepseek_like():
    # E=8 in G=4 groups of 2, keep g=2 groups, k=3, sigmoid. sigmoid(log(p/(1-p))) = p.
    # scores: g0 [0.9, 0.1] sum 1.0 | g1 [0.8, 0.7] 1.5 | g2 [0.75, 0.5] 1.25 | g3 [0.25, 0.5] 0.75
    # Kept groups: 1, 2 (top-2 sums; a max-per-group rule would keep group 0). The best expert overall
    # (0, score 0.9) is out; chosen: 2 (0.8), 4 (0.75), 3 (0.7).
    p = torch.tensor([[0.9, 0.1, 0.8, 0.7, 0.75, 0.5, 0.25, 0.5]], dtype=torch.float64)
    logits = torch.log(p / (1 - p)).float()
    out = fused_topk_reference(logits, 3, scoring="sigmoid", num_expert_group=4, topk_group=2,
                               routed_scaling_factor=2.5)
    w = [0.8 * 2.5 / 2.25, 0.75 * 2.5 / 2.25, 0.7 * 2.5 / 2.25]
    _check_hand(out, [[2, 4, 3]], [w], [0, 0, 1, 1, 1, 0, 0, 0])
    # The same without grouping picks expert 0 first.
    out = fused_topk_reference(logits, 3, scoring="sigmoid", renormalize=False)
    _check_hand(out, [[0, 2, 4]], [[0.9, 0.8, 0.75]], [1, 0, 1, 0, 1, 0, 0, 0])


def test_reference_ties_go_to_lower_index():
    logits = torch.tensor([[1.0, 1.0, 1.0, 1.0, 1.0], [2.0, 5.0, 5.0, 1.0, 5.0], [-0.0, 0.0, -1.0, -0.0, -2.0]])
    out = fused_topk_reference(logits, 2, renormalize=False)
    assert out[1].tolist() == [[0, 1], [1, 2], [0, 1]]  # -0.0 == +0.0: a tie, lower index first
    assert out[2].tolist() == [2, 3, 1, 0, 0]
    torch.testing.assert_close(out[0][0], torch.tensor([0.2, 0.2]))


def test_reference_nan_and_inf():
    # softmax: a NaN logit makes the row's weights NaN; ids are the best of the rest, NaN tied with -inf.
    out = fused_topk_reference(torch.tensor([[NAN, 1.0, 3.0, 2.0], [NAN, -INF, 0.0, 1.0]]), 4)
    assert out[1].tolist() == [[2, 3, 1, 0], [3, 2, 0, 1]]
    assert torch.isnan(out[0]).all()
    # sigmoid: only the NaN expert's score is NaN; it ranks last.
    out = fused_topk_reference(torch.tensor([[NAN, 0.0, math.log(3)]]), 2, scoring="sigmoid")
    _check_hand(out, [[2, 1]], [[0.6, 0.4]], [0, 1, 1])
    # All NaN: the lowest indices, NaN weights (a NaN sum leaves the row as it is).
    out = fused_topk_reference(torch.tensor([[NAN, NAN, NAN]]), 2, scoring="sigmoid")
    assert out[1].tolist() == [[0, 1]] and torch.isnan(out[0]).all()


def test_reference_zero_sum_is_not_renormalized():
    out = fused_topk_reference(torch.tensor([[-INF, -INF, -INF], [-INF, 0.0, -INF]]), 2, scoring="sigmoid")
    _check_hand(out, [[0, 1], [1, 0]], [[0.0, 0.0], [1.0, 0.0]], [2, 2, 0])


def test_reference_excluded_groups_rank_below_nan():
    # G=2 groups of 2, keep 1. Group 0 = [NaN, NaN] scores -inf; group 1 = [~1, 0]: kept, and its expert 3
    # (score 0) is chosen although NaN experts of group 0 remain.
    out = fused_topk_reference(torch.tensor([[NAN, NAN, 20.0, -INF]]), 2, scoring="sigmoid",
                               num_expert_group=2, topk_group=1, renormalize=False)
    _check_hand(out, [[2, 3]], [[1.0, 0.0]], [0, 0, 1, 1])


def test_reference_rejects_unknown_scoring():
    # fused_topk checks scoring before any backend; the reference, called directly, names it too.
    with pytest.raises(ValueError, match=r"scoring='relu' must be one of \('softmax', 'sigmoid'\)"):
        fused_topk_reference(torch.zeros(1, 4), 1, scoring="relu")


def test_reference_grouped_one_expert_per_group():
    # E/G == 1: the group score is the expert's own score, so grouping with g >= k changes nothing.
    logits = torch.tensor([[0.3, 2.0, -1.0, 2.0, 0.5, 0.1]])
    a = fused_topk_reference(logits, 2, num_expert_group=6, topk_group=3)
    b = fused_topk_reference(logits, 2)
    assert a[1].tolist() == b[1].tolist() == [[1, 3]]
    torch.testing.assert_close(a[0], b[0])


# Hand-worked examples every backend must reproduce (reference, Triton, and the CUDA kernels on a GPU).
HAND_BACKENDS = ["torch", "triton"] + (["cuda"] if HAS_GPU else [])  # a GPU build without kernels fails here


@pytest.mark.parametrize("backend", HAND_BACKENDS)
def test_hand_softmax_groups_scored_on_probabilities(backend):
    # E=4 in G=2 groups of 2, keep g=1 group, k=2, softmax. Row 0 logits [2, 0 | 1, 1.5]:
    #   exp = [7.389, 1.000 | 2.718, 4.482], Z = 15.589.
    #   group score on probabilities (top-2 sum): g0 = 8.389 / Z = 0.538 > g1 = 7.200 / Z = 0.462 -> keep g0,
    #   ids [0, 1], renormalized weights e^2 / (e^2 + 1) = 0.880797, 1 / (e^2 + 1) = 0.119203.
    #   Scored on logits instead, g0 = 2 + 0 = 2 < g1 = 1 + 1.5 = 2.5 would keep g1: ids [3, 2].
    #   (Ungrouped, the top 2 are [0, 3]: grouping matters here.)
    # Row 1 is row 0 with the groups swapped: ids [2, 3] (logit sums would give [1, 0]).
    x = torch.tensor([[2.0, 0.0, 1.0, 1.5], [1.0, 1.5, 2.0, 0.0]], device=DEVICE)
    out = moekern.fused_topk(x, 2, num_expert_group=2, topk_group=1, backend=backend)
    hi, lo = math.exp(2) / (math.exp(2) + 1), 1 / (math.exp(2) + 1)
    _check_hand([t.cpu() for t in out], [[0, 1], [2, 3]], [[hi, lo], [hi, lo]], [1, 1, 1, 1], rtol=1e-5)


@pytest.mark.parametrize("backend", HAND_BACKENDS)
def test_hand_renormalize_tiny_sigmoid_weights(backend):
    # sigmoid(x) = 1 / (1 + e^-x) ~ e^x for x << 0: logits [-20, -21, -30, -40] give scores 2.06e-9, 7.58e-10,
    # 9.4e-14, 4.2e-18; k=2 picks ids [0, 1]. Renormalized: s0 / (s0 + s1) = e / (1 + e) = 0.7310586 and
    # 1 / (1 + e) = 0.2689414 (to ~1e-9), times routed_scaling_factor 2.5. The sum 2.8e-9 is far below any
    # epsilon a denominator might be padded with (sum + 1e-6 would give weights ~0.005).
    x = torch.tensor([[-20.0, -21.0, -30.0, -40.0]], device=DEVICE)
    out = moekern.fused_topk(x, 2, scoring="sigmoid", routed_scaling_factor=2.5, backend=backend)
    e = math.e
    _check_hand([t.cpu() for t in out], [[0, 1]], [[2.5 * e / (1 + e), 2.5 / (1 + e)]], [1, 1, 0, 0], rtol=1e-5)


@pytest.mark.parametrize("backend", HAND_BACKENDS)
def test_hand_keeping_every_group_is_no_grouping(backend):
    # topk_group = num_expert_group keeps every group (also G = g = 1): the plain top 2 of softmax
    # [1, 4 | 2, 3], ids [1, 3], weights e^4 / Z and e^3 / Z with Z = e + e^2 + e^3 + e^4 (renormalize off)
    x = torch.tensor([[1.0, 4.0, 2.0, 3.0]], device=DEVICE)
    z = sum(math.exp(v) for v in (1, 2, 3, 4))
    for groups in (dict(num_expert_group=2, topk_group=2), dict(num_expert_group=1, topk_group=1)):
        out = moekern.fused_topk(x, 2, renormalize=False, backend=backend, **groups)
        _check_hand([t.cpu() for t in out], [[1, 3]], [[math.exp(4) / z, math.exp(3) / z]], [0, 1, 0, 1], rtol=1e-5)


def test_default_backend_routes_cpu_tensors():
    # backend defaults to "auto", which is the torch reference for CPU tensors (the example above, ungrouped)
    out = moekern.fused_topk(torch.tensor([[1.0, 4.0, 2.0, 3.0]]), 2, renormalize=False)
    z = sum(math.exp(v) for v in (1, 2, 3, 4))
    _check_hand(out, [[1, 3]], [[math.exp(4) / z, math.exp(3) / z]], [0, 1, 0, 1], rtol=1e-5)


def test_triton_at_the_kernel_limits():
    # E = 512 and top_k = 16 are the largest the kernels take (one past them is refused: test_bad_arguments).
    # Logits e / 64 rise with e: the top 16 are experts 511 down to 496; renormalized softmax weights
    # e^(j/64) / sum_{i<16} e^(i/64) for 511 - j.
    x = (torch.arange(512, dtype=torch.float32) / 64).unsqueeze(0).to(DEVICE)
    out = moekern.fused_topk(x, 16, backend="triton")
    top = [511 - j for j in range(16)]
    z = sum(math.exp(v / 64) for v in top)
    counts = [0] * 496 + [1] * 16
    _check_hand([t.cpu() for t in out], [top], [[math.exp(v / 64) / z for v in top]], counts, rtol=1e-5)


def test_m_zero_outputs_on_the_inputs_device():
    # made on the logits' device and in the documented dtypes, not torch's defaults (here meta and float64)
    x = torch.empty(0, 8)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        with torch.device("meta"):
            out = moekern.fused_topk(x, 2)
    finally:
        torch.set_default_dtype(default_dtype)
    assert all(t.device.type == "cpu" for t in out)
    _assert_valid(out, 0, 8, 2)


# ---------------------------------------------------------------------------------------------------
# Comparison of a backend with the reference, excluding only near-ties that fp32 exp can flip.
# ---------------------------------------------------------------------------------------------------

# Sigmoid scores and softmax group scores come from exp, which differs between libraries (numpy in the
# interpreter, ex2.approx on GPU, Sleef in torch) by a few ulps. Two scores within that distance may be
# ordered differently by a correct kernel, so rows whose decision hinges on such a pair are left out of
# the exact comparison: a pair of finite scores within REL_TIE (about 8 ulps; a 1-ulp bound would be
# flaky on GPU) whose inputs differ, unless both scores are exact everywhere (exp(a) is exactly 1, 0 or
# inf for |a| < 2^-25, a < -104, a > 89 in every libm). Equal inputs give bit-equal scores everywhere,
# so exact ties are always compared, and softmax selection (on logits) is always compared exactly.
REL_TIE, ABS_TIE = 1e-6, 2.0**-126
_UNIQUE = -(2**63)  # a group code no input produces (it would need a logit of -0.0, which is folded to +0.0)


def _input_codes(x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """int64 [M, E]: equal codes <=> equal (logit, bias) inputs, i.e. bit-equal scores on any backend."""
    x = x.float()
    x = torch.where(torch.isnan(x), torch.full_like(x, NAN), torch.where(x == 0, torch.zeros_like(x), x))
    code = x.view(torch.int32).to(torch.int64) << 32
    if bias is not None:
        code = code | (bias.float().view(torch.int32).to(torch.int64) & 0xFFFFFFFF)
    return code


def _near(a, b, ca, cb, ra, rb):
    """Pairs of scores (a, b) that two correct backends may order differently."""
    finite = torch.isfinite(a) & torch.isfinite(b)
    close = (a - b).abs() <= REL_TIE * torch.maximum(a.abs(), b.abs()) + ABS_TIE
    differ = (ca != cb).any(dim=-1)
    return finite & close & differ & ~(ra & rb)


def _ambiguous_rows(scores, codes, robust, allowed, depth):
    """[M] bool: rows whose top-`depth` choice among `allowed` entries hinges on a near-tie.

    scores [M, N] fp32 (NaN already -inf); codes [M, N, C] int64 (equal iff inputs equal); robust [M, N]
    (score exact on every backend).
    """
    M, N = scores.shape
    if N < 2:
        return torch.zeros(M, dtype=torch.bool, device=scores.device)
    s = torch.where(allowed, scores, torch.full_like(scores, -INF))
    s_sorted, order = torch.sort(s, dim=1, descending=True, stable=True)
    ok = torch.gather(allowed, 1, order)
    r = torch.gather(robust, 1, order)
    c = torch.gather(codes, 1, order[..., None].expand(-1, -1, codes.shape[2]))
    a, b = s_sorted[:, :-1], s_sorted[:, 1:]
    # The contested zone: every entry at least as good as the depth-th best (so twins tied with it count).
    zone = a >= s_sorted[:, depth - 1 : depth]
    pair = zone & ok[:, :-1] & ok[:, 1:] & _near(a, b, c[:, :-1], c[:, 1:], r[:, :-1], r[:, 1:])
    return pair.any(dim=1)


def _excluded_rows(x, top_k, kw) -> torch.Tensor:
    """[M] bool: rows left out of the exact comparison (see REL_TIE)."""
    M, E = x.shape
    bias = kw.get("correction_bias")
    logits = x.float()
    codes = _input_codes(x, bias)
    sigmoid = kw.get("scoring", "softmax") == "sigmoid"
    if sigmoid:
        score = torch.sigmoid(logits) + (bias.float() if bias is not None else 0.0)
        exp_arg = -logits
    else:
        score = torch.softmax(logits, dim=-1)
        exp_arg = logits - logits.max(dim=1, keepdim=True).values if E else logits
    robust = torch.isnan(exp_arg) | (exp_arg.abs() < 2.0**-25) | (exp_arg < -104) | (exp_arg > 89)
    if not sigmoid:  # a probability is exact only if the row's whole denominator is
        robust = robust.all(dim=1, keepdim=True).expand(M, E)
    score = torch.where(torch.isnan(score), torch.full_like(score, -INF), score)
    bad = torch.zeros(M, dtype=torch.bool, device=x.device)
    allowed = torch.ones(M, E, dtype=torch.bool, device=x.device)
    G, g = kw.get("num_expert_group"), kw.get("topk_group")
    if G is not None and G > 1:
        P = E // G
        top, order = torch.sort(score.view(M, G, P), dim=-1, descending=True, stable=True)
        gscore = top[..., 0] if P == 1 else top[..., 0] + top[..., 1]
        gscore = torch.where(torch.isnan(gscore), torch.full_like(gscore, -INF), gscore)
        # A group's score is a function of its two best inputs: groups with the same two tie exactly.
        c_sorted = torch.gather(codes.view(M, G, P), 2, order)
        r_sorted = torch.gather(robust.reshape(M, G, P), 2, order)
        gcodes = torch.sort(c_sorted[..., : min(P, 2)], dim=-1).values
        if P > 2:  # unless the second place itself is a near-tie: then that group ties with no other
            unstable = _near(top[..., 1], top[..., 2], c_sorted[..., 1:2], c_sorted[..., 2:3],
                             r_sorted[..., 1], r_sorted[..., 2])
            ids = torch.arange(G, device=x.device).expand(M, G)
            gcodes = torch.where(unstable[..., None], (_UNIQUE + ids)[..., None], gcodes)
        grobust = robust.reshape(M, G, P).all(dim=-1)
        bad |= _ambiguous_rows(gscore, gcodes, grobust, torch.ones_like(grobust), g)
        kept = torch.argsort(gscore, dim=-1, descending=True, stable=True)[:, :g]
        gmask = torch.zeros(M, G, dtype=torch.bool, device=x.device).scatter_(1, kept, True)
        allowed = gmask.repeat_interleave(P, dim=1)
    if sigmoid:
        bad |= _ambiguous_rows(score, codes[..., None], robust, allowed, top_k)
    return bad


def _assert_valid(out, M, E, top_k):
    w, ids, counts = out
    assert w.shape == (M, top_k) and w.dtype == torch.float32
    assert ids.shape == (M, top_k) and ids.dtype == torch.int32
    assert counts.shape == (E,) and counts.dtype == torch.int32
    if M:
        assert int(ids.min()) >= 0 and int(ids.max()) < E
        srt = torch.sort(ids, dim=1).values
        assert bool((srt[:, 1:] != srt[:, :-1]).all()), "ids repeat within a row"
    assert int(counts.sum()) == M * top_k
    torch.testing.assert_close(counts, torch.bincount(ids.flatten().long(), minlength=E).to(torch.int32),
                               rtol=0, atol=0)


def check_backend(x, top_k, backend, max_excluded=None, **kw):
    """Run `backend` and the reference on x; ids and counts exact, weights W_RTOL (near-ties excepted)."""
    M, E = x.shape
    out = moekern.fused_topk(x, top_k, backend=backend, **kw)
    _assert_valid(out, M, E, top_k)
    ref = fused_topk_reference(x, top_k, **kw)
    bad = _excluded_rows(x, top_k, kw)
    if max_excluded is not None:
        assert int(bad.sum()) <= max_excluded, f"{int(bad.sum())} of {M} rows hold near-ties"
    keep = ~bad
    torch.testing.assert_close(out.topk_ids[keep], ref[1][keep], rtol=0, atol=0)
    torch.testing.assert_close(out.topk_weights[keep], ref[0][keep], rtol=W_RTOL, atol=W_ATOL, equal_nan=True)
    if not bool(bad.any()):
        torch.testing.assert_close(out.expert_counts, ref[2], rtol=0, atol=0)
    return out


# ---------------------------------------------------------------------------------------------------
# 2. The Triton backend (interpreter on CPU, native on GPU) against the reference.
# ---------------------------------------------------------------------------------------------------


def _model_case(name, M, dtype, device, seed=0):
    spec = get_model(name)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(M, spec.num_experts, generator=gen).to(dtype).to(device)
    kw = spec.routing_kwargs()
    if spec.correction_bias:
        kw["correction_bias"] = (0.1 * torch.randn(spec.num_experts, generator=gen)).to(device)
    return x, spec.top_k, kw


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", STANDARD_MODELS)
def test_triton_standard_models(name, dtype):
    x, k, kw = _model_case(name, 5, dtype, DEVICE)
    check_backend(x, k, "triton", **kw)


SMALL_CASES = [
    # (E, k, scoring, G, g)
    (1, 1, "softmax", None, None),
    (1, 1, "sigmoid", None, None),
    (16, 4, "softmax", None, None),
    (16, 4, "sigmoid", 4, 2),
    (16, 3, "softmax", 16, 5),
    (60, 4, "softmax", None, None),
    (60, 6, "softmax", 4, 2),
    (60, 8, "sigmoid", 6, 3),
    (60, 16, "sigmoid", None, None),
]


@pytest.mark.parametrize("E,k,scoring,G,g", SMALL_CASES)
@pytest.mark.parametrize("renormalize", [True, False])
def test_triton_small_shapes(E, k, scoring, G, g, renormalize):
    gen = torch.Generator().manual_seed(E * 100 + k)
    x = torch.randn(7, E, generator=gen).to(DEVICE)
    kw = dict(scoring=scoring, renormalize=renormalize, num_expert_group=G, topk_group=g,
              routed_scaling_factor=1.5)
    if scoring == "sigmoid":
        kw["correction_bias"] = torch.randn(E, generator=gen).to(DEVICE)
    check_backend(x, k, "triton", **kw)


def test_triton_hand_example_grouped():
    p = torch.tensor([[0.9, 0.1, 0.8, 0.7, 0.75, 0.5, 0.25, 0.5]], dtype=torch.float64)
    x = torch.log(p / (1 - p)).float().to(DEVICE)
    out = moekern.fused_topk(x, 3, scoring="sigmoid", num_expert_group=4, topk_group=2,
                             routed_scaling_factor=2.5, backend="triton")
    assert out.topk_ids.cpu().tolist() == [[2, 4, 3]]
    assert out.expert_counts.cpu().tolist() == [0, 0, 1, 1, 1, 0, 0, 0]


def test_triton_special_rows():
    x = torch.tensor([
        [1.0, 1.0, 1.0, 1.0, 1.0, 1.0],
        [NAN, 2.0, 2.0, -0.0, 0.0, -INF],
        [-0.0, 0.0, -0.0, -INF, NAN, -INF],
        [INF, 3.0, INF, -INF, 1.0, 0.0],
        [NAN, NAN, NAN, NAN, NAN, NAN],
        [-INF, -INF, -INF, -INF, -INF, -INF],
        [3e38, -3e38, 1e-45, -1e-45, 1e-30, 0.0],
    ], device=DEVICE)
    for scoring in ("softmax", "sigmoid"):
        for k in (1, 3, 6):
            check_backend(x, k, "triton", scoring=scoring)
            check_backend(x, min(k, 4), "triton", scoring=scoring, num_expert_group=3, topk_group=2)


def test_triton_excluded_groups_rank_below_nan():
    # Group 1 = [NaN, 5, 5] is kept over group 0 = [3, -inf, NaN]; the third pick is group 1's NaN expert,
    # not group 0's finite expert 0.
    x = torch.tensor([[3.0, -INF, NAN, NAN, 5.0, 5.0]], device=DEVICE)
    out = check_backend(x, 3, "triton", scoring="sigmoid", num_expert_group=2, topk_group=1)
    assert out.topk_ids.cpu().tolist() == [[4, 5, 3]]


def test_triton_m_zero_and_direct_call():
    x = torch.empty(0, 8, device=DEVICE)
    out = moekern.fused_topk(x, 2, backend="triton")
    _assert_valid(out, 0, 8, 2)
    from moekern.routing.triton_topk import fused_topk_triton

    w, ids, counts = fused_topk_triton(x, 2, "softmax", True, None, 0, 0, 1.0)
    assert w.shape == (0, 2) and ids.shape == (0, 2) and counts.tolist() == [0] * 8


@pytest.mark.parametrize("backend", HAND_BACKENDS)
@pytest.mark.parametrize("kw", [dict(), dict(scoring="sigmoid", renormalize=False),
                                dict(scoring="sigmoid", num_expert_group=4, topk_group=2,
                                     correction_bias=torch.zeros(8), routed_scaling_factor=2.5),
                                dict(num_expert_group=2, topk_group=1)], ids=["softmax", "sigmoid", "grouped-bias",
                                                                               "softmax-grouped"])
def test_m_zero_every_option(backend, kw):
    kw = {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
    out = moekern.fused_topk(torch.empty(0, 8, device=DEVICE), 2, backend=backend, **kw)
    _assert_valid(out, 0, 8, 2)
    assert out.expert_counts.cpu().tolist() == [0] * 8


def test_triton_many_programs():
    # More rows than one program holds, the last program part-full (517 = 64 x 8 + 5 with BLOCK_M = 8):
    # exercises the row mask and the cross-program counts atomics.
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(517, 8, generator=gen).to(DEVICE)
    check_backend(x, 2, "triton")


def test_triton_custom_op_opcheck():
    from moekern.routing.triton_topk import fused_topk_triton  # noqa: F401  (registers the op)

    x = torch.randn(3, 16, device=DEVICE)
    bias = torch.randn(16, device=DEVICE)
    torch.library.opcheck(torch.ops.moekern.fused_topk_triton.default, (x, 4, "sigmoid", True, bias, 4, 2, 2.5),
                          test_utils=("test_schema", "test_faketensor"))


def test_triton_traces_fullgraph():
    # aot_eager traces the whole wrapper (validation included) without generating code: a graph break or
    # a data-dependent host read in fused_topk fails here, on CPU as on GPU.
    def route(x, bias):
        return moekern.fused_topk(x, 8, scoring="sigmoid", correction_bias=bias, num_expert_group=8,
                                  topk_group=4, routed_scaling_factor=2.5, backend="triton")

    torch._dynamo.reset()
    compiled = torch.compile(route, fullgraph=True, backend="aot_eager")
    x, k, kw = _model_case("deepseek-v3", 3, torch.float32, DEVICE)
    got = compiled(x, kw["correction_bias"])
    want = route(x, kw["correction_bias"])
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


# ---------------------------------------------------------------------------------------------------
# 3. Properties under hypothesis.
# ---------------------------------------------------------------------------------------------------

STYLES = ("normal", "ties", "all_equal", "huge", "tiny", "inf", "nan_rows", "quantized")


def _make_logits(rng: np.random.Generator, style: str, M: int, E: int) -> np.ndarray:
    if style == "normal":
        return rng.standard_normal((M, E)) * 3
    if style == "ties":
        return rng.integers(-2, 3, size=(M, E)).astype(np.float64)
    if style == "all_equal":
        return np.full((M, E), float(rng.standard_normal()))
    if style == "huge":
        return rng.choice([-3e38, -1e30, -1e4, 1e4, 1e30, 3e38], size=(M, E)) * rng.uniform(0.5, 1, (M, E))
    if style == "tiny":
        return rng.choice([-1e-30, 0.0, -0.0, 1e-30, 1e-45, -1e-45, 1e-38], size=(M, E))
    if style == "inf":
        x = rng.standard_normal((M, E))
        x[rng.random((M, E)) < 0.3] = INF
        x[rng.random((M, E)) < 0.3] = -INF
        return x
    if style == "nan_rows":
        x = rng.standard_normal((M, E))
        x[rng.random((M, E)) < 0.3] = NAN
        if M:
            x[rng.integers(0, M)] = NAN
        return x
    if style == "quantized":  # values on a coarse grid: many repeats, as bf16 logits have
        return np.round(rng.standard_normal((M, E)) * 4) / 4
    raise AssertionError(style)


@st.composite
def routing_cases(draw):
    E = draw(st.one_of(st.integers(1, 20), st.sampled_from([60, 64, 128, 160, 256, 384, 512])))
    M = draw(st.integers(1, 4))  # M = 0 returns before any kernel runs: test_m_zero_every_option covers it
    scoring = draw(st.sampled_from(["softmax", "sigmoid"]))
    G = g = None
    if draw(st.booleans()):
        divisors = [d for d in range(2, E + 1) if E % d == 0 and d <= 64]
        if divisors:
            G = draw(st.sampled_from(divisors))
            g = draw(st.integers(1, G))
    selectable = E if G is None else g * (E // G)
    k = draw(st.integers(1, min(selectable, 16)))
    style = draw(st.sampled_from(STYLES))
    dtype = draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    x = torch.from_numpy(_make_logits(rng, style, M, E)).float().to(dtype)
    kw = dict(scoring=scoring, renormalize=draw(st.booleans()), num_expert_group=G, topk_group=g,
              routed_scaling_factor=draw(st.sampled_from([1.0, 2.5, 0.0, -1.0])))
    if scoring == "sigmoid" and draw(st.booleans()):
        bias_style = draw(st.sampled_from(["normal", "ties", "zero"]))
        if bias_style == "normal":
            bias = rng.standard_normal(E) * 0.1
        elif bias_style == "ties":
            bias = rng.integers(-1, 2, size=E) * 0.25
        else:
            bias = np.zeros(E)
        kw["correction_bias"] = torch.from_numpy(bias).float()
    return x, k, kw


PROPERTY_SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPERTY_SETTINGS
@given(routing_cases())
def test_property_triton_matches_reference(case):
    x, k, kw = case
    x = x.to(DEVICE)
    if kw.get("correction_bias") is not None:
        kw["correction_bias"] = kw["correction_bias"].to(DEVICE)
    check_backend(x, k, "triton", **kw)


@settings(max_examples=40, deadline=None)
@given(routing_cases())
def test_property_reference_invariants(case):
    # The reference itself: ids valid and distinct, counts = bincount, weights finite where inputs are.
    x, k, kw = case
    out = moekern.fused_topk(x, k, backend="torch", **kw)
    _assert_valid(out, x.shape[0], x.shape[1], k)
    finite_rows = torch.isfinite(x.float()).all(dim=1)
    assert bool(torch.isfinite(out.topk_weights[finite_rows]).all())
    if kw["routed_scaling_factor"] > 0 and kw["scoring"] == "softmax":
        w = out.topk_weights[finite_rows]
        # softmax weights come out in descending order
        assert bool((w[:, :-1] >= w[:, 1:]).all())


# ---------------------------------------------------------------------------------------------------
# 4. Bad arguments: each error names the argument.
# ---------------------------------------------------------------------------------------------------

_X = torch.randn(4, 8)

BAD_ARGS = [
    # (id, logits, top_k, kwargs, exception, pattern)
    ("rank-1", torch.randn(8), 2, {}, ValueError, "router_logits must be 2-D"),
    ("rank-3", torch.randn(2, 3, 8), 2, {}, ValueError, "router_logits must be 2-D"),
    ("not-a-tensor", [[1.0, 2.0]], 1, {}, TypeError, "router_logits must be a torch.Tensor"),
    ("int-dtype", torch.ones(4, 8, dtype=torch.int32), 2, {}, TypeError, "router_logits must be float32"),
    ("fp64-dtype", torch.ones(4, 8, dtype=torch.float64), 2, {}, TypeError, "router_logits must be float32"),
    ("no-experts", torch.randn(4, 0), 1, {}, ValueError, "router_logits must have at least one expert"),
    ("top_k-0", _X, 0, {}, ValueError, "top_k=0 must be >= 1"),
    ("top_k-float", _X, 2.0, {}, TypeError, "top_k must be an int"),
    ("top_k-bool", _X, True, {}, TypeError, "top_k must be an int"),
    ("top_k>E", _X, 9, {}, ValueError, "top_k=9 must be <= num_experts=8"),
    ("top_k>selectable", _X, 3, dict(num_expert_group=4, topk_group=1), ValueError,
     "top_k=3 must be <= the 2 selectable experts"),
    ("G-not-dividing", _X, 2, dict(num_expert_group=3, topk_group=1), ValueError,
     "num_expert_group=3 must divide num_experts=8"),
    ("G-zero", _X, 2, dict(num_expert_group=0, topk_group=1), ValueError, "num_expert_group=0 must be >= 1"),
    ("g>G", _X, 2, dict(num_expert_group=4, topk_group=5), ValueError, "topk_group=5 must be <= num_expert_group=4"),
    ("g-zero", _X, 2, dict(num_expert_group=4, topk_group=0), ValueError, "topk_group=0 must be >= 1"),
    ("only-G", _X, 2, dict(num_expert_group=4), ValueError, "num_expert_group and topk_group go together"),
    ("only-g", _X, 2, dict(topk_group=2), ValueError, "topk_group=2"),
    ("bias-shape", _X, 2, dict(scoring="sigmoid", correction_bias=torch.zeros(7)), ValueError,
     r"correction_bias must have shape \(8,\)"),
    ("bias-dtype", _X, 2, dict(scoring="sigmoid", correction_bias=torch.zeros(8, dtype=torch.float16)),
     TypeError, "correction_bias must be float32"),
    ("bias-device", _X, 2, dict(scoring="sigmoid", correction_bias=torch.zeros(8, device="meta")), ValueError,
     "correction_bias is on meta"),
    ("bias-not-tensor", _X, 2, dict(scoring="sigmoid", correction_bias=[0.0] * 8), TypeError,
     "correction_bias must be a torch.Tensor"),
    ("bias-with-softmax", _X, 2, dict(correction_bias=torch.zeros(8)), ValueError,
     "correction_bias is defined for scoring='sigmoid' only"),
    ("scoring", _X, 2, dict(scoring="relu"), ValueError, "scoring='relu' must be one of"),
    # no token to route: checked all the same, before the empty outputs are made
    ("scoring-M0", torch.randn(0, 8), 2, dict(scoring="relu"), ValueError, "scoring='relu' must be one of"),
    ("scale-inf", _X, 2, dict(routed_scaling_factor=INF), ValueError, "routed_scaling_factor=inf must be finite"),
    ("scale-type", _X, 2, dict(routed_scaling_factor="2"), TypeError, "routed_scaling_factor must be a float"),
    ("backend-unknown", _X, 2, dict(backend="cutlass"), ValueError, "backend='cutlass' must be one of"),
    ("backend-cuda-on-cpu", _X, 2, dict(backend="cuda"), RuntimeError,
     "backend='cuda' is unavailable on this machine: the cuda backend needs CUDA/HIP tensors"),
    ("triton-E>512", torch.randn(2, 513), 2, dict(backend="triton"), ValueError,
     "backend='triton' covers num_experts <= 512"),
    ("triton-k>16", torch.randn(2, 32), 17, dict(backend="triton"), ValueError,
     "backend='triton' covers num_experts <= 512 and top_k <= 16"),
]


@pytest.mark.parametrize("logits,top_k,kw,exc,pattern", [c[1:] for c in BAD_ARGS], ids=[c[0] for c in BAD_ARGS])
def test_bad_arguments(logits, top_k, kw, exc, pattern):
    with pytest.raises(exc, match=pattern):
        moekern.fused_topk(logits, top_k, **kw)


def test_torch_backend_covers_big_shapes():
    # The reference has no E/k limit; the device backends refuse them (tested above).
    x = torch.randn(2, 513)
    out = moekern.fused_topk(x, 17, backend="torch")
    _assert_valid(out, 2, 513, 17)


# ---------------------------------------------------------------------------------------------------
# 5. GPU: both device backends at the standard shapes, torch.compile, CUDA graphs.
# ---------------------------------------------------------------------------------------------------

GPU_MODELS = ("mixtral", "qwen3-30b-a3b", "deepseek-v3")


def _skip_unless_backend(backend):
    if backend == "cuda" and not cuda_kernels_available():
        pytest.skip("moekern._C has no device kernels (not built on this machine)")


@pytest.mark.gpu
@pytest.mark.parametrize("M", [1, 7, 256, 4096])
@pytest.mark.parametrize("name", GPU_MODELS)
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_backend_standard_shapes(backend, name, M):
    _skip_unless_backend(backend)
    x, k, kw = _model_case(name, M, torch.bfloat16, "cuda", seed=M)
    # Near-ties within ~8 ulps are rare with these inputs: allow at most 1% of rows to be excluded.
    check_backend(x, k, backend, max_excluded=max(1, M // 100), **kw)


@pytest.mark.gpu
def test_gpu_beyond_the_kernel_limits():
    # auto on a GPU falls back to the torch reference past E = 512 or top_k = 16; naming a kernel backend there
    # is refused, the compiled one included (on CPU, backend="cuda" is refused earlier as unavailable)
    x = torch.arange(513, dtype=torch.float32, device="cuda").unsqueeze(0) / 64
    for k in (2, 17):
        out = moekern.fused_topk(x, k)
        assert out.topk_ids.cpu().tolist() == [[512 - j for j in range(k)]]
    for backend in ("cuda", "triton"):
        with pytest.raises(ValueError, match=f"backend='{backend}' covers num_experts <= 512"):
            moekern.fused_topk(x, 2, backend=backend)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_torch_compile_fullgraph(backend):
    _skip_unless_backend(backend)
    x, k, kw = _model_case("deepseek-v3", 64, torch.bfloat16, "cuda")
    bias = kw.pop("correction_bias")

    def route(logits, bias):
        return moekern.fused_topk(logits, k, correction_bias=bias, backend=backend, **kw)

    torch._dynamo.reset()
    compiled = torch.compile(route, fullgraph=True)
    got = compiled(x, bias)
    want = route(x, bias)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
    x2 = torch.randn_like(x)  # a second call with new data reuses the graph
    check = fused_topk_reference(x2, k, correction_bias=bias, **kw)
    got2 = compiled(x2, bias)
    assert int(((got2[1] != check[1]).any(dim=1)).sum()) <= 1


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("name", GPU_MODELS)
def test_gpu_cuda_graph_replay(backend, name):
    _skip_unless_backend(backend)
    x, k, kw = _model_case(name, 32, torch.bfloat16, "cuda", seed=1)
    static_x = x.clone()

    def route():
        return moekern.fused_topk(static_x, k, backend=backend, **kw)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):  # warm up: compile the kernel outside capture
            route()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = route()
    for seed in (11, 12):
        new_x, _, _ = _model_case(name, 32, torch.bfloat16, "cuda", seed=seed)
        static_x.copy_(new_x)
        graph.replay()
        torch.cuda.synchronize()
        ref = fused_topk_reference(new_x, k, **kw)
        bad = _excluded_rows(new_x, k, kw)
        keep = ~bad
        assert int(bad.sum()) <= 1
        torch.testing.assert_close(static_out[1][keep], ref[1][keep], rtol=0, atol=0)
        torch.testing.assert_close(static_out[0][keep], ref[0][keep], rtol=W_RTOL, atol=W_ATOL)
        assert int(static_out[2].sum()) == 32 * k  # counts were re-zeroed inside the graph
        torch.testing.assert_close(static_out[2], torch.bincount(static_out[1].flatten().long(),
                                                                 minlength=x.shape[1]).to(torch.int32))
