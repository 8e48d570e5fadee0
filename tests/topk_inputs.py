"""Routing inputs shared by the tests of the CUDA kernels on a GPU (test_cuda_ops.py) and under the CPU emulation
(test_simt_kernels.py), so both hold the same source to the same cases."""

import torch


def ties_nan_inf_logits(rows: int, E: int, dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
    """[rows >= 7, E] logits in {-2..2} (many exact ties) on the generator's device, with rows 0-6: all +0, all -0,
    one NaN, all -inf, all NaN, one +inf, every other expert -inf."""
    logits = torch.randint(-2, 3, (rows, E), device=generator.device, generator=generator).float()
    logits[0] = 0.0
    logits[1] = -0.0
    logits[2, E // 2] = float("nan")
    logits[3] = float("-inf")
    logits[4] = float("nan")
    logits[5, 0] = float("inf")
    logits[6, ::2] = float("-inf")
    return logits.to(dtype)
