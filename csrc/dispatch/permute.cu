// Row movement for permute/unpermute (the layout itself comes from align.cu with block size 1).
//
// gather_rows: permuted[r] = hidden[sorted_slots[r] / k]. A pure byte copy, so it is not templated on the
// dtype: rows move as 16-byte vectors when the row size and both base pointers are 16-byte aligned (every
// hidden size that is a multiple of 8 bf16/fp16 or 4 fp32 elements), else as 4-, 2- or 1-byte words.
// Threads of a block split into groups of a power of two <= 256 lanes per row, so small rows still fill
// the block. Bandwidth bound: one read and one write of each row, n*H*elem bytes each way.
//
// unpermute: out[t] = sum_j w[t,j] * expert_output[slot_to_row[t*k + j]], one templated kernel for
// fp32/fp16/bf16, 16-byte vectors (V = 16/sizeof(T) columns per thread) when H*sizeof(T) and the pointers
// allow, accumulating in fp32 and rounding once to T (round to nearest even, as torch does). Rows outside
// [0, num_rows) (slots whose id was invalid) contribute nothing. Bounds: any M, k, H (H*sizeof(T) < 2^31
// per row), grid of up to 2^31-1 blocks.

#include "dispatch/dispatch.h"

namespace mk {
namespace {

constexpr int kThreads = 256;

int threads_per_row(int64_t vectors_per_row) {
  int t = 1;
  while (t < kThreads && t < vectors_per_row) t <<= 1;
  return t;
}

template <typename V>
__global__ void __launch_bounds__(kThreads)
gather_rows_kernel(const V* __restrict__ src, V* __restrict__ dst, const int32_t* __restrict__ sorted_slots,
                   int64_t n, int top_k, int64_t vec_per_row, int tpr) {
  const int rows_per_block = kThreads / tpr;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * rows_per_block + threadIdx.x / tpr;
  if (r >= n) return;
  const int32_t slot = sorted_slots[r];
  const bool valid = slot >= 0 && slot < n;
  const V* s = src + (valid ? static_cast<int64_t>(slot / top_k) : 0) * vec_per_row;
  V* d = dst + r * vec_per_row;
  for (int64_t v = threadIdx.x % tpr; v < vec_per_row; v += tpr) d[v] = valid ? s[v] : V{};
}

template <typename V>
Error launch_gather(const void* src, void* dst, const int32_t* sorted_slots, int64_t n, int top_k,
                    int64_t row_bytes, Stream stream) {
  const int64_t vpr = row_bytes / static_cast<int64_t>(sizeof(V));
  const int tpr = threads_per_row(vpr);
  const int64_t rows_per_block = kThreads / tpr;
  const int64_t blocks = (n + rows_per_block - 1) / rows_per_block;
  if (blocks > 0x7fffffffLL) return kInvalidValue;
  gather_rows_kernel<V><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
      static_cast<const V*>(src), static_cast<V*>(dst), sorted_slots, n, top_k, vpr, tpr);
  return last_error();
}

bool aligned(const void* p, int64_t a) { return reinterpret_cast<uintptr_t>(p) % a == 0; }

// V consecutive elements of T as one load/store: a 16-byte vector when V*sizeof(T) == 16.
template <typename T, int V>
__device__ __forceinline__ void load_vec(const T* p, float (&x)[V]) {
  if constexpr (V * sizeof(T) == 16) {
    alignas(16) T buf[V];
    *reinterpret_cast<uint4*>(buf) = *reinterpret_cast<const uint4*>(p);
#pragma unroll
    for (int i = 0; i < V; ++i) x[i] = to_float(buf[i]);
  } else {
#pragma unroll
    for (int i = 0; i < V; ++i) x[i] = to_float(p[i]);
  }
}

template <typename T, int V>
__device__ __forceinline__ void store_vec(T* p, const float (&x)[V]) {
  if constexpr (V * sizeof(T) == 16) {
    alignas(16) T buf[V];
#pragma unroll
    for (int i = 0; i < V; ++i) buf[i] = from_float<T>(x[i]);
    *reinterpret_cast<uint4*>(p) = *reinterpret_cast<const uint4*>(buf);
  } else {
#pragma unroll
    for (int i = 0; i < V; ++i) p[i] = from_float<T>(x[i]);
  }
}

template <typename T, int V>
__global__ void __launch_bounds__(kThreads)
unpermute_kernel(const T* __restrict__ expert_output, const int32_t* __restrict__ slot_to_row,
                 const float* __restrict__ weights, int64_t M, int top_k, int64_t H, int64_t num_rows,
                 T* __restrict__ out, int tpr) {
  const int tokens_per_block = kThreads / tpr;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * tokens_per_block + threadIdx.x / tpr;
  if (t >= M) return;
  const int64_t nvec = H / V;
  for (int64_t v = threadIdx.x % tpr; v < nvec; v += tpr) {
    float acc[V];
#pragma unroll
    for (int i = 0; i < V; ++i) acc[i] = 0.0f;
    for (int j = 0; j < top_k; ++j) {
      const int32_t row = slot_to_row[t * top_k + j];
      if (row < 0 || row >= num_rows) continue;
      const float w = weights[t * top_k + j];
      float x[V];
      load_vec<T, V>(expert_output + static_cast<int64_t>(row) * H + v * V, x);
#pragma unroll
      for (int i = 0; i < V; ++i) acc[i] += w * x[i];
    }
    store_vec<T, V>(out + t * H + v * V, acc);
  }
}

template <typename T, int V>
Error launch_unpermute_vec(const T* expert_output, const int32_t* slot_to_row, const float* weights, int64_t M,
                           int top_k, int64_t H, int64_t num_rows, T* out, Stream stream) {
  const int tpr = threads_per_row(H / V);
  const int64_t tokens_per_block = kThreads / tpr;
  const int64_t blocks = (M + tokens_per_block - 1) / tokens_per_block;
  if (blocks > 0x7fffffffLL) return kInvalidValue;
  unpermute_kernel<T, V><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
      expert_output, slot_to_row, weights, M, top_k, H, num_rows, out, tpr);
  return last_error();
}

