"""moekern.study.factorial: designs, the sweep-runner path (dry run and a real tiny run), ANOVA on
synthetic results with known effects."""

import json
import sys

import numpy as np
import pytest

from moekern.study import factorial as F


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
