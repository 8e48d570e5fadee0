"""`moekern recommend`: layout and expert placement for a model on N GPUs, from analytic scores and the
learned predictor side by side.

Candidates: the layouts TP N, EP N (data-parallel attention) and TP N + EP N (hybrid), and, for the EP
layouts, each placement strategy (contiguous, round_robin, greedy, replicate, coactivation; scored on
held-out steps of the gate log when one is given). Per candidate:
- analytic: weights per GPU (moekern.models.weight_bytes_per_gpu) against `gpu_mem_gb`, rank-load
  max/mean and fan-out (moekern.analysis.imbalance.coactivation.placement_study), projected step time (moekern.analysis.placement.
  project) for EP layouts when the gate log's expert count matches the model;
- learned: predicted output throughput and TPOT (moekern.analysis.study.learned), flagged when the configuration
  lies outside the predictor's training range.
The pick: among candidates that fit in memory, the highest predicted throughput decides the layout when
the predictor is inside its training range for the layouts being compared; otherwise the layout with the
lowest analytic projected step time (or least memory, without a gate log). Within an EP layout the
placement with the lowest held-out max/mean wins, ties broken by lower fan-out.
"""

from __future__ import annotations

import math


def recommend(model: str, gpus: int, gate_log=None, max_num_seqs: int = 64, max_num_batched_tokens: int = 8192,
              moe_backend: str = "moekern", gpu_mem_gb: float = 80.0, dtype_bytes: float = 2.0,
              predictor_path=None, tokens_per_gpu: int = 256, combine_ranks: str = "auto") -> dict:
    from moekern.models import get_model, standard_layouts, weight_bytes_per_gpu
    from moekern.analysis.study import learned
    from moekern.errors import UsageError

    spec = get_model(model)
    pred, pred_note = learned.load(predictor_path)
    study, cv, proj = None, None, {}
    notes = [f"predictor: {pred_note}"]
    if pred.synthetic:
        notes.append("the learned predictor was trained on SYNTHETIC data: its numbers show the pipeline, "
                     "not real serving")
    if gate_log is not None and not (spec.is_moe and gpus > 1):
        notes.append(f"gate log not used: {'model ' + spec.name + ' is dense' if not spec.is_moe else 'one GPU'} "
                     "has no expert placement to score")
    elif gate_log is not None:
        from moekern.analysis.imbalance.metrics import load_table, summarize
        from moekern.analysis.imbalance.coactivation import placement_study

        table = load_table(gate_log, combine_ranks=combine_ranks)
        if table.num_experts != spec.num_experts:
            raise UsageError(f"--gate-log {str(gate_log)!r} has {table.num_experts} experts but --model "
                             f"{spec.name} has {spec.num_experts}: give a log of that model")
        cv = summarize(table).overall["step_cv"]
        notes.append(f"gate log: {table.num_steps} steps, per-step CV {cv:.4f}, fed to the predictor as measured_cv "
                     "and used to score placements")
        try:
            study = placement_study(gate_log, gpus, combine_ranks=combine_ranks)
        except ValueError as exc:
            notes.append(f"placement scoring skipped: {exc}")
        if gpus % 8:
            notes.append(f"no step-time projection for {gpus} GPUs: the analytic projection models whole nodes of 8")
        else:
            from moekern.analysis.placement.project import project_from_gate_log

            try:
                rows, _ = project_from_gate_log(gate_log, model, nodes=(gpus // 8,), tokens_per_gpu=tokens_per_gpu,
                                                combine_ranks=combine_ranks)
                proj = {r.placement: r.step_ms for r in rows if r.gpus == gpus}
            except ValueError as exc:
                notes.append(f"projection skipped: {exc}")
    cands = []
    for name, (tp, ep) in standard_layouts(spec, gpus).items():
        mem = weight_bytes_per_gpu(spec, tp, ep, dtype_bytes)["total_bytes"] / 1e9
        cfg = {"model": spec.name, "tp": tp, "ep": ep, "gpus": gpus, "max_num_seqs": max_num_seqs,
               "max_num_batched_tokens": max_num_batched_tokens, "moe_backend": moe_backend, "measured_cv": cv}
        p = pred.predict([cfg]).iloc[0].to_dict()
        extra = pred.extrapolating(cfg)
        placements = [("-", math.nan, math.nan)]
        if ep > 1 and study is not None:
            placements = [(r.strategy + (f"+{r.num_redundant}" if r.num_redundant else ""), r.step_max_mean,
                           r.fan_out) for r in study["rows"]]
        for pl, mm, fo in placements:
            cands.append({"layout": name, "tp": tp, "ep": ep, "placement": pl, "weights_gb_per_gpu": mem,
                          "fits": mem <= gpu_mem_gb, "max_mean_load": mm, "fan_out": fo,
                          "projected_step_ms": proj.get(pl.split("+")[0], math.nan) if ep > 1 else math.nan,
                          "pred_output_throughput": p.get("output_throughput", math.nan),
                          "pred_mean_tpot_ms": p.get("mean_tpot_ms", math.nan), "extrapolated": extra})
    fit = [c for c in cands if c["fits"]] or cands
    if not any(c["fits"] for c in cands):
        notes.append(f"no layout fits {gpu_mem_gb} GB per GPU; showing the least memory")
    layouts = {c["layout"] for c in fit}
    in_range = all(not c["extrapolated"] for c in fit)
    tell_apart = predictor_tells_apart(fit)
    if len(layouts) > 1 and not tell_apart:
        tps = [c["pred_output_throughput"] for c in fit]
        notes.append(f"the learned predictor gives every layout the same throughput ({tps[0]:.1f} tok/s): it "
                     "cannot tell these layouts apart, so it does not rank them")
    if in_range and len(layouts) > 1 and tell_apart:
        best_layout = max(fit, key=lambda c: c["pred_output_throughput"])["layout"]
        how = "learned predictor (highest predicted throughput)"
    elif any(math.isfinite(c["projected_step_ms"]) for c in fit):
        best_layout = min((c for c in fit if math.isfinite(c["projected_step_ms"])),
                          key=lambda c: (c["projected_step_ms"], c["weights_gb_per_gpu"]))["layout"]
        why = "extrapolates here" if tell_apart else "cannot tell the layouts apart"
        how = f"analytic projection (lowest projected step time; the predictor {why})"
    else:
        best_layout = min(fit, key=lambda c: c["weights_gb_per_gpu"])["layout"]
        if gate_log is None:
            how = "least weight memory per GPU (no gate log for load/projection scores)"
        else:
            how = ("least weight memory per GPU (no step-time projection for this GPU count; the gate log picks "
                   "the placement within each expert-parallel layout)")
    in_layout = [c for c in fit if c["layout"] == best_layout]
    best = min(in_layout, key=lambda c: (c["max_mean_load"] if math.isfinite(c["max_mean_load"]) else 0.0,
                                         c["fan_out"] if math.isfinite(c["fan_out"]) else 0.0))
    return {"model": spec.name, "gpus": gpus, "candidates": cands, "recommended": best, "decided_by": how,
            "notes": notes}


def predictor_tells_apart(cands: list[dict], rel_tol: float = 1e-6) -> bool:
    """Whether the predicted throughputs of `cands` differ between layouts by more than `rel_tol` (a predictor
    that gives every layout the same number carries no information about the choice)."""
    by_layout: dict[str, float] = {}
    for c in cands:
        by_layout.setdefault(c["layout"], c["pred_output_throughput"])
    vals = [v for v in by_layout.values() if math.isfinite(v)]
    if len(vals) < 2:
        return False
    return max(vals) - min(vals) > rel_tol * max(abs(max(vals)), 1e-12)


def format_recommendation(rec: dict) -> str:
    lines = [f"model {rec['model']} on {rec['gpus']} GPU(s)",
             f"{'layout':12s} {'placement':15s} {'GB/GPU':>7s} {'fits':>4s} {'max/mean':>8s} {'fan-out':>7s} "
             f"{'proj ms':>8s} {'pred tok/s':>10s} {'pred TPOT':>9s}  extrapolated"]
    for c in rec["candidates"]:
        lines.append(f"{c['layout']:12s} {c['placement']:15s} {c['weights_gb_per_gpu']:7.1f} "
                     f"{'yes' if c['fits'] else 'no':>4s} {c['max_mean_load']:8.3f} {c['fan_out']:7.3f} "
                     f"{c['projected_step_ms']:8.2f} {c['pred_output_throughput']:10.1f} "
                     f"{c['pred_mean_tpot_ms']:9.2f}  {','.join(c['extrapolated']) or '-'}")
    b = rec["recommended"]
    lines.append(f"recommended: {b['layout']} placement {b['placement']} (decided by {rec['decided_by']})")
    return "\n".join(lines + [f"note: {n}" for n in rec["notes"]])
