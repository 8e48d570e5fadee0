"""`moekern report RESULTS_DIR`: one self-contained HTML (PNG plots embedded as base64) or Markdown report.

RESULTS_DIR holds bench result JSON files (any depth; see serving.load_runs, which also reads
`moekern e2e` output folders as they are), gate logs (those the runs point to and any other
gate_log*.jsonl under RESULTS_DIR), and optionally `metadata.json` ({"synthetic": true, "title": ...,
"description": ..., "caveats": [...], "ep_size": 4 or "ep_sizes": [2, 4, 8], "command": ...}). A run or
metadata marked synthetic puts a SYNTHETIC banner atop the report; "caveats" are printed in a box atop it.

Contents: a per-run table of serving metrics (TTFT, TPOT, ITL mean/median/p99, throughputs); serving
metrics vs max-num-seqs and vs max-num-batched-tokens per backend, and vs measured imbalance (CV) and
predicted score, with IQR (Tukey 1.5) outliers drawn as red crosses and left out of the trend lines and
statistics; for a knob grid (report/knobgrid.py) a heatmap of max-num-seqs x max-num-batched-tokens per backend,
the metrics vs each bench's measured CV by both of the prior study's methods and the CV reached per skew; per gate log: imbalance metrics overall, per phase and per layer, per-step CV over the run,
a layer x expert heatmap; per-rank load under each EP size and the placement advice; a table of findings
with 95% bootstrap CIs.

Real data is often thin, and the report says so rather than drawing or claiming what it cannot: a trend
plot needs >= 2 distinct x values (else a line says which single value there is), a scatter needs >= 3
runs, a confidence interval needs n >= MIN_N_FOR_CI runs (else "n/a" and the reason), and with single
runs per backend the backends are compared as plain numbers, labelled as such.
"""

from __future__ import annotations

import base64
import html
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from moekern.analysis.plotting import fig_png
from moekern.analysis.stats import Estimate, bootstrap_ci, bootstrap_diff, iqr_mask, spearman_ci
from moekern.errors import UsageError

PLOT_METRICS = (("mean_ttft_ms", "TTFT mean (ms)"), ("mean_tpot_ms", "TPOT mean (ms)"),
                ("output_throughput", "output throughput (tok/s)"))
MIN_N_FOR_CI = 3  # fewer runs: a bootstrap interval is degenerate ([x, x] for one run), so none is printed
MAX_GATE_LOGS = 8  # imbalance sections drawn (the least and most imbalanced heatmaps still cover all)
RUN_TABLE = (("mean_ttft_ms", "TTFT mean"), ("median_ttft_ms", "TTFT med"), ("p99_ttft_ms", "TTFT p99"),
             ("mean_tpot_ms", "TPOT mean"), ("median_tpot_ms", "TPOT med"), ("p99_tpot_ms", "TPOT p99"),
             ("mean_itl_ms", "ITL mean"), ("median_itl_ms", "ITL med"), ("p99_itl_ms", "ITL p99"),
             ("output_throughput", "out tok/s"), ("input_throughput", "in tok/s"),
             ("request_throughput", "req/s"), ("duration", "duration s"), ("completed", "done"),
             ("failed", "failed"))


@dataclass
class Report:
    title: str
    synthetic: bool
    notes: list[str] = field(default_factory=list)
    sections: list[tuple[str, list]] = field(default_factory=list)  # (heading, [("img", png) | ("table", ...)])
    findings: list[dict] = field(default_factory=list)
    caveats: list[str] = field(default_factory=list)
    command: str = ""


_png = fig_png  # figure -> PNG bytes (moekern.analysis.plotting)


def _by_backend(df):
    return sorted(df["moe_backend"].dropna().unique()) if "moe_backend" in df else []


