"""Imbalance metrics of expert load: one implementation, used by the vLLM plugin, the CLI and the report.

Every metric takes one expert-load vector `c: [E]` (tokens routed to each expert, non-negative) or a
stack `[..., E]` and reduces the last axis. Definitions (E = number of experts, mean = sum(c) / E):

- CV (coefficient of variation) = std(c) / mean(c), with the POPULATION std
  (sqrt(sum((c - mean)^2) / E), numpy ddof=0): the E experts are the whole population, not a sample.
  [4, 4, 4, 4] -> 0; [1, 2, 3, 6] -> sqrt(3.5) / 3 = 0.6236.
- max/min = max(c) / min(c). A zero min with a non-zero max gives +inf (an idle expert: unbounded skew),
  which is why the report prefers max/mean. [1, 2, 3, 6] -> 6.
- max/mean ("imbalance ratio") = max(c) / mean(c); 1 is perfect balance, E is all load on one expert.
  [1, 2, 3, 6] -> 2.
- normalized entropy = H(p) / ln(E), p = c / sum(c), 0 * ln 0 = 0; 1 is perfect balance, 0 is all load on
  one expert. E = 1 gives 1.0 (one expert is trivially balanced). [2, 2, 0, 0] -> ln 2 / ln 4 = 0.5.
- Gini = sum_i sum_j |c_i - c_j| / (2 E^2 mean); 0 is perfect balance, (E - 1) / E is all load on one
  expert. [0, 0, 0, 4] -> 0.75; [1, 2, 3, 6] -> 0.3333.

An all-zero vector (a step in which a layer saw no tokens) has no defined balance: every metric returns
NaN for it, and the aggregates below skip NaN entries (they say how many they used).

Step-level aggregates over a `LoadTable` (counts `[S, L, E]` for S steps, L layers). Two definitions:

moekern's (`summarize`, the default, `--definition moekern`):
- per-step CV (`step_cv`): the CV of each (step, layer), averaged over the kept steps per layer, then
  over layers (overall). Each layer weighs the same, however many steps logged it.
- aggregated CV (`agg_cv`): each layer's counts summed over the kept steps, one CV per layer; overall is
  the mean over layers. Summing first hides step-to-step churn, so aggregated CV <= per-step CV typically.
  Per layer, because each layer routes on its own: summing layers first would let one layer's hot expert
  cancel another's cold one at the same index.
- both keep only steps with num_tokens <= `max_tokens` (default 1000: warm-up and profiling batches route
  dummy tokens and would swamp serving steps). `max_tokens=None` (`--no-filter`) keeps all.
- the same two forms for max/min, max/mean, entropy and Gini (`step_*`, `agg_*`).

The prior study's ("seed", `seed_summary`, `--definition seed`), reproduced exactly:
- per-step method (`step_cv`): the CV of every (step, layer) record, averaged over all records pooled,
  NO token filter;
- aggregated method (`agg_cv`): expert loads summed over every step of the experiment AND every layer
  into one vector [E], one CV of it; steps with more than 1000 tokens left out;
- CV = std / (mean + 1e-10) there, so an all-zero record counts as 0.
On one layer with the same steps kept the two definitions agree; they part where layers differ (theirs
pools layers) and where warm-up steps are present (their per-step method keeps them).

Loads come from `moekern.analysis.imbalance.loads` (gate logs or per-step JSON into a `LoadTable`: runs
kept apart, ranks combined once per run); its names are re-exported here.

numpy only; no torch, no vLLM.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from moekern.analysis.imbalance.loads import (  # noqa: F401  (re-exported: the loads' public names)
    COMBINE_RANKS, DEFAULT_MAX_TOKENS, LoadTable, load_runs, load_table, pool_runs)
from moekern.errors import UsageError


METRIC_NAMES = ("cv", "max_min", "max_mean", "entropy", "gini")


# ----------------------------------------------------------------------------------------- vector metrics
def _as_counts(c) -> np.ndarray:
    a = np.asarray(c, dtype=np.float64)
    if a.ndim == 0 or a.shape[-1] == 0:
        raise ValueError(f"expert counts must have shape [..., E] with E >= 1; got shape {a.shape}")
    if np.any(a < 0) or not np.all(np.isfinite(a)):
        raise ValueError("expert counts must be finite and non-negative")
    return a


def _zero_mask(a: np.ndarray) -> np.ndarray:
    return a.sum(axis=-1) == 0


def cv(c) -> np.ndarray | float:
    """Coefficient of variation, population std: `c: [..., E]` -> `[...]` float64 (NaN for all-zero)."""
    a = _as_counts(c)
    mean = a.mean(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(mean > 0, a.std(axis=-1, ddof=0) / np.where(mean > 0, mean, 1.0), np.nan)
    return _scalar(out)


def max_min(c) -> np.ndarray | float:
    """max/min load: `c: [..., E]` -> `[...]`; +inf when min is 0 and max > 0, NaN for all-zero."""
    a = _as_counts(c)
    mx, mn = a.max(axis=-1), a.min(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(mn > 0, mx / np.where(mn > 0, mn, 1.0), np.inf)
    out = np.where(mx == 0, np.nan, out)
    return _scalar(out)


def max_mean(c) -> np.ndarray | float:
    """Imbalance ratio max/mean: `c: [..., E]` -> `[...]` in [1, E]; NaN for all-zero."""
    a = _as_counts(c)
    mean = a.mean(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(mean > 0, a.max(axis=-1) / np.where(mean > 0, mean, 1.0), np.nan)
    return _scalar(out)


def normalized_entropy(c) -> np.ndarray | float:
    """H(c / sum c) / ln E: `c: [..., E]` -> `[...]` in [0, 1]; 1.0 when E == 1; NaN for all-zero."""
    a = _as_counts(c)
    total = a.sum(axis=-1, keepdims=True)
    e = a.shape[-1]
    with np.errstate(invalid="ignore", divide="ignore"):
        p = a / np.where(total > 0, total, 1.0)
        # 0.0 - sum, not -sum: one expert holding every token gives sum = 0.0, whose negation prints "-0.0"
        h = 0.0 - np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0), axis=-1)
    out = np.full(h.shape, 1.0) if e == 1 else h / math.log(e)
    out = np.where(_zero_mask(a), np.nan, out)
    return _scalar(out)


def gini(c) -> np.ndarray | float:
    """Gini coefficient: `c: [..., E]` -> `[...]` in [0, (E-1)/E]; NaN for all-zero.

    Uses the sorted form G = 2 * sum_i i * c_(i) / (E * sum c) - (E + 1) / E (i = 1..E, ascending), equal
    to the mean-absolute-difference definition in the module docstring.
    """
    a = _as_counts(c)
    e = a.shape[-1]
    s = np.sort(a, axis=-1)
    idx = np.arange(1, e + 1, dtype=np.float64)
    total = s.sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        g = 2.0 * (s * idx).sum(axis=-1) / (e * np.where(total > 0, total, 1.0)) - (e + 1.0) / e
    out = np.where(total > 0, np.maximum(g, 0.0), np.nan)
    return _scalar(out)


def uniform_routing_cv(num_tokens, num_experts: int, top_k) -> np.ndarray | float:
    """The noise floor of the CV: its root-mean-square value when each of `num_tokens` tokens picks `top_k`
    distinct experts of `num_experts` uniformly at random, sqrt((E - k) / (n * k)).

    Why: with few tokens per step, even a perfectly fair router shows a large per-step CV (sampling noise),
    so per-step CVs of runs with different step sizes (a 4-token decode step vs a 192-token denoising step)
    are compared through their ratio to this floor. Derivation: each expert's count is Binomial(n, k/E)
    (a token includes expert e with probability k/E), the mean n*k/E is fixed, so
    E[CV^2] = n (k/E)(1 - k/E) / (n k / E)^2 = (E - k) / (n k). E[CV] is slightly below this (Jensen).
    `num_tokens: [...]` (0 gives NaN), `top_k`: int or `[...]`; returns float64 `[...]`.
    """
    n = np.asarray(num_tokens, dtype=np.float64)
    k = np.asarray(top_k, dtype=np.float64)
    if num_experts < 1 or np.any(k < 1) or np.any(k > num_experts):
        raise ValueError(f"need 1 <= top_k <= num_experts={num_experts}; got top_k={top_k}")
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(n > 0, np.sqrt((num_experts - k) / np.where(n > 0, n * k, 1.0)), np.nan)
    return _scalar(out)


METRIC_FUNCS = {"cv": cv, "max_min": max_min, "max_mean": max_mean, "entropy": normalized_entropy, "gini": gini}


def all_metrics(c) -> dict[str, float]:
    """Every metric of one load vector `c: [E]` as a dict {name: float}."""
    return {k: float(f(c)) for k, f in METRIC_FUNCS.items()}


def _scalar(x: np.ndarray):
    return float(x) if np.ndim(x) == 0 else x


# --------------------------------------------------------------------------------------- placement loads
def contiguous_map(num_experts: int, ep_size: int) -> np.ndarray:
    """expert -> rank for vLLM's "linear" placement: `[E]` int64, expert e on rank e // (E / ep_size)."""
    _check_ep(num_experts, ep_size)
    return np.arange(num_experts) // (num_experts // ep_size)


