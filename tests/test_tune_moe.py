"""CPU tests of the tuning helpers (benchmarks/tune_moe.py) and benchmarks/tune_moe_shapes.py's CPU parts:
vLLM's default rule as we read it, candidate sets, tile arithmetic against a brute-force count over
moekern.align's output, and merging a synthetic results JSON into configs.py's TUNED block."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import shutil
import sys

import pytest
import torch

import moekern
from moekern.experts import BlockConfig
from moekern.experts import configs as cfgmod
from moekern.models import get_model

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import tune_moe as tune  # noqa: E402  (the tuner is a benchmark script, not part of the package)
B = BlockConfig


def _load_bench():
    spec = importlib.util.spec_from_file_location("tune_moe_shapes", os.path.join(ROOT, "benchmarks",
                                                                                 "tune_moe_shapes.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("M,E,want", [
    # (M, E, (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, warps, stages)) read off vLLM 0.26 get_default_config
    (1, 8, (16, 64, 128, 1, 4, 4)),
    (64, 256, (32, 64, 128, 1, 4, 3)),
    (256, 8, (64, 128, 64, 1, 8, 3)),
    (1024, 8, (128, 128, 64, 16, 8, 3)),  # 1024 // 8 = 128 tokens per expert: not > 128 ... see below
    (4096, 128, (128, 128, 64, 1, 8, 3)),
    (8192, 8, (128, 128, 64, 16, 8, 3)),
])
def test_vllm_default_rule(M, E, want):
    got = tune.vllm_default_bf16(M, E)
    keys = ("BLOCK_SIZE_M", "BLOCK_SIZE_N", "BLOCK_SIZE_K", "GROUP_SIZE_M", "num_warps", "num_stages")
    if M == 1024:  # the boundary: M // E == 128 is not > 128, so no grouping
        want = (128, 128, 64, 1, 8, 3)
    assert tuple(got[k] for k in keys) == want


def test_from_vllm_config_is_unfused_same_tile():
    g1, g2 = tune.from_vllm_config(tune.vllm_default_bf16(256, 8))
    assert g1 == B(64, 128, 64, 1, 8, 3, fuse_silu=False)
    assert g2 == B(64, 128, 64, 1, 8, 3)


@pytest.mark.parametrize("name,M", tune.LOSING_SHAPES)
def test_shape_candidates(name, M):
    spec = get_model(name)
    args = (M, spec.num_experts, spec.top_k, spec.intermediate_size, spec.hidden_size)
    cands = tune.shape_candidates(*args)
    assert 3 <= len(cands) <= 12
    names = [n for n, _ in cands]
    pairs = [p for _, p in cands]
    assert len(set(pairs)) == len(pairs), "duplicates waste compile time"
    assert names[0].startswith("today:") and pairs[0] == tune.today_pair(*args)[1]
    assert pairs[1] == tune.from_vllm_config(tune.vllm_default_bf16(M, spec.num_experts))
    for g1, g2 in pairs:
        g1.validate()
        g2.validate()
        assert g1.block_m == g2.block_m <= 128
    assert len(tune.shape_candidates(*args, max_candidates=5)) == 5


def test_today_pair_matches_get_configs_rule():
    # Qwen3 M=256 (no 256 row): 64 and 1024 are equally far in log2, the smaller bucket wins.
    spec = get_model("qwen3-30b-a3b")
    rows = cfgmod.TUNED[(128, 768, 2048)]
    assert 256 not in rows and {64, 1024} <= set(rows), "the tie this test needs is gone from TUNED"
    name, pair = tune.today_pair(256, 128, 8, spec.intermediate_size, spec.hidden_size)
    assert name == "tuned[64]" and pair == rows[64]
    assert cfgmod.tuned_bucket({1: 0, 64: 0, 1024: 0}, 4096) == 1024
    assert cfgmod.tuned_bucket({1: 0, 64: 0, 1024: 0}, 8) == 1  # tie 1 vs 64
    name, _ = tune.today_pair(4, 7, 2, 16, 32)
    assert name == "heuristic"


@pytest.mark.parametrize("block_m", [16, 32, 64])
def test_tile_stats_against_align(block_m):
    torch.manual_seed(block_m)
    E, M, k = 6, 37, 2
    ids = torch.stack([torch.randperm(E)[:k] for _ in range(M)]).to(torch.int32)
    ids[:20, 0] = 0  # skew
    counts = torch.bincount(ids.reshape(-1).long(), minlength=E).tolist()
    sorted_ids, block_experts, post = moekern.align(ids, E, block_m, backend="torch")
    n_out, block_n = 100, 32
    s = tune.tile_stats(counts, block_m, n_out, block_n, programs_per_sm=2, sms=4)
    used_blocks = int(post.item()) // block_m
    assert s.used_m_blocks == used_blocks == int((block_experts >= 0).sum())
    assert s.padded_rows == int((sorted_ids[: int(post.item())] == M * k).sum())
    assert s.n_tiles == 4 and s.tiles == used_blocks * 4
    assert s.grid == block_experts.numel() * 4
    assert s.waves == pytest.approx(used_blocks * 4 / 8)
    used = sum(1 for c in counts if c)
    assert s.weight_reads == pytest.approx(used_blocks / used)


def test_residency_estimate_orders_configs():
    # ncu (devres/2) saw 12.5 % warps active for Mixtral's B(128,128,64,8,8,3) fused GEMM1: one 8-warp program.
    assert tune.programs_per_sm(B(128, 128, 64, 8, 8, 3), fused=True) == 1
    assert tune.programs_per_sm(B(128, 128, 64, 1, 8, 3), fused=False) == 2
    assert tune.smem_estimate(B(64, 64, 128, 1, 4, 4), fused=True) == 4 * (64 * 128 + 2 * 64 * 128) * 2


def _synthetic_results(rows):
    return {"meta": {"device": "NVIDIA H100 80GB HBM3"}, "rows": rows, "complete": True}


def _row(E, I, H, M, today_us, best_us, g1, g2, name="x"):
    return dict(model="m", E=E, I=I, H=H, M=M, today_us=today_us,
                best=dict(name=name, us=best_us, gemm1=dataclasses.asdict(g1), gemm2=dataclasses.asdict(g2)))


def test_merge_tuned_rules():
    table = {(8, 14336, 4096): {64: (B(32, 128, 128), B(32, 128, 128))}}
    win = (B(64, 128, 64, 1, 8, 3, fuse_silu=False), B(64, 128, 64, 1, 8, 3))
    rows = [
        _row(8, 14336, 4096, 256, 1930.0, 1200.0, *win),  # a clear win: applied
        _row(8, 14336, 4096, 4096, 5888.0, 5850.0, *win),  # < 2 % gain: noise, not applied
        _row(128, 768, 2048, 4096, 1220.0, 900.0, B(128, 128, 64, 8, 8, 3), B(128, 128, 64, 8, 8, 3)),  # new key
        dict(model="m", E=8, I=14336, H=4096, M=8192, today_us=None),  # nothing measured
    ]
    new, applied = tune.merge_tuned(table, rows)
    assert applied == [(8, 14336, 4096, 256), (128, 768, 2048, 4096)]
    assert new[(8, 14336, 4096)][256] == win
    assert 4096 not in new[(8, 14336, 4096)]
    assert new[(128, 768, 2048)][4096][0].group_m == 8
    assert table == {(8, 14336, 4096): {64: (B(32, 128, 128), B(32, 128, 128))}}, "input must not change"
    bad = [_row(8, 14336, 4096, 256, 10.0, 1.0, B(64, 64, 64), B(32, 64, 64))]
    with pytest.raises(ValueError, match="block_m"):
        tune.merge_tuned(table, bad)


def test_apply_results_rewrites_configs_copy(tmp_path):
    path = tmp_path / "configs.py"
    shutil.copy(os.path.join(ROOT, "moekern", "experts", "configs.py"), path)
    win = (B(64, 128, 64, 1, 8, 3, fuse_silu=False), B(64, 128, 64, 1, 8, 3))
    res = tmp_path / "tune_moe_shapes.json"
    res.write_text(json.dumps(_synthetic_results([_row(8, 14336, 4096, 4096, 6000.0, 5000.0, *win, name="vllm-default")])))
    before = path.read_text()
    applied, out = tune.apply_results(str(res), str(path), dry_run=True)
    assert 4096 not in cfgmod.TUNED[(8, 14336, 4096)], "pick an M the committed table does not hold"
    assert applied == [(8, 14336, 4096, 4096)] and path.read_text() == before
    applied, _ = tune.apply_results(str(res), str(path))
    text = path.read_text()
    assert text == out and text != before
    assert "4096: (_B(64, 128, 64, 1, 8, 3, fuse_silu=False), _B(64, 128, 64, 1, 8, 3)),  # vllm-default: 5000 us" in text
    # The rewritten module imports and holds every old row plus the new one.
    spec = importlib.util.spec_from_file_location("moekern_configs_copy", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses resolve annotations through sys.modules
    try:
        spec.loader.exec_module(mod)
    finally:
        del sys.modules[spec.name]
    as_t = lambda pair: tuple(dataclasses.astuple(c) for c in pair)  # noqa: E731  (a different class object)
    for key, per_m in cfgmod.TUNED.items():
        for m, pair in per_m.items():
            assert as_t(mod.TUNED[key][m]) == as_t(pair)
    assert as_t(mod.TUNED[(8, 14336, 4096)][4096]) == as_t(win)
    assert mod.tuned_bucket(mod.TUNED[(8, 14336, 4096)], 4096) == 4096
    # Idempotent: applying the same result again leaves the same valid file.
    tune.apply_results(str(res), str(path))
    assert path.read_text() == text
    # Rows the apply did not touch keep their comments (every commented row of the committed table).
    kept = tune.existing_row_comments(tune._BLOCK.search(before).group(2))
    after = tune.existing_row_comments(tune._BLOCK.search(text).group(2))
    assert kept and after.pop((8, 14336, 4096, 4096)).startswith("vllm-default: 5000 us, was 6000")
    assert after == kept


def test_existing_row_comments():
    block = ("TUNED = {\n    (8, 14336, 4096): {  # mixtral\n        1: (_B(16, 128, 128, 1, 4, 3), _B(16)),\n"
             "        128: (_B(64), _B(64)),  # heuristic: 938 us\n    },\n    (64, 1024, 2048): {\n"
             "        128: (_B(32), _B(32)),  # x (y)\n    },\n}\n")
    assert tune.existing_row_comments(block) == {(8, 14336, 4096, 128): "heuristic: 938 us",
                                                 (64, 1024, 2048, 128): "x (y)"}


def test_apply_needs_markers(tmp_path):
    path = tmp_path / "configs.py"
    path.write_text("TUNED = {}\n")
    res = tmp_path / "r.json"
    res.write_text(json.dumps(_synthetic_results([])))
    with pytest.raises(ValueError, match="BEGIN TUNED"):
        tune.apply_results(str(res), str(path))


def test_apply_cli_dry_run(tmp_path, capsys):
    path = tmp_path / "configs.py"
    shutil.copy(os.path.join(ROOT, "moekern", "experts", "configs.py"), path)
    res = tmp_path / "r.json"
    res.write_text(json.dumps(_synthetic_results([_row(64, 1024, 2048, 256, 367.0, 300.0, B(64, 128, 64),
                                                      B(64, 128, 64))])))
    tune.main(["apply", str(res), "--configs", str(path), "--dry-run"])
    assert "would change 1 TUNED rows" in capsys.readouterr().out


def test_render_round_trip_of_current_table():
    src = tune.render_tuned(cfgmod.TUNED)
    assert tune._exec_tuned(src) == cfgmod.TUNED


def test_bench_parse_shapes_and_explain(capsys):
    bench = _load_bench()
    assert bench.parse_shapes(None) == list(tune.LOSING_SHAPES)
    assert bench.parse_shapes("mixtral:256, olmoe:8") == [("mixtral", 256), ("olmoe", 8)]
    for bad in ("mixtral", "mixtral:0", "mixtral:x"):
        with pytest.raises(ValueError, match="MODEL:M"):
            bench.parse_shapes(bad)
    recs = bench.explain([("mixtral", 256), ("olmoe", 256)])
    assert len(recs) == 4 and "ours[256]" in capsys.readouterr().out
    ours, vllm = recs[0], recs[1]
    # Mixtral M=256: 512 slots over 8 experts; the tuned block_m 128 needs no more M-blocks per expert than
    # vLLM's 64 (the M=64 row's block_m 32 needed 2.5 per expert: the measured 1.49x loss).
    assert ours["gemm1"].startswith("_B(128,")
    assert 1.0 <= ours["gemm1_stats"]["weight_reads"] <= vllm["gemm1_stats"]["weight_reads"]


def test_routing_counts_sum():
    bench = _load_bench()
    spec = get_model("olmoe")
    counts = bench.routing_counts(spec, 64, max_tokens=128)
    assert len(counts) == spec.num_experts and sum(counts) == 64 * spec.top_k


def test_mixtral_decode_rows_read_each_expert_once():
    """The session-9 finding, pinned: for Mixtral decode batches of 65-128 tokens (vLLM's CUDA-graph sizes 96
    and 128 at max_num_seqs=128) the table's tile must not split an expert's average load (M * k / E slots)
    into more M-blocks than it needs: at M = 128 one block_m >= 32 slots per expert, i.e. block_m >= 64 gives
    one block per expert on average and reads each expert's weights once."""
    rows = cfgmod.TUNED[(8, 14336, 4096)]
    for M, bucket in ((96, 96), (100, 96), (112, 128), (128, 128), (160, 192), (256, 256)):
        assert cfgmod.tuned_bucket(rows, M) == bucket
    g1, g2 = rows[128]
    assert g1.block_m >= 64 and g1.block_m == g2.block_m
    assert rows[96][0].block_m == 32  # 24 slots per expert: one 32-row block each


