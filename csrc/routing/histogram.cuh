// The per-launch expert histogram of the routing kernels, written in the same launch as the routing itself.
//
// Each block counts its tokens' choices in shared memory (s_hist). A single block then writes all E counts.
// A grid of several blocks adds each block's non-zero counts into an accumulator slot in device-global memory,
// fences, and takes a ticket with atomicInc(ticket, gridDim.x - 1), which wraps to 0 on the last ticket; the
// last block moves the totals out with atomicExch(acc, 0), leaving the slot zeroed for the next launch or graph
// replay. So no memset node runs before the kernel and no second kernel after it. (Slot kHistAtomicCounts, the
// kTopkReduxAtomic variant, instead adds each block's counts into a `counts` its launcher zeroed with a memset.)
//
// Slots are __device__ arrays (zero at module load, one copy per device and per translation unit that includes
// this header), one per (device, stream): launches on one stream are ordered, so a slot is never used by two
// kernels at once. Restriction (fused_topk.h): launches that can run at the same time must be issued or
// captured on different streams.
#pragma once

#include "common/stream_slot.h"
#include "routing/fused_topk.h"

namespace mk {
namespace {

constexpr int kHistSlots = 32;  // accumulator slots per device (one per stream)
constexpr int kHistAtomicCounts = -2;  // slot value: add each block's counts straight into `counts` (zeroed before)

// Zero at module load; every multi-block launch leaves its slot zeroed again (atomicExch / atomicInc wrap).
__device__ int g_hist_acc[kHistSlots][kTopkMaxExperts] = {};
__device__ unsigned int g_hist_ticket[kHistSlots] = {};

// Writes the launch's per-expert counts once the block's choices are in s_hist. slot -1: this is the only
// block; kHistAtomicCounts: every block adds its non-zero counts to `counts`, which the launcher zeroed. Every
// thread of every block calls it.
__device__ __forceinline__ void publish_counts(const int* s_hist, int& s_last, int E, int slot,
                                               int32_t* __restrict__ counts) {
  __syncthreads();
  if (slot == kHistAtomicCounts) {
    for (int e = threadIdx.x; e < E; e += blockDim.x) {
      const int c = s_hist[e];
      if (c != 0) atomicAdd(&counts[e], c);
    }
    return;
  }
  if (slot < 0) {
    for (int e = threadIdx.x; e < E; e += blockDim.x) counts[e] = s_hist[e];
    return;
  }
  int* acc = g_hist_acc[slot];
  for (int e = threadIdx.x; e < E; e += blockDim.x) {
    const int c = s_hist[e];
    if (c != 0) atomicAdd(&acc[e], c);
  }
  __threadfence();  // this block's adds are visible before its ticket
  __syncthreads();
  if (threadIdx.x == 0) {
    const unsigned last = gridDim.x - 1;
    s_last = atomicInc(&g_hist_ticket[slot], last) == last;  // the last ticket wraps the counter to 0
  }
  __syncthreads();
  if (s_last) {
    __threadfence();
    for (int e = threadIdx.x; e < E; e += blockDim.x) counts[e] = atomicExch(&acc[e], 0);
  }
}

// The accumulator slot of (current device, stream), assigned on first use; -1 when the device's slots are all
// taken (the caller then needs another way to count: a memset and atomics).
struct HistSlotTag {};
inline int stream_slot(Stream stream) { return stream_slot_of<HistSlotTag, kHistSlots>(stream); }

}  // namespace
}  // namespace mk
