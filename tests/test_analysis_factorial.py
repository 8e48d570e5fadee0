"""moekern.analysis.study.factorial: designs, the sweep-runner path (dry run and a real tiny run), ANOVA on
synthetic results with known effects."""

import json
import sys

import numpy as np
import pytest

from moekern.analysis.study import factorial as F


def test_full_design():
    pts = F.design_points({"a": [1, 2], "b": ["x", "y", "z"]})
    assert len(pts) == 6 and pts[0] == {"a": 1, "b": "x"}


def test_fractional_design_is_balanced_and_orthogonal():
    fac = {n: [0, 1] for n in "abcde"}
    fac["q"] = [4, 64, 256]
    pts = F.design_points(fac, "fractional", fraction_p=1)
    assert len(pts) == 2 ** 4 * 3
    x = np.array([[2 * p[n] - 1 for n in "abcde"] for p in pts])
    assert np.all(x.sum(axis=0) == 0)  # every two-level factor balanced
    assert np.all(x.T @ x == np.eye(5) * len(pts))  # main effects orthogonal
    assert np.all(np.prod(x, axis=1) == 1)  # defining relation I = ABCDE
    p2 = F.design_points({n: [0, 1] for n in "abcdef"}, "fractional", fraction_p=2)
    assert len(p2) == 16
    y = np.array([[2 * p[n] - 1 for n in "abcdef"] for p in p2])
    assert np.all(y.T @ y == np.eye(6) * 16)
    with pytest.raises(ValueError, match="fraction_p"):
        F.design_points({"a": [0, 1]}, "fractional", 1)


def test_anova_finds_real_effects_not_null():
    # real: backend and queue depth; null: eplb. Over 10 seeds a level-0.05 test of the null factor may
    # reject about 5% of the time: allow at most 2 rejections, never miss the real effects.
    false_pos = 0
    for seed in range(10):
        res = F.fit_anova(F.synthetic_factorial(seed=seed), ["moe_backend", "max_num_seqs", "eplb"],
                          "output_throughput")
        t = res.table
        assert t.loc["moe_backend", "PR(>F)"] < 1e-6 and t.loc["max_num_seqs", "PR(>F)"] < 1e-6
        assert t.loc["moe_backend", "partial_eta_sq"] > 0.8
        false_pos += t.loc["eplb", "PR(>F)"] < 0.05
        assert "moe_backend:eplb" in t.index  # interactions estimable in the full design
    assert false_pos <= 2
    tpot = F.fit_anova(F.synthetic_factorial(seed=1), ["moe_backend", "max_num_seqs", "eplb"], "mean_tpot_ms")
    assert tpot.table.loc["max_num_seqs", "PR(>F)"] < 1e-6 and tpot.table.loc["moe_backend", "PR(>F)"] > 0.01


def test_anova_drops_constant_and_rejects_empty():
    df = F.synthetic_factorial()
    df["gpus"] = 1
    res = F.fit_anova(df, ["moe_backend", "gpus"], "output_throughput", interactions=0)
    assert res.dropped == ["gpus"] and list(res.table.index) == ["moe_backend", "Residual"]
    with pytest.raises(ValueError, match="two or more levels"):
        F.fit_anova(df, ["gpus"], "output_throughput")
    with pytest.raises(ValueError, match="response="):
        F.fit_anova(df, ["moe_backend"], "nope")
    out = F.anova_all(df, ["moe_backend", "max_num_seqs", "eplb"])
    assert set(out) == set(F.RESPONSES)
    tex = F.anova_latex(out)
    assert tex.startswith(r"\begin{tabular}") and r"moe\_backend" in tex
    assert F.anova_plot(out)[:4] == b"\x89PNG"


RUNNER = """import json, sys
args = dict(zip(sys.argv[1::2], sys.argv[2::2]))
q, b = int(args['--q']), args['--b']
thr = 1000 + 2 * q + (300 if b == 'moekern' else 0) + (hash(args['--rep']) % 7)
json.dump({'output_throughput': thr, 'mean_ttft_ms': 50.0 + q / 10, 'mean_tpot_ms': 10 + q / 100,
           'duration': 1.0}, open(args['--out'], 'w'))
"""


