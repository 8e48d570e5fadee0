"""The serve grid (moekern.e2e.grid, grid_child): point names and order, the time plan, the bench child's
markers and budget, and the whole path with a fake server and bench."""

import json
import math
import os
import time
from pathlib import Path

import pytest
from e2e_fakes import ready_args, flag_value, fake_server, FakeProc, JIT_ATTN, JIT_MOE_VERBOSE, log_text
from moekern.e2e.args import parse_args
from moekern.e2e.grid import grid_points, read_progress, run_serve_grid_arm
from moekern.e2e.grid_child import child_bench_grid
from moekern.e2e.plan import grid_plan_estimate, grid_timing, plan_text
from moekern.e2e.warmup import GRID_POINT_END, GRID_POINT_START


# ---- serve grid: many benches against one server ----------------------------------------------------------
def _grid_args(tmp_path, extra=()):
    ds = []
    for i, (name, text) in enumerate((("000_0.2000", "alpha beta"), ("001_0.8000", "gamma gamma"))):
        p = tmp_path / f"{name}.jsonl"
        p.write_text(json.dumps({"prompt": text, "prompt_len": 10 + 10 * i}) + "\n")
        ds.append(p)
    return ready_args(["--mode", "serve", "--arms", "moekern", "--concurrency-grid", "8,32",
                        "--datasets", ",".join(map(str, ds)), "--grid-reps", "2", "--result-dir",
                        str(tmp_path / "runs"), "--serve-prompts", "64", "--output-len", "16", *extra]), ds


def test_grid_points_names_and_order(tmp_path):
    args, ds = _grid_args(tmp_path)
    pts = grid_points(args, "moekern")
    assert len(pts) == 2 * 2 * 2
    assert [(p["rep"], p["dataset"].stem, p["concurrency"]) for p in pts[:3]] == \
        [(0, "000_0.2000", 8), (0, "000_0.2000", 32), (0, "001_0.8000", 8)]
    assert pts[0]["name"] == "moekern_s128_c8_d000_0.2000_r0"
    assert pts[-1]["result"] == tmp_path / "runs" / "moekern_s128_c32_d001_0.8000_r1.json"
    assert len({p["name"] for p in pts}) == len(pts)
    from moekern.analysis.study.sweep import grid_point_name

    assert grid_point_name("x", 8, None, 0) == "x_c8_drandom_r0"


def test_grid_plan_text_and_timing_constants(tmp_path):
    args, _ = _grid_args(tmp_path, ["--no-preflight"])
    text = plan_text(args)
    assert "plan serve grid: 1 arm(s)" in text and "8 benches per server" in text
    from moekern.analysis.study.sweep import GridTiming, bench_run_seconds, grid_plan_seconds

    t, g = grid_timing(), GridTiming()
    # the sweep's defaults are this runner's measured constants (one source of numbers for both estimates)
    assert (t.server_start_first_s, t.server_start_later_s, t.decode_step_s, t.prefill_tok_s, t.server_stop_s,
            t.preflight_s) == (g.server_start_first_s, g.server_start_later_s, g.decode_step_s, g.prefill_tok_s,
                               g.server_stop_s, g.preflight_s)
    # hand-computed: mean prompt_len 15; per bench 64*16*0.0055/c + 64*15/220000 (+3 s overhead)
    work = lambda c: 64 * 16 * 0.0055 / c + 64 * 15 / 220000.0  # noqa: E731
    assert bench_run_seconds(64, 15, 16, 8, 128) == pytest.approx(work(8))
    want = 106.0 + 15.0 + (work(32) + 3.0) + 2 * 2 * (work(8) + work(32) + 6.0) + 10.0
    assert grid_plan_estimate(args, 1) == pytest.approx(want)
    assert grid_plan_seconds(2, [8], 1, 1, 64, 15, 16, 128, g, preflight=True) == pytest.approx(
        50.0 + 106.0 + 66.0 + 2 * (15.0 + 2 * (work(8) + 3.0) + 10.0))
    assert "exceeds --budget-s" in plan_text(_grid_args(tmp_path, ["--budget-s", "10"])[0])


