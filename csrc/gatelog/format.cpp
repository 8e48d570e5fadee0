// One step's gate-log JSON lines for the writer thread (moekern/gatelog/writer.py), built here rather than
// in Python: for a 58-layer, 256-expert model Python's formatting held the GIL ~1 ms per step, time the
// thread running the model waits for (with a top-k sample of 16 tokens, 1.0-1.2 ms of wall per step on an
// H100: benchmarks/results/gatelog/h100-2026-12-06-s12). The torch op that calls this (gatelog_format in
// csrc/bindings.cpp) runs with the GIL released. The text is the schema's one serializer
// (moekern.gatelog.schema.format_line) over the same pieces: the JSON-escaped strings come from Python, this
// file writes only integers, commas and brackets. One pass over the counts and the sample, one reserve.
#include "gatelog/format.h"

#include <charconv>

namespace mk {
namespace {

void append_int(std::string& out, int64_t v) {
  char buf[24];
  const auto res = std::to_chars(buf, buf + sizeof(buf), v);
  out.append(buf, res.ptr);
}

// Python's floor division (the record's num_tokens is sum // top_k; counts read back from a slot may be
// anything, negative sums included).
int64_t floor_div(int64_t a, int64_t b) {
  const int64_t q = a / b;
  return (a % b != 0 && ((a < 0) != (b < 0))) ? q - 1 : q;
}

}  // namespace

void format_gatelog_step(const int32_t* counts, int64_t num_layers, int64_t row_width, const int64_t* num_experts,
                         const int64_t* top_k, const GatelogPieces& pieces, const int32_t* sample,
                         int64_t sample_rows, int64_t sample_width, int64_t max_rows, std::string& out) {
  static const char kCounts[] = ",\"expert_counts\":[";
  static const char kSample[] = ",\"topk_sample\":[";
  const size_t fixed = pieces.head.size() + pieces.mid.size() + pieces.phase.size() + pieces.tail.size() +
                       pieces.model.size() + pieces.extra.size() + 64;
  const int64_t sample_ids = sample != nullptr ? sample_rows * sample_width : 0;
  out.reserve(out.size() + static_cast<size_t>(num_layers) * fixed +
              static_cast<size_t>(num_layers * row_width) * 5 + static_cast<size_t>(num_layers * sample_ids) * 4);
  for (int64_t i = 0; i < num_layers; ++i) {
    const int64_t E = num_experts[i], k = top_k[i];
    const int32_t* row = counts + i * row_width;
    int64_t sum = 0;
    for (int64_t j = 0; j < E; ++j) sum += row[j];
    out += pieces.head;
    append_int(out, i);
    out += pieces.mid;
    append_int(out, floor_div(sum, k));
    out += pieces.phase;
    append_int(out, k);
    out += kCounts;
    for (int64_t j = 0; j < E; ++j) {
      if (j) out += ',';
      append_int(out, row[j]);
    }
    out += ']';
    out += pieces.tail;
    out += pieces.model;
    if (sample != nullptr) {
      int64_t kept = 0;
      for (int64_t r = 0; r < sample_rows && (max_rows < 0 || kept < max_rows); ++r) {
        const int32_t* ids = sample + (i * sample_rows + r) * sample_width;
        bool filled = true;
        for (int64_t j = 0; j < k; ++j) filled = filled && ids[j] >= 0;
        if (!filled) continue;
        out += kept ? "," : kSample;
        out += '[';
        for (int64_t j = 0; j < k; ++j) {
          if (j) out += ',';
          append_int(out, ids[j]);
        }
        out += ']';
        ++kept;
      }
      if (kept) out += ']';
    }
    out += pieces.extra;
    out += "}\n";
  }
}

}  // namespace mk
