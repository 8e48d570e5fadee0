"""Load-imbalance and serving analysis: metrics, datasets and predictor, placement advice, sweeps, report.

Runs without vLLM and without a GPU, and none of these modules imports torch (numpy/pandas/scipy/
matplotlib only, the last three inside the functions that need them). Submodules:
metrics (imbalance metrics, gate-log loading), serving (vLLM bench JSON), stats (bootstrap, IQR,
Spearman), predictor (ImbalancePredictor, query corpus), datasets, validate, placement, sweep, report,
synthetic (test/sample data only).
"""

from __future__ import annotations

import importlib

_LAZY = {
    "cv": "metrics", "max_min": "metrics", "max_mean": "metrics", "normalized_entropy": "metrics", "gini": "metrics",
    "all_metrics": "metrics", "rank_loads": "metrics", "load_table": "metrics", "summarize": "metrics",
    "LoadTable": "metrics", "ImbalancePredictor": "predictor", "generate_datasets": "datasets",
    "advise": "placement", "load_runs": "serving", "parse_bench_result": "serving", "write_report": "report",
}

__all__ = list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(f"moekern.analysis.{_LAZY[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'moekern.analysis' has no attribute {name!r}")
