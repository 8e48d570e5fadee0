// Fused top-k routing, v1 (the first kernel): kept as the fallback of fused_topk.cu for group geometries
// the v2 kernel does not cover (E/G not a multiple of the lane chunk), for a 33rd concurrent stream,
// and as `variant=legacy` so one GPU run can A/B both against the reference.
//
// Scores, (grouped) selection, renormalization, scaling and the expert histogram
// in one kernel launch (plus a memset of the [E] histogram when more than one block runs).
//
// Algorithm. One warp per token. Lane l holds experts e = l + i*W (i < VPT, W = warp size), so the row
// load is coalesced and a row of E <= 512 experts lives in <= 16 registers per lane (8 on wave64).
// Each expert gets a 64-bit selection key (allowed << 41 | order-preserving bits of the fp32 score << 9
// | 511 - e): comparing keys as integers gives "larger score first, ties to the lower index", NaN is
// mapped to -inf before the bits are taken, -0 to +0 (torch orders them equal), and experts of dropped
// groups (allowed = 0) sort below every kept one. top_k rounds of a warp butterfly max pick the winners;
// only the lane that owned a winner rescans its own VPT keys. Grouped selection (DeepSeek-V3) first
// stages the group scores (probabilities for softmax, sigmoid+bias for sigmoid, NaN -> -inf) in shared
// memory, one lane per group takes the sum of its two largest, and topk_group rounds of the same
// butterfly pick the kept groups (ties to the lower group).
//
// Exactness. Softmax selects on the fp32 logit (softmax is monotone), so ids match the reference
// bit-for-bit; sigmoid is computed as 1 / (1 + expf(-x)) as torch's CUDA kernel does. Weights (softmax
// sums in a different order) agree to a few ulp; grouped softmax group scores can differ in the last bit
// from torch's and flip a group at an exact-to-1-ulp tie, which the reference cannot define either.
//
// Bounds: 1 <= E <= 512 (9 index bits in the key), 1 <= k <= 16 (k lanes hold the results), any M.
// Histogram: each block counts in shared memory. Several blocks (a persistent grid of 4 per SM, warps
// striding over tokens) add their non-zero counts to the global [E] after a memset; a single block
// (M <= 8, the decode case) writes all E counts itself, so no memset runs.

#include "routing/fused_topk.h"
#include "routing/order_keys.cuh"

#include <algorithm>

