// The plan of moe_align / permute for n slots and E experts: how many slots each of a CTA's 512 threads takes
// (IPT), and so how many chunks (CTAs) there are. Host-only and torch-free, so align.cu launches by it and
// bindings.cpp shows it to the CPU tests (torch.ops.moekern.align_plan).
//
// Why these plans. One chunk is one launch, but its CTA does the whole layout alone (per-expert prefixes, the
// scan, every pad and block id) on one SM; several chunks add a histogram launch and spread that work. Measured
// on an H100 (benchmarks/results/fastpath/h100-2026-12-07-align-plans/align_plans.json, every plan at E in
// {8, 64, 128, 256}, 2 to 32K slots, B 16 and 64, CUDA-graph replay): up to 512 slots one chunk of one slot per
// thread; up to 1,024 slots one chunk of two per thread for E <= 128 (4.7 vs 5.3 us at E = 64; at E = 256 two
// chunks win, 7.1 vs 8.3); for E <= 8 (Mixtral) one chunk up to 4,096 slots (3.8 vs 4.8 us at 2,048: little
// per-expert work); above, chunks of 512 slots (one per thread) up to 32K slots: 5.7-6.2 us at 8,192 slots where
// one chunk took 12-17 us. Past 32K slots (not measured) the earlier rule: chunks of 2,048 slots while there are
// at most 256, else of 8,192.
#pragma once

#include <cstdint>

namespace mk {

constexpr int kAlignThreads = 512;
constexpr int kAlignMaxIPT = 16;

struct AlignPlan {
  int ipt;         // slots per thread: 1, 2, 4, 8 or 16
  int64_t chunks;  // CTAs of kAlignThreads * ipt slots each (>= 1)
};

// Chunks of kAlignThreads * ipt slots that hold n slots (at least one).
inline int64_t align_chunks(int64_t n, int ipt) {
  const int64_t per = static_cast<int64_t>(kAlignThreads) * ipt;
  return n <= per ? 1 : (n + per - 1) / per;
}

// The smallest power-of-two IPT (<= kAlignMaxIPT) whose one chunk holds n slots; 0 if none does.
inline int align_one_chunk_ipt(int64_t n) {
  for (int ipt = 1; ipt <= kAlignMaxIPT; ipt *= 2)
    if (n <= static_cast<int64_t>(kAlignThreads) * ipt) return ipt;
  return 0;
}

inline AlignPlan align_default_plan(int64_t n, int E) {
  if (n <= kAlignThreads) return {1, 1};
  if (n <= 2 * kAlignThreads && E <= 128) return {2, 1};
  if (n <= 8 * kAlignThreads && E <= 8) return {align_one_chunk_ipt(n), 1};
  if (n <= 64 * kAlignThreads) return {1, align_chunks(n, 1)};
  const int64_t chunks4 = align_chunks(n, 4);
  if (chunks4 <= 256) return {4, chunks4};
  return {kAlignMaxIPT, align_chunks(n, kAlignMaxIPT)};
}

// Whether the default align writes each expert's pads and block ids by one thread per expert (kThreadPads) instead of
// one warp per expert. At decode sizes most experts are empty, and the warp writer spends a whole warp's loop on
// each (37 % / 44 % of route_and_align's M = 1 instructions for Qwen3 / DeepSeek-V3), where the thread writer spends
// one test. Measured on an H100 at B = 16 (benchmarks/results/fastpath/h100-2026-12-07-pdl/align_plans.json, the
// default plan with either writer): the thread writer takes 0.51-0.89x the time for every E >= 64 up to 1,024
// slots (E = 256, 128 slots: 3.34 vs 6.56 us; E = 128, 8 slots: 2.80 vs 3.72), 1.08-1.16x at E = 8, and 0.87-1.09x
// from 2,048 slots (slower from 8,192 at every E). Block sizes above 16 (more pads per expert for one thread) and
// B = 1 (permute: no pads, a block id per slot) were not measured: they keep the warp writer. 64-bit arguments, so
// the ops can ask before they check (and cast) num_experts and block_size.
inline bool align_default_thread_pads(int64_t n, int64_t E, int64_t B) {
  return E >= 64 && n <= 2 * kAlignThreads && B >= 2 && B <= 16;
}

// Length of align's sorted ids for n slots, E experts, block size B: at most min(n, E) experts hold slots and each
// pads fewer than B, so n + min(n, E) * (B - 1) holds every layout. The expert GEMMs launch a program per block of
// it, so the bound matters at decode: Qwen3-30B-A3B at M = 1 (8 slots, E = 128, B = 16) gets 8 blocks, where
// n + E * (B - 1) gave 121 (113 programs per N tile that only read the used-block count and exit).
inline int64_t align_max_padded(int64_t n, int64_t E, int64_t B) {
  return n + (n < E ? n : E) * (B - 1);
}

}  // namespace mk
