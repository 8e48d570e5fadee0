"""`moekern sweep SPEC.yaml`: run a grid of end-to-end serving benchmarks, resumably.

The runs themselves are a subprocess command template from the spec (the end-to-end runner,
`moekern e2e ...` or `python -m moekern.e2e ...`), so the sweep knows nothing of its internals.
Spec (YAML; see analysis/specs/sweep_example.yaml):

    name: example
    out_dir: results/sweep_example           # relative to the spec file
    command: >-
      python -m moekern.e2e --model {model} --mode serve --arms {backend}
      --tensor-parallel-size {tp} --max-num-seqs {max_num_seqs}
      --max-num-batched-tokens {max_num_batched_tokens} {eplb_flag}
      --dataset {dataset} --out {run_dir} --result {result} --gate-log-dir {gate_log_dir}
    vars: {model: mixtral-8x7b-4l, tp: 2}    # constants for the template
    eplb_flag: {true: "--enable-eplb", false: ""}
    grid:
      backend: [moekern, vllm]
      max_num_seqs: [8, 16, 32, 64]
      max_num_batched_tokens: [2048, 4096, 8192, 16384]
      eplb: [false, true]
      dataset: ["datasets/*.jsonl"]          # globs expand (relative to the spec file)
    datasets: {out: datasets, num: 8}        # optional: made on demand (see below)
    timeout_s: 3600

The command runs in the spec file's folder. Template fields: every grid key and var, plus {result}
(out_dir/runs/ID.json), {gate_log_dir} (out_dir/gate_logs/ID), {run_dir} (out_dir/work/ID, a scratch folder),
{run_id}, {out_dir}, {dataset_name} (file stem), {eplb_flag}. With `datasets: {out: DIR, num: N, seed: S,
prompts: P}` (DIR relative to the spec file), a DIR that holds no *.jsonl yet is filled first, as
`moekern datasets generate --num N --out DIR --seed S --prompts P` would (whitespace tokenizer where Mixtral's
is not installed), so a fresh clone can plan and run the spec; existing datasets are never rewritten. A runner that writes a folder instead of one
result file: set `collect: "serve_moekern.bench.json"` (a glob under {run_dir}) and the first match becomes
{result}. A point whose result file exists is skipped (resume). After a run, the result JSON (if the runner
wrote one) gets a "moekern" block with the point's configuration (moe_backend, max_num_seqs, ..., gate_log,
predicted_score from a `NNN_SCORE.jsonl` dataset name), so `moekern report` can group it; keys the runner
already wrote there (`moekern e2e --result` writes its own block) are kept, the sweep adds only the missing ones.
Each run's output goes to out_dir/logs/ID.log and its outcome to out_dir/sweep_status.jsonl; a failed point
does not stop the sweep and is retried on the next invocation.

Bench grids (one server, many benches). Starting `vllm serve` costs 60-110 s on an H100 (torch.compile + CUDA
graphs) against 1-10 s per bench, so client-side factors run against one server: a spec with

    bench_grid:
      concurrency: [8, 32, 128]     # the client's `vllm bench serve --max-concurrency` (client queue depth;
                                    # the server's max_num_seqs is a server-level grid key, unchanged per server)
      dataset: ["datasets/*.jsonl"] # globs expand as in grid
      reps: 2

plans one sweep point per server-level grid combination (`grid` must then not hold concurrency or dataset)
and renders {bench_grid} as `moekern e2e`'s flags (`--concurrency-grid 8,32,128 --datasets A,B --grid-reps 2
--grid-prefix ID --result-dir OUT/runs`); {result_dir} is out_dir/runs. The runner writes one result JSON per
bench, named by `grid_point_name` (ID_c{concurrency}_d{dataset stem}_r{rep}.json), with its own "moekern"
block; a point is done when all its files exist, and the runner skips files that exist (resume per bench).
`GridTiming`/`grid_plan_seconds` estimate such a plan (`moekern e2e` prints the same estimate).

Routing skews inside one server: `bench_grid: {skews: {uniform: uniform, hot: "hot:0:0.5"}}` (name -> the
plugin's MOEKERN_ROUTING_SKEW syntax) renders as `--skews uniform=uniform,hot=hot:0:0.5`; the runner starts each
server with the first skew and switches between benches (moekern.e2e.grid), and each file's name carries its
skew (`..._k{name}_c...`).

Time budget (`sweep_run.run_sweep(budget_s=...)`, `moekern sweep --budget-s S`): a point starts only when at least
`min_point_s` (spec key, default 180: a server start, its warm-up and one bench) is left; the template field
{budget_left_s} is the budget left when the point starts, for the runner's own --budget-s, so a runner stops
its server cleanly at the deadline instead of being killed with it; points left over stay for the next
invocation (resume). `only` (`--only KEY=V1,V2`) runs a subset of a grid key's values.

Half first (`half_first: [KEY_A, KEY_B]`, >= 3 levels each): the points of `in_first_half` (level i of A
with the ceil(n_B / 2) levels i, i+1, ... of B, cyclically) run before the others, each half in grid order. A
run stopped after the first half is then a balanced half fraction: every level of A meets half the levels of B
and every level of B half of A's, the other factors fully crossed, and the A-B pairs chain all levels together
(a checkerboard would not: it splits into two blocks and aliases one contrast of A with one of B), so every
main effect stays estimable; the A x B interaction is partly aliased. The second half completes the grid.
"""

