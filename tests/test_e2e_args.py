"""moekern/e2e/run_e2e.py without vLLM: argument parsing, the engine kwargs, the `vllm serve` and `vllm
bench serve` command lines it builds, dataset prompts, the --result metadata the analysis groups by, and the
sweep example spec rendering commands the runner accepts."""

import importlib.util
import json
import math
import os
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
E2E = REPO / "moekern" / "e2e"


def _script_module(name: str, path: Path):
    """Import a moekern/e2e script as module `name` for one test module's lifetime (a generator for a
    fixture). Registered in sys.modules while in use: its dataclasses look their module up there."""
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    yield mod
    sys.modules.pop(spec.name, None)


@pytest.fixture(scope="module")
def e2e():
    yield from _script_module("moekern_e2e_run_e2e", E2E / "run_e2e.py")


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



class _Health:
    """A healthy /health response for the fake `vllm serve`."""
    status = 200

    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def _fake_server(monkeypatch, e2e, popen, stopped=None):
    """Route the runner's subprocesses through `popen`, answer its health checks, record server stops."""
    monkeypatch.setattr(e2e.subprocess, "Popen", popen)
    monkeypatch.setattr(e2e.urllib.request, "urlopen", lambda url, timeout: _Health())
    monkeypatch.setattr(e2e, "_kill_group",
                        lambda proc: (stopped.append(proc) if stopped is not None else None)
                        or setattr(proc, "returncode", -15))

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
    # expert parallelism without EPLB: its own flag, and in the grid's result-name prefix
    args = _ready(e2e, ["--mode", "serve", "--arms", "moekern", "--enable-expert-parallel", "--tensor-parallel-size", "2"])
    kw = e2e.engine_kwargs(args, "moekern")
    assert kw["enable_expert_parallel"] is True and "enable_eplb" not in kw
    cmd = e2e.serve_command(kw, 1)
    assert "--enable-expert-parallel" in cmd and "--enable-eplb" not in cmd
    assert e2e.grid_prefix(args, "moekern") == "moekern_s128_tp2_ep"


def test_bench_command_random_and_dataset(e2e, dataset, tmp_path):
    args = _ready(e2e, ["--quick", "--mode", "serve"])
    cmd = e2e.bench_command(args, 9000, tmp_path, "r.json")
    assert _flag(cmd, "--dataset-name") == "random" and _flag(cmd, "--random-input-len") == "256"
    assert _flag(cmd, "--base-url") == "http://127.0.0.1:9000" and _flag(cmd, "--result-filename") == "r.json"
    args = _ready(e2e, ["--quick", "--mode", "serve", "--dataset", str(dataset), "--serve-prompts", "7"])
    cmd = e2e.bench_command(args, 9000, tmp_path, "r.json")
    assert _flag(cmd, "--dataset-name") == "custom" and _flag(cmd, "--dataset-path") == str(dataset)
    assert _flag(cmd, "--custom-output-len") == str(e2e.QUICK.output_len) and "--skip-chat-template" in cmd
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
    (["--enable-expert-parallel"], "enable-expert-parallel needs --tensor-parallel-size"),
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
    from moekern.analysis.serving.metrics import GROUP_KEYS, load_runs

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
    from moekern.analysis.study.sweep import load_spec, plan, run_sweep

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
    assert f"[todo] {points[0].run_id}: python ../../moekern/e2e/run_e2e.py" in out
    assert f"--result /nonexistent/sweep/runs/{points[0].run_id}.json" in out
    assert out.count("run_e2e.py --model mixtral-8x7b-4l --mode serve --arms") == len(points)