namespace mk {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / kWarpSize;
constexpr int kIdxBits = 9;  // E <= 512

__device__ __forceinline__ unsigned long long pack_key(bool allowed, float key, int idx) {
  return (static_cast<unsigned long long>(allowed) << (32 + kIdxBits)) |
         (static_cast<unsigned long long>(ordered_bits(key)) << kIdxBits) |
         static_cast<unsigned long long>((1 << kIdxBits) - 1 - idx);
}

__device__ __forceinline__ int key_index(unsigned long long k) {
  return (1 << kIdxBits) - 1 - static_cast<int>(k & ((1u << kIdxBits) - 1));
}

__device__ __forceinline__ unsigned long long warp_max_u64(unsigned long long v) {
#pragma unroll
  for (int m = kWarpSize / 2; m > 0; m >>= 1) {
    const unsigned lo = shfl_xor(static_cast<unsigned>(v), m);
    const unsigned hi = shfl_xor(static_cast<unsigned>(v >> 32), m);
    const unsigned long long o = (static_cast<unsigned long long>(hi) << 32) | lo;
    v = o > v ? o : v;
  }
  return v;
}

// Index of the largest of this lane's VPT keys (0 if all are 0, i.e. taken or padding).
template <int VPT>
__device__ __forceinline__ int local_best(const unsigned long long (&key)[VPT]) {
  int best = 0;
  unsigned long long value = key[0];  // tracked by value: key[best] would index the array dynamically
#pragma unroll
  for (int i = 1; i < VPT; ++i) {
    if (key[i] > value) {
      value = key[i];
      best = i;
    }
  }
  return best;
}

template <int VPT>
__device__ __forceinline__ unsigned long long select_at(const unsigned long long (&key)[VPT], int i) {
  unsigned long long v = 0;
#pragma unroll
  for (int j = 0; j < VPT; ++j) v = (j == i) ? key[j] : v;  // static indexing keeps key in registers
  return v;
}

template <int VPT>
__device__ __forceinline__ float select_at(const float (&x)[VPT], int i) {
  float v = 0.0f;
#pragma unroll
  for (int j = 0; j < VPT; ++j) v = (j == i) ? x[j] : v;
  return v;
}

template <typename T, int VPT>
__device__ __forceinline__ void route_token(const T* __restrict__ logits, int64_t t, int E, int top_k,
                                            int scoring, bool renormalize, const float* __restrict__ bias,
                                            int G, int g, float scale, float* __restrict__ weights,
                                            int32_t* __restrict__ ids, int32_t* hist, float* s_score,
                                            unsigned char* s_kept) {
  const int lane = lane_id();
  const T* row = logits + t * E;
  float x[VPT];    // fp32 logits
  float w[VPT];    // the weight each expert would get: softmax prob or sigmoid
  float key[VPT];  // selection key, NaN -> -inf
#pragma unroll
  for (int i = 0; i < VPT; ++i) {
    const int e = lane + i * kWarpSize;
    x[i] = e < E ? to_float(row[e]) : -INFINITY;
  }
  if (scoring == 0) {
    float mx = -INFINITY;
#pragma unroll
    for (int i = 0; i < VPT; ++i) mx = fmaxf(mx, x[i]);
    mx = warp_max(mx);
    float sum = 0.0f;
#pragma unroll
    for (int i = 0; i < VPT; ++i) {
      // Padding lanes contribute 0 explicitly: exp(-inf - -inf) would be NaN on an all -inf row.
      w[i] = (lane + i * kWarpSize) < E ? expf(x[i] - mx) : 0.0f;
      sum += w[i];
    }
    sum = warp_sum(sum);
#pragma unroll
    for (int i = 0; i < VPT; ++i) {
      w[i] = w[i] / sum;
      key[i] = rank_key(x[i]);
    }
  } else {
#pragma unroll
    for (int i = 0; i < VPT; ++i) {
      const int e = lane + i * kWarpSize;
      w[i] = 1.0f / (1.0f + expf(-x[i]));
      key[i] = rank_key(bias != nullptr && e < E ? w[i] + bias[e] : w[i]);
    }
  }

  bool allowed[VPT];
#pragma unroll
  for (int i = 0; i < VPT; ++i) allowed[i] = true;
  if (G > 1) {
    const int P = E / G;
#pragma unroll
    for (int i = 0; i < VPT; ++i) {
      const int e = lane + i * kWarpSize;
      if (e < E) s_score[e] = scoring == 0 ? rank_key(w[i]) : key[i];
    }
    syncwarp();
    // Lane owns groups lane + j*W; G <= E so VPT slots suffice.
    unsigned long long gkey[VPT];
#pragma unroll
    for (int j = 0; j < VPT; ++j) {
      const int grp = lane + j * kWarpSize;
      gkey[j] = 0;
      if (grp < G) {
        float a = -INFINITY, b = -INFINITY;
        for (int p = 0; p < P; ++p) {
          const float v = s_score[grp * P + p];
          if (v > a) {
            b = a;
            a = v;
          } else if (v > b) {
            b = v;
          }
        }
        gkey[j] = pack_key(true, rank_key(P == 1 ? a : a + b), grp);
      }
    }
    bool kept[VPT];
#pragma unroll
    for (int j = 0; j < VPT; ++j) kept[j] = false;
    int best = local_best(gkey);
    for (int r = 0; r < g; ++r) {
      const unsigned long long win = warp_max_u64(select_at(gkey, best));
      const int grp = key_index(win);
      if (grp % kWarpSize == lane) {
        const int slot = grp / kWarpSize;
#pragma unroll
        for (int j = 0; j < VPT; ++j) {
          if (j == slot) {
            kept[j] = true;
            gkey[j] = 0;
          }
        }
        best = local_best(gkey);
      }
    }
#pragma unroll
    for (int j = 0; j < VPT; ++j) {
      const int grp = lane + j * kWarpSize;
      if (grp < G) s_kept[grp] = kept[j];
    }
    syncwarp();
#pragma unroll
    for (int i = 0; i < VPT; ++i) {
      const int e = lane + i * kWarpSize;
      allowed[i] = e < E && s_kept[e / P];
    }
    syncwarp();  // s_score/s_kept are reused by this warp's next token
  }

  unsigned long long k64[VPT];
#pragma unroll
  for (int i = 0; i < VPT; ++i) {
    const int e = lane + i * kWarpSize;
    k64[i] = e < E ? pack_key(allowed[i], key[i], e) : 0ull;
  }
  int best = local_best(k64);
  int my_id = 0;
  float my_w = 0.0f;
  for (int r = 0; r < top_k; ++r) {
    const unsigned long long win = warp_max_u64(select_at(k64, best));
    const int e = key_index(win);
    const int owner = e % kWarpSize;
    const float wv = shfl(select_at(w, best), owner);
    if (lane == r) {
      my_id = e;
      my_w = wv;
    }
    if (lane == owner) {
      const int slot = e / kWarpSize;
#pragma unroll
      for (int i = 0; i < VPT; ++i) k64[i] = (i == slot) ? 0ull : k64[i];
      best = local_best(k64);
    }
  }
  if (renormalize) {
    const float s = warp_sum(lane < top_k ? my_w : 0.0f);
    if (s > 0.0f) my_w = my_w / s;  // a zero or NaN sum leaves the row as it is
  }
  my_w *= scale;
  if (lane < top_k) {
    weights[t * top_k + lane] = my_w;
    ids[t * top_k + lane] = my_id;
    atomicAdd(&hist[my_id], 1);
  }
}

template <typename T, int VPT, bool kSingleBlock>
__global__ void __launch_bounds__(kThreads)
fused_topk_kernel(const T* __restrict__ logits, int64_t M, int E, int top_k, int scoring, bool renormalize,
                  const float* __restrict__ bias, int G, int g, float scale, float* __restrict__ weights,
                  int32_t* __restrict__ ids, int32_t* __restrict__ counts) {
  __shared__ float s_score[kWarps][kTopkMaxExperts];
  __shared__ unsigned char s_kept[kWarps][kTopkMaxExperts];
  __shared__ int32_t s_hist[kTopkMaxExperts];
  const int warp = static_cast<int>(threadIdx.x) / kWarpSize;
  for (int e = threadIdx.x; e < E; e += kThreads) s_hist[e] = 0;
  __syncthreads();
  // Persistent grid: warps stride over tokens, so each block counts many tokens in shared memory and
  // adds to global memory once per expert (global same-address atomics per slot serialize badly).
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kWarps;
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * kWarps + warp; t < M; t += stride)
    route_token<T, VPT>(logits, t, E, top_k, scoring, renormalize, bias, G, g, scale, weights, ids, s_hist,
                        s_score[warp], s_kept[warp]);
  __syncthreads();
  for (int e = threadIdx.x; e < E; e += kThreads) {
    if (kSingleBlock) {
      counts[e] = s_hist[e];  // the only block: writes every count, so no memset is needed
    } else if (s_hist[e] != 0) {
      atomicAdd(&counts[e], s_hist[e]);
    }
  }
}

