"""The drivers of .ci/triton_compile_check.py: small calls of every public op that launch every Triton kernel.

The check records each launch these calls make under TRITON_INTERPRET=1 and compiles those specializations
for sm_90/sm_80. What is launched here is what gets compiled, so every path and dtype the GPU takes must be
reached: a `@triton.jit def _..._kernel` in moekern/ that no driver launches fails the check. Add a call here
when you add a kernel or a code path (a constexpr branch, a BlockConfig flag, a dtype).

Shapes are tiny (the interpreter is slow) but pointer dtypes follow the GPU (bf16 where it runs bf16) even
where interpreter math is unfaithful. Each driver takes the check's Capture: `cap.execute = False` records
launches without running them (for calls whose host code never reads a kernel's output), and
`with HopperOnly(cap, "_kernel_name")` tags launches compiled for sm_90 only (TMA, the sm_90-tuned table).
"""

from __future__ import annotations


class HopperOnly:
    """with HopperOnly(cap, "_grouped_gemm_kernel"): launches of that kernel inside are tagged "hopper_only" and
    compiled for sm_90 only (the other kernels a call launches, e.g. routing and align inside fused_moe, stay
    portable)."""

    tag = "hopper_only"

    def __init__(self, capture, *kernels: str):
        self.capture, self.kernels = capture, set(kernels)

    def __enter__(self):
        self.capture.tags[self.tag] = self.kernels

    def __exit__(self, *exc):
        self.capture.tags.pop(self.tag, None)


ROUTING_MODELS = ("mixtral", "qwen3-30b-a3b", "deepseek-v3", "olmoe", "qwen1.5-moe-a2.7b", "dbrx")  # E=60 k=4, E=16 k=4


def drive_topk(cap):
    import torch

    import moekern
    from moekern.models import get_model

    cap.execute = False  # nothing below reads the outputs on the host
    g = torch.Generator().manual_seed(0)
    for name in ROUTING_MODELS:
        spec = get_model(name)
        E, k, kw = spec.num_experts, spec.top_k, spec.routing_kwargs()
        bias = torch.randn(E, generator=g) if spec.correction_bias else None
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            for M in (1, 300):  # one row per program (decode) and several (BLOCK_M > 1, more warps)
                logits = torch.randn(M, E, generator=g).to(dtype)
                moekern.fused_topk(logits, k, correction_bias=bias, backend="triton", **kw)
    # sigmoid without bias and ungrouped; softmax without renormalization on a grouped model shape
    logits = torch.randn(5, 256, generator=g).to(torch.bfloat16)
    moekern.fused_topk(logits, 8, scoring="sigmoid", backend="triton")
    moekern.fused_topk(logits, 8, num_expert_group=8, topk_group=4, renormalize=False, backend="triton")


def drive_dispatch(cap):
    import torch

    import moekern
    from moekern.dispatch import triton_ops as T

    cap.execute = False  # align/permute outputs are only read by later launches
    g = torch.Generator().manual_seed(1)
    for E, k, M in ((8, 2, 5), (128, 8, 3), (256, 8, 3), (512, 8, 2)):
        ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(M)]).to(torch.int32)
        counts = torch.bincount(ids.reshape(-1).long(), minlength=E).to(torch.int32)
        for B in (1, 16, 64, 128):
            for c in (None, counts):
                T.align_triton(ids, E, B, c)  # path 1: one launch
            T.align_triton(ids, E, B, None, small_n=0, chunk=16)  # path 2: chunks, table read by every program
            T.align_triton(ids, E, B, counts, small_n=0, chunk=16, table_reads=0)  # path 3: + scan launch
        for c in (None, counts):
            T.permute_triton(torch.randn(M, 24, generator=g), ids, E, c)
        T.permute_triton(torch.randn(M, 24, generator=g), ids, E, None, small_n=0, chunk=16)
        T.permute_triton(torch.randn(M, 24, generator=g), ids, E, counts, small_n=0, chunk=16, table_reads=0)
    # the default path choice at GPU sizes (record-only, so free): the largest single-launch sort
    # (N_PAD 4096), chunks of 1024, and chunks of 8192 with the scan launch
    for E, k, M in ((256, 8, 512), (64, 8, 600), (256, 8, 40000)):
        ids = torch.randint(0, E, (M, k), generator=g, dtype=torch.int32)
        moekern.align(ids, E, 16, backend="triton")
    # public ops, each hidden dtype; unpermute with each weight dtype
    ids = torch.stack([torch.randperm(16, generator=g)[:4] for _ in range(6)]).to(torch.int32)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for H in (64, 40, 2048):  # H % 16 == 0 or not; BLOCK_H capped at 1024
            x = torch.randn(6, H, generator=g).to(dtype)
            permuted, layout = moekern.permute(x, ids, 16, backend="triton")
            for wdtype in (torch.float32, torch.bfloat16):
                w = torch.rand(6, 4, generator=g).to(wdtype)
                moekern.unpermute(permuted, layout, w, backend="triton")
        moekern.align(ids, 16, 64, backend="triton")


