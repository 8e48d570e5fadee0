// CUDA/HIP portability for moekern's device code: the one place that knows which vendor compiles it.
//
// Everything else in csrc/ writes `mk::` names: the stream and error types, warp size and lane masks,
// shuffles/ballots/match, fp16/bf16 conversions, and MOEKERN_DISPATCH_FLOAT, which instantiates one
// templated kernel per logits/hidden dtype. The same .cu files compile with nvcc (sm_80, sm_90a) and with
// hipcc (`-x hip`, gfx90a); they are never hipified copies.
//
// Host part (types, enums, error helpers) is usable from a plain C++ compiler (bindings.cpp); the device
// part is only seen by nvcc/hipcc. The HIP branch targets CDNA (wave64: gfx90a, gfx942) and ROCm >= 5.2,
// so bf16 is `hip_bfloat16` (hip/hip_bfloat16.h), which every ROCm release ships.
#pragma once

#include <cstdint>
#include <utility>

#if defined(MOEKERN_SIMT_EMULATION)
// The CPU emulator's stand-ins for the CUDA (or, with MOEKERN_SIMT_WAVE64, the HIP) names
// (tools/simt/simt_emulation.h): the kernels' CUDA or HIP path, run by fibers on a machine without a GPU, tests only.
#include "simt_emulation.h"
#if defined(MOEKERN_SIMT_WAVE64)
#define MOEKERN_HIP 1
#endif
#elif defined(__HIPCC__) || defined(__HIP_PLATFORM_AMD__) || defined(__HIP_PLATFORM_HCC__) || defined(USE_ROCM)
#define MOEKERN_HIP 1
#include <hip/hip_runtime.h>
#include <hip/hip_fp16.h>
#include <hip/hip_bfloat16.h>
#include <hip/hip_cooperative_groups.h>
#else
#include <cooperative_groups.h>
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#endif

namespace mk {

// ---------------------------------------------------------------- host part
#ifdef MOEKERN_HIP
using Stream = hipStream_t;
using Error = hipError_t;
constexpr Error kSuccess = hipSuccess;
constexpr Error kInvalidValue = hipErrorInvalidValue;
inline const char* error_string(Error e) { return hipGetErrorString(e); }
inline Error last_error() { return hipGetLastError(); }
inline Error memset_async(void* p, int v, size_t n, Stream s) { return hipMemsetAsync(p, v, n, s); }
// Multiprocessors of the current device (sizes persistent grids); 1 if the query fails.
inline int num_sms() {
  int dev = 0, n = 0;
  if (hipGetDevice(&dev) != hipSuccess || hipDeviceGetAttribute(&n, hipDeviceAttributeMultiprocessorCount, dev) != hipSuccess)
    return 1;
  return n > 0 ? n : 1;
}
inline Error current_device(int* dev) { return hipGetDevice(dev); }
// Resident blocks of `kernel` per multiprocessor at `threads` per block (sizes grid-stride grids); >= 1.
inline int max_active_blocks(const void* kernel, int threads) {
  int n = 0;
  if (hipOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel, threads, 0) != hipSuccess) return 1;
  return n > 0 ? n : 1;
}
#else
using Stream = cudaStream_t;
using Error = cudaError_t;
constexpr Error kSuccess = cudaSuccess;
constexpr Error kInvalidValue = cudaErrorInvalidValue;
inline const char* error_string(Error e) { return cudaGetErrorString(e); }
inline Error last_error() { return cudaGetLastError(); }
inline Error memset_async(void* p, int v, size_t n, Stream s) { return cudaMemsetAsync(p, v, n, s); }
// Multiprocessors of the current device (sizes persistent grids); 1 if the query fails.
inline int num_sms() {
  int dev = 0, n = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess)
    return 1;
  return n > 0 ? n : 1;
}
inline Error current_device(int* dev) { return cudaGetDevice(dev); }
// Resident blocks of `kernel` per multiprocessor at `threads` per block (sizes grid-stride grids); >= 1.
inline int max_active_blocks(const void* kernel, int threads) {
  int n = 0;
  if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel, threads, 0) != cudaSuccess) return 1;
  return n > 0 ? n : 1;
}
#endif

// The float dtypes a kernel can be instantiated for; bindings.cpp maps torch dtypes onto these.
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

