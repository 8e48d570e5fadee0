"""Placement strategies (hand-worked packing, greedy beats contiguous on a skewed log, replication lowers
the max rank load), memory per GPU, vLLM advice, and the `moekern placement` command."""

import json

import numpy as np
import pytest

from moekern.analysis.imbalance import metrics as M
from moekern.analysis.placement.advice import (advise, contiguous_p2l, greedy_p2l, replicate_p2l, round_robin_p2l,
                                        weight_bytes_per_gpu)
from moekern.models import get_model

HOT = [40, 30, 5, 5, 5, 5, 5, 5]


def test_simple_maps():
    assert contiguous_p2l(8, 4).tolist() == list(range(8))
    assert round_robin_p2l(8, 4).tolist() == [0, 4, 1, 5, 2, 6, 3, 7]
    np.testing.assert_allclose(M.rank_loads(HOT, 4, physical_to_logical=round_robin_p2l(8, 4)), [45, 35, 10, 10])
    with pytest.raises(ValueError, match="ep_size"):
        contiguous_p2l(8, 3)


def test_greedy_worked_example():
    # LPT: 40->r0, 30->r1, 5->r2, 5->r3, 5->r2, 5->r3, then only r0/r1 have free slots: 5->r1, 5->r0
    assert greedy_p2l(HOT, 4).tolist() == [0, 7, 1, 6, 2, 4, 3, 5]
    np.testing.assert_allclose(M.rank_loads(HOT, 4, physical_to_logical=greedy_p2l(HOT, 4)), [45, 35, 10, 10])
    np.testing.assert_allclose(M.rank_loads(HOT, 4), [70, 10, 10, 10])  # contiguous puts both hot experts on r0


def test_replicate_worked_example():
    # 4 redundant slots: expert 0 -> 3 replicas (13.33 each), expert 1 -> 3 replicas (10 each)
    p2l = replicate_p2l(HOT, 4, 4)
    assert p2l.size == 12 and sorted(np.bincount(p2l).tolist()) == [1, 1, 1, 1, 1, 1, 3, 3]
    loads = M.rank_loads(HOT, 4, physical_to_logical=p2l)
    np.testing.assert_allclose(loads, [85 / 3, 85 / 3, 70 / 3, 20])
    assert loads.max() < 45  # lower than the best single-copy placement
    for r in range(4):  # no rank holds two replicas of one expert
        slots = p2l[3 * r: 3 * r + 3]
        assert len(set(slots.tolist())) == 3
    with pytest.raises(ValueError, match="divide"):
        replicate_p2l(HOT, 4, 3)


def _skewed_table(steps=40, seed=0):
    rng = np.random.default_rng(seed)
    p = np.array(HOT, dtype=float) / 100
    counts = np.stack([[rng.multinomial(200, p), rng.multinomial(200, p[::-1])] for _ in range(steps)])
    return M.table_from_counts(counts)


def test_greedy_beats_contiguous_and_replication_lowers_max_load():
    adv = advise(_skewed_table(), ep_size=4, num_redundant=4)
    by = {s.strategy: s for s in adv.scores}
    assert by["greedy"].test_step_max_mean < by["contiguous"].test_step_max_mean - 0.5
    assert by["replicate"].test_step_max_mean < by["greedy"].test_step_max_mean
    assert adv.best.strategy == "replicate"
    assert adv.train_steps == 20 and adv.test_steps == 20
    assert adv.best.physical_to_logical.shape == (2, 12)
    assert "--enable-eplb" in adv.vllm_args and "cannot load a custom expert map" in adv.note
    obj = adv.to_json()
    assert obj["recommended"]["num_physical_experts"] == 12 and obj["recommended"]["num_logical_experts"] == 8
    json.dumps(obj)  # serializable


def test_balanced_load_recommends_no_change():
    counts = np.full((10, 1, 8), 25)
    adv = advise(M.table_from_counts(counts), ep_size=4, num_redundant=4)
    assert adv.best.strategy == "contiguous" and adv.best.test_step_max_mean == pytest.approx(1.0)
    assert adv.vllm_args[-2:] == ["--expert-placement-strategy", "linear"]


