// Stable grouping of the n = M*k routed slots by expert: moe_align (block-padded, for blocked grouped
// GEMMs) and the permute layout (block size 1) share this one code path.
//
// Algorithm. The slots are cut into chunks of kThreads*IPT consecutive slots, one CTA per chunk, and each
// chunk into one contiguous run per warp. Positions are
//   pos(slot) = padded_offset[e] + (slots of e in earlier chunks) + (in earlier warps of this chunk)
//             + (in earlier lanes of this warp step) + (in earlier steps of this warp),
// so the output is in slot order within each expert, as the reference's stable argsort is, without any
// sort. Launch 1 (only when there is more than one chunk) writes each chunk's [E] histogram; launch 2
// builds per-warp histograms in shared memory, reduces the chunk histograms for its prefix and the totals
// (the totals come from expert_counts when given), scans the padded totals, and scatters: within a warp
// step, lanes with the same expert find each other with match_any and rank by lane. Every CTA also writes
// a grid-stride share of the sentinel padding, block_expert_ids and the tail, so no fill kernel runs.
// Plans (dispatch/align_plan.h has the table and the measurements behind it): one chunk (a single launch, no
// scratch) while its CTA's serial share of the layout stays cheaper than a second launch, else chunks of 512
// slots. Slots per thread are the fewest that hold a chunk, so as many warps as possible share its slots: with 16
// per thread at 2,048 slots, 4 warps walked 16 dependent scatter steps while 12 waited at the next barrier (ncu,
// benchmarks/results/fastpath/h100-2026-12-07-vllm). launch_align_variant forces a plan, the matcher and the pad
// writers, so benchmarks/align_variants.py --plans times every plan against the default.
//
// Bounds: 1 <= E <= 512 (one expert per thread in the scans), n + min(n, E)*(B-1) < 2^31. Scratch: C*E int32 for
// C > 1 chunks; the default plan keeps C <= 256 up to 2^19 slots by growing the chunk, so each CTA reads at most
// C*E chunk counts.

#include "dispatch/align_plan.h"
#include "dispatch/align_scatter.cuh"