def round_robin_map(num_experts: int, ep_size: int) -> np.ndarray:
    """expert -> rank for vLLM's "round_robin" placement: `[E]` int64, expert e on rank e % ep_size."""
    _check_ep(num_experts, ep_size)
    return np.arange(num_experts) % ep_size


def _check_ep(num_slots: int, ep_size: int) -> None:
    if ep_size < 1 or num_slots % ep_size:
        raise UsageError(f"ep_size={ep_size} must be >= 1 and divide the number of expert slots={num_slots}")


def rank_loads(counts, ep_size: int, expert_to_rank=None, physical_to_logical=None) -> np.ndarray:
    """Tokens processed by each EP rank: `counts: [..., E]` -> `[..., ep_size]` float64.

    Placement is one of:
    - `expert_to_rank: [E]` ints (or `[L, E]` matching a `[S, L, E]` stack): each expert lives on one rank;
    - `physical_to_logical: [P]` (or `[L, P]`), EPLB's form: P physical slots, P % ep_size == 0, slot p on
      rank p // (P / ep_size), holding logical expert physical_to_logical[p]. An expert with r replicas is
      assumed to split its tokens evenly among them (vLLM EPLB spreads a logical expert's tokens over its
      replicas);
    - neither: contiguous ("linear").
    """
    a = _as_counts(counts)
    e = a.shape[-1]
    if expert_to_rank is not None and physical_to_logical is not None:
        raise ValueError("give expert_to_rank or physical_to_logical, not both")
    if physical_to_logical is None:
        e2r = contiguous_map(e, ep_size) if expert_to_rank is None else np.asarray(expert_to_rank, dtype=np.int64)
        if e2r.shape[-1] != e:
            raise ValueError(f"expert_to_rank must have {e} entries (E); got shape {e2r.shape}")
        if e2r.size and (e2r.min() < 0 or e2r.max() >= ep_size):
            raise ValueError(f"expert_to_rank values must lie in [0, ep_size={ep_size})")
        onehot = np.eye(ep_size)[e2r]  # [..., E, ep]
        return np.einsum("...e,...er->...r", a, onehot)
    p2l = np.asarray(physical_to_logical, dtype=np.int64)
    p = p2l.shape[-1]
    _check_ep(p, ep_size)
    if p2l.min() < 0 or p2l.max() >= e:
        raise ValueError(f"physical_to_logical values must lie in [0, E={e})")
    onehot = np.eye(e)[p2l]  # [..., P, E]
    replicas = onehot.sum(axis=-2)  # [..., E]
    if np.any(replicas == 0):
        raise ValueError("physical_to_logical must hold every logical expert at least once")
    share = onehot / replicas[..., None, :]  # fraction of expert e's tokens that slot p takes
    slot_load = np.einsum("...e,...pe->...p", a, share)
    per = p // ep_size
    return slot_load.reshape(*slot_load.shape[:-1], ep_size, per).sum(axis=-1)


