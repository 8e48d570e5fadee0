"""One arm end to end with its processes faked: the offline arm counting JIT after its child's marker, the
serve arm warming up, timing and counting only its timed part."""

import json
import subprocess
from pathlib import Path

from e2e_fakes import ready_args, flag_value, fake_server, FakeProc, JIT_ATTN, JIT_MOE_VERBOSE, log_text
from moekern.e2e.offline import run_offline_arm
from moekern.e2e.serve import run_serve_arm
from moekern.e2e.warmup import MEASURE_MARKER


def test_offline_arm_counts_jit_after_the_childs_marker(tmp_path, monkeypatch):
    """run_offline_arm with a fake child that logs one compile in warm-up and one while timed."""
    seen = {}

    def popen(cmd, stdout, **kw):
        assert cmd[1:3] == ["-m", "moekern.e2e.offline"]  # the child: a module of the package, no script path
        spec = json.loads(Path(cmd[-1]).read_text())
        seen["spec"] = spec
        stdout.write(log_text(JIT_ATTN, MEASURE_MARKER, JIT_MOE_VERBOSE))
        stdout.flush()
        Path(spec["result"]).write_text(json.dumps({"init_s": 1.0, "runs": [{"output_tok_s": 5.0}],
                                                    "output_tok_s": 5.0, "plugin": "unavailable: x"}))
        return FakeProc()

    monkeypatch.setattr(subprocess, "Popen", popen)
    args = ready_args(["--quick", "--mode", "offline", "--arms", "vllm"])
    r = run_offline_arm(args, "vllm", tmp_path)
    assert r["jit_during_measurement"] == 1 and r["jit_kernels"] == {"fused_moe_kernel": 1}
    assert seen["spec"]["warmup_reps"] == 1 and seen["spec"]["engine"]["enable_prefix_caching"] is False


def test_serve_arm_warms_up_then_times_and_counts_only_the_timed_part(tmp_path, monkeypatch):
    """run_serve_arm with a fake server and fake `vllm bench serve`: one warm-up run (its compile not
    counted), two timed runs (one compile counted), the median run copied to serve_<arm>.bench.json."""
    state = {"server_log": None, "benches": []}
    throughput = {"serve_moekern.warmup.json": 50.0, "serve_moekern.rep0.json": 120.0,
                  "serve_moekern.rep1.json": 100.0}

    def popen(cmd, stdout, **kw):
        if cmd[:2] == ["vllm", "serve"]:
            state["server_log"] = stdout
            stdout.write("INFO server up\n")
            stdout.flush()
            return FakeProc(rc=None)
        name = flag_value(cmd, "--result-filename")
        state["benches"].append(name)
        if name != "serve_moekern.rep1.json":  # the server compiles during warm-up and the first timed run
            state["server_log"].write(log_text(JIT_ATTN if "warmup" in name else JIT_MOE_VERBOSE))
            state["server_log"].flush()
        Path(flag_value(cmd, "--result-dir"), name).write_text(json.dumps(
            {"duration": 3.0, "completed": 320, "output_throughput": throughput[name], "median_tpot_ms": 5.0,
             "median_ttft_ms": 40.0, "p90_ttft_ms": 60.0}))
        return FakeProc()

    stopped = []
    fake_server(monkeypatch, popen, stopped)
    args = ready_args(["--quick", "--mode", "serve", "--arms", "moekern"])
    r = run_serve_arm(args, "moekern", tmp_path)
    assert "error" not in r, r.get("error")
    assert state["benches"] == ["serve_moekern.warmup.json", "serve_moekern.rep0.json", "serve_moekern.rep1.json"]
    assert r["jit_during_measurement"] == 1 and r["jit_kernels"] == {"fused_moe_kernel": 1}
    assert [x["output_throughput"] for x in r["runs"]] == [120.0, 100.0] and r["output_throughput"] == 100.0
    assert r["output_throughput_stats"]["min"] == 100.0 and r["output_throughput_stats"]["max"] == 120.0
    assert json.loads((tmp_path / "serve_moekern.bench.json").read_text())["output_throughput"] == 100.0
    assert stopped and r["server_stopped"] and "--no-enable-prefix-caching" in r["cmd"]
    log = (tmp_path / "serve_moekern.server.log").read_text()
    assert log.index(JIT_ATTN) < log.index(MEASURE_MARKER) < log.index("fused_moe_kernel")
