"""Steady state (moekern.e2e.warmup and the offline child): prefix caching off, every compile logged, the warm-up
plan and shape sweep, and the JIT compiles counted after the measurement marker."""

import json
import sys
import time
from pathlib import Path

import pytest
from e2e_fakes import ready_args, flag_value, JIT_ATTN, JIT_MOE_VERBOSE, AUTOTUNE, log_text
from moekern.e2e.arms import ARMS, bench_command, engine_kwargs, serve_command
from moekern.e2e.offline import child_offline, offline_spec
from moekern.e2e.plan import QUICK
from moekern.e2e.serve import serve_shape_sweep
from moekern.e2e.warmup import (GRID_POINT_END, GRID_POINT_START, JIT_WARNING, MEASURE_MARKER, MOE_CONFIG_KEYS,
                                count_jit_between, count_jit_events, jit_fields, new_jit_lines, shape_sweep,
                                sweep_batches, sweep_spec, warm_again, warmup_plan)

REPO = Path(__file__).resolve().parents[1]


def test_engine_runs_without_prefix_caching_and_logs_every_compile(tmp_path):
    args = ready_args(["--quick", "--mode", "both"])
    for arm in ARMS:
        kw = engine_kwargs(args, arm)
        assert kw["enable_prefix_caching"] is False and kw["jit_monitor_verbose"] is True
    cmd = serve_command(engine_kwargs(args, "moekern"), 1)
    assert "--no-enable-prefix-caching" in cmd and "--enable-prefix-caching" not in cmd
    at = cmd.index("--jit-monitor-verbose")  # a bare switch
    assert at == len(cmd) - 1 or cmd[at + 1].startswith("--")
    # other False flags stay out (vLLM's default is off for them)
    assert "--no-enable-eplb" not in serve_command({**engine_kwargs(args, "vllm"), "enable_eplb": False}, 1)
    bench = bench_command(args, 1, tmp_path, "r.json")
    assert flag_value(bench, "--temperature") == "0" and flag_value(bench, "--seed") == "0"
    spec = offline_spec(args, "vllm", tmp_path / "r.json")
    assert spec["warmup_reps"] == QUICK.warmup_reps and spec["engine"]["enable_prefix_caching"] is False


def test_warm_again():
    # always the asked passes, then more only while the last one compiled, up to the maximum
    assert warm_again([], 1, 4) and not warm_again([0], 1, 4)
    assert warm_again([3], 1, 4) and warm_again([3, 1], 1, 4) and not warm_again([3, 1, 0], 1, 4)
    assert not warm_again([3, 1, 2, 5], 1, 4)  # the cap
    assert warm_again([0], 2, 4)  # --warmup-reps passes run even when the first was quiet
    assert warm_again([None], 1, 3) and not warm_again([None, None, None], 1, 3)  # unknown: warm on
    assert not warm_again([], 0, 4)  # a gate-log run without warm-up stays without
    assert not warm_again([7], 1, 1)


def test_new_jit_lines(tmp_path):
    log = tmp_path / "a.log"
    log.write_text(f"x\nWARNING {JIT_WARNING}: k1\n")
    n, off = new_jit_lines(str(log), 0)
    assert n == 1 and off == log.stat().st_size
    with open(log, "a") as fh:
        fh.write(f"{JIT_WARNING}: k2\n{JIT_WARNING}: k3\n")
    assert new_jit_lines(str(log), off)[0] == 2
    assert new_jit_lines(None, 5) == (None, 5) and new_jit_lines(str(tmp_path / "no.log"), 3) == (None, 3)


def _fake_vllm(monkeypatch, log: Path, compiles_per_pass: list[int]):
    """A vllm module whose LLM.generate appends the given numbers of JIT warnings to `log` on its successive
    calls of more than 16 prompts (the engine process writing into the arm's log), and records every call."""
    import types
    calls = []

    class LLM:
        def __init__(self, **kw):
            self.kw = kw

        def generate(self, prompts, sp, use_tqdm=False):
            calls.append((len(prompts), sp.max_tokens))
            full = [c for c in calls if c[0] > 16]
            if len(prompts) > 16 and len(full) <= len(compiles_per_pass):
                with open(log, "a") as fh:
                    fh.write("".join(f"(EngineCore) WARNING {e2e_jit} fused_moe_kernel (x)\n"
                                     for _ in range(compiles_per_pass[len(full) - 1])))
            out = types.SimpleNamespace(token_ids=[1] * sp.max_tokens)
            return [types.SimpleNamespace(outputs=[out]) for _ in prompts]

        def collective_rpc(self, name):
            raise AttributeError(name)

    class SamplingParams:
        def __init__(self, max_tokens, **kw):
            self.max_tokens = max_tokens

    e2e_jit = "Triton kernel JIT compilation during inference:"
    vllm = types.ModuleType("vllm")
    vllm.LLM, vllm.SamplingParams = LLM, SamplingParams
    inputs = types.ModuleType("vllm.inputs")
    inputs.TokensPrompt = lambda prompt_token_ids: prompt_token_ids
    monkeypatch.setitem(sys.modules, "vllm", vllm)
    monkeypatch.setitem(sys.modules, "vllm.inputs", inputs)
    return calls


