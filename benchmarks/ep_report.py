"""Scaling report over distributed bench_ep runs (W = 2, 4, 8): efficiency vs W=2, targets, a plot.

    python benchmarks/ep_report.py DIR [--out OUTDIR]      # or: python benchmarks/bench_ep.py --report DIR

Reads DIR/bench_ep_w*.json (written by `torchrun ... bench_ep.py --distributed`), and writes
OUTDIR/ep_scaling.json, ep_scaling.md and ep_scaling.png (OUTDIR defaults to DIR). The per-run pieces
bench_ep.py records and prints with (derive_row: a row's bandwidths, speedups and targets; format_table;
write_json) live here too.

Scaling efficiency (weak scaling: tokens per rank fixed) of one case, backend and op at W:
    eff(W) = algbw(W) / algbw(2),  algbw = bytes a rank sends to other ranks / time
i.e. the per-GPU throughput of the exchange relative to two GPUs; 1.0 means adding GPUs costs no per-GPU
throughput. Plain time ratios t(2)/t(W) are recorded too (they ignore that the remote share of the bytes,
(W-1)/W of a token's destinations, grows with W). Cases missing W=2 get no efficiency.
"""

from __future__ import annotations

import argparse
import glob
import json
import os

OPS = ("dispatch", "combine")
BACKENDS = ("nccl", "peer")


def load_runs(directory: str) -> dict[int, dict]:
    """{W: doc} for the distributed runs in directory; raises if two files claim the same W."""
    runs = {}
    for path in sorted(glob.glob(os.path.join(directory, "bench_ep_w*.json"))):
        with open(path) as f:
            doc = json.load(f)
        if doc.get("mode") != "distributed":
            continue
        W = int(doc["world_size"])
        if W in runs:
            raise ValueError(f"two runs with world_size={W} in {directory}: {runs[W]['_path']} and {path}")
        doc["_path"] = path
        runs[W] = doc
    if not runs:
        raise FileNotFoundError(f"no distributed bench_ep_w*.json in {directory}")
    return runs


def case_key(row) -> str:
    return f"{row['phase']} M={row['tokens_per_rank']} H={row['hidden']} E={row['num_experts']} {row['skew']}"


def scaling(runs: dict[int, dict]) -> list[dict]:
    """One row per (case, backend, op): time, algbw and efficiency vs W=2 at each W."""
    by_case: dict[str, dict[int, dict]] = {}
    for W, doc in runs.items():
        for r in doc["results"]:
            by_case.setdefault(case_key(r), {})[W] = r
    out = []
    for case, per_w in by_case.items():
        for be in BACKENDS:
            for op in OPS:
                us = {W: r.get(f"{be}_{op}_us") for W, r in sorted(per_w.items())}
                bw = {W: r.get(f"{be}_{op}_algbw_GBps") for W, r in sorted(per_w.items())}
                if all(v is None for v in us.values()):
                    continue
                base_bw, base_us = bw.get(2), us.get(2)
                eff = {W: (b / base_bw if (b is not None and base_bw) else None) for W, b in bw.items()}
                tratio = {W: (base_us / t if (t and base_us) else None) for W, t in us.items()}
                out.append(dict(case=case, backend=be, op=op, us=us, algbw_GBps=bw, efficiency_vs_w2=eff,
                                time_ratio_w2_over_w=tratio))
    return out


def targets(runs: dict[int, dict]) -> list[dict]:
    """Per W and case: the peer path's speedup over nccl and fraction of the measured peer bandwidth."""
    rows = []
    for W, doc in sorted(runs.items()):
        for r in doc["results"]:
            for op in OPS:
                rows.append(dict(world_size=W, case=case_key(r), op=op,
                                 speedup=r.get(f"peer_{op}_speedup_vs_nccl"),
                                 fraction_of_peer_bw=r.get(f"peer_{op}_fraction_of_peer_bw"),
                                 meets=r.get(f"peer_{op}_meets_targets")))
    return rows


def derive_row(row, bw):
    """Fill one distributed bench_ep row's derived columns in place: algorithmic bandwidths, peer/nccl
    speedups, fractions of the measured peer bandwidth (bw: {"bytes_per_s": ...} or None), targets met."""
    for op in ("dispatch", "combine"):
        nbytes = row[f"{op}_bytes_remote_per_rank_mean"]
        for be in ("nccl", "peer"):
            us = row.get(f"{be}_{op}_us")
            row[f"{be}_{op}_algbw_GBps"] = nbytes / (us * 1e-6) / 1e9 if us else None
        n, p = row.get(f"nccl_{op}_us"), row.get(f"peer_{op}_us")
        row[f"peer_{op}_speedup_vs_nccl"] = n / p if (n and p) else None
        frac = None
        if bw and row[f"peer_{op}_algbw_GBps"] is not None:
            frac = row[f"peer_{op}_algbw_GBps"] * 1e9 / bw["bytes_per_s"]
        row[f"peer_{op}_fraction_of_peer_bw"] = frac
        sp = row[f"peer_{op}_speedup_vs_nccl"]
        row[f"peer_{op}_meets_targets"] = None if (sp is None or frac is None) else bool(sp >= 1.5 and frac >= 0.7)


