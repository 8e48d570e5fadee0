"""moekern.ep: expert-parallel dispatch/combine against the gather-everything reference (moekern.ep.reference).

- portable path: W = 2, 4, 8 gloo processes on CPU, spawned once per W; each worker runs every case
  (hypothesis-drawn routing plus fixed edge cases) and the bad-input cases, then a good case again to show
  the group is still in step after the errors.
- peer path: the Triton write/reduce/pull kernels with W emulated ranks in one process (CPU under
  TRITON_INTERPRET=1 at tiny shapes; the same checks at larger shapes on one GPU, marked gpu).
Exactness: hidden states are small integers and weights multiples of 1/4, and expert e multiplies by
(e + 1), so fp32 sums are exact and outputs must match bit for bit (bf16 as well: the reference states the
rounding points of combine and the values stay representable).
"""

from __future__ import annotations

import datetime
import os
import socket

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import moekern
from moekern.ep.reference import RecvReference, apply_experts, combine_reference, dispatch_reference, payload_reference

SKEWS = ("uniform", "zipf", "one_rank", "empty_rank")


def expert_fn(x, e):
    return x * (e + 1)


def make_inputs(seed, W, E, k, H, Ms, skew, dtype=torch.float32):
    """Deterministic inputs for every rank (each worker rebuilds all of them and keeps its own)."""
    g = torch.Generator().manual_seed(seed)
    El = E // W
    xs, ids, ws = [], [], []
    for M in Ms:
        x = torch.randint(-4, 5, (M, H), generator=g).to(dtype)
        if skew == "uniform":
            p = torch.ones(E)
        elif skew == "zipf":
            p = 1.0 / torch.arange(1, E + 1, dtype=torch.float64) ** 1.2
        elif skew == "one_rank":  # everything on rank 0 when k fits there, else spill to the next experts
            p = torch.zeros(E)
            p[: max(El, k)] = 1.0
        else:  # "empty_rank": the last rank owns no chosen expert
            p = torch.ones(E)
            p[E - El:] = 0.0
            if int((p > 0).sum()) < k:
                p[:] = 1.0
        rows = [torch.multinomial(p.float(), k, replacement=False, generator=g) for _ in range(M)]
        ids.append(torch.stack(rows).to(torch.int32) if M else torch.empty(0, k, dtype=torch.int32))
        ws.append(torch.randint(1, 5, (M, k), generator=g).float() / 4)
        xs.append(x)
    return xs, ids, ws


def global_ids(out, rank, E, W):
    El = E // W
    return torch.repeat_interleave(torch.arange(El, device=out.expert_counts.device), out.expert_counts.long()) + rank * El


def check_recv(out, ref, tag=""):
    for name in ("recv_x", "recv_topk_ids", "recv_topk_weights", "recv_src_rank", "recv_src_token"):
        got, want = getattr(out, name).cpu(), getattr(ref, name)
        assert got.dtype == want.dtype and torch.equal(got, want), f"{tag}: {name} differs\n{got}\n{want}"
    El = out.expert_offsets.numel() - 1
    k = out.recv_topk_ids.shape[1]
    # expert_x: each row is a received token whose local id is its expert, experts ascending, tokens ascending
    ids = out.recv_topk_ids.cpu().long()
    slots = torch.nonzero(ids >= 0)
    order = torch.argsort(ids[slots[:, 0], slots[:, 1]] * max(1, ids.shape[0] * k) + slots[:, 0] * k + slots[:, 1])
    want_x = out.recv_x.cpu()[slots[order, 0]]
    assert torch.equal(out.expert_x.cpu(), want_x), f"{tag}: expert_x differs"
    assert torch.equal(out.expert_counts.cpu().long(), torch.bincount(ids[ids >= 0], minlength=El)), tag


