"""moekern e2e's flags without vLLM: argument parsing and its errors, the engine kwargs, the `vllm serve` and
`vllm bench serve` command lines built from them, dataset prompts, workload sizing and the plan, the --result
metadata the analysis groups by, the committed model configs, and the sweep example spec rendering commands
the runner accepts."""

import json
import sys
from pathlib import Path

import pytest
from e2e_fakes import dataset, ready_args, flag_value  # noqa: F401 (dataset: a fixture)

from moekern.e2e import cli
from moekern.e2e.args import parse_args
from moekern.e2e.arms import (CAPTURE_SIZES, arm_env, bench_command, capture_sizes, engine_kwargs, gate_log_dir,
                              serve_command)
from moekern.e2e.grid import grid_points, grid_prefix
from moekern.e2e.offline import offline_spec, read_dataset_prompts
from moekern.e2e.plan import FULL, MIN_PASS_S, QUICK, Workload, offline_pass_s, plan_seconds, plan_text, serve_run_s
from moekern.e2e.results import copy_moe_configs, write_result

REPO = Path(__file__).resolve().parents[1]


def test_defaults_keep_the_legacy_engine():
    args = ready_args(["--quick", "--mode", "serve"])
    assert (args.max_num_seqs, args.max_num_batched_tokens, args.tensor_parallel_size) == (128, None, 1)
    assert not args.enable_eplb and args.dataset is None and args.result is None
    kw = engine_kwargs(args, "vllm")
    assert kw["compilation_config"] == {"cudagraph_capture_sizes": CAPTURE_SIZES}
    assert not {"max_num_batched_tokens", "enable_eplb", "enable_expert_parallel", "tensor_parallel_size"} & set(kw)
    cmd = serve_command(kw, 8123)
    assert cmd[:8] == ["vllm", "serve", "/models/m", "--host", "127.0.0.1", "--port", "8123", "--load-format"]
    assert flag_value(cmd, "--max-num-seqs") == "128" and flag_value(cmd, "--seed") == "0"
    assert json.loads(flag_value(cmd, "--compilation-config")) == {"cudagraph_capture_sizes": CAPTURE_SIZES}
    assert "--enable-eplb" not in cmd and "--moe-backend" not in cmd
    assert flag_value(serve_command(engine_kwargs(args, "flashinfer"), 1), "--moe-backend") == "flashinfer_cutlass"


def test_sweep_flags_reach_engine_and_serve():
    args = ready_args(["--mode", "serve", "--arms", "moekern", "--max-num-seqs", "8",
                        "--max-num-batched-tokens", "4096", "--enable-eplb", "--tensor-parallel-size", "2"])
    kw = engine_kwargs(args, "moekern")
    assert kw["max_num_seqs"] == 8 and kw["max_num_batched_tokens"] == 4096 and kw["tensor_parallel_size"] == 2
    assert kw["enable_eplb"] is True and kw["enable_expert_parallel"] is True
    assert kw["compilation_config"]["cudagraph_capture_sizes"] == [1, 2, 4, 8]
    cmd = serve_command(kw, 1)
    assert flag_value(cmd, "--max-num-seqs") == "8" and flag_value(cmd, "--max-num-batched-tokens") == "4096"
    assert flag_value(cmd, "--tensor-parallel-size") == "2"
    # boolean engine flags are bare switches
    assert cmd[cmd.index("--enable-eplb") + 1].startswith("--") and "--enable-expert-parallel" in cmd
    assert capture_sizes(100) == [1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 100]
    with pytest.raises(ValueError, match="no vllm serve flag"):
        serve_command({**kw, "swap_space": 4}, 1)
    # expert parallelism without EPLB: its own flag, and in the grid's result-name prefix
    args = ready_args(["--mode", "serve", "--arms", "moekern", "--enable-expert-parallel", "--tensor-parallel-size", "2"])
    kw = engine_kwargs(args, "moekern")
    assert kw["enable_expert_parallel"] is True and "enable_eplb" not in kw
    cmd = serve_command(kw, 1)
    assert "--enable-expert-parallel" in cmd and "--enable-eplb" not in cmd
    assert grid_prefix(args, "moekern") == "moekern_s128_tp2_ep"


