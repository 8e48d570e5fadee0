// The gate log's JSON lines, built in C++ for the writer thread (torch-free; algorithm in format.cpp).
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

namespace mk {

// The JSON text around a record's per-layer values, shared by the lines of one step; made by
// moekern.gatelog.schema.line_pieces (json.dumps of the schema, phase, time, model and extra). Views: the
// strings they point at outlive the call.
struct GatelogPieces {
  std::string_view head;   // {"schema":"moekern.gatelog/1","step":S,"layer":
  std::string_view mid;    // ,"rank":R,"num_tokens":
  std::string_view phase;  // ,"phase":"...","top_k":
  std::string_view tail;   // ,"time":T   or empty
  std::string_view model;  // ,"model":"..."   or empty
  std::string_view extra;  // ,"extra":{...}   or empty
};

// Appends one step's newline-terminated lines to `out`, one per layer i < num_layers:
//   {head}{i}{mid}{floor(sum(row_i[:E_i]) / k_i)}{phase}{k_i},"expert_counts":[row_i[0],...,row_i[E_i-1]]
//   {tail}{model}[,"topk_sample":[[ids],...]]{extra}}
// byte for byte what moekern.gatelog.writer.step_lines gives (moekern.gatelog.schema.format_line per line).
//   counts: [num_layers, row_width] int32, row-major; num_experts[i] (E_i) in [1, row_width], top_k[i] (k_i) >= 1
//   sample: [num_layers, sample_rows, sample_width] int32 top-k ids, or nullptr (no "topk_sample" key); with a
//     sample, k_i <= sample_width. Layer i's sample rows are their first k_i ids; a row with an id < 0
//     (unfilled, or CUDA-graph padding) is left out; at most max_rows rows are kept (max_rows < 0: all);
//     no row kept, no "topk_sample" key.
// The caller checks those bounds (csrc/bindings.cpp); sums are int64, so no int32 row overflows.
void format_gatelog_step(const int32_t* counts, int64_t num_layers, int64_t row_width, const int64_t* num_experts,
                         const int64_t* top_k, const GatelogPieces& pieces, const int32_t* sample,
                         int64_t sample_rows, int64_t sample_width, int64_t max_rows, std::string& out);

}  // namespace mk
