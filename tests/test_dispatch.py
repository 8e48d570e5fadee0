"""moekern.align / permute / unpermute: worked examples, torch vs triton (vs cuda on a GPU), properties, bad inputs.

On a machine without a GPU the triton backend runs under TRITON_INTERPRET=1 (set by conftest.py) at tiny
shapes; the multi-program align path is reached there by calling triton_ops with a small chunk.
"""

from __future__ import annotations

import re

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import moekern
from moekern import _ext
from moekern.dispatch import AlignOutput, PermuteLayout, align, permute, unpermute
from moekern.dispatch import triton_ops
from moekern.dispatch.reference import align_reference, align_sizes, permute_reference, unpermute_reference

HAS_GPU = torch.cuda.is_available()
DEV = "cuda" if HAS_GPU else "cpu"
ACCEL = ["triton"]  # backends compared against "torch" on this machine (cuda added on a GPU when built)

SETTINGS = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def ids_tensor(rows, device=DEV):
    return torch.tensor(rows, dtype=torch.int32, device=device).reshape(len(rows), -1)


def assert_align_equal(a: AlignOutput, b: AlignOutput):
    for name, x, y in zip(AlignOutput._fields, a, b):
        assert x.dtype == y.dtype == torch.int32, name
        assert torch.equal(x.cpu(), y.cpu()), f"{name}:\n{x}\n{y}"