def _metric_panels(df, x: str, xlabel: str, title: str, draw, log2_x: bool = False):
    """One panel per PLOT_METRICS entry with `x` on the horizontal axis; `draw(ax, d, metric, backend)` plots
    each backend's rows `d` that have both x and the metric. Returns the figure's PNG."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(PLOT_METRICS), figsize=(4.2 * len(PLOT_METRICS), 3.2))
    for ax, (m, label) in zip(axes, PLOT_METRICS):
        for b in _by_backend(df):
            d = df[(df.moe_backend == b) & df[x].notna() & df[m].notna()]
            if not d.empty:
                draw(ax, d, m, b)
        if log2_x:
            ax.set_xscale("log", base=2)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    return _png(fig)


def _line_plot(df, x: str, xlabel: str):
    def draw(ax, d, m, b):
        keep = iqr_mask(d[m].to_numpy())
        g = d[keep].groupby(x)[m].median()
        ax.plot(g.index, g.values, marker="o", label=b)

    return _metric_panels(df, x, xlabel, f"median over the other settings (IQR outliers excluded) vs {xlabel}", draw,
                          log2_x=True)


def _scatter_plot(df, x: str, xlabel: str):
    def draw(ax, d, m, b):
        xs, ys = d[x].to_numpy(float), d[m].to_numpy(float)
        keep = iqr_mask(ys)
        pts = ax.scatter(xs[keep], ys[keep], s=10, alpha=0.6, label=b)
        if (~keep).any():
            ax.scatter(xs[~keep], ys[~keep], s=25, marker="x", color="red")
        if keep.sum() >= 3 and np.ptp(xs[keep]) > 0:
            k, c = np.polyfit(xs[keep], ys[keep], 1)
            xx = np.linspace(xs[keep].min(), xs[keep].max(), 10)
            ax.plot(xx, k * xx + c, color=pts.get_facecolor()[0], lw=1)

    return _metric_panels(df, x, xlabel, f"vs {xlabel}; red x = IQR outlier (excluded from the fit)", draw)


def _heatmap(table, title: str):
    import matplotlib.pyplot as plt

    c = np.where(table.present[..., None], table.counts, 0.0).sum(axis=0)  # [L, E]
    share = c / np.maximum(c.sum(axis=1, keepdims=True), 1.0)
    fig, ax = plt.subplots(figsize=(min(12, 2 + 0.25 * share.shape[1]), min(8, 1.5 + 0.25 * share.shape[0])))
    im = ax.imshow(share, aspect="auto", cmap="viridis")
    ax.set_xlabel("expert")
    ax.set_ylabel("MoE layer")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, label="share of layer's tokens")
    return _png(fig)


def _rank_bars(advice, title: str):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3))
    n = len(advice.scores)
    w = 0.8 / max(n, 1)
    for i, s in enumerate(advice.scores):
        ranks = np.arange(len(s.rank_tokens))
        ax.bar(ranks + i * w, s.rank_tokens, width=w,
               label=f"{s.strategy}{'+' + str(s.num_redundant) if s.num_redundant else ''} "
                     f"(max/mean {s.test_step_max_mean:.2f})")
    ax.set_xticks(np.arange(len(advice.scores[0].rank_tokens)) + 0.4 - w / 2)
    ax.set_xticklabels([str(r) for r in range(len(advice.scores[0].rank_tokens))])
    ax.set_xlabel("EP rank")
    ax.set_ylabel("tokens (test steps, all layers)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    return _png(fig)


def _ci(values, stat, n_boot: int):
    """Bootstrap estimate of `stat` with a CI only when there are >= MIN_N_FOR_CI finite values; with fewer,
    low/high are NaN (rendered "n/a"), never a degenerate [x, x]."""
    est = bootstrap_ci(values, stat, n_boot=n_boot)
    if est.n < MIN_N_FOR_CI:
        est.low = est.high = float("nan")
    return est


def _findings(df, n_boot: int, caveat: str = "") -> list[dict]:
    rows = []
    backends = _by_backend(df)
    for b in backends:
        d = df[df.moe_backend == b]
        for m, label in PLOT_METRICS:
            v = d[m].to_numpy(float)
            keep = iqr_mask(v)
            est = _ci(v[keep], np.median, n_boot)
            n_out = int((~keep & np.isfinite(v)).sum())
            note = (f"{n_out} IQR outlier(s) excluded" if est.n >= MIN_N_FOR_CI else
                    f"n={est.n} run(s): no interval (needs >= {MIN_N_FOR_CI} runs)")
            what = f"median of {est.n} runs" if est.n > 1 else "one run"
            rows.append({"finding": f"{b}: {label}, {what}", "estimate": est, "note": note})
        if "measured_cv" in d and d["measured_cv"].notna().sum() >= 3:
            for m, label in PLOT_METRICS[:2]:
                x, y = d["measured_cv"].to_numpy(float), d[m].to_numpy(float)
                keep = iqr_mask(y)
                rows.append({"finding": f"{b}: Spearman(measured CV, {label})",
                             "estimate": spearman_ci(x[keep], y[keep], n_boot=n_boot), "note": "rank correlation"})
        if "eplb" in d and d["eplb"].notna().any():
            on = d[d.eplb == True]["mean_tpot_ms"].to_numpy(float)  # noqa: E712 (pandas object column)
            off = d[d.eplb == False]["mean_tpot_ms"].to_numpy(float)  # noqa: E712
            if on.size and off.size:
                est = bootstrap_diff(on[iqr_mask(on)], off[iqr_mask(off)], np.median, n_boot=n_boot)
                if min(on.size, off.size) < MIN_N_FOR_CI:
                    est.low = est.high = float("nan")
                rows.append({"finding": f"{b}: TPOT mean, EPLB on - off (ms)", "estimate": est,
                             "note": "difference of medians; negative = EPLB helps"})
    # single runs per backend: the within-run median TPOT (a median over requests) is the comparable number;
    # a ratio of two runs has no interval, and the caveat of the data travels with it
    single = [b for b in backends if (df.moe_backend == b).sum() == 1]
    if len(single) >= 2:
        base = "vllm" if "vllm" in single else single[0]
        for b in single:
            if b == base:
                continue
            for m, label in (("median_tpot_ms", "median TPOT"), ("mean_ttft_ms", "mean TTFT"),
                             ("output_throughput", "output throughput")):
                x = float(df[df.moe_backend == b][m].iloc[0])
                y = float(df[df.moe_backend == base][m].iloc[0])
                if math.isfinite(x) and math.isfinite(y) and y > 0:
                    rows.append({"finding": f"{b} / {base}: {label} (one run each)",
                                 "estimate": Estimate(x / y, float("nan"), float("nan"), 1),
                                 "note": "ratio of single runs, no interval" + (f"; {caveat}" if caveat else "")})
    if {"predicted_score", "measured_cv"} <= set(df.columns):
        # one pair per dataset/gate log: runs sharing a dataset are not independent evidence
        u = df[["predicted_score", "measured_cv"]].dropna().drop_duplicates()
        x, y = u["predicted_score"].to_numpy(float), u["measured_cv"].to_numpy(float)
        if (np.isfinite(x) & np.isfinite(y)).sum() >= 3:
            rows.append({"finding": "all backends: Spearman(predicted score, measured CV)",
                         "estimate": spearman_ci(x, y, n_boot=n_boot), "note": "predictor validity"})
    return rows


def _fmt(x, digits: int = 4) -> str:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return "" if x is None else str(x)
    if math.isnan(v):
        return "n/a"
    if math.isinf(v):
        return "inf"
    return f"{v:.{digits}g}"


def _run_table(df) -> tuple[list[str], list[list[str]]]:
    cols = [(k, lab) for k, lab in RUN_TABLE if k in df]
    head = ["run", "backend", "max-num-seqs", "max-num-batched-tokens", "measured CV"] + [lab for _, lab in cols]
    rows = []
    for _, r in df.sort_values(["moe_backend", "run_id"]).iterrows():
        rows.append([str(r["run_id"]), str(r["moe_backend"]), _fmt(r.get("max_num_seqs")),
                     _fmt(r.get("max_num_batched_tokens")) if r.get("max_num_batched_tokens") == r.get(
                         "max_num_batched_tokens") and r.get("max_num_batched_tokens") is not None else "default",
                     _fmt(r.get("measured_cv"))] + [_fmt(r[k]) for k, _ in cols])
    return head, rows


PHASE_ROWS = ("prefill", "mixed", "decode", "diffusion")
SUMMARY_COLS = (("step_cv", "per-step CV"), ("agg_cv", "aggregated CV"), ("step_max_min", "max/min (step)"),
                ("step_max_mean", "max/mean (step)"), ("agg_max_mean", "max/mean (agg)"),
                ("step_entropy", "norm. entropy (step)"), ("step_gini", "Gini (step)"), ("agg_gini", "Gini (agg)"))


def imbalance_tables(table, max_tokens: int | None = 1000) -> dict:
    """The numbers behind a gate log's imbalance section (also written to JSON by analysis scripts):
    {"rows": [{"subset", "steps", "tokens_median", **summary.overall}], "per_layer": summary (warm-up
    filtered), "identical_layers": bool, "uniform_cv_median": CV that uniform random routing would show at
    the subset's median step size (metrics.uniform_routing_cv)}."""
    from moekern.analysis.imbalance.metrics import cv, summarize, uniform_routing_cv

    out_rows = []
    subsets = [(f"all steps <= {max_tokens} tokens (warm-up filter)" if max_tokens else "all steps",
                table.step_mask(max_tokens)), ("all steps, no filter", np.ones(table.num_steps, dtype=bool))]
    phases = np.asarray(table.phases) if table.phases else np.full(table.num_steps, "unknown")
    subsets += [(f"phase {ph}", phases == ph) for ph in PHASE_ROWS if (phases == ph).any()]
    for name, mask in subsets:
        t = table.select(mask)
        if t.num_steps == 0:
            continue
        sm = summarize(t, max_tokens=None)
        nt = float(np.median(t.num_tokens))
        k = np.round(t.counts[:, 0, :].sum(axis=-1) / np.maximum(t.num_tokens, 1))
        floor = uniform_routing_cv(t.num_tokens, t.num_experts, np.maximum(k, 1))
        with np.errstate(invalid="ignore"):
            step_cv = np.nanmean(np.where(t.present, cv(t.counts), np.nan), axis=1)
            ratio = float(np.nanmean(step_cv / floor))
        out_rows.append({"subset": name, "steps": int(t.num_steps), "tokens_median": nt,
                         "tokens_min": float(t.num_tokens.min()), "tokens_max": float(t.num_tokens.max()),
                         "uniform_cv_at_median": float(uniform_routing_cv(nt, t.num_experts, max(float(np.median(k)), 1.0))),
                         "cv_over_uniform": ratio, **sm.overall})
    per_layer = summarize(table, max_tokens=max_tokens)
    c = table.counts
    identical = bool(table.num_layers > 1 and np.all(c == c[:, :1, :]))
    return {"rows": out_rows, "per_layer": per_layer.to_dict(), "identical_layers": identical,
            "num_layers": table.num_layers, "num_experts": table.num_experts}


def _imbalance_items(g: str, table, max_tokens: int | None = 1000) -> list:
    info = imbalance_tables(table, max_tokens)
    head = (["subset", "steps", "tokens/step (median)"] + [lab for _, lab in SUMMARY_COLS]
            + ["uniform-routing CV at median tokens", "per-step CV / uniform (mean over steps)"])
    rows = [[r["subset"], str(r["steps"]), _fmt(r["tokens_median"])] + [_fmt(r[k]) for k, _ in SUMMARY_COLS]
            + [_fmt(r["uniform_cv_at_median"]), _fmt(r["cv_over_uniform"])] for r in info["rows"]]
    items = [("table", (head, rows)),
             ("text", "Per-step metrics are computed per (step, layer) and averaged; aggregated ones sum the "
                      "counts over the subset's steps first. max/min is inf when an expert got no token in some "
                      "step (small decode steps). The uniform-routing CV is the sampling-noise floor "
                      "sqrt((E-k)/(n k)) of a perfectly fair router at n tokens per step: per-step CVs of steps "
                      "of different sizes compare through their ratio to it.")]
    pl = info["per_layer"]["per_layer"]
    lhead = ["layer"] + [lab for _, lab in SUMMARY_COLS]
    lrows = [[str(j)] + [_fmt(pl[k][j]) for k, _ in SUMMARY_COLS] for j in range(table.num_layers)]
    items.append(("text", f"Per layer (steps <= {max_tokens} tokens):"))
    items.append(("table", (lhead, lrows)))
    if info["identical_layers"]:
        items.append(("text", f"NOTE: all {table.num_layers} layers have identical expert counts in every step. "
                              "With vLLM's dummy weights this is expected (every parameter of a given size is "
                              "filled from the same seed, so every layer's router is the same matrix, and the "
                              "tiny weights barely change the residual stream): the per-layer numbers are one "
                              "layer's, repeated."))
    items.append(("img", _step_cv_plot(table, Path(g).name)))
    return items


def _step_cv_plot(table, title: str):
    import matplotlib.pyplot as plt

    from moekern.analysis.imbalance.metrics import cv, uniform_routing_cv

    vals = np.where(table.present, cv(table.counts), np.nan)
    with np.errstate(invalid="ignore"):
        per_step = np.nanmean(np.where(np.isnan(vals), np.nan, vals), axis=1) if vals.size else vals
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(8, 4.5), sharex=True, gridspec_kw={"height_ratios": [2, 1]})
    phases = np.asarray(table.phases) if table.phases else np.full(table.num_steps, "unknown")
    x = np.arange(table.num_steps)
    for ph in list(PHASE_ROWS) + ["unknown"]:
        m = phases == ph
        if m.any():
            ax.scatter(x[m], per_step[m], s=8, label=ph)
            ax2.scatter(x[m], table.num_tokens[m], s=6)
    k = table.counts[:, 0, :].sum(axis=-1) / np.maximum(table.num_tokens, 1)
    ax.plot(x, uniform_routing_cv(table.num_tokens, table.num_experts, np.round(k)), color="gray", lw=0.8,
            label="uniform random routing")
    ax.set_ylabel("CV (mean over layers)")
    ax.set_title(f"{title}: per-step CV by phase", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    ax2.set_yscale("log")
    ax2.set_ylabel("tokens")
    ax2.set_xlabel("step")
    ax2.grid(alpha=0.3)
    return _png(fig)


def _placement_items(g: str, table, ep_sizes, max_tokens: int | None = 1000) -> tuple[list, list[str]]:
    from moekern.analysis.placement.advice import advise

    head = ["EP", "strategy", "redundant slots", "max/mean rank load (test steps)", "max/mean (agg)",
            "tokens per rank (test steps, all layers)", "recommended"]
    rows, notes, items, last = [], [], [], None
    for ep in ep_sizes:
        try:
            adv = advise(table, ep, max_tokens=max_tokens)
        except ValueError as exc:
            notes.append(f"placement EP={ep} skipped: {exc}")
            continue
        last = adv
        for sc in adv.scores:
            rows.append([str(ep), sc.strategy, str(sc.num_redundant), _fmt(sc.test_step_max_mean),
                         _fmt(sc.test_agg_max_mean), " / ".join(f"{x:.0f}" for x in sc.rank_tokens),
                         "yes" if sc is adv.best else ""])
        items.append(("text", f"EP={ep}: recommended {adv.best.strategy}"
                              f"{' + %d redundant' % adv.best.num_redundant if adv.best.num_redundant else ''}"
                              f" (fitted on {adv.train_steps} steps, scored on {adv.test_steps}); vLLM flags: "
                              + " ".join(adv.vllm_args) + ". " + adv.note))
    if rows:
        items.insert(0, ("table", (head, rows)))
        items.append(("img", _rank_bars(last, f"{Path(g).name}, EP={last.ep_size}: held-out steps; "
                                               f"recommended: {last.best.strategy}")))
    return items, notes


def build_report(results_dir, n_boot: int = 500, ep_size=None, metadata=None, combine_ranks: str = "auto") -> Report:
    """Read RESULTS_DIR and make every plot and finding (matplotlib Agg, no display needed).
    ep_size: an int or a list of EP sizes for the per-rank sections (default: metadata "ep_sizes"/"ep_size",
    else every one of 2, 4, 8 that divides the number of experts). metadata: a metadata.json path to use
    instead of RESULTS_DIR/metadata.json (for results folders that must stay as the run wrote them).
    combine_ranks: how several ranks' records of one step count (moekern.analysis.imbalance.loads)."""
    import matplotlib

    matplotlib.use("Agg")
    from moekern import gatelog
    from moekern.analysis.imbalance.metrics import load_table, summarize
    from moekern.analysis.serving.metrics import load_runs, runs_dataframe

    root = Path(results_dir)
    meta = {}
    meta_path = Path(metadata) if metadata else root / "metadata.json"
    if metadata and not meta_path.is_file():
        raise UsageError(f"metadata={str(meta_path)!r} is not a file")
    if meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            if metadata:
                raise UsageError(f"metadata={str(meta_path)!r} is not valid JSON: {exc}") from exc
            meta = {}
    runs, skipped = load_runs(root)
    if not runs:
        raise UsageError(f"results_dir={str(root)!r} holds no bench result JSON files (vllm bench serve "
                         f"--save-result output, or moekern e2e's)")
    df = runs_dataframe(runs)
    synthetic = bool(meta.get("synthetic")) or any(r.synthetic for r in runs)
    rep = Report(title=meta.get("title", f"moekern serving and imbalance report: {root.name}"), synthetic=synthetic,
                 caveats=[str(c) for c in meta.get("caveats", [])], command=str(meta.get("command", "")))
    if meta.get("description"):
        rep.notes.append(str(meta["description"]))
    rep.notes.append(f"{len(runs)} runs; backends: {', '.join(_by_backend(df)) or 'n/a'}"
                     + (f"; {len(skipped)} file(s) skipped" if skipped else ""))
    inferred = sorted({r.extra["inferred_from"] for r in runs if r.extra.get("inferred_from")})
    for note in inferred:
        rep.notes.append(f"moekern e2e layout: {note}")
    rep.sections.append(("Serving metrics per run (ms unless stated)", [("table", _run_table(df))]))
    for x, label in (("max_num_seqs", "max-num-seqs"), ("max_num_batched_tokens", "max-num-batched-tokens")):
        vals = sorted(df[x].dropna().unique()) if x in df else []
        if len(vals) >= 2:
            rep.sections.append((f"Serving metrics vs {label}", [("img", _line_plot(df, x, label))]))
        else:
            rep.notes.append(f"no plot vs {label}: " + (f"every run has {label} = {_fmt(vals[0])}" if vals else
                                                        f"no run records {label} (vLLM default)"))
    for x, label in (("measured_cv", "measured imbalance (per-step CV)"), ("predicted_score", "predicted score")):
        n = int(df[x].notna().sum()) if x in df else 0
        if n >= 3 and df[x].nunique() >= 2:
            rep.sections.append((f"Serving metrics vs {label}", [("img", _scatter_plot(df, x, label))]))
        elif n:
            rep.notes.append(f"no plot vs {label}: {n} run(s) have it (a trend needs >= 3 runs with >= 2 values)")
    from moekern.analysis.report.knobgrid import add_knob_grid_sections

    add_knob_grid_sections(rep, df, _by_backend(df), PLOT_METRICS, _scatter_plot)
    linked = {str(Path(r.gate_log).resolve()) for r in runs if r.gate_log and Path(r.gate_log).exists()}
    found = {str(f.parent.resolve()) for f in gatelog.gate_log_files(root)} if root.is_dir() else set()
    logs = sorted(linked | found)
    tables = []
    for g in logs:
        try:
            t = load_table(g, combine_ranks=combine_ranks)
            tables.append((summarize(t).overall["step_cv"], g, t))
        except ValueError as exc:
            rep.notes.append(f"gate log {g} unusable: {exc}")
    if tables:
        for cv_, g, t in tables[:MAX_GATE_LOGS]:
            name = _rel(g, root)
            rep.sections.append((f"Expert-load imbalance: {name} (E={t.num_experts}, {t.num_layers} layers, "
                                 f"{t.num_steps} steps)", _imbalance_items(g, t)))
        if len(tables) > MAX_GATE_LOGS:
            rep.notes.append(f"{len(tables) - MAX_GATE_LOGS} more gate logs not detailed")
        tables.sort(key=lambda x: (x[0] if math.isfinite(x[0]) else -1))
        picks = [tables[0], tables[-1]] if len(tables) > 1 else [tables[0]]
        items = [("img", _heatmap(t, f"{_rel(g, root)}: per-step CV {cv_:.3f}")) for cv_, g, t in picks]
        rep.sections.append(("Per-layer expert load (least and most imbalanced gate logs)" if len(picks) > 1
                             else "Per-layer expert load", items))
        cv_, g, t = max(tables, key=lambda x: x[2].num_steps)  # placement wants the most steps
        if ep_size is not None:  # the user's: a size that cannot split the experts is their mistake
            bad = [e for e in (ep_size if isinstance(ep_size, (list, tuple)) else [ep_size])
                   if int(e) < 1 or t.num_experts % int(e)]
            if bad:
                raise UsageError(f"ep_size={bad[0]} must be >= 1 and divide num_experts={t.num_experts} of "
                                 f"{_rel(g, root)}")
        else:
            ep_size = meta.get("ep_sizes") or meta.get("ep_size") or [d for d in (2, 4, 8)
                                                                      if t.num_experts % d == 0 and d <= t.num_experts]
        eps = [int(e) for e in (ep_size if isinstance(ep_size, (list, tuple)) else [ep_size])]
        items, notes = _placement_items(g, t, eps)
        rep.notes += notes
        if items:
            rep.sections.append((f"Per-rank load and placement advice ({_rel(g, root)}; EP = "
                                 f"{', '.join(map(str, eps))})", items))
    try:  # study sections (LaTeX tables, ANOVA, co-activation, predictor, projection) when present
        from moekern.analysis.report.study import add_study_sections
    except ImportError:
        add_study_sections = None
    if add_study_sections is not None:
        add_study_sections(rep, root, df, runs, meta)
    rep.findings = _findings(df, n_boot, caveat=str(meta.get("comparison_caveat", "")))
    return rep


def _rel(g: str, root: Path) -> str:
    try:
        return str(Path(g).resolve().relative_to(root.resolve()))
    except ValueError:
        return str(g)


def _est_cells(est) -> tuple[str, str]:
    ci = "n/a" if not (math.isfinite(est.low) and math.isfinite(est.high)) else f"[{est.low:.4g}, {est.high:.4g}]"
    return _fmt(est.value), ci


def render_html(rep: Report) -> str:
    e = html.escape
    out = ["<!doctype html><html><head><meta charset='utf-8'>", f"<title>{e(rep.title)}</title>",
           "<style>body{font-family:sans-serif;max-width:1300px;margin:auto;padding:1em}"
           "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px}"
           ".synthetic{background:#fdd;border:2px solid #c00;padding:8px;font-weight:bold}"
           ".caveats{background:#ffe;border:2px solid #c90;padding:8px}</style></head><body>",
           f"<h1>{e(rep.title)}</h1>"]
    if rep.command:
        out.append(f"<p>Made by: <code>{e(rep.command)}</code></p>")
    if rep.synthetic:
        out.append("<p class='synthetic'>SYNTHETIC DATA: these numbers were generated by a script, not measured. "
                   "They show what the report looks like, nothing about moekern's or vLLM's performance.</p>")
    if rep.caveats:
        out.append("<div class='caveats'><b>CAVEATS</b><ul>" + "".join(f"<li>{e(c)}</li>" for c in rep.caveats)
                   + "</ul></div>")
    out += [f"<p>{e(n)}</p>" for n in rep.notes]
    for heading, items in rep.sections:
        out.append(f"<h2>{e(heading)}</h2>")
        for kind, payload in items:
            if kind == "img":
                out.append(f"<img alt='{e(heading)}' src='data:image/png;base64,"
                           f"{base64.b64encode(payload).decode()}'/>")
            elif kind == "pre":
                out.append(f"<pre>{e(payload)}</pre>")
            elif kind == "table":
                head, rows = payload
                out.append("<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in head) + "</tr>"
                           + "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>" for r in rows)
                           + "</table>")
            else:
                out.append(f"<p>{e(payload)}</p>")
    out.append(f"<h2>Findings (95% bootstrap CI where n >= {MIN_N_FOR_CI})</h2><table><tr><th>finding</th>"
               "<th>estimate</th><th>95% CI</th><th>n</th><th>note</th></tr>")
    for f in rep.findings:
        val, ci = _est_cells(f["estimate"])
        out.append(f"<tr><td>{e(f['finding'])}</td><td>{val}</td><td>{ci}</td>"
                   f"<td>{f['estimate'].n}</td><td>{e(f['note'])}</td></tr>")
    out.append("</table></body></html>")
    return "\n".join(out)


