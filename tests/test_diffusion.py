"""moekern.diffusion: denoising invariants, determinism, backend agreement, checkpoints, gate logs, bad input.

CPU tests run tiny models (H=32, E=8, k=2, 2 layers, vocab 64, L=8, B=4); the moekern Triton kernels run
under TRITON_INTERPRET=1 (tests/conftest.py). References: an independent per-token loop for the MoE FFN
and the plain torch backend; exact equality for tokens/counts, stated tolerances for logits.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from moekern.diffusion import (ar_generate, config_from_registry, forward, gate_records, generate, init_random,
                               load_checkpoint, moe_backend_unavailable_reason, save_checkpoint, state_dict,
                               transfer_schedule, validate_generation_args, write_gate_log)
from moekern.diffusion.model import rms_norm

TINY = dict(num_layers=2, hidden_size=32, num_heads=4, num_experts=8, top_k=2, intermediate_size=16, vocab_size=64)


@pytest.fixture(scope="module")
def tiny():
    return init_random(config_from_registry("llada-moe-7b", **TINY), seed=1)


@pytest.fixture(scope="module")
def tiny_dense():
    return init_random(config_from_registry("llada-8b", num_layers=2, hidden_size=32, num_heads=4,
                                            intermediate_size=48, vocab_size=64), seed=2)


PROMPTS = [[1, 2, 3, 4], [5, 6, 7, 8]]


# ------------------------------------------------------------------------------------------ schedule
@given(masked=st.integers(1, 64), steps=st.integers(1, 64))
@settings(max_examples=50, deadline=None)
def test_transfer_schedule_even(masked, steps):
    s = transfer_schedule(masked, steps)
    assert len(s) == steps and sum(s) == masked
    assert max(s) - min(s) <= 1 and s == sorted(s, reverse=True)  # remainder goes to the first steps


def test_config_from_registry_shapes():
    full = config_from_registry("llada-moe-7b")
    assert (full.hidden_size, full.num_experts, full.top_k, full.mask_id) == (2048, 64, 8, 156895)
    assert full.qk_norm and not full.renormalize
    dense = config_from_registry("llada-8b")
    assert dense.num_experts == 0 and dense.mask_id == 126336
    tiny = config_from_registry("llada-moe-7b", **TINY)
    assert tiny.head_dim == 8 and tiny.mask_id == 63


# ------------------------------------------------------------------------------------- denoising loop
@pytest.mark.parametrize("temperature", [0.0, 1.5])
@pytest.mark.parametrize("steps", [2, 4, 8])
def test_denoising_invariants(tiny, temperature, steps):
    L, B = 8, 4
    mask = tiny.config.mask_id
    res = generate(tiny, PROMPTS, gen_length=L, block_length=B, steps=steps, temperature=temperature, seed=3,
                   moe_backend="torch", trace=True)
    tr = res.trace  # [steps + 1, N, P + L]
    P = res.prompt_length
    assert tr.shape == (steps + 1, 2, P + L)
    assert bool((tr[0, :, P:] == mask).all())
    per_block = steps // (L // B)
    sched = transfer_schedule(B, per_block)
    for s in range(steps):
        before, after = tr[s], tr[s + 1]
        b = s // per_block
        lo, hi = P + b * B, P + (b + 1) * B
        newly = (before == mask) & (after != mask)
        # exactly the scheduled number per row, all inside the current block
        assert newly.sum(1).tolist() == [sched[s % per_block]] * 2
        assert not newly[:, :lo].any() and not newly[:, hi:].any()
        # an unmasked token never changes, a masked one is never re-masked into something else
        kept = before != mask
        assert torch.equal(after[kept], before[kept])
        assert res.steps[s].committed == sched[s % per_block] and res.steps[s].block == b
    assert not bool((res.generated == mask).any())
    assert torch.equal(res.tokens[:, :P], torch.tensor(PROMPTS))


def test_deterministic_under_seed(tiny):
    kw = dict(gen_length=8, block_length=4, steps=4, temperature=10.0, moe_backend="torch")
    a = generate(tiny, PROMPTS, seed=7, **kw).tokens
    b = generate(tiny, PROMPTS, seed=7, **kw).tokens
    c = generate(tiny, PROMPTS, seed=8, **kw).tokens
    assert torch.equal(a, b)
    assert not torch.equal(a, c)  # near-uniform sampling of 16 tokens from 63: a collision is ~impossible
    g1 = generate(tiny, PROMPTS, seed=1, gen_length=8, block_length=4, steps=4, moe_backend="torch").tokens
    g2 = generate(tiny, PROMPTS, seed=2, gen_length=8, block_length=4, steps=4, moe_backend="torch").tokens
    assert torch.equal(g1, g2)  # greedy ignores the seed


def test_greedy_matches_reference_loop(tiny):
    """One block, one step per token: the loop must commit argmax of the most confident masked position."""
    cfg = tiny.config
    res = generate(tiny, [PROMPTS[0]], gen_length=4, block_length=4, steps=4, moe_backend="torch")
    x = torch.tensor([PROMPTS[0] + [cfg.mask_id] * 4])
    for _ in range(4):
        logits = forward(tiny, x, moe_backend="torch")[0, 4:]
        logits[:, cfg.mask_id] = -float("inf")  # the mask token is never predicted
        p = logits.softmax(-1)
        conf, pred = p.max(-1)
        conf = torch.where(x[0, 4:] == cfg.mask_id, conf, torch.tensor(-float("inf")))
        j = int(conf.argmax())
        x[0, 4 + j] = pred[j]
    assert torch.equal(res.tokens, x)


def test_left_padding_matches_single_prompts(tiny):
    prompts = [[1, 2, 3, 4, 5], [9, 10]]
    kw = dict(gen_length=8, block_length=4, steps=4, moe_backend="torch")
    batched = generate(tiny, prompts, **kw)
    assert batched.valid[1, :3].tolist() == [False] * 3
    for i, p in enumerate(prompts):
        alone = generate(tiny, [p], **kw)
        assert torch.equal(batched.generated[i], alone.generated[0])
        assert batched.steps[0].num_tokens == 5 + 2 + 2 * 8  # padding is not in the FFN


# ------------------------------------------------------------------------------------------- forward
def _reference_forward(model, tokens, causal=False):
    """Independent plain reference: HF-LLaMA-style layer, per-token expert loop."""
    cfg = model.config
    B, T = tokens.shape
    nh, hd = cfg.num_heads, cfg.head_dim
    x = model.embed[tokens]
    pos = torch.arange(T, dtype=torch.float32)
    inv = 1.0 / cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd)
    ang = torch.outer(pos, inv)
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)

    def rope(t):
        t1, t2 = t[..., : hd // 2], t[..., hd // 2:]
        return t * cos + torch.cat([-t2, t1], -1) * sin

    for lw in model.layers:
        h = rms_norm(x, lw.input_norm, cfg.rms_eps)
        q = rms_norm((h @ lw.q.T).view(B, T, nh, hd), lw.q_norm, cfg.rms_eps).transpose(1, 2)
        k = rms_norm((h @ lw.k.T).view(B, T, nh, hd), lw.k_norm, cfg.rms_eps).transpose(1, 2)
        v = (h @ lw.v.T).view(B, T, nh, hd).transpose(1, 2)
        q, k = rope(q), rope(k)
        s = q @ k.transpose(-1, -2) / hd ** 0.5
        if causal:
            s = s.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), -float("inf"))
        a = (s.softmax(-1) @ v).transpose(1, 2).reshape(B, T, -1)
        x = x + a @ lw.o.T
        h = rms_norm(x, lw.post_norm, cfg.rms_eps).reshape(B * T, -1)
        out = torch.zeros_like(h)
        I = cfg.intermediate_size
        for t in range(B * T):
            p = (h[t] @ lw.router.T).softmax(-1)  # LLaDA-MoE: no renormalization of the top-k weights
            w, ids = p.topk(cfg.top_k)
            for wj, e in zip(w, ids.tolist()):
                g, u = lw.w13[e, :I] @ h[t], lw.w13[e, I:] @ h[t]
                out[t] += wj * (lw.w2[e] @ (F.silu(g) * u))
        x = x + out.view(B, T, -1)
    return rms_norm(x, model.final_norm, cfg.rms_eps) @ model.lm_head.T


@pytest.mark.parametrize("causal", [False, True])
def test_forward_matches_reference(tiny, causal):
    tokens = torch.tensor([[1, 2, 3, 63, 63, 5], [7, 63, 8, 9, 63, 63]])
    got = forward(tiny, tokens, causal=causal, moe_backend="torch")
    torch.testing.assert_close(got, _reference_forward(tiny, tokens, causal), rtol=1e-4, atol=1e-4)


def test_attention_direction(tiny):
    a = torch.tensor([[1, 2, 3, 4, 5, 6]])
    b = a.clone()
    b[0, 5] = 40
    bi_a, bi_b = forward(tiny, a, moe_backend="torch"), forward(tiny, b, moe_backend="torch")
    ca, cb = forward(tiny, a, causal=True, moe_backend="torch"), forward(tiny, b, causal=True, moe_backend="torch")
    assert (bi_a[0, 0] - bi_b[0, 0]).abs().max() > 1e-3  # bidirectional: the last token reaches the first
    # causal: it does not (up to GEMM rounding: the expert GEMMs see one different row)
    torch.testing.assert_close(ca[0, :5], cb[0, :5], rtol=0, atol=1e-5)
    assert (ca[0, 5] - cb[0, 5]).abs().max() > 1e-3


def test_dense_ffn_forward(tiny_dense):
    cfg = tiny_dense.config
    tokens = torch.tensor([[1, 2, 3, 4]])
    logits = forward(tiny_dense, tokens)
    assert logits.shape == (1, 4, cfg.vocab_size) and torch.isfinite(logits).all()
    res = generate(tiny_dense, [[1, 2]], gen_length=8, block_length=4, steps=4)
    assert res.steps[0].expert_counts is None
    assert not bool((res.generated == cfg.mask_id).any())


def test_ar_generate_is_causal_greedy(tiny):
    res = ar_generate(tiny, PROMPTS, gen_length=5, moe_backend="torch")
    P = res.prompt_length
    assert res.tokens.shape == (2, P + 5) and len(res.steps) == 5 and res.phase == "decode"
    logits = forward(tiny, res.tokens, causal=True, moe_backend="torch")
    torch.testing.assert_close(logits[:, P - 1:-1].argmax(-1), res.generated, rtol=0, atol=0)
    assert [s.num_tokens for s in res.steps] == [2 * (P + t) for t in range(5)]


# -------------------------------------------------------------------------------- backend agreement
def test_triton_backend_agrees_with_torch(tiny):
    tokens = torch.tensor([[1, 2, 3, 63, 63, 63, 63, 5]])
    ref = forward(tiny, tokens, moe_backend="torch")
    tri = forward(tiny, tokens, moe_backend="moekern", kernels="triton")
    torch.testing.assert_close(tri, ref, rtol=1e-4, atol=1e-4)
    kw = dict(gen_length=8, block_length=4, steps=2)
    a = generate(tiny, [PROMPTS[0]], moe_backend="torch", **kw)
    b = generate(tiny, [PROMPTS[0]], moe_backend="moekern", kernels="triton", **kw)
    assert torch.equal(a.tokens, b.tokens)
    for ra, rb in zip(a.steps, b.steps):
        assert torch.equal(ra.expert_counts, rb.expert_counts)


def test_vllm_backend_reason_on_cpu(tiny):
    reason = moe_backend_unavailable_reason("vllm", "cpu")
    assert reason and "CUDA" in reason
    with pytest.raises(RuntimeError, match="moe_backend='vllm'"):
        generate(tiny, PROMPTS, gen_length=8, block_length=4, steps=2, moe_backend="vllm")


# --------------------------------------------------------------------------------------- checkpoints
def test_checkpoint_round_trip(tiny, tmp_path):
    from safetensors.torch import save_file

    sd = state_dict(tiny)
    save_file(sd, str(tmp_path / "model.safetensors"))
    loaded = load_checkpoint(tmp_path, tiny.config, dtype=torch.float32)
    assert set(state_dict(loaded)) == set(sd)
    for k, v in state_dict(loaded).items():
        assert torch.equal(v, sd[k]), k
    tokens = torch.tensor([[1, 2, 3, 63]])
    torch.testing.assert_close(forward(loaded, tokens), forward(tiny, tokens), rtol=0, atol=0)
    # sharded files and config.json are read as well
    d2 = tmp_path / "sharded"
    d2.mkdir()
    keys = sorted(sd)
    save_file({k: sd[k] for k in keys[::2]}, str(d2 / "model-00001-of-00002.safetensors"))
    save_file({k: sd[k] for k in keys[1::2]}, str(d2 / "model-00002-of-00002.safetensors"))
    assert torch.equal(load_checkpoint(d2, tiny.config, dtype=torch.float32).layers[1].w13, tiny.layers[1].w13)


def test_checkpoint_olmo_names_dense(tiny_dense, tmp_path):
    from safetensors.torch import save_file

    ren = {"model.embed_tokens.weight": "model.transformer.wte.weight", "model.norm.weight":
           "model.transformer.ln_f.weight", "lm_head.weight": "model.transformer.ff_out.weight"}
    blk = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ff_norm", "self_attn.q_proj": "q_proj",
           "self_attn.k_proj": "k_proj", "self_attn.v_proj": "v_proj", "self_attn.o_proj": "attn_out",
           "mlp.gate_proj": "ff_proj", "mlp.up_proj": "up_proj", "mlp.down_proj": "ff_out"}
    out = {}
    for k, v in state_dict(tiny_dense).items():
        if k in ren:
            out[ren[k]] = v
        else:
            i, rest = k[len("model.layers."):].split(".", 1)
            out[f"model.transformer.blocks.{i}.{blk[rest[:-len('.weight')]]}.weight"] = v
    save_file(out, str(tmp_path / "model.safetensors"))
    loaded = load_checkpoint(tmp_path, tiny_dense.config, dtype=torch.float32)
    tokens = torch.tensor([[3, 4, 5]])
    torch.testing.assert_close(forward(loaded, tokens), forward(tiny_dense, tokens), rtol=0, atol=0)


def test_checkpoint_errors(tiny, tmp_path):
    from safetensors.torch import save_file

    sd = state_dict(tiny)
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors"):
        load_checkpoint(tmp_path, tiny.config)
    broken = dict(sd)
    del broken["model.layers.1.mlp.experts.3.up_proj.weight"]
    broken["model.layers.0.mlp.shared_expert.weight"] = torch.zeros(2)
    save_file(broken, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="missing \\[model.layers.1.mlp.experts.3.up_proj.weight\\]; "
                                         "unexpected \\[model.layers.0.mlp.shared_expert.weight\\]"):
        load_checkpoint(tmp_path, tiny.config)
    bad = dict(sd)
    bad["model.layers.0.mlp.gate.weight"] = torch.zeros(4, 32)
    save_file(bad, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"'model.layers.0.mlp.gate.weight' must have shape \[8, 32\]"):
        load_checkpoint(tmp_path, tiny.config)


def test_checkpoint_config_json(tiny, tmp_path):
    from moekern.diffusion import config_overrides_from_hf

    save_checkpoint(tiny, tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 32, "num_hidden_layers": 2, "num_experts": 8,
                                                      "num_experts_per_tok": 2, "expert_intermediate_size": 16,
                                                      "vocab_size": 64, "num_attention_heads": 4,
                                                      "norm_topk_prob": False}))
    over = config_overrides_from_hf(tmp_path)
    assert over["intermediate_size"] == 16 and over["top_k"] == 2 and over["num_layers"] == 2
    cfg = config_from_registry("llada-moe-7b", **over)
    assert cfg == tiny.config
    load_checkpoint(tmp_path, cfg, dtype=torch.float32)


# ------------------------------------------------------------------------------------------ gate logs
def test_gate_log_records(tiny, tmp_path):
    from moekern import gatelog

    prompts = [[1, 2, 3, 4, 5], [9, 10]]
    res = generate(tiny, prompts, gen_length=8, block_length=4, steps=4, moe_backend="torch")
    path = tmp_path / "gate_log.rank0.jsonl"
    n = write_gate_log(res, path, tiny.config.top_k, model="tiny")
    assert n == 4 * tiny.config.num_layers
    records, skipped = gatelog.read_gate_log(path)
    assert not skipped and len(records) == n
    real_tokens = 5 + 2 + 2 * 8
    for r in records:
        assert r.phase == "diffusion" and r.top_k == 2 and r.num_tokens == real_tokens
        assert sum(r.expert_counts) == r.num_tokens * r.top_k and len(r.expert_counts) == 8
    assert sorted({(r.step, r.layer) for r in records}) == [(s, l) for s in range(4) for l in range(2)]
    assert [r.extra["block"] for r in records if r.layer == 0] == [0, 0, 1, 1]
    ar = ar_generate(tiny, prompts, gen_length=2, moe_backend="torch")
    recs = gate_records(ar, 2)
    assert {r.phase for r in recs} == {"decode"} and all(sum(r.expert_counts) == r.num_tokens * 2 for r in recs)


def test_gate_counts_match_reference_routing(tiny):
    """Counts of step 0, layer 0 equal a bincount of the top-k of the first layer's router, recomputed."""
    cfg = tiny.config
    res = generate(tiny, [PROMPTS[0]], gen_length=4, block_length=4, steps=1, moe_backend="torch")
    x = torch.tensor([PROMPTS[0] + [cfg.mask_id] * 4])
    lw = tiny.layers[0]
    h = tiny.embed[x]
    # layer 0's FFN input: recompute through the reference attention of _reference_forward's first half
    import moekern.diffusion.model as M

    pos = torch.arange(8).expand(1, 8)
    cos, sin = M.rope_tables(pos, cfg.head_dim, cfg.rope_theta, h.dtype)
    h = h + M._attention(rms_norm(h, lw.input_norm, cfg.rms_eps), lw, cfg, cos, sin, None, False)
    logits = rms_norm(h, lw.post_norm, cfg.rms_eps).reshape(8, -1) @ lw.router.T
    ids = logits.softmax(-1).topk(cfg.top_k).indices
    assert res.steps[0].expert_counts[0].tolist() == torch.bincount(ids.flatten(), minlength=8).tolist()