def assert_layout_equal(a: PermuteLayout, b: PermuteLayout):
    for name in ("sorted_slots", "slot_to_row", "expert_offsets"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype == torch.int32, name
        assert torch.equal(x.cpu(), y.cpu()), f"{name}:\n{x}\n{y}"
    assert (a.num_tokens, a.top_k) == (b.num_tokens, b.top_k)


def check_align_invariants(topk_ids: torch.Tensor, E: int, B: int, out: AlignOutput) -> None:
    """The align contract, checked from its definition (not by comparing with the reference)."""
    flat = topk_ids.reshape(-1).cpu().long()
    n = flat.numel()
    sorted_ids, block_ids, post = (t.cpu().long() for t in out)
    max_padded, max_blocks = align_sizes(n, E, B)
    assert sorted_ids.shape == (max_padded,) and block_ids.shape == (max_blocks,) and post.shape == (1,)
    counts = torch.bincount(flat, minlength=E)
    padded = (counts + B - 1) // B * B
    assert int(post) == int(padded.sum())
    real = sorted_ids[sorted_ids != n]
    # every (token, slot) appears exactly once; everything else is the sentinel
    assert torch.equal(torch.sort(real).values, torch.arange(n))
    assert bool((sorted_ids[int(post):] == n).all())
    used_blocks = int(post) // B
    assert bool((block_ids[used_blocks:] == -1).all())
    expected_blocks = torch.repeat_interleave(torch.arange(E), padded // B)
    assert torch.equal(block_ids[:used_blocks], expected_blocks)
    # each slot sits in a block of its expert; slots of one expert in increasing order, run at the block start
    start = 0
    for e in range(E):
        run = sorted_ids[start:start + int(padded[e])]
        c = int(counts[e])
        assert bool((flat[run[:c]] == e).all()) and bool((run[c:] == n).all())
        assert bool((run[:c].diff() > 0).all())
        start += int(padded[e])


# ----------------------------------------------------------------------------------------------- worked examples

def test_align_worked_example():
    # M=3, k=2 -> slots 0..5 with experts [2,0 | 1,2 | 0,2]; E=4, B=2, sentinel 6
    ids = ids_tensor([[2, 0], [1, 2], [0, 2]], "cpu")
    # expert 0: slots 1,4 (2, one block); expert 1: slot 2 (+1 pad); expert 2: slots 0,3,5 (+1 pad); expert 3: none
    want_sorted = [1, 4, 2, 6, 0, 3, 5, 6] + [6] * (6 + 4 * 1 - 8)
    want_blocks = [0, 1, 2, 2] + [-1]  # len ceil(10/2) = 5
    for backend in ["torch", *ACCEL]:
        out = align(ids.to(DEV), 4, 2, backend=backend)
        assert out.sorted_token_ids.cpu().tolist() == want_sorted, backend
        assert out.block_expert_ids.cpu().tolist() == want_blocks, backend
        assert out.num_tokens_post_padded.cpu().tolist() == [8], backend


def test_align_sizes_hold_min_slots_experts_runs():
    """len(sorted_token_ids) = n + min(n, E) * (B - 1): at most min(n, E) experts hold slots and each pads fewer
    than B. The expert GEMMs launch a program per block of it, so decode sizes get few (Qwen3 M=1: 8, not 121)."""
    assert align_sizes(8, 128, 16) == (128, 8)             # Qwen3-30B-A3B, M = 1
    assert align_sizes(8, 256, 16) == (128, 8)             # DeepSeek-V3, M = 1
    assert align_sizes(2048, 128, 16) == (2048 + 128 * 15, -(-(2048 + 128 * 15) // 16))  # n >= E: E runs pad
    assert align_sizes(2, 8, 64) == (2 + 2 * 63, 2)        # Mixtral, M = 1
    assert align_sizes(0, 64, 16) == (0, 0)
    assert align_sizes(37, 5, 1) == (37, 37)                # B = 1 (permute): no pads


@pytest.mark.parametrize("backend", ["torch", *ACCEL])
def test_align_fills_the_bound_when_every_slot_has_its_own_expert(backend):
    """The bound is tight: n < E slots on n different experts pad to n whole blocks, every entry of
    sorted_token_ids and every block used."""
    n, E, B = 6, 64, 8
    ids = torch.tensor([[3, 60, 0], [17, 5, 41]], dtype=torch.int32, device=DEV)
    out = align(ids, E, B, backend=backend)
    assert out.sorted_token_ids.numel() == n * B and int(out.num_tokens_post_padded) == n * B
    assert bool((out.block_expert_ids.cpu() >= 0).all()) and out.block_expert_ids.numel() == n
    check_align_invariants(ids, E, B, out)


def test_align_block_size_one_is_the_stable_sort():
    ids = ids_tensor([[1, 0], [1, 0], [0, 1]], "cpu")  # slots: 1,0,1,0,0,1
    for backend in ["torch", *ACCEL]:
        out = align(ids.to(DEV), 2, 1, backend=backend)
        assert out.sorted_token_ids.cpu().tolist() == [1, 3, 4, 0, 2, 5]
        assert out.block_expert_ids.cpu().tolist() == [0, 0, 0, 1, 1, 1]
        assert out.num_tokens_post_padded.cpu().tolist() == [6]


def test_permute_unpermute_worked_example():
    ids = ids_tensor([[2, 0], [1, 2], [0, 2]], "cpu")
    x = torch.tensor([[1.0, 10.0], [2.0, 20.0], [3.0, 30.0]])
    w = torch.tensor([[0.5, 0.25], [1.0, 2.0], [0.0, 1.0]])
    for backend in ["torch", *ACCEL]:
        permuted, layout = permute(x.to(DEV), ids.to(DEV), 3, backend=backend)
        assert layout.sorted_slots.cpu().tolist() == [1, 4, 2, 0, 3, 5]
        assert layout.slot_to_row.cpu().tolist() == [3, 0, 2, 4, 1, 5]
        assert layout.expert_offsets.cpu().tolist() == [0, 2, 3, 6]
        assert (layout.num_tokens, layout.top_k) == (3, 2)
        assert permuted.cpu().tolist() == [[1, 10], [3, 30], [2, 20], [1, 10], [2, 20], [3, 30]]
        # expert e's output: row * (e+1) so the combine is visibly weighted per expert
        scale = torch.tensor([1.0, 1.0, 2.0, 3.0, 3.0, 3.0], device=DEV).unsqueeze(1)
        out = unpermute(permuted * scale, layout, w.to(DEV), backend=backend)
        # token 0: 0.5*3*x0 + 0.25*1*x0 = 1.75 x0; token 1: 1*2*x1 + 2*3*x1 = 8 x1; token 2: 0*1*x2 + 1*3*x2 = 3 x2
        want = torch.tensor([[1.75, 17.5], [16.0, 160.0], [9.0, 90.0]])
        torch.testing.assert_close(out.cpu(), want, rtol=1e-6, atol=1e-6)


def test_references_ignore_the_default_device_and_dtype():
    """The references make every tensor on the inputs' device and accumulate in fp32 whatever torch's defaults
    are (a default device set to meta, as torch.device("meta") does for model init, and a float64 default).
    The expected values are the worked examples above."""
    ids = ids_tensor([[2, 0], [1, 2], [0, 2]], "cpu")
    x = torch.tensor([[1.0, 10.0], [2.0, 20.0], [3.0, 30.0]])
    # one token, k = 3: fp32 sums 1e8 + 1 -> 1e8 (fp32 spacing is 8 there), then - 1e8 -> 0; fp64 would give 1
    y = torch.tensor([[1e8], [1.0], [-1e8]])
    one_token = ids_tensor([[0, 1, 2]], "cpu")
    ones = torch.ones(1, 3)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        with torch.device("meta"):
            a = align_reference(ids, 4, 2)
            permuted, layout = permute_reference(x, ids, 3)
            _, one_layout = permute_reference(y, one_token, 3)
            out = unpermute_reference(y, one_layout, ones)
    finally:
        torch.set_default_dtype(default_dtype)
    for t in (*a, permuted, layout.sorted_slots, layout.slot_to_row, layout.expert_offsets, out):
        assert t.device.type == "cpu"
    assert a.sorted_token_ids.tolist() == [1, 4, 2, 6, 0, 3, 5, 6, 6, 6]
    assert a.block_expert_ids.tolist() == [0, 1, 2, 2, -1] and a.num_tokens_post_padded.tolist() == [8]
    assert layout.slot_to_row.tolist() == [3, 0, 2, 4, 1, 5] and layout.expert_offsets.tolist() == [0, 2, 3, 6]
    assert permuted.tolist() == [[1, 10], [3, 30], [2, 20], [1, 10], [2, 20], [3, 30]]
    assert out.dtype == torch.float32 and out.tolist() == [[0.0]]


def test_torch_unpermute_sums_in_fp32_and_rounds_once_to_the_output_dtype():
    # fp16 output, one token, k = 3: 1 + 2^-11 + 2^-11 = 1 + 2^-10 in fp32, exact in fp16; summed in fp16,
    # 1 + 2^-11 is a tie that rounds to even (1.0) twice, giving 1.0
    ids = ids_tensor([[0, 1, 2]], "cpu")
    y = torch.tensor([[1.0], [2.0 ** -11], [2.0 ** -11]], dtype=torch.float16)
    _, layout = permute_reference(y, ids, 3)
    w = torch.ones(1, 3)
    for got in (unpermute_reference(y, layout, w), unpermute(y, layout, w, backend="torch")):
        assert got.dtype == torch.float16 and got.tolist() == [[1.0 + 2.0 ** -10]]


def test_public_exports():
    assert moekern.align is align and moekern.permute is permute and moekern.unpermute is unpermute
    assert moekern.AlignOutput is AlignOutput and moekern.PermuteLayout is PermuteLayout


# ------------------------------------------------------------------------------------- torch vs triton, exact

SMALL_CASES = [  # (M, k, E, B)
    (0, 2, 4, 16), (1, 1, 1, 1), (1, 2, 8, 16), (7, 2, 8, 4), (13, 8, 60, 16), (16, 4, 64, 32),
    (9, 3, 5, 256), (40, 2, 3, 8),
]


def _random_ids(M, k, E, gen, distinct=True):
    if distinct and k <= E and M > 0:
        return torch.stack([torch.randperm(E, generator=gen)[:k] for _ in range(M)]).reshape(M, k).to(torch.int32)
    return torch.randint(0, E, (M, k), generator=gen, dtype=torch.int32)


@pytest.mark.parametrize("M,k,E,B", SMALL_CASES)
@pytest.mark.parametrize("backend", ACCEL)
def test_align_matches_torch(M, k, E, B, backend):
    gen = torch.Generator().manual_seed(M * 1000 + k * 100 + E)
    ids = _random_ids(M, k, E, gen).to(DEV)
    want = align(ids, E, B, backend="torch")
    got = align(ids, E, B, backend=backend)
    assert_align_equal(want, got)
    counts = torch.bincount(ids.reshape(-1).long(), minlength=E).to(torch.int32)
    assert_align_equal(want, align(ids, E, B, expert_counts=counts, backend=backend))
    check_align_invariants(ids, E, B, got)


# the three triton paths, forced at tiny sizes: one launch; chunks (hist + chunks); chunks with the scan launch
PATHS = {"single": dict(small_n=triton_ops.MAX_SMALL_N), "chunks": dict(small_n=0, chunk=16),
         "scan": dict(small_n=0, chunk=16, table_reads=0)}


@pytest.mark.parametrize("M,k,E,B", [(37, 3, 5, 4), (64, 2, 1, 16), (50, 4, 60, 8), (33, 8, 16, 1)])
@pytest.mark.parametrize("use_counts", [False, True])
def test_align_triton_multi_program_path(M, k, E, B, use_counts):
    """Every path at a chunk of 16, so that tiny inputs span chunks; align and permute."""
    gen = torch.Generator().manual_seed(7 + M + E)
    ids = _random_ids(M, k, E, gen, distinct=(M % 2 == 0)).to(DEV)
    counts = torch.bincount(ids.reshape(-1).long(), minlength=E).to(torch.int32) if use_counts else None
    want = align_reference(ids, E, B)
    for path, kw in PATHS.items() if counts is None else [("single", PATHS["single"])]:  # only it reads counts
        got = AlignOutput(*triton_ops.align_triton(ids, E, B, counts, **kw))
        assert_align_equal(want, got)
        permuted_want, layout_want = permute_reference(torch.zeros(M, 1, device=DEV), ids, E)
        _, sorted_slots, slot_to_row, offsets = triton_ops.permute_triton(
            torch.zeros(M, 1, device=DEV), ids, E, counts, **kw)
        assert_layout_equal(layout_want, PermuteLayout(sorted_slots, slot_to_row, offsets, M, k))


def test_align_api_multi_program_path():
    """More than SMALL_N slots through the public API with the default chunk."""
    gen = torch.Generator().manual_seed(3)
    M, k, E = triton_ops.SMALL_N // 4 + 5, 4, 12
    ids = _random_ids(M, k, E, gen).to(DEV)
    assert_align_equal(align(ids, E, 16, backend="torch"), align(ids, E, 16, backend="triton"))


@pytest.fixture
def poisoned_empty(monkeypatch):
    """torch.empty returns int32 buffers full of -7777: an output entry no kernel writes shows up as a mismatch."""
    real_empty = torch.empty

    def empty(*size, dtype=None, device=None, **kw):
        out = real_empty(*size, dtype=dtype, device=device, **kw)
        if out.dtype == torch.int32:
            out.fill_(-7777)
        return out
    monkeypatch.setattr(torch, "empty", empty)


def _boundary_ids(n, E, skew, seed):
    gen = torch.Generator().manual_seed(seed)
    if skew == "equal":
        return torch.full((n, 1), E - 1 - seed % E, dtype=torch.int32)
    return torch.randint(0, E, (n, 1), generator=gen, dtype=torch.int32)


def _check_triton_align(ids, E, B, counts_too=True, **kw):
    want = align_reference(ids, E, B)
    counts = torch.bincount(ids.reshape(-1).long(), minlength=E).to(torch.int32)
    for c in (None, counts) if counts_too else (None,):
        assert_align_equal(want, AlignOutput(*triton_ops.align_triton(ids.to(DEV), E, B, None if c is None else
                                                                      c.to(DEV), **kw)))


SINGLE = dict(small_n=triton_ops.MAX_SMALL_N)
# (slots, E, B, skew): 1; the minimum key vector (16); the default chunk C = MIN_CHUNK; the single-launch
# threshold SMALL_N; its cap MAX_SMALL_N = 16K; each at -1, 0, +1; every E in {1, 8, 60, 128, 256, 512}
C, S, X = triton_ops.MIN_CHUNK, triton_ops.SMALL_N, triton_ops.MAX_SMALL_N
BOUNDARY_CASES = [
    (1, 1, 16, "uniform"), (1, 512, 128, "uniform"), (15, 8, 4, "uniform"), (16, 60, 16, "equal"),
    (17, 256, 64, "uniform"), (C - 1, 128, 16, "uniform"), (C, 8, 64, "equal"), (C + 1, 512, 16, "uniform"),
    (S - 1, 60, 128, "uniform"), (S, 256, 16, "uniform"), (S + 1, 128, 64, "equal"), (S + 1, 1, 1, "uniform"),
    (X - 1, 256, 64, "uniform"), (X, 512, 128, "uniform"), (X, 8, 16, "equal"), (X + 1, 60, 16, "uniform"),
    (X + 1, 512, 64, "equal"),
]


@pytest.mark.parametrize("n,E,B,skew", BOUNDARY_CASES)
def test_align_triton_size_boundaries(n, E, B, skew, poisoned_empty):
    """Default path choice (with and without expert_counts where the path reads them), and above SMALL_N the
    single-launch path forced up to its 16K cap, its histogram (odd n) or expert_counts (even n) giving counts."""
    ids = _boundary_ids(n, E, skew, seed=n + E)
    _check_triton_align(ids, E, B, counts_too=n <= S)  # the chunked path never reads expert_counts
    if S < n <= X:
        want = align_reference(ids, E, B)
        counts = None if n % 2 else torch.bincount(ids.reshape(-1).long(), minlength=E).to(torch.int32).to(DEV)
        assert_align_equal(want, AlignOutput(*triton_ops.align_triton(ids.to(DEV), E, B, counts, **SINGLE)))


@pytest.mark.parametrize("E", [1, 8, 60, 128, 256, 512])
@pytest.mark.parametrize("n", [16, 17, 33])
@pytest.mark.parametrize("path", list(PATHS))
def test_align_triton_chunk_boundaries_every_E(n, E, path, poisoned_empty):
    """Chunks of 16 on the chunked paths: slots at C, C+1, 2C+1 (1 and C-1 are in BOUNDARY_CASES); all ids
    equal when n is odd."""
    ids = _boundary_ids(n, E, "equal" if n % 2 else "uniform", seed=3 * n + E)
    _check_triton_align(ids, E, 16 if E < 256 else 2, **PATHS[path])
    M = n
    _, l_want = permute_reference(torch.zeros(M, 1), ids, E)
    _, sorted_slots, slot_to_row, offsets = triton_ops.permute_triton(torch.zeros(M, 1, device=DEV), ids.to(DEV), E,
                                                                      None, **PATHS[path])
    assert_layout_equal(l_want, PermuteLayout(sorted_slots, slot_to_row, offsets, M, 1))


def test_align_triton_launch_counts(monkeypatch):
    """1 launch up to SMALL_N slots, 2 above (3 when the scan launch is forced), none of them a fill."""
    launched = []
    for name in ("_align_single_kernel", "_align_hist_kernel", "_align_scan_kernel", "_align_chunks_kernel"):
        kernel = getattr(triton_ops, name)

        class Spy:
            def __init__(self, name, kernel):
                self.name, self.kernel = name, kernel

            def __getitem__(self, grid):
                launched.append(self.name)
                return self.kernel[grid]
        monkeypatch.setattr(triton_ops, name, Spy(name, kernel))
    for n, kw, want in [(8, {}, ["_align_single_kernel"]), (40, dict(small_n=16, chunk=16),
                                                           ["_align_hist_kernel", "_align_chunks_kernel"]),
                        (40, PATHS["scan"], ["_align_hist_kernel", "_align_scan_kernel", "_align_chunks_kernel"])]:
        launched.clear()
        ids = torch.randint(0, 8, (n, 1), dtype=torch.int32, device=DEV)
        assert_align_equal(align_reference(ids, 8, 4), AlignOutput(*triton_ops.align_triton(ids, 8, 4, None, **kw)))
        assert launched == want


@pytest.mark.parametrize("M,k,E,H", [(0, 2, 4, 8), (1, 1, 1, 5), (5, 2, 8, 33), (12, 4, 60, 16), (9, 3, 3, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend", ACCEL)
def test_permute_unpermute_match_torch(M, k, E, H, dtype, backend):
    gen = torch.Generator().manual_seed(M + 31 * E + H)
    ids = _random_ids(M, k, E, gen).to(DEV)
    x = torch.randn(M, H, generator=gen).to(dtype).to(DEV)
    w = torch.rand(M, k, generator=gen).to(DEV)  # fp32 weights with low-precision activations, as in vLLM
    p_want, l_want = permute(x, ids, E, backend="torch")
    p_got, l_got = permute(x, ids, E, backend=backend)
    assert p_got.dtype == dtype and p_got.shape == (M * k, H)
    assert torch.equal(p_got.cpu(), p_want.cpu())  # copies are exact in every dtype
    assert_layout_equal(l_want, l_got)
    y = torch.randn(M * k, H, generator=gen).to(dtype).to(DEV)
    u_want = unpermute(y, l_want, w, backend="torch")
    u_got = unpermute(y, l_got, w, backend=backend)
    assert u_got.dtype == dtype and u_got.shape == (M, H)
    tol = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}[dtype]
    torch.testing.assert_close(u_got.float(), u_want.float(), rtol=tol, atol=tol)


@pytest.mark.parametrize("wdtype", [torch.float16, torch.bfloat16])
def test_unpermute_low_precision_weights(wdtype):
    gen = torch.Generator().manual_seed(5)
    ids = _random_ids(6, 2, 4, gen).to(DEV)
    y = torch.randn(12, 8, generator=gen).to(DEV)
    w = torch.rand(6, 2, generator=gen).to(wdtype).to(DEV)
    _, layout = permute(torch.zeros(6, 8, device=DEV), ids, 4, backend="torch")
    want = unpermute_reference(y, layout, w)
    for backend in ["torch", *ACCEL]:
        torch.testing.assert_close(unpermute(y, layout, w, backend=backend), want, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------- properties

@st.composite
def routed_ids(draw, max_m=24, max_e=64):
    M = draw(st.integers(0, max_m))
    E = draw(st.sampled_from([1, 2, 3, 5, 8, 16, 60, max_e]))
    k = draw(st.integers(1, min(4, E) if draw(st.booleans()) else 4))  # k > E allowed: repeated ids in a row
    skew = draw(st.sampled_from(["uniform", "one", "few", "last"]))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    if skew == "uniform":
        ids = torch.randint(0, E, (M, k), generator=gen)
    elif skew == "one":  # every slot to one expert, the others get nothing
        ids = torch.full((M, k), draw(st.integers(0, E - 1)))
    elif skew == "few":
        ids = torch.randint(0, min(E, 2), (M, k), generator=gen) * (E - 1)
    else:
        ids = torch.full((M, k), E - 1)
    return ids.to(torch.int32), E


@SETTINGS
@given(case=routed_ids(), log_b=st.integers(0, 8), backend=st.sampled_from(["torch", *ACCEL]),
       use_counts=st.booleans())
def test_align_properties(case, log_b, backend, use_counts):
    ids, E = case
    ids = ids.to(DEV)
    B = 1 << log_b
    counts = torch.bincount(ids.reshape(-1).long(), minlength=E).to(torch.int32) if use_counts else None
    out = align(ids, E, B, expert_counts=counts, backend=backend)
    check_align_invariants(ids, E, B, out)
    assert_align_equal(out, align_reference(ids, E, B))


@SETTINGS
@given(case=routed_ids(max_m=16), H=st.integers(1, 24), backend=st.sampled_from(["torch", *ACCEL]),
       use_counts=st.booleans())
def test_permute_then_unpermute_is_identity(case, H, backend, use_counts):
    ids, E = case
    ids = ids.to(DEV)
    M, k = ids.shape
    gen = torch.Generator().manual_seed(M * 7 + H)
    x = torch.randn(M, H, generator=gen).to(DEV)
    w = torch.rand(M, k, generator=gen) + 0.1
    w = (w / w.sum(dim=1, keepdim=True)).to(DEV)  # weights summing to 1
    counts = torch.bincount(ids.reshape(-1).long(), minlength=E).to(torch.int32) if use_counts else None
    permuted, layout = permute(x, ids, E, expert_counts=counts, backend=backend)
    flat = ids.reshape(-1).long().cpu()
    offsets = layout.expert_offsets.cpu()
    assert offsets[0] == 0 and offsets[-1] == M * k
    assert torch.equal(offsets.diff(), torch.bincount(flat, minlength=E).to(torch.int32))
    assert torch.equal(flat[layout.sorted_slots.cpu().long()], torch.sort(flat, stable=True).values)
    assert torch.equal(layout.slot_to_row.cpu()[layout.sorted_slots.cpu().long()], torch.arange(M * k, dtype=torch.int32))
    out = unpermute(permuted, layout, w, backend=backend)
    torch.testing.assert_close(out, x, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------- bad inputs

def _ids():
    return torch.zeros(4, 2, dtype=torch.int32)


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(topk_ids=torch.zeros(8, dtype=torch.int32)), ValueError, "topk_ids must be 2-D"),
    (dict(topk_ids=torch.zeros(4, 2, dtype=torch.int16)), TypeError, "topk_ids must be int32 or int64; got torch.int16"),
    (dict(topk_ids=torch.zeros(4, 2)), TypeError, "topk_ids must be int32 or int64; got torch.float32"),
    (dict(topk_ids=[[0, 1]]), TypeError, "topk_ids must be a torch.Tensor"),
    (dict(topk_ids=torch.zeros(4, 0, dtype=torch.int32)), ValueError, "k >= 1"),
    (dict(num_experts=0), ValueError, "num_experts=0 must be >= 1"),
    (dict(num_experts=4.0), TypeError, "num_experts must be an int"),
    (dict(block_size=12), ValueError, "block_size=12 must be a power of two"),
    (dict(block_size=0), ValueError, "block_size=0 must be >= 1"),
    (dict(expert_counts=torch.zeros(3, dtype=torch.int32)), ValueError, r"expert_counts must have shape \(4,\)"),
    (dict(expert_counts=torch.zeros(4, dtype=torch.int64)), TypeError, "expert_counts must be int32"),
    (dict(expert_counts=torch.tensor([7, 0, 0, 0], dtype=torch.int32)), ValueError, "expert_counts must equal"),
    (dict(topk_ids=torch.full((4, 2), 4, dtype=torch.int32)), ValueError, r"must lie in \[0, num_experts=4\)"),
    (dict(topk_ids=torch.full((4, 2), -1, dtype=torch.int32)), ValueError, r"got values in \[-1, -1\]"),
    (dict(backend="cutlass"), ValueError, "backend='cutlass' must be one of"),
])
def test_align_bad_inputs(kwargs, exc, match):
    args = dict(topk_ids=_ids(), num_experts=4, block_size=16, expert_counts=None, backend="torch")
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        align(args.pop("topk_ids"), args.pop("num_experts"), args.pop("block_size"), **args)


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(hidden_states=torch.zeros(3, 8)), ValueError, r"hidden_states must have 4 rows"),
    (dict(hidden_states=torch.zeros(4, 8, 2)), ValueError, "hidden_states must be 2-D"),
    (dict(hidden_states=torch.zeros(4, 8, dtype=torch.float64)), TypeError, "hidden_states must be float32, float16"),
    (dict(hidden_states=torch.zeros(4, 8, dtype=torch.int32)), TypeError, "got torch.int32"),
    (dict(topk_ids=torch.zeros(4, 2, dtype=torch.int16)), TypeError, "topk_ids must be int32 or int64; got torch.int16"),
    (dict(topk_ids=torch.full((4, 2), 9, dtype=torch.int32)), ValueError, r"got values in \[9, 9\]"),
    (dict(num_experts=-2), ValueError, "num_experts=-2"),
])
def test_permute_bad_inputs(kwargs, exc, match):
    args = dict(hidden_states=torch.zeros(4, 8), topk_ids=_ids(), num_experts=4)
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        permute(args["hidden_states"], args["topk_ids"], args["num_experts"], backend="torch")


def test_unpermute_bad_inputs():
    x = torch.zeros(4, 8)
    permuted, layout = permute(x, _ids(), 4, backend="torch")
    w = torch.ones(4, 2)
    with pytest.raises(ValueError, match=r"expert_output must have 8 rows"):
        unpermute(permuted[:7], layout, w, backend="torch")
    with pytest.raises(ValueError, match=r"topk_weights must have shape \(4, 2\)"):
        unpermute(permuted, layout, torch.ones(4, 3), backend="torch")
    with pytest.raises(TypeError, match="topk_weights must be float32"):
        unpermute(permuted, layout, torch.ones(4, 2, dtype=torch.int32), backend="torch")
    with pytest.raises(TypeError, match="expert_output must be float32"):
        unpermute(permuted.double(), layout, w, backend="torch")
    with pytest.raises(TypeError, match="layout must be the PermuteLayout"):
        unpermute(permuted, tuple(layout), w, backend="torch")
    with pytest.raises(ValueError, match="layout.slot_to_row must be"):
        unpermute(permuted, layout._replace(slot_to_row=layout.slot_to_row[:3]), w, backend="torch")


def _raises_exactly(exc, message):
    return pytest.raises(exc, match="^" + re.escape(message) + "$")


def test_error_messages_name_the_argument_and_what_was_expected():
    x = torch.zeros(4, 8)
    permuted, layout = permute(x, _ids(), 4, backend="torch")
    w = torch.ones(4, 2)
    with _raises_exactly(TypeError, "hidden_states must be a torch.Tensor [rows, H] fp32|fp16|bf16; got list"):
        permute([[0.0] * 8] * 4, _ids(), 4, backend="torch")
    with _raises_exactly(ValueError, "hidden_states must have 4 rows (topk_ids.shape[0]); got shape (3, 8)"):
        permute(torch.zeros(3, 8), _ids(), 4, backend="torch")
    with _raises_exactly(TypeError, "expert_output must be a torch.Tensor [rows, H] fp32|fp16|bf16; got list"):
        unpermute(permuted.tolist(), layout, w, backend="torch", skip_missing_rows=True)
    with _raises_exactly(ValueError, "expert_output must have 8 rows (num_tokens * top_k of layout); got shape (7, 8)"):
        unpermute(permuted[:7], layout, w, backend="torch")
    with _raises_exactly(TypeError, "topk_weights must be a torch.Tensor [4, 2] float; got list"):
        unpermute(permuted, layout, w.tolist(), backend="torch")
    with _raises_exactly(ValueError, "topk_weights is on meta but expert_output is on cpu; expected the same device"):
        unpermute(permuted, layout, w.to("meta"), backend="torch")
    with _raises_exactly(ValueError,
                         "layout.slot_to_row is on meta but expert_output is on cpu; expected the same device"):
        unpermute(permuted, layout._replace(slot_to_row=layout.slot_to_row.to("meta")), w, backend="torch")
    with _raises_exactly(TypeError, "layout.sorted_slots must be a torch.Tensor [8] int32; got list"):
        unpermute(permuted, layout._replace(sorted_slots=layout.sorted_slots.tolist()), w, backend="torch")
    with _raises_exactly(TypeError, "topk_ids must be a torch.Tensor [M, k] int32|int64; got list"):
        align(_ids().tolist(), 4, 16, backend="torch")
    with _raises_exactly(TypeError, "expert_counts must be a torch.Tensor [4] int32; got list"):
        align(_ids(), 4, 16, expert_counts=[8, 0, 0, 0], backend="torch")
    with _raises_exactly(ValueError, "expert_counts is on meta but topk_ids is on cpu; expected the same device"):
        align(_ids(), 4, 16, expert_counts=torch.zeros(4, dtype=torch.int32, device="meta"), backend="torch")
    with _raises_exactly(ValueError, "topk_ids is on meta but hidden_states is on cpu; expected the same device"):
        permute(x, _ids().to("meta"), 4, backend="torch")


def test_slot_count_limit():
    # fewer than 2**31 - E * 256 slots (int32 indices with room for the padding); expand() makes the ids without
    # memory, and a bad block_size (checked right after the ids) shows that the count itself passed
    E = 4
    limit = 2 ** 31 - E * 256
    with _raises_exactly(ValueError, f"topk_ids has {limit} slots; expected fewer than 2**31 (int32 indices)"):
        align(torch.zeros(1, 1, dtype=torch.int32).expand(limit, 1), E, 3, backend="torch")
    with pytest.raises(ValueError, match="block_size=3 must be a power of two"):
        align(torch.zeros(1, 1, dtype=torch.int32).expand(limit - 1, 1), E, 3, backend="torch")


def test_permute_checks_expert_counts_on_torch():
    x = torch.zeros(4, 8)
    with pytest.raises(ValueError, match=r"expert_counts must equal bincount\(topk_ids, minlength=4\)"):
        permute(x, _ids(), 4, expert_counts=torch.tensor([7, 1, 0, 0], dtype=torch.int32), backend="torch")
    with pytest.raises(ValueError, match=r"expert_counts must have shape \(4,\)"):
        permute(x, _ids(), 4, expert_counts=torch.zeros(3, dtype=torch.int32), backend="torch")


def test_default_backend_runs_cpu_tensors_on_torch():
    # backend defaults to "auto", the torch reference for CPU tensors: the worked examples above
    ids = ids_tensor([[2, 0], [1, 2], [0, 2]], "cpu")
    assert align(ids, 4, 2).block_expert_ids.tolist() == [0, 1, 2, 2, -1]
    permuted, layout = permute(torch.tensor([[1.0], [2.0], [3.0]]), ids, 3)
    assert permuted.tolist() == [[1], [3], [2], [1], [2], [3]] and layout.slot_to_row.tolist() == [3, 0, 2, 4, 1, 5]
    # rows 3 and 0 (token 0's slots) weigh 1 and 2, the other tokens 0
    w = torch.tensor([[1.0, 2.0], [0.0, 0.0], [0.0, 0.0]])
    assert unpermute(permuted, layout, w).tolist() == [[3.0], [0.0], [0.0]]


def test_exact_expert_counts_with_an_idle_last_expert_are_accepted():
    # the worked example's counts [2, 1, 3, 0]: bincount without minlength would stop at expert 2
    ids = ids_tensor([[2, 0], [1, 2], [0, 2]], "cpu")
    out = align(ids, 4, 2, expert_counts=torch.tensor([2, 1, 3, 0], dtype=torch.int32), backend="torch")
    assert out.sorted_token_ids.tolist()[:8] == [1, 4, 2, 6, 0, 3, 5, 6]


def _spy_on_expert_counts(monkeypatch, name: str) -> list:
    """Wrap triton_ops.NAME (whose last argument is expert_counts) so each call appends that argument to the
    returned list, then runs the kernel."""
    calls = []
    kernel = getattr(triton_ops, name)

    def spy(*args):
        calls.append(args[-1])
        return kernel(*args)

    monkeypatch.setattr(triton_ops, name, spy)
    return calls


def test_triton_align_runs_the_kernel_with_the_given_counts(monkeypatch):
    """backend="triton" launches the kernel for any slot (one included) and hands it expert_counts, so it skips
    its histogram; with no slot there is nothing to launch (the reference's fills)."""
    calls = _spy_on_expert_counts(monkeypatch, "align_triton")
    empty = align(torch.empty(0, 2, dtype=torch.int32, device=DEV), 4, 2, backend="triton")
    assert empty.num_tokens_post_padded.tolist() == [0] and calls == []
    assert align(ids_tensor([[3]]), 4, 2, backend="triton").sorted_token_ids.cpu().tolist()[:2] == [0, 1]
    assert calls == [None]
    counts = torch.tensor([2, 1, 3, 0], dtype=torch.int32, device=DEV)
    out = align(ids_tensor([[2, 0], [1, 2], [0, 2]]), 4, 2, expert_counts=counts, backend="triton")
    assert out.sorted_token_ids.cpu().tolist()[:8] == [1, 4, 2, 6, 0, 3, 5, 6]
    assert len(calls) == 2 and calls[1] is counts


def test_triton_permute_runs_the_kernel_with_the_given_counts(monkeypatch):
    """As for align: the kernel for any token (one included), handed expert_counts; nothing to launch for none."""
    calls = _spy_on_expert_counts(monkeypatch, "permute_triton")
    permuted, _ = permute(torch.zeros(0, 2, device=DEV), torch.empty(0, 2, dtype=torch.int32, device=DEV), 3,
                          backend="triton")
    assert permuted.shape == (0, 2) and calls == []
    permuted, layout = permute(torch.tensor([[5.0]], device=DEV), ids_tensor([[2, 0]]), 3, backend="triton")
    assert permuted.cpu().tolist() == [[5.0], [5.0]] and layout.sorted_slots.cpu().tolist() == [1, 0]
    assert calls == [None]
    counts = torch.tensor([1, 0, 1], dtype=torch.int32, device=DEV)
    permute(torch.tensor([[5.0]], device=DEV), ids_tensor([[2, 0]]), 3, expert_counts=counts, backend="triton")
    assert len(calls) == 2 and calls[1] is counts


def test_triton_takes_512_experts():
    # the kernels' largest E (513 is refused: test_too_many_experts_for_triton); slot i of token 0 -> expert 511 - i
    ids = ids_tensor([[511, 0]])
    out = align(ids, 512, 1, backend="triton")
    assert out.sorted_token_ids.cpu().tolist()[:2] == [1, 0] and out.num_tokens_post_padded.cpu().tolist() == [2]
    permuted, layout = permute(torch.tensor([[5.0]], device=DEV), ids, 512, backend="triton")
    assert layout.expert_offsets.cpu().tolist() == [0] + [1] * 511 + [2]


def test_bad_inputs_raise_before_any_kernel_on_triton(monkeypatch):
    """Validation runs before the backend is even imported: a failing launch would show up as another error."""
    def boom(*a, **k):
        raise AssertionError("a kernel ran")
    monkeypatch.setattr(triton_ops, "align_triton", boom)
    monkeypatch.setattr(triton_ops, "permute_triton", boom)
    ids = torch.full((4, 2), 5, dtype=torch.int32, device=DEV)
    with pytest.raises(ValueError, match="must lie in"):
        align(ids, 4, 16, backend="triton")
    with pytest.raises(ValueError, match="must lie in"):
        permute(torch.zeros(4, 8, device=DEV), ids, 4, backend="triton")
    with pytest.raises(ValueError, match="block_size=3"):
        align(ids, 8, 3, backend="triton")


def test_noncontiguous_inputs_are_made_contiguous():
    gen = torch.Generator().manual_seed(1)
    ids_t = _random_ids(2, 6, 6, gen).to(DEV).t()  # [6, 2], non-contiguous
    x = torch.randn(8, 6, generator=gen).to(DEV).t()  # [6, 8], non-contiguous
    assert not ids_t.is_contiguous() and not x.is_contiguous()
    for backend in ["torch", *ACCEL]:
        assert_align_equal(align(ids_t, 6, 4, backend=backend), align_reference(ids_t.contiguous(), 6, 4))
        p, layout = permute(x, ids_t, 6, backend=backend)
        p_want, l_want = permute_reference(x.contiguous(), ids_t.contiguous(), 6)
        assert torch.equal(p.cpu(), p_want.cpu())
        assert_layout_equal(layout, l_want)


@pytest.mark.parametrize("backend", ["torch", *ACCEL])
def test_unpermute_skips_rows_past_the_end(backend):
    """skip_missing_rows: only the first experts' rows were computed (as on an expert-parallel rank); the
    other slots add nothing. Expert e multiplies by (e + 1); small integers and quarter weights keep fp32 exact."""
    gen = torch.Generator().manual_seed(5)
    M, k, E, H = 11, 3, 6, 9
    ids = torch.stack([torch.randperm(E, generator=gen)[:k] for _ in range(M)]).to(torch.int32).to(DEV)
    x = torch.randint(-4, 5, (M, H), generator=gen).float().to(DEV)
    w = (torch.randint(1, 5, (M, k), generator=gen).float() / 4).to(DEV)
    permuted, layout = permute(x, ids, E, backend=backend)
    row_expert = torch.repeat_interleave(torch.arange(E, device=DEV), torch.diff(layout.expert_offsets).long())
    y = permuted * (row_expert + 1).unsqueeze(1).float()
    for e in range(E + 1):  # compute experts 0..e-1 only
        n = int(layout.expert_offsets[e])
        on = (ids < e).float() * w * (ids + 1).float()  # [M, k]: what each slot adds, per unit of x
        want = x * on.sum(1, keepdim=True)
        got = unpermute(y[:n], layout, w, backend=backend, skip_missing_rows=True)
        assert torch.equal(got.cpu(), want.cpu()), f"experts < {e}"
    with pytest.raises(ValueError, match=f"expert_output must have at most {M * k} rows"):
        unpermute(torch.zeros(M * k + 1, H, device=DEV), layout, w, backend=backend, skip_missing_rows=True)
    with pytest.raises(ValueError, match=f"expert_output must have {M * k} rows"):
        unpermute(y[:5], layout, w, backend=backend)


@pytest.mark.parametrize("use_counts", [False, True])
@pytest.mark.parametrize("backend", ["torch", *ACCEL])
def test_int64_ids_give_the_int32_results(backend, use_counts):
    """torch.topk returns int64 ids: align and permute take them and answer as the reference does for the
    same ids in int32."""
    gen = torch.Generator().manual_seed(3)
    M, k, E, H = 9, 3, 7, 5
    ids64 = torch.topk(torch.randn(M, E, generator=gen), k, dim=1).indices.to(DEV)
    assert ids64.dtype == torch.int64
    ids32 = ids64.to(torch.int32)
    counts = torch.bincount(ids64.reshape(-1), minlength=E).to(torch.int32) if use_counts else None
    assert_align_equal(align(ids64, E, 4, expert_counts=counts, backend=backend), align_reference(ids32, E, 4))
    x = torch.randn(M, H, generator=gen).to(DEV)
    p, layout = permute(x, ids64, E, expert_counts=counts, backend=backend)
    p_want, l_want = permute_reference(x, ids32, E)
    assert torch.equal(p.cpu(), p_want.cpu())
    assert_layout_equal(layout, l_want)
    w = torch.rand(M, k, generator=gen).to(DEV)
    torch.testing.assert_close(unpermute(p, layout, w, backend=backend), unpermute_reference(p_want, l_want, w))


@pytest.mark.parametrize("backend", ["torch", *ACCEL])
def test_int64_ids_are_range_checked_before_the_int32_conversion(backend):
    ids = torch.tensor([[0, 2**32 + 1]], dtype=torch.int64, device=DEV)  # as int32 it would be 1, in range
    with pytest.raises(ValueError, match=r"got values in \[0, 4294967297\]"):
        align(ids, 4, 4, backend=backend)
    with pytest.raises(ValueError, match=r"got values in \[0, 4294967297\]"):
        permute(torch.zeros(1, 8, device=DEV), ids, 4, backend=backend)


def test_triton_ids_check_can_be_skipped():
    ids = torch.tensor([[0, 3]], dtype=torch.int32, device=DEV)
    out = align(ids, 4, 4, backend="triton", check_ids=False)
    assert_align_equal(out, align_reference(ids, 4, 4))


def test_too_many_experts_for_triton():
    with pytest.raises(ValueError, match="num_experts <= 512"):
        align(torch.zeros(1, 1, dtype=torch.int32, device=DEV), 513, 16, backend="triton")
    out = align(torch.zeros(1, 1, dtype=torch.int32), 513, 16, backend="auto")  # auto falls back to torch on CPU
    assert out.sorted_token_ids.shape == (1 + 1 * 15,)  # one slot: one expert pads, not 513


@pytest.mark.skipif(HAS_GPU, reason="CPU-only check")
def test_cpu_auto_is_torch_and_cuda_unavailable():
    with pytest.raises(RuntimeError, match="backend='cuda' is unavailable"):
        align(_ids(), 4, 16, backend="cuda")


# ------------------------------------------------------------------------------------------------------ GPU

MODEL_SHAPES = {  # name: (E, k, H)
    "mixtral": (8, 2, 4096),
    "qwen3-30b-a3b": (128, 8, 2048),
    "deepseek-v3": (256, 8, 7168),
    "olmoe": (64, 8, 2048),
}


def _gpu_backends():
    return ["triton", "cuda"] if _ext.cuda_kernels_available() else ["triton"]


@pytest.mark.gpu
@pytest.mark.parametrize("model", list(MODEL_SHAPES))
@pytest.mark.parametrize("M", [1, 64, 4096])
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_model_shapes_agree(model, M, backend):
    if backend == "cuda" and not _ext.cuda_kernels_available():
        pytest.skip(f"cuda backend unavailable: {_ext.extension_error() or 'built without device kernels'}")
    E, k, H = MODEL_SHAPES[model]
    gen = torch.Generator(device="cuda").manual_seed(M + E)
    logits = torch.randn(M, E, device="cuda", generator=gen)
    ids = torch.topk(logits, k, dim=1).indices.to(torch.int32)
    counts = torch.bincount(ids.reshape(-1).long(), minlength=E).to(torch.int32)
    x = torch.randn(M, H, device="cuda", generator=gen).to(torch.bfloat16)
    w = torch.softmax(torch.randn(M, k, device="cuda", generator=gen), dim=1)
    for B in (16, 64, 128):
        want = align(ids, E, B, backend="torch")
        assert_align_equal(want, align(ids, E, B, backend=backend))
        assert_align_equal(want, align(ids, E, B, expert_counts=counts, backend=backend, check_ids=False))
    p_want, l_want = permute(x, ids, E, backend="torch")
    p_got, l_got = permute(x, ids, E, expert_counts=counts, backend=backend)
    assert torch.equal(p_got, p_want)
    assert_layout_equal(l_want, l_got)
    y = torch.randn(M * k, H, device="cuda", generator=gen).to(torch.bfloat16)
    torch.testing.assert_close(unpermute(y, l_got, w, backend=backend), unpermute(y, l_want, w, backend="torch"),
                               rtol=1e-2, atol=1e-2)


@pytest.mark.gpu
def test_gpu_beyond_the_kernel_limits():
    # auto on a GPU falls back to the torch reference past E = 512; naming a kernel backend there is refused,
    # the compiled one included (on CPU, backend="cuda" is refused earlier as unavailable)
    ids = torch.tensor([[512, 0]], dtype=torch.int32, device="cuda")
    out = align(ids, 513, 1)
    assert out.sorted_token_ids.cpu().tolist()[:2] == [1, 0]
    permuted, layout = permute(torch.tensor([[5.0]], device="cuda"), ids, 513)
    assert layout.sorted_slots.cpu().tolist() == [1, 0]
    for backend in _gpu_backends():
        with pytest.raises(ValueError, match=f"backend='{backend}' covers num_experts <= 512"):
            align(ids, 513, 1, backend=backend)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("M,k,E,skew", [(131072, 8, 512, "uniform"), (131072, 8, 256, "one"), (65536, 8, 60, "zipf"),
                                        (262144, 4, 8, "uniform")])
def test_gpu_large_align(backend, M, k, E, skew):
    """~1M slots, E up to 512, skewed loads: exact against the reference."""
    if backend == "cuda" and not _ext.cuda_kernels_available():
        pytest.skip(f"cuda backend unavailable: {_ext.extension_error() or 'built without device kernels'}")
    gen = torch.Generator(device="cuda").manual_seed(M + E)
    if skew == "one":
        ids = torch.full((M, k), E // 3, device="cuda", dtype=torch.int32)
    elif skew == "zipf":
        p = 1.0 / torch.arange(1, E + 1, device="cuda", dtype=torch.float32) ** 1.2
        ids = torch.multinomial(p.expand(M, E), k, replacement=False, generator=gen).to(torch.int32)
    else:
        ids = torch.randint(0, E, (M, k), device="cuda", generator=gen, dtype=torch.int32)
    for B in (1, 16, 256):
        out = align(ids, E, B, backend=backend)
        assert_align_equal(align_reference(ids, E, B), out)


@pytest.mark.gpu
def test_gpu_triton_cuda_graph_capture():
    """With check_ids=False the triton path has no host sync: it captures and replays in a CUDA graph."""
    E, k, H, M, B = 64, 8, 256, 96, 16
    ids = torch.randint(0, E, (M, k), device="cuda", dtype=torch.int32)
    x = torch.randn(M, H, device="cuda", dtype=torch.bfloat16)
    w = torch.rand(M, k, device="cuda")
    for _ in range(2):  # compile outside the capture
        align(ids, E, B, backend="triton", check_ids=False)
        p, layout = permute(x, ids, E, backend="triton", check_ids=False)
        unpermute(p, layout, w, backend="triton")
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        a = align(ids, E, B, backend="triton", check_ids=False)
        p, layout = permute(x, ids, E, backend="triton", check_ids=False)
        out = unpermute(p, layout, w, backend="triton")
    ids.copy_(torch.randint(0, E, (M, k), device="cuda", dtype=torch.int32))
    x.copy_(torch.randn(M, H, device="cuda", dtype=torch.bfloat16))
    graph.replay()
    torch.cuda.synchronize()
    assert_align_equal(align_reference(ids, E, B), a)
    p_want, l_want = permute_reference(x, ids, E)
    assert torch.equal(p, p_want)
    assert_layout_equal(l_want, layout)
    torch.testing.assert_close(out, unpermute_reference(p_want, l_want, w), rtol=1e-2, atol=1e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("n", sorted({1, C - 1, C, C + 1, S - 1, S, S + 1, X - 1, X, X + 1, 32768}))
@pytest.mark.parametrize("E", [1, 8, 60, 128, 256, 512])
def test_gpu_triton_align_size_boundaries(n, E):
    """Every slot-count boundary x every E x B in {1, 16, 64, 128}, uniform and all-equal ids, with and without
    expert_counts; the single-launch path also forced up to its 16K cap."""
    for skew in ("uniform", "equal"):
        ids = _boundary_ids(n, E, skew, seed=n + E).cuda()
        for B in (1, 16, 64, 128):
            _check_triton_align(ids, E, B)
            if S < n <= X:
                _check_triton_align(ids, E, B, **SINGLE)


@pytest.mark.gpu
@pytest.mark.parametrize("M,k,E", [(1, 8, 256), (64, 8, 256), (4096, 8, 256), (4096, 2, 8), (2048, 8, 128)])
def test_gpu_triton_align_graph_replay_every_path(M, k, E):
    """Captured once, replayed on new ids: exact (nothing depends on the ids seen at capture)."""
    B = 64
    ids = torch.randint(0, E, (M, k), device="cuda", dtype=torch.int32)
    for _ in range(2):
        align(ids, E, B, backend="triton", check_ids=False)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = align(ids, E, B, backend="triton", check_ids=False)
    for skew in ("uniform", "equal"):
        new = torch.randint(0, E, (M, k), device="cuda", dtype=torch.int32) if skew == "uniform" else \
            torch.full((M, k), E // 2, device="cuda", dtype=torch.int32)
        ids.copy_(new)
        graph.replay()
        torch.cuda.synchronize()
        assert_align_equal(align_reference(ids, E, B), out)
