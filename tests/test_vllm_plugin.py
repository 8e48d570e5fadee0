"""The vLLM plugin: env parsing, skew, router mapping, phase, hooks on fake vLLM objects (CPU); E2E (GPU)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import ModuleType, SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moekern.gatelog import read_gate_log
from moekern.routing import fused_topk
from moekern.vllm import config_from_env, parse_skew, register, skew_bias, skew_probabilities
from moekern.vllm import hooks, worker_rpc
from moekern.vllm.routing_map import classify_phase, plan_routing

REPO = Path(__file__).resolve().parents[1]


# ---- environment ------------------------------------------------------------------------------------------
def test_env_defaults_are_off():
    cfg = config_from_env({})
    assert cfg.kernels == "off" and cfg.gate_log_dir is None and cfg.skew is None and not cfg.enabled


@pytest.mark.parametrize("value,expected", [("routing", "routing"), ("ALL", "all"), ("off", "off"), ("0", "off")])
def test_env_kernels(value, expected):
    assert config_from_env({"MOEKERN_KERNELS": value}).kernels == expected


@pytest.mark.parametrize("env,match", [
    ({"MOEKERN_KERNELS": "fast"}, "MOEKERN_KERNELS"),
    ({"MOEKERN_GATE_LOG_FLUSH_STEPS": "0"}, "MOEKERN_GATE_LOG_FLUSH_STEPS"),
    ({"MOEKERN_GATE_LOG_QUEUE": "x"}, "MOEKERN_GATE_LOG_QUEUE"),
    ({"MOEKERN_ROUTING_SKEW": "zipf"}, "MOEKERN_ROUTING_SKEW"),
    ({"MOEKERN_ROUTING_SKEW": "hot:1:1.0"}, r"fraction must be in \(0, 1\)"),
    ({"MOEKERN_ROUTING_SKEW": "zipf:1@-2"}, "beta"),
    ({"MOEKERN_GATE_LOG_SNAPSHOT": "fast"}, "MOEKERN_GATE_LOG_SNAPSHOT"),
])
def test_env_bad_values_name_the_variable(env, match):
    with pytest.raises(ValueError, match=match):
        config_from_env(env)


def test_env_topk_sample():
    cfg = config_from_env({})
    assert (cfg.topk_sample, cfg.topk_every) == (0, 1)
    cfg = config_from_env({"MOEKERN_GATE_LOG_TOPK_SAMPLE": "16", "MOEKERN_GATE_LOG_TOPK_EVERY": "4"})
    assert (cfg.topk_sample, cfg.topk_every) == (16, 4)
    with pytest.raises(ValueError, match="MOEKERN_GATE_LOG_TOPK_EVERY=0"):
        config_from_env({"MOEKERN_GATE_LOG_TOPK_EVERY": "0"})
    with pytest.raises(ValueError, match="MOEKERN_GATE_LOG_TOPK_SAMPLE"):
        config_from_env({"MOEKERN_GATE_LOG_TOPK_SAMPLE": "many"})


def test_env_gate_log_snapshot():
    assert config_from_env({}).gate_log_snapshot == "auto"
    assert config_from_env({"MOEKERN_GATE_LOG_SNAPSHOT": "Torch"}).gate_log_snapshot == "torch"


def test_gate_log_alone_enables():
    cfg = config_from_env({"MOEKERN_GATE_LOG_DIR": "/tmp/x", "MOEKERN_GATE_LOG_FLUSH_SECONDS": "0.5"})
    assert cfg.enabled and cfg.gate_log and cfg.kernels == "off" and cfg.flush_seconds == 0.5


def test_env_dummy_router_seed():
    assert config_from_env({}).dummy_router_seed is None
    cfg = config_from_env({"MOEKERN_DUMMY_ROUTER_SEED": "7"})
    assert cfg.dummy_router_seed == 7 and cfg.enabled and cfg.kernels == "off" and not cfg.gate_log
    for bad in ("-1", "x"):
        with pytest.raises(ValueError, match="MOEKERN_DUMMY_ROUTER_SEED"):
            config_from_env({"MOEKERN_DUMMY_ROUTER_SEED": bad})


def _dummy_moe_model(num_layers=3, E=8, H=16, parent="block_sparse_moe"):
    """A module tree named like vLLM's Mixtral: model.layers.{i}.<parent>.{gate, experts}, every gate filled
    with the same values, as vLLM's dummy loader does for same-shaped parameters."""
    layers = torch.nn.ModuleList()
    for _ in range(num_layers):
        block = torch.nn.Module()
        setattr(block, parent, torch.nn.Module())
        moe = getattr(block, parent)
        moe.gate = torch.nn.Linear(H, E, bias=False).to(torch.bfloat16)
        moe.experts = torch.nn.Linear(H, H, bias=False)
        with torch.no_grad():
            moe.gate.weight.copy_(torch.linspace(-1e-3, 1e-3, E * H).view(E, H))
        layers.append(block)
    model = torch.nn.Module()
    model.model = torch.nn.Module()
    model.model.layers = layers
    names = [f"model.layers.{i}.{parent}.experts" for i in range(num_layers)]
    return model, names


