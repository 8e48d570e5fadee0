"""Study sections of `moekern report` (called by moekern.analysis.report.html.build_report when data exists):
LaTeX tables of the main results, co-activation heatmaps, the ANOVA table and plot, the learned
predictor's held-out accuracy, and the multi-node projection. Each section is added only when its input
exists; a failure in one is a note, never a broken report. Items: ("img", png) | ("text", str) |
("pre", preformatted text, e.g. LaTeX).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from moekern.analysis.plotting import fig_png


_png = fig_png  # figure -> PNG bytes (moekern.analysis.plotting)


def coactivation_heatmap(coact: np.ndarray, title: str) -> bytes:
    import matplotlib.pyplot as plt

    c = np.asarray(coact, dtype=float).copy()
    np.fill_diagonal(c, np.nan)  # the diagonal (load) would drown the pairs
    fig, ax = plt.subplots(figsize=(4.5, 4))
    im = ax.imshow(c, cmap="magma")
    ax.set_xlabel("expert")
    ax.set_ylabel("expert")
    ax.set_title(title, fontsize=8)
    fig.colorbar(im, ax=ax, label="sampled tokens choosing both")
    return _png(fig)


def results_latex(df) -> str:
    """LaTeX tabular: median TTFT / TPOT / throughput per (backend, max_num_seqs)."""
    from moekern.analysis.study.factorial import _tex

    keys = [k for k in ("moe_backend", "max_num_seqs") if k in df]
    cols = [c for c in ("mean_ttft_ms", "mean_tpot_ms", "output_throughput") if c in df]
    g = df.groupby(keys)[cols].median().reset_index()
    lines = [r"\begin{tabular}{" + "l" * len(keys) + "r" * len(cols) + "}", r"\toprule",
             " & ".join(_tex(k) for k in keys + cols) + r" \\", r"\midrule"]
    for _, row in g.iterrows():
        lines.append(" & ".join([_tex(row[k]) for k in keys] + [f"{row[c]:.1f}" for c in cols]) + r" \\")
    return "\n".join(lines + [r"\bottomrule", r"\end{tabular}"])


def predictor_latex(acc: list[dict]) -> str:
    from moekern.analysis.study.factorial import _tex

    lines = [r"\begin{tabular}{llrrrr}", r"\toprule", r"target & model & MAE & MAPE & $R^2$ & $n_{test}$ \\",
             r"\midrule"]
    for a in acc:
        lines.append(f"{_tex(a['target'])} & {_tex(a['model'])} & {a['mae']:.3g} & {100 * a['mape']:.1f}\\% & "
                     f"{a['r2']:.3f} & {a['n_test']} \\\\")
    return "\n".join(lines + [r"\bottomrule", r"\end{tabular}"])


def add_study_sections(rep, root, df, runs, meta: dict) -> None:
    """Append the study sections to `rep` (an analysis.report.Report)."""
    import matplotlib

    matplotlib.use("Agg")
    root = Path(root)
    _safe(rep, "main results table", lambda: rep.sections.append(
        ("Main results (LaTeX)", [("pre", results_latex(df))])))

    def anova():
        from moekern.analysis.study.factorial import FACTORS, anova_all, anova_latex, anova_plot, steady_rows

        d, unsteady = steady_rows(df)  # a bench that JIT-compiled while measured times the compiler
        res = anova_all(d, [f for f in FACTORS if f in d])
        if res:
            left = f"; {len(unsteady)} run(s) with steady_state false left out" if unsteady else ""
            rep.sections.append(("ANOVA (type II, partial eta squared)",
                                 [("img", anova_plot(res)), ("pre", anova_latex(res)),
                                  ("text", "; ".join(f"{r}: {a.formula} (n={a.n})" for r, a in res.items()) + left)]))
    _safe(rep, "ANOVA", anova)

    def predictor():
        from moekern.analysis.study import learned

        pred = learned.train(root, n_estimators=50)  # this report's own runs: 75% train, 25% held out
        items = [("pre", predictor_latex(pred.accuracy())),
                 ("text", f"Learned predictor (model chosen per target by 5-fold CV) trained on 75% of this "
                          f"report's {pred.n_rows} runs{' (SYNTHETIC)' if pred.synthetic else ''}, error on the "
                          "held-out 25%.")]
        rep.sections.append(("Learned serving predictor", items))
    _safe(rep, "predictor", predictor)

    logs = sorted({r.gate_log for r in runs if r.gate_log and Path(r.gate_log).exists()})

    def coact():
        from moekern.analysis.imbalance.coactivation import hot_cold, load_coactivation

        for g in logs:
            data = load_coactivation(g)
            layers = [l for l in data.layers if data.samples.get(l)]
            if not layers:
                continue
            l = layers[0]
            hot, cold = hot_cold(data.load[l])
            rep.sections.append((f"Expert co-activation ({Path(g).name}, layer {l})",
                                 [("img", coactivation_heatmap(data.coact[l], f"{Path(g).name} layer {l}")),
                                  ("text", f"hot experts (load > mean + 1 std): {hot.tolist()}; cold "
                                           f"(< mean - 1 std): {cold.tolist()}")]))
            return
    _safe(rep, "co-activation", coact)

    def projection():
        from moekern.analysis.placement.project import project_from_gate_log, projection_plot

        model = meta.get("model")
        if not logs or not model:
            return
        rows, info = project_from_gate_log(logs[-1], model)
        rep.sections.append(("Multi-node projection (PROJECTED, not measured)",
                             [("img", projection_plot(rows, f"{info['model']}, {info['routing']}")),
                              ("text", f"intra-node {info['intra_bw'] / 1e9:.0f} GB/s ({info['intra_bw_source']}), "
                                       f"inter-node {info['inter_bw'] / 1e9:.0f} GB/s per GPU; "
                                       f"{info['tokens_per_gpu']} tokens per GPU per step.")]))
    _safe(rep, "projection", projection)


def _safe(rep, what: str, fn) -> None:
    try:
        fn()
    except Exception as exc:  # one missing input must not sink the whole report
        rep.notes.append(f"study section '{what}' skipped: {type(exc).__name__}: {exc}")