# ---- holes in the table (CPU) --------------------------------------------------------------------------------
def test_decode_sizes_and_expected_weight_reads():
    import tune_moe as tune

    sizes = tune.decode_sizes(64)
    assert sizes[:5] == [1, 2, 4, 8, 16] and sizes[-1] == 64 and all(s % 8 == 0 for s in sizes[3:])
    assert tune.decode_sizes(1024)[-2:] == [512, 1024]
    assert tune.expected_weight_reads(1, 8, 2, 16) == 1.0  # one token: one block per used expert
    assert tune.expected_weight_reads(64, 8, 2, 128) == 1.0
    a = tune.expected_weight_reads(128, 8, 2, 32)
    assert a == tune.expected_weight_reads(128, 8, 2, 32)  # seeded
    assert 1.3 < a < 1.7  # 32 slots per expert on average, block_m 32: about half the experts need two blocks


def test_find_holes_catches_session_7s_mixtral_m128():
    """The table as it was in session 7 (Mixtral rows 1/64/1024): M = 128 took the M = 64 row's block_m 32."""
    import tune_moe as tune
    from moekern.experts.configs import TUNED, BlockConfig

    key = (8, 14336, 4096)
    old = {key: {m: TUNED[key][m] for m in (1, 64, 1024)}}
    holes = {h["M"]: h for h in tune.find_holes(["mixtral"], old, max_m=256)}
    assert 128 in holes and holes[128]["row"] == 64 and holes[128]["block_m"] == 32
    assert holes[128]["weight_reads"] > 1.25 * holes[128]["weight_reads_x2"]
    assert 64 not in holes  # a measured row is never a hole
    assert not [h for h in tune.find_holes(["mixtral"], TUNED, max_m=256)]  # rows 96/128/192 closed it
    full = {key: {1: (BlockConfig(128, 64, 64, 1, 4, 3),) * 2}}
    assert not tune.find_holes(["mixtral"], full, max_m=256)  # no larger tile than 128 to suggest


def test_holes_cli_writes_json(tmp_path, capsys):
    import json as _json

    import tune_moe as tune

    out = tmp_path / "holes.json"
    assert tune.main(["holes", "--models", "olmoe", "--max-m", "256", "--json", str(out)]) == 0
    got = _json.loads(out.read_text())
    assert all(h["model"] == "olmoe" and h["M"] <= 256 for h in got)
    assert f"{len(got)} hole(s)" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        tune.main(["holes", "--ratio", "1.0"])
