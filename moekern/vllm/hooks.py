"""The vLLM-touching half of the plugin: where it hooks in, and what each hook does.

Narrow hooks, each installed when (and only when) vLLM imports the module that owns it, via a
post-import hook (`when_imported`), so register() itself imports nothing from vLLM:

1. vllm.model_executor.layers.fused_moe.runner.moe_runner.register_layer_for_moe_forward_op
   (module function; MoERunner.__init__ calls it once per MoE layer, in model order). The wrapper calls
   the original, then takes the layer's router and, if it is one of vLLM's BaseRouter classes, shadows
   its `_compute_routing` with an *instance* attribute. Only that layer's router changes; BaseRouter's
   own pre/post steps (EPLB logical->physical mapping, routed-experts capture, index dtype) still run.
   With MOEKERN_KERNELS=all it also shadows the layer's UnquantizedFusedMoEMethod.apply with
   moekern.fused_moe, per layer and only where that is exact (see `_experts_ok`).
2. vllm.v1.worker.gpu_worker.Worker.execute_model (class method; both model runners, V1 and V2, are
   driven through it): step boundaries for the gate log (begin_step / end_step) and the step's phase.
3. vllm.v1.worker.gpu_worker.Worker.load_model: allocate the gate-log buffers right after the weights,
   i.e. before profiling and CUDA-graph capture; with MOEKERN_DUMMY_ROUTER_SEED, first re-draw each MoE
   layer's router weight (`reseed_dummy_routers`: dummy weights otherwise give every layer the same router).

   Worker.execute_dummy_batch (if present: data parallelism's idle-rank forwards, outside any step): tell the
   gate log its buffer holds counts that are no step's.
   Worker.shutdown: write and close the gate log. vLLM's engine-core process ends through multiprocessing
   (os._exit, no atexit handlers), so without this a run shorter than the writer's flush interval left an
   empty gate log; a multiprocessing finalizer covers processes that end without a worker shutdown.
4. Worker.moekern_plugin_summary (a method we add; these live in moekern/vllm/worker_rpc.py): what the plugin did in that worker, for
   `llm.collective_rpc("moekern_plugin_summary")`; Worker.moekern_gate_log(on) pauses/resumes the gate log
   between steps (moekern e2e --gate-log-paired); Worker.moekern_routing_skew(skew) re-draws the synthetic
   routing skew of a running engine (the serve grid's --skews, through `vllm serve`'s POST /collective_rpc,
   which vLLM 0.26 mounts when VLLM_SERVER_DEV_MODE=1: entrypoints/serve/dev/rpc/api_router.py). A method name, not a function: vLLM 0.26's engine-core
   client serializes collective_rpc's `method` with msgpack, which refuses functions unless
   VLLM_ALLOW_INSECURE_SERIALIZATION=1 (v1/serial_utils.py enc_hook).

torch.compile / CUDA graphs: the MoE layer runs inside vLLM's opaque custom op torch.ops.vllm.moe_forward
(torch.ops.vllm.moe_forward_shared for layers with shared experts; both direct_register_custom_op with a
fake impl in fused_moe/runner/moe_runner.py, chosen by MoERunner._select_forward on CUDA), so Dynamo never
traces our Python and needs no fake for
fused_topk; the op's real body runs eagerly, and under CUDA graphs only once, at capture. Everything we
launch there is capture-safe: fused_topk (no host sync), `counts[layer] += expert_counts`, the optional
top-k sample's slice copy, the skew bias add, fused_moe(check_ids=False). Nothing on the host side of a step (hook 2) is inside a captured region.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import logging
import os
import sys
import threading
import time

import torch

from moekern.vllm.config import PluginConfig, skew_bias
from moekern.vllm.routing_map import RoutingPlan, classify_phase, plan_routing

# A child of vLLM's "vllm" logger, so vLLM's logging configuration shows our messages.
logger = logging.getLogger("vllm.moekern")
_logged_reasons: set = set()

MOE_RUNNER = "vllm.model_executor.layers.fused_moe.runner.moe_runner"
GPU_WORKER = "vllm.v1.worker.gpu_worker"

_lock = threading.Lock()
_STATE: dict = {"config": None, "recorder": None, "layers": [], "installed": False}


# ---- post-import hooks ------------------------------------------------------------------------------------
class _PostImportFinder(importlib.abc.MetaPathFinder):
    """Runs callbacks right after a named module finishes executing (then steps aside)."""

    def __init__(self):
        self.callbacks: dict[str, list] = {}

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in self.callbacks:
            return None
        # Ask the rest of the meta path (without us) for the real spec, then wrap its loader.
        idx = sys.meta_path.index(self) if self in sys.meta_path else -1
        for finder in sys.meta_path[idx + 1:]:
            find = getattr(finder, "find_spec", None)
            if find is None:
                continue
            spec = find(fullname, path, target)
            if spec is not None and spec.loader is not None:
                spec.loader = _CallbackLoader(spec.loader, self.callbacks.pop(fullname))
                return spec
        return None


class _CallbackLoader(importlib.abc.Loader):
    def __init__(self, inner, callbacks):
        self.inner, self.callbacks = inner, callbacks

    def create_module(self, spec):
        return self.inner.create_module(spec)

    def exec_module(self, module):
        self.inner.exec_module(module)
        for cb in self.callbacks:
            cb(module)

    def __getattr__(self, name):  # get_source, is_package, ... for tools that ask the loader
        return getattr(self.inner, name)


_finder = _PostImportFinder()


def when_imported(module_name: str, callback) -> None:
    """Call callback(module) now if `module_name` is imported, else right after it is."""
    mod = sys.modules.get(module_name)
    if mod is not None:
        callback(mod)
        return
    _finder.callbacks.setdefault(module_name, []).append(callback)
    if _finder not in sys.meta_path:
        sys.meta_path.insert(0, _finder)


# ---- per-layer state --------------------------------------------------------------------------------------
class LayerHook:
    """What the plugin knows about one MoE layer: index, plan cache, skew bias, recorder."""

    def __init__(self, index: int, name: str, router, cfg: PluginConfig, recorder):
        self.index, self.name, self.router, self.cfg, self.recorder = index, name, router, cfg, recorder
        self.plans: dict[int, RoutingPlan | None] = {}
        self.skew = cfg.skew  # set_routing_skew replaces it (and the bias's values) inside a running engine
        self.bias = None
        self.experts_decision: bool | None = None

    def plan(self, num_experts: int) -> RoutingPlan | None:
        if num_experts not in self.plans:
            plan, why = plan_routing(self.router, num_experts)
            if plan is None:
                # once per distinct reason, not once per layer
                log = logger.warning if why not in _logged_reasons else logger.debug
                _logged_reasons.add(why)
                log("moekern: layer %d (%s) keeps vLLM routing: %s", self.index, self.name, why)
            else:
                logger.info("moekern: layer %d (%s) routed by moekern.fused_topk: %s", self.index, self.name,
                            plan.why)
            self.plans[num_experts] = plan
        return self.plans[num_experts]

    def route(self, orig, hidden_states, router_logits, indices_type, input_ids):
        logits = router_logits
        if self.skew is not None:
            E = logits.shape[-1]
            if self.bias is None or self.bias.shape[0] != E or self.bias.device != logits.device:
                self.bias = skew_bias(self.skew, E, device=logits.device)
            logits = torch.add(self.bias, logits)  # fp32 [M, E]: one kernel, graph-capturable
        plan = self.plan(logits.shape[-1]) if self.cfg.kernels != "off" else None
        if plan is not None:
            from moekern.routing import fused_topk

            bias = None
            if plan.uses_bias:
                bias = getattr(self.router, "e_score_correction_bias")
                bias = bias.data if isinstance(bias, torch.nn.Parameter) else bias
                if bias.dtype != torch.float32:
                    bias = bias.float()
            out = fused_topk(logits, plan.top_k, correction_bias=bias, **plan.kwargs)
            if self.recorder is not None:
                self.recorder.add_counts(self.index, out.expert_counts)
                self.recorder.add_topk_sample(self.index, out.topk_ids)
            ids = out.topk_ids
            if indices_type is not None and ids.dtype != indices_type:
                ids = ids.to(indices_type)
            return out.topk_weights, ids
        topk_weights, topk_ids = orig(hidden_states, logits, indices_type, input_ids=input_ids)
        if self.recorder is not None:
            top_k = getattr(self.router, "top_k", topk_ids.shape[1])
            self.recorder.add_ids(self.index, topk_ids[:, :top_k])  # fused shared slots come after
            self.recorder.add_topk_sample(self.index, topk_ids[:, :top_k])
        return topk_weights, topk_ids


def _experts_ok(hook: LayerHook, quant_method, layer) -> tuple[bool, str]:
    """Whether moekern.fused_moe computes exactly what this layer's vLLM experts would."""
    if type(quant_method).__name__ != "UnquantizedFusedMoEMethod":
        return False, f"quant method {type(quant_method).__name__} (only unquantized MoE is swapped)"
    backend = getattr(getattr(quant_method, "unquantized_backend", None), "name", None)
    if backend != "TRITON":
        return False, f"vLLM unquantized backend {backend} (weights may be re-laid out; only TRITON is swapped)"
    if getattr(layer, "expert_map", None) is not None:
        return False, "expert parallelism (expert_map set): moekern.fused_moe has no expert map"
    moe = getattr(layer, "moe_config", None)
    if moe is not None and (getattr(moe, "has_bias", False) or getattr(moe, "is_lora_enabled", False)):
        return False, "expert biases or LoRA"
    pc = getattr(moe, "moe_parallel_config", None)
    if pc is not None and getattr(pc, "use_all2all_kernels", False):
        return False, "all2all prepare/finalize kernels"
    act = getattr(getattr(layer, "activation", None), "name", None)
    if act != "SILU":
        return False, f"activation {act} (moekern.fused_moe is SiLU-and-mul)"
    if getattr(layer, "apply_router_weight_on_input", False):
        return False, "apply_router_weight_on_input"
    try:
        from moekern.experts import fused_moe  # noqa: F401
    except Exception as exc:  # being written in parallel; degrade to routing only
        return False, f"moekern.fused_moe unavailable ({exc})"
    return True, "moekern.fused_moe"


