// Fused top-k routing (v2): scores, (grouped) selection, renormalization, scaling and the expert histogram
// in ONE kernel launch at every M, with no memset (kTopkReduxAtomic, a variant for measurement, adds one).
// NOTES.md has the design, the H100 measurements and the diagnosis of the small-M gap to vLLM; fused_topk_legacy.cu keeps v1 as the fallback. One kernel,
// compact_topk_kernel, serves every non-legacy variant; the variants only choose its grid.
//
// Teams. A token is handled by a team of L lanes (a power of two chosen from E at compile time); lane j of
// the team holds the V consecutive experts [jV, jV + V), so its chunk of the row is one or two 16-byte
// loads. E <= 8 gives L = 1: one thread per token and no shuffles at all. A warp walks W/L tokens at a
// time and its token loop is warp-uniform (teams past M run masked), so every shuffle has the full warp.
//
// Selection keys are v1's: an integer per expert (allowed bit | order-preserving score bits | 511 - e),
// compared as integers: larger score first, ties to the lower index, NaN ranked as -inf, -0 == +0, experts
// of dropped groups below every kept one, padding (key 0) below everything. Softmax on fp16/bf16 logits
// uses 32-bit keys: a float converted from a 16-bit type has its low 13 bits zero, so `ordered >> 13` (19
// bits) is exact; fp32 logits and sigmoid scores keep 64-bit keys. k rounds: each lane offers its best key
// below the previous winner, a log2(L)-step butterfly max picks the winner, one shuffle fetches its weight.
//
// Compact body (why: NOTES.md, "Diagnosis"). A small-M launch is one pass of a few warps, so its time is the
// latency of the instructions it executes and of fetching its code. So the scoring (softmax / sigmoid) and the
// key width are template parameters (no dead path is compiled in), the k rounds are a run-time loop (code for
// one round, no branch per skipped round), results go to per-lane slots by static selects (registers, no local
// memory) and the output loop stops at the first slot >= top_k. On the H100 this body was faster than the
// earlier fully unrolled one (removed) at every M <= 1024 (Mixtral: at every M) and within 2 % of it above,
// with bit-identical results.
//
// Grouped selection (DeepSeek-V3) runs when a group is S = (E/G)/V whole lanes, S a power of two <= L:
// each lane takes the top-2 (multiset) of its scores, log2(S) shuffle merges give the group's top-2 sum on
// each of its lanes (the same fp32 a + b as torch), and topk_group rounds of a butterfly over lane masks
// S..L/2 pick the kept groups. Other geometries use v1.
//
// Exactness: softmax selects on the fp32 logit (softmax is monotone), sigmoid is 1 / (1 + expf(-x)) as in
// torch's CUDA kernel, expf/division are IEEE (no fast math), so ids and counts equal the reference;
// weights agree to a few ulp (the row sum is accumulated in a different order).
//
// Histogram, one launch: each block counts in shared memory. A single block (small M) writes all E counts.
// A multi-block grid adds each block's non-zero counts to an accumulator slot in device-global memory,
// fences, and takes a ticket with atomicInc(ticket, gridDim.x - 1), which wraps to 0 on the last ticket;
// the last block moves the totals out with atomicExch(acc, 0), leaving the slot zeroed for the next launch
// or graph replay. Slots are __device__ arrays (zero at module load, one copy per device), one per
// (device, stream): stream order keeps two launches off one slot (see fused_topk.h for the restriction).
//
// Bounds: 1 <= E <= 512, 1 <= k <= 16 (kTopkMaxK), any M >= 0.

#include "routing/fused_topk.h"
#include "routing/histogram.cuh"
#include "routing/order_keys.cuh"
#include "routing/redux_topk.cuh"

#include <algorithm>
#include <cstdint>

