"""moekern.align / permute / unpermute: argument checks, backend choice, and the layouts they return.

The semantics are those of moekern/dispatch/reference.py (the contract); this module validates inputs,
picks a backend and calls it.

Contiguity: non-contiguous inputs are made contiguous (a copy) rather than rejected; the results are the
same, only slower. Ids out of range: the torch backend always checks them (it syncs anyway). The triton
and cuda backends check them only when check_ids=True (the default), with one ids.min()/ids.max() that
synchronizes with the host; pass check_ids=False (as fused_moe and the vLLM plugin do) to skip it, which
keeps the call free of host syncs and CUDA-graph capturable - out-of-range ids then write out of bounds.

Id dtype: topk_ids may be int32 or int64 (what torch.topk returns) on every backend. The range check, when it
runs, reads the ids as given; then int64 ids are converted to int32 once, here (one small copy, no sync), and
every backend reads int32.
"""

from __future__ import annotations

import torch

from moekern._ext import resolve_backend
from moekern.dispatch.reference import (
    AlignOutput,
    PermuteLayout,
    align_reference,
    permute_reference,
    unpermute_reference,
)

MAX_EXPERTS = 512  # the triton kernels keep one vector of E (padded to a power of two) per program
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check_int(name: str, value, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int; got {type(value).__name__} {value!r}")
    if value < low:
        raise ValueError(f"{name}={value} must be >= {low}")
    return value


def _check_tensor(name: str, value, what: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor {what}; got {type(value).__name__}")
    return value


def _check_same_device(name: str, tensor: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if tensor.device != ref.device:
        raise ValueError(f"{name} is on {tensor.device} but {ref_name} is on {ref.device}; expected the same device")


ID_DTYPES = (torch.int32, torch.int64)  # int64 is what torch.topk returns; the kernels read int32


def _check_topk_ids(topk_ids, num_experts) -> torch.Tensor:
    _check_tensor("topk_ids", topk_ids, "[M, k] int32|int64")
    if topk_ids.dim() != 2:
        raise ValueError(f"topk_ids must be 2-D [M, k]; got shape {tuple(topk_ids.shape)}")
    if topk_ids.dtype not in ID_DTYPES:
        raise TypeError(f"topk_ids must be int32 or int64; got {topk_ids.dtype}")
    if topk_ids.shape[1] < 1:
        raise ValueError(f"topk_ids must have k >= 1 columns; got shape {tuple(topk_ids.shape)}")
    if topk_ids.numel() >= 2**31 - num_experts * 256:
        raise ValueError(f"topk_ids has {topk_ids.numel()} slots; expected fewer than 2**31 (int32 indices)")
    return topk_ids


def _check_expert_counts(expert_counts, num_experts: int, topk_ids: torch.Tensor):
    if expert_counts is None:
        return None
    _check_tensor("expert_counts", expert_counts, f"[{num_experts}] int32")
    if tuple(expert_counts.shape) != (num_experts,):
        raise ValueError(f"expert_counts must have shape ({num_experts},); got {tuple(expert_counts.shape)}")
    if expert_counts.dtype != torch.int32:
        raise TypeError(f"expert_counts must be int32; got {expert_counts.dtype}")
    _check_same_device("expert_counts", expert_counts, "topk_ids", topk_ids)
    return expert_counts.contiguous()


def _check_ids_range(topk_ids: torch.Tensor, num_experts: int) -> None:
    """One min/max (a host sync on a GPU)."""
    if topk_ids.numel() == 0:
        return
    lo, hi = int(topk_ids.min()), int(topk_ids.max())
    if lo < 0 or hi >= num_experts:
        raise ValueError(f"topk_ids must lie in [0, num_experts={num_experts}); got values in [{lo}, {hi}]")


def _check_counts_match(expert_counts, topk_ids, num_experts) -> None:
    actual = torch.bincount(topk_ids.reshape(-1).long(), minlength=num_experts).to(torch.int32)
    if not torch.equal(actual, expert_counts):
        raise ValueError(
            f"expert_counts must equal bincount(topk_ids, minlength={num_experts}); "
            f"got {expert_counts.tolist()} but topk_ids give {actual.tolist()}"
        )


def _check_ids_for(chosen: str, topk_ids, num_experts: int, expert_counts, check_ids: bool) -> None:
    """The torch path always checks the ids' range and the counts against them (it syncs anyway); the
    kernel paths check the range only when check_ids asks for the sync, and trust expert_counts."""
    if chosen == "torch":
        _check_ids_range(topk_ids, num_experts)
        if expert_counts is not None:
            _check_counts_match(expert_counts, topk_ids, num_experts)
    elif check_ids:
        _check_ids_range(topk_ids, num_experts)


def _ids_int32(topk_ids: torch.Tensor) -> torch.Tensor:
    """The ids every backend reads: contiguous int32. Called after the range check, so an int64 id that is
    in range converts exactly (without the check, an out-of-range one is out of range either way)."""
    return topk_ids.to(torch.int32).contiguous()


def _choose(backend: str, device: torch.device, num_experts: int) -> str:
    in_limits = num_experts <= MAX_EXPERTS
    chosen = resolve_backend(backend, device, cuda_ok=in_limits, triton_ok=in_limits)
    if chosen in ("cuda", "triton") and not in_limits:
        raise ValueError(
            f"backend={chosen!r} covers num_experts <= {MAX_EXPERTS}; got num_experts={num_experts} (use backend='torch')"
        )
    return chosen


def align(
    topk_ids: torch.Tensor,
    num_experts: int,
    block_size: int,
    *,
    expert_counts: torch.Tensor | None = None,
    backend: str = "auto",
    check_ids: bool = True,
) -> AlignOutput:
    """Sort the flattened (token, slot) pairs by expert into blocks of block_size, for blocked grouped GEMMs.

    topk_ids: [M, k] int32|int64, values in [0, num_experts); M >= 0. Slot i = token * k + j.
    num_experts: E >= 1 (<= 512 on the triton/cuda backends). block_size: B, a power of two >= 1.
    expert_counts: optional [E] int32, bincount of topk_ids (e.g. fused_topk's third output); it must be
      exact. Where the backend can use it the histogram pass is skipped.
    backend: "auto" | "torch" | "triton" | "cuda". check_ids: see the module docstring.

    Returns AlignOutput (the layout of vLLM's moe_align_block_size):
      sorted_token_ids [M*k + min(M*k, E)*(B-1)] int32: each expert's slots in increasing order, padded with
        the sentinel M*k to a multiple of B; experts in index order; experts with no slots take no blocks.
      block_expert_ids [ceil(len(sorted_token_ids) / B)] int32: the expert of each block, -1 past the used ones.
      num_tokens_post_padded [1] int32: sum_e ceil(count_e / B) * B.
    """
    _check_int("num_experts", num_experts, 1)
    _check_topk_ids(topk_ids, num_experts)
    _check_int("block_size", block_size, 1)
    if block_size & (block_size - 1):
        raise ValueError(f"block_size={block_size} must be a power of two")
    expert_counts = _check_expert_counts(expert_counts, num_experts, topk_ids)
    chosen = _choose(backend, topk_ids.device, num_experts)
    _check_ids_for(chosen, topk_ids, num_experts, expert_counts, check_ids)
    topk_ids = _ids_int32(topk_ids)
    if chosen == "torch" or topk_ids.numel() == 0:  # no slots: fills only, no sync
        return align_reference(topk_ids, num_experts, block_size)
    if chosen == "triton":
        from moekern.dispatch.triton_ops import align_triton

        return AlignOutput(*align_triton(topk_ids, num_experts, block_size, expert_counts))
    from moekern.dispatch.cuda_ops import align_cuda

    return AlignOutput(*align_cuda(topk_ids, num_experts, block_size, expert_counts))


def _check_hidden(name: str, tensor, rows_name: str, rows: int | None) -> torch.Tensor:
    _check_tensor(name, tensor, "[rows, H] fp32|fp16|bf16")
    if tensor.dim() != 2:
        raise ValueError(f"{name} must be 2-D [rows, H]; got shape {tuple(tensor.shape)}")
    if tensor.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16; got {tensor.dtype}")
    if rows is not None and tensor.shape[0] != rows:
        raise ValueError(f"{name} must have {rows} rows ({rows_name}); got shape {tuple(tensor.shape)}")
    return tensor


def permute(
    hidden_states: torch.Tensor,
    topk_ids: torch.Tensor,
    num_experts: int,
    *,
    expert_counts: torch.Tensor | None = None,
    backend: str = "auto",
    check_ids: bool = True,
) -> tuple[torch.Tensor, PermuteLayout]:
    """Copy each token's row once per chosen expert, grouped by expert (token-contiguous expert inputs).

    hidden_states: [M, H] fp32|fp16|bf16. topk_ids: [M, k] int32|int64 in [0, num_experts).
    expert_counts: optional [E] int32, exact bincount of topk_ids. backend, check_ids: as in align.

    Returns (permuted [M*k, H] in hidden_states' dtype, PermuteLayout):
      permuted[r] = hidden_states[sorted_slots[r] // k]; expert e's rows are
      expert_offsets[e]:expert_offsets[e+1], in increasing slot order.
      layout.sorted_slots [M*k] int32, layout.slot_to_row [M*k] int32 (its inverse),
      layout.expert_offsets [E+1] int32, layout.num_tokens = M, layout.top_k = k.
    """
    _check_int("num_experts", num_experts, 1)
    _check_topk_ids(topk_ids, num_experts)
    _check_hidden("hidden_states", hidden_states, "topk_ids.shape[0]", topk_ids.shape[0])
    _check_same_device("topk_ids", topk_ids, "hidden_states", hidden_states)
    expert_counts = _check_expert_counts(expert_counts, num_experts, topk_ids)
    chosen = _choose(backend, hidden_states.device, num_experts)
    _check_ids_for(chosen, topk_ids, num_experts, expert_counts, check_ids)
    topk_ids = _ids_int32(topk_ids)
    hidden_states = hidden_states.contiguous()
    M, k = topk_ids.shape
    if chosen == "torch" or M == 0:  # M == 0: no kernel, no sync
        return permute_reference(hidden_states, topk_ids, num_experts)
    if chosen == "triton":
        from moekern.dispatch.triton_ops import permute_triton

        permuted, sorted_slots, slot_to_row, offsets = permute_triton(hidden_states, topk_ids, num_experts,
                                                                      expert_counts)
        return permuted, PermuteLayout(sorted_slots, slot_to_row, offsets, M, k)
    from moekern.dispatch.cuda_ops import permute_cuda

    out = permute_cuda(hidden_states, topk_ids, num_experts, expert_counts)
    if len(out) == 2 and isinstance(out[1], PermuteLayout):
        return out[0], out[1]
    permuted, sorted_slots, slot_to_row, offsets = out[:4]
    return permuted, PermuteLayout(sorted_slots, slot_to_row, offsets, M, k)


def _check_layout(layout) -> PermuteLayout:
    if not isinstance(layout, PermuteLayout):
        raise TypeError(f"layout must be the PermuteLayout that permute returned; got {type(layout).__name__}")
    n = layout.num_tokens * layout.top_k
    for name in ("sorted_slots", "slot_to_row"):
        t = getattr(layout, name)
        _check_tensor(f"layout.{name}", t, f"[{n}] int32")
        if tuple(t.shape) != (n,) or t.dtype != torch.int32:
            raise ValueError(
                f"layout.{name} must be [{n}] int32 (num_tokens={layout.num_tokens} x top_k={layout.top_k}); "
                f"got {tuple(t.shape)} {t.dtype}"
            )
    return layout


def unpermute(
    expert_output: torch.Tensor,
    layout: PermuteLayout,
    topk_weights: torch.Tensor,
    *,
    backend: str = "auto",
    skip_missing_rows: bool = False,
) -> torch.Tensor:
    """Combine: out[t] = sum_j topk_weights[t, j] * expert_output[slot_to_row[t*k + j]], fp32 accumulation.

    expert_output: [M*k, H] fp32|fp16|bf16, rows in permute's order. layout: permute's PermuteLayout.
    topk_weights: [M, k] fp32|fp16|bf16 (any of them, independent of expert_output's dtype).
    skip_missing_rows: when True, expert_output may hold only its first N <= M*k rows (e.g. the experts
      this rank computed, sorted first); slots whose row is >= N contribute nothing.
    Returns [M, H] in expert_output's dtype. Reads only layout.slot_to_row; no host sync on any backend.
    """
    _check_layout(layout)
    M, k = layout.num_tokens, layout.top_k
    if skip_missing_rows:
        _check_hidden("expert_output", expert_output, "", None)
        if expert_output.shape[0] > M * k:
            raise ValueError(f"expert_output must have at most {M * k} rows (num_tokens * top_k of layout); "
                             f"got shape {tuple(expert_output.shape)}")
    else:
        _check_hidden("expert_output", expert_output, "num_tokens * top_k of layout", M * k)
    _check_tensor("topk_weights", topk_weights, f"[{M}, {k}] float")
    if tuple(topk_weights.shape) != (M, k):
        raise ValueError(f"topk_weights must have shape ({M}, {k}) to match layout; got {tuple(topk_weights.shape)}")
    if topk_weights.dtype not in FLOAT_DTYPES:
        raise TypeError(f"topk_weights must be float32, float16 or bfloat16; got {topk_weights.dtype}")
    _check_same_device("topk_weights", topk_weights, "expert_output", expert_output)
    _check_same_device("layout.slot_to_row", layout.slot_to_row, "expert_output", expert_output)
    chosen = resolve_backend(backend, expert_output.device)
    expert_output = expert_output.contiguous()
    topk_weights = topk_weights.contiguous()
    if chosen == "torch":
        return unpermute_reference(expert_output, layout, topk_weights)
    slot_to_row = layout.slot_to_row.contiguous()
    if chosen == "triton":
        from moekern.dispatch.triton_ops import unpermute_triton

        return unpermute_triton(expert_output, slot_to_row, topk_weights, M, k)
    from moekern.dispatch.cuda_ops import unpermute_cuda

    return unpermute_cuda(expert_output, layout._replace(slot_to_row=slot_to_row), topk_weights)