from __future__ import annotations

import glob
import itertools
import json
import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

from moekern.errors import UsageError

_SCORE = re.compile(r"^\d{3}_(\d+\.\d+)$")
BUDGET_LEFT = "__budget_left_s__"  # {budget_left_s} until the point starts; then the seconds left


@dataclass
class SweepPoint:
    run_id: str
    params: dict
    command: list[str]
    result: Path
    gate_log_dir: Path
    done: bool = False
    expected: list[Path] = field(default_factory=list)  # bench-grid points: every per-bench result file


@dataclass
class SweepSpec:
    name: str
    out_dir: Path
    command: str
    grid: dict[str, list]
    vars: dict = field(default_factory=dict)
    eplb_flag: dict = field(default_factory=lambda: {True: "--enable-eplb", False: ""})
    timeout_s: float | None = None
    base_dir: Path = Path(".")
    collect: str | None = None  # glob under {run_dir}: copied to {result} when the runner writes a folder
    bench_grid: dict | None = None  # {"concurrency": [...], "dataset": [...], "reps": n, "skews": {...}}
    min_point_s: float = 180.0  # with a time budget: the least time left in which a point is started
    half_first: list | None = None  # [KEY_A, KEY_B]: a connected half of their grid runs first
    datasets: dict | None = None  # {"out": Path, "num": n, "seed": s, "prompts": p}: generated when missing


def load_spec(path) -> SweepSpec:
    """Parse and check a sweep spec YAML file."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise UsageError(f"sweep spec {str(p)!r} " + ("is a folder, expected a YAML file" if p.is_dir() else "does not exist"))
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise UsageError(f"sweep spec {str(p)!r} is not valid YAML: {' '.join(str(exc).split())}") from None
    if not isinstance(raw, dict):
        raise UsageError(f"sweep spec {str(p)!r} must be a YAML mapping")
    for key in ("command", "grid"):
        if key not in raw:
            raise UsageError(f"sweep spec {str(p)!r} is missing {key!r}")
    grid = raw["grid"]
    if not isinstance(grid, dict) or not grid or not all(isinstance(v, list) and v for v in grid.values()):
        raise UsageError("grid must map each parameter to a non-empty list of values")
    base = p.resolve().parent
    out = Path(raw.get("out_dir", f"results/{p.stem}"))
    flag = raw.get("eplb_flag", {True: "--enable-eplb", False: ""})
    flag = {(_truthy(k)): (v or "") for k, v in flag.items()}
    return SweepSpec(name=str(raw.get("name", p.stem)), out_dir=out if out.is_absolute() else base / out,
                     command=str(raw["command"]), grid=grid, vars=dict(raw.get("vars") or {}), eplb_flag=flag,
                     timeout_s=raw.get("timeout_s"), base_dir=base, collect=raw.get("collect"),
                     bench_grid=check_bench_grid(raw.get("bench_grid"), grid),
                     datasets=_check_datasets(raw.get("datasets"), base),
                     min_point_s=_positive(raw.get("min_point_s", 180.0), "min_point_s"),
                     half_first=_check_half_first(raw.get("half_first"), grid))


def _check_half_first(keys, grid: dict) -> list | None:
    if keys is None:
        return None
    if (not isinstance(keys, list) or len(keys) != 2 or len(set(map(str, keys))) != 2
            or not all(k in grid and k != "dataset" and len(grid[k]) >= 3 for k in keys)):
        raise UsageError(f"half_first must name two grid keys (not dataset) of >= 3 levels each; got {keys!r}")
    return [str(k) for k in keys]


def _positive(v, name: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
        raise UsageError(f"{name} must be a number > 0; got {v!r}")
    return float(v)


def _check_datasets(raw, base: Path) -> dict | None:
    """The spec's `datasets` mapping with defaults filled and `out` resolved, or None."""
    if raw is None:
        return None
    if not isinstance(raw, dict) or not raw.get("out"):
        raise UsageError(f"datasets must be a mapping with 'out' (and num, seed, prompts); got {raw!r}")
    unknown = sorted(set(raw) - {"out", "num", "seed", "prompts"})
    if unknown:
        raise UsageError(f"datasets keys {unknown} unknown; expected out, num, seed, prompts")
    d = {"num": 8, "seed": 0, "prompts": 100, **raw}
    for key in ("num", "prompts"):
        if not isinstance(d[key], int) or isinstance(d[key], bool) or d[key] < 1:
            raise UsageError(f"datasets.{key} must be an int >= 1; got {d[key]!r}")
    out = Path(str(d["out"]))
    d["out"] = out if out.is_absolute() else base / out
    return d