def _install_experts(hook: LayerHook, runner) -> None:
    routed = getattr(runner, "routed_experts", None)
    qm = getattr(routed, "quant_method", None)
    if qm is None or not hasattr(qm, "apply"):
        logger.warning("moekern: layer %d (%s): no quant_method.apply to swap", hook.index, hook.name)
        return
    orig_apply = qm.apply

    def apply(layer, x=None, topk_weights=None, topk_ids=None, shared_experts=None, shared_experts_input=None):
        if x is None and topk_ids is None and callable(layer) and isinstance(qm, torch.nn.Module):
            # The quant method is an nn.Module (CustomOp): this instance attribute also shadows
            # nn.Module.apply(fn), which a parent's model.apply(fn) calls on every child.
            return torch.nn.Module.apply(qm, layer)
        if hook.experts_decision is None:
            ok, why = _experts_ok(hook, qm, layer)
            (logger.info if ok else logger.warning)(
                "moekern: layer %d (%s) experts: %s", hook.index, hook.name, why if ok else f"vLLM's ({why})")
            hook.experts_decision = ok
        if not hook.experts_decision:
            return orig_apply(layer=layer, x=x, topk_weights=topk_weights, topk_ids=topk_ids,
                              shared_experts=shared_experts, shared_experts_input=shared_experts_input)
        from moekern.experts import fused_moe

        if shared_experts is not None:
            # vLLM's modular kernel would run shared experts inside apply() when it overlaps them; that
            # order (MK_INTERNAL_OVERLAPPED) runs here instead; other orders are no-ops in this call.
            from vllm.model_executor.layers.fused_moe.runner.shared_experts import SharedExpertsOrder

            shared_experts(shared_experts_input, SharedExpertsOrder.MK_INTERNAL_OVERLAPPED)
        return fused_moe(x, layer.w13_weight, layer.w2_weight, topk_weights=topk_weights, topk_ids=topk_ids,
                         check_ids=False)

    qm.apply = apply


