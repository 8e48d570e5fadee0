"""Analyse one end-to-end run folder (`moekern e2e` output) into RUN_DIR/analysis/:

- report.md + report_files/*.png: `moekern report RUN_DIR --metadata RUN_DIR/analysis/metadata.json`
  (serving table, imbalance per gate log overall / per phase / per layer, placement advice for EP 2/4/8);
- imbalance.json: the numbers behind the imbalance tables and the placement advice, per gate log;
- checks.md: hand checks of the numbers (sum of counts = tokens x k in every record; one step's CV, max/mean,
  entropy and Gini recomputed in plain Python; layers identical or not).

    python analysis/analyze_e2e.py benchmarks/results/e2e/h100-2026-11-23

RUN_DIR/analysis/metadata.json (title, caveats, EP sizes, the command) must exist: caveats are the run's
author's to write. The run folder itself is never modified.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np


def hand_check(gate_dir: Path) -> list[str]:
    """Plain-Python checks of one gate log (no moekern.metrics), compared with moekern's numbers."""
    from moekern import gatelog
    from moekern.analysis.imbalance.metrics import all_metrics

    recs, skipped = gatelog.read_gate_log(gate_dir)
    bad = [r for r in recs if sum(r.expert_counts) != r.num_tokens * r.top_k]
    steps = sorted({r.step for r in recs})
    by = {}
    for r in recs:
        by.setdefault(r.step, {})[r.layer] = r
    ident = sum(1 for s in steps if len({tuple(r.expert_counts) for r in by[s].values()}) == 1)
    out = [f"### {gate_dir}", "",
           f"- {len(recs)} records, {len(skipped)} skipped lines, {len(steps)} steps x "
           f"{len({r.layer for r in recs})} layers; phases (layer 0): "
           + ", ".join(f"{p} {sum(1 for r in recs if r.layer == 0 and r.phase == p)}"
                       for p in ("prefill", "mixed", "decode")),
           f"- sum(expert_counts) == num_tokens * top_k: {len(recs) - len(bad)} / {len(recs)} records",
           f"- steps whose layers all have identical counts: {ident} / {len(steps)}"]
    # one decode step, layer 0, by hand
    r = next(x for x in recs if x.layer == 0 and x.phase == "decode" and x.num_tokens >= 16)
    c = [float(v) for v in r.expert_counts]
    e = len(c)
    mean = sum(c) / e
    std = math.sqrt(sum((v - mean) ** 2 for v in c) / e)
    p = [v / sum(c) for v in c]
    ent = -sum(q * math.log(q) for q in p if q > 0) / math.log(e)
    gini = sum(abs(a - b) for a in c for b in c) / (2 * e * e * mean)
    hand = {"cv": std / mean, "max_mean": max(c) / mean, "entropy": ent, "gini": gini,
            "max_min": max(c) / min(c) if min(c) > 0 else float("inf")}
    ours = all_metrics(c)
    out += [f"- step {r.step} (layer 0, {r.phase}, {r.num_tokens} tokens, top_k {r.top_k}): counts {r.expert_counts}, "
            f"sum {int(sum(c))} = {r.num_tokens} x {r.top_k}; mean {mean:.4g}, population std {std:.4g}",
            "  " + "; ".join(f"{k}: hand {hand[k]:.6g} / moekern {ours[k]:.6g}" for k in hand)]
    ok = all(math.isclose(hand[k], ours[k], rel_tol=1e-9) or hand[k] == ours[k] for k in hand)
    out.append(f"- hand values equal moekern.analysis.imbalance.metrics: {'yes' if ok else 'NO'}")
    return out + [""]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir")
    ap.add_argument("--n-boot", type=int, default=1000)
    args = ap.parse_args(argv)
    from moekern import gatelog
    from moekern.analysis.imbalance.metrics import load_table
    from moekern.analysis.placement.advice import advise
    from moekern.analysis.report.html import imbalance_tables, write_report

    run = Path(args.run_dir)
    out = run / "analysis"
    meta_path = out / "metadata.json"
    if not meta_path.is_file():
        print(f"error: {meta_path} is missing (title, caveats, ep_sizes, command)", file=sys.stderr)
        return 2
    meta = json.loads(meta_path.read_text())
    write_report(run, out / "report.md", n_boot=args.n_boot, metadata=meta_path)
    numbers, checks = {}, ["# Hand checks of the gate-log numbers", "",
                           f"Made by `{meta.get('command', 'python analysis/analyze_e2e.py ' + str(run))}`.", ""]
    for g in sorted({f.parent for f in gatelog.gate_log_files(run)}):
        t = load_table(g)
        key = str(g.relative_to(run))
        numbers[key] = imbalance_tables(t)
        numbers[key]["placement"] = {}
        for ep in meta.get("ep_sizes", [2, 4, 8]):
            adv = advise(t, int(ep)).to_json()
            adv["recommended"].pop("physical_to_logical")  # [L, P] maps: in the report's tables, not here
            numbers[key]["placement"][str(ep)] = adv
        checks += hand_check(g)
    (out / "imbalance.json").write_text(json.dumps(numbers, indent=1, default=float) + "\n")
    (out / "checks.md").write_text("\n".join(checks) + "\n")
    print(f"wrote {out / 'report.md'}, {out / 'imbalance.json'}, {out / 'checks.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
