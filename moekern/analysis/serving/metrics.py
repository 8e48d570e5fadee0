"""Serving metrics from `vllm bench serve --save-result` JSON files, tolerant of missing fields.

vLLM 0.26 writes (vllm/benchmarks/serve.py): "duration", "completed", "failed", "total_input_tokens",
"total_output_tokens", "request_throughput", "output_throughput", "total_token_throughput", and for each
of ttft/tpot/itl/e2el: "mean_X_ms", "median_X_ms", "std_X_ms", "pNN_X_ms" (NN from --metric-percentiles,
p99 by default), plus setup keys ("backend" = the endpoint type, "model_id", "num_prompts", ...) and every
`--metadata KEY=VALUE` as a top-level string. Input throughput is not saved; we derive
total_input_tokens / duration.

Our runs add metadata (as --metadata or merged by the runner): moe_backend (kernel backend: "moekern",
"vllm", "flashinfer", ...; falls back to "backend"), max_num_seqs, max_num_batched_tokens, eplb
(true/false), dataset, predicted_score, measured_cv, gate_log (path of the run's gate logs), synthetic, and from
the serve grid's skews routing_skew, measured_cv_step and measured_cv_agg (the prior study's two CV methods
over the bench's own gate-log window).
Strings such as "16" or "true" are converted. A missing metric is NaN, never an error.

`moekern e2e` output folders are read as they are: a `serve_{arm}.bench.json` without a
moe_backend gets moe_backend = arm, the engine settings (max_num_seqs, max_num_batched_tokens, eplb) of the
`e2e_*.json` beside it (its "meta.engine"), and the gate logs in `gate_logs/{arm}/` beside it when they exist;
the run's `extra["inferred_from"]` says so.

Bench grids (moekern e2e --concurrency-grid: many benches against one server) share one gate log per server.
Each bench's result carries `moekern.gate_log_window = [start, end]`: the runner's time.time() just before the
bench starts and just after it returns. Its measured_cv comes from the gate-log records whose `time` lies in
that window. Both clocks are the host's wall clock (time.time(): the plugin stamps a record when the engine
core queues the step's counts, the runner times the bench in another process on the same host), so no offset
applies; only this bench's requests reach the server inside its window (benches run one after another), its
4 `--num-warmups` requests of the first prompt included.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from moekern.errors import UsageError

LATENCY_METRICS = ("ttft", "tpot", "itl", "e2el")
STATS = ("mean", "median", "p99")
THROUGHPUT_KEYS = ("request_throughput", "output_throughput", "total_token_throughput")
GROUP_KEYS = ("moe_backend", "max_num_seqs", "max_num_batched_tokens", "eplb")


@dataclass
class RunResult:
    """One benchmark run: serving metrics (NaN when missing) and the run's configuration."""

    run_id: str
    metrics: dict[str, float]
    moe_backend: str = "unknown"
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    eplb: bool | None = None
    dataset: str | None = None
    predicted_score: float | None = None
    measured_cv: float | None = None
    gate_log: str | None = None
    synthetic: bool = False
    routing_skew: str | None = None  # the serve grid's skew name (moekern e2e --skews)
    measured_cv_step: float | None = None  # the prior study's per-step CV of the bench's gate-log window
    measured_cv_agg: float | None = None  # ... and its aggregated CV (moekern.e2e.cards.window_cv)
    steady_state: bool | None = None  # False: kernels JIT-compiled while it was measured (moekern e2e)
    path: str = ""
    extra: dict = field(default_factory=dict)

    def row(self) -> dict:
        d = asdict(self)
        d.pop("metrics")
        d.pop("extra")
        d.update(self.metrics)
        return d


def _num(v) -> float:
    if isinstance(v, bool) or v is None:
        return float("nan")
    try:
        x = float(v)
    except (TypeError, ValueError):
        return float("nan")
    return x


def _int(v) -> int | None:
    x = _num(v)
    return int(x) if math.isfinite(x) else None


def _bool(v) -> bool | None:
    if isinstance(v, bool):
        return v
    if isinstance(v, (int, float)):
        return bool(v)
    if isinstance(v, str) and v.strip().lower() in ("1", "true", "yes", "on"):
        return True
    if isinstance(v, str) and v.strip().lower() in ("0", "false", "no", "off"):
        return False
    return None