def hook_layer(runner, config: PluginConfig, recorder=None) -> LayerHook:
    """Hook one MoE layer outside a vLLM engine, as register_layer_for_moe_forward_op does inside one (the
    e2e preflight checks the hook on a real vLLM router so). The plugin's config and gate-log recorder become
    `config` and `recorder`, its layer list this layer alone. `runner` carries `router` (a vLLM BaseRouter),
    `layer_name` and `routed_experts`. Returns the layer's LayerHook; ValueError when the router is no
    BaseRouter (an engine leaves such a layer to vLLM)."""
    _STATE.update(config=config, recorder=recorder, layers=[])
    _on_layer_registered(None, runner)
    if not _STATE["layers"]:
        raise ValueError(f"runner.router={type(getattr(runner, 'router', None)).__name__} must be a vLLM "
                         f"BaseRouter (with _compute_routing)")
    return _STATE["layers"][-1]


def _on_layer_registered(vllm_config, runner) -> None:
    cfg: PluginConfig = _STATE["config"]
    router = getattr(runner, "router", None)
    name = getattr(runner, "layer_name", "?")
    if router is None or not hasattr(router, "_compute_routing"):
        logger.warning("moekern: MoE layer %s has no BaseRouter (%s); left to vLLM", name, type(router).__name__)
        return
    E = int(getattr(router, "global_num_experts", 0) or 0)
    top_k = int(getattr(router, "top_k", 0) or 0)
    rec = _STATE["recorder"]
    if rec is not None:
        if rec.model is None:
            rec.model = str(getattr(getattr(vllm_config, "model_config", None), "model", "") or "") or None
        index = rec.register_layer(name, E, top_k)
    else:
        index = len(_STATE["layers"])
    hook = LayerHook(index, name, router, cfg, rec)
    _STATE["layers"].append(hook)
    orig = router._compute_routing  # bound method of the class

    def _compute_routing(hidden_states, router_logits, indices_type, *, input_ids=None):
        return hook.route(orig, hidden_states, router_logits, indices_type, input_ids)

    router._compute_routing = _compute_routing  # instance attribute shadows the class method
    if cfg.kernels == "all":
        _install_experts(hook, runner)