def test_child_offline_runs_the_shape_sweep_between_pre_warm_and_full_passes(monkeypatch, tmp_path):
    log, res = tmp_path / "offline_x.log", tmp_path / "offline_x.json"
    log.write_text("")
    calls = _fake_vllm(monkeypatch, log, [0])
    monkeypatch.setattr(time, "sleep", lambda s: None)
    sw = {"cap": 40, "max_model_len": 16, "max_num_seqs": 4}
    spec = {"engine": {}, "seed": 0, "vocab": 1000, "input_len": 4, "output_len": 3, "num_prompts": 20, "reps": 1,
            "warmup_reps": 1, "warmup_max_reps": 2, "ignore_eos": True, "result": str(res), "log": str(log),
            "shape_sweep": sw}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    assert child_offline(str(tmp_path / "spec.json")) == 0
    r = json.loads(res.read_text())
    steps = len(sweep_batches(40, 16, 4))
    assert r["shape_sweep"]["steps"] == steps and r["shape_sweep"]["error"] is None
    assert calls[0] == (16, 8) and all(c[1] == 1 for c in calls[1:1 + steps])  # one token per sweep request
    assert calls[1 + steps:] == [(20, 3), (20, 3)]  # one quiet warm-up pass, one timed
    spec.update(warmup_reps=0)  # no warm-up at all: no sweep either (gate-log runs keep only timed passes)
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    calls.clear()
    assert child_offline(str(tmp_path / "spec.json")) == 0
    assert json.loads(res.read_text())["shape_sweep"] is None and calls == [(20, 3)]


@pytest.mark.parametrize("compiles, warm_passes, timed_jit", [
    ([4, 2, 0], 3, 0),     # warms on until a full pass compiles nothing
    ([4, 2, 1, 1, 1], 4, 1),  # the cap: the 5th pass's compile lands in the measured part
    ([0], 1, 0),           # quiet at once: just --warmup-reps
])
def test_child_offline_warms_until_quiet(monkeypatch, tmp_path, compiles, warm_passes, timed_jit):
    log, res = tmp_path / "offline_x.log", tmp_path / "offline_x.json"
    log.write_text("")
    calls = _fake_vllm(monkeypatch, log, compiles)
    monkeypatch.setattr(time, "sleep", lambda s: None)
    spec = {"engine": {}, "seed": 0, "vocab": 1000, "input_len": 4, "output_len": 3, "num_prompts": 20, "reps": 2,
            "warmup_reps": 1, "warmup_max_reps": 4, "ignore_eos": True, "result": str(res), "log": str(log)}
    spec_path = tmp_path / "spec.json"
    spec_path.write_text(json.dumps(spec))
    real_stdout = sys.stdout
    with open(log, "a") as fh:  # the child's stdout is the log, as run_offline_arm starts it
        monkeypatch.setattr(sys, "stdout", fh)
        assert child_offline(str(spec_path)) == 0
    monkeypatch.setattr(sys, "stdout", real_stdout)
    r = json.loads(res.read_text())
    full = [w for w in r["warmup"] if w["prompts"] == 20]
    assert [w["jit"] for w in full] == compiles[:warm_passes]
    assert r["warmup"][0] == {**r["warmup"][0], "prompts": 16, "max_tokens": 8}  # the small pre-warm pass first
    assert len(calls) == len(r["warmup"]) + 2 and len(r["runs"]) == 2
    assert count_jit_events(log.read_text())["jit"] == timed_jit


def test_shape_sweep_meets_every_config_and_residue():
    ms = shape_sweep(16384)
    assert ms == sorted(set(ms)) and ms[0] == 1 and ms[-1] == 16384
    for k in MOE_CONFIG_KEYS:  # every tile config, with all 16 residues mod 16 next to its key
        assert {m % 16 for m in ms if k <= m < k + 16} == set(range(16))
    assert {m % 16 for m in ms if m > 16384 - 16} == set(range(16))  # the largest steps the budget allows
    small = shape_sweep(20)
    assert small == list(range(1, 21))
    with pytest.raises(ValueError, match="cap=0"):
        shape_sweep(0)


@pytest.mark.parametrize("cap, max_len, seqs", [(16384, 2048, 128), (8192, 2048, 128), (100, 16, 4), (7, 2, 3)])
def test_sweep_batches_are_single_steps_of_m_tokens(cap, max_len, seqs):
    batches = sweep_batches(cap, max_len, seqs)
    top = min(cap, (max_len - 1) * seqs)
    assert [sum(b) for b in batches] == shape_sweep(top)
    for b in batches:  # each prompt fits the model with its one generated token; the step holds them all
        assert 1 <= len(b) <= seqs and all(1 <= k <= max_len - 1 for k in b) and max(b) - min(b) <= 1
    with pytest.raises(ValueError, match="leave no room"):
        sweep_batches(10, 1, 4)


