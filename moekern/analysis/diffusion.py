"""Routing imbalance per denoising step next to the autoregressive decode of a same-shape model (issue 13).

Inputs are two gate logs (moekern.gatelog/1, a file or a folder of gate_log*.jsonl):
- the AR side: an end-to-end vLLM run's log (`moekern e2e`; its "decode" steps are kept), and
- the diffusion side: `moekern diffusion generate --gate-log` or `moekern diffusion bench --gate-logs`
  (phase "diffusion": one step = one denoising forward).

Same shape means the same number of routed experts E and the same top-k: the CV of expert counts, its
noise floor and the placement it implies all depend on (E, k), so a CV of an E=8/k=2 Mixtral next to an
E=64/k=8 LLaDA-MoE compares two different things. `compare_routing` refuses a mismatch (ValueError naming
both shapes) unless `allow_shape_mismatch=True`, and then every output carries a SHAPE MISMATCH label. A
different number of MoE layers (today's e2e runs use 4-layer models) is labelled, not refused: the CV is
averaged over layers.

Steps of different sizes are made comparable through the sampling-noise floor
(moekern.analysis.imbalance.metrics.uniform_routing_cv: the CV a perfectly fair router shows at n tokens per step):
each side reports its per-step CV and its CV / floor.

What random weights can show: nothing about a trained model's routing (the diffusion engine's random
router, and vLLM's dummy weights, concentrate or spread tokens in their own ways). The comparison is only
meaningful between a same-shape AR run and diffusion run of trained checkpoints, or, with random weights,
as a check that the pipeline works.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np


@dataclass
class RoutingSide:
    """One side of the comparison: shape, and per-step CV (mean over layers) of the kept steps."""

    label: str
    path: str
    phase: str
    num_experts: int
    top_k: int
    num_layers: int
    model: str | None
    num_steps: int
    tokens_per_step: list[float]
    cv_per_step: list[float]  # [S] mean over layers
    uniform_cv_per_step: list[float]  # [S] metrics.uniform_routing_cv at that step's tokens
    summary: dict  # metrics.summarize(..., max_tokens=None).overall

    def stats(self) -> dict:
        cvs = np.asarray(self.cv_per_step, dtype=np.float64)
        floor = np.asarray(self.uniform_cv_per_step, dtype=np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            ratio = cvs / floor
        ok = np.isfinite(cvs)
        return {"steps": self.num_steps, "tokens_per_step_median": float(np.median(self.tokens_per_step)),
                "step_cv_mean": float(np.mean(cvs[ok])) if ok.any() else float("nan"),
                "step_cv_median": float(np.median(cvs[ok])) if ok.any() else float("nan"),
                "step_cv_p90": float(np.percentile(cvs[ok], 90)) if ok.any() else float("nan"),
                "cv_over_uniform_mean": float(np.nanmean(ratio)) if np.isfinite(ratio).any() else float("nan"),
                "agg_cv": self.summary["agg_cv"], "step_max_mean": self.summary["step_max_mean"],
                "step_entropy": self.summary["step_entropy"], "step_gini": self.summary["step_gini"]}


@dataclass
class RoutingComparison:
    ar: RoutingSide
    diffusion: RoutingSide
    shape_match: bool
    labels: list[str] = field(default_factory=list)  # SHAPE MISMATCH / layer-count notes

    def to_json(self) -> dict:
        return {"format": "moekern.ar_vs_diffusion/1", "shape_match": self.shape_match, "labels": self.labels,
                "ar": {**asdict(self.ar), "stats": self.ar.stats()},
                "diffusion": {**asdict(self.diffusion), "stats": self.diffusion.stats()}}

    def table_markdown(self) -> str:
        a, d = self.ar.stats(), self.diffusion.stats()
        rows = [("model", self.ar.model or "?", self.diffusion.model or "?"),
                ("experts E / top-k / MoE layers", f"{self.ar.num_experts} / {self.ar.top_k} / {self.ar.num_layers}",
                 f"{self.diffusion.num_experts} / {self.diffusion.top_k} / {self.diffusion.num_layers}"),
                ("phase kept", self.ar.phase, self.diffusion.phase)]
        for key, name in (("steps", "steps"), ("tokens_per_step_median", "tokens per step (median)"),
                          ("step_cv_mean", "per-step CV, mean"), ("step_cv_median", "per-step CV, median"),
                          ("step_cv_p90", "per-step CV, p90"), ("cv_over_uniform_mean", "per-step CV / uniform floor"),
                          ("agg_cv", "aggregated CV"), ("step_max_mean", "max/mean (step)"),
                          ("step_entropy", "normalized entropy (step)"), ("step_gini", "Gini (step)")):
            rows.append((name, _f(a[key]), _f(d[key])))
        out = [f"> **{lab}**" for lab in self.labels] + ([""] if self.labels else [])
        out += ["| | autoregressive decode | diffusion (per denoising step) |", "|---|---|---|"]
        out += [f"| {r[0]} | {r[1]} | {r[2]} |" for r in rows]
        return "\n".join(out) + "\n"


def _f(x) -> str:
    return "n/a" if isinstance(x, float) and not math.isfinite(x) else (f"{x:.4g}" if isinstance(x, float) else str(x))


def load_side(path, phase: str, label: str, max_tokens: int | None = None) -> RoutingSide:
    """Read one gate log and keep the records of `phase` (and steps <= max_tokens tokens when given)."""
    from moekern import gatelog
    from moekern.analysis.imbalance.metrics import cv, load_table, summarize, uniform_routing_cv

    records, _ = gatelog.read_gate_log(path)
    recs = [r for r in records if r.phase == phase]
    if not recs:
        have = sorted({r.phase for r in records})
        raise ValueError(f"{label} gate log {str(path)!r} has no {phase!r} records (phases present: {have})")
    ks = {r.top_k for r in recs if r.top_k is not None}
    es = {len(r.expert_counts) for r in recs}
    if len(ks) > 1 or len(es) > 1:
        raise ValueError(f"{label} gate log {str(path)!r} mixes shapes: top_k {sorted(ks)}, experts {sorted(es)}")
    e = es.pop()
    if ks:
        k = ks.pop()
    else:  # top_k is optional in the schema: recover it from sum(counts) = tokens * k
        k = int(round(sum(recs[0].expert_counts) / max(recs[0].num_tokens, 1)))
    table = load_table(path, phase=phase)
    if max_tokens is not None:
        table = table.select(table.step_mask(max_tokens))
    if table.num_steps == 0:
        raise ValueError(f"{label} gate log {str(path)!r}: no {phase!r} step has <= {max_tokens} tokens")
    vals = np.where(table.present, cv(table.counts), np.nan)  # [S, L]
    with np.errstate(invalid="ignore"):
        per_step = np.nanmean(vals, axis=1)
    floor = uniform_routing_cv(table.num_tokens, e, k)
    models = sorted({r.model for r in recs if r.model})
    return RoutingSide(label=label, path=str(path), phase=phase, num_experts=e, top_k=int(k),
                       num_layers=table.num_layers, model=", ".join(models) or None, num_steps=table.num_steps,
                       tokens_per_step=[float(x) for x in table.num_tokens],
                       cv_per_step=[float(x) for x in per_step],
                       uniform_cv_per_step=[float(x) for x in np.atleast_1d(floor)],
                       summary=summarize(table, max_tokens=None).overall)


def compare_routing(ar_path, diffusion_path, *, ar_phase: str = "decode", diffusion_phase: str = "diffusion",
                    allow_shape_mismatch: bool = False, max_tokens: int | None = None) -> RoutingComparison:
    """Per-step routing imbalance of an AR gate log's `ar_phase` steps and a diffusion gate log's
    `diffusion_phase` steps. Raises ValueError on an (E, top_k) mismatch unless allow_shape_mismatch."""
    ar = load_side(ar_path, ar_phase, "autoregressive", max_tokens)
    dif = load_side(diffusion_path, diffusion_phase, "diffusion", max_tokens)
    match = (ar.num_experts, ar.top_k) == (dif.num_experts, dif.top_k)
    labels = []
    if not match:
        msg = (f"SHAPE MISMATCH: autoregressive E={ar.num_experts} top_k={ar.top_k} ({ar.model or ar.path}) vs "
               f"diffusion E={dif.num_experts} top_k={dif.top_k} ({dif.model or dif.path}); their CVs are not "
               "comparable (CV and its noise floor depend on E and k). Run the AR side at the diffusion model's "
               "shape (e.g. moekern e2e --model olmoe-1b-7b for E=64 k=8)")
        if not allow_shape_mismatch:
            raise ValueError(msg + ", or pass allow_shape_mismatch=True / --allow-shape-mismatch to see them anyway")
        labels.append(msg)
    if ar.num_layers != dif.num_layers:
        labels.append(f"different depth: {ar.num_layers} AR MoE layers vs {dif.num_layers} diffusion MoE layers "
                      "(CVs are means over layers)")
    return RoutingComparison(ar, dif, match, labels)


def write_comparison(comp: RoutingComparison, out_dir, tag: str = "ar_vs_diffusion") -> list[Path]:
    """<tag>.json, <tag>.md (table) and <tag>.png (per-step CV of both sides with their noise floors)."""
    d = Path(out_dir)
    d.mkdir(parents=True, exist_ok=True)
    pj, pm, pp = d / f"{tag}.json", d / f"{tag}.md", d / f"{tag}.png"
    pj.write_text(json.dumps(comp.to_json(), indent=1, default=float), encoding="utf-8")
    pm.write_text(comp.table_markdown(), encoding="utf-8")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharey=True)
    for ax, side in zip(axes, (comp.ar, comp.diffusion)):
        x = np.arange(side.num_steps)
        ax.plot(x, side.cv_per_step, lw=1, label="CV (mean over layers)")
        ax.plot(x, side.uniform_cv_per_step, lw=0.8, color="gray", label="uniform-routing floor")
        ax.set_xlabel(f"{side.phase} step")
        ax.set_title(f"{side.label}: E={side.num_experts} k={side.top_k}, {side.model or ''}", fontsize=8)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("CV of expert counts")
    axes[0].legend(fontsize=7)
    title = " | ".join(comp.labels)[:160] if comp.labels else "same shape"
    fig.suptitle(title, fontsize=7, color="red" if not comp.shape_match else "black")
    fig.tight_layout()
    fig.savefig(pp, dpi=110)
    plt.close(fig)
    return [pj, pm, pp]