def _patch_moe_runner(module) -> None:
    orig = module.register_layer_for_moe_forward_op
    if getattr(orig, "_moekern", False):
        return

    def register_layer_for_moe_forward_op(vllm_config, layer):
        orig(vllm_config, layer)
        try:
            _on_layer_registered(vllm_config, layer)
        except Exception:  # never break model construction: the layer stays vLLM's
            logger.exception("moekern: could not hook MoE layer %s", getattr(layer, "layer_name", "?"))

    register_layer_for_moe_forward_op._moekern = True
    module.register_layer_for_moe_forward_op = register_layer_for_moe_forward_op


def _parallel_extra() -> dict:
    extra = {}
    try:
        from vllm.distributed import parallel_state as ps

        for key, getter in (("tp_rank", "get_tp_group"), ("ep_rank", "get_ep_group"), ("dp_rank", "get_dp_group"),
                            ("pp_rank", "get_pp_group")):
            try:
                group = getattr(ps, getter)()
                if group.world_size > 1:
                    extra[key] = int(group.rank_in_group)
            except Exception:
                pass
    except Exception:
        pass
    return extra


def _patch_worker(module) -> None:
    Worker = module.Worker
    if getattr(Worker.execute_model, "_moekern", False):
        return
    orig_execute, orig_load = Worker.execute_model, Worker.load_model
    prompt_lens: dict = {}

    def execute_model(self, scheduler_output, *args, **kwargs):
        rec = _STATE["recorder"]
        n = getattr(scheduler_output, "total_num_scheduled_tokens", 0)
        if rec is None or not rec.ready or rec.paused or not n:
            if rec is not None and not n:
                rec.mark_dirty()  # whatever this call runs (a padded dummy forward?) is no step's
            return orig_execute(self, scheduler_output, *args, **kwargs)
        t0, c0 = time.perf_counter(), time.thread_time()
        try:
            phase = classify_phase(scheduler_output, prompt_lens)
        except Exception:
            phase = "unknown"
        rec.add_host_time(time.perf_counter() - t0, time.thread_time() - c0)
        rec.begin_step()
        out = orig_execute(self, scheduler_output, *args, **kwargs)
        rec.end_step(phase, int(n))
        return out

    def load_model(self, *args, **kwargs):
        out = orig_load(self, *args, **kwargs)
        seed = getattr(_STATE["config"], "dummy_router_seed", None)
        if seed is not None:
            names = [h.name for h in _STATE["layers"]]
            done = reseed_dummy_routers(self.get_model(), names, seed)
            logger.info("moekern: MOEKERN_DUMMY_ROUTER_SEED=%d re-drew the router weight of %d of %d MoE layers",
                        seed, len(done), len(names))
        rec = _STATE["recorder"]
        if rec is not None and rec.layers and rec.counts is None:
            rec.extra.update(_parallel_extra())
            rec.ensure_buffer(getattr(self, "device", None) or torch.device("cuda", torch.cuda.current_device()))
            logger.info("moekern: gate log -> %s (%d MoE layers)", rec.path, len(rec.layers))
        return out

    orig_shutdown = getattr(Worker, "shutdown", None)

    def shutdown(self, *args, **kwargs):
        # The engine-core process ends through multiprocessing, which skips atexit handlers: the gate log's
        # last steps (all of them, in a run shorter than flush_seconds) are written here, when vLLM shuts the
        # worker down, within its grace period before it kills the process.
        close_recorder()
        return orig_shutdown(self, *args, **kwargs) if orig_shutdown is not None else None

    execute_model._moekern = True
    Worker.execute_model = execute_model
    Worker.load_model = load_model
    Worker.shutdown = shutdown
    orig_dummy = getattr(Worker, "execute_dummy_batch", None)
    if orig_dummy is not None:
        def execute_dummy_batch(self, *args, **kwargs):
            # data parallelism's idle-rank forwards replay CUDA graphs outside any step: their counts are not
            # the next step's
            out = orig_dummy(self, *args, **kwargs)
            rec = _STATE["recorder"]
            if rec is not None:
                rec.mark_dirty()
            return out

        Worker.execute_dummy_batch = execute_dummy_batch


