"""Kernel-side cost of moekern.ep dispatch/combine with W = 8 ranks emulated on one GPU.

    python benchmarks/bench_ep.py --out DIR        # writes DIR/bench_ep.json (< 2 min on an H100)

For each case (decode 128 / prefill 4096 tokens per rank; DeepSeek-V3-like H=7168, E=256 and
Mixtral-like H=4096, E=64; k=8; uniform or Zipf(1.2) routing) it times, per rank (the W emulated ranks'
total / W), with CUDA-event timing after warm-up (triton.testing.do_bench):
  peer_dispatch   moekern.ep.dispatch_emulated: layout, counts, the Triton write kernel into the peers'
                  regions, copy-out and grouping by local expert (expert_x);
  peer_write      the write kernel alone (moekern.ep.peer.plan_send + write_tokens);
  peer_combine    moekern.ep.combine_emulated: local weighted reduce (unpermute) kernel + pull kernel;
  torch_dispatch  the portable path (moekern.ep.nccl.pack/unpack) with local copies for all_to_all_single;
  torch_combine   its combine (moekern.dispatch.unpermute, local copy, nccl.sum_partials).
Bytes moved per rank (payload + metadata; combine partials) and the time they need at the measured
device-to-device copy bandwidth are recorded. On one GPU the "peer" stores land in local HBM: the times
are kernel-side costs, not NVLink times.

Low-latency rows (doc["ll_results"], decode cases only; moekern.ep.lowlat, fixed receive layout, no host
sync): dispatch_ll_emulated / combine_ll_emulated captured in CUDA graphs and replayed (ll_dispatch_graph_us,
ll_combine_graph_us, ll_roundtrip_graph_us: one graph holding both), plus the eager call
(ll_dispatch_eager_us). Before timing, LL must agree with the peer path (each expert's rows exactly;
combine within bf16 rounding). `--ll-only` skips the rest.

Distributed mode (real ranks, one process per GPU):

    torchrun --nproc-per-node W benchmarks/bench_ep.py --distributed --out DIR   # DIR/bench_ep_w{W}.json
    python benchmarks/bench_ep.py --report DIR     # scaling vs W=2 over DIR's bench_ep_w*.json (ep_report.py)

Each rank runs the same cases (bf16 payload) through moekern.ep.dispatch/combine with backend="nccl" and
backend="peer" (PeerWorld.symmetric, torch symmetric memory over NVLink); the two must agree before timing.
Each timed iteration starts after a device sync and a process-group barrier, is bracketed by CUDA events,
and the case's time is the max over ranks of the per-rank median. The peer bandwidth is measured in the
same run (every rank copies a large buffer into rank+1's symmetric buffer at once). Algorithmic bandwidth =
bytes a rank sends to other ranks (mean over ranks; payload + metadata rows for dispatch, bf16 partials for
combine) / time. On CPU (gloo, `torchrun --nproc-per-node 2 ... --distributed --tiny`) only the portable
path runs and the peer path is recorded as skipped with its reason: the orchestration's CPU proof.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import zlib

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)
from ep_report import derive_row, format_table, write_json, write_report  # noqa: E402

W = 8
CASES = [  # (phase, tokens per rank, H, E)
    ("decode", 128, 7168, 256), ("decode", 128, 4096, 64),
    ("prefill", 4096, 7168, 256), ("prefill", 4096, 4096, 64),
]
K = 8


def make_routing(M, E, skew, gen, device, hot_gen=None):
    """hot_gen: the generator that places the hot experts (default gen); the distributed mode passes one
    seeded by the case alone, so every rank sees the same popular experts."""
    if skew == "uniform":
        p = torch.ones(E)
    else:
        p = 1.0 / torch.arange(1, E + 1, dtype=torch.float64) ** 1.2
        p = p[torch.randperm(E, generator=hot_gen or gen)]  # hot experts spread over ranks at random
    ids = torch.multinomial(p.float().expand(M, E), K, replacement=False, generator=gen).to(torch.int32)
    w = torch.rand(M, K, generator=gen)
    return ids.to(device), (w / w.sum(1, keepdim=True)).to(device)


def emulated_inputs(W, M, H, E, skew, gen, device):
    """Every emulated rank's bf16 tokens [M, H] and routing (ids [M, k], weights [M, k]): three lists of W."""
    xs = [torch.randn(M, H, generator=gen).to(torch.bfloat16).to(device) for _ in range(W)]
    routed = [make_routing(M, E, skew, gen, device) for _ in range(W)]
    return xs, [r[0] for r in routed], [r[1] for r in routed]


