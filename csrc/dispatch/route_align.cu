// Routing and moe_align in ONE launch at decode sizes: what fused_topk followed by align(..., expert_counts=)
// computes, with the same values.
//
// One block of align's 512 threads routes every token with the reduction-selection teams of
// routing/redux_topk.cuh (writing weights and ids, counting choices in shared memory), writes the counts,
// and after a barrier lays the slots out with align's scatter (dispatch/align_scatter.cuh), reading the
// ids it just wrote through L2. So the two kernels' launch gaps and the ids' round trip through a second
// launch are gone. Bounds: M x L <= kRouteAlignMaxLanes (above, one block routes too many tokens one after another:
// the caller runs the two kernels instead), which keeps M * top_k <= 1024 slots, two per thread of the scatter.
#include "dispatch/align_plan.h"
#include "dispatch/align_scatter.cuh"
#include "dispatch/route_align.h"
#include "routing/redux_topk.cuh"

#include <algorithm>

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

template <typename T>
Error launch_typed(Args& a, const AlignOut& o, bool softmax, bool& unsupported, Stream stream) {
#define MOEKERN_ROUTE_ALIGN_CASE(EB, VV, LL)                                                                \
  if (a.E <= (EB)) {                                                                                        \
    if (!redux::group_lanes_for(a.E, a.G, (VV), (LL), &a.group_lanes)) return unsupported = true, kSuccess; \
    a.vec = redux::vector_loads_ok(a.logits, a.E, sizeof(T), (VV));                                          \
    if (a.M * (LL) > kRouteAlignMaxLanes) return unsupported = true, kSuccess;                              \
    return launch_bucket<T, (VV), (LL)>(a, o, softmax, stream);                                             \
  }
  MOEKERN_ROUTE_ALIGN_BUCKETS(MOEKERN_ROUTE_ALIGN_CASE)
#undef MOEKERN_ROUTE_ALIGN_CASE
  return unsupported = true, kSuccess;
}

}  // namespace

Error launch_route_align(const void* logits, DType dtype, int64_t M, int E, int top_k, int scoring, bool renormalize,
                         const float* bias, int num_groups, int topk_group, float scale, float* weights, int32_t* ids,
                         int32_t* counts, int block_size, int32_t* sorted, int32_t* block_ids, int32_t* num_post_pad,
                         Stream stream, bool* unsupported) {
  *unsupported = false;
  if (E < 1 || E > kTopkMaxExperts || top_k < 1 || top_k > kTopkMaxK || top_k > E || M < 0 || block_size < 1 ||
      (scoring != 0 && scoring != 1))
    return kInvalidValue;
  const int G = num_groups > 1 ? num_groups : 0;
  if (G > 1 && (E % G != 0 || topk_group < 1 || topk_group > G)) return kInvalidValue;
  const int64_t n = M * top_k;
  if (M < 1 || n > static_cast<int64_t>(kThreads) * 2) {
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
  MOEKERN_DISPATCH_FLOAT(dtype, T, return launch_typed<T>(a, o, scoring == 0, *unsupported, stream));
  return kInvalidValue;
}

}  // namespace mk
