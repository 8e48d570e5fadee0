"""Block-wise semi-autoregressive masked-diffusion generation (LLaDA, Nie et al. 2025, Alg. low-confidence
remasking), and the autoregressive decode loop it is compared with.

Denoising. The sequence is prompt + L mask tokens, cut into L/B blocks of B positions, done left to right.
Each block gets S/(L/B) steps. At the start of a block its m (= B) masked positions are spread evenly over
its steps: step i unmasks m//s + (1 if i < m % s else 0) positions (s = steps per block). At each step one
forward over the WHOLE sequence (bidirectional attention, no KV cache: committed tokens attend to the
still-masked future, as in the reference) predicts every position; for the masked positions of the current
block the prediction is argmax(logits + temperature * Gumbel noise) (argmax(logits) at temperature 0) and
its confidence is softmax(logits)[prediction] (the mask id's logit is set to -inf first: it is never
predicted); the k most confident are committed, the rest stay masked
("remasked"). Committed tokens never change again; positions of later blocks are never committed early.

Argument rules (each raises ValueError naming the argument):
  gen_length % block_length == 0; steps >= num_blocks and steps % num_blocks == 0 (as the reference
  implementation asserts); steps per block <= block_length (more steps would run forwards that commit
  nothing); prompt ids in [0, vocab_size) and != mask_id (a mask id in the prompt would be denoised).

Batching. `prompts` is a [N, P] int tensor (equal lengths) or a list of N id lists of any lengths, which
are LEFT-padded to the longest: padding is a key-padding mask in attention, skipped by the FFN (not in
the gate log's num_tokens) and rotary positions count real tokens only, so a padded row computes what it
would alone (up to float rounding of batched GEMMs). All rows share the generation columns [P, P + L).

Determinism: Gumbel noise comes from a torch.Generator seeded with `seed` on the model's device; the same
seed, inputs and backend give the same tokens.

Autoregressive baseline (ar_generate): the same layers run with causal attention, one token per forward,
greedy or Gumbel-sampled, recomputing the whole prefix each step (no KV cache, like the diffusion loop,
which has none either): step t's forward has P + t tokens.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from moekern.diffusion.model import (DiffusionModel, ForwardStats, forward, moe_backend_unavailable_reason)


@dataclass
class StepRecord:
    """One forward: its index, block, number committed, tokens through the FFN, wall/FFN seconds (when
    timed) and expert counts [num_moe_layers, E] (a CPU int64 tensor; None for a dense model)."""

    step: int
    block: int
    committed: int
    num_tokens: int
    seconds: float | None = None
    ffn_seconds: float | None = None
    expert_counts: torch.Tensor | None = None


@dataclass
class GenerationResult:
    """tokens: [N, P + L] int64 (left padding = pad_id); generated: [N, L]; valid: [N, P + L] bool;
    steps: one StepRecord per forward; trace: [num_steps + 1, N, P + L] states (initial, then after each
    step) when trace=True."""

    tokens: torch.Tensor
    generated: torch.Tensor
    valid: torch.Tensor
    prompt_length: int
    steps: list[StepRecord] = field(default_factory=list)
    trace: torch.Tensor | None = None
    phase: str = "diffusion"


def transfer_schedule(masked: int, steps_per_block: int) -> list[int]:
    """How many of a block's `masked` positions each of its steps commits: even split, remainder first."""
    base, rem = divmod(masked, steps_per_block)
    return [base + (1 if i < rem else 0) for i in range(steps_per_block)]


def _check_int(name, v, low):
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{name} must be an int; got {type(v).__name__} {v!r}")
    if v < low:
        raise ValueError(f"{name}={v} must be >= {low}")


def validate_generation_args(gen_length: int, block_length: int, steps: int) -> int:
    """Returns steps per block; raises ValueError naming the argument (see the module docstring)."""
    _check_int("gen_length", gen_length, 1)
    _check_int("block_length", block_length, 1)
    _check_int("steps", steps, 1)
    if gen_length % block_length:
        raise ValueError(f"gen_length={gen_length} must be a multiple of block_length={block_length}")
    blocks = gen_length // block_length
    if steps < blocks:
        raise ValueError(f"steps={steps} must be >= the number of blocks gen_length/block_length={blocks}")
    if steps % blocks:
        raise ValueError(f"steps={steps} must be a multiple of the number of blocks gen_length/block_length={blocks} "
                         "(each block gets the same number of steps)")
    per_block = steps // blocks
    if per_block > block_length:
        raise ValueError(f"steps per block = steps/num_blocks = {per_block} must be <= block_length={block_length} "
                         "(extra steps would commit no token)")
    return per_block


