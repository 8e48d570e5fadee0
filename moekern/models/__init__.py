"""The registry of MoE model shapes."""

from moekern.models.registry import MODELS, STANDARD_MODELS, ModelSpec, get_model

__all__ = ["MODELS", "STANDARD_MODELS", "ModelSpec", "get_model"]