# --------------------------------------------------------------------------------------- bad inputs
@pytest.mark.parametrize("L,B,S,match", [
    (8, 3, 4, "gen_length=8 must be a multiple of block_length=3"),
    (8, 4, 1, "steps=1 must be >= the number of blocks"),
    (8, 4, 3, "steps=3 must be a multiple of the number of blocks"),
    (8, 2, 12, "steps per block = steps/num_blocks = 3 must be <= block_length=2"),
    (0, 4, 4, "gen_length=0 must be >= 1"),
])
def test_bad_schedule_args(tiny, L, B, S, match):
    with pytest.raises(ValueError, match=match):
        validate_generation_args(L, B, S)
    with pytest.raises(ValueError, match=match):
        generate(tiny, PROMPTS, gen_length=L, block_length=B, steps=S)


@pytest.mark.parametrize("prompts,exc,match", [
    ([[1, 64]], ValueError, r"prompt token ids must lie in \[0, vocab_size=64\); got values in \[1, 64\]"),
    ([[-1, 2]], ValueError, "got values in \\[-1, 2\\]"),
    ([[1, 63]], ValueError, "prompt contains mask_id=63"),
    ([], ValueError, "non-empty list"),
    ([[1], []], ValueError, "non-empty list"),
    ([[1.5]], TypeError, "prompt token ids must be ints"),
    (torch.tensor([[1.0, 2.0]]), TypeError, "integer token ids"),
    (torch.tensor([1, 2]), ValueError, "2-D"),
])
def test_bad_prompts(tiny, prompts, exc, match):
    with pytest.raises(exc, match=match):
        generate(tiny, prompts, gen_length=8, block_length=4, steps=2)


