// torch.ops.moekern.*: op schemas, argument checks, dtype mapping and stream lookup for the torch-free
// launchers and formatters in csrc/routing, csrc/dispatch and csrc/gatelog. The only file in csrc/ that
// includes torch.
//
// Schemas are registered in every build. A device build (MOEKERN_WITH_DEVICE, set by setup.py for
// CUDA/HIP) implements the ops for CUDA tensors (ROCm tensors use the same dispatch key). Every build
// registers a CPU kernel that raises a clear error, so a CPU-only build or CPU tensors never reach a
// launcher; the gate log's host-side ops are the exception: their CPU kernels work (the snapshot
// synchronously; gatelog_format formats host memory in every build). Fake (meta) implementations live in
// Python (moekern/routing/cuda_topk.py, moekern/dispatch/cuda_ops.py) so the ops trace under torch.compile.

#include <Python.h>
#include <torch/library.h>
#include <ATen/ATen.h>

#include <algorithm>
#include <cstring>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "dispatch/align_plan.h"
#include "gatelog/format.h"

#ifdef MOEKERN_WITH_DEVICE
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include "dispatch/dispatch.h"
#include "dispatch/route_align.h"
#include "gatelog/snapshot.h"
#include "routing/fused_topk.h"
#endif

namespace {

using Tensor = at::Tensor;
using Tensor3 = std::tuple<Tensor, Tensor, Tensor>;
using Tensor4 = std::tuple<Tensor, Tensor, Tensor, Tensor>;
using Tensor6 = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;

// The plan moe_align and permute launch by for num_slots slots and num_experts experts: [slots per thread,
// chunks, pads by thread (1) or by warp (0) at block_size] (dispatch/align_plan.h), host arithmetic only, so CPU
// tests read the table.
std::vector<int64_t> align_plan(int64_t num_slots, int64_t num_experts, int64_t block_size) {
  TORCH_CHECK(num_slots >= 0, "num_slots=", num_slots, " must be >= 0");
  TORCH_CHECK(num_experts >= 1 && num_experts <= 512, "num_experts=", num_experts, " must be in [1, 512]");
  TORCH_CHECK(block_size >= 1, "block_size=", block_size, " must be >= 1");
  const mk::AlignPlan p = mk::align_default_plan(num_slots, static_cast<int>(num_experts));
  return {p.ipt, p.chunks, mk::align_default_thread_pads(num_slots, num_experts, block_size) ? 1 : 0};
}

bool has_device_kernels() {
#ifdef MOEKERN_WITH_DEVICE
  return true;
#else
  return false;
#endif
}

[[noreturn]] void no_cpu_kernel(const char* op) {
#ifdef MOEKERN_WITH_DEVICE
  TORCH_CHECK(false, "moekern::", op, " runs on CUDA/HIP tensors; got CPU tensors (use backend='torch' on CPU)");
#else
  TORCH_CHECK(false, "moekern::", op,
              " is not available: moekern._C was built without device kernels (CPU-only build: torch had no "
              "CUDA/ROCm, or no nvcc/hipcc was found); rebuild with `pip install --no-build-isolation -e .` on a "
              "GPU machine, or use backend='torch' / 'triton'");
#endif
}

Tensor3 fused_topk_cpu(const Tensor&, int64_t, int64_t, bool, const std::optional<Tensor>&, int64_t, int64_t,
                       double) {
  no_cpu_kernel("fused_topk");
}
Tensor6 route_and_align_cpu(const Tensor&, int64_t, int64_t, bool, const std::optional<Tensor>&, int64_t, int64_t,
                            double, int64_t, bool) {
  no_cpu_kernel("route_and_align");
}
Tensor3 fused_topk_variant_cpu(const Tensor&, int64_t, int64_t, bool, const std::optional<Tensor>&, int64_t, int64_t,
                               double, int64_t) {
  no_cpu_kernel("fused_topk_variant");
}
Tensor3 moe_align_cpu(const Tensor&, int64_t, int64_t, const std::optional<Tensor>&) { no_cpu_kernel("moe_align"); }
Tensor3 moe_align_variant_cpu(const Tensor&, int64_t, int64_t, const std::optional<Tensor>&, int64_t, bool, bool) {
  no_cpu_kernel("moe_align_variant");
}
Tensor4 permute_cpu(const Tensor&, const Tensor&, int64_t, const std::optional<Tensor>&) {
  no_cpu_kernel("permute");
}
Tensor unpermute_cpu(const Tensor&, const Tensor&, const Tensor&) { no_cpu_kernel("unpermute"); }

#ifdef MOEKERN_WITH_DEVICE

void check_launch(mk::Error err, const char* op) {
  TORCH_CHECK(err == mk::kSuccess, "moekern::", op, ": kernel launch failed: ", mk::error_string(err));
}

mk::DType to_mk_dtype(const Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return mk::DType::kFloat32;
    case at::kHalf: return mk::DType::kFloat16;
    case at::kBFloat16: return mk::DType::kBFloat16;
    default: TORCH_CHECK(false, name, " must be float32, float16 or bfloat16; got ", t.scalar_type());
  }
}