def test_bench_command_random_and_dataset(dataset, tmp_path):
    args = ready_args(["--quick", "--mode", "serve"])
    cmd = bench_command(args, 9000, tmp_path, "r.json")
    assert flag_value(cmd, "--dataset-name") == "random" and flag_value(cmd, "--random-input-len") == "256"
    assert flag_value(cmd, "--base-url") == "http://127.0.0.1:9000" and flag_value(cmd, "--result-filename") == "r.json"
    args = ready_args(["--quick", "--mode", "serve", "--dataset", str(dataset), "--serve-prompts", "7"])
    cmd = bench_command(args, 9000, tmp_path, "r.json")
    assert flag_value(cmd, "--dataset-name") == "custom" and flag_value(cmd, "--dataset-path") == str(dataset)
    assert flag_value(cmd, "--custom-output-len") == str(QUICK.output_len) and "--skip-chat-template" in cmd
    assert "--random-input-len" not in cmd and flag_value(cmd, "--num-prompts") == "7" and "--ignore-eos" in cmd


def test_dataset_prompts_offline(dataset, tmp_path):
    encode = lambda text: [1] + [ord(c) for c in text]  # noqa: E731  a BOS plus one id per character
    ids = read_dataset_prompts(dataset, encode, 5)
    assert ids == [[1, 97, 98], [1, 99, 100, 101], [1, 102], [1, 97, 98], [1, 99, 100, 101]]  # cycled
    args = ready_args(["--quick", "--mode", "offline", "--dataset", str(dataset)])
    spec = offline_spec(args, "vllm", tmp_path / "r.json", ids)
    assert spec["prompt_token_ids"] == ids and spec["num_prompts"] == 5 and spec["engine"]["max_num_seqs"] == 128
    assert "prompt_token_ids" not in offline_spec(args, "vllm", tmp_path / "r.json")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"text": "no prompt"}\n')
    with pytest.raises(ValueError, match="line 2"):
        read_dataset_prompts(bad, encode, 2)
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="no prompts"):
        read_dataset_prompts(tmp_path / "empty.jsonl", encode, 2)


@pytest.mark.parametrize("argv, match", [
    (["--enable-eplb", "--mode", "serve"], "tensor-parallel-size"),
    (["--enable-expert-parallel"], "enable-expert-parallel needs --tensor-parallel-size"),
    (["--result", "r.json"], "--mode serve"),
    (["--result", "r.json", "--mode", "serve", "--arms", "vllm,moekern"], "one arm"),
    (["--arms", "nope"], "unknown arm"),
    (["--max-num-seqs", "0"], "max-num-seqs=0"),
    (["--dataset", "/nonexistent/x.jsonl"], "not a file"),
])
def test_bad_arguments(argv, match, capsys):
    with pytest.raises(SystemExit) as exc:
        parse_args(argv)
    assert exc.value.code == 2 and match in capsys.readouterr().err


def test_gate_log_dir_and_env(tmp_path, monkeypatch):
    out = tmp_path / "out"
    one = ready_args(["--mode", "serve", "--arms", "vllm", "--gate-log-dir", str(tmp_path / "g")])
    assert gate_log_dir(one, "vllm", out) == tmp_path / "g"
    many = ready_args(["--mode", "offline", "--gate-log-dir", str(tmp_path / "g")])
    assert gate_log_dir(many, "vllm", out) == tmp_path / "g" / "vllm"
    plain = ready_args(["--mode", "offline"])
    assert gate_log_dir(plain, "vllm", out) is None
    assert gate_log_dir(plain, "moekern-routing-log", out) == out / "gate_logs" / "moekern-routing-log"
    env = arm_env("moekern", out, tmp_path / "g", base_env={"MOEKERN_KERNELS": "all", "MOEKERN_X": "1",
                                                                "PATH": "/bin"})
    assert env["MOEKERN_KERNELS"] == "all" and "MOEKERN_X" not in env and env["PATH"] == "/bin"
    assert env["MOEKERN_GATE_LOG_DIR"] == str(tmp_path / "g") and env["VLLM_USE_FLASHINFER_SAMPLER"] == "0"
    assert "MOEKERN_GATE_LOG_DIR" not in arm_env("vllm", out, None, base_env={"MOEKERN_GATE_LOG_DIR": "x"})


