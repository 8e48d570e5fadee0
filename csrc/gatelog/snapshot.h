// The gate log's per-step hand-off (torch-free launcher; algorithm in snapshot.cu).
#pragma once

#include "common/portability.cuh"

namespace mk {

// One launch per step, on the step's stream, after its MoE layers:
//   host_counts[i] = counts[i]; counts[i] = 0                       for i < n_counts
//   host_sample[i] = sample[i] (host_sample != nullptr); sample[i] = -1   for i < n_sample (sample != nullptr)
//   then, after a system-wide fence, *host_mark = mark
// host_counts, host_sample and host_mark are pinned host memory the device addresses directly (unified
// addressing: check once with host_ptr_is_device_ptr). The host knows the copy landed when it reads
// *host_mark == mark; no event, no memcpy and no memset call on the host's side.
Error launch_gatelog_snapshot(int32_t* counts, int32_t* host_counts, int64_t n_counts, int32_t* sample,
                              int32_t* host_sample, int64_t n_sample, int64_t* host_mark, int64_t mark,
                              Stream stream);

// True when the device can dereference host pointer p as is (pinned by cudaHostAlloc / hipHostMalloc under
// unified addressing: the device pointer equals the host pointer).
bool host_ptr_is_device_ptr(const void* p);

}  // namespace mk