void check_cuda(const Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA/HIP tensor; got device=", t.device());
}

void check_same_device(const Tensor& t, const Tensor& ref, const char* name, const char* ref_name) {
  TORCH_CHECK(t.device() == ref.device(), name, " is on ", t.device(), " but ", ref_name, " is on ", ref.device());
}

// topk_ids [M, k] of any integer dtype -> contiguous int32 (the routing kernel already gives int32).
Tensor ids_as_int32(const Tensor& topk_ids) {
  TORCH_CHECK(topk_ids.dim() == 2, "topk_ids must be 2-D [M, k]; got shape ", topk_ids.sizes());
  TORCH_CHECK(!at::isFloatingType(topk_ids.scalar_type()) && topk_ids.scalar_type() != at::kBool,
              "topk_ids must be an integer tensor; got ", topk_ids.scalar_type());
  return topk_ids.to(at::kInt).contiguous();
}

const int32_t* optional_counts(const std::optional<Tensor>& expert_counts, const Tensor& ids, int64_t E,
                               Tensor& holder) {
  if (!expert_counts.has_value()) return nullptr;
  const Tensor& c = *expert_counts;
  check_same_device(c, ids, "expert_counts", "topk_ids");
  TORCH_CHECK(c.dim() == 1 && c.size(0) == E, "expert_counts must have shape (", E, ",); got ", c.sizes());
  TORCH_CHECK(!at::isFloatingType(c.scalar_type()), "expert_counts must be an integer tensor; got ", c.scalar_type());
  holder = c.to(at::kInt).contiguous();
  return holder.data_ptr<int32_t>();
}

void check_num_experts(int64_t E) {
  TORCH_CHECK(E >= 1 && E <= mk::kDispatchMaxExperts, "num_experts=", E, " must be in [1, ",
              mk::kDispatchMaxExperts, "]");
}

struct RoutingInputs {
  Tensor logits, bias;  // contiguous
  const float* bias_ptr;
  mk::DType dtype;
  int64_t M, E;
};

// The checks every routing op makes before any kernel runs (moekern.fused_topk checked them in Python first).
RoutingInputs check_routing(const Tensor& logits_in, int64_t top_k, int64_t scoring,
                            const std::optional<Tensor>& bias_in, int64_t num_groups, int64_t topk_group) {
  check_cuda(logits_in, "logits");
  TORCH_CHECK(logits_in.dim() == 2, "logits must be 2-D [M, E]; got shape ", logits_in.sizes());
  RoutingInputs r;
  r.dtype = to_mk_dtype(logits_in, "logits");
  r.M = logits_in.size(0);
  r.E = logits_in.size(1);
  const int64_t E = r.E;
  TORCH_CHECK(E >= 1 && E <= mk::kTopkMaxExperts, "num_experts=", E, " must be in [1, ", mk::kTopkMaxExperts,
              "] for the cuda backend");
  TORCH_CHECK(top_k >= 1 && top_k <= std::min<int64_t>(E, mk::kTopkMaxK), "top_k=", top_k,
              " must be in [1, min(num_experts=", E, ", ", mk::kTopkMaxK, ")]");
  TORCH_CHECK(scoring == 0 || scoring == 1, "scoring=", scoring, " must be 0 (softmax) or 1 (sigmoid)");
  TORCH_CHECK(num_groups >= 0, "num_groups=", num_groups, " must be >= 0 (0 or 1: no grouping)");
  if (num_groups > 1) {
    TORCH_CHECK(E % num_groups == 0, "num_groups=", num_groups, " must divide num_experts=", E);
    TORCH_CHECK(topk_group >= 1 && topk_group <= num_groups, "topk_group=", topk_group, " must be in [1, num_groups=",
                num_groups, "]");
    TORCH_CHECK(top_k <= topk_group * (E / num_groups), "top_k=", top_k, " must be <= the ",
                topk_group * (E / num_groups), " selectable experts of topk_group=", topk_group, " groups");
  }
  r.logits = logits_in.contiguous();
  r.bias_ptr = nullptr;
  if (bias_in.has_value()) {
    TORCH_CHECK(scoring == 1, "bias (correction_bias) is defined for sigmoid scoring only; got scoring=", scoring);
    check_same_device(*bias_in, r.logits, "bias", "logits");
    TORCH_CHECK(bias_in->dim() == 1 && bias_in->size(0) == E, "bias must have shape (", E, ",); got ",
                bias_in->sizes());
    TORCH_CHECK(bias_in->scalar_type() == at::kFloat, "bias must be float32; got ", bias_in->scalar_type());
    r.bias = bias_in->contiguous();
    r.bias_ptr = r.bias.data_ptr<float>();
  }
  return r;
}

