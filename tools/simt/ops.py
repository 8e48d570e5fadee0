"""The emulated CUDA kernels (tools/simt/build.py) as functions on CPU tensors, shaped like moekern's ops.

Each function allocates its outputs the way csrc/bindings.cpp does for the real op and calls moekern's own
launcher through ctypes, so a test can hold the kernels' CUDA source to the torch references on a CPU.
Arguments are trusted (the public API's checks are tested elsewhere); a failed launch raises SimtError.
"""

from __future__ import annotations

import ctypes
from functools import lru_cache

import torch

from moekern.dispatch.reference import align_sizes
from moekern.routing.cuda_topk import VARIANT_CODES
from tools.simt.build import library_path

_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_SCORINGS = {"softmax": 0, "sigmoid": 1}
# launch_fused_topk's variants (csrc/routing/fused_topk.h, TopkVariant): the cuda backend's own table
VARIANTS = VARIANT_CODES


class SimtError(RuntimeError):
    """An emulated launch returned an error (the launcher's code, or a barrier no thread could complete)."""


WAVES = (32, 64)  # the kernels' CUDA path (warps of 32) and their HIP path (wavefronts of 64)
_wave = 32


def set_wave(wave: int) -> None:
    """Which emulation the functions below run: 32 (the CUDA path) or 64 (the HIP path)."""
    global _wave
    if wave not in WAVES:
        raise ValueError(f"wave={wave} must be one of {WAVES}")
    _wave = wave


def _lib() -> ctypes.CDLL:
    return _load(_wave)


@lru_cache(maxsize=2)
def _load(wave: int) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(library_path(wave)))
    lib.simt_error.restype = ctypes.c_char_p
    lib.simt_align_scratch_elems.restype = ctypes.c_int64
    lib.simt_align_scratch_elems.argtypes = [ctypes.c_int64, ctypes.c_int, ctypes.c_int]
    lib.simt_route_align_scratch_elems.restype = ctypes.c_int64
    lib.simt_route_align_scratch_elems.argtypes = [ctypes.c_int64, ctypes.c_int]
    return lib


def _p(t: torch.Tensor | None) -> ctypes.c_void_p:
    return ctypes.c_void_p(0 if t is None else t.data_ptr())


def _check(rc: int, what: str) -> None:
    lib = _lib()
    if rc != 0:
        why = lib.simt_error().decode() or f"error code {rc}"
        lib.simt_clear_error()
        raise SimtError(f"{what}: {why}")


def fused_topk(logits: torch.Tensor, top_k: int, *, scoring: str = "softmax", renormalize: bool = True,
               correction_bias: torch.Tensor | None = None, num_expert_group: int = 0, topk_group: int = 0,
               routed_scaling_factor: float = 1.0, variant: str = "auto"):
    """launch_fused_topk on [M, E] logits: (weights [M, k] fp32, ids [M, k] int32, counts [E] int32)."""
    logits = logits.contiguous()
    M, E = logits.shape
    w = torch.empty(M, top_k, dtype=torch.float32)
    ids = torch.empty(M, top_k, dtype=torch.int32)
    counts = torch.full((E,), -7, dtype=torch.int32)  # every count must be written
    bias = None if correction_bias is None else correction_bias.float().contiguous()
    rc = _lib().simt_fused_topk(_p(logits), _DTYPES[logits.dtype], ctypes.c_int64(M), E, top_k, _SCORINGS[scoring],
                                int(renormalize), _p(bias), num_expert_group, topk_group,
                                ctypes.c_float(routed_scaling_factor), _p(w), _p(ids), _p(counts), VARIANTS[variant])
    _check(rc, f"fused_topk({variant})")
    return w, ids, counts


def route_align(logits: torch.Tensor, top_k: int, block_size: int, *, scoring: str = "softmax",
                renormalize: bool = True, correction_bias: torch.Tensor | None = None, num_expert_group: int = 0,
                topk_group: int = 0, routed_scaling_factor: float = 1.0):
    """launch_route_align (one launch: one block, or the grid tier above): None where it does not take the shape,
    else (weights, ids, counts, sorted, block_ids, num_post_pad) with align's lengths."""
    logits = logits.contiguous()
    M, E = logits.shape
    padded, blocks = align_sizes(M * top_k, E, block_size)
    w = torch.empty(M, top_k, dtype=torch.float32)
    ids = torch.empty(M, top_k, dtype=torch.int32)
    counts = torch.full((E,), -7, dtype=torch.int32)
    sorted_ids = torch.full((padded,), -7, dtype=torch.int32)  # every position must be written
    block_ids = torch.full((blocks,), -7, dtype=torch.int32)
    post = torch.full((1,), -7, dtype=torch.int32)
    unsupported = ctypes.c_int(0)
    scratch_n = _lib().simt_route_align_scratch_elems(M, E)
    scratch = torch.full((scratch_n,), -7, dtype=torch.int32) if scratch_n > 0 else None
    bias = None if correction_bias is None else correction_bias.float().contiguous()
    rc = _lib().simt_route_align(_p(logits), _DTYPES[logits.dtype], ctypes.c_int64(M), E, top_k, _SCORINGS[scoring],
                                 int(renormalize), _p(bias), num_expert_group, topk_group,
                                 ctypes.c_float(routed_scaling_factor), _p(w), _p(ids), _p(counts), block_size,
                                 _p(sorted_ids), _p(block_ids), _p(post), _p(scratch), ctypes.byref(unsupported))
    _check(rc, "route_align")
    if unsupported.value:
        return None
    return w, ids, counts, sorted_ids, block_ids, post