def format_table(doc) -> str:
    """A short fixed-width table of one distributed run."""
    def f(v, fmt="{:.1f}"):
        return "-" if v is None else fmt.format(v)

    bw = doc.get("peer_bandwidth")
    head = (f"W={doc['world_size']} {doc['device']} torch {doc['torch']} triton {doc['triton']} {doc['date']}\n"
            f"peer bandwidth: {f(bw and bw['bytes_per_s'] / 1e9)} GB/s"
            + (f" (peer path skipped: {doc['peer_skipped']})" if doc.get("peer_skipped") else ""))
    cols = ("case", "nccl disp us", "peer disp us", "x", "frac bw", "nccl comb us", "peer comb us", "x", "frac bw")
    lines = [head, " | ".join(cols)]
    for r in doc["results"]:
        case = f"{r['phase']} M={r['tokens_per_rank']} H={r['hidden']} E={r['num_experts']} {r['skew']}"
        lines.append(" | ".join([
            case, f(r["nccl_dispatch_us"]), f(r["peer_dispatch_us"]), f(r["peer_dispatch_speedup_vs_nccl"], "{:.2f}"),
            f(r["peer_dispatch_fraction_of_peer_bw"], "{:.2f}"), f(r["nccl_combine_us"]), f(r["peer_combine_us"]),
            f(r["peer_combine_speedup_vs_nccl"], "{:.2f}"), f(r["peer_combine_fraction_of_peer_bw"], "{:.2f}")]))
    return "\n".join(lines)


def write_json(path: str, doc: dict) -> None:
    """Write doc to path atomically (a reader never sees half a file; bench_ep.py rewrites after every case)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1)
    os.replace(tmp, path)


def _f(v, fmt="{:.2f}"):
    return "-" if v is None else fmt.format(v)


def markdown(runs, scal, targ) -> str:
    Ws = sorted(runs)
    lines = ["# moekern.ep multi-GPU scaling", ""]
    for W in Ws:
        d = runs[W]
        bw = d.get("peer_bandwidth") or {}
        lines.append(f"- W={W}: {d.get('device')} x{d.get('gpu_count')}, driver {d.get('driver')}, torch "
                     f"{d.get('torch')}, triton {d.get('triton')}, nccl {d.get('nccl', '-')}, {d.get('date')}; "
                     f"peer bandwidth {_f(bw.get('bytes_per_s') and bw['bytes_per_s'] / 1e9, '{:.1f}')} GB/s"
                     + (f"; peer skipped: {d['peer_skipped']}" if d.get("peer_skipped") else "")
                     + ("; INCOMPLETE run (stopped early)" if d.get("complete") is False else ""))
    lines += ["", "## Efficiency vs W=2 (algbw(W) / algbw(2)); time in us", "",
              "| case | backend | op | " + " | ".join(f"us W={W}" for W in Ws) + " | "
              + " | ".join(f"eff W={W}" for W in Ws) + " |",
              "|" + "---|" * (3 + 2 * len(Ws))]
    for s in scal:
        lines.append(f"| {s['case']} | {s['backend']} | {s['op']} | "
                     + " | ".join(_f(s["us"].get(W), "{:.1f}") for W in Ws) + " | "
                     + " | ".join(_f(s["efficiency_vs_w2"].get(W)) for W in Ws) + " |")
    lines += ["", "## Peer path targets (speedup vs nccl >= 1.5, fraction of peer bandwidth >= 0.7)", "",
              "| W | case | op | speedup | fraction | meets |", "|---|---|---|---|---|---|"]
    for t in targ:
        lines.append(f"| {t['world_size']} | {t['case']} | {t['op']} | {_f(t['speedup'])} | "
                     f"{_f(t['fraction_of_peer_bw'])} | {'-' if t['meets'] is None else t['meets']} |")
    return "\n".join(lines) + "\n"


def plot(scal, path) -> str | None:
    """Efficiency vs W per op; returns the path, or None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for ax, op in zip(axes, OPS):
        for s in (s for s in scal if s["op"] == op):
            pts = sorted((W, e) for W, e in s["efficiency_vs_w2"].items() if e is not None)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o",
                        linestyle="-" if s["backend"] == "peer" else "--", label=f"{s['backend']} {s['case']}")
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("GPUs (W)")
        ax.set_title(f"{op}: algbw per GPU relative to W=2")
    axes[0].set_ylabel("scaling efficiency")
    if axes[1].get_legend_handles_labels()[0]:
        axes[1].legend(fontsize=6, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(directory: str, out_dir: str | None = None) -> dict:
    out_dir = out_dir or directory
    runs = load_runs(directory)
    scal, targ = scaling(runs), targets(runs)
    os.makedirs(out_dir, exist_ok=True)
    md = markdown(runs, scal, targ)
    png = plot(scal, os.path.join(out_dir, "ep_scaling.png"))
    doc = dict(world_sizes=sorted(runs), sources=[runs[W]["_path"] for W in sorted(runs)], scaling=scal,
               targets=targ, plot=png,
               efficiency="algbw(W) / algbw(2), algbw = bytes a rank sends to other ranks / time")
    with open(os.path.join(out_dir, "ep_scaling.json"), "w") as f:
        json.dump(doc, f, indent=1, default=str)
    with open(os.path.join(out_dir, "ep_scaling.md"), "w") as f:
        f.write(md)
    print(md)
    print("wrote", os.path.join(out_dir, "ep_scaling.{json,md}"), png or "(no plot: matplotlib missing)")
    return doc


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dir", help="directory holding bench_ep_w*.json")
    ap.add_argument("--out", help="output directory (default: dir)")
    a = ap.parse_args()
    write_report(a.dir, a.out)