def render_markdown(rep: Report, image_dir: Path, rel: str) -> str:
    image_dir.mkdir(parents=True, exist_ok=True)
    out = [f"# {rep.title}", ""]
    if rep.command:
        out += ["Made by:", "", "```", rep.command, "```", ""]
    if rep.synthetic:
        out += ["> **SYNTHETIC DATA**: generated by a script, not measured; it shows the report's form only.", ""]
    if rep.caveats:
        out += ["> **CAVEATS**", ">"] + [f"> - {c}" for c in rep.caveats] + [""]
    out += [n + "\n" for n in rep.notes]
    k = 0
    for heading, items in rep.sections:
        out.append(f"## {heading}\n")
        for kind, payload in items:
            if kind == "img":
                name = f"fig{k:02d}.png"
                (image_dir / name).write_bytes(payload)
                out.append(f"![{heading}]({rel}/{name})\n")
                k += 1
            elif kind == "pre":
                out.append("```latex\n" + payload + "\n```\n")
            elif kind == "table":
                head, rows = payload
                out.append("| " + " | ".join(head) + " |")
                out.append("|" + "---|" * len(head))
                out += ["| " + " | ".join(str(c).replace("|", "/") for c in r) + " |" for r in rows]
                out.append("")
            else:
                out.append(payload + "\n")
    out += [f"## Findings (95% bootstrap CI where n >= {MIN_N_FOR_CI})", "", "| finding | estimate | 95% CI | n | note |",
            "|---|---|---|---|---|"]
    for f in rep.findings:
        val, ci = _est_cells(f["estimate"])
        out.append(f"| {f['finding']} | {val} | {ci} | {f['estimate'].n} | {f['note']} |")
    return "\n".join(out) + "\n"


def write_report(results_dir, out_path, n_boot: int = 500, ep_size=None, metadata=None,
                 combine_ranks: str = "auto") -> Path:
    """Build and write the report; `.md` gives Markdown (+ a PNG folder beside it), anything else HTML."""
    rep = build_report(results_dir, n_boot=n_boot, ep_size=ep_size, metadata=metadata, combine_ranks=combine_ranks)
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix.lower() == ".md":
        img = out.with_name(out.stem + "_files")
        out.write_text(render_markdown(rep, img, img.name), encoding="utf-8")
    else:
        out.write_text(render_html(rep), encoding="utf-8")
    return out