def test_memory_per_gpu_mixtral():
    m = get_model("mixtral")
    expert = 3 * 4096 * 14336
    mem = weight_bytes_per_gpu(m, ep_size=2)
    assert mem["expert_bytes"] == 32 * 4 * expert * 2  # 8 experts / 2 ranks, 32 layers, bf16
    mem_r = weight_bytes_per_gpu(m, ep_size=2, num_redundant=2)
    assert mem_r["expert_bytes"] - mem["expert_bytes"] == 32 * 1 * expert * 2
    assert mem_r["extra_bytes_for_redundancy"] == 32 * expert * 2
    assert 40e9 < mem["total_bytes"] < 50e9  # ~46.7 GB: half the experts + all the rest
    with pytest.raises(ValueError, match="dense"):
        weight_bytes_per_gpu(get_model("llada-8b"), 1)


@pytest.mark.parametrize("name, ep, red, attn_tp", [("mixtral", 2, 2, 1), ("deepseek-v3", 8, 8, 1),
                                                    ("qwen3-30b-a3b", 8, 0, 2), ("olmoe", 4, 4, 4)])
def test_memory_is_the_models_estimator(name, ep, red, attn_tp):
    """placement.weight_bytes_per_gpu is moekern.models.weight_bytes_per_gpu(tp=attn_tp, ep=ep_size), one
    estimator. Against the EP-only formula placement had before, that changes (on purpose): MLA attention is
    counted with its real projections (DeepSeek), tied embeddings once, KV heads replicated when attn_tp >
    num_kv_heads, and the router is not split by attn_tp; standard-attention models at attn_tp=1 (Mixtral
    above) come out byte-identical."""
    from moekern.models import weight_bytes_per_gpu as models_bytes

    m = get_model(name)
    mem = weight_bytes_per_gpu(m, ep_size=ep, num_redundant=red, attn_tp=attn_tp)
    ref = models_bytes(m, tp=attn_tp, ep=ep, num_redundant=red)
    assert {k: mem[k] for k in ref} == ref
    no_red = models_bytes(m, tp=attn_tp, ep=ep)
    assert mem["extra_bytes_for_redundancy"] == ref["expert_bytes"] - no_red["expert_bytes"]
    assert mem["experts_per_gpu"] == -(-(m.num_experts + red) // ep)
    with pytest.raises(ValueError, match="multiple of tp"):
        weight_bytes_per_gpu(m, ep_size=3, attn_tp=2)


def test_placement_cli(tmp_path, capsys):
    from moekern.analysis.datasets.synthetic import write_synthetic_gate_log
    from moekern.cli import main

    write_synthetic_gate_log(tmp_path / "g" / "gate_log.rank0.jsonl", num_steps=20, num_experts=8, skew=0.6)
    out = tmp_path / "map.json"
    assert main(["placement", str(tmp_path / "g"), "--ep-size", "4", "--model", "mixtral", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "recommended:" in text and "GiB/GPU" in text
    obj = json.loads(out.read_text())
    assert obj["format"] == "moekern.placement/1" and len(obj["strategies"]) == 4
    assert main(["metrics", str(tmp_path / "g"), "--ep-size", "4", "--placement", str(out)]) == 0
    assert "EP=4" in capsys.readouterr().out


def test_placement_refuses_a_log_of_another_model(tmp_path, capsys):
    from moekern.analysis.datasets.synthetic import write_synthetic_gate_log
    from moekern.cli import main
    from moekern.errors import UsageError

    write_synthetic_gate_log(tmp_path / "g" / "gate_log.rank0.jsonl", num_steps=10, num_experts=8)
    table = M.load_table(tmp_path / "g")
    with pytest.raises(UsageError, match=r"8 experts but model='deepseek-v3' has 256"):
        advise(table, ep_size=4, model=get_model("deepseek-v3"))
    assert main(["placement", str(tmp_path / "g"), "--ep-size", "4", "--model", "deepseek-v3"]) == 2
    err = capsys.readouterr().err
    assert "8 experts" in err and "GiB" not in err


@pytest.mark.parametrize("extra", [["--placement", "bogus"], ["--placement", "bogus", "--ep-size", "4"],
                                   ["--placement", "round_robin"], ["--placement", "{bad}", "--ep-size", "4"]])
def test_metrics_bad_placement_is_a_usage_error(tmp_path, capsys, extra):
    from moekern.analysis.datasets.synthetic import write_synthetic_gate_log
    from moekern.cli import main

    write_synthetic_gate_log(tmp_path / "g" / "gate_log.rank0.jsonl", num_steps=10, num_experts=8)
    (tmp_path / "bad.json").write_text(json.dumps({"strategy": "greedy"}))  # neither map
    argv = ["metrics", str(tmp_path / "g")] + [a.format(bad=tmp_path / "bad.json") for a in extra]
    assert main(argv) == 2
    assert "--placement" in capsys.readouterr().err