Tensor3 fused_topk_variant_cuda(const Tensor& logits_in, int64_t top_k, int64_t scoring, bool renormalize,
                                const std::optional<Tensor>& bias_in, int64_t num_groups, int64_t topk_group,
                                double scale, int64_t variant) {
  TORCH_CHECK(variant >= mk::kTopkAuto && variant <= mk::kTopkLastVariant, "variant=", variant,
              " must be 0 (auto), 1 (legacy), 2 (single block), 3 (multi block), 4 (compact), 5 (redux), "
              "6 (redux single block), 7 (redux multi block) or 8 (redux multi block, atomic counts)");
  const RoutingInputs r = check_routing(logits_in, top_k, scoring, bias_in, num_groups, topk_group);
  const c10::cuda::OptionalCUDAGuard guard(r.logits.device());
  const auto i32 = r.logits.options().dtype(at::kInt);
  Tensor weights = at::empty({r.M, top_k}, r.logits.options().dtype(at::kFloat));
  Tensor ids = at::empty({r.M, top_k}, i32);
  Tensor counts = at::empty({r.E}, i32);
  check_launch(mk::launch_fused_topk(r.logits.data_ptr(), r.dtype, r.M, static_cast<int>(r.E), static_cast<int>(top_k),
                                     static_cast<int>(scoring), renormalize, r.bias_ptr, static_cast<int>(num_groups),
                                     static_cast<int>(topk_group), static_cast<float>(scale),
                                     weights.data_ptr<float>(), ids.data_ptr<int32_t>(), counts.data_ptr<int32_t>(),
                                     c10::cuda::getCurrentCUDAStream().stream(), static_cast<int>(variant)),
               "fused_topk");
  return {weights, ids, counts};
}

Tensor3 fused_topk_cuda(const Tensor& logits, int64_t top_k, int64_t scoring, bool renormalize,
                        const std::optional<Tensor>& bias, int64_t num_groups, int64_t topk_group, double scale) {
  return fused_topk_variant_cuda(logits, top_k, scoring, renormalize, bias, num_groups, topk_group, scale,
                                 mk::kTopkAuto);
}

