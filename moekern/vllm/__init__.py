"""moekern's vLLM plugin: moekern's routing (and experts) inside vLLM, and per-step gate logs.

Installed with moekern, it is the `vllm.general_plugins` entry point `moekern = "moekern.vllm:register"`,
which vLLM calls in every process it starts (API server, engine core, workers). Settings come from the
environment (see moekern.vllm.config):

    MOEKERN_KERNELS=off|routing|all   off (default): vLLM's own kernels
                                      routing: moekern.fused_topk routes every MoE layer it can map
                                      all: routing + moekern.fused_moe for the experts (unquantized, no EP)
    MOEKERN_GATE_LOG_DIR=<dir>        gate logs on: <dir>/gate_log.rank{R}.jsonl (schema moekern.gatelog/1)
    MOEKERN_ROUTING_SKEW=...          synthetic routing skew for dummy-weight studies

With none of them set, register() returns before importing anything: vLLM runs exactly as without the
plugin. How and where it hooks into vLLM 0.26 is documented in moekern/vllm/hooks.py and README.md.
"""

from __future__ import annotations

import logging

from moekern.vllm.config import PluginConfig, config_from_env, parse_skew, skew_bias, skew_probabilities

__all__ = ["PluginConfig", "config_from_env", "parse_skew", "register", "skew_bias", "skew_probabilities"]

logger = logging.getLogger("vllm.moekern")


def register() -> PluginConfig | None:
    """vLLM's general-plugin entry point. Returns the active config, or None when the plugin is off."""
    cfg = config_from_env()  # a bad value raises here, naming the variable, rather than running silently
    if not cfg.enabled:
        return None
    from moekern.vllm.hooks import install

    install(cfg)
    logger.info("moekern plugin on: kernels=%s gate_log_dir=%s skew=%s", cfg.kernels, cfg.gate_log_dir,
                cfg.skew.describe() if cfg.skew else None)
    return cfg