template <typename T, int VPT>
Error launch_vpt(const T* logits, int64_t M, int E, int top_k, int scoring, bool renormalize,
                 const float* bias, int G, int g, float scale, float* weights, int32_t* ids, int32_t* counts,
                 Stream stream) {
  if (M <= kWarps) {
    fused_topk_kernel<T, VPT, true><<<1, kThreads, 0, stream>>>(logits, M, E, top_k, scoring, renormalize,
                                                                 bias, G, g, scale, weights, ids, counts);
  } else {
    const Error err = memset_async(counts, 0, sizeof(int32_t) * E, stream);
    if (err != kSuccess) return err;
    const int64_t blocks = std::min<int64_t>((M + kWarps - 1) / kWarps, static_cast<int64_t>(num_sms()) * 4);
    fused_topk_kernel<T, VPT, false><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        logits, M, E, top_k, scoring, renormalize, bias, G, g, scale, weights, ids, counts);
  }
  return last_error();
}

template <typename T>
Error launch_typed(const T* logits, int64_t M, int E, int top_k, int scoring, bool renormalize,
                   const float* bias, int G, int g, float scale, float* weights, int32_t* ids, int32_t* counts,
                   Stream stream) {
#define MOEKERN_TOPK_CASE(V)                                                                                \
  if (E <= (V) * kWarpSize)                                                                                 \
    return launch_vpt<T, (V)>(logits, M, E, top_k, scoring, renormalize, bias, G, g, scale, weights, ids, \
                              counts, stream);
  MOEKERN_TOPK_CASE(1)
  MOEKERN_TOPK_CASE(2)
  MOEKERN_TOPK_CASE(4)
  MOEKERN_TOPK_CASE(8)
#if !defined(MOEKERN_HIP)
  MOEKERN_TOPK_CASE(16)
#endif
#undef MOEKERN_TOPK_CASE
  return kInvalidValue;
}

}  // namespace

Error launch_fused_topk_legacy(const void* logits, DType dtype, int64_t M, int E, int top_k, int scoring,
                        bool renormalize, const float* bias, int num_groups, int topk_group, float scale,
                        float* weights, int32_t* ids, int32_t* counts, Stream stream) {
  if (E < 1 || E > kTopkMaxExperts || top_k < 1 || top_k > kTopkMaxK || top_k > E || M < 0 ||
      (scoring != 0 && scoring != 1))
    return kInvalidValue;
  const int G = num_groups > 1 ? num_groups : 0;
  if (G > 1 && (E % G != 0 || topk_group < 1 || topk_group > G)) return kInvalidValue;
  if (M == 0) return memset_async(counts, 0, sizeof(int32_t) * E, stream);
  MOEKERN_DISPATCH_FLOAT(dtype, T,
                         return launch_typed<T>(static_cast<const T*>(logits), M, E, top_k, scoring, renormalize,
                                                bias, G, topk_group, scale, weights, ids, counts, stream));
  return kInvalidValue;
}

}  // namespace mk