# vLLM's dummy loader seeds every parameter alike, so same-shaped parameters get the same values: every MoE
# layer of a dummy-weight model has the same router, and its layers route identically (seen in the first H100
# gate logs). Re-drawing each router from its own generator gives the layers independent random routers.
DUMMY_LOW, DUMMY_HIGH = -1e-3, 1e-3  # vLLM's initialize_dummy_weights range


@torch.no_grad()
def reseed_dummy_routers(model: torch.nn.Module, layer_names, seed: int) -> list[str]:
    """Re-draw the router weight of each MoE layer uniformly in [DUMMY_LOW, DUMMY_HIGH) from a generator
    seeded with seed * 1_000_003 + layer index (identical on every TP/EP rank: routers are replicated).

    layer_names: the experts modules' names as vLLM registers them ("model.layers.3.mlp.experts"); the router
    is the sibling module `gate` (Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek-V2/V3). Returns the gate modules
    re-drawn; layers without such a sibling are logged and left alone."""
    done = []
    for index, name in enumerate(layer_names):
        parent = name.rsplit(".", 1)[0] if "." in name else ""
        gate_name = f"{parent}.gate" if parent else "gate"
        try:
            gate = model.get_submodule(gate_name)
        except AttributeError:
            logger.warning("moekern: no router module %s for MoE layer %s; its router is left as loaded",
                           gate_name, name)
            continue
        w = getattr(gate, "weight", None)
        if not isinstance(w, torch.Tensor) or not torch.is_floating_point(w):
            logger.warning("moekern: %s has no floating-point weight; left as loaded", gate_name)
            continue
        g = torch.Generator(device=w.device).manual_seed(seed * 1_000_003 + index)
        # draw in fp32 then cast, so the values do not depend on the weight's dtype
        fresh = torch.empty(w.shape, dtype=torch.float32, device=w.device).uniform_(DUMMY_LOW, DUMMY_HIGH,
                                                                                    generator=g)
        w.copy_(fresh)
        done.append(gate_name)
    return done


def install(cfg: PluginConfig) -> None:
    """Arm the hooks (idempotent: vLLM may load general plugins more than once per process)."""
    with _lock:
        if _STATE["installed"]:
            return
        _STATE["installed"] = True
        _STATE["config"] = cfg
        if cfg.gate_log:
            import atexit
            import multiprocessing.util

            from moekern.gatelog.writer import GateLogRecorder

            rec = GateLogRecorder(cfg.gate_log_dir, flush_steps=cfg.flush_steps, flush_seconds=cfg.flush_seconds,
                                  queue_slots=cfg.queue_slots, topk_sample=cfg.topk_sample,
                                  topk_every=cfg.topk_every, snapshot=cfg.gate_log_snapshot,
                                  meta={"kernels": cfg.kernels, "skew": cfg.skew.describe() if cfg.skew else None,
                                        "dummy_router_seed": cfg.dummy_router_seed})
            _STATE["recorder"] = rec
            atexit.register(close_recorder)
            # Processes started by multiprocessing (vLLM's engine core) end with os._exit after running
            # multiprocessing's own finalizers, not atexit's: register there too.
            multiprocessing.util.Finalize(None, close_recorder, exitpriority=100)
    when_imported(MOE_RUNNER, _patch_moe_runner)
    when_imported(GPU_WORKER, _add_worker_rpc)
    if cfg.gate_log or cfg.dummy_router_seed is not None:
        when_imported(GPU_WORKER, _patch_worker)


def _add_worker_rpc(module) -> None:
    from moekern.vllm.worker_rpc import add_worker_rpc

    add_worker_rpc(module)


CLOSE_TIMEOUT_S = 3.0  # within vLLM's 5 s grace between terminating an engine process and killing it


def close_recorder() -> None:
    """Write what the gate log holds and close it (idempotent; never raises: it runs on shutdown paths)."""
    rec = _STATE["recorder"]
    if rec is None:
        return
    try:
        rec.close(timeout=CLOSE_TIMEOUT_S)
    except Exception:
        logger.exception("moekern: closing the gate log failed")
