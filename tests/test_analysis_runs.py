"""Gate logs of several runs under one folder, several ranks of one run, and the seed's two CV definitions:
small logs written here, every expected number computed by hand in the comments."""

import json
import math

import numpy as np
import pytest

from moekern.analysis.imbalance import metrics as M
from moekern.cli import main
from moekern.errors import UsageError
from moekern.gatelog import GateRecord, write_records


def _write(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    write_records(path, records)


# ------------------------------------------------------------------------------------ runs under one folder
def _two_runs(root):
    """run a: step 0 [3,1,0,0], step 1 [2,2,0,0]; run b: step 0 [0,0,1,3], step 1 [1,1,1,1] (1 layer, top_k 1).
    The same step ids in both runs: a reader keyed by (step, layer) alone lets b overwrite a."""
    _write(root / "a" / "gate_log.rank0.jsonl",
           [GateRecord(s, 0, v, 4, top_k=1) for s, v in enumerate([[3, 1, 0, 0], [2, 2, 0, 0]])])
    _write(root / "b" / "gate_log.rank0.jsonl",
           [GateRecord(s, 0, v, 4, top_k=1) for s, v in enumerate([[0, 0, 1, 3], [1, 1, 1, 1]])])


# CV by hand (population std):
#   [3,1,0,0]: mean 1, deviations 2,0,-1,-1 -> variance 6/4 -> CV sqrt(1.5) = 1.224745
#   [2,2,0,0]: mean 1, deviations 1,1,-1,-1 -> variance 1   -> CV 1
#   [0,0,1,3]: a permutation of [3,1,0,0]                   -> CV sqrt(1.5)
#   [1,1,1,1]:                                              -> CV 0
RUN_A_STEP = (math.sqrt(1.5) + 1) / 2  # 1.112372
RUN_A_AGG = math.sqrt(4.5) / 2  # totals [5,3,0,0]: mean 2, deviations 3,1,-2,-2 -> variance 18/4
RUN_B_STEP = (math.sqrt(1.5) + 0) / 2  # 0.612372
RUN_B_AGG = math.sqrt(1.5) / 2  # totals [1,1,2,4]: mean 2, deviations -1,-1,0,2 -> variance 6/4
POOLED_STEP = (2 * math.sqrt(1.5) + 1 + 0) / 4  # 0.862372: all four steps
POOLED_AGG = math.sqrt(2) / 4  # totals [6,4,2,4]: mean 4, deviations 2,0,-2,0 -> variance 2


def test_runs_are_kept_apart_and_pooled(tmp_path):
    _two_runs(tmp_path)
    t = M.load_table(tmp_path)
    assert t.num_steps == 4 and t.runs == ["a", "a", "b", "b"] and t.steps.tolist() == [0, 1, 0, 1]
    assert t.skipped == []
    s = M.summarize(t)
    assert s.overall["step_cv"] == pytest.approx(POOLED_STEP, rel=1e-12)
    assert s.overall["agg_cv"] == pytest.approx(POOLED_AGG, rel=1e-12)
    assert s.runs == ["a", "b"]
    runs = M.load_runs(tmp_path)
    assert list(runs) == ["a", "b"]
    assert M.summarize(runs["a"]).overall["step_cv"] == pytest.approx(RUN_A_STEP, rel=1e-12)
    assert M.summarize(runs["a"]).overall["agg_cv"] == pytest.approx(RUN_A_AGG, rel=1e-12)
    assert M.summarize(runs["b"]).overall["step_cv"] == pytest.approx(RUN_B_STEP, rel=1e-12)
    assert M.summarize(runs["b"]).overall["agg_cv"] == pytest.approx(RUN_B_AGG, rel=1e-12)
    # one run's folder read alone is that run
    assert M.summarize(M.load_table(tmp_path / "a")).overall["agg_cv"] == pytest.approx(RUN_A_AGG, rel=1e-12)


def test_metrics_per_run_cli(tmp_path, capsys):
    _two_runs(tmp_path)
    assert main(["metrics", str(tmp_path), "--per-run", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {"a", "b"}
    assert out["a"]["overall"]["step_cv"] == pytest.approx(RUN_A_STEP, rel=1e-12)
    assert out["a"]["overall"]["agg_cv"] == pytest.approx(RUN_A_AGG, rel=1e-12)
    assert out["b"]["overall"]["agg_cv"] == pytest.approx(RUN_B_AGG, rel=1e-12)
    assert out["a"]["num_steps"] == out["b"]["num_steps"] == 2
    assert main(["metrics", str(tmp_path), "--per-run"]) == 0
    table = capsys.readouterr().out
    assert f"{RUN_A_STEP:.4f}" in table and f"{RUN_B_AGG:.4f}" in table
    # without --per-run: pooled, and it says so
    assert main(["metrics", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "2 runs POOLED (a, b" in text and "4 steps" in text
    assert main(["metrics", str(tmp_path), "--json"]) == 0
    pooled = json.loads(capsys.readouterr().out)
    assert pooled["runs"] == ["a", "b"] and pooled["num_steps"] == 4
    assert pooled["overall"]["agg_cv"] == pytest.approx(POOLED_AGG, rel=1e-12)


def test_duplicate_record_of_one_run_is_reported(tmp_path):
    # the same (run, rank, step, layer) twice (a log copied next to its .gz, say): the first is kept, and said
    _write(tmp_path / "gate_log.rank0.jsonl", [GateRecord(0, 0, [3, 1, 0, 0], 4, top_k=1)])
    _write(tmp_path / "gate_log.rank0.old.jsonl", [GateRecord(0, 0, [1, 1, 1, 1], 4, top_k=1)])
    t = M.load_table(tmp_path)
    assert t.counts[0, 0].tolist() == [3, 1, 0, 0]
    assert len(t.skipped) == 1 and "second record" in t.skipped[0].reason


# ------------------------------------------------------------------------------------------------ ranks
def _two_dp_ranks(root, extra=True):
    """Two data-parallel ranks, 1 layer, top_k 1. Step 0: both route [2,2,0,0] (equal by chance); step 1:
    rank 0 [1,3,0,0], rank 1 [0,0,3,1]."""
    for rank, vecs in ((0, [[2, 2, 0, 0], [1, 3, 0, 0]]), (1, [[2, 2, 0, 0], [0, 0, 3, 1]])):
        _write(root / f"gate_log.rank{rank}.jsonl",
               [GateRecord(s, 0, v, 4, rank=rank, top_k=1, extra={"dp_rank": rank} if extra else {})
                for s, v in enumerate(vecs)])


# Summed, as data-parallel ranks must be: step 0 [4,4,0,0], step 1 [1,3,3,1]; totals [5,7,3,1]: mean 4,
# deviations 1,3,-1,-3 -> variance 20/4 = 5 -> aggregated CV sqrt(5)/4 = 0.559017.
# Deciding per (step, layer) counted step 0 once: totals [3,5,3,1], mean 3, deviations 0,2,0,-2 -> variance 2
# -> sqrt(2)/3 = 0.471405 (wrong).
DP_AGG = math.sqrt(5) / 4


@pytest.mark.parametrize("extra", [True, False], ids=["dp_rank-metadata", "no-metadata"])
def test_data_parallel_ranks_are_summed_even_where_equal(tmp_path, extra):
    _two_dp_ranks(tmp_path, extra)
    t = M.load_table(tmp_path)
    assert t.counts[:, 0].tolist() == [[4, 4, 0, 0], [1, 3, 3, 1]]
    assert t.num_tokens.tolist() == [8, 8]
    assert M.summarize(t).overall["agg_cv"] == pytest.approx(DP_AGG, rel=1e-12)
    assert "sum" in t.rank_combine[tmp_path.name]


def test_tensor_parallel_replicas_count_once(tmp_path):
    # two TP ranks log the same batch: counts and tokens once, not twice
    for rank in (0, 1):
        _write(tmp_path / f"gate_log.rank{rank}.jsonl",
               [GateRecord(s, 0, v, 4, rank=rank, top_k=1, extra={"tp_rank": rank})
                for s, v in enumerate([[3, 1, 0, 0], [2, 2, 0, 0]])])
    t = M.load_table(tmp_path)
    assert t.counts[:, 0].tolist() == [[3, 1, 0, 0], [2, 2, 0, 0]] and t.num_tokens.tolist() == [4, 4]
    assert "one copy" in t.rank_combine[tmp_path.name]


def test_dp_groups_of_tp_replicas(tmp_path):
    # ranks 0,1 = DP replica 0 (TP pair), ranks 2,3 = DP replica 1: one copy per replica, replicas summed
    vec = {0: [3, 1, 0, 0], 1: [0, 1, 1, 2]}
    for rank in range(4):
        dp = rank // 2
        _write(tmp_path / f"gate_log.rank{rank}.jsonl",
               [GateRecord(0, 0, vec[dp], 4, rank=rank, top_k=1, extra={"dp_rank": dp, "tp_rank": rank % 2})])
    t = M.load_table(tmp_path)
    assert t.counts[0, 0].tolist() == [3, 2, 1, 2] and t.num_tokens.tolist() == [8]


def test_combine_ranks_override_and_cli(tmp_path, capsys):
    _two_dp_ranks(tmp_path)
    # dedupe keeps rank 0: [2,2,0,0], [1,3,0,0] -> totals [3,5,0,0]: mean 2, deviations 1,3,-2,-2 -> variance
    # 18/4 -> CV sqrt(4.5)/2
    t = M.load_table(tmp_path, combine_ranks="dedupe")
    assert t.counts[:, 0].tolist() == [[2, 2, 0, 0], [1, 3, 0, 0]]
    assert main(["metrics", str(tmp_path), "--combine-ranks", "dedupe", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["overall"]["agg_cv"] == pytest.approx(math.sqrt(4.5) / 2, rel=1e-12)
    assert main(["metrics", str(tmp_path), "--combine-ranks", "sum", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["overall"]["agg_cv"] == pytest.approx(DP_AGG, rel=1e-12)
    with pytest.raises(UsageError, match="combine_ranks"):
        M.load_table(tmp_path, combine_ranks="max")


@pytest.mark.parametrize("argv", [["placement", "{p}", "--ep-size", "2"], ["coactivation", "{p}", "--ep-size", "2"],
                                  ["project", "{p}", "--model", "mixtral"], ["validate", "{p}", "{p}"],
                                  ["recommend", "--model", "mixtral", "--gate-log", "{p}"]])
def test_every_gate_log_command_takes_combine_ranks(tmp_path, argv):
    from moekern.cli import build_parser

    args = build_parser().parse_args([a.format(p=tmp_path) for a in argv] + ["--combine-ranks", "sum"])
    assert args.combine_ranks == "sum"


# ------------------------------------------------------------------------------------ the seed's definitions
def _seed_log(path):
    """2 layers, 4 experts, top_k 1.
    step 0, a 2000-token warm-up: layer 0 [500,500,500,500], layer 1 [2000,0,0,0]
    step 1, 4 tokens:             layer 0 [3,1,0,0],         layer 1 [1,1,1,1]
    step 2, 4 tokens:             layer 0 [2,2,0,0],         layer 1 [0,0,0,4]
    step 3, 0 tokens:             layer 0 [0,0,0,0],         layer 1 [0,0,0,0]"""
    rows = [(2000, [500] * 4, [2000, 0, 0, 0]), (4, [3, 1, 0, 0], [1, 1, 1, 1]), (4, [2, 2, 0, 0], [0, 0, 0, 4]),
            (0, [0, 0, 0, 0], [0, 0, 0, 0])]
    _write(path, [GateRecord(s, l, v, n, top_k=1) for s, (n, *layers) in enumerate(rows) for l, v in enumerate(layers)])


# Seed per-step method: every record's CV, all 8 records, no filter, all-zero -> 0:
#   step 0: 0, sqrt(3) (mean 500 / [2000,0,0,0]: mean 500, deviations 1500,-500x3 -> variance 750000 = 3*500^2)
#   step 1: sqrt(1.5), 0;  step 2: 1, sqrt(3);  step 3: 0, 0
SEED_STEP = (2 * math.sqrt(3) + math.sqrt(1.5) + 1) / 8  # 0.711106
# Seed aggregated method: steps <= 1000 tokens (1, 2, 3), summed over steps AND layers:
#   layer 0 [5,3,0,0] + layer 1 [1,1,1,5] = [6,4,1,5]: mean 4, deviations 2,0,-3,1 -> variance 14/4
SEED_AGG = math.sqrt(3.5) / 4  # 0.467707
# moekern's (max_tokens 1000 on both; per layer, then the mean over layers; the all-zero step is skipped):
#   per-step: layer 0 (sqrt(1.5) + 1) / 2, layer 1 (0 + sqrt(3)) / 2
#   aggregated: layer 0 [5,3,0,0] -> sqrt(4.5)/2; layer 1 [1,1,1,5]: mean 2, deviations -1,-1,-1,3 -> variance 3
OURS_STEP = ((math.sqrt(1.5) + 1) / 2 + math.sqrt(3) / 2) / 2  # 0.989199
OURS_AGG = (math.sqrt(4.5) / 2 + math.sqrt(3) / 2) / 2  # 0.963343


def test_seed_definitions_exactly(tmp_path):
    _seed_log(tmp_path / "gate_log.rank0.jsonl")
    t = M.load_table(tmp_path)
    seed = M.seed_summary(t)
    assert seed.overall["step_cv"] == pytest.approx(SEED_STEP, rel=1e-9)
    assert seed.overall["agg_cv"] == pytest.approx(SEED_AGG, rel=1e-9)
    assert (seed.steps_used, seed.steps_dropped) == (3, 1)
    ours = M.summarize(t)
    assert ours.overall["step_cv"] == pytest.approx(OURS_STEP, rel=1e-12)
    assert ours.overall["agg_cv"] == pytest.approx(OURS_AGG, rel=1e-12)
    # an independent numpy reference of the seed's formulas over the records as written
    recs = np.array([[500] * 4, [2000, 0, 0, 0], [3, 1, 0, 0], [1, 1, 1, 1], [2, 2, 0, 0], [0, 0, 0, 4],
                     [0, 0, 0, 0], [0, 0, 0, 0]], dtype=float)
    tokens = np.array([2000, 2000, 4, 4, 4, 4, 0, 0])
    ref_step = np.mean(recs.std(axis=1) / (recs.mean(axis=1) + 1e-10))
    tot = recs[tokens <= 1000].sum(axis=0)
    assert seed.overall["step_cv"] == pytest.approx(ref_step, rel=1e-12)
    assert seed.overall["agg_cv"] == pytest.approx(tot.std() / (tot.mean() + 1e-10), rel=1e-12)


def test_seed_edges(tmp_path):
    # 2 layers, 4 experts. step 0 (2000 tokens): [500]*4, [2000,0,0,0]; step 1 (1 token): [1,0,0,0] and a
    # missing record (zeros, present False); step 2 (0 tokens): zeros, zeros
    counts = np.array([[[500] * 4, [2000, 0, 0, 0]], [[1, 0, 0, 0], [0] * 4], [[0] * 4, [0] * 4]], dtype=float)
    t = M.table_from_counts(counts, num_tokens=[2000, 1, 0])
    t.present[1, 1] = False
    seed = M.seed_summary(t)
    # per-step: the 5 present records: CV 0, sqrt(3), sqrt(3) ([1,0,0,0]: mean 1/4, variance 3/16), 0, 0
    assert seed.overall["step_cv"] == pytest.approx(2 * math.sqrt(3) / 5, rel=1e-9)
    # aggregated: steps 1, 2 kept, the missing record adds nothing: [1,0,0,0] (one token in all) -> sqrt(3)
    assert seed.overall["agg_cv"] == pytest.approx(math.sqrt(3), rel=1e-9)
    assert (seed.per_layer, seed.steps_used, seed.steps_dropped, seed.max_tokens) == ({}, 2, 1, 1000)
    assert (seed.num_layers, seed.num_experts, seed.runs) == (2, 4, [])
    # kept steps that saw no tokens, or no kept step at all: no aggregated CV (NaN, not the 0 of 0 / 1e-10)
    zero_kept = M.seed_summary(M.table_from_counts([[5, 3], [0, 0]], num_tokens=[2000, 0]))
    assert zero_kept.overall["step_cv"] == pytest.approx(0.125)  # CV([5,3]) = 1/4 and 0, averaged
    assert math.isnan(zero_kept.overall["agg_cv"])
    warmup_only = M.table_from_counts([[5, 3]], num_tokens=[2000])
    assert math.isnan(M.seed_summary(warmup_only).overall["agg_cv"])
    empty = M.seed_summary(warmup_only.select([False]))  # no rows at all
    assert math.isnan(empty.overall["step_cv"]) and math.isnan(empty.overall["agg_cv"])
    _two_runs(tmp_path)
    assert M.seed_summary(M.load_table(tmp_path)).runs == ["a", "b"]



def test_metrics_definition_seed_cli(tmp_path, capsys):
    _seed_log(tmp_path / "run" / "gate_log.rank0.jsonl")
    assert main(["metrics", str(tmp_path / "run"), "--definition", "seed", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["definition"] == "seed"
    assert out["overall"]["step_cv"] == pytest.approx(SEED_STEP, rel=1e-9)
    assert out["overall"]["agg_cv"] == pytest.approx(SEED_AGG, rel=1e-9)
    assert main(["metrics", str(tmp_path / "run"), "--definition", "seed"]) == 0
    text = capsys.readouterr().out
    assert f"per-step CV {SEED_STEP:.4f}" in text and f"aggregated CV {SEED_AGG:.4f}" in text
    # seeds' batch layout: one sub-folder per dataset, {run: numbers}
    assert main(["metrics", str(tmp_path), "--definition", "seed", "--per-run", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["run"]["overall"]["agg_cv"] == pytest.approx(SEED_AGG, rel=1e-9)


def test_per_step_json_runs(tmp_path):
    # the per-step JSON layout, one folder per run: run x step 0 [3,1,0,0]; run y step 0 [1,1,1,1]
    for run, vec in (("x", [3, 1, 0, 0]), ("y", [1, 1, 1, 1])):
        (tmp_path / run).mkdir()
        (tmp_path / run / "step_0000.json").write_text(json.dumps({"step": 0, "layers": {"0": vec}, "top_k": 1}))
    runs = M.load_runs(tmp_path)
    assert list(runs) == ["x", "y"]
    assert M.summarize(runs["x"]).overall["step_cv"] == pytest.approx(math.sqrt(1.5), rel=1e-12)
    pooled = M.load_table(tmp_path)
    # pooled totals [4,2,1,1]: mean 2, deviations 2,0,-1,-1 -> variance 6/4
    assert pooled.num_steps == 2 and M.summarize(pooled).overall["agg_cv"] == pytest.approx(math.sqrt(1.5) / 2)


def test_shipped_factorial_parent_keeps_both_servers():
    # a committed factorial log: one parent, two server runs with overlapping step ids (each counts from 0)
    from pathlib import Path

    d = Path(__file__).resolve().parents[1] / "benchmarks/results/factorial/h200-2026-12-06-small/gate_logs/moekern_s128"
    if not d.is_dir():
        pytest.skip("factorial sample not in this checkout")
    runs = M.load_runs(d)
    assert {k: t.num_steps for k, t in runs.items()} == {"server_1796526924": 5402, "server_1796527246": 5385}
    assert M.pool_runs(runs, str(d)).num_steps == 5402 + 5385
    assert round(M.summarize(runs["server_1796526924"]).overall["agg_cv"], 4) == 0.8551
    assert round(M.summarize(runs["server_1796527246"]).overall["agg_cv"], 4) == 0.8564
