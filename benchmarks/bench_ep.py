"""Kernel-side cost of moekern.ep dispatch/combine with W = 8 ranks emulated on one GPU.

    python benchmarks/bench_ep.py --out DIR        # writes DIR/bench_ep.json (< 2 min on an H100)

For each case (decode 128 / prefill 4096 tokens per rank; DeepSeek-V3-like H=7168, E=256 and
Mixtral-like H=4096, E=64; k=8; uniform or Zipf(1.2) routing) it times, per rank (the W emulated ranks'
total / W), with CUDA-event timing after warm-up (triton.testing.do_bench):
  peer_dispatch   moekern.ep.dispatch_emulated: layout, counts, the Triton write kernel into the peers'
                  regions, copy-out and grouping by local expert (expert_x);
  peer_write      the write kernel alone;
  peer_combine    moekern.ep.combine_emulated: local weighted reduce kernel + pull kernel;
  torch_dispatch  the portable path's torch ops with a local copy in place of all_to_all_single;
  torch_combine   its combine (torch local reduce, local copy, per-rank index_add).
Bytes moved per rank (payload + metadata; combine partials) and the time they need at the measured
device-to-device copy bandwidth are recorded, so multi-GPU runs can be set against the same model.
On one GPU the "peer" stores land in local HBM: the times are kernel-side costs, not NVLink times.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

W = 8
CASES = [  # (phase, tokens per rank, H, E)
    ("decode", 128, 7168, 256), ("decode", 128, 4096, 64),
    ("prefill", 4096, 7168, 256), ("prefill", 4096, 4096, 64),
]
K = 8


def make_routing(M, E, skew, gen, device):
    if skew == "uniform":
        p = torch.ones(E)
    else:
        p = 1.0 / torch.arange(1, E + 1, dtype=torch.float64) ** 1.2
        p = p[torch.randperm(E, generator=gen)]  # hot experts spread over ranks at random
    ids = torch.multinomial(p.float().expand(M, E), K, replacement=False, generator=gen).to(torch.int32)
    w = torch.rand(M, K, generator=gen)
    return ids.to(device), (w / w.sum(1, keepdim=True)).to(device)


def torch_dispatch(xs, ids, ws, E):
    """The portable path's work for all W ranks, all_to_all_single replaced by a local gather of chunks."""
    from moekern.ep import layout as L

    El = E // W
    lays = [L.send_layout(i, El, W) for i in ids]
    sends = []
    for r in range(W):
        lay = lays[r]
        dest = torch.repeat_interleave(torch.arange(W, device=xs[r].device), lay.send_counts)
        meta = L.local_meta(ids[r], ws[r], lay.send_token_idx, dest, El)
        counts = lay.send_counts.tolist()
        sends.append((xs[r][lay.send_token_idx].split(counts), meta.split(counts)))
    outs = []
    for d in range(W):
        recv_x = torch.cat([sends[r][0][d] for r in range(W)])  # the "all_to_all" as a local copy
        recv_meta = torch.cat([sends[r][1][d] for r in range(W)])
        rids, rw, _ = L.split_meta(recv_meta, K)
        g = L.group_by_local_expert(rids, El)
        outs.append((recv_x[torch.div(g.sorted_slots, K, rounding_mode="floor")], g, rw))
    return lays, outs


def torch_combine(lays, outs, ys):
    from moekern.ep import layout as L

    parts = [L.local_reduce(y, g.slot_to_row, rw).to(y.dtype) for y, (_, g, rw) in zip(ys, outs)]
    # rank d's partial rows are ordered by source rank: split them back per source ("all_to_all" back)
    chunks = [p.split([int(lays[r].send_counts[d]) for r in range(W)]) for d, p in enumerate(parts)]
    res = []
    for r in range(W):
        M = lays[r].rank_mask.shape[0]
        out = torch.zeros(M, ys[0].shape[1], dtype=torch.float32, device=ys[0].device)
        start = 0
        idx = lays[r].send_token_idx
        for d in range(W):
            n = int(lays[r].send_counts[d])
            out.index_add_(0, idx[start:start + n], chunks[d][r].float())
            start += n
        res.append(out.to(ys[0].dtype))
    return res