def test_bad_backend_and_config(tiny):
    with pytest.raises(ValueError, match="moe_backend='flashinfer' must be one of"):
        generate(tiny, PROMPTS, gen_length=8, block_length=4, steps=2, moe_backend="flashinfer")
    with pytest.raises(ValueError, match="kernels='hip' must be one of"):
        generate(tiny, PROMPTS, gen_length=8, block_length=4, steps=2, kernels="hip")
    with pytest.raises(ValueError, match="temperature=-1"):
        generate(tiny, PROMPTS, gen_length=8, block_length=4, steps=2, temperature=-1)
    with pytest.raises(TypeError, match="unknown config override"):
        config_from_registry("llada-moe-7b", num_layer=2)
    with pytest.raises(KeyError, match="not in the registry"):
        config_from_registry("llada-9000")
    with pytest.raises(ValueError, match="top_k=9 must be in"):
        config_from_registry("llada-moe-7b", **{**TINY, "top_k": 9})
    with pytest.raises(ValueError, match="MLA"):
        config_from_registry("deepseek-v3")


# ------------------------------------------------------------------------------------------------ CLI
TINY_ARGS = ["--layers", "2", "--hidden-size", "32", "--num-heads", "4", "--num-experts", "8", "--top-k", "2",
             "--intermediate-size", "16", "--vocab-size", "64"]


