"""moekern.analysis.study.learned + recommend + project + the study report sections."""

import json
import math
import subprocess
import sys

import numpy as np
import pytest

from moekern.models import get_model
from moekern.analysis.study import learned
from moekern.analysis.imbalance.coactivation import write_synthetic_coactivation_log


@pytest.fixture(scope="module")
def small_predictor():
    return learned.train(learned.sample_results_dir(), n_estimators=15)


def test_featurize():
    f = learned.featurize({"model": "dbrx", "layout": "EP", "gpus": 8, "moe_backend": "vllm", "eplb": True})
    assert (f["num_experts"], f["tp"], f["ep"], f["backend_vllm"], f["eplb"]) == (16, 1, 8, 1.0, 1.0)
    assert set(f) == set(learned.FEATURES)
    g = learned.featurize({"model_id": "Qwen/Qwen1.5-MoE-A2.7B"})
    assert g["num_experts"] == 60 and g["backend_other"] == 1.0


def test_concurrency_is_what_can_decode_side_by_side():
    """The client's --max-concurrency (the factorial's queue-depth factor) capped by the server's max_num_seqs;
    the server's queue depth alone when the client set none."""
    f = learned.featurize
    assert f({"max_num_seqs": 64, "max_concurrency": 16})["concurrency"] == 16
    assert f({"max_num_seqs": 64, "max_concurrency": 256})["concurrency"] == 64
    assert f({"max_num_seqs": 32})["concurrency"] == 32
    assert f({}, {"max_num_seqs": 48.0})["concurrency"] == 48


def test_collect_results_reads_the_clients_concurrency(tmp_path):
    from moekern.analysis.study.factorial import collect_results

    base = {"output_throughput": 100.0, "mean_ttft_ms": 10.0, "mean_tpot_ms": 5.0}
    (tmp_path / "a.json").write_text(json.dumps({**base, "max_concurrency": 8, "moekern": {"max_num_seqs": 64}}))
    (tmp_path / "b.json").write_text(json.dumps({**base, "max_concurrency": 8,
                                                 "moekern": {"max_num_seqs": 64, "max_concurrency": 32}}))
    df = collect_results(tmp_path).set_index("run_id")
    assert df.loc["a", "max_concurrency"] == 8 and df.loc["b", "max_concurrency"] == 32


def test_train_reports_holdout_and_is_synthetic(small_predictor):
    p = small_predictor
    assert p.synthetic and p.n_rows == 96
    assert set(p.models) == set(learned.TARGETS)
    for a in p.accuracy():
        assert a["model"] in ("random_forest", "gradient_boosting")
        assert a["n_test"] == 24 and a["n_train"] == 72 and math.isfinite(a["mape"])
    thr = p.models["output_throughput"]
    assert thr.holdout["r2"] > 0.3  # the sample's throughput depends on its features; a learner must see it
    pred = p.predict([{"moe_backend": "moekern", "max_num_seqs": 16}, {"moe_backend": "moekern", "max_num_seqs": 64}])
    assert pred.shape == (2, 3) and np.all(pred.to_numpy() > 0)
    assert "ep" in p.extrapolating({"ep": 8}) and p.extrapolating({"moe_backend": "vllm"}) == []


def test_save_load_roundtrip_and_version_fallback(small_predictor, tmp_path, monkeypatch):
    import joblib

    train = learned.train
    monkeypatch.setattr(learned, "train", lambda d: train(d, n_estimators=5))  # the fallback retrains: keep it quick

    path = learned.save(small_predictor, tmp_path / "p.joblib")
    back, note = learned.load(path)
    assert note.startswith("loaded")
    x = [{"moe_backend": "vllm", "max_num_seqs": 32}]
    assert np.allclose(back.predict(x).to_numpy(), small_predictor.predict(x).to_numpy())
    obj = joblib.load(path)
    obj["sklearn"] = "0.0"
    joblib.dump(obj, tmp_path / "old.joblib")
    _, note = learned.load(tmp_path / "old.joblib")
    assert "retrained on the SYNTHETIC sample" in note
    obj = joblib.load(path)  # fitted on another feature list (a shipped file older than a new feature)
    obj["predictor"].features = tuple(f for f in learned.FEATURES if f != "concurrency")
    joblib.dump(obj, tmp_path / "old_features.joblib")
    _, note = learned.load(tmp_path / "old_features.joblib")
    assert "fitted on other features (missing ['concurrency']" in note and "retrained" in note


