"""`moekern bench-history`: every committed `moekern bench` run, side by side over time.

Each `moekern bench` run leaves a `results.json` (rows + environment: GPU, versions, date). This command
finds them under one or more folders, and for every run and (op, provider) gives the geometric mean over
shapes of the provider's time divided by the baseline provider's time (vLLM by default) in the *same* run
— ratios are only ever formed within one run, never across runs — with the number of shapes it covers.
A table (runs oldest first) and, with --plot, a PNG of those ratios by run.

    moekern bench-history                                   # everything under benchmarks/results
    moekern bench-history benchmarks/results --baseline flashinfer --plot history.png
    moekern bench-history --index                           # rewrite benchmarks/results/INDEX.md

CPU demo runs are left out unless --include-demo (their times are the Triton interpreter's).
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
from pathlib import Path

from moekern.bench import report
from moekern.errors import UsageError

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
    p.add_argument("--index", nargs="?", const="", default=None, metavar="PATH",
                   help=f"write the index of every run folder under the one folder given (one line per run: "
                        f"date, GPU, what, headline ratio, folder) to PATH (default FOLDER/{INDEX_FILE}) and stop")
    p.set_defaults(func=run_command)


def run_command(args) -> int:
    missing = [r for r in args.roots if not Path(r).is_dir()]
    if missing:
        print(f"moekern bench-history: no such folder: {', '.join(missing)}", file=sys.stderr)
        return 2
    if args.index is not None:
        return write_index(args.roots, args.index)
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


# ------------------------------------------------------------------------------------------ the results index
# One line per committed run folder, generated from what the folders hold: a run is a folder with files of its
# own that no enclosing folder (below the root) already claims. Nothing is typed in by hand: a cell the files
# cannot fill is "-".

INDEX_FILE = "INDEX.md"
_RUN_MARKERS = ("README.md", report.RESULTS_FILE, "gpu.txt")
_DATE = re.compile(r"(\d{4}-\d{2}-\d{2})")
_GPU = re.compile(r"\b([HABL]\d{2,3})\b", re.IGNORECASE)


def _is_run(folder: Path) -> bool:
    """A run's marker files, or any file of its own (a folder of dated logs is a run; a folder holding only
    folders, like e2e/, groups runs)."""
    return any((folder / m).is_file() for m in _RUN_MARKERS) or any(p.is_file() for p in folder.iterdir())


def find_run_folders(root: Path) -> list[Path]:
    """Every run folder under root (not root itself), outermost only: a folder inside a run is part of it."""
    found = []

    def walk(folder: Path):
        for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
            if _is_run(sub):
                found.append(sub)
            else:
                walk(sub)

    walk(root)
    return found


def _title(folder: Path) -> str:
    readme = folder / "README.md"
    if readme.is_file():
        for line in readme.read_text(errors="replace").splitlines():
            if line.startswith("# "):
                return line[2:].strip()
    return "-"


def _bench_results(folder: Path) -> list[tuple[Path, dict]]:
    runs, _ = find_runs([str(folder)])
    return runs


def _gpu(folder: Path, rel: str, title: str, bench: list[tuple[Path, dict]]) -> str:
    """The GPU model(s): gpu.txt (nvidia-smi's name column), a bench result's environment, the folder's name,
    the dated file names inside it, its README title; '-' if none names one."""
    names = set()
    for txt in sorted(folder.rglob("gpu.txt")):
        rows = txt.read_text(errors="replace").splitlines()
        if len(rows) > 1:
            names.update(m.upper() for m in _GPU.findall(rows[1].split(",")[0]))
    for _, data in bench:
        names.update(m.upper() for m in _GPU.findall(str(data["environment"].get("gpu", ""))))
    if not names:
        names.update(m.upper() for m in _GPU.findall(rel.replace("-", " ").replace("/", " ")))
    if not names:
        for p in folder.rglob("*"):
            if _DATE.search(p.name):
                names.update(m.upper() for m in _GPU.findall(p.name.replace("-", " ").replace("_", " ")))
    if not names:
        names.update(m.upper() for m in _GPU.findall(title))
    return ", ".join(sorted(names)) or "-"


def _date(folder: Path, rel: str, title: str, bench: list[tuple[Path, dict]]) -> str:
    """The run's date: from its folder name, its title, its bench results; for a folder collecting several
    dated files, their first and last date; '-' if nothing dates it."""
    for text in (rel, title):
        m = _DATE.search(text)
        if m:
            return m.group(1)
    dates = sorted(str(d["environment"].get("date", ""))[:10] for _, d in bench if d["environment"].get("date"))
    if not dates:
        dates = sorted({m.group(1) for p in folder.rglob("*") if (m := _DATE.search(p.name))})
    if not dates:
        return "-"
    return dates[0] if dates[0] == dates[-1] else f"{dates[0]} to {dates[-1]}"


def _bench_headline(bench: list[tuple[Path, dict]]) -> list[str]:
    """Per op, each provider's geomean time / vLLM's time over the shapes both timed in one results.json."""
    by_op: dict[str, list[str]] = {}
    for s in summarize(bench, "vllm"):
        if s["provider"] != "torch":
            prov = s["provider"].removeprefix("moekern-")
            by_op.setdefault(s["op"], []).append(f"{prov} {s['geomean_ratio']:.2f}x")
    if not by_op:
        return []
    return ["time / vLLM's, geomean: " + "; ".join(f"{op} {', '.join(v)}" for op, v in sorted(by_op.items()))]


def _ci(summary: dict, key: str, scale: float = 1.0, unit: str = "") -> str:
    ci = summary.get(f"{key}_ci95")
    if isinstance(ci, list) and len(ci) == 2:
        return f" (95 % CI {ci[0] * scale:.{1 if unit else 3}f} to {ci[1] * scale:.{1 if unit else 3}f}{unit})"
    return ""


def _e2e_headline(folder: Path) -> list[str]:
    """From each end-to-end result's summary: every arm's output throughput / vLLM's, and the gate log's
    overhead, with their 95 % intervals where the run pooled rounds; 'not steady' where JIT ran while timed."""
    parts = []
    for path in sorted(folder.rglob("e2e_*.json")):
        try:
            summary = json.loads(path.read_text()).get("summary") or {}
        except (OSError, ValueError):
            continue
        modes = sorted({k.split(".", 1)[0] for k in summary if "." in k})
        for mode in modes:
            got, overhead = [], []
            for key in sorted(summary):
                name = key.split(".", 1)[1] if key.startswith(mode + ".") else None
                value = summary[key]
                if name is None or isinstance(value, bool) or not isinstance(value, (int, float)):
                    continue
                if name.endswith("_vs_vllm"):
                    got.append(f"tok/s {name[:-8]} / vllm {value:.3f}x{_ci(summary, key)}")
                elif name == "gate_log_overhead":
                    overhead.append(f"gate-log overhead {value * 100:.1f} %{_ci(summary, key, 100, ' %')}")
            if got or overhead:
                steady = summary.get(f"{mode}.steady_state")
                note = "" if steady is True else "; not steady" if steady is False else "; steadiness not recorded"
                parts.append(f"{mode}: " + ", ".join(got + overhead) + note)
    return parts


def index_rows(root: Path) -> list[dict]:
    """One record per run folder under root: date, gpu, what (its README title), headline, folder (relative)."""
    rows = []
    for folder in find_run_folders(root):
        rel = folder.relative_to(root).as_posix()
        title = _title(folder)
        bench = _bench_results(folder)
        headline = _bench_headline(bench) + _e2e_headline(folder)
        rows.append({"date": _date(folder, rel, title, bench), "gpu": _gpu(folder, rel, title, bench),
                     "what": title, "headline": " / ".join(headline) or "-", "folder": rel})
    rows.sort(key=lambda r: (r["date"], r["folder"]))
    return rows


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_index(root: Path, index_path: Path) -> str:
    """INDEX.md's text: a table of index_rows(root), folder links relative to index_path's folder."""
    rel_root = Path(os.path.relpath(root.resolve(), index_path.resolve().parent)).as_posix()
    lines = [
        "# Committed results, oldest first",
        "",
        "Generated by `moekern bench-history --index` from the folders below; do not edit by hand (rerun it",
        "after adding a results folder). Headline: kernel benches give each provider's time over vLLM's (geomean",
        "over the shapes both timed in the same run; below 1 is faster); end-to-end runs give output throughput",
        "over vLLM's (above 1 is faster) and the gate log's overhead, from each run's own summary. \"-\": the",
        "folder's files give no such number. Each folder's README has the details and caveats.",
        "",
        "| date | GPU | what | headline | folder |",
        "|---|---|---|---|---|",
    ]
    for r in index_rows(root):
        link = r["folder"] if rel_root == "." else f"{rel_root}/{r['folder']}"
        lines.append(f"| {r['date']} | {r['gpu']} | {_cell(r['what'])} | {_cell(r['headline'])} | "
                     f"[`{r['folder']}/`]({link}/) |")
    return "\n".join(lines) + "\n"


def write_index(roots: list[str], path: str) -> int:
    """`--index [PATH]`: render the index of the one results folder given and write it (default FOLDER/INDEX.md)."""
    if len(roots) != 1:
        raise UsageError(f"--index takes exactly one results folder; got {len(roots)}: {', '.join(roots)}")
    root = Path(roots[0])
    out = Path(path) if path else root / INDEX_FILE
    text = render_index(root, out)
    out.write_text(text)
    print(f"wrote {out} ({text.count(chr(10)) - 10} runs)")
    return 0
