"""Exercise every moekern device kernel once at small, awkward shapes; meant to run under
`compute-sanitizer --tool memcheck --error-exitcode 9 python3 tools/gpu/memcheck_smoke.py`.

Shapes are chosen to hit edges: E not a power of two, E = 1, M = 1, all tokens to one expert, empty experts,
odd hidden sizes, unaligned logits, grids of one and of many blocks. Every result is also compared with its
plain-PyTorch reference (ids, counts, indices and rows exactly), so a clean run means in-bounds and right.

Sections (each prints its wall time; the whole script is meant to stay well under a minute under memcheck):
  1. routing, cuda backend: every kernel path (auto, single_block, multi_block, legacy, compact, and the
     reduction-selection kernel's grids redux_single, redux_multi, redux_atomic) against the torch reference,
     incl. DeepSeek-V3 grouped selection, the 512-expert bucket, the group geometry that falls back to v1, and M large enough for the multi-block ticket reduction;
  2. routing, align, permute, unpermute and a small fused_moe, triton and cuda backends, and every plan of the
     cuda align (moe_align_variant);
  3. expert parallel, the peer-write path (Triton kernels that store into other ranks' receive buffers),
     W = 4 ranks emulated on this GPU: dispatch and combine (both layouts) against moekern/ep/reference.py.
  4. the EP low-latency mode, same ranks: exact combine, and an overflowing capacity (drops must stay in bounds).
No vLLM needed. The caching allocator is off unless the caller set PYTORCH_NO_CUDA_MEMORY_CACHING: each tensor
is then its own allocation, so memcheck sees a write past one buffer (e.g. a peer region) instead of it
landing silently in a neighbour carved from the same segment.
"""

import os

os.environ.setdefault("PYTORCH_NO_CUDA_MEMORY_CACHING", "1")

import time  # noqa: E402

import torch  # noqa: E402

import moekern  # noqa: E402
from moekern._ext import cuda_kernels_available  # noqa: E402
from moekern.dispatch.reference import align_reference, permute_reference  # noqa: E402
from moekern.experts.reference import fused_moe_reference  # noqa: E402
from moekern.routing.reference import fused_topk_reference  # noqa: E402

DEV = "cuda"
CUDA_VARIANTS = ("auto", "legacy", "single_block", "multi_block", "compact", "redux_single", "redux_multi",
                 "redux_atomic")


def _equal(got, want, what):
    got, want = got.cpu(), want.cpu()
    assert got.dtype == want.dtype and torch.equal(got, want), f"{what} differs:\n{got}\n{want}"


# ------------------------------------------------------------------------------------------ 1. cuda routing

# (M, E, k, scoring, renormalize, has_bias, groups, topk_group, scale, dtype, unaligned)
ROUTING_CASES = [
    (1, 8, 2, "softmax", True, False, 0, 0, 1.0, torch.bfloat16, False),        # Mixtral, M = 1
    (3000, 8, 2, "softmax", True, False, 0, 0, 1.0, torch.bfloat16, False),     # multi-block, one thread per token
    (7, 60, 4, "softmax", True, False, 0, 0, 1.0, torch.bfloat16, False),       # E = 60: rows not 16-byte aligned
    (40, 60, 5, "sigmoid", False, True, 0, 0, 2.0, torch.float32, False),
    (5, 1, 1, "softmax", True, False, 0, 0, 1.0, torch.bfloat16, False),        # E = 1
    (300, 128, 8, "softmax", True, False, 0, 0, 1.0, torch.bfloat16, True),     # logits off 16 bytes: scalar loads
    (3000, 128, 8, "softmax", True, False, 0, 0, 1.0, torch.float16, False),    # Qwen3, multi-block
    (33, 256, 8, "sigmoid", True, True, 8, 4, 2.5, torch.bfloat16, False),      # DeepSeek-V3, grouped
    (300, 256, 8, "sigmoid", True, True, 8, 4, 2.5, torch.bfloat16, False),     # DeepSeek-V3, multi-block
    (9, 512, 16, "softmax", True, False, 0, 0, 1.0, torch.float32, False),      # the 512 bucket, k = 16
    (20, 16, 2, "softmax", True, False, 4, 2, 1.0, torch.bfloat16, False),      # 4-expert groups: auto falls to v1
]