def token_partial(out, rank, E, W):
    """[R, H]: what fused_moe(recv_x, ..., recv_topk_weights, recv_topk_ids) would give, in fp32 then dtype."""
    x = out.recv_x.cpu()
    R, k = out.recv_topk_ids.shape
    acc = torch.zeros(R, x.shape[1])
    for j in range(k):
        lid = out.recv_topk_ids[:, j].cpu().long()
        on = lid >= 0
        if on.any():
            y = apply_experts(x[on], lid[on] + rank * (E // W), expert_fn)
            acc[on] += y.float() * out.recv_topk_weights[on, j].cpu().unsqueeze(1)
    return acc.to(x.dtype)


# ------------------------------------------------------------------------------ gloo multi-process path

CASE = st.fixed_dictionaries({
    "seed": st.integers(0, 2**20),
    "skew": st.sampled_from(SKEWS),
    "E_per_rank": st.sampled_from([1, 2, 3]),
    "k": st.integers(1, 4),
    "H": st.sampled_from([1, 8, 33]),
    "Ms": st.lists(st.integers(0, 9), min_size=8, max_size=8),
    "fp8": st.booleans(),
    "bf16": st.booleans(),
})


def _run_case(rank, W, c, group):
    E = c["E_per_rank"] * W
    k = min(c["k"], E)
    dtype = torch.bfloat16 if c["bf16"] else torch.float32
    xs, ids, ws = make_inputs(c["seed"], W, E, k, c["H"], c["Ms"][:W], c["skew"], dtype)
    out, handle = moekern.ep.dispatch(xs[rank], ids[rank], ws[rank], E, group=group, backend="nccl", fp8=c["fp8"])
    tag = f"rank {rank} case {c}"
    check_recv(out, dispatch_reference(xs, ids, ws, E, fp8=c["fp8"], ranks=[rank])[rank], tag)
    want = combine_reference(xs, ids, ws, E, expert_fn, fp8=c["fp8"], ranks=[rank])[rank]
    y = apply_experts(out.expert_x, global_ids(out, rank, E, W), expert_fn)
    got = moekern.ep.combine(y, handle)
    assert torch.equal(got, want), f"{tag}: combine(layout='expert') differs"
    got = moekern.ep.combine(token_partial(out, rank, E, W), handle, layout="token")
    assert torch.equal(got, want), f"{tag}: combine(layout='token') differs"


def _bad_cases(rank, W, group):
    x = torch.ones(3, 4)
    ids = torch.zeros(3, 2, dtype=torch.int32)
    ids[:, 1] = 1
    w = torch.ones(3, 2)
    E = 2 * W
    with pytest.raises(ValueError, match="divisible"):
        moekern.ep.dispatch(x, ids, w, E + 1, group=group)
    with pytest.raises(ValueError, match="topk_weights"):
        moekern.ep.dispatch(x, ids, w[:2], E, group=group)
    with pytest.raises(TypeError, match="topk_ids must be int32"):
        moekern.ep.dispatch(x, ids.float(), w, E, group=group)
    with pytest.raises(TypeError, match="hidden_states"):
        moekern.ep.dispatch(x.to(torch.int32), ids, w, E, group=group)
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        moekern.ep.dispatch(x, ids, w, E, group=group, backend="peer", world=object())
    with pytest.raises(ValueError, match="NCCL process group"):  # a gloo group with CUDA tensors
        moekern.ep.api._check_backend("peer", group, torch.device("cuda"), object())
    # only rank 1 has a bad id: every rank must raise (no rank left blocked in a collective)
    bad = ids.clone()
    if rank == 1:
        bad[0, 0] = E
    with pytest.raises(ValueError, match=r"rank\(s\) \[1\]"):
        moekern.ep.dispatch(x, bad, w, E, group=group)
    # ranks disagreeing on H
    with pytest.raises(ValueError, match="disagree on H"):
        moekern.ep.dispatch(torch.ones(3, 4 + (rank == 0)), ids, w, E, group=group)
    out, handle = moekern.ep.dispatch(x, ids, w, E, group=group)
    with pytest.raises(ValueError, match="expert_output must be"):
        moekern.ep.combine(torch.zeros(out.expert_x.shape[0] + 1, 4), handle)
    with pytest.raises(TypeError, match="expert_output must be torch.float32"):
        moekern.ep.combine(out.expert_x.double(), handle)
    with pytest.raises(ValueError, match="layout"):
        moekern.ep.combine(out.expert_x, handle, layout="rows")
    moekern.ep.combine(out.expert_x, handle)  # the group is still usable


def _worker(rank, port, cases_by_w):
    """One of 8 gloo processes. Phases W = 8 (the default group), 4 and 2 (subgroups of the lowest ranks), in
    that order, so a rank that sits out a phase never waits on one still running an earlier phase."""
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=8, timeout=datetime.timedelta(seconds=60))
    try:
        groups = {8: None, 4: dist.new_group(list(range(4))), 2: dist.new_group([0, 1])}
        for W in (8, 4, 2):
            if rank >= W:
                continue
            cases = cases_by_w[W]
            for c in cases:
                _run_case(rank, W, c, groups[W])
            _bad_cases(rank, W, groups[W])
            _run_case(rank, W, cases[0], groups[W])  # still in step after the errors
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _edge_cases():
    zero_some = [0 if r % 2 else 5 for r in range(8)]
    return [
        dict(seed=1, skew="one_rank", E_per_rank=2, k=2, H=8, Ms=[4] * 8, fp8=False, bf16=False),
        dict(seed=2, skew="empty_rank", E_per_rank=2, k=3, H=8, Ms=zero_some, fp8=False, bf16=True),
        dict(seed=3, skew="uniform", E_per_rank=1, k=1, H=8, Ms=[0] * 8, fp8=False, bf16=False),
        dict(seed=4, skew="zipf", E_per_rank=3, k=4, H=16, Ms=[6, 1, 0, 7, 2, 0, 3, 5], fp8=True, bf16=True),
    ]


def _gloo_cases(W, n, rng):
    """n real cases for W ranks from a seeded generator: every rank sends tokens (M >= 1), H > 1, k > 1, and
    each case runs bf16, fp8 or both (fp32 without fp8 is the first edge case), skews and sizes mixed.

    Not hypothesis: one spawn of 8 gloo processes costs ~90 s on 2 cores, so this test can afford one example,
    and hypothesis's first example is always the minimal one (every rank empty, H = 1, k = 1, fp32). The
    in-process tests (test_nccl_path_single_rank, the peer tests) explore with hypothesis instead."""
    dtypes = [(False, True), (True, False), (True, True)]  # (fp8, bf16)
    cases = []
    for j in range(n):
        fp8, bf16 = dtypes[(j + W) % len(dtypes)]
        cases.append(dict(seed=rng.randrange(2**20), skew=SKEWS[(j + W) % len(SKEWS)],
                          E_per_rank=rng.choice([1, 2, 3]), k=rng.randint(2, 4), H=rng.choice([8, 33]),
                          Ms=[rng.randint(1, 9) for _ in range(8)], fp8=fp8, bf16=bf16))
    return cases


def test_nccl_path_gloo():
    """W = 2, 4, 8 gloo ranks on CPU, one spawn of 8 processes (process start-up dominates on 2 cores)."""
    import random

    import torch.multiprocessing as mp

    rng = random.Random(32)
    cases_by_w = {W: _gloo_cases(W, 4, rng) + _edge_cases() for W in (2, 4, 8)}
    mp.spawn(_worker, args=(_free_port(), cases_by_w), nprocs=8, join=True)


# ------------------------------------------------------------------------------- in-process checks


@settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))
@given(c=CASE)
def test_nccl_path_single_rank(c):
    """W = 1 without torch.distributed: dispatch is a local permute, combine the weighted sum."""
    _run_case(0, 1, c, None)


