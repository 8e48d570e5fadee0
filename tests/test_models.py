"""The model registry: sizes against published totals, layouts, HF configs, and every kernel at the
registry's non-power-of-two expert counts (Qwen1.5-MoE E=60 k=4, DBRX E=16 k=4) at tiny M/H."""

import json
import subprocess
import sys

import pytest
import torch

from moekern.models import (MODELS, get_model, hf_config, param_counts, standard_layouts, weight_bytes_per_gpu,
                            write_hf_config)
from moekern.models.hf import SUPPORTED

# (registry key, published total, published active), in parameters; tolerance 4%
KNOWN = [("mixtral", 46.7e9, 12.9e9), ("olmoe", 6.9e9, 1.3e9), ("qwen3-30b-a3b", 30.5e9, 3.3e9),
         ("deepseek-v3", 671e9, 37e9), ("qwen1.5-moe-a2.7b", 14.3e9, 2.7e9), ("qwen2-57b-a14b", 57e9, 14e9),
         ("dbrx", 132e9, 36e9), ("llada-8b", 8.0e9, 8.0e9)]


@pytest.mark.parametrize("name,total,active", KNOWN)
def test_param_counts_match_published(name, total, active):
    pc = param_counts(get_model(name))
    assert abs(pc.total - total) / total < 0.04, (name, pc.total)
    assert abs(pc.active - active) / active < 0.04, (name, pc.active)
    parts = pc.attention + pc.routed_experts + pc.shared_experts + pc.dense_ffn + pc.router + pc.embeddings
    assert parts == pc.total