def ensure_datasets(spec: SweepSpec, out=None) -> list[Path]:
    """Generate the spec's `datasets` when their folder holds no *.jsonl yet; returns the files written
    (none when they exist or the spec has no `datasets`)."""
    d = spec.datasets
    if d is None or sorted(Path(d["out"]).glob("*.jsonl")):
        return []
    from moekern.analysis.datasets.generate import generate_datasets
    from moekern.analysis.datasets.predictor import ImbalancePredictor

    pred = ImbalancePredictor()
    infos = generate_datasets(d["num"], d["out"], d["seed"], d["prompts"], predictor=pred)
    print(f"sweep {spec.name!r}: generated {len(infos)} datasets in {d['out']} (tokenizer {pred.tokenizer.name}; "
          f"moekern datasets generate --num {d['num']} --seed {d['seed']} --prompts {d['prompts']})",
          file=out or sys.stderr)
    return [Path(i.path) for i in infos]


CLIENT_FACTORS = ("concurrency", "dataset")  # vary per bench against one server


def check_bench_grid(bench_grid, grid: dict | None = None) -> dict | None:
    """A checked copy of a spec's `bench_grid` mapping (module docstring), or None when absent. Raises
    ValueError naming the key for a wrong one."""
    if bench_grid is None:
        return None
    if not isinstance(bench_grid, dict):
        raise UsageError(f"bench_grid must be a mapping; got {type(bench_grid).__name__}")
    unknown = sorted(set(bench_grid) - set(CLIENT_FACTORS) - {"reps", "skews"})
    if unknown:
        raise UsageError(f"bench_grid keys {unknown} unknown; expected {list(CLIENT_FACTORS) + ['reps', 'skews']}")
    skews = bench_grid.get("skews")
    if skews is not None:
        from moekern.vllm.config import SKEW_NAME, parse_skew

        if not isinstance(skews, dict) or not skews:
            raise UsageError(f"bench_grid.skews must map names to skews (e.g. {{hot: 'hot:0:0.5'}}); got {skews!r}")
        for name, text in skews.items():
            if not SKEW_NAME.fullmatch(str(name)):
                raise UsageError(f"bench_grid.skews name {name!r} must be letters, digits, '.', '+' or '-'")
            try:
                parse_skew(str(text), name=f"bench_grid.skews.{name}")
            except ValueError as exc:
                raise UsageError(str(exc)) from None
    conc = bench_grid.get("concurrency")
    if not isinstance(conc, list) or not conc or not all(isinstance(c, int) and not isinstance(c, bool) and c >= 1
                                                         for c in conc):
        raise UsageError(f"bench_grid.concurrency must be a non-empty list of ints >= 1; got {conc!r}")
    ds = bench_grid.get("dataset")
    if ds is not None and (not isinstance(ds, list) or not ds):
        raise UsageError(f"bench_grid.dataset must be a non-empty list of files/globs; got {ds!r}")
    reps = bench_grid.get("reps", 1)
    if not isinstance(reps, int) or isinstance(reps, bool) or reps < 1:
        raise UsageError(f"bench_grid.reps must be an int >= 1; got {reps!r}")
    clash = sorted(set(grid or {}) & set(CLIENT_FACTORS))
    if clash:
        raise UsageError(f"grid keys {clash} vary per bench: with bench_grid they belong there, not in grid")
    return {"concurrency": list(conc), "dataset": list(ds) if ds else None, "reps": reps,
            "skews": {str(k): str(v) for k, v in skews.items()} if skews else None}


