"""Imbalance metrics (hand-computed worked examples, edge cases, properties), gate-log loading with corrupt
lines, per-rank loads, bench-JSON parsing with missing fields, and the small statistics helpers."""

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moekern.analysis.imbalance import metrics as M
from moekern.analysis.serving import metrics as S
from moekern.analysis import stats
from moekern.errors import UsageError
from moekern.gatelog import GateRecord, write_records


# ------------------------------------------------------------------------------------ worked examples
def test_worked_example_1236():
    c = [1, 2, 3, 6]  # mean 3; squared deviations 4, 1, 0, 9 -> population variance 14/4 = 3.5
    assert M.cv(c) == pytest.approx(math.sqrt(3.5) / 3, rel=1e-12)  # 0.62361
    assert M.cv(c) == pytest.approx(0.623610, abs=1e-6)
    assert M.max_min(c) == 6.0
    assert M.max_mean(c) == 2.0
    h = -(1 / 12 * math.log(1 / 12) + 2 / 12 * math.log(2 / 12) + 3 / 12 * math.log(3 / 12) + 6 / 12 * math.log(6 / 12))
    assert M.normalized_entropy(c) == pytest.approx(h / math.log(4), rel=1e-12)
    assert M.normalized_entropy(c) == pytest.approx(0.864787, abs=1e-6)
    # unordered |ci - cj|: 1, 2, 5, 1, 4, 3 = 16; Gini = 2 * 16 / (2 * 4^2 * 3) = 1/3
    assert M.gini(c) == pytest.approx(1 / 3, rel=1e-12)


def test_worked_example_idle_experts():
    c = [2, 2, 0, 0]  # mean 1, deviations 1, 1, -1, -1 -> std 1
    assert M.cv(c) == pytest.approx(1.0)
    assert M.max_min(c) == math.inf  # an idle expert: unbounded, documented
    assert M.max_mean(c) == 2.0
    assert M.normalized_entropy(c) == pytest.approx(0.5)  # ln 2 / ln 4
    assert M.gini(c) == pytest.approx(0.5)  # unordered diffs 4 * 2 = 8 -> 2 * 8 / (2 * 16 * 1)


def test_worked_example_one_hot_expert():
    c = [0, 0, 0, 4]  # mean 1, squared deviations 1, 1, 1, 9 -> variance 3
    assert M.cv(c) == pytest.approx(math.sqrt(3))
    assert M.max_mean(c) == 4.0  # = E: all load on one expert
    assert M.normalized_entropy(c) == pytest.approx(0.0, abs=1e-12)
    assert M.gini(c) == pytest.approx(0.75)  # (E - 1) / E


def test_entropy_of_one_hot_loads_is_plus_zero():
    # -sum(p ln p) over [0, 1, 0] is -(0.0) = -0.0, which reports and JSON print as "-0.0"
    assert math.copysign(1.0, M.normalized_entropy([0, 5, 0])) == 1.0
    assert json.dumps(M.normalized_entropy([0, 5, 0])) == "0.0"
    rows = M.normalized_entropy([[0, 3], [7, 0], [1, 1]])
    assert not np.signbit(rows).any() and rows.tolist() == [0.0, 0.0, 1.0]


@pytest.mark.parametrize("c", [[4, 4, 4, 4], [5], [0, 0, 7, 0][2:3]])
def test_perfect_balance_and_single_expert(c):
    assert M.all_metrics(c) == pytest.approx({"cv": 0.0, "max_min": 1.0, "max_mean": 1.0, "entropy": 1.0,
                                              "gini": 0.0})


def test_all_zero_is_nan_not_an_error():
    for v in M.all_metrics([0, 0, 0]).values():
        assert math.isnan(v)


def test_batched_shapes_match_rowwise():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 20, size=(3, 4, 8))
    a[1, 2] = 0
    for name, f in M.METRIC_FUNCS.items():
        out = f(a)
        assert out.shape == (3, 4)
        for i in range(3):
            for j in range(4):
                np.testing.assert_equal(out[i, j], f(a[i, j]), err_msg=name)


@pytest.mark.parametrize("bad", [[], [1, -1], [np.nan, 1]])
def test_bad_counts_rejected(bad):
    with pytest.raises(ValueError, match="expert counts"):
        M.cv(bad)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 1000), min_size=1, max_size=16).filter(lambda x: sum(x) > 0))