def test_registry_values():
    q = get_model("qwen1.5-moe-a2.7b")
    assert (q.num_experts, q.top_k, q.shared_intermediate_size, q.num_shared_experts) == (60, 4, 5632, 1)
    d = get_model("dbrx")
    assert (d.num_experts, d.top_k, d.hidden_size, d.intermediate_size) == (16, 4, 6144, 10752)
    v3 = get_model("dsv3")
    assert v3.is_mla and v3.head_dim == v3.qk_nope_head_dim + v3.qk_rope_head_dim
    assert not get_model("llada-8b").is_moe
    assert len(MODELS) == 9
    for m in MODELS.values():
        assert m.num_heads * (m.head_dim or m.hidden_size // m.num_heads) > 0
        if m.is_moe:
            assert 1 <= m.top_k <= m.num_experts
    with pytest.raises(KeyError, match="not in the registry"):
        get_model("nope")


def test_weight_bytes_layouts():
    m = get_model("mixtral")
    pc = param_counts(m)
    single = weight_bytes_per_gpu(m)
    assert single["total_bytes"] == pytest.approx(2 * pc.total)
    tp8 = weight_bytes_per_gpu(m, tp=8)
    # TP8 splits everything but the router (and Mixtral's 8 KV heads split evenly)
    router = pc.router * 2
    assert tp8["total_bytes"] == pytest.approx((2 * pc.total - router) / 8 + router)
    ep8 = weight_bytes_per_gpu(m, ep=8)
    assert ep8["experts_per_gpu"] == 1 and ep8["layout"] == "EP"
    assert ep8["expert_bytes"] == pytest.approx(2 * pc.routed_experts / 8)
    assert ep8["other_bytes"] == pytest.approx(2 * (pc.total - pc.routed_experts))
    hyb = weight_bytes_per_gpu(m, tp=8, ep=8)
    assert hyb["layout"] == "hybrid" and hyb["total_bytes"] < ep8["total_bytes"]
    # 60 experts over 8 ranks: the busiest rank holds 8
    q = get_model("qwen1.5-moe-a2.7b")
    assert weight_bytes_per_gpu(q, ep=8)["experts_per_gpu"] == 8
    assert weight_bytes_per_gpu(q, ep=4, num_redundant=4)["experts_per_gpu"] == 16
    # KV heads replicate past num_kv_heads: Qwen3 (4 KV heads) at TP8 keeps 1 KV head per GPU, not 0.5
    q3 = get_model("qwen3-30b-a3b")
    kv = 2 * q3.hidden_size * q3.num_kv_heads * q3.head_dim * q3.num_layers * 2
    assert weight_bytes_per_gpu(q3, tp=8)["other_bytes"] > weight_bytes_per_gpu(q3, tp=4)["other_bytes"] / 2
    assert kv > 0
    fp8 = weight_bytes_per_gpu(m, tp=8, dtype_bytes=1)
    assert fp8["total_bytes"] == pytest.approx(tp8["total_bytes"] / 2)
    assert set(standard_layouts(m, 8)) == {"TP8", "EP8", "TP8+EP8"}
    assert set(standard_layouts(get_model("llada-8b"), 8)) == {"TP8"}


@pytest.mark.parametrize("kw,match", [({"tp": 0}, "tp=0"), ({"tp": 2, "ep": 3}, "multiple of tp"),
                                      ({"num_redundant": 2}, "needs ep > 1")])
def test_weight_bytes_bad_args(kw, match):
    with pytest.raises(ValueError, match=match):
        weight_bytes_per_gpu(get_model("mixtral"), **kw)
    with pytest.raises(ValueError, match="dense"):
        weight_bytes_per_gpu(get_model("llada-8b"), ep=2)


@pytest.mark.parametrize("name", [n for n, m in MODELS.items() if m.architecture in SUPPORTED])
def test_hf_config_loads_in_transformers(name, tmp_path):
    transformers = pytest.importorskip("transformers")
    spec = get_model(name)
    cfg = hf_config(spec, num_layers=2)
    path = write_hf_config(spec, tmp_path, num_layers=2)
    assert json.loads(path.read_text()) == json.loads(json.dumps(cfg))
    hf = transformers.AutoConfig.from_pretrained(str(tmp_path))
    get = lambda *names: next(getattr(hf, n) for n in names if hasattr(hf, n))  # noqa: E731
    if spec.architecture == "DbrxForCausalLM":
        assert (hf.d_model, hf.n_layers, hf.ffn_config.moe_num_experts, hf.ffn_config.moe_top_k,
                hf.ffn_config.ffn_hidden_size, hf.attn_config.kv_n_heads) == (6144, 2, 16, 4, 10752, 8)
        return
    assert hf.hidden_size == spec.hidden_size and hf.num_hidden_layers == 2
    assert get("num_local_experts", "num_experts", "n_routed_experts") == spec.num_experts
    assert hf.num_experts_per_tok == spec.top_k
    assert get("moe_intermediate_size", "intermediate_size") == spec.intermediate_size
    assert hf.num_key_value_heads == spec.num_kv_heads and hf.vocab_size == spec.vocab_size
    if spec.architecture == "Qwen2MoeForCausalLM":
        assert hf.shared_expert_intermediate_size == spec.shared_intermediate_size
    if spec.architecture == "DeepseekV3ForCausalLM":
        assert hf.first_k_dense_replace == 1 and hf.kv_lora_rank == 512 and hf.n_group == 8


def test_hf_config_rejects():
    with pytest.raises(ValueError, match="no config writer"):
        hf_config(get_model("llada-8b"))
    with pytest.raises(ValueError, match="num_layers=0"):
        hf_config(get_model("mixtral"), num_layers=0)
    assert hf_config(get_model("deepseek-v3"))["first_k_dense_replace"] == 3


def test_models_cli():
    out = subprocess.run([sys.executable, "-m", "moekern.cli", "models", "--json", "--gpus", "4"],
                         capture_output=True, text=True, check=True).stdout
    obj = json.loads(out)
    assert obj["mixtral"]["params"]["total"] == param_counts(get_model("mixtral")).total
    assert set(obj["dbrx"]["weight_bytes_per_gpu"]) == {"TP4", "EP4", "TP4+EP4"}
    txt = subprocess.run([sys.executable, "-m", "moekern.cli", "models"], capture_output=True, text=True,
                         check=True).stdout
    assert "qwen1.5-moe-a2.7b" in txt and "46.7B" in txt


# ------------------------------------------------------------------ kernels at E = 60 and E = 16, k = 4
ODD_E = ["qwen1.5-moe-a2.7b", "dbrx"]
# The kernel backends against the references. backend="torch" IS the reference (fused_topk_reference,
# align_reference, fused_moe_reference), so comparing it with them would test nothing.
KERNEL_BACKENDS = ["triton"] + (["cuda"] if torch.cuda.is_available() else [])


def _logits(spec, m, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, spec.num_experts, generator=g)
    x[0, :] = 0.0  # an all-tie row: ids must be the lowest indices
    return x.to(device)


@pytest.mark.parametrize("name", ODD_E)
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_fused_topk_odd_expert_counts(name, backend, device):
    import moekern
    from moekern.routing.reference import fused_topk_reference

    spec = get_model(name)
    logits = _logits(spec, 7, device=device)
    kw = spec.routing_kwargs()
    out = moekern.fused_topk(logits, spec.top_k, backend=backend, **kw)
    ref_w, ref_ids, ref_counts = fused_topk_reference(logits, spec.top_k, **kw)
    assert torch.equal(ref_ids[0].long().cpu(), torch.arange(spec.top_k))  # all-tie row: lowest indices, in order
    assert torch.equal(out.topk_ids.long(), ref_ids.long())
    torch.testing.assert_close(out.topk_weights, ref_w, rtol=1e-5, atol=1e-6)
    assert torch.equal(out.expert_counts.long(), torch.bincount(ref_ids.reshape(-1).long(),
                                                                minlength=spec.num_experts))
    assert torch.equal(ref_counts.long(), out.expert_counts.long())
    assert int(out.expert_counts.sum()) == 7 * spec.top_k


@pytest.mark.parametrize("name", ODD_E)
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_align_odd_expert_counts(name, backend, device):
    import moekern
    from moekern.dispatch.reference import align_reference

    spec = get_model(name)
    ids = moekern.fused_topk(_logits(spec, 9, seed=1, device=device), spec.top_k, backend="torch").topk_ids
    for block in (4, 16):
        out = moekern.align(ids, spec.num_experts, block, backend=backend)
        ref = align_reference(ids, spec.num_experts, block)
        for a, b in zip(out, ref):
            assert torch.equal(a, b)


@pytest.mark.parametrize("name", ODD_E)
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_fused_moe_odd_expert_counts(name, backend, device):
    import moekern
    from moekern.experts.reference import fused_moe_reference
    from moekern.routing.reference import fused_topk_reference

    spec = get_model(name)
    g = torch.Generator().manual_seed(2)
    m, h, inter, e = 5, 32, 16, spec.num_experts
    x = torch.randn(m, h, generator=g).to(device)
    w13 = (torch.randn(e, 2 * inter, h, generator=g) * 0.1).to(device)
    w2 = (torch.randn(e, h, inter, generator=g) * 0.1).to(device)
    logits = _logits(spec, m, seed=3, device=device)
    kw = spec.routing_kwargs()
    out = moekern.fused_moe(x, w13, w2, logits, spec.top_k, backend=backend, **kw)
    ref_w, ref_ids, _ = fused_topk_reference(logits, spec.top_k, **kw)
    ref = fused_moe_reference(x, w13, w2, ref_w, ref_ids)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