def grid_point_name(prefix: str, concurrency: int, dataset, rep: int, skew: str | None = None) -> str:
    """The file stem of one bench of a bench grid: `{prefix}[_k{skew name}]_c{concurrency}_d{dataset
    stem|random}_r{rep}` (`moekern e2e` writes it, the sweep expects it)."""
    d = _slug(dataset) if dataset else "random"
    k = f"_k{skew}" if skew else ""
    return f"{prefix}{k}_c{int(concurrency)}_d{d}_r{int(rep)}"


@dataclass(frozen=True)
class GridTiming:
    """Wall-clock costs of a bench grid on one H100 for mixtral-8x7b-4l (dummy weights, vLLM 0.26), from
    benchmarks/results/e2e/h100-2026-11-23: a server healthy after 106 s (first, cold compile cache) / 66 s,
    a decode step of ~5.5 ms at batch 64-128, ~220k prefill tok/s. bench_child_start_s: the bench process
    importing vLLM once per server; point_overhead_s: per in-process bench (tokenizer, dataset, its 4
    --num-warmups requests, metrics, save), an estimate. Good to ~30%; other models differ."""

    server_start_first_s: float = 106.0
    server_start_later_s: float = 66.0
    server_stop_s: float = 10.0
    bench_child_start_s: float = 15.0
    point_overhead_s: float = 3.0
    decode_step_s: float = 0.0055
    prefill_tok_s: float = 220_000.0
    preflight_s: float = 50.0


def bench_run_seconds(num_prompts: int, input_len: float, output_len: int, concurrency: int, max_num_seqs: int,
                      timing: GridTiming = GridTiming()) -> float:
    """Seconds of work of one bench: min(concurrency, max_num_seqs) requests decode side by side, plus all
    prompt tokens at the prefill rate (no overhead)."""
    batch = max(1, min(int(concurrency), int(max_num_seqs)))
    return num_prompts * output_len * timing.decode_step_s / batch + num_prompts * input_len / timing.prefill_tok_s


def grid_plan_seconds(num_servers: int, concurrencies, num_datasets: int, reps: int, num_prompts: int,
                      input_len: float, output_len: int, max_num_seqs: int, timing: GridTiming = GridTiming(),
                      preflight: bool = True) -> float:
    """Estimated wall seconds of `num_servers` servers each running one warm-up bench (at the largest
    concurrency) and the grid concurrencies x num_datasets x reps, preflight included when `preflight`."""
    per_round = sum(bench_run_seconds(num_prompts, input_len, output_len, c, max_num_seqs, timing)
                    + timing.point_overhead_s for c in concurrencies)
    warm = bench_run_seconds(num_prompts, input_len, output_len, max(concurrencies), max_num_seqs, timing) \
        + timing.point_overhead_s
    per_server = timing.bench_child_start_s + warm + per_round * max(1, num_datasets) * reps + timing.server_stop_s
    starts = sum(timing.server_start_first_s if i == 0 else timing.server_start_later_s for i in range(num_servers))
    return (timing.preflight_s if preflight else 0.0) + starts + num_servers * per_server


def _truthy(v) -> bool:
    return v is True or (isinstance(v, str) and v.lower() in ("true", "1", "yes", "on")) or v == 1


def _expand(values: list, base: Path, is_dataset: bool) -> list:
    if not is_dataset:
        return values
    out = []
    for v in values:
        s = str(v)
        pattern = s if Path(s).is_absolute() else str(base / s)
        hits = sorted(glob.glob(pattern)) if any(c in s for c in "*?[") else [pattern]
        out.extend(hits)
    return out


def _slug(v) -> str:
    if isinstance(v, bool):
        return "1" if v else "0"
    s = Path(str(v)).stem if ("/" in str(v) or str(v).endswith(".jsonl")) else str(v)
    return re.sub(r"[^A-Za-z0-9._+-]+", "-", s)


_ABBREV = {"backend": "", "max_num_seqs": "s", "max_num_batched_tokens": "b", "eplb": "eplb", "dataset": "d"}