@pytest.mark.parametrize("argv,match", [
    (["--mode", "offline", "--concurrency-grid", "8", "--result-dir", "r"], "needs --mode serve"),
    (["--mode", "serve", "--concurrency-grid", "8"], "needs --result-dir"),
    (["--mode", "serve", "--datasets", "a.jsonl"], "needs --concurrency-grid"),
    (["--mode", "serve", "--grid-reps", "2"], "needs --concurrency-grid"),
    (["--mode", "serve", "--concurrency-grid", "8,x", "--result-dir", "r"], "comma-separated ints"),
    (["--mode", "serve", "--concurrency-grid", "0", "--result-dir", "r"], "ints >= 1"),
    (["--mode", "serve", "--concurrency-grid", "8", "--result-dir", "r", "--grid-reps", "0"], "--grid-reps=0"),
    (["--mode", "serve", "--concurrency-grid", "8", "--result-dir", "r", "--datasets", "/nonexistent.jsonl"],
     "is not a file"),
    (["--mode", "serve", "--arms", "vllm", "--concurrency-grid", "8", "--result-dir", "r", "--result", "x.json"],
     "drop --result"),
    (["--mode", "serve", "--arms", "vllm,moekern", "--concurrency-grid", "8", "--result-dir", "r",
      "--grid-prefix", "p"], "one arm"),
    (["--mode", "serve", "--result-dir", "r"], "needs --concurrency-grid"),
])
def test_grid_argument_errors(argv, match, capsys):
    with pytest.raises(SystemExit) as exc:
        parse_args(argv)
    assert exc.value.code == 2 and match in capsys.readouterr().err


def test_child_bench_grid_marks_times_and_skips_over_budget(tmp_path):
    log = tmp_path / "server.log"
    fd = os.open(log, os.O_WRONLY | os.O_CREAT)
    ran = []

    def bench(argv):
        ran.append(argv[0])
        if argv[0] == "bad":
            raise SystemExit(2)
        return 0

    spec = {"points": [{"name": "p0", "argv": ["p0"], "estimate_s": 0.0},
                       {"name": "p1", "argv": ["bad"], "estimate_s": 0.0},
                       {"name": "p2", "argv": ["p2"], "estimate_s": 1e6},  # would end after the deadline
                       {"name": "p3", "argv": ["p3"], "estimate_s": 0.0}],
            "marker_fd": fd, "deadline": time.time() + 3600, "progress": str(tmp_path / "progress.jsonl")}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    try:
        assert child_bench_grid(str(tmp_path / "spec.json"), bench=bench) == 0
    finally:
        os.close(fd)
    assert ran == ["p0", "bad"]  # p2 over budget: it and everything after it skipped, never started
    prog = read_progress(tmp_path / "progress.jsonl")
    assert prog["p0"]["rc"] == 0 and prog["p0"]["start"] <= prog["p0"]["end"]
    assert prog["p1"]["rc"] == 1 and "SystemExit" in prog["p1"]["error"]
    assert "skipped" in prog["p2"] and "skipped" in prog["p3"]
    text = log.read_text()
    assert text.index(f"{GRID_POINT_START} p0") < text.index(f"{GRID_POINT_END} p0") < \
        text.index(f"{GRID_POINT_START} p1")
    assert "p2" not in text


def _gate_rec(t, counts, step):
    from moekern.gatelog import GateRecord

    return GateRecord(step=step, layer=0, expert_counts=counts, num_tokens=sum(counts) // 2, top_k=2,
                      phase="decode", time=t)