Tensor3 moe_align_variant_cuda(const Tensor& topk_ids, int64_t num_experts, int64_t block_size,
                               const std::optional<Tensor>& expert_counts, int64_t slots_per_thread,
                               bool ballot_match, bool thread_pads) {
  check_cuda(topk_ids, "topk_ids");
  check_num_experts(num_experts);
  TORCH_CHECK(block_size >= 1, "block_size=", block_size, " must be >= 1");
  TORCH_CHECK(slots_per_thread == 0 || slots_per_thread == 1 || slots_per_thread == 2 || slots_per_thread == 4 ||
                  slots_per_thread == 8 || slots_per_thread == 16,
              "slots_per_thread=", slots_per_thread, " must be 0 (the default plan), 1, 2, 4, 8 or 16");
  TORCH_CHECK(!(ballot_match && thread_pads), "ballot_match and thread_pads are separate variants: set one");
  const Tensor ids = ids_as_int32(topk_ids);
  const int64_t n = ids.numel(), E = num_experts;
  const int64_t max_padded = mk::align_max_padded(n, E, block_size);
  TORCH_CHECK(max_padded < (int64_t{1} << 31), "M*k + min(M*k, num_experts)*(block_size-1) = ", max_padded,
              " must be < 2^31");
  const int64_t max_blocks = (max_padded + block_size - 1) / block_size;
  const c10::cuda::OptionalCUDAGuard guard(ids.device());
  Tensor counts_holder;
  const int32_t* counts = optional_counts(expert_counts, ids, E, counts_holder);
  const auto i32 = ids.options().dtype(at::kInt);
  Tensor sorted = at::empty({max_padded}, i32);
  Tensor block_ids = at::empty({max_blocks}, i32);
  Tensor post_pad = at::empty({1}, i32);
  const int spt = static_cast<int>(slots_per_thread);
  const int64_t scratch_elems = mk::align_scratch_elems(n, static_cast<int>(E), spt);
  Tensor scratch = at::empty({scratch_elems}, i32);
  check_launch(mk::launch_align_variant(ids.data_ptr<int32_t>(), n, static_cast<int>(E), static_cast<int>(block_size),
                                        counts, sorted.data_ptr<int32_t>(), block_ids.data_ptr<int32_t>(),
                                        post_pad.data_ptr<int32_t>(), nullptr, nullptr,
                                        scratch_elems ? scratch.data_ptr<int32_t>() : nullptr,
                                        c10::cuda::getCurrentCUDAStream().stream(), spt, ballot_match, thread_pads),
               "moe_align");
  return {sorted, block_ids, post_pad};
}

Tensor3 moe_align_cuda(const Tensor& topk_ids, int64_t num_experts, int64_t block_size,
                       const std::optional<Tensor>& expert_counts) {
  return moe_align_variant_cuda(topk_ids, num_experts, block_size, expert_counts, 0, false,
                                mk::align_default_thread_pads(topk_ids.numel(), num_experts, block_size));
}

// fused_topk followed by moe_align(ids, E, block_size, counts): one launch while the tokens fit one block or a grid
// whose blocks are all resident (dispatch/route_align.cu), else those two ops as they are. two_kernels = true forces the two (benchmarks, tests).
Tensor6 route_and_align_cuda(const Tensor& logits_in, int64_t top_k, int64_t scoring, bool renormalize,
                             const std::optional<Tensor>& bias_in, int64_t num_groups, int64_t topk_group, double scale,
                             int64_t block_size, bool two_kernels) {
  if (!two_kernels) {
    const RoutingInputs r = check_routing(logits_in, top_k, scoring, bias_in, num_groups, topk_group);
    TORCH_CHECK(block_size >= 1, "block_size=", block_size, " must be >= 1");
    const int64_t E = r.E;
    const int64_t max_padded = mk::align_max_padded(r.M * top_k, E, block_size);
    TORCH_CHECK(max_padded < (int64_t{1} << 31), "M*k + min(M*k, num_experts)*(block_size-1) = ", max_padded,
                " must be < 2^31");
    const int64_t max_blocks = (max_padded + block_size - 1) / block_size;
    const c10::cuda::OptionalCUDAGuard guard(r.logits.device());
    const auto i32 = r.logits.options().dtype(at::kInt);
    Tensor weights = at::empty({r.M, top_k}, r.logits.options().dtype(at::kFloat));
    Tensor ids = at::empty({r.M, top_k}, i32);
    Tensor counts = at::empty({E}, i32);
    Tensor sorted = at::empty({max_padded}, i32);
    Tensor block_ids = at::empty({max_blocks}, i32);
    Tensor post_pad = at::empty({1}, i32);
    const int64_t scratch_elems = mk::route_align_scratch_elems(r.M, static_cast<int>(E));
    Tensor scratch = at::empty({scratch_elems}, i32);
    bool unsupported = true;
    check_launch(mk::launch_route_align(r.logits.data_ptr(), r.dtype, r.M, static_cast<int>(E), static_cast<int>(top_k),
                                        static_cast<int>(scoring), renormalize, r.bias_ptr, static_cast<int>(num_groups),
                                        static_cast<int>(topk_group), static_cast<float>(scale),
                                        weights.data_ptr<float>(), ids.data_ptr<int32_t>(), counts.data_ptr<int32_t>(),
                                        static_cast<int>(block_size), sorted.data_ptr<int32_t>(),
                                        block_ids.data_ptr<int32_t>(), post_pad.data_ptr<int32_t>(),
                                        scratch_elems > 0 ? scratch.data_ptr<int32_t>() : nullptr,
                                        c10::cuda::getCurrentCUDAStream().stream(), &unsupported),
                 "route_and_align");
    if (!unsupported) return {weights, ids, counts, sorted, block_ids, post_pad};
  }
  auto [weights, ids, counts] =
      fused_topk_cuda(logits_in, top_k, scoring, renormalize, bias_in, num_groups, topk_group, scale);
  auto [sorted, block_ids, post_pad] = moe_align_cuda(ids, logits_in.size(1), block_size, counts);
  return {weights, ids, counts, sorted, block_ids, post_pad};
}

