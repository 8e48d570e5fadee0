"""moekern.analysis.imbalance.coactivation: matrices against a brute-force count, hot/cold rule, fan-out, the
co-activation placement (capacity, load cap, lower fan-out on clustered routing), the CLI."""

import itertools
import json
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moekern.analysis.imbalance import coactivation as C


def _brute(tokens, e):
    c = np.zeros((e, e), dtype=np.int64)
    for t in tokens:
        for i in range(e):
            for j in range(e):
                c[i, j] += int(i in t and j in t)
    return c


@settings(max_examples=30, deadline=None)
@given(st.integers(2, 9).flatmap(lambda e: st.tuples(st.just(e), st.lists(
    st.lists(st.integers(0, e - 1), min_size=1, max_size=e, unique=True), max_size=12))))
def test_coactivation_matrix_matches_brute_force(case):
    e, tokens = case
    c = C.coactivation_matrix(tokens, e)
    assert np.array_equal(c, _brute(tokens, e))
    assert np.array_equal(c, c.T)


def test_coactivation_matrix_bad_ids():
    with pytest.raises(ValueError, match="num_experts=4"):
        C.coactivation_matrix([[0, 4]], 4)


def test_hot_cold():
    hot, cold = C.hot_cold([10, 10, 10, 10, 20, 0, 10, 10])  # mean 10, std 5
    assert hot.tolist() == [4] and cold.tolist() == [5]
    assert [x.size for x in C.hot_cold([3, 3, 3])] == [0, 0]


def test_fan_out():
    toks = np.array([[0, 1], [0, 2], [1, 3]])
    e2r = np.array([0, 0, 1, 1])
    assert C.fan_out(toks, 2, expert_to_rank=e2r) == pytest.approx((1 + 2 + 2) / 3)
    # the same placement as an EPLB map gives the same fan-out
    assert C.fan_out(toks, 2, physical_to_logical=np.array([0, 1, 2, 3])) == pytest.approx(5 / 3)
    # a replica of expert 1 on rank 1 lets token [1, 3] stay on one rank
    p2l = np.array([0, 1, 2, 3, 1, 2])  # 3 slots per rank: rank0 {0,1,2}, rank1 {3,1,2}
    assert C.fan_out(toks, 2, physical_to_logical=p2l) == pytest.approx(1.0)
    assert np.isnan(C.fan_out(np.zeros((0, 2), dtype=int), 2, expert_to_rank=e2r))
    with pytest.raises(ValueError, match="exactly one"):
        C.fan_out(toks, 2)


def test_fan_out_brute_force_replicas():
    rng = np.random.default_rng(0)
    p2l = np.array([0, 1, 2, 0, 3, 4, 5, 1])  # 2 ranks x 4 slots, experts 0 and 1 replicated
    ranks = {e: sorted({p // 4 for p, x in enumerate(p2l) if x == e}) for e in range(6)}
    toks = np.stack([rng.choice(6, 3, replace=False) for _ in range(40)])
    best = np.mean([min(len(set(c)) for c in itertools.product(*(ranks[x] for x in t))) for t in toks])
    assert C.fan_out(toks, 2, physical_to_logical=p2l) == pytest.approx(best)  # greedy is exact here


@pytest.mark.parametrize("ep", [2, 4])
def test_coactivation_placement_constraints(ep):
    rng = np.random.default_rng(1)
    e = 16
    load = rng.random(e) * 10 + 1
    c = rng.integers(0, 20, (e, e))
    c = c + c.T
    e2r = C.coactivation_e2r(load, c, ep)
    assert np.bincount(e2r, minlength=ep).tolist() == [e // ep] * ep
    p2l = C.e2r_to_p2l(e2r, ep)
    assert sorted(p2l.tolist()) == list(range(e))
    with pytest.raises(ValueError, match="divide"):
        C.coactivation_e2r(load, c, 3)


def test_coactivation_placement_recovers_clusters():
    # four clusters of four experts, only co-firing within a cluster, equal loads: the placement must put
    # each cluster on one rank (fan-out 1), where contiguous/round-robin of a shuffled order cannot
    e = 16
    perm = np.random.default_rng(3).permutation(e)
    clusters = [perm[i::4] for i in range(4)]
    toks = np.array([rng_pair for cl in clusters for rng_pair in itertools.combinations(cl, 2)] * 5)
    c = C.coactivation_matrix(toks, e)
    load = np.bincount(toks.reshape(-1), minlength=e).astype(float)
    e2r = C.coactivation_e2r(load, c, 4)
    assert C.fan_out(toks, 4, expert_to_rank=e2r) == pytest.approx(1.0)
    assert C.cut_weight(c, e2r) == 0
    assert C.fan_out(toks, 4, expert_to_rank=np.arange(e) // 4) > 1.3


def test_placement_study_on_synthetic_log(tmp_path):
    p = C.write_synthetic_coactivation_log(tmp_path / "gate_log.rank0.jsonl", num_experts=16, top_k=4,
                                           num_steps=16, tokens_per_step=48)
    res = C.placement_study(p, 4, max_tokens=None)
    rows = {r.strategy: r for r in res["rows"]}
    assert set(rows) >= {"contiguous", "round_robin", "greedy", "replicate", "coactivation"}
    assert res["sampled_tokens_test"] > 0 and res["test_steps"] == 8
    # held-out fan-out: co-activation placement beats the placements that ignore co-activation
    assert rows["coactivation"].fan_out < min(rows["contiguous"].fan_out, rows["greedy"].fan_out)
    assert all(1.0 <= r.fan_out <= 4.0 for r in rows.values())
    # and does not give up load balance wholesale (the cap is 1.1 x mean on train loads)
    assert rows["coactivation"].step_max_mean < 1.6
    data = C.load_coactivation(p)
    assert data.layers == [0, 1]
    assert np.all(np.diag(data.coact[0]) == np.bincount(data.sample_tokens(0).reshape(-1), minlength=16))


def test_coactivation_cli(tmp_path):
    p = C.write_synthetic_coactivation_log(tmp_path / "g" / "gate_log.rank0.jsonl", num_experts=8, top_k=2,
                                           num_steps=8, tokens_per_step=16)
    out = subprocess.run([sys.executable, "-m", "moekern.cli", "coactivation", str(p.parent), "--ep-size", "2",
                          "--no-filter", "--json", "--out", str(tmp_path / "c.json"), "--plot",
                          str(tmp_path / "c.png")], capture_output=True, text=True, check=True).stdout
    obj = json.loads(out)
    assert {r["strategy"] for r in obj["placements"]} >= {"coactivation", "contiguous"}
    assert (tmp_path / "c.png").stat().st_size > 1000
    full = json.loads((tmp_path / "c.json").read_text())
    assert len(full["coactivation"]["0"]) == 8