def test_serve_grid_whole_path_with_fake_server_and_bench(tmp_path, monkeypatch):
    """run_serve_grid_arm with a fake server, fake warm-up bench and a fake bench child (the real child loop,
    in process, with a fake bench): per-point result files with their moekern block, per-point JIT counts,
    then load_runs attaching each point's CV from the gate-log records inside its window; a second call
    resumes (runs nothing)."""
    from moekern.gatelog import write_records

    (tmp_path / "in").mkdir()
    args, ds = _grid_args(tmp_path / "in")
    args.grid_reps = 1
    args.gate_log_dir = tmp_path / "gl"
    args.num_arms = 1
    state = {"server_log": None, "cmds": [], "steps": 1, "env": None}
    # per dataset: a uniform (CV 0) or one-hot (CV sqrt(3)) load over 4 experts in that point's window
    loads = {"000_0.2000": [10, 10, 10, 10], "001_0.8000": [40, 0, 0, 0]}

    def fake_bench(argv):
        name = flag_value(argv, "--result-filename")
        ds_name = Path(flag_value(argv, "--dataset-path")).stem
        conc = int(flag_value(argv, "--max-concurrency"))
        now = time.time()
        recs = [_gate_rec(now + 1e-4 * k, loads[ds_name], state["steps"] + k) for k in range(3)]
        state["steps"] += 3
        write_records(Path(state["env"]["MOEKERN_GATE_LOG_DIR"]) / "gate_log.rank0.jsonl", recs)  # the plugin
        if conc == 32 and ds_name == "001_0.8000":  # this point compiles while measured
            state["server_log"].write(log_text(JIT_MOE_VERBOSE))
            state["server_log"].flush()
        time.sleep(0.01)
        Path(flag_value(argv, "--result-dir"), name).write_text(json.dumps(
            {"duration": 2.0, "completed": 64, "output_throughput": 100.0 * conc, "mean_tpot_ms": 5.0,
             "mean_ttft_ms": 20.0, "total_input_tokens": 640}))
        return 0

    def popen(cmd, stdout, **kw):
        state["cmds"].append(cmd)
        if cmd[:2] == ["vllm", "serve"]:
            state["server_log"] = stdout
            state["env"] = kw["env"]
            Path(kw["env"]["MOEKERN_GATE_LOG_DIR"]).mkdir(parents=True)  # the plugin's writer does this
            write_records(Path(kw["env"]["MOEKERN_GATE_LOG_DIR"]) / "gate_log.rank0.jsonl",  # start-up steps
                          [_gate_rec(time.time() - 50, [0, 0, 0, 80], 0)])
            stdout.write("INFO server up\n")
            stdout.flush()
            return FakeProc(rc=None)
        if "moekern.e2e.grid_child" in cmd:
            assert kw["pass_fds"] == (state["server_log"].fileno(),)
            rc = child_bench_grid(cmd[-1], bench=fake_bench)
            return FakeProc(rc)
        # the warm-up `vllm bench serve` (a compile there is not counted)
        state["server_log"].write(log_text(JIT_ATTN))
        state["server_log"].flush()
        Path(flag_value(cmd, "--result-dir"), flag_value(cmd, "--result-filename")).write_text(json.dumps(
            {"duration": 1.0, "output_throughput": 1.0}))
        return FakeProc()

    fake_server(monkeypatch, popen)
    out = tmp_path / "out"
    out.mkdir()
    r = run_serve_grid_arm(args, "moekern", out, deadline=time.time() + 3600)
    assert "error" not in r, r.get("error")
    warm = [c for c in state["cmds"] if c[:3] == ["vllm", "bench", "serve"]]
    assert len(warm) == 1 and flag_value(warm[0], "--max-concurrency") == "32"  # the largest concurrency
    assert len(r["points_written"]) == 4 and not r["points_skipped"] and not r["points_failed"]
    assert r["not_steady_points"] == ["moekern_s128_c32_d001_0.8000_r0"]
    gdir = Path(state["env"]["MOEKERN_GATE_LOG_DIR"])
    assert gdir.parent == tmp_path / "gl" and gdir.name.startswith("server_")
    res = json.loads((tmp_path / "in" / "runs" / "moekern_s128_c8_d001_0.8000_r0.json").read_text())
    m = res["moekern"]
    assert m["moe_backend"] == "moekern" and m["arm"] == "moekern" and m["max_num_seqs"] == 128
    assert m["max_concurrency"] == 8 and m["concurrency"] == 8 and m["rep"] == 0 and m["model"] == args.model
    assert m["dataset"] == "001_0.8000.jsonl" and m["predicted_score"] == 0.8
    assert m["dataset_path"] == str(ds[1]) and m["bench_start"] < m["bench_end"]
    assert m["gate_log_window"] == [m["bench_start"], m["bench_end"]] and m["steady_state"] is True
    assert m["jit_during_measurement"] == 0 and res["output_throughput"] == 800.0
    from moekern.analysis.serving.metrics import load_runs

    runs, skipped = load_runs(tmp_path / "in" / "runs")
    assert not skipped and len(runs) == 4
    for run in runs:
        want = 0.0 if "000_0.2000" in run.run_id else math.sqrt(3.0)
        assert run.measured_cv == pytest.approx(want, abs=1e-12), run.run_id
        assert run.extra["gate_log_steps"] == 3  # exactly this point's records
    n = len(state["cmds"])
    r2 = run_serve_grid_arm(args, "moekern", out, deadline=time.time() + 3600)
    assert r2["already_done"] == 4 and len(state["cmds"]) == n  # resumed: no server started


