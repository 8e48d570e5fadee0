"""Low-latency (decode) expert-parallel dispatch/combine: fixed receive layout, no host sync, graph-capturable.

The peer path (moekern.ep.peer) exchanges per-rank counts through the host so that receive buffers are
exactly sized; at decode sizes that host round trip is the whole cost. This mode reserves, on every rank,
a fixed slot range per (local expert, source rank) of cap = max_tokens_per_rank rows, so every address is
known without knowing any other rank's counts; counts travel in-band and are read on the device.

Layout (LLWorld, per rank d; El = E / W local experts, cap = capacity, default max_tokens_per_rank = Mmax):
  staging x    [El, W, cap, H]  payload dtype   written by source s at [e, s, pos]
  staging meta [El, W, cap, 3]  int32           (source token t, top-k slot j, fp32 weight bits)
  counts       [El, W]          int32           raw tokens source s sends to local expert e (written by s)
  comb         [Mmax, k, H]     payload dtype   expert output of (my token t, my slot j), written by its rank
dispatch_ll on source rank r (3 kernels, then the receive kernel after the barrier):
  1. _ll_count_kernel: pos[t*k+j] = #{(t', j') before (t, j) in row-major order with the same expert}
     (deterministic; no atomics), and per expert the count, stored into the owner's counts[e_local, r].
     Counts are rewritten in full every call (M = 0 included), so no stale state survives.
  2. _ll_write_kernel: each (t, j) with pos < cap stores x[t] and its meta row into the owner's staging at
     [e_local, r, pos]. A token going to two local experts of one rank is sent twice (once per expert):
     bytes are traded for no sync and a receive layout a grouped GEMM reads directly (DeepEP's LL does too).
  3. barrier (symmetric memory; nothing when emulated on one device).
  4. _ll_recv_kernel on d: compacts staging into recv_x [El, W*cap, H]: expert e's rows are source rank
     ascending, then source token ascending (the receive order of moekern.ep.reference), starting at row 0;
     recv_counts[e] rows are valid, rows past it are undefined. recv_counts is int32 on the device.
combine_ll: expert_output [El, W*cap, H] (unweighted expert results in recv_x's layout);
  1. _ll_combine_send_kernel on d: row i < recv_counts[e] goes to its source's comb[t, j] (unweighted).
  2. barrier, then _ll_combine_reduce_kernel on the source: out[t] = dtype(sum over ranks d ascending of
     fp32(dtype(sum over j on d, j ascending, of w[t, j] * fp32(comb[t, j]))))  -- the rounding points of
     moekern.ep.reference.combine_reference, so results match it.
Capacity policy: capacity = slots per (local expert, source rank), default max_tokens_per_rank. With
distinct ids per row a source sends at most M <= max_tokens_per_rank tokens to one expert, so the default
cannot overflow; a smaller `capacity` (to save memory) or repeated ids in a row can. The host cannot check
that without a sync, so the device does: (token, slot) pairs whose place is >= capacity are dropped (not
sent; they add 0 to combine), and error_flag gets OVERFLOW_SEND on the source and OVERFLOW_RECV on the
receiver. Out-of-range ids are dropped likewise, with BAD_IDS. handle.check() syncs and raises when any
bit is set; static errors (E % W, shapes, dtypes, M > max_tokens_per_rank) raise before any launch.
Order of calls: dispatch_ll and combine_ll alternate (the combine barrier is what lets the next dispatch
overwrite a peer's staging). Outputs of dispatch_ll are fresh tensors, valid until the caller drops them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from moekern.ep.common import validate_dispatch_args
from moekern.ep.peer import aligned_regions, block_h, peer_ptr

OVERFLOW_SEND = 1  # this rank had more than capacity tokens for one expert: the excess was dropped
OVERFLOW_RECV = 2  # a source sent more than capacity tokens to one of this rank's experts
BAD_IDS = 4  # this rank's topk_ids held ids outside [0, E): those slots were dropped
_OVERFLOW_SEND_C = tl.constexpr(OVERFLOW_SEND)  # the kernels see only constexpr globals
_OVERFLOW_RECV_C = tl.constexpr(OVERFLOW_RECV)
_BAD_IDS_C = tl.constexpr(BAD_IDS)


# ---------------------------------------------------------------------------------------------- kernels


@triton.jit
def _ll_count_kernel(
    ids_ptr, pos_ptr, flag_ptr, counts_table, N, rank, num_experts, experts_per_rank, cap,
    W: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr, NUM_POS_PROGRAMS: tl.constexpr,
):
    pid = tl.program_id(0)
    if pid < NUM_POS_PROGRAMS:
        # places: entry i's place among earlier entries with the same expert (row-major (t, j) order)
        i = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        imask = i < N
        ei = tl.load(ids_ptr + i, mask=imask, other=-1)
        bad = imask & ((ei < 0) | (ei >= num_experts))
        if tl.sum(bad.to(tl.int32), axis=0) > 0:
            tl.atomic_or(flag_ptr, _BAD_IDS_C)
        acc = tl.zeros([BLOCK_N], dtype=tl.int32)
        for jb in range(0, pid + 1):
            j = jb * BLOCK_N + tl.arange(0, BLOCK_N)
            ej = tl.load(ids_ptr + j, mask=j < N, other=-2)
            same = (ej[None, :] == ei[:, None]) & (j[None, :] < i[:, None])
            acc += tl.sum(same.to(tl.int32), axis=1)
        tl.store(pos_ptr + i, acc, mask=imask)
    else:
        # counts: every expert's total, stored into its owner's counts[e_local, rank] (zeros included)
        e = (pid - NUM_POS_PROGRAMS) * BLOCK_E + tl.arange(0, BLOCK_E)
        emask = e < num_experts
        c = tl.zeros([BLOCK_E], dtype=tl.int32)
        for jb in range(0, tl.cdiv(N, BLOCK_N)):
            j = jb * BLOCK_N + tl.arange(0, BLOCK_N)
            ej = tl.load(ids_ptr + j, mask=j < N, other=-2)
            c += tl.sum((ej[None, :] == e[:, None]).to(tl.int32), axis=1)
        if tl.sum((emask & (c > cap)).to(tl.int32), axis=0) > 0:
            tl.atomic_or(flag_ptr, _OVERFLOW_SEND_C)
        d = e // experts_per_rank
        el = e - d * experts_per_rank
        for dd in tl.static_range(W):
            dst = peer_ptr(counts_table, dd, tl.int32)
            tl.store(dst + el * W + rank, c, mask=emask & (d == dd))


@triton.jit
def _ll_write_kernel(
    x_ptr, ids_ptr, w_ptr, pos_ptr, x_table, meta_table, H, rank, num_experts, experts_per_rank, cap,
    K: tl.constexpr, W: tl.constexpr, BLOCK_H: tl.constexpr,
):
    i = tl.program_id(0)  # one (token, slot) pair: i = t*K + j
    pid_h = tl.program_id(1)
    e = tl.load(ids_ptr + i)
    p = tl.load(pos_ptr + i)
    if (e >= 0) & (e < num_experts) & (p < cap):
        t = i // K
        d = e // experts_per_rank
        el = e - d * experts_per_rank
        row = ((el * W + rank) * cap + p).to(tl.int64)
        cols = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
        hmask = cols < H
        x = tl.load(x_ptr + t.to(tl.int64) * H + cols, mask=hmask)
        # d is a runtime value; the pointer table lookup takes it directly (no static loop over ranks)
        dst = peer_ptr(x_table, d, x_ptr.dtype.element_ty)
        tl.store(dst + row * H + cols, x, mask=hmask)
        if pid_h == 0:
            meta = peer_ptr(meta_table, d, tl.int32) + row * 3
            tl.store(meta, t)
            tl.store(meta + 1, i - t * K)
            tl.store(meta + 2, tl.load(w_ptr + i).to(tl.int32, bitcast=True))


@triton.jit
def _ll_recv_kernel(
    stage_x_ptr, stage_meta_ptr, counts_ptr, out_x_ptr, out_meta_ptr, recv_counts_ptr, flag_ptr, H, cap,
    W: tl.constexpr, WP: tl.constexpr, BLOCK_H: tl.constexpr,
):
    es = tl.program_id(0)  # (local expert, source rank)
    i = tl.program_id(1)  # place among that source's tokens for that expert
    e = es // W
    s = es - e * W
    ss = tl.arange(0, WP)
    raw = tl.load(counts_ptr + e * W + ss, mask=ss < W, other=0)
    n = tl.minimum(raw, cap)
    if (s == 0) & (i == 0):
        tl.store(recv_counts_ptr + e, tl.sum(n, axis=0))
        if tl.sum((raw > cap).to(tl.int32), axis=0) > 0:
            tl.atomic_or(flag_ptr, _OVERFLOW_RECV_C)
    n_s = tl.sum(tl.where(ss == s, n, 0), axis=0)
    if i < n_s:
        base = tl.sum(tl.where(ss < s, n, 0), axis=0)
        src_row = ((e * W + s) * cap + i).to(tl.int64)
        dst_row = (e * W * cap + base + i).to(tl.int64)
        for hb in range(0, tl.cdiv(H, BLOCK_H)):
            cols = hb * BLOCK_H + tl.arange(0, BLOCK_H)
            hmask = cols < H
            v = tl.load(stage_x_ptr + src_row * H + cols, mask=hmask)
            tl.store(out_x_ptr + dst_row * H + cols, v, mask=hmask)
        tl.store(out_meta_ptr + dst_row * 4, s)
        tl.store(out_meta_ptr + dst_row * 4 + 1, tl.load(stage_meta_ptr + src_row * 3))
        tl.store(out_meta_ptr + dst_row * 4 + 2, tl.load(stage_meta_ptr + src_row * 3 + 1))
        tl.store(out_meta_ptr + dst_row * 4 + 3, tl.load(stage_meta_ptr + src_row * 3 + 2))


@triton.jit
def _ll_combine_send_kernel(
    y_ptr, meta_ptr, recv_counts_ptr, comb_table, H, rows_per_expert,
    K: tl.constexpr, BLOCK_H: tl.constexpr,
):
    e = tl.program_id(0)
    i = tl.program_id(1)
    if i < tl.load(recv_counts_ptr + e):
        row = (e * rows_per_expert + i).to(tl.int64)
        s = tl.load(meta_ptr + row * 4)
        t = tl.load(meta_ptr + row * 4 + 1)
        j = tl.load(meta_ptr + row * 4 + 2)
        dst = peer_ptr(comb_table, s, y_ptr.dtype.element_ty) + (t * K + j).to(tl.int64) * H
        for hb in range(0, tl.cdiv(H, BLOCK_H)):
            cols = hb * BLOCK_H + tl.arange(0, BLOCK_H)
            hmask = cols < H
            tl.store(dst + cols, tl.load(y_ptr + row * H + cols, mask=hmask), mask=hmask)


@triton.jit
def _ll_combine_reduce_kernel(
    comb_ptr, ids_ptr, w_ptr, pos_ptr, out_ptr, H, num_experts, experts_per_rank, cap,
    K: tl.constexpr, W: tl.constexpr, BLOCK_H: tl.constexpr,
):
    t = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    hmask = cols < H
    acc = tl.zeros([BLOCK_H], dtype=tl.float32)
    for d in tl.static_range(W):
        part = tl.zeros([BLOCK_H], dtype=tl.float32)
        for j in tl.static_range(K):
            e = tl.load(ids_ptr + t * K + j)
            p = tl.load(pos_ptr + t * K + j)
            if (e >= 0) & (e < num_experts) & (p < cap) & (e // experts_per_rank == d):
                w = tl.load(w_ptr + t * K + j)
                y = tl.load(comb_ptr + (t * K + j).to(tl.int64) * H + cols, mask=hmask, other=0.0)
                part += y.to(tl.float32) * w
        # each rank's partial is rounded to the payload dtype once, as combine_reference states
        acc += part.to(out_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + t.to(tl.int64) * H + cols, acc.to(out_ptr.dtype.element_ty), mask=hmask)


# ---------------------------------------------------------------------------------------------- buffers


@dataclass
class LLWorld:
    """Fixed receive regions of W ranks for the low-latency mode, and the pointer tables addressing them.

    capacity: slots per (local expert, source rank), default max_tokens_per_rank (then nothing can overflow).
    regions[d]: rank d's flat uint8 buffer (one, the local one, on a real node); *_table: int64 [W] bases.
    Per-rank bytes: El*W*cap*(H*es + 12) + El*W*4 + max_tokens_per_rank*k*H*es (es: payload element size).
    """

    world_size: int
    max_tokens_per_rank: int
    capacity: int
    hidden: int
    top_k: int
    num_experts: int
    dtype: torch.dtype
    regions: list
    x_table: torch.Tensor
    meta_table: torch.Tensor
    counts_table: torch.Tensor
    comb_table: torch.Tensor
    offsets: dict
    rank: int | None = None
    symm_handle: object = None

    @property
    def experts_per_rank(self) -> int:
        return self.num_experts // self.world_size

    @staticmethod
    def _plan(W, M, cap, H, k, E, dtype):
        es = torch.empty(0, dtype=dtype).element_size()
        El = E // W
        sizes = {"x": El * W * cap * H * es, "meta": El * W * cap * 3 * 4, "counts": El * W * 4,
                 "comb": M * k * H * es}
        return aligned_regions(sizes)

    @staticmethod
    def _check(world_size, max_tokens_per_rank, hidden, top_k, num_experts, dtype, capacity):
        for name, v, low in (("world_size", world_size, 1), ("max_tokens_per_rank", max_tokens_per_rank, 1),
                             ("hidden", hidden, 1), ("top_k", top_k, 1), ("num_experts", num_experts, 1),
                             ("capacity", capacity, 1)):
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ValueError(f"{name} must be an int >= {low}; got {v!r}")
        if num_experts % world_size:
            raise ValueError(f"num_experts={num_experts} must be divisible by the world size W={world_size}")
        if top_k > num_experts:
            raise ValueError(f"top_k={top_k} must be <= num_experts={num_experts}")
        if dtype not in _RAW_BY_DTYPE:
            raise TypeError(f"dtype must be bfloat16, float16 or float32; got {dtype}")

    @classmethod
    def emulated(cls, world_size, max_tokens_per_rank, hidden, top_k, num_experts, dtype=torch.bfloat16,
                 device="cuda", capacity=None):
        """W ranks' regions in this one process (one GPU, or CPU under TRITON_INTERPRET=1)."""
        capacity = max_tokens_per_rank if capacity is None else capacity
        cls._check(world_size, max_tokens_per_rank, hidden, top_k, num_experts, dtype, capacity)
        offsets, total = cls._plan(world_size, max_tokens_per_rank, capacity, hidden, top_k, num_experts, dtype)
        regions = [torch.zeros(total, dtype=torch.uint8, device=device) for _ in range(world_size)]
        tables = _tables([r.data_ptr() for r in regions], offsets, device)
        return cls(world_size, max_tokens_per_rank, capacity, hidden, top_k, num_experts, dtype, regions,
                   *tables, offsets=offsets)

    @classmethod
    def symmetric(cls, group, max_tokens_per_rank, hidden, top_k, num_experts, dtype=torch.bfloat16,
                  capacity=None):
        """Regions in torch symmetric memory, one per rank of an NCCL group on one node (collective call)."""
        import torch.distributed as dist
        import torch.distributed._symmetric_memory as symm_mem

        os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")  # NVLink multicast stays off
        if dist.get_backend(group) != "nccl":
            raise ValueError(f"LLWorld.symmetric needs an NCCL group; got {dist.get_backend(group)!r}")
        W = dist.get_world_size(group)
        capacity = max_tokens_per_rank if capacity is None else capacity
        cls._check(W, max_tokens_per_rank, hidden, top_k, num_experts, dtype, capacity)
        offsets, total = cls._plan(W, max_tokens_per_rank, capacity, hidden, top_k, num_experts, dtype)
        device = torch.device("cuda", torch.cuda.current_device())
        buf = symm_mem.empty(total, dtype=torch.uint8, device=device)
        buf.zero_()
        hdl = symm_mem.rendezvous(buf, group if group is not None else dist.group.WORLD)
        tables = _tables([int(p) for p in hdl.buffer_ptrs], offsets, device)
        world = cls(W, max_tokens_per_rank, capacity, hidden, top_k, num_experts, dtype, [buf], *tables,
                    offsets=offsets, rank=dist.get_rank(group), symm_handle=hdl)
        world.barrier()  # every region is zeroed before any peer writes into it
        return world

    def region(self, rank: int, name: str, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
        """Rank's region `name` viewed as dtype [shape] (rank must be local to this process)."""
        buf = self.regions[0 if self.symm_handle is not None else rank]
        n = 1
        for s in shape:
            n *= s
        es = torch.empty(0, dtype=dtype).element_size()
        start = self.offsets[name]
        return buf[start:start + n * es].view(dtype).view(shape)

    def barrier(self):
        if self.symm_handle is not None:
            self.symm_handle.barrier(channel=0)


_RAW_BY_DTYPE = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}