def test_factorial_run_and_analyze(tmp_path):
    (tmp_path / "runner.py").write_text(RUNNER)
    spec = {"name": "t", "out_dir": "out", "machine_gpus": 1,
            "command": f"{sys.executable} runner.py --q {{max_num_seqs}} --b {{moe_backend}} --rep {{rep}} "
                       "--g {gpus} --out {result}",
            "factors": {"moe_backend": ["moekern", "vllm"], "max_num_seqs": [4, 64], "gpus": [1, 8],
                        "rep": [0, 1, 2]}}
    import yaml

    p = tmp_path / "spec.yaml"
    p.write_text(yaml.safe_dump(spec))
    s = F.load_factorial_spec(p)
    dry = F.run_factorial(s, dry_run=True)
    assert dry == {"points": 24, "runnable": 12, "planned_only": 12, "ran": 0, "failed": 0, "skipped": 0}
    plan = json.loads((tmp_path / "out" / "plan.json").read_text())
    assert all(pt["gpus"] == 8 for pt in plan["needs_larger_machine"])
    done = F.run_factorial(s)
    assert done["ran"] == 12 and done["failed"] == 0
    df = F.collect_results(tmp_path / "out" / "runs")
    assert len(df) == 12 and set(df["moe_backend"]) == {"moekern", "vllm"}
    res = F.fit_anova(df, ["moe_backend", "max_num_seqs"], "output_throughput")
    assert res.table.loc["moe_backend", "PR(>F)"] < 1e-3
    again = F.run_factorial(s)  # resumable: nothing re-runs
    assert again["ran"] == 0 and again["skipped"] == 12


def test_spec_validation(tmp_path):
    p = tmp_path / "s.yaml"
    p.write_text("factors: {max_num_seqs: [2, 64]}\n")
    with pytest.raises(ValueError, match="4..256"):
        F.load_factorial_spec(p)
    p.write_text("factors: {}\n")
    with pytest.raises(ValueError, match="non-empty"):
        F.load_factorial_spec(p)


# ---- client factors: many benches against one server (bench grid) ----------------------------------------
from pathlib import Path  # noqa: E402

SPECS = Path(__file__).resolve().parents[1] / "analysis" / "specs"

# A fake runner: writes what moekern e2e --concurrency-grid writes (one result JSON per bench, named by
# sweep.grid_point_name, with a "moekern" block); throughput depends on backend and concurrency only.
_FAKE_GRID_RUNNER = r'''
import argparse, json, sys
from pathlib import Path
sys.path.insert(0, sys.argv[1]); argv = sys.argv[2:]
from moekern.analysis.study.sweep import grid_point_name, predicted_score_from_name
p = argparse.ArgumentParser()
p.add_argument("--arms"); p.add_argument("--concurrency-grid"); p.add_argument("--datasets", default="")
p.add_argument("--grid-reps", type=int); p.add_argument("--grid-prefix"); p.add_argument("--result-dir")
a, _ = p.parse_known_args(argv)
Path(a.result_dir).mkdir(parents=True, exist_ok=True)
for r in range(a.grid_reps):
    for d in [x for x in a.datasets.split(",") if x] or [None]:
        for c in [int(x) for x in a.concurrency_grid.split(",")]:
            name = grid_point_name(a.grid_prefix, c, d, r)
            thr = 1000.0 + (300.0 if a.arms == "moekern" else 0.0) + 5.0 * c + 7.0 * r + (3.0 if d and "001" in d else 0.0)
            meta = {"moe_backend": a.arms, "concurrency": c, "max_concurrency": c, "rep": r,
                    "dataset": Path(d).name if d else None, "predicted_score": predicted_score_from_name(d) if d else None}
            Path(a.result_dir, name + ".json").write_text(json.dumps({"output_throughput": thr, "mean_ttft_ms": 20.0 + c,
                                                                      "mean_tpot_ms": 5.0 + 0.01 * c, "moekern": meta}))
'''