def _get(obj: dict, *names):
    """First present key among `names` (in priority order), each looked up in our "moekern" block, then
    "metadata", then the top level (where vLLM's own "backend" is the endpoint type, not ours)."""
    scopes = [s for s in (obj.get("moekern"), obj.get("metadata"), obj) if isinstance(s, dict)]
    for n in names:
        for scope in scopes:
            if n in scope and scope[n] is not None:
                return scope[n]
            alt = n.replace("_", "-")
            if alt in scope and scope[alt] is not None:
                return scope[alt]
    return None


def parse_bench_result(obj: dict, run_id: str = "", path: str = "") -> RunResult:
    """A RunResult from one saved bench JSON object; missing metrics become NaN."""
    if not isinstance(obj, dict):
        raise ValueError(f"bench result must be a JSON object; got {type(obj).__name__}")
    m: dict[str, float] = {}
    for name in LATENCY_METRICS:
        for st in STATS:
            m[f"{st}_{name}_ms"] = _num(obj.get(f"{st}_{name}_ms"))
    for k in THROUGHPUT_KEYS + ("duration", "completed", "failed", "total_input_tokens", "total_output_tokens"):
        m[k] = _num(obj.get(k))
    dur = m["duration"]
    m["input_throughput"] = m["total_input_tokens"] / dur if dur and math.isfinite(dur) and dur > 0 else float("nan")
    backend = _get(obj, "moe_backend", "kernel_backend", "backend")
    score = _num(_get(obj, "predicted_score"))
    cv = _num(_get(obj, "measured_cv"))
    known = {"moe_backend", "kernel_backend", "max_num_seqs", "max_num_batched_tokens", "eplb", "enable_eplb",
             "dataset", "predicted_score", "measured_cv", "gate_log", "synthetic", "routing_skew",
             "measured_cv_step", "measured_cv_agg", "steady_state"}
    cv_step, cv_agg = _num(_get(obj, "measured_cv_step")), _num(_get(obj, "measured_cv_agg"))
    skew = _get(obj, "routing_skew")
    extra = {k: v for k, v in obj.items() if k in ("model_id", "date", "num_prompts", "label") or
             (isinstance(v, str) and k not in known and k not in m)}
    return RunResult(
        run_id=run_id or str(_get(obj, "run_id") or ""), metrics=m, moe_backend=str(backend or "unknown"),
        max_num_seqs=_int(_get(obj, "max_num_seqs")),
        max_num_batched_tokens=_int(_get(obj, "max_num_batched_tokens")),
        eplb=_bool(_get(obj, "eplb", "enable_eplb")), dataset=_get(obj, "dataset"),
        predicted_score=score if math.isfinite(score) else None, measured_cv=cv if math.isfinite(cv) else None,
        gate_log=_get(obj, "gate_log"), synthetic=bool(_bool(_get(obj, "synthetic"))), path=path, extra=extra,
        routing_skew=None if skew is None else str(skew),
        measured_cv_step=cv_step if math.isfinite(cv_step) else None,
        measured_cv_agg=cv_agg if math.isfinite(cv_agg) else None,
        steady_state=_bool(_get(obj, "steady_state")))