def _tables(ptrs, offsets, device):
    return tuple(torch.tensor([p + offsets[n] for p in ptrs], dtype=torch.int64, device=device)
                 for n in ("x", "meta", "counts", "comb"))


# ---------------------------------------------------------------------------------------------- outputs


@dataclass
class LLDispatchOutput:
    """What one rank receives, in the fixed layout (rows = W * capacity per local expert).

    recv_x: [El, rows, H] payload dtype; expert e's tokens are rows [0, recv_counts[e]), source rank
      ascending, source token ascending within a source; later rows are undefined.
    recv_counts: [El] int32 on the device.
    recv_src_rank, recv_src_token, recv_topk_slot: [El, rows] int32 (views); recv_topk_weights: [El, rows]
      fp32 (view), the router weight of (token, this expert). Valid in the same rows as recv_x.
    """

    recv_x: torch.Tensor
    recv_counts: torch.Tensor
    recv_src_rank: torch.Tensor
    recv_src_token: torch.Tensor
    recv_topk_slot: torch.Tensor
    recv_topk_weights: torch.Tensor


@dataclass
class LLHandle:
    """What combine_ll needs, plus error_flag: int32 [1] on the device (bits OVERFLOW_SEND, OVERFLOW_RECV,
    BAD_IDS), set by the kernels; check() reads it (a host sync: call it outside the hot loop)."""

    world: LLWorld
    rank: int
    num_tokens: int
    dtype: torch.dtype
    topk_ids: torch.Tensor  # [M, k] int32
    topk_weights: torch.Tensor  # [M, k] fp32
    pos: torch.Tensor  # [M*k] int32, place of (t, j) among this rank's tokens for its expert
    recv_counts: torch.Tensor  # [El] int32
    recv_meta: torch.Tensor  # [El, rows, 4] int32 (source rank, source token, slot, weight bits)
    error_flag: torch.Tensor  # [1] int32

    def check(self) -> None:
        """Raise ValueError when this dispatch dropped anything (syncs with the device)."""
        flag = int(self.error_flag.item())
        if not flag:
            return
        why = []
        if flag & OVERFLOW_SEND:
            why.append(f"rank {self.rank} sent more than capacity={self.world.capacity} tokens to one expert "
                       f"(the excess was dropped)")
        if flag & OVERFLOW_RECV:
            why.append(f"rank {self.rank} was sent more than capacity={self.world.capacity} tokens for one of "
                       f"its experts by one source (the excess was dropped)")
        if flag & BAD_IDS:
            why.append(f"topk_ids on rank {self.rank} hold ids outside [0, num_experts="
                       f"{self.world.num_experts}) (those slots were dropped)")
        raise ValueError("; ".join(why))


