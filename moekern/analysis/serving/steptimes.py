"""Step wall times from gate logs: where an end-to-end run spends its time, by batch size.

The vLLM plugin stamps each step's records with the host time at the end of the step (`time`), so the
difference between two consecutive steps of one process is the wall time of the later step as the engine
saw it: the forward pass plus everything the host did between the two (scheduling, sampling). Grouped by
the step's scheduled tokens, two runs of the same workload (two arms of an A/B) show which batch sizes
make the difference (this is how a tile-table row that lost on decode steps of 65-128 tokens showed up).

Rules: durations are taken within one file (one process; step indices restart per file), only between
consecutive step indices (a dropped step leaves a gap) and only when at most `gap_s` apart (a longer
pause is the end of a pass, a warm-up, or the engine idling, not a step). Tokens are the scheduler's count
(`extra.scheduled_tokens`) where the record has it, else `num_tokens` (which includes CUDA-graph padding).

The recorder measures what it costs the model thread per step and writes it to its sidecar
(gate_log.rank{R}.meta.json); `recorder_cost` reads it back and the CLI prints it as a share of the
median step: the gate log's overhead, read from the logs themselves.
"""

from __future__ import annotations

import json
import math
import os
import statistics
from dataclasses import dataclass

from moekern.gatelog import SkippedLine, gate_log_files, iter_records

# upper bounds of the token buckets (a step of n tokens goes to the first bound >= n)
BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536)


@dataclass(frozen=True)
class StepTime:
    file: str
    step: int
    tokens: int
    phase: str
    seconds: float


def step_times(path: str | os.PathLike, gap_s: float = 1.0, phase: str | None = None,
               skipped: list[SkippedLine] | None = None) -> list[StepTime]:
    """Wall time of every step under `path` (a gate-log file or folder, plain or gzip'd) that has a timed
    predecessor; see the module doc for the rules. phase: keep only steps of that phase."""
    if gap_s <= 0:
        raise ValueError(f"gap_s={gap_s} must be > 0")
    out: list[StepTime] = []
    for f in gate_log_files(path):
        steps: dict[int, tuple[float, int, str]] = {}
        for r in iter_records(f, skipped):
            if r.time is None or r.step in steps:
                continue  # one record per step is enough: every layer carries the same stamp
            tokens = (r.extra or {}).get("scheduled_tokens", r.num_tokens)
            steps[r.step] = (float(r.time), int(tokens), r.phase)
        prev = None
        for s in sorted(steps):
            t, tokens, ph = steps[s]
            if prev is not None and prev[0] == s - 1 and 0 <= t - prev[1] <= gap_s and (phase is None or ph == phase):
                out.append(StepTime(str(f), s, tokens, ph, t - prev[1]))
            prev = (s, t)
    return out


def recorder_cost(path: str | os.PathLike) -> dict | None:
    """What the gate log itself cost the model thread, from the recorders' sidecars next to the logs under
    `path` (gate_log.rank{R}.meta.json; written by moekern.gatelog.writer): host us per step overall and
    by part (wall and CPU), step-weighted over files; the hand-off each used. None when no sidecar has it
    (logs from before the recorder measured itself)."""
    metas = []
    for f in gate_log_files(path):
        name = f.name
        for suffix in (".jsonl.gz", ".jsonl"):
            if name.endswith(suffix):
                side = f.with_name(name[: -len(suffix)] + ".meta.json")
                try:
                    m = json.loads(side.read_text())
                except (OSError, ValueError):
                    break
                if m.get("host_us_per_step") is not None and m.get("steps"):
                    metas.append(m)
                break
    if not metas:
        return None
    n = sum(m["steps"] for m in metas)
    split: dict[str, dict[str, float]] = {}
    for m in metas:
        for part, v in (m.get("host_split_us_per_step") or {}).items():
            acc = split.setdefault(part, {"wall": 0.0, "cpu": 0.0})
            acc["wall"] += v.get("wall", 0.0) * m["steps"] / n
            acc["cpu"] += v.get("cpu", 0.0) * m["steps"] / n
    return {"host_us_per_step": round(sum(m["host_us_per_step"] * m["steps"] for m in metas) / n, 2),
            "split_us_per_step": {p: {k: round(x, 2) for k, x in v.items()} for p, v in split.items()},
            "steps": n, "files": len(metas), "hand_off": sorted({str(m.get("snapshot") or "torch calls (before "
                                                                             "the snapshot op)") for m in metas})}


def format_cost(cost: dict, times: list[StepTime]) -> str:
    """One line: the recorder's host us per step, by part, and its share of the median timed step."""
    med = statistics.median(st.seconds for st in times) if times else None
    parts = ", ".join(f"{p} {v['wall']:.0f}" for p, v in cost["split_us_per_step"].items())
    share = f" = {cost['host_us_per_step'] / (med * 1e6):.1%} of the median step ({med * 1e3:.2f} ms)" if med else ""
    return (f"gate log's own cost on the model thread: {cost['host_us_per_step']:.0f} us/step"
            + (f" ({parts})" if parts else "") + share + f"; hand-off: {'; '.join(cost['hand_off'])}")