def _grid_spec(tmp_path, factors, command=None, reps=2):
    import yaml

    runner = tmp_path / "fake_runner.py"
    runner.write_text(_FAKE_GRID_RUNNER)
    repo = Path(__file__).resolve().parents[1]
    spec = {"name": "g", "out_dir": "out", "factors": factors, "reps": reps,
            "command": command or f"{sys.executable} {runner} {repo} --arms {{moe_backend}} {{bench_grid}}"}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    return F.load_factorial_spec(tmp_path / "spec.yaml")


def _datasets(tmp_path):
    for name in ("000_0.2000", "001_0.7000"):
        (tmp_path / f"{name}.jsonl").write_text(json.dumps({"prompt": "x y", "prompt_len": 12}) + "\n")
    return ["*.jsonl"]


def test_client_factors_run_on_one_server_per_server_level_point(tmp_path):
    spec = _grid_spec(tmp_path, {"moe_backend": ["vllm", "moekern"], "max_num_seqs": [128],
                                 "concurrency": [8, 32], "dataset": _datasets(tmp_path)})
    assert spec.server_factors == {"moe_backend": ["vllm", "moekern"], "max_num_seqs": [128]}
    assert spec.bench_grid == {"concurrency": [8, 32], "dataset": ["*.jsonl"], "reps": 2}
    import io

    buf = io.StringIO()
    s = F.run_factorial(spec, dry_run=True, out=buf)
    assert s["points"] == 2 and s["benches"] == 2 * 2 * 2 * 2 and s["estimate_s"] > 0
    text = buf.getvalue()
    assert "(8 benches on one server)" in text and "--concurrency-grid 8,32" in text and "--grid-reps 2" in text
    assert not (spec.out_dir / "runs").exists()
    s = F.run_factorial(spec, out=io.StringIO())
    assert s["ran"] == 2 and s["failed"] == 0
    df = F.collect_results(spec.out_dir / "runs")
    assert len(df) == 16 and sorted(df["concurrency"].unique()) == [8, 32]
    assert set(df["dataset"]) == {"000_0.2000.jsonl", "001_0.7000.jsonl"} and set(df["rep"]) == {0, 1}
    assert set(df["server_run_id"]) == {"s128_vllm", "s128_moekern"}  # yaml.safe_dump sorted the factors
    res = F.anova_all(df, ["moe_backend", "concurrency", "dataset"], ("output_throughput",), interactions=0)
    t = res["output_throughput"].table
    assert t.loc["moe_backend", "PR(>F)"] < 1e-6 and t.loc["concurrency", "PR(>F)"] < 1e-6
    s = F.run_factorial(spec, out=io.StringIO())  # resume: every bench file exists
    assert s["ran"] == 0 and s["skipped"] == 2


def test_grid_estimate_arithmetic(tmp_path):
    from moekern.analysis.study.sweep import GridTiming

    spec = _grid_spec(tmp_path, {"moe_backend": ["vllm"], "concurrency": [8], "dataset": _datasets(tmp_path)},
                      reps=1)
    spec.vars.update(num_prompts=100, output_len=10)
    g = GridTiming()
    work = 100 * 10 * g.decode_step_s / 8 + 100 * 12 / g.prefill_tok_s + g.point_overhead_s
    want = g.preflight_s + g.server_start_first_s + g.bench_child_start_s + work * (1 + 2) + g.server_stop_s
    assert F.estimate_seconds(spec, 1) == pytest.approx(want)


def test_committed_small_factorial_spec_plans_under_eight_minutes():
    spec = F.load_factorial_spec(SPECS / "factorial_h100_small.yaml")
    assert spec.server_factors == {"moe_backend": ["vllm", "moekern"], "max_num_seqs": [128]}
    assert spec.bench_grid["concurrency"] == [8, 32, 128] and spec.reps == 2
    from moekern.analysis.study.sweep import predicted_score_from_name

    files = F._datasets(spec)
    scores = [predicted_score_from_name(f) for f in files]
    assert len(files) == 3 and scores == sorted(scores) and scores[0] < 0.35 and scores[-1] > 0.75
    est = F.estimate_seconds(spec, 2)
    assert 5 * 60 < est < 8 * 60
    assert "--dummy-router-seed 0" in spec.command and "{bench_grid}" in spec.command


