"""moekern.ep low-latency mode (ep/lowlat.py) against the gather-everything reference (moekern.ep.reference).

W ranks emulated in one process (CPU under TRITON_INTERPRET=1 at tiny shapes; W = 8 at real widths on one
GPU, marked gpu, with CUDA-graph capture and replay). Exactness as in tests/test_ep.py: small-integer hidden
states, weights in multiples of 1/4, expert e multiplies by (e + 1), so every sum is exact.

Guaranteed receive order (tested exactly, which implies the per-expert sets): on rank d, local expert e's
rows are [0, recv_counts[e]), source rank ascending, source token ascending within a source (the order of
dispatch_reference's rows, restricted to the rows that chose e).
"""

from __future__ import annotations

import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import moekern.ep as ep
from moekern.ep.lowlat import BAD_IDS, OVERFLOW_RECV, OVERFLOW_SEND
from moekern.ep.reference import combine_reference, dispatch_reference

from test_ep import SKEWS, expert_fn, make_inputs  # noqa: E402 - the single-node EP tests' inputs


def places(ids: torch.Tensor, E: int) -> torch.Tensor:
    """[M, k]: each (t, j)'s place among the rank's earlier (row-major) pairs with the same expert."""
    flat = ids.reshape(-1).tolist()
    seen: dict = {}
    out = []
    for e in flat:
        out.append(seen.get(e, 0))
        seen[e] = seen.get(e, 0) + 1
    return torch.tensor(out, dtype=torch.int64).view(ids.shape)


def kept_weights(ids, ws, E, cap):
    """The weights with dropped pairs (place >= cap, or id out of range) set to 0: what combine must sum."""
    keep = (places(ids, E) < cap) & (ids >= 0) & (ids < E)
    return torch.where(keep, ws, torch.zeros_like(ws))


def expected_expert_rows(ref, e):
    """Reference receive rows of local expert e, in the guaranteed order: (row, slot j) pairs."""
    ids = ref.recv_topk_ids.long()
    pairs = torch.nonzero(ids == e)  # row-major: rows ascending (source, token), then slot
    return pairs[:, 0], pairs[:, 1]


def check_dispatch(res, xs, ids, ws, E, W, cap, tag=""):
    El = E // W
    kept = [kept_weights(i, w, E, cap) for i, w in zip(ids, ws)]
    # the reference over the pairs that survive the capacity: drop pairs by giving them an off-world id
    live = [torch.where(k != 0, i.long(), torch.full_like(i.long(), 10**6)) for k, i in zip(kept, ids)]
    refs = dispatch_reference(xs, live, kept, E)
    for d, ((out, h), ref) in enumerate(zip(res, refs)):
        counts = out.recv_counts.cpu()
        for e in range(El):
            rows, slots = expected_expert_rows(ref, e)
            n = rows.numel()
            assert int(counts[e]) == n, f"{tag} rank {d} expert {e}: recv_counts {int(counts[e])} != {n}"
            got = {name: getattr(out, name)[e, :n].cpu() for name in
                   ("recv_x", "recv_src_rank", "recv_src_token", "recv_topk_slot", "recv_topk_weights")}
            assert torch.equal(got["recv_x"], ref.recv_x[rows]), f"{tag} rank {d} expert {e}: recv_x"
            assert torch.equal(got["recv_src_rank"], ref.recv_src_rank[rows]), f"{tag} rank {d} e {e}: src rank"
            assert torch.equal(got["recv_src_token"], ref.recv_src_token[rows]), f"{tag} rank {d} e {e}: src token"
            assert torch.equal(got["recv_topk_slot"], slots.to(torch.int32)), f"{tag} rank {d} e {e}: slot"
            assert torch.equal(got["recv_topk_weights"], ref.recv_topk_weights[rows, slots]), f"{tag} {d} {e}: w"


def apply_local_experts(res, E, W):
    """Unweighted expert outputs in recv_x's layout: expert e of rank d multiplies by (d*El + e + 1)."""
    El = E // W
    ys = []
    for d, (out, _) in enumerate(res):
        scale = (torch.arange(El, device=out.recv_x.device) + d * El + 1).to(out.recv_x.dtype)
        ys.append(out.recv_x * scale[:, None, None])
    return ys


