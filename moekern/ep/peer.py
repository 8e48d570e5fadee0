"""The intra-node ("peer") expert-parallel path: Triton kernels that write into peers' receive buffers.

Every rank owns four receive regions (payload, metadata rows, fp8 scales, combine partials). A pointer
table (int64 [W] of base addresses, one per rank) lets a kernel on rank r address rank d's region directly;
the kernel casts table[d] with `.to(tl.pointer_type(...))`. On a real node the regions come from torch
symmetric memory (PeerWorld.symmetric), and the stores travel over NVLink. On one GPU, PeerWorld.emulated
allocates W regions in one process and builds the same tables: the kernels cannot tell the difference.

dispatch on rank r:
  1. layout (torch): which ranks each token goes to, per-rank counts.
  2. counts exchange: an all_gather of [W + 4] int64 (counts, H, k, dtype, bad-ids flag). It also orders
     this dispatch after every peer finished reading its buffers last time (stream order).
  3. rows: token t lands in rank d's region at base[d] + (its place among r's tokens for d), with
     base[d] = tokens that ranks < r send to d: the receive order of the portable path.
  4. _ep_dispatch_write_kernel: grid (M, H blocks); each program loads its x slice once and stores it
     into each destination's region; block 0 also writes the metadata row (local ids, masked weights,
     source token) and the fp8 scale.
  5. barrier (symmetric-memory barrier; nothing on one GPU), then each rank copies its regions out and
     groups the rows by local expert (moekern.dispatch.permute's layout, moekern/ep/common.py).
combine:
  1. each receiver sums its local experts' rows per received token in fp32, in slot order, and stores the
     partial (payload dtype) into its own combine region: moekern.dispatch's Triton unpermute kernel over
     the grouping's layout, writing straight into the region.
  2. barrier, then _ep_combine_pull_kernel on the source: for each token, read the partial from each rank
     it went to (rank order), add in fp32, store hidden_states' dtype.
Bounds: capacity rows per rank (default W * max tokens per rank: every token to one rank); checked against
the exchanged counts on every rank alike, so an overflow raises everywhere instead of corrupting memory.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from moekern.dispatch.triton_ops import unpermute_triton
from moekern.ep import layout as L
from moekern.ep.common import (
    EpHandle, check_status, finish_dispatch, ids_out_of_range, status_row, validate_combine_args,
    validate_dispatch_args,
)

_RAW = {1: torch.uint8, 2: torch.int16, 4: torch.int32}  # the kernels move raw bits: any payload dtype


@triton.jit
def peer_ptr(table, d, elem_ty: tl.constexpr):
    """Rank d's region base from the int64 table, as a pointer. Regions are 256-byte aligned; saying so
    lets the compiler vectorize stores through the cast pointer (it cannot see the address otherwise)."""
    addr = tl.multiple_of(tl.load(table + d), 16)
    return addr.to(tl.pointer_type(elem_ty))


@triton.jit
def _ep_dispatch_write_kernel(
    x_ptr, scale_ptr, ids_ptr, w_ptr, dest_rows_ptr,
    x_table, scale_table, meta_table,
    H, experts_per_rank,
    K: tl.constexpr, KP: tl.constexpr, W: tl.constexpr, BLOCK_H: tl.constexpr, HAS_SCALE: tl.constexpr,
):
    t = tl.program_id(0)
    pid_h = tl.program_id(1)
    cols = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    hmask = cols < H
    x = tl.load(x_ptr + t.to(tl.int64) * H + cols, mask=hmask)
    kk = tl.arange(0, KP)
    kmask = kk < K
    for d in tl.static_range(W):
        row = tl.load(dest_rows_ptr + t * W + d)
        if row >= 0:
            dst = peer_ptr(x_table, d, x_ptr.dtype.element_ty)
            tl.store(dst + row.to(tl.int64) * H + cols, x, mask=hmask)
            if pid_h == 0:
                g = tl.load(ids_ptr + t * K + kk, mask=kmask, other=0)
                local = g - d * experts_per_rank
                on = (local >= 0) & (local < experts_per_rank)
                w = tl.load(w_ptr + t * K + kk, mask=kmask, other=0.0)
                meta = peer_ptr(meta_table, d, tl.int32)
                mrow = meta + row.to(tl.int64) * (2 * K + 1)
                tl.store(mrow + kk, tl.where(on, local, -1), mask=kmask)
                tl.store(mrow + K + kk, tl.where(on, w, 0.0).to(tl.int32, bitcast=True), mask=kmask)
                tl.store(mrow + 2 * K, t)
                if HAS_SCALE:
                    sdst = peer_ptr(scale_table, d, tl.float32)
                    tl.store(sdst + row, tl.load(scale_ptr + t))


@triton.jit
def _ep_combine_pull_kernel(
    out_ptr, dest_rows_ptr, comb_table, H,
    W: tl.constexpr, BLOCK_H: tl.constexpr,
):
    t = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    hmask = cols < H
    acc = tl.zeros([BLOCK_H], dtype=tl.float32)
    for d in tl.static_range(W):
        row = tl.load(dest_rows_ptr + t * W + d)
        if row >= 0:
            src = peer_ptr(comb_table, d, out_ptr.dtype.element_ty)
            acc += tl.load(src + row.to(tl.int64) * H + cols, mask=hmask, other=0.0).to(tl.float32)
    tl.store(out_ptr + t.to(tl.int64) * H + cols, acc.to(out_ptr.dtype.element_ty), mask=hmask)


def block_h(H: int) -> int:
    return min(1024, triton.next_power_of_2(max(H, 16)))


# ---------------------------------------------------------------------------------------------- buffers


@dataclass
class PeerWorld:
    """Receive regions of W ranks and the pointer tables that address them.

    regions[d] is rank d's flat uint8 buffer (only the local one is dereferenced from Python on a real
    node); x_table, meta_table, scale_table, comb_table: int64 [W] on the device, base addresses.
    rank: this process's rank (symmetric) or None (emulated: the caller says which rank acts).
    """

    world_size: int
    capacity: int
    hidden: int
    top_k: int
    dtype: torch.dtype
    regions: list
    x_table: torch.Tensor
    meta_table: torch.Tensor
    scale_table: torch.Tensor
    comb_table: torch.Tensor
    offsets: dict
    rank: int | None = None
    symm_handle: object = None
    group: object = None

    @staticmethod
    def _plan(capacity, hidden, top_k, dtype):
        es = torch.empty(0, dtype=dtype).element_size()
        sizes = {"x": capacity * hidden * es, "meta": capacity * (2 * top_k + 1) * 4,
                 "scale": capacity * 4, "comb": capacity * hidden * es}
        return aligned_regions(sizes)

    @classmethod
    def emulated(cls, world_size, max_tokens_per_rank, hidden, top_k, dtype=torch.bfloat16, device="cuda",
                 capacity=None):
        """W rank regions in this one process (one GPU, or CPU under TRITON_INTERPRET=1)."""
        capacity = world_size * max_tokens_per_rank if capacity is None else capacity
        offsets, total = cls._plan(capacity, hidden, top_k, dtype)
        regions = [torch.zeros(total, dtype=torch.uint8, device=device) for _ in range(world_size)]
        ptrs = [r.data_ptr() for r in regions]
        return cls(world_size, capacity, hidden, top_k, dtype, regions,
                   *_tables(ptrs, offsets, device), offsets=offsets)

    @classmethod
    def symmetric(cls, group, max_tokens_per_rank, hidden, top_k, dtype=torch.bfloat16, capacity=None):
        """Regions in torch symmetric memory, one per rank of an NCCL group on one node (collective call)."""
        import torch.distributed as dist
        import torch.distributed._symmetric_memory as symm_mem

        os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")  # NVLink multicast stays off
        if dist.get_backend(group) != "nccl":
            raise ValueError(f"PeerWorld.symmetric needs an NCCL group; got {dist.get_backend(group)!r}")
        W = dist.get_world_size(group)
        capacity = W * max_tokens_per_rank if capacity is None else capacity
        offsets, total = cls._plan(capacity, hidden, top_k, dtype)
        device = torch.device("cuda", torch.cuda.current_device())
        buf = symm_mem.empty(total, dtype=torch.uint8, device=device)
        hdl = symm_mem.rendezvous(buf, group if group is not None else dist.group.WORLD)
        ptrs = [int(p) for p in hdl.buffer_ptrs]
        return cls(W, capacity, hidden, top_k, dtype, [buf], *_tables(ptrs, offsets, device), offsets=offsets,
                   rank=dist.get_rank(group), symm_handle=hdl, group=group)

    def region(self, rank: int, name: str, n: int, dtype: torch.dtype) -> torch.Tensor:
        """The first n elements of rank's region `name`, viewed as dtype (rank must be local)."""
        buf = self.regions[0 if self.symm_handle is not None else rank]
        es = torch.empty(0, dtype=dtype).element_size()
        start = self.offsets[name]
        return buf[start:start + n * es].view(dtype)

    def barrier(self):
        if self.symm_handle is not None:
            self.symm_handle.barrier(channel=0)


