"""Results on disk and on screen: results.json, a pandas table, and PNG plots.

results.json = {"environment": {...}, "rows": [...]}; one row per (shape, provider) with status
"ok" | "skipped" | "wrong" | "error", the reason, median/min/max µs, speedup_vs_vllm (vLLM median /
this median: > 1 is faster than vLLM), roofline_fraction and the timing method.
Plots (matplotlib, Agg): <op>_time.png (time vs M, log-log, one panel per model, one line per
provider) and <op>_vs_vllm.png (speedup over vLLM vs M) when vLLM ran.
"""

from __future__ import annotations

import json
import os
import re

RESULTS_FILE = "results.json"


def default_out_dir(env: dict) -> str:
    """<cache>/moekern/bench/<gpu>-<date>T<time>/ (or cpu-demo-...), where <cache> is $XDG_CACHE_HOME or
    ~/.cache: outside any checkout, so a run leaves `git status` clean. A run meant for the repository's
    history goes to `--out benchmarks/results/<gpu>-<date>` instead."""
    gpu = env.get("gpu") or "cpu-demo"
    slug = re.sub(r"[^a-z0-9]+", "-", gpu.lower()).strip("-")
    stamp = re.sub(r"[^0-9T-]", "", env.get("date", "")[:19].replace(":", ""))
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "moekern", "bench", f"{slug}-{stamp}")


def write_json(result: dict, out_dir: str) -> str:
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, RESULTS_FILE)
    with open(path, "w") as f:
        json.dump(result, f, indent=1, default=str)
    return path


def load(path: str) -> dict:
    if os.path.isdir(path):
        path = os.path.join(path, RESULTS_FILE)
    with open(path) as f:
        return json.load(f)


def _frame(result: dict):
    import pandas as pd

    df = pd.DataFrame(result["rows"])
    if df.empty:
        return df
    df["M"] = df["num_tokens"]
    df["label"] = df["provider"]
    return df


def tables(result: dict) -> tuple[str, str]:
    """(timings table, not-timed list) as printable text."""
    import pandas as pd

    df = _frame(result)
    if df.empty:
        return "no results", ""
    ok = df[df["status"] == "ok"].copy()
    timed = "no provider produced a checked result"
    if not ok.empty:
        ok["B"] = ok["block_size"].where(ok["op"] == "align", 0)
        # keep the run's order of ops and models, numeric order of M and B
        ok["op"] = pd.Categorical(ok["op"], categories=list(dict.fromkeys(df["op"])), ordered=True)
        ok["model"] = pd.Categorical(ok["model"], categories=list(dict.fromkeys(df["model"])), ordered=True)
        cell = ok.apply(lambda r: _cell(r), axis=1)
        ok["cell"] = cell
        pivot = ok.pivot_table(index=["op", "model", "M", "B"], columns="provider", values="cell",
                               aggfunc="first", sort=True, observed=True)
        with pd.option_context("display.max_rows", 500, "display.max_columns", 20, "display.width", 200):
            timed = _header(ok) + "\n" + pivot.fillna("-").to_string()
    rest = df[df["status"] != "ok"]
    lines = []
    if not rest.empty:
        # One line per (status, provider, op, first line of the reason): a missing package or a kernel
        # that fails to compile repeats for every shape.
        groups: dict = {}
        for r in rest.itertuples():
            first = (r.reason or "").strip().splitlines()[0] if (r.reason or "").strip() else ""
            groups.setdefault((r.status, r.provider, r.op, first), []).append(r.shape)
        for (status, provider, op, first), shapes in groups.items():
            where = op if status == "skipped" else (shapes[0] if len(shapes) == 1 else f"{shapes[0]} and {len(shapes) - 1} more {op} shapes")
            lines.append(f"{status:8s} {provider:15s} {where}: {first}")
    return timed, "\n".join(lines)


def _header(ok) -> str:
    """The table's first line: it names the bracketed numbers only where some cell carries them."""
    extra = []
    if "speedup_vs_vllm" in ok and (ok["speedup_vs_vllm"].fillna(0).astype(bool) & (ok["provider"] != "vllm")).any():
        extra.append("speedup over vLLM, x")
    if "roofline_fraction" in ok and ok["roofline_fraction"].fillna(0).astype(bool).any():
        extra.append("roofline fraction, %")
    return "median µs per call" + (f"  [{'; '.join(extra)}]" if extra else "")


def _cell(r) -> str:
    s = f"{r['median_us']:.1f}"
    extra = []
    if r.get("speedup_vs_vllm") and r["provider"] != "vllm":
        extra.append(f"{r['speedup_vs_vllm']:.2f}x")
    if r.get("roofline_fraction"):
        extra.append(f"{100 * r['roofline_fraction']:.3g}%")
    return s + (f" [{', '.join(extra)}]" if extra else "")


def plot(result: dict, out_dir: str) -> list[str]:
    """Write the PNG plots; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    df = _frame(result)
    if df.empty:
        return []
    ok = df[(df["status"] == "ok") & df["median_us"].notna()]
    env = result.get("environment", {})
    where = env.get("gpu") or "CPU demo: Triton interpreter / torch on CPU, NOT kernel performance"
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for op in [o for o in ("routing", "align", "moe") if o in set(ok["op"])]:
        sub = ok[ok["op"] == op].copy()
        if op == "align":
            sub["label"] = sub["provider"] + " B=" + sub["block_size"].astype(str)
        models = list(dict.fromkeys(sub["model"]))
        for kind, col in (("time", "median_us"), ("vs_vllm", "speedup_vs_vllm")):
            data = sub[sub[col].notna()]
            if kind == "vs_vllm":
                data = data[data["provider"] != "vllm"]
            if data.empty:
                continue
            n = len(models)
            cols = min(n, 2)
            rows_ = -(-n // cols)
            fig, axes = plt.subplots(rows_, cols, figsize=(6.0 * cols, 4.2 * rows_), squeeze=False)
            for ax, model in zip(axes.flat, models):
                m = data[data["model"] == model]
                for label, g in m.groupby("label", sort=True):
                    g = g.sort_values("M")
                    if kind == "time":
                        ax.errorbar(g["M"], g[col], yerr=[g[col] - g["min_us"], g["max_us"] - g[col]],
                                    marker="o", capsize=2, label=label)
                    else:
                        ax.plot(g["M"], g[col], marker="o", label=label)
                ax.set_xscale("log", base=2)
                if kind == "time":
                    ax.set_yscale("log")
                    ax.set_ylabel("median µs per call")
                else:
                    ax.axhline(1.0, color="gray", lw=1, ls="--")
                    ax.set_ylabel("speedup over vLLM (x)")
                ax.set_xlabel("tokens M")
                ax.set_title(model)
                ax.grid(True, which="both", alpha=0.3)
                if ax.has_data():
                    ax.legend(fontsize=8)
            for ax in list(axes.flat)[n:]:
                ax.axis("off")
            title = f"moekern bench: {op} ({'time vs M' if kind == 'time' else 'speedup over vLLM'})"
            fig.suptitle(f"{title}\n{where}", fontsize=10)
            fig.tight_layout()
            path = os.path.join(out_dir, f"{op}_{kind}.png")
            fig.savefig(path, dpi=110)
            plt.close(fig)
            paths.append(path)
    return paths