def test_properties_against_brute_force(c):
    a = np.asarray(c, dtype=float)
    e = a.size
    g = np.abs(a[:, None] - a[None, :]).sum() / (2 * e * e * a.mean())
    assert M.gini(c) == pytest.approx(g, abs=1e-9)
    assert 0 <= M.gini(c) <= (e - 1) / e + 1e-12
    assert 1 - 1e-12 <= M.max_mean(c) <= e + 1e-12
    assert -1e-12 <= M.normalized_entropy(c) <= 1 + 1e-12
    assert M.cv(c) == pytest.approx(np.sqrt(((a - a.mean()) ** 2).mean()) / a.mean(), rel=1e-9, abs=1e-12)
    assert M.cv([3 * x for x in c]) == pytest.approx(M.cv(c), rel=1e-9, abs=1e-12)  # scale-free


# ---------------------------------------------------------------------------------- step aggregation
def test_per_step_vs_aggregated_cv_and_warmup_filter():
    # step 0: a 2000-token warm-up batch; steps 1, 2 mirror each other; step 3 saw no tokens
    counts = np.array([[[2000, 0]], [[3, 1]], [[1, 3]], [[0, 0]]], dtype=float)
    t = M.table_from_counts(counts, num_tokens=[2000, 4, 4, 0])
    s = M.summarize(t)  # default max_tokens=1000 drops step 0
    assert (s.steps_used, s.steps_dropped) == (3, 1)
    assert s.overall["step_cv"] == pytest.approx(0.5)  # CV([3,1]) = 1/2 each; the all-zero step is skipped
    assert s.overall["agg_cv"] == pytest.approx(0.0)  # [4, 4]
    s_all = M.summarize(t, max_tokens=None)
    assert s_all.overall["step_cv"] == pytest.approx((1.0 + 0.5 + 0.5) / 3)
    assert s_all.overall["agg_cv"] == pytest.approx(M.cv([2004, 4]))


def test_overall_is_mean_over_layers():
    counts = np.array([[[1, 3], [2, 2]], [[3, 1], [2, 2]]], dtype=float)  # layer 0 CV 0.5, layer 1 CV 0
    s = M.summarize(M.table_from_counts(counts))
    assert s.per_layer["step_cv"] == pytest.approx([0.5, 0.0])
    assert s.overall["step_cv"] == pytest.approx(0.25)


# -------------------------------------------------------------------------------------- rank loads
def test_rank_loads_placements():
    c = [1, 2, 3, 6]
    np.testing.assert_allclose(M.rank_loads(c, 2), [3, 9])  # contiguous
    np.testing.assert_allclose(M.rank_loads(c, 2, expert_to_rank=M.round_robin_map(4, 2)), [4, 8])
    # 6 slots, 3 per rank; expert 3 has 3 replicas splitting its 6 tokens evenly
    np.testing.assert_allclose(M.rank_loads(c, 2, physical_to_logical=[0, 1, 2, 3, 3, 3]), [6, 6])
    np.testing.assert_allclose(M.rank_loads([[1, 2, 3, 6], [6, 3, 2, 1]], 2, expert_to_rank=[[0, 0, 1, 1], [1, 1, 0, 0]]),
                               [[3, 9], [3, 9]])
    with pytest.raises(ValueError, match="ep_size"):
        M.rank_loads(c, 3)
    with pytest.raises(ValueError, match="every logical expert"):
        M.rank_loads(c, 2, physical_to_logical=[0, 1, 2, 2])