def routing_cuda_variants():
    from moekern.routing.cuda_topk import fused_topk_cuda

    g = torch.Generator(device=DEV).manual_seed(0)
    for M, E, k, scoring, renorm, has_bias, G, gk, scale, dtype, unaligned in ROUTING_CASES:
        if unaligned:
            logits = torch.randn(M * E + 1, device=DEV, generator=g).to(dtype)[1:].view(M, E)
        else:
            logits = torch.randn(M, E, device=DEV, generator=g).to(dtype)
        bias = (torch.randn(E, device=DEV, generator=g) * 0.1) if has_bias else None
        rw, rids, rcounts = fused_topk_reference(
            logits, k, scoring=scoring, renormalize=renorm, correction_bias=bias, num_expert_group=G or None,
            topk_group=gk or None, routed_scaling_factor=scale)
        for variant in CUDA_VARIANTS:
            w, ids, counts = fused_topk_cuda(logits, k, scoring, renorm, bias, G, gk, scale, variant)
            tag = f"cuda routing {variant} M={M} E={E} k={k} {scoring} G={G} {dtype}"
            _equal(ids, rids, f"{tag}: ids")
            _equal(counts, rcounts, f"{tag}: counts")
            torch.testing.assert_close(w, rw, rtol=1e-5, atol=1e-5, equal_nan=True, msg=lambda m: f"{tag}\n{m}")


# ------------------------------------------------------------------------------------------ 2. per backend

def routing_dispatch_moe(be):
    torch.manual_seed(0)
    # 33 x 256 grouped, 200 x 128 and 300 x 8: route_and_align's grid tier (3, 13 and 5 blocks)
    for M, E, k, grouped in [(1, 8, 2, False), (7, 60, 4, False), (33, 256, 8, True), (5, 1, 1, False),
                             (200, 128, 8, False), (300, 8, 2, False)]:
        logits = torch.randn(M, E, device=DEV, dtype=torch.bfloat16)
        kw = dict(scoring="sigmoid", correction_bias=torch.randn(E, device=DEV), num_expert_group=8,
                  topk_group=4) if grouped else {}
        out = moekern.fused_topk(logits, k, backend=be, **kw)
        ref = moekern.fused_topk(logits, k, backend="torch", **kw)
        _equal(out.topk_ids, ref.topk_ids, f"{be} routing M={M} E={E}: ids")
        _equal(out.expert_counts, ref.expert_counts, f"{be} routing M={M} E={E}: counts")
        for block in (1, 16):  # routing + align (one launch on the cuda backend)
            ra = moekern.route_and_align(logits, k, block_size=block, backend=be, **kw)
            _equal(ra.topk_ids, ref.topk_ids, f"{be} route_and_align M={M} E={E}: ids")
            assert all(torch.equal(x.cpu(), y.cpu()) for x, y in zip(ra[3:], align_reference(ref.topk_ids, E, block)))
        for ids in (out.topk_ids, torch.zeros_like(out.topk_ids) if k == 1 else out.topk_ids):
            a = moekern.align(ids, E, 16, backend=be)
            r = align_reference(ids, E, 16)
            assert all(torch.equal(x.cpu(), y.cpu()) for x, y in zip(a, r)), (be, "align", M, E)
        x = torch.randn(M, 72, device=DEV, dtype=torch.bfloat16)
        p, lay = moekern.permute(x, out.topk_ids, E, backend=be)
        pr, _ = permute_reference(x, out.topk_ids, E)
        _equal(p, pr, f"{be} permute M={M} E={E}")
        y = moekern.unpermute(p, lay, out.topk_weights, backend=be)
        assert y.shape == x.shape
    # a small MoE layer
    M, E, k, H, inter = 9, 8, 2, 64, 32
    x = torch.randn(M, H, device=DEV, dtype=torch.bfloat16)
    w13 = torch.randn(E, 2 * inter, H, device=DEV, dtype=torch.bfloat16) * H ** -0.5
    w2 = torch.randn(E, H, inter, device=DEV, dtype=torch.bfloat16) * inter ** -0.5
    logits = torch.randn(M, E, device=DEV)
    y = moekern.fused_moe(x, w13, w2, logits, k, backend=be)
    r = moekern.fused_topk(logits, k, backend="torch")
    yr = fused_moe_reference(x, w13, w2, r.topk_weights, r.topk_ids)
    rel = ((y.float() - yr.float()).norm() / yr.float().norm()).item()
    assert rel < 2e-2, rel