def test_cli_generate(tmp_path, capsys):
    from moekern.cli import main

    gl = tmp_path / "gate_log.rank0.jsonl"
    rc = main(["diffusion", "generate", *TINY_ARGS, "--backend", "torch", "--prompt-ids", "1,2,3",
               "--prompt-ids", "4,5", "--gen-length", "8", "--block-length", "4", "--steps", "4",
               "--gate-log", str(gl)])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["generated"]) == 2 and len(out["generated"][0]) == 8 and out["gate_log_records"] == 8
    rc = main(["diffusion", "generate", *TINY_ARGS, "--prompt-ids", "1,2", "--gen-length", "8",
               "--block-length", "3"])
    assert rc == 2 and "must be a multiple of block_length=3" in capsys.readouterr().err
    rc = main(["diffusion", "generate", *TINY_ARGS, "--prompt-ids", "1,99"])
    assert rc == 2 and "vocab_size=64" in capsys.readouterr().err


def test_cli_bench(tmp_path, capsys):
    from moekern.cli import main

    rc = main(["diffusion", "bench", *TINY_ARGS, "--backend", "torch,vllm", "--gen-lengths", "8",
               "--block-lengths", "4", "--steps", "2,3", "--batch-sizes", "2", "--prompt-length", "3",
               "--out", str(tmp_path), "--tag", "t"])
    assert rc == 0
    res = json.loads((tmp_path / "t.json").read_text())
    assert "random weights" in res["note"]
    assert [r["label"] for r in res["diffusion"]] == ["L8-B4-S2-N2"]
    row = res["diffusion"][0]
    assert row["num_forwards"] == 2 and len(row["cv_per_step"]) == 2 and 0 <= row["ffn_share"] <= 1
    assert row["tokens_per_s"] > 0 and res["ar"][0]["num_forwards"] == 8
    assert any("vllm: skipped" in s for s in res["skipped"]) and any("S=3" in s for s in res["skipped"])
    for name in ("throughput", "ffn_share", "cv_per_step"):
        assert (tmp_path / f"t_{name}.png").stat().st_size > 1000


