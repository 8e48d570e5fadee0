// Launcher for fused top-k routing (torch-free; see fused_topk.cu for the algorithm).
#pragma once

#include "common/portability.cuh"

namespace mk {

constexpr int kTopkMaxExperts = 512;
constexpr int kTopkMaxK = 16;

// logits: [M, E] row-major of `dtype`; bias: [E] fp32 or nullptr (sigmoid only); num_groups = 0 or 1
// means no grouped selection. Writes weights [M, k] fp32, ids [M, k] int32 and counts [E] int32 (zeroed
// here, on `stream`, before the kernel adds to it). Requires 1 <= E <= 512, 1 <= k <= min(E, 16),
// scoring 0 (softmax) or 1 (sigmoid); returns kInvalidValue otherwise.
Error launch_fused_topk(const void* logits, DType dtype, int64_t M, int E, int top_k, int scoring,
                        bool renormalize, const float* bias, int num_groups, int topk_group, float scale,
                        float* weights, int32_t* ids, int32_t* counts, Stream stream);

}  // namespace mk