@pytest.mark.parametrize("factors,extra,match", [
    ({"moe_backend": ["a"]}, {"reps": 2}, "needs a 'concurrency' factor"),
    ({"concurrency": [0, 8]}, {}, "concurrency levels must be ints >= 1"),
    ({"concurrency": [8]}, {"reps": 0}, "reps must be an int >= 1"),
])
def test_bad_client_factor_specs(tmp_path, factors, extra, match):
    import yaml

    (tmp_path / "s.yaml").write_text(yaml.safe_dump({"factors": factors, **extra}))
    with pytest.raises(ValueError, match=match):
        F.load_factorial_spec(tmp_path / "s.yaml")


def test_client_factor_spec_needs_bench_grid_in_command(tmp_path):
    import io

    spec = _grid_spec(tmp_path, {"moe_backend": ["vllm"], "concurrency": [8]}, command="echo {moe_backend}")
    with pytest.raises(ValueError, match=r"\{bench_grid\}"):
        F.run_factorial(spec, out=io.StringIO())


def test_sweep_bench_grid_checks(tmp_path):
    from moekern.analysis.study.sweep import check_bench_grid

    assert check_bench_grid(None) is None
    with pytest.raises(ValueError, match="belong there"):
        check_bench_grid({"concurrency": [8]}, {"dataset": ["a"]})
    with pytest.raises(ValueError, match="unknown"):
        check_bench_grid({"concurrency": [8], "qps": [1]})
    with pytest.raises(ValueError, match="ints >= 1"):
        check_bench_grid({"concurrency": [True]})


def test_learned_training_frame_reads_grid_results_with_windowed_cv(tmp_path, monkeypatch):
    """A fake run directory in moekern e2e's grid layout: two benches of one server sharing one gate log; the
    learned predictor's training frame gets each bench's CV from its own window (0 and sqrt(3) by design)."""
    import math

    from moekern.gatelog import GateRecord, write_records
    from moekern.analysis.study import learned

    runs, gl = tmp_path / "runs", tmp_path / "gate_logs" / "moekern" / "server_1"
    runs.mkdir()
    gl.mkdir(parents=True)
    recs, step = [], 0
    for t0, counts in ((100.0, [10, 10, 10, 10]), (200.0, [40, 0, 0, 0]), (300.0, [0, 0, 5, 35])):
        for k in range(3):
            recs.append(GateRecord(step=step, layer=0, expert_counts=counts, num_tokens=20, top_k=2, phase="decode",
                                   time=t0 + k))
            step += 1
    write_records(gl / "gate_log.rank0.jsonl", recs)
    for name, (lo, hi), c in (("moekern_s128_c8_d000_0.2000_r0", (100.0, 102.0), 8),
                              ("moekern_s128_c32_d001_0.8000_r0", (199.5, 202.5), 32)):
        meta = {"moe_backend": "moekern", "max_num_seqs": 128, "concurrency": c, "max_concurrency": c,
                "model": "mixtral-8x7b-4l", "gate_log": "../gate_logs/moekern/server_1",
                "gate_log_window": [lo, hi], "bench_start": lo, "bench_end": hi, "rep": 0}
        (runs / f"{name}.json").write_text(json.dumps({"output_throughput": 100.0 * c, "mean_ttft_ms": 10.0,
                                                       "mean_tpot_ms": 5.0, "moekern": meta}))
    from moekern import gatelog

    reads = []
    real_read = gatelog.read_gate_log
    monkeypatch.setattr(gatelog, "read_gate_log", lambda p: reads.append(p) or real_read(p))
    x, df, _ = learned.training_frame(runs)
    assert len(reads) == 1  # the shared server log is parsed once for both benches
    assert sorted(x["concurrency"]) == [8, 32]
    cv = dict(zip(df["run_id"], x["measured_cv"]))
    assert cv["moekern_s128_c8_d000_0.2000_r0"] == pytest.approx(0.0, abs=1e-12)
    assert cv["moekern_s128_c32_d001_0.8000_r0"] == pytest.approx(math.sqrt(3.0))
    assert sorted(df["concurrency"]) == [8, 32]