# ------------------------------------------------------------------------------------------- load tables
def table_from_counts(counts, num_tokens=None, steps=None) -> LoadTable:
    """A LoadTable from an array `counts: [S, L, E]` (or `[S, E]` for one layer)."""
    a = _as_counts(counts)
    if a.ndim == 2:
        a = a[:, None, :]
    if a.ndim != 3:
        raise ValueError(f"counts must be [S, L, E] or [S, E]; got shape {a.shape}")
    s = a.shape[0]
    nt = a[:, 0, :].sum(axis=-1) if num_tokens is None else np.asarray(num_tokens, dtype=np.float64)
    st = np.arange(s) if steps is None else np.asarray(steps)
    return LoadTable(a, np.ones(a.shape[:2], dtype=bool), st, nt, ["unknown"] * s)


# ------------------------------------------------------------------------------------------- summaries
@dataclass
class ImbalanceSummary:
    """Imbalance of a LoadTable. `per_layer[name]: [L]`, `overall[name]`: mean over layers (NaN-skipping).
    Step-wise metrics (`step_*`) average the per-(step, layer) value over kept steps; `agg_*` sum the counts
    over kept steps first. `steps_used`/`steps_dropped`: the warm-up filter's effect."""

    per_layer: dict[str, list[float]]
    overall: dict[str, float]
    steps_used: int
    steps_dropped: int
    max_tokens: int | None
    num_layers: int
    num_experts: int
    runs: list[str] = field(default_factory=list)  # the runs pooled into these numbers
    definition: str = "moekern"

    def to_dict(self) -> dict:
        return {"definition": self.definition, "overall": self.overall, "per_layer": self.per_layer,
                "steps_used": self.steps_used, "steps_dropped": self.steps_dropped, "max_tokens": self.max_tokens,
                "num_layers": self.num_layers, "num_experts": self.num_experts, "runs": self.runs}


