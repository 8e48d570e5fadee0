"""`moekern report RESULTS_DIR`: one self-contained HTML (PNG plots embedded as base64) or Markdown report.

RESULTS_DIR holds bench result JSON files (any depth; see serving.load_runs), optionally gate logs they
point to (`gate_log`), and optionally `metadata.json` ({"synthetic": true, "title": ..., "description":
..., "ep_size": 4}). A run or metadata marked synthetic puts a SYNTHETIC banner atop the report.

Contents: serving metrics (TTFT, TPOT, output throughput) vs max-num-seqs and vs max-num-batched-tokens
per backend; each vs measured imbalance (CV) and vs predicted score, with IQR (Tukey 1.5) outliers drawn
as red crosses and left out of the trend lines and statistics; per-layer expert-load heatmaps of the
least and most imbalanced gate logs; per-rank load bars under contiguous and the best placement; a table
of findings with 95% bootstrap CIs.
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
from moekern.analysis.stats import bootstrap_ci, bootstrap_diff, iqr_mask, spearman_ci

PLOT_METRICS = (("mean_ttft_ms", "TTFT mean (ms)"), ("mean_tpot_ms", "TPOT mean (ms)"),
                ("output_throughput", "output throughput (tok/s)"))


@dataclass
class Report:
    title: str
    synthetic: bool
    notes: list[str] = field(default_factory=list)
    sections: list[tuple[str, list]] = field(default_factory=list)  # (heading, [("img", png) | ("table", ...)])
    findings: list[dict] = field(default_factory=list)


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


def _findings(df, n_boot: int) -> list[dict]:
    rows = []
    for b in _by_backend(df):
        d = df[df.moe_backend == b]
        for m, label in PLOT_METRICS:
            v = d[m].to_numpy(float)
            keep = iqr_mask(v)
            est = bootstrap_ci(v[keep], np.median, n_boot=n_boot)
            rows.append({"finding": f"{b}: median {label}", "estimate": est,
                         "note": f"{int((~keep & np.isfinite(v)).sum())} IQR outlier(s) excluded"})
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
                rows.append({"finding": f"{b}: TPOT mean, EPLB on - off (ms)",
                             "estimate": bootstrap_diff(on[iqr_mask(on)], off[iqr_mask(off)], np.median,
                                                        n_boot=n_boot),
                             "note": "difference of medians; negative = EPLB helps"})
    if {"predicted_score", "measured_cv"} <= set(df.columns):
        # one pair per dataset/gate log: runs sharing a dataset are not independent evidence
        u = df[["predicted_score", "measured_cv"]].dropna().drop_duplicates()
        x, y = u["predicted_score"].to_numpy(float), u["measured_cv"].to_numpy(float)
        if (np.isfinite(x) & np.isfinite(y)).sum() >= 3:
            rows.append({"finding": "all backends: Spearman(predicted score, measured CV)",
                         "estimate": spearman_ci(x, y, n_boot=n_boot), "note": "predictor validity"})
    return rows


def build_report(results_dir, n_boot: int = 500, ep_size: int | None = None) -> Report:
    """Read RESULTS_DIR and make every plot and finding (matplotlib Agg, no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    from moekern.analysis.metrics import load_table, summarize
    from moekern.analysis.placement import advise
    from moekern.analysis.serving import load_runs, runs_dataframe

    root = Path(results_dir)
    meta = {}
    if (root / "metadata.json").is_file():
        try:
            meta = json.loads((root / "metadata.json").read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            meta = {}
    runs, skipped = load_runs(root)
    if not runs:
        raise ValueError(f"no bench result JSON files under {str(root)!r}")
    df = runs_dataframe(runs)
    synthetic = bool(meta.get("synthetic")) or any(r.synthetic for r in runs)
    rep = Report(title=meta.get("title", f"moekern serving and imbalance report: {root.name}"), synthetic=synthetic)
    if meta.get("description"):
        rep.notes.append(str(meta["description"]))
    rep.notes.append(f"{len(runs)} runs; backends: {', '.join(_by_backend(df)) or 'n/a'}"
                     + (f"; {len(skipped)} file(s) skipped" if skipped else ""))
    for x, label in (("max_num_seqs", "max-num-seqs"), ("max_num_batched_tokens", "max-num-batched-tokens")):
        if df[x].notna().any():
            rep.sections.append((f"Serving metrics vs {label}", [("img", _line_plot(df, x, label))]))
    for x, label in (("measured_cv", "measured imbalance (per-step CV)"), ("predicted_score", "predicted score")):
        if x in df and df[x].notna().any():
            rep.sections.append((f"Serving metrics vs {label}", [("img", _scatter_plot(df, x, label))]))
    logs = sorted({r.gate_log for r in runs if r.gate_log and Path(r.gate_log).exists()})
    if logs:
        tables = []
        for g in logs:
            try:
                t = load_table(g)
                tables.append((summarize(t).overall["step_cv"], g, t))
            except ValueError:
                continue
        tables.sort(key=lambda x: (x[0] if math.isfinite(x[0]) else -1))
        if tables:
            picks = [tables[0], tables[-1]] if len(tables) > 1 else [tables[0]]
            items = [("img", _heatmap(t, f"{Path(g).name}: per-step CV {cv:.3f}")) for cv, g, t in picks]
            rep.sections.append(("Per-layer expert load (least and most imbalanced gate logs)", items))
            cv, g, t = tables[-1]
            ep = ep_size or int(meta.get("ep_size", 0)) or max(d for d in (8, 4, 2, 1) if t.num_experts % d == 0)
            try:
                adv = advise(t, ep)
                rep.sections.append((f"Per-rank load, EP={ep} ({Path(g).name})",
                                     [("img", _rank_bars(adv, f"held-out steps; recommended: {adv.best.strategy}")),
                                      ("text", "vLLM flags: " + " ".join(adv.vllm_args) + ". " + adv.note)]))
            except ValueError as exc:
                rep.notes.append(f"placement skipped: {exc}")
    try:  # study sections (LaTeX tables, ANOVA, co-activation, predictor, projection) when present
        from moekern.study.report import add_study_sections
    except ImportError:
        add_study_sections = None
    if add_study_sections is not None:
        add_study_sections(rep, root, df, runs, meta)
    rep.findings = _findings(df, n_boot)
    return rep


def render_html(rep: Report) -> str:
    e = html.escape
    out = ["<!doctype html><html><head><meta charset='utf-8'>", f"<title>{e(rep.title)}</title>",
           "<style>body{font-family:sans-serif;max-width:1300px;margin:auto;padding:1em}"
           "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px}"
           ".synthetic{background:#fdd;border:2px solid #c00;padding:8px;font-weight:bold}</style></head><body>",
           f"<h1>{e(rep.title)}</h1>"]
    if rep.synthetic:
        out.append("<p class='synthetic'>SYNTHETIC DATA: these numbers were generated by a script, not measured. "
                   "They show what the report looks like, nothing about moekern's or vLLM's performance.</p>")
    out += [f"<p>{e(n)}</p>" for n in rep.notes]
    for heading, items in rep.sections:
        out.append(f"<h2>{e(heading)}</h2>")
        for kind, payload in items:
            if kind == "img":
                out.append(f"<img alt='{e(heading)}' src='data:image/png;base64,"
                           f"{base64.b64encode(payload).decode()}'/>")
            elif kind == "pre":
                out.append(f"<pre>{e(payload)}</pre>")
            else:
                out.append(f"<p>{e(payload)}</p>")
    out.append("<h2>Findings (95% bootstrap CI)</h2><table><tr><th>finding</th><th>estimate</th><th>95% CI</th>"
               "<th>n</th><th>note</th></tr>")
    for f in rep.findings:
        est = f["estimate"]
        out.append(f"<tr><td>{e(f['finding'])}</td><td>{est.value:.4g}</td><td>[{est.low:.4g}, {est.high:.4g}]</td>"
                   f"<td>{est.n}</td><td>{e(f['note'])}</td></tr>")
    out.append("</table></body></html>")
    return "\n".join(out)


def render_markdown(rep: Report, image_dir: Path, rel: str) -> str:
    image_dir.mkdir(parents=True, exist_ok=True)
    out = [f"# {rep.title}", ""]
    if rep.synthetic:
        out += ["> **SYNTHETIC DATA**: generated by a script, not measured; it shows the report's form only.", ""]
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
            else:
                out.append(payload + "\n")
    out += ["## Findings (95% bootstrap CI)", "", "| finding | estimate | 95% CI | n | note |", "|---|---|---|---|---|"]
    for f in rep.findings:
        est = f["estimate"]
        out.append(f"| {f['finding']} | {est.value:.4g} | [{est.low:.4g}, {est.high:.4g}] | {est.n} | {f['note']} |")
    return "\n".join(out) + "\n"


def write_report(results_dir, out_path, n_boot: int = 500, ep_size: int | None = None) -> Path:
    """Build and write the report; `.md` gives Markdown (+ a PNG folder beside it), anything else HTML."""
    rep = build_report(results_dir, n_boot=n_boot, ep_size=ep_size)
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix.lower() == ".md":
        img = out.with_name(out.stem + "_files")
        out.write_text(render_markdown(rep, img, img.name), encoding="utf-8")
    else:
        out.write_text(render_html(rep), encoding="utf-8")
    return out
