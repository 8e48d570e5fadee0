"""JIT-compile FlashInfer's kernels that moekern compares against, ahead of the runs that time them.

FlashInfer 0.6.14 builds its DeepSeek routing kernel (one small .cu, seconds) and its CUTLASS fused MoE (many
CUTLASS instantiations, minutes) with nvcc on first use; the builds land in ~/.cache/flashinfer and are reused
for as long as the machine lives. Run this in the background early (tools/gpu/gpu_session.sh fi-warmup starts
it detached), so that later benchmark and end-to-end calls find the kernels built.

It calls both ops through the very provider code `moekern bench` times (moekern.bench.providers), on small
shapes, and judges them with the bench's own checker against the torch reference, so a wrong argument,
layout or semantics shows up here, minutes before the bench. The routing kernel is built first: the bench's
routing rows need only it. One failing op does not stop the other. Prints one line per op:

    fused_topk_deepseek: build+first call 12 s: ok (max abs weight error 0.0039)
    cutlass_fused_moe: build+first call 540 s: ok (relative error 0.0041)

Exit status 0 when both are built and right.

    FLASHINFER_CUDA_ARCH_LIST=9.0a python3 tools/gpu/flashinfer_warmup.py
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# Small versions of the benchmarked problems: DeepSeek-V3's routing as it is (E=256, 8 groups, top-4 groups,
# k=8, sigmoid + bias, scale 2.5) and a MoE layer with narrow widths (FlashInfer needs H and I multiples of 8).
ROUTING_TOKENS = 64
MOE_TOKENS, MOE_HIDDEN, MOE_INTER = 16, 256, 128


def _check(op: str, model: str, num_tokens: int, spec_edit=None) -> str:
    from moekern.bench import providers as P
    from moekern.bench.shapes import make_inputs, make_shape, resolve_model

    spec = resolve_model(model)
    if spec_edit:
        spec = dataclasses.replace(spec, **spec_edit)
    shape = make_shape(op, spec, num_tokens)
    dev = torch.device("cuda")
    prov = P.get_providers(op, ("flashinfer",))[0]
    reason = prov.unavailable(shape, dev)
    if reason:
        raise RuntimeError(f"provider unavailable: {reason}")
    inp = make_inputs(shape, num_tokens, dev, seed=0)
    ref = P.reference_output(shape, inp)
    got = prov.normalize(prov.prepare(shape, inp)(), shape)
    torch.cuda.synchronize()
    res = P.check_output(shape, inp, ref, got)
    what = "max abs weight error" if op == "routing" else "relative error"
    err = "" if res.error is None else f" ({what} {res.error:.2g})"
    if not res.ok:
        raise AssertionError(f"WRONG: {res.detail}")
    return f"{res.detail}{err}"


def main() -> int:
    os.environ.setdefault("FLASHINFER_CUDA_ARCH_LIST", "9.0a")
    os.environ["MOEKERN_FLASHINFER_JIT"] = "build"  # this script is the build: the bench's skip-if-unbuilt is off
    print(f"FLASHINFER_CUDA_ARCH_LIST={os.environ['FLASHINFER_CUDA_ARCH_LIST']}", flush=True)
    jobs = [
        ("fused_topk_deepseek", lambda: _check("routing", "deepseek-v3", ROUTING_TOKENS)),
        ("cutlass_fused_moe", lambda: _check("moe", "mixtral", MOE_TOKENS,
                                             {"hidden_size": MOE_HIDDEN, "intermediate_size": MOE_INTER})),
    ]
    failed = 0
    for name, job in jobs:
        t = time.time()
        try:
            msg = job()
            print(f"{name}: build+first call {time.time() - t:.0f} s: {msg}", flush=True)
        except Exception as exc:
            failed += 1
            print(f"{name}: FAILED after {time.time() - t:.0f} s: {type(exc).__name__}: {exc}", flush=True)
            traceback.print_exc()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
