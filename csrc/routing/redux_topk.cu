// The reduction-selection routing kernel (redux_topk.cuh has the algorithm) and its launcher.
//
// Grid: one block while each warp routes one token (M x L <= 512 lanes: M <= 16 at L = 32; at L = 8 and
// top_k <= 2, Mixtral, up to M = 128): its block writes every count, so the launch is the whole op. Above, a grid that fills the GPU, grid-striding over tokens, with the ticket histogram
// (histogram.cuh). The next token's logits are loaded before the current one is routed, so a warp's
// loads overlap its selection rounds.
//
// Buckets (E -> V experts per lane, L lanes per token): E <= 8: 1 x 8, 16: 1 x 16, 32: 1 x 32, 64: 2 x 32,
// 128: 4 x 32, 256: 8 x 32, 512: 16 x 32. Grouped selection needs E/G to be a power-of-two multiple of V
// lanes; otherwise, or when a multi-block launch finds no free histogram slot, launch_redux_topk launches
// nothing and sets *unsupported (the caller falls back to another kernel). kReduxGridMultiAtomic (a variant for
// measurement) runs the same grid with a memset of the counts before it and global atomics in place of the ticket.
#include "routing/histogram.cuh"
#include "routing/redux_topk.cuh"

#include <algorithm>

namespace mk {
namespace {

using redux::Args;

constexpr int kReduxThreads = 512;       // block size bound (<= 128 registers per thread)
constexpr int kReduxMultiThreads = 256;  // block size of the multi-block grid
// auto: one block while every warp routes one token (M * L <= 512 lanes), or two when a token has at most two
// rounds (top_k <= 2, Mixtral); above, the ticket grid. Measured on an H100 (benchmarks/results/fastpath/): a
// warp's tokens run one after another, each a chain of dependent reductions (DeepSeek-V3: ~3.6 us), so a second
// token per warp costs more than the ticket grid's tail except for the shortest chains.
constexpr int kReduxSingleLanes = 512;
constexpr int kReduxSingleLanesShortK = 1024;

template <typename T, int V, int L, bool kSoftmax, bool kGrouped>
__global__ void __launch_bounds__(kReduxThreads) redux_topk_kernel(const Args a) {
  constexpr int kTeams = kWarpSize / L;
  static_assert((L & (L - 1)) == 0 && L <= kWarpSize, "team size must be a power of two <= warp size");
  __shared__ int s_hist[kTopkMaxExperts];
  __shared__ int s_last;
  const int warps = static_cast<int>(blockDim.x) / kWarpSize;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * warps * kTeams;
  const int64_t t0 = (static_cast<int64_t>(blockIdx.x) * warps + static_cast<int>(threadIdx.x) / kWarpSize) * kTeams;
  redux::route_block_tokens<T, V, L, kSoftmax, kGrouped>(a, t0, stride, s_hist);
  publish_counts(s_hist, s_last, a.E, a.slot, a.counts);
}

template <auto kKernel, int L>
Error launch_grid(const Args& a, bool single, Stream stream) {
  const int64_t lanes = a.M * L;
  int64_t blocks = 1;
  int threads = kReduxMultiThreads;
  if (single) {
    threads = static_cast<int>(std::min<int64_t>(kReduxThreads, (lanes + kWarpSize - 1) / kWarpSize * kWarpSize));
  } else {
    static const int occupancy = max_active_blocks(reinterpret_cast<const void*>(kKernel), kReduxMultiThreads);
    blocks = std::max<int64_t>(1, std::min<int64_t>((lanes + kReduxMultiThreads - 1) / kReduxMultiThreads,
                                                    static_cast<int64_t>(num_sms()) * occupancy));
  }
  kKernel<<<static_cast<unsigned>(blocks), threads, 0, stream>>>(a);
  return last_error();
}

#define MOEKERN_REDUX_BUCKETS(X) X(8, 1, 8) X(16, 1, 16) X(32, 1, 32) X(64, 2, 32) X(128, 4, 32) X(256, 8, 32) X(512, 16, 32)

template <typename T, int V, int L>
Error launch_bucket(const Args& a, bool softmax, bool single, Stream stream) {
  const bool grouped = a.G > 1;
  if (softmax) {
    if (grouped) return launch_grid<redux_topk_kernel<T, V, L, true, true>, L>(a, single, stream);
    return launch_grid<redux_topk_kernel<T, V, L, true, false>, L>(a, single, stream);
  }
  if (grouped) return launch_grid<redux_topk_kernel<T, V, L, false, true>, L>(a, single, stream);
  return launch_grid<redux_topk_kernel<T, V, L, false, false>, L>(a, single, stream);
}

template <typename T>
Error launch_typed(Args& a, bool softmax, int grid, bool& unsupported, Stream stream) {
#define MOEKERN_REDUX_CASE(EB, VV, LL)                                                                      \
  if (a.E <= (EB)) {                                                                                        \
    if (!redux::group_lanes_for(a.E, a.G, (VV), (LL), &a.group_lanes)) return unsupported = true, kSuccess; \
    a.vec = redux::vector_loads_ok(a.logits, a.E, sizeof(T), (VV));                                          \
    const int64_t lanes = a.M * (LL);                                                                       \
    const bool fits = lanes <= kReduxSingleLanes || (a.top_k <= 2 && lanes <= kReduxSingleLanesShortK);     \
    const bool single = grid == kReduxGridSingle || (grid == kReduxGridAuto && fits);                        \
    a.slot = -1;                                                                                            \
    if (grid == kReduxGridMultiAtomic) {                                                                    \
      a.slot = kHistAtomicCounts;                                                                           \
      const Error z = memset_async(a.counts, 0, sizeof(int32_t) * a.E, stream);                             \
      if (z != kSuccess) return z;                                                                          \
    } else if (!single) {                                                                                   \
      a.slot = stream_slot(stream);                                                                         \
      if (a.slot < 0) return unsupported = true, kSuccess;                                                  \
    }                                                                                                       \
    return launch_bucket<T, (VV), (LL)>(a, softmax, single, stream);                                        \
  }
  MOEKERN_REDUX_BUCKETS(MOEKERN_REDUX_CASE)
#undef MOEKERN_REDUX_CASE
  return kInvalidValue;
}

}  // namespace

Error launch_redux_topk(const void* logits, DType dtype, int64_t M, int E, int top_k, int scoring, bool renormalize,
                        const float* bias, int num_groups, int topk_group, float scale, float* weights, int32_t* ids,
                        int32_t* counts, Stream stream, int grid, bool* unsupported) {
  *unsupported = false;
  if (E < 1 || E > kTopkMaxExperts || top_k < 1 || top_k > kTopkMaxK || top_k > E || M < 1 ||
      (scoring != 0 && scoring != 1))
    return kInvalidValue;
  const int G = num_groups > 1 ? num_groups : 0;
  if (G > 1 && (E % G != 0 || topk_group < 1 || topk_group > G)) return kInvalidValue;
  Args a = redux::make_args(logits, M, E, top_k, renormalize, bias, G, topk_group, scale, weights, ids, counts);
  MOEKERN_DISPATCH_FLOAT(dtype, T, return launch_typed<T>(a, scoring == 0, grid, *unsupported, stream));
  return kInvalidValue;
}

}  // namespace mk
