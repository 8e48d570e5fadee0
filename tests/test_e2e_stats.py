"""Numbers from the timed repetitions (moekern.e2e.stats, summary): medians, spreads and bootstrap intervals,
rounds pooled, gate-log overhead (paired and across engines), the plugin check and the printed summary."""

import json
from pathlib import Path

import pytest
import torch
from e2e_fakes import ready_args

from moekern.e2e import cli, runner
from moekern.e2e.args import parse_args
from moekern.e2e.arms import arm_env, gate_log_dir, plugin_check
from moekern.e2e.offline import offline_spec
from moekern.e2e.plan import plan_text
from moekern.e2e.results import check_gate_logs
from moekern.e2e.stats import (arm_stats, gate_log_cost, median_run, merge_rounds, paired_overhead, paired_passes,
                               paired_plan, ratio_ci, rep_spread)
from moekern.e2e.summary import format_summary, summarize


def test_rounds_alternate_arms_and_pool_their_passes(tmp_path, monkeypatch, capsys):
    """--rounds 3: vllm, moekern, vllm, moekern, ...; every round a fresh arm run with its own files and gate-log
    folder; the passes of all rounds pooled per arm, the per-round ratios and JIT counts kept."""
    started = []
    rates = {"vllm": [100.0, 110.0, 120.0], "moekern": [105.0, 115.0, 126.0]}  # the machine drifts up

    def fake(args, arm, out, extra_spec=None, round_no=None):
        started.append((arm, round_no))
        base = rates[arm][round_no]
        runs = [{"seconds": 1.0, "output_tokens": 10, "output_tok_s": base + d} for d in (-1.0, 0.0, 1.0)]
        gd = gate_log_dir(args, arm, out, round_no)
        return {"arm": arm, "rc": 0, "wall_s": 10.0, "runs": runs, "output_tok_s": base,
                "output_tok_s_stats": arm_stats([x["output_tok_s"] for x in runs]), "plugin_check": {"ok": True},
                "jit_during_measurement": 1 if (arm, round_no) == ("moekern", 2) else 0, "jit_kernels":
                {"fused_moe_kernel": 1} if (arm, round_no) == ("moekern", 2) else {}, "gate_dir": str(gd)}

    monkeypatch.setattr(runner, "run_offline_arm", fake)
    assert cli.main(["--quick", "--mode", "offline", "--arms", "vllm,moekern", "--rounds", "3", "--no-preflight",
                     "--out", str(tmp_path)]) == 0
    assert started == [("vllm", 0), ("moekern", 0), ("vllm", 1), ("moekern", 1), ("vllm", 2), ("moekern", 2)]
    res = json.loads((tmp_path / "e2e_mixtral-8x7b-4l.json").read_text())
    v, m = res["offline"]["vllm"], res["offline"]["moekern"]
    assert len(v["runs"]) == 9 and v["output_tok_s"] == 110.0 and v["output_tok_s_stats"]["n"] == 9
    assert [r["output_tok_s"] for r in m["rounds"]] == [105.0, 115.0, 126.0] and m["wall_s"] == 30.0
    assert m["jit_during_measurement"] == 1 and m["jit_kernels"] == {"fused_moe_kernel": 1}
    s = res["summary"]
    assert s["offline.moekern_vs_vllm_by_round"] == [1.05, round(115 / 110, 4), 1.05]
    assert s["offline.moekern_vs_vllm"] == round(115.0 / 110.0, 4) and s["offline.steady_state"] is False
    printed = capsys.readouterr().out
    assert "(round 3 of 3)" in printed, printed
    assert "by round: 1.050, 1.046, 1.050" in printed, printed
    assert '"round_output_tok_s": 126.0, "pooled_output_tok_s": 115.0' in printed, printed  # round 3's own value
    lo, hi = s["offline.moekern_vs_vllm_ci95"]
    assert lo < s["offline.moekern_vs_vllm"] < hi and f", 95 % CI {lo:.3f}-{hi:.3f}" in printed
    args = ready_args(["--quick", "--mode", "offline", "--arms", "vllm,moekern-routing-log", "--rounds", "2"])
    assert gate_log_dir(args, "moekern-routing-log", tmp_path, 1) == tmp_path / "gate_logs" / "moekern-routing-log" / "round1"
    assert gate_log_dir(args, "vllm", tmp_path, 1) is None
    assert "x 2 rounds" in plan_text(args)
    with pytest.raises(SystemExit):
        parse_args(["--rounds", "0"])