# ------------------------------------------------------------------------------------- log loading
def test_gate_log_corrupt_lines_and_ranks(tmp_path):
    d = tmp_path / "logs"
    d.mkdir()
    r0 = [GateRecord(s, l, [s + 1, 2, s, 1], s + 2, rank=0, top_k=2) for s in range(3) for l in range(2)]
    write_records(d / "gate_log.rank0.jsonl", r0)
    with open(d / "gate_log.rank0.jsonl", "a") as fh:
        fh.write("{not json\n")
        fh.write(json.dumps({"schema": "other/1", "step": 9, "layer": 0, "num_tokens": 1, "expert_counts": [1]}) + "\n")
        fh.write(json.dumps({"schema": "moekern.gatelog/1", "step": 9, "layer": 0, "num_tokens": 1,
                             "expert_counts": [-1, 2]}) + "\n")
    # rank 1 (TP replica of rank 0, by its metadata): its copy of step 0 layer 0 counts once
    write_records(d / "gate_log.rank1.jsonl", [GateRecord(0, 0, [1, 2, 0, 1], 2, rank=1, top_k=2,
                                                          extra={"tp_rank": 1})])
    t = M.load_table(d)
    assert len(t.skipped) == 3
    assert t.counts.shape == (3, 2, 4)
    np.testing.assert_array_equal(t.counts[2, 1], [3, 2, 2, 1])
    np.testing.assert_array_equal(t.counts[0, 0], [1, 2, 0, 1])  # not doubled
    # summed when asked; "first" (the earlier name) is "dedupe": the lowest rank's copy
    np.testing.assert_array_equal(M.load_table(d, combine_ranks="sum").counts[0, 0], [2, 4, 0, 2])
    assert M.load_table(d, combine_ranks="first").counts[0, 0].tolist() == [1, 2, 0, 1]


def test_per_step_json_dir(tmp_path):
    for s in range(3):
        (tmp_path / f"step_{s:04d}.json").write_text(json.dumps(
            {"step": s, "layers": {"0": [s, 1, 1, 0], "1": [2, 2, 0, 0]}, "top_k": 2}))
    (tmp_path / "step_9999.json").write_text("{broken")
    t = M.load_table(tmp_path)
    assert t.counts.shape == (3, 2, 4) and len(t.skipped) == 1
    np.testing.assert_allclose(t.num_tokens, [1, 1.5, 2])  # sum(first layer) / top_k
    assert M.summarize(t).per_layer["step_cv"][1] == pytest.approx(1.0)


# ------------------------------------------------------------------------------------- bench JSON
def test_bench_json_parsing_with_missing_fields():
    obj = {"backend": "vllm", "duration": 10.0, "total_input_tokens": 500, "mean_ttft_ms": 12.5, "p99_tpot_ms": 9.0,
           "request_throughput": 3.0, "max_num_seqs": "16", "eplb": "true",
           "moekern": {"moe_backend": "moekern", "max_num_batched_tokens": 4096}}
    r = S.parse_bench_result(obj, "run1")
    assert r.moe_backend == "moekern"  # our block wins over vLLM's endpoint-type "backend"
    assert (r.max_num_seqs, r.max_num_batched_tokens, r.eplb) == (16, 4096, True)
    assert r.metrics["mean_ttft_ms"] == 12.5 and r.metrics["p99_tpot_ms"] == 9.0
    assert math.isnan(r.metrics["median_itl_ms"]) and math.isnan(r.metrics["output_throughput"])
    assert r.metrics["input_throughput"] == pytest.approx(50.0)
    bare = S.parse_bench_result({"backend": "openai"})
    assert bare.moe_backend == "openai" and bare.eplb is None and math.isnan(bare.metrics["input_throughput"])
    with pytest.raises(ValueError, match="JSON object"):
        S.parse_bench_result([1, 2])


def test_load_runs_and_grouping(tmp_path):
    for i, (b, tpot) in enumerate([("a", 10.0), ("a", 12.0), ("b", 20.0)]):
        (tmp_path / f"r{i}.json").write_text(json.dumps({"moe_backend": b, "max_num_seqs": 8, "mean_tpot_ms": tpot,
                                                         "output_throughput": 100.0, "duration": 1.0}))
    (tmp_path / "metadata.json").write_text(json.dumps({"synthetic": True}))  # not a run
    (tmp_path / "broken.json").write_text("{")
    runs, skipped = S.load_runs(tmp_path)
    assert len(runs) == 3 and len(skipped) == 1
    g = S.group_runs(runs)
    row = g[g.moe_backend == "a"].iloc[0]
    assert row["mean_tpot_ms_count"] == 2 and row["mean_tpot_ms_mean"] == pytest.approx(11.0)


