"""The expert MLP of a MoE layer: moekern.fused_moe (route, align, grouped GEMMs, combine) and its configs."""

from moekern.experts.api import fused_moe
from moekern.experts.configs import BlockConfig, default_configs, get_configs

__all__ = ["BlockConfig", "default_configs", "fused_moe", "get_configs"]