Tensor4 permute_cuda(const Tensor& hidden_in, const Tensor& topk_ids, int64_t num_experts,
                     const std::optional<Tensor>& expert_counts) {
  check_cuda(hidden_in, "hidden");
  check_cuda(topk_ids, "topk_ids");
  check_same_device(topk_ids, hidden_in, "topk_ids", "hidden");
  check_num_experts(num_experts);
  TORCH_CHECK(hidden_in.dim() == 2, "hidden must be 2-D [M, H]; got shape ", hidden_in.sizes());
  const Tensor ids = ids_as_int32(topk_ids);
  TORCH_CHECK(ids.size(0) == hidden_in.size(0), "topk_ids has ", ids.size(0), " rows but hidden has ",
              hidden_in.size(0));
  const int64_t k = ids.size(1), n = ids.numel(), E = num_experts, H = hidden_in.size(1);
  TORCH_CHECK(n < (int64_t{1} << 31), "M*k=", n, " must be < 2^31");
  TORCH_CHECK(k >= 1 || n == 0, "topk_ids must have at least one column; got shape ", topk_ids.sizes());
  const Tensor hidden = hidden_in.contiguous();
  const c10::cuda::OptionalCUDAGuard guard(hidden.device());
  Tensor counts_holder;
  const int32_t* counts = optional_counts(expert_counts, ids, E, counts_holder);
  const auto i32 = ids.options().dtype(at::kInt);
  Tensor permuted = at::empty({n, H}, hidden.options());
  Tensor sorted_slots = at::empty({n}, i32);
  Tensor slot_to_row = at::empty({n}, i32);
  Tensor offsets = at::empty({E + 1}, i32);
  const int64_t scratch_elems = mk::align_scratch_elems(n, static_cast<int>(E));
  Tensor scratch = at::empty({scratch_elems}, i32);
  const auto stream = c10::cuda::getCurrentCUDAStream().stream();
  check_launch(mk::launch_align(ids.data_ptr<int32_t>(), n, static_cast<int>(E), 1, counts,
                                sorted_slots.data_ptr<int32_t>(), nullptr, nullptr, slot_to_row.data_ptr<int32_t>(),
                                offsets.data_ptr<int32_t>(), scratch_elems ? scratch.data_ptr<int32_t>() : nullptr,
                                stream),
               "permute");
  if (k >= 1)
    check_launch(mk::launch_gather_rows(hidden.data_ptr(), permuted.data_ptr(), sorted_slots.data_ptr<int32_t>(), n,
                                        static_cast<int>(k), H * static_cast<int64_t>(hidden.element_size()), stream),
                 "permute");
  return {permuted, sorted_slots, slot_to_row, offsets};
}

Tensor unpermute_cuda(const Tensor& expert_output_in, const Tensor& slot_to_row_in, const Tensor& topk_weights_in) {
  check_cuda(expert_output_in, "expert_output");
  check_same_device(slot_to_row_in, expert_output_in, "slot_to_row", "expert_output");
  check_same_device(topk_weights_in, expert_output_in, "topk_weights", "expert_output");
  TORCH_CHECK(expert_output_in.dim() == 2, "expert_output must be 2-D [M*k, H]; got shape ", expert_output_in.sizes());
  const mk::DType dtype = to_mk_dtype(expert_output_in, "expert_output");
  TORCH_CHECK(topk_weights_in.dim() == 2, "topk_weights must be 2-D [M, k]; got shape ", topk_weights_in.sizes());
  TORCH_CHECK(at::isFloatingType(topk_weights_in.scalar_type()), "topk_weights must be floating point; got ",
              topk_weights_in.scalar_type());
  const int64_t M = topk_weights_in.size(0), k = topk_weights_in.size(1), H = expert_output_in.size(1);
  TORCH_CHECK(slot_to_row_in.dim() == 1 && slot_to_row_in.size(0) == M * k, "slot_to_row must have shape (", M * k,
              ",) = M*k for topk_weights of shape ", topk_weights_in.sizes(), "; got ", slot_to_row_in.sizes());
  TORCH_CHECK(k >= 1 || M == 0, "topk_weights must have at least one column; got shape ", topk_weights_in.sizes());
  const Tensor expert_output = expert_output_in.contiguous();
  const Tensor slot_to_row = slot_to_row_in.to(at::kInt).contiguous();
  const Tensor weights = topk_weights_in.to(at::kFloat).contiguous();
  const c10::cuda::OptionalCUDAGuard guard(expert_output.device());
  Tensor out = at::empty({M, H}, expert_output.options());
  if (M > 0 && k > 0)
    check_launch(mk::launch_unpermute(expert_output.data_ptr(), dtype, slot_to_row.data_ptr<int32_t>(),
                                      weights.data_ptr<float>(), M, static_cast<int>(k), H, expert_output.size(0),
                                      out.data_ptr(), c10::cuda::getCurrentCUDAStream().stream()),
                 "unpermute");
  return out;
}