# ---------------------------------------------------------------------------------------- per-rank steps


_BLOCK_N = 64
_BLOCK_E = 64


def _validate(world: LLWorld, x, topk_ids, topk_weights, num_experts, rank_name="x"):
    """Static checks only (shapes, dtypes, sizes): no value is read, so nothing syncs."""
    if not isinstance(world, LLWorld):
        raise TypeError(f"world must be an LLWorld (LLWorld.emulated / LLWorld.symmetric); got {type(world).__name__}")
    validate_dispatch_args(x, topk_ids, topk_weights, num_experts, world.world_size)
    if num_experts != world.num_experts:
        raise ValueError(f"num_experts={num_experts} differs from the LLWorld's num_experts={world.num_experts}")
    M, H = x.shape
    if H != world.hidden:
        raise ValueError(f"{rank_name} must have H={world.hidden} columns (the LLWorld's hidden); got {H}")
    if topk_ids.shape[1] != world.top_k:
        raise ValueError(f"topk_ids must have k={world.top_k} columns (the LLWorld's top_k); got {topk_ids.shape[1]}")
    if M > world.max_tokens_per_rank:
        raise ValueError(f"{rank_name} has M={M} tokens; the LLWorld holds at most max_tokens_per_rank="
                         f"{world.max_tokens_per_rank}")
    if x.dtype != world.dtype:
        raise TypeError(f"{rank_name} must be {world.dtype} (the LLWorld's dtype); got {x.dtype}")
    if x.device != world.x_table.device:
        raise ValueError(f"{rank_name} is on {x.device}; the LLWorld is on {world.x_table.device}")
    if x.device.type != "cuda" and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        raise ValueError(f"{rank_name} is on {x.device}: the low-latency kernels need CUDA (or TRITON_INTERPRET=1)")