def test_sweep_keeps_runner_metadata(tmp_path):
    """A runner's own 'moekern' block (run_e2e --result) survives the sweep's annotation, which adds only
    the keys it lacks."""
    from moekern.analysis.study.sweep import load_spec, run_sweep

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
    """moekern/e2e/configs/*/config.json are what make_configs.py writes today (hf_config of the registry
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


# ---- preflight (moekern/e2e/preflight.py) and the runner's use of it -------------------------------------
VLLM_REF = Path(__import__("os").environ.get("MOEKERN_VLLM_REF", "/work/ref/vllm"))


@pytest.fixture(scope="module")
def pf():
    yield from _script_module("moekern_e2e_preflight", E2E / "preflight.py")


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
    assert cmd[1].endswith("moekern/e2e/preflight.py")
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


def test_rounds_alternate_arms_and_pool_their_passes(e2e, tmp_path, monkeypatch, capsys):
    """--rounds 3: vllm, moekern, vllm, moekern, ...; every round a fresh arm run with its own files and gate-log
    folder; the passes of all rounds pooled per arm, the per-round ratios and JIT counts kept."""
    started = []
    rates = {"vllm": [100.0, 110.0, 120.0], "moekern": [105.0, 115.0, 126.0]}  # the machine drifts up

    def fake(args, arm, out, extra_spec=None, round_no=None):
        started.append((arm, round_no))
        base = rates[arm][round_no]
        runs = [{"seconds": 1.0, "output_tokens": 10, "output_tok_s": base + d} for d in (-1.0, 0.0, 1.0)]
        gd = e2e.gate_log_dir(args, arm, out, round_no)
        return {"arm": arm, "rc": 0, "wall_s": 10.0, "runs": runs, "output_tok_s": base,
                "output_tok_s_stats": e2e.arm_stats([x["output_tok_s"] for x in runs]), "plugin_check": {"ok": True},
                "jit_during_measurement": 1 if (arm, round_no) == ("moekern", 2) else 0, "jit_kernels":
                {"fused_moe_kernel": 1} if (arm, round_no) == ("moekern", 2) else {}, "gate_dir": str(gd)}

    monkeypatch.setattr(e2e, "run_offline_arm", fake)
    assert e2e.main(["--quick", "--mode", "offline", "--arms", "vllm,moekern", "--rounds", "3", "--no-preflight",
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
    args = _ready(e2e, ["--quick", "--mode", "offline", "--arms", "vllm,moekern-routing-log", "--rounds", "2"])
    assert e2e.gate_log_dir(args, "moekern-routing-log", tmp_path, 1) == tmp_path / "gate_logs" / "moekern-routing-log" / "round1"
    assert e2e.gate_log_dir(args, "vllm", tmp_path, 1) is None
    assert "x 2 rounds" in e2e.plan_text(args)
    with pytest.raises(SystemExit):
        e2e.parse_args(["--rounds", "0"])


def test_merge_rounds_keeps_a_failed_round_out(e2e):
    good = {"arm": "vllm", "rc": 0, "wall_s": 5.0, "runs": [{"seconds": 1.0, "output_tok_s": 50.0}],
            "jit_during_measurement": 0}
    bad = {"arm": "vllm", "rc": 124, "wall_s": 300.0, "error": "timed out"}
    m = e2e.merge_rounds([good, bad])
    assert m["output_tok_s"] == 50.0 and m["rounds"][1]["error"] == "timed out" and "error" not in m
    assert e2e.merge_rounds([bad, bad])["error"] == "timed out"
    unknown = e2e.merge_rounds([good, {**good, "jit_during_measurement": None}])
    assert unknown["jit_during_measurement"] is None and unknown["jit_note"]


def test_main_refuses_arms_when_preflight_fails(e2e, tmp_path, monkeypatch, capsys):
    started = []
    monkeypatch.setattr(e2e, "run_offline_arm", lambda args, arm, out, extra_spec=None, round_no=None:
                        started.append(arm) or {"arm": arm, "rc": 0, "output_tok_s": 1.0})
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
    results = {"offline": {"moekern-routing": arm([100.0, 101.0, 99.0]), "moekern-routing-log": arm([99.0, 99.5, 98.0]),
                           "moekern-routing-log-torch": arm([96.0, 96.5, 95.0])}}
    both = e2e.summarize(results)
    assert both["offline.gate_log_overhead"] == pytest.approx(0.01, abs=1e-4)
    assert both["offline.gate_log_overhead_torch"] == pytest.approx(0.04, abs=1e-4)
    text = e2e.format_summary(results, both)
    assert "gate_log_overhead = 1.0%" in text and "gate_log_overhead_torch = 4.0%" in text
    assert e2e.arm_env("moekern-routing-log-torch", Path("/o"), Path("/g"), base_env={})[
        "MOEKERN_GATE_LOG_SNAPSHOT"] == "torch"


# ---- steady state (issue 5): prefix caching off, warm-up, JIT counting, sizing -----------------------------
# Verbatim lines of benchmarks/results/e2e/h100-2026-11-23/offline/offline_vllm.log (vLLM 0.26, default
# non-verbose monitor) and the verbose form of the same warning (vllm/utils/jit_monitor.py, "(<details>)").
_JIT_ATTN = ("(EngineCore pid=1963) WARNING 11-23 17:51:58 [jit_monitor.py:135] Triton kernel JIT compilation "
             "during inference: kernel_unified_attention. This causes a latency spike; consider extending warmup "
             "to cover this shape/config.")
_JIT_MOE_VERBOSE = ("(EngineCore pid=1963) WARNING 11-23 17:52:01 [jit_monitor.py:131] Triton kernel JIT compilation "
                    "during inference: fused_moe_kernel (constexprs={BLOCK_SIZE_M=64, top_k=2}; signature={a_ptr="
                    "'*bf16'}; extra_compile_info={}; key='x'). This causes a latency spike; consider extending "
                    "warmup to cover this shape/config.")
_AUTOTUNE = ("Triton autotuning for function _fused_topk_kernel,\nwith key as (8, 'torch.float32'),\n"
             "finished after 0.41s,\nbest config selected: BLOCK_M: 16, num_warps: 4;")


def _log(*parts):
    return "\n".join(parts) + "\n"


def test_engine_runs_without_prefix_caching_and_logs_every_compile(e2e, tmp_path):
    args = _ready(e2e, ["--quick", "--mode", "both"])
    for arm in e2e.ARMS:
        kw = e2e.engine_kwargs(args, arm)
        assert kw["enable_prefix_caching"] is False and kw["jit_monitor_verbose"] is True
    cmd = e2e.serve_command(e2e.engine_kwargs(args, "moekern"), 1)
    assert "--no-enable-prefix-caching" in cmd and "--enable-prefix-caching" not in cmd
    at = cmd.index("--jit-monitor-verbose")  # a bare switch
    assert at == len(cmd) - 1 or cmd[at + 1].startswith("--")
    # other False flags stay out (vLLM's default is off for them)
    assert "--no-enable-eplb" not in e2e.serve_command({**e2e.engine_kwargs(args, "vllm"), "enable_eplb": False}, 1)
    bench = e2e.bench_command(args, 1, tmp_path, "r.json")
    assert _flag(bench, "--temperature") == "0" and _flag(bench, "--seed") == "0"
    spec = e2e.offline_spec(args, "vllm", tmp_path / "r.json")
    assert spec["warmup_reps"] == e2e.QUICK.warmup_reps and spec["engine"]["enable_prefix_caching"] is False


@pytest.mark.skipif(not VLLM_REF.is_dir(), reason="vLLM 0.26 source not at MOEKERN_VLLM_REF")
def test_steady_state_flags_exist_in_vllm_026():
    """The engine fields and CLI flags the steady-state settings use, in vLLM 0.26's source: EngineArgs fields
    with bool types (get_kwargs gives bools argparse.BooleanOptionalAction, hence --no-enable-prefix-caching),
    the monitor's warning text we count, and `vllm bench serve`'s --num-warmups repeating one request only."""
    args_src = (VLLM_REF / "engine" / "arg_utils.py").read_text()
    assert "    enable_prefix_caching: bool | None = None\n" in args_src
    assert "    jit_monitor_verbose: bool = ObservabilityConfig.jit_monitor_verbose\n" in args_src
    assert '"--enable-prefix-caching",' in args_src and '"--jit-monitor-verbose",' in args_src
    assert 'kwargs[name]["action"] = argparse.BooleanOptionalAction' in args_src
    mon = (VLLM_REF / "utils" / "jit_monitor.py").read_text()
    assert '"%s %s during inference: %s%s. "' in mon and 'event="kernel JIT compilation"' in mon
    assert "logger.warning_once(message, *args)" in mon  # why verbose: the default logs a kernel once
    serve = (VLLM_REF / "benchmarks" / "serve.py").read_text()
    assert "request_func_input=test_input" in serve[serve.index("if num_warmups > 0:"):][:1200]


def test_warm_again(e2e):
    # always the asked passes, then more only while the last one compiled, up to the maximum
    assert e2e.warm_again([], 1, 4) and not e2e.warm_again([0], 1, 4)
    assert e2e.warm_again([3], 1, 4) and e2e.warm_again([3, 1], 1, 4) and not e2e.warm_again([3, 1, 0], 1, 4)
    assert not e2e.warm_again([3, 1, 2, 5], 1, 4)  # the cap
    assert e2e.warm_again([0], 2, 4)  # --warmup-reps passes run even when the first was quiet
    assert e2e.warm_again([None], 1, 3) and not e2e.warm_again([None, None, None], 1, 3)  # unknown: warm on
    assert not e2e.warm_again([], 0, 4)  # a gate-log run without warm-up stays without
    assert not e2e.warm_again([7], 1, 1)


def test_new_jit_lines(e2e, tmp_path):
    log = tmp_path / "a.log"
    log.write_text(f"x\nWARNING {e2e.JIT_WARNING}: k1\n")
    n, off = e2e.new_jit_lines(str(log), 0)
    assert n == 1 and off == log.stat().st_size
    with open(log, "a") as fh:
        fh.write(f"{e2e.JIT_WARNING}: k2\n{e2e.JIT_WARNING}: k3\n")
    assert e2e.new_jit_lines(str(log), off)[0] == 2
    assert e2e.new_jit_lines(None, 5) == (None, 5) and e2e.new_jit_lines(str(tmp_path / "no.log"), 3) == (None, 3)


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


def test_child_offline_runs_the_shape_sweep_between_pre_warm_and_full_passes(e2e, monkeypatch, tmp_path):
    log, res = tmp_path / "offline_x.log", tmp_path / "offline_x.json"
    log.write_text("")
    calls = _fake_vllm(monkeypatch, log, [0])
    monkeypatch.setattr(e2e.time, "sleep", lambda s: None)
    sw = {"cap": 40, "max_model_len": 16, "max_num_seqs": 4}
    spec = {"engine": {}, "seed": 0, "vocab": 1000, "input_len": 4, "output_len": 3, "num_prompts": 20, "reps": 1,
            "warmup_reps": 1, "warmup_max_reps": 2, "ignore_eos": True, "result": str(res), "log": str(log),
            "shape_sweep": sw}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    assert e2e.child_offline(str(tmp_path / "spec.json")) == 0
    r = json.loads(res.read_text())
    steps = len(e2e.sweep_batches(40, 16, 4))
    assert r["shape_sweep"]["steps"] == steps and r["shape_sweep"]["error"] is None
    assert calls[0] == (16, 8) and all(c[1] == 1 for c in calls[1:1 + steps])  # one token per sweep request
    assert calls[1 + steps:] == [(20, 3), (20, 3)]  # one quiet warm-up pass, one timed
    spec.update(warmup_reps=0)  # no warm-up at all: no sweep either (gate-log runs keep only timed passes)
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    calls.clear()
    assert e2e.child_offline(str(tmp_path / "spec.json")) == 0
    assert json.loads(res.read_text())["shape_sweep"] is None and calls == [(20, 3)]


@pytest.mark.parametrize("compiles, warm_passes, timed_jit", [
    ([4, 2, 0], 3, 0),     # warms on until a full pass compiles nothing
    ([4, 2, 1, 1, 1], 4, 1),  # the cap: the 5th pass's compile lands in the measured part
    ([0], 1, 0),           # quiet at once: just --warmup-reps
])
def test_child_offline_warms_until_quiet(e2e, monkeypatch, tmp_path, compiles, warm_passes, timed_jit):
    log, res = tmp_path / "offline_x.log", tmp_path / "offline_x.json"
    log.write_text("")
    calls = _fake_vllm(monkeypatch, log, compiles)
    monkeypatch.setattr(e2e.time, "sleep", lambda s: None)
    spec = {"engine": {}, "seed": 0, "vocab": 1000, "input_len": 4, "output_len": 3, "num_prompts": 20, "reps": 2,
            "warmup_reps": 1, "warmup_max_reps": 4, "ignore_eos": True, "result": str(res), "log": str(log)}
    spec_path = tmp_path / "spec.json"
    spec_path.write_text(json.dumps(spec))
    real_stdout = sys.stdout
    with open(log, "a") as fh:  # the child's stdout is the log, as run_offline_arm starts it
        monkeypatch.setattr(sys, "stdout", fh)
        assert e2e.child_offline(str(spec_path)) == 0
    monkeypatch.setattr(sys, "stdout", real_stdout)
    r = json.loads(res.read_text())
    full = [w for w in r["warmup"] if w["prompts"] == 20]
    assert [w["jit"] for w in full] == compiles[:warm_passes]
    assert r["warmup"][0] == {**r["warmup"][0], "prompts": 16, "max_tokens": 8}  # the small pre-warm pass first
    assert len(calls) == len(r["warmup"]) + 2 and len(r["runs"]) == 2
    assert e2e.count_jit_events(log.read_text())["jit"] == timed_jit


def test_shape_sweep_meets_every_config_and_residue(e2e):
    ms = e2e.shape_sweep(16384)
    assert ms == sorted(set(ms)) and ms[0] == 1 and ms[-1] == 16384
    for k in e2e.MOE_CONFIG_KEYS:  # every tile config, with all 16 residues mod 16 next to its key
        assert {m % 16 for m in ms if k <= m < k + 16} == set(range(16))
    assert {m % 16 for m in ms if m > 16384 - 16} == set(range(16))  # the largest steps the budget allows
    small = e2e.shape_sweep(20)
    assert small == list(range(1, 21))
    with pytest.raises(ValueError, match="cap=0"):
        e2e.shape_sweep(0)


@pytest.mark.parametrize("cap, max_len, seqs", [(16384, 2048, 128), (8192, 2048, 128), (100, 16, 4), (7, 2, 3)])
def test_sweep_batches_are_single_steps_of_m_tokens(e2e, cap, max_len, seqs):
    batches = e2e.sweep_batches(cap, max_len, seqs)
    top = min(cap, (max_len - 1) * seqs)
    assert [sum(b) for b in batches] == e2e.shape_sweep(top)
    for b in batches:  # each prompt fits the model with its one generated token; the step holds them all
        assert 1 <= len(b) <= seqs and all(1 <= k <= max_len - 1 for k in b) and max(b) - min(b) <= 1
    with pytest.raises(ValueError, match="leave no room"):
        e2e.sweep_batches(10, 1, 4)


def test_sweep_spec_follows_the_flags(e2e):
    args = _ready(e2e, ["--quick", "--mode", "offline"])
    assert e2e.sweep_spec(args, "offline") == {"cap": 16384, "max_model_len": 2048, "max_num_seqs": 128}
    assert e2e.sweep_spec(args, "serve")["cap"] == 8192
    args = _ready(e2e, ["--quick", "--mode", "offline", "--max-num-batched-tokens", "4096", "--max-num-seqs", "64"])
    assert e2e.sweep_spec(args, "serve") == {"cap": 4096, "max_model_len": 2048, "max_num_seqs": 64}
    assert e2e.offline_spec(args, "vllm", Path("r.json"))["shape_sweep"]["cap"] == 4096
    args = _ready(e2e, ["--quick", "--mode", "offline", "--no-shape-sweep"])
    assert e2e.sweep_spec(args, "offline") is None and e2e.offline_spec(args, "vllm", Path("r.json"))["shape_sweep"] is None


def test_serve_shape_sweep_posts_one_request_per_step(e2e):
    sent = []
    sw = {"cap": 40, "max_model_len": 16, "max_num_seqs": 4}
    r = e2e.serve_shape_sweep(8000, "/models/m", sw, 1000, post=lambda url, body: sent.append((url, body)))
    assert r["error"] is None and r["steps"] == len(sent) == len(e2e.shape_sweep(40))
    assert all(url == "http://127.0.0.1:8000/v1/completions" for url, _ in sent)
    assert [sum(len(p) for p in b["prompt"]) for _, b in sent] == e2e.shape_sweep(40)
    assert all(b["max_tokens"] == 1 and b["model"] == "/models/m" for _, b in sent)
    assert all(100 <= t < 900 for _, b in sent for p in b["prompt"] for t in p)

    def fail_at_30(url, body):
        if sum(len(p) for p in body["prompt"]) == 30:
            raise OSError("connection reset")
    r = e2e.serve_shape_sweep(8000, "/models/m", sw, 1000, post=fail_at_30)
    assert r["error"] == "step of 30 tokens: OSError: connection reset"


def test_warmup_plan(e2e):
    assert e2e.warmup_plan(512, 128, 1) == [(16, 8), (512, 128)]
    assert e2e.warmup_plan(8, 32, 2) == [(8, 8), (8, 32), (8, 32)]  # fewer prompts than the pre-warm takes
    assert e2e.warmup_plan(512, 128, 0) == []
    with pytest.raises(ValueError, match="warmup_reps=-1 must be >= 0"):
        e2e.warmup_plan(4, 4, -1)


def test_count_jit_events_after_the_marker(e2e):
    text = _log("INFO init", _JIT_ATTN, e2e.MEASURE_MARKER, "INFO step", _JIT_MOE_VERBOSE, _JIT_ATTN, _AUTOTUNE)
    c = e2e.count_jit_events(text)
    assert c == {"jit": 2, "autotune": 1, "kernels": {"fused_moe_kernel": 1, "kernel_unified_attention": 1}}
    assert e2e.count_jit_events(text, marker=None)["jit"] == 3  # the warm-up's compile too
    assert e2e.count_jit_events(_log(_JIT_ATTN, "no marker here")) is None
    clean = e2e.count_jit_events(_log(_JIT_ATTN, _AUTOTUNE, e2e.MEASURE_MARKER, "INFO step"))
    assert clean == {"jit": 0, "autotune": 0, "kernels": {}}
    assert e2e.jit_fields(text)["jit_during_measurement"] == 2
    unknown = e2e.jit_fields("crashed before the marker")
    assert unknown["jit_during_measurement"] is None and "no " in unknown["jit_note"]


def test_count_jit_events_in_the_first_runs_log(e2e):
    """The committed first-run log has the warnings (in the untimed-or-not part: that run had no marker)."""
    log = REPO / "benchmarks" / "results" / "e2e" / "h100-2026-11-23" / "offline" / "offline_vllm.log"
    if not log.exists():
        pytest.skip("first-run results not in this checkout")
    text = log.read_text(errors="replace")
    assert e2e.count_jit_events(text) is None
    c = e2e.count_jit_events(text, marker=None)
    assert c["jit"] >= 2 and {"fused_moe_kernel", "kernel_unified_attention"} <= set(c["kernels"])


def test_arm_stats_and_median_run(e2e):
    st = e2e.arm_stats([4.0, 1.0, 3.0, 2.0])
    assert st == {"median": 2.5, "min": 1.0, "max": 4.0, "n": 4, "spread": pytest.approx(3.0 / 2.5)}
    assert e2e.arm_stats([5.0])["spread"] is None and e2e.arm_stats([]) is None
    runs = [{"output_throughput": v} for v in (30.0, 10.0, 20.0)]
    assert e2e.median_run(runs) == 2 and e2e.median_run(runs[:2]) == 1  # even count: the lower median


def _offline_arm(e2e, vals, jit):
    st = e2e.arm_stats(vals)
    return {"rc": 0, "output_tok_s": st["median"], "output_tok_s_stats": st,
            "runs": [{"output_tok_s": v} for v in vals], "jit_during_measurement": jit,
            "autotune_during_measurement": 0, "jit_kernels": {"fused_moe_kernel": jit} if jit else {}}


def test_summary_ratio_from_medians_with_spread_and_steady_flag(e2e):
    res = {"offline": {"vllm": _offline_arm(e2e, [10.0, 11.0, 12.0], 0),
                       "moekern": _offline_arm(e2e, [20.0, 22.0, 21.0], 0),
                       "flashinfer": {"skipped": "not asked"}}}
    s = e2e.summarize(res)
    assert s["offline.moekern_vs_vllm"] == pytest.approx(21.0 / 11.0, abs=1e-4)
    assert s["offline.moekern_vs_vllm_spread"] == pytest.approx(2.0 / 11.0, abs=1e-4)  # the wider arm
    assert s["offline.steady_state"] is True and "offline.not_steady" not in s
    text = e2e.format_summary(res, s)
    assert "NOT STEADY" not in text and "moekern_vs_vllm = 1.909 (rep spread 18.2%)" in text
    assert "        21 [20-22] n=3  JIT while timed: 0" in text and "skipped: not asked" in text

    res["offline"]["vllm"] = _offline_arm(e2e, [10.0, 11.0, 12.0], 3)
    s = e2e.summarize(res)
    assert s["offline.steady_state"] is False and "fused_moe_kernel x3" in s["offline.not_steady"]["vllm"]
    assert "moekern" not in s["offline.not_steady"]
    text = e2e.format_summary(res, s)
    assert "NOT STEADY STATE: the offline ratios above are not a valid A/B" in text and "    vllm: 3 JIT" in text

    res["offline"]["vllm"] = {**_offline_arm(e2e, [10.0], 0), "jit_during_measurement": None, "jit_note": "gone"}
    s = e2e.summarize(res)
    assert s["offline.not_steady"] == {"vllm": "gone"} and "offline.moekern_vs_vllm_spread" not in s
    res["offline"]["vllm"] = {**_offline_arm(e2e, [10.0], 0), "autotune_during_measurement": 2}
    assert not e2e.summarize(res)["offline.steady_state"]  # autotuning while timed counts too
    res["offline"]["vllm"] = {"rc": 1, "error": "boom"}  # a failed arm neither counts nor crashes
    s = e2e.summarize(res)
    assert s["offline.steady_state"] is True and "offline.moekern_vs_vllm" not in s


def test_summary_serve_ratios(e2e):
    def arm(vals, tpot, jit):
        return {"output_throughput": sorted(vals)[(len(vals) - 1) // 2], "median_tpot_ms": tpot,
                "output_throughput_stats": e2e.arm_stats(vals), "jit_during_measurement": jit,
                "autotune_during_measurement": 0, "jit_kernels": {}}

    res = {"serve": {"vllm": arm([100.0, 110.0], 5.0, 0), "moekern": arm([120.0, 126.0], 4.5, 1)}}
    res["serve"]["moekern"]["median_tpot_ms_stats"] = e2e.arm_stats([4.4, 4.6])  # median 4.5, spread 0.2/4.5
    res["serve"]["vllm"]["median_tpot_ms_stats"] = e2e.arm_stats([5.0, 5.0])
    s = e2e.summarize(res)
    # medians of the timed runs (123 and 105), not the lower-median run each arm reports in full
    assert s["serve.moekern_vs_vllm"] == pytest.approx(123.0 / 105.0, abs=1e-4)
    assert s["serve.moekern_tpot_vs_vllm"] == pytest.approx(0.9)
    assert s["serve.moekern_tpot_vs_vllm_spread"] == pytest.approx(0.2 / 4.5, abs=1e-4)
    assert s["serve.moekern_vs_vllm_spread"] == pytest.approx(10.0 / 105.0, abs=1e-4)
    assert s["serve.steady_state"] is False and "offline.steady_state" not in s
    assert "median TPOT 4.50 ms" in e2e.format_summary(res, s)


def test_quick_workload_sizing(e2e):
    """--quick: one timed pass >= MIN_PASS_S at the first run's steady rates, a 4-arm offline call and a
    2-arm serve call within ~8 minutes, a 3-arm serve call within the 570 s GPU command timeout; and the
    rates reproduce the first run's fastest offline pass (0.497 s for 128 x (256 + 64))."""
    q = e2e.QUICK
    assert 3 <= q.reps <= 5 and q.warmup_reps >= 1 and q.serve_reps >= 1
    assert e2e.offline_pass_s(q) >= e2e.MIN_PASS_S and e2e.serve_run_s(q, 64) >= e2e.MIN_PASS_S
    assert e2e.plan_seconds(q, "offline", 4) <= 8.5 * 60
    assert e2e.plan_seconds(q, "serve", 2) <= 8 * 60 and e2e.plan_seconds(q, "serve", 3) <= 570
    first = e2e.Workload(num_prompts=128, serve_prompts=128, input_len=256, output_len=64, reps=5, serve_reps=1,
                         warmup_reps=0)
    res = REPO / "benchmarks" / "results" / "e2e" / "h100-2026-11-23" / "offline" / "e2e_mixtral-8x7b-4l.json"
    measured = 0.497
    if res.exists():
        measured = min(r["seconds"] for r in json.loads(res.read_text())["offline"]["vllm"]["runs"])
    assert e2e.offline_pass_s(first) == pytest.approx(measured, rel=0.15)
    args = e2e.parse_args(["--quick", "--mode", "offline"])
    assert args.workload == q and (args.num_prompts, args.reps, args.warmup_reps) == (512, 5, 1)
    args = e2e.parse_args(["--mode", "serve", "--serve-reps", "1", "--warmup-reps", "0", "--input-len", "64"])
    assert args.workload == e2e.Workload(num_prompts=e2e.FULL.num_prompts, serve_prompts=e2e.FULL.serve_prompts,
                                         input_len=64, output_len=e2e.FULL.output_len, reps=e2e.FULL.reps,
                                         serve_reps=1, warmup_reps=0)
    with pytest.raises(ValueError, match="mode='both'"):
        e2e.plan_seconds(q, "both", 1)


