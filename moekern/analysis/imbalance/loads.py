"""Expert loads read from gate logs into a `LoadTable`: one row per (run, step), runs kept apart, ranks
combined once per run. The metrics over a table live in `metrics.py`.

Runs and ranks (`load_table`, `load_runs`): each folder of gate-log files is one run; records are keyed by
(run, rank, step, layer), so a parent folder holding several runs (`gates_logs_01/`, `gates_logs_02/`, ...)
never lets one run's step overwrite another's. `load_table` pools the runs (every row knows its run),
`load_runs` keeps one table per run (`moekern metrics --per-run`). Ranks of one run are combined as decided
once per run from their metadata: tensor-parallel replicas (same dp_rank) count once, data-parallel ranks
are summed (`_rank_groups`; `combine_ranks="sum" | "dedupe"` overrides).

Inputs: gate logs (moekern.gatelog/1 JSONL, one file per rank), or a directory of per-step JSON files
(`*.json`), each `{"step": s, "layers": {"0": [counts...], "1": [...]}, "num_tokens": n}` (num_tokens
optional: sum(counts of the first layer with valid counts) / top_k when "top_k" is given, else that sum).
One row per step: a second file with the same "step" is skipped and listed, the first in name order kept.

numpy only; no torch, no vLLM.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from moekern.errors import UsageError

DEFAULT_MAX_TOKENS = 1000


@dataclass
class LoadTable:
    """Expert loads of one run or of several runs pooled: `counts: [S, L, E]` float64, `present: [S, L]` bool
    (False where a record was missing or corrupt), `steps: [S]` step ids, `num_tokens: [S]` tokens per step,
    `phases: [S]` str, `runs: [S]` str (the run each row belongs to; empty for a table built from an array).
    Rows are ordered by run, then step; a step id repeats across runs, a row never mixes two runs.
    `rank_combine`: how the ranks' records of one (run, step, layer) became one row, per run."""

    counts: np.ndarray
    present: np.ndarray
    steps: np.ndarray
    num_tokens: np.ndarray
    phases: list[str] = field(default_factory=list)
    skipped: list = field(default_factory=list)  # gatelog.SkippedLine or (path, reason)
    source: str = ""
    runs: list[str] = field(default_factory=list)
    rank_combine: dict[str, str] = field(default_factory=dict)

    @property
    def num_steps(self) -> int:
        return int(self.counts.shape[0])

    @property
    def num_layers(self) -> int:
        return int(self.counts.shape[1])

    @property
    def num_experts(self) -> int:
        return int(self.counts.shape[2])

    @property
    def run_names(self) -> list[str]:
        """The runs in this table, in row order (one unnamed run `[""]` for a table built from an array)."""
        return list(dict.fromkeys(self.runs)) if self.runs else [""]

    def step_mask(self, max_tokens: int | None = DEFAULT_MAX_TOKENS) -> np.ndarray:
        """[S] bool: steps kept by the warm-up filter (num_tokens <= max_tokens; None keeps all)."""
        if max_tokens is None:
            return np.ones(self.num_steps, dtype=bool)
        return self.num_tokens <= max_tokens

    def select(self, mask: np.ndarray) -> "LoadTable":
        """The steps where `mask: [S] bool` holds."""
        mask = np.asarray(mask, dtype=bool)
        pick = lambda xs: [x for x, m in zip(xs, mask) if m] if xs else []  # noqa: E731
        return LoadTable(self.counts[mask], self.present[mask], self.steps[mask], self.num_tokens[mask],
                         pick(self.phases), self.skipped, self.source, pick(self.runs), self.rank_combine)


COMBINE_RANKS = ("auto", "sum", "dedupe")


def _run_name(root: Path, f: Path) -> str:
    """A gate-log file's run: its folder relative to the folder read (`root`); files directly in `root` belong
    to the run named after `root` itself."""
    rel = f.parent.relative_to(root)
    return rel.as_posix() if rel.parts else (root.resolve().name or str(root))


def _read_runs(p: Path) -> tuple[dict[str, list], list]:
    """{run: [GateRecord]} and the skipped lines of every gate-log file under `p` (see `_run_name`)."""
    from moekern import gatelog

    root = p if p.is_dir() else p.parent
    runs: dict[str, list] = {}
    skipped: list = []
    for f in gatelog.gate_log_files(p):
        recs, bad = gatelog.read_gate_log(f)
        runs.setdefault(_run_name(root, f), []).extend(recs)
        skipped.extend(bad)
    return runs, skipped


