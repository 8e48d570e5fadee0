"""`moekern report` on a knob-grid folder (issue 31) made by the real serve-grid code with fakes
(tests/knob_grid_fakes.py, SYNTHETIC known effects): the knob heatmaps per backend with IQR filtering, the
metrics vs both measured CVs, the CV reached per skew, and the ANOVA with the knobs, skew and backend."""

import json
import math

import numpy as np
import pytest
from knob_grid_fakes import SKEW_LOADS, make_knob_grid_folder, throughput

from moekern.analysis.imbalance.metrics import cv


@pytest.fixture(scope="module")
def grid_folder(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    try:
        root = tmp_path_factory.mktemp("knob_grid")
        make_knob_grid_folder(root, mp, outlier="s8_b2048_moekern_khot_c64_drandom_r0",
                              unsteady="s32_b8192_vllm_kuniform_c64_drandom_r0")
    finally:
        mp.undo()
    return root


def _df(root):
    from moekern.analysis.serving.metrics import load_runs, runs_dataframe

    runs, skipped = load_runs(root)
    assert not skipped
    return runs_dataframe(runs)


def test_folder_has_the_grid_layout_and_both_cvs(grid_folder):
    runs = sorted((grid_folder / "runs").glob("*.json"))
    cards = sorted((grid_folder / "runs").glob("*.card.yaml"))
    assert len(runs) == 2 * 2 * 2 * 3 and len(cards) == len(runs)
    df = _df(grid_folder)
    assert set(df["routing_skew"]) == {"uniform", "moderate", "hot"}
    for skew, spec in (("uniform", "uniform"), ("moderate", "hot:0:0.05"), ("hot", "hot:0:0.5")):
        d = df[df.routing_skew == skew]
        want = float(cv(np.array(SKEW_LOADS[spec], float)))  # every record of the window is this vector
        assert d["measured_cv_agg"].to_numpy() == pytest.approx([want] * len(d), abs=1e-9)
        assert d["measured_cv_step"].to_numpy() == pytest.approx([want] * len(d), abs=1e-9)


def test_knob_grid_table_median_per_cell_and_iqr_outlier_left_out(grid_folder):
    from moekern.analysis.report.knobgrid import knob_grid_table

    df = _df(grid_folder)
    t, n_out = knob_grid_table(df, "output_throughput", "moekern")
    assert n_out == 1  # the x5 bench
    assert list(t.index) == [8, 32] and list(t.columns) == [2048, 8192]
    # (8, 2048): the hot bench is the outlier, so the median of the two left (uniform, moderate)
    want = np.median([throughput(8, "moekern", "uniform"), throughput(8, "moekern", "hot:0:0.05")])
    assert t.loc[8, 2048] == pytest.approx(want, rel=0.03)
    want = throughput(32, "moekern", "hot:0:0.05")  # median of the three skews: the moderate one
    assert t.loc[32, 8192] == pytest.approx(want, rel=0.03)
    t, n_out = knob_grid_table(df, "output_throughput", "vllm")
    assert n_out == 0 and t.loc[32, 2048] > t.loc[8, 2048]
    assert df.steady_state.tolist().count(False) == 1  # the bench that compiled while measured


def test_cv_by_skew_table_spans_the_skews(grid_folder):
    from moekern.analysis.report.knobgrid import cv_by_skew_table

    head, rows = cv_by_skew_table(_df(grid_folder))
    assert head[:3] == ["skew", "backend", "runs"] and len(rows) == 3 * 2
    hot = [r for r in rows if r[0] == "hot"][0]
    want = float(cv(np.array(SKEW_LOADS["hot:0:0.5"], float)))
    assert hot[2] == "4" and hot[3].startswith(f"{want:.3f} [")


def test_anova_names_knobs_skew_and_backend(grid_folder):
    from moekern.analysis.study.factorial import FACTORS, anova_all, steady_rows

    df, unsteady = steady_rows(_df(grid_folder))
    assert unsteady == ["s32_b8192_vllm_kuniform_c64_drandom_r0"]
    from moekern.analysis.stats import iqr_mask

    keep = iqr_mask(df.output_throughput.to_numpy(float))
    assert (~keep).sum() == 1  # the x5 bench, left out as the plots do
    df = df[keep]
    res = anova_all(df, [f for f in FACTORS if f in df])
    a = res["output_throughput"]
    for f in ("moe_backend", "max_num_seqs", "max_num_batched_tokens", "routing_skew"):
        assert f in a.formula
    p = a.table["PR(>F)"]
    assert p["max_num_seqs"] < 1e-6 and p["routing_skew"] < 1e-6 and p["moe_backend"] < 1e-3
    assert p["max_num_batched_tokens"] > 1e-3  # no throughput effect was built in
    assert res["mean_ttft_ms"].table["PR(>F)"]["max_num_batched_tokens"] < 1e-6


def test_report_builds_the_knob_grid_sections(grid_folder, tmp_path):
    from moekern.cli import main

    out = tmp_path / "r.html"
    assert main(["report", str(grid_folder), "--out", str(out)]) == 0
    text = out.read_text()
    for heading in ("Serving metrics vs max-num-seqs", "Serving metrics vs max-num-batched-tokens",
                    "Knob grid per backend (max-num-seqs x max-num-batched-tokens)",
                    "Serving metrics vs measured CV, aggregated (prior study&#x27;s method)",
                    "Serving metrics vs measured CV, per step (prior study&#x27;s method)",
                    "Measured imbalance per routing skew", "ANOVA (type II, partial eta squared)"):
        assert f"<h2>{heading}" in text, heading
    knob = text.split("<h2>Knob grid per backend")[1].split("<h2>")[0]
    assert knob.count("<img") == 3  # TTFT, TPOT, throughput
    anova = text.split("<h2>ANOVA")[1].split("<h2>")[0]
    assert "C(routing_skew)" in anova and "C(max_num_batched_tokens)" in anova
    assert "(n=23)" in anova and "1 run(s) with steady_state false left out" in anova
    assert "knob-grid sections: 1 run(s) left out, JIT-compiled while measured (steady_state false): " \
           "s32_b8192_vllm_kuniform_c64_drandom_r0" in text


def test_report_without_knobs_or_skews_adds_no_knob_sections(tmp_path):
    """A folder of runs at one knob setting without skews (the general report's case) gets none of them."""
    from moekern.analysis.report.html import build_report

    runs = tmp_path / "runs"
    runs.mkdir()
    for i, b in enumerate(("vllm", "moekern", "vllm", "moekern")):
        (runs / f"r{i}.json").write_text(json.dumps({"output_throughput": 100.0 + i, "mean_ttft_ms": 10.0,
                                                     "mean_tpot_ms": 5.0, "duration": 1.0,
                                                     "moekern": {"moe_backend": b, "max_num_seqs": 8}}))
    rep = build_report(tmp_path, n_boot=50)
    heads = [h for h, _ in rep.sections]
    assert not any(h.startswith(("Knob grid", "Measured imbalance per routing skew")) for h in heads)
    assert not any("measured CV" in h for h in heads) and not math.isnan(len(heads))


def test_first_half_estimates_the_full_grids_main_effects(tmp_path, monkeypatch):
    """The half the imbalance spec runs first (half_first) is a balanced half fraction of the 4 x 4 knob grid:
    the ANOVA finds the same main effects in it as in the full grid, and each knob level's mean throughput
    agrees with the full grid's. A checkerboard half could not: one contrast of each knob aliased."""
    from moekern.analysis.serving.metrics import load_runs, runs_dataframe
    from moekern.analysis.study.factorial import fit_anova
    from moekern.analysis.study.sweep import SweepSpec, in_first_half

    seqs, tokens = (8, 16, 32, 64), (2048, 4096, 8192, 16384)
    make_knob_grid_folder(tmp_path, monkeypatch, seqs=seqs, tokens=tokens)
    full = runs_dataframe(load_runs(tmp_path)[0])
    assert len(full) == 16 * 2 * 3
    spec = SweepSpec("g", tmp_path, "", {"max_num_seqs": list(seqs), "max_num_batched_tokens": list(tokens)},
                     half_first=["max_num_seqs", "max_num_batched_tokens"])
    first = full.apply(lambda r: in_first_half(spec, {"max_num_seqs": r.max_num_seqs,
                                                      "max_num_batched_tokens": r.max_num_batched_tokens}), axis=1)
    half = full[first]
    checker = full[(full.max_num_seqs.map(seqs.index) + full.max_num_batched_tokens.map(tokens.index)) % 2 == 0]
    with pytest.raises(ValueError, match="too few for main effects"):
        fit_anova(checker, ["max_num_seqs", "max_num_batched_tokens"], "output_throughput", interactions=1)
    assert len(half) == 48 and half.groupby("max_num_seqs").max_num_batched_tokens.nunique().eq(2).all()
    factors = ["moe_backend", "max_num_seqs", "max_num_batched_tokens", "routing_skew"]
    # the synthetic effects multiply: on the log scale they add, as the main-effects model assumes
    full = full.assign(log_thr=np.log(full.output_throughput), log_ttft=np.log(full.mean_ttft_ms))
    half = full[first]
    for response, strong, none in (("log_thr", ("max_num_seqs", "routing_skew", "moe_backend"),
                                    "max_num_batched_tokens"),
                                   ("log_ttft", ("max_num_batched_tokens",), "max_num_seqs")):
        p_full = fit_anova(full, factors, response, interactions=1).table["PR(>F)"]
        p_half = fit_anova(half, factors, response, interactions=1).table["PR(>F)"]
        for f in strong:
            assert p_full[f] < 1e-6 and p_half[f] < 1e-6, (response, f)
        assert p_full[none] > 1e-3 and p_half[none] > 1e-3, (response, none)  # no such effect was built in
    m_full = full.groupby("max_num_seqs").output_throughput.mean()
    m_half = half.groupby("max_num_seqs").output_throughput.mean()
    assert (abs(m_half / m_full - 1) < 0.03).all()