def test_plan_text_warns_over_budget(e2e):
    args = e2e.parse_args(["--quick", "--mode", "both", "--arms", "vllm,moekern"])
    text = e2e.plan_text(args)
    assert text.count("plan ") == 2 and "1 warm-up + 5 timed passes" in text and "1 warm-up + 2 timed runs" in text
    assert "warning" not in text
    args = e2e.parse_args(["--mode", "offline", "--budget-s", "100"])
    assert "exceeds --budget-s 100" in e2e.plan_text(args)


@pytest.mark.parametrize("argv, match", [
    (["--reps", "0"], "--reps=0 must be >= 1"),
    (["--serve-reps", "0"], "--serve-reps=0 must be >= 1"),
    (["--warmup-reps", "-1"], "--warmup-reps=-1 must be >= 0"),
    (["--num-prompts", "0"], "--num-prompts=0 must be >= 1"),
    (["--concurrency", "0"], "--concurrency=0 must be >= 1"),
    (["--input-len", "2000", "--output-len", "100"], "must be <= --max-model-len 2048"),
])
def test_bad_workload_arguments(e2e, argv, match, capsys):
    with pytest.raises(SystemExit) as exc:
        e2e.parse_args(["--quick"] + argv)
    assert exc.value.code == 2 and match in capsys.readouterr().err


