// C entry points of the emulated kernels (tools/simt/simt_emulation.h), for ctypes: each calls moekern's own
// launcher with host pointers and returns its error code (0: success); simt_error() says why a launch failed.
#include "dispatch/dispatch.h"
#include "dispatch/route_align.h"
#include "gatelog/snapshot.h"
#include "routing/fused_topk.h"

#include <string>

namespace {
int done(mk::Error e) {
  std::string& text = ::mk_simt::last_error_text();
  if (e == mk::kSuccess && !text.empty()) return static_cast<int>(cudaErrorLaunchFailure);
  return static_cast<int>(e);
}
}  // namespace

extern "C" {

const char* simt_error() { return ::mk_simt::last_error_text().c_str(); }
int simt_warp_size() { return mk::kWarpSize; }  // 32: the CUDA path; 64: the HIP path (MOEKERN_HIP)
int simt_is_hip() {
#ifdef MOEKERN_HIP
  return 1;
#else
  return 0;
#endif
}
void simt_clear_error() { ::mk_simt::last_error_text().clear(); }

int simt_fused_topk(const void* logits, int dtype, int64_t M, int E, int top_k, int scoring, int renormalize,
                    const float* bias, int num_groups, int topk_group, float scale, float* weights, int32_t* ids,
                    int32_t* counts, int variant) {
  return done(mk::launch_fused_topk(logits, static_cast<mk::DType>(dtype), M, E, top_k, scoring, renormalize != 0,
                                    bias, num_groups, topk_group, scale, weights, ids, counts, nullptr, variant));
}

int64_t simt_route_align_scratch_elems(int64_t M, int E) { return mk::route_align_scratch_elems(M, E); }

// returns 0 and sets *unsupported when the one launch does not take this shape
int simt_route_align(const void* logits, int dtype, int64_t M, int E, int top_k, int scoring, int renormalize,
                     const float* bias, int num_groups, int topk_group, float scale, float* weights, int32_t* ids,
                     int32_t* counts, int block_size, int32_t* sorted, int32_t* block_ids, int32_t* num_post_pad,
                     int32_t* scratch, int* unsupported) {
  bool u = false;
  const int rc = done(mk::launch_route_align(logits, static_cast<mk::DType>(dtype), M, E, top_k, scoring,
                                             renormalize != 0, bias, num_groups, topk_group, scale, weights, ids,
                                             counts, block_size, sorted, block_ids, num_post_pad, scratch, nullptr,
                                             &u));
  *unsupported = u ? 1 : 0;
  return rc;
}

int64_t simt_align_scratch_elems(int64_t n, int E, int slots_per_thread) {
  return mk::align_scratch_elems(n, E, slots_per_thread);
}

int simt_align_variant(const int32_t* ids, int64_t n, int E, int B, const int32_t* expert_counts, int32_t* sorted,
                       int32_t* block_ids, int32_t* num_post_pad, int32_t* slot_to_row, int32_t* offsets,
                       int32_t* scratch, int slots_per_thread, int ballot_match, int thread_pads) {
  return done(mk::launch_align_variant(ids, n, E, B, expert_counts, sorted, block_ids, num_post_pad, slot_to_row,
                                       offsets, scratch, nullptr, slots_per_thread, ballot_match != 0,
                                       thread_pads != 0));
}

int simt_gather_rows(const void* src, void* dst, const int32_t* sorted_slots, int64_t n, int top_k,
                     int64_t row_bytes) {
  return done(mk::launch_gather_rows(src, dst, sorted_slots, n, top_k, row_bytes, nullptr));
}

int simt_unpermute(const void* expert_output, int dtype, const int32_t* slot_to_row, const float* weights, int64_t M,
                   int top_k, int64_t H, int64_t num_rows, void* out) {
  return done(mk::launch_unpermute(expert_output, static_cast<mk::DType>(dtype), slot_to_row, weights, M, top_k, H,
                                   num_rows, out, nullptr));
}

int simt_gatelog_snapshot(int32_t* counts, int32_t* host_counts, int64_t n_counts, int32_t* sample,
                          int32_t* host_sample, int64_t n_sample, int64_t* host_mark, int64_t mark) {
  return done(mk::launch_gatelog_snapshot(counts, host_counts, n_counts, sample, host_sample, n_sample, host_mark,
                                          mark, nullptr));
}

}  // extern "C"