def _rank_groups(records: list, combine_ranks: str) -> tuple[dict[int, int], str]:
    """How one run's ranks combine, decided once for the run: {rank: replica group} (ranks of one group log
    the same batch and count once, the lowest rank's record kept; groups are summed) and a description.

    auto: from the records' `extra` (the vLLM plugin writes dp_rank / tp_rank / ep_rank where that group has
    more than one rank). Ranks with the same dp_rank route the same batch (tensor- or expert-parallel shards
    of one data-parallel replica each log the full routing): one group per dp_rank. With tp_rank or ep_rank
    but no dp_rank, every rank is a replica of one batch: one group. With no metadata at all, the ranks are
    replicas only if their records are identical on every (step, layer) they share; otherwise they are
    summed. Never decided per (step, layer): two data-parallel ranks whose loads happen to match in one step
    still both count there."""
    ranks = sorted({r.rank for r in records})
    if combine_ranks == "sum" or len(ranks) == 1:
        return {k: k for k in ranks}, ("1 rank" if len(ranks) == 1 else f"sum of {len(ranks)} ranks (--combine-ranks sum)")
    if combine_ranks == "dedupe":
        return {k: 0 for k in ranks}, f"one copy of {len(ranks)} ranks (--combine-ranks dedupe)"
    meta: dict[int, dict] = {}
    for r in records:
        meta.setdefault(r.rank, r.extra or {})
    if any("dp_rank" in m for m in meta.values()):
        groups = {k: int(meta[k].get("dp_rank", 0)) for k in ranks}
        n = len(set(groups.values()))
        return groups, (f"sum over {n} data-parallel rank(s), one copy of the "
                        f"{len(ranks) // max(n, 1)} replica(s) of each (extra.dp_rank)" if n < len(ranks)
                        else f"sum of {len(ranks)} data-parallel ranks (extra.dp_rank)")
    if any("tp_rank" in m or "ep_rank" in m for m in meta.values()):
        return {k: 0 for k in ranks}, f"one copy of {len(ranks)} tensor/expert-parallel replicas (extra.tp_rank/ep_rank)"
    by_key: dict[tuple[int, int], dict[int, list]] = {}
    for r in records:
        by_key.setdefault((r.step, r.layer), {}).setdefault(r.rank, r.expert_counts)
    shared = [v for v in by_key.values() if len(v) > 1]
    same = bool(shared) and all(all(c == next(iter(v.values())) for c in v.values()) for v in shared)
    if same:
        return {k: 0 for k in ranks}, (f"one copy of {len(ranks)} ranks (no rank metadata; their records are "
                                       f"identical on all {len(shared)} shared (step, layer))")
    return {k: k for k in ranks}, f"sum of {len(ranks)} ranks (no rank metadata; their records differ)"


def load_table(path: str | os.PathLike, combine_ranks: str = "auto", phase: str | None = None,
               time_window: tuple[float, float] | None = None, *, cache: dict | None = None) -> LoadTable:
    """Read expert loads from gate logs (a JSONL file, or a folder searched recursively for gate_log*.jsonl)
    or from per-step JSON files (see module docstring). Corrupt lines/files are skipped and listed in
    `.skipped`.

    Runs: each folder holding gate-log files is one run (a parent folder with one sub-folder per dataset or
    server run holds several). Records are keyed by (run, rank, step, layer): a step of one run never
    overwrites or merges with the same step of another. Several runs are POOLED into one table, rows ordered
    by run then step (`.runs` names each row's run); `load_runs` gives one table per run instead. A second
    record for the same (run, rank, step, layer) is skipped and listed.

    combine_ranks (several ranks logging the same (run, step, layer)): "auto" decides once per run from the
    ranks' metadata (see `_rank_groups`: tensor-parallel replicas count once, data-parallel ranks are
    summed); "sum" always sums; "dedupe" keeps the lowest rank's record. `.rank_combine` says, per run, what
    was done. `phase` keeps only records of that phase.
    `time_window=(start, end)` (unix seconds, inclusive) keeps only gate-log records whose `time` lies in it
    (records without a time are dropped): one bench's steps out of a log a server wrote over many benches.
    `cache` (a dict the caller keeps): the parsed log of each path is read once and reused, e.g. by the many
    benches of one server's grid that window the same log.
    """
    return pool_runs(load_runs(path, combine_ranks, phase, time_window, cache=cache), str(path))


