"""The knob-grid sections of `moekern report` (issue 31's study): what a serve grid over max-num-seqs x
max-num-batched-tokens x routing skew x MoE backend needs beyond the general report.

- per metric (TTFT, TPOT, output throughput), a heatmap of the knob grid per backend: rows max-num-seqs, columns
  max-num-batched-tokens, each cell the median over the cell's runs (its skews and reps) after leaving out
  the backend's IQR outliers of that metric (Tukey 1.5; they are counted in the title);
- each metric vs the measured CV of the bench's own gate-log window by both of the prior study's methods
  (measured_cv_agg, measured_cv_step), one colour per backend, IQR outliers drawn as red crosses and left out of
  the fits (the general report's scatter);
- a table of the measured CV per skew and backend (median, min, max), the range the skew factor reached.

A folder gets these sections when its runs record both knobs with >= 2 values each (heatmaps) or a measured
CV of either method (scatters, table). Runs whose result says `steady_state: false` (kernels JIT-compiled while
measured) are left out of them, and named in a note. The ANOVA (report/study.py) takes routing_skew as a factor beside the
knobs and the backend.
"""

from __future__ import annotations

import numpy as np

from moekern.analysis.plotting import fig_png
from moekern.analysis.stats import iqr_mask

KNOBS = ("max_num_seqs", "max_num_batched_tokens")
CV_METHODS = (("measured_cv_agg", "measured CV, aggregated (prior study's method)"),
              ("measured_cv_step", "measured CV, per step (prior study's method)"))


def knob_grid_table(df, metric: str, backend: str):
    """`(table, outliers)`: a DataFrame indexed by max_num_seqs with a column per max_num_batched_tokens, each
    cell the median of `metric` over the backend's runs at those knobs, after the backend's IQR outliers of
    `metric` are left out; `outliers` their count. Empty table when the backend has no such runs."""
    d = df[(df["moe_backend"] == backend) & df[metric].notna() & df[KNOBS[0]].notna() & df[KNOBS[1]].notna()]
    if d.empty:
        return d.pivot_table(index=KNOBS[0], columns=KNOBS[1], values=metric), 0
    keep = iqr_mask(d[metric].to_numpy(float))
    t = d[keep].pivot_table(index=KNOBS[0], columns=KNOBS[1], values=metric, aggfunc="median")
    return t.sort_index().sort_index(axis=1), int((~keep).sum())


def knob_heatmap(df, metric: str, label: str, backends: list[str]) -> bytes:
    """One panel per backend: knob_grid_table as a colour grid with its values written in; one colour scale
    for all panels, so backends compare by colour."""
    import matplotlib.pyplot as plt

    tables = [(b, *knob_grid_table(df, metric, b)) for b in backends]
    vals = np.concatenate([t.to_numpy(float).ravel() for _, t, _ in tables if t.size] or [np.array([np.nan])])
    lo, hi = (np.nanmin(vals), np.nanmax(vals)) if np.isfinite(vals).any() else (0.0, 1.0)
    fig, axes = plt.subplots(1, len(tables), figsize=(3.6 * len(tables) + 1.0, 3.3), squeeze=False)
    im = None
    for ax, (b, t, n_out) in zip(axes[0], tables):
        if not t.size:
            ax.set_title(f"{b}: no runs", fontsize=9)
            ax.axis("off")
            continue
        a = t.to_numpy(float)
        im = ax.imshow(a, cmap="viridis", vmin=lo, vmax=hi, origin="lower", aspect="auto")
        ax.set_xticks(range(t.shape[1]), [str(int(c)) for c in t.columns], fontsize=8)
        ax.set_yticks(range(t.shape[0]), [str(int(r)) for r in t.index], fontsize=8)
        ax.set_xlabel("max-num-batched-tokens")
        ax.set_ylabel("max-num-seqs")
        for i in range(a.shape[0]):
            for j in range(a.shape[1]):
                if np.isfinite(a[i, j]):
                    ax.text(j, i, f"{a[i, j]:.3g}", ha="center", va="center", fontsize=7,
                            color="white" if a[i, j] < (lo + hi) / 2 else "black")
        ax.set_title(f"{b}" + (f" ({n_out} IQR outlier(s) left out)" if n_out else ""), fontsize=9)
    if im is not None:
        fig.colorbar(im, ax=list(axes[0]), label=label)
    fig.suptitle(f"{label}: median per knob point (over skews and reps)", fontsize=9)
    return fig_png(fig)


def cv_by_skew_table(df) -> tuple[list[str], list[list[str]]] | None:
    """(header, rows): median [min, max] of each measured CV per (routing_skew, backend); None without skews."""
    if "routing_skew" not in df or df["routing_skew"].isna().all():
        return None
    have = [(c, name) for c, name in CV_METHODS if c in df and df[c].notna().any()]
    if not have:
        return None
    header = ["skew", "backend", "runs"] + [f"{name}: median [min, max]" for _, name in have]
    rows = []
    for (skew, backend), g in df.dropna(subset=["routing_skew"]).groupby(["routing_skew", "moe_backend"]):
        cells = []
        for c, _ in have:
            v = g[c].dropna()
            cells.append(f"{v.median():.3f} [{v.min():.3f}, {v.max():.3f}]" if len(v) else "n/a")
        rows.append([str(skew), str(backend), str(len(g))] + cells)
    return header, rows


def add_knob_grid_sections(rep, df, backends: list[str], metrics, scatter) -> None:
    """Append the sections of the module docstring to `rep` (an analysis.report.Report); `metrics` the
    report's (column, label) pairs, `scatter(df, x, label) -> PNG` its IQR-filtered scatter."""
    from moekern.analysis.study.factorial import steady_rows

    df, unsteady = steady_rows(df)
    if unsteady:
        rep.notes.append(f"knob-grid sections: {len(unsteady)} run(s) left out, JIT-compiled while measured "
                         f"(steady_state false): {', '.join(unsteady[:6])}{' ...' if len(unsteady) > 6 else ''}")
    if all(k in df for k in KNOBS) and all(df[k].dropna().nunique() >= 2 for k in KNOBS):
        rep.sections.append(("Knob grid per backend (max-num-seqs x max-num-batched-tokens)",
                             [("img", knob_heatmap(df, m, label, backends)) for m, label in metrics
                              if m in df and df[m].notna().any()]))
    for x, label in CV_METHODS:
        n = int(df[x].notna().sum()) if x in df else 0
        if n >= 3 and df[x].nunique() >= 2:
            rep.sections.append((f"Serving metrics vs {label}", [("img", scatter(df, x, label))]))
        elif n:
            rep.notes.append(f"no plot vs {label}: {n} run(s) have it (a trend needs >= 3 runs with >= 2 values)")
    table = cv_by_skew_table(df)
    if table is not None:
        rep.sections.append(("Measured imbalance per routing skew (each bench's own gate-log window)",
                             [("table", table)]))
