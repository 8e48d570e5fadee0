"""One registry of MoE model shapes: benchmarks, dummy-weight end-to-end configs, memory estimates and
placement all read it.

Values are from each model's published config.json (Hugging Face model cards); `intermediate_size` is the
routed expert's FFN width (moe_intermediate_size where the config has one). LLaDA-8B is dense (E = 0).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class ModelSpec:
    name: str  # registry key, e.g. "mixtral"
    hf_id: str  # the checkpoint the shape comes from
    architecture: str  # HF `architectures[0]`, for dummy-weight configs
    hidden_size: int
    intermediate_size: int  # per routed expert (dense FFN width for dense models)
    num_experts: int  # routed experts; 0 for a dense model
    top_k: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    vocab_size: int
    head_dim: int | None = None  # None: hidden_size // num_heads
    num_shared_experts: int = 0
    shared_intermediate_size: int = 0  # total width of the shared expert(s) FFN
    first_k_dense: int = 0  # leading dense layers (DeepSeek)
    dense_intermediate_size: int = 0  # FFN width of those dense layers
    scoring: str = "softmax"
    renormalize: bool = True
    num_expert_group: int | None = None
    topk_group: int | None = None
    routed_scaling_factor: float = 1.0
    correction_bias: bool = False
    notes: str = ""
    aliases: tuple[str, ...] = field(default=())
    # MLA attention (DeepSeek-V3); q_lora_rank 0 means q is projected directly (no low-rank q).
    kv_lora_rank: int = 0  # 0: standard MHA/GQA attention with head_dim
    q_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    tie_word_embeddings: bool = False  # True: the LM head shares the embedding matrix (counted once)
    max_position_embeddings: int = 4096
    rope_theta: float = 10000.0

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def is_mla(self) -> bool:
        return self.kv_lora_rank > 0

    @property
    def num_moe_layers(self) -> int:
        return self.num_layers - self.first_k_dense if self.is_moe else 0

    def routing_kwargs(self) -> dict:
        """Keyword arguments for moekern.fused_topk (without top_k)."""
        return routing_kwargs(self)

    def to_dict(self) -> dict:
        return asdict(self)


def routing_kwargs(routing) -> dict:
    """Keyword arguments for moekern.fused_topk (without logits, top_k and correction_bias) from anything
    carrying the registry's routing fields (scoring, renormalize, routed_scaling_factor, num_expert_group,
    topk_group): a ModelSpec, or a benchmark Shape copied from one. Grouped selection only when
    num_expert_group is set (0/None = plain top-k)."""
    kw = {"scoring": routing.scoring, "renormalize": routing.renormalize,
          "routed_scaling_factor": routing.routed_scaling_factor}
    if routing.num_expert_group:
        kw.update(num_expert_group=routing.num_expert_group, topk_group=routing.topk_group)
    return kw


MODELS: dict[str, ModelSpec] = {}


def _add(spec: ModelSpec) -> None:
    MODELS[spec.name] = spec


_add(ModelSpec("mixtral", "mistralai/Mixtral-8x7B-v0.1", "MixtralForCausalLM", 4096, 14336, 8, 2, 32, 32, 8, 32000,
               max_position_embeddings=32768, rope_theta=1e6,
               notes="46.7B total / 12.9B active (Mistral AI)", aliases=("mixtral-8x7b",)))
_add(ModelSpec("qwen3-30b-a3b", "Qwen/Qwen3-30B-A3B", "Qwen3MoeForCausalLM", 2048, 768, 128, 8, 48, 32, 4, 151936,
               head_dim=128, dense_intermediate_size=6144, max_position_embeddings=40960, rope_theta=1e6,
               notes="30.5B total / 3.3B active (model card); dense_intermediate_size is config intermediate_size, "
                     "unused (no mlp_only_layers)", aliases=("qwen3",)))
_add(ModelSpec("deepseek-v3", "deepseek-ai/DeepSeek-V3", "DeepseekV3ForCausalLM", 7168, 2048, 256, 8, 61, 128, 128,
               129280, head_dim=192, num_shared_experts=1, shared_intermediate_size=2048, first_k_dense=3,
               dense_intermediate_size=18432, scoring="sigmoid", renormalize=True, num_expert_group=8, topk_group=4,
               routed_scaling_factor=2.5, correction_bias=True, q_lora_rank=1536, kv_lora_rank=512,
               qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, max_position_embeddings=163840,
               notes="MLA attention (q_lora 1536, kv_lora 512, rope 64, nope 128, v 128); head_dim 192 = nope + rope "
                     "(q/k width). 671B total / 37B active (tech report) excludes the 14B multi-token-prediction "
                     "module, which the registry leaves out too", aliases=("dsv3",)))
_add(ModelSpec("olmoe", "allenai/OLMoE-1B-7B-0924", "OlmoeForCausalLM", 2048, 1024, 64, 8, 16, 16, 16, 50304,
               renormalize=False, notes="6.9B total / 1.3B active (AllenAI)", aliases=("olmoe-1b-7b",)))
_add(ModelSpec("qwen1.5-moe-a2.7b", "Qwen/Qwen1.5-MoE-A2.7B", "Qwen2MoeForCausalLM", 2048, 1408, 60, 4, 24, 16, 16,
               151936, num_shared_experts=1, shared_intermediate_size=5632, renormalize=False,
               max_position_embeddings=8192, rope_theta=1e6,
               notes="60 routed experts (not a power of two); the shared expert is ONE FFN of width 5632 "
                     "(4 routed experts' worth) with a sigmoid gate. 14.3B total / 2.7B active (model card)",
               aliases=("qwen1.5-moe", "qwen2-moe-a2.7b")))
_add(ModelSpec("qwen2-57b-a14b", "Qwen/Qwen2-57B-A14B", "Qwen2MoeForCausalLM", 3584, 2560, 64, 8, 28, 28, 4, 151936,
               num_shared_experts=1, shared_intermediate_size=20480, renormalize=False,
               max_position_embeddings=32768, rope_theta=1e6,
               notes="one shared FFN of width 20480 (8 routed experts' worth). 57B total / 14B active (model card)",
               aliases=("qwen2-57b",)))
_add(ModelSpec("dbrx", "databricks/dbrx-base", "DbrxForCausalLM", 6144, 10752, 16, 4, 40, 48, 8, 100352,
               max_position_embeddings=32768, rope_theta=5e5,
               notes="16 experts (fine-grained top-4); router softmax then L1 renormalization "
                     "(moe_normalize_expert_weights=1). 132B total / 36B active (Databricks)",
               aliases=("dbrx-base",)))
_add(ModelSpec("llada-moe-7b", "inclusionAI/LLaDA-MoE-7B-A1B-Base", "LLaDAMoEModelLM", 2048, 1024, 64, 8, 16, 16, 16,
               157184, renormalize=False,
               notes="masked-diffusion LM (bidirectional attention); OLMoE-style MoE blocks. UNCERTAIN: shape "
                     "taken as OLMoE's with LLaDA-MoE's vocabulary; the published ~7B total / ~1.4B active fits "
                     "only with tied embeddings or active counted without embeddings; tie_word_embeddings, "
                     "renormalize and vocab not verified against the checkpoint's config.json",
               aliases=("llada-moe",)))
_add(ModelSpec("llada-8b", "GSAI-ML/LLaDA-8B-Base", "LLaDAModelLM", 4096, 12288, 0, 0, 32, 32, 32, 126464,
               notes="dense masked-diffusion LM (8.0B params); num_kv_heads = num_heads (MHA)", aliases=("llada",)))


def get_model(name: str) -> ModelSpec:
    """Look a model up by registry key or alias (case-insensitive)."""
    key = name.lower()
    if key in MODELS:
        return MODELS[key]
    for spec in MODELS.values():
        if key in spec.aliases:
            return spec
    raise KeyError(f"model={name!r} is not in the registry; known: {', '.join(MODELS)}")


# The four shapes every kernel benchmark and GPU test runs.
STANDARD_MODELS = ("mixtral", "qwen3-30b-a3b", "deepseek-v3", "olmoe")