class _FakeProc:
    """A finished child: what it writes to its stdout happened before wait() returns."""

    def __init__(self, rc=0):
        self.returncode, self.pid = rc, -1

    def poll(self):
        return self.returncode

    def wait(self, timeout=None):
        return self.returncode


def test_offline_arm_counts_jit_after_the_childs_marker(e2e, tmp_path, monkeypatch):
    """run_offline_arm with a fake child that logs one compile in warm-up and one while timed."""
    seen = {}

    def popen(cmd, stdout, **kw):
        spec = json.loads(Path(cmd[-1]).read_text())
        seen["spec"] = spec
        stdout.write(_log(_JIT_ATTN, e2e.MEASURE_MARKER, _JIT_MOE_VERBOSE))
        stdout.flush()
        Path(spec["result"]).write_text(json.dumps({"init_s": 1.0, "runs": [{"output_tok_s": 5.0}],
                                                    "output_tok_s": 5.0, "plugin": "unavailable: x"}))
        return _FakeProc()

    monkeypatch.setattr(e2e.subprocess, "Popen", popen)
    args = _ready(e2e, ["--quick", "--mode", "offline", "--arms", "vllm"])
    r = e2e.run_offline_arm(args, "vllm", tmp_path)
    assert r["jit_during_measurement"] == 1 and r["jit_kernels"] == {"fused_moe_kernel": 1}
    assert seen["spec"]["warmup_reps"] == 1 and seen["spec"]["engine"]["enable_prefix_caching"] is False


