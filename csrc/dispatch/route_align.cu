// Routing and moe_align in ONE launch at decode sizes: what fused_topk followed by align(..., expert_counts=)
// computes, with the same values.
//
// One block (M x L <= kRouteAlignMaxLanes): align's 512 threads route every token with the reduction-selection teams
// of routing/redux_topk.cuh (writing weights and ids, counting choices in shared memory), write the counts, and
// after a barrier lay the slots out with align's scatter (dispatch/align_scatter.cuh), reading the ids just written
// through L2. So the two kernels' launch gaps and the ids' round trip through a second launch are gone.
//
// Grid (above, while the blocks fit the GPU at once): block b routes the tokens [b T, (b + 1) T), one per team of L
// lanes (T = 512 / L: 16 tokens at L = 32, 64 at L = 8), so its slots are the b-th chunk of T x top_k; it writes its
// chunk's expert counts, all blocks meet at the runtime's grid barrier (a cooperative launch: every block is
// resident; no state of ours, so concurrent launches and graph replays cannot share one), and each scatters its own
// chunk with align's several-chunk path (prefix over the earlier chunks' counts; chunk 0 writes the totals as the
// counts). One launch where routing + align took two or three (routing, align's chunk histogram, its
// scatter): DeepSeek-V3 at M = 64 and 256 lost to vLLM's two kernels that way (1.29x, 1.43x). Bounds: at most
// kRouteAlignGridMaxBlocks blocks (M <= 256 at L = 32) and no more than can be resident (num_sms x occupancy);
// past that the caller runs the two kernels.
#include "dispatch/align_plan.h"
#include "dispatch/align_scatter.cuh"
#include "dispatch/route_align.h"
#include "routing/redux_topk.cuh"

#include <algorithm>
#include <atomic>