def plan(spec: SweepSpec) -> list[SweepPoint]:
    """Every grid point, in grid order, with its command and whether its result already exists."""
    keys = list(spec.grid)
    values = [_expand(spec.grid[k], spec.base_dir, k == "dataset") for k in keys]
    if any(not v for v in values):
        raise UsageError(f"grid parameter {keys[[bool(v) for v in values].index(False)]!r} expanded to nothing "
                         "(a dataset glob that matches no file?)")
    points = []
    for combo in itertools.product(*values):
        params = dict(zip(keys, combo))
        run_id = "_".join(f"{_ABBREV.get(k, k[:3])}{_slug(v)}" for k, v in params.items())
        result = spec.out_dir / "runs" / f"{run_id}.json"
        gate = spec.out_dir / "gate_logs" / run_id
        fields = {**spec.vars, **params, "result": str(result), "gate_log_dir": str(gate), "run_id": run_id,
                  "budget_left_s": BUDGET_LEFT,
                  "run_dir": str(spec.out_dir / "work" / run_id),
                  "out_dir": str(spec.out_dir),
                  "eplb_flag": spec.eplb_flag.get(_truthy(params.get("eplb", False)), "")}
        if "dataset" in params:
            fields["dataset_name"] = Path(str(params["dataset"])).stem
        expected: list[Path] = []
        if spec.bench_grid is not None:
            bg = spec.bench_grid
            datasets = _expand(bg["dataset"], spec.base_dir, True) if bg["dataset"] else [None]
            if not datasets:
                raise UsageError("bench_grid.dataset expanded to nothing (a glob that matches no file?)")
            result_dir = spec.out_dir / "runs"
            flags = ["--concurrency-grid", ",".join(str(c) for c in bg["concurrency"]), "--grid-reps",
                     str(bg["reps"]), "--grid-prefix", run_id, "--result-dir", str(result_dir)]
            if datasets != [None]:
                flags[2:2] = ["--datasets", ",".join(datasets)]
            skews = list(bg.get("skews") or {})
            if skews:
                flags += ["--skews", ",".join(f"{k}={v}" for k, v in bg["skews"].items())]
            fields.update(bench_grid=shlex.join(flags), result_dir=str(result_dir))
            expected = [result_dir / f"{grid_point_name(run_id, c, d, r, skew=k)}.json"
                        for r in range(bg["reps"]) for k in (skews or [None]) for d in datasets
                        for c in bg["concurrency"]]
        try:
            cmd = shlex.split(spec.command.format(**fields))
        except KeyError as exc:
            raise UsageError(f"command template uses {{{exc.args[0]}}}, which is neither a grid key, a var, "
                             "nor one of result, gate_log_dir, run_dir, run_id, out_dir, dataset_name, eplb_flag, "
                             "budget_left_s"
                             + (", bench_grid, result_dir" if spec.bench_grid is not None else "")) from exc
        if spec.bench_grid is not None and "--result-dir" not in cmd:
            raise UsageError("a bench_grid spec's command must pass {bench_grid} (the runner's grid flags)")
        done = all(f.exists() for f in expected) if expected else result.exists()
        points.append(SweepPoint(run_id, params, cmd, result, gate, done, expected))
    if spec.half_first:
        points.sort(key=lambda p: not in_first_half(spec, p.params))  # stable: grid order within each half
    return points


def in_first_half(spec: SweepSpec, params: dict) -> bool:
    """Whether a point (grid params) is in the half `half_first` runs first (module docstring)."""
    a, b = spec.half_first
    n_b = len(spec.grid[b])
    return (spec.grid[b].index(params[b]) - spec.grid[a].index(params[a])) % n_b < (n_b + 1) // 2


def predicted_score_from_name(path) -> float | None:
    """The ImbalancePredictor score in a `moekern datasets generate` file name (`NNN_SCORE.jsonl`), else None."""
    m = _SCORE.match(Path(str(path)).stem)
    return float(m.group(1)) if m else None


def _annotate(point: SweepPoint, spec: SweepSpec, path: Path | None = None) -> None:
    path = path or point.result
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return
    if not isinstance(obj, dict):
        return
    meta = {"run_id": path.stem, "sweep": spec.name}
    if point.expected:
        meta["server_run_id"] = point.run_id
    for k, v in point.params.items():
        meta["moe_backend" if k == "backend" else k] = v
    if "dataset" in point.params:
        score = predicted_score_from_name(point.params["dataset"])
        if score is not None:
            meta["predicted_score"] = score
        meta["dataset"] = Path(str(point.params["dataset"])).name
    if point.gate_log_dir.exists():
        meta["gate_log"] = str(Path("..") / "gate_logs" / point.run_id)  # relative to runs/ID.json
    own = obj.get("moekern")
    obj["moekern"] = {**meta, **own} if isinstance(own, dict) else meta  # the runner's own keys win
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1), encoding="utf-8")
    tmp.replace(path)  # never a half-written result

