"""The registry of MoE model shapes, their sizes, and dummy-weight HF configs."""

from moekern.models.hf import hf_config, write_hf_config
from moekern.models.registry import MODELS, STANDARD_MODELS, ModelSpec, get_model
from moekern.models.sizes import ParamCounts, param_counts, standard_layouts, weight_bytes_per_gpu

__all__ = ["MODELS", "STANDARD_MODELS", "ModelSpec", "get_model", "ParamCounts", "param_counts",
           "weight_bytes_per_gpu", "standard_layouts", "hf_config", "write_hf_config"]