namespace mk {
namespace {

constexpr int kIdxBits = 9;  // E <= 512
constexpr int kIdxMask = (1 << kIdxBits) - 1;
constexpr int kMaxThreads = 512;          // launch bound: <= 128 registers per thread
constexpr int kMultiThreads = 256;        // block size of the multi-block grid
constexpr int kSingleBlockThreads = 256;  // auto: one block while M * L lanes fit in this many threads

// ------------------------------------------------------------------------------------------ keys

__device__ __forceinline__ unsigned long long pack_key64(bool allowed, float key, int idx) {
  return (static_cast<unsigned long long>(allowed) << (32 + kIdxBits)) |
         (static_cast<unsigned long long>(ordered_bits(key)) << kIdxBits) |
         static_cast<unsigned long long>(kIdxMask - idx);
}

__device__ __forceinline__ unsigned long long xor_max64(unsigned long long v, int m) {
  const unsigned lo = shfl_xor(static_cast<unsigned>(v), m);
  const unsigned hi = shfl_xor(static_cast<unsigned>(v >> 32), m);
  const unsigned long long o = (static_cast<unsigned long long>(hi) << 32) | lo;
  return o > v ? o : v;
}

template <bool kKey32>
struct Keys;

// 32-bit keys for scores that came from fp16/bf16: 1 allowed bit | 19 score bits | 9 index bits.
template <>
struct Keys<true> {
  using type = unsigned;
  static __device__ __forceinline__ type pack(bool allowed, float key, int idx) {
    return (static_cast<unsigned>(allowed) << (19 + kIdxBits)) | ((ordered_bits(key) >> 13) << kIdxBits) |
           static_cast<unsigned>(kIdxMask - idx);
  }
  static __device__ __forceinline__ int index(type k) { return kIdxMask - static_cast<int>(k & kIdxMask); }
  static __device__ __forceinline__ type xor_max(type v, int m) {
    const type o = shfl_xor(v, m);
    return o > v ? o : v;
  }
};

template <>
struct Keys<false> {
  using type = unsigned long long;
  static __device__ __forceinline__ type pack(bool allowed, float key, int idx) {
    return pack_key64(allowed, key, idx);
  }
  static __device__ __forceinline__ int index(type k) { return kIdxMask - static_cast<int>(k & kIdxMask); }
  static __device__ __forceinline__ type xor_max(type v, int m) { return xor_max64(v, m); }
};

// ------------------------------------------------------------------------------------------ team helpers

// Butterflies over masks < L stay inside the aligned team of L lanes; every lane ends with the same value
// (IEEE addition is commutative, so the sums agree bit for bit across the team).
template <int L>
__device__ __forceinline__ float team_max(float v) {
#pragma unroll
  for (int m = L / 2; m > 0; m >>= 1) v = fmaxf(v, shfl_xor(v, m));
  return v;
}

template <int L>
__device__ __forceinline__ float team_sum(float v) {
#pragma unroll
  for (int m = L / 2; m > 0; m >>= 1) v += shfl_xor(v, m);
  return v;
}

// c[0] = max(c[0..2H)), a tree of depth log2(2H). A template per level, so every loop bound is a
// compile-time constant and c stays in registers (a loop over levels left nvcc a dynamic index).
template <int H>
struct TreeMax {
  template <typename K, int N>
  static __device__ __forceinline__ void run(K (&c)[N]) {
#pragma unroll
    for (int i = 0; i < H; ++i) c[i] = c[i + H] > c[i] ? c[i + H] : c[i];
    TreeMax<H / 2>::run(c);
  }
};

template <>
struct TreeMax<0> {
  template <typename K, int N>
  static __device__ __forceinline__ void run(K (&)[N]) {}
};

// ------------------------------------------------------------------------------------------ geometry

struct Bucket {
  int max_e, V, L;
};

// E -> (V, L); V * L covers E. On wave64 the 512 bucket uses 64 lanes of 8.
#ifdef MOEKERN_HIP
#define MOEKERN_TOPK_BUCKETS(X) X(8, 8, 1) X(16, 8, 2) X(32, 8, 4) X(64, 8, 8) X(128, 8, 16) X(256, 8, 32) X(512, 8, 64)
#else
#define MOEKERN_TOPK_BUCKETS(X) X(8, 8, 1) X(16, 8, 2) X(32, 8, 4) X(64, 8, 8) X(128, 8, 16) X(256, 8, 32) X(512, 16, 32)
#endif

Bucket bucket_for(int E) {
#define MOEKERN_BUCKET_IF(EB, VV, LL) \
  if (E <= (EB)) return Bucket{(EB), (VV), (LL)};
  MOEKERN_TOPK_BUCKETS(MOEKERN_BUCKET_IF)
#undef MOEKERN_BUCKET_IF
  return Bucket{0, 0, 0};
}

// ------------------------------------------------------------------------------------------ kernel parts

using TeamArgs = redux::Args;  // the same launch arguments as the reduction-selection kernel

// Loads token t's chunk of V logits (lanes of a team hold consecutive chunks) and scores it. Returns the
// team's softmax denominator (1 for sigmoid). w: softmax exp(x - max), to be divided by the returned sum where a
// probability is needed, or sigmoid(x); sel: the ranked score, the logit (softmax) or sigmoid + bias. Inactive
// tokens (past M) load -inf.
template <typename T, int V, int L, bool kSoftmax>
__device__ __forceinline__ float score_chunk(const T* __restrict__ logits, int64_t t, bool active, int base, int E,
                                             bool vec, const float (&bias)[V], float (&w)[V], float (&sel)[V]) {
  float x[V];
  if (active) {
    redux::load_lane<T, V>(logits + t * E, base, E, vec, x);  // vec: 16-byte aligned rows
  } else {
#pragma unroll
    for (int i = 0; i < V; ++i) x[i] = -INFINITY;
  }
  if constexpr (!kSoftmax) {
#pragma unroll
    for (int i = 0; i < V; ++i) {
      w[i] = 1.0f / (1.0f + expf(-x[i]));
      sel[i] = w[i] + bias[i];  // + 0.0f without a bias: exact (sigmoid is never -0)
    }
    return 1.0f;
  }
  float mx = -INFINITY;
#pragma unroll
  for (int i = 0; i < V; ++i) mx = fmaxf(mx, x[i]);
  mx = team_max<L>(mx);
  float s = 0.0f;
#pragma unroll
  for (int i = 0; i < V; ++i) {
    // Padding contributes 0 explicitly: exp(-inf - -inf) is NaN on an all -inf row.
    w[i] = base + i < E ? expf(x[i] - mx) : 0.0f;
    s += w[i];
    sel[i] = x[i];
  }
  return team_sum<L>(s);
}

// Whether this lane's group is among the topk_group best (DeepSeek-V3 grouped selection; the algorithm is in
// the paragraph atop this file). Every lane of the warp must call it (shuffles).
template <int L, int V, bool kSoftmax>
__device__ __forceinline__ bool group_kept(const float (&w)[V], const float (&sel)[V], float sum, bool active, int tl,
                                           const TeamArgs& a) {
  const int S = a.group_lanes;
  float top1 = -INFINITY, top2 = -INFINITY;  // multiset top-2 of the lane's group scores
#pragma unroll
  for (int i = 0; i < V; ++i) {
    const float v = rank_key(kSoftmax ? w[i] / sum : sel[i]);
    if (v > top1) {
      top2 = top1;
      top1 = v;
    } else if (v > top2) {
      top2 = v;
    }
  }
  for (int m = 1; m < S; m <<= 1) {  // merge (max, second) pairs across the S lanes of the group
    const float o1 = shfl_xor(top1, m);
    const float o2 = shfl_xor(top2, m);
    const float lo = fminf(top1, o1);
    top1 = fmaxf(top1, o1);
    top2 = fmaxf(lo, fmaxf(top2, o2));
  }
  const int grp = tl / S;
  unsigned long long gkey = (active && grp < a.G) ? pack_key64(true, rank_key(top1 + top2), grp) : 0ull;
  bool kept = false;
  for (int r = 0; r < a.g; ++r) {
    unsigned long long win = gkey;
    for (int m = S; m < L; m <<= 1) win = xor_max64(win, m);  // across groups; a group's lanes agree
    if (win != 0ull && kIdxMask - static_cast<int>(win & kIdxMask) == grp) {
      kept = true;
      gkey = 0ull;
    }
  }
  return kept;
}

// ------------------------------------------------------------------------------------------ kernel

// One instantiation per (logit type, bucket, scoring). Softmax on 16-bit logits ranks with 32-bit keys; fp32
// logits and sigmoid scores (not 16-bit values) with 64-bit keys.
template <typename T, int V, int L, bool kSoftmax>
__global__ void __launch_bounds__(kMaxThreads) compact_topk_kernel(const TeamArgs a) {
  constexpr bool kKey32 = kSoftmax && sizeof(T) == 2;
  using KeyOps = Keys<kKey32>;
  using Key = typename KeyOps::type;
  constexpr int kTeams = kWarpSize / L;
  constexpr int kRes = (kTopkMaxK + L - 1) / L;  // result r -> lane r % L, slot r / L
  static_assert((L & (L - 1)) == 0 && L <= kWarpSize, "team size must be a power of two <= warp size");
  static_assert((V & (V - 1)) == 0, "chunk size must be a power of two");

  __shared__ int s_hist[kTopkMaxExperts];
  __shared__ int s_last;
  const int E = a.E, top_k = a.top_k;
  for (int e = threadIdx.x; e < E; e += blockDim.x) s_hist[e] = 0;

  const int lane = lane_id();
  const int tl = lane & (L - 1);
  const int team_lane0 = lane - tl;
  const int base = tl * V;
  const bool grouped = a.G > 1;

  float bias[V];  // the same experts for every token of this lane: loaded once (sigmoid only)
#pragma unroll
  for (int i = 0; i < V; ++i) bias[i] = 0.0f;
  if constexpr (!kSoftmax) {
    if (a.bias != nullptr) {
#pragma unroll
      for (int i = 0; i < V; ++i) bias[i] = base + i < E ? a.bias[base + i] : 0.0f;
    }
  }

  const T* __restrict__ logits = static_cast<const T*>(a.logits);
  const int warps = static_cast<int>(blockDim.x) / kWarpSize;
  const int64_t first = (static_cast<int64_t>(blockIdx.x) * warps + static_cast<int>(threadIdx.x) / kWarpSize) * kTeams;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * warps * kTeams;
  __syncthreads();  // s_hist zeroed before any token counts into it

  for (int64_t t0 = first; t0 < a.M; t0 += stride) {  // warp-uniform: shuffles below see the full warp
    const int64_t t = t0 + lane / L;
    const bool active = t < a.M;
    float w[V];    // softmax: exp(x - max), divided by `sum` where a probability is needed; sigmoid: sigmoid(x)
    float sel[V];  // the ranked score: the logit (softmax) or sigmoid + bias
    const float sum = score_chunk<T, V, L, kSoftmax>(logits, t, active, base, E, a.vec != 0, bias, w, sel);

    const bool allowed = grouped ? group_kept<L, V, kSoftmax>(w, sel, sum, active, tl, a) : true;

    Key key[V];
#pragma unroll
    for (int i = 0; i < V; ++i)
      key[i] = (active && base + i < E) ? KeyOps::pack(allowed, rank_key(sel[i]), base + i) : Key(0);

    float res_w[kRes];
    int res_id[kRes];
#pragma unroll
    for (int j = 0; j < kRes; ++j) {
      res_w[j] = 0.0f;
      res_id[j] = 0;
    }
    float wsum = 0.0f;
    Key thr = ~Key(0);  // keys are distinct: the remaining ones are exactly those below the last winner
#pragma unroll 1
    for (int r = 0; r < top_k; ++r) {  // top_k is uniform: every lane runs every round
      Key c[V];
#pragma unroll
      for (int i = 0; i < V; ++i) c[i] = key[i] < thr ? key[i] : Key(0);
      TreeMax<V / 2>::run(c);
      Key win = c[0];
#pragma unroll
      for (int m = 1; m < L; m <<= 1) win = KeyOps::xor_max(win, m);
      thr = win;
      const int e = KeyOps::index(win);
      const int slot = e & (V - 1);
      float wv = 0.0f;  // every lane reads its own w at `slot`; the owner's value is the winner's
#pragma unroll
      for (int i = 0; i < V; ++i) wv = (i == slot) ? w[i] : wv;
      if (L > 1) wv = shfl(wv, team_lane0 + ((e / V) & (L - 1)));
      if (kSoftmax) wv = wv / sum;  // the probability, as torch.softmax computes it
      wsum += wv;
      if (tl == (r & (L - 1))) {
        const int j = r / L;  // a run-time slot, written by static selects so res_* stay in registers
#pragma unroll
        for (int jj = 0; jj < kRes; ++jj) {
          res_w[jj] = jj == j ? wv : res_w[jj];
          res_id[jj] = jj == j ? e : res_id[jj];
        }
      }
    }

    if (active) {
      const bool renorm = a.renormalize != 0 && wsum > 0.0f;  // a zero or NaN sum leaves the row as it is
#pragma unroll
      for (int j = 0; j < kRes; ++j) {
        const int r = tl + j * L;
        if (r >= top_k) break;  // one exit, not one skip per remaining slot
        float wt = res_w[j];
        if (renorm) wt = wt / wsum;
        a.weights[t * top_k + r] = wt * a.scale;
        a.ids[t * top_k + r] = res_id[j];
        atomicAdd(&s_hist[res_id[j]], 1);
      }
    }
  }

  publish_counts(s_hist, s_last, a.E, a.slot, a.counts);
}

// ------------------------------------------------------------------------------------------ host side

// Launches a lane-team kernel (L lanes per token): one block sized to the tokens when a.slot < 0, else the
// multi-block grid that fills the GPU (occupancy is queried once per kernel: the static is per instantiation).
template <auto kKernel, int L>
Error launch_lane_teams(const TeamArgs& a, Stream stream) {
  const int64_t lanes = a.M * L;
  int64_t blocks = 1;
  int threads = kMultiThreads;
  if (a.slot < 0) {
    threads = static_cast<int>(std::min<int64_t>(kMaxThreads, (lanes + kWarpSize - 1) / kWarpSize * kWarpSize));
  } else {
    static const int occupancy = max_active_blocks(reinterpret_cast<const void*>(kKernel), kMultiThreads);
    blocks = std::max<int64_t>(1, std::min<int64_t>((lanes + kMultiThreads - 1) / kMultiThreads,
                                                    static_cast<int64_t>(num_sms()) * occupancy));
  }
  kKernel<<<static_cast<unsigned>(blocks), threads, 0, stream>>>(a);
  return last_error();
}

template <typename T>
Error launch_typed(const TeamArgs& a, bool softmax, Stream stream) {
#define MOEKERN_TOPK_CASE(EB, VV, LL)                                                                  \
  if (a.E <= (EB)) {                                                                                   \
    if (softmax) return launch_lane_teams<compact_topk_kernel<T, (VV), (LL), true>, (LL)>(a, stream);  \
    return launch_lane_teams<compact_topk_kernel<T, (VV), (LL), false>, (LL)>(a, stream);              \
  }
  MOEKERN_TOPK_BUCKETS(MOEKERN_TOPK_CASE)
#undef MOEKERN_TOPK_CASE
  return kInvalidValue;
}

}  // namespace

Error launch_fused_topk(const void* logits, DType dtype, int64_t M, int E, int top_k, int scoring,
                        bool renormalize, const float* bias, int num_groups, int topk_group, float scale,
                        float* weights, int32_t* ids, int32_t* counts, Stream stream, int variant) {
  if (E < 1 || E > kTopkMaxExperts || top_k < 1 || top_k > kTopkMaxK || top_k > E || M < 0 ||
      (scoring != 0 && scoring != 1) || variant < kTopkAuto || variant > kTopkLastVariant)
    return kInvalidValue;
  const int G = num_groups > 1 ? num_groups : 0;
  if (G > 1 && (E % G != 0 || topk_group < 1 || topk_group > G)) return kInvalidValue;
  const auto legacy = [&]() {
    return launch_fused_topk_legacy(logits, dtype, M, E, top_k, scoring, renormalize, bias, num_groups, topk_group,
                                    scale, weights, ids, counts, stream);
  };
  if (variant == kTopkLegacy) return legacy();
  if (M == 0) return memset_async(counts, 0, sizeof(int32_t) * E, stream);
  // auto: the compact kernel where it measured faster than the reduction-selection kernel on an H100
  // (benchmarks/results/fastpath/h100-2026-12-07/): E <= 8 at 128 < M <= 256 (its one block of a thread per
  // token against the ticket grid: 2.73 vs 3.29 us), and ungrouped E in (32, 128] at large M, where its narrower
  // teams leave fewer lanes idle (Qwen3 M = 4096: 7.18 vs 7.70 us, OLMoE 5.99 vs 7.38; at M = 1024 the new kernel
  // was faster, so the switch is placed at M > 2048, between the two measured sizes).
  const bool compact_faster = (E <= 8 && M > 128 && M <= 256) || (E > 32 && E <= 128 && G == 0 && M > 2048);
  if ((variant == kTopkAuto && !compact_faster) || variant >= kTopkRedux) {
    const int grid = variant == kTopkReduxSingle   ? kReduxGridSingle
                     : variant == kTopkReduxMulti  ? kReduxGridMulti
                     : variant == kTopkReduxAtomic ? kReduxGridMultiAtomic
                                                   : kReduxGridAuto;
    bool unsupported = false;
    const Error err = launch_redux_topk(logits, dtype, M, E, top_k, scoring, renormalize, bias, num_groups,
                                        topk_group, scale, weights, ids, counts, stream, grid, &unsupported);
    if (!unsupported) return err;
  }

  const Bucket b = bucket_for(E);
  int S = 0;
  if (G > 1) {  // the kernel needs each group to be a power-of-two run of whole lanes
    const int P = E / G;
    S = P % b.V == 0 ? P / b.V : 0;
    if (S == 0 || (S & (S - 1)) != 0 || S > b.L) return legacy();
  }
  const bool single = variant == kTopkSingleBlock || (variant != kTopkMultiBlock && M * b.L <= kSingleBlockThreads);
  int slot = -1;
  if (!single) {
    slot = stream_slot(stream);
    if (slot < 0) return legacy();
  }
  const size_t elem = dtype == DType::kFloat32 ? 4 : 2;
  TeamArgs a = redux::make_args(logits, M, E, top_k, renormalize, bias, G, topk_group, scale, weights, ids, counts);
  a.group_lanes = S;
  a.vec = (reinterpret_cast<uintptr_t>(logits) % 16 == 0 && (static_cast<size_t>(E) * elem) % 16 == 0) ? 1 : 0;
  a.slot = slot;
  a.scale = scale;
  MOEKERN_DISPATCH_FLOAT(dtype, T, return launch_typed<T>(a, scoring == 0, stream));
  return kInvalidValue;
}

}  // namespace mk