def prepare_prompts(prompts, model: DiffusionModel, pad_id: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """prompts: [N, P] int tensor or a list of N non-empty id lists -> (ids [N, P] int64 left-padded, valid
    [N, P] bool), on the model's device. pad_id (default 0; any id, it is never attended to) fills padding."""
    cfg, dev = model.config, model.device
    if isinstance(prompts, torch.Tensor):
        if prompts.dim() != 2 or prompts.shape[0] < 1 or prompts.shape[1] < 1:
            raise ValueError(f"prompts must be a 2-D [N, P] tensor with N, P >= 1; got shape {tuple(prompts.shape)}")
        if prompts.dtype.is_floating_point or prompts.dtype == torch.bool:
            raise TypeError(f"prompts must hold integer token ids; got {prompts.dtype}")
        ids = prompts.to(dev, torch.int64)
        valid = torch.ones_like(ids, dtype=torch.bool)
    else:
        rows = list(prompts)
        if not rows or any(not hasattr(r, "__len__") or len(r) == 0 for r in rows):
            raise ValueError("prompts must be a non-empty list of non-empty token id lists (or an [N, P] tensor)")
        for r in rows:
            for t in r:
                if isinstance(t, bool) or not isinstance(t, int):
                    raise TypeError(f"prompt token ids must be ints; got {type(t).__name__} {t!r}")
        P = max(len(r) for r in rows)
        pad = 0 if pad_id is None else pad_id
        if not 0 <= pad < cfg.vocab_size:
            raise ValueError(f"pad_id={pad} must lie in [0, vocab_size={cfg.vocab_size})")
        ids = torch.tensor([[pad] * (P - len(r)) + list(r) for r in rows], dtype=torch.int64, device=dev)
        valid = torch.tensor([[False] * (P - len(r)) + [True] * len(r) for r in rows], device=dev)
    real = ids[valid]
    lo, hi = int(real.min()), int(real.max())
    if lo < 0 or hi >= cfg.vocab_size:
        raise ValueError(f"prompt token ids must lie in [0, vocab_size={cfg.vocab_size}); got values in [{lo}, {hi}]")
    if bool((real == cfg.mask_id).any()):
        raise ValueError(f"prompt contains mask_id={cfg.mask_id}; prompts must be unmasked text")
    return ids, valid


def _sample(logits: torch.Tensor, temperature: float, gen: torch.Generator | None,
            mask_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """logits: [..., V] fp32 -> (ids [...] int64, confidence softmax(logits)[ids] fp32).

    The mask token is never predicted: its logit is set to -inf first (a trained LLaDA gives it ~0
    probability anyway; random weights do not, and a committed mask id would stay "masked").

    Gumbel-max: argmax(logits + T * g), g = -log(-log u), equals LLaDA's argmax(exp(logits) / (-log u)^T)
    (take logs); fp64 keeps the noise of large vocabularies from rounding away."""
    logits = logits.clone()
    logits[..., mask_id] = -float("inf")
    if temperature > 0:
        u = torch.rand(logits.shape, generator=gen, device=logits.device, dtype=torch.float64)
        g = -torch.log(-torch.log(u.clamp_min(1e-300)))
        ids = (logits.double() + temperature * g).argmax(-1)
    else:
        ids = logits.argmax(-1)
    conf = torch.softmax(logits, dim=-1).gather(-1, ids[..., None]).squeeze(-1)
    return ids, conf


def _finish_step(stats: ForwardStats, t0: float | None, device, rec: StepRecord, moe: bool, time_steps: bool):
    if time_steps:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        rec.seconds = time.perf_counter() - t0
        rec.ffn_seconds = stats.ffn_seconds()
    rec.num_tokens = stats.num_tokens
    if moe and stats.expert_counts:
        rec.expert_counts = torch.stack(stats.expert_counts).to("cpu", torch.int64)


def _check_common(model, temperature, moe_backend, kernels):
    if not isinstance(model, DiffusionModel):
        raise TypeError(f"model must be a DiffusionModel; got {type(model).__name__}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature >= 0:
        raise ValueError(f"temperature={temperature!r} must be a number >= 0")
    reason = moe_backend_unavailable_reason(moe_backend, model.device, kernels)
    if reason is not None and model.config.is_moe:
        raise RuntimeError(f"moe_backend={moe_backend!r} (kernels={kernels!r}) cannot run: {reason}")


@torch.no_grad()
def generate(
    model: DiffusionModel,
    prompts,
    *,
    gen_length: int = 128,
    block_length: int = 32,
    steps: int = 128,
    temperature: float = 0.0,
    seed: int = 0,
    moe_backend: str = "moekern",
    kernels: str = "auto",
    pad_id: int | None = None,
    trace: bool = False,
    time_steps: bool = False,
    record_counts: bool = True,
) -> GenerationResult:
    """Masked-diffusion generation (see the module docstring for the algorithm and argument rules).

    prompts: [N, P] int tensor or list of N id lists (left-padded). Returns a GenerationResult whose
    `steps` carry expert counts per MoE layer (record_counts) and, with time_steps=True, the wall time and
    FFN time of every forward (a device synchronize per step).
    """
    per_block = validate_generation_args(gen_length, block_length, steps)
    _check_common(model, temperature, moe_backend, kernels)
    cfg, dev = model.config, model.device
    ids, pvalid = prepare_prompts(prompts, model, pad_id)
    N, P = ids.shape
    x = torch.cat([ids, torch.full((N, gen_length), cfg.mask_id, dtype=torch.int64, device=dev)], dim=1)
    valid = torch.cat([pvalid, torch.ones(N, gen_length, dtype=torch.bool, device=dev)], dim=1)
    fwd_valid = None if bool(pvalid.all()) else valid
    gen = torch.Generator(device=dev).manual_seed(seed) if temperature > 0 else None
    states = [x.clone()] if trace else None
    records: list[StepRecord] = []
    for b in range(gen_length // block_length):
        lo, hi = P + b * block_length, P + (b + 1) * block_length
        # The block is all mask at its start (prompts hold no mask id), so every row has the same schedule.
        for i, k in enumerate(transfer_schedule(block_length, per_block)):
            stats = ForwardStats(time_ffn=time_steps) if (record_counts or time_steps) else None
            t0 = time.perf_counter() if time_steps else None
            logits = forward(model, x, valid=fwd_valid, logits_slice=slice(lo, hi), moe_backend=moe_backend,
                             kernels=kernels, stats=stats)  # [N, B, V]
            block = x[:, lo:hi]
            masked = block == cfg.mask_id
            pred, conf = _sample(logits, temperature, gen, cfg.mask_id)
            conf = torch.where(masked, conf, torch.full_like(conf, -float("inf")))
            chosen = torch.zeros_like(masked)
            if k:
                chosen.scatter_(1, conf.topk(k, dim=1).indices, True)
            x[:, lo:hi] = torch.where(chosen & masked, pred, block)
            rec = StepRecord(step=len(records), block=b, committed=k, num_tokens=N * (P + gen_length))
            if stats is not None:
                _finish_step(stats, t0, dev, rec, cfg.is_moe, time_steps)
            records.append(rec)
            if trace:
                states.append(x.clone())
    return GenerationResult(x, x[:, P:], valid, P, records, torch.stack(states) if trace else None, "diffusion")


@torch.no_grad()
def ar_generate(
    model: DiffusionModel,
    prompts,
    *,
    gen_length: int = 128,
    temperature: float = 0.0,
    seed: int = 0,
    moe_backend: str = "moekern",
    kernels: str = "auto",
    pad_id: int | None = None,
    time_steps: bool = False,
    record_counts: bool = True,
) -> GenerationResult:
    """Autoregressive decode with the same layers and causal attention: one token per forward, the whole
    prefix recomputed each step (no KV cache). Same prompts/sampling conventions as generate()."""
    _check_int("gen_length", gen_length, 1)
    _check_common(model, temperature, moe_backend, kernels)
    cfg, dev = model.config, model.device
    ids, pvalid = prepare_prompts(prompts, model, pad_id)
    N, P = ids.shape
    padded = not bool(pvalid.all())
    x, valid = ids, pvalid
    gen = torch.Generator(device=dev).manual_seed(seed) if temperature > 0 else None
    records = []
    for t in range(gen_length):
        stats = ForwardStats(time_ffn=time_steps) if (record_counts or time_steps) else None
        t0 = time.perf_counter() if time_steps else None
        T = x.shape[1]
        logits = forward(model, x, valid=valid if padded else None, causal=True, logits_slice=slice(T - 1, T),
                         moe_backend=moe_backend, kernels=kernels, stats=stats)
        nxt, _ = _sample(logits[:, 0], temperature, gen, cfg.mask_id)
        x = torch.cat([x, nxt[:, None]], dim=1)
        valid = torch.cat([valid, torch.ones(N, 1, dtype=torch.bool, device=dev)], dim=1)
        rec = StepRecord(step=t, block=t, committed=1, num_tokens=N * T)
        if stats is not None:
            _finish_step(stats, t0, dev, rec, cfg.is_moe, time_steps)
        records.append(rec)
    return GenerationResult(x, x[:, P:], valid, P, records, None, "decode")


def gate_records(result: GenerationResult, top_k: int, *, model: str | None = None, rank: int = 0,
                 step_offset: int = 0):
    """moekern.gatelog GateRecords of a generation: one per (step, MoE layer); phase "diffusion" for
    denoising ("decode" for ar_generate); num_tokens = tokens through the FFN in that forward;
    extra = {"block", "committed"}. sum(expert_counts) == num_tokens * top_k."""
    from moekern.gatelog import GateRecord

    out = []
    for rec in result.steps:
        if rec.expert_counts is None:
            continue
        for layer, counts in enumerate(rec.expert_counts.tolist()):
            out.append(GateRecord(step=step_offset + rec.step, layer=layer, expert_counts=counts,
                                  num_tokens=rec.num_tokens, rank=rank, phase=result.phase, top_k=top_k,
                                  model=model, extra={"block": rec.block, "committed": rec.committed}))
    return out


def write_gate_log(result: GenerationResult, path, top_k: int, **kw) -> int:
    """Append the generation's gate records to the JSONL file `path`; returns the number written."""
    from moekern.gatelog import write_records

    recs = gate_records(result, top_k, **kw)
    write_records(path, recs)
    return len(recs)