@dataclass
class _Sent:
    ids: torch.Tensor
    weights: torch.Tensor
    pos: torch.Tensor
    flag: torch.Tensor


def _send(world: LLWorld, rank: int, x, topk_ids, topk_weights) -> _Sent:
    """Count and write kernels of source `rank` (both always launch: counts are rewritten every call)."""
    W, E, El, cap = world.world_size, world.num_experts, world.experts_per_rank, world.capacity
    M, H = x.shape
    k = topk_ids.shape[1]
    N = M * k
    ids = topk_ids.to(torch.int32).contiguous()
    weights = topk_weights.to(torch.float32).contiguous()
    pos = torch.empty(N, dtype=torch.int32, device=x.device)
    flag = torch.zeros(1, dtype=torch.int32, device=x.device)
    n_pos = triton.cdiv(N, _BLOCK_N)
    _ll_count_kernel[(n_pos + triton.cdiv(E, _BLOCK_E),)](
        ids, pos, flag, world.counts_table, N, rank, E, El, cap,
        W=W, BLOCK_N=_BLOCK_N, BLOCK_E=_BLOCK_E, NUM_POS_PROGRAMS=n_pos,
    )
    if N:
        bh = block_h(H)
        payload = x.contiguous().view(_RAW_BY_DTYPE[x.dtype])
        _ll_write_kernel[(N, triton.cdiv(H, bh))](
            payload, ids, weights, pos, world.x_table, world.meta_table, H, rank, E, El, cap,
            K=k, W=W, BLOCK_H=bh,
        )
    return _Sent(ids, weights, pos, flag)


