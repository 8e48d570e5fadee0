// Launchers for dispatch/combine (torch-free; algorithms in align.cu and permute.cu).
#pragma once

#include "common/portability.cuh"

namespace mk {

constexpr int kDispatchMaxExperts = 512;

// Int32 elements of device scratch launch_align needs for n = M*k slots (0: none, pass nullptr);
// slots_per_thread as in launch_align_variant.
int64_t align_scratch_elems(int64_t n, int E, int slots_per_thread = 0);

// Groups the n flattened slots of `ids` ([n] int32, values in [0, E)) by expert, in slot order within
// an expert, each expert's run padded with the sentinel n to a multiple of B:
//   sorted [n + min(n,E)*(B-1)]     slots, sentinel-padded (B = 1: a plain stable argsort)
//   block_ids [ceil(len(sorted)/B)] expert of each B-block, -1 past the used blocks   (nullable)
//   num_post_pad [1]                sum_e ceil(count_e/B)*B                            (nullable)
//   slot_to_row [n]                 the position of each slot in `sorted`              (nullable)
//   offsets [E+1]                   padded start of each expert's run, offsets[E] = total (nullable)
// expert_counts ([E] int32, nullable) are the per-expert totals if the caller has them (the routing
// kernel's histogram); they save the cross-block total. Ids outside [0, E) are skipped (their
// slot_to_row is -1, and they do not appear in `sorted`). Requires 1 <= E <= 512, B >= 1.
Error launch_align(const int32_t* ids, int64_t n, int E, int B, const int32_t* expert_counts, int32_t* sorted,
                   int32_t* block_ids, int32_t* num_post_pad, int32_t* slot_to_row, int32_t* offsets,
                   int32_t* scratch, Stream stream);

// launch_align with its plan forced, for tests and benchmarks/align_variants.py: slots_per_thread 0 is launch_align's
// own plan, 1/2/4/8/16 cut the slots into chunks of 512 * that many (one launch for one chunk, else a
// histogram launch first; kInvalidValue past 4096 chunks); ballot_match ranks equal experts within a warp
// step by ballots instead of the hardware match; thread_pads writes each expert's pads and block experts from
// one thread instead of one warp (not with ballot_match: kInvalidValue). Every plan gives the same output.
Error launch_align_variant(const int32_t* ids, int64_t n, int E, int B, const int32_t* expert_counts,
                           int32_t* sorted, int32_t* block_ids, int32_t* num_post_pad, int32_t* slot_to_row,
                           int32_t* offsets, int32_t* scratch, Stream stream, int slots_per_thread,
                           bool ballot_match, bool thread_pads = false);

// dst[r] = src[sorted_slots[r] / top_k] for r < n, rows of row_bytes bytes (zeros where the slot is
// outside [0, n)); 16-byte vectors when row_bytes and both pointers allow it.
Error launch_gather_rows(const void* src, void* dst, const int32_t* sorted_slots, int64_t n, int top_k,
                         int64_t row_bytes, Stream stream);

// out[t] = sum_j weights[t*k+j] * expert_output[slot_to_row[t*k+j]] for t < M, H columns of `dtype`,
// fp32 accumulation; rows outside [0, num_rows) contribute nothing.
Error launch_unpermute(const void* expert_output, DType dtype, const int32_t* slot_to_row, const float* weights,
                       int64_t M, int top_k, int64_t H, int64_t num_rows, void* out, Stream stream);

}  // namespace mk