# ------------------------------------------------------------------------------------------------ GPU
def _gpu_model(layers=2):
    # Real LLaDA-MoE-7B layer shapes (H=2048, E=64, k=8, I=1024, 16 heads), 2 layers, smaller vocabulary.
    cfg = config_from_registry("llada-moe-7b", num_layers=layers, vocab_size=4096)
    return init_random(cfg, device="cuda", dtype=torch.bfloat16, seed=0)


def _rel_err(a, b):
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.gpu
@pytest.mark.parametrize("backend,kernels", [("moekern", "auto"), ("moekern", "triton"), ("moekern", "cuda"),
                                             ("vllm", "auto")])
def test_gpu_backends_agree(backend, kernels):
    model = _gpu_model()
    reason = moe_backend_unavailable_reason(backend, "cuda", kernels)
    if reason:
        pytest.skip(reason)
    tokens = torch.randint(0, 4000, (4, 96), device="cuda")
    tokens[:, 64:] = model.config.mask_id
    ref = forward(model, tokens, moe_backend="torch")
    got = forward(model, tokens, moe_backend=backend, kernels=kernels)
    # bf16 rounding of intermediates differs between backends; a wrong layout or routing gives errors ~1
    assert _rel_err(got, ref) < 5e-2
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9
    res = generate(model, tokens[:, :64], gen_length=32, block_length=16, steps=8, moe_backend=backend,
                   kernels=kernels, time_steps=True)
    assert not bool((res.generated == model.config.mask_id).any())
    for s in res.steps:
        assert int(s.expert_counts.sum(1).unique().item()) == s.num_tokens * 8
        assert s.seconds > 0 and 0 < s.ffn_seconds < s.seconds