def load_runs(results_dir: str | os.PathLike, attach_cv: bool = True,
              max_tokens: int | None = 1000) -> tuple[list[RunResult], list[tuple[str, str]]]:
    """Every bench result JSON under `results_dir` (recursively; files without any serving metric, e.g.
    metadata.json, are ignored). With `attach_cv`, a run whose `gate_log` path exists (relative to its JSON
    file or the results dir) and has no measured_cv gets the overall per-step CV of its gate logs (the
    study's headline number), computed with the `max_tokens` warm-up filter. A `moekern sweep` output folder
    (sweep_status.jsonl beside runs/) is read from runs/ only. Returns (runs, skipped [(path, reason)])."""
    root = Path(results_dir)
    if not root.is_dir():
        raise UsageError(f"results_dir={str(root)!r} is not a directory")
    runs, skipped = [], []
    logs: dict = {}  # each gate log parsed once: a server's grid shares one log among all its benches
    # A `moekern sweep` output folder: its results are runs/; work/ holds each runner's raw bench JSON again
    # (without the "moekern" block), which would count every bench twice.
    src = root / "runs" if (root / "sweep_status.jsonl").is_file() and (root / "runs").is_dir() else root
    for f in sorted(src.rglob("*.json")):
        if "gate_logs" in f.parts or f.name.endswith(".failed.json"):
            continue
        try:
            obj = json.loads(f.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError, OSError) as exc:
            skipped.append((str(f), f"unreadable JSON: {exc}"))
            continue
        if not isinstance(obj, dict) or not any(k in obj for k in THROUGHPUT_KEYS + ("mean_ttft_ms", "duration")):
            continue
        run = parse_bench_result(obj, run_id=f.stem, path=str(f))
        _infer_e2e_layout(run, obj, f)
        if attach_cv and run.measured_cv is None and run.gate_log:
            for base in (f.parent, root):
                g = base / run.gate_log
                if g.exists():
                    try:
                        from moekern.analysis.imbalance.metrics import load_table, summarize

                        window = _window(obj)
                        table = load_table(g, time_window=window, cache=logs)
                        run.measured_cv = summarize(table, max_tokens).overall["step_cv"]
                        run.gate_log = str(g)
                        if window is not None:
                            run.extra["gate_log_window"] = list(window)
                            run.extra["gate_log_steps"] = table.num_steps
                    except (ValueError, FileNotFoundError) as exc:
                        skipped.append((str(g), f"gate log unusable: {exc}"))
                    break
        runs.append(run)
    return runs, skipped


def _window(obj: dict) -> tuple[float, float] | None:
    """The bench's [start, end] unix-seconds window from its "moekern" block, or None (whole log)."""
    w = (obj.get("moekern") or {}).get("gate_log_window") if isinstance(obj.get("moekern"), dict) else None
    if isinstance(w, (list, tuple)) and len(w) == 2:
        lo, hi = _num(w[0]), _num(w[1])
        if math.isfinite(lo) and math.isfinite(hi) and lo <= hi:
            return lo, hi
    return None


def _infer_e2e_layout(run: RunResult, obj: dict, f: Path) -> None:
    """Fill what moekern e2e's serve_{arm}.bench.json leaves out (module docstring); no-op for other files."""
    m = re.fullmatch(r"serve_(.+)\.bench\.json", f.name)
    if not m or _get(obj, "moe_backend", "kernel_backend") is not None:
        return
    arm = m.group(1)
    run.moe_backend = arm
    run.run_id = f"serve_{arm}"
    src = [f"moe_backend from the file name {f.name}"]
    for e2e in sorted(f.parent.glob("e2e_*.json")):
        try:
            meta = json.loads(e2e.read_text(encoding="utf-8")).get("meta", {})
        except (json.JSONDecodeError, UnicodeDecodeError, OSError, AttributeError):
            continue
        eng = meta.get("engine") or {}
        run.max_num_seqs = run.max_num_seqs if run.max_num_seqs is not None else _int(eng.get("max_num_seqs"))
        if run.max_num_batched_tokens is None:
            run.max_num_batched_tokens = _int(eng.get("max_num_batched_tokens"))
        if run.eplb is None:
            run.eplb = _bool(eng.get("eplb"))
        for k in ("model", "load_format", "gpu", "vllm", "torch"):
            if meta.get(k) is not None:
                run.extra.setdefault(k, meta[k])
        src.append(f"engine settings from {e2e.name}")
        break
    if run.gate_log is None and (f.parent / "gate_logs" / arm).is_dir():
        run.gate_log = f"gate_logs/{arm}"
        src.append(f"gate logs from gate_logs/{arm}")
    run.extra["inferred_from"] = "; ".join(src)


def runs_dataframe(runs: list[RunResult]):
    """A pandas DataFrame, one row per run (config columns + metric columns)."""
    import pandas as pd

    return pd.DataFrame([r.row() for r in runs])


def group_runs(runs: list[RunResult], keys=GROUP_KEYS, metrics=("mean_ttft_ms", "mean_tpot_ms",
                                                                "output_throughput")):
    """Runs grouped by configuration: DataFrame with count, mean and std of each metric per group."""
    df = runs_dataframe(runs)
    if df.empty:
        return df
    keys = [k for k in keys if k in df.columns]
    g = df.fillna({k: "n/a" for k in keys}).groupby(keys, dropna=False)[list(metrics)]
    out = g.agg(["count", "mean", "std"])
    out.columns = [f"{m}_{s}" for m, s in out.columns]
    return out.reset_index()