def aligned_regions(sizes: dict) -> tuple[dict, int]:
    """Byte offsets of named regions laid out in order in one buffer, each 256-byte aligned (vector stores and
    peer writes stay aligned), and the buffer's total size (>= 256)."""
    offsets, total = {}, 0
    for name, n in sizes.items():
        offsets[name] = total
        total += -(-n // 256) * 256
    return offsets, max(total, 256)


def _tables(ptrs, offsets, device):
    return tuple(torch.tensor([p + offsets[n] for p in ptrs], dtype=torch.int64, device=device)
                 for n in ("x", "meta", "scale", "comb"))


# ---------------------------------------------------------------------------------------- per-rank steps


@dataclass
class SendPlan:
    """One source rank's side of a peer dispatch, before any exchange (plan_send)."""

    x: torch.Tensor  # [M, H] payload (raw-bit view)
    scale: torch.Tensor | None
    ids: torch.Tensor  # [M, k] int32
    weights: torch.Tensor  # [M, k] fp32
    lay: L.SendLayout
    status: torch.Tensor  # [W + 4] int64


def plan_send(x, topk_ids, topk_weights, num_experts: int, world_size: int, fp8: bool = False) -> SendPlan:
    """x [M, H], topk_ids [M, k], topk_weights [M, k] of one source rank -> its payload (raw bits, e4m3 when
    fp8), int32 ids (out-of-range ones clamped and flagged in the status row), fp32 weights, SendLayout and
    status row [W + 4] int64. Stack the W ranks' status rows and take [:, :W]: the counts write_tokens needs."""
    W = world_size
    El = num_experts // W
    bad = ids_out_of_range(topk_ids, num_experts)
    ids = (topk_ids.clamp(0, num_experts - 1) if bad else topk_ids).to(torch.int32).contiguous()
    lay = L.send_layout(ids, El, W)
    scale = None
    payload = x.contiguous()
    if fp8:
        payload, scale = L.quantize_fp8(payload)
    payload = payload.view(_RAW[payload.element_size()])
    status = status_row(lay.send_counts, x.shape[1], ids.shape[1], x.dtype, bad)
    return SendPlan(payload, scale, ids, topk_weights.float().contiguous(), lay, status)


def _check_capacity(world: PeerWorld, counts: torch.Tensor, H: int, k: int, dtype: torch.dtype):
    recv = counts.sum(0)
    if int(recv.max()) > world.capacity:
        raise ValueError(f"a rank would receive {int(recv.max())} tokens; the PeerWorld capacity is "
                         f"{world.capacity} rows (build it with a larger max_tokens_per_rank or capacity)")
    if (H, k) != (world.hidden, world.top_k):
        raise ValueError(f"PeerWorld was built for H={world.hidden}, k={world.top_k}; got H={H}, k={k}")
    if torch.empty(0, dtype=dtype).element_size() > torch.empty(0, dtype=world.dtype).element_size():
        raise ValueError(f"PeerWorld was built for {world.dtype} payloads; got {dtype}")


def write_tokens(world: PeerWorld, rank: int, plan: SendPlan, counts: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Launch the write kernel for source `rank` (its tokens, metadata and scales into every destination's
    regions); counts: [W, W] int64, counts[r, d] = tokens rank r sends to d. Returns dest_rows [M, W] int32."""
    W = world.world_size
    base = counts[:rank].sum(0).to(plan.x.device)
    rows = L.dest_rows(plan.lay.rank_mask, base).contiguous()
    M, H = plan.x.shape
    k = plan.ids.shape[1]
    if M and H:
        bh = block_h(H)
        scale = plan.scale if plan.scale is not None else plan.weights  # unused when HAS_SCALE is False
        _ep_dispatch_write_kernel[(M, triton.cdiv(H, bh))](
            plan.x, scale, plan.ids, plan.weights, rows,
            world.x_table, world.scale_table, world.meta_table,
            H, num_experts // W,
            K=k, KP=triton.next_power_of_2(k), W=W, BLOCK_H=bh, HAS_SCALE=plan.scale is not None,
        )
    return rows


def _receive(world: PeerWorld, rank: int, counts: torch.Tensor, x_dtype, fp8, num_experts, group_by_expert,
             handle_kw):
    W, H, k = world.world_size, world.hidden, world.top_k
    R = int(counts[:, rank].sum())
    pay_dtype = torch.float8_e4m3fn if fp8 else x_dtype
    recv_x = world.region(rank, "x", R * H, pay_dtype).view(R, H).clone()
    meta = world.region(rank, "meta", R * (2 * k + 1), torch.int32).view(R, 2 * k + 1).clone()
    if fp8:
        recv_x = L.dequantize_fp8(recv_x, world.region(rank, "scale", R, torch.float32).clone(), x_dtype)
    ids, weights, src_token = L.split_meta(meta, k)
    src_rank = torch.repeat_interleave(torch.arange(W, dtype=torch.int32), counts[:, rank].cpu()).to(recv_x.device)
    return finish_dispatch(recv_x, ids, weights, src_rank, src_token, num_experts // W, group_by_expert, handle_kw)


def _handle_kw(world, rank, num_experts, M, k, dtype, counts, plan, rows, group):
    return dict(backend="peer", rank=rank, world_size=world.world_size, num_experts=num_experts, num_tokens=M,
                top_k=k, dtype=dtype, send_counts=counts[rank].tolist(), recv_counts=counts[:, rank].tolist(),
                send_token_idx=plan.lay.send_token_idx, dest_rows=rows, group=group, world=world)


def _write_partial(world: PeerWorld, rank: int, expert_output: torch.Tensor, handle: EpHandle, layout: str):
    R = handle.recv_topk_weights.shape[0]
    H = expert_output.shape[1]
    dst = world.region(rank, "comb", R * H, handle.dtype).view(R, H)
    if layout == "token":
        dst.copy_(expert_output)
    else:  # the off-rank slots' rows are past expert_output's end: they add nothing
        unpermute_triton(expert_output.contiguous(), handle.grouping.slot_to_row, handle.recv_topk_weights.contiguous(),
                         R, handle.top_k, out=dst)


def _pull(world: PeerWorld, handle: EpHandle) -> torch.Tensor:
    H = handle.hidden
    M = handle.num_tokens
    out = torch.empty(M, H, dtype=handle.dtype, device=handle.dest_rows.device)
    if M and H:
        bh = block_h(H)
        _ep_combine_pull_kernel[(M, triton.cdiv(H, bh))](
            out, handle.dest_rows, world.comb_table, H, W=world.world_size, BLOCK_H=bh)
    return out


# ------------------------------------------------------------------------------------------ entry points


def peer_dispatch(world: PeerWorld, x, topk_ids, topk_weights, num_experts, *, fp8=False, group_by_expert=True,
                  group=None):
    """One rank of a real node (world from PeerWorld.symmetric); see moekern.ep.dispatch."""
    import torch.distributed as dist

    if world.rank is None:
        raise ValueError("this PeerWorld is emulated: drive it with moekern.ep.dispatch_emulated")
    W, rank = world.world_size, world.rank
    plan = plan_send(x, topk_ids, topk_weights, num_experts, W, fp8)
    if W > 1:
        gathered = torch.empty(W, plan.status.numel(), dtype=torch.int64, device=x.device)
        dist.all_gather_into_tensor(gathered, plan.status.to(x.device), group=group)
        status = gathered.cpu()
    else:
        status = plan.status.unsqueeze(0)
    check_status(status, W, num_experts)
    counts = status[:, :W]
    _check_capacity(world, counts, x.shape[1], topk_ids.shape[1], x.dtype)
    rows = write_tokens(world, rank, plan, counts, num_experts)
    world.barrier()  # every peer's writes are visible before the regions are read
    kw = _handle_kw(world, rank, num_experts, x.shape[0], topk_ids.shape[1], x.dtype, counts, plan, rows, group)
    return _receive(world, rank, counts, x.dtype, fp8, num_experts, group_by_expert, kw)


def peer_combine(expert_output, handle: EpHandle, *, layout="expert"):
    world = handle.world
    _write_partial(world, handle.rank, expert_output, handle, layout)
    world.barrier()  # every partial is in place before sources read them
    return _pull(world, handle)


def dispatch_emulated(world: PeerWorld, xs, topk_ids, topk_weights, num_experts, *, fp8=False,
                      group_by_expert=True):
    """Dispatch for W emulated ranks at once: lists indexed by rank, returns [(DispatchOutput, EpHandle)].

    The same per-rank steps as peer_dispatch; the counts "exchange" is a stack of the W status rows.
    """
    W = world.world_size
    if world.rank is not None:
        raise ValueError("dispatch_emulated needs PeerWorld.emulated(...); this one is symmetric")
    for name, v in (("xs", xs), ("topk_ids", topk_ids), ("topk_weights", topk_weights)):
        if not isinstance(v, (list, tuple)) or len(v) != W:
            raise ValueError(f"{name} must be a list of W={W} tensors (one per rank); got {_len(v)}")
    for r in range(W):
        validate_dispatch_args(xs[r], topk_ids[r], topk_weights[r], num_experts, W)
        if xs[r].device.type != "cuda" and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
            raise ValueError(f"xs[{r}] is on {xs[r].device}: the peer kernels need CUDA (or TRITON_INTERPRET=1)")
    plans = [plan_send(xs[r], topk_ids[r], topk_weights[r], num_experts, W, fp8) for r in range(W)]
    status = torch.stack([p.status for p in plans])
    check_status(status, W, num_experts)
    counts = status[:, :W]
    _check_capacity(world, counts, xs[0].shape[1], topk_ids[0].shape[1], xs[0].dtype)
    rows = [write_tokens(world, r, plans[r], counts, num_experts) for r in range(W)]
    return [
        _receive(world, r, counts, xs[r].dtype, fp8, num_experts, group_by_expert,
                 _handle_kw(world, r, num_experts, xs[r].shape[0], topk_ids[r].shape[1], xs[r].dtype, counts,
                            plans[r], rows[r], None))
        for r in range(W)
    ]


def combine_emulated(expert_outputs, handles, *, layout="expert"):
    """Combine for W emulated ranks: expert_outputs[d] is rank d's output; returns [M_r, H] per rank."""
    if len(expert_outputs) != len(handles):
        raise ValueError(f"expert_outputs has {len(expert_outputs)} entries; expected one per handle ({len(handles)})")
    for y, h in zip(expert_outputs, handles):
        validate_combine_args(y, h, layout)
    for d, (y, h) in enumerate(zip(expert_outputs, handles)):
        _write_partial(h.world, d, y, h, layout)
    return [_pull(h.world, h) for h in handles]


def _len(v):
    return f"{type(v).__name__} of length {len(v)}" if isinstance(v, (list, tuple)) else type(v).__name__