// ---- gate log: the per-step hand-off (moekern/gatelog/writer.py) -----------------------------------------
void check_snapshot_args(const Tensor& counts, const Tensor& host_counts, const Tensor& host_mark,
                         const std::optional<Tensor>& sample, const std::optional<Tensor>& host_sample);

void gatelog_snapshot_cuda(const Tensor& counts, const Tensor& host_counts, const Tensor& host_mark, int64_t mark,
                           const std::optional<Tensor>& sample, const std::optional<Tensor>& host_sample) {
  check_snapshot_args(counts, host_counts, host_mark, sample, host_sample);
  TORCH_CHECK(counts.is_cuda() && !host_counts.is_cuda() && !host_mark.is_cuda(),
              "gatelog_snapshot: counts on the device, host_counts and host_mark in (pinned) host memory");
  TORCH_CHECK(!sample.has_value() || sample->device() == counts.device(), "gatelog_snapshot: sample must be on ",
              counts.device());
  const c10::cuda::OptionalCUDAGuard guard(counts.device());
  check_launch(mk::launch_gatelog_snapshot(
                   counts.data_ptr<int32_t>(), host_counts.data_ptr<int32_t>(), counts.numel(),
                   sample.has_value() ? sample->data_ptr<int32_t>() : nullptr,
                   host_sample.has_value() ? host_sample->data_ptr<int32_t>() : nullptr,
                   sample.has_value() ? sample->numel() : 0, host_mark.data_ptr<int64_t>(), mark,
                   c10::cuda::getCurrentCUDAStream().stream()),
               "gatelog_snapshot");
}
#endif  // MOEKERN_WITH_DEVICE

void check_snapshot_args(const Tensor& counts, const Tensor& host_counts, const Tensor& host_mark,
                         const std::optional<Tensor>& sample, const std::optional<Tensor>& host_sample) {
  TORCH_CHECK(counts.scalar_type() == at::kInt && host_counts.scalar_type() == at::kInt,
              "gatelog_snapshot: counts and host_counts must be int32");
  TORCH_CHECK(counts.is_contiguous() && host_counts.is_contiguous() && counts.numel() == host_counts.numel(),
              "gatelog_snapshot: counts ", counts.sizes(), " and host_counts ", host_counts.sizes(),
              " must be contiguous with equal numel");
  TORCH_CHECK(host_mark.scalar_type() == at::kLong && host_mark.numel() == 1, "gatelog_snapshot: host_mark must be "
              "one int64");
  TORCH_CHECK(!host_sample.has_value() || sample.has_value(), "gatelog_snapshot: host_sample without sample");
  if (sample.has_value()) {
    TORCH_CHECK(sample->scalar_type() == at::kInt && sample->is_contiguous(), "gatelog_snapshot: sample must be "
                "contiguous int32");
    if (host_sample.has_value())
      TORCH_CHECK(host_sample->scalar_type() == at::kInt && host_sample->is_contiguous() &&
                      host_sample->numel() == sample->numel(),
                  "gatelog_snapshot: host_sample ", host_sample->sizes(), " must match sample ", sample->sizes());
  }
}