def test_serve_arm_warms_up_then_times_and_counts_only_the_timed_part(e2e, tmp_path, monkeypatch):
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
            return _FakeProc(rc=None)
        name = _flag(cmd, "--result-filename")
        state["benches"].append(name)
        if name != "serve_moekern.rep1.json":  # the server compiles during warm-up and the first timed run
            state["server_log"].write(_log(_JIT_ATTN if "warmup" in name else _JIT_MOE_VERBOSE))
            state["server_log"].flush()
        Path(_flag(cmd, "--result-dir"), name).write_text(json.dumps(
            {"duration": 3.0, "completed": 320, "output_throughput": throughput[name], "median_tpot_ms": 5.0,
             "median_ttft_ms": 40.0, "p90_ttft_ms": 60.0}))
        return _FakeProc()

    stopped = []
    _fake_server(monkeypatch, e2e, popen, stopped)
    args = _ready(e2e, ["--quick", "--mode", "serve", "--arms", "moekern"])
    r = e2e.run_serve_arm(args, "moekern", tmp_path)
    assert "error" not in r, r.get("error")
    assert state["benches"] == ["serve_moekern.warmup.json", "serve_moekern.rep0.json", "serve_moekern.rep1.json"]
    assert r["jit_during_measurement"] == 1 and r["jit_kernels"] == {"fused_moe_kernel": 1}
    assert [x["output_throughput"] for x in r["runs"]] == [120.0, 100.0] and r["output_throughput"] == 100.0
    assert r["output_throughput_stats"]["min"] == 100.0 and r["output_throughput_stats"]["max"] == 120.0
    assert json.loads((tmp_path / "serve_moekern.bench.json").read_text())["output_throughput"] == 100.0
    assert stopped and r["server_stopped"] and "--no-enable-prefix-caching" in r["cmd"]
    log = (tmp_path / "serve_moekern.server.log").read_text()
    assert log.index(_JIT_ATTN) < log.index(e2e.MEASURE_MARKER) < log.index("fused_moe_kernel")


def test_olmoe_gate_log_run_is_planned_right(e2e, pf, tmp_path):
    """The AR gate-log run of the LLaDA-MoE-shaped model (OLMoE shape: E=64, k=8, H=2048, 16 layers) for the
    diffusion comparison: one timed pass, no warm-up passes, gate logs of the routing-log arm only."""
    from moekern.models import get_model

    argv = ["--model", "olmoe-1b-7b", "--mode", "offline", "--arms", "moekern-routing-log", "--quick",
            "--warmup-reps", "0", "--reps", "1"]
    args = e2e.parse_args(argv)
    llada, olmoe = get_model("llada-moe-7b"), get_model("olmoe")
    for f in ("hidden_size", "num_experts", "top_k", "num_layers"):
        assert getattr(llada, f) == getattr(olmoe, f), f  # the shape the AR run stands in for
    assert args.vocab == olmoe.vocab_size and args.attention_backend == "TRITON_ATTN"
    assert args.arm_plan == {"offline": ["moekern-routing-log"]} and (args.reps, args.warmup_reps) == (1, 0)
    e2e.prepare_model_dir(args, tmp_path)
    cfg = json.loads((args.model_dir / "config.json").read_text())
    assert (cfg["num_experts"], cfg["num_experts_per_tok"], cfg["hidden_size"], cfg["num_hidden_layers"]) == \
        (64, 8, 2048, 16) and not args.has_tokenizer  # offline needs none (skip_tokenizer_init)
    assert e2e.gate_log_dir(args, "moekern-routing-log", tmp_path) == tmp_path / "gate_logs" / "moekern-routing-log"
    spec = e2e.offline_spec(args, "moekern-routing-log", tmp_path / "r.json")
    assert spec["warmup_reps"] == 0 and e2e.warmup_plan(spec["num_prompts"], spec["output_len"], 0) == []
    assert e2e.arm_env("moekern-routing-log", tmp_path, tmp_path / "g", base_env={})["MOEKERN_KERNELS"] == "routing"
    assert e2e.preflight_command(args)[2:] == ["--arms", "moekern-routing-log", "--mode", "offline", "--model",
                                               "olmoe-1b-7b"]
    checks, _ = pf.build_checks(pf.parse_args(["--arms", "moekern-routing-log", "--model", "olmoe-1b-7b"]))
    assert "model config fields vLLM reads" in [n for n, _ in checks]


def test_dummy_router_seed_reaches_every_arm(e2e, tmp_path):
    for arm in ("vllm", "moekern"):
        env = e2e.arm_env(arm, tmp_path, None, base_env={}, router_seed=5)
        assert env["MOEKERN_DUMMY_ROUTER_SEED"] == "5"
    assert "MOEKERN_DUMMY_ROUTER_SEED" not in e2e.arm_env("vllm", tmp_path, None, base_env={})
    args = e2e.parse_args(["--quick", "--dummy-router-seed", "3", "--out", str(tmp_path)])
    assert args.dummy_router_seed == 3
    with pytest.raises(SystemExit):
        e2e.parse_args(["--dummy-router-seed", "-1", "--out", str(tmp_path)])


# ---- serve grid: many benches against one server ----------------------------------------------------------
def _grid_args(e2e, tmp_path, extra=()):
    ds = []
    for i, (name, text) in enumerate((("000_0.2000", "alpha beta"), ("001_0.8000", "gamma gamma"))):
        p = tmp_path / f"{name}.jsonl"
        p.write_text(json.dumps({"prompt": text, "prompt_len": 10 + 10 * i}) + "\n")
        ds.append(p)
    return _ready(e2e, ["--mode", "serve", "--arms", "moekern", "--concurrency-grid", "8,32",
                        "--datasets", ",".join(map(str, ds)), "--grid-reps", "2", "--result-dir",
                        str(tmp_path / "runs"), "--serve-prompts", "64", "--output-len", "16", *extra]), ds


def test_grid_points_names_and_order(e2e, tmp_path):
    args, ds = _grid_args(e2e, tmp_path)
    pts = e2e.grid_points(args, "moekern")
    assert len(pts) == 2 * 2 * 2
    assert [(p["rep"], p["dataset"].stem, p["concurrency"]) for p in pts[:3]] == \
        [(0, "000_0.2000", 8), (0, "000_0.2000", 32), (0, "001_0.8000", 8)]
    assert pts[0]["name"] == "moekern_s128_c8_d000_0.2000_r0"
    assert pts[-1]["result"] == tmp_path / "runs" / "moekern_s128_c32_d001_0.8000_r1.json"
    assert len({p["name"] for p in pts}) == len(pts)
    from moekern.analysis.study.sweep import grid_point_name

    assert grid_point_name("x", 8, None, 0) == "x_c8_drandom_r0"


def test_grid_plan_text_and_timing_constants(e2e, tmp_path):
    args, _ = _grid_args(e2e, tmp_path, ["--no-preflight"])
    text = e2e.plan_text(args)
    assert "plan serve grid: 1 arm(s)" in text and "8 benches per server" in text
    from moekern.analysis.study.sweep import GridTiming, bench_run_seconds, grid_plan_seconds

    t, g = e2e.grid_timing(), GridTiming()
    # the sweep's defaults are this runner's measured constants (one source of numbers for both estimates)
    assert (t.server_start_first_s, t.server_start_later_s, t.decode_step_s, t.prefill_tok_s, t.server_stop_s,
            t.preflight_s) == (g.server_start_first_s, g.server_start_later_s, g.decode_step_s, g.prefill_tok_s,
                               g.server_stop_s, g.preflight_s)
    # hand-computed: mean prompt_len 15; per bench 64*16*0.0055/c + 64*15/220000 (+3 s overhead)
    work = lambda c: 64 * 16 * 0.0055 / c + 64 * 15 / 220000.0  # noqa: E731
    assert bench_run_seconds(64, 15, 16, 8, 128) == pytest.approx(work(8))
    want = 106.0 + 15.0 + (work(32) + 3.0) + 2 * 2 * (work(8) + work(32) + 6.0) + 10.0
    assert e2e.grid_plan_estimate(args, 1) == pytest.approx(want)
    assert grid_plan_seconds(2, [8], 1, 1, 64, 15, 16, 128, g, preflight=True) == pytest.approx(
        50.0 + 106.0 + 66.0 + 2 * (15.0 + 2 * (work(8) + 3.0) + 10.0))
    assert "exceeds --budget-s" in e2e.plan_text(_grid_args(e2e, tmp_path, ["--budget-s", "10"])[0])


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
def test_grid_argument_errors(e2e, argv, match, capsys):
    with pytest.raises(SystemExit) as exc:
        e2e.parse_args(argv)
    assert exc.value.code == 2 and match in capsys.readouterr().err