@pytest.mark.gpu
def test_gpu_bench_smoke(tmp_path):
    from moekern.diffusion.bench import BenchCase, run_bench, write_results

    model = _gpu_model()
    res = run_bench(model, [BenchCase(32, 16, 8, 2)], prompt_length=32, log=lambda *a: None)
    assert {r["backend"] for r in res["diffusion"]} >= {"moekern", "torch"}
    assert all(r["tokens_per_s"] > 0 for r in res["diffusion"] + res["ar"])
    assert len(write_results(res, tmp_path, "gpu")) == 4


# ------------------------------------------------------------------ AR vs diffusion routing comparison
def _write_log(path, rows, phase, top_k, model="m"):
    """rows: list of (step, [counts per layer]) -> a moekern.gatelog/1 file; num_tokens = sum / top_k."""
    from moekern.gatelog import GateRecord, write_records

    path.parent.mkdir(parents=True, exist_ok=True)
    recs = [GateRecord(step=s, layer=l, expert_counts=c, num_tokens=sum(c) // top_k, phase=phase, top_k=top_k,
                       model=model) for s, layers in rows for l, c in enumerate(layers)]
    write_records(path, recs)
    return path


def test_compare_routing_known_values(tmp_path):
    import math

    from moekern.analysis.imbalance.metrics import cv
    from moekern.analysis.diffusion import compare_routing, write_comparison

    # AR log: a prefill step (dropped: only decode is kept) and two decode steps, E=4, k=2, 2 layers
    ar = _write_log(tmp_path / "ar" / "gate_log.rank0.jsonl", [(0, [[8, 8, 8, 8], [8, 8, 8, 8]])], "prefill", 2,
                    model="ar-model")
    _write_log(ar, [(1, [[4, 0, 0, 0], [2, 2, 0, 0]]), (2, [[1, 1, 1, 1], [1, 1, 1, 1]])], "decode", 2,
               model="ar-model")  # appends
    dif = _write_log(tmp_path / "dif" / "gate_log.rank0.jsonl",
                     [(0, [[6, 2, 0, 0]]), (1, [[2, 2, 2, 2]])], "diffusion", 2, model="dif-model")
    comp = compare_routing(ar, dif)
    assert comp.shape_match and comp.ar.num_steps == 2 and comp.diffusion.num_steps == 2
    assert comp.ar.top_k == 2 and comp.ar.num_experts == 4 and comp.ar.num_layers == 2
    assert comp.ar.cv_per_step == pytest.approx([(cv([4, 0, 0, 0]) + cv([2, 2, 0, 0])) / 2, 0.0])
    assert comp.diffusion.cv_per_step == pytest.approx([cv([6, 2, 0, 0]), 0.0])
    assert comp.ar.tokens_per_step == [2.0, 2.0] and comp.diffusion.tokens_per_step == [4.0, 4.0]
    assert comp.diffusion.uniform_cv_per_step == pytest.approx([math.sqrt(2 / 8)] * 2)  # (E-k)/(n k)
    st_ = comp.diffusion.stats()
    assert st_["step_cv_mean"] == pytest.approx(cv([6, 2, 0, 0]) / 2)
    assert st_["agg_cv"] == pytest.approx(cv([8, 4, 2, 2]))
    assert any("different depth" in lab for lab in comp.labels)  # 2 vs 1 layers: labelled, not refused
    paths = write_comparison(comp, tmp_path / "out", "cmp")
    assert [p.name for p in paths] == ["cmp.json", "cmp.md", "cmp.png"]
    obj = json.loads(paths[0].read_text())
    assert obj["shape_match"] is True and obj["ar"]["model"] == "ar-model"
    assert "| per-step CV, mean |" in paths[1].read_text()


