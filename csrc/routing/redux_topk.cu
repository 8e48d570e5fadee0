// The reduction-selection routing kernel (redux_topk.cuh has the algorithm) and its launcher.
//
// Grid: one block while M x L lanes fit kReduxSingleLanes (every decode batch of the registry models at
// L = 32 up to M = 32; at L = 8, Mixtral, up to M = 128): its block writes every count, so the launch is the
// whole op. Above, a grid that fills the GPU, grid-striding over tokens, with the ticket histogram
// (histogram.cuh). The next token's logits are loaded before the current one is routed, so a warp's
// loads overlap its selection rounds.
//
// Buckets (E -> V experts per lane, L lanes per token): E <= 8: 1 x 8, 16: 1 x 16, 32: 1 x 32, 64: 2 x 32,
// 128: 4 x 32, 256: 8 x 32, 512: 16 x 32. Grouped selection needs E/G to be a power-of-two multiple of V
// lanes; otherwise, or when a multi-block launch finds no free histogram slot, launch_redux_topk launches
// nothing and sets *unsupported (the caller falls back to another kernel).
#include "routing/histogram.cuh"
#include "routing/redux_topk.cuh"

#include <algorithm>

namespace mk {
namespace {

using redux::Args;

constexpr int kReduxThreads = 512;       // block size bound (<= 128 registers per thread)
constexpr int kReduxMultiThreads = 256;  // block size of the multi-block grid
constexpr int kReduxSingleLanes = 1024;  // auto: one block (grid-striding) while M * L fits this many lanes

template <typename T, int V, int L, bool kSoftmax, bool kGrouped>
__global__ void __launch_bounds__(kReduxThreads) redux_topk_kernel(const Args a) {
  constexpr int kTeams = kWarpSize / L;
  static_assert((L & (L - 1)) == 0 && L <= kWarpSize, "team size must be a power of two <= warp size");
  __shared__ int s_hist[kTopkMaxExperts];
  __shared__ int s_last;

  const int lane = lane_id();
  const int base = (lane & (L - 1)) * V;
  const T* __restrict__ logits = static_cast<const T*>(a.logits);
  const int warps = static_cast<int>(blockDim.x) / kWarpSize;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * warps * kTeams;
  int64_t t0 = (static_cast<int64_t>(blockIdx.x) * warps + static_cast<int>(threadIdx.x) / kWarpSize) * kTeams;

  float x[V];  // issued before the histogram is zeroed: the load's latency hides the barrier
  {
    const int64_t t = t0 + lane / L;
    if (t < a.M) {
      redux::load_lane<T, V>(logits + t * a.E, base, a.E, a.vec != 0, x);
    } else {
#pragma unroll
      for (int i = 0; i < V; ++i) x[i] = -INFINITY;
    }
  }
  float bias[V];
#pragma unroll
  for (int i = 0; i < V; ++i) bias[i] = 0.0f;
  if constexpr (!kSoftmax) {
    if (a.bias != nullptr) {
#pragma unroll
      for (int i = 0; i < V; ++i) bias[i] = base + i < a.E ? a.bias[base + i] : 0.0f;
    }
  }
  for (int e = threadIdx.x; e < a.E; e += blockDim.x) s_hist[e] = 0;
  __syncthreads();

  for (; t0 < a.M; t0 += stride) {  // warp-uniform: the team reductions see the full warp
    const int64_t t = t0 + lane / L;
    const int64_t tn = t + stride;  // this lane's next token: loaded while this one is routed
    float xn[V];
    if (tn < a.M) {
      redux::load_lane<T, V>(logits + tn * a.E, base, a.E, a.vec != 0, xn);
    } else {
#pragma unroll
      for (int i = 0; i < V; ++i) xn[i] = -INFINITY;
    }
    redux::route_token<V, L, kSoftmax, kGrouped>(a, t, t < a.M, x, bias, s_hist);
#pragma unroll
    for (int i = 0; i < V; ++i) x[i] = xn[i];
  }

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
  const size_t elem = sizeof(T);
#define MOEKERN_REDUX_CASE(EB, VV, LL)                                                                      \
  if (a.E <= (EB)) {                                                                                        \
    if (a.G > 1) {                                                                                          \
      const int P = a.E / a.G;                                                                              \
      const int S = P % (VV) == 0 ? P / (VV) : 0;                                                           \
      if (S == 0 || (S & (S - 1)) != 0 || S > (LL)) return unsupported = true, kSuccess;                   \
      a.group_lanes = S;                                                                                    \
    }                                                                                                       \
    const size_t width = std::min<size_t>(16, (VV) * elem);                                                 \
    a.vec = (reinterpret_cast<uintptr_t>(a.logits) % 16 == 0 && (a.E * elem) % width == 0) ? 1 : 0;        \
    const bool single = grid == kReduxGridSingle || (grid == kReduxGridAuto && a.M * (LL) <= kReduxSingleLanes); \
    a.slot = -1;                                                                                            \
    if (!single) {                                                                                          \
      a.slot = stream_slot(stream);                                                                         \
      if (a.slot < 0) return unsupported = true, kSuccess;                                                \
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
  Args a;
  a.logits = logits;
  a.bias = bias;
  a.weights = weights;
  a.ids = ids;
  a.counts = counts;
  a.M = M;
  a.E = E;
  a.top_k = top_k;
  a.G = G;
  a.g = G > 1 ? topk_group : 0;
  a.group_lanes = 0;
  a.renormalize = renormalize ? 1 : 0;
  a.vec = 0;
  a.slot = -1;
  a.scale = scale;
  MOEKERN_DISPATCH_FLOAT(dtype, T, return launch_typed<T>(a, scoring == 0, grid, *unsupported, stream));
  return kInvalidValue;
}

}  // namespace mk
