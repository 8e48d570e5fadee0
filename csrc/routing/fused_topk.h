// Launcher for fused top-k routing (torch-free; see fused_topk.cu for the algorithm, NOTES.md for the
// design and its measurements).
#pragma once

#include "common/portability.cuh"

namespace mk {

constexpr int kTopkMaxExperts = 512;
constexpr int kTopkMaxK = 16;

// Which kernel launch_fused_topk runs. kAuto is what the public op uses; the others exist so one GPU run
// can compare the paths against the reference and each other (benchmarks/routing_variants.py).
enum TopkVariant : int {
  kTopkAuto = 0,         // the reduction-selection kernel (kTopkRedux) where its group geometry fits and it
                         // measured faster, else the v2 compact kernel (one block while M * L <= 256 lanes,
                         // else the ticket grid), else v1 (the table is in launch_fused_topk)
  kTopkLegacy = 1,       // v1 kernel (memset of counts + one warp per token), fused_topk_legacy.cu
  kTopkSingleBlock = 2,  // v2, forced to one block (grid-stride over all M tokens): tunes the crossover
  kTopkMultiBlock = 3,   // v2, forced to the multi-block grid with the ticket reduction: tunes the crossover
  kTopkCompact = 4,      // the v2 kernel with auto's grid choice but never v1's one-token shortcut (NOTES.md)
  kTopkRedux = 5,        // the reduction-selection kernel (redux_topk.cuh) with its own grid choice
  kTopkReduxSingle = 6,  // the same, forced to one block
  kTopkReduxMulti = 7,   // the same, forced to the multi-block grid with the ticket histogram
  kTopkReduxAtomic = 8,  // the same multi-block grid, counts added by global atomics into `counts` zeroed by a
                         // memset before the kernel (two launches or graph nodes, no ticket: the experiment of
                         // NOTES.md, "Beside vLLM", for the grid's tail)
  kTopkLastVariant = kTopkReduxAtomic,
};

// Grid choice of launch_redux_topk.
enum ReduxGrid : int { kReduxGridAuto = 0, kReduxGridSingle = 1, kReduxGridMulti = 2, kReduxGridMultiAtomic = 3 };

// logits: [M, E] row-major of `dtype`; bias: [E] fp32 or nullptr (sigmoid only); num_groups = 0 or 1
// means no grouped selection. Writes weights [M, k] fp32, ids [M, k] int32 and counts [E] int32 (every
// count written: the caller need not zero it). Requires 1 <= E <= 512, 1 <= k <= min(E, 16), scoring 0
// (softmax) or 1 (sigmoid); returns kInvalidValue otherwise.
//
// One kernel launch, no memset (except the v1 fallback: an irregular group geometry or a 33rd stream on
// one device; and kTopkReduxAtomic, a variant for measurement, which zeroes the counts with a memset). The
// multi-block path keeps a per-(device, stream) slot of a device-global accumulator and ticket counter, which each launch leaves zeroed. Restriction: launches of this op that can run at the
// same time must have been issued (or captured into a CUDA graph) on different streams; e.g. two graphs
// captured on the same stream must not be replayed concurrently.
Error launch_fused_topk(const void* logits, DType dtype, int64_t M, int E, int top_k, int scoring,
                        bool renormalize, const float* bias, int num_groups, int topk_group, float scale,
                        float* weights, int32_t* ids, int32_t* counts, Stream stream, int variant = kTopkAuto);

// The reduction-selection kernel (same contract, M >= 1). Launches nothing and sets *unsupported when the
// group geometry is not whole lanes per group, or a multi-block grid finds no free histogram slot.
Error launch_redux_topk(const void* logits, DType dtype, int64_t M, int E, int top_k, int scoring, bool renormalize,
                        const float* bias, int num_groups, int topk_group, float scale, float* weights, int32_t* ids,
                        int32_t* counts, Stream stream, int grid, bool* unsupported);

// The v1 kernel (same contract; zeroes counts with a memset when it runs more than one block).
Error launch_fused_topk_legacy(const void* logits, DType dtype, int64_t M, int E, int top_k, int scoring,
                               bool renormalize, const float* bias, int num_groups, int topk_group, float scale,
                               float* weights, int32_t* ids, int32_t* counts, Stream stream);

}  // namespace mk
