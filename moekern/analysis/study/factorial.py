"""`moekern factorial SPEC.yaml`: a full or fractional factorial design over serving factors, run through
the sweep runner, and a type-II ANOVA of throughput, TTFT and TPOT.

Spec (YAML):

    name: placement_factorial
    out_dir: results/factorial                 # relative to the spec file
    design: full                               # or "fractional" (two-level factors only are fractioned)
    fraction_p: 1                              # fractional: 2^(k-p) runs of the k two-level factors
    machine_gpus: 1                            # points needing more GPUs are planned (dry run), not run
    command: >-                                # the sweep runner's template (moekern/analysis/study/sweep.py)
      python -m moekern.e2e --model {model} --moe-backend {moe_backend} --layout {layout}
      --gpus {gpus} --max-num-seqs {max_num_seqs} --max-num-batched-tokens {max_num_batched_tokens}
      {eplb_flag} --dataset {dataset} --result-json {result} --gate-log-dir {gate_log_dir}
    factors:                                   # any subset; each a list of levels
      model: [mixtral, qwen3-30b-a3b]
      moe_backend: [moekern, vllm]
      layout: [TP, EP, hybrid]
      gpus: [1, 8]
      max_num_seqs: [4, 256]                   # queue depth, 4 ... 256
      max_num_batched_tokens: [2048, 8192]
      dataset: [datasets/000_0.2.jsonl, datasets/009_0.8.jsonl]
      eplb: [false, true]
    responses: [output_throughput, mean_ttft_ms, mean_tpot_ms]
    interactions: 2                            # 0: main effects only; 2: all two-factor interactions

Fractional designs: the two-level factors A1..Ak are split into k - p base factors (full 2^(k-p)) and p
generated ones; generated factor j is the product (in -1/+1 coding) of all base factors except base j
(p = 1: of all base factors, the resolution-k design I = A1...Ak). Factors with more than two levels are
fully crossed with that fraction. Aliased terms make the ANOVA matrix singular, so `fit_anova` keeps a
two-factor interaction only when the model still has residual degrees of freedom and full rank.

Client-side factors (one server, many benches): when `factors` holds `concurrency` (the client's `vllm bench
serve --max-concurrency`, i.e. client-side queue depth; the server's max_num_seqs stays a separate,
server-level factor), `concurrency` and `dataset` vary per bench against one server: the design (full or
fractional) runs over the other, server-level factors, each server point is one runner invocation with the
sweep's `bench_grid` ({bench_grid} in the command: moekern e2e --concurrency-grid ... --datasets ...
--grid-reps REPS --result-dir OUT/runs), and the client factors are fully crossed inside it, `reps: N`
times. The dry run prints the plan and its estimated time (sweep.grid_plan_seconds; `estimate:` in the spec
may set num_prompts, input_len, output_len, max_num_seqs, preflight; otherwise vars, then moekern e2e's quick
defaults). Example: analysis/specs/factorial_h100_small.yaml.

ANOVA: statsmodels `ols(response ~ C(a) + C(b) + C(a):C(b) ...)` and `anova_lm(typ=2)`; every factor is
categorical. Partial eta squared = SS_term / (SS_term + SS_residual). Factors with one observed level are
dropped (listed in `dropped`).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from moekern.errors import UsageError

FACTORS = ("model", "moe_backend", "layout", "gpus", "max_num_seqs", "max_num_batched_tokens", "dataset", "eplb",
           "concurrency", "routing_skew")
CLIENT_FACTORS = ("concurrency", "dataset")  # per bench, against one server (module docstring)
RESPONSES = ("output_throughput", "mean_ttft_ms", "mean_tpot_ms")


@dataclass
class FactorialSpec:
    name: str
    out_dir: Path
    factors: dict[str, list]
    command: str | None = None
    design: str = "full"
    fraction_p: int = 1
    machine_gpus: int = 1
    responses: tuple[str, ...] = RESPONSES
    interactions: int = 2
    vars: dict = field(default_factory=dict)
    base_dir: Path = Path(".")
    timeout_s: float | None = None
    reps: int = 1
    estimate: dict = field(default_factory=dict)

    @property
    def bench_grid(self) -> dict | None:
        """The sweep bench_grid of the client factors, or None when `concurrency` is not a factor."""
        if "concurrency" not in self.factors:
            return None
        return {"concurrency": list(self.factors["concurrency"]), "dataset": self.factors.get("dataset"),
                "reps": self.reps}

    @property
    def server_factors(self) -> dict[str, list]:
        """The factors that need a server of their own (all of them without client factors)."""
        if self.bench_grid is None:
            return dict(self.factors)
        return {k: v for k, v in self.factors.items() if k not in CLIENT_FACTORS}


def load_factorial_spec(path) -> FactorialSpec:
    import yaml

    p = Path(path)
    if not p.is_file():
        raise UsageError(f"factorial spec {str(p)!r} " + ("is a folder, expected a YAML file" if p.is_dir() else "does not exist"))
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise UsageError(f"factorial spec {str(p)!r} is not valid YAML: {' '.join(str(exc).split())}") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("factors"), dict) or not raw["factors"]:
        raise UsageError(f"factorial spec {str(p)!r} must be a mapping with a non-empty 'factors' mapping")
    for k, v in raw["factors"].items():
        if not isinstance(v, list) or not v:
            raise UsageError(f"factor {k!r} must list at least one level; got {v!r}")
    if "max_num_seqs" in raw["factors"]:
        bad = [q for q in raw["factors"]["max_num_seqs"] if not (isinstance(q, int) and 4 <= q <= 256)]
        if bad:
            raise UsageError(f"max_num_seqs levels must be ints in 4..256 (queue depth); got {bad}")
    if "concurrency" in raw["factors"]:
        bad = [c for c in raw["factors"]["concurrency"] if not (isinstance(c, int) and not isinstance(c, bool)
                                                               and c >= 1)]
        if bad:
            raise UsageError(f"concurrency levels must be ints >= 1 (client --max-concurrency); got {bad}")
    reps = _check_reps(raw.get("reps", 1), raw["factors"])
    design = raw.get("design", "full")
    if design not in ("full", "fractional"):
        raise UsageError(f"design={design!r} must be 'full' or 'fractional'")
    base = p.resolve().parent
    out = Path(raw.get("out_dir", f"results/{p.stem}"))
    return FactorialSpec(name=str(raw.get("name", p.stem)), out_dir=out if out.is_absolute() else base / out,
                         factors=raw["factors"], command=raw.get("command"), design=design,
                         fraction_p=int(raw.get("fraction_p", 1)), machine_gpus=int(raw.get("machine_gpus", 1)),
                         responses=tuple(raw.get("responses", RESPONSES)), interactions=int(raw.get("interactions", 2)),
                         vars=dict(raw.get("vars") or {}), base_dir=base, timeout_s=raw.get("timeout_s"), reps=reps,
                         estimate=dict(raw.get("estimate") or {}))


def _check_reps(reps, factors: dict) -> int:
    """`reps` if it is a valid repetition count for `factors` (a spec's own or an override), else ValueError."""
    if not isinstance(reps, int) or isinstance(reps, bool) or reps < 1:
        raise UsageError(f"reps must be an int >= 1; got {reps!r}")
    if reps > 1 and "concurrency" not in factors:
        raise UsageError("reps repeats benches against one server: it needs a 'concurrency' factor")
    return reps


def with_reps(spec: FactorialSpec, reps: int) -> FactorialSpec:
    """The spec with `reps` repetitions of every bench (checked as the spec's own `reps` is)."""
    return dataclasses.replace(spec, reps=_check_reps(reps, spec.factors))


def design_points(factors: dict[str, list], design: str = "full", fraction_p: int = 1) -> list[dict]:
    """The design's points (dicts factor -> level), full grid order or fraction (module docstring)."""
    names = list(factors)
    if design == "full":
        return [dict(zip(names, c)) for c in itertools.product(*(factors[n] for n in names))]
    two = [n for n in names if len(factors[n]) == 2]
    multi = [n for n in names if len(factors[n]) != 2]
    k = len(two)
    if not 1 <= fraction_p < k:
        raise UsageError(f"fraction_p={fraction_p} must be in [1, {k - 1}] for {k} two-level factors {two}")
    nbase = k - fraction_p
    if fraction_p > nbase and fraction_p > 1:
        raise UsageError(f"fraction_p={fraction_p} is too large for {k} two-level factors (at most {k // 2})")
    rows = []
    for signs in itertools.product((-1, 1), repeat=nbase):
        gen = []
        for j in range(fraction_p):
            others = [s for i, s in enumerate(signs) if fraction_p == 1 or i != j]
            gen.append(int(np.prod(others)))
        rows.append(list(signs) + gen)
    out = []
    for row in rows:
        two_part = {n: factors[n][0 if s < 0 else 1] for n, s in zip(two, row)}
        for combo in itertools.product(*(factors[n] for n in multi)):
            pt = {**two_part, **dict(zip(multi, combo))}
            out.append({n: pt[n] for n in names})
    return out


def needs_gpus(point: dict) -> int:
    return int(point.get("gpus", 1))


def run_factorial(spec: FactorialSpec, dry_run: bool = False, out=None) -> dict:
    """Run the design points the machine allows (gpus <= machine_gpus) through the sweep runner; the others
    are written to out_dir/plan.json as a dry-run plan. Returns {"points", "runnable", "planned_only",
    "ran", "failed", "skipped"}."""
    import sys

    from moekern.analysis.study.sweep import SweepSpec
    from moekern.analysis.study.sweep_run import run_sweep

    out = out or sys.stdout
    pts = design_points(spec.server_factors, spec.design, spec.fraction_p)
    runnable = [p for p in pts if needs_gpus(p) <= spec.machine_gpus]
    later = [p for p in pts if needs_gpus(p) > spec.machine_gpus]
    summary = {"points": len(pts), "runnable": len(runnable), "planned_only": len(later), "ran": 0, "failed": 0,
               "skipped": 0}
    spec.out_dir.mkdir(parents=True, exist_ok=True)
    (spec.out_dir / "plan.json").write_text(json.dumps(
        {"name": spec.name, "design": spec.design, "fraction_p": spec.fraction_p, "machine_gpus": spec.machine_gpus,
         "runnable": runnable, "needs_larger_machine": later, "bench_grid_per_server": spec.bench_grid},
        indent=1, default=str), encoding="utf-8")
    print(f"factorial {spec.name!r}: {len(pts)} points ({spec.design}); {len(runnable)} fit this machine "
          f"({spec.machine_gpus} GPU(s)), {len(later)} planned only -> {spec.out_dir / 'plan.json'}", file=out)
    bg = spec.bench_grid
    if bg is not None:
        est = estimate_seconds(spec, len(runnable))
        summary["benches"] = len(runnable) * len(bg["concurrency"]) * len(_datasets(spec) or [None]) * spec.reps
        summary["estimate_s"] = round(est, 1)
        print(f"  client factors per server: concurrency {bg['concurrency']} x {len(_datasets(spec) or [None])} "
              f"dataset(s) x {spec.reps} rep(s) = {summary['benches']} benches on {len(runnable)} server(s); "
              f"estimated ~{est / 60:.1f} min (sweep.grid_plan_seconds, H100 rates of mixtral-8x7b-4l)", file=out)
    if not spec.command:
        print("no 'command' in the spec: nothing to run (plan only)", file=out)
        return summary
    if bg is not None and "{bench_grid}" not in spec.command:
        raise UsageError("a spec with a 'concurrency' factor runs benches against one server: its command must "
                         "pass {bench_grid}")
    for p in runnable:
        grid = {("backend" if k == "moe_backend" else k): [v] for k, v in p.items()}
        sw = SweepSpec(name=spec.name, out_dir=spec.out_dir, command=spec.command.replace("{moe_backend}", "{backend}"),
                       grid=grid, vars=spec.vars, timeout_s=spec.timeout_s, base_dir=spec.base_dir,
                       bench_grid=bg)
        res = run_sweep(sw, dry_run=dry_run, progress=False, out=out)
        for key in ("ran", "failed", "skipped"):
            summary[key] += res[key]
    return summary


def _datasets(spec: FactorialSpec) -> list[str]:
    from moekern.analysis.study.sweep import _expand

    return _expand(spec.factors["dataset"], spec.base_dir, True) if "dataset" in spec.factors else []


def estimate_seconds(spec: FactorialSpec, num_servers: int) -> float:
    """Estimated wall seconds of a client-factor spec's runnable part (module docstring)."""
    from moekern.analysis.study.sweep import grid_plan_seconds

    e, v = spec.estimate, spec.vars

    def pick(key, default):
        return e.get(key, v.get(key, default))

    in_len = e.get("input_len")
    if in_len is None:
        lens = []
        for f in _datasets(spec):
            try:
                lens += [json.loads(line).get("prompt_len") for line in Path(f).read_text(encoding="utf-8").splitlines()
                         if line.strip()]
            except (OSError, json.JSONDecodeError, AttributeError):
                continue
        lens = [x for x in lens if isinstance(x, (int, float))]
        in_len = sum(lens) / len(lens) if lens else v.get("input_len", 256)
    mns = max(spec.factors.get("max_num_seqs", [pick("max_num_seqs", 128)]))
    preflight = e.get("preflight", "--no-preflight" not in (spec.command or ""))
    return grid_plan_seconds(num_servers, spec.bench_grid["concurrency"], len(_datasets(spec) or [None]), spec.reps,
                             int(pick("num_prompts", 320)), float(in_len), int(pick("output_len", 128)), int(mns),
                             preflight=bool(preflight))


def collect_results(results_dir) -> "pd.DataFrame":  # noqa: F821
    """One row per run JSON under `results_dir` (sweep output): the "moekern" block's keys (backend ->
    moe_backend) and the serving metrics (analysis.serving.parse_bench_result)."""
    import pandas as pd

    from moekern.analysis.serving.metrics import THROUGHPUT_KEYS, parse_bench_result

    rows = []
    for f in sorted(Path(results_dir).rglob("*.json")):
        if "gate_logs" in f.parts or f.name.endswith(".failed.json") or f.name == "plan.json":
            continue
        try:
            obj = json.loads(f.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, OSError, UnicodeDecodeError):
            continue
        if not isinstance(obj, dict) or not any(k in obj for k in THROUGHPUT_KEYS + ("mean_ttft_ms",)):
            continue
        run = parse_bench_result(obj, run_id=f.stem, path=str(f))
        row = {k: v for k, v in (obj.get("moekern") or {}).items() if not isinstance(v, (dict, list))}
        if "max_concurrency" not in row and obj.get("max_concurrency") is not None:  # `vllm bench serve`'s own key
            row["max_concurrency"] = obj["max_concurrency"]
        row.update(run.row())
        if "backend" in (obj.get("moekern") or {}):
            row["moe_backend"] = obj["moekern"]["backend"]
        rows.append(row)
    return pd.DataFrame(rows)


def steady_rows(df) -> tuple["pd.DataFrame", list[str]]:  # noqa: F821
    """(the rows measured at steady state, the run_ids of the others): a bench whose run JSON says
    `steady_state: false` had kernels JIT-compiling while it was measured (moekern e2e counts vLLM's JIT
    monitor warnings inside its window), so its latency and throughput measure compile time. Rows without
    the field (older or synthetic results) are kept."""
    if "steady_state" not in df:
        return df, []
    bad = df["steady_state"].map(lambda v: v is False or v == 0 or (isinstance(v, str) and v.lower() == "false"))
    ids = [str(x) for x in df.loc[bad, "run_id"]] if "run_id" in df else [str(i) for i in df.index[bad]]
    return df.loc[~bad].reset_index(drop=True), ids


@dataclass
class AnovaResult:
    response: str
    table: "pd.DataFrame"  # noqa: F821  rows: terms + Residual; cols sum_sq, df, F, PR(>F), partial_eta_sq
    formula: str
    n: int
    dropped: list[str]

    def to_dict(self) -> dict:
        t = self.table.reset_index().rename(columns={"index": "term", "PR(>F)": "p_value"})
        return {"response": self.response, "formula": self.formula, "n": self.n, "dropped": self.dropped,
                "terms": json.loads(t.to_json(orient="records"))}


def fit_anova(df, factors, response: str, interactions: int = 2) -> AnovaResult:
    """Type-II ANOVA of `response` on categorical `factors` (+ two-factor interactions when `interactions`
    >= 2 and estimable). Raises ValueError when no factor varies or the data are too few."""
    import pandas as pd
    import statsmodels.formula.api as smf
    from statsmodels.stats.anova import anova_lm

    if response not in df:
        raise ValueError(f"response={response!r} is not a column; have {sorted(df.columns)}")
    d = df[[f for f in factors if f in df] + [response]].copy()
    d = d[np.isfinite(pd.to_numeric(d[response], errors="coerce"))]
    d[response] = d[response].astype(float)
    keep, dropped = [], [f for f in factors if f not in df]
    for f in factors:
        if f in d:
            d[f] = d[f].astype(str)
            (keep if d[f].nunique() > 1 else dropped).append(f)
    if not keep:
        raise ValueError(f"no factor among {list(factors)} has two or more levels in the data")
    safe = {f: f"f{i}" for i, f in enumerate(keep)}  # patsy-safe names
    d = d.rename(columns={**safe, response: "y"})
    terms = [f"C({safe[f]})" for f in keep]

    def _fits(ts):
        import patsy

        x = patsy.dmatrix(" + ".join(ts), d, return_type="dataframe")
        return x.shape[0] - x.shape[1] >= 1 and np.linalg.matrix_rank(x.to_numpy()) == x.shape[1]

    if not _fits(terms):
        raise ValueError(f"{len(d)} observations are too few for main effects of {keep}")
    if interactions >= 2:
        for a, b in itertools.combinations(keep, 2):
            cand = terms + [f"C({safe[a]}):C({safe[b]})"]
            if _fits(cand):
                terms = cand
    formula = "y ~ " + " + ".join(terms)
    model = smf.ols(formula, data=d).fit()
    tab = anova_lm(model, typ=2)
    ss_res = float(tab.loc["Residual", "sum_sq"])
    tab["partial_eta_sq"] = [float(s / (s + ss_res)) if name != "Residual" else math.nan
                             for name, s in zip(tab.index, tab["sum_sq"])]
    back = {v: k for k, v in safe.items()}

    def _name(term: str) -> str:
        parts = [p[2:-1] for p in term.split(":")] if term != "Residual" else [term]
        return ":".join(back.get(p, p) for p in parts)

    tab.index = [_name(t) for t in tab.index]
    readable = formula
    for f, s in sorted(safe.items(), key=lambda kv: -len(kv[1])):
        readable = readable.replace(f"C({s})", f"C({f})")
    return AnovaResult(response, tab, readable.replace("y ~", f"{response} ~"), len(d), dropped)


def anova_all(df, factors, responses=RESPONSES, interactions: int = 2) -> dict[str, AnovaResult]:
    out = {}
    for r in responses:
        if r in df and df[r].notna().sum() >= 3:
            try:
                out[r] = fit_anova(df, factors, r, interactions)
            except ValueError:
                continue
    return out


def anova_plot(results: dict[str, AnovaResult], path=None):
    """Bar chart of partial eta squared per term and response (* marks p < 0.05); PNG bytes, and
    written to `path` when given."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from moekern.analysis.plotting import fig_png

    n = max(len(results), 1)
    fig, axes = plt.subplots(1, n, figsize=(4.5 * n, 3.5), squeeze=False)
    for ax, (resp, res) in zip(axes[0], results.items()):
        t = res.table.drop(index="Residual")
        ax.barh(t.index, t["partial_eta_sq"], color=["C3" if p < 0.05 else "C0" for p in t["PR(>F)"]])
        for i, (eta, p) in enumerate(zip(t["partial_eta_sq"], t["PR(>F)"])):
            ax.text(eta, i, f" p={p:.2g}{' *' if p < 0.05 else ''}", va="center", fontsize=7)
        ax.set_xlim(0, 1.15)
        ax.set_title(resp, fontsize=9)
        ax.set_xlabel("partial eta^2 (red: p < 0.05)")
        ax.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    return fig_png(fig, path, bbox_tight=False)


def anova_latex(results: dict[str, AnovaResult]) -> str:
    """A LaTeX tabular of every response's ANOVA (term, df, F, p, partial eta^2)."""
    lines = [r"\begin{tabular}{llrrrr}", r"\toprule", r"response & term & df & $F$ & $p$ & partial $\eta^2$ \\",
             r"\midrule"]
    for resp, res in results.items():
        for term, row in res.table.drop(index="Residual").iterrows():
            lines.append(f"{_tex(resp)} & {_tex(term)} & {row['df']:.0f} & {row['F']:.2f} & {row['PR(>F)']:.3g} & "
                         f"{row['partial_eta_sq']:.3f} \\\\")
        lines.append(r"\midrule")
    lines[-1] = r"\bottomrule"
    lines.append(r"\end{tabular}")
    return "\n".join(lines)


def _tex(s) -> str:
    return str(s).replace("\\", r"\textbackslash{}").replace("_", r"\_").replace("&", r"\&").replace("%", r"\%") \
        .replace("#", r"\#")


def synthetic_factorial(seed: int = 0, reps: int = 3, effect: float = 200.0, noise: float = 20.0):
    """SYNTHETIC factorial results (tests only): output_throughput depends on moe_backend (+effect) and on
    max_num_seqs (linear), not on eplb (null factor); TPOT depends on max_num_seqs only."""
    import pandas as pd

    rng = np.random.default_rng(seed)
    rows = []
    for b, q, e, _ in itertools.product(("moekern", "vllm"), (4, 64, 256), (False, True), range(reps)):
        thr = 1000 + (effect if b == "moekern" else 0) + 2.0 * q + rng.normal(0, noise)
        rows.append({"moe_backend": b, "max_num_seqs": q, "eplb": e, "output_throughput": thr,
                     "mean_tpot_ms": 10 + 0.05 * q + rng.normal(0, 0.5),
                     "mean_ttft_ms": 50 + rng.normal(0, 5)})
    return pd.DataFrame(rows)