# ------------------------------------------------------------------------------------------- stats
def test_stats_helpers():
    assert stats.iqr_mask([1, 2, 3, 4, 100]).tolist() == [True, True, True, True, False]
    assert stats.iqr_mask([1, 100, np.nan]).tolist() == [True, True, False]  # too few to flag
    assert stats.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert stats.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert stats.spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(np.corrcoef([1, 2.5, 2.5, 4], [1, 2, 3, 4])[0, 1])
    assert math.isnan(stats.spearman([1, 1, 1], [1, 2, 3]))
    est = stats.bootstrap_ci([1.0, 2.0, 3.0, 4.0, 5.0], n_boot=200)
    assert est.value == 3.0 and est.low <= 3.0 <= est.high and est.n == 5
    d = stats.bootstrap_diff([10, 11, 12], [1, 2, 3], n_boot=200)
    assert d.value == pytest.approx(9.0) and d.low > 0


def test_uniform_routing_cv_hand_values_and_simulation():
    # sqrt((E - k) / (n k)): E=8, k=2, n=128 -> sqrt(6/256); E=64, k=8, n=192 -> sqrt(56/1536)
    assert M.uniform_routing_cv(128, 8, 2) == pytest.approx(math.sqrt(6 / 256))
    assert M.uniform_routing_cv(192, 64, 8) == pytest.approx(math.sqrt(56 / 1536))
    assert M.uniform_routing_cv(5, 4, 4) == 0.0  # every token picks every expert: no spread possible
    assert np.isnan(M.uniform_routing_cv(0, 8, 2))
    np.testing.assert_allclose(M.uniform_routing_cv([4, 64], 8, 2), [math.sqrt(6 / 8), math.sqrt(6 / 128)])
    with pytest.raises(ValueError, match="top_k"):
        M.uniform_routing_cv(4, 8, 9)
    # it is the root-mean-square CV of a fair router: simulate k distinct uniform picks per token
    rng = np.random.default_rng(0)
    e, k, n, reps = 8, 2, 16, 4000
    picks = np.argsort(rng.random((reps, n, e)), axis=-1)[..., :k]  # [reps, n, k] distinct per token
    counts = np.stack([np.bincount(p.reshape(-1), minlength=e) for p in picks])
    rms = math.sqrt(float(np.mean(M.cv(counts) ** 2)))
    assert rms == pytest.approx(M.uniform_routing_cv(n, e, k), rel=0.03)


# ------------------------------------------------------------------ below one token, low precision, types
def test_fewer_routed_tokens_than_experts():
    # one token, top-2 of 8 experts: [1,1,0,0,0,0,0,0], mean 1/4; deviations 3/4 (x2), -1/4 (x6) ->
    # variance (2 * 9/16 + 6 * 1/16) / 8 = 3/16 -> CV = sqrt(3/16) / (1/4) = sqrt(3)
    c = [1, 1, 0, 0, 0, 0, 0, 0]
    assert M.cv(c) == pytest.approx(math.sqrt(3), rel=1e-12)
    assert M.max_mean(c) == pytest.approx(4.0, rel=1e-12)  # 1 / (1/4)
    assert M.normalized_entropy(c) == pytest.approx(1 / 3, rel=1e-12)  # ln 2 / ln 8
    assert M.gini(c) == pytest.approx(0.75, rel=1e-12)  # 12 unordered pairs differ by 1: 2 * 12 / (2 * 64 / 4)


def test_fractional_loads_give_the_same_numbers():
    # loads below one token (replicas splitting an expert's tokens, loads given as fractions): every metric
    # is scale-free, so [1,2,3,6] / 100 has the numbers of test_worked_example_1236
    c = [0.01, 0.02, 0.03, 0.06]
    assert M.cv(c) == pytest.approx(math.sqrt(3.5) / 3, rel=1e-12)
    assert M.max_min(c) == pytest.approx(6.0, rel=1e-12)
    assert M.max_mean(c) == pytest.approx(2.0, rel=1e-12)
    assert M.normalized_entropy(c) == pytest.approx(0.864787, abs=1e-6)
    assert M.gini(c) == pytest.approx(1 / 3, rel=1e-12)


def test_float32_counts_are_reduced_in_float64():
    # counts handed over as float32 (a torch tensor's .numpy()): results are float64, to the last bits of
    # the float64 worked example
    c = np.array([[1, 2, 3, 6], [2, 2, 0, 0]], dtype=np.float32)
    for name, f in M.METRIC_FUNCS.items():
        out = f(c)
        assert out.dtype == np.float64, name
        np.testing.assert_array_equal(out, f(c.astype(np.float64)), err_msg=name)
    assert M.cv(c[0]) == pytest.approx(math.sqrt(3.5) / 3, rel=1e-15)