def test_result_metadata_is_what_the_analysis_groups_by(dataset, tmp_path):
    from moekern.analysis.serving.metrics import GROUP_KEYS, load_runs

    res = tmp_path / "runs" / "p.json"
    gdir = tmp_path / "gate_logs" / "p"
    gdir.mkdir(parents=True)
    (gdir / "gate_log.rank0.jsonl").write_text(json.dumps(
        {"schema": "moekern.gatelog/1", "step": 0, "layer": 0, "num_tokens": 4, "top_k": 2,
         "expert_counts": [6, 2, 0, 0]}) + "\n")
    args = ready_args(["--mode", "serve", "--arms", "moekern", "--max-num-seqs", "16", "--max-num-batched-tokens",
                        "8192", "--dataset", str(dataset), "--result", str(res), "--gate-log-dir", str(gdir)])
    bench = tmp_path / "serve_moekern.bench.json"
    bench.write_text(json.dumps({"backend": "vllm", "mean_tpot_ms": 12.0, "output_throughput": 900.0,
                                 "duration": 2.0, "total_input_tokens": 100}))
    write_result(args, "moekern", bench, gdir)
    meta = json.loads(res.read_text())["moekern"]
    assert meta["gate_log"] == "../gate_logs/p" and meta["dataset"] == dataset.name
    runs, skipped = load_runs(tmp_path / "runs")
    assert not skipped and len(runs) == 1
    r = runs[0]
    assert {k: getattr(r, k) for k in GROUP_KEYS} == {"moe_backend": "moekern", "max_num_seqs": 16,
                                                      "max_num_batched_tokens": 8192, "eplb": False}
    assert r.predicted_score == pytest.approx(0.4125) and r.metrics["mean_tpot_ms"] == 12.0
    assert r.measured_cv is not None  # the gate log was found through the relative path


def test_sweep_example_renders_the_real_command(dataset, capsys):
    """Every point of analysis/specs/sweep_example.yaml is a command `moekern e2e` accepts, with the point's
    values in the engine it would start."""
    from moekern.analysis.study.sweep import load_spec, plan
    from moekern.analysis.study.sweep_run import run_sweep

    spec = load_spec(REPO / "analysis" / "specs" / "sweep_example.yaml")
    assert spec.collect is None
    spec.grid["dataset"] = [str(dataset)]  # the spec's glob points at generated datasets, absent here
    points = plan(spec)
    assert len(points) == 2 * 4 * 4 * 2
    for p in points[::7] + [points[-1]]:
        assert p.command[:3] == ["python", "-m", "moekern.e2e"]
        args = ready_args(p.command[3:])
        kw = engine_kwargs(args, p.params["backend"])
        assert args.arm_plan == {"serve": [p.params["backend"]]}
        assert kw["max_num_seqs"] == p.params["max_num_seqs"]
        assert kw["max_num_batched_tokens"] == p.params["max_num_batched_tokens"]
        assert kw.get("enable_eplb", False) is p.params["eplb"] and kw["tensor_parallel_size"] == 2
        assert args.result == p.result and args.gate_log_dir == p.gate_log_dir and args.dataset == dataset
    spec.out_dir = Path("/nonexistent/sweep")  # dry run: prints, touches nothing
    run_sweep(spec, dry_run=True)
    out = capsys.readouterr().out
    assert f"[todo] {points[0].run_id}: python -m moekern.e2e --model" in out
    assert f"--result /nonexistent/sweep/runs/{points[0].run_id}.json" in out
    assert out.count("python -m moekern.e2e --model mixtral-8x7b-4l --mode serve --arms") == len(points)


