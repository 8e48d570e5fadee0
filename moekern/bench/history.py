"""`moekern bench-history`: every committed `moekern bench` run, side by side over time.

Each `moekern bench` run leaves a `results.json` (rows + environment: GPU, versions, date). This command
finds them under one or more folders, and for every run and (op, provider) gives the geometric mean over
shapes of the provider's time divided by the baseline provider's time (vLLM by default) in the *same* run
— ratios are only ever formed within one run, never across runs — with the number of shapes it covers.
A table (runs oldest first) and, with --plot, a PNG of those ratios by run.

    moekern bench-history                                   # everything under benchmarks/results
    moekern bench-history benchmarks/results --baseline flashinfer --plot history.png

CPU demo runs are left out unless --include-demo (their times are the Triton interpreter's).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from moekern.bench import report

DEFAULT_ROOT = "benchmarks/results"


def find_runs(roots: list[str], include_demo: bool = False) -> tuple[list[tuple[Path, dict]], list[str]]:
    """(path, data) of every results.json under roots that `moekern bench` wrote, oldest first, and a note
    per file that was skipped (unreadable, not a bench result, a demo)."""
    runs, skipped = [], []
    for root in roots:
        for path in sorted(Path(root).rglob(report.RESULTS_FILE)):
            try:
                data = report.load(str(path))
            except (OSError, ValueError) as exc:
                skipped.append(f"{path}: unreadable ({exc})")
                continue
            if not isinstance(data, dict) or not isinstance(data.get("rows"), list) \
                    or not isinstance(data.get("environment"), dict):
                skipped.append(f"{path}: not a moekern bench result")
                continue
            if data["environment"].get("demo") and not include_demo:
                skipped.append(f"{path}: CPU demo (--include-demo to show)")
                continue
            runs.append((path, data))
    runs.sort(key=lambda pd: (str(pd[1]["environment"].get("date", "")), str(pd[0])))
    return runs, skipped


def _key(row: dict) -> tuple:
    return row.get("shape"), row.get("block_size")


def summarize(runs: list[tuple[Path, dict]], baseline: str = "vllm") -> list[dict]:
    """One record per (run, op, provider other than the baseline) with both timed on at least one shape:
    geomean of provider time / baseline time over the shapes both timed correctly, and the counts."""
    out = []
    for path, data in runs:
        env = data["environment"]
        base = {_key(r): r["median_us"] for r in data["rows"]
                if r.get("provider") == baseline and r.get("status") == "ok" and r.get("median_us")}
        groups: dict[tuple[str, str], list[float]] = {}
        not_ok: dict[tuple[str, str], int] = {}
        for r in data["rows"]:
            prov = r.get("provider")
            if prov == baseline:
                continue
            g = (r.get("op", "?"), prov)
            if r.get("status") != "ok":
                if r.get("status") in ("wrong", "error"):
                    not_ok[g] = not_ok.get(g, 0) + 1
                continue
            b = base.get(_key(r))
            if b and r.get("median_us"):
                groups.setdefault(g, []).append(r["median_us"] / b)
        for (op, prov), ratios in sorted(groups.items()):
            out.append({
                "run": str(path.parent), "date": str(env.get("date", ""))[:10], "gpu": env.get("gpu") or "?",
                "op": op, "provider": prov, "baseline": baseline,
                "geomean_ratio": math.exp(sum(math.log(x) for x in ratios) / len(ratios)),
                "min_ratio": min(ratios), "max_ratio": max(ratios), "shapes": len(ratios),
                "wrong_or_failed": not_ok.get((op, prov), 0),
            })
    return out


def table(summary: list[dict]) -> str:
    """One line per (run, op, provider), runs oldest first: geomean ratio, its range over shapes, shapes."""
    import pandas as pd

    if not summary:
        return "(no ratios)"
    df = pd.DataFrame(summary)
    return pd.DataFrame({
        "run": df.run, "date": df.date, "gpu": df.gpu, "op": df.op, "provider": df.provider,
        "geomean": [f"{g:.3f}x" for g in df.geomean_ratio],
        "range": [f"{lo:.2f}-{hi:.2f}x" for lo, hi in zip(df.min_ratio, df.max_ratio)],
        "shapes": df.shapes, "wrong/failed": df.wrong_or_failed,
    }).to_string(index=False)


_RATIO_TICKS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 4.0, 5.0, 7.0, 10.0)


def _run_labels(runs: list[str], summary: list[dict]) -> list[str]:
    """One x label per run: its folder below the runs' common parent (unique, unlike the last two path parts),
    one path part per line, then its date."""
    import os

    parents = [str(Path(r).parent) for r in runs]
    common = os.path.commonpath(parents) if len(runs) > 1 else parents[0]
    out = []
    for r in runs:
        rel = Path(os.path.relpath(r, common)).parts
        date = next(s["date"] for s in summary if s["run"] == r)
        out.append("\n".join(rel) + f"\n{date}")
    return out


def plot(summary: list[dict], path: str) -> str:
    """Write `figure(summary)` as a PNG to `path`; returns the path."""
    import matplotlib.pyplot as plt

    fig = figure(summary)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def figure(summary: list[dict]):
    """Geomean ratio per run (x: runs oldest first, one label each), one line per op/provider, log y with
    labelled ratios, 1.0 marked. A matplotlib Figure (Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    runs = list(dict.fromkeys(s["run"] for s in summary))
    labels = _run_labels(runs, summary)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.9 * len(runs)) + 2.0, 4.8))  # + 2 in: the legend beside
    styles = ["-", "--", ":", "-."]
    for i, col in enumerate(sorted({(s["op"], s["provider"]) for s in summary})):
        pts = [(runs.index(s["run"]), s["geomean_ratio"]) for s in summary if (s["op"], s["provider"]) == col]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="os^D"[i // 10 % 4],
                ls=styles[i // 10 % 4], label=f"{col[0]} / {col[1]}")
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_yscale("log")
    # Log scale keeps 0.5x and 2x equally far from 1; matplotlib's log ticks label only powers of ten, so
    # an axis from 0.7x to 2.5x would carry one number. Label a fixed ladder of ratios inside the data range.
    lo, hi = ax.get_ylim()
    ticks = [t for t in _RATIO_TICKS if lo <= t <= hi] or [1.0]
    ax.yaxis.set_major_locator(matplotlib.ticker.FixedLocator(ticks))
    ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _pos: f"{v:g}x"))
    ax.yaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.grid(True, axis="y", alpha=0.3)
    ax.set_xticks(range(len(runs)), labels, fontsize=7)
    base = summary[0]["baseline"] if summary else "baseline"
    ax.set_ylabel(f"time / {base} time (geomean over shapes; < 1 is faster)")
    ax.set_title(f"moekern bench runs vs {base}, each ratio within one run")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the axes: no line hidden
    fig.tight_layout()
    return fig


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("bench-history", help="every committed bench run's ratios vs a baseline, over time",
                              description=__doc__)
    p.add_argument("roots", nargs="*", default=[DEFAULT_ROOT], help=f"folders to search (default {DEFAULT_ROOT})")
    p.add_argument("--baseline", default="vllm", help="provider the ratios divide by (default vllm)")
    p.add_argument("--plot", default=None, help="write a PNG of the ratios by run here")
    p.add_argument("--json", default=None, help="write the per-run summary records here")
    p.add_argument("--providers", default=None,
                   help="comma-separated providers to show (default: all but torch, the reference loop)")
    p.add_argument("--include-demo", action="store_true", help="also CPU demo runs (interpreter wall clock)")
    p.set_defaults(func=run_command)


def run_command(args) -> int:
    missing = [r for r in args.roots if not Path(r).is_dir()]
    if missing:
        print(f"moekern bench-history: no such folder: {', '.join(missing)}", file=sys.stderr)
        return 2
    runs, skipped = find_runs(args.roots, include_demo=args.include_demo)
    for note in skipped:
        print(f"skipped {note}", file=sys.stderr)
    summary = summarize(runs, args.baseline)
    keep = {x.strip() for x in args.providers.split(",") if x.strip()} if args.providers else None
    summary = [x for x in summary if (x["provider"] in keep if keep else x["provider"] != "torch")]
    if not summary:
        print(f"moekern bench-history: no run under {', '.join(args.roots)} timed '{args.baseline}' beside "
              f"another provider ({len(runs)} bench result(s) found)", file=sys.stderr)
        return 1
    print(f"{len(runs)} run(s); geomean: over shapes, time / {args.baseline} time in the same run "
          f"(range: over shapes)\n")
    print(table(summary))
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1) + "\n")
        print(f"\nwrote {args.json}")
    if args.plot:
        print(f"wrote {plot(summary, args.plot)}")
    return 0
