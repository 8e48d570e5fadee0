"""Gate logs: how many tokens each expert received, per MoE layer, per forward step.

Schema "moekern.gatelog/1", JSON Lines, one file per rank (`gate_log.rank{R}.jsonl`), one record per
(step, layer):

    {"schema": "moekern.gatelog/1", "step": 12, "layer": 3, "rank": 0, "num_tokens": 256,
     "phase": "decode", "top_k": 8, "expert_counts": [31, 0, 17, ...], "time": 1763900000.25}

- step: forward-step index on that rank (0-based, increasing); layer: MoE layer index (0-based, in model
  order, counting MoE layers only); rank: global rank of the writer (EP/TP/DP rank in `extra` if known).
- num_tokens: tokens in the step's batch; sum(expert_counts) == num_tokens * top_k.
- phase: "prefill" | "decode" | "mixed" | "diffusion" | "unknown".
- optional: "time" (unix seconds when the step was drained), "model" (str), "extra" (dict),
  "topk_sample" (list of per-token id lists, a rate-limited sample for co-activation studies).

Readers skip lines that do not parse or do not match the schema (including records whose counts break
sum(expert_counts) == num_tokens * top_k), and report them (path, line, reason): SkippedLine.
This module is stdlib + numpy only: the analysis reads it without torch, vLLM or a GPU.
"""

from __future__ import annotations

import gzip
import json
import operator
import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

SCHEMA = "moekern.gatelog/1"
PHASES = ("prefill", "decode", "mixed", "diffusion", "unknown")


@dataclass(frozen=True)
class LinePieces:
    """The JSON text around the per-layer values of a record line: what the records of one step share.

    A line is `{head}{layer}{mid}{num_tokens}{phase}{top_k},"expert_counts":[c0,c1,...]{tail}{model}`
    `[,"topk_sample":[[ids],...]]{extra}}` (see `format_line`); moekern._C's gatelog_format
    (csrc/gatelog/format.cpp) joins the same pieces the same way.
    """

    head: str  # '{"schema":"moekern.gatelog/1","step":12,"layer":'
    mid: str  # ',"rank":0,"num_tokens":'
    phase: str  # ',"phase":"decode","top_k":'
    tail: str  # ',"time":1763900000.25', or "" without a time
    model: str  # ',"model":"..."', or "" without a model
    extra: str  # ',"extra":{...}', or "" without extras


def _dumps(value) -> str:
    return json.dumps(value, separators=(",", ":"))


def line_pieces(step: int, *, rank: int = 0, phase: str = "unknown", time: float | None = None,
                model: str | None = None, extra: dict | None = None) -> LinePieces:
    """The pieces of the lines of step `step` (see LinePieces). Integers are written as ints (numpy ints
    too; a float is a TypeError, not a line the reader would reject)."""
    return LinePieces(
        head=f'{{"schema":{_dumps(SCHEMA)},"step":{operator.index(step)},"layer":',
        mid=f',"rank":{operator.index(rank)},"num_tokens":',
        phase=f',"phase":{_dumps(phase)},"top_k":',
        tail=f',"time":{_dumps(time)}' if time is not None else "",
        model=f',"model":{_dumps(model)}' if model is not None else "",
        extra=f',"extra":{_dumps(extra)}' if extra else "",
    )


def format_line(pieces: LinePieces, layer: int, num_tokens: int, top_k: int | None, expert_counts,
                topk_sample: list[list[int]] | None = None) -> str:
    """One record as its JSON line (no newline): THE serializer of moekern.gatelog/1. `expert_counts` are
    ints (Python's or numpy's: written with str, the writer's hot path; GateRecord.to_json converts its own
    first). `topk_sample` None leaves the key out."""
    k = "null" if top_k is None else operator.index(top_k)
    sample = f',"topk_sample":{_dumps(topk_sample)}' if topk_sample is not None else ""
    return (f'{pieces.head}{operator.index(layer)}{pieces.mid}{operator.index(num_tokens)}{pieces.phase}{k}'
            f',"expert_counts":[{",".join(map(str, expert_counts))}]'
            f'{pieces.tail}{pieces.model}{sample}{pieces.extra}}}')


@dataclass
class GateRecord:
    step: int
    layer: int
    expert_counts: list[int]
    num_tokens: int
    rank: int = 0
    phase: str = "unknown"
    top_k: int | None = None
    time: float | None = None
    model: str | None = None
    extra: dict = field(default_factory=dict)
    topk_sample: list[list[int]] | None = None

    def to_json(self) -> str:
        pieces = line_pieces(self.step, rank=self.rank, phase=self.phase, time=self.time, model=self.model,
                             extra=self.extra)
        return format_line(pieces, self.layer, self.num_tokens, self.top_k, [int(c) for c in self.expert_counts],
                           self.topk_sample)


