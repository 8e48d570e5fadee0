"""The preflight's vLLM checks, no GPU needed: every vLLM 0.26 symbol the plugin and the runner rely on.

By inspect.signature and attribute look-ups: each hook target of moekern.vllm.hooks (MoERunner ->
register_layer_for_moe_forward_op, BaseRouter._compute_routing, the routers' attributes that routing_map
reads, UnquantizedFusedMoEMethod.apply, Worker.execute_model/load_model, SchedulerOutput fields), the engine
arguments and the `vllm serve` / `vllm bench serve` command lines the runner builds (parsed by vLLM's own
parsers), that the model's architecture imports (the FlashAttention import that killed the first run) and
the moekern entry point.
"""

from __future__ import annotations

import importlib
import inspect
import json
from pathlib import Path

from moekern.e2e.arms import bench_command, engine_kwargs, serve_command
from moekern.e2e.checklist import Skip, check_signature, collector, resolve, source_has
from moekern.e2e.make_configs import config_path


MOE_RUNNER = "vllm.model_executor.layers.fused_moe.runner.moe_runner"
ROUTER = "vllm.model_executor.layers.fused_moe.router"
UNQUANT = "vllm.model_executor.layers.fused_moe.unquantized_fused_moe_method"
GPU_WORKER = "vllm.v1.worker.gpu_worker"


RE = "vllm.model_executor.layers.fused_moe.routed_experts"
LLM_MOD = "vllm.entrypoints.llm"

# What hooks.py and the runner call, as vLLM 0.26 defines it: (module, qualname, positional parameters in
# order, keyword-only parameters). tests/test_e2e_preflight.py checks this table against the 0.26 source.
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
    (GPU_WORKER, "Worker.shutdown", ["self"], []),  # the gate log is written and closed there
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
    # the engine core shuts its executor (and so the worker) down before its process ends
    ("vllm.v1.engine.core", "EngineCore.shutdown", ["self.model_executor.shutdown()"]),
]


def vllm_checks(args, ns) -> list:
    """(name, fn) checks of vLLM's API for preflight `args` (arms, mode, model); `ns` holds the runner's own
    parsed arguments for those arms, so its engine kwargs and command lines are what is checked."""
    arms = args.arms
    plugin_arms = [a for a in arms if a.startswith("moekern")]
    checks = []
    add = collector(checks)

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
        cfg = json.loads(config_path(args.model).read_text())
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

        hf = AutoConfig.from_pretrained(str(config_path(args.model).parent))
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
            used |= set(engine_kwargs(ns, arm))
        missing = sorted(used - fields)
        if missing:
            raise AssertionError(f"EngineArgs has no {missing}")
        backends = resolve("vllm.v1.attention.backends.registry", "AttentionBackendEnum")
        if ns.attention_backend not in backends.__members__:
            raise AssertionError(f"attention_backend={ns.attention_backend!r} not in AttentionBackendEnum")
        moe = set(typing.get_args(resolve("vllm.config.kernel", "MoEBackend")))
        for arm in arms:
            b = engine_kwargs(ns, arm).get("moe_backend")
            if b is not None and b not in moe:
                raise AssertionError(f"moe_backend={b!r} not in vllm.config.kernel.MoEBackend {sorted(moe)}")
        cc = resolve("vllm.config", "CompilationConfig")
        cc(**engine_kwargs(ns, arms[0])["compilation_config"])
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
                cmd = serve_command(engine_kwargs(ns, arm), 8000)
                a = make_arg_parser(FlexibleArgumentParser()).parse_args(cmd[2:])
                if a.model_tag != str(ns.model_dir) or a.max_num_seqs != ns.max_num_seqs:
                    raise AssertionError(f"{arm}: parsed model_tag={a.model_tag!r}, max_num_seqs={a.max_num_seqs}")
                # the steady-state settings (arms.engine_kwargs) must reach the server as meant
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
            a = p.parse_args(bench_command(ns, 8000, Path("/tmp"), "x.json")[3:])
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

    return checks