def test_imbalance_grid_spec_renders_real_commands(capsys):
    """analysis/specs/imbalance_grid.yaml (issue 31): 48 servers, knob point outermost, each a `moekern e2e`
    command with the point's knobs and backend, the three skews inside it, and 3 expected result files."""
    from moekern.analysis.study.sweep import load_spec, plan
    from moekern.analysis.study.sweep_run import run_sweep

    spec = load_spec(REPO / "analysis" / "specs" / "imbalance_grid.yaml")
    points = plan(spec)
    assert len(points) == 48 and sum(len(p.expected) for p in points) == 144
    assert [p.params["backend"] for p in points[:3]] == ["vllm", "moekern", "flashinfer"]
    assert {p.params["max_num_seqs"] for p in points[:3]} == {8}
    first = {(p.params["max_num_seqs"], p.params["max_num_batched_tokens"]) for p in points[:24]}
    assert first == {(8, 2048), (8, 4096), (16, 4096), (16, 8192), (32, 8192), (32, 16384), (64, 16384),
                     (64, 2048)}  # half_first: level i of max_num_seqs with levels i, i+1 (mod 4) of the other
    for p in points[::5] + [points[-1]]:
        args = ready_args([a.replace("__budget_left_s__", "400") for a in p.command[3:]])
        kw = engine_kwargs(args, p.params["backend"])
        assert kw["max_num_seqs"] == p.params["max_num_seqs"] and kw["max_model_len"] == 4096
        assert kw["max_num_batched_tokens"] == p.params["max_num_batched_tokens"]
        assert args.skews == [("uniform", "uniform"), ("moderate", "hot:0:0.05"), ("hot", "hot:0:0.5")]
        assert args.concurrency_grid == [64] and args.budget_s == 400 and args.dummy_router_seed == 0
        assert sorted(pt["result"] for pt in grid_points(args, p.params["backend"])) == sorted(p.expected)
    spec.out_dir = Path("/nonexistent/grid")
    run_sweep(spec, dry_run=True, budget_s=450)
    out = capsys.readouterr().out
    assert "48 points, 0 done" in out and out.count("--budget-s 450") == 48


def test_imbalance_grid_real_spec_renders_checkpoint_commands(dataset):
    """analysis/specs/imbalance_grid_real.yaml: the same grid on a real checkpoint, datasets per bench, no skew."""
    from moekern.analysis.study.sweep import load_spec, plan

    spec = load_spec(REPO / "analysis" / "specs" / "imbalance_grid_real.yaml")
    assert spec.datasets["num"] == 50 and spec.bench_grid["skews"] is None
    spec.bench_grid["dataset"] = [str(dataset)]  # the generated datasets are absent here
    points = plan(spec)
    assert len(points) == 48
    for p in (points[0], points[-1]):
        args = ready_args([a.replace("__budget_left_s__", "400") for a in p.command[3:]])
        args.model_dir = Path(p.command[p.command.index("--model-dir") + 1])
        kw = engine_kwargs(args, p.params["backend"])
        assert kw["load_format"] == "auto" and kw["model"] == "/models/Mixtral-8x7B-v0.1"
        assert args.skews is None and args.dummy_router_seed is None and args.datasets == [dataset]


def test_sweep_keeps_runner_metadata(tmp_path):
    """A runner's own 'moekern' block (moekern e2e --result) survives the sweep's annotation, which adds only
    the keys it lacks."""
    from moekern.analysis.study.sweep import load_spec
    from moekern.analysis.study.sweep_run import run_sweep

    (tmp_path / "r.py").write_text(
        "import json, sys, pathlib\n"
        "pathlib.Path(sys.argv[1]).write_text(json.dumps({'mean_tpot_ms': 5.0, "
        "'moekern': {'moe_backend': 'moekern', 'max_num_seqs': 99}}))\n")
    spec = tmp_path / "s.yaml"
    spec.write_text(f'command: "{sys.executable} r.py {{result}}"\ngrid: {{backend: [vllm], max_num_seqs: [8]}}\n')
    sp = load_spec(spec)
    assert run_sweep(sp, progress=False)["ran"] == 1
    meta = json.loads(next((sp.out_dir / "runs").glob("*.json")).read_text())["moekern"]
    assert meta["moe_backend"] == "moekern" and meta["max_num_seqs"] == 99  # the runner's values win
    assert meta["run_id"] == "vllm_s8" and meta["sweep"] == "s"


@pytest.mark.parametrize("name", ["mixtral-8x7b-4l", "qwen3-30b-a3b-8l", "qwen3-30b-a3b-48l", "olmoe-1b-7b",
                                  "deepseek-v2-lite-8l", "deepseek-v3-2l"])