def align(ids: torch.Tensor, num_experts: int, block_size: int, *, expert_counts: torch.Tensor | None = None,
          slots_per_thread: int = 0, ballot_match: bool = False, thread_pads: bool = False):
    """launch_align_variant on flattened ids: (sorted, block_ids, num_post_pad, slot_to_row, offsets)."""
    flat = ids.reshape(-1).to(torch.int32).contiguous()
    n = flat.numel()
    padded, blocks = align_sizes(n, num_experts, block_size)
    sorted_ids = torch.full((padded,), -7, dtype=torch.int32)
    block_ids = torch.full((blocks,), -7, dtype=torch.int32)
    post = torch.full((1,), -7, dtype=torch.int32)
    slot_to_row = torch.full((n,), -7, dtype=torch.int32)
    offsets = torch.full((num_experts + 1,), -7, dtype=torch.int32)
    scratch_n = _lib().simt_align_scratch_elems(n, num_experts, slots_per_thread)
    scratch = torch.empty(max(scratch_n, 0), dtype=torch.int32) if scratch_n > 0 else None
    counts = None if expert_counts is None else expert_counts.to(torch.int32).contiguous()
    rc = _lib().simt_align_variant(_p(flat), ctypes.c_int64(n), num_experts, block_size, _p(counts), _p(sorted_ids),
                                   _p(block_ids), _p(post), _p(slot_to_row), _p(offsets), _p(scratch),
                                   slots_per_thread, int(ballot_match), int(thread_pads))
    _check(rc, "align")
    return sorted_ids, block_ids, post, slot_to_row, offsets


def gather_rows(src: torch.Tensor, sorted_slots: torch.Tensor, top_k: int) -> torch.Tensor:
    """launch_gather_rows: dst[r] = src[sorted_slots[r] // top_k] (zeros for slots outside [0, n))."""
    src = src.contiguous()
    n = sorted_slots.numel()
    dst = torch.full((n, src.shape[1]), 7, dtype=src.dtype)
    row_bytes = src.shape[1] * src.element_size()
    rc = _lib().simt_gather_rows(_p(src), _p(dst), _p(sorted_slots.to(torch.int32).contiguous()), ctypes.c_int64(n),
                                 top_k, ctypes.c_int64(row_bytes))
    _check(rc, "gather_rows")
    return dst


def unpermute(expert_output: torch.Tensor, slot_to_row: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """launch_unpermute: out[t] = sum_j weights[t, j] * expert_output[slot_to_row[t*k + j]] in fp32."""
    expert_output = expert_output.contiguous()
    M, k = weights.shape
    H = expert_output.shape[1]
    out = torch.full((M, H), 7, dtype=expert_output.dtype)
    rc = _lib().simt_unpermute(_p(expert_output), _DTYPES[expert_output.dtype],
                               _p(slot_to_row.to(torch.int32).contiguous()), _p(weights.float().contiguous()),
                               ctypes.c_int64(M), k, ctypes.c_int64(H), ctypes.c_int64(expert_output.shape[0]),
                               _p(out))
    _check(rc, "unpermute")
    return out


def gatelog_snapshot(counts: torch.Tensor, host_counts: torch.Tensor, mark: torch.Tensor, step: int,
                     sample: torch.Tensor | None = None, host_sample: torch.Tensor | None = None) -> None:
    """launch_gatelog_snapshot, in place: host_counts = counts, counts = 0, host_sample = sample, sample = -1, then
    mark[0] = step."""
    rc = _lib().simt_gatelog_snapshot(_p(counts), _p(host_counts), ctypes.c_int64(counts.numel()), _p(sample),
                                      _p(host_sample), ctypes.c_int64(0 if sample is None else sample.numel()),
                                      _p(mark), ctypes.c_int64(step))
    _check(rc, "gatelog_snapshot")