def test_reps_override_plans_fewer_benches(capsys):
    spec = F.load_factorial_spec(SPECS / "factorial_h100_small.yaml")
    one = F.with_reps(spec, 1)
    assert one.reps == 1 and spec.reps == 2 and one.bench_grid["reps"] == 1 and one.factors == spec.factors
    assert F.estimate_seconds(one, 2) < F.estimate_seconds(spec, 2)
    with pytest.raises(ValueError, match="reps must be an int >= 1"):
        F.with_reps(spec, 0)
    no_grid = F.FactorialSpec(name="x", out_dir=Path("."), factors={"moe_backend": ["a"]})
    with pytest.raises(ValueError, match="needs a 'concurrency' factor"):
        F.with_reps(no_grid, 2)
    from moekern.cli import main

    # argparse: one usage line naming the flag, not a traceback; main returns its exit code
    assert main(["factorial", str(SPECS / "factorial_h100_small.yaml"), "--dry-run", "--reps", "0"]) == 2
    assert "--reps: '0' is not an int >= 1" in capsys.readouterr().err


REAL = SPECS.parents[1] / "benchmarks" / "results" / "factorial" / "h200-2026-12-06-small"


def test_steady_rows_leaves_out_benches_that_compiled():
    import pandas as pd

    df = pd.DataFrame({"run_id": ["a", "b", "c", "d"], "steady_state": [True, False, None, "false"],
                       "output_throughput": [1.0, 2.0, 3.0, 4.0]})
    kept, out = F.steady_rows(df)
    assert list(kept["run_id"]) == ["a", "c"] and out == ["b", "d"]  # unknown (None) is kept
    assert F.steady_rows(df.drop(columns="steady_state"))[1] == []


def test_committed_real_factorial_analysis(tmp_path, capsys):
    """The committed real factorial (H200, 2026-12-06, 36 benches): the benches whose vLLM server JIT-compiled its Triton
    MoE kernel while measured are left out of the ANOVA by default and named; concurrency dominates throughput."""
    from moekern.cli import main

    df = F.collect_results(REAL / "runs")
    assert len(df) == 36 and df["steady_state"].notna().all()
    kept, out = F.steady_rows(df)
    assert len(out) == int((~df["steady_state"].astype(bool)).sum()) > 0
    assert all(r.startswith("vllm_") for r in out) and len(kept) + len(out) == 36
    assert main(["factorial", str(SPECS / "factorial_h100_small.yaml"), "--analyze", str(REAL / "runs"),
                 "--analysis-out", str(tmp_path), "--json"]) == 0
    cap = capsys.readouterr()
    assert f"left out {len(out)} of 36 benches" in cap.err
    res = json.loads(cap.out[cap.out.index("{"):])
    thr = {t["term"]: t for t in res["output_throughput"]["terms"]}
    assert res["output_throughput"]["n"] == len(kept)
    assert thr["concurrency"]["p_value"] < 1e-6 and thr["concurrency"]["partial_eta_sq"] > 0.9
    assert (tmp_path / "anova.png").stat().st_size > 0 and "moe\\_backend" in (tmp_path / "anova.tex").read_text()
    assert main(["factorial", str(SPECS / "factorial_h100_small.yaml"), "--analyze", str(REAL / "runs"),
                 "--analysis-out", str(tmp_path), "--json", "--include-unsteady"]) == 0
    cap = capsys.readouterr()
    assert "left out" not in cap.err and json.loads(cap.out[cap.out.index("{"):])["output_throughput"]["n"] == 36