def test_shipped_predictor_is_trained_on_the_committed_real_factorial():
    from importlib import resources
    from pathlib import Path

    p, note = learned.load()
    assert note.startswith("loaded"), note  # the shipped file matches this scikit-learn
    assert not p.synthetic and "factorial/h200-2026-12-06-small" in p.trained_on
    real = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "factorial" / "h200-2026-12-06-small"
    table, left_out = learned.training_table(real / "runs")
    assert p.n_rows == len(table) and sorted(p.left_out) == sorted(left_out) and left_out
    shipped = Path(str(resources.files("moekern").joinpath(learned.TRAINING_ROWS)))
    rows, _ = learned.training_table(shipped)  # the shipped CSV holds exactly those rows
    assert list(rows["run_id"]) == list(table["run_id"])
    assert np.allclose(rows["measured_cv"], table["measured_cv"], rtol=1e-5)
    assert np.allclose(rows["output_throughput"], table["output_throughput"], rtol=1e-5)
    for a in p.accuracy():  # held-out error on real benches
        assert a["n_test"] + a["n_train"] == len(table) and math.isfinite(a["mape"])


def test_shipped_model_that_does_not_load_is_refit_on_its_rows(monkeypatch):
    train = learned.train
    monkeypatch.setattr(learned, "train", lambda d: train(d, n_estimators=5))
    monkeypatch.setattr(learned, "SHIPPED", "data/predictor/no_such.joblib")
    p, note = learned.load()
    assert "does not exist: retrained on the shipped training rows (training_rows.csv)" in note
    assert not p.synthetic and p.n_rows == 29


def test_training_table_csv_roundtrip_and_unsteady_rows(tmp_path):
    runs = tmp_path / "runs"
    runs.mkdir()
    for i in range(14):
        meta = {"moe_backend": "moekern" if i % 2 else "vllm", "max_num_seqs": 128, "max_concurrency": 8 * (1 + i % 3),
                "model": "mixtral-8x7b-4l", "rep": i, "steady_state": i != 3, "measured_cv": 0.5 + i / 100}
        (runs / f"r{i:02d}.json").write_text(json.dumps({"output_throughput": 1000.0 + 10 * i, "mean_ttft_ms": 20.0 + i,
                                                         "mean_tpot_ms": 4.0 + i / 10, "moekern": meta}))
    table, left_out = learned.training_table(runs)
    assert left_out == ["r03"] and len(table) == 13 and "r03" not in set(table["run_id"])
    csv = learned.table_csv(table, tmp_path / "rows.csv")
    back, again = learned.training_table(csv)
    assert again == [] and list(back["run_id"]) == list(table["run_id"])
    assert learned.train(csv, n_estimators=5).n_rows == learned.train(runs, n_estimators=5).n_rows == 13
    for i in range(14):  # nothing steady: a clear error, not an empty model
        f = runs / f"r{i:02d}.json"
        obj = json.loads(f.read_text())
        obj["moekern"]["steady_state"] = False
        f.write_text(json.dumps(obj))
    with pytest.raises(ValueError, match=r"no steady-state run .*\(14 left out\)"):
        learned.training_table(runs)


def test_recommend_with_gate_log(tmp_path):
    from moekern.analysis.placement.recommend import format_recommendation, recommend

    g = write_synthetic_coactivation_log(tmp_path / "g" / "gate_log.rank0.jsonl", num_experts=16, top_k=4,
                                         num_steps=10, tokens_per_step=32)
    rec = recommend("dbrx", 4, gate_log=g.parent)
    layouts = {c["layout"] for c in rec["candidates"]}
    assert layouts == {"TP4", "EP4", "TP4+EP4"}
    ep_pl = {c["placement"] for c in rec["candidates"] if c["layout"] == "EP4"}
    assert {"contiguous", "coactivation", "greedy"} <= ep_pl
    assert rec["recommended"]["fits"]
    assert not any("SYNTHETIC" in n for n in rec["notes"])  # the shipped predictor is trained on real benches
    assert any(n.startswith("predictor: loaded") for n in rec["notes"])
    # dbrx on 4 GPUs is outside what the shipped model saw (one Mixtral-shaped model, one GPU): said so
    assert all({"num_experts", "gpus"} <= set(c["extrapolated"]) for c in rec["candidates"])
    assert "extrapolates" in rec["decided_by"] or "memory" in rec["decided_by"]
    txt = format_recommendation(rec)
    assert "recommended:" in txt
    # no gate log: still an answer, by memory
    r2 = recommend("mixtral", 8)
    assert "memory" in r2["decided_by"] or "predictor" in r2["decided_by"]


