"""The preflight (moekern.e2e.preflight, checklist, preflight_vllm) and the runner's use of it: the check list's
PASS/FAIL/SKIP report, its expectations against vLLM 0.26's source, and a FAIL stopping every arm."""

import importlib.util
import json
import subprocess

import pytest
from e2e_fakes import VLLM_REF

from moekern.e2e import cli, preflight, runner
from moekern.e2e.args import parse_args
from moekern.e2e.arms import arm_env, gate_log_dir
from moekern.e2e.checklist import Skip, check_signature, failures, report, resolve, run_checks, source_has
from moekern.e2e.offline import offline_spec
from moekern.e2e.preflight_vllm import SIGNATURES, SOURCE_FACTS
from moekern.e2e.runner import preflight_command, prepare_model_dir, run_preflight
from moekern.e2e.warmup import warmup_plan


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
def test_preflight_expectations_match_vllm_026_source():
    """The signatures and source facts the preflight asserts on the GPU machine hold in vLLM 0.26's source,
    so a preflight FAIL there means a different vLLM, not a wrong expectation."""
    for module, qualname, positional, keyword_only in SIGNATURES:
        node, _ = _ref_def(module, qualname)
        a = node.args
        pos = [x.arg for x in a.posonlyargs + a.args]
        assert pos[: len(positional)] == positional, (qualname, pos)
        assert set(keyword_only) <= {x.arg for x in a.kwonlyargs}, (qualname, [x.arg for x in a.kwonlyargs])
    for module, qualname, needles in SOURCE_FACTS:
        _, src = _ref_def(module, qualname)
        assert all(n in src for n in needles), (qualname, [n for n in needles if n not in src])
    # our own call sites use exactly these shapes
    from moekern.vllm import hooks
    import inspect

    assert "def _compute_routing(hidden_states, router_logits, indices_type, *, input_ids=None)" in \
        inspect.getsource(hooks)


def test_check_signature_and_resolve():
    def f(self, a, b, *, c=None):
        pass

    assert check_signature(f, ["self", "a"], ["c"]).endswith(".f(self, a, b, *, c=None)")
    with pytest.raises(AssertionError, match=r"expected positional parameters \['self', 'b'\], got \['self', 'a', 'b'\]"):
        check_signature(f, ["self", "b"])
    with pytest.raises(AssertionError, match=r"keyword-only \['d'\]"):
        check_signature(f, ["self"], ["d"])
    assert check_signature(lambda self, **kw: None, ["self"], ["anything"])  # **kwargs accepts it
    assert resolve("json", "decoder.JSONDecoder.decode") is json.decoder.JSONDecoder.decode
    with pytest.raises(AssertionError, match="no attribute 'nope'"):
        resolve("json", "decoder.nope")
    source_has(test_check_signature_and_resolve, "resolve(")
    with pytest.raises(AssertionError, match="lacks"):
        source_has(test_check_signature_and_resolve, "not" + "-there")


def test_run_checks_and_report(capsys):
    def boom():
        raise RuntimeError("kaput")

    def skip():
        raise Skip("no CUDA device")

    res = run_checks([("a", lambda: "fine"), ("b", skip), ("c", boom), ("d", lambda: "x")])
    assert [(r.name, r.status) for r in res] == [("a", "PASS"), ("b", "SKIP"), ("c", "FAIL"), ("d", "PASS")]
    assert res[2].detail.startswith("RuntimeError: kaput (at ")
    assert report(res) == 1
    out = capsys.readouterr().out
    assert "FAIL c: RuntimeError: kaput" in out and "preflight: 2 pass, 1 fail, 1 skip" in out
    assert failures(out) == [res[2].line()]
    res = run_checks([("root", boom), ("x", lambda: "never")], {"root": "root is down"})
    assert [(r.status, r.detail) for r in res][1] == ("SKIP", "root is down")
    assert report(run_checks([("a", lambda: None), ("b", skip)])) == 0