def per_step_metric(table: LoadTable, name: str = "cv", max_tokens: int | None = DEFAULT_MAX_TOKENS) -> np.ndarray:
    """`[S_kept, L]` metric per (step, layer); NaN where the record is missing or the layer saw no tokens."""
    t = table.select(table.step_mask(max_tokens))
    vals = METRIC_FUNCS[name](t.counts) if t.num_steps else np.zeros((0, t.num_layers))
    return np.where(t.present, vals, np.nan)


def summarize(table: LoadTable, max_tokens: int | None = DEFAULT_MAX_TOKENS) -> ImbalanceSummary:
    """Per-layer and overall imbalance (see module docstring for the definitions)."""
    mask = table.step_mask(max_tokens)
    t = table.select(mask)
    per_layer: dict[str, list[float]] = {}
    overall: dict[str, float] = {}
    for name, f in METRIC_FUNCS.items():
        if t.num_steps:
            vals = np.where(t.present, f(t.counts), np.nan)  # [S, L]
            step_layer = _nanmean(vals, axis=0)
            agg = f(np.where(t.present[..., None], t.counts, 0.0).sum(axis=0))  # [L]
        else:
            step_layer = agg = np.full(t.num_layers, np.nan)
        agg = np.atleast_1d(agg)
        per_layer[f"step_{name}"] = [float(x) for x in step_layer]
        per_layer[f"agg_{name}"] = [float(x) for x in agg]
        overall[f"step_{name}"] = float(_nanmean(step_layer))
        overall[f"agg_{name}"] = float(_nanmean(agg))
    return ImbalanceSummary(per_layer, overall, int(mask.sum()), int((~mask).sum()), max_tokens,
                            table.num_layers, table.num_experts, [r for r in table.run_names if r])


SEED_MAX_TOKENS = 1000