def test_committed_configs_are_current_and_load(name):
    """moekern/e2e/configs/*/config.json are what make_configs.py writes today (hf_config of the registry
    for the registry models), and transformers reads them with the registry's shapes."""
    transformers = pytest.importorskip("transformers")
    from moekern.e2e import make_configs

    from moekern.models import get_model, hf_config

    path = REPO / "moekern" / "e2e" / "configs" / name / "config.json"
    committed = json.loads(path.read_text())
    assert committed == json.loads(json.dumps(make_configs.config_for(name))), "re-run make_configs.py"
    key, layers, _ = make_configs.MODELS[name]
    hf = transformers.AutoConfig.from_pretrained(str(path.parent))
    assert hf.num_hidden_layers == layers and hf.num_experts_per_tok == committed["num_experts_per_tok"]
    if key is not None:
        spec = get_model(key)
        ref = hf_config(spec, num_layers=layers)
        assert {k: v for k, v in committed.items() if k != "_moekern_note"} == \
            {k: v for k, v in json.loads(json.dumps(ref)).items() if k != "_moekern_note"}
        assert hf.hidden_size == spec.hidden_size and hf.vocab_size == spec.vocab_size
        assert hf.num_experts_per_tok == spec.top_k


def test_gpuenv_fixup_patches_flash_attn_raise_once(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpuenv_fixups", REPO / "tools" / "gpu" / "gpuenv_fixups.py")
    fix = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fix)
    pkg = tmp_path / "vllm" / "vllm_flash_attn"
    pkg.mkdir(parents=True)
    init = pkg / "__init__.py"
    init.write_text("FA2_AVAILABLE = FA3_AVAILABLE = False\n" + fix.FA_RAISE + '\n        "no FA"\n    )\nOK = 1\n')
    with pytest.raises(ImportError):
        exec(init.read_text(), {})
    assert fix.patch_flash_attn(tmp_path).startswith("patched")
    ns: dict = {}
    exec(init.read_text(), ns)  # imports cleanly now
    assert ns["OK"] == 1
    assert fix.patch_flash_attn(tmp_path).startswith("already patched")
    assert fix.patch_flash_attn(tmp_path / "missing").startswith("skip")


def test_quick_workload_sizing():
    """--quick: one timed pass >= MIN_PASS_S at the first run's steady rates, a 4-arm offline call and a
    2-arm serve call within ~8 minutes, a 3-arm serve call within the 570 s GPU command timeout; and the
    rates reproduce the first run's fastest offline pass (0.497 s for 128 x (256 + 64))."""
    q = QUICK
    assert 3 <= q.reps <= 5 and q.warmup_reps >= 1 and q.serve_reps >= 1
    assert offline_pass_s(q) >= MIN_PASS_S and serve_run_s(q, 64) >= MIN_PASS_S
    assert plan_seconds(q, "offline", 4) <= 8.5 * 60
    assert plan_seconds(q, "serve", 2) <= 8 * 60 and plan_seconds(q, "serve", 3) <= 570
    first = Workload(num_prompts=128, serve_prompts=128, input_len=256, output_len=64, reps=5, serve_reps=1,
                         warmup_reps=0)
    res = REPO / "benchmarks" / "results" / "e2e" / "h100-2026-11-23" / "offline" / "e2e_mixtral-8x7b-4l.json"
    measured = 0.497
    if res.exists():
        measured = min(r["seconds"] for r in json.loads(res.read_text())["offline"]["vllm"]["runs"])
    assert offline_pass_s(first) == pytest.approx(measured, rel=0.15)
    args = parse_args(["--quick", "--mode", "offline"])
    assert args.workload == q and (args.num_prompts, args.reps, args.warmup_reps) == (512, 5, 1)
    args = parse_args(["--mode", "serve", "--serve-reps", "1", "--warmup-reps", "0", "--input-len", "64"])
    assert args.workload == Workload(num_prompts=FULL.num_prompts, serve_prompts=FULL.serve_prompts,
                                         input_len=64, output_len=FULL.output_len, reps=FULL.reps,
                                         serve_reps=1, warmup_reps=0)
    with pytest.raises(ValueError, match="mode='both'"):
        plan_seconds(q, "both", 1)


def test_plan_text_warns_over_budget():
    args = parse_args(["--quick", "--mode", "both", "--arms", "vllm,moekern"])
    text = plan_text(args)
    assert text.count("plan ") == 2 and "1 warm-up + 5 timed passes" in text and "1 warm-up + 2 timed runs" in text
    assert "warning" not in text
    args = parse_args(["--mode", "offline", "--budget-s", "100"])
    assert "exceeds --budget-s 100" in plan_text(args)