def align_plans():
    """Every plan of the cuda align (moe_align_variant: 1-16 slots per thread, one CTA or several after a
    histogram launch, hardware or ballot match, pads by warp or by thread) at slot counts just past each plan's
    chunk, odd block sizes."""
    for n, E, B in ((1, 1, 1), (513, 7, 3), (1025, 128, 16), (2049, 256, 64), (4097, 512, 1), (8193, 60, 128)):
        ids = torch.randint(0, E, (n, 1), device=DEV, dtype=torch.int32)
        ref = align_reference(ids, E, B)
        for spt in (0, 1, 2, 4, 8, 16):
            for ballot, pads in ((False, False), (True, False), (False, True)):
                got = torch.ops.moekern.moe_align_variant(ids, E, B, None, spt, ballot, pads)
                assert all(torch.equal(x, y) for x, y in zip(got, ref)), ("align plan", n, E, B, spt, ballot, pads)
    # Inconsistent expert_counts through the raw op (moekern.align checks them; the op does not): the layout is
    # then meaningless, but every write must stay inside the outputs (memcheck is the judge here).
    ids = torch.zeros(600, 1, device=DEV, dtype=torch.int32)
    for bad in (5000, -5000, 2**30):
        counts = torch.zeros(256, device=DEV, dtype=torch.int32)
        counts[0], counts[255] = bad, -bad
        for spt, ballot, pads in ((0, False, False), (1, False, False), (1, False, True), (2, True, False)):
            torch.ops.moekern.moe_align_variant(ids, 256, 16, counts, spt, ballot, pads)


# ------------------------------------------------------------------------------------------ 3. EP peer writes

def _expert_fn(x, e):
    return x * (e + 1)  # exact on the small integers below, in bf16 and fp32


