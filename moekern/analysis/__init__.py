"""Load-imbalance and serving analysis: metrics, datasets and predictor, placement advice, sweeps, report.

Runs without vLLM and without a GPU, and none of these modules imports torch (numpy/pandas/scipy/
matplotlib only, the last three inside the functions that need them). One subpackage per question:

- imbalance/   how uneven is routing: metrics (CV, max/min, max/mean, entropy, Gini; gate-log loading),
               coactivation (which experts fire together)
- serving/     what it costs in serving: metrics (vLLM bench JSON: TTFT, TPOT, throughput), steptimes
- datasets/    prompt sets with controlled imbalance: generate, predictor (ImbalancePredictor), validate,
               synthetic (test and sample data only)
- placement/   where experts should live: advice (expert->rank maps), project (multi-node projection),
               recommend (layout advice with the learned predictor)
- study/       designed experiments: sweep, factorial (ANOVA), learned (serving predictor), profile
- report/      html (one report from gate logs + bench results), study (the study's figures)
- diffusion    AR vs diffusion routing comparison;  stats, plotting: shared helpers
"""

from __future__ import annotations

import importlib

_LAZY = {
    **{n: "imbalance.metrics" for n in ("cv", "max_min", "max_mean", "normalized_entropy", "gini", "all_metrics",
                                         "rank_loads", "load_table", "summarize", "LoadTable")},
    "ImbalancePredictor": "datasets.predictor", "generate_datasets": "datasets.generate",
    "advise": "placement.advice", "load_runs": "serving.metrics", "parse_bench_result": "serving.metrics",
    "write_report": "report.html",
}

__all__ = list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(f"moekern.analysis.{_LAZY[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'moekern.analysis' has no attribute {name!r}")