def test_merge_rounds_keeps_a_failed_round_out():
    good = {"arm": "vllm", "rc": 0, "wall_s": 5.0, "runs": [{"seconds": 1.0, "output_tok_s": 50.0}],
            "jit_during_measurement": 0}
    bad = {"arm": "vllm", "rc": 124, "wall_s": 300.0, "error": "timed out"}
    m = merge_rounds([good, bad])
    assert m["output_tok_s"] == 50.0 and m["rounds"][1]["error"] == "timed out" and "error" not in m
    assert merge_rounds([bad, bad])["error"] == "timed out"
    unknown = merge_rounds([good, {**good, "jit_during_measurement": None}])
    assert unknown["jit_during_measurement"] is None and unknown["jit_note"]


def test_plugin_check():
    layer = {"index": 0, "name": "model.layers.0.block_sparse_moe.experts", "router": "FusedTopKRouter",
             "moekern_routing": {"8": "FusedTopKRouter: softmax top-2"}, "moekern_experts": None}
    good = [{"installed": True, "kernels": "routing", "layers": [layer]}]
    assert plugin_check("vllm", "unavailable: NotImplementedError()") == {"ok": True, "why": "plugin off"}
    assert plugin_check("moekern-routing", good) == {"ok": True, "why": "1 MoE layer(s) on moekern routing"}
    bad = plugin_check("moekern-routing", "unavailable: TypeError('Object of type function ...')")
    assert not bad["ok"] and "no plugin summary" in bad["why"]
    fell_back = [{"installed": True, "kernels": "routing", "layers": [{**layer, "moekern_routing": {"8": None}}]}]
    assert "kept vLLM routing" in plugin_check("moekern-routing", fell_back)["why"]
    assert "no MoE layer hooked" in plugin_check("moekern-routing", [{"installed": True, "kernels": "routing",
                                                                         "layers": []}])["why"]
    all_mode = [{"installed": True, "kernels": "all", "layers": [layer]}]
    assert "kept vLLM experts" in plugin_check("moekern", all_mode)["why"]
    all_mode[0]["layers"][0] = {**layer, "moekern_experts": True}
    assert plugin_check("moekern", all_mode)["ok"]
    assert "kernels=routing" in plugin_check("moekern", good)["why"]  # the arm's env did not reach it
    s = summarize({"offline": {"vllm": {"output_tok_s": 10.0}, "moekern": {"output_tok_s": 11.0,
                                                                             "plugin_check": bad}}})
    assert s["offline.moekern_vs_vllm"] == 1.1 and "no plugin summary" in s["offline.moekern_plugin_check_failed"]