namespace mk {
namespace {

using namespace align_detail;

template <int IPT>
__global__ void __launch_bounds__(kThreads)
chunk_hist_kernel(const int32_t* __restrict__ ids, int64_t n, int E, int32_t* __restrict__ chunk_hist) {
  __shared__ int32_t s_hist[kDispatchMaxExperts];
  for (int e = threadIdx.x; e < E; e += kThreads) s_hist[e] = 0;
  __syncthreads();
  const int64_t start = static_cast<int64_t>(blockIdx.x) * kThreads * IPT;
#pragma unroll
  for (int i = 0; i < IPT; ++i) {
    const int64_t s = start + static_cast<int64_t>(i) * kThreads + threadIdx.x;
    if (s < n) {
      const int e = ids[s];
      if (e >= 0 && e < E) atomicAdd(&s_hist[e], 1);
    }
  }
  __syncthreads();
  for (int e = threadIdx.x; e < E; e += kThreads) chunk_hist[static_cast<int64_t>(blockIdx.x) * E + e] = s_hist[e];
}

template <int IPT, typename Match, bool kThreadPads>
__global__ void __launch_bounds__(kThreads)
align_scatter_kernel(const int32_t* __restrict__ ids, int64_t n, int E, int B,
                     const int32_t* __restrict__ expert_counts, const int32_t* __restrict__ chunk_hist,
                     int32_t* __restrict__ sorted, int32_t* __restrict__ block_ids, int32_t* __restrict__ num_post_pad,
                     int32_t* __restrict__ slot_to_row, int32_t* __restrict__ offsets, int64_t max_padded,
                     int64_t max_blocks) {
  allow_dependent_launch();  // align's last launch: fused_moe's GEMM1 (launched with PDL) may start its blocks
  align_scatter_block<IPT, LoadReadOnly, Match, kThreadPads>(
      ids, n, E, B, expert_counts, chunk_hist, sorted, block_ids, num_post_pad, slot_to_row, offsets, max_padded,
      max_blocks, static_cast<int>(blockIdx.x), static_cast<int>(gridDim.x), LoadReadOnly{}, Match{});
}

static_assert(kAlignThreads == kThreads && kAlignMaxIPT == kLargeIPT, "align_plan.h describes this kernel");

constexpr int64_t kMaxVariantChunks = 4096;  // a forced plan's chunks: each CTA sums up to chunks * E counts

// ipt 0: the default plan (align_plan.h); else chunks of kThreads * ipt slots (ipt a power of two <= kLargeIPT).
// chunks 0: invalid.
AlignPlan plan_with(int64_t n, int E, int ipt) {
  if (ipt == 0) return align_default_plan(n, E);
  if (ipt < 0 || ipt > kLargeIPT || (ipt & (ipt - 1)) != 0) return {ipt, 0};
  const int64_t chunks = align_chunks(n, ipt);
  return {ipt, chunks <= kMaxVariantChunks ? chunks : 0};
}

template <int IPT, typename Match, bool kThreadPads>
Error launch_plan(const int32_t* ids, int64_t n, int E, int B, const int32_t* expert_counts, int32_t* sorted,
                  int32_t* block_ids, int32_t* num_post_pad, int32_t* slot_to_row, int32_t* offsets,
                  int32_t* scratch, int64_t chunks, int64_t max_padded, int64_t max_blocks, Stream stream) {
  const int32_t* chunk_hist = nullptr;
  if (chunks > 1) {
    chunk_hist_kernel<IPT><<<static_cast<unsigned>(chunks), kThreads, 0, stream>>>(ids, n, E, scratch);
    chunk_hist = scratch;
  }
  align_scatter_kernel<IPT, Match, kThreadPads><<<static_cast<unsigned>(chunks), kThreads, 0, stream>>>(
      ids, n, E, B, expert_counts, chunk_hist, sorted, block_ids, num_post_pad, slot_to_row, offsets, max_padded,
      max_blocks);
  return last_error();
}

template <typename Match, bool kThreadPads>
Error launch_match(const AlignPlan& p, const int32_t* ids, int64_t n, int E, int B, const int32_t* expert_counts,
                   int32_t* sorted, int32_t* block_ids, int32_t* num_post_pad, int32_t* slot_to_row, int32_t* offsets,
                   int32_t* scratch, int64_t max_padded, int64_t max_blocks, Stream stream) {
#define MOEKERN_ALIGN_PLAN(IPT)                                                                                   \
  if (p.ipt == (IPT))                                                                                            \
    return launch_plan<(IPT), Match, kThreadPads>(ids, n, E, B, expert_counts, sorted, block_ids, num_post_pad,    \
                                                  slot_to_row, offsets, scratch, p.chunks, max_padded, max_blocks, \
                                                  stream);
  MOEKERN_ALIGN_PLAN(1)
  MOEKERN_ALIGN_PLAN(2)
  MOEKERN_ALIGN_PLAN(4)
  MOEKERN_ALIGN_PLAN(8)
  MOEKERN_ALIGN_PLAN(16)
#undef MOEKERN_ALIGN_PLAN
  return kInvalidValue;
}

}  // namespace

int64_t align_scratch_elems(int64_t n, int E, int slots_per_thread) {
  const AlignPlan p = plan_with(n, E, slots_per_thread);
  return p.chunks > 1 ? p.chunks * E : 0;
}

Error launch_align_variant(const int32_t* ids, int64_t n, int E, int B, const int32_t* expert_counts,
                           int32_t* sorted, int32_t* block_ids, int32_t* num_post_pad, int32_t* slot_to_row,
                           int32_t* offsets, int32_t* scratch, Stream stream, int slots_per_thread,
                           bool ballot_match, bool thread_pads) {
  if (E < 1 || E > kDispatchMaxExperts || B < 1 || n < 0 || (ballot_match && thread_pads)) return kInvalidValue;
  const int64_t max_padded = align_max_padded(n, E, B);
  if (max_padded >= (static_cast<int64_t>(1) << 31)) return kInvalidValue;
  const int64_t max_blocks = (max_padded + B - 1) / B;
  const AlignPlan p = plan_with(n, E, slots_per_thread);
  if (p.chunks < 1 || (p.chunks > 1 && scratch == nullptr)) return kInvalidValue;
  if (ballot_match)
    return launch_match<MatchBallot, false>(p, ids, n, E, B, expert_counts, sorted, block_ids, num_post_pad,
                                            slot_to_row, offsets, scratch, max_padded, max_blocks, stream);
  if (thread_pads)
    return launch_match<MatchHardware, true>(p, ids, n, E, B, expert_counts, sorted, block_ids, num_post_pad,
                                             slot_to_row, offsets, scratch, max_padded, max_blocks, stream);
  return launch_match<MatchHardware, false>(p, ids, n, E, B, expert_counts, sorted, block_ids, num_post_pad,
                                            slot_to_row, offsets, scratch, max_padded, max_blocks, stream);
}

Error launch_align(const int32_t* ids, int64_t n, int E, int B, const int32_t* expert_counts, int32_t* sorted,
                   int32_t* block_ids, int32_t* num_post_pad, int32_t* slot_to_row, int32_t* offsets,
                   int32_t* scratch, Stream stream) {
  return launch_align_variant(ids, n, E, B, expert_counts, sorted, block_ids, num_post_pad, slot_to_row, offsets,
                              scratch, stream, 0, false, false);
}

}  // namespace mk