def run_case(W, E, k, H, Ms, skew, seed, device, dtype=torch.float32, cap=None, world=None, tag=""):
    xs, ids, ws = make_inputs(seed, W, E, k, H, Ms, skew, dtype)
    Mmax = max(Ms + [1])
    world = world or ep.LLWorld.emulated(W, Mmax, H, k, E, dtype=dtype, device=device, capacity=cap)
    cap = world.capacity
    res = ep.dispatch_ll_emulated(world, [x.to(device) for x in xs], [i.to(device) for i in ids],
                                  [w.to(device) for w in ws], E)
    check_dispatch(res, xs, ids, ws, E, W, cap, tag)
    got = ep.combine_ll_emulated(apply_local_experts(res, E, W), [h for _, h in res])
    kept = [kept_weights(i, w, E, cap) for i, w in zip(ids, ws)]
    want = combine_reference(xs, ids, kept, E, expert_fn)
    for r in range(W):
        assert torch.equal(got[r].cpu(), want[r]), f"{tag} combine rank {r}\n{got[r]}\n{want[r]}"
    return world, res, (xs, ids, ws)


# ------------------------------------------------------------------------------------------ CPU / any


@pytest.mark.parametrize("W", [2, 4])
@pytest.mark.parametrize("skew", SKEWS)
def test_ll_emulated_skews(W, skew, device):
    world, res, _ = run_case(W, 2 * W, 3, 8, [3, 0, 4, 2][:W], skew, seed=W, device=device, tag=skew)
    for _, h in res:
        h.check()  # nothing dropped at the default capacity


def test_ll_k_larger_than_local_experts(device):
    """k = 4 > El = 1: a token reaches several ranks and, with El = 2, several experts of one rank
    (sent once per expert)."""
    run_case(4, 4, 4, 8, [3, 2, 0, 4], "uniform", seed=11, device=device, tag="El=1")
    run_case(2, 4, 4, 5, [4, 3], "uniform", seed=12, device=device, tag="El=2,k=4")


def test_ll_all_to_one_rank_and_empty_receivers(device):
    world, res, _ = run_case(4, 8, 2, 8, [4, 4, 1, 3], "one_rank", seed=3, device=device, tag="one_rank")
    for d in (1, 2, 3):  # every chosen expert is on rank 0
        assert int(res[d][0].recv_counts.sum()) == 0
    assert int(res[0][0].recv_counts.sum()) == 2 * 12


def test_ll_all_ranks_empty(device):
    run_case(2, 4, 2, 8, [0, 0], "uniform", seed=0, device=device, tag="M=0 everywhere")


def test_ll_reuse_world_no_stale_counts(device):
    """A second dispatch on the same world with fewer tokens must not see the first one's counts/rows."""
    world, _, _ = run_case(2, 4, 2, 8, [4, 4], "uniform", seed=5, device=device, tag="first")
    run_case(2, 4, 2, 8, [0, 1], "zipf", seed=6, device=device, world=world, tag="second")


def test_ll_overflow_dropped_and_flagged(device):
    """capacity=1 slot per (expert, source): pairs past the first are dropped, both sides are flagged, and
    combine returns the reference over the surviving pairs."""
    W, E, k, H = 2, 4, 2, 8
    world, res, (xs, ids, ws) = run_case(W, E, k, H, [4, 3], "one_rank", seed=9, device=device, cap=1,
                                         tag="overflow")
    flags = [int(h.error_flag.item()) for _, h in res]
    assert flags[0] & OVERFLOW_SEND and flags[1] & OVERFLOW_SEND
    assert flags[0] & OVERFLOW_RECV  # everything goes to rank 0's experts
    assert not flags[1] & OVERFLOW_RECV
    with pytest.raises(ValueError, match="capacity=1"):
        res[0][1].check()
    assert all(int(o.recv_counts.max()) <= W for o, _ in res)


def test_ll_bad_ids_flagged_not_crashing(device):
    W, E, k, H = 2, 4, 2, 8
    xs, ids, ws = make_inputs(1, W, E, k, H, [3, 2], "uniform")
    ids[1][0, 1] = E  # out of range: dropped on the device, flagged, no host check
    ids[1][1, 0] = -1
    world = ep.LLWorld.emulated(W, 3, H, k, E, dtype=torch.float32, device=device)
    res = ep.dispatch_ll_emulated(world, [x.to(device) for x in xs], [i.to(device) for i in ids],
                                  [w.to(device) for w in ws], E)
    check_dispatch(res, xs, ids, ws, E, W, world.capacity, "bad ids")
    got = ep.combine_ll_emulated(apply_local_experts(res, E, W), [h for _, h in res])
    want = combine_reference(xs, ids, [kept_weights(i, w, E, 3) for i, w in zip(ids, ws)], E, expert_fn)
    for r in range(W):
        assert torch.equal(got[r].cpu(), want[r])
    res[0][1].check()
    assert int(res[1][1].error_flag.item()) == BAD_IDS
    with pytest.raises(ValueError, match="outside"):
        res[1][1].check()