def assert_combined(got, want, fp8, tag):
    """Exact, except after an fp8 round trip: its values are no longer short dyadics, so the kernel's fused
    fp32 multiply-add (one rounding instead of two) and, under TRITON_INTERPRET=1, the interpreter's
    truncating fp32->bf16 cast can move each rank's partial, and so the sum, by an ulp: 2 bf16 ulps allowed."""
    if fp8:
        torch.testing.assert_close(got, want, rtol=2**-6, atol=1e-6, msg=lambda m: f"{tag}\n{m}")
    else:
        assert torch.equal(got, want), tag


def case_inputs(W, c, device):
    """A hypothesis/fixed case's sizes and per-rank inputs, plus `seen`: what receivers must see, x after the fp8
    round trip done on the device the kernels use (CPU and GPU division may round a scale differently)."""
    E = c["E_per_rank"] * W
    k = min(c["k"], E)
    dtype = torch.bfloat16 if c["bf16"] else torch.float32
    Ms = c["Ms"][:W]
    xs, ids, ws = make_inputs(c["seed"], W, E, k, c["H"], Ms, c["skew"], dtype)
    seen = [payload_reference(x.to(device), c["fp8"]).cpu() for x in xs]
    return E, k, dtype, Ms, xs, ids, ws, seen


def _run_emulated(W, c, device, block_world=None):
    E, k, dtype, Ms, xs, ids, ws, seen = case_inputs(W, c, device)
    world = moekern.ep.PeerWorld.emulated(W, max(Ms + [1]), c["H"], k, dtype=dtype, device=device)
    res = moekern.ep.dispatch_emulated(
        world, [x.to(device) for x in xs], [i.to(device) for i in ids], [w.to(device) for w in ws], E, fp8=c["fp8"])
    refs = dispatch_reference(seen, ids, ws, E)
    for d, ((out, _), ref) in enumerate(zip(res, refs)):
        check_recv(out, ref, f"emulated rank {d} case {c}")
    want = combine_reference(seen, ids, ws, E, expert_fn)
    ys = [apply_experts(out.expert_x, global_ids(out, d, E, W), expert_fn) for d, (out, _) in enumerate(res)]
    got = moekern.ep.combine_emulated(ys, [h for _, h in res])
    for d in range(W):
        assert_combined(got[d].cpu(), want[d], c["fp8"], f"emulated combine(expert) rank {d} case {c}")
    parts = [token_partial(out, d, E, W).to(device) for d, (out, _) in enumerate(res)]
    got = moekern.ep.combine_emulated(parts, [h for _, h in res], layout="token")
    for d in range(W):
        assert_combined(got[d].cpu(), want[d], c["fp8"], f"emulated combine(token) rank {d} case {c}")