def test_preflight_args(capsys):
    a = preflight.parse_args([])
    assert a.arms == ["vllm", "flashinfer", "moekern-routing", "moekern-routing-log", "moekern"] and a.mode == "offline"
    with pytest.raises(SystemExit) as e:
        preflight.parse_args(["--arms", "vllm,fast"])
    assert e.value.code == 2 and "unknown arm(s) ['fast']" in capsys.readouterr().err
    checks, _ = preflight.build_checks(preflight.parse_args(["--arms", "vllm", "--mode", "offline"]))
    names = [n for n, _ in checks]
    assert names[0] == "vllm imports" and not any("serve" in n or "FlashInfer" in n for n in names)
    assert "signature BaseRouter._compute_routing" in names and "source MoERunner.__init__" in names
    checks, _ = preflight.build_checks(preflight.parse_args(["--arms", "flashinfer,moekern", "--mode", "both"]))
    names = [n for n, _ in checks]
    assert {"`vllm serve` command line parses", "`vllm bench serve` command line parses",
            "FlashInfer CUTLASS MoE available (flashinfer arm)", "moekern.fused_moe on the GPU (MOEKERN_KERNELS=all)"} <= set(names)


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vllm is installed here")
def test_preflight_without_vllm_fails_first_and_skips_the_rest(capsys):
    assert preflight.main(["--arms", "vllm,moekern"]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("FAIL vllm imports: ModuleNotFoundError")
    body = [l for l in lines[1:] if l.startswith(("PASS", "FAIL", "SKIP"))]
    assert body and all(l.startswith("SKIP ") and l.endswith("vllm is not importable") for l in body)


class _Proc:
    def __init__(self, rc, out):
        self.returncode, self.stdout, self.stderr = rc, out, ""


def test_run_preflight_reports_failures():
    args = parse_args(["--quick", "--mode", "both", "--arms", "vllm,moekern"])
    cmd = preflight_command(args)
    assert cmd[1:3] == ["-m", "moekern.e2e.preflight"]
    assert cmd[3:] == ["--arms", "vllm,moekern", "--mode", "both", "--model", "mixtral-8x7b-4l"]
    seen = {}

    def run(cmd, **kw):
        seen.update(kw)
        return _Proc(1, "PASS a\nFAIL b: gone\npreflight: 1 pass, 1 fail, 0 skip\n")

    ok, text = run_preflight(args, run=run)
    assert not ok and "FAIL b: gone" in text
    assert seen["env"]["MOEKERN_KERNELS"] == "off" and seen["timeout"] > 0
    ok, text = run_preflight(args, run=lambda cmd, **kw: _Proc(139, "Segmentation fault\n"))
    assert not ok and text.splitlines()[-1] == "FAIL preflight: exited 139 without a report"

    def slow(cmd, **kw):
        raise subprocess.TimeoutExpired(cmd, kw["timeout"])

    ok, text = run_preflight(args, run=slow, timeout=5)
    assert not ok and text.startswith("FAIL preflight: timed out after 5s")
    assert run_preflight(args, run=lambda cmd, **kw: _Proc(0, "PASS a\n")) == (True, "PASS a\n")


def test_main_refuses_arms_when_preflight_fails(tmp_path, monkeypatch, capsys):
    started = []
    monkeypatch.setattr(runner, "run_offline_arm", lambda args, arm, out, extra_spec=None, round_no=None:
                        started.append(arm) or {"arm": arm, "rc": 0, "output_tok_s": 1.0})
    monkeypatch.setattr(runner, "run_preflight", lambda args: (False, "PASS a\nFAIL vllm imports: nope\n"))
    assert cli.main(["--quick", "--mode", "offline", "--arms", "vllm", "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert started == [] and "preflight FAILED (1)" in err and "FAIL vllm imports: nope" in err
    assert (tmp_path / "preflight.log").read_text().startswith("PASS a")

    def must_not_run(args):
        raise AssertionError("preflight ran despite --no-preflight")

    monkeypatch.setattr(runner, "run_preflight", must_not_run)
    assert cli.main(["--quick", "--mode", "offline", "--arms", "vllm", "--out", str(tmp_path), "--no-preflight"]) == 0
    assert started == ["vllm"]
    monkeypatch.setattr(runner, "run_preflight", lambda args: (True, "PASS a\n"))
    assert cli.main(["--quick", "--mode", "offline", "--arms", "vllm", "--out", str(tmp_path)]) == 0
    assert started == ["vllm", "vllm"]


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


def test_olmoe_gate_log_run_is_planned_right(tmp_path):
    """The AR gate-log run of the LLaDA-MoE-shaped model (OLMoE shape: E=64, k=8, H=2048, 16 layers) for the
    diffusion comparison: one timed pass, no warm-up passes, gate logs of the routing-log arm only."""
    from moekern.models import get_model

    argv = ["--model", "olmoe-1b-7b", "--mode", "offline", "--arms", "moekern-routing-log", "--quick",
            "--warmup-reps", "0", "--reps", "1"]
    args = parse_args(argv)
    llada, olmoe = get_model("llada-moe-7b"), get_model("olmoe")
    for f in ("hidden_size", "num_experts", "top_k", "num_layers"):
        assert getattr(llada, f) == getattr(olmoe, f), f  # the shape the AR run stands in for
    assert args.vocab == olmoe.vocab_size and args.attention_backend == "TRITON_ATTN"
    assert args.arm_plan == {"offline": ["moekern-routing-log"]} and (args.reps, args.warmup_reps) == (1, 0)
    prepare_model_dir(args, tmp_path)
    cfg = json.loads((args.model_dir / "config.json").read_text())
    assert (cfg["num_experts"], cfg["num_experts_per_tok"], cfg["hidden_size"], cfg["num_hidden_layers"]) == \
        (64, 8, 2048, 16) and not args.has_tokenizer  # offline needs none (skip_tokenizer_init)
    assert gate_log_dir(args, "moekern-routing-log", tmp_path) == tmp_path / "gate_logs" / "moekern-routing-log"
    spec = offline_spec(args, "moekern-routing-log", tmp_path / "r.json")
    assert spec["warmup_reps"] == 0 and warmup_plan(spec["num_prompts"], spec["output_len"], 0) == []
    assert arm_env("moekern-routing-log", tmp_path, tmp_path / "g", base_env={})["MOEKERN_KERNELS"] == "routing"
    assert preflight_command(args)[3:] == ["--arms", "moekern-routing-log", "--mode", "offline", "--model",
                                               "olmoe-1b-7b"]
    checks, _ = preflight.build_checks(preflight.parse_args(["--arms", "moekern-routing-log", "--model", "olmoe-1b-7b"]))
    assert "model config fields vLLM reads" in [n for n, _ in checks]


def test_hook_layer_routes_one_layer_as_the_engine_would():
    """moekern.vllm.hooks.hook_layer, the preflight's way in: a router of vLLM's FusedTopKRouter kind is routed
    by moekern with MOEKERN_KERNELS=routing (top-2 of softmax, as torch computes it) and left to vLLM's own
    _compute_routing with kernels off; a layer without a router is refused."""
    from types import SimpleNamespace

    import torch

    from moekern.vllm import hooks
    from moekern.vllm.config import PluginConfig

    class FusedTopKRouter:  # the attributes routing_map reads of vLLM's class of that name
        top_k, global_num_experts, scoring_func, renormalize = 2, 8, "softmax", True

        def __init__(self):
            self.calls = 0

        def _compute_routing(self, hidden_states, router_logits, indices_type, *, input_ids=None):
            self.calls += 1
            return torch.ones(router_logits.shape[0], 2), torch.zeros(router_logits.shape[0], 2, dtype=torch.int32)

    logits = torch.randn(5, 8, generator=torch.Generator().manual_seed(0))
    want_w, want_ids = torch.softmax(logits, -1).topk(2, -1)
    router = FusedTopKRouter()
    layer = SimpleNamespace(layer_name="m.layers.0.experts", router=router, routed_experts=None)
    hook = hooks.hook_layer(layer, PluginConfig(kernels="routing"))
    assert hook.name == "m.layers.0.experts" and "_compute_routing" in vars(router)
    w, ids = router._compute_routing(logits, logits, None)
    assert router.calls == 0 and torch.equal(ids.long(), want_ids)
    torch.testing.assert_close(w, want_w / want_w.sum(-1, keepdim=True), rtol=1e-5, atol=1e-6)
    assert hook.plans[8] is not None and "FusedTopKRouter" in hook.plans[8].why
    router = FusedTopKRouter()
    hooks.hook_layer(SimpleNamespace(layer_name="m.layers.1.experts", router=router, routed_experts=None),
                     PluginConfig(kernels="off"))
    router._compute_routing(logits, logits, None)
    assert router.calls == 1
    with pytest.raises(ValueError, match="runner.router=NoneType must be a vLLM BaseRouter"):
        hooks.hook_layer(SimpleNamespace(layer_name="x", router=None, routed_experts=None), PluginConfig())