def test_ll_bf16(device):
    run_case(2, 4, 2, 8, [3, 4], "zipf", seed=21, device=device, dtype=torch.bfloat16, tag="bf16")


CASE = st.fixed_dictionaries({
    "seed": st.integers(0, 2**20),
    "skew": st.sampled_from(SKEWS),
    "W": st.sampled_from([2, 4]),
    "E_per_rank": st.sampled_from([1, 2, 3]),
    "k": st.integers(1, 4),
    "H": st.sampled_from([1, 8]),
    "Ms": st.lists(st.integers(0, 4), min_size=4, max_size=4),
    "cap_cut": st.sampled_from([0, 0, 1, 2]),  # 0: default capacity; else capacity = Mmax - cut (>= 1)
})


@settings(max_examples=8, deadline=None, suppress_health_check=list(HealthCheck))
@given(c=CASE)
def test_ll_hypothesis(c, device):
    W = c["W"]
    E = c["E_per_rank"] * W
    k = min(c["k"], E)
    Ms = c["Ms"][:W]
    cap = max(1, max(Ms + [1]) - c["cap_cut"]) if c["cap_cut"] else None
    run_case(W, E, k, c["H"], Ms, c["skew"], c["seed"], device, cap=cap, tag=str(c))


def test_ll_no_host_sync(device, monkeypatch):
    """No .item()/.tolist()/.cpu()/bool()/int() is called from moekern code during an LL dispatch + combine
    (Triton's interpreter may copy storages itself: only calls made from moekern frames count)."""
    W, E, k, H = 2, 4, 2, 8
    xs, ids, ws = make_inputs(2, W, E, k, H, [3, 2], "uniform")
    xs, ids, ws = ([t.to(device) for t in v] for v in (xs, ids, ws))
    world = ep.LLWorld.emulated(W, 3, H, k, E, dtype=torch.float32, device=device)
    calls = []

    def guard(name):
        orig = getattr(torch.Tensor, name)

        def wrapped(self, *a, **kw):
            caller = sys._getframe(1).f_globals.get("__name__", "")
            if caller.startswith("moekern"):
                calls.append(f"{name} from {caller}")
                raise AssertionError(f"host sync: Tensor.{name} called from {caller}")
            return orig(self, *a, **kw)

        monkeypatch.setattr(torch.Tensor, name, wrapped)

    for name in ("item", "tolist", "cpu", "__bool__", "__int__", "__index__", "nonzero"):
        guard(name)
    res = ep.dispatch_ll_emulated(world, xs, ids, ws, E)
    ys = apply_local_experts(res, E, W)
    out = ep.combine_ll_emulated(ys, [h for _, h in res])
    monkeypatch.undo()
    assert not calls
    want = combine_reference([x.cpu() for x in xs], [i.cpu() for i in ids], [w.cpu() for w in ws], E, expert_fn)
    assert all(torch.equal(o.cpu(), w) for o, w in zip(out, want))
    # and the guard works: check() does sync, and is caught
    guard("item")
    with pytest.raises(AssertionError, match="host sync"):
        res[0][1].check()


