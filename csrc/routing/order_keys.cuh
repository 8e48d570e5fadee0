// Order keys shared by the routing kernels: the total order every moekern backend selects experts by.
//
// rank_key maps a score to the value that orders it (NaN ranks as -inf; -0 and +0 are one key, as in
// torch); ordered_bits maps that float to an unsigned integer with the same order, so a key can be packed
// above an index and compared as one integer (ties then resolve by the packed index).
#pragma once

#include "common/portability.cuh"

namespace mk {

__device__ __forceinline__ float rank_key(float x) {
  if (isnan(x)) return -INFINITY;
  return x == 0.0f ? 0.0f : x;
}

__device__ __forceinline__ unsigned ordered_bits(float x) {  // x already passed through rank_key
  const unsigned u = __float_as_uint(x);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

}  // namespace mk