#ifdef MOEKERN_HIP
using half_t = __half;
using bf16_t = hip_bfloat16;
constexpr int kWarpSize = 64;  // CDNA wavefront
using lane_mask_t = unsigned long long;
#else
using half_t = __half;
using bf16_t = __nv_bfloat16;
constexpr int kWarpSize = 32;
using lane_mask_t = unsigned int;
#endif

}  // namespace mk

// Instantiates `__VA_ARGS__` with `T` bound to the device type of `dtype`; an unknown dtype returns
// mk::kInvalidValue from the enclosing launcher (bindings.cpp checks dtypes before it gets here).
#define MOEKERN_DISPATCH_FLOAT(dtype, T, ...)        \
  switch (dtype) {                                   \
    case ::mk::DType::kFloat32: {                    \
      using T = float;                               \
      __VA_ARGS__;                                   \
      break;                                         \
    }                                                \
    case ::mk::DType::kFloat16: {                    \
      using T = ::mk::half_t;                        \
      __VA_ARGS__;                                   \
      break;                                         \
    }                                                \
    case ::mk::DType::kBFloat16: {                   \
      using T = ::mk::bf16_t;                        \
      __VA_ARGS__;                                   \
      break;                                         \
    }                                                \
    default:                                         \
      return ::mk::kInvalidValue;                    \
  }