def test_ll_bad_static_args(device):
    W, E, k, H = 2, 4, 2, 8
    xs, ids, ws = make_inputs(0, W, E, k, H, [3, 2], "uniform")
    xs, ids, ws = ([t.to(device) for t in v] for v in (xs, ids, ws))
    with pytest.raises(ValueError, match="divisible"):
        ep.LLWorld.emulated(W, 3, H, k, 5, dtype=torch.float32, device=device)
    with pytest.raises(ValueError, match="max_tokens_per_rank"):
        ep.LLWorld.emulated(W, 0, H, k, E, dtype=torch.float32, device=device)
    with pytest.raises(TypeError, match="dtype"):
        ep.LLWorld.emulated(W, 3, H, k, E, dtype=torch.int32, device=device)
    world = ep.LLWorld.emulated(W, 3, H, k, E, dtype=torch.float32, device=device)
    with pytest.raises(ValueError, match="divisible"):
        ep.dispatch_ll_emulated(world, xs, ids, ws, 5)
    with pytest.raises(ValueError, match="num_experts=8 differs"):
        ep.dispatch_ll_emulated(world, xs, ids, ws, 8)
    with pytest.raises(ValueError, match="list of W=2"):
        ep.dispatch_ll_emulated(world, xs[:1], ids, ws, E)
    with pytest.raises(TypeError, match="float32"):
        ep.dispatch_ll_emulated(world, [x.to(torch.bfloat16) for x in xs], ids, ws, E)
    with pytest.raises(ValueError, match="H=8"):
        ep.dispatch_ll_emulated(world, [x[:, :4] for x in xs], ids, ws, E)
    with pytest.raises(ValueError, match="max_tokens_per_rank=3"):
        big = [torch.cat([x, x]) for x in xs]
        ep.dispatch_ll_emulated(world, big, [torch.cat([i, i]) for i in ids], [torch.cat([w, w]) for w in ws], E)
    with pytest.raises(ValueError, match="k=2"):
        ep.dispatch_ll_emulated(world, xs, [i[:, :1] for i in ids], [w[:, :1] for w in ws], E)
    with pytest.raises(TypeError, match="topk_ids must be int32"):
        ep.dispatch_ll_emulated(world, xs, [i.float() for i in ids], ws, E)
    with pytest.raises(ValueError, match="emulated"):
        ep.dispatch_ll(world, xs[0], ids[0], ws[0], E)
    res = ep.dispatch_ll_emulated(world, xs, ids, ws, E)
    handles = [h for _, h in res]
    ys = apply_local_experts(res, E, W)
    with pytest.raises(ValueError, match="one entry per handle"):
        ep.combine_ll_emulated(ys[:1], handles)
    with pytest.raises(ValueError, match=r"\[El, W\*capacity, H\]"):
        ep.combine_ll_emulated([y[:, :2] for y in ys], handles)
    with pytest.raises(TypeError, match="torch.float32"):
        ep.combine_ll_emulated([y.double() for y in ys], handles)
    with pytest.raises(TypeError, match="LLHandle"):
        ep.combine_ll(ys[0], object())


# ----------------------------------------------------------------------------------------------- GPU

GPU_CASE = dict(W=8, E=256, k=8, H=7168, Ms=[128, 0, 37, 128, 1, 64, 0, 100])


@pytest.mark.gpu
@pytest.mark.parametrize("skew", SKEWS)
def test_ll_gpu_w8(skew):
    """W = 8 emulated ranks at DeepSeek-V3 decode widths, bf16, exact against the reference."""
    c = GPU_CASE
    world, res, _ = run_case(c["W"], c["E"], c["k"], c["H"], c["Ms"], skew, 7, "cuda", dtype=torch.bfloat16,
                             tag=skew)
    for _, h in res:
        h.check()


@pytest.mark.gpu
def test_ll_gpu_no_sync_debug_mode():
    """torch's sync debug mode raises on any synchronizing torch call during LL dispatch + combine."""
    W, E, k, H, Ms = 8, 64, 8, 4096, [128] * 8
    xs, ids, ws = make_inputs(3, W, E, k, H, Ms, "zipf", torch.bfloat16)
    xs, ids, ws = ([t.cuda() for t in v] for v in (xs, ids, ws))
    world = ep.LLWorld.emulated(W, 128, H, k, E, dtype=torch.bfloat16, device="cuda")
    res = ep.dispatch_ll_emulated(world, xs, ids, ws, E)  # compile first
    ep.combine_ll_emulated(apply_local_experts(res, E, W), [h for _, h in res])
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        res = ep.dispatch_ll_emulated(world, xs, ids, ws, E)
        out = ep.combine_ll_emulated(apply_local_experts(res, E, W), [h for _, h in res])
    finally:
        torch.cuda.set_sync_debug_mode("default")
    want = combine_reference([x.cpu() for x in xs], [i.cpu() for i in ids], [w.cpu() for w in ws], E, expert_fn)
    for r in range(W):
        assert torch.equal(out[r].cpu(), want[r])


