"""The gate-log loader (moekern.analysis.imbalance.loads) field by field: what a LoadTable keeps through
select/pool_runs, the options of load_table (one file, phase, time window, cache), the lines it skips
and says so, how ranks are combined and what it says it did, and the per-step JSON layout. Small logs
written here; every expected number is read off the records in the comments."""

import json

import numpy as np
import pytest

from moekern.analysis.imbalance import metrics as M
from moekern.errors import UsageError
from moekern.gatelog import GateRecord, SkippedLine, write_records


def _write(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    write_records(path, records)


def _two_runs(root):
    """run a: steps 0, 1 = [3,1,0,0] prefill, [2,2,0,0] decode; run b: steps 0, 1 = [0,0,1,3], [1,1,1,1]
    decode (1 layer, 4 tokens a step, top_k 1)."""
    _write(root / "a" / "gate_log.rank0.jsonl", [GateRecord(0, 0, [3, 1, 0, 0], 4, top_k=1, phase="prefill"),
                                                 GateRecord(1, 0, [2, 2, 0, 0], 4, top_k=1, phase="decode")])
    _write(root / "b" / "gate_log.rank0.jsonl", [GateRecord(s, 0, v, 4, top_k=1, phase="decode")
                                                 for s, v in enumerate([[0, 0, 1, 3], [1, 1, 1, 1]])])


# ------------------------------------------------------------------------------------- the table's fields
def test_loaded_runs_keep_their_fields(tmp_path):
    _two_runs(tmp_path)
    runs = M.load_runs(tmp_path)
    a = runs["a"]
    assert a.steps.tolist() == [0, 1] and a.phases == ["prefill", "decode"] and a.runs == ["a", "a"]
    assert a.source == str(tmp_path) and a.rank_combine == {"a": "1 rank"} and a.present.dtype == bool
    t = M.load_table(tmp_path)
    assert t.source == str(tmp_path) and t.phases == ["prefill", "decode", "decode", "decode"]
    assert t.rank_combine == {"a": "1 rank", "b": "1 rank"} and t.present.dtype == bool


def test_select_keeps_every_field(tmp_path):
    _two_runs(tmp_path)
    t = M.load_table(tmp_path)
    sub = t.select(np.array([False, True, True, False]))  # run a step 1, run b step 0
    assert sub.counts[:, 0].tolist() == [[2, 2, 0, 0], [0, 0, 1, 3]] and sub.present.tolist() == [[True], [True]]
    assert sub.steps.tolist() == [1, 0] and sub.num_tokens.tolist() == [4, 4]
    assert sub.phases == ["decode", "decode"] and sub.runs == ["a", "b"]
    assert (sub.skipped, sub.source, sub.rank_combine) == (t.skipped, t.source, t.rank_combine)


def test_pool_runs_pads_and_names(tmp_path):
    a = M.table_from_counts([[[1, 0]], [[0, 1]]])  # 2 steps, 1 layer
    a.runs, a.rank_combine, a.phases = ["a", "a"], {"a": "1 rank"}, ["decode", "prefill"]
    b = M.LoadTable(np.ones((1, 2, 2)), np.ones((1, 2), dtype=bool), np.array([7]), np.array([2.0]))  # no phases
    b.rank_combine = {"b": "sum of 2 ranks (--combine-ranks sum)"}
    t = M.pool_runs({"a": a, "b": b}, "src")
    assert t.counts.shape == (3, 2, 2) and t.present.dtype == bool
    assert t.present.tolist() == [[True, False], [True, False], [True, True]]  # a's missing layer 1 is absent
    assert t.phases == ["decode", "prefill", "unknown"] and t.runs == ["a", "a", "b"] and t.source == "src"
    assert t.rank_combine == {"a": "1 rank", "b": "sum of 2 ranks (--combine-ranks sum)"}
    with pytest.raises(UsageError, match="different expert counts"):
        M.pool_runs({"a": a, "c": M.table_from_counts([[1, 1, 1]])}, "src")


# ----------------------------------------------------------------------------------------- load options
def test_one_file_is_its_folders_run(tmp_path):
    _two_runs(tmp_path)
    f = tmp_path / "a" / "gate_log.rank0.jsonl"
    t = M.load_table(f)
    assert t.runs == ["a", "a"] and t.source == str(f) and t.counts[:, 0].tolist() == [[3, 1, 0, 0], [2, 2, 0, 0]]


def _timed_log(path):
    """steps 0..4, 1 layer, 2 tokens a step, counts [s, 2 - s] clipped: at times 10, 20, 30, 40 and none;
    phases decode, prefill, decode, prefill, decode."""
    _write(path, [GateRecord(s, 0, [min(s, 2), 2 - min(s, 2)], 2, top_k=1, time=t,
                             phase="decode" if s % 2 == 0 else "prefill")
                  for s, t in enumerate([10.0, 20.0, 30.0, 40.0, None])])


def test_phase_and_time_window(tmp_path):
    _timed_log(tmp_path / "gate_log.rank0.jsonl")
    assert M.load_table(tmp_path, phase="decode").steps.tolist() == [0, 2, 4]
    assert M.load_table(tmp_path, phase="prefill").steps.tolist() == [1, 3]
    # inclusive at both ends; a record without a time is outside every window
    assert M.load_table(tmp_path, time_window=(20, 30)).steps.tolist() == [1, 2]
    assert M.load_table(tmp_path, time_window=(0, 100)).steps.tolist() == [0, 1, 2, 3]
    assert M.load_table(tmp_path, phase="decode", time_window=(10, 30)).steps.tolist() == [0, 2]
    with pytest.raises(UsageError, match="time window"):
        M.load_table(tmp_path, time_window=(41, 50))


def test_cache_reads_each_path_once(tmp_path):
    _two_runs(tmp_path)
    cache = {}
    a = M.load_table(tmp_path / "a", cache=cache)
    assert list(cache) == [str((tmp_path / "a").resolve())]
    (tmp_path / "a" / "gate_log.rank0.jsonl").unlink()  # a second read can only come from the cache
    again = M.load_table(tmp_path / "a", cache=cache)
    assert again.counts.tolist() == a.counts.tolist()
    b = M.load_table(tmp_path / "b", cache=cache)  # another path, its own entry
    assert b.counts[:, 0].tolist() == [[0, 0, 1, 3], [1, 1, 1, 1]] and len(cache) == 2


# ------------------------------------------------------------------------------------------ skipped lines
def test_skipped_records_say_where_and_why(tmp_path):
    d = tmp_path / "r"
    # step 0 written twice in a row (the second is dropped), then step 1 with 3 experts instead of 4, step 2
    _write(d / "gate_log.rank0.jsonl", [GateRecord(0, 0, [3, 1, 0, 0], 4, top_k=1),
                                        GateRecord(0, 0, [1, 1, 1, 1], 4, top_k=1),
                                        GateRecord(1, 0, [1, 1, 2], 4, top_k=1),
                                        GateRecord(2, 0, [0, 2, 2, 0], 4, top_k=1)])
    t = M.load_table(d)
    assert t.steps.tolist() == [0, 2] and t.counts[:, 0].tolist() == [[3, 1, 0, 0], [0, 2, 2, 0]]
    assert t.skipped == [SkippedLine(str(d), -1, "run r rank 0 step 1 layer 0: 3 experts, expected 4"),
                         SkippedLine(str(d), -1, "run r rank 0 step 0 layer 0: a second record for it "
                                                 "(the first is kept)")]


# ----------------------------------------------------------------------------------------------- ranks
def _ranks(root, extras, vecs):
    """One file per rank, 1 layer, top_k 1: rank r logs vecs[r] (one vector per step) with extra extras[r]."""
    for r, (extra, vs) in enumerate(zip(extras, vecs)):
        _write(root / f"gate_log.rank{r}.jsonl",
               [GateRecord(s, 0, v, sum(v), rank=r, top_k=1, extra=extra) for s, v in enumerate(vs)])


A, B, C = [3, 1, 0, 0], [0, 1, 1, 2], [2, 2, 0, 0]


@pytest.mark.parametrize("key", ["tp_rank", "ep_rank"])
def test_replica_metadata_decides_not_the_records(tmp_path, key):
    # tensor- (or expert-) parallel replicas whose step 1 differs: still one copy (the lowest rank's)
    _ranks(tmp_path, [{key: 0}, {key: 1}], [[A, A], [A, B]])
    t = M.load_table(tmp_path)
    assert t.counts[:, 0].tolist() == [A, A] and t.num_tokens.tolist() == [4, 4]
    assert t.rank_combine[tmp_path.name] == "one copy of 2 tensor/expert-parallel replicas (extra.tp_rank/ep_rank)"


def test_a_rank_without_dp_rank_is_data_parallel_rank_0(tmp_path):
    # ranks 0 (no dp_rank) and 1 (dp_rank 0) are replicas of one batch; rank 2 (dp_rank 1) is another batch:
    # A once + C = [5,3,0,0]
    _ranks(tmp_path, [{"tp_rank": 0}, {"dp_rank": 0, "tp_rank": 1}, {"dp_rank": 1}], [[A], [A], [C]])
    t = M.load_table(tmp_path)
    assert t.counts[0, 0].tolist() == [5, 3, 0, 0] and t.num_tokens.tolist() == [8]


def test_ranks_without_metadata(tmp_path):
    # identical on every shared (step, layer): replicas, one copy
    _ranks(tmp_path / "same", [{}, {}], [[A, C], [A, C]])
    # logging different layers (nothing shared): summed, each layer from the rank that logged it
    _write(tmp_path / "apart" / "gate_log.rank0.jsonl", [GateRecord(0, 0, A, 4, rank=0, top_k=1)])
    _write(tmp_path / "apart" / "gate_log.rank1.jsonl", [GateRecord(0, 1, B, 4, rank=1, top_k=1)])
    runs = M.load_runs(tmp_path)
    assert runs["same"].counts[:, 0].tolist() == [A, C] and runs["same"].num_tokens.tolist() == [4, 4]
    assert runs["same"].rank_combine == {"same": "one copy of 2 ranks (no rank metadata; their records are "
                                                 "identical on all 2 shared (step, layer))"}
    assert runs["apart"].counts[0].tolist() == [A, B]
    assert runs["apart"].rank_combine["apart"].startswith("sum of 2 ranks")


def test_rank_combine_says_what_was_done(tmp_path):
    _ranks(tmp_path / "dp", [{"dp_rank": 0}, {"dp_rank": 1}], [[A], [B]])
    _ranks(tmp_path / "dp_tp", [{"dp_rank": r // 2, "tp_rank": r % 2} for r in range(4)], [[A], [A], [B], [B]])
    _ranks(tmp_path / "one_dp", [{"dp_rank": 0, "tp_rank": 0}, {"dp_rank": 0, "tp_rank": 1}], [[A], [A]])
    how = {k: t.rank_combine[k] for k, t in M.load_runs(tmp_path).items()}
    assert how == {"dp": "sum of 2 data-parallel ranks (extra.dp_rank)",
                   "dp_tp": "sum over 2 data-parallel rank(s), one copy of the 2 replica(s) of each (extra.dp_rank)",
                   "one_dp": "sum over 1 data-parallel rank(s), one copy of the 2 replica(s) of each (extra.dp_rank)"}
    summed = M.load_runs(tmp_path / "dp", combine_ranks="sum")["dp"]
    assert summed.rank_combine == {"dp": "sum of 2 ranks (--combine-ranks sum)"}
    assert summed.counts[0, 0].tolist() == [3, 2, 1, 2]  # A + B


# ----------------------------------------------------------------------------------------- per-step JSON
def _step(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj) if isinstance(obj, dict) else obj)


def test_per_step_json_fields(tmp_path):
    x = tmp_path / "x"
    # step 0: num_tokens given (2, not 4 / top_k); step 1: layer 0 too short (skipped), layer 1 read;
    # step 2: no num_tokens nor top_k (the first layer's sum, 4), layer 1 negative (skipped); a broken file
    _step(x / "step_0000.json", {"step": 0, "layers": {"0": [3, 1, 0, 0], "1": [1, 1, 1, 1]}, "num_tokens": 2,
                                 "top_k": 1, "phase": "decode"})
    _step(x / "step_0001.json", {"step": 1, "layers": {"0": [1, 2], "1": [0, 0, 2, 2]}, "top_k": 2})
    _step(x / "step_0002.json", {"step": 2, "layers": {"0": [2, 2, 0, 0], "1": [-1, 1, 2, 2]}})
    _step(x / "step_0003.json", "{broken")
    t = M.load_runs(tmp_path)["x"]
    assert t.steps.tolist() == [0, 1, 2] and t.phases == ["decode", "unknown", "unknown"]
    assert t.counts.tolist() == [[[3, 1, 0, 0], [1, 1, 1, 1]], [[0] * 4, [0, 0, 2, 2]], [[2, 2, 0, 0], [0] * 4]]
    assert t.present.tolist() == [[True, True], [False, True], [True, False]] and t.present.dtype == bool
    assert t.num_tokens.tolist() == [2, 2, 4]  # step 1's layer 0 was skipped: layer 1's sum 4 / top_k 2
    assert t.source == str(x) and t.rank_combine == {"x": "per-step JSON: one record per step"}
    broken, *bad_layers = t.skipped
    assert broken[0] == str(x / "step_0003.json") and broken[1].startswith("JSONDecodeError: ")
    assert bad_layers == [("step 1", "layer 0: bad counts (len 2, expected 4)"),
                          ("step 2", "layer 1: bad counts (negative: -1)")]


def test_per_step_json_tokens_from_the_first_valid_layer(tmp_path):
    # every layer routes the step's tokens, so a bad first layer must not make the step look empty (0 tokens
    # would pass any warm-up filter); a step with no valid layer has no count to take tokens from: 0
    x = tmp_path / "x"
    _step(x / "step_0000.json", {"step": 0, "layers": {"0": [9, -9, 0], "1": [6, 0, 0], "2": [1, 1, 1]}, "top_k": 2})
    _step(x / "step_0001.json", {"step": 1, "layers": {"1": [5, 1, 0], "2": [2, 2, 2]}})  # no layer 0 at all
    _step(x / "step_0002.json", {"step": 2, "layers": {"0": [1, 1]}})  # its only layer too short
    t = M.load_runs(tmp_path)["x"]
    assert t.present.tolist() == [[False, True, True], [False, True, True], [False, False, False]]
    assert t.num_tokens.tolist() == [3, 6, 0]  # 6 / top_k 2; layer 1's sum 6; nothing valid


def test_per_step_json_repeated_step_keeps_the_first_file(tmp_path):
    # as a second gate-log record for one (rank, step, layer): the first file (in name order) is kept, the
    # other listed, so no step is counted twice
    x = tmp_path / "x"
    _step(x / "a.json", {"step": 1, "layers": {"0": [1, 3]}})
    _step(x / "b.json", {"step": 0, "layers": {"0": [2, 2]}})
    _step(x / "c.json", {"step": 1, "layers": {"0": [4, 0]}})
    t = M.load_runs(tmp_path)["x"]
    assert t.steps.tolist() == [0, 1] and t.counts[:, 0].tolist() == [[2, 2], [1, 3]]
    assert t.num_tokens.tolist() == [4, 4]
    assert t.skipped == [(str(x / "c.json"), f"a second file for step 1 (the first, {str(x / 'a.json')!r}, is kept)")]


def test_per_step_json_among_other_files(tmp_path):
    # a folder of other JSON (sorted before the run) is listed, not fatal; a folder holding only a gate-log
    # .meta.json sidecar is not a run at all
    _step(tmp_path / "a_results" / "summary.json", {"throughput": 1.0})
    _step(tmp_path / "m" / "gate_log.rank0.meta.json", {"host_us": 1.0})
    _step(tmp_path / "x" / "step_0000.json", {"step": 0, "layers": {"0": [1, 1]}})
    runs = M.load_runs(tmp_path)
    assert list(runs) == ["x"]
    results = str(tmp_path / "a_results")
    assert runs["x"].skipped == [(results, f"no valid per-step JSON files under {results!r} (1 skipped)")]


def test_gate_logs_beside_other_json(tmp_path):
    # a bench result next to the gate log: the gate log is read, the JSON is not taken for per-step loads
    _write(tmp_path / "gate_log.rank0.jsonl", [GateRecord(0, 0, A, 4, top_k=1)])
    _step(tmp_path / "bench.json", {"throughput": 1.0})
    assert M.load_table(tmp_path).counts[0, 0].tolist() == A