def test_projection_behaves(tmp_path):
    from moekern.analysis.placement.project import (Projection, placements_for, project, project_from_gate_log,
                                       project_layer, sample_tokens_from_load)

    spec = get_model("dbrx")
    g = write_synthetic_coactivation_log(tmp_path / "g" / "gate_log.rank0.jsonl", num_experts=16, top_k=4,
                                         num_steps=6, tokens_per_step=64)
    rows, info = project_from_gate_log(g.parent, "dbrx", nodes=(1, 2), intra_bw=300e9, inter_bw=50e9)
    assert info["status"].startswith("PROJECTED") and info["routing"] == "topk_sample"
    assert {r.gpus for r in rows} == {8, 16} and all(isinstance(r, Projection) for r in rows)
    one = {r.placement: r for r in rows if r.gpus == 8}
    two = {r.placement: r for r in rows if r.gpus == 16}
    assert all(r.inter_node_fraction == 0 for r in one.values())
    assert all(r.inter_node_fraction > 0 for r in two.values())
    # crossing nodes over a 6x slower link costs more per layer than staying in one node
    assert two["contiguous"].dispatch_us > one["contiguous"].dispatch_us
    # uniform routing, one node: time = copies * bytes / bandwidth + latency, by hand
    toks = np.stack([np.random.default_rng(i).choice(16, 4, replace=False) for i in range(4000)])
    e2r = np.arange(16) // 2
    d, c, fo, inter, share, _ = project_layer(toks, e2r, 8, 100, 1024, 4, 100e9, 10e9, 2.0, 0.0)
    hit = np.zeros((4000, 8))
    np.put_along_axis(hit, e2r[toks], 1, axis=1)
    p = hit.mean(0)
    sends = 100 * (p.sum() - p)  # copies each source sends (not to itself)
    recv = 100 * p * 7
    expect = 1e6 * max(sends.max(), recv.max()) * (1024 * 2 + 32) / 100e9
    assert d == pytest.approx(expect) and inter == 0
    assert fo == pytest.approx(hit.sum(1).mean())
    # without samples, tokens drawn from loads: k distinct ids
    t = sample_tokens_from_load(np.arange(1, 17), 4, 50)
    assert t.shape == (50, 4) and all(len(set(r)) == 4 for r in t.tolist())
    rows2 = project(spec, [t], placements_for([np.ones(16)], None, 16), nodes=(1,), intra_bw=1e11)
    assert {r.placement for r in rows2} == {"contiguous", "round_robin", "greedy"}


def test_project_and_recommend_cli(tmp_path):
    g = write_synthetic_coactivation_log(tmp_path / "g" / "gate_log.rank0.jsonl", num_experts=16, top_k=4,
                                         num_steps=6, tokens_per_step=32)
    out = subprocess.run([sys.executable, "-m", "moekern.cli", "project", str(g.parent), "--model", "dbrx",
                          "--nodes", "1,2", "--json", "--plot", str(tmp_path / "p.png")],
                         capture_output=True, text=True, check=True).stdout
    obj = json.loads(out)
    assert len(obj["rows"]) >= 6 and (tmp_path / "p.png").exists()
    with pytest.raises(subprocess.CalledProcessError):
        subprocess.run([sys.executable, "-m", "moekern.cli", "project", str(g.parent), "--model", "mixtral"],
                       capture_output=True, check=True)  # 16-expert log vs an 8-expert model


def test_report_gets_study_sections(tmp_path):
    import shutil

    from moekern.analysis.report.html import build_report, render_html, render_markdown

    root = tmp_path / "res"
    shutil.copytree(learned.sample_results_dir(), root)
    # give one gate log co-activation samples, and name a model for the projection
    write_synthetic_coactivation_log(root / "gate_logs" / "ds0" / "gate_log.rank0.jsonl", num_experts=16,
                                     top_k=2, num_layers=6, num_steps=24, tokens_per_step=32)
    meta = json.loads((root / "metadata.json").read_text())
    meta["model"] = "dbrx"
    (root / "metadata.json").write_text(json.dumps(meta))
    rep = build_report(root, n_boot=50)
    heads = [h for h, _ in rep.sections]
    assert "Main results (LaTeX)" in heads and "Learned serving predictor" in heads
    assert any(h.startswith("ANOVA") for h in heads)
    assert any(h.startswith("Expert co-activation") for h in heads)
    assert any(h.startswith("Multi-node projection") for h in heads), rep.notes
    html = render_html(rep)
    assert "<pre>\\begin{tabular}" in html
    md = render_markdown(rep, tmp_path / "img", "img")
    assert "```latex" in md
