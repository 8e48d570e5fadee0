"""Expert placement advice for expert parallelism: which expert lives on which EP rank.

Strategies (each gives, per MoE layer, a physical->logical map `[P]`, P = E + R slots, P / ep_size slots
per rank, slot p on rank p // (P / ep_size), the layout vLLM's EPLB uses):
- contiguous: expert e on rank e // (E / ep) (vLLM `--expert-placement-strategy linear`);
- round_robin: expert e on rank e % ep (vLLM `--expert-placement-strategy round_robin`);
- greedy: longest-processing-time packing of the train-step loads, heaviest expert first onto the
  least-loaded rank with a free slot (E / ep slots per rank);
- replicate: R redundant slots; R times, the expert with the largest per-replica load gets one more
  replica (its tokens are assumed split evenly among replicas), then the replicas are packed greedily,
  never two replicas of one expert on one rank when another rank has room.

Each map is fitted on the first `train_frac` of the (warm-up-filtered) steps and scored on the rest
(chronological split: placement is decided before the traffic it serves) by the mean over (step, layer)
of max/mean rank load (1.0 = perfectly even; the slowest rank sets the step time).

vLLM 0.26 has no option to load a custom expert map (ParallelConfig.expert_placement_strategy is
"linear" | "round_robin"; EPLB builds its own map from measured load at run time, seeded with
[0..E) + redundant slots). `vllm_advice` therefore maps the winner to the closest flags and the emitted
JSON holds EPLB-style physical_to_logical maps for tools that can consume them (and for the record).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np

from moekern.analysis.imbalance.metrics import DEFAULT_MAX_TOKENS, LoadTable, _nanmean, max_mean, rank_loads
from moekern.errors import UsageError
from moekern.models import weight_bytes_per_gpu as _models_weight_bytes

STRATEGIES = ("contiguous", "round_robin", "greedy", "replicate")


def contiguous_p2l(num_experts: int, ep_size: int) -> np.ndarray:
    _check(num_experts, ep_size)
    return np.arange(num_experts)


def round_robin_p2l(num_experts: int, ep_size: int) -> np.ndarray:
    _check(num_experts, ep_size)
    return np.concatenate([np.arange(r, num_experts, ep_size) for r in range(ep_size)])


def _check(num_slots: int, ep_size: int) -> None:
    if ep_size < 1 or num_slots % ep_size:
        raise UsageError(f"ep_size={ep_size} must be >= 1 and divide the number of physical slots={num_slots}")


def _pack(items: list[tuple[float, int]], ep_size: int, slots_per_rank: int) -> np.ndarray:
    """LPT packing of (load, logical expert) items into ep_size ranks of slots_per_rank slots each;
    ties go to the lower rank; an expert avoids ranks already holding it while another rank has room."""
    loads = np.zeros(ep_size)
    held: list[list[int]] = [[] for _ in range(ep_size)]
    for load, e in sorted(items, key=lambda x: (-x[0], x[1])):
        free = [r for r in range(ep_size) if len(held[r]) < slots_per_rank]
        fresh = [r for r in free if e not in held[r]] or free
        r = min(fresh, key=lambda q: (loads[q], q))
        held[r].append(e)
        loads[r] += load
    return np.concatenate([np.asarray(h, dtype=np.int64) for h in held])


def greedy_p2l(expert_load, ep_size: int) -> np.ndarray:
    """`expert_load: [E]` -> `[E]` physical->logical map balancing the given load."""
    load = np.asarray(expert_load, dtype=np.float64)
    _check(load.size, ep_size)
    return _pack([(float(x), e) for e, x in enumerate(load)], ep_size, load.size // ep_size)


def replicate_p2l(expert_load, ep_size: int, num_redundant: int) -> np.ndarray:
    """`expert_load: [E]` -> `[E + R]` map with R replicas of the hottest experts, packed greedily."""
    load = np.asarray(expert_load, dtype=np.float64)
    e = load.size
    _check(e + num_redundant, ep_size)
    if num_redundant < 0:
        raise ValueError(f"num_redundant={num_redundant} must be >= 0")
    replicas = np.ones(e, dtype=np.int64)
    for _ in range(num_redundant):
        per = load / replicas
        replicas[int(np.argmax(per))] += 1  # argmax: ties go to the lower expert index
    items = [(float(load[x] / replicas[x]), x) for x in range(e) for _ in range(replicas[x])]
    return _pack(items, ep_size, (e + num_redundant) // ep_size)


# ----------------------------------------------------------------------------------------------- memory
def weight_bytes_per_gpu(model, ep_size: int, num_redundant: int = 0, dtype_bytes: float = 2.0,
                         attn_tp: int = 1) -> dict:
    """Weight bytes on the busiest GPU when `model` (a moekern.models ModelSpec) runs EP over `ep_size` ranks
    with `num_redundant` replica slots, attention/dense parts split `attn_tp` ways: the placement view of
    moekern.models.weight_bytes_per_gpu(model, tp=attn_tp, ep=ep_size) (one estimator; its docstring says
    what is counted: MLA attention, tied embeddings and KV-head replication included).

    Returns that dict plus "model", "ep_size", "num_redundant", "dtype_bytes" and
    "extra_bytes_for_redundancy" (expert bytes the R replicas add to the busiest GPU). Raises ValueError for
    a dense model or an ep_size that is not a multiple of attn_tp.
    """
    if not model.is_moe:
        raise ValueError(f"model={model.name!r} is dense (num_experts=0); expert placement does not apply")
    mem = _models_weight_bytes(model, tp=attn_tp, ep=ep_size, dtype_bytes=dtype_bytes, num_redundant=num_redundant)
    base = mem if not num_redundant else _models_weight_bytes(model, tp=attn_tp, ep=ep_size, dtype_bytes=dtype_bytes)
    return {"model": model.name, "ep_size": ep_size, "num_redundant": num_redundant, "dtype_bytes": dtype_bytes,
            **mem, "extra_bytes_for_redundancy": mem["expert_bytes"] - base["expert_bytes"]}


# ---------------------------------------------------------------------------------------------- advice
@dataclass
class PlacementScore:
    strategy: str
    num_redundant: int
    physical_to_logical: np.ndarray  # [L, P]
    test_step_max_mean: float  # mean over test (step, layer) of max/mean rank load
    test_agg_max_mean: float  # max/mean of rank loads summed over test steps, mean over layers
    rank_tokens: list[float]  # test-step tokens per rank, summed over layers
    memory: dict | None = None


@dataclass
class PlacementAdvice:
    ep_size: int
    scores: list[PlacementScore]
    best: PlacementScore
    train_steps: int
    test_steps: int
    vllm_args: list[str] = field(default_factory=list)
    note: str = ""

    def to_json(self) -> dict:
        return {
            "format": "moekern.placement/1", "ep_size": self.ep_size, "train_steps": self.train_steps,
            "test_steps": self.test_steps,
            "strategies": [{"strategy": s.strategy, "num_redundant": s.num_redundant,
                            "test_step_max_mean": s.test_step_max_mean, "test_agg_max_mean": s.test_agg_max_mean,
                            "rank_tokens": s.rank_tokens, "memory": s.memory} for s in self.scores],
            "recommended": {"strategy": self.best.strategy, "num_redundant": self.best.num_redundant,
                            "num_logical_experts": int(self.best.physical_to_logical.max()) + 1,
                            "num_physical_experts": int(self.best.physical_to_logical.shape[1]),
                            "physical_to_logical": self.best.physical_to_logical.tolist(),
                            "vllm_args": self.vllm_args, "note": self.note}}


def score_placement(table: LoadTable, p2l: np.ndarray, ep_size: int) -> tuple[float, float, list[float]]:
    """(mean over (step, layer) of max/mean rank load, aggregated max/mean, tokens per rank) of `p2l: [L, P]`
    on the steps of `table`."""
    c = np.where(table.present[..., None], table.counts, 0.0)
    loads = rank_loads(c, ep_size, physical_to_logical=p2l)  # [S, L, ep]
    step = float(_nanmean(np.where(table.present, max_mean(loads), np.nan))) if loads.size else float("nan")
    total = loads.sum(axis=0)  # [L, ep]
    agg = float(_nanmean(max_mean(total))) if total.size else float("nan")
    return step, agg, [float(x) for x in total.sum(axis=0)]


def advise(table: LoadTable, ep_size: int, num_redundant: int | None = None, train_frac: float = 0.5,
           max_tokens: int | None = DEFAULT_MAX_TOKENS, model=None, strategies=STRATEGIES,
           dtype_bytes: float = 2.0) -> PlacementAdvice:
    """Fit every strategy on train steps, score on test steps, recommend the lowest test max/mean.

    num_redundant: replicate's R (default ep_size: one spare slot per rank). A strategy whose memory per
    GPU exceeds nothing is never rejected here; memory is reported (with `model`) for the user to weigh.
    """
    if not 0 < train_frac < 1:
        raise UsageError(f"train_frac={train_frac} must be in (0, 1)")
    if model is not None and model.num_experts != table.num_experts:
        raise UsageError(f"the gate log has {table.num_experts} experts but model={model.name!r} has "
                         f"{model.num_experts}: its memory per GPU would describe another model; give a log of "
                         f"{model.name} or leave the model out")
    t = table.select(table.step_mask(max_tokens))
    if t.num_steps < 2:
        raise UsageError(f"need >= 2 steps after the max_tokens={max_tokens} filter; got {t.num_steps}")
    n_train = min(t.num_steps - 1, max(1, int(round(train_frac * t.num_steps))))
    train = t.select(np.arange(t.num_steps) < n_train)
    test = t.select(np.arange(t.num_steps) >= n_train)
    e, l = t.num_experts, t.num_layers
    _check(e, ep_size)
    r = ep_size if num_redundant is None else num_redundant
    train_load = np.where(train.present[..., None], train.counts, 0.0).sum(axis=0)  # [L, E]
    scores = []
    for name in strategies:
        if name == "contiguous":
            p2l, red = np.tile(contiguous_p2l(e, ep_size), (l, 1)), 0
        elif name == "round_robin":
            p2l, red = np.tile(round_robin_p2l(e, ep_size), (l, 1)), 0
        elif name == "greedy":
            p2l, red = np.stack([greedy_p2l(train_load[j], ep_size) for j in range(l)]), 0
        elif name == "replicate":
            if r <= 0 or ep_size == 1 or (e + r) % ep_size:  # one rank: replicas balance nothing
                continue
            p2l, red = np.stack([replicate_p2l(train_load[j], ep_size, r) for j in range(l)]), r
        else:
            raise ValueError(f"strategy={name!r} must be one of {STRATEGIES}")
        step, agg, ranks = score_placement(test, p2l, ep_size)
        mem = weight_bytes_per_gpu(model, ep_size, red, dtype_bytes) if model is not None else None
        scores.append(PlacementScore(name, red, p2l, step, agg, ranks, mem))
    best = min(scores, key=lambda s: (s.test_step_max_mean, s.num_redundant, STRATEGIES.index(s.strategy)))
    args, note = vllm_advice(best)
    return PlacementAdvice(ep_size, scores, best, train.num_steps, test.num_steps, args, note)


def vllm_advice(best: PlacementScore) -> tuple[list[str], str]:
    """vLLM 0.26 flags closest to the recommended placement, and a note on what they do and do not do."""
    base = ["--enable-expert-parallel"]
    if best.strategy == "contiguous":
        return base + ["--expert-placement-strategy", "linear"], "vLLM's default linear placement is best here."
    if best.strategy == "round_robin":
        return base + ["--expert-placement-strategy", "round_robin"], "vLLM supports this placement directly."
    cfg = {"num_redundant_experts": best.num_redundant, "window_size": 1000, "step_interval": 3000}
    note = ("vLLM 0.26 cannot load a custom expert map (expert_placement_strategy is linear|round_robin only). "
            "The closest is EPLB, which measures load at run time and builds its own physical->logical map "
            f"with {best.num_redundant} redundant slot(s); the emitted physical_to_logical is EPLB's layout "
            "([L, E + R], slot p on rank p // ((E + R) / ep)) for tools that can load one.")
    return base + ["--enable-eplb", "--eplb-config", json.dumps(cfg)], note