def torch_dispatch(xs, ids, ws, E):
    """The portable path for all W ranks (moekern.ep.nccl's per-rank steps), each all_to_all_single replaced
    by a local gather of chunks. Returns [(DispatchOutput, EpHandle)] per rank."""
    from moekern.ep import nccl

    packs = [nccl.pack(xs[r], ids[r], ws[r], E, W) for r in range(W)]
    counts = [p.lay.send_counts.tolist() for p in packs]
    res = []
    for d in range(W):
        recv = [counts[r][d] for r in range(W)]
        recv_x = torch.cat([p.x.split(counts[r])[d] for r, p in enumerate(packs)])  # the "all_to_all"
        recv_meta = torch.cat([p.meta.split(counts[r])[d] for r, p in enumerate(packs)])
        res.append(nccl.unpack(packs[d], recv_x, recv_meta, None, rank=d, send_counts=counts[d], recv_counts=recv,
                               num_experts=E, dtype=xs[d].dtype))
    return res


def torch_combine(res, ys):
    """The portable path's combine for all W ranks: local reduce (moekern.dispatch.unpermute), the partials
    split back per source (the "all_to_all" back), the per-rank sum on the source."""
    from moekern.ep import nccl
    from moekern.ep.common import local_combine

    chunks = [local_combine(y, h).split(h.recv_counts) for y, (_, h) in zip(ys, res)]
    return [nccl.sum_partials(torch.cat([chunks[d][r] for d in range(W)]), h.send_token_idx, h.send_counts,
                              h.num_tokens, h.dtype) for r, (_, h) in enumerate(res)]