def _receive(world: LLWorld, rank: int, sent: _Sent, M: int) -> tuple[LLDispatchOutput, LLHandle]:
    W, El, cap, H = world.world_size, world.experts_per_rank, world.capacity, world.hidden
    rows = W * cap
    dev = sent.pos.device
    stage_x = world.region(rank, "x", (El * W * cap * H,), _RAW_BY_DTYPE[world.dtype])
    stage_meta = world.region(rank, "meta", (El * W * cap * 3,), torch.int32)
    counts = world.region(rank, "counts", (El * W,), torch.int32)
    recv_raw = torch.empty(El, rows, H, dtype=_RAW_BY_DTYPE[world.dtype], device=dev)
    recv_meta = torch.empty(El, rows, 4, dtype=torch.int32, device=dev)
    recv_counts = torch.empty(El, dtype=torch.int32, device=dev)
    _ll_recv_kernel[(El * W, cap)](
        stage_x, stage_meta, counts, recv_raw, recv_meta, recv_counts, sent.flag, H, cap,
        W=W, WP=triton.next_power_of_2(W), BLOCK_H=block_h(H),
    )
    out = LLDispatchOutput(
        recv_x=recv_raw.view(world.dtype), recv_counts=recv_counts,
        recv_src_rank=recv_meta[..., 0], recv_src_token=recv_meta[..., 1], recv_topk_slot=recv_meta[..., 2],
        recv_topk_weights=recv_meta[..., 3].view(torch.float32),
    )
    handle = LLHandle(world, rank, M, world.dtype, sent.ids, sent.weights, sent.pos, recv_counts, recv_meta,
                      sent.flag)
    return out, handle