@pytest.mark.parametrize("argv, match", [
    (["--reps", "0"], "--reps=0 must be >= 1"),
    (["--serve-reps", "0"], "--serve-reps=0 must be >= 1"),
    (["--warmup-reps", "-1"], "--warmup-reps=-1 must be >= 0"),
    (["--num-prompts", "0"], "--num-prompts=0 must be >= 1"),
    (["--concurrency", "0"], "--concurrency=0 must be >= 1"),
    (["--input-len", "2000", "--output-len", "100"], "must be <= --max-model-len 2048"),
])
def test_bad_workload_arguments(argv, match, capsys):
    with pytest.raises(SystemExit) as exc:
        parse_args(["--quick"] + argv)
    assert exc.value.code == 2 and match in capsys.readouterr().err


def test_dummy_router_seed_reaches_every_arm(tmp_path):
    for arm in ("vllm", "moekern"):
        env = arm_env(arm, tmp_path, None, base_env={}, router_seed=5)
        assert env["MOEKERN_DUMMY_ROUTER_SEED"] == "5"
    assert "MOEKERN_DUMMY_ROUTER_SEED" not in arm_env("vllm", tmp_path, None, base_env={})
    args = parse_args(["--quick", "--dummy-router-seed", "3", "--out", str(tmp_path)])
    assert args.dummy_router_seed == 3
    with pytest.raises(SystemExit):
        parse_args(["--dummy-router-seed", "-1", "--out", str(tmp_path)])


def test_moe_configs_reach_every_arm_and_the_results(tmp_path, capsys):
    """--moe-configs: checked when parsed, passed to each arm as MOEKERN_MOE_CONFIGS (the parent's own MOEKERN_*
    never leak), and copied beside the results with the rows it lays over the tile table."""
    cfg = {"block_m": 64, "block_n": 128, "block_k": 64, "group_m": 1, "num_warps": 4, "num_stages": 3}
    rows = tmp_path / "tune.json"
    rows.write_text(json.dumps({"rows": [{"model": "mixtral", "M": 128, "E": 8, "I": 14336, "H": 4096,
                                          "today_us": 1300.0, "best": {"gemm1": cfg, "gemm2": cfg, "us": 1000.0}}]}))
    args = ready_args(["--mode", "offline", "--moe-configs", str(rows)])
    env = arm_env("moekern", tmp_path, None, base_env={"MOEKERN_MOE_CONFIGS": "/stale.json"},
                      moe_configs=args.moe_configs)
    assert env["MOEKERN_MOE_CONFIGS"] == str(rows)
    assert "MOEKERN_MOE_CONFIGS" not in arm_env("vllm", tmp_path, None, base_env={"MOEKERN_MOE_CONFIGS": "x"})
    record = copy_moe_configs(args.moe_configs, tmp_path / "out")
    assert record["rows"] == [[8, 14336, 4096, 128]]
    assert json.loads(Path(record["files"][0]["copy"]).read_text()) == json.loads(rows.read_text())
    assert copy_moe_configs(None, tmp_path / "out") is None
    broken = tmp_path / "broken.json"
    broken.write_text("{broken")
    with pytest.raises(SystemExit) as exc:
        parse_args(["--mode", "offline", "--moe-configs", str(broken)])
    assert exc.value.code == 2 and "MOEKERN_MOE_CONFIGS: cannot read tuned rows" in capsys.readouterr().err


def test_main_plan_only_prints_the_grid_estimate(tmp_path, capsys):
    ds = tmp_path / "000_0.5000.jsonl"
    ds.write_text(json.dumps({"prompt": "x", "prompt_len": 20}) + "\n")
    rc = cli.main(["--mode", "serve", "--arms", "vllm,moekern", "--concurrency-grid", "8,32,128", "--datasets",
                   str(ds), "--result-dir", str(tmp_path / "runs"), "--plan-only"])
    out = capsys.readouterr().out
    assert rc == 0 and "plan serve grid: 2 arm(s)" in out and "min in all with preflight" in out
    assert not (tmp_path / "runs").exists()