def test_serve_grid_budget_skips_points_without_half_writing(tmp_path, monkeypatch):
    args, _ = _grid_args(tmp_path)

    def popen(cmd, stdout, **kw):
        if cmd[:2] == ["vllm", "serve"]:
            return FakeProc(rc=None)
        if "moekern.e2e.grid_child" in cmd:
            spec = json.loads(Path(cmd[-1]).read_text())
            assert spec["deadline"] < time.time() + 100  # the budget's deadline reaches the child
            return FakeProc(child_bench_grid(cmd[-1], bench=lambda argv: 0 / 0))
        Path(flag_value(cmd, "--result-dir"), flag_value(cmd, "--result-filename")).write_text("{}")
        return FakeProc()

    fake_server(monkeypatch, popen)
    r = run_serve_grid_arm(args, "moekern", tmp_path / "out", deadline=time.time() + 5)
    # every point's estimate (>= 3 s overhead) would end after deadline - server stop: all skipped, none written
    assert len(r["points_skipped"]) == 8 and not r["points_written"]
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").glob("*"))


def test_serve_grid_falls_back_to_bench_subprocesses(tmp_path, monkeypatch):
    """The child exits 3 when vLLM's bench cannot be imported in process: the parent re-runs it with
    in_process false (one `vllm bench serve` per point)."""
    args, _ = _grid_args(tmp_path)
    seen = []

    def popen(cmd, stdout, **kw):
        if cmd[:2] == ["vllm", "serve"]:
            return FakeProc(rc=None)
        if "moekern.e2e.grid_child" in cmd:
            spec = json.loads(Path(cmd[-1]).read_text())
            seen.append(spec["in_process"])
            return FakeProc(3 if spec["in_process"] else 0)
        Path(flag_value(cmd, "--result-dir"), flag_value(cmd, "--result-filename")).write_text("{}")
        return FakeProc()

    fake_server(monkeypatch, popen)
    r = run_serve_grid_arm(args, "moekern", tmp_path / "out", deadline=time.time() + 3600)
    assert seen == [True, False] and r["bench_in_process"] is False
    # the child with in_process false and no vLLM on this machine: vllm bench serve argv per point
    spec = json.loads((tmp_path / "out" / "grid_moekern" / "grid.spec.json").read_text())
    assert spec["points"][0]["argv"][:2] == ["--backend", "vllm"] and "--max-concurrency" in spec["points"][0]["argv"]


# ---- routing skews inside one server ------------------------------------------------------------------------
SKEWS = "uniform=uniform,hot=hot:0:0.5"