def _seed_cv(a: np.ndarray) -> np.ndarray:
    """std / (mean + 1e-10), population std, over the last axis: the seed scripts' CV, so that their numbers
    come out to the last bit (an all-zero vector gives 0, not NaN)."""
    return a.std(axis=-1) / (a.mean(axis=-1) + 1e-10)


def seed_summary(table: LoadTable) -> ImbalanceSummary:
    """The prior study's ("seed") two CVs, exactly as its scripts computed them (`--definition seed`):

    - step_cv (its per-step method): the CV of every (step, layer) record, averaged over all records of the
      table pooled (layers and runs alike), NO token filter; an all-zero record counts as CV 0;
    - agg_cv (its aggregated method): the expert loads summed over every step with num_tokens <= 1000 and
      over every layer into ONE vector `[E]`, one CV of it.

    Both use std / (mean + 1e-10). Only the CV has a seed definition: `overall` holds these two numbers,
    `per_layer` is empty; steps_used/steps_dropped describe the aggregated method's filter."""
    mask = table.step_mask(SEED_MAX_TOKENS)
    recs = table.counts[table.present]  # [records, E]
    step_cv = float(_seed_cv(recs).mean()) if len(recs) else float("nan")
    kept = np.where(table.present[..., None], table.counts, 0.0)[mask]  # [S_kept, L, E]
    total = kept.sum(axis=(0, 1))
    agg_cv = float(_seed_cv(total)) if kept.size and total.sum() > 0 else float("nan")
    return ImbalanceSummary({}, {"step_cv": step_cv, "agg_cv": agg_cv}, int(mask.sum()), int((~mask).sum()),
                            SEED_MAX_TOKENS, table.num_layers, table.num_experts,
                            [r for r in table.run_names if r], "seed")


DEFINITIONS = ("moekern", "seed")


def summarize_as(table: LoadTable, definition: str = "moekern",
                 max_tokens: int | None = DEFAULT_MAX_TOKENS) -> ImbalanceSummary:
    """`summarize(table, max_tokens)` for definition "moekern", `seed_summary(table)` for "seed" (which
    fixes its own token filter, so `max_tokens` is not used)."""
    if definition == "moekern":
        return summarize(table, max_tokens)
    if definition == "seed":
        return seed_summary(table)
    raise UsageError(f"definition={definition!r} must be one of {', '.join(DEFINITIONS)}")


def _nanmean(x, axis=None):
    """Mean ignoring NaN (inf kept: max/min of an idle expert is unbounded); NaN when nothing is left."""
    x = np.asarray(x, dtype=np.float64)
    ok = ~np.isnan(x)
    n = ok.sum(axis=axis)
    with np.errstate(invalid="ignore", divide="ignore"):
        s = np.where(ok, x, 0.0).sum(axis=axis)
        return np.where(n > 0, s / np.where(n > 0, n, 1), np.nan)


def rank_load_summary(table: LoadTable, ep_size: int, expert_to_rank=None, physical_to_logical=None,
                      max_tokens: int | None = DEFAULT_MAX_TOKENS) -> dict:
    """Per-rank load under a placement: tokens per rank summed over kept steps and layers (`rank_tokens`,
    [ep]); "step_max_mean": max/mean of rank loads per (step, layer), averaged; "agg_max_mean": max/mean
    of each layer's rank loads summed over steps, averaged over layers."""
    t = table.select(table.step_mask(max_tokens))
    c = np.where(t.present[..., None], t.counts, 0.0)
    loads = rank_loads(c, ep_size, expert_to_rank, physical_to_logical)  # [S, L, ep]
    step_ratio = np.where(t.present, max_mean(loads) if loads.size else np.nan, np.nan)
    total = loads.sum(axis=(0, 1)) if loads.size else np.zeros(ep_size)
    return {"ep_size": ep_size, "rank_tokens": [float(x) for x in total],
            "step_max_mean": float(_nanmean(step_ratio)),
            "agg_max_mean": float(_nanmean(max_mean(loads.sum(axis=0)))) if loads.size else float("nan")}