def copy_bandwidth(device):
    from triton.testing import do_bench

    n = 1 << 30
    a = torch.empty(n, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    ms = do_bench(lambda: b.copy_(a), warmup=25, rep=200)
    return n / (ms * 1e-3), ms


def run(out_dir, quick=False, ll_only=False):
    from triton.testing import do_bench

    import moekern.ep as ep
    from moekern.ep import peer

    device = "cuda"
    gen = torch.Generator().manual_seed(0)
    bw, _ = copy_bandwidth(device)
    results = []
    cases = CASES[:2] if quick else CASES
    rep = 30 if quick else 60
    for phase, M, H, E in ([] if ll_only else cases):
        for skew in ("uniform", "zipf"):
            for fp8 in ((False, True) if (skew == "uniform" and H == 7168) else (False,)):
                t0 = time.time()
                xs, ids, ws = emulated_inputs(W, M, H, E, skew, gen, device)
                world = ep.PeerWorld.emulated(W, M, H, K, dtype=torch.bfloat16, device=device)
                res = ep.dispatch_emulated(world, xs, ids, ws, E, fp8=fp8)
                ys = [o.expert_x for o, _ in res]  # identity experts: the cost under test is data movement
                handles = [h for _, h in res]
                t_disp = do_bench(lambda: ep.dispatch_emulated(world, xs, ids, ws, E, fp8=fp8), warmup=5, rep=rep)
                t_comb = do_bench(lambda: ep.combine_emulated(ys, handles), warmup=5, rep=rep)
                plans = [peer.plan_send(xs[r], ids[r], ws[r], E, W, fp8) for r in range(W)]
                counts = torch.stack([p.status for p in plans])[:, :W]
                t_write = do_bench(lambda: [peer.write_tokens(world, r, plans[r], counts, E) for r in range(W)],
                                   warmup=5, rep=rep)
                row = dict(phase=phase, tokens_per_rank=M, hidden=H, num_experts=E, top_k=K, world_size=W,
                           skew=skew, payload="fp8_e4m3+fp32 scale" if fp8 else "bf16",
                           peer_dispatch_us=1e3 * t_disp / W, peer_write_us=1e3 * t_write / W,
                           peer_combine_us=1e3 * t_comb / W)
                if not fp8:
                    tres = torch_dispatch(xs, ids, ws, E)
                    tys = [o.expert_x for o, _ in tres]
                    # the two paths must agree before their times mean anything
                    for (o, _), (to, _) in zip(res, tres):
                        assert torch.equal(o.expert_x, to.expert_x), "peer and torch dispatch disagree"
                    row["torch_dispatch_us"] = 1e3 * do_bench(lambda: torch_dispatch(xs, ids, ws, E),
                                                              warmup=3, rep=rep) / W
                    row["torch_combine_us"] = 1e3 * do_bench(lambda: torch_combine(tres, tys),
                                                             warmup=3, rep=rep) / W
                sent = counts.sum(1).double()  # tokens each source rank sends (own rank included)
                remote = sent - counts.diagonal().double()
                tok_bytes = H * (1 if fp8 else 2) + (2 * K + 1) * 4 + (4 if fp8 else 0)
                row.update(
                    tokens_sent_per_rank_mean=float(sent.mean()), tokens_sent_per_rank_max=float(sent.max()),
                    tokens_recv_per_rank_max=float(counts.sum(0).max()),
                    dispatch_bytes_per_rank_mean=float(sent.mean() * tok_bytes),
                    dispatch_bytes_remote_per_rank_mean=float(remote.mean() * tok_bytes),
                    combine_bytes_per_rank_mean=float(sent.mean() * H * 2),
                )
                row["dispatch_model_us_at_copy_bw"] = 1e6 * row["dispatch_bytes_per_rank_mean"] / bw
                row["combine_model_us_at_copy_bw"] = 1e6 * row["combine_bytes_per_rank_mean"] / bw
                row["peer_dispatch_fraction_of_copy_bw"] = row["dispatch_model_us_at_copy_bw"] / row["peer_dispatch_us"]
                row["peer_write_fraction_of_copy_bw"] = row["dispatch_model_us_at_copy_bw"] / row["peer_write_us"]
                row["peer_combine_fraction_of_copy_bw"] = row["combine_model_us_at_copy_bw"] / row["peer_combine_us"]
                row["case_seconds"] = time.time() - t0
                print(json.dumps({k: (round(v, 2) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)
                results.append(row)
                del world, res, ys, handles, plans, xs
                torch.cuda.empty_cache()
    ll_results = [run_ll_case(M, H, E, skew, torch.Generator().manual_seed(1000 + i), bw, rep)
                  for i, (phase, M, H, E) in enumerate(c for c in cases if c[0] == "decode")
                  for skew in ("uniform", "zipf")]
    doc = dict(
        bench="moekern.ep dispatch/combine, W=8 ranks emulated on one GPU", **_versions(torch.device(device)),
        bandwidth_model=dict(kind="device-to-device copy on one GPU (torch copy_ of 1 GiB, bytes copied per second;"
                                  " read+write traffic is twice this)", bytes_per_s=bw),
        timing="triton.testing.do_bench (CUDA events, after warm-up), all W emulated ranks' work / W; "
               "includes the host syncs that the counts force",
        results=results,
        ll_timing="CUDA graph replay timed with triton.testing.do_bench, all W emulated ranks' work / W",
        ll_results=ll_results,
    )
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "bench_ep.json")
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)
    print("wrote", path)


def _cuda_graph(fn):
    """fn captured in a CUDA graph after two warm-up calls on a side stream (compiles the kernels)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    torch.cuda.synchronize()
    return graph, out


def run_ll_case(M, H, E, skew, gen, bw, rep):
    """One low-latency row: W emulated ranks, bf16, identity experts, checked against the peer path."""
    from triton.testing import do_bench

    import moekern.ep as ep

    device = "cuda"
    t0 = time.time()
    xs, ids, ws = emulated_inputs(W, M, H, E, skew, gen, device)
    # the peer path's answer first (host-synced), then the LL path must agree with it
    pworld = ep.PeerWorld.emulated(W, M, H, K, dtype=torch.bfloat16, device=device)
    pres = ep.dispatch_emulated(pworld, xs, ids, ws, E)
    pout = ep.combine_emulated([o.expert_x for o, _ in pres], [h for _, h in pres])
    world = ep.LLWorld.emulated(W, M, H, K, E, dtype=torch.bfloat16, device=device)
    res = ep.dispatch_ll_emulated(world, xs, ids, ws, E)
    lout = ep.combine_ll_emulated([o.recv_x for o, _ in res], [h for _, h in res])
    for d, ((o, h), (po, _)) in enumerate(zip(res, pres)):
        h.check()
        offs = po.expert_offsets.tolist()
        counts = o.recv_counts.tolist()
        for e in range(E // W):
            if counts[e] != offs[e + 1] - offs[e] or not torch.equal(o.recv_x[e, :counts[e]],
                                                                     po.expert_x[offs[e]:offs[e + 1]]):
                raise AssertionError(f"LL and peer dispatch disagree on rank {d} expert {e}")
        diff = float((lout[d].float() - pout[d].float()).abs().max()) if M else 0.0
        tol = W * 2.0**-7 * max(1.0, float(pout[d].float().abs().max())) if M else 0.0
        if diff > tol:
            raise AssertionError(f"LL and peer combine differ on rank {d} by {diff} (> {tol})")
    del pworld, pres, pout
    t_eager = do_bench(lambda: ep.dispatch_ll_emulated(world, xs, ids, ws, E), warmup=5, rep=rep)
    g_disp, res_g = _cuda_graph(lambda: ep.dispatch_ll_emulated(world, xs, ids, ws, E))
    ys = [o.recv_x for o, _ in res_g]  # identity experts, read from the graph's own output buffers
    hs = [h for _, h in res_g]
    g_comb, _ = _cuda_graph(lambda: ep.combine_ll_emulated(ys, hs))
    g_both, _ = _cuda_graph(lambda: _ll_roundtrip(ep, world, xs, ids, ws, E))
    t_disp = do_bench(g_disp.replay, warmup=5, rep=rep)
    t_comb = do_bench(g_comb.replay, warmup=5, rep=rep)
    t_both = do_bench(g_both.replay, warmup=5, rep=rep)
    pairs = M * K  # (token, expert) pairs each rank sends: one row each in this mode
    row = dict(phase="decode", path="lowlat", tokens_per_rank=M, hidden=H, num_experts=E, top_k=K, world_size=W,
               skew=skew, payload="bf16", ll_dispatch_graph_us=1e3 * t_disp / W,
               ll_combine_graph_us=1e3 * t_comb / W, ll_roundtrip_graph_us=1e3 * t_both / W,
               ll_dispatch_eager_us=1e3 * t_eager / W, agrees_with_peer_path=True,
               ll_dispatch_bytes_per_rank=pairs * (H * 2 + 12), ll_combine_bytes_per_rank=pairs * H * 2,
               ll_buffer_bytes_per_rank=world.regions[0].numel())
    row["ll_dispatch_model_us_at_copy_bw"] = 1e6 * row["ll_dispatch_bytes_per_rank"] / bw
    row["ll_combine_model_us_at_copy_bw"] = 1e6 * row["ll_combine_bytes_per_rank"] / bw
    row["ll_dispatch_fraction_of_copy_bw"] = row["ll_dispatch_model_us_at_copy_bw"] / row["ll_dispatch_graph_us"]
    row["ll_combine_fraction_of_copy_bw"] = row["ll_combine_model_us_at_copy_bw"] / row["ll_combine_graph_us"]
    row["case_seconds"] = time.time() - t0
    print(json.dumps({k: (round(v, 2) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)
    del g_disp, g_comb, g_both, res_g, ys, hs, world, res, lout, xs
    torch.cuda.empty_cache()
    return row


def _ll_roundtrip(ep, world, xs, ids, ws, E):
    res = ep.dispatch_ll_emulated(world, xs, ids, ws, E)
    return ep.combine_ll_emulated([o.recv_x for o, _ in res], [h for _, h in res])


# ------------------------------------------------------------------------------------ distributed mode

# tiny shapes for the CPU (gloo) proof of the orchestration; E divisible by W up to 8
TINY_CASES = [("decode", 8, 64, 8), ("prefill", 32, 64, 8)]
MULTICAST_OFF = dict(NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1", NVSHMEM_DISABLE_NVLS="1")


def torchrun_env() -> dict | None:
    """RANK/WORLD_SIZE/LOCAL_RANK as torchrun sets them, or None outside torchrun."""
    if not all(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK")):
        return None
    return dict(rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]),
                local_rank=int(os.environ["LOCAL_RANK"]))


class _Timer:
    """Per-iteration wall time of fn on every rank, aligned by a sync + barrier before each iteration.

    CUDA: events around fn on the current stream (dispatch's host syncs are inside fn, so the end event is
    queued after all of its work). CPU: perf_counter. Returns the max over ranks of the per-rank median (us).
    """

    def __init__(self, device, warmup, reps):
        self.device, self.warmup, self.reps = device, warmup, reps

    def _sync(self):
        import torch.distributed as dist

        if self.device.type == "cuda":
            torch.cuda.synchronize()
        dist.barrier()
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def __call__(self, fn) -> float:
        import torch.distributed as dist

        for _ in range(self.warmup):
            self._sync()
            fn()
        times = []
        for _ in range(self.reps):
            self._sync()
            if self.device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                times.append((start, end))
            else:
                t0 = time.perf_counter()
                fn()
                times.append(1e6 * (time.perf_counter() - t0))
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            times = [1e3 * s.elapsed_time(e) for s, e in times]
        med = torch.tensor([float(torch.tensor(times).median())], dtype=torch.float64, device=self.device)
        dist.all_reduce(med, op=dist.ReduceOp.MAX)
        self._sync()
        return float(med)


def _all_mean(value: float, device) -> float:
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t) / dist.get_world_size()


def _all_max(value: float, device) -> float:
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def enable_symm_mem(group=None):
    """Older torch (< 2.9) wants enable_symm_mem_for_group before a rendezvous; newer ones deprecate it."""
    import warnings

    import torch.distributed as dist
    import torch.distributed._symmetric_memory as symm_mem

    fn = getattr(symm_mem, "enable_symm_mem_for_group", None)
    if fn is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                fn((group or dist.group.WORLD).group_name)
            except RuntimeError:  # already registered (torch registers groups itself now)
                pass


def peer_bandwidth(device, nbytes=256 << 20, reps=20) -> dict:
    """Bytes/s one rank writes into a peer's symmetric buffer while every rank does the same to rank+1.

    The copy goes through torch symmetric memory's mapped peer pointer (the path the peer kernels' stores
    take); the result is the min over ranks of the per-rank median, the bandwidth every rank can count on.
    """
    import torch.distributed as dist
    import torch.distributed._symmetric_memory as symm_mem

    os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
    W, rank = dist.get_world_size(), dist.get_rank()
    enable_symm_mem()
    buf = symm_mem.empty(nbytes, dtype=torch.uint8, device=device)
    hdl = symm_mem.rendezvous(buf, dist.group.WORLD)
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(rank)
    dst = hdl.get_buffer((rank + 1) % W, (nbytes,), torch.uint8)
    us = _Timer(device, warmup=3, reps=reps)(lambda: dst.copy_(src))  # max over ranks of the median
    hdl.barrier(channel=0)
    ok = bool((buf[:: 1 << 20] == (rank - 1) % W).all())  # rank-1's bytes arrived here
    del dst, hdl, buf, src
    torch.cuda.empty_cache()
    return dict(kind="copy_ into rank+1's symmetric buffer, all ranks at once (torch copy_, 256 MiB)",
                bytes=nbytes, bytes_per_s=nbytes / (us * 1e-6), us=us, data_checked=ok)


def _versions(device) -> dict:
    """moekern.bench's environment record, plus what a multi-GPU run adds (GPU count, NCCL version)."""
    from moekern.bench.runner import environment

    v = environment(device)
    v["device"] = v.pop("gpu") or f"cpu ({v['cpu']})"
    v["gpu_count"] = torch.cuda.device_count() if device.type == "cuda" else 0
    if device.type == "cuda":
        try:
            v["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
        except Exception as exc:  # noqa: BLE001 - a missing version is recorded, not fatal
            v["nccl"] = f"unknown ({exc})"
    return v


def _check_paths_agree(a, b, ya, yb, W, tag) -> float:
    """The nccl and peer outputs of one dispatch/combine must agree before their times mean anything:
    received rows exactly; combine up to the bf16 rounding of each rank's partial (the peer kernel reduces
    with fused fp32 multiply-adds, so a partial may round one ulp apart: at most W ulps of the largest
    value). The exact contract is tests/test_ep_multigpu.py's job. Returns the max abs combine difference."""
    for name in ("recv_x", "recv_topk_ids", "recv_topk_weights", "recv_src_rank", "recv_src_token", "expert_x",
                 "expert_offsets"):
        if not torch.equal(getattr(a, name), getattr(b, name)):
            raise AssertionError(f"{tag}: nccl and peer dispatch disagree on {name}")
    if ya.numel() == 0:
        return 0.0
    diff = float((ya.float() - yb.float()).abs().max())
    tol = W * 2.0**-7 * max(1.0, float(ya.float().abs().max()))
    if diff > tol:
        raise AssertionError(f"{tag}: nccl and peer combine differ by {diff} (> {tol})")
    return diff


def run_distributed(out_dir, quick=False, tiny=False, reps=None, backends=("nccl", "peer")) -> dict | None:
    """One rank of the distributed bench (torchrun env). Rank 0 writes DIR/bench_ep_w{W}.json; returns its doc."""
    import torch.distributed as dist

    import moekern.ep as ep

    for k, v in MULTICAST_OFF.items():
        os.environ.setdefault(k, v)
    env = torchrun_env()
    if env is None:
        raise RuntimeError("--distributed needs torchrun's RANK, WORLD_SIZE and LOCAL_RANK")
    use_cuda = torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(env["local_rank"])
        device = torch.device("cuda", env["local_rank"])
    else:
        device = torch.device("cpu")
        torch.set_num_threads(1)
    import datetime

    dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(seconds=300),
                            **({"device_id": device} if use_cuda else {}))
    try:
        return _run_distributed(ep, dist, device, env, out_dir, quick, tiny, reps, backends)
    finally:
        dist.destroy_process_group()


def _peer_skip_reason(device, backends) -> str | None:
    if "peer" not in backends:
        return "not requested (--backends)"
    if device.type != "cuda":
        return f"the peer path needs CUDA GPUs and an NCCL group (device={device.type}, gloo)"
    return None


def rank_inputs(phase, M, H, E, skew, rank, device):
    """One rank's x [M, H] bf16, topk_ids [M, K] int32, topk_weights [M, K] fp32 for a distributed case.

    Every rank draws its own tokens (seed: case and rank); the hot experts of a Zipf case are placed by
    the case's seed alone, so all ranks share the same popular experts, as in a served model."""
    case_seed = zlib.crc32(f"{phase} {M} {H} {E} {skew}".encode())
    gen = torch.Generator().manual_seed(case_seed + 7919 * (rank + 1))
    x = torch.randn(M, H, generator=gen).to(torch.bfloat16).to(device)
    ids, w = make_routing(M, E, skew, gen, device, hot_gen=torch.Generator().manual_seed(case_seed))
    return x, ids, w


def _run_distributed(ep, dist, device, env, out_dir, quick, tiny, reps, backends):
    rank, W = env["rank"], env["world_size"]
    cases = TINY_CASES if tiny else (CASES[:2] if quick else CASES)
    reps = reps or (5 if tiny else (20 if quick else 40))
    timer = _Timer(device, warmup=2 if tiny else 3, reps=reps)
    skip = _peer_skip_reason(device, backends)
    bw = None
    if skip is None:
        try:
            bw = peer_bandwidth(device)
        except Exception as exc:  # noqa: BLE001 - recorded, and the peer path is then skipped
            skip = f"symmetric memory unavailable on rank {rank}: {type(exc).__name__}: {exc}"
        if _all_max(float(skip is not None), device):  # every rank skips alike, or none does
            skip = skip or "symmetric memory unavailable on another rank"
            bw = None
    results = []
    doc = None
    if rank == 0:
        doc = dict(
            bench="moekern.ep dispatch/combine on real ranks (torchrun), nccl vs peer path",
            mode="distributed", world_size=W, backend=dist.get_backend(), **_versions(device),
            env={k: os.environ.get(k) for k in MULTICAST_OFF},
            peer_bandwidth=bw, peer_skipped=skip,
            timing=f"per iteration: device sync + barrier, then CUDA events (CPU: perf_counter) around one call; "
                   f"{timer.warmup} warm-up + {timer.reps} timed iterations; max over ranks of the per-rank median",
            algbw="bytes a rank sends to other ranks (mean over ranks) / time; dispatch bytes per token = "
                  "H*2 (bf16) + (2k+1)*4 (metadata row); combine = H*2",
            targets=dict(peer_speedup_vs_nccl=1.5, peer_fraction_of_peer_bw=0.7),
            complete=False, results=results,
        )
    path = os.path.join(out_dir, f"bench_ep_w{W}.json")
    for phase, M, H, E in cases:
        if E % W:
            continue
        world = None
        if skip is None:
            enable_symm_mem()
            world = ep.PeerWorld.symmetric(None, M, H, K, dtype=torch.bfloat16)
        for skew in ("uniform", "zipf"):
            t0 = time.time()
            x, ids, w = rank_inputs(phase, M, H, E, skew, rank, device)
            row = dict(phase=phase, tokens_per_rank=M, hidden=H, num_experts=E, top_k=K, world_size=W, skew=skew,
                       payload="bf16")
            out_n, h_n = ep.dispatch(x, ids, w, E, backend="nccl")
            y_n = ep.combine(out_n.expert_x, h_n)  # identity experts: the cost under test is data movement
            row["nccl_dispatch_us"] = timer(lambda: ep.dispatch(x, ids, w, E, backend="nccl"))
            row["nccl_combine_us"] = timer(lambda: ep.combine(out_n.expert_x, h_n))
            if world is not None:
                out_p, h_p = ep.dispatch(x, ids, w, E, backend="peer", world=world)
                y_p = ep.combine(out_p.expert_x, h_p)
                diff = _check_paths_agree(out_n, out_p, y_n, y_p, W, f"rank {rank} {phase} H={H} E={E} {skew}")
                row["combine_max_abs_diff_peer_vs_nccl"] = _all_max(diff, device)
                row["peer_dispatch_us"] = timer(lambda: ep.dispatch(x, ids, w, E, backend="peer", world=world))
                row["peer_combine_us"] = timer(lambda: ep.combine(out_p.expert_x, h_p))
                row["paths_agree"] = True
                del out_p, h_p, y_p
            else:
                row.update(peer_dispatch_us=None, peer_combine_us=None, peer_skipped=skip)
            sent = h_n.send_counts
            remote = sum(sent) - sent[rank]
            tok_bytes = H * 2 + (2 * K + 1) * 4
            row["tokens_remote_per_rank_mean"] = _all_mean(float(remote), device)
            row["dispatch_bytes_remote_per_rank_mean"] = row["tokens_remote_per_rank_mean"] * tok_bytes
            row["combine_bytes_remote_per_rank_mean"] = row["tokens_remote_per_rank_mean"] * H * 2
            derive_row(row, bw)
            row["case_seconds"] = time.time() - t0
            results.append(row)
            if rank == 0:
                print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}),
                      flush=True)
                write_json(path, doc)  # after every case: a crash later still leaves the rows so far
            del out_n, h_n, y_n, x
        del world
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if rank != 0:
        return None
    doc["complete"] = True
    write_json(path, doc)
    print(format_table(doc))
    print("wrote", path, flush=True)
    return doc


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="directory for bench_ep.json (emulated) or bench_ep_w{W}.json (distributed)")
    ap.add_argument("--quick", action="store_true", help="decode cases only")
    ap.add_argument("--ll-only", action="store_true", help="emulated: only the low-latency (decode) rows")
    ap.add_argument("--distributed", action="store_true",
                    help="real ranks under torchrun (also chosen when torchrun's env is present)")
    ap.add_argument("--tiny", action="store_true", help="distributed: tiny shapes (CPU/gloo proof)")
    ap.add_argument("--reps", type=int, default=None, help="distributed: timed iterations per measurement")
    ap.add_argument("--backends", default="nccl,peer", help="distributed: comma list of nccl,peer")
    ap.add_argument("--report", metavar="DIR", help="scaling report over DIR/bench_ep_w*.json (no GPU needed)")
    args = ap.parse_args(argv)
    if args.report:
        write_report(args.report, args.out or args.report)
        return
    if not args.out:
        ap.error("--out is required")
    if args.distributed or torchrun_env() is not None:
        backends = tuple(b for b in args.backends.split(",") if b)
        bad = [b for b in backends if b not in ("nccl", "peer")]
        if bad:
            ap.error(f"--backends must name nccl and/or peer; got {bad}")
        run_distributed(args.out, args.quick, args.tiny, args.reps, backends)
        return
    if not torch.cuda.is_available():
        sys.exit("bench_ep.py needs a CUDA GPU")
    run(args.out, args.quick, args.ll_only)


if __name__ == "__main__":
    main()
