"""The plugin's settings: read once from the environment, the only place no argument can reach.

    MOEKERN_KERNELS        off | routing | all          (default off)
    MOEKERN_GATE_LOG_DIR   directory for gate_log.rank{R}.jsonl; gate logs are on when set
    MOEKERN_GATE_LOG_FLUSH_STEPS   flush the JSONL file every N steps (default 64)
    MOEKERN_GATE_LOG_FLUSH_SECONDS ... or after this many seconds, whichever comes first (default 1.0)
    MOEKERN_GATE_LOG_QUEUE         pinned host slots between the GPU and the writer thread (default 256);
                                   when all are in use the step is dropped and counted, never waited for
    MOEKERN_GATE_LOG_TOPK_SAMPLE   N > 0: also log the top-k ids of at most N tokens per layer per sampled
                                   step as the record's "topk_sample" (co-activation studies); default 0 (off)
    MOEKERN_GATE_LOG_TOPK_EVERY    sample every N-th step (default 1)
    MOEKERN_GATE_LOG_SNAPSHOT      auto | kernel | torch: how a step's counts leave the device (default auto:
                                   moekern's one-kernel hand-off where moekern._C has it, else torch calls;
                                   kernel: fail if it cannot; torch: always the torch calls, for A/B runs)
    MOEKERN_ROUTING_SKEW   uniform | zipf:<s>[@<beta>] | hot:<expert>:<fraction>[@<beta>]   (study tool)
    MOEKERN_ROUTING_SKEW_SEED      seed of the zipf rank permutation (default 0)
    MOEKERN_DUMMY_ROUTER_SEED      re-draw each MoE layer's router (gate) weight after loading, from a generator
                                   seeded with (seed, layer index) (study tool for load_format=dummy runs)

This module is torch-free except `skew_bias`, so tests and the analysis can import it anywhere.

Routing skew (a study tool for dummy-weight runs, never for serving a real model): a precomputed [E]
fp32 bias b is added to the router logits before routing, so routing stays one fused kernel. With
first-choice probability targets p_e, the bias is b_e = beta * ln(p_e) (up to a constant, which no
scoring cares about for selection). That is exact when the logits are a constant plus i.i.d.
Gumbel(0, beta) noise: then argmax_e(logit_e + b_e) is drawn from softmax(b / beta) = p. Real logits are
not Gumbel, and dummy weights (uniform +-1e-3) give logits with a spread of ~0.01-0.1, far below beta=1:
the realized skew is then much sharper than p (close to a fixed expert order). The gate log records what
routing actually did; analyse that, not the nominal p. Set beta (the `@<beta>` suffix) near the logits'
spread to approach the nominal distribution.

- uniform: b = 0 (the baseline arm of a skew study: same code path, no skew).
- zipf:s: p_e proportional to (rank_e + 1)^-s, where rank is a fixed permutation of the experts drawn
  with numpy's default_rng(MOEKERN_ROUTING_SKEW_SEED); so b_e = -beta * s * ln(rank_e + 1).
- hot:e:f: expert e gets first-choice probability f, the others (1-f)/(E-1) each; so b_e =
  beta * ln(f * (E-1) / (1-f)) and 0 elsewhere. 0 < f < 1; f < 1/E makes e a cold expert.
The bias applies to the logits for every scoring; for sigmoid scoring (where only the ordering of
sigmoid(logit)+correction matters) the probabilities above are not exact even under Gumbel noise.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass

KERNEL_MODES = ("off", "routing", "all")
SNAPSHOT_MODES = ("auto", "kernel", "torch")
# A grid's name for a skew (moekern e2e --skews NAME=SKEW, a sweep's bench_grid.skews): it becomes part of file names
SKEW_NAME = re.compile(r"[A-Za-z0-9.+-]+")


@dataclass(frozen=True)
class RoutingSkew:
    kind: str  # "uniform" | "zipf" | "hot"
    s: float = 0.0  # zipf exponent
    expert: int = -1  # hot expert
    fraction: float = 0.0  # hot expert's first-choice probability
    beta: float = 1.0  # logit-noise scale the bias is calibrated for
    seed: int = 0

    def describe(self) -> str:
        if self.kind == "zipf":
            return f"zipf:{self.s}@{self.beta} (seed {self.seed})"
        if self.kind == "hot":
            return f"hot:{self.expert}:{self.fraction}@{self.beta}"
        return "uniform"


@dataclass(frozen=True)
class PluginConfig:
    kernels: str = "off"
    gate_log_dir: str | None = None
    flush_steps: int = 64
    flush_seconds: float = 1.0
    queue_slots: int = 256
    skew: RoutingSkew | None = None
    topk_sample: int = 0  # tokens per layer per sampled step; 0 = off
    topk_every: int = 1
    dummy_router_seed: int | None = None
    gate_log_snapshot: str = "auto"

    @property
    def enabled(self) -> bool:
        """False means register() must leave vLLM untouched."""
        return (self.kernels != "off" or self.gate_log_dir is not None or self.skew is not None
                or self.dummy_router_seed is not None)

    @property
    def gate_log(self) -> bool:
        return self.gate_log_dir is not None


def _split_beta(text: str, name: str) -> tuple[str, float]:
    if "@" not in text:
        return text, 1.0
    body, _, beta_text = text.partition("@")
    try:
        beta = float(beta_text)
    except ValueError:
        raise ValueError(f"{name}={text!r}: beta after '@' must be a number; got {beta_text!r}") from None
    if not (beta > 0 and math.isfinite(beta)):
        raise ValueError(f"{name}={text!r}: beta must be a finite number > 0; got {beta}")
    return body, beta


def parse_skew(text: str | None, seed: int = 0, name: str = "MOEKERN_ROUTING_SKEW") -> RoutingSkew | None:
    """Parse `uniform`, `zipf:<s>[@beta]` or `hot:<expert>:<fraction>[@beta]`; None/"" means no skew."""
    if text is None or not text.strip():
        return None
    raw = text.strip()
    body, beta = _split_beta(raw.lower(), name)
    parts = body.split(":")
    kind = parts[0]
    if kind == "uniform" and len(parts) == 1:
        return RoutingSkew("uniform", beta=beta, seed=seed)
    if kind == "zipf" and len(parts) == 2:
        try:
            s = float(parts[1])
        except ValueError:
            raise ValueError(f"{name}={raw!r}: zipf exponent must be a number; got {parts[1]!r}") from None
        if not (s >= 0 and math.isfinite(s)):
            raise ValueError(f"{name}={raw!r}: zipf exponent must be finite and >= 0; got {s}")
        return RoutingSkew("zipf", s=s, beta=beta, seed=seed)
    if kind == "hot" and len(parts) == 3:
        try:
            expert = int(parts[1])
        except ValueError:
            raise ValueError(f"{name}={raw!r}: hot expert must be an int; got {parts[1]!r}") from None
        try:
            fraction = float(parts[2])
        except ValueError:
            raise ValueError(f"{name}={raw!r}: hot fraction must be a number; got {parts[2]!r}") from None
        if expert < 0:
            raise ValueError(f"{name}={raw!r}: hot expert must be >= 0; got {expert}")
        if not (0.0 < fraction < 1.0):
            raise ValueError(f"{name}={raw!r}: hot fraction must be in (0, 1); got {fraction}")
        return RoutingSkew("hot", expert=expert, fraction=fraction, beta=beta, seed=seed)
    raise ValueError(f"{name}={raw!r} must be 'uniform', 'zipf:<s>' or 'hot:<expert>:<fraction>' (optionally '@<beta>')")


def _int_env(env: dict, name: str, default: int, low: int) -> int:
    text = env.get(name)
    if text is None or text == "":
        return default
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"{name}={text!r} must be an int") from None
    if value < low:
        raise ValueError(f"{name}={value} must be >= {low}")
    return value


def _float_env(env: dict, name: str, default: float, low: float) -> float:
    text = env.get(name)
    if text is None or text == "":
        return default
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{name}={text!r} must be a number") from None
    if not (value >= low and math.isfinite(value)):
        raise ValueError(f"{name}={value} must be finite and >= {low}")
    return value


def config_from_env(env: dict | None = None) -> PluginConfig:
    """Read the MOEKERN_* variables (from `env`, default os.environ). Raises ValueError naming the variable."""
    env = os.environ if env is None else env
    kernels = (env.get("MOEKERN_KERNELS") or "off").strip().lower()
    if kernels in ("0", "false", "no", "none"):
        kernels = "off"
    if kernels not in KERNEL_MODES:
        raise ValueError(f"MOEKERN_KERNELS={env.get('MOEKERN_KERNELS')!r} must be one of {KERNEL_MODES}")
    log_dir = env.get("MOEKERN_GATE_LOG_DIR") or None
    seed = _int_env(env, "MOEKERN_ROUTING_SKEW_SEED", 0, 0)
    snapshot = (env.get("MOEKERN_GATE_LOG_SNAPSHOT") or "auto").strip().lower()
    if snapshot not in SNAPSHOT_MODES:
        raise ValueError(f"MOEKERN_GATE_LOG_SNAPSHOT={env.get('MOEKERN_GATE_LOG_SNAPSHOT')!r} must be one of "
                         f"{SNAPSHOT_MODES}")
    return PluginConfig(
        kernels=kernels,
        gate_log_dir=log_dir,
        flush_steps=_int_env(env, "MOEKERN_GATE_LOG_FLUSH_STEPS", 64, 1),
        flush_seconds=_float_env(env, "MOEKERN_GATE_LOG_FLUSH_SECONDS", 1.0, 0.0),
        queue_slots=_int_env(env, "MOEKERN_GATE_LOG_QUEUE", 256, 1),
        topk_sample=_int_env(env, "MOEKERN_GATE_LOG_TOPK_SAMPLE", 0, 0),
        topk_every=_int_env(env, "MOEKERN_GATE_LOG_TOPK_EVERY", 1, 1),
        skew=parse_skew(env.get("MOEKERN_ROUTING_SKEW"), seed=seed),
        dummy_router_seed=(_int_env(env, "MOEKERN_DUMMY_ROUTER_SEED", 0, 0)
                           if env.get("MOEKERN_DUMMY_ROUTER_SEED") not in (None, "") else None),
        gate_log_snapshot=snapshot,
    )


def skew_probabilities(skew: RoutingSkew, num_experts: int) -> list[float]:
    """The nominal first-choice probabilities p_e ([E], sums to 1) the bias encodes."""
    import numpy as np

    E = num_experts
    if E < 1:
        raise ValueError(f"num_experts={E} must be >= 1")
    if skew.kind == "uniform":
        return [1.0 / E] * E
    if skew.kind == "zipf":
        rank = np.random.default_rng(skew.seed).permutation(E)  # rank[e]: expert e's popularity rank
        w = (rank + 1.0) ** (-skew.s)
        return list(w / w.sum())
    if skew.kind == "hot":
        if skew.expert >= E:
            raise ValueError(f"hot expert={skew.expert} must be < num_experts={E}")
        if E == 1:
            return [1.0]
        rest = (1.0 - skew.fraction) / (E - 1)
        return [skew.fraction if e == skew.expert else rest for e in range(E)]
    raise ValueError(f"unknown skew kind {skew.kind!r}")


def expected_load_cv(skew: RoutingSkew, num_experts: int, top_k: int, noise_scale: float | None = None,
                     tokens: int = 200_000, seed: int = 0) -> float:
    """The aggregated CV (population std / mean of the expert loads summed over tokens) that `skew` gives with
    top-`top_k` routing when the router's own logits are a constant plus i.i.d. Gumbel(0, noise_scale) noise
    per (token, expert): a Monte-Carlo estimate over `tokens` tokens (seeded; +-0.01 at the default size).

    noise_scale=None means skew.beta, the model the bias is calibrated for (first choices drawn from
    skew_probabilities). A noise_scale far below beta models dummy weights, whose logits spread ~0.01-0.1 (or
    less): the bias then overrides the router (hot: the hot expert is every token's first choice; one cold
    expert: it is never chosen), and the router's own order only breaks ties among equal biases. Real routers
    add their own imbalance; the gate log measures the sum."""
    import numpy as np

    if not (1 <= top_k <= num_experts):
        raise ValueError(f"top_k={top_k} must be in [1, num_experts={num_experts}]")
    scale = skew.beta if noise_scale is None else float(noise_scale)
    if not (scale > 0 and math.isfinite(scale)):
        raise ValueError(f"noise_scale={noise_scale} must be a finite number > 0")
    bias = np.array(skew_bias_values(skew, num_experts))  # the bias the plugin adds (skew_bias)
    rng = np.random.default_rng(seed)
    logits = bias + rng.gumbel(0.0, scale, size=(tokens, num_experts))
    chosen = np.argpartition(-logits, top_k - 1, axis=1)[:, :top_k]
    loads = np.bincount(chosen.ravel(), minlength=num_experts).astype(np.float64)
    return float(loads.std() / loads.mean())


def skew_bias_values(skew: RoutingSkew, num_experts: int) -> list[float]:
    """The [E] logit bias b_e = beta * ln(p_e / p_ref) (p_ref: the uniform/cold level, so most entries are 0)."""
    p = skew_probabilities(skew, num_experts)
    if skew.kind == "uniform":
        return [0.0] * num_experts
    if skew.kind == "zipf":
        return [skew.beta * math.log(pe / max(p)) for pe in p]  # the rank-0 expert gets 0, others negative
    ref = p[(skew.expert + 1) % num_experts] if num_experts > 1 else p[0]  # hot: only the hot expert moves
    return [skew.beta * math.log(pe / ref) if e == skew.expert else 0.0 for e, pe in enumerate(p)]


def skew_bias(skew: RoutingSkew, num_experts: int, device=None):
    """skew_bias_values as an [E] fp32 tensor on `device`."""
    import torch

    return torch.tensor(skew_bias_values(skew, num_experts), dtype=torch.float32, device=device)
