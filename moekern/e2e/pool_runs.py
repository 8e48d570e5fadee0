"""Pool the offline timed passes of several `moekern e2e` invocations of the same workload into one A/B.

    python -m moekern.e2e.pool_runs RESULTS_DIR [RESULTS_DIR ...] [--base vllm] [--arm moekern] [--json]

Each RESULTS_DIR holds one e2e_<model>.json written by `moekern e2e` (--mode offline). Per directory it prints
the two arms' medians, their ratio and the per-round ratios; then the passes of all directories pooled: the
ratio of the pooled medians (arm / base) with a seeded bootstrap 95 % interval (moekern.e2e.stats.ratio_ci). With
--base moekern-routing --arm moekern-routing-log the ratio is 1 - gate-log overhead. Directories whose runs
differ in model or workload are refused (a pooled A/B must be of one workload); a run that was not steady
state (JIT while timed) is refused unless --include-unsteady.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from moekern.e2e.stats import ratio_ci, round_ratios, steady_state, tok_s

WORKLOAD_KEYS = ("num_prompts", "input_len", "output_len")


def load(d: Path) -> dict:
    files = sorted(d.glob("e2e_*.json"))
    if len(files) != 1:
        raise ValueError(f"{d}: expected one e2e_<model>.json, found {len(files)}")
    return json.loads(files[0].read_text())


def pool(dirs: list[Path], base: str, arm: str, include_unsteady: bool = False) -> dict:
    per_dir, all_base, all_arm, ident = [], [], [], None
    for d in dirs:
        res = load(d)
        meta = res.get("meta") or {}
        this = (meta.get("model"), tuple((meta.get("workload") or {}).get(k) for k in WORKLOAD_KEYS),
                (meta.get("engine") or {}).get("max_num_seqs"))
        if ident is None:
            ident = this
        elif this != ident:
            raise ValueError(f"{d}: model/workload/max_num_seqs {this} differ from the first directory's {ident}")
        offline = res.get("offline") or {}
        for name in (base, arm):
            if not tok_s((offline.get(name) or {}).get("runs")):
                raise ValueError(f"{d}: no timed offline passes of arm {name!r} (arms: {sorted(offline)})")
        steady, why = steady_state(res, "offline")
        if not steady and not include_unsteady:
            raise ValueError(f"{d}: not steady state ({why}); pass --include-unsteady to pool it anyway")
        b, a = tok_s(offline[base]["runs"]), tok_s(offline[arm]["runs"])
        by_round = [x for x in round_ratios(offline[arm].get("rounds"), offline[base].get("rounds"), None) or []
                    if x is not None]
        per_dir.append({"dir": str(d), "base_median": statistics.median(b), "arm_median": statistics.median(a),
                        "ratio": statistics.median(a) / statistics.median(b), "n": (len(b), len(a)),
                        "by_round": by_round, "ci95": ratio_ci(b, a), "steady_state": steady})
        all_base += b
        all_arm += a
    return {"base": base, "arm": arm, "model": ident[0], "workload": dict(zip(WORKLOAD_KEYS, ident[1])),
            "max_num_seqs": ident[2], "runs": per_dir, "pooled": {
                "base_median": statistics.median(all_base), "arm_median": statistics.median(all_arm),
                "ratio": statistics.median(all_arm) / statistics.median(all_base),
                "n": (len(all_base), len(all_arm)), "ci95": ratio_ci(all_base, all_arm),
                "rounds": [x for r in per_dir for x in r["by_round"]]}}


def format_pool(p: dict) -> str:
    lines = [f"{p['arm']} / {p['base']}, {p['model']}, {p['workload']}, max_num_seqs {p['max_num_seqs']}"]
    for r in p["runs"]:
        ci = r["ci95"]
        lines.append(f"  {r['dir']}: {r['base_median']:.0f} vs {r['arm_median']:.0f} tok/s, ratio {r['ratio']:.3f}"
                     + (f" (95 % CI {ci[0]:.3f}-{ci[1]:.3f})" if ci else "") + f", n={r['n'][0]}/{r['n'][1]}"
                     + (", rounds " + ", ".join(f"{x:.3f}" for x in r["by_round"]) if r["by_round"] else ""))
    q = p["pooled"]
    ci = q["ci95"]
    lines.append(f"  pooled: {q['base_median']:.0f} vs {q['arm_median']:.0f} tok/s, ratio {q['ratio']:.3f}"
                 + (f" (95 % CI {ci[0]:.3f}-{ci[1]:.3f})" if ci else "") + f", n={q['n'][0]}/{q['n'][1]}"
                 + (f", {len(q['rounds'])} rounds: " + ", ".join(f"{x:.3f}" for x in q["rounds"]) if q["rounds"]
                    else ""))
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m moekern.e2e.pool_runs", description=__doc__.splitlines()[0])
    ap.add_argument("dirs", nargs="+", type=Path)
    ap.add_argument("--base", default="vllm")
    ap.add_argument("--arm", default="moekern")
    ap.add_argument("--include-unsteady", action="store_true")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    try:
        p = pool(args.dirs, args.base, args.arm, args.include_unsteady)
    except (ValueError, OSError) as exc:
        print(f"pool_runs: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(p, indent=1) if args.json else format_pool(p))
    return 0


if __name__ == "__main__":
    sys.exit(main())