def test_grid_points_with_skews_run_skew_blocks_in_order(tmp_path):
    args, _ = _grid_args(tmp_path, ["--skews", SKEWS])
    pts = grid_points(args, "moekern")
    assert len(pts) == 2 * 2 * 2 * 2  # reps x skews x datasets x concurrencies
    assert [(p["rep"], p["skew"][0], p["dataset"].stem, p["concurrency"]) for p in pts[:5]] == \
        [(0, "uniform", "000_0.2000", 8), (0, "uniform", "000_0.2000", 32), (0, "uniform", "001_0.8000", 8),
         (0, "uniform", "001_0.8000", 32), (0, "hot", "000_0.2000", 8)]
    assert pts[4]["name"] == "moekern_s128_khot_c8_d000_0.2000_r0" and pts[4]["skew"] == ("hot", "hot:0:0.5")
    assert len({p["name"] for p in pts}) == len(pts)
    assert "x 2 skew(s) ['uniform', 'hot']" in plan_text(args) and "16 benches per server" in plan_text(args)


@pytest.mark.parametrize("skews,match", [
    ("hot=hot:0:1.5", "hot fraction must be in (0, 1)"),
    ("hot", "expected NAME=SKEW items"),
    ("a b=uniform", "expected NAME=SKEW items"),
    ("u=uniform,u=zipf:1", "skew names must differ"),
    ("u=skewed", "must be 'uniform', 'zipf:<s>' or 'hot:<expert>:<fraction>'"),
])
def test_skews_argument_errors(skews, match, capsys):
    with pytest.raises(SystemExit) as exc:
        parse_args(["--mode", "serve", "--concurrency-grid", "8", "--result-dir", "r", "--skews", skews])
    assert exc.value.code == 2 and match in capsys.readouterr().err


