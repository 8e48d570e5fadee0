// Per-(device, stream) slots of a device-global resource (a histogram accumulator, a grid barrier's counters): a
// launch on one stream reuses its stream's slot, so two launches that can run at the same time (different streams)
// never share one, and a CUDA graph replays the slot its capture used. Host-only, torch-free.
#pragma once

#include "common/portability.cuh"

#include <mutex>
#include <vector>

namespace mk {

// The slot of (current device, stream) among kSlots per device, assigned on first use; -1 when the device's slots
// are all taken (the caller then needs another way). Tag makes one table per resource.
template <typename Tag, int kSlots>
inline int stream_slot_of(Stream stream) {
  int dev = 0;
  if (current_device(&dev) != kSuccess) return -1;
  struct Owner {
    int dev;
    Stream stream;
    int slot;
  };
  static std::mutex mu;
  static std::vector<Owner> owners;
  const std::lock_guard<std::mutex> lock(mu);
  int used = 0;
  for (const Owner& o : owners) {
    if (o.dev != dev) continue;
    if (o.stream == stream) return o.slot;
    ++used;
  }
  if (used >= kSlots) return -1;
  owners.push_back(Owner{dev, stream, used});
  return used;
}

}  // namespace mk