def test_reseed_dummy_routers_gives_layers_their_own_router():
    model, names = _dummy_moe_model()
    experts_before = [model.get_submodule(n).weight.clone() for n in names]
    done = hooks.reseed_dummy_routers(model, names, seed=3)
    assert done == [f"model.layers.{i}.block_sparse_moe.gate" for i in range(3)]
    gates = [model.get_submodule(g).weight for g in done]
    assert all(g.dtype == torch.bfloat16 for g in gates)
    for i in range(3):
        for j in range(i + 1, 3):
            assert not torch.equal(gates[i], gates[j])  # independent per layer
    for g in gates:
        assert g.float().abs().max() <= hooks.DUMMY_HIGH and g.float().std() > 1e-4  # vLLM's dummy range
    for n, before in zip(names, experts_before):
        assert torch.equal(model.get_submodule(n).weight, before)  # only routers change
    # Deterministic in (seed, layer index); another seed gives other routers.
    again, _ = _dummy_moe_model()
    hooks.reseed_dummy_routers(again, names, seed=3)
    assert all(torch.equal(a.weight, b.weight) for a, b in
               zip((again.get_submodule(g) for g in done), (model.get_submodule(g) for g in done)))
    other, _ = _dummy_moe_model()
    hooks.reseed_dummy_routers(other, names, seed=4)
    assert not torch.equal(other.get_submodule(done[0]).weight, gates[0])
    # Routing now differs between layers for the same hidden states (it was identical before).
    x = torch.randn(64, 16, dtype=torch.bfloat16)
    ids = [fused_topk(model.get_submodule(g)(x).float(), 2, backend="torch").topk_ids for g in done]
    assert not torch.equal(ids[0], ids[1])


def test_reseed_dummy_routers_skips_layers_without_gate(caplog):
    model, names = _dummy_moe_model(num_layers=2, parent="mlp")
    del model.model.layers[1].mlp.gate
    with caplog.at_level("WARNING"):
        done = hooks.reseed_dummy_routers(model, names, seed=0)
    assert done == ["model.layers.0.mlp.gate"]
    assert "model.layers.1.mlp.gate" in caplog.text


def test_register_off_touches_nothing():
    # A fresh interpreter: register() with no MOEKERN_* set must not import the hooks (nor vLLM).
    code = ("import sys, moekern.vllm as m; assert m.register() is None; "
            "assert 'moekern.vllm.hooks' not in sys.modules and 'vllm' not in sys.modules; print('ok')")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MOEKERN_")}
    env["PYTHONPATH"] = str(REPO)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


# ---- routing skew -----------------------------------------------------------------------------------------
def test_parse_skew_forms():
    assert parse_skew(None) is None and parse_skew("  ") is None
    assert parse_skew("uniform").kind == "uniform"
    z = parse_skew("zipf:1.2@0.05", seed=7)
    assert (z.kind, z.s, z.beta, z.seed) == ("zipf", 1.2, 0.05, 7)
    h = parse_skew("hot:3:0.5")
    assert (h.kind, h.expert, h.fraction, h.beta) == ("hot", 3, 0.5, 1.0)
    for bad in ("zipf:-1", "hot:a:0.5", "hot:1", "uniform:2", "gauss:1"):
        with pytest.raises(ValueError):
            parse_skew(bad)


def test_skew_bias_definitions():
    E = 8
    assert torch.equal(skew_bias(parse_skew("uniform"), E), torch.zeros(E))
    z = parse_skew("zipf:1.5@2.0", seed=3)
    import numpy as np

    rank = np.random.default_rng(3).permutation(E)
    want = torch.tensor([-2.0 * 1.5 * math.log(r + 1) for r in rank], dtype=torch.float32)
    torch.testing.assert_close(skew_bias(z, E), want, rtol=1e-6, atol=1e-6)
    h = skew_bias(parse_skew("hot:2:0.6"), E)
    assert torch.count_nonzero(h) == 1
    assert h[2].item() == pytest.approx(math.log(0.6 * (E - 1) / 0.4), rel=1e-6)
    p = skew_probabilities(parse_skew("hot:2:0.6"), E)
    assert sum(p) == pytest.approx(1.0) and p[2] == pytest.approx(0.6)
    with pytest.raises(ValueError, match="hot expert=9"):
        skew_bias(parse_skew("hot:9:0.5"), E)


@pytest.mark.parametrize("spec", ["zipf:1.0", "hot:5:0.4", "zipf:0.7@0.5"])
def test_skew_is_exact_under_gumbel_logits(spec):
    # The stated calibration: logits = c + Gumbel(0, beta) noise => first choice ~ p (a 200k-sample check).
    skew = parse_skew(spec, seed=1)
    E, N = 8, 200_000
    g = torch.Generator().manual_seed(0)
    u = torch.rand(N, E, generator=g, dtype=torch.float64).clamp_min(1e-12)
    logits = (-torch.log(-torch.log(u))) * skew.beta + 3.0
    first = torch.argmax(logits + skew_bias(skew, E).double(), dim=1)
    freq = torch.bincount(first, minlength=E).double() / N
    torch.testing.assert_close(freq, torch.tensor(skew_probabilities(skew, E), dtype=torch.float64),
                               atol=0.006, rtol=0)


# ---- router mapping: plans reproduce vLLM's routing semantics ---------------------------------------------
def _router(cls_name, **attrs):
    return type(cls_name, (), {})() if not attrs else _with(type(cls_name, (), {})(), attrs)


def _with(obj, attrs):
    for k, v in attrs.items():
        setattr(obj, k, v)
    return obj


