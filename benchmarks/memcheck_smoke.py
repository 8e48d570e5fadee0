"""Exercise every moekern device kernel once at small, awkward shapes; meant to run under
`compute-sanitizer --tool memcheck --error-exitcode 9 python3 benchmarks/memcheck_smoke.py`.

Shapes are chosen to hit edges: E not a power of two, M = 1, all tokens to one expert, empty experts,
odd hidden sizes. Each result is also compared with the reference, so a clean run means in-bounds and right.
"""

import torch

import moekern
from moekern._ext import cuda_kernels_available
from moekern.dispatch.reference import align_reference, fused_moe_reference, permute_reference

torch.manual_seed(0)
dev = "cuda"
backends = ["triton"] + (["cuda"] if cuda_kernels_available() else [])
for be in backends:
    for M, E, k, grouped in [(1, 8, 2, False), (7, 60, 4, False), (33, 256, 8, True), (5, 1, 1, False)]:
        logits = torch.randn(M, E, device=dev, dtype=torch.bfloat16)
        kw = dict(scoring="sigmoid", correction_bias=torch.randn(E, device=dev), num_expert_group=8,
                  topk_group=4) if grouped else {}
        out = moekern.fused_topk(logits, k, backend=be, **kw)
        ref = moekern.fused_topk(logits, k, backend="torch", **kw)
        assert torch.equal(out.topk_ids.cpu(), ref.topk_ids.cpu()), (be, M, E)
        assert torch.equal(out.expert_counts.cpu(), ref.expert_counts.cpu()), (be, M, E)
        for ids in (out.topk_ids, torch.zeros_like(out.topk_ids) if k == 1 else out.topk_ids):
            a = moekern.align(ids, E, 16, backend=be)
            r = align_reference(ids, E, 16)
            assert all(torch.equal(x.cpu(), y.cpu()) for x, y in zip(a, r)), (be, "align", M, E)
        x = torch.randn(M, 72, device=dev, dtype=torch.bfloat16)
        p, lay = moekern.permute(x, out.topk_ids, E, backend=be)
        pr, _ = permute_reference(x, out.topk_ids, E)
        assert torch.equal(p.cpu(), pr.cpu())
        y = moekern.unpermute(p, lay, out.topk_weights, backend=be)
        assert y.shape == x.shape
    # a small MoE layer
    M, E, k, H, inter = 9, 8, 2, 64, 32
    x = torch.randn(M, H, device=dev, dtype=torch.bfloat16)
    w13 = torch.randn(E, 2 * inter, H, device=dev, dtype=torch.bfloat16) * H ** -0.5
    w2 = torch.randn(E, H, inter, device=dev, dtype=torch.bfloat16) * inter ** -0.5
    logits = torch.randn(M, E, device=dev)
    y = moekern.fused_moe(x, w13, w2, logits, k, backend=be)
    r = moekern.fused_topk(logits, k, backend="torch")
    yr = fused_moe_reference(x, w13, w2, r.topk_weights, r.topk_ids)
    rel = ((y.float() - yr.float()).norm() / yr.float().norm()).item()
    assert rel < 2e-2, rel
torch.cuda.synchronize()
print("memcheck smoke: all kernels ran and matched the references for backends", backends)
