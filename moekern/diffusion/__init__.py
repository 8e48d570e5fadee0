"""moekern.diffusion: LLaDA-style masked-diffusion LM inference on moekern's MoE kernels.

    from moekern.diffusion import config_from_registry, init_random, generate
    cfg = config_from_registry("llada-moe-7b", num_layers=2, hidden_size=64, num_heads=4, num_experts=8,
                               intermediate_size=32, vocab_size=128)
    model = init_random(cfg, device="cpu")
    out = generate(model, [[1, 2, 3]], gen_length=8, block_length=4, steps=4, moe_backend="moekern")
    out.generated  # [1, 8] token ids

Parts: model.py (config, weights, forward, MoE backends), generate.py (denoising loop, AR baseline, gate
records), checkpoint.py (safetensors names), bench.py + cli.py (`moekern diffusion generate|bench`).
See README.md in this folder.
"""

from moekern.diffusion.checkpoint import (config_overrides_from_hf, load_checkpoint, save_checkpoint,
                                          state_dict)
from moekern.diffusion.generate import (GenerationResult, StepRecord, ar_generate, gate_records, generate,
                                        transfer_schedule, validate_generation_args, write_gate_log)
from moekern.diffusion.model import (KERNEL_BACKENDS, MOE_BACKENDS, DiffusionConfig, DiffusionModel,
                                     ForwardStats, LayerWeights, config_from_registry, forward, init_random,
                                     moe_backend_unavailable_reason, with_dtype)

__all__ = [
    "DiffusionConfig", "DiffusionModel", "LayerWeights", "ForwardStats", "MOE_BACKENDS", "KERNEL_BACKENDS",
    "config_from_registry", "init_random", "forward", "with_dtype", "moe_backend_unavailable_reason",
    "generate", "ar_generate", "GenerationResult", "StepRecord", "transfer_schedule",
    "validate_generation_args", "gate_records", "write_gate_log",
    "load_checkpoint", "save_checkpoint", "state_dict", "config_overrides_from_hf",
]