@settings(max_examples=6, deadline=None, suppress_health_check=list(HealthCheck))
@given(c=CASE, W=st.sampled_from([2, 4]))
def test_peer_emulated_interpreter(c, W, device):
    """The peer kernels (Triton; interpreter on CPU) with W ranks sharing one device."""
    _run_emulated(W, {**c, "H": min(c["H"], 8), "Ms": [min(m, 4) for m in c["Ms"]]}, device)


@pytest.mark.parametrize("case", _edge_cases(), ids=lambda c: c["skew"])
def test_peer_emulated_edges(case, device):
    _run_emulated(4, {**case, "H": 8}, device)


def test_peer_emulated_bad_inputs(device):
    W, E, k, H = 2, 4, 2, 8
    xs, ids, ws = make_inputs(0, W, E, k, H, [3, 2], "uniform")
    xs, ids, ws = ([t.to(device) for t in v] for v in (xs, ids, ws))
    world = moekern.ep.PeerWorld.emulated(W, 3, H, k, dtype=torch.float32, device=device)
    with pytest.raises(ValueError, match="divisible"):
        moekern.ep.dispatch_emulated(world, xs, ids, ws, 5)
    with pytest.raises(ValueError, match="list of W=2"):
        moekern.ep.dispatch_emulated(world, xs[:1], ids, ws, E)
    bad = [ids[0].clone(), ids[1]]
    bad[0][0, 0] = -1
    with pytest.raises(ValueError, match=r"rank\(s\) \[0\]"):
        moekern.ep.dispatch_emulated(world, xs, bad, ws, E)
    small = moekern.ep.PeerWorld.emulated(W, 3, H, k, dtype=torch.float32, device=device, capacity=1)
    with pytest.raises(ValueError, match="capacity"):
        moekern.ep.dispatch_emulated(small, xs, ids, ws, E)
    other = moekern.ep.PeerWorld.emulated(W, 3, H + 1, k, dtype=torch.float32, device=device)
    with pytest.raises(ValueError, match="built for H"):
        moekern.ep.dispatch_emulated(other, xs, ids, ws, E)
    res = moekern.ep.dispatch_emulated(world, xs, ids, ws, E)
    with pytest.raises(ValueError, match="one per handle"):
        moekern.ep.combine_emulated([res[0][0].expert_x], [h for _, h in res])
    with pytest.raises(ValueError, match="backend="):
        moekern.ep.dispatch(xs[0], ids[0], ws[0], E, backend="mpi")
    with pytest.raises(ValueError, match="needs world="):
        moekern.ep.dispatch(xs[0], ids[0], ws[0], E, backend="peer")