def test_one_vector_gives_a_python_float():
    # a plain float, so that the numbers go into JSON as they are
    for f in (*M.METRIC_FUNCS.values(), lambda c: M.uniform_routing_cv(16, 4, 2)):
        v = f([1, 2, 3, 6])
        assert type(v) is float
        json.dumps(v)


def test_uniform_routing_cv_edges():
    assert M.uniform_routing_cv(1, 8, 2) == pytest.approx(math.sqrt(3))  # one token: sqrt((8 - 2) / (1 * 2))
    assert M.uniform_routing_cv(16, 8, 1) == pytest.approx(math.sqrt(7 / 16))  # top-1: sqrt(7 / 16)
    assert M.uniform_routing_cv(4, 1, 1) == 0.0  # one expert takes every token
    for k in (0, [1, 0]):
        with pytest.raises(ValueError, match="top_k"):
            M.uniform_routing_cv(4, 8, k)


# ------------------------------------------------------------------------------------- placements
def test_one_rank_and_bad_ep_sizes():
    assert M.contiguous_map(4, 1).tolist() == [0, 0, 0, 0]
    assert M.round_robin_map(4, 1).tolist() == [0, 0, 0, 0]
    np.testing.assert_allclose(M.rank_loads([1, 2, 3, 6], 1), [12])
    for ep in (0, -2):
        with pytest.raises(UsageError, match="ep_size"):
            M.contiguous_map(8, ep)


def test_rank_loads_map_checks():
    c = [1, 2, 3, 6]
    # maps held as float arrays (read back from JSON or a table) index like ints
    np.testing.assert_allclose(M.rank_loads(c, 2, expert_to_rank=np.array([0.0, 1.0, 0.0, 1.0])), [4, 8])
    np.testing.assert_allclose(M.rank_loads(c, 2, physical_to_logical=np.array([3.0, 0.0, 1.0, 2.0])), [7, 5])
    # out of range, at either end and exactly at the bound, is a ValueError naming the map
    for e2r in ([0, 0, 1, 2], [-1, 0, 1, 1]):
        with pytest.raises(ValueError, match="expert_to_rank values"):
            M.rank_loads(c, 2, expert_to_rank=e2r)
    for p2l in ([0, 1, 2, 4], [0, 1, 2, -1]):
        with pytest.raises(ValueError, match="physical_to_logical values"):
            M.rank_loads(c, 2, physical_to_logical=p2l)


# ---------------------------------------------------------------------------------- tables, summaries
def test_table_from_counts_keeps_what_it_is_given():
    # top_k 2: 2 tokens make 4 expert slots, so num_tokens is not the counts' sum
    t = M.table_from_counts([[3, 1], [2, 2]], num_tokens=[2, 2], steps=[10, 20])
    assert t.num_tokens.tolist() == [2, 2] and t.steps.tolist() == [10, 20]
    assert t.phases == ["unknown", "unknown"] and t.present.dtype == bool and t.present.all()
    assert M.table_from_counts([[3, 1], [2, 2]]).num_tokens.tolist() == [4, 4]  # default: the first layer's sum


def _gappy_table():
    """2 steps, 3 layers, 2 experts, 4 tokens a step: layer 0 [3,1] then [1,3]; layer 1 [2,0] then a missing
    record (zeros, present False, as load_table leaves it); layer 2 saw no tokens."""
    counts = np.array([[[3, 1], [2, 0], [0, 0]], [[1, 3], [0, 0], [0, 0]]], dtype=float)
    t = M.table_from_counts(counts, num_tokens=[4, 4])
    t.present[1, 1] = False
    return t