def load_runs(path: str | os.PathLike, combine_ranks: str = "auto", phase: str | None = None,
              time_window: tuple[float, float] | None = None, *, cache: dict | None = None) -> dict[str, LoadTable]:
    """{run: LoadTable} of the gate logs (or per-step JSON folders) under `path`, one table per run (see
    `load_table` for runs and the arguments). Every table lists all skipped lines of the read."""
    from moekern import gatelog

    if combine_ranks == "first":  # the earlier name of "dedupe"
        combine_ranks = "dedupe"
    if combine_ranks not in COMBINE_RANKS:
        raise UsageError(f"combine_ranks={combine_ranks!r} must be one of {', '.join(COMBINE_RANKS)}")
    p = Path(path)
    if not p.exists():
        raise UsageError(f"gate-log path {str(p)!r} does not exist")
    if p.is_dir() and not gatelog.gate_log_files(p):
        step_dirs = sorted({f.parent for f in p.rglob("*.json") if not f.name.endswith(".meta.json")})
        if step_dirs:
            out, bad = {}, []
            for d in step_dirs:
                run = _run_name(p, d / "x")
                try:
                    t = _load_step_json_dir(d)
                except UsageError as exc:  # a folder of other JSON (results, metadata) among the runs
                    bad.append((str(d), str(exc)))
                    continue
                t.runs, t.rank_combine = [run] * t.num_steps, {run: "per-step JSON: one record per step"}
                out[run] = t
            if not out:
                raise UsageError(f"no gate-log files and no valid per-step JSON under {str(p)!r}: {bad[0][1]}")
            for t in out.values():
                t.skipped = [*t.skipped, *bad]
            return out
    if cache is None:
        runs, skipped = _read_runs(p)
    else:
        key = str(p.resolve())
        if key not in cache:
            cache[key] = _read_runs(p)
        runs, skipped = cache[key][0], list(cache[key][1])
    if phase is not None:
        runs = {k: [r for r in v if r.phase == phase] for k, v in runs.items()}
    if time_window is not None:
        lo, hi = float(time_window[0]), float(time_window[1])
        runs = {k: [r for r in v if r.time is not None and lo <= r.time <= hi] for k, v in runs.items()}
    runs = {k: v for k, v in runs.items() if v}
    if not runs:
        raise UsageError(f"no valid gate-log records under {str(p)!r}" + (f" with phase={phase!r}" if phase else "")
                         + (f" in the time window {tuple(time_window)}" if time_window is not None else "")
                         + f" ({len(skipped)} lines skipped)")
    e = max(len(r.expert_counts) for v in runs.values() for r in v)
    out = {}
    for run, records in runs.items():
        keep = []
        for r in records:
            if len(r.expert_counts) != e:
                skipped.append(gatelog.SkippedLine(str(p), -1, f"run {run} rank {r.rank} step {r.step} layer "
                                                   f"{r.layer}: {len(r.expert_counts)} experts, expected {e}"))
            else:
                keep.append(r)
        if keep:
            out[run] = _table_of_run(run, keep, e, combine_ranks, skipped, str(p))
    for t in out.values():
        t.skipped = skipped
    return out


def _table_of_run(run: str, records: list, e: int, combine_ranks: str, skipped: list, source: str) -> LoadTable:
    from moekern import gatelog

    groups, how = _rank_groups(records, combine_ranks)
    # (step, layer) -> group -> (rank, record): the lowest rank of each replica group
    by_key: dict[tuple[int, int], dict[int, tuple[int, object]]] = {}
    seen: set[tuple[int, int, int]] = set()
    for r in records:
        if (r.rank, r.step, r.layer) in seen:
            skipped.append(gatelog.SkippedLine(source, -1, f"run {run} rank {r.rank} step {r.step} layer {r.layer}: "
                                               "a second record for it (the first is kept)"))
            continue
        seen.add((r.rank, r.step, r.layer))
        slot = by_key.setdefault((r.step, r.layer), {})
        g = groups[r.rank]
        if g not in slot or r.rank < slot[g][0]:
            slot[g] = (r.rank, r)
    steps = sorted({k[0] for k in by_key})
    layers = sorted({k[1] for k in by_key})
    s_idx = {s: i for i, s in enumerate(steps)}
    l_idx = {l: i for i, l in enumerate(layers)}
    counts = np.zeros((len(steps), len(layers), e))
    present = np.zeros((len(steps), len(layers)), dtype=bool)
    num_tokens = np.zeros(len(steps))
    phases = ["unknown"] * len(steps)
    for (s, l), per_group in by_key.items():
        recs = [per_group[g][1] for g in sorted(per_group)]
        i, j = s_idx[s], l_idx[l]
        counts[i, j] = np.sum([np.asarray(r.expert_counts, dtype=np.float64) for r in recs], axis=0)
        present[i, j] = True
        num_tokens[i] = max(num_tokens[i], sum(r.num_tokens for r in recs))
        phases[i] = recs[0].phase
    return LoadTable(counts, present, np.asarray(steps), num_tokens, phases, skipped, source,
                     [run] * len(steps), {run: how})