// The same hand-off for CPU tensors (synchronous), and the one-time check that the device can write a host
// tensor directly (its pointer is pinned and mapped under unified addressing).
void gatelog_snapshot_cpu(const Tensor& counts, const Tensor& host_counts, const Tensor& host_mark, int64_t mark,
                          const std::optional<Tensor>& sample, const std::optional<Tensor>& host_sample) {
  check_snapshot_args(counts, host_counts, host_mark, sample, host_sample);
  host_counts.view({-1}).copy_(counts.view({-1}));
  counts.zero_();
  if (sample.has_value()) {
    if (host_sample.has_value()) host_sample->view({-1}).copy_(sample->view({-1}));
    sample->fill_(-1);
  }
  host_mark.fill_(mark);
}

// One step's gate-log JSON lines (csrc/gatelog/format.cpp), as a uint8 host tensor. torch.ops calls run
// with the GIL released, so the writer thread's formatting does not compete with the thread running the model.
Tensor gatelog_format(const Tensor& counts_in, c10::IntArrayRef num_experts, c10::IntArrayRef top_k,
                      const std::string& head, const std::string& mid, const std::string& phase,
                      const std::string& tail, const std::string& model, const std::string& extra,
                      const std::optional<Tensor>& sample_in, int64_t max_rows) {
  TORCH_CHECK(!counts_in.is_cuda() && counts_in.scalar_type() == at::kInt && counts_in.dim() == 2,
              "gatelog_format: counts must be a 2-D int32 host tensor; got ", counts_in.sizes(), " ",
              counts_in.scalar_type(), " on ", counts_in.device());
  const int64_t L = counts_in.size(0), W = counts_in.size(1);
  TORCH_CHECK(static_cast<int64_t>(num_experts.size()) == L && static_cast<int64_t>(top_k.size()) == L,
              "gatelog_format: ", L, " rows but ", num_experts.size(), " num_experts and ", top_k.size(), " top_k");
  const Tensor counts = counts_in.contiguous();
  Tensor sample;
  int64_t N = 0, K = 0;
  if (sample_in.has_value()) {
    sample = sample_in->contiguous();
    TORCH_CHECK(!sample.is_cuda() && sample.scalar_type() == at::kInt && sample.dim() == 3 && sample.size(0) == L,
                "gatelog_format: sample must be a [", L, ", N, K] int32 host tensor; got ", sample.sizes(), " ",
                sample.scalar_type(), " on ", sample.device());
    N = sample.size(1);
    K = sample.size(2);
  }
  for (int64_t i = 0; i < L; ++i) {
    TORCH_CHECK(num_experts[i] >= 1 && num_experts[i] <= W && top_k[i] >= 1, "gatelog_format: layer ", i,
                ": num_experts=", num_experts[i], " must be in [1, ", W, "] (the row width) and top_k=", top_k[i],
                " >= 1");
    TORCH_CHECK(!sample.defined() || top_k[i] <= K, "gatelog_format: layer ", i, ": top_k=", top_k[i],
                " > the sample's ", K, " ids per row");
  }
  std::string out;
  mk::format_gatelog_step(counts.data_ptr<int32_t>(), L, W, num_experts.data(), top_k.data(),
                          mk::GatelogPieces{head, mid, phase, tail, model, extra},
                          sample.defined() ? sample.data_ptr<int32_t>() : nullptr, N, K, max_rows, out);
  Tensor bytes = at::empty({static_cast<int64_t>(out.size())}, counts.options().dtype(at::kByte));
  if (!out.empty()) std::memcpy(bytes.data_ptr<uint8_t>(), out.data(), out.size());
  return bytes;
}

bool gatelog_host_mapped(const Tensor& host) {
#ifdef MOEKERN_WITH_DEVICE
  return host.numel() > 0 && mk::host_ptr_is_device_ptr(host.data_ptr());
#else
  (void)host;
  return false;
#endif
}

}  // namespace