def test_sweep_spec_follows_the_flags():
    args = ready_args(["--quick", "--mode", "offline"])
    assert sweep_spec(args, "offline") == {"cap": 16384, "max_model_len": 2048, "max_num_seqs": 128}
    assert sweep_spec(args, "serve")["cap"] == 8192
    args = ready_args(["--quick", "--mode", "offline", "--max-num-batched-tokens", "4096", "--max-num-seqs", "64"])
    assert sweep_spec(args, "serve") == {"cap": 4096, "max_model_len": 2048, "max_num_seqs": 64}
    assert offline_spec(args, "vllm", Path("r.json"))["shape_sweep"]["cap"] == 4096
    args = ready_args(["--quick", "--mode", "offline", "--no-shape-sweep"])
    assert sweep_spec(args, "offline") is None and offline_spec(args, "vllm", Path("r.json"))["shape_sweep"] is None


def test_serve_shape_sweep_posts_one_request_per_step():
    sent = []
    sw = {"cap": 40, "max_model_len": 16, "max_num_seqs": 4}
    r = serve_shape_sweep(8000, "/models/m", sw, 1000, post=lambda url, body: sent.append((url, body)))
    assert r["error"] is None and r["steps"] == len(sent) == len(shape_sweep(40))
    assert all(url == "http://127.0.0.1:8000/v1/completions" for url, _ in sent)
    assert [sum(len(p) for p in b["prompt"]) for _, b in sent] == shape_sweep(40)
    assert all(b["max_tokens"] == 1 and b["model"] == "/models/m" for _, b in sent)
    assert all(100 <= t < 900 for _, b in sent for p in b["prompt"] for t in p)

    def fail_at_30(url, body):
        if sum(len(p) for p in body["prompt"]) == 30:
            raise OSError("connection reset")
    r = serve_shape_sweep(8000, "/models/m", sw, 1000, post=fail_at_30)
    assert r["error"] == "step of 30 tokens: OSError: connection reset"


def test_warmup_plan():
    assert warmup_plan(512, 128, 1) == [(16, 8), (512, 128)]
    assert warmup_plan(8, 32, 2) == [(8, 8), (8, 32), (8, 32)]  # fewer prompts than the pre-warm takes
    assert warmup_plan(512, 128, 0) == []
    with pytest.raises(ValueError, match="warmup_reps=-1 must be >= 0"):
        warmup_plan(4, 4, -1)


def test_count_jit_events_after_the_marker():
    text = log_text("INFO init", JIT_ATTN, MEASURE_MARKER, "INFO step", JIT_MOE_VERBOSE, JIT_ATTN, AUTOTUNE)
    c = count_jit_events(text)
    assert c == {"jit": 2, "autotune": 1, "kernels": {"fused_moe_kernel": 1, "kernel_unified_attention": 1}}
    assert count_jit_events(text, marker=None)["jit"] == 3  # the warm-up's compile too
    assert count_jit_events(log_text(JIT_ATTN, "no marker here")) is None
    clean = count_jit_events(log_text(JIT_ATTN, AUTOTUNE, MEASURE_MARKER, "INFO step"))
    assert clean == {"jit": 0, "autotune": 0, "kernels": {}}
    assert jit_fields(text)["jit_during_measurement"] == 2
    unknown = jit_fields("crashed before the marker")
    assert unknown["jit_during_measurement"] is None and "no " in unknown["jit_note"]


def test_count_jit_events_in_the_first_runs_log():
    """The committed first-run log has the warnings (in the untimed-or-not part: that run had no marker)."""
    log = REPO / "benchmarks" / "results" / "e2e" / "h100-2026-11-23" / "offline" / "offline_vllm.log"
    if not log.exists():
        pytest.skip("first-run results not in this checkout")
    text = log.read_text(errors="replace")
    assert count_jit_events(text) is None
    c = count_jit_events(text, marker=None)
    assert c["jit"] >= 2 and {"fused_moe_kernel", "kernel_unified_attention"} <= set(c["kernels"])


def test_count_jit_between_markers():
    s, e = GRID_POINT_START, GRID_POINT_END
    text = log_text(f"{s} a_c8_r0", JIT_MOE_VERBOSE, f"{e} a_c8_r0", f"{s} a_c128_r0", f"{e} a_c128_r0",
                f"{s} a_c12_r0", JIT_ATTN, JIT_MOE_VERBOSE)
    assert count_jit_between(text, f"{s} a_c8_r0\n", f"{e} a_c8_r0\n")["jit"] == 1
    assert count_jit_between(text, f"{s} a_c128_r0\n", f"{e} a_c128_r0\n")["jit"] == 0
    assert count_jit_between(text, f"{s} a_c12_r0\n", f"{e} a_c12_r0\n")["jit"] == 2  # unterminated: to the end
    assert count_jit_between(text, f"{s} a_c1_r0\n", f"{e} a_c1_r0\n") is None