@pytest.mark.gpu
def test_ll_gpu_cuda_graph_replay():
    """Capture dispatch_ll + experts + combine_ll for 8 emulated ranks in one CUDA graph; copy new inputs
    into the captured buffers, replay, compare with the reference for the new inputs."""
    W, E, k, H, M = 8, 64, 8, 4096, 128
    dtype = torch.bfloat16
    world = ep.LLWorld.emulated(W, M, H, k, E, dtype=dtype, device="cuda")
    xs0, ids0, ws0 = make_inputs(100, W, E, k, H, [M] * W, "uniform", dtype)
    s_x = [x.cuda() for x in xs0]
    s_ids = [i.cuda() for i in ids0]
    s_w = [w.cuda() for w in ws0]

    def step():
        res = ep.dispatch_ll_emulated(world, s_x, s_ids, s_w, E)
        out = ep.combine_ll_emulated(apply_local_experts(res, E, W), [h for _, h in res])
        return out, [h.error_flag for _, h in res]

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):  # warm-up: compiles the kernels outside the capture
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        g_out, g_flags = step()
    for seed, skew in ((101, "zipf"), (102, "one_rank"), (103, "empty_rank")):
        xs, ids, ws = make_inputs(seed, W, E, k, H, [M] * W, skew, dtype)
        for dst, src in zip(s_x + s_ids + s_w, xs + ids + ws):
            dst.copy_(src)
        graph.replay()
        torch.cuda.synchronize()
        want = combine_reference(xs, ids, ws, E, expert_fn)
        for r in range(W):
            assert torch.equal(g_out[r].cpu(), want[r]), f"replay {skew} rank {r}"
            assert int(g_flags[r].item()) == 0


def _multigpu_worker(rank, W, port, out_dir):
    """One real rank: LLWorld.symmetric + dispatch_ll/combine_ll, three alternating rounds (reusing the
    world, so the barriers' ordering of staging/comb reuse is exercised), each exact against the reference."""
    import datetime
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), TORCH_SYMM_MEM_DISABLE_MULTICAST="1",
                      NCCL_NVLS_ENABLE="0")
    torch.cuda.set_device(rank)
    dev = torch.device("cuda", rank)
    dist.init_process_group("nccl", rank=rank, world_size=W, timeout=datetime.timedelta(seconds=120), device_id=dev)
    try:
        import torch.distributed._symmetric_memory as symm_mem

        fn = getattr(symm_mem, "enable_symm_mem_for_group", None)  # older torch wants it before rendezvous
        if fn is not None:
            try:
                fn(dist.group.WORLD.group_name)
            except RuntimeError:
                pass
        E, k, H, M = 8 * W, 8, 2048, 64
        world = ep.LLWorld.symmetric(None, M, H, k, E, dtype=torch.bfloat16)
        El = E // W
        scale = (torch.arange(El, device=dev) + rank * El + 1).to(torch.bfloat16)
        for rnd, skew in enumerate(("uniform", "zipf", "one_rank")):
            Ms = [M if (r + rnd) % 3 else M // 2 for r in range(W)]
            xs, ids, ws = make_inputs(50 + rnd, W, E, k, H, Ms, skew, torch.bfloat16)
            out, h = ep.dispatch_ll(world, xs[rank].to(dev), ids[rank].to(dev), ws[rank].to(dev), E)
            got = ep.combine_ll(out.recv_x * scale[:, None, None], h)
            h.check()
            ref = dispatch_reference(xs, ids, ws, E, ranks=[rank])[rank]
            n = out.recv_counts.cpu()
            for e in range(El):
                rows, slots = expected_expert_rows(ref, e)
                assert int(n[e]) == rows.numel()
                assert torch.equal(out.recv_x[e, :rows.numel()].cpu(), ref.recv_x[rows])
                assert torch.equal(out.recv_src_token[e, :rows.numel()].cpu(), ref.recv_src_token[rows])
            want = combine_reference(xs, ids, ws, E, expert_fn, ranks=[rank])[rank]
            assert torch.equal(got.cpu(), want), f"rank {rank} round {rnd}: combine differs"
        open(os.path.join(out_dir, f"ok{rank}"), "w").close()
    finally:
        dist.destroy_process_group()


@pytest.mark.gpu
def test_ll_multigpu_symmetric(tmp_path):
    """W = 2 real ranks (skipped with fewer than 2 GPUs)."""
    import socket

    import torch.multiprocessing as mp

    W = 2
    if torch.cuda.device_count() < W:
        pytest.skip(f"skipped: needs {W} GPUs; found {torch.cuda.device_count()}")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_multigpu_worker, args=(W, port, str(tmp_path)), nprocs=W, join=True)
    assert all((tmp_path / f"ok{r}").exists() for r in range(W))
