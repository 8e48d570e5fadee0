"""moekern.ep on real ranks: one process per GPU (NCCL), both paths, exact against moekern.ep.reference.

GPU (marked gpu, skipped unless >= 2 CUDA devices): W = 2 and W = min(device_count, 8) processes, spawned
with torch.multiprocessing under a deadline (a hang fails the test instead of stalling the session; a
failing rank's traceback is the test's error). Each rank runs the portable path (backend="nccl") and the
peer path (backend="peer", PeerWorld.symmetric) on: every token to one rank, a rank receiving nothing,
M = 0 on some ranks, M = 0 on all, Zipf and uniform routing at realistic widths, bf16 and fp8 payloads;
received rows exactly, combine exactly (2 bf16 ulps after an fp8 round trip, as in tests/test_ep.py).
NVLink multicast stays off (NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1, NVSHMEM_DISABLE_NVLS=1).

CPU (no GPU needed): the same rank harness with gloo and the portable path only; the harness's traceback
and timeout reporting; benchmarks/bench_ep.py --distributed under torchrun on 2 gloo ranks (peer path
skipped with its reason); and benchmarks/ep_report.py on synthetic runs.
"""

from __future__ import annotations

import datetime
import importlib.util
import json
import os
import subprocess
import sys
import time

import pytest
import torch

