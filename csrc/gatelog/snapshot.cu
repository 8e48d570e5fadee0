// The gate log's per-step hand-off: copy the step's expert counts (and top-k sample) straight into pinned
// host memory, reset the device buffers for the next step, then publish a mark. One kernel replaces the
// memcpy, the memsets and the event record the host would otherwise issue every step (each a driver call on
// the thread that runs the model).
#include "gatelog/snapshot.h"

namespace mk {
namespace {

constexpr int kThreads = 512;

__global__ void gatelog_snapshot_kernel(int32_t* counts, int32_t* host_counts, int64_t n_counts, int32_t* sample,
                                        int32_t* host_sample, int64_t n_sample, int64_t* host_mark, int64_t mark) {
  for (int64_t i = threadIdx.x; i < n_counts; i += blockDim.x) {
    host_counts[i] = counts[i];
    counts[i] = 0;
  }
  if (sample != nullptr) {
    for (int64_t i = threadIdx.x; i < n_sample; i += blockDim.x) {
      if (host_sample != nullptr) host_sample[i] = sample[i];
      sample[i] = -1;
    }
  }
  // Every thread's host stores are visible system-wide before thread 0 publishes the mark.
  __threadfence_system();
  __syncthreads();
  if (threadIdx.x == 0) *reinterpret_cast<volatile int64_t*>(host_mark) = mark;
}

}  // namespace

Error launch_gatelog_snapshot(int32_t* counts, int32_t* host_counts, int64_t n_counts, int32_t* sample,
                              int32_t* host_sample, int64_t n_sample, int64_t* host_mark, int64_t mark,
                              Stream stream) {
  if (counts == nullptr || host_counts == nullptr || host_mark == nullptr || n_counts < 0 || n_sample < 0)
    return kInvalidValue;
  gatelog_snapshot_kernel<<<1, kThreads, 0, stream>>>(counts, host_counts, n_counts, sample, host_sample, n_sample,
                                                       host_mark, mark);
  return last_error();
}

bool host_ptr_is_device_ptr(const void* p) {
#ifdef MOEKERN_HIP
  hipPointerAttribute_t attr;
  if (hipPointerGetAttributes(&attr, p) != hipSuccess) {
    (void)hipGetLastError();
    return false;
  }
#else
  cudaPointerAttributes attr;
  if (cudaPointerGetAttributes(&attr, p) != cudaSuccess) {
    (void)cudaGetLastError();
    return false;
  }
#endif
  return attr.devicePointer == p;
}

}  // namespace mk