def _validate_combine(expert_output, handle):
    if not isinstance(handle, LLHandle):
        raise TypeError(f"handle must be the LLHandle dispatch_ll returned; got {type(handle).__name__}")
    w = handle.world
    want = (w.experts_per_rank, w.world_size * w.capacity, w.hidden)
    if not isinstance(expert_output, torch.Tensor) or tuple(expert_output.shape) != want:
        got = tuple(expert_output.shape) if isinstance(expert_output, torch.Tensor) else type(expert_output).__name__
        raise ValueError(f"expert_output must be [El, W*capacity, H] = {list(want)}; got {got}")
    if expert_output.dtype != handle.dtype:
        raise TypeError(f"expert_output must be {handle.dtype} (the LLWorld's dtype); got {expert_output.dtype}")


def _combine_send(expert_output, handle: LLHandle):
    w = handle.world
    El, rows, H = expert_output.shape
    y = expert_output.contiguous().view(_RAW_BY_DTYPE[handle.dtype])
    _ll_combine_send_kernel[(El, rows)](
        y, handle.recv_meta, handle.recv_counts, w.comb_table, H, rows, K=w.top_k, BLOCK_H=block_h(H))


def _combine_reduce(handle: LLHandle) -> torch.Tensor:
    w = handle.world
    M, H, k = handle.num_tokens, w.hidden, w.top_k
    out = torch.empty(M, H, dtype=handle.dtype, device=handle.pos.device)
    if M:
        comb = w.region(handle.rank, "comb", (w.max_tokens_per_rank * k * H,), handle.dtype)
        bh = block_h(H)
        _ll_combine_reduce_kernel[(M, triton.cdiv(H, bh))](
            comb, handle.topk_ids, handle.topk_weights, handle.pos, out, H, w.num_experts, w.experts_per_rank,
            w.capacity, K=k, W=w.world_size, BLOCK_H=bh,
        )
    return out


