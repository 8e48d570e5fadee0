"""Does the predicted score rank datasets by measured imbalance? Spearman's rho with a bootstrap CI.

Pairs come from a datasets folder (files `{index:03d}_{score:.4f}.jsonl`, as `moekern datasets generate`
writes) and a gate-log folder holding one sub-folder or file per dataset, matched by the dataset file's
stem (`000_0.2411/`) or its index (`000/`, `000_*`, `gate_log_000*.jsonl`). Measured imbalance is the
overall per-step CV (metrics.summarize, with the warm-up filter).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from moekern.analysis.imbalance.metrics import DEFAULT_MAX_TOKENS, load_table, summarize
from moekern.analysis.stats import Estimate, spearman_ci, spearman_pvalue
from moekern.errors import UsageError

_NAME = re.compile(r"^(\d{3})_(\d+\.\d+)$")


@dataclass
class ValidationResult:
    rho: Estimate
    pvalue: float
    pairs: list[tuple[str, float, float]]  # (dataset, predicted score, measured CV)
    metric: str
    unmatched: list[str]

    def to_dict(self) -> dict:
        return {"spearman": self.rho.to_dict(), "pvalue": self.pvalue, "metric": self.metric,
                "pairs": [{"dataset": d, "predicted": s, "measured": m} for d, s, m in self.pairs],
                "unmatched": self.unmatched}


def dataset_scores(datasets_dir: str | os.PathLike) -> dict[str, tuple[int, float]]:
    """{file stem: (index, score)} from dataset file names."""
    out = {}
    for f in sorted(Path(datasets_dir).glob("*.jsonl")):
        m = _NAME.match(f.stem)
        if m:
            out[f.stem] = (int(m.group(1)), float(m.group(2)))
    if not out:
        raise UsageError(f"no dataset files named NNN_SCORE.jsonl under {str(datasets_dir)!r}")
    return out


def _find_log(logs_dir: Path, stem: str, index: int) -> Path | None:
    for cand in (logs_dir / stem, logs_dir / f"{index:03d}"):
        if cand.exists():
            return cand
    hits = sorted(logs_dir.glob(f"{index:03d}_*")) + sorted(logs_dir.glob(f"gate_log_{index:03d}*.jsonl"))
    return hits[0] if hits else None


def validate(datasets_dir, logs_dir, max_tokens: int | None = DEFAULT_MAX_TOKENS, metric: str = "step_cv",
             n_boot: int = 1000, seed: int = 0) -> ValidationResult:
    """Spearman(predicted score, measured `metric`) over the datasets that have gate logs."""
    logs = Path(logs_dir)
    pairs, unmatched = [], []
    for stem, (idx, score) in dataset_scores(datasets_dir).items():
        log = _find_log(logs, stem, idx)
        if log is None:
            unmatched.append(stem)
            continue
        try:
            value = summarize(load_table(log), max_tokens).overall[metric]
        except (ValueError, FileNotFoundError):
            unmatched.append(stem)
            continue
        pairs.append((stem, score, value))
    xs, ys = [p[1] for p in pairs], [p[2] for p in pairs]
    return ValidationResult(spearman_ci(xs, ys, n_boot=n_boot, seed=seed), spearman_pvalue(xs, ys), pairs,
                            metric, unmatched)