@pytest.mark.gpu
@pytest.mark.parametrize("skew", SKEWS)
@pytest.mark.parametrize("fp8", [False, True])
def test_peer_emulated_gpu(skew, fp8):
    """W = 8 emulated ranks on one GPU at realistic widths, bf16, exact against the reference."""
    c = dict(seed=7, skew=skew, E_per_rank=8, k=8, H=7168, Ms=[128, 0, 37, 128, 1, 64, 0, 100], fp8=fp8, bf16=True)
    _run_emulated(8, c, "cuda")


@pytest.mark.gpu
@settings(max_examples=10, deadline=None, suppress_health_check=list(HealthCheck))
@given(c=CASE)
def test_peer_emulated_gpu_hypothesis(c):
    _run_emulated(8, c, "cuda")


@pytest.mark.gpu
def test_nccl_path_single_rank_gpu():
    c = dict(seed=5, skew="zipf", E_per_rank=16, k=8, H=4096, Ms=[300], fp8=False, bf16=True)
    E = 16
    xs, ids, ws = make_inputs(c["seed"], 1, E, 8, c["H"], c["Ms"], c["skew"], torch.bfloat16)
    out, handle = moekern.ep.dispatch(xs[0].cuda(), ids[0].cuda(), ws[0].cuda(), E)
    check_recv(out, dispatch_reference(xs, ids, ws, E)[0], "gpu W=1")
    y = apply_experts(out.expert_x, global_ids(out, 0, E, 1), expert_fn)
    assert torch.equal(moekern.ep.combine(y, handle).cpu(), combine_reference(xs, ids, ws, E, expert_fn)[0])


# ------------------------------------------------------------------------------ the reference, by hand


def test_dispatch_reference_worked_example_and_ranks():
    # W = 2, E = 4: rank 0 owns experts 0, 1, rank 1 owns 2, 3 (local ids 0, 1)
    xs = [torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.tensor([[5.0, 6.0]])]
    ids = [torch.tensor([[0, 2], [1, 0]], dtype=torch.int32), torch.tensor([[3, 2]], dtype=torch.int32)]
    ws = [torch.tensor([[0.5, 0.25], [1.0, 2.0]]), torch.tensor([[0.75, 1.5]])]
    # rank 0 receives rank 0's tokens 0 (expert 0) and 1 (experts 1, 0); rank 1's token has nothing there
    want0 = ([[1, 2], [3, 4]], [[0, -1], [1, 0]], [[0.5, 0.0], [1.0, 2.0]], [0, 0], [0, 1])
    # rank 1 receives rank 0's token 0 (expert 2 -> local 0) and rank 1's token 0 (experts 3, 2 -> 1, 0)
    want1 = ([[1, 2], [5, 6]], [[-1, 0], [1, 0]], [[0.0, 0.25], [0.75, 1.5]], [0, 1], [0, 0])
    dtypes = (torch.float32, torch.int32, torch.float32, torch.int32, torch.int32)

    def check(ref, want):
        for name, t, w, dt in zip(RecvReference._fields, ref, want, dtypes):
            assert t.dtype == dt and t.tolist() == w, name

    for ranks, want in ((None, (want0, want1)), ([0], (want0, None)), ([1], (None, want1))):
        refs = dispatch_reference(xs, ids, ws, 4, ranks=ranks)
        assert len(refs) == 2, ranks
        for ref, w in zip(refs, want):
            assert (ref is None) == (w is None), ranks
            if w is not None:
                check(ref, w)


def test_references_send_the_fp8_round_trip():
    # per-token e4m3 with scale amax / 448 = 1: 17 lies halfway between e4m3's 16 and 18 (3 mantissa bits,
    # spacing 2 in [16, 32)) and rounds to the even 16; 448 is e4m3's largest finite value, exact
    xs = [torch.tensor([[448.0, 17.0]]), torch.empty(0, 2)]
    ids = [torch.tensor([[0]], dtype=torch.int32), torch.empty(0, 1, dtype=torch.int32)]
    ws = [torch.tensor([[0.5]]), torch.empty(0, 1)]
    for fp8, seen in ((True, [[448.0, 16.0]]), (False, [[448.0, 17.0]])):
        assert dispatch_reference(xs, ids, ws, 2, fp8=fp8)[0].recv_x.tolist() == seen
        # expert 0 multiplies by 1, weight 1/2
        assert combine_reference(xs, ids, ws, 2, expert_fn, fp8=fp8)[0].tolist() == [[v / 2 for v in seen[0]]]