# ------------------------------------------------------------------------------------------ entry points


def dispatch_ll(world: LLWorld, x, topk_ids, topk_weights, num_experts) -> tuple[LLDispatchOutput, LLHandle]:
    """Low-latency dispatch for this rank of a real node (world from LLWorld.symmetric). No host sync.

    x: [M, H] world.dtype, M <= world.max_tokens_per_rank; topk_ids: [M, k] int32|int64 in [0, E);
    topk_weights: [M, k] float. Returns (LLDispatchOutput, LLHandle); see the module docstring for the layout.
    """
    if world.rank is None:
        raise ValueError("this LLWorld is emulated: drive it with dispatch_ll_emulated")
    _validate(world, x, topk_ids, topk_weights, num_experts)
    sent = _send(world, world.rank, x, topk_ids, topk_weights)
    world.barrier()  # every source's rows and counts are in place before this rank reads its staging
    return _receive(world, world.rank, sent, x.shape[0])


def combine_ll(expert_output: torch.Tensor, handle: LLHandle) -> torch.Tensor:
    """expert_output: [El, W*capacity, H] unweighted expert results in recv_x's layout (rows past
    recv_counts are ignored). Returns [M, H] dtype on the source rank, rounded as combine_reference."""
    _validate_combine(expert_output, handle)
    _combine_send(expert_output, handle)
    handle.world.barrier()  # every destination's rows are in this rank's comb region before it reduces
    return _combine_reduce(handle)


def dispatch_ll_emulated(world: LLWorld, xs, topk_ids, topk_weights, num_experts):
    """Low-latency dispatch for W emulated ranks (lists indexed by rank); returns [(LLDispatchOutput, LLHandle)].

    All W sources write, then all W receivers read: the stream order stands in for the barrier.
    """
    W = world.world_size if isinstance(world, LLWorld) else None
    if W is None:
        raise TypeError(f"world must be an LLWorld; got {type(world).__name__}")
    if world.rank is not None:
        raise ValueError("dispatch_ll_emulated needs LLWorld.emulated(...); this one is symmetric")
    for name, v in (("xs", xs), ("topk_ids", topk_ids), ("topk_weights", topk_weights)):
        if not isinstance(v, (list, tuple)) or len(v) != W:
            raise ValueError(f"{name} must be a list of W={W} tensors (one per rank); got {type(v).__name__}"
                             + (f" of length {len(v)}" if isinstance(v, (list, tuple)) else ""))
    for r in range(W):
        _validate(world, xs[r], topk_ids[r], topk_weights[r], num_experts, rank_name=f"xs[{r}]")
    sents = [_send(world, r, xs[r], topk_ids[r], topk_weights[r]) for r in range(W)]
    return [_receive(world, r, sents[r], xs[r].shape[0]) for r in range(W)]


def combine_ll_emulated(expert_outputs, handles):
    """Combine for W emulated ranks: expert_outputs[d] is rank d's [El, W*capacity, H]; returns [M_r, H] per rank."""
    if not isinstance(expert_outputs, (list, tuple)) or len(expert_outputs) != len(handles):
        raise ValueError(f"expert_outputs must be a list with one entry per handle ({len(handles)})")
    for y, h in zip(expert_outputs, handles):
        _validate_combine(y, h)
    for y, h in zip(expert_outputs, handles):
        _combine_send(y, h)
    return [_combine_reduce(h) for h in handles]