def test_summarize_reports_gate_log_overhead_with_its_noise():
    def arm(vals):
        return {"output_tok_s": sorted(vals)[len(vals) // 2], "runs": [{"output_tok_s": v} for v in vals]}

    s = summarize({"offline": {"moekern-routing": arm([100.0, 101.0, 99.0]),
                                   "moekern-routing-log": arm([98.0, 98.5, 97.0])}})
    assert s["offline.gate_log_overhead"] == pytest.approx(1 - 98.0 / 100.0, abs=1e-4)
    assert s["offline.gate_log_overhead_noise"] == pytest.approx(2.0 / 100.0, abs=1e-4)  # the wider arm
    assert rep_spread([{"output_tok_s": 5.0}]) is None
    single = summarize({"offline": {"moekern-routing": arm([100.0]), "moekern-routing-log": arm([99.0])}})
    assert "offline.gate_log_overhead_noise" not in single and "offline.gate_log_overhead" in single
    results = {"offline": {"moekern-routing": arm([100.0, 101.0, 99.0]), "moekern-routing-log": arm([99.0, 99.5, 98.0]),
                           "moekern-routing-log-torch": arm([96.0, 96.5, 95.0])}}
    both = summarize(results)
    assert both["offline.gate_log_overhead"] == pytest.approx(0.01, abs=1e-4)
    assert both["offline.gate_log_overhead_torch"] == pytest.approx(0.04, abs=1e-4)
    text = format_summary(results, both)
    assert "gate_log_overhead = 1.0%" in text and "gate_log_overhead_torch = 4.0%" in text
    assert arm_env("moekern-routing-log-torch", Path("/o"), Path("/g"), base_env={})[
        "MOEKERN_GATE_LOG_SNAPSHOT"] == "torch"


def test_arm_stats_and_median_run():
    st = arm_stats([4.0, 1.0, 3.0, 2.0])
    assert st == {"median": 2.5, "min": 1.0, "max": 4.0, "n": 4, "spread": pytest.approx(3.0 / 2.5)}
    assert arm_stats([5.0])["spread"] is None and arm_stats([]) is None
    runs = [{"output_throughput": v} for v in (30.0, 10.0, 20.0)]
    assert median_run(runs) == 2 and median_run(runs[:2]) == 1  # even count: the lower median


def _offline_arm(vals, jit):
    st = arm_stats(vals)
    return {"rc": 0, "output_tok_s": st["median"], "output_tok_s_stats": st,
            "runs": [{"output_tok_s": v} for v in vals], "jit_during_measurement": jit,
            "autotune_during_measurement": 0, "jit_kernels": {"fused_moe_kernel": jit} if jit else {}}


def test_summary_ratio_from_medians_with_spread_and_steady_flag():
    res = {"offline": {"vllm": _offline_arm([10.0, 11.0, 12.0], 0),
                       "moekern": _offline_arm([20.0, 22.0, 21.0], 0),
                       "flashinfer": {"skipped": "not asked"}}}
    s = summarize(res)
    assert s["offline.moekern_vs_vllm"] == pytest.approx(21.0 / 11.0, abs=1e-4)
    assert s["offline.moekern_vs_vllm_spread"] == pytest.approx(2.0 / 11.0, abs=1e-4)  # the wider arm
    assert s["offline.steady_state"] is True and "offline.not_steady" not in s
    text = format_summary(res, s)
    assert "NOT STEADY" not in text and "moekern_vs_vllm = 1.909 (rep spread 18.2%)" in text
    assert "        21 [20-22] n=3  JIT while timed: 0" in text and "skipped: not asked" in text

    res["offline"]["vllm"] = _offline_arm([10.0, 11.0, 12.0], 3)
    s = summarize(res)
    assert s["offline.steady_state"] is False and "fused_moe_kernel x3" in s["offline.not_steady"]["vllm"]
    assert "moekern" not in s["offline.not_steady"]
    text = format_summary(res, s)
    assert "NOT STEADY STATE: the offline ratios above are not a valid A/B" in text and "    vllm: 3 JIT" in text

    res["offline"]["vllm"] = {**_offline_arm([10.0], 0), "jit_during_measurement": None, "jit_note": "gone"}
    s = summarize(res)
    assert s["offline.not_steady"] == {"vllm": "gone"} and "offline.moekern_vs_vllm_spread" not in s
    res["offline"]["vllm"] = {**_offline_arm([10.0], 0), "autotune_during_measurement": 2}
    assert not summarize(res)["offline.steady_state"]  # autotuning while timed counts too
    res["offline"]["vllm"] = {"rc": 1, "error": "boom"}  # a failed arm neither counts nor crashes
    s = summarize(res)
    assert s["offline.steady_state"] is True and "offline.moekern_vs_vllm" not in s


def test_summary_serve_ratios():
    def arm(vals, tpot, jit):
        return {"output_throughput": sorted(vals)[(len(vals) - 1) // 2], "median_tpot_ms": tpot,
                "output_throughput_stats": arm_stats(vals), "jit_during_measurement": jit,
                "autotune_during_measurement": 0, "jit_kernels": {}}

    res = {"serve": {"vllm": arm([100.0, 110.0], 5.0, 0), "moekern": arm([120.0, 126.0], 4.5, 1)}}
    res["serve"]["moekern"]["median_tpot_ms_stats"] = arm_stats([4.4, 4.6])  # median 4.5, spread 0.2/4.5
    res["serve"]["vllm"]["median_tpot_ms_stats"] = arm_stats([5.0, 5.0])
    s = summarize(res)
    # medians of the timed runs (123 and 105), not the lower-median run each arm reports in full
    assert s["serve.moekern_vs_vllm"] == pytest.approx(123.0 / 105.0, abs=1e-4)
    assert s["serve.moekern_tpot_vs_vllm"] == pytest.approx(0.9)
    assert s["serve.moekern_tpot_vs_vllm_spread"] == pytest.approx(0.2 / 4.5, abs=1e-4)
    assert s["serve.moekern_vs_vllm_spread"] == pytest.approx(10.0 / 105.0, abs=1e-4)
    assert s["serve.steady_state"] is False and "offline.steady_state" not in s
    assert "median TPOT 4.50 ms" in format_summary(res, s)


def test_ratio_ci():
    assert ratio_ci([1.0], [2.0, 3.0]) is None
    lo, hi = ratio_ci([100.0, 101.0, 99.0, 100.5], [110.0, 111.0, 109.0, 110.5])
    assert 1.07 < lo <= 1.1 <= hi < 1.13
    assert ratio_ci([100.0, 101.0, 99.0], [110.0, 111.0, 109.0]) == ratio_ci([100.0, 101.0, 99.0],
                                                                                    [110.0, 111.0, 109.0])
    wide = ratio_ci([80.0, 120.0, 100.0, 90.0], [85.0, 125.0, 105.0, 95.0])
    assert wide[0] < 1.0 < wide[1]  # noisy passes: the interval says the 5 % is not resolved


def test_gate_log_overhead_line_and_ci():
    mk = lambda xs: {"runs": [{"output_tok_s": x} for x in xs], "output_tok_s": sorted(xs)[len(xs) // 2],  # noqa: E731
                     "jit_during_measurement": 0, "autotune_during_measurement": 0}
    res = {"offline": {"moekern-routing": mk([100.0, 101.0, 99.0]), "moekern-routing-log": mk([95.0, 96.0, 94.0])}}
    s = summarize(res)
    assert s["offline.gate_log_overhead"] == 0.05
    lo, hi = s["offline.gate_log_overhead_ci95"]
    assert lo <= 0.05 <= hi
    assert f"gate_log_overhead = 5.0% (rep spread 2.1%), 95 % CI {lo:.1%} to {hi:.1%}" in format_summary(res, s)


def test_check_gate_logs_reports_the_recorders_cost(tmp_path):
    from moekern.gatelog.writer import GateLogRecorder

    rec = GateLogRecorder(tmp_path, rank=0)
    rec.register_layer("l0", 4, 2)
    rec.ensure_buffer("cpu")
    for _ in range(3):
        rec.begin_step()
        rec.add_counts(0, torch.tensor([1, 0, 1, 0], dtype=torch.int32))
        rec.end_step("decode", 1)
    rec.close()
    got = check_gate_logs(tmp_path)
    assert got["ok"] and got["steps"] == 3 and got["dropped_steps"] == 0
    assert len(got["host_us_per_step"]) == 1 and got["host_us_per_step"][0] > 0
    assert len(got["writer_cpu_seconds"]) == 1 and got["writer_cpu_seconds"][0] >= 0


# ---- --gate-log-paired: gate log on / paused passes in one engine ------------------------------------------
def test_paired_plan_and_pairs_are_adjacent_abba():
    assert paired_plan(8) == [True, False, False, True, True, False, False, True]
    runs = [{"output_tok_s": 100.0 + i, "gate_log": on} for i, on in enumerate(paired_plan(6))]
    assert paired_passes(runs) == [[100.0, 101.0], [103.0, 102.0], [104.0, 105.0]]


def test_paired_overhead_and_interval():
    assert paired_overhead([]) is None
    one = paired_overhead([[98.0, 100.0]])
    assert one == {"n_pairs": 1, "overhead": 0.02}  # no interval from one pair
    even = paired_overhead([[98.0, 100.0], [49.0, 50.0], [196.0, 200.0]])
    assert even["overhead"] == pytest.approx(0.02, abs=1e-4) and even["ci95"] == [0.02, 0.02]
    noisy = paired_overhead([[97.0, 100.0], [100.0, 99.0], [95.0, 100.0], [99.0, 100.0]])
    lo, hi = noisy["ci95"]
    assert lo < noisy["overhead"] < hi and lo < 0.02 < hi
    assert noisy == paired_overhead([[97.0, 100.0], [100.0, 99.0], [95.0, 100.0], [99.0, 100.0]])  # seeded


def test_paired_mode_flows_through_spec_merge_and_summary(tmp_path):
    args = ready_args(["--mode", "offline", "--arms", "moekern-routing-log,vllm", "--reps", "4", "--gate-log-paired"])
    assert offline_spec(args, "moekern-routing-log", tmp_path / "r.json")["gate_log_paired"] is True
    assert offline_spec(args, "vllm", tmp_path / "r.json")["gate_log_paired"] is False  # no gate log there
    with pytest.raises(SystemExit):
        parse_args(["--mode", "offline", "--reps", "3", "--gate-log-paired"])
    r0 = {"arm": "moekern-routing-log", "rc": 0, "runs": [{"seconds": 1.0, "output_tok_s": 98.0}],
          "jit_during_measurement": 0, "gate_log_paired": {"pairs": [[98.0, 100.0], [97.0, 99.0]]}}
    r1 = {**r0, "gate_log_paired": {"pairs": [[99.0, 100.0]]}}
    merged = merge_rounds([r0, r1])
    assert merged["gate_log_paired"]["n_pairs"] == 3 and len(merged["gate_log_paired"]["pairs"]) == 3
    results = {"offline": {"moekern-routing-log": merged}}
    s = summarize(results)
    assert s["offline.moekern-routing-log_gate_log_overhead_paired_n"] == 3
    assert 0.0 < s["offline.moekern-routing-log_gate_log_overhead_paired"] < 0.03
    assert "paired passes in one engine" in format_summary(results, s)


def test_gate_log_cost_from_plugin_summaries_in_the_summary():
    def run(us, snap):
        return {"arm": "moekern-routing-log", "rc": 0, "runs": [{"seconds": 1.0, "output_tok_s": 90.0}],
                "jit_during_measurement": 0,
                "plugin": [{"gate_log": {"host_us_per_step": us, **({"snapshot": snap} if snap else {})}}]}
    assert gate_log_cost({"plugin": "unavailable: no such method"}) is None
    assert gate_log_cost(run(100.0, None)) == {"host_us_per_step": 100.0, "hand_off": ["torch calls"]}
    merged = merge_rounds([run(100.0, "moekern gatelog_snapshot kernel"), run(60.0, "moekern gatelog_snapshot kernel")])
    results = {"offline": {"moekern-routing-log": merged}}
    s = summarize(results)
    assert s["offline.moekern-routing-log_gate_log_host_us_per_step"] == [100.0, 60.0]
    assert s["offline.moekern-routing-log_gate_log_hand_off"] == ["moekern gatelog_snapshot kernel"]
    assert "gate log on the model thread 100, 60 us/step" in format_summary(results, s)
    single = summarize({"offline": {"moekern-routing-log": run(120.0, None)}})  # one round: not merged
    assert single["offline.moekern-routing-log_gate_log_host_us_per_step"] == [120.0]