@dataclass
class SkippedLine:
    path: str
    line: int
    reason: str


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def parse_record(text: str) -> GateRecord:
    """Parse one JSONL line; raise ValueError saying what is wrong: not the schema, a field of the wrong
    type or sign, or counts that break sum(expert_counts) == num_tokens * top_k (checked when top_k is
    given)."""
    obj = json.loads(text)
    if not isinstance(obj, dict):
        raise ValueError("not a JSON object")
    if obj.get("schema") != SCHEMA:
        raise ValueError(f"schema={obj.get('schema')!r}, expected {SCHEMA!r}")
    for key in ("step", "layer", "num_tokens"):
        if not _is_int(obj.get(key)) or obj[key] < 0:
            raise ValueError(f"{key} must be a non-negative int; got {obj.get(key)!r}")
    counts = obj.get("expert_counts")
    if not isinstance(counts, list) or not counts or not all(_is_int(c) and c >= 0 for c in counts):
        raise ValueError("expert_counts must be a non-empty list of non-negative ints")
    top_k = obj.get("top_k")
    if top_k is not None and (not _is_int(top_k) or top_k < 1):
        raise ValueError(f"top_k must be a positive int (or absent); got {top_k!r}")
    if top_k is not None and sum(counts) != obj["num_tokens"] * top_k:
        raise ValueError(f"schema invariant broken: sum(expert_counts)={sum(counts)} != num_tokens*top_k="
                         f"{obj['num_tokens']}*{top_k}={obj['num_tokens'] * top_k}")
    phase = obj.get("phase", "unknown")
    if phase not in PHASES:
        raise ValueError(f"phase={phase!r} must be one of {PHASES}")
    return GateRecord(step=obj["step"], layer=obj["layer"], expert_counts=counts, num_tokens=obj["num_tokens"],
                      rank=int(obj.get("rank", 0)), phase=phase, top_k=top_k, time=obj.get("time"),
                      model=obj.get("model"), extra=obj.get("extra") or {}, topk_sample=obj.get("topk_sample"))


def gate_log_files(path: str | os.PathLike) -> list[Path]:
    """The JSONL gate-log files under `path` (a file, or a directory searched for gate_log*.jsonl and, for
    archived logs, gate_log*.jsonl.gz)."""
    p = Path(path)
    if p.is_file():
        return [p]
    if p.is_dir():
        return sorted([*p.rglob("gate_log*.jsonl"), *p.rglob("gate_log*.jsonl.gz")])
    raise FileNotFoundError(f"gate log path {str(p)!r} does not exist")


def _open_text(f: Path):
    if f.suffix == ".gz":
        return gzip.open(f, "rt", encoding="utf-8", errors="replace")
    return open(f, encoding="utf-8", errors="replace")


def iter_records(path: str | os.PathLike, skipped: list[SkippedLine] | None = None) -> Iterator[GateRecord]:
    """Yield the records of every gate-log file under `path` (plain or gzip'd); bad lines go to `skipped` (if
    given), and so does the cut-off end of a truncated .gz file."""
    for f in gate_log_files(path):
        i = 0
        with _open_text(f) as fh:
            try:
                for i, line in enumerate(fh, 1):
                    if not line.strip():
                        continue
                    try:
                        yield parse_record(line)
                    except (ValueError, json.JSONDecodeError) as exc:
                        if skipped is not None:
                            skipped.append(SkippedLine(str(f), i, str(exc)))
            except (EOFError, gzip.BadGzipFile, zlib.error) as exc:  # a .gz cut off or damaged mid-stream
                if skipped is not None:
                    skipped.append(SkippedLine(str(f), i + 1, f"unreadable from here on: {exc}"))


def read_gate_log(path: str | os.PathLike) -> tuple[list[GateRecord], list[SkippedLine]]:
    """All records under `path` and the lines skipped as corrupt."""
    skipped: list[SkippedLine] = []
    return list(iter_records(path, skipped)), skipped


def write_records(path: str | os.PathLike, records: Iterable[GateRecord]) -> None:
    """Append records to a JSONL file (synchronous; the vLLM plugin has its own background writer)."""
    with open(path, "a", encoding="utf-8") as fh:
        for r in records:
            fh.write(r.to_json() + "\n")
