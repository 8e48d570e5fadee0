"""Preflight for the end-to-end runs: every vLLM 0.26 symbol the plugin and the runner rely on, without a model.

Run on the GPU machine after `source /tmp/gpuenv/env.sh` (run_e2e.py runs it first, in a subprocess):

    python3 moekern/e2e/preflight.py [--arms vllm,flashinfer,moekern] [--mode offline|serve|both]

It imports vLLM and checks, by inspect.signature and attribute look-ups, each hook target of moekern.vllm.hooks
(MoERunner -> register_layer_for_moe_forward_op, BaseRouter._compute_routing, the routers' attributes that
routing_map reads, UnquantizedFusedMoEMethod.apply, Worker.execute_model/load_model, SchedulerOutput fields),
the engine arguments and the `vllm serve` / `vllm bench serve` command lines run_e2e builds (parsed by vLLM's
own parsers), that the model's architecture imports (the FlashAttention import that killed the first run),
the moekern entry point, and on a GPU: moekern's routing hook on a real vLLM FusedTopKRouter of a Mixtral
layer against vLLM's own routing, and the gate-log recorder. Prints one PASS/FAIL/SKIP line per check and
exits 1 on any FAIL. ~20-40 s (vLLM imports dominate).
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
for _p in (str(HERE), str(REPO)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

MOE_RUNNER = "vllm.model_executor.layers.fused_moe.runner.moe_runner"
ROUTER = "vllm.model_executor.layers.fused_moe.router"
UNQUANT = "vllm.model_executor.layers.fused_moe.unquantized_fused_moe_method"
GPU_WORKER = "vllm.v1.worker.gpu_worker"


RE = "vllm.model_executor.layers.fused_moe.routed_experts"
LLM_MOD = "vllm.entrypoints.llm"

# What hooks.py and run_e2e.py call, as vLLM 0.26 defines it: (module, qualname, positional parameters in
# order, keyword-only parameters). tests/test_e2e_runner.py checks this table against the 0.26 source.
SIGNATURES = [
    (MOE_RUNNER, "register_layer_for_moe_forward_op", ["vllm_config", "layer"], []),
    (f"{ROUTER}.base_router", "BaseRouter._compute_routing",
     ["self", "hidden_states", "router_logits", "indices_type"], ["input_ids"]),
    (f"{ROUTER}.fused_moe_router", "FusedMoERouter.select_experts",
     ["self", "hidden_states", "router_logits", "topk_indices_dtype"], ["input_ids"]),
    (UNQUANT, "UnquantizedFusedMoEMethod.apply",
     ["self", "layer", "x", "topk_weights", "topk_ids", "shared_experts", "shared_experts_input"], []),
    (GPU_WORKER, "Worker.execute_model", ["self", "scheduler_output"], []),
    (GPU_WORKER, "Worker.load_model", ["self"], ["load_dummy_weights"]),
    (GPU_WORKER, "Worker.get_model", ["self"], []),  # MOEKERN_DUMMY_ROUTER_SEED reaches the model through it
    (LLM_MOD, "LLM.generate", ["self", "prompts", "sampling_params"], ["use_tqdm"]),
    (LLM_MOD, "LLM.collective_rpc", ["self", "method"], []),
    ("vllm.plugins", "load_general_plugins", [], []),
]
# Source facts the hooks rely on: (module, qualname, substrings of its source).
SOURCE_FACTS = [
    # a module-global call (not an imported alias): patching the module attribute reaches every layer
    (MOE_RUNNER, "MoERunner.__init__", ["register_layer_for_moe_forward_op(", "self.router = router",
                                        "self.routed_experts = routed_experts", "self.layer_name = layer_name"]),
    (MOE_RUNNER, "MoERunner._select_forward", ["torch.ops.vllm.moe_forward"]),
    (f"{ROUTER}.base_router", "BaseRouter._select_experts", ["self._compute_routing(", "input_ids=input_ids"]),
    (RE, "RoutedExperts.forward_modular", ["self.quant_method.apply(", "layer=self", "shared_experts_input="]),
    (RE, "RoutedExperts.__init__", ["self.apply_router_weight_on_input =", "self.activation ="]),
    ("vllm.v1.worker.worker_base", "WorkerWrapperBase.execute_model", ["self.worker.execute_model("]),
    ("vllm.v1.serial_utils", "run_method", ["getattr(obj, method)"]),
]


class Skip(Exception):
    """Raised by a check that cannot run here; the message says why."""


@dataclass
class Result:
    name: str
    status: str  # "PASS" | "FAIL" | "SKIP"
    detail: str = ""
    seconds: float = 0.0

    def line(self) -> str:
        return f"{self.status} {self.name}: {self.detail}" if self.detail else f"{self.status} {self.name}"


# ---- helpers (pure; tested on CPU) ------------------------------------------------------------------------
def check_signature(fn, positional: list[str], keyword_only: list[str] = (), label: str | None = None) -> str:
    """Assert fn's parameters start with `positional` (positional-or-keyword, in order) and include the
    `keyword_only` names as keyword-only. Raises AssertionError naming expected and got."""
    label = label or getattr(fn, "__qualname__", repr(fn))
    params = list(inspect.signature(fn).parameters.values())
    pos = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    kwo = {p.name for p in params if p.kind == p.KEYWORD_ONLY}
    var_kw = any(p.kind == p.VAR_KEYWORD for p in params)
    if pos[: len(positional)] != list(positional):
        raise AssertionError(f"{label}: expected positional parameters {list(positional)}, got {pos}")
    missing = [k for k in keyword_only if k not in kwo and not var_kw]
    if missing:
        raise AssertionError(f"{label}: expected keyword-only {missing}, got keyword-only {sorted(kwo)}")
    return f"{label}{inspect.signature(fn)}"


def resolve(module_name: str, dotted: str):
    """importlib.import_module(module_name) then getattr along `dotted`; AssertionError names what is missing."""
    obj = importlib.import_module(module_name)
    for part in dotted.split(".") if dotted else ():
        if not hasattr(obj, part):
            raise AssertionError(f"{module_name}:{dotted}: no attribute {part!r} on {obj!r}")
        obj = getattr(obj, part)
    return obj


def source_has(obj, *needles: str) -> None:
    src = inspect.getsource(obj)
    missing = [n for n in needles if n not in src]
    if missing:
        raise AssertionError(f"{getattr(obj, '__qualname__', obj)} source lacks {missing}")


def run_checks(checks, stop_if_failed: dict | None = None) -> list[Result]:
    """Run (name, fn) checks in order; fn returns a detail string, raises Skip (SKIP) or anything else (FAIL).
    stop_if_failed maps a check name to a reason: when that check fails, later checks are skipped with it."""
    results, blocked = [], None
    for name, fn in checks:
        if blocked:
            results.append(Result(name, "SKIP", blocked))
            continue
        t0 = time.perf_counter()
        try:
            detail = fn() or ""
            status = "PASS"
        except Skip as exc:
            status, detail = "SKIP", str(exc)
        except Exception as exc:  # the report is the product: keep going, name the failure
            status = "FAIL"
            detail = f"{type(exc).__name__}: {exc}".strip()
            tb = traceback.extract_tb(exc.__traceback__)
            if tb and not isinstance(exc, AssertionError):
                detail += f" (at {Path(tb[-1].filename).name}:{tb[-1].lineno})"
        results.append(Result(name, status, " ".join(str(detail).split())[:600], time.perf_counter() - t0))
        if status == "FAIL" and stop_if_failed and name in stop_if_failed:
            blocked = stop_if_failed[name]
    return results


def report(results: list[Result], out=None) -> int:
    """Print the PASS/FAIL/SKIP list and a summary line; return the exit code (1 on any FAIL)."""
    out = out or sys.stdout
    for r in results:
        print(r.line(), file=out)
    n = {s: sum(r.status == s for r in results) for s in ("PASS", "FAIL", "SKIP")}
    print(f"preflight: {n['PASS']} pass, {n['FAIL']} fail, {n['SKIP']} skip", file=out)
    return 1 if n["FAIL"] else 0


def failures(text: str) -> list[str]:
    """The FAIL lines of a preflight output."""
    return [line for line in text.splitlines() if line.startswith("FAIL ")]


# ---- the checks -------------------------------------------------------------------------------------------
def build_checks(args) -> tuple[list, dict]:
    import run_e2e  # the runner's own engine kwargs and command lines are what we check

    arms = args.arms
    plugin_arms = [a for a in arms if a.startswith("moekern")]
    ns = run_e2e.parse_args(["--model", args.model, "--arms", ",".join(arms), "--mode", args.mode])
    ns.model_dir = HERE / "configs" / args.model
    ns.dataset = None
    checks = []

    def add(name):
        def deco(fn):
            checks.append((name, fn))
            return fn
        return deco

    @add("vllm imports")
    def _():
        import vllm

        v = getattr(vllm, "__version__", "?")
        return f"vllm {v}" + ("" if str(v).startswith("0.26") else " (expected 0.26.x: checks below target 0.26)")

    @add("vllm.vllm_flash_attn imports (tools/gpu/gpuenv_fixups.py)")
    def _():
        importlib.import_module("vllm.vllm_flash_attn")
        return "ok"

    @add("model architecture imports")
    def _():
        cfg = json.loads((HERE / "configs" / args.model / "config.json").read_text())
        arch = cfg["architectures"][0]
        registry = resolve("vllm.model_executor.models", "ModelRegistry")
        if arch not in registry.get_supported_archs():
            raise AssertionError(f"{arch} is not in vLLM's ModelRegistry")
        module_name = getattr(registry.models[arch], "module_name", None)
        if module_name is None:  # already loaded in this process
            return f"{arch} registered as {registry.models[arch]!r}"
        mod = importlib.import_module(module_name)  # what vLLM's inspect subprocess does
        if not hasattr(mod, arch):
            raise AssertionError(f"{module_name} has no {arch}")
        return f"{arch} from {module_name}"

    @add("model config fields vLLM reads")
    def _():
        from transformers import AutoConfig

        hf = AutoConfig.from_pretrained(str(HERE / "configs" / args.model))
        need = ["hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "vocab_size",
                "max_position_embeddings", "rms_norm_eps", "num_experts_per_tok"]
        if hf.model_type == "mixtral":
            need += ["num_local_experts", "intermediate_size"]
        missing = [k for k in need if getattr(hf, k, None) is None]
        if missing:
            raise AssertionError(f"{type(hf).__name__} lacks {missing}")
        rope = getattr(hf, "rope_parameters", None) or {}
        if getattr(hf, "rope_theta", None) is None and "rope_theta" not in rope:
            raise AssertionError("no rope_theta (config.rope_theta or rope_parameters['rope_theta'])")
        return f"{type(hf).__name__} model_type={hf.model_type}"

    @add("moekern entry point (vllm.general_plugins)")
    def _():
        group = resolve("vllm.plugins", "DEFAULT_PLUGINS_GROUP")
        if group != "vllm.general_plugins":
            raise AssertionError(f"vllm.plugins.DEFAULT_PLUGINS_GROUP={group!r}, expected 'vllm.general_plugins'")
        check_signature(resolve("vllm.plugins", "load_general_plugins"), [])
        from importlib.metadata import entry_points

        eps = [ep for ep in entry_points(group=group) if ep.name == "moekern"]
        if not eps:
            msg = "not installed: pip install --no-build-isolation --no-deps -e . (moekern arms would be skipped)"
            if plugin_arms:
                raise AssertionError(msg)
            raise Skip(msg + "; no moekern arm requested")
        import moekern.vllm

        if eps[0].load() is not moekern.vllm.register:
            raise AssertionError(f"entry point {eps[0].value!r} does not load moekern.vllm.register "
                                 f"(from {moekern.vllm.__file__})")
        return f"{eps[0].value} -> {moekern.vllm.__file__}"

    for module, qualname, positional, keyword_only in SIGNATURES:
        checks.append((f"signature {qualname}", lambda m=module, q=qualname, p=positional, k=keyword_only:
                       check_signature(resolve(m, q), p, k, q)))
    for module, qualname, needles in SOURCE_FACTS:
        checks.append((f"source {qualname}", lambda m=module, q=qualname, n=needles:
                       source_has(resolve(m, q), *n) or f"has {n}"))

    @add("MoE layer is the opaque custom op torch.ops.vllm.moe_forward[_shared]")
    def _():
        import torch

        importlib.import_module(MOE_RUNNER)
        missing = [op for op in ("moe_forward", "moe_forward_shared") if not hasattr(torch.ops.vllm, op)]
        if missing:
            raise AssertionError(f"torch.ops.vllm lacks {missing}")
        return "torch.ops.vllm.moe_forward, moe_forward_shared"

    @add("router classes carry the attributes routing_map reads")
    def _():
        import torch

        base = resolve(f"{ROUTER}.base_router", "BaseRouter")
        made = {
            "FusedTopKRouter": (resolve(f"{ROUTER}.fused_topk_router", "FusedTopKRouter"),
                                dict(top_k=2, global_num_experts=8, scoring_func="softmax", renormalize=True),
                                ["top_k", "global_num_experts", "scoring_func", "renormalize"]),
            "FusedTopKBiasRouter": (resolve(f"{ROUTER}.fused_topk_bias_router", "FusedTopKBiasRouter"),
                                    dict(top_k=2, global_num_experts=8, e_score_correction_bias=torch.zeros(8),
                                         scoring_func="sigmoid", renormalize=True, routed_scaling_factor=2.5),
                                    ["top_k", "scoring_func", "renormalize", "routed_scaling_factor",
                                     "e_score_correction_bias", "_hash_indices_table", "num_fused_shared_experts"]),
            "GroupedTopKRouter": (resolve(f"{ROUTER}.grouped_topk_router", "GroupedTopKRouter"),
                                  dict(top_k=8, global_num_experts=256, num_expert_group=8, topk_group=4,
                                       scoring_func="sigmoid", renormalize=True, routed_scaling_factor=2.5,
                                       e_score_correction_bias=torch.zeros(256)),
                                  ["top_k", "num_expert_group", "topk_group", "scoring_func", "renormalize",
                                   "routed_scaling_factor", "e_score_correction_bias", "num_fused_shared_experts"]),
        }
        from moekern.vllm.routing_map import plan_routing

        out = []
        for name, (cls, kw, attrs) in made.items():
            if not issubclass(cls, base):
                raise AssertionError(f"{name} is not a BaseRouter subclass")
            router = cls(**kw)
            missing = [a for a in attrs if not hasattr(router, a)]
            if missing:
                raise AssertionError(f"{name}(**{sorted(kw)}) lacks attributes {missing}")
            plan, why = plan_routing(router, kw["global_num_experts"])
            if plan is None:
                raise AssertionError(f"plan_routing({name}) fell back: {why}")
            out.append(name)
        return "constructed and mapped: " + ", ".join(out)

    @add("experts swap targets (MOEKERN_KERNELS=all)")
    def _():
        re_ = resolve(RE, "RoutedExperts")
        if not hasattr(re_, "expert_map"):
            raise AssertionError("RoutedExperts has no expert_map")
        backend = resolve("vllm.model_executor.layers.fused_moe.oracle.unquantized", "UnquantizedMoeBackend")
        order = resolve(f"{MOE_RUNNER[:-len('.moe_runner')]}.shared_experts", "SharedExpertsOrder")
        act = resolve("vllm.model_executor.layers.fused_moe.activation", "MoEActivation")
        for enum, member in ((backend, "TRITON"), (order, "MK_INTERNAL_OVERLAPPED"), (act, "SILU")):
            if member not in enum.__members__:
                raise AssertionError(f"{enum.__name__} has no {member}")
        import dataclasses

        cfg = resolve("vllm.model_executor.layers.fused_moe.config", "FusedMoEConfig")
        fields = {f.name for f in dataclasses.fields(cfg)} if dataclasses.is_dataclass(cfg) else set(dir(cfg))
        missing = [f for f in ("has_bias", "is_lora_enabled", "moe_parallel_config") if f not in fields]
        pc = resolve("vllm.model_executor.layers.fused_moe.config", "FusedMoEParallelConfig")
        if missing or not hasattr(pc, "use_all2all_kernels"):
            raise AssertionError(f"FusedMoEConfig lacks {missing} or FusedMoEParallelConfig.use_all2all_kernels")
        return "UnquantizedMoeBackend.TRITON, SharedExpertsOrder.MK_INTERNAL_OVERLAPPED, MoEActivation.SILU"

    @add("SchedulerOutput fields classify_phase reads")
    def _():
        import dataclasses

        want = {"SchedulerOutput": ["scheduled_new_reqs", "scheduled_cached_reqs", "num_scheduled_tokens",
                                    "total_num_scheduled_tokens", "scheduled_spec_decode_tokens", "finished_req_ids"],
                "NewRequestData": ["req_id", "prompt_token_ids", "prompt_embeds", "num_computed_tokens"],
                "CachedRequestData": ["req_ids", "resumed_req_ids", "num_computed_tokens"]}
        bad = {}
        for cls_name, names in want.items():
            cls = resolve("vllm.v1.core.sched.output", cls_name)
            have = {f.name for f in dataclasses.fields(cls)}
            if set(names) - have:
                bad[cls_name] = sorted(set(names) - have)
        if bad:
            raise AssertionError(f"missing fields {bad}")
        return "ok"

    @add("engine kwargs of every arm are EngineArgs fields; values accepted")
    def _():
        import dataclasses
        import typing

        fields = {f.name for f in dataclasses.fields(resolve("vllm.engine.arg_utils", "EngineArgs"))}
        used = {"skip_tokenizer_init"}
        for arm in arms:
            used |= set(run_e2e.engine_kwargs(ns, arm))
        missing = sorted(used - fields)
        if missing:
            raise AssertionError(f"EngineArgs has no {missing}")
        backends = resolve("vllm.v1.attention.backends.registry", "AttentionBackendEnum")
        if ns.attention_backend not in backends.__members__:
            raise AssertionError(f"attention_backend={ns.attention_backend!r} not in AttentionBackendEnum")
        moe = set(typing.get_args(resolve("vllm.config.kernel", "MoEBackend")))
        for arm in arms:
            b = run_e2e.engine_kwargs(ns, arm).get("moe_backend")
            if b is not None and b not in moe:
                raise AssertionError(f"moe_backend={b!r} not in vllm.config.kernel.MoEBackend {sorted(moe)}")
        cc = resolve("vllm.config", "CompilationConfig")
        cc(**run_e2e.engine_kwargs(ns, arms[0])["compilation_config"])
        return f"{len(used)} kwargs: {sorted(used)}"

    @add("offline API: LLM(skip_tokenizer_init), TokensPrompt, SamplingParams(detokenize=False)")
    def _():
        llm = resolve("vllm", "LLM")
        if "skip_tokenizer_init" not in inspect.signature(llm.__init__).parameters:
            raise AssertionError("LLM.__init__ has no skip_tokenizer_init")
        tp = resolve("vllm.inputs", "TokensPrompt")
        tp(prompt_token_ids=[1, 2, 3])
        sp = resolve("vllm", "SamplingParams")
        p = sp(temperature=0.0, max_tokens=8, ignore_eos=True, detokenize=False)
        if p.detokenize is not False:
            raise AssertionError("SamplingParams(detokenize=False) did not stick")
        return "ok"

    if args.mode in ("serve", "both"):
        @add("`vllm serve` command line parses")
        def _():
            from vllm.entrypoints.openai.cli_args import make_arg_parser
            from vllm.utils.argparse_utils import FlexibleArgumentParser

            parsed = []
            for arm in arms:
                cmd = run_e2e.serve_command(run_e2e.engine_kwargs(ns, arm), 8000)
                a = make_arg_parser(FlexibleArgumentParser()).parse_args(cmd[2:])
                if a.model_tag != str(ns.model_dir) or a.max_num_seqs != ns.max_num_seqs:
                    raise AssertionError(f"{arm}: parsed model_tag={a.model_tag!r}, max_num_seqs={a.max_num_seqs}")
                # the steady-state settings (run_e2e.engine_kwargs) must reach the server as meant
                if a.enable_prefix_caching is not False or a.jit_monitor_verbose is not True:
                    raise AssertionError(f"{arm}: parsed enable_prefix_caching={a.enable_prefix_caching!r} "
                                         f"(want False), jit_monitor_verbose={a.jit_monitor_verbose!r} (want True)")
                parsed.append(arm)
            return "parsed for " + ", ".join(parsed)

        @add("`vllm bench serve` command line parses")
        def _():
            from vllm.benchmarks.serve import add_cli_args
            from vllm.utils.argparse_utils import FlexibleArgumentParser

            p = FlexibleArgumentParser()
            add_cli_args(p)
            a = p.parse_args(run_e2e.bench_command(ns, 8000, Path("/tmp"), "x.json")[3:])
            if a.dataset_name != "random" or a.num_prompts != ns.serve_prompts or a.temperature != 0:
                raise AssertionError(f"parsed dataset_name={a.dataset_name!r}, num_prompts={a.num_prompts}, "
                                     f"temperature={a.temperature!r}")
            return "ok"

    if "flashinfer" in arms:
        @add("FlashInfer CUTLASS MoE available (flashinfer arm)")
        def _():
            if not resolve("vllm.utils.flashinfer", "has_flashinfer_cutlass_fused_moe")():
                raise AssertionError("vllm.utils.flashinfer.has_flashinfer_cutlass_fused_moe() is False: "
                                     "the flashinfer arm would fail to select FLASHINFER_CUTLASS")
            fie = resolve("vllm.model_executor.layers.fused_moe.experts.flashinfer_cutlass_moe", "FlashInferExperts")
            if not fie._supports_current_device():
                raise AssertionError("FlashInferExperts._supports_current_device() is False on this GPU")
            return "ok"

    def hooked_mixtral_router(config, recorder):
        """A real vLLM FusedTopKRouter (E=8, k=2 softmax) registered through moekern's layer hook."""
        from moekern.vllm import hooks

        cls = resolve(f"{ROUTER}.fused_topk_router", "FusedTopKRouter")
        router = cls(top_k=2, global_num_experts=8, scoring_func="softmax", renormalize=True)
        hooks._STATE.update(config=config, recorder=recorder, layers=[])
        layer = SimpleNamespace(layer_name="preflight.layers.0.block_sparse_moe.experts", router=router,
                                routed_experts=None)
        hooks._on_layer_registered(SimpleNamespace(model_config=None), layer)
        return cls, router

    @add("moekern routing hook on a real vLLM FusedTopKRouter (Mixtral layer, GPU)")
    def _():
        import torch

        if not torch.cuda.is_available():
            raise Skip("no CUDA device")
        from moekern.vllm import hooks
        from moekern.vllm.config import PluginConfig

        cls, router = hooked_mixtral_router(PluginConfig(kernels="routing"), None)
        if "_compute_routing" not in vars(router):
            raise AssertionError("the hook did not shadow router._compute_routing")
        g = torch.Generator(device="cuda").manual_seed(0)
        x = torch.randn(64, 4096, device="cuda", dtype=torch.bfloat16, generator=g)
        # distinct logits per row (a permutation of 8 levels, exact in bf16): no ties to break differently
        perm = torch.argsort(torch.rand(64, 8, device="cuda", generator=g), -1)
        logits = (perm.float() * 0.75 - 2.0).to(torch.bfloat16)
        w, ids = router.select_experts(x, logits, topk_indices_dtype=None)
        w_ref, ids_ref = cls._compute_routing(router, x, logits, None)  # vLLM's own kernel, same router
        if ids.dtype != ids_ref.dtype or tuple(ids.shape) != tuple(ids_ref.shape):
            raise AssertionError(f"ids {ids.dtype}{tuple(ids.shape)} vs vLLM {ids_ref.dtype}{tuple(ids_ref.shape)}")
        same = torch.equal(ids.sort(-1).values, ids_ref.sort(-1).values)
        if not same:
            raise AssertionError("expert sets differ from vLLM's routing")
        order = torch.argsort(ids, -1)
        order_ref = torch.argsort(ids_ref, -1)
        torch.testing.assert_close(w.gather(1, order), w_ref.float().gather(1, order_ref), rtol=1e-5, atol=1e-5)
        why = hooks._STATE["layers"][-1].plans.get(8)
        return f"ids equal, weights within 1e-5; plan: {why.why if why else None}"

    @add("gate-log recorder through the hook (GPU)")
    def _():
        import torch

        if not torch.cuda.is_available():
            raise Skip("no CUDA device")
        from moekern.gatelog import read_gate_log
        from moekern.vllm import hooks
        from moekern.vllm.config import PluginConfig
        from moekern.gatelog.writer import GateLogRecorder

        with tempfile.TemporaryDirectory() as d:
            rec = GateLogRecorder(d, flush_steps=1)
            _, router = hooked_mixtral_router(PluginConfig(kernels="routing", gate_log_dir=d), rec)
            rec.ensure_buffer(torch.device("cuda"))
            want = []
            for M in (37, 5):  # two steps: the second must not see the first's counts
                logits = torch.randn(M, 8, device="cuda", dtype=torch.bfloat16)
                rec.begin_step()
                _, ids = router.select_experts(logits, logits, topk_indices_dtype=None)
                rec.end_step("prefill", M)
                want.append(torch.bincount(ids.flatten().long(), minlength=8).tolist())
            rec.close()
            records, skipped = read_gate_log(d)
        hooks._STATE.update(recorder=None)
        got = [r.expert_counts for r in sorted(records, key=lambda r: r.step)]
        if skipped or got != want:
            raise AssertionError(f"records={got} want={want} skipped={len(skipped)} ({rec.snapshot_why})")
        return f"2 records equal to the routed ids' counts, {got[0]}; hand-off: {rec.snapshot_why}"

    if "moekern" in arms:
        @add("moekern.fused_moe on the GPU (MOEKERN_KERNELS=all)")
        def _():
            import torch

            if not torch.cuda.is_available():
                raise Skip("no CUDA device")
            from moekern.experts.reference import fused_moe_reference
            from moekern.experts import fused_moe
            from moekern.routing import fused_topk

            g = torch.Generator(device="cuda").manual_seed(0)
            M, H, inter, E, k = 33, 256, 128, 8, 2
            x = torch.randn(M, H, device="cuda", dtype=torch.bfloat16, generator=g)
            w13 = torch.randn(E, 2 * inter, H, device="cuda", dtype=torch.bfloat16, generator=g) / H ** 0.5
            w2 = torch.randn(E, H, inter, device="cuda", dtype=torch.bfloat16, generator=g) / inter ** 0.5
            r = fused_topk(torch.randn(M, E, device="cuda", generator=g), k)
            out = fused_moe(x, w13, w2, topk_weights=r.topk_weights, topk_ids=r.topk_ids, check_ids=False)
            ref = fused_moe_reference(x, w13, w2, r.topk_weights, r.topk_ids)
            torch.testing.assert_close(out.float(), ref.float(), rtol=2e-2, atol=2e-2)
            return "matches the torch reference (bf16, 2e-2)"

    return checks, {"vllm imports": "vllm is not importable"}


def build_parser() -> argparse.ArgumentParser:
    import run_e2e

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arms", default=",".join(run_e2e.OFFLINE_ARMS),
                   help=f"comma list of the arms about to run (default: {','.join(run_e2e.OFFLINE_ARMS)})")
    p.add_argument("--mode", default="offline", choices=("offline", "serve", "both"))
    p.add_argument("--model", default="mixtral-8x7b-4l", choices=sorted(run_e2e.MODELS))
    return p


def parse_args(argv=None) -> argparse.Namespace:
    import run_e2e

    p = build_parser()
    args = p.parse_args(argv)
    args.arms = [a for a in args.arms.split(",") if a]
    bad = [a for a in args.arms if a not in run_e2e.ARMS]
    if bad or not args.arms:
        p.error(f"--arms: unknown arm(s) {bad} (or none given); known {sorted(run_e2e.ARMS)}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    t0 = time.time()
    checks, stops = build_checks(args)
    code = report(run_checks(checks, stops))
    print(f"preflight took {time.time() - t0:.1f}s (arms {','.join(args.arms)}, mode {args.mode}, model {args.model})")
    return code


if __name__ == "__main__":
    os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")
    sys.exit(main())
