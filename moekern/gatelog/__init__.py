"""Gate logs: tokens per expert, per MoE layer, per forward step (schema `moekern.gatelog/1`).

`schema` holds the record, its one serializer, the reader and a plain writer (stdlib + numpy: the analysis
reads gate logs without torch, vLLM or a GPU); `writer` holds the asynchronous recorder the vLLM plugin
runs on the model thread (torch, imported only when used).
"""

from __future__ import annotations

from moekern.gatelog.schema import (
    PHASES,
    SCHEMA,
    GateRecord,
    SkippedLine,
    gate_log_files,
    iter_records,
    parse_record,
    read_gate_log,
    write_records,
)

__all__ = ["PHASES", "SCHEMA", "GateRecord", "SkippedLine", "gate_log_files", "iter_records", "parse_record",
           "read_gate_log", "write_records"]
