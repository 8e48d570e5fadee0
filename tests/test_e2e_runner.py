"""benchmarks/e2e/run_e2e.py without vLLM: argument parsing, the engine kwargs, the `vllm serve` and `vllm
bench serve` command lines it builds, dataset prompts, the --result metadata the analysis groups by, and the
sweep example spec rendering commands the runner accepts."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
E2E = REPO / "benchmarks" / "e2e"


@pytest.fixture(scope="module")
def e2e():
    spec = importlib.util.spec_from_file_location("run_e2e", E2E / "run_e2e.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture
def dataset(tmp_path):
    p = tmp_path / "003_0.4125.jsonl"
    p.write_text("\n".join(json.dumps({"prompt": t, "domain": "x"}) for t in ("ab", "cde", "f")) + "\n")
    return p


def _ready(e2e, argv):
    """parse_args plus the model dir main() would set, without copying files."""
    args = e2e.parse_args(argv)
    args.model_dir = Path("/models/m")
    return args


def _flag(cmd, name):
    return cmd[cmd.index(name) + 1]


def test_defaults_keep_the_legacy_engine(e2e):
    args = _ready(e2e, ["--quick", "--mode", "serve"])
    assert (args.max_num_seqs, args.max_num_batched_tokens, args.tensor_parallel_size) == (128, None, 1)
    assert not args.enable_eplb and args.dataset is None and args.result is None
    kw = e2e.engine_kwargs(args, "vllm")
    assert kw["compilation_config"] == {"cudagraph_capture_sizes": e2e.CAPTURE_SIZES}
    assert not {"max_num_batched_tokens", "enable_eplb", "enable_expert_parallel", "tensor_parallel_size"} & set(kw)
    cmd = e2e.serve_command(kw, 8123)
    assert cmd[:8] == ["vllm", "serve", "/models/m", "--host", "127.0.0.1", "--port", "8123", "--load-format"]
    assert _flag(cmd, "--max-num-seqs") == "128" and _flag(cmd, "--seed") == "0"
    assert json.loads(_flag(cmd, "--compilation-config")) == {"cudagraph_capture_sizes": e2e.CAPTURE_SIZES}
    assert "--enable-eplb" not in cmd and "--moe-backend" not in cmd
    assert _flag(e2e.serve_command(e2e.engine_kwargs(args, "flashinfer"), 1), "--moe-backend") == "flashinfer_cutlass"


def test_sweep_flags_reach_engine_and_serve(e2e):
    args = _ready(e2e, ["--mode", "serve", "--arms", "moekern", "--max-num-seqs", "8",
                        "--max-num-batched-tokens", "4096", "--enable-eplb", "--tensor-parallel-size", "2"])
    kw = e2e.engine_kwargs(args, "moekern")
    assert kw["max_num_seqs"] == 8 and kw["max_num_batched_tokens"] == 4096 and kw["tensor_parallel_size"] == 2
    assert kw["enable_eplb"] is True and kw["enable_expert_parallel"] is True
    assert kw["compilation_config"]["cudagraph_capture_sizes"] == [1, 2, 4, 8]
    cmd = e2e.serve_command(kw, 1)
    assert _flag(cmd, "--max-num-seqs") == "8" and _flag(cmd, "--max-num-batched-tokens") == "4096"
    assert _flag(cmd, "--tensor-parallel-size") == "2"
    # boolean engine flags are bare switches
    assert cmd[cmd.index("--enable-eplb") + 1].startswith("--") and "--enable-expert-parallel" in cmd
    assert e2e.capture_sizes(100) == [1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 100]
    with pytest.raises(ValueError, match="no vllm serve flag"):
        e2e.serve_command({**kw, "swap_space": 4}, 1)


def test_bench_command_random_and_dataset(e2e, dataset, tmp_path):
    args = _ready(e2e, ["--quick", "--mode", "serve"])
    cmd = e2e.bench_command(args, 9000, tmp_path, "r.json")
    assert _flag(cmd, "--dataset-name") == "random" and _flag(cmd, "--random-input-len") == "256"
    assert _flag(cmd, "--base-url") == "http://127.0.0.1:9000" and _flag(cmd, "--result-filename") == "r.json"
    args = _ready(e2e, ["--quick", "--mode", "serve", "--dataset", str(dataset), "--serve-prompts", "7"])
    cmd = e2e.bench_command(args, 9000, tmp_path, "r.json")
    assert _flag(cmd, "--dataset-name") == "custom" and _flag(cmd, "--dataset-path") == str(dataset)
    assert _flag(cmd, "--custom-output-len") == "64" and "--skip-chat-template" in cmd
    assert "--random-input-len" not in cmd and _flag(cmd, "--num-prompts") == "7" and "--ignore-eos" in cmd


def test_dataset_prompts_offline(e2e, dataset, tmp_path):
    encode = lambda text: [1] + [ord(c) for c in text]  # noqa: E731  a BOS plus one id per character
    ids = e2e.read_dataset_prompts(dataset, encode, 5)
    assert ids == [[1, 97, 98], [1, 99, 100, 101], [1, 102], [1, 97, 98], [1, 99, 100, 101]]  # cycled
    args = _ready(e2e, ["--quick", "--mode", "offline", "--dataset", str(dataset)])
    spec = e2e.offline_spec(args, "vllm", tmp_path / "r.json", ids)
    assert spec["prompt_token_ids"] == ids and spec["num_prompts"] == 5 and spec["engine"]["max_num_seqs"] == 128
    assert "prompt_token_ids" not in e2e.offline_spec(args, "vllm", tmp_path / "r.json")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"text": "no prompt"}\n')
    with pytest.raises(ValueError, match="line 2"):
        e2e.read_dataset_prompts(bad, encode, 2)
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="no prompts"):
        e2e.read_dataset_prompts(tmp_path / "empty.jsonl", encode, 2)


@pytest.mark.parametrize("argv, match", [
    (["--enable-eplb", "--mode", "serve"], "tensor-parallel-size"),
    (["--result", "r.json"], "--mode serve"),
    (["--result", "r.json", "--mode", "serve", "--arms", "vllm,moekern"], "one arm"),
    (["--arms", "nope"], "unknown arm"),
    (["--max-num-seqs", "0"], "max-num-seqs=0"),
    (["--dataset", "/nonexistent/x.jsonl"], "not a file"),
])
def test_bad_arguments(e2e, argv, match, capsys):
    with pytest.raises(SystemExit) as exc:
        e2e.parse_args(argv)
    assert exc.value.code == 2 and match in capsys.readouterr().err


def test_gate_log_dir_and_env(e2e, tmp_path, monkeypatch):
    out = tmp_path / "out"
    one = _ready(e2e, ["--mode", "serve", "--arms", "vllm", "--gate-log-dir", str(tmp_path / "g")])
    assert e2e.gate_log_dir(one, "vllm", out) == tmp_path / "g"
    many = _ready(e2e, ["--mode", "offline", "--gate-log-dir", str(tmp_path / "g")])
    assert e2e.gate_log_dir(many, "vllm", out) == tmp_path / "g" / "vllm"
    plain = _ready(e2e, ["--mode", "offline"])
    assert e2e.gate_log_dir(plain, "vllm", out) is None
    assert e2e.gate_log_dir(plain, "moekern-routing-log", out) == out / "gate_logs" / "moekern-routing-log"
    env = e2e.arm_env("moekern", out, tmp_path / "g", base_env={"MOEKERN_KERNELS": "all", "MOEKERN_X": "1",
                                                                "PATH": "/bin"})
    assert env["MOEKERN_KERNELS"] == "all" and "MOEKERN_X" not in env and env["PATH"] == "/bin"
    assert env["MOEKERN_GATE_LOG_DIR"] == str(tmp_path / "g") and env["VLLM_USE_FLASHINFER_SAMPLER"] == "0"
    assert "MOEKERN_GATE_LOG_DIR" not in e2e.arm_env("vllm", out, None, base_env={"MOEKERN_GATE_LOG_DIR": "x"})


def test_result_metadata_is_what_the_analysis_groups_by(e2e, dataset, tmp_path):
    from moekern.analysis.serving import GROUP_KEYS, load_runs

    res = tmp_path / "runs" / "p.json"
    gdir = tmp_path / "gate_logs" / "p"
    gdir.mkdir(parents=True)
    (gdir / "gate_log.rank0.jsonl").write_text(json.dumps(
        {"schema": "moekern.gatelog/1", "step": 0, "layer": 0, "num_tokens": 4, "top_k": 2,
         "expert_counts": [6, 2, 0, 0]}) + "\n")
    args = _ready(e2e, ["--mode", "serve", "--arms", "moekern", "--max-num-seqs", "16", "--max-num-batched-tokens",
                        "8192", "--dataset", str(dataset), "--result", str(res), "--gate-log-dir", str(gdir)])
    bench = tmp_path / "serve_moekern.bench.json"
    bench.write_text(json.dumps({"backend": "vllm", "mean_tpot_ms": 12.0, "output_throughput": 900.0,
                                 "duration": 2.0, "total_input_tokens": 100}))
    e2e.write_result(args, "moekern", bench, gdir)
    meta = json.loads(res.read_text())["moekern"]
    assert meta["gate_log"] == "../gate_logs/p" and meta["dataset"] == dataset.name
    runs, skipped = load_runs(tmp_path / "runs")
    assert not skipped and len(runs) == 1
    r = runs[0]
    assert {k: getattr(r, k) for k in GROUP_KEYS} == {"moe_backend": "moekern", "max_num_seqs": 16,
                                                      "max_num_batched_tokens": 8192, "eplb": False}
    assert r.predicted_score == pytest.approx(0.4125) and r.metrics["mean_tpot_ms"] == 12.0
    assert r.measured_cv is not None  # the gate log was found through the relative path


def test_sweep_example_renders_the_real_command(e2e, dataset, capsys):
    """Every point of analysis/specs/sweep_example.yaml is a command run_e2e.py accepts, with the point's
    values in the engine it would start."""
    from moekern.analysis.sweep import load_spec, plan, run_sweep

    spec = load_spec(REPO / "analysis" / "specs" / "sweep_example.yaml")
    assert spec.collect is None
    spec.grid["dataset"] = [str(dataset)]  # the spec's glob points at generated datasets, absent here
    points = plan(spec)
    assert len(points) == 2 * 4 * 4 * 2
    for p in points[::7] + [points[-1]]:
        script = (spec.base_dir / p.command[1]).resolve()
        assert script == (E2E / "run_e2e.py").resolve()
        args = _ready(e2e, p.command[2:])
        kw = e2e.engine_kwargs(args, p.params["backend"])
        assert args.arm_plan == {"serve": [p.params["backend"]]}
        assert kw["max_num_seqs"] == p.params["max_num_seqs"]
        assert kw["max_num_batched_tokens"] == p.params["max_num_batched_tokens"]
        assert kw.get("enable_eplb", False) is p.params["eplb"] and kw["tensor_parallel_size"] == 2
        assert args.result == p.result and args.gate_log_dir == p.gate_log_dir and args.dataset == dataset
    spec.out_dir = Path("/nonexistent/sweep")  # dry run: prints, touches nothing
    run_sweep(spec, dry_run=True)
    out = capsys.readouterr().out
    assert f"[todo] {points[0].run_id}: python ../../benchmarks/e2e/run_e2e.py" in out
    assert f"--result /nonexistent/sweep/runs/{points[0].run_id}.json" in out
    assert out.count("run_e2e.py --model mixtral-8x7b-4l --mode serve --arms") == len(points)


def test_sweep_keeps_runner_metadata(tmp_path):
    """A runner's own 'moekern' block (run_e2e --result) survives the sweep's annotation, which adds only
    the keys it lacks."""
    from moekern.analysis.sweep import load_spec, run_sweep

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


@pytest.mark.parametrize("name", ["mixtral-8x7b-4l", "qwen3-30b-a3b-8l", "olmoe-1b-7b", "deepseek-v2-lite-8l",
                                  "deepseek-v3-2l"])
def test_committed_configs_are_current_and_load(e2e, name):
    """benchmarks/e2e/configs/*/config.json are what make_configs.py writes today (hf_config of the registry
    for the registry models), and transformers reads them with the registry's shapes."""
    transformers = pytest.importorskip("transformers")
    import make_configs  # on sys.path through run_e2e

    from moekern.models import get_model, hf_config

    path = E2E / "configs" / name / "config.json"
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

    spec = importlib.util.spec_from_file_location("gpuenv_fixups", REPO / "benchmarks" / "gpuenv_fixups.py")
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


# ---- preflight (benchmarks/e2e/preflight.py) and the runner's use of it -------------------------------------
VLLM_REF = Path(__import__("os").environ.get("MOEKERN_VLLM_REF", "/work/ref/vllm"))


@pytest.fixture(scope="module")
def pf():
    spec = importlib.util.spec_from_file_location("moekern_e2e_preflight", E2E / "preflight.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclass looks its module up there
    spec.loader.exec_module(mod)
    yield mod
    sys.modules.pop(spec.name, None)


def _ref_def(module: str, qualname: str):
    """(ast node, source text) of `qualname` in the vLLM 0.26 source tree VLLM_REF (the `vllm` package dir)."""
    import ast

    rel = module.split(".", 1)[1].replace(".", "/") if "." in module else ""
    path = VLLM_REF / (rel + ".py")
    if not path.exists():
        path = VLLM_REF / rel / "__init__.py"
    text = path.read_text()
    node = ast.parse(text)
    for part in qualname.split("."):
        node = next((n for n in ast.iter_child_nodes(node) if isinstance(n, (ast.ClassDef, ast.FunctionDef))
                     and n.name == part), None)
        assert node is not None, f"{qualname} not found in {path}"
    return node, ast.get_source_segment(text, node)


@pytest.mark.skipif(not VLLM_REF.is_dir(), reason="vLLM 0.26 source not at MOEKERN_VLLM_REF")
def test_preflight_expectations_match_vllm_026_source(pf):
    """The signatures and source facts the preflight asserts on the GPU machine hold in vLLM 0.26's source,
    so a preflight FAIL there means a different vLLM, not a wrong expectation."""
    for module, qualname, positional, keyword_only in pf.SIGNATURES:
        node, _ = _ref_def(module, qualname)
        a = node.args
        pos = [x.arg for x in a.posonlyargs + a.args]
        assert pos[: len(positional)] == positional, (qualname, pos)
        assert set(keyword_only) <= {x.arg for x in a.kwonlyargs}, (qualname, [x.arg for x in a.kwonlyargs])
    for module, qualname, needles in pf.SOURCE_FACTS:
        _, src = _ref_def(module, qualname)
        assert all(n in src for n in needles), (qualname, [n for n in needles if n not in src])
    # our own call sites use exactly these shapes
    from moekern.vllm import hooks
    import inspect

    assert "def _compute_routing(hidden_states, router_logits, indices_type, *, input_ids=None)" in \
        inspect.getsource(hooks._on_layer_registered)


def test_check_signature_and_resolve(pf):
    def f(self, a, b, *, c=None):
        pass

    assert pf.check_signature(f, ["self", "a"], ["c"]).endswith(".f(self, a, b, *, c=None)")
    with pytest.raises(AssertionError, match=r"expected positional parameters \['self', 'b'\], got \['self', 'a', 'b'\]"):
        pf.check_signature(f, ["self", "b"])
    with pytest.raises(AssertionError, match=r"keyword-only \['d'\]"):
        pf.check_signature(f, ["self"], ["d"])
    assert pf.check_signature(lambda self, **kw: None, ["self"], ["anything"])  # **kwargs accepts it
    assert pf.resolve("json", "decoder.JSONDecoder.decode") is json.decoder.JSONDecoder.decode
    with pytest.raises(AssertionError, match="no attribute 'nope'"):
        pf.resolve("json", "decoder.nope")
    pf.source_has(test_check_signature_and_resolve, "pf.resolve(")
    with pytest.raises(AssertionError, match="lacks"):
        pf.source_has(test_check_signature_and_resolve, "not" + "-there")


def test_run_checks_and_report(pf, capsys):
    def boom():
        raise RuntimeError("kaput")

    def skip():
        raise pf.Skip("no CUDA device")

    res = pf.run_checks([("a", lambda: "fine"), ("b", skip), ("c", boom), ("d", lambda: "x")])
    assert [(r.name, r.status) for r in res] == [("a", "PASS"), ("b", "SKIP"), ("c", "FAIL"), ("d", "PASS")]
    assert res[2].detail.startswith("RuntimeError: kaput (at ")
    assert pf.report(res) == 1
    out = capsys.readouterr().out
    assert "FAIL c: RuntimeError: kaput" in out and "preflight: 2 pass, 1 fail, 1 skip" in out
    assert pf.failures(out) == [res[2].line()]
    res = pf.run_checks([("root", boom), ("x", lambda: "never")], {"root": "root is down"})
    assert [(r.status, r.detail) for r in res][1] == ("SKIP", "root is down")
    assert pf.report(pf.run_checks([("a", lambda: None), ("b", skip)])) == 0


def test_preflight_args(pf, capsys):
    a = pf.parse_args([])
    assert a.arms == ["vllm", "flashinfer", "moekern-routing", "moekern-routing-log", "moekern"] and a.mode == "offline"
    with pytest.raises(SystemExit) as e:
        pf.parse_args(["--arms", "vllm,fast"])
    assert e.value.code == 2 and "unknown arm(s) ['fast']" in capsys.readouterr().err
    checks, _ = pf.build_checks(pf.parse_args(["--arms", "vllm", "--mode", "offline"]))
    names = [n for n, _ in checks]
    assert names[0] == "vllm imports" and not any("serve" in n or "FlashInfer" in n for n in names)
    assert "signature BaseRouter._compute_routing" in names and "source MoERunner.__init__" in names
    checks, _ = pf.build_checks(pf.parse_args(["--arms", "flashinfer,moekern", "--mode", "both"]))
    names = [n for n, _ in checks]
    assert {"`vllm serve` command line parses", "`vllm bench serve` command line parses",
            "FlashInfer CUTLASS MoE available (flashinfer arm)", "moekern.fused_moe on the GPU (MOEKERN_KERNELS=all)"} <= set(names)


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vllm is installed here")
def test_preflight_without_vllm_fails_first_and_skips_the_rest(pf, capsys):
    assert pf.main(["--arms", "vllm,moekern"]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("FAIL vllm imports: ModuleNotFoundError")
    body = [l for l in lines[1:] if l.startswith(("PASS", "FAIL", "SKIP"))]
    assert body and all(l.startswith("SKIP ") and l.endswith("vllm is not importable") for l in body)


class _Proc:
    def __init__(self, rc, out):
        self.returncode, self.stdout, self.stderr = rc, out, ""


def test_run_preflight_reports_failures(e2e):
    args = e2e.parse_args(["--quick", "--mode", "both", "--arms", "vllm,moekern"])
    cmd = e2e.preflight_command(args)
    assert cmd[1].endswith("benchmarks/e2e/preflight.py")
    assert cmd[2:] == ["--arms", "vllm,moekern", "--mode", "both", "--model", "mixtral-8x7b-4l"]
    seen = {}

    def run(cmd, **kw):
        seen.update(kw)
        return _Proc(1, "PASS a\nFAIL b: gone\npreflight: 1 pass, 1 fail, 0 skip\n")

    ok, text = e2e.run_preflight(args, run=run)
    assert not ok and "FAIL b: gone" in text
    assert seen["env"]["MOEKERN_KERNELS"] == "off" and seen["timeout"] > 0
    ok, text = e2e.run_preflight(args, run=lambda cmd, **kw: _Proc(139, "Segmentation fault\n"))
    assert not ok and text.splitlines()[-1] == "FAIL preflight: exited 139 without a report"

    def slow(cmd, **kw):
        raise e2e.subprocess.TimeoutExpired(cmd, kw["timeout"])

    ok, text = e2e.run_preflight(args, run=slow, timeout=5)
    assert not ok and text.startswith("FAIL preflight: timed out after 5s")
    assert e2e.run_preflight(args, run=lambda cmd, **kw: _Proc(0, "PASS a\n")) == (True, "PASS a\n")


def test_main_refuses_arms_when_preflight_fails(e2e, tmp_path, monkeypatch, capsys):
    started = []
    monkeypatch.setattr(e2e, "run_offline_arm", lambda args, arm, out, extra_spec=None: started.append(arm) or
                        {"arm": arm, "rc": 0, "output_tok_s": 1.0})
    monkeypatch.setattr(e2e, "run_preflight", lambda args: (False, "PASS a\nFAIL vllm imports: nope\n"))
    assert e2e.main(["--quick", "--mode", "offline", "--arms", "vllm", "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert started == [] and "preflight FAILED (1)" in err and "FAIL vllm imports: nope" in err
    assert (tmp_path / "preflight.log").read_text().startswith("PASS a")

    def must_not_run(args):
        raise AssertionError("preflight ran despite --no-preflight")

    monkeypatch.setattr(e2e, "run_preflight", must_not_run)
    assert e2e.main(["--quick", "--mode", "offline", "--arms", "vllm", "--out", str(tmp_path), "--no-preflight"]) == 0
    assert started == ["vllm"]
    monkeypatch.setattr(e2e, "run_preflight", lambda args: (True, "PASS a\n"))
    assert e2e.main(["--quick", "--mode", "offline", "--arms", "vllm", "--out", str(tmp_path)]) == 0
    assert started == ["vllm", "vllm"]


def test_plugin_check(e2e):
    layer = {"index": 0, "name": "model.layers.0.block_sparse_moe.experts", "router": "FusedTopKRouter",
             "moekern_routing": {"8": "FusedTopKRouter: softmax top-2"}, "moekern_experts": None}
    good = [{"installed": True, "kernels": "routing", "layers": [layer]}]
    assert e2e.plugin_check("vllm", "unavailable: NotImplementedError()") == {"ok": True, "why": "plugin off"}
    assert e2e.plugin_check("moekern-routing", good) == {"ok": True, "why": "1 MoE layer(s) on moekern routing"}
    bad = e2e.plugin_check("moekern-routing", "unavailable: TypeError('Object of type function ...')")
    assert not bad["ok"] and "no plugin summary" in bad["why"]
    fell_back = [{"installed": True, "kernels": "routing", "layers": [{**layer, "moekern_routing": {"8": None}}]}]
    assert "kept vLLM routing" in e2e.plugin_check("moekern-routing", fell_back)["why"]
    assert "no MoE layer hooked" in e2e.plugin_check("moekern-routing", [{"installed": True, "kernels": "routing",
                                                                         "layers": []}])["why"]
    all_mode = [{"installed": True, "kernels": "all", "layers": [layer]}]
    assert "kept vLLM experts" in e2e.plugin_check("moekern", all_mode)["why"]
    all_mode[0]["layers"][0] = {**layer, "moekern_experts": True}
    assert e2e.plugin_check("moekern", all_mode)["ok"]
    assert "kernels=routing" in e2e.plugin_check("moekern", good)["why"]  # the arm's env did not reach it
    s = e2e.summarize({"offline": {"vllm": {"output_tok_s": 10.0}, "moekern": {"output_tok_s": 11.0,
                                                                             "plugin_check": bad}}})
    assert s["offline.moekern_vs_vllm"] == 1.1 and "no plugin summary" in s["offline.moekern_plugin_check_failed"]


def test_summarize_reports_gate_log_overhead_with_its_noise(e2e):
    def arm(vals):
        return {"output_tok_s": sorted(vals)[len(vals) // 2], "runs": [{"output_tok_s": v} for v in vals]}

    s = e2e.summarize({"offline": {"moekern-routing": arm([100.0, 101.0, 99.0]),
                                   "moekern-routing-log": arm([98.0, 98.5, 97.0])}})
    assert s["offline.gate_log_overhead"] == pytest.approx(1 - 98.0 / 100.0, abs=1e-4)
    assert s["offline.gate_log_overhead_noise"] == pytest.approx(2.0 / 100.0, abs=1e-4)  # the wider arm
    assert e2e.rep_spread([{"output_tok_s": 5.0}]) is None
    single = e2e.summarize({"offline": {"moekern-routing": arm([100.0]), "moekern-routing-log": arm([99.0])}})
    assert "offline.gate_log_overhead_noise" not in single and "offline.gate_log_overhead" in single