def test_count_jit_between_markers(e2e):
    s, e = e2e.GRID_POINT_START, e2e.GRID_POINT_END
    text = _log(f"{s} a_c8_r0", _JIT_MOE_VERBOSE, f"{e} a_c8_r0", f"{s} a_c128_r0", f"{e} a_c128_r0",
                f"{s} a_c12_r0", _JIT_ATTN, _JIT_MOE_VERBOSE)
    assert e2e.count_jit_between(text, f"{s} a_c8_r0\n", f"{e} a_c8_r0\n")["jit"] == 1
    assert e2e.count_jit_between(text, f"{s} a_c128_r0\n", f"{e} a_c128_r0\n")["jit"] == 0
    assert e2e.count_jit_between(text, f"{s} a_c12_r0\n", f"{e} a_c12_r0\n")["jit"] == 2  # unterminated: to the end
    assert e2e.count_jit_between(text, f"{s} a_c1_r0\n", f"{e} a_c1_r0\n") is None


def test_child_bench_grid_marks_times_and_skips_over_budget(e2e, tmp_path):
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
        assert e2e.child_bench_grid(str(tmp_path / "spec.json"), bench=bench) == 0
    finally:
        os.close(fd)
    assert ran == ["p0", "bad"]  # p2 over budget: it and everything after it skipped, never started
    prog = e2e._read_progress(tmp_path / "progress.jsonl")
    assert prog["p0"]["rc"] == 0 and prog["p0"]["start"] <= prog["p0"]["end"]
    assert prog["p1"]["rc"] == 1 and "SystemExit" in prog["p1"]["error"]
    assert "skipped" in prog["p2"] and "skipped" in prog["p3"]
    text = log.read_text()
    assert text.index(f"{e2e.GRID_POINT_START} p0") < text.index(f"{e2e.GRID_POINT_END} p0") < \
        text.index(f"{e2e.GRID_POINT_START} p1")
    assert "p2" not in text


def _gate_rec(t, counts, step):
    from moekern.gatelog import GateRecord

    return GateRecord(step=step, layer=0, expert_counts=counts, num_tokens=sum(counts) // 2, top_k=2,
                      phase="decode", time=t)