TORCH_LIBRARY(moekern, m) {
  m.def("has_device_kernels() -> bool", &has_device_kernels);
  m.def("align_plan(int num_slots, int num_experts, int block_size=16) -> int[]", &align_plan);
  m.def(
      "fused_topk(Tensor logits, int top_k, int scoring, bool renormalize, Tensor? bias, int num_groups, "
      "int topk_group, float scale) -> (Tensor weights, Tensor ids, Tensor counts)");
  // Internal: fused_topk with the kernel path forced (0 auto, 1 v1, 2 single block, 3 multi block, 4 compact,
  // 5-7 the reduction-selection kernel: auto grid, one block, ticket grid),
  // so tests and benchmarks/routing_variants.py can check and time every path in one run.
  m.def(
      "fused_topk_variant(Tensor logits, int top_k, int scoring, bool renormalize, Tensor? bias, int num_groups, "
      "int topk_group, float scale, int variant) -> (Tensor weights, Tensor ids, Tensor counts)");
  // fused_topk + moe_align(ids, E, block_size, counts) in one launch where the tokens fit one block;
  // two_kernels=True forces the two launches (for comparison).
  m.def(
      "route_and_align(Tensor logits, int top_k, int scoring, bool renormalize, Tensor? bias, int num_groups, "
      "int topk_group, float scale, int block_size, bool two_kernels=False) -> (Tensor weights, Tensor ids, "
      "Tensor counts, Tensor sorted_token_ids, Tensor block_expert_ids, Tensor num_tokens_post_padded)");
  m.def(
      "moe_align(Tensor topk_ids, int num_experts, int block_size, Tensor? expert_counts) -> "
      "(Tensor sorted_token_ids, Tensor block_expert_ids, Tensor num_tokens_post_padded)");
  // Internal: moe_align with its plan forced (slots_per_thread 0 = the default plan, else 1/2/4/8/16: chunks of
  // 512 x that many slots; ballot_match: rank equal experts by ballots instead of the hardware match;
  // thread_pads: one thread per expert writes its pads and block experts), so tests and
  // benchmarks/align_variants.py --plans can check and time every plan in one run.
  m.def(
      "moe_align_variant(Tensor topk_ids, int num_experts, int block_size, Tensor? expert_counts, "
      "int slots_per_thread, bool ballot_match, bool thread_pads=False) -> "
      "(Tensor sorted_token_ids, Tensor block_expert_ids, Tensor num_tokens_post_padded)");
  m.def(
      "permute(Tensor hidden, Tensor topk_ids, int num_experts, Tensor? expert_counts) -> "
      "(Tensor permuted, Tensor sorted_slots, Tensor slot_to_row, Tensor expert_offsets)");
  m.def("unpermute(Tensor expert_output, Tensor slot_to_row, Tensor topk_weights) -> Tensor");
  // The gate log's per-step hand-off (moekern/gatelog/writer.py): counts -> host, reset, publish mark.
  m.def(
      "gatelog_snapshot(Tensor(a!) counts, Tensor(b!) host_counts, Tensor(c!) host_mark, int mark, "
      "Tensor(d!)? sample, Tensor(e!)? host_sample) -> ()");
  m.def("gatelog_host_mapped(Tensor host) -> bool");
  m.def(
      "gatelog_format(Tensor counts, int[] num_experts, int[] top_k, str head, str mid, str phase, str tail, "
      "str model, str extra, Tensor? sample=None, int max_rows=-1) -> Tensor");
}

TORCH_LIBRARY_IMPL(moekern, CPU, m) {
  m.impl("fused_topk", &fused_topk_cpu);
  m.impl("fused_topk_variant", &fused_topk_variant_cpu);
  m.impl("moe_align", &moe_align_cpu);
  m.impl("moe_align_variant", &moe_align_variant_cpu);
  m.impl("route_and_align", &route_and_align_cpu);
  m.impl("permute", &permute_cpu);
  m.impl("unpermute", &unpermute_cpu);
  m.impl("gatelog_snapshot", &gatelog_snapshot_cpu);
  m.impl("gatelog_host_mapped", &gatelog_host_mapped);
  m.impl("gatelog_format", &gatelog_format);
}

#ifdef MOEKERN_WITH_DEVICE
TORCH_LIBRARY_IMPL(moekern, CUDA, m) {
  m.impl("fused_topk", &fused_topk_cuda);
  m.impl("fused_topk_variant", &fused_topk_variant_cuda);
  m.impl("moe_align", &moe_align_cuda);
  m.impl("moe_align_variant", &moe_align_variant_cuda);
  m.impl("route_and_align", &route_and_align_cuda);
  m.impl("permute", &permute_cuda);
  m.impl("unpermute", &unpermute_cuda);
  m.impl("gatelog_snapshot", &gatelog_snapshot_cuda);
}
#endif

// `import moekern._C` loads this library, whose static initializers register the ops above.
extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "moekern custom ops (torch.ops.moekern)", -1,
                                          nullptr};
  return PyModule_Create(&module_def);
}