def test_compare_routing_refuses_shape_mismatch(tmp_path):
    from moekern.cli import main
    from moekern.analysis.diffusion import compare_routing

    ar = _write_log(tmp_path / "ar.jsonl", [(0, [[1, 1, 1, 1, 0, 0, 0, 0]])], "decode", 2, model="mixtral-4l")
    dif = _write_log(tmp_path / "dif.jsonl", [(0, [[2] * 16])], "diffusion", 4, model="llada")
    with pytest.raises(ValueError, match=r"SHAPE MISMATCH: autoregressive E=8 top_k=2 .* diffusion E=16 top_k=4"):
        compare_routing(ar, dif)
    comp = compare_routing(ar, dif, allow_shape_mismatch=True)
    assert not comp.shape_match and comp.labels[0].startswith("SHAPE MISMATCH")
    assert "SHAPE MISMATCH" in comp.table_markdown()
    out = tmp_path / "o"
    assert main(["diffusion", "compare", "--ar", str(ar), "--diffusion", str(dif), "--out", str(out)]) == 2
    assert not out.exists()
    assert main(["diffusion", "compare", "--ar", str(ar), "--diffusion", str(dif), "--out", str(out),
                 "--allow-shape-mismatch"]) == 0
    assert json.loads((out / "ar_vs_diffusion.json").read_text())["shape_match"] is False
    # a side without the phase asked for names what it has
    with pytest.raises(ValueError, match=r"no 'decode' records .*'diffusion'"):
        compare_routing(dif, dif)