def test_summarize_skips_missing_records_and_idle_layers():
    s = M.summarize(_gappy_table())
    # step CVs: layer 0 CV([3,1]) = CV([1,3]) = 1/2 (mean 2, std 1); layer 1 CV([2,0]) = 1 (mean 1, std 1)
    assert s.per_layer["step_cv"][:2] == pytest.approx([0.5, 1.0]) and math.isnan(s.per_layer["step_cv"][2])
    # aggregated: layer 0 [4,4] -> CV 0, max/mean 1; layer 1 [2,0] -> CV 1, max/mean 2 (a missing record adds 0)
    assert s.per_layer["agg_cv"][:2] == pytest.approx([0.0, 1.0]) and math.isnan(s.per_layer["agg_cv"][2])
    assert s.per_layer["agg_max_mean"][:2] == pytest.approx([1.0, 2.0])
    assert s.overall["step_cv"] == pytest.approx(0.75) and s.overall["agg_cv"] == pytest.approx(0.5)
    np.testing.assert_allclose(M.per_step_metric(_gappy_table()), [[0.5, 1.0, np.nan], [0.5, np.nan, np.nan]])


def test_summary_fields_and_to_dict():
    s = M.summarize(_gappy_table())
    d = s.to_dict()
    assert set(d) == {"definition", "overall", "per_layer", "steps_used", "steps_dropped", "max_tokens",
                      "num_layers", "num_experts", "runs"}
    assert (d["definition"], d["steps_used"], d["steps_dropped"], d["max_tokens"]) == ("moekern", 2, 0, 1000)
    assert (d["num_layers"], d["num_experts"], d["runs"]) == (3, 2, [])


def test_every_step_filtered_out():
    t = _gappy_table()  # 4 tokens a step, so max_tokens=3 keeps none
    s = M.summarize(t, max_tokens=3)
    assert (s.steps_used, s.steps_dropped) == (0, 2)
    for name, vals in s.per_layer.items():
        assert len(vals) == 3 and all(math.isnan(v) for v in vals), name
    assert all(math.isnan(v) for v in s.overall.values())
    assert M.per_step_metric(t, "cv", max_tokens=3).shape == (0, 3)
    out = M.rank_load_summary(t, ep_size=2, max_tokens=3)
    assert out["rank_tokens"] == [0.0, 0.0] and math.isnan(out["step_max_mean"]) and math.isnan(out["agg_max_mean"])


def test_summarize_as_passes_max_tokens_on():
    t = M.table_from_counts([[2000, 0], [3, 1]], num_tokens=[2000, 4])  # step 0 a warm-up batch
    assert M.summarize_as(t).to_dict() == M.summarize(t).to_dict()  # the default definition is moekern's
    assert M.summarize_as(t, "moekern", 1000).steps_dropped == 1
    assert M.summarize_as(t, "moekern", None).steps_dropped == 0
    assert M.summarize_as(t, "seed").definition == "seed"


def test_rank_load_summary_placements_and_missing_records():
    # 2 steps, 2 layers, 4 experts on 2 ranks. step 0: layer 0 [1,2,3,6], layer 1 [6,3,2,1];
    # step 1: layer 0 [4,0,0,0], layer 1 missing (zeros, present False)
    counts = np.array([[[1, 2, 3, 6], [6, 3, 2, 1]], [[4, 0, 0, 0], [0, 0, 0, 0]]], dtype=float)
    t = M.table_from_counts(counts, num_tokens=[12, 4])
    t.present[1, 1] = False
    # contiguous (experts 0,1 on rank 0): rank loads [3,9], [9,3], [4,0] -> max/mean 1.5, 1.5, 2;
    # per layer over steps: layer 0 [7,9] -> 9/8, layer 1 [9,3] -> 1.5
    out = M.rank_load_summary(t, ep_size=2)
    assert out["rank_tokens"] == [16.0, 12.0]
    assert out["step_max_mean"] == pytest.approx(5 / 3) and out["agg_max_mean"] == pytest.approx((9 / 8 + 1.5) / 2)
    # round robin (expert e on rank e % 2): [4,8], [8,4], [4,0] -> 4/3, 4/3, 2
    rr = M.rank_load_summary(t, ep_size=2, expert_to_rank=M.round_robin_map(4, 2))
    assert rr["rank_tokens"] == [16.0, 12.0] and rr["step_max_mean"] == pytest.approx(14 / 9)
    # slots [3,0 | 1,2]: rank 0 holds experts 3 and 0: [7,5], [7,5], [4,0] -> 7/6, 7/6, 2
    p = M.rank_load_summary(t, ep_size=2, physical_to_logical=[3, 0, 1, 2])
    assert p["rank_tokens"] == [18.0, 10.0] and p["step_max_mean"] == pytest.approx(13 / 9)