def copy_bandwidth(device):
    from triton.testing import do_bench

    n = 1 << 30
    a = torch.empty(n, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    ms = do_bench(lambda: b.copy_(a), warmup=25, rep=200)
    return n / (ms * 1e-3), ms


def run(out_dir, quick=False):
    import triton
    from triton.testing import do_bench

    import moekern.ep as ep
    from moekern.ep import peer

    device = "cuda"
    gen = torch.Generator().manual_seed(0)
    bw, _ = copy_bandwidth(device)
    results = []
    cases = CASES[:2] if quick else CASES
    rep = 30 if quick else 60
    for phase, M, H, E in cases:
        for skew in ("uniform", "zipf"):
            for fp8 in ((False, True) if (skew == "uniform" and H == 7168) else (False,)):
                t0 = time.time()
                xs = [torch.randn(M, H, generator=gen).to(torch.bfloat16).to(device) for _ in range(W)]
                routed = [make_routing(M, E, skew, gen, device) for _ in range(W)]
                ids = [r[0] for r in routed]
                ws = [r[1] for r in routed]
                world = ep.PeerWorld.emulated(W, M, H, K, dtype=torch.bfloat16, device=device)
                res = ep.dispatch_emulated(world, xs, ids, ws, E, fp8=fp8)
                ys = [o.expert_x for o, _ in res]  # identity experts: the cost under test is data movement
                handles = [h for _, h in res]
                t_disp = do_bench(lambda: ep.dispatch_emulated(world, xs, ids, ws, E, fp8=fp8), warmup=5, rep=rep)
                t_comb = do_bench(lambda: ep.combine_emulated(ys, handles), warmup=5, rep=rep)
                plans = [peer._plan_send(xs[r], ids[r], ws[r], E, W, fp8) for r in range(W)]
                counts = torch.stack([p.status for p in plans])[:, :W]
                t_write = do_bench(lambda: [peer._send(world, r, plans[r], counts, E) for r in range(W)],
                                   warmup=5, rep=rep)
                row = dict(phase=phase, tokens_per_rank=M, hidden=H, num_experts=E, top_k=K, world_size=W,
                           skew=skew, payload="fp8_e4m3+fp32 scale" if fp8 else "bf16",
                           peer_dispatch_us=1e3 * t_disp / W, peer_write_us=1e3 * t_write / W,
                           peer_combine_us=1e3 * t_comb / W)
                if not fp8:
                    lays, outs = torch_dispatch(xs, ids, ws, E)
                    tys = [o[0] for o in outs]
                    # the two paths must agree before their times mean anything
                    for (o, _), (tx, _, _) in zip(res, outs):
                        assert torch.equal(o.expert_x, tx), "peer and torch dispatch disagree"
                    row["torch_dispatch_us"] = 1e3 * do_bench(lambda: torch_dispatch(xs, ids, ws, E),
                                                              warmup=3, rep=rep) / W
                    row["torch_combine_us"] = 1e3 * do_bench(lambda: torch_combine(lays, outs, tys),
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
    doc = dict(
        bench="moekern.ep dispatch/combine, W=8 ranks emulated on one GPU",
        device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
        python=platform.python_version(),
        bandwidth_model=dict(kind="device-to-device copy on one GPU (torch copy_ of 1 GiB, bytes copied per second;"
                                  " read+write traffic is twice this)", bytes_per_s=bw),
        timing="triton.testing.do_bench (CUDA events, after warm-up), all W emulated ranks' work / W; "
               "includes the host syncs that the counts force",
        results=results,
    )
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "bench_ep.json")
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)
    print("wrote", path)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="directory for bench_ep.json")
    ap.add_argument("--quick", action="store_true", help="decode cases only")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_ep.py needs a CUDA GPU")
    run(args.out, args.quick)