import moekern
from moekern.ep.reference import apply_experts, combine_reference, dispatch_reference

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_ep import (  # noqa: E402 - the helpers of the single-node EP tests
    _edge_cases, _free_port, assert_combined, case_inputs, check_recv, expert_fn, global_ids, token_partial,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MULTICAST_OFF = dict(NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1", NVSHMEM_DISABLE_NVLS="1")


def _load_bench(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "benchmarks", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ------------------------------------------------------------------------------------------ harness


def run_ranks(fn, W: int, args: tuple, timeout_s: float):
    """Spawn fn(rank, W, port, *args) in W processes; raise the failing rank's traceback, or TimeoutError."""
    import torch.multiprocessing as mp

    for k, v in MULTICAST_OFF.items():
        os.environ.setdefault(k, v)  # the children inherit the environment
    ctx = mp.spawn(fn, args=(W, _free_port(), *args), nprocs=W, join=False)
    deadline = time.monotonic() + timeout_s
    while not ctx.join(timeout=0.5):  # raises ProcessRaisedException ("-- Process r terminated ...")
        if time.monotonic() > deadline:
            alive = [r for r, p in enumerate(ctx.processes) if p.is_alive()]
            for p in ctx.processes:
                if p.is_alive():
                    p.terminate()
            for p in ctx.processes:
                p.join(5)
                if p.is_alive():
                    p.kill()
            raise TimeoutError(f"W={W} ranks did not finish within {timeout_s}s (hang?); ranks still running: {alive}")


def _init(rank, W, port, device_kind):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    timeout = datetime.timedelta(seconds=120)
    if device_kind == "cuda":
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
        dist.init_process_group("nccl", rank=rank, world_size=W, timeout=timeout, device_id=device)
        _load_bench("bench_ep").enable_symm_mem()  # a no-op on torch >= 2.9, needed before
    else:
        torch.set_num_threads(1)
        device = torch.device("cpu")
        dist.init_process_group("gloo", rank=rank, world_size=W, timeout=timeout)
    return device


def _sync(device):
    """Every rank's work done before any rank goes on. Needed between two combines of the peer path: the
    second one overwrites this rank's combine region, which a slower peer may still be pulling from."""
    import torch.distributed as dist

    if device.type == "cuda":
        torch.cuda.synchronize()
    dist.barrier()


def check_case(rank, W, c, device, path):
    """One rank's dispatch + both combines on `path` against the gather-everything reference."""
    E, k, dtype, Ms, xs, ids, ws, seen = case_inputs(W, c, device)
    ref = dispatch_reference(seen, ids, ws, E, ranks=[rank])[rank]
    want = combine_reference(seen, ids, ws, E, expert_fn, ranks=[rank])[rank]
    world = None
    if path == "peer":
        world = moekern.ep.PeerWorld.symmetric(None, max(Ms + [1]), c["H"], k, dtype=dtype)
    tag = f"W={W} rank {rank} path {path} case {c}"
    out, handle = moekern.ep.dispatch(xs[rank].to(device), ids[rank].to(device), ws[rank].to(device), E,
                                      backend=path, fp8=c["fp8"], world=world)
    check_recv(out, ref, tag)
    y = apply_experts(out.expert_x, global_ids(out, rank, E, W), expert_fn)
    got = moekern.ep.combine(y, handle)
    assert_combined(got.cpu(), want, c["fp8"], f"{tag}: combine(layout='expert')")
    _sync(device)
    got = moekern.ep.combine(token_partial(out, rank, E, W).to(device), handle, layout="token")
    assert_combined(got.cpu(), want, c["fp8"], f"{tag}: combine(layout='token')")
    _sync(device)


def _rank_worker(rank, W, port, device_kind, cases, paths):
    import torch.distributed as dist

    device = _init(rank, W, port, device_kind)
    try:
        for c in cases:
            for path in paths:
                check_case(rank, W, c, device, path)
        _sync(device)
    finally:
        dist.destroy_process_group()


def gpu_cases():
    """The edge cases of tests/test_ep.py plus realistic widths (E = 8 experts per rank, k = 8)."""
    zero_some = [0 if r % 2 else 50 for r in range(8)]
    big = dict(E_per_rank=8, k=8, H=2048, bf16=True)
    return _edge_cases() + [
        dict(seed=11, skew="uniform", Ms=[128] * 8, fp8=False, **big),
        dict(seed=12, skew="zipf", Ms=[128, 0, 37, 128, 1, 64, 0, 100], fp8=True, **big),
        dict(seed=13, skew="one_rank", Ms=[64] * 8, fp8=False, **big),  # every token to rank 0
        dict(seed=14, skew="empty_rank", Ms=zero_some, fp8=False, **big),  # the last rank receives nothing
        dict(seed=15, skew="uniform", Ms=[0] * 8, fp8=True, **big),  # M = 0 everywhere
    ]


# ---------------------------------------------------------------------------------------- GPU tests


def _gpu_world_sizes():
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return sorted({2, min(max(n, 2), 8)})


@pytest.mark.gpu
@pytest.mark.parametrize("W", _gpu_world_sizes())
def test_ep_multigpu_both_paths(W):
    n = torch.cuda.device_count()
    if n < W:
        pytest.skip(f"needs {W} CUDA devices; found {n}")
    run_ranks(_rank_worker, W, ("cuda", gpu_cases(), ("nccl", "peer")), timeout_s=360)


# ---------------------------------------------------------------------------------------- CPU proofs


def test_rank_harness_gloo_cpu():
    """The GPU test's worker, on 2 gloo ranks with the portable path (the peer path needs GPUs)."""
    small = [{**c, "H": 8} for c in _edge_cases()]
    run_ranks(_rank_worker, 2, ("cpu", small, ("nccl",)), timeout_s=90)


def _failing_worker(rank, W, port, mode):
    if rank == 1:
        if mode == "raise":
            raise RuntimeError("rank one failed on purpose")
        time.sleep(60)


def test_rank_harness_reports_child_traceback():
    with pytest.raises(Exception, match=r"(?s)Process 1 terminated.*rank one failed on purpose"):
        run_ranks(_failing_worker, 2, ("raise",), timeout_s=60)


def test_rank_harness_times_out():
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match=r"ranks still running: \[1\]"):
        # 20 s: rank 0 must be done by then even on a loaded 2-core machine (spawn + torch import took > 3 s
        # there); rank 1 sleeps 60 s
        run_ranks(_failing_worker, 2, ("hang",), timeout_s=20)
    assert time.monotonic() - t0 < 50


def test_bench_distributed_gloo_cpu(tmp_path):
    """bench_ep.py --distributed under torchrun on 2 gloo CPU ranks: JSON written by rank 0, portable path
    timed, peer path skipped with its reason, per-rank byte counts matching the routing the ranks drew."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
           str(_free_port()), os.path.join(ROOT, "benchmarks", "bench_ep.py"), "--distributed", "--tiny",
           "--reps", "3", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads((tmp_path / "bench_ep_w2.json").read_text())
    assert doc["mode"] == "distributed" and doc["world_size"] == 2 and doc["backend"] == "gloo" and doc["complete"]
    assert doc["gpu_count"] == 0 and doc["torch"] == torch.__version__ and doc["date"]
    assert "needs CUDA" in doc["peer_skipped"] and doc["peer_bandwidth"] is None
    bench = _load_bench("bench_ep")
    want_cases = [(p, M, H, E, s) for p, M, H, E in bench.TINY_CASES for s in ("uniform", "zipf")]
    assert [(r["phase"], r["tokens_per_rank"], r["hidden"], r["num_experts"], r["skew"]) for r in doc["results"]] \
        == want_cases
    for r in doc["results"]:
        assert r["nccl_dispatch_us"] > 0 and r["nccl_combine_us"] > 0
        assert r["peer_dispatch_us"] is None and r["peer_dispatch_speedup_vs_nccl"] is None
        assert "needs CUDA" in r["peer_skipped"]
        # remote tokens: recomputed from the inputs each rank drew
        remote = []
        for rank in range(2):
            _, ids, _ = bench.rank_inputs(r["phase"], r["tokens_per_rank"], r["hidden"], r["num_experts"], r["skew"],
                                          rank, "cpu")
            dest = torch.div(ids.long(), r["num_experts"] // 2, rounding_mode="floor")
            remote.append(int((dest != rank).any(dim=1).sum()))
        assert r["tokens_remote_per_rank_mean"] == sum(remote) / 2
        assert r["dispatch_bytes_remote_per_rank_mean"] == r["tokens_remote_per_rank_mean"] * (r["hidden"] * 2 + 17 * 4)
        assert r["nccl_dispatch_algbw_GBps"] == pytest.approx(
            r["dispatch_bytes_remote_per_rank_mean"] / (r["nccl_dispatch_us"] * 1e-6) / 1e9)
    assert "peer path skipped" in proc.stdout and "wrote" in proc.stdout


def test_bench_zipf_hot_experts_shared_by_ranks():
    bench = _load_bench("bench_ep")
    a = bench.rank_inputs("decode", 4096, 8, 64, "zipf", 0, "cpu")[1]
    b = bench.rank_inputs("decode", 4096, 8, 64, "zipf", 1, "cpu")[1]
    assert not torch.equal(a, b)  # own tokens per rank
    hot_a = torch.bincount(a.flatten().long(), minlength=64).topk(4).indices.sort().values
    hot_b = torch.bincount(b.flatten().long(), minlength=64).topk(4).indices.sort().values
    assert torch.equal(hot_a, hot_b)  # the same popular experts


# ------------------------------------------------------------------------------------ report (synthetic)


def _synthetic_run(W, nccl_us, peer_us, bw_Bps=400e9, peer=True):
    report = _load_bench("ep_report")
    rows = []
    for skew, scale in (("uniform", 1.0), ("zipf", 2.0)):
        remote = 128 * (W - 1) / W * 4  # a made-up token count that grows with W
        row = dict(phase="decode", tokens_per_rank=128, hidden=7168, num_experts=256, top_k=8, world_size=W,
                   skew=skew, payload="bf16", nccl_dispatch_us=nccl_us * scale, nccl_combine_us=nccl_us * scale / 2,
                   peer_dispatch_us=peer_us * scale if peer else None,
                   peer_combine_us=peer_us * scale / 2 if peer else None,
                   tokens_remote_per_rank_mean=remote, dispatch_bytes_remote_per_rank_mean=remote * (7168 * 2 + 68),
                   combine_bytes_remote_per_rank_mean=remote * 7168 * 2)
        report.derive_row(row, {"bytes_per_s": bw_Bps} if peer else None)
        rows.append(row)
    return dict(mode="distributed", world_size=W, device="synthetic", gpu_count=8, driver="0", torch="t", triton="t",
                nccl="n", date="2026-01-01", peer_bandwidth={"bytes_per_s": bw_Bps} if peer else None,
                peer_skipped=None if peer else "synthetic", results=rows)


def test_derive_targets():
    report = _load_bench("ep_report")
    row = dict(dispatch_bytes_remote_per_rank_mean=1e9, combine_bytes_remote_per_rank_mean=1e9,
               nccl_dispatch_us=4000.0, peer_dispatch_us=2000.0, nccl_combine_us=3000.0, peer_combine_us=2500.0)
    report.derive_row(row, {"bytes_per_s": 600e9})
    assert row["peer_dispatch_algbw_GBps"] == pytest.approx(500.0)
    assert row["peer_dispatch_speedup_vs_nccl"] == pytest.approx(2.0)
    assert row["peer_dispatch_fraction_of_peer_bw"] == pytest.approx(500 / 600)
    assert row["peer_dispatch_meets_targets"] is True
    assert row["peer_combine_speedup_vs_nccl"] == pytest.approx(1.2)
    assert row["peer_combine_meets_targets"] is False  # 1.2x < 1.5x
    row2 = dict(row, peer_dispatch_us=None, peer_combine_us=None)
    report.derive_row(row2, None)
    assert row2["peer_dispatch_speedup_vs_nccl"] is None and row2["peer_dispatch_meets_targets"] is None
    assert "decode" not in report.format_table(dict(world_size=2, device="d", torch="t", triton="t", date="x",
                                                   peer_bandwidth=None, results=[]))


def test_report_scaling_synthetic(tmp_path):
    report = _load_bench("ep_report")
    # W=2: 100 us; W=4: 150 us; W=8: 300 us (peer: half of each)
    for W, t in ((2, 100.0), (4, 150.0), (8, 300.0)):
        (tmp_path / f"bench_ep_w{W}.json").write_text(json.dumps(_synthetic_run(W, t, t / 2)))
    (tmp_path / "bench_ep.json").write_text(json.dumps({"bench": "emulated", "results": []}))  # ignored
    doc = report.write_report(str(tmp_path), str(tmp_path / "rep"))
    assert doc["world_sizes"] == [2, 4, 8]
    s = next(s for s in doc["scaling"] if s["backend"] == "nccl" and s["op"] == "dispatch" and "uniform" in s["case"])
    # algbw(W) = bytes(W) / t(W), bytes proportional to (W-1)/W: eff(4) = (3/4)/(1/2) * 100/150 = 1.0
    assert s["efficiency_vs_w2"][2] == pytest.approx(1.0)
    assert s["efficiency_vs_w2"][4] == pytest.approx(1.0)
    assert s["efficiency_vs_w2"][8] == pytest.approx((7 / 8) / (1 / 2) * 100 / 300)
    assert s["time_ratio_w2_over_w"][8] == pytest.approx(100 / 300)
    assert len(doc["scaling"]) == 2 * 2 * 2  # cases x backends x ops
    t = [t for t in doc["targets"] if t["world_size"] == 8 and t["op"] == "dispatch"]
    assert all(x["speedup"] == pytest.approx(2.0) for x in t)
    out = json.loads((tmp_path / "rep" / "ep_scaling.json").read_text())
    assert out["world_sizes"] == [2, 4, 8]
    md = (tmp_path / "rep" / "ep_scaling.md").read_text()
    assert "eff W=8" in md and "| 8 | decode M=128 H=7168 E=256 uniform | dispatch | 2.00 |" in md
    assert (tmp_path / "rep" / "ep_scaling.png").stat().st_size > 1000


def test_report_missing_w2_and_skipped_peer(tmp_path):
    report = _load_bench("ep_report")
    (tmp_path / "bench_ep_w4.json").write_text(json.dumps(_synthetic_run(4, 100.0, 50.0, peer=False)))
    doc = report.write_report(str(tmp_path))
    assert {s["backend"] for s in doc["scaling"]} == {"nccl"}  # no peer numbers, no peer rows
    assert all(v is None for s in doc["scaling"] for v in s["efficiency_vs_w2"].values())


def test_report_errors(tmp_path):
    report = _load_bench("ep_report")
    with pytest.raises(FileNotFoundError, match="no distributed"):
        report.write_report(str(tmp_path))
    (tmp_path / "bench_ep_w2.json").write_text(json.dumps(_synthetic_run(2, 100.0, 50.0)))
    (tmp_path / "bench_ep_w2b.json").write_text(json.dumps(_synthetic_run(2, 100.0, 50.0)))
    with pytest.raises(ValueError, match="two runs with world_size=2"):
        report.write_report(str(tmp_path))


def test_bench_report_cli(tmp_path):
    """bench_ep.py --report DIR delegates to ep_report (no GPU, no torchrun)."""
    for W, t in ((2, 100.0), (4, 120.0)):
        (tmp_path / f"bench_ep_w{W}.json").write_text(json.dumps(_synthetic_run(W, t, t / 2)))
    bench = _load_bench("bench_ep")
    bench.main(["--report", str(tmp_path)])
    assert (tmp_path / "ep_scaling.md").exists() and (tmp_path / "ep_scaling.png").exists()