def _ep_inputs(seed, W, E, k, H, Ms, one_rank, dtype):
    """Per-rank x (small integers), distinct ids per token and dyadic weights, on the CPU."""
    g = torch.Generator().manual_seed(seed)
    p = torch.ones(E)
    if one_rank:  # every token to rank 0's experts (k of them at least): the busiest receiver
        p[max(E // W, k):] = 0.0
    xs = [torch.randint(-4, 5, (M, H), generator=g).to(dtype) for M in Ms]
    ids = [torch.stack([torch.multinomial(p, k, generator=g) for _ in range(M)]).to(torch.int32) if M
           else torch.empty(0, k, dtype=torch.int32) for M in Ms]
    ws = [torch.randint(1, 5, (M, k), generator=g).float() / 4 for M in Ms]
    return xs, ids, ws


def _token_partial(out, rank, El):
    """[R, H]: the receiver's weighted sum over its local experts per received token (layout='token')."""
    from moekern.ep.reference import apply_experts

    x = out.recv_x.cpu()
    acc = torch.zeros(x.shape[0], x.shape[1])
    for j in range(out.recv_topk_ids.shape[1]):
        lid = out.recv_topk_ids[:, j].cpu().long()
        on = lid >= 0
        if on.any():
            acc[on] += apply_experts(x[on], lid[on] + rank * El, _expert_fn).float() * \
                out.recv_topk_weights[on, j].cpu().unsqueeze(1)
    return acc.to(x.dtype)


def ep_peer_emulated():
    from moekern.ep.reference import apply_experts, combine_reference, dispatch_reference, payload_reference

    W, El, H = 4, 2, 40  # H = 40: a partial BLOCK_H tile
    E = W * El
    cases = [  # (seed, k, Ms, one_rank, fp8, dtype)
        (1, 3, [5, 0, 1, 7], False, False, torch.bfloat16),  # an empty rank, a one-token rank
        (2, 2, [6, 3, 4, 2], True, False, torch.float32),    # everything lands on rank 0
        (3, 4, [3, 2, 0, 5], False, True, torch.bfloat16),   # fp8 payload with per-token scales
    ]
    for seed, k, Ms, one_rank, fp8, dtype in cases:
        xs, ids, ws = _ep_inputs(seed, W, E, k, H, Ms, one_rank, dtype)
        seen = [payload_reference(x.to(DEV), fp8).cpu() for x in xs]  # what receivers see (fp8: the round trip)
        world = moekern.ep.PeerWorld.emulated(W, max(Ms + [1]), H, k, dtype=dtype, device=DEV)
        res = moekern.ep.dispatch_emulated(world, [x.to(DEV) for x in xs], [i.to(DEV) for i in ids],
                                           [w.to(DEV) for w in ws], E, fp8=fp8)
        for d, ((out, _), ref) in enumerate(zip(res, dispatch_reference(seen, ids, ws, E))):
            tag = f"ep dispatch seed={seed} rank {d}"
            for name in ("recv_x", "recv_topk_ids", "recv_topk_weights", "recv_src_rank", "recv_src_token"):
                _equal(getattr(out, name), getattr(ref, name), f"{tag}: {name}")
            lid = out.recv_topk_ids.cpu().long()
            slots = torch.nonzero(lid >= 0)  # expert_x: received rows by local expert, then token, then slot
            order = torch.argsort(lid[slots[:, 0], slots[:, 1]] * (lid.numel() + 1) + slots[:, 0] * k + slots[:, 1])
            _equal(out.expert_x, out.recv_x.cpu()[slots[order, 0]], f"{tag}: expert_x")
            _equal(out.expert_counts.long(), torch.bincount(lid[lid >= 0], minlength=El), f"{tag}: expert_counts")
        want = combine_reference(seen, ids, ws, E, _expert_fn)
        handles = [h for _, h in res]
        ys = [apply_experts(out.expert_x, torch.repeat_interleave(
            torch.arange(El, device=DEV), out.expert_counts.long()) + d * El, _expert_fn)
            for d, (out, _) in enumerate(res)]
        parts = [_token_partial(out, d, El).to(DEV) for d, (out, _) in enumerate(res)]
        for layout, outs in (("expert", ys), ("token", parts)):
            got = moekern.ep.combine_emulated(outs, handles, layout=layout)
            for d in range(W):
                tag = f"ep combine({layout}) seed={seed} rank {d}"
                if fp8:  # fp8 values are not short dyadics: the fused multiply-add may move a sum by an ulp
                    torch.testing.assert_close(got[d].cpu(), want[d], rtol=2 ** -6, atol=1e-6,
                                               msg=lambda m: f"{tag}\n{m}")
                else:
                    _equal(got[d], want[d], tag)


def ep_lowlat_emulated():
    """The low-latency mode (moekern.ep.lowlat): fixed slots, in-band counts. Exact combine at the default
    capacity; then a capacity of 1 so most pairs overflow: the kernels must drop them in bounds and flag them."""
    from moekern.ep.lowlat import OVERFLOW_RECV, OVERFLOW_SEND
    from moekern.ep.reference import combine_reference

    W, El, H = 4, 2, 40
    E = W * El
    for seed, k, Ms, one_rank, dtype in ((4, 3, [5, 0, 1, 7], False, torch.bfloat16),
                                         (5, 2, [6, 3, 4, 2], True, torch.float32)):
        xs, ids, ws = _ep_inputs(seed, W, E, k, H, Ms, one_rank, dtype)
        for cap in (None, 1):
            world = moekern.ep.LLWorld.emulated(W, max(Ms + [1]), H, k, E, dtype=dtype, device=DEV, capacity=cap)
            res = moekern.ep.dispatch_ll_emulated(world, [x.to(DEV) for x in xs], [i.to(DEV) for i in ids],
                                                  [w.to(DEV) for w in ws], E)
            # expert e of rank d multiplies by d*El + e + 1: _expert_fn on global ids
            ys = [out.recv_x * (torch.arange(El, device=DEV) + d * El + 1).to(dtype)[:, None, None]
                  for d, (out, _) in enumerate(res)]
            got = moekern.ep.combine_ll_emulated(ys, [h for _, h in res])
            flags = [int(h.error_flag.item()) for _, h in res]
            if cap is None:
                assert not any(flags), f"ll seed={seed}: unexpected error flags {flags}"
                for d, want in enumerate(combine_reference(xs, ids, ws, E, _expert_fn)):
                    _equal(got[d], want, f"ll combine seed={seed} rank {d}")
            else:
                assert any(f & (OVERFLOW_SEND | OVERFLOW_RECV) for f in flags), f"ll cap=1: no overflow flag {flags}"


def main():
    t_all = time.perf_counter()
    backends = ["triton"] + (["cuda"] if cuda_kernels_available() else [])
    sections = []
    if "cuda" in backends:
        sections.append(("cuda routing, every variant", routing_cuda_variants))
        sections.append(("cuda align, every plan", align_plans))
    else:
        print("memcheck smoke: moekern._C has no device kernels; cuda routing and the cuda backend are not run")
    for be in backends:
        sections.append((f"{be}: routing, align, permute, unpermute, fused_moe", lambda be=be: routing_dispatch_moe(be)))
    sections.append(("ep peer-write dispatch/combine, W=4 emulated", ep_peer_emulated))
    sections.append(("ep low-latency dispatch/combine, W=4 emulated (incl. overflow)", ep_lowlat_emulated))
    for name, fn in sections:
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        print(f"memcheck smoke: {name}: ok ({time.perf_counter() - t0:.1f} s)")
    print(f"memcheck smoke: all kernels ran and matched the references for backends {backends} "
          f"(variants {list(CUDA_VARIANTS) if 'cuda' in backends else []}, ep peer) in {time.perf_counter() - t_all:.1f} s")


if __name__ == "__main__":
    main()
