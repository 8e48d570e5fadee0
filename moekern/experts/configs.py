"""Tile configurations for the two grouped GEMMs of moekern.fused_moe.

GEMM1 (gate-up, SiLU-and-mul fused): per program a [block_m, block_n] tile of the intermediate, which reads
  2 * block_n rows of w13 (block_n gate rows and the matching block_n up rows); N = I, K = H.
GEMM2 (down, routing weight fused): per program a [block_m, block_n] tile of the per-slot output; N = H, K = I.

block_m is shared by both GEMMs: it is the padding unit of moekern.align, so one alignment serves both.

A BlockConfig also selects the kernel variant (see triton_gemm.py): split_k (gemm1: K shares into fp32 partials
that gemm2 reduces with SiLU-and-mul as it loads them), fuse_silu (gemm1: fused gate+up+SiLU
with two accumulators, or one accumulator over 2I columns + a SiLU-and-mul kernel), persistent (programs
per SM of a persistent grid; 0 = one program per tile), tma (weights through TMA descriptors). So a table
row can pick a variant per shape, and benchmarks/moe_variants.py A/Bs them without code edits.

A config is picked in this order: the `block_config` argument, then the tuned table keyed on
(E, I, H, M bucket) for Hopper, then `default_configs`, a heuristic on tokens per expert. The table is data,
tiles/sm90.json beside this file (H100 and H200 are both sm_90 with the same SM count and shared memory per
SM, so one file serves both; its "meta" says which GPU measured it, with which torch and triton), read and
validated once per process (tuned_table; read_tiles, tiles_json and TileRow describe the format: one row per
(E, I, H, M) with its gemm1/gemm2 BlockConfig fields, the model's name and a note on where the row comes
from). It holds measured rows only: `python benchmarks/tune_moe_shapes.py --out DIR` times candidates on a
GPU, `python benchmarks/tune_moe.py apply DIR/tune_moe_shapes.json` merges the winners into the JSON (a
winner must be 2 % faster than today's pick; merge_tuned). A call uses the row of the bucket nearest its M
in log2 (tuned_bucket).

MOEKERN_MOE_CONFIGS=RESULTS.json[:MORE.json...] lays the winners of benchmarks/tune_moe_shapes.py runs over the
table at run time (the merge of `python benchmarks/tune_moe.py apply`, with no minimum gain, and no edit of the
package): tune on your own GPU, point the variable at the JSON, and every process that inherits it (vLLM's
workers included) uses those rows on Hopper, as it does the table (files read once per process). A file that
cannot be read or holds a bad row raises ValueError naming it.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class BlockConfig:
    """One Triton launch shape. Block sizes are powers of two >= 16 (tl.dot's minimum)."""

    block_m: int = 16
    block_n: int = 64
    block_k: int = 64
    group_m: int = 1  # programs sharing a weight tile run together (L2 reuse) when > 1
    num_warps: int = 4
    num_stages: int = 3
    # Variants (triton_gemm.py's module doc); the defaults are the original kernel.
    fuse_silu: bool = True  # gemm1 only: False = one accumulator over 2I columns + a SiLU-and-mul kernel
    persistent: int = 0  # > 0: a grid of (SM count x persistent) programs looping over the used tiles
    tma: bool = False  # weight tiles through a Hopper TMA tensor descriptor (guarded; off by default)
    split_k: int = 1  # gemm1 only, > 1: programs per tile over K shares into fp32 partials that gemm2 reduces

    def validate(self, name: str = "block_config") -> None:
        for field_name in ("block_m", "block_n", "block_k"):
            v = getattr(self, field_name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 16 or v & (v - 1):
                raise ValueError(f"{name}.{field_name}={v!r} must be a power of two >= 16")
        if self.block_m > 256 or self.block_n > 256 or self.block_k > 256:
            raise ValueError(f"{name} block sizes must be <= 256; got {self}")
        for field_name, low in (("group_m", 1), ("num_warps", 1), ("num_stages", 1)):
            v = getattr(self, field_name)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ValueError(f"{name}.{field_name}={v!r} must be an int >= {low}")
        if self.num_warps & (self.num_warps - 1) or self.num_warps > 16:
            raise ValueError(f"{name}.num_warps={self.num_warps} must be a power of two <= 16")
        for field_name in ("fuse_silu", "tma"):
            if not isinstance(getattr(self, field_name), bool):
                raise ValueError(f"{name}.{field_name}={getattr(self, field_name)!r} must be a bool")
        if isinstance(self.persistent, bool) or not isinstance(self.persistent, int) or not 0 <= self.persistent <= 8:
            raise ValueError(f"{name}.persistent={self.persistent!r} must be an int in [0, 8] (programs per SM)")
        if self.split_k not in (1, 2, 4, 8) or isinstance(self.split_k, bool):
            raise ValueError(f"{name}.split_k={self.split_k!r} must be 1, 2, 4 or 8")
        if self.split_k > 1 and (self.fuse_silu or self.persistent or self.tma):
            raise ValueError(f"{name}.split_k={self.split_k} needs fuse_silu=False, persistent=0 and tma=False "
                             "(its partials are gate and up over 2I columns, reduced by gemm2)")


SM90_TILES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tiles", "sm90.json")
"""The Hopper table (H100 and H200: both sm_90 with the same SM count and shared memory per SM)."""

_KEY_FIELDS = ("E", "I", "H", "M")
_ROW_FIELDS = frozenset(_KEY_FIELDS + ("gemm1", "gemm2", "model", "note"))


@dataclass(frozen=True)
class TileRow:
    """One row of a tile file: the (gemm1, gemm2) pair for num_experts E, intermediate size I, hidden size H
    and the M bucket M; model names the shape for a reader, note says where the row comes from."""

    E: int
    I: int  # noqa: E741  (the I of (E, I, H), as in the tuner's result rows)
    H: int
    M: int
    gemm1: BlockConfig
    gemm2: BlockConfig
    model: str = ""
    note: str = ""

    @property
    def key(self) -> tuple[int, int, int, int]:
        return (self.E, self.I, self.H, self.M)


def _row_from_json(obj) -> TileRow:
    """A TileRow from one JSON row; ValueError saying what is wrong (the caller adds the file and the row)."""
    if not isinstance(obj, dict):
        raise ValueError(f"expected an object with {', '.join(_KEY_FIELDS)}, gemm1, gemm2; got {type(obj).__name__}")
    unknown = sorted(set(obj) - _ROW_FIELDS)
    missing = [f for f in _KEY_FIELDS + ("gemm1", "gemm2") if f not in obj]
    if unknown or missing:
        raise ValueError(f"unknown fields {unknown}, missing fields {missing}; a row holds {sorted(_ROW_FIELDS)}")
    for f in _KEY_FIELDS:
        v = obj[f]
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{f}={v!r} must be an int >= 1")
    pair = []
    for f in ("gemm1", "gemm2"):
        if not isinstance(obj[f], dict):
            raise ValueError(f"{f}={obj[f]!r} must be an object of BlockConfig fields")
        try:
            cfg = BlockConfig(**obj[f])
        except TypeError as exc:  # a field BlockConfig does not have
            names = [x.name for x in dataclasses.fields(BlockConfig)]
            raise ValueError(f"{f}: {exc}; BlockConfig fields are {names}") from None
        cfg.validate(f)
        pair.append(cfg)
    if pair[0].block_m != pair[1].block_m:
        raise ValueError(f"gemm1.block_m={pair[0].block_m} and gemm2.block_m={pair[1].block_m} must be equal "
                         "(both GEMMs share one alignment)")
    if pair[1].split_k != 1:
        raise ValueError(f"gemm2.split_k={pair[1].split_k} must be 1 (split_k is a gemm1 variant)")
    for f in ("model", "note"):
        if not isinstance(obj.get(f, ""), str):
            raise ValueError(f"{f}={obj[f]!r} must be a string")
    return TileRow(obj["E"], obj["I"], obj["H"], obj["M"], pair[0], pair[1], obj.get("model", ""),
                   obj.get("note", ""))


def read_tiles(path) -> tuple[dict, list[TileRow]]:
    """(meta, rows) of a tile file (moekern/experts/tiles/*.json): {"meta": {...}, "rows": [{"E", "I", "H", "M",
    "gemm1": {BlockConfig fields}, "gemm2": {...}, "model", "note"}, ...]}. Every row is validated
    (BlockConfig.validate, equal block_m, no (E, I, H, M) twice); ValueError naming the file and the row."""
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: cannot read the tile table: {exc}") from exc
    if not (isinstance(data, dict) and isinstance(data.get("rows"), list) and isinstance(data.get("meta", {}), dict)):
        raise ValueError(f'{path}: expected {{"meta": {{...}}, "rows": [...]}}; got {type(data).__name__}')
    rows, seen = [], {}
    for i, obj in enumerate(data["rows"]):
        key = ", ".join(f"{f}={obj[f]!r}" for f in _KEY_FIELDS if f in obj) if isinstance(obj, dict) else ""
        where = f"{path}: row {i}" + (f" ({key})" if key else "")
        try:
            row = _row_from_json(obj)
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None
        if row.key in seen:
            raise ValueError(f"{where}: (E, I, H, M)={row.key} repeats row {seen[row.key]}")
        seen[row.key] = i
        rows.append(row)
    return data.get("meta", {}), rows


def tiles_json(meta: dict, rows) -> str:
    """The text of a tile file, stable: meta as given, rows sorted by (E, I, H, M), one row over three lines
    (key, model and note; gemm1; gemm2) with every BlockConfig field spelled out. read_tiles reads it back."""
    out = ["{", ' "meta": ' + json.dumps(meta, indent=1).replace("\n", "\n ") + ",", ' "rows": [']
    ordered = sorted(rows, key=lambda r: r.key)
    for n, r in enumerate(ordered):
        head = json.dumps({"E": r.E, "I": r.I, "H": r.H, "M": r.M, "model": r.model, "note": r.note})
        out.append(f"  {head[:-1]},")
        out.append(f'   "gemm1": {json.dumps(dataclasses.asdict(r.gemm1))},')
        out.append(f'   "gemm2": {json.dumps(dataclasses.asdict(r.gemm2))}}}' + ("," if n < len(ordered) - 1 else ""))
    out += [" ]", "}"]
    return "\n".join(out) + "\n"


def table_of(rows) -> dict[tuple[int, int, int], dict[int, tuple[BlockConfig, BlockConfig]]]:
    """{(E, I, H): {M: (gemm1, gemm2)}} of tile rows: the shape get_configs looks rows up in."""
    table: dict = {}
    for r in sorted(rows, key=lambda r: r.key):
        table.setdefault((r.E, r.I, r.H), {})[r.M] = (r.gemm1, r.gemm2)
    return table


@functools.cache
def tuned_table() -> dict[tuple[int, int, int], dict[int, tuple[BlockConfig, BlockConfig]]]:
    """The Hopper table of SM90_TILES, read and validated once per process. Treat it as read-only: it is shared
    (MOEKERN_MOE_CONFIGS overlays build a new table, see table_from_files)."""
    return table_of(read_tiles(SM90_TILES)[1])


def __getattr__(name: str):
    # TUNED: the name the table had when it was a literal here; read from SM90_TILES on first use.
    if name == "TUNED":
        return tuned_table()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _next_pow2(x: int) -> int:
    return 1 << max(int(x) - 1, 0).bit_length()


def _clamp(cfg: BlockConfig, n: int, k: int) -> BlockConfig:
    """Shrink N/K tiles that exceed the (padded) problem, so tiny shapes (tests) launch small programs."""
    bn = max(16, min(cfg.block_n, _next_pow2(n)))
    bk = max(16, min(cfg.block_k, _next_pow2(k)))
    return dataclasses.replace(cfg, block_n=bn, block_k=bk)


def default_configs(
    num_tokens: int, num_experts: int, top_k: int, inter: int, hidden: int, dtype: torch.dtype
) -> tuple[BlockConfig, BlockConfig]:
    """Heuristic (gemm1, gemm2) configs for M = num_tokens.

    Decode-like calls (few tokens per expert) are bound by reading weights: a small M tile wastes little
    on padding and a long K tile keeps more bytes in flight. Prefill-like calls are compute bound: large
    M/N tiles, more warps, GROUP_M > 1 so M-blocks of one expert reuse its weight tiles from L2.
    """
    per_expert = num_tokens * top_k / max(num_experts, 1)
    if num_tokens <= 32 or per_expert <= 12:
        block_m = 16
    elif per_expert <= 24:
        block_m = 32
    elif per_expert < 96:
        block_m = 64
    else:
        block_m = 128
    # Fit to the tuned rows above (the pattern across the four models, not one model's optimum).
    group_m = 8 if per_expert >= 256 else 1
    if block_m <= 32:
        g1 = BlockConfig(block_m, 128, 128, 1, 4, 3)
        g2 = BlockConfig(block_m, 64 if block_m == 16 else 128, 128, 1, 4, 4)
    elif block_m == 64:
        g1 = BlockConfig(64, 64, 128, 1, 4, 4)
        g2 = BlockConfig(64, 128, 128, 1, 4, 4)
    else:
        g1 = BlockConfig(128, 128, 64, group_m, 8, 3)
        g2 = BlockConfig(128, 128, 64, group_m, 8, 3)
    if dtype == torch.float32:
        # fp32 tiles take twice the shared memory per stage; this path is for tests, not speed.
        g1 = BlockConfig(block_m, min(g1.block_n, 64), 32, g1.group_m, 4, 2)
        g2 = BlockConfig(block_m, min(g2.block_n, 64), 32, g2.group_m, 4, 2)
    return _clamp(g1, inter, hidden), _clamp(g2, hidden, inter)


def get_configs(
    num_tokens: int,
    num_experts: int,
    top_k: int,
    inter: int,
    hidden: int,
    dtype: torch.dtype,
    device: torch.device,
    block_config: BlockConfig | tuple[BlockConfig, BlockConfig] | None = None,
) -> tuple[BlockConfig, BlockConfig]:
    """(gemm1, gemm2) configs: the override, else the table (Hopper, bf16/fp16), else the heuristic."""
    if block_config is not None:
        if isinstance(block_config, BlockConfig):
            pair = (block_config, block_config)
        elif (
            isinstance(block_config, tuple)
            and len(block_config) == 2
            and all(isinstance(c, BlockConfig) for c in block_config)
        ):
            pair = block_config
        else:
            raise TypeError(
                "block_config must be a moekern.experts.BlockConfig or a (gemm1, gemm2) tuple of them; "
                f"got {type(block_config).__name__}"
            )
        pair[0].validate("block_config[gemm1]")
        pair[1].validate("block_config[gemm2]")
        if pair[0].block_m != pair[1].block_m:
            raise ValueError(
                f"block_config: gemm1.block_m={pair[0].block_m} and gemm2.block_m={pair[1].block_m} must be "
                "equal (both GEMMs share one alignment)"
            )
        if pair[1].split_k != 1:
            raise ValueError(f"block_config: gemm2.split_k={pair[1].split_k} must be 1 (split_k is a gemm1 variant; "
                             "pass a (gemm1, gemm2) pair)")
        return pair
    return _lookup_configs(num_tokens, num_experts, top_k, inter, hidden, dtype, device)


def tuned_bucket(rows, num_tokens: int) -> int:
    """The M bucket of one table entry ({M: pair} of one (E, I, H)) that serves num_tokens: nearest in log2; on a tie, the smaller bucket
    (so M=256 between buckets 64 and 1024 takes the 64 row: see NOTES.md, 'Mixtral M=256')."""
    log_m = math.log2(max(num_tokens, 1))
    return min(rows, key=lambda b: (abs(math.log2(b) - log_m), b))


CONFIGS_ENV = "MOEKERN_MOE_CONFIGS"


def load_results(path) -> tuple[dict, list]:
    """(the JSON's meta or {}, its rows) of a tune_moe_shapes.py result file: {"meta": ..., "rows": [...]} or
    a bare list of rows. OSError / ValueError (bad JSON, no list of rows) for the caller to report."""
    with open(path) as f:
        results = json.load(f)
    rows = results.get("rows") if isinstance(results, dict) else results
    if not isinstance(rows, list):
        raise ValueError("expected a list of rows or {'rows': [...]}")
    return (results.get("meta") or {}) if isinstance(results, dict) else {}, rows


def merge_tuned(table, rows, min_gain: float = 0.02):
    """A new table ({(E, I, H): {M: (gemm1, gemm2)}}): for each measured row whose best correct candidate beats today's pick by more
    than min_gain (fractional time), the winner becomes the row of bucket M of its (E, I, H) entry.

    rows: the "rows" of tune_moe_shapes.py's JSON: dicts with E, I, H, M, today_us and best = {gemm1: {..},
    gemm2: {..}, us: float} (BlockConfig fields); rows without a best or a today_us are skipped. Returns
    (new_table, applied) where applied lists (E, I, H, M) changed. The input table is not modified."""
    new = {key: dict(per_m) for key, per_m in table.items()}
    applied = []
    for r in rows:
        best, today = r.get("best"), r.get("today_us")
        if not best or not today or best.get("us") is None:
            continue
        if best["us"] > today * (1 - min_gain):
            continue
        g1, g2 = BlockConfig(**best["gemm1"]), BlockConfig(**best["gemm2"])
        g1.validate("best.gemm1")
        g2.validate("best.gemm2")
        if g1.block_m != g2.block_m:
            raise ValueError(f"row M={r['M']}: best.gemm1.block_m={g1.block_m} != best.gemm2.block_m={g2.block_m}")
        key = (int(r["E"]), int(r["I"]), int(r["H"]))
        new.setdefault(key, {})[int(r["M"])] = (g1, g2)
        applied.append(key + (int(r["M"]),))
    return new, applied


@functools.lru_cache(maxsize=8)
def table_from_files(paths: str) -> dict:
    """tuned_table() with the winners of tune_moe_shapes.py result files laid over it (os.pathsep-separated
    paths; later files win). Every measured winner replaces its bucket's row (no minimum gain: the file is the
    user's choice); rows without a winner are skipped. "" -> tuned_table() itself."""
    rows = read_rows(paths)
    if not rows:
        return tuned_table()
    try:
        table, _ = merge_tuned(tuned_table(), rows, min_gain=-math.inf)
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{CONFIGS_ENV}={paths!r}: bad row: {exc}") from exc
    return table


def read_rows(paths: str) -> list:
    """The rows of every tune_moe_shapes.py result file in `paths` (os.pathsep-separated), in order; ValueError
    naming the file that cannot be read."""
    rows = []
    for path in (p for p in paths.split(os.pathsep) if p):
        try:
            rows.extend(load_results(path)[1])
        except (OSError, ValueError) as exc:
            raise ValueError(f"{CONFIGS_ENV}: cannot read tuned rows from {path!r}: {exc}") from exc
    return rows


def active_table() -> dict:
    """The table fused_moe looks rows up in: tuned_table(), with MOEKERN_MOE_CONFIGS's files laid over it when set."""
    return table_from_files(os.environ.get(CONFIGS_ENV, ""))


def _lookup_configs(num_tokens, num_experts, top_k, inter, hidden, dtype, device) -> tuple[BlockConfig, BlockConfig]:
    return _lookup_in(os.environ.get(CONFIGS_ENV, ""), num_tokens, num_experts, top_k, inter, hidden, dtype, device)


@functools.lru_cache(maxsize=4096)
def _lookup_in(paths, num_tokens, num_experts, top_k, inter, hidden, dtype, device) -> tuple[BlockConfig, BlockConfig]:
    """The table, else the heuristic; cached because the lookup (a device-capability query, log2 distances)
    runs on every eager call. Keyed on the exact M (the heuristic's thresholds are in M) and the override
    files, bounded by the LRU."""
    table = table_from_files(paths)
    if (
        device.type == "cuda"
        and dtype in (torch.bfloat16, torch.float16)
        and (num_experts, inter, hidden) in table
        and torch.cuda.get_device_capability(device)[0] == 9
    ):
        return table[(num_experts, inter, hidden)][tuned_bucket(table[(num_experts, inter, hidden)], num_tokens)]
    return default_configs(num_tokens, num_experts, top_k, inter, hidden, dtype)
