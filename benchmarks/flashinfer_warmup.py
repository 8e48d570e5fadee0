"""JIT-compile FlashInfer's kernels that moekern compares against, ahead of the runs that time them.

FlashInfer 0.6.14 builds its CUTLASS fused MoE (and the DeepSeek routing kernel) with nvcc on first use, which
takes minutes; the build lands in ~/.cache/flashinfer and is reused for as long as the machine lives. Run this
in the background early (benchmarks/gpu_session.sh fi-warmup starts it detached), so that later benchmark and
end-to-end calls find the kernels built. Prints how long each build took and a correctness spot check.

    FLASHINFER_CUDA_ARCH_LIST=9.0a python3 benchmarks/flashinfer_warmup.py
"""

from __future__ import annotations

import os
import sys
import time

import torch


def main() -> int:
    os.environ.setdefault("FLASHINFER_CUDA_ARCH_LIST", "9.0a")
    from flashinfer.fused_moe import cutlass_fused_moe, fused_topk_deepseek

    from moekern.dispatch.reference import fused_moe_reference

    dev, bf16 = "cuda", torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(0)
    M, H, I, E, k = 16, 256, 128, 8, 2
    x = torch.randn(M, H, device=dev, dtype=bf16, generator=g)
    w13 = torch.randn(E, 2 * I, H, device=dev, dtype=bf16, generator=g) / H**0.5
    w2 = torch.randn(E, H, I, device=dev, dtype=bf16, generator=g) / I**0.5
    ids = torch.rand(M, E, device=dev, generator=g).topk(k, dim=1).indices.to(torch.int32)
    tw = torch.softmax(torch.randn(M, k, device=dev, generator=g), dim=1)
    w31 = torch.cat([w13[:, I:], w13[:, :I]], dim=1).contiguous()
    t = time.time()
    out = cutlass_fused_moe(x, ids, tw, w31, w2, bf16, quant_scales=[], output=torch.empty_like(x))
    torch.cuda.synchronize()
    out = out[0] if isinstance(out, (list, tuple)) else out
    ref = fused_moe_reference(x, w13, w2, tw, ids)
    err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
    print(f"cutlass_fused_moe: first call {time.time() - t:.0f} s, relative error {err:.2e}", flush=True)

    E, G, tg, k = 256, 8, 4, 8
    logits = torch.randn(64, E, device=dev, dtype=bf16, generator=g)
    bias = (torch.randn(E, device=dev, generator=g) * 0.1).to(bf16)
    vals = torch.empty(64, k, device=dev, dtype=bf16)
    tid = torch.empty(64, k, device=dev, dtype=torch.int32)
    t = time.time()
    fused_topk_deepseek(logits, bias, G, tg, k, 2.5, vals, tid)
    torch.cuda.synchronize()
    print(f"fused_topk_deepseek: first call {time.time() - t:.0f} s", flush=True)
    return 0 if err < 2e-2 else 1


if __name__ == "__main__":
    sys.exit(main())
