// Launcher for routing + align in one launch (torch-free; route_align.cu has the algorithm).
#pragma once

#include "common/portability.cuh"

namespace mk {

// Token lanes (M x L, L = 32 lanes per token for E >= 32, 16 for E <= 16, 8 for E <= 8) one launch routes: its 512
// threads take 16 (L = 32), 32 (L = 16) or 64 (L = 8) tokens at a time, one after another. On an H100 the one
// launch beat routing + align up to M = 32 at L = 32 and M = 128 at L = 8, and lost from M = 128 at L = 32
// (benchmarks/results/fastpath/h100-2026-12-07/).
constexpr int64_t kRouteAlignMaxLanes = 1024;

// Blocks of the grid tier at most (512 / L tokens each: M <= 256 at L = 32, 1,024 at L = 8). Each block sums the
// chunk counts of the blocks before it per expert, a chain that grows with the grid; 16 keeps it short, and the
// launches it replaces (routing, align's chunk histogram, its scatter) are the loss measured at M = 64-256.
constexpr int64_t kRouteAlignGridMaxBlocks = 16;

// Lanes per token of the buckets below (L).
inline int route_align_lanes(int E) { return E <= 8 ? 8 : (E <= 16 ? 16 : 32); }

// E -> (V experts per lane, L lanes per token), the buckets of routing/redux_topk.cu.
#define MOEKERN_ROUTE_ALIGN_BUCKETS(X) \
  X(8, 1, 8) X(16, 1, 16) X(32, 1, 32) X(64, 2, 32) X(128, 4, 32) X(256, 8, 32) X(512, 16, 32)

// The values of launch_fused_topk followed by launch_align(ids, M * top_k, E, block_size, counts, ...): weights
// [M, k] fp32, ids [M, k] int32, counts [E] int32, sorted [M*k + min(M*k, E)*(B-1)], block_ids [ceil(that / B)],
// num_post_pad [1]. One block while M x L <= kRouteAlignMaxLanes; above, the grid tier (route_align.cu) with
// `scratch` of route_align_scratch_elems(M, E) int32 (its blocks' expert counts). Launches nothing and sets
// *unsupported when M is 0, the grid tier would need more than kRouteAlignGridMaxBlocks blocks or more than can be
// resident at once, scratch is null where it is needed, or the group geometry is not whole lanes per group: the
// caller then runs the two kernels.
Error launch_route_align(const void* logits, DType dtype, int64_t M, int E, int top_k, int scoring, bool renormalize,
                         const float* bias, int num_groups, int topk_group, float scale, float* weights, int32_t* ids,
                         int32_t* counts, int block_size, int32_t* sorted, int32_t* block_ids, int32_t* num_post_pad,
                         int32_t* scratch, Stream stream, bool* unsupported);

// Int32 elements of scratch launch_route_align needs for M tokens of E experts (0: none, pass nullptr).
int64_t route_align_scratch_elems(int64_t M, int E);

}  // namespace mk
