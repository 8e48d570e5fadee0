// The scatter of moe_align as a block-level device function, so a kernel that has just written the ids can
// lay them out in the same launch (csrc/dispatch/route_align.cu) and align.cu's own kernel runs the same code.
// align.cu's paragraph has the algorithm.
#pragma once

#include "dispatch/dispatch.h"

namespace mk {
namespace align_detail {

constexpr int kThreads = 512;
static_assert(kThreads == kDispatchMaxExperts, "the scans give each thread one expert");
constexpr int kWarps = kThreads / kWarpSize;
constexpr int kSkip = kDispatchMaxExperts;  // key of a slot that is out of range or has an invalid id
constexpr int kKeyBits = 10;                // keys in [0, 512]
constexpr int kLargeIPT = 16;               // the most slots per thread: 8192-slot chunks

// Exclusive block-wide prefix sum; every thread must call it. `total` gets the sum of all v.
__device__ __forceinline__ int block_exclusive_scan(int v, int* s_warp, int& total) {
  const int lane = lane_id(), warp = threadIdx.x / kWarpSize;
  int x = v;
#pragma unroll
  for (int d = 1; d < kWarpSize; d <<= 1) {
    const int y = shfl_up(x, d);
    if (lane >= d) x += y;
  }
  if (lane == kWarpSize - 1) s_warp[warp] = x;
  __syncthreads();
  if (warp == 0) {
    int wv = lane < kWarps ? s_warp[lane] : 0;
#pragma unroll
    for (int d = 1; d < kWarpSize; d <<= 1) {
      const int y = shfl_up(wv, d);
      if (lane >= d) wv += y;
    }
    if (lane < kWarps) s_warp[lane] = wv;
  }
  __syncthreads();
  total = s_warp[kWarps - 1];
  return (warp > 0 ? s_warp[warp - 1] : 0) + x - v;
}


// Lanes of the warp step holding the same key (kSkip included). The hardware match is one instruction whose
// cost grows with the distinct keys of the step; MatchBallot intersects one ballot per bit of the keys in
// use (E and kSkip fold into bit_width(E) bits), a fixed chain of ~8-10 ballots. Which is faster is measured
// (benchmarks/align_variants.py --plans), not assumed.
struct MatchHardware {
  __device__ __forceinline__ lane_mask_t operator()(unsigned key, int /*E*/) const {
    return match_any<kKeyBits>(key);
  }
};

struct MatchBallot {
  __device__ __forceinline__ lane_mask_t operator()(unsigned key, int E) const {
    const unsigned k = key == static_cast<unsigned>(kSkip) ? static_cast<unsigned>(E) : key;  // keys in [0, E]
    return match_any_ballots(k, 32 - __clz(E));  // E is the same on every lane
  }
};

struct LoadReadOnly {  // ids written before the launch
  __device__ __forceinline__ int operator()(const int32_t* p) const { return *p; }
};

struct LoadWrittenHere {  // ids written earlier in the same launch by other threads of the block
#ifdef MOEKERN_HIP
  __device__ __forceinline__ int operator()(const int32_t* p) const { return *reinterpret_cast<const volatile int32_t*>(p); }
#else
  __device__ __forceinline__ int operator()(const int32_t* p) const { return __ldcg(p); }
#endif
};

// One chunk (CTA) of the scatter: `chunk` of `num_chunks`, kThreads threads. load_id reads one routed id and the
// chunk counts: a kernel that wrote them itself passes a load that bypasses the non-coherent cache. match:
// MatchHardware or MatchBallot. kThreadPads: each expert's pads and block experts are written by one thread instead
// of one warp (see the layout below; the default where align_plan.h's align_default_thread_pads says so).
// chunk_slots: the slots of a chunk (0: kThreads * IPT; fewer when each chunk is one routing block's tokens).
// counts_out: chunk 0 writes every expert's total there (nullable).
template <int IPT, typename LoadId, typename Match = MatchHardware, bool kThreadPads = false>
__device__ __forceinline__ void align_scatter_block(const int32_t* ids, int64_t n, int E, int B,
                                                    const int32_t* __restrict__ expert_counts,
                                                    const int32_t* chunk_hist, int32_t* __restrict__ sorted,
                                                    int32_t* __restrict__ block_ids, int32_t* __restrict__ num_post_pad,
                                                    int32_t* __restrict__ slot_to_row, int32_t* __restrict__ offsets,
                                                    int64_t max_padded, int64_t max_blocks, int chunk, int num_chunks,
                                                    LoadId load_id, Match match = Match{}, int64_t chunk_slots = 0,
                                                    int32_t* __restrict__ counts_out = nullptr) {
  __shared__ int32_t s_hist[kWarps][kDispatchMaxExperts];  // per-warp counts, then running positions
  __shared__ int32_t s_base[kDispatchMaxExperts];          // first position of this chunk's slots of e
  __shared__ int32_t s_off[kDispatchMaxExperts + 1];       // padded offset of each expert's run
  __shared__ int32_t s_blk[kDispatchMaxExperts + 1];       // its first block (s_off / B), then the used blocks
  __shared__ int32_t s_cnt[kDispatchMaxExperts];           // slots of each expert
  __shared__ int32_t s_warp[kWarps];
  const int tid = threadIdx.x, lane = lane_id(), warp = tid / kWarpSize;
  const int64_t per_chunk = chunk_slots > 0 ? chunk_slots : static_cast<int64_t>(kThreads) * IPT;
  const int64_t chunk_start = static_cast<int64_t>(chunk) * per_chunk;
  const int64_t chunk_end = chunk_start + per_chunk < n ? chunk_start + per_chunk : n;
  const int64_t warp_start = chunk_start + static_cast<int64_t>(warp) * kWarpSize * IPT;
  // Warps past the last slot of the chunk hold no slot: their histogram rows stay unused and they skip the
  // scatter (decode batches fill one or two warps of the 16).
  const int64_t left = chunk_end - chunk_start;
  const int64_t warps_needed = (left + kWarpSize * IPT - 1) / (kWarpSize * IPT);
  const int active_warps = left <= 0 ? 0 : static_cast<int>(warps_needed < kWarps ? warps_needed : kWarps);

  if (tid < E)
    for (int w = 0; w < active_warps; ++w) s_hist[w][tid] = 0;
  int key[IPT];
#pragma unroll
  for (int i = 0; i < IPT; ++i) {
    const int64_t s = warp_start + static_cast<int64_t>(i) * kWarpSize + lane;
    const int e = s < chunk_end ? load_id(ids + s) : -1;
    key[i] = (e >= 0 && e < E) ? e : kSkip;
  }
  __syncthreads();
#pragma unroll
  for (int i = 0; i < IPT; ++i)
    if (key[i] != kSkip) atomicAdd(&s_hist[warp][key[i]], 1);
  __syncthreads();

  // One thread per expert: per-warp exclusive prefix, this chunk's prefix over earlier chunks, totals.
  const int e = tid;
  int prefix = 0, blocks = 0, total = 0;
  if (e < E) {
    int own = 0;
    for (int w = 0; w < active_warps; ++w) {
      const int c = s_hist[w][e];
      s_hist[w][e] = own;
      own += c;
    }
    if (chunk_hist == nullptr) {
      total = own;
    } else {
      for (int c = 0; c < chunk; ++c) prefix += load_id(chunk_hist + static_cast<int64_t>(c) * E + e);
      if (expert_counts != nullptr) {
        // a caller's counts are trusted only this far: clamped to [0, n], so the scan cannot go negative or wrap
        // for one expert; every write below is also bounded by max_padded / max_blocks
        const int c = expert_counts[e];
        total = c < 0 ? 0 : (c > n ? static_cast<int>(n) : c);
      } else {
        total = prefix;
        for (int c = chunk; c < num_chunks; ++c) total += load_id(chunk_hist + static_cast<int64_t>(c) * E + e);
      }
    }
    blocks = (total + B - 1) / B;
    if (counts_out != nullptr && chunk == 0) counts_out[e] = total;
  }
  // Scan the block counts, not the padded sizes: the layout below then needs no division by B.
  int total_blocks;
  const int blk = block_exclusive_scan(blocks, s_warp, total_blocks);
  const int total_padded = total_blocks * B;
  if (e < E) {
    const int off = blk * B;
    s_off[e] = off;
    s_blk[e] = blk;
    s_base[e] = off + prefix;
    s_cnt[e] = total;
  }
  if (tid == 0) {
    s_off[E] = total_padded;
    s_blk[E] = total_blocks;
  }
  __syncthreads();

  // Scatter, one warp step (kWarpSize slots) at a time, in slot order.
#pragma unroll
  for (int i = 0; i < IPT && warp < active_warps; ++i) {
    const int k = key[i];
    const int64_t s = warp_start + static_cast<int64_t>(i) * kWarpSize + lane;
    const lane_mask_t peers = match(static_cast<unsigned>(k), E);
    if (k != kSkip) {
      const int64_t pos = static_cast<int64_t>(s_base[k]) + s_hist[warp][k] + popc(peers & lanemask_lt());
      if (pos >= 0 && pos < max_padded) {  // only inconsistent expert_counts could make it otherwise
        sorted[pos] = static_cast<int32_t>(s);
        if (slot_to_row != nullptr) slot_to_row[s] = static_cast<int32_t>(pos);
      }
    } else if (s < chunk_end && slot_to_row != nullptr) {
      slot_to_row[s] = -1;
    }
    syncwarp();
    if (k != kSkip && (peers >> lane) == static_cast<lane_mask_t>(1)) s_hist[warp][k] += popc(peers);
    syncwarp();
  }

  // Grid-stride share of the layout: sentinel pads of each run, the tail, block experts, totals. Positions are
  // unsigned 32-bit and every write is bounded by max_padded / max_blocks: max_padded < 2^31 (checked by the
  // launchers) and a step is a warp or a grid stride (< 2^28), so p + step < 2^32; with inconsistent expert_counts
  // a run can reach past the buffers, and the bounds keep its writes inside them.
  const int32_t sentinel = static_cast<int32_t>(n);
  const unsigned pad_end = static_cast<unsigned>(max_padded), blocks_end = static_cast<unsigned>(max_blocks);
  // Expert x's run pads [s_off[x] + s_cnt[x], s_off[x + 1]) and blocks [s_blk[x], s_blk[x + 1]), written from
  // `first` on in steps of `step`.
  const auto write_run = [&](int x, unsigned first, unsigned step) {
    const unsigned run_end = min(static_cast<unsigned>(s_off[x + 1]), pad_end);
    for (unsigned p = s_off[x] + s_cnt[x] + first; p < run_end; p += step) sorted[p] = sentinel;
    if (block_ids != nullptr) {
      const unsigned blk_end = min(static_cast<unsigned>(s_blk[x + 1]), blocks_end);
      for (unsigned b = s_blk[x] + first; b < blk_end; b += step) block_ids[b] = x;
    }
  };
  // kThreadPads: thread x of the CTA whose turn it is (x % num_chunks) writes expert x's run one position at a
  // time: at decode sizes most experts have no slots, and then cost one test instead of a warp's pass. Otherwise
  // one warp per expert writes its run, so the stores of a warp are contiguous. The tail past the last run is a
  // grid-stride fill.
  if constexpr (kThreadPads) {
    if (tid < E && tid % num_chunks == chunk) write_run(tid, 0u, 1u);
  } else {
    for (int x = chunk * kWarps + warp; x < E; x += num_chunks * kWarps) write_run(x, lane, kWarpSize);
  }
  const unsigned gtid = static_cast<unsigned>(chunk) * kThreads + tid;
  const unsigned gstride = static_cast<unsigned>(num_chunks) * kThreads;
  for (unsigned p = static_cast<unsigned>(total_padded) + gtid; p < pad_end; p += gstride) sorted[p] = sentinel;
  if (block_ids != nullptr)
    for (unsigned b = static_cast<unsigned>(total_blocks) + gtid; b < blocks_end; b += gstride) block_ids[b] = -1;
  if (gtid == 0 && num_post_pad != nullptr) *num_post_pad = total_padded;
  if (chunk == 0 && offsets != nullptr)
    for (int x = tid; x <= E; x += kThreads) offsets[x] = s_off[x];
}

}  // namespace align_detail
}  // namespace mk
