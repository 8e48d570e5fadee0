// Fused top-k routing of one token by a team of lanes whose selection rounds are two team reductions.
//
// Why this body. At decode sizes a routing launch is one pass of a few warps: its time is the latency of
// the dependent instructions each token needs, not bandwidth. So a token is spread over a team of L lanes
// (L = 32 for E >= 32: E = 256 is 8 experts per lane) and each of the k selection rounds is two team
// reductions of 32-bit integers: the maximum order key (on sm_80+ with a whole-warp team: one redux.sync),
// then the minimum expert index among the lanes holding that key (ties go to the lower index, exactly).
// The winner's owner drops it and rescans its V keys; its value reaches the team with one shuffle. Softmax
// never normalizes the row when the weights are renormalized: p_i / sum_sel p = e_i / sum_sel e with
// e = exp(x - max), so one exp per chosen expert replaces E exps and a row sum. The row maximum is the
// first round's key, decoded.
//
// Order (the reference's, moekern/routing/reference.py): larger score first, ties to the lower index,
// NaN ranks as -inf, -0 == +0. A key is ordered_bits(rank_key(score)) >= ordered_bits(-inf) > 0; key 0
// marks an expert that is taken, padding (e >= E), or outside the kept groups, and is never chosen
// (top_k <= the selectable experts is checked before any launch).
//
// Grouped selection (DeepSeek-V3): a group is S = (E/G)/V whole lanes (S a power of two <= L; other
// geometries use another kernel). Each lane takes the multiset top-2 of its group scores, log2(S) shuffle
// merges give the group's top-2 sum on all its lanes (the same fp32 a + b as torch), and a group is kept when
// fewer than topk_group groups rank above it (ties to the lower group): G independent shuffles per lane.
//
// Exactness: the same fp32 operations as the reference on the values that decide selection (sigmoid is
// 1 / (1 + expf(-x)) as torch computes it, no fast math), so ids and counts equal the reference; weights
// agree to a few ulp.
#pragma once

#include "routing/fused_topk.h"
#include "routing/order_keys.cuh"

#include <climits>