def test_serve_grid_whole_path_with_fake_server_and_bench(e2e, tmp_path, monkeypatch):
    """run_serve_grid_arm with a fake server, fake warm-up bench and a fake bench child (the real child loop,
    in process, with a fake bench): per-point result files with their moekern block, per-point JIT counts,
    then load_runs attaching each point's CV from the gate-log records inside its window; a second call
    resumes (runs nothing)."""
    from moekern.gatelog import write_records

    (tmp_path / "in").mkdir()
    args, ds = _grid_args(e2e, tmp_path / "in")
    args.grid_reps = 1
    args.gate_log_dir = tmp_path / "gl"
    args.num_arms = 1
    state = {"server_log": None, "cmds": [], "steps": 1, "env": None}
    # per dataset: a uniform (CV 0) or one-hot (CV sqrt(3)) load over 4 experts in that point's window
    loads = {"000_0.2000": [10, 10, 10, 10], "001_0.8000": [40, 0, 0, 0]}

    def fake_bench(argv):
        name = _flag(argv, "--result-filename")
        ds_name = Path(_flag(argv, "--dataset-path")).stem
        conc = int(_flag(argv, "--max-concurrency"))
        now = time.time()
        recs = [_gate_rec(now + 1e-4 * k, loads[ds_name], state["steps"] + k) for k in range(3)]
        state["steps"] += 3
        write_records(Path(state["env"]["MOEKERN_GATE_LOG_DIR"]) / "gate_log.rank0.jsonl", recs)  # the plugin
        if conc == 32 and ds_name == "001_0.8000":  # this point compiles while measured
            state["server_log"].write(_log(_JIT_MOE_VERBOSE))
            state["server_log"].flush()
        time.sleep(0.01)
        Path(_flag(argv, "--result-dir"), name).write_text(json.dumps(
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
            return _FakeProc(rc=None)
        if "--child-bench-grid" in cmd:
            assert kw["pass_fds"] == (state["server_log"].fileno(),)
            rc = e2e.child_bench_grid(cmd[-1], bench=fake_bench)
            return _FakeProc(rc)
        # the warm-up `vllm bench serve` (a compile there is not counted)
        state["server_log"].write(_log(_JIT_ATTN))
        state["server_log"].flush()
        Path(_flag(cmd, "--result-dir"), _flag(cmd, "--result-filename")).write_text(json.dumps(
            {"duration": 1.0, "output_throughput": 1.0}))
        return _FakeProc()

    _fake_server(monkeypatch, e2e, popen)
    out = tmp_path / "out"
    out.mkdir()
    r = e2e.run_serve_grid_arm(args, "moekern", out, deadline=time.time() + 3600)
    assert "error" not in r, r.get("error")
    warm = [c for c in state["cmds"] if c[:3] == ["vllm", "bench", "serve"]]
    assert len(warm) == 1 and _flag(warm[0], "--max-concurrency") == "32"  # the largest concurrency
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
    r2 = e2e.run_serve_grid_arm(args, "moekern", out, deadline=time.time() + 3600)
    assert r2["already_done"] == 4 and len(state["cmds"]) == n  # resumed: no server started


def test_serve_grid_budget_skips_points_without_half_writing(e2e, tmp_path, monkeypatch):
    args, _ = _grid_args(e2e, tmp_path)

    def popen(cmd, stdout, **kw):
        if cmd[:2] == ["vllm", "serve"]:
            return _FakeProc(rc=None)
        if "--child-bench-grid" in cmd:
            spec = json.loads(Path(cmd[-1]).read_text())
            assert spec["deadline"] < time.time() + 100  # the budget's deadline reaches the child
            return _FakeProc(e2e.child_bench_grid(cmd[-1], bench=lambda argv: 0 / 0))
        Path(_flag(cmd, "--result-dir"), _flag(cmd, "--result-filename")).write_text("{}")
        return _FakeProc()

    _fake_server(monkeypatch, e2e, popen)
    r = e2e.run_serve_grid_arm(args, "moekern", tmp_path / "out", deadline=time.time() + 5)
    # every point's estimate (>= 3 s overhead) would end after deadline - server stop: all skipped, none written
    assert len(r["points_skipped"]) == 8 and not r["points_written"]
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").glob("*"))


def test_serve_grid_falls_back_to_bench_subprocesses(e2e, tmp_path, monkeypatch):
    """The child exits 3 when vLLM's bench cannot be imported in process: the parent re-runs it with
    in_process false (one `vllm bench serve` per point)."""
    args, _ = _grid_args(e2e, tmp_path)
    seen = []

    def popen(cmd, stdout, **kw):
        if cmd[:2] == ["vllm", "serve"]:
            return _FakeProc(rc=None)
        if "--child-bench-grid" in cmd:
            spec = json.loads(Path(cmd[-1]).read_text())
            seen.append(spec["in_process"])
            return _FakeProc(3 if spec["in_process"] else 0)
        Path(_flag(cmd, "--result-dir"), _flag(cmd, "--result-filename")).write_text("{}")
        return _FakeProc()

    _fake_server(monkeypatch, e2e, popen)
    r = e2e.run_serve_grid_arm(args, "moekern", tmp_path / "out", deadline=time.time() + 3600)
    assert seen == [True, False] and r["bench_in_process"] is False
    # the child with in_process false and no vLLM on this machine: vllm bench serve argv per point
    spec = json.loads((tmp_path / "out" / "grid_moekern" / "grid.spec.json").read_text())
    assert spec["points"][0]["argv"][:2] == ["--backend", "vllm"] and "--max-concurrency" in spec["points"][0]["argv"]


def test_main_plan_only_prints_the_grid_estimate(e2e, tmp_path, capsys):
    ds = tmp_path / "000_0.5000.jsonl"
    ds.write_text(json.dumps({"prompt": "x", "prompt_len": 20}) + "\n")
    rc = e2e.main(["--mode", "serve", "--arms", "vllm,moekern", "--concurrency-grid", "8,32,128", "--datasets",
                   str(ds), "--result-dir", str(tmp_path / "runs"), "--plan-only"])
    out = capsys.readouterr().out
    assert rc == 0 and "plan serve grid: 2 arm(s)" in out and "min in all with preflight" in out
    assert not (tmp_path / "runs").exists()


@pytest.fixture(scope="module")
def check_equal():
    yield from _script_module("moekern_e2e_check_equal", E2E / "check_equal.py")


def test_check_equal_runs_run_e2es_offline_path_with_its_own_defaults(check_equal, tmp_path, monkeypatch):
    """check_equal.py through run_e2e's real offline path, the child faked: every field run_offline_arm reads
    is in its arguments (a hand-built namespace once lacked dummy_router_seed and failed only on the GPU),
    the three arms run in order, equal tokens give equal=True and exit 0, a differing token exit 1; with
    --tensor-parallel-size 2 every rank must have written its gate log."""
    from moekern.gatelog import GateRecord, write_records

    env_seen, tokens = [], {"moekern-routing-log": [[1, 2, 3], [4, 5, 6]]}
    log_ranks = [0]

    def popen(cmd, stdout, env=None, **kw):
        spec = json.loads(Path(cmd[-1]).read_text())
        env_seen.append(env.get("MOEKERN_KERNELS"))
        arm = Path(spec["result"]).stem.removeprefix("offline_")
        if env.get("MOEKERN_GATE_LOG_DIR"):  # what the plugin writes in each rank's worker
            d = Path(env["MOEKERN_GATE_LOG_DIR"])
            d.mkdir(parents=True, exist_ok=True)
            for rank in log_ranks:
                write_records(d / f"gate_log.rank{rank}.jsonl",
                              [GateRecord(step=0, layer=0, expert_counts=[3, 1], num_tokens=2, rank=rank, top_k=2)])
        Path(spec["result"]).write_text(json.dumps({
            "init_s": 1.0, "runs": [{"output_tok_s": 5.0}], "output_tok_s": 5.0, "plugin": "unavailable: x",
            "token_ids": tokens.get(arm, [[1, 2, 3], [4, 5, 6]])}))
        assert spec["save_tokens"] is True and spec["warmup_reps"] == 0
        return _FakeProc()

    monkeypatch.setattr(check_equal.run_e2e.subprocess, "Popen", popen)
    monkeypatch.setattr(check_equal.run_e2e, "plugin_entry_point", lambda: "moekern.vllm:register")
    assert check_equal.main(["--model", "mixtral", "--out", str(tmp_path / "a")]) == 0
    report = json.loads((tmp_path / "a" / "check_equal.json").read_text())
    assert report["equal"] and report["off_vs_off"]["prompts_differing"] == 0
    assert env_seen == ["off", "off", "routing"]
    tokens["moekern-routing-log"] = [[1, 2, 3], [4, 9, 6]]
    assert check_equal.main(["--model", "mixtral", "--no-baseline", "--out", str(tmp_path / "b")]) == 1
    report = json.loads((tmp_path / "b" / "check_equal.json").read_text())
    assert report["routing_vs_off"] == {"prompts_differing": 1, "of": 2,
                                        "first_difference": {"prompt": 1, "position": 1}}
    # tensor parallelism: the engine gets the flags; equal tokens but rank 1's gate log missing -> exit 1
    tokens["moekern-routing-log"] = [[1, 2, 3], [4, 5, 6]]
    assert check_equal.main(["--model", "mixtral", "--no-baseline", "--tensor-parallel-size", "2",
                             "--enable-expert-parallel", "--out", str(tmp_path / "c")]) == 1
    report = json.loads((tmp_path / "c" / "check_equal.json").read_text())
    assert report["equal"] and report["expert_parallel"] and report["gate_log_ranks"] == {
        "ok": False, "ranks": [0], "want": [0, 1]}
    spec = json.loads(next((tmp_path / "c").rglob("offline_vllm*.spec.json")).read_text())
    assert spec["engine"]["tensor_parallel_size"] == 2 and spec["engine"]["enable_expert_parallel"] is True
    log_ranks[:] = [0, 1]
    assert check_equal.main(["--model", "mixtral", "--no-baseline", "--tensor-parallel-size", "2",
                             "--out", str(tmp_path / "d")]) == 0
    report = json.loads((tmp_path / "d" / "check_equal.json").read_text())
    assert report["gate_log_ranks"]["ok"] and report["gate_log"]["ranks"] == {"0": 1, "1": 1}
    with pytest.raises(SystemExit):  # expert parallelism over one rank
        check_equal.main(["--model", "mixtral", "--enable-expert-parallel", "--out", str(tmp_path / "e")])


def test_moe_configs_reach_every_arm_and_the_results(e2e, tmp_path, capsys):
    """--moe-configs: checked when parsed, passed to each arm as MOEKERN_MOE_CONFIGS (the parent's own MOEKERN_*
    never leak), and copied beside the results with the rows it lays over the tile table."""
    cfg = {"block_m": 64, "block_n": 128, "block_k": 64, "group_m": 1, "num_warps": 4, "num_stages": 3}
    rows = tmp_path / "tune.json"
    rows.write_text(json.dumps({"rows": [{"model": "mixtral", "M": 128, "E": 8, "I": 14336, "H": 4096,
                                          "today_us": 1300.0, "best": {"gemm1": cfg, "gemm2": cfg, "us": 1000.0}}]}))
    args = _ready(e2e, ["--mode", "offline", "--moe-configs", str(rows)])
    env = e2e.arm_env("moekern", tmp_path, None, base_env={"MOEKERN_MOE_CONFIGS": "/stale.json"},
                      moe_configs=args.moe_configs)
    assert env["MOEKERN_MOE_CONFIGS"] == str(rows)
    assert "MOEKERN_MOE_CONFIGS" not in e2e.arm_env("vllm", tmp_path, None, base_env={"MOEKERN_MOE_CONFIGS": "x"})
    record = e2e.copy_moe_configs(args.moe_configs, tmp_path / "out")
    assert record["rows"] == [[8, 14336, 4096, 128]]
    assert json.loads(Path(record["files"][0]["copy"]).read_text()) == json.loads(rows.read_text())
    assert e2e.copy_moe_configs(None, tmp_path / "out") is None
    broken = tmp_path / "broken.json"
    broken.write_text("{broken")
    with pytest.raises(SystemExit) as exc:
        e2e.parse_args(["--mode", "offline", "--moe-configs", str(broken)])
    assert exc.value.code == 2 and "MOEKERN_MOE_CONFIGS: cannot read tuned rows" in capsys.readouterr().err


def test_ratio_ci(e2e):
    assert e2e.ratio_ci([1.0], [2.0, 3.0]) is None
    lo, hi = e2e.ratio_ci([100.0, 101.0, 99.0, 100.5], [110.0, 111.0, 109.0, 110.5])
    assert 1.07 < lo <= 1.1 <= hi < 1.13
    assert e2e.ratio_ci([100.0, 101.0, 99.0], [110.0, 111.0, 109.0]) == e2e.ratio_ci([100.0, 101.0, 99.0],
                                                                                    [110.0, 111.0, 109.0])
    wide = e2e.ratio_ci([80.0, 120.0, 100.0, 90.0], [85.0, 125.0, 105.0, 95.0])
    assert wide[0] < 1.0 < wide[1]  # noisy passes: the interval says the 5 % is not resolved


def test_gate_log_overhead_line_and_ci(e2e):
    mk = lambda xs: {"runs": [{"output_tok_s": x} for x in xs], "output_tok_s": sorted(xs)[len(xs) // 2],  # noqa: E731
                     "jit_during_measurement": 0, "autotune_during_measurement": 0}
    res = {"offline": {"moekern-routing": mk([100.0, 101.0, 99.0]), "moekern-routing-log": mk([95.0, 96.0, 94.0])}}
    s = e2e.summarize(res)
    assert s["offline.gate_log_overhead"] == 0.05
    lo, hi = s["offline.gate_log_overhead_ci95"]
    assert lo <= 0.05 <= hi
    assert f"gate_log_overhead = 5.0% (rep spread 2.1%), 95 % CI {lo:.1%} to {hi:.1%}" in e2e.format_summary(res, s)


@pytest.fixture(scope="module")
def pool():
    yield from _script_module("moekern_e2e_pool_runs", E2E / "pool_runs.py")


def _e2e_result(d, vllm, moekern, max_num_seqs=128, jit=0, rounds=None):
    d.mkdir(parents=True)
    arm = lambda xs, j: {"runs": [{"output_tok_s": x} for x in xs], "jit_during_measurement": j,  # noqa: E731
                         "autotune_during_measurement": 0, **({"rounds": rounds[0]} if rounds else {})}
    res = {"meta": {"model": "mixtral-8x7b-4l", "workload": {"num_prompts": 512, "input_len": 256, "output_len": 128},
                    "engine": {"max_num_seqs": max_num_seqs}},
           "offline": {"vllm": arm(vllm, 0), "moekern": {**arm(moekern, jit),
                                                         **({"rounds": rounds[1]} if rounds else {})}}}
    (d / "e2e_mixtral-8x7b-4l.json").write_text(json.dumps(res))
    return d


def test_pool_runs(pool, tmp_path, capsys):
    rounds = ([{"output_tok_s": 100.0}, {"output_tok_s": 104.0}], [{"output_tok_s": 99.0}, {"output_tok_s": 106.0}])
    a = _e2e_result(tmp_path / "a", [100.0, 102.0, 98.0], [99.0, 101.0, 97.0], rounds=rounds)
    b = _e2e_result(tmp_path / "b", [104.0, 106.0, 105.0], [107.0, 108.0, 106.0])
    p = pool.pool([a, b], "vllm", "moekern")
    assert p["pooled"]["n"] == (6, 6) and p["pooled"]["base_median"] == 103.0
    assert p["pooled"]["arm_median"] == 103.5 and p["pooled"]["ratio"] == pytest.approx(103.5 / 103.0)
    assert p["runs"][0]["by_round"] == pytest.approx([0.99, 106 / 104]) and p["runs"][1]["by_round"] == []
    assert pool.main([str(a), str(b)]) == 0
    assert "pooled: 103 vs 104 tok/s, ratio 1.005" in capsys.readouterr().out
    c = _e2e_result(tmp_path / "c", [1.0, 2.0], [1.0, 2.0], max_num_seqs=256)
    assert pool.main([str(a), str(c)]) == 2 and "differ from the first" in capsys.readouterr().err
    u = _e2e_result(tmp_path / "u", [1.0, 2.0], [1.0, 2.0], jit=3)
    assert pool.main([str(u)]) == 2 and "not steady state" in capsys.readouterr().err
    assert pool.main([str(u), "--include-unsteady"]) == 0
    assert pool.main([str(a), "--arm", "flashinfer"]) == 2 and "no timed offline passes" in capsys.readouterr().err


def test_check_gate_logs_reports_the_recorders_cost(e2e, tmp_path):
    from moekern.gatelog.writer import GateLogRecorder

    rec = GateLogRecorder(tmp_path, rank=0)
    rec.register_layer("l0", 4, 2)
    rec.ensure_buffer("cpu")
    for _ in range(3):
        rec.begin_step()
        rec.add_counts(0, torch.tensor([1, 0, 1, 0], dtype=torch.int32))
        rec.end_step("decode", 1)
    rec.close()
    got = e2e.check_gate_logs(tmp_path)
    assert got["ok"] and got["steps"] == 3 and got["dropped_steps"] == 0
    assert len(got["host_us_per_step"]) == 1 and got["host_us_per_step"][0] > 0
    assert len(got["writer_cpu_seconds"]) == 1 and got["writer_cpu_seconds"][0] >= 0


# ---- --gate-log-paired: gate log on / paused passes in one engine ------------------------------------------
def test_paired_plan_and_pairs_are_adjacent_abba(e2e):
    assert e2e.paired_plan(8) == [True, False, False, True, True, False, False, True]
    runs = [{"output_tok_s": 100.0 + i, "gate_log": on} for i, on in enumerate(e2e.paired_plan(6))]
    assert e2e.paired_passes(runs) == [[100.0, 101.0], [103.0, 102.0], [104.0, 105.0]]


def test_paired_overhead_and_interval(e2e):
    assert e2e.paired_overhead([]) is None
    one = e2e.paired_overhead([[98.0, 100.0]])
    assert one == {"n_pairs": 1, "overhead": 0.02}  # no interval from one pair
    even = e2e.paired_overhead([[98.0, 100.0], [49.0, 50.0], [196.0, 200.0]])
    assert even["overhead"] == pytest.approx(0.02, abs=1e-4) and even["ci95"] == [0.02, 0.02]
    noisy = e2e.paired_overhead([[97.0, 100.0], [100.0, 99.0], [95.0, 100.0], [99.0, 100.0]])
    lo, hi = noisy["ci95"]
    assert lo < noisy["overhead"] < hi and lo < 0.02 < hi
    assert noisy == e2e.paired_overhead([[97.0, 100.0], [100.0, 99.0], [95.0, 100.0], [99.0, 100.0]])  # seeded


def test_paired_mode_flows_through_spec_merge_and_summary(e2e, tmp_path):
    args = _ready(e2e, ["--mode", "offline", "--arms", "moekern-routing-log,vllm", "--reps", "4", "--gate-log-paired"])
    assert e2e.offline_spec(args, "moekern-routing-log", tmp_path / "r.json")["gate_log_paired"] is True
    assert e2e.offline_spec(args, "vllm", tmp_path / "r.json")["gate_log_paired"] is False  # no gate log there
    with pytest.raises(SystemExit):
        e2e.parse_args(["--mode", "offline", "--reps", "3", "--gate-log-paired"])
    r0 = {"arm": "moekern-routing-log", "rc": 0, "runs": [{"seconds": 1.0, "output_tok_s": 98.0}],
          "jit_during_measurement": 0, "gate_log_paired": {"pairs": [[98.0, 100.0], [97.0, 99.0]]}}
    r1 = {**r0, "gate_log_paired": {"pairs": [[99.0, 100.0]]}}
    merged = e2e.merge_rounds([r0, r1])
    assert merged["gate_log_paired"]["n_pairs"] == 3 and len(merged["gate_log_paired"]["pairs"]) == 3
    results = {"offline": {"moekern-routing-log": merged}}
    s = e2e.summarize(results)
    assert s["offline.moekern-routing-log_gate_log_overhead_paired_n"] == 3
    assert 0.0 < s["offline.moekern-routing-log_gate_log_overhead_paired"] < 0.03
    assert "paired passes in one engine" in e2e.format_summary(results, s)


def test_gate_log_cost_from_plugin_summaries_in_the_summary(e2e):
    def run(us, snap):
        return {"arm": "moekern-routing-log", "rc": 0, "runs": [{"seconds": 1.0, "output_tok_s": 90.0}],
                "jit_during_measurement": 0,
                "plugin": [{"gate_log": {"host_us_per_step": us, **({"snapshot": snap} if snap else {})}}]}
    assert e2e.gate_log_cost({"plugin": "unavailable: no such method"}) is None
    assert e2e.gate_log_cost(run(100.0, None)) == {"host_us_per_step": 100.0, "hand_off": ["torch calls"]}
    merged = e2e.merge_rounds([run(100.0, "moekern gatelog_snapshot kernel"), run(60.0, "moekern gatelog_snapshot kernel")])
    results = {"offline": {"moekern-routing-log": merged}}
    s = e2e.summarize(results)
    assert s["offline.moekern-routing-log_gate_log_host_us_per_step"] == [100.0, 60.0]
    assert s["offline.moekern-routing-log_gate_log_hand_off"] == ["moekern gatelog_snapshot kernel"]
    assert "gate log on the model thread 100, 60 us/step" in e2e.format_summary(results, s)
    single = e2e.summarize({"offline": {"moekern-routing-log": run(120.0, None)}})  # one round: not merged
    assert single["offline.moekern-routing-log_gate_log_host_us_per_step"] == [120.0]