namespace mk {
namespace {

using redux::Args;
constexpr int kThreads = align_detail::kThreads;

struct AlignOut {
  int32_t* sorted;
  int32_t* block_ids;
  int32_t* num_post_pad;
  int64_t max_padded, max_blocks;
  int block_size;
};

template <typename T, int V, int L, bool kSoftmax, bool kGrouped, int IPT, bool kThreadPads>
__global__ void __launch_bounds__(kThreads) route_align_kernel(const Args a, const AlignOut o) {
  constexpr int kTeams = kWarpSize / L;
  allow_dependent_launch();  // fused_moe's GEMM1 (launched with PDL) starts its blocks while this one routes
  __shared__ int s_hist[kTopkMaxExperts];
  const int64_t stride = static_cast<int64_t>(kThreads / kWarpSize) * kTeams;
  const int64_t t0 = static_cast<int64_t>(threadIdx.x / kWarpSize) * kTeams;
  redux::route_block_tokens<T, V, L, kSoftmax, kGrouped>(a, t0, stride, s_hist);
  __syncthreads();  // every id of the launch is written (and visible to this block through L2)
  for (int e = threadIdx.x; e < a.E; e += kThreads) a.counts[e] = s_hist[e];
  align_detail::align_scatter_block<IPT, align_detail::LoadWrittenHere, align_detail::MatchHardware, kThreadPads>(
      a.ids, a.M * a.top_k, a.E, o.block_size, nullptr, nullptr, o.sorted, o.block_ids, o.num_post_pad, nullptr,
      nullptr, o.max_padded, o.max_blocks, 0, 1, align_detail::LoadWrittenHere{});
}

// ------------------------------------------------------------------------------------------ grid tier

struct GridArgs {
  int32_t* chunk_hist;  // [blocks, E]: each block's expert counts
  int64_t tokens_per_block;
};

template <typename T, int V, int L, bool kSoftmax, bool kGrouped, bool kThreadPads>
__global__ void __launch_bounds__(kThreads) route_align_grid_kernel(const Args a, const AlignOut o, const GridArgs g) {
  constexpr int kTeams = kWarpSize / L;
  allow_dependent_launch();  // every block is resident before GEMM1's blocks can start
  __shared__ int s_hist[kTopkMaxExperts];
  const int64_t first = static_cast<int64_t>(blockIdx.x) * g.tokens_per_block;
  Args mine = a;  // this block's tokens: the routing loop stops at its last one
  mine.M = first + g.tokens_per_block < a.M ? first + g.tokens_per_block : a.M;
  const int64_t stride = static_cast<int64_t>(kThreads / kWarpSize) * kTeams;
  const int64_t t0 = first + static_cast<int64_t>(threadIdx.x / kWarpSize) * kTeams;
  redux::route_block_tokens<T, V, L, kSoftmax, kGrouped>(mine, t0, stride, s_hist);
  __syncthreads();
  for (int e = threadIdx.x; e < a.E; e += kThreads) g.chunk_hist[static_cast<int64_t>(blockIdx.x) * a.E + e] = s_hist[e];
  grid_sync();  // every chunk's counts (and ids) are written
  align_detail::align_scatter_block<1, align_detail::LoadWrittenHere, align_detail::MatchHardware, kThreadPads>(
      a.ids, a.M * a.top_k, a.E, o.block_size, nullptr, g.chunk_hist, o.sorted, o.block_ids, o.num_post_pad, nullptr,
      nullptr, o.max_padded, o.max_blocks, static_cast<int>(blockIdx.x), static_cast<int>(gridDim.x),
      align_detail::LoadWrittenHere{}, align_detail::MatchHardware{}, g.tokens_per_block * a.top_k, a.counts);
}

// Tokens per block of the grid tier: one per team (a block's slots then fit one per thread: 16 x 16 at L = 32 and
// top_k <= 16, 64 x 8 at L = 8).
constexpr int64_t grid_tokens_per_block(int L) {
  return static_cast<int64_t>(kThreads / kWarpSize) * (kWarpSize / L);
}

// Blocks the grid tier can keep resident at once on the current device (one per SM at 512 threads where registers
// allow no more), asked once per device.
template <typename T, int V, int L, bool kSoftmax, bool kGrouped, bool kThreadPads>
int64_t grid_tier_capacity() {
  constexpr int kDevices = 64;
  static std::atomic<int64_t> cap[kDevices];  // 0: not asked yet
  int dev = 0;
  if (current_device(&dev) != kSuccess || dev < 0 || dev >= kDevices) return 0;
  int64_t c = cap[dev].load(std::memory_order_relaxed);
  if (c == 0) {
    c = static_cast<int64_t>(num_sms()) *
        max_active_blocks(reinterpret_cast<const void*>(route_align_grid_kernel<T, V, L, kSoftmax, kGrouped, kThreadPads>),
                          kThreads);
    cap[dev].store(c, std::memory_order_relaxed);
  }
  return c;
}

// A launch the runtime refuses (a grid that cannot be resident after all, e.g. the GPU shared with other work) is
// cleared and reported as unsupported: the caller runs the two kernels.
template <typename T, int V, int L, bool kSoftmax, bool kGrouped, bool kThreadPads>
Error launch_grid_tier(const Args& a, const AlignOut& o, int32_t* chunk_hist, int blocks, bool& unsupported,
                       Stream stream) {
  GridArgs g;
  g.chunk_hist = chunk_hist;
  g.tokens_per_block = grid_tokens_per_block(L);
  const Error e = launch_cooperative(route_align_grid_kernel<T, V, L, kSoftmax, kGrouped, kThreadPads>,
                                     static_cast<unsigned>(blocks), static_cast<unsigned>(kThreads), stream, a, o, g);
  if (e != kSuccess) {
    (void)last_error();
    unsupported = true;
  }
  return kSuccess;
}

template <typename T, int V, int L, bool kThreadPads>
Error launch_grid_pads(const Args& a, const AlignOut& o, int32_t* chunk_hist, bool softmax, bool& unsupported,
                       Stream stream) {
  const int64_t blocks = (a.M + grid_tokens_per_block(L) - 1) / grid_tokens_per_block(L);
  const bool grouped = a.G > 1;
#define MOEKERN_GRID_TIER(SM, GR)                                                                     \
  if (softmax == (SM) && grouped == (GR)) {                                                         \
    if (blocks > kRouteAlignGridMaxBlocks || blocks > grid_tier_capacity<T, V, L, SM, GR, kThreadPads>() || \
        chunk_hist == nullptr)                                                                      \
      return unsupported = true, kSuccess;                                                          \
    return launch_grid_tier<T, V, L, SM, GR, kThreadPads>(a, o, chunk_hist, static_cast<int>(blocks), unsupported, \
                                                          stream);                                  \
  }
  MOEKERN_GRID_TIER(true, true)
  MOEKERN_GRID_TIER(true, false)
  MOEKERN_GRID_TIER(false, true)
  MOEKERN_GRID_TIER(false, false)
#undef MOEKERN_GRID_TIER
  return unsupported = true, kSuccess;
}

// ------------------------------------------------------------------------------------------ one block

template <typename T, int V, int L, int IPT, bool kThreadPads>
void launch_ipt(const Args& a, const AlignOut& o, bool softmax, Stream stream) {
  const bool grouped = a.G > 1;
  if (softmax) {
    if (grouped) route_align_kernel<T, V, L, true, true, IPT, kThreadPads><<<1, kThreads, 0, stream>>>(a, o);
    else route_align_kernel<T, V, L, true, false, IPT, kThreadPads><<<1, kThreads, 0, stream>>>(a, o);
  } else {
    if (grouped) route_align_kernel<T, V, L, false, true, IPT, kThreadPads><<<1, kThreads, 0, stream>>>(a, o);
    else route_align_kernel<T, V, L, false, false, IPT, kThreadPads><<<1, kThreads, 0, stream>>>(a, o);
  }
}

template <typename T, int V, int L, bool kThreadPads>
void launch_pads(const Args& a, const AlignOut& o, bool softmax, Stream stream) {
  // L = 32 buckets hold M <= 32 tokens of top_k <= 16: at most 512 slots, so only L < 32 compiles the two-slot twin
  if constexpr (L < 32) {
    if (a.M * a.top_k > kThreads) return launch_ipt<T, V, L, 2, kThreadPads>(a, o, softmax, stream);
  }
  launch_ipt<T, V, L, 1, kThreadPads>(a, o, softmax, stream);
}

// Slots per thread of the scatter: one while the M x top_k slots fit the block's threads, else two. M x L <=
// kRouteAlignMaxLanes keeps M x top_k <= 1024 in every bucket (L = 32: M <= 32 and top_k <= 16; L = 16: E <= 16;
// L = 8: E <= 8), so as many warps as possible share the scatter (align.cu's plan, at these sizes). Pads and block
// ids by one thread per expert where align's default plan does so (align_default_thread_pads: E >= 64, B <= 16);
// only the buckets of E >= 64 (V >= 2) compile that twin.
template <typename T, int V, int L>
Error launch_bucket(const Args& a, const AlignOut& o, bool softmax, Stream stream) {
  if constexpr (V >= 2) {
    if (align_default_thread_pads(a.M * a.top_k, a.E, o.block_size)) {
      launch_pads<T, V, L, true>(a, o, softmax, stream);
      return last_error();
    }
  }
  launch_pads<T, V, L, false>(a, o, softmax, stream);
  return last_error();
}

template <typename T, int V, int L>
Error launch_grid_bucket(const Args& a, const AlignOut& o, int32_t* chunk_hist, bool softmax, bool& unsupported,
                         Stream stream) {
  if constexpr (V >= 2) {
    if (align_default_thread_pads(a.M * a.top_k, a.E, o.block_size))
      return launch_grid_pads<T, V, L, true>(a, o, chunk_hist, softmax, unsupported, stream);
  }
  return launch_grid_pads<T, V, L, false>(a, o, chunk_hist, softmax, unsupported, stream);
}

template <typename T>
Error launch_typed(Args& a, const AlignOut& o, int32_t* chunk_hist, bool softmax, bool& unsupported, Stream stream) {
#define MOEKERN_ROUTE_ALIGN_CASE(EB, VV, LL)                                                                \
  if (a.E <= (EB)) {                                                                                        \
    if (!redux::group_lanes_for(a.E, a.G, (VV), (LL), &a.group_lanes)) return unsupported = true, kSuccess; \
    a.vec = redux::vector_loads_ok(a.logits, a.E, sizeof(T), (VV));                                          \
    if (a.M * (LL) > kRouteAlignMaxLanes)                                                                   \
      return launch_grid_bucket<T, (VV), (LL)>(a, o, chunk_hist, softmax, unsupported, stream);             \
    return launch_bucket<T, (VV), (LL)>(a, o, softmax, stream);                                             \
  }
  MOEKERN_ROUTE_ALIGN_BUCKETS(MOEKERN_ROUTE_ALIGN_CASE)
#undef MOEKERN_ROUTE_ALIGN_CASE
  return unsupported = true, kSuccess;
}

}  // namespace

int64_t route_align_scratch_elems(int64_t M, int E) {
  if (E < 1 || E > kTopkMaxExperts || M < 1) return 0;
  const int L = route_align_lanes(E);
  if (M * L <= kRouteAlignMaxLanes) return 0;
  const int64_t blocks = (M + grid_tokens_per_block(L) - 1) / grid_tokens_per_block(L);
  return blocks <= kRouteAlignGridMaxBlocks ? blocks * E : 0;
}

Error launch_route_align(const void* logits, DType dtype, int64_t M, int E, int top_k, int scoring, bool renormalize,
                         const float* bias, int num_groups, int topk_group, float scale, float* weights, int32_t* ids,
                         int32_t* counts, int block_size, int32_t* sorted, int32_t* block_ids, int32_t* num_post_pad,
                         int32_t* scratch, Stream stream, bool* unsupported) {
  *unsupported = false;
  if (E < 1 || E > kTopkMaxExperts || top_k < 1 || top_k > kTopkMaxK || top_k > E || M < 0 || block_size < 1 ||
      (scoring != 0 && scoring != 1))
    return kInvalidValue;
  const int G = num_groups > 1 ? num_groups : 0;
  if (G > 1 && (E % G != 0 || topk_group < 1 || topk_group > G)) return kInvalidValue;
  const int64_t n = M * top_k;
  if (M < 1) {
    *unsupported = true;
    return kSuccess;
  }
  AlignOut o;
  o.sorted = sorted;
  o.block_ids = block_ids;
  o.num_post_pad = num_post_pad;
  o.max_padded = align_max_padded(n, E, block_size);
  o.max_blocks = (o.max_padded + block_size - 1) / block_size;
  o.block_size = block_size;
  if (o.max_padded >= (static_cast<int64_t>(1) << 31)) return kInvalidValue;
  Args a = redux::make_args(logits, M, E, top_k, renormalize, bias, G, topk_group, scale, weights, ids, counts);
  MOEKERN_DISPATCH_FLOAT(dtype, T, return launch_typed<T>(a, o, scratch, scoring == 0, *unsupported, stream));
  return kInvalidValue;
}

}  // namespace mk