def drive_moe(cap):
    import torch

    import moekern
    from moekern.experts.configs import TUNED, BlockConfig

    cap.execute = False  # the layer's host code reads no kernel output
    g = torch.Generator().manual_seed(2)

    def layer(M, E, k, H, inter, dtype, cfg=None):
        x = torch.randn(M, H, generator=g).to(dtype)
        w13 = (torch.randn(E, 2 * inter, H, generator=g) / 8).to(dtype)
        w2 = (torch.randn(E, H, inter, generator=g) / 8).to(dtype)
        logits = torch.randn(M, E, generator=g)
        moekern.fused_moe(x, w13, w2, logits, k, backend="triton", block_config=cfg)

    # default configs (heuristic; _clamp shrinks tiles to tiny shapes): every dtype, EVEN_K or not
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        layer(4, 8, 2, 128, 128, dtype)
        layer(3, 8, 2, 40, 24, dtype)  # K % BLOCK_K != 0
    layer(64, 8, 2, 128, 128, torch.bfloat16)  # block_m 32 (more tokens per expert)
    # the variants a BlockConfig selects
    base = BlockConfig(16, 64, 64, 1, 4, 3)
    for cfg in (base, BlockConfig(16, 64, 64, 1, 4, 3, fuse_silu=False), BlockConfig(16, 64, 64, 8, 4, 3, persistent=2),
                BlockConfig(32, 64, 64, 8, 4, 3, fuse_silu=False, persistent=1)):
        layer(4, 8, 2, 128, 128, torch.bfloat16, cfg)
    # split-K GEMM1 (fp32 partials) and the GEMM2 that reduces them as it loads: even and ragged K, fp16 too
    for dtype, H, inter in ((torch.bfloat16, 128, 128), (torch.bfloat16, 40, 24), (torch.float16, 128, 128)):
        layer(2, 8, 2, H, inter, dtype, (BlockConfig(16, 128, 64, 1, 4, 3, fuse_silu=False, split_k=4),
                                         BlockConfig(16, 64, 64, 1, 4, 3)))
    # TMA descriptors, and the table tuned on (and only used on) sm_90
    with HopperOnly(cap, "_grouped_gemm_kernel"):
        for cfg in (BlockConfig(16, 64, 64, 1, 4, 3, tma=True),
                    BlockConfig(16, 64, 64, 1, 4, 3, tma=True, fuse_silu=False, persistent=2)):
            layer(4, 8, 2, 128, 128, torch.bfloat16, cfg)
        pairs = sorted({p for rows in TUNED.values() for p in rows.values()}, key=repr)
        for c1, c2 in pairs:  # K = 256 >= every tuned BLOCK_K, so EVEN_K as on the real shapes
            layer(2, 4, 2, 256, 256, torch.bfloat16, (c1, c2))


def drive_ep(cap):
    import torch

    import moekern

    cap.execute = True  # _receive groups rows by the metadata the write kernel stored: run the kernels
    g = torch.Generator().manual_seed(3)
    for W, dtype, fp8, H in ((2, torch.float32, False, 8), (4, torch.bfloat16, True, 64),
                             (8, torch.bfloat16, False, 64), (2, torch.float16, False, 40)):
        E, k, Ms = 2 * W, 2, [3] * W
        xs = [torch.randn(m, H, generator=g).to(dtype) for m in Ms]
        ids = [torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(m)]).to(torch.int32) for m in Ms]
        ws = [torch.rand(m, k, generator=g) for m in Ms]
        world = moekern.ep.PeerWorld.emulated(W, max(Ms), H, k, dtype=dtype, device="cpu")
        res = moekern.ep.dispatch_emulated(world, xs, ids, ws, E, fp8=fp8)
        handles = [h for _, h in res]
        moekern.ep.combine_emulated([out.expert_x for out, _ in res], handles)
        moekern.ep.combine_emulated([out.recv_x for out, _ in res], handles, layout="token")
        # the low-latency (decode) mode: count, write, receive, combine send and reduce kernels
        llw = moekern.ep.LLWorld.emulated(W, max(Ms), H, k, E, dtype=dtype, device="cpu")
        ll = moekern.ep.dispatch_ll_emulated(llw, xs, ids, ws, E)
        moekern.ep.combine_ll_emulated([out.recv_x for out, _ in ll], [h for _, h in ll])


DRIVERS = {"topk": drive_topk, "dispatch": drive_dispatch, "moe": drive_moe, "ep": drive_ep}
