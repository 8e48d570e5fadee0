"""The methods the plugin adds to vLLM's Worker, so `collective_rpc` can name them by string (hook 4 of
moekern.vllm.hooks): a summary of what the plugin did, the gate log's pause switch, and the synthetic routing
skew of a running engine. Each takes the worker first (vLLM calls them as fn(worker, *args)) and returns plain
JSON types (msgpack carries them back; `vllm serve`'s POST /collective_rpc forwards JSON arguments as they
came, so string forms of bools and ints are accepted).
"""

from __future__ import annotations

import logging
import os

from moekern.vllm.config import skew_bias
from moekern.vllm import hooks

logger = logging.getLogger("vllm.moekern")


def add_worker_rpc(module) -> None:
    """Give vLLM's Worker `moekern_plugin_summary`, `moekern_gate_log` and `moekern_routing_skew` methods, so
    collective_rpc can name them by string."""
    if not hasattr(module.Worker, "moekern_plugin_summary"):
        module.Worker.moekern_plugin_summary = plugin_summary
    if not hasattr(module.Worker, "moekern_gate_log"):
        module.Worker.moekern_gate_log = gate_log_switch
    if not hasattr(module.Worker, "moekern_routing_skew"):
        module.Worker.moekern_routing_skew = set_routing_skew


def _on_off(on) -> bool | None:
    """collective_rpc's argument as a bool: vLLM serve's dev endpoint (POST /collective_rpc) forwards its JSON
    args as they came, and its docs ask callers for strings, so "true"/"false"/"1"/"0" count too."""
    if on is None or isinstance(on, bool):
        return on
    text = str(on).strip().lower()
    if text in ("1", "true", "on", "yes"):
        return True
    if text in ("0", "false", "off", "no"):
        return False
    raise ValueError(f"on={on!r} must be true or false (a bool or its string)")


def gate_log_switch(worker=None, on: bool | str | None = None) -> dict:
    """Worker.moekern_gate_log: `collective_rpc("moekern_gate_log", args=(on,))` pauses (False) or resumes
    (True) this worker's gate log between steps; None only reports. Returns {"gate_log": bool | None (no gate
    log in this process), "steps": steps recorded so far}."""
    on = _on_off(on)
    rec = hooks._STATE["recorder"]
    if rec is None:
        return {"gate_log": None, "steps": 0}
    if on is not None:
        rec.set_paused(not on)
    return {"gate_log": not rec.paused, "steps": rec.stats.steps}


def set_routing_skew(worker=None, skew: str | None = None, seed: int | str = 0) -> dict:
    """Worker.moekern_routing_skew: `collective_rpc("moekern_routing_skew", args=("hot:0:0.5",))` re-draws
    every hooked layer's routing skew in a running engine (`skew` in MOEKERN_ROUTING_SKEW's syntax; `seed` the
    zipf permutation's). None only reports.

    The bias is overwritten in place (`copy_`), never replaced: CUDA graphs captured at start-up read the
    tensor at its address, so a new tensor would be ignored by every replayed step. That also means the engine
    must have started with a skew (MOEKERN_ROUTING_SKEW set, `uniform` is enough): without one no bias add was
    captured, and this raises ValueError instead of silently changing nothing. Call it between steps (vLLM
    runs collective_rpc between them); pause the gate log around it (moekern_gate_log) so no step mixes two
    skews. Returns {"skew": the skew now in force (RoutingSkew.describe()), "layers": hooked layers,
    "biases_rewritten": layers whose device bias was rewritten (the others build theirs at their next step)}."""
    from moekern.vllm.config import parse_skew

    layers = hooks._STATE["layers"]
    cfg = hooks._STATE["config"]
    if skew is not None:
        try:
            seed_value = int(seed)
        except (TypeError, ValueError):
            raise ValueError(f"seed={seed!r} must be an int") from None
        new = parse_skew(str(skew), seed=seed_value, name="skew")
        if new is None:
            raise ValueError(f"skew={skew!r} is empty: name a skew ('uniform' for none)")
        if layers and (cfg is None or cfg.skew is None):
            raise ValueError("this engine started without MOEKERN_ROUTING_SKEW, so its captured CUDA graphs add no "
                             "routing bias; start it with MOEKERN_ROUTING_SKEW=uniform to switch skews at run time")
        rewritten = 0
        for hook in layers:
            if hook.bias is not None:
                hook.bias.copy_(skew_bias(new, hook.bias.shape[0], device=hook.bias.device))
                rewritten += 1
            hook.skew = new
        rec = hooks._STATE["recorder"]
        if rec is not None:
            rec.meta["skew"] = new.describe()
        logger.info("moekern: routing skew -> %s (%d layers, %d biases rewritten)", new.describe(), len(layers),
                    rewritten)
        return {"skew": new.describe(), "layers": len(layers), "biases_rewritten": rewritten}
    now = layers[0].skew if layers else getattr(cfg, "skew", None)
    return {"skew": now.describe() if now is not None else None, "layers": len(layers), "biases_rewritten": 0}


def plugin_summary(worker=None) -> dict:
    """What the plugin did in this process: Worker.moekern_plugin_summary, i.e. fn(worker) under vLLM's
    collective_rpc("moekern_plugin_summary"). Plain JSON types only (msgpack carries it back)."""
    rec = hooks._STATE["recorder"]
    return {
        "installed": hooks._STATE["installed"],
        "kernels": getattr(hooks._STATE["config"], "kernels", None),
        "dummy_router_seed": getattr(hooks._STATE["config"], "dummy_router_seed", None),
        "moe_configs": os.environ.get("MOEKERN_MOE_CONFIGS") or None,  # tuned tiles laid over fused_moe's table
        "layers": [{"index": h.index, "name": h.name, "router": type(h.router).__name__,
                    "moekern_routing": {str(E): (p.why if p else None) for E, p in h.plans.items()},
                    "moekern_experts": h.experts_decision} for h in hooks._STATE["layers"]],
        "gate_log": None if rec is None else {"path": str(rec.path), "steps": rec.stats.steps,
                                              "dropped_steps": rec.stats.dropped_steps,
                                              "host_us_per_step": rec.stats.host_us_per_step,
                                              "host_split_us_per_step": rec.stats.host_split_us_per_step,
                                              "writer_cpu_seconds": round(rec.stats.writer_cpu_seconds, 3),
                                              "writer_wakeups": rec.stats.wakeups,
                                              "snapshot": rec.snapshot_why},
    }