// ---------------------------------------------------------------- device part
#if defined(__CUDACC__) || defined(__HIPCC__) || defined(MOEKERN_SIMT_EMULATION)
namespace mk {

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(half_t x) { return __half2float(x); }
#ifdef MOEKERN_HIP
__device__ __forceinline__ float to_float(bf16_t x) { return static_cast<float>(x); }
#else
__device__ __forceinline__ float to_float(bf16_t x) { return __bfloat162float(x); }
#endif

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ half_t from_float<half_t>(float x) { return __float2half_rn(x); }
#ifdef MOEKERN_HIP
// hip_bfloat16(float) rounds to nearest even, as torch's .to(torch.bfloat16) does.
template <>
__device__ __forceinline__ bf16_t from_float<bf16_t>(float x) { return bf16_t(x); }
#else
template <>
__device__ __forceinline__ bf16_t from_float<bf16_t>(float x) { return __float2bfloat16_rn(x); }
#endif

__device__ __forceinline__ int lane_id() { return static_cast<int>(threadIdx.x) & (kWarpSize - 1); }

#ifdef MOEKERN_HIP
__device__ __forceinline__ unsigned shfl_xor(unsigned v, int m) { return __shfl_xor(v, m); }
__device__ __forceinline__ int shfl_xor(int v, int m) { return __shfl_xor(v, m); }
__device__ __forceinline__ float shfl_xor(float v, int m) { return __shfl_xor(v, m); }
__device__ __forceinline__ unsigned shfl(unsigned v, int src) { return __shfl(v, src); }
__device__ __forceinline__ int shfl_up(int v, int d) { return __shfl_up(v, d); }
__device__ __forceinline__ int shfl(int v, int src) { return __shfl(v, src); }
__device__ __forceinline__ float shfl(float v, int src) { return __shfl(v, src); }
__device__ __forceinline__ lane_mask_t ballot(bool p) { return __ballot(p); }
__device__ __forceinline__ int popc(lane_mask_t m) { return __popcll(m); }
// Wavefronts run in lockstep on CDNA; this only stops the compiler moving LDS accesses across it.
__device__ __forceinline__ void syncwarp() { __builtin_amdgcn_wave_barrier(); }
#else
__device__ __forceinline__ unsigned shfl_xor(unsigned v, int m) { return __shfl_xor_sync(0xffffffffu, v, m); }
__device__ __forceinline__ int shfl_xor(int v, int m) { return __shfl_xor_sync(0xffffffffu, v, m); }
__device__ __forceinline__ float shfl_xor(float v, int m) { return __shfl_xor_sync(0xffffffffu, v, m); }
__device__ __forceinline__ unsigned shfl(unsigned v, int src) { return __shfl_sync(0xffffffffu, v, src); }
__device__ __forceinline__ int shfl_up(int v, int d) { return __shfl_up_sync(0xffffffffu, v, d); }
__device__ __forceinline__ int shfl(int v, int src) { return __shfl_sync(0xffffffffu, v, src); }
__device__ __forceinline__ float shfl(float v, int src) { return __shfl_sync(0xffffffffu, v, src); }
__device__ __forceinline__ lane_mask_t ballot(bool p) { return __ballot_sync(0xffffffffu, p); }
__device__ __forceinline__ int popc(lane_mask_t m) { return __popc(m); }
__device__ __forceinline__ void syncwarp() { __syncwarp(); }
#endif

__device__ __forceinline__ lane_mask_t lanemask_lt() {
  return (static_cast<lane_mask_t>(1) << lane_id()) - 1;
}

// Lanes of the (fully active) warp holding the same `key` as this lane, key < 2^bits, by intersecting one ballot
// per key bit (the radix-sort trick); `bits` must be the same on every lane.
__device__ __forceinline__ lane_mask_t match_any_ballots(unsigned key, int bits) {
  lane_mask_t peers = ~static_cast<lane_mask_t>(0);
  for (int b = 0; b < bits; ++b) {  // unrolled where bits is a constant (match_any<kBits> on HIP)
    const bool bit = (key >> b) & 1u;
    const lane_mask_t set = ballot(bit);
    peers &= bit ? set : ~set;
  }
  return peers;
}

// The same, key < 2^kBits: CUDA uses the hardware match; HIP has none, so it takes the ballots.
template <int kBits>
__device__ __forceinline__ lane_mask_t match_any(unsigned key) {
#if !defined(MOEKERN_HIP) && ((defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 700) || defined(MOEKERN_SIMT_EMULATION))
  return __match_any_sync(0xffffffffu, key);
#else
  return match_any_ballots(key, kBits);
#endif
}

// Programmatic dependent launch (sm_90 and later): once every block of this grid has run this, a kernel launched
// after it with the programmatic-stream-serialization attribute (fused_moe's Triton GEMMs) may start its blocks;
// they wait (griddepcontrol.wait) for this whole grid to finish before reading or writing memory. So the next
// kernel's launch and block start overlap this one instead of following it. A no-op on older GPUs and on HIP.
__device__ __forceinline__ void allow_dependent_launch() {
#if !defined(MOEKERN_HIP) && defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// A spinning thread's pause between two polls of a flag that another block sets (a grid barrier).
__device__ __forceinline__ void spin_pause() {
#if defined(MOEKERN_HIP)
  __builtin_amdgcn_s_sleep(1);
#elif defined(MOEKERN_SIMT_EMULATION) || (defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 700)
  __nanosleep(32);
#endif
}

// Every thread of every block of a cooperative launch (launch_cooperative) waits here until all have arrived; writes
// before it are visible after it. The runtime's own grid barrier: it needs no state of ours, so launches on several
// streams, or graph replays, never share one.
__device__ __forceinline__ void grid_sync() {
#if defined(MOEKERN_SIMT_EMULATION)
  __syncthreads();
  if (threadIdx.x == 0) ::mk_simt::grid_barrier_now()->arrive_and_wait();
  __syncthreads();
#else
  cooperative_groups::this_grid().sync();
#endif
}

// Launches `kernel` with every block resident at once (a cooperative launch: the runtime refuses a grid that does not
// fit instead of queueing blocks), so blocks may meet at grid_sync(). The caller sizes the grid by num_sms() *
// max_active_blocks(). Captured into CUDA graphs as a cooperative kernel node.
template <typename... P, typename... A>
inline Error launch_cooperative(void (*kernel)(P...), unsigned grid, unsigned block, Stream stream, A&&... args) {
#if defined(MOEKERN_SIMT_EMULATION)
  ::mk_simt::Launch(grid, block, 0, stream, /*cooperative=*/true)(kernel, std::forward<A>(args)...);
  return last_error();
#elif defined(MOEKERN_HIP)
  void* ptrs[] = {const_cast<void*>(static_cast<const void*>(&args))...};
  return hipLaunchCooperativeKernel(reinterpret_cast<const void*>(kernel), dim3(grid), dim3(block), ptrs, 0, stream);
#else
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(grid);
  cfg.blockDim = dim3(block);
  cfg.dynamicSmemBytes = 0;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeCooperative;
  attr[0].val.cooperative = 1;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  return cudaLaunchKernelEx(&cfg, kernel, std::forward<A>(args)...);
#endif
}

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int m = kWarpSize / 2; m > 0; m >>= 1) v += shfl_xor(v, m);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int m = kWarpSize / 2; m > 0; m >>= 1) v = fmaxf(v, shfl_xor(v, m));
  return v;
}

}  // namespace mk
#endif  // device part