namespace mk {
namespace redux {

struct Args {
  const void* logits;
  const float* bias;  // [E] fp32 or nullptr (sigmoid only)
  float* weights;
  int32_t* ids;
  int32_t* counts;
  int64_t M;
  int E, top_k, G, g;
  int group_lanes;  // S: lanes per group when G > 1
  int renormalize;
  int vec;   // rows and lane chunks are aligned for vector loads
  int slot;  // histogram accumulator slot; -1: a single block
  float scale;
};

// --------------------------------------------------------------------------------------- team reductions

// Reductions over the aligned team of L lanes holding this lane; every lane of the warp calls them (loops
// are warp-uniform), every lane of a team gets the team's result.
#if !defined(MOEKERN_HIP) && ((defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800) || defined(MOEKERN_SIMT_EMULATION))
#define MOEKERN_HAS_REDUX 1  // redux.sync: a whole-warp integer max/min in one instruction
#else
#define MOEKERN_HAS_REDUX 0
#endif

template <int L>
__device__ __forceinline__ unsigned team_max(unsigned v) {
#if MOEKERN_HAS_REDUX
  if constexpr (L == 32) return __reduce_max_sync(0xffffffffu, v);
  else
#endif
  {
#pragma unroll
    for (int m = L / 2; m > 0; m >>= 1) {
      const unsigned o = shfl_xor(v, m);
      v = o > v ? o : v;
    }
    return v;
  }
}

template <int L>
__device__ __forceinline__ int team_min(int v) {
#if MOEKERN_HAS_REDUX
  if constexpr (L == 32) return __reduce_min_sync(0xffffffffu, v);
  else
#endif
  {
#pragma unroll
    for (int m = L / 2; m > 0; m >>= 1) {
      const int o = shfl_xor(v, m);
      v = o < v ? o : v;
    }
    return v;
  }
}

template <int L>
__device__ __forceinline__ float team_fsum(float v) {
#pragma unroll
  for (int m = L / 2; m > 0; m >>= 1) v += shfl_xor(v, m);
  return v;
}

__device__ __forceinline__ float key_to_float(unsigned k) {  // inverse of ordered_bits
  return __uint_as_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
}

// --------------------------------------------------------------------------------------- loads

template <typename T>
__device__ __forceinline__ float bits_to_float(unsigned bits);
template <>
__device__ __forceinline__ float bits_to_float<float>(unsigned bits) { return __uint_as_float(bits); }
template <>
__device__ __forceinline__ float bits_to_float<bf16_t>(unsigned bits) { return __uint_as_float(bits << 16); }
template <>
__device__ __forceinline__ float bits_to_float<half_t>(unsigned bits) {
  return __half2float(__ushort_as_half(static_cast<unsigned short>(bits)));
}

// Element q of a chunk read as 32-bit words.
template <typename T>
__device__ __forceinline__ float word_element(const unsigned* w, int q) {
  if constexpr (sizeof(T) == 4) {
    return bits_to_float<T>(w[q]);
  } else {
    return bits_to_float<T>((w[q / 2] >> (16 * (q & 1))) & 0xffffu);
  }
}

// This lane's V logits [base, base + V) of `row` as fp32 (padding e >= E reads -inf). vec: the chunk is
// aligned to its own size (capped at 16 bytes), so it is read with the widest loads that fit.
template <typename T, int V>
__device__ __forceinline__ void load_lane(const T* __restrict__ row, int base, int E, bool vec, float (&x)[V]) {
  constexpr int kBytes = V * static_cast<int>(sizeof(T));
  if (vec && base + V <= E) {
    if constexpr (kBytes >= 16) {
      const uint4* src = reinterpret_cast<const uint4*>(row + base);
      constexpr int kPer = 16 / static_cast<int>(sizeof(T));
#pragma unroll
      for (int j = 0; j < kBytes / 16; ++j) {
        const uint4 u = src[j];
        const unsigned w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
        for (int q = 0; q < kPer; ++q) x[j * kPer + q] = word_element<T>(w, q);
      }
      return;
    } else if constexpr (kBytes >= 4) {
      unsigned w[kBytes / 4];
      if constexpr (kBytes == 8) {
        const uint2 u = *reinterpret_cast<const uint2*>(row + base);
        w[0] = u.x;
        w[1] = u.y;
      } else {
        w[0] = *reinterpret_cast<const unsigned*>(row + base);
      }
#pragma unroll
      for (int q = 0; q < V; ++q) x[q] = word_element<T>(w, q);
      return;
    }
  }
#pragma unroll
  for (int i = 0; i < V; ++i) x[i] = base + i < E ? to_float(row[base + i]) : -INFINITY;
}

// --------------------------------------------------------------------------------------- one token

// Routes token t (active: t < M) held by this lane's team: writes its weights and ids and counts its choices
// into s_hist. x: this lane's logits of the token; bias: this lane's correction bias (zeros without one).
// Every lane of the warp calls it with warp-uniform top_k, g and S.
template <int V, int L, bool kSoftmax, bool kGrouped>
__device__ __forceinline__ void route_token(const Args& a, int64_t t, bool active, const float (&x)[V],
                                            const float (&bias)[V], int* s_hist) {
  constexpr int kRes = (kTopkMaxK + L - 1) / L;  // result r -> lane r % L, slot r / L
  const int E = a.E, top_k = a.top_k;
  const int lane = lane_id();
  const int tl = lane & (L - 1);
  const int team0 = lane - tl;
  const int base = tl * V;

  float val[V];  // the weight's source: the logit (softmax) or sigmoid(x)
  unsigned key[V];
  bool row_nan = false;
#pragma unroll
  for (int i = 0; i < V; ++i) {
    const bool real = active && base + i < E;
    float sel;
    if constexpr (kSoftmax) {
      val[i] = x[i];
      sel = x[i];
      row_nan |= real && isnan(x[i]);
    } else {
      val[i] = 1.0f / (1.0f + expf(-x[i]));
      sel = val[i] + bias[i];  // + 0.0f without a bias: exact (sigmoid is never -0)
    }
    key[i] = real ? ordered_bits(rank_key(sel)) : 0u;
  }

  float row_max = 0.0f, row_sum = 1.0f;  // softmax: the row's max logit and sum of exp(x - max)
  if constexpr (kSoftmax) {
    unsigned mk = 0u;
#pragma unroll
    for (int i = 0; i < V; ++i) mk = key[i] > mk ? key[i] : mk;
    mk = team_max<L>(mk);
    row_max = key_to_float(mk);
    if constexpr (L > 1) {  // any lane of this team saw a NaN: one vote, this team's bits
      const lane_mask_t votes = ballot(row_nan);
      if constexpr (L == kWarpSize) {
        row_nan = votes != 0;
      } else {
        row_nan = ((votes >> team0) & ((lane_mask_t(1) << L) - 1)) != 0;
      }
    }
    row_nan |= row_max == INFINITY;  // exp(inf - inf) is NaN: torch.softmax's whole row is NaN
    if (kGrouped || a.renormalize == 0) {  // probabilities of every expert are needed
      float s = 0.0f;
#pragma unroll
      for (int i = 0; i < V; ++i) s += (active && base + i < E) ? expf(x[i] - row_max) : 0.0f;
      row_sum = team_fsum<L>(s);
    }
  }

  if constexpr (kGrouped) {
    const int S = a.group_lanes;
    float top1 = -INFINITY, top2 = -INFINITY;  // multiset top-2 of this lane's group scores
#pragma unroll
    for (int i = 0; i < V; ++i) {
      const float v = rank_key(kSoftmax ? expf(x[i] - row_max) / row_sum : val[i] + bias[i]);
      if (v > top1) {
        top2 = top1;
        top1 = v;
      } else if (v > top2) {
        top2 = v;
      }
    }
    for (int m = 1; m < S; m <<= 1) {
      const float o1 = shfl_xor(top1, m);
      const float o2 = shfl_xor(top2, m);
      const float lo = fminf(top1, o1);
      top1 = fmaxf(top1, o1);
      top2 = fmaxf(lo, fmaxf(top2, o2));
    }
    const int grp = tl / S;
    const bool single = E / a.G == 1;  // one expert per group: its score alone
    const unsigned gkey = (active && grp < a.G) ? ordered_bits(rank_key(single ? top1 : top1 + top2)) : 0u;
    // A group is kept when fewer than topk_group groups rank above it (a larger key, or the same key and a lower
    // group): every lane reads the G group keys with independent shuffles, no chain of dependent reductions.
    int above = 0;
#pragma unroll
    for (int j = 0; j < L; ++j) {
      if (j >= a.G) break;  // warp-uniform: every lane shuffles the same times
      const unsigned o = L > 1 ? shfl(gkey, team0 + j * S) : gkey;
      above += (o > gkey || (o == gkey && j < grp)) ? 1 : 0;
    }
    const bool kept = gkey != 0u && above < a.g;
    if (!kept) {
#pragma unroll
      for (int i = 0; i < V; ++i) key[i] = 0u;
    }
  }

  // Lane-local best: the largest key, the lower slot on equal keys (keys of real experts are distinct only up
  // to the score, so the index decides).
  unsigned bk = 0u;
  int bi = 0;
#pragma unroll
  for (int i = 0; i < V; ++i) {
    if (key[i] > bk) {
      bk = key[i];
      bi = i;
    }
  }

  float res_w[kRes];
  int res_id[kRes];
#pragma unroll
  for (int j = 0; j < kRes; ++j) {
    res_w[j] = 0.0f;
    res_id[j] = 0;
  }
  float wsum = 0.0f;
#pragma unroll 1
  for (int r = 0; r < top_k; ++r) {
    const unsigned m = team_max<L>(bk);
    const int e = team_min<L>(bk == m ? base + bi : INT_MAX);
    const int owner = e / V;  // team lane holding e
    float bv = 0.0f;
#pragma unroll
    for (int i = 0; i < V; ++i) bv = i == bi ? val[i] : bv;
    float w = L > 1 ? shfl(bv, team0 + owner) : bv;
    if (kSoftmax) w = expf(w - row_max);
    wsum += w;
    if (tl == owner) {  // drop the winner, rescan
#pragma unroll
      for (int i = 0; i < V; ++i) key[i] = i == bi ? 0u : key[i];
      bk = 0u;
      bi = 0;
#pragma unroll
      for (int i = 0; i < V; ++i) {
        if (key[i] > bk) {
          bk = key[i];
          bi = i;
        }
      }
    }
    if (tl == (r & (L - 1))) {
      const int j = r / L;
#pragma unroll
      for (int jj = 0; jj < kRes; ++jj) {
        res_w[jj] = jj == j ? w : res_w[jj];
        res_id[jj] = jj == j ? e : res_id[jj];
      }
    }
  }

  if (!active) return;
  // Softmax: p = e / row_sum, then renormalized by sum p = wsum / row_sum; a row holding NaN is NaN throughout
  // (torch.softmax), and a +inf maximum makes exp(inf - inf) NaN as in torch.
  float div = 1.0f;
  bool renorm = false;
  if constexpr (kSoftmax) {
    if (a.renormalize != 0) {
      renorm = wsum > 0.0f;
      div = wsum;
    } else {
      renorm = true;
      div = row_sum;
    }
  } else {
    renorm = a.renormalize != 0 && wsum > 0.0f;  // a zero or NaN sum leaves the row as it is
    div = wsum;
  }
#pragma unroll
  for (int j = 0; j < kRes; ++j) {
    const int r = tl + j * L;
    if (r >= top_k) break;
    float wt = res_w[j];
    if (kSoftmax && row_nan) wt = NAN;  // torch.softmax of a row with a NaN (or +inf) is NaN throughout
    if (renorm) wt = wt / div;
    a.weights[t * top_k + r] = wt * a.scale;
    a.ids[t * top_k + r] = res_id[j];
    atomicAdd(&s_hist[res_id[j]], 1);
  }
}

// Every token of this block's share: tokens t0, t0 + stride, ... for this warp's teams (t0 = the warp's first
// token, warp-uniform), counted into s_hist, which this function zeroes first (all threads of the block call it;
// it ends without a barrier). The first logits load is issued before the zeroing and its barrier, and each
// next token's before the current one is routed, so load latency overlaps the work.
template <typename T, int V, int L, bool kSoftmax, bool kGrouped>
__device__ __forceinline__ void route_block_tokens(const Args& a, int64_t t0, int64_t stride, int* s_hist) {
  const int lane = lane_id();
  const int base = (lane & (L - 1)) * V;
  const T* __restrict__ logits = static_cast<const T*>(a.logits);
  float x[V];
  {
    const int64_t t = t0 + lane / L;
    if (t < a.M) {
      load_lane<T, V>(logits + t * a.E, base, a.E, a.vec != 0, x);
    } else {
#pragma unroll
      for (int i = 0; i < V; ++i) x[i] = -INFINITY;
    }
  }
  float bias[V];  // the same experts for every token of this lane: loaded once
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
    const int64_t tn = t + stride;
    float xn[V];
    if (tn < a.M) {
      load_lane<T, V>(logits + tn * a.E, base, a.E, a.vec != 0, xn);
    } else {
#pragma unroll
      for (int i = 0; i < V; ++i) xn[i] = -INFINITY;
    }
    route_token<V, L, kSoftmax, kGrouped>(a, t, t < a.M, x, bias, s_hist);
#pragma unroll
    for (int i = 0; i < V; ++i) x[i] = xn[i];
  }
}

// Host: the kernel arguments shared by the routing launchers (group_lanes, vec and slot are set per bucket).
inline Args make_args(const void* logits, int64_t M, int E, int top_k, bool renormalize, const float* bias, int G,
                      int topk_group, float scale, float* weights, int32_t* ids, int32_t* counts) {
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
  return a;
}

// Host: whether the bucket (V experts per lane, L lanes per token) holds whole groups of E/G experts, and the
// lanes per group; false: another kernel must route this geometry.
inline bool group_lanes_for(int E, int G, int V, int L, int* S) {
  *S = 0;
  if (G <= 1) return true;
  const int P = E / G;
  const int s = P % V == 0 ? P / V : 0;
  if (s == 0 || (s & (s - 1)) != 0 || s > L) return false;
  *S = s;
  return true;
}

// Host: vector loads are allowed when the logits and every row start on the width of a lane's chunk.
inline int vector_loads_ok(const void* logits, int E, size_t elem, int V) {
  const size_t width = (static_cast<size_t>(V) * elem) < 16 ? static_cast<size_t>(V) * elem : 16;
  return (reinterpret_cast<uintptr_t>(logits) % 16 == 0 && (static_cast<size_t>(E) * elem) % width == 0) ? 1 : 0;
}

}  // namespace redux
}  // namespace mk
