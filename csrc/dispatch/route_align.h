// Launcher for routing + align in one launch (torch-free; route_align.cu has the algorithm).
#pragma once

#include "common/portability.cuh"

namespace mk {

// Tokens one launch routes: one block of 512 threads routes 16 tokens at a time at 32 lanes per token, so
// above this a second grid-filling routing kernel followed by align is faster (measured:
// benchmarks/bench_route_align.py).
constexpr int64_t kRouteAlignMaxTokens = 256;

// E -> (V experts per lane, L lanes per token), the buckets of routing/redux_topk.cu.
#define MOEKERN_ROUTE_ALIGN_BUCKETS(X) \
  X(8, 1, 8) X(16, 1, 16) X(32, 1, 32) X(64, 2, 32) X(128, 4, 32) X(256, 8, 32) X(512, 16, 32)

// The values of launch_fused_topk followed by launch_align(ids, M * top_k, E, block_size, counts, ...): weights
// [M, k] fp32, ids [M, k] int32, counts [E] int32, sorted [M*k + E*(B-1)], block_ids [ceil(that / B)],
// num_post_pad [1]. Launches nothing and sets *unsupported when M is 0 or above kRouteAlignMaxTokens, M * top_k
// exceeds one align chunk (8192 slots), or the group geometry is not whole lanes per group: the caller then
// runs the two kernels.
Error launch_route_align(const void* logits, DType dtype, int64_t M, int E, int top_k, int scoring, bool renormalize,
                         const float* bias, int num_groups, int topk_group, float scale, float* weights, int32_t* ids,
                         int32_t* counts, int block_size, int32_t* sorted, int32_t* block_ids, int32_t* num_post_pad,
                         Stream stream, bool* unsupported);

}  // namespace mk