def test_bench_writes_gate_logs_and_compares(tmp_path):
    """`moekern diffusion bench --ar-gate-log`: the timed run's gate log is written (phase diffusion,
    sum = tokens * k) and put next to an AR log of the same (E, k)."""
    from moekern import gatelog
    from moekern.cli import main

    ar = _write_log(tmp_path / "ar.jsonl", [(0, [[1, 1, 0, 0]] * 2), (1, [[0, 1, 1, 0]] * 2)], "decode", 2)
    out = tmp_path / "b"
    rc = main(["diffusion", "bench", "--model", "llada-moe-7b", "--layers", "2", "--hidden-size", "32",
               "--num-heads", "2", "--num-experts", "4", "--top-k", "2", "--intermediate-size", "16",
               "--vocab-size", "64", "--device", "cpu", "--backend", "torch", "--gen-lengths", "4",
               "--block-lengths", "4", "--steps", "2", "--batch-sizes", "1", "--prompt-length", "3", "--no-ar",
               "--out", str(out), "--tag", "t", "--ar-gate-log", str(ar)])
    assert rc == 0
    recs, skipped = gatelog.read_gate_log(out / "t_gate_logs")
    assert not skipped and len(recs) == 2 * 2 and {r.phase for r in recs} == {"diffusion"}
    assert all(sum(r.expert_counts) == r.num_tokens * 2 == 7 * 2 for r in recs)
    res = json.loads((out / "t.json").read_text())
    assert res["ar_vs_diffusion"]["shape_match"] is True and res["ar_vs_diffusion"]["diffusion"]["num_steps"] == 2
    assert (out / "t_ar_vs_diffusion.png").is_file()