def test_combine_reference_rounds_each_ranks_partial_to_the_dtype():
    # bf16 (spacing 2^-7 at 1), W = 2, E = 4, one token on rank 0 choosing experts 0, 1 (rank 0) and 2
    # (rank 1), all weights 1, outputs 1, 2^-8, 2^-8: rank 0's partial 1 + 2^-8 is a tie that rounds to the
    # even 1.0, rank 1's is 2^-8, and 1.0 + 2^-8 rounds to 1.0 again. Summed without rounding the partials:
    # 1 + 2^-7, exact in bf16.
    scale = [1.0, 2.0 ** -8, 2.0 ** -8, 1.0]
    xs = [torch.ones(1, 1, dtype=torch.bfloat16), torch.empty(0, 1, dtype=torch.bfloat16)]
    ids = [torch.tensor([[0, 1, 2]], dtype=torch.int32), torch.empty(0, 3, dtype=torch.int32)]
    ws = [torch.ones(1, 3), torch.empty(0, 3)]
    outs = combine_reference(xs, ids, ws, 4, lambda x, e: x * scale[e], ranks=[0])
    assert outs[1] is None and outs[0].dtype == torch.bfloat16 and outs[0].tolist() == [[1.0]]


def test_combine_reference_sums_in_fp32_whatever_the_default_dtype():
    # W = 3, E = 9; x = 1, weights 1; expert outputs 1e8, 1, -1e8 (fp32 spacing at 1e8 is 8, so 1e8 + 1 is 1e8):
    # token 0 sends one to each rank (the sum over ranks), token 1 all three to rank 0 (the sum in one rank);
    # fp32 gives 0 for both, fp64 would give 1
    scale = [1e8, 1.0, -1e8, 1.0, 1.0, 1.0, -1e8, 1.0, 1.0]
    xs = [torch.ones(2, 1), torch.empty(0, 1), torch.empty(0, 1)]
    ids = [torch.tensor([[0, 3, 6], [0, 1, 2]], dtype=torch.int32)] + [torch.empty(0, 3, dtype=torch.int32)] * 2
    ws = [torch.ones(2, 3), torch.empty(0, 3), torch.empty(0, 3)]
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        outs = combine_reference(xs, ids, ws, 9, lambda x, e: x * scale[e], ranks=[0])
    finally:
        torch.set_default_dtype(default_dtype)
    assert len(outs) == 3 and outs[1] is None and outs[2] is None  # one entry per rank, None where not asked
    assert outs[0].dtype == torch.float32 and outs[0].tolist() == [[0.0], [0.0]]


# ------------------------------------------------------------------------------------- vLLM adapter


@pytest.mark.gpu
def test_vllm_adapter_identity_w1():
    pytest.importorskip("vllm", reason="skipped: vllm is not installed")
    from moekern.vllm.ep_adapter import check_adapter_matches_no_ep

    check_adapter_matches_no_ep(device="cuda")


# ------------------------------------------------------------------------------------------- structure


def _imported_modules(path):
    import ast

    mods = set()
    for n in ast.walk(ast.parse(path.read_text())):
        if isinstance(n, ast.Import):
            mods |= {a.name for a in n.names}
        elif isinstance(n, ast.ImportFrom) and n.module:  # `from moekern.ep import peer` imports moekern.ep.peer
            mods |= {n.module} | {f"{n.module}.{a.name}" for a in n.names}
    return mods


def test_imports_run_one_way():
    """api (the facade) imports the backends; the backends import common and layout; nothing imports back up
    (peer once imported api's private names while api imported peer)."""
    from pathlib import Path

    ep_dir = Path(moekern.ep.__file__).parent
    above = {"common.py": {"api", "nccl", "peer", "lowlat"}, "layout.py": {"api", "nccl", "peer", "lowlat", "common"},
             "nccl.py": {"api", "peer", "lowlat"}, "peer.py": {"api", "nccl", "lowlat"}, "lowlat.py": {"api", "nccl"},
             "reference.py": {"api", "nccl", "peer", "lowlat", "common"}}
    for name, banned in above.items():
        mods = _imported_modules(ep_dir / name)
        bad = sorted(m for m in mods if m.startswith("moekern.ep.") and m.split(".")[2] in banned)
        assert not bad, f"moekern/ep/{name} imports {bad}"