template <typename T>
Error launch_unpermute_typed(const T* expert_output, const int32_t* slot_to_row, const float* weights, int64_t M,
                             int top_k, int64_t H, int64_t num_rows, T* out, Stream stream) {
  constexpr int kVec = 16 / sizeof(T);
  if (H % kVec == 0 && aligned(expert_output, 16) && aligned(out, 16))
    return launch_unpermute_vec<T, kVec>(expert_output, slot_to_row, weights, M, top_k, H, num_rows, out, stream);
  return launch_unpermute_vec<T, 1>(expert_output, slot_to_row, weights, M, top_k, H, num_rows, out, stream);
}

}  // namespace

Error launch_gather_rows(const void* src, void* dst, const int32_t* sorted_slots, int64_t n, int top_k,
                         int64_t row_bytes, Stream stream) {
  if (n < 0 || top_k < 1 || row_bytes < 0) return kInvalidValue;
  if (n == 0 || row_bytes == 0) return kSuccess;
  const auto fits = [&](int64_t a) { return row_bytes % a == 0 && aligned(src, a) && aligned(dst, a); };
  if (fits(16)) return launch_gather<uint4>(src, dst, sorted_slots, n, top_k, row_bytes, stream);
  if (fits(4)) return launch_gather<unsigned>(src, dst, sorted_slots, n, top_k, row_bytes, stream);
  if (fits(2)) return launch_gather<unsigned short>(src, dst, sorted_slots, n, top_k, row_bytes, stream);
  return launch_gather<unsigned char>(src, dst, sorted_slots, n, top_k, row_bytes, stream);
}

Error launch_unpermute(const void* expert_output, DType dtype, const int32_t* slot_to_row, const float* weights,
                       int64_t M, int top_k, int64_t H, int64_t num_rows, void* out, Stream stream) {
  if (M < 0 || top_k < 1 || H < 0 || num_rows < 0) return kInvalidValue;
  if (M == 0 || H == 0) return kSuccess;
  MOEKERN_DISPATCH_FLOAT(dtype, T,
                         return launch_unpermute_typed<T>(static_cast<const T*>(expert_output), slot_to_row,
                                                          weights, M, top_k, H, num_rows, static_cast<T*>(out),
                                                          stream));
  return kInvalidValue;
}

}  // namespace mk