def test_skews_need_a_serve_grid(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--mode", "serve", "--skews", "u=uniform"])
    assert "--skews belongs to a serve grid" in capsys.readouterr().err


def test_switch_skew_pauses_the_gate_log_around_the_switch():
    from moekern.e2e.grid_child import switch_skew

    sent = []

    def post(url, body):
        sent.append((url, body["method"], body["args"]))
        if body["method"] == "moekern_routing_skew":
            return {"results": [{"skew": "hot:0:0.5@1.0", "layers": 4, "biases_rewritten": 4}]}
        return {"results": [{"gate_log": body["args"] == ["true"], "steps": 9}]}

    assert switch_skew("http://h/collective_rpc", "hot:0:0.5", post=post) == "hot:0:0.5@1.0"
    assert sent == [("http://h/collective_rpc", "moekern_gate_log", ["false"]),
                    ("http://h/collective_rpc", "moekern_routing_skew", ["hot:0:0.5"]),
                    ("http://h/collective_rpc", "moekern_gate_log", ["true"])]

    def failing(url, body):
        sent.append(body["method"])
        if body["method"] == "moekern_routing_skew":
            raise OSError("HTTP Error 500: Internal Server Error")
        return {"results": [{}]}

    sent.clear()
    with pytest.raises(OSError, match="HTTP Error 500"):
        switch_skew("u", "hot:0:0.5", post=failing)
    assert sent == ["moekern_gate_log", "moekern_routing_skew", "moekern_gate_log"]  # resumed all the same
    two = lambda url, body: {"results": [{"skew": "uniform"}, {"skew": "hot:0:0.5@1.0"}]}  # noqa: E731
    with pytest.raises(RuntimeError, match="workers report skews"):
        switch_skew("u", "hot:0:0.5", post=two)
    with pytest.raises(RuntimeError, match="is the moekern plugin installed"):
        switch_skew("u", "hot:0:0.5", post=lambda url, body: None)


def test_child_switches_once_per_skew_block_and_fails_points_of_a_failed_switch(tmp_path):
    switched, ran = [], []

    def switch(url, skew):
        switched.append(skew)
        if skew == "zipf:bad" and switched.count(skew) == 1:
            raise RuntimeError("no such skew")
        return f"{skew}!"

    pts = [{"name": f"p{i}", "argv": [f"p{i}"], "estimate_s": 0.0, "skew": k}
           for i, k in enumerate(["uniform", "uniform", "zipf:bad", "zipf:bad", "hot:0:0.5"])]
    spec = {"points": pts, "deadline": time.time() + 3600, "progress": str(tmp_path / "progress.jsonl"),
            "rpc_url": "http://127.0.0.1:1/collective_rpc"}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    assert child_bench_grid(str(tmp_path / "spec.json"), bench=lambda argv: ran.append(argv[0]) or 0,
                            switch=switch) == 0
    # one switch per block; the failed block's first point fails, its next point tries the switch again
    assert switched == ["uniform", "zipf:bad", "zipf:bad", "hot:0:0.5"]
    assert ran == ["p0", "p1", "p3", "p4"]
    prog = read_progress(tmp_path / "progress.jsonl")
    assert prog["p2"]["rc"] == 1 and "skew switch to 'zipf:bad' failed: RuntimeError: no such skew" in prog["p2"]["error"]
    assert prog["p0"]["skew_in_force"] == prog["p1"]["skew_in_force"] == "uniform!"
    assert "skew_switch_s" in prog["p0"] and "skew_switch_s" not in prog["p1"]  # one switch per block
    assert prog["p1"]["skew"] == "uniform" and prog["p4"]["skew"] == "hot:0:0.5"


def test_serve_grid_with_skews_one_server_cards_and_both_cvs(tmp_path, monkeypatch):
    """The skew factor inside one server: started with the first skew and vLLM's dev endpoints, switched per
    block; every point's result names its skew and carries its window's CV by both of the study's methods,
    and a workload card lies beside it; a second call resumes."""
    import yaml
    from moekern.gatelog import write_records

    (tmp_path / "in").mkdir()
    args = ready_args(["--mode", "serve", "--arms", "vllm", "--concurrency-grid", "8", "--result-dir",
                       str(tmp_path / "in" / "runs"), "--serve-prompts", "16", "--output-len", "8",
                       "--max-num-batched-tokens", "4096", "--max-num-seqs", "16", "--skews",
                       "uniform=uniform,hot=hot:0:0.5", "--gate-log-dir", str(tmp_path / "gl")])
    state = {"cmds": [], "env": None, "log": None, "skew": None, "steps": 0}
    # per skew, two steps x two layers: uniform loads (CV 0) or one hot expert
    loads = {"uniform": [[10, 10, 10, 10], [10, 10, 10, 10]], "hot:0:0.5": [[40, 0, 0, 0], [25, 5, 5, 5]]}

    def switch(url, skew):
        assert url.endswith("/collective_rpc") and url.startswith("http://127.0.0.1:")
        state["skew"] = skew
        return skew

    def fake_bench(argv):
        from moekern.gatelog import GateRecord

        now = time.time()
        recs = [GateRecord(step=state["steps"] + s, layer=l, expert_counts=loads[state["skew"]][l],
                           num_tokens=20, top_k=2, phase="decode", time=now + 1e-4 * s)
                for s in range(2) for l in range(2)]
        state["steps"] += 2
        write_records(Path(state["env"]["MOEKERN_GATE_LOG_DIR"]) / "gate_log.rank0.jsonl", recs)
        time.sleep(0.01)
        Path(flag_value(argv, "--result-dir"), flag_value(argv, "--result-filename")).write_text(json.dumps(
            {"duration": 2.0, "completed": 16, "output_throughput": 50.0, "mean_tpot_ms": 5.0,
             "mean_ttft_ms": 20.0}))
        return 0

    def popen(cmd, stdout, **kw):
        state["cmds"].append(cmd)
        if cmd[:2] == ["vllm", "serve"]:
            state["env"] = kw["env"]
            Path(kw["env"]["MOEKERN_GATE_LOG_DIR"]).mkdir(parents=True)
            return FakeProc(rc=None)
        if "moekern.e2e.grid_child" in cmd:
            return FakeProc(child_bench_grid(cmd[-1], bench=fake_bench, switch=switch))
        Path(flag_value(cmd, "--result-dir"), flag_value(cmd, "--result-filename")).write_text("{}")
        return FakeProc()

    fake_server(monkeypatch, popen)
    out = tmp_path / "out"
    out.mkdir()
    r = run_serve_grid_arm(args, "vllm", out, deadline=time.time() + 3600)
    assert "error" not in r and len(r["points_written"]) == 2 and not r["points_failed"]
    assert sum(c[:2] == ["vllm", "serve"] for c in state["cmds"]) == 1  # one server for both skews
    assert state["env"]["MOEKERN_ROUTING_SKEW"] == "uniform" and state["env"]["VLLM_SERVER_DEV_MODE"] == "1"
    runs = tmp_path / "in" / "runs"
    hot = json.loads((runs / "vllm_s16_b4096_khot_c8_drandom_r0.json").read_text())["moekern"]
    uni = json.loads((runs / "vllm_s16_b4096_kuniform_c8_drandom_r0.json").read_text())["moekern"]
    assert (hot["routing_skew"], hot["routing_skew_spec"], hot["routing_skew_in_force"]) == \
        ("hot", "hot:0:0.5", "hot:0:0.5")
    assert uni["measured_cv_step"] == 0.0 and uni["measured_cv_agg"] == 0.0 and uni["gate_log_steps"] == 2
    # hot: per-step CVs sqrt(3) (layer 0) and std([25,5,5,5])/10 = sqrt(75)/10 (layer 1), averaged; aggregated:
    # the loads summed over steps and layers, [130, 10, 10, 10], one CV
    step = (math.sqrt(3.0) + math.sqrt(75.0) / 10.0) / 2
    agg = float(__import__("numpy").std([130, 10, 10, 10]) / 40.0)
    assert hot["measured_cv_step"] == pytest.approx(step) and hot["measured_cv_agg"] == pytest.approx(agg)
    card = yaml.safe_load((runs / "vllm_s16_b4096_khot_c8_drandom_r0.card.yaml").read_text())
    assert set(card) >= {"model", "framework", "parallelism", "knobs", "skew", "dataset", "gpu", "versions", "date"}
    assert card["knobs"]["max_num_seqs"] == 16 and card["knobs"]["max_num_batched_tokens"] == 4096
    assert card["knobs"]["client_max_concurrency"] == 8 and card["framework"]["moe_backend"] == "vllm"
    assert card["model"]["num_experts"] == 8 and card["model"]["top_k"] == 2 and card["dataset"]["name"] == "random"
    assert card["skew"]["name"] == "hot" and 1.1 < card["skew"]["expected_agg_cv_dummy_weights"] < 1.17
    assert card["measured"]["measured_cv_agg"] == pytest.approx(agg) and card["parallelism"]["tensor_parallel_size"] == 1
    from moekern.analysis.serving.metrics import load_runs

    loaded, skipped = load_runs(runs)
    assert not skipped and {x.routing_skew for x in loaded} == {"uniform", "hot"}
    assert {x.routing_skew: x.measured_cv_agg for x in loaded}["hot"] == pytest.approx(agg)
    n = len(state["cmds"])
    assert run_serve_grid_arm(args, "vllm", out, deadline=time.time() + 3600)["already_done"] == 2
    assert len(state["cmds"]) == n


def test_runner_stops_its_servers_on_sigterm(tmp_path):
    """moekern e2e turns SIGTERM (a sweep's timeout, `timeout` around a device stage) into SystemExit, so the
    `finally` that stops a server started in its own session runs."""
    import signal
    import subprocess
    import sys

    script = tmp_path / "r.py"
    script.write_text("import time\nfrom moekern.e2e.cli import stop_on_sigterm\nstop_on_sigterm()\n"
                      "try:\n    print('serving', flush=True)\n    time.sleep(30)\n"
                      "finally:\n    print('server stopped', flush=True)\n")
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert proc.stdout.readline().strip() == "serving"
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=20)
    assert out.strip() == "server stopped" and proc.returncode == 128 + signal.SIGTERM