def vllm_semantics(logits, top_k, scoring, renormalize, bias=None, G=None, g=None, scale=1.0, group_score="top2"):
    """Our own restatement of vLLM 0.26's routers (fused_topk / fused_topk_bias / grouped_topk), as sets."""
    x = logits.float()
    s = torch.softmax(x, -1) if scoring == "softmax" else torch.sigmoid(x)
    sel = s if bias is None else s + bias
    if G:
        M, E = x.shape
        grouped = sel.view(M, G, E // G)
        gs = grouped.topk(2, -1).values.sum(-1) if group_score == "top2" else grouped.max(-1).values
        keep = torch.zeros(M, G, dtype=torch.bool).scatter_(1, gs.topk(g, -1).indices, True)
        sel = sel.masked_fill(~keep.repeat_interleave(E // G, 1), float("-inf"))
    ids = sel.topk(top_k, -1).indices
    w = s.gather(1, ids)
    if renormalize:
        w = w / w.sum(-1, keepdim=True)
    return w * scale, ids


def _check_plan(router, E, M=64, ref_kwargs=None, seed=0):
    plan, why = plan_routing(router, E)
    assert plan is not None, why
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(M, E, generator=g)
    bias = getattr(router, "e_score_correction_bias", None) if plan.uses_bias else None
    out = fused_topk(logits, plan.top_k, correction_bias=bias, backend="torch", **plan.kwargs)
    w_ref, ids_ref = vllm_semantics(logits, router.top_k, bias=bias, **ref_kwargs)
    # Compare as per-row {id: weight} maps: vLLM's unsorted topk may order the k slots differently.
    for r in range(M):
        got = dict(zip(out.topk_ids[r].tolist(), out.topk_weights[r].tolist()))
        want = dict(zip(ids_ref[r].tolist(), w_ref[r].tolist()))
        assert got.keys() == want.keys(), (r, got, want)
        for e in got:
            assert got[e] == pytest.approx(want[e], rel=1e-5, abs=1e-6)
    assert out.expert_counts.sum().item() == M * plan.top_k
    return plan


def test_mixtral_qwen_olmoe_fused_topk_router():
    for renorm in (True, False):
        r = _router("FusedTopKRouter", top_k=2, scoring_func="softmax", renormalize=renorm, global_num_experts=8)
        _check_plan(r, 8, ref_kwargs=dict(scoring="softmax", renormalize=renorm))
    r = _router("FusedTopKRouter", top_k=4, scoring_func="sigmoid", renormalize=True)
    _check_plan(r, 16, ref_kwargs=dict(scoring="sigmoid", renormalize=True))


def test_deepseek_v3_grouped_sigmoid_bias():
    E = 64
    bias = torch.randn(E, generator=torch.Generator().manual_seed(5)) * 0.1
    r = _router("GroupedTopKRouter", top_k=8, num_expert_group=8, topk_group=4, scoring_func="sigmoid",
                renormalize=True, routed_scaling_factor=2.5, e_score_correction_bias=bias)
    plan = _check_plan(r, E, ref_kwargs=dict(scoring="sigmoid", renormalize=True, G=8, g=4, scale=2.5))
    assert plan.uses_bias and plan.kwargs["num_expert_group"] == 8


def test_fused_topk_bias_router_sigmoid():
    E = 32
    bias = torch.randn(E, generator=torch.Generator().manual_seed(6)) * 0.1
    r = _router("FusedTopKBiasRouter", top_k=6, scoring_func="sigmoid", renormalize=True, routed_scaling_factor=1.5,
                e_score_correction_bias=bias, _hash_indices_table=None, num_fused_shared_experts=0)
    _check_plan(r, E, ref_kwargs=dict(scoring="sigmoid", renormalize=True, scale=1.5))


def test_deepseek_v2_lite_single_group_is_plain_topk():
    r = _router("GroupedTopKRouter", top_k=6, num_expert_group=1, topk_group=1, scoring_func="softmax",
                renormalize=False, routed_scaling_factor=1.0, e_score_correction_bias=None)
    plan = _check_plan(r, 64, ref_kwargs=dict(scoring="softmax", renormalize=False))
    assert "num_expert_group" not in plan.kwargs


def test_grouped_all_groups_kept_is_plain_topk():
    r = _router("GroupedTopKRouter", top_k=6, num_expert_group=4, topk_group=4, scoring_func="softmax",
                renormalize=True, routed_scaling_factor=16.0, e_score_correction_bias=None)
    _check_plan(r, 64, ref_kwargs=dict(scoring="softmax", renormalize=True, scale=16.0))


@pytest.mark.parametrize("cls,attrs,E,needle", [
    ("GroupedTopKRouter", dict(top_k=6, num_expert_group=8, topk_group=3, scoring_func="softmax",
                               e_score_correction_bias=None), 160, "max-of-group"),
    ("GroupedTopKRouter", dict(top_k=6, num_expert_group=8, topk_group=3, scoring_func="softmax",
                               e_score_correction_bias=torch.zeros(64)), 64, "softmax scoring with"),
    ("FusedTopKBiasRouter", dict(top_k=2, scoring_func="sqrtsoftplus", e_score_correction_bias=torch.zeros(8),
                                 _hash_indices_table=None), 8, "sqrtsoftplus"),
    ("FusedTopKBiasRouter", dict(top_k=2, scoring_func="sigmoid", e_score_correction_bias=None,
                                 _hash_indices_table=torch.zeros(3, 2)), 8, "hash-table"),
    ("FusedTopKRouter", dict(top_k=2, scoring_func="softmax", num_fused_shared_experts=1), 8, "fused shared"),
    ("CustomRoutingRouter", dict(top_k=1), 8, "not mapped"),
    ("FusedTopKRouter", dict(top_k=9), 8, "top_k=9 > num_experts=8"),
])
def test_unsupported_routers_fall_back_with_reason(cls, attrs, E, needle):
    plan, why = plan_routing(_router(cls, **attrs), E)
    assert plan is None and needle in why


# ---- phase of a step --------------------------------------------------------------------------------------
def _sched(new=(), cached=(), num_sched=None, finished=(), spec=None, resumed=()):
    new_reqs = [SimpleNamespace(req_id=r, prompt_token_ids=list(range(n)), prompt_embeds=None, num_computed_tokens=c)
                for r, n, c in new]
    cached_data = SimpleNamespace(req_ids=[r for r, _ in cached], num_computed_tokens=[c for _, c in cached],
                                  resumed_req_ids=set(resumed))
    return SimpleNamespace(scheduled_new_reqs=new_reqs, scheduled_cached_reqs=cached_data,
                           num_scheduled_tokens=num_sched or {}, finished_req_ids=set(finished),
                           scheduled_spec_decode_tokens=spec or {})


def test_classify_phase_sequence():
    lens = {}
    assert classify_phase(_sched(new=[("a", 10, 0)], num_sched={"a": 6}), lens) == "prefill"  # chunk 1
    assert classify_phase(_sched(cached=[("a", 6)], num_sched={"a": 4}), lens) == "prefill"  # chunk 2
    assert classify_phase(_sched(cached=[("a", 10)], num_sched={"a": 1}), lens) == "decode"
    assert classify_phase(_sched(new=[("b", 5, 0)], cached=[("a", 11)], num_sched={"a": 1, "b": 5}), lens) == "mixed"
    # the last prefill chunk of one token is still prefill (computed 4 < prompt 5)
    assert classify_phase(_sched(cached=[("b", 4)], num_sched={"b": 1}), lens) == "prefill"
    assert classify_phase(_sched(cached=[("a", 12)], num_sched={"a": 1}, finished={"b"}), lens) == "decode"
    assert "b" not in lens
    # unknown request (seen first mid-flight): judged by scheduled tokens minus speculative ones
    assert classify_phase(_sched(cached=[("z", 50)], num_sched={"z": 3}, spec={"z": [1, 2]}), lens) == "decode"
    assert classify_phase(_sched(cached=[("y", 50)], num_sched={"y": 8}), lens) == "prefill"
    assert classify_phase(_sched(cached=[("a", 0)], num_sched={"a": 12}, resumed={"a"}), lens) == "prefill"
    assert classify_phase(_sched(), lens) == "unknown"


@st.composite
def _step_stream(draw):
    """A few scheduler outputs over a small request pool: new, cached, resumed, finished, unknown requests."""
    pool = [f"r{i}" for i in range(draw(st.integers(1, 6)))]
    steps = []
    for _ in range(draw(st.integers(1, 5))):
        new_ids = draw(st.lists(st.sampled_from(pool), unique=True, max_size=3))
        cached_ids = [r for r in draw(st.lists(st.sampled_from(pool), unique=True, max_size=6)) if r not in new_ids]
        new = [(r, draw(st.integers(1, 9)), draw(st.integers(0, 9))) for r in new_ids]
        cached = [(r, draw(st.integers(0, 12))) for r in cached_ids]
        num_sched = {r: draw(st.integers(1, 6)) for r in new_ids + cached_ids}
        resumed = draw(st.lists(st.sampled_from(cached_ids), unique=True, max_size=2)) if cached_ids and draw(
            st.booleans()) else []
        finished = draw(st.lists(st.sampled_from(pool), unique=True, max_size=2))
        spec = {r: [0] * draw(st.integers(0, 2)) for r in cached_ids if draw(st.booleans())}
        steps.append(_sched(new=new, cached=cached, num_sched=num_sched, finished=finished, spec=spec,
                            resumed=resumed))
    return steps


@settings(max_examples=300, deadline=None)
@given(_step_stream())
def test_classify_phase_fast_path_equals_the_loop(steps):
    """The vectorised common case gives what the per-request loop gives, step for step (same prompt_lens)."""
    lens_fast, lens_loop = {}, {}
    for so in steps:
        assert classify_phase(so, lens_fast) == classify_phase(so, lens_loop, fast=False)
        assert lens_fast == lens_loop


def test_classify_phase_fast_path_many_requests():
    lens = {f"r{i}": 100 + i for i in range(256)}
    decode = _sched(cached=[(f"r{i}", 100 + i) for i in range(256)], num_sched={f"r{i}": 1 for i in range(256)})
    assert classify_phase(decode, dict(lens)) == "decode" == classify_phase(decode, dict(lens), fast=False)
    one = _sched(cached=[(f"r{i}", 100 + i - (i == 200)) for i in range(256)], num_sched={f"r{i}": 1 for i in range(256)})
    assert classify_phase(one, dict(lens)) == "mixed" == classify_phase(one, dict(lens), fast=False)


# ---- hooks on fake vLLM objects ---------------------------------------------------------------------------
def test_when_imported_runs_after_import_and_immediately(tmp_path, monkeypatch):
    pkg = tmp_path / "fakepkg_mk"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "target.py").write_text("VALUE = 41\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    seen = []
    hooks.when_imported("fakepkg_mk.target", lambda m: seen.append(m.VALUE))
    assert seen == []
    import fakepkg_mk.target as target  # noqa: F401

    assert seen == [41]
    hooks.when_imported("fakepkg_mk.target", lambda m: seen.append(m.VALUE + 1))
    assert seen == [41, 42]
    for name in ("fakepkg_mk.target", "fakepkg_mk"):
        sys.modules.pop(name, None)


class FusedTopKRouter:  # the name is what plan_routing reads; behaves like vLLM's BaseRouter subclass
    def __init__(self, top_k=2, E=8, renormalize=True):
        self.top_k, self.global_num_experts, self.renormalize, self.scoring_func = top_k, E, renormalize, "softmax"
        self.calls = []

    def _compute_routing(self, hidden_states, router_logits, indices_type, *, input_ids=None):
        self.calls.append(router_logits)
        w, ids = torch.softmax(router_logits.float(), -1).topk(self.top_k, -1)
        return w / w.sum(-1, keepdim=True), ids.to(torch.int32)


@pytest.fixture
def fresh_hooks(monkeypatch):
    monkeypatch.setattr(hooks, "_STATE", {"config": None, "recorder": None, "layers": [], "installed": False})
    yield hooks._STATE
    rec = hooks._STATE.get("recorder")
    if rec is not None:
        rec.close()


def _fake_stack(tmp_path, env):
    """Install the plugin against fake moe_runner / gpu_worker modules; build 2 MoE layers."""
    cfg = config_from_env(env)
    hooks.install(cfg)
    runner_mod = ModuleType("fake_moe_runner")
    registered = []
    runner_mod.register_layer_for_moe_forward_op = lambda vllm_config, layer: registered.append(layer.layer_name)
    hooks._patch_moe_runner(runner_mod)
    layers = []
    for i in range(2):
        layer = SimpleNamespace(layer_name=f"model.layers.{i}.mlp.experts", router=FusedTopKRouter())
        runner_mod.register_layer_for_moe_forward_op(SimpleNamespace(model_config=SimpleNamespace(model="fake")), layer)
        layers.append(layer)
    assert registered == [l.layer_name for l in layers]

    class Worker:
        device = torch.device("cpu")

        def load_model(self, *, load_dummy_weights=False):
            return "loaded"

        def execute_model(self, scheduler_output):
            M = scheduler_output.total_num_scheduled_tokens
            logits = torch.randn(M, 8, generator=torch.Generator().manual_seed(M))
            return [l.router._compute_routing(None, logits, None) for l in layers]

        def execute_dummy_batch(self):  # data parallelism's idle-rank forward: a CUDA-graph replay, no Python
            rec = hooks._STATE["recorder"]
            rec.counts += 100
            return "dummy"

        def shutdown(self):
            return "shut"

    worker_mod = ModuleType("fake_gpu_worker")
    worker_mod.Worker = Worker
    hooks._patch_worker(worker_mod)
    return cfg, layers, Worker()


def test_routing_mode_uses_fused_topk_and_logs(tmp_path, fresh_hooks):
    cfg, layers, worker = _fake_stack(tmp_path, {"MOEKERN_KERNELS": "routing", "MOEKERN_GATE_LOG_DIR": str(tmp_path)})
    assert worker.load_model() == "loaded"  # allocates the gate-log buffer
    sched = _sched(new=[("a", 5, 0)], num_sched={"a": 5})
    sched.total_num_scheduled_tokens = 5
    outs = worker.execute_model(sched)
    assert all(l.router.calls == [] for l in layers)  # vLLM's routing was not called
    logits = torch.randn(5, 8, generator=torch.Generator().manual_seed(5))
    ref = fused_topk(logits, 2, backend="torch")
    for w, ids in outs:
        assert torch.equal(ids, ref.topk_ids) and torch.equal(w, ref.topk_weights)
    fresh_hooks["recorder"].close()
    records, skipped = read_gate_log(tmp_path)
    assert skipped == [] and len(records) == 2
    for r in records:
        assert r.expert_counts == ref.expert_counts.tolist() and r.num_tokens == 5 and r.phase == "prefill"
        assert r.model == "fake"


def test_worker_shutdown_writes_the_gate_log(tmp_path, fresh_hooks):
    """vLLM's engine-core process ends without atexit handlers: a run shorter than the writer's flush interval
    (here: never flushed by time) must still reach the file, through Worker.shutdown."""
    env = {"MOEKERN_KERNELS": "routing", "MOEKERN_GATE_LOG_DIR": str(tmp_path),
           "MOEKERN_GATE_LOG_FLUSH_SECONDS": "3600", "MOEKERN_GATE_LOG_FLUSH_STEPS": "1000"}
    cfg, layers, worker = _fake_stack(tmp_path, env)
    worker.load_model()
    for n in (5, 3):
        sched = _sched(new=[(f"r{n}", n, 0)], num_sched={f"r{n}": n})
        sched.total_num_scheduled_tokens = n
        worker.execute_model(sched)
    assert read_gate_log(tmp_path)[0] == []  # nothing written yet: the writer waits for more steps or time
    assert worker.shutdown() == "shut"  # vLLM's own shutdown still runs
    records, skipped = read_gate_log(tmp_path)
    assert skipped == [] and sorted((r.step, r.layer, r.num_tokens) for r in records) == [
        (0, 0, 5), (0, 1, 5), (1, 0, 3), (1, 1, 3)]
    assert fresh_hooks["recorder"].ready is False
    hooks.close_recorder()  # a second close (atexit, the multiprocessing finalizer) is harmless


def test_dummy_batch_between_steps_does_not_leak_into_the_next(tmp_path, fresh_hooks):
    cfg, layers, worker = _fake_stack(tmp_path, {"MOEKERN_KERNELS": "routing", "MOEKERN_GATE_LOG_DIR": str(tmp_path)})
    worker.load_model()
    sched = _sched(new=[("a", 5, 0)], num_sched={"a": 5})
    sched.total_num_scheduled_tokens = 5
    worker.execute_model(sched)
    assert worker.execute_dummy_batch() == "dummy"
    empty = _sched()
    empty.total_num_scheduled_tokens = 0
    rec, calls = fresh_hooks["recorder"], []
    orig_mark = rec.mark_dirty
    rec.mark_dirty = lambda: (calls.append("dirty"), orig_mark())
    worker.execute_model(empty)  # no step: whatever it runs is marked as no step's, before it runs
    assert calls == ["dirty"]
    sched2 = _sched(cached=[("a", 5)], num_sched={"a": 1})
    sched2.total_num_scheduled_tokens = 3
    outs = worker.execute_model(sched2)
    fresh_hooks["recorder"].close()
    records, _ = read_gate_log(tmp_path)
    step1 = [r for r in records if r.step == 1]
    assert len(step1) == 2
    for r, (w, ids) in zip(sorted(step1, key=lambda r: r.layer), outs):
        assert r.expert_counts == torch.bincount(ids.flatten().long(), minlength=8).tolist()


def test_gate_log_switch_pauses_steps_by_rpc_name(tmp_path, fresh_hooks):
    """Worker.moekern_gate_log(on): what moekern e2e --gate-log-paired calls between passes."""
    cfg, layers, worker = _fake_stack(tmp_path, {"MOEKERN_KERNELS": "routing", "MOEKERN_GATE_LOG_DIR": str(tmp_path)})
    mod = ModuleType("fake_gpu_worker3")
    mod.Worker = type(worker)
    worker_rpc.add_worker_rpc(mod)
    worker.load_model()
    sched = _sched(new=[("a", 5, 0)], num_sched={"a": 5})
    sched.total_num_scheduled_tokens = 5
    worker.execute_model(sched)
    assert worker.moekern_gate_log(False) == {"gate_log": False, "steps": 1}
    worker.execute_model(sched)  # paused: no step
    assert worker.moekern_gate_log() == {"gate_log": False, "steps": 1}
    assert worker.moekern_gate_log(True) == {"gate_log": True, "steps": 1}
    worker.execute_model(sched)
    fresh_hooks["recorder"].close()
    records, _ = read_gate_log(tmp_path)
    assert sorted({r.step for r in records}) == [0, 1] and all(r.num_tokens == 5 for r in records)
    hooks._STATE["recorder"] = None
    assert worker.moekern_gate_log(True) == {"gate_log": None, "steps": 0}


@pytest.mark.parametrize("kernels", ["routing", "off"])
def test_topk_sample_through_the_hooks(tmp_path, fresh_hooks, kernels):
    """Both routing paths (moekern's fused_topk and vLLM's own) feed the top-k sample."""
    env = {"MOEKERN_KERNELS": kernels, "MOEKERN_GATE_LOG_DIR": str(tmp_path), "MOEKERN_GATE_LOG_TOPK_SAMPLE": "3"}
    cfg, layers, worker = _fake_stack(tmp_path, env)
    worker.load_model()
    sched = _sched(new=[("a", 5, 0)], num_sched={"a": 5})
    sched.total_num_scheduled_tokens = 5
    outs = worker.execute_model(sched)
    fresh_hooks["recorder"].close()
    records, skipped = read_gate_log(tmp_path)
    assert skipped == [] and len(records) == 2
    for r, (w, ids) in zip(sorted(records, key=lambda r: r.layer), outs):
        assert r.topk_sample == ids[:3].tolist() and len(r.topk_sample[0]) == 2
        assert r.expert_counts == torch.bincount(ids.flatten().long(), minlength=8).tolist()


def test_off_mode_with_gate_log_and_skew_keeps_vllm_routing(tmp_path, fresh_hooks):
    env = {"MOEKERN_GATE_LOG_DIR": str(tmp_path), "MOEKERN_ROUTING_SKEW": "hot:3:0.9"}
    cfg, layers, worker = _fake_stack(tmp_path, env)
    worker.load_model()
    sched = _sched(cached=[("a", 9)], num_sched={"a": 1})
    sched.total_num_scheduled_tokens = 4
    outs = worker.execute_model(sched)
    bias = skew_bias(cfg.skew, 8)
    logits = torch.randn(4, 8, generator=torch.Generator().manual_seed(4))
    for layer, (w, ids) in zip(layers, outs):
        assert len(layer.router.calls) == 1  # vLLM's routing ran ...
        torch.testing.assert_close(layer.router.calls[0], logits + bias)  # ... on the skewed logits
    fresh_hooks["recorder"].close()
    records, _ = read_gate_log(tmp_path)
    want = torch.bincount(outs[0][1].flatten().long(), minlength=8).tolist()
    assert [r.expert_counts for r in records if r.layer == 0] == [want]
    assert all(r.phase == "unknown" or r.phase == "decode" for r in records)


def test_routing_skew_switch_by_rpc_name_rewrites_the_bias_in_place(tmp_path, fresh_hooks):
    """Worker.moekern_routing_skew(skew): the serve grid's skew switch. The device bias keeps its storage (CUDA
    graphs replay reads it at its captured address) and the next step routes on the new skew's logits."""
    env = {"MOEKERN_GATE_LOG_DIR": str(tmp_path), "MOEKERN_ROUTING_SKEW": "uniform"}
    cfg, layers, worker = _fake_stack(tmp_path, env)
    mod = ModuleType("fake_gpu_worker4")
    mod.Worker = type(worker)
    worker_rpc.add_worker_rpc(mod)
    worker.load_model()
    sched = _sched(cached=[("a", 9)], num_sched={"a": 1})
    sched.total_num_scheduled_tokens = 4
    worker.execute_model(sched)
    logits = torch.randn(4, 8, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(layers[0].router.calls[-1], logits)  # uniform: zero bias
    ptrs = [h.bias.data_ptr() for h in fresh_hooks["layers"]]
    assert worker.moekern_routing_skew() == {"skew": "uniform", "layers": 2, "biases_rewritten": 0}
    assert worker.moekern_routing_skew("hot:3:0.9") == {"skew": "hot:3:0.9@1.0", "layers": 2,
                                                        "biases_rewritten": 2}
    assert [h.bias.data_ptr() for h in fresh_hooks["layers"]] == ptrs
    worker.execute_model(sched)
    hot = skew_bias(parse_skew("hot:3:0.9"), 8)
    assert hot[3] > 2.0  # ln(0.9 * 7 / 0.1): a bias far above these logits' spread
    for layer in layers:
        torch.testing.assert_close(layer.router.calls[-1], logits + hot)
    assert worker.moekern_routing_skew("zipf:1.0", "3")["skew"] == "zipf:1.0@1.0 (seed 3)"
    assert fresh_hooks["recorder"].meta["skew"] == "zipf:1.0@1.0 (seed 3)"
    with pytest.raises(ValueError, match="skew='hot:3:2.0'.*fraction"):
        worker.moekern_routing_skew("hot:3:2.0")
    with pytest.raises(ValueError, match="seed='x' must be an int"):
        worker.moekern_routing_skew("uniform", "x")


def test_routing_skew_switch_refuses_an_engine_started_without_skew(tmp_path, fresh_hooks):
    cfg, layers, worker = _fake_stack(tmp_path, {"MOEKERN_KERNELS": "routing"})
    with pytest.raises(ValueError, match="started without MOEKERN_ROUTING_SKEW.*MOEKERN_ROUTING_SKEW=uniform"):
        worker_rpc.set_routing_skew(worker, "hot:0:0.5")
    assert all(h.skew is None for h in fresh_hooks["layers"])


def test_gate_log_switch_takes_the_dev_endpoints_string_args(tmp_path, fresh_hooks):
    """vLLM serve's POST /collective_rpc forwards JSON args as they came (its docs ask for strings)."""
    cfg, layers, worker = _fake_stack(tmp_path, {"MOEKERN_GATE_LOG_DIR": str(tmp_path)})
    worker.load_model()
    assert worker_rpc.gate_log_switch(worker, "false")["gate_log"] is False
    assert worker_rpc.gate_log_switch(worker, "1")["gate_log"] is True
    with pytest.raises(ValueError, match="on='maybe' must be true or false"):
        worker_rpc.gate_log_switch(worker, "maybe")


@pytest.mark.parametrize("spec, nominal, dummy", [
    ("uniform", (0.0, 0.02), (0.0, 0.02)),
    ("hot:0:0.05", (0.18, 0.26), (0.36, 0.40)),   # one cold expert: 7 of 8 share the load when it is overridden
    ("hot:0:0.5", (0.74, 0.83), (1.11, 1.16)),    # the hot expert is every token's first choice
    ("zipf:1.0", (0.62, 0.72), (1.70, 1.76)),     # overridden: a fixed top-2
])
def test_expected_load_cv_of_the_study_skews(spec, nominal, dummy):
    """The aggregated CV each skew gives with E=8, top-2: nominal (router noise = beta) and dummy weights (the
    bias overrides a router whose logits barely vary). Hard-override values: one cold expert
    std([0, 1/7 x 7]) / (1/8) = 0.378; hot: loads [1, 1/7 x 7] -> 1.134; fixed top-2 [1, 1, 0 x 6] -> sqrt(3)."""
    from moekern.vllm.config import expected_load_cv

    sk = parse_skew(spec)
    lo, hi = nominal
    assert lo <= expected_load_cv(sk, 8, 2) <= hi
    lo, hi = dummy
    assert lo <= expected_load_cv(sk, 8, 2, noise_scale=1e-3) <= hi
    with pytest.raises(ValueError, match="top_k=9 must be in"):
        expected_load_cv(sk, 8, 9)


def test_plugin_off_installs_nothing(fresh_hooks, monkeypatch):
    for k in [k for k in os.environ if k.startswith("MOEKERN_")]:
        monkeypatch.delenv(k)
    assert register() is None
    assert fresh_hooks["installed"] is False


def test_worker_summary_method_for_collective_rpc_by_name(tmp_path, fresh_hooks, monkeypatch):
    """vLLM 0.26's collective_rpc carries a method *name* (a function needs insecure pickling): the plugin
    adds Worker.moekern_plugin_summary, which vLLM's run_method resolves with getattr(worker, name)."""
    cfg, layers, worker = _fake_stack(tmp_path, {"MOEKERN_KERNELS": "routing"})
    mod = ModuleType("fake_gpu_worker2")
    mod.Worker = type(worker)
    worker_rpc.add_worker_rpc(mod)
    sched = _sched(new=[("a", 3, 0)], num_sched={"a": 3})
    sched.total_num_scheduled_tokens = 3
    worker.execute_model(sched)
    summary = getattr(worker, "moekern_plugin_summary")()  # vllm.v1.serial_utils.run_method, str branch
    assert json.loads(json.dumps(summary)) == summary  # plain types: msgpack carries it back
    assert summary["installed"] and summary["kernels"] == "routing" and len(summary["layers"]) == 2
    assert all(l["moekern_routing"]["8"].startswith("FusedTopKRouter") for l in summary["layers"])
    assert summary["moe_configs"] is None
    monkeypatch.setenv("MOEKERN_MOE_CONFIGS", "/x/tune_moe_shapes.json")
    assert worker.moekern_plugin_summary()["moe_configs"] == "/x/tune_moe_shapes.json"


class UnquantizedFusedMoEMethod(torch.nn.Module):  # the name is what _experts_ok reads
    unquantized_backend = SimpleNamespace(name="FLASHINFER_CUTLASS")  # not TRITON: the swap declines

    def apply(self, layer, x, topk_weights, topk_ids, shared_experts, shared_experts_input):
        return ("vllm", x)


def test_experts_swap_declines_cleanly_and_keeps_module_apply(fresh_hooks):
    """MOEKERN_KERNELS=all shadows the quant method's `apply`; that method object is an nn.Module (vLLM's
    CustomOp), so nn.Module.apply(fn) from a parent must still walk it."""
    hooks.install(config_from_env({"MOEKERN_KERNELS": "all"}))
    qm = UnquantizedFusedMoEMethod()
    routed = torch.nn.Module()
    routed.quant_method = qm
    runner_mod = ModuleType("fake_moe_runner_all")
    runner_mod.register_layer_for_moe_forward_op = lambda vllm_config, layer: None
    hooks._patch_moe_runner(runner_mod)
    runner = SimpleNamespace(layer_name="model.layers.0.mlp.experts", router=FusedTopKRouter(), routed_experts=routed)
    runner_mod.register_layer_for_moe_forward_op(SimpleNamespace(model_config=None), runner)
    assert "apply" in vars(qm)  # shadowed per instance
    x = torch.zeros(2, 4)
    out = qm.apply(layer=routed, x=x, topk_weights=None, topk_ids=torch.zeros(2, 2, dtype=torch.int32),
                   shared_experts=None, shared_experts_input=None)
    assert out[0] == "vllm" and out[1] is x and fresh_hooks["layers"][0].experts_decision is False
    seen = []
    parent = torch.nn.Module()
    parent.routed = routed
    parent.apply(lambda m: seen.append(type(m).__name__))
    assert seen == ["UnquantizedFusedMoEMethod", "Module", "Module"]


def _have_vllm() -> bool:
    return importlib.util.find_spec("vllm") is not None


_REAL_VLLM_CPU = r"""
import json, os, sys, tempfile
os.environ.update(MOEKERN_KERNELS="routing", MOEKERN_GATE_LOG_DIR=sys.argv[1])
try:
    import torch
    from vllm.plugins import load_general_plugins
    load_general_plugins()  # vLLM's own loader: entry point -> moekern.vllm.register, before the imports below
    assert "vllm.model_executor.layers.fused_moe.runner.moe_runner" not in sys.modules
    import vllm.model_executor.layers.fused_moe.runner.moe_runner as mr
    import vllm.v1.worker.gpu_worker as gw
except ImportError as exc:
    print("IMPORT-SKIP", exc); sys.exit(0)
from types import SimpleNamespace
from vllm.model_executor.layers.fused_moe.router.fused_topk_router import FusedTopKRouter
from vllm.model_executor.layers.fused_moe.router.grouped_topk_router import GroupedTopKRouter
from moekern.vllm import hooks
from moekern.routing import fused_topk
cfg = SimpleNamespace(compilation_config=SimpleNamespace(static_forward_context={}, static_all_moe_layers=[]),
                      model_config=SimpleNamespace(model="dummy"))
bias = torch.randn(256, generator=torch.Generator().manual_seed(0)) * 0.1
routers = [FusedTopKRouter(top_k=2, global_num_experts=8, scoring_func="softmax", renormalize=True),
           GroupedTopKRouter(top_k=8, global_num_experts=256, num_expert_group=8, topk_group=4, scoring_func="sigmoid",
                             renormalize=True, routed_scaling_factor=2.5, e_score_correction_bias=bias)]
for i, r in enumerate(routers):
    mr.register_layer_for_moe_forward_op(cfg, SimpleNamespace(layer_name=f"model.layers.{i}.mlp.experts", router=r))
rec = hooks._STATE["recorder"]
rec.ensure_buffer(torch.device("cpu"))
rec.begin_step()
g = torch.Generator().manual_seed(1)
l1, l2 = torch.randn(5, 8, generator=g), torch.randn(5, 256, generator=g)
w1, i1 = routers[0].select_experts(torch.zeros(5, 4), l1, topk_indices_dtype=torch.int64)
w2, i2 = routers[1].select_experts(torch.zeros(5, 4), l2)
r1 = fused_topk(l1, 2, backend="torch")
r2 = fused_topk(l2, 8, scoring="sigmoid", correction_bias=bias, num_expert_group=8, topk_group=4,
                routed_scaling_factor=2.5, backend="torch")
rec.end_step("prefill", 5)
rec.close()
print(json.dumps({"patched": getattr(mr.register_layer_for_moe_forward_op, "_moekern", False),
                  "worker_rpc": hasattr(gw.Worker, "moekern_plugin_summary"),
                  "execute_patched": getattr(gw.Worker.execute_model, "_moekern", False),
                  "moe_layers": cfg.compilation_config.static_all_moe_layers,
                  "ids1": i1.dtype == torch.int64 and torch.equal(i1, r1.topk_ids.long()),
                  "w1": torch.equal(w1, r1.topk_weights), "ids2": torch.equal(i2, r2.topk_ids),
                  "w2": torch.equal(w2, r2.topk_weights), "summary": gw.Worker.moekern_plugin_summary(None)}))
"""


@pytest.mark.skipif(not _have_vllm(), reason="vllm is not importable (CPU run: PYTHONPATH with vLLM 0.26's python "
                                             "package and its pure-Python deps)")
def test_plugin_on_real_vllm_026_objects_cpu(tmp_path):
    """Where vLLM 0.26's Python imports (even without CUDA): vLLM's plugin loader calls our entry point, the
    post-import hooks patch the real moe_runner / gpu_worker modules, and real FusedTopKRouter /
    GroupedTopKRouter objects route through moekern.fused_topk (exactly the torch reference) into the gate log."""
    proc = subprocess.run([sys.executable, "-c", _REAL_VLLM_CPU, str(tmp_path)], capture_output=True, text=True,
                          timeout=300, cwd=REPO, env={**os.environ, "PYTHONPATH": os.pathsep.join(
                              [str(REPO)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []))})
    if "IMPORT-SKIP" in proc.stdout:
        pytest.skip(proc.stdout.strip())
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["patched"] and got["worker_rpc"] and got["execute_patched"]
    assert got["moe_layers"] == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]
    assert got["ids1"] and got["w1"] and got["ids2"] and got["w2"]
    assert [l["router"] for l in got["summary"]["layers"]] == ["FusedTopKRouter", "GroupedTopKRouter"]
    records, skipped = read_gate_log(tmp_path)
    assert not skipped and sorted(sum(r.expert_counts) for r in records) == [10, 40]


# ---- GPU: end to end with vLLM (run by the lead on the GPU machine) ---------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not _have_vllm(), reason="vllm is not installed")
def test_e2e_routing_equals_vllm_greedy(tmp_path):
    """MOEKERN_KERNELS=routing gives vLLM's greedy tokens on the dummy-weight Mixtral (and logs gates)."""
    out = tmp_path / "eq"
    cmd = [sys.executable, "-m", "moekern.e2e.check_equal", "--model", "mixtral", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    result = json.loads((out / "check_equal.json").read_text())
    assert result["equal"], result
    records, skipped = read_gate_log(out / "gate_logs")
    assert records and not skipped
    assert all(sum(r.expert_counts) == r.num_tokens * r.top_k for r in records)