def bucket_of(tokens: int, buckets=BUCKETS) -> int:
    for b in buckets:
        if tokens <= b:
            return b
    return buckets[-1]


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    i = min(len(xs) - 1, max(0, math.ceil(q * len(xs)) - 1))
    return xs[i]


def summarize(times: list[StepTime], buckets=BUCKETS) -> list[dict]:
    """One row per non-empty token bucket: steps, median / mean / p90 ms, total seconds and its share of all
    timed seconds, and the phases seen. Rows in bucket order."""
    groups: dict[int, list[StepTime]] = {}
    for st in times:
        groups.setdefault(bucket_of(st.tokens, buckets), []).append(st)
    total = sum(st.seconds for st in times) or 1.0
    rows = []
    lower = 0
    for b in buckets:
        g = groups.get(b)
        if g:
            secs = [st.seconds for st in g]
            rows.append({"tokens": f"{lower + 1}-{b}", "upper": b, "steps": len(g),
                         "median_ms": 1e3 * statistics.median(secs), "mean_ms": 1e3 * statistics.fmean(secs),
                         "p90_ms": 1e3 * _pct(secs, 0.9), "total_s": sum(secs), "share": sum(secs) / total,
                         "phases": sorted({st.phase for st in g})})
        lower = b
    return rows


def compare(base: list[dict], other: list[dict]) -> list[dict]:
    """Per bucket present in both: other's median step time over base's (> 1: other is slower there) and
    the seconds other spends there beyond base's rate (steps x median difference)."""
    by = {r["upper"]: r for r in base}
    out = []
    for r in other:
        b = by.get(r["upper"])
        if b is None:
            continue
        out.append({"tokens": r["tokens"], "upper": r["upper"], "base_median_ms": b["median_ms"],
                    "median_ms": r["median_ms"], "ratio": r["median_ms"] / b["median_ms"],
                    "extra_s": r["steps"] * (r["median_ms"] - b["median_ms"]) / 1e3})
    return out


def format_table(rows: list[dict], cmp: list[dict] | None = None, label: str = "", vs_label: str = "") -> str:
    lines = [f"{label}: step wall time by scheduled tokens"]
    lines.append(f"{'tokens':>13s} {'steps':>6s} {'median':>8s} {'mean':>8s} {'p90':>8s} {'total s':>8s} "
                 f"{'share':>6s}  phases")
    for r in rows:
        lines.append(f"{r['tokens']:>13s} {r['steps']:6d} {r['median_ms']:8.2f} {r['mean_ms']:8.2f} "
                     f"{r['p90_ms']:8.2f} {r['total_s']:8.2f} {100 * r['share']:5.1f}%  {','.join(r['phases'])}")
    if cmp:
        lines.append(f"\nvs {vs_label}: median step time ratio ({label} / {vs_label}; > 1 = {label} slower)")
        lines.append(f"{'tokens':>13s} {vs_label[:10]:>10s} {label[:10]:>10s} {'ratio':>7s} {'extra s':>8s}")
        for c in cmp:
            lines.append(f"{c['tokens']:>13s} {c['base_median_ms']:10.2f} {c['median_ms']:10.2f} "
                         f"{c['ratio']:7.3f} {c['extra_s']:8.2f}")
    return "\n".join(lines)


def plot(rows: list[dict], path, label: str, vs_rows: list[dict] | None = None, vs_label: str = "") -> None:
    """Median step time per token bucket (bars), one colour per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from moekern.analysis.plotting import fig_png

    uppers = sorted({r["upper"] for r in rows} | {r["upper"] for r in vs_rows or []})
    names = {r["upper"]: r["tokens"] for r in [*rows, *(vs_rows or [])]}
    sets = [(label, {r["upper"]: r for r in rows})]
    if vs_rows is not None:
        sets.insert(0, (vs_label, {r["upper"]: r for r in vs_rows}))
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(uppers) + 2), 4))
    width = 0.8 / len(sets)
    for i, (name, by) in enumerate(sets):
        xs = [j + (i - (len(sets) - 1) / 2) * width for j in range(len(uppers))]
        ys = [by[u]["median_ms"] if u in by else 0 for u in uppers]
        bars = ax.bar(xs, ys, width, label=name)
        for bar, u in zip(bars, uppers):
            if u in by:
                ax.annotate(f"n={by[u]['steps']}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                            ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(uppers)), [names[u] for u in uppers], rotation=30)
    ax.set_xlabel("scheduled tokens in the step")
    ax.set_ylabel("median step wall time (ms)")
    ax.set_title("step wall time by batch size (gate-log time stamps)")
    ax.legend()
    fig_png(fig, path)