def pool_runs(runs: dict[str, LoadTable], source: str) -> LoadTable:
    """One table of several runs' rows (layers aligned by position; E equal, as load_runs ensures)."""
    tables = list(runs.values())
    if len(tables) == 1:
        t = tables[0]
        t.source = source
        return t
    if len({t.num_experts for t in tables}) > 1:
        raise UsageError(f"the runs under {source!r} have different expert counts ("
                         + ", ".join(f"{k}: {t.num_experts}" for k, t in runs.items())
                         + "); read them one at a time or per run (--per-run)")
    l = max(t.num_layers for t in tables)
    e = max(t.num_experts for t in tables)

    def pad(t):
        c = np.zeros((t.num_steps, l, e))
        c[:, :t.num_layers, :t.num_experts] = t.counts
        pr = np.zeros((t.num_steps, l), dtype=bool)
        pr[:, :t.num_layers] = t.present
        return c, pr

    padded = [pad(t) for t in tables]
    return LoadTable(np.concatenate([c for c, _ in padded]), np.concatenate([pr for _, pr in padded]),
                     np.concatenate([t.steps for t in tables]), np.concatenate([t.num_tokens for t in tables]),
                     [ph for t in tables for ph in (t.phases or ["unknown"] * t.num_steps)], tables[0].skipped,
                     source, [r for name, t in runs.items() for r in ([name] * t.num_steps)],
                     {k: v for t in tables for k, v in t.rank_combine.items()})


def _load_step_json_dir(p: Path) -> LoadTable:
    rows, skipped = [], []
    first_file: dict[int, Path] = {}  # step -> the file that gave it: a step is one row, as in a gate log
    for f in sorted(p.glob("*.json")):
        try:
            obj = json.loads(f.read_text(encoding="utf-8"))
            layers = {int(k): [float(x) for x in v] for k, v in obj["layers"].items()}
            if not layers:
                raise ValueError("no layers")
            step = int(obj["step"])
        except (ValueError, KeyError, TypeError, AttributeError, json.JSONDecodeError) as exc:
            skipped.append((str(f), f"{type(exc).__name__}: {exc}"))
            continue
        if step in first_file:
            skipped.append((str(f), f"a second file for step {step} (the first, {str(first_file[step])!r}, is kept)"))
            continue
        first_file[step] = f
        rows.append((step, layers, obj.get("num_tokens"), obj.get("top_k"), obj.get("phase")))
    if not rows:
        raise UsageError(f"no valid per-step JSON files under {str(p)!r} ({len(skipped)} skipped)")
    e = max(len(v) for _, layers, *_ in rows for v in layers.values())
    layer_ids = sorted({l for _, layers, *_ in rows for l in layers})
    l_idx = {l: i for i, l in enumerate(layer_ids)}
    rows.sort(key=lambda r: r[0])
    counts = np.zeros((len(rows), len(layer_ids), e))
    present = np.zeros((len(rows), len(layer_ids)), dtype=bool)
    num_tokens = np.zeros(len(rows))
    for i, (step, layers, nt, top_k, _) in enumerate(rows):
        for l, v in layers.items():
            if len(v) != e or any(x < 0 for x in v):
                why = f"len {len(v)}, expected {e}" if len(v) != e else f"negative: {min(v):g}"
                skipped.append((f"step {step}", f"layer {l}: bad counts ({why})"))
                continue
            counts[i, l_idx[l]] = v
            present[i, l_idx[l]] = True
        # every layer routes the step's tokens: the first layer whose counts are valid (0 when none is)
        valid = np.flatnonzero(present[i])
        first = counts[i, valid[0]].sum() if valid.size else 0.0
        num_tokens[i] = float(nt) if nt is not None else (first / top_k if top_k else first)
    return LoadTable(counts, present, np.asarray([r[0] for r in rows]), num_tokens,
                     [r[4] or "unknown" for r in rows], skipped, str(p))
