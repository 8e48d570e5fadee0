"""Expert co-activation from sampled top-k ids, and a placement that keeps co-firing experts together.

Input: gate-log records carrying `topk_sample` (a list of per-token expert-id lists; the vLLM plugin
samples them at a limited rate). Everything here is numpy only.

- co-activation matrix of a layer, `C: [E, E]` int64: C[i, j] (i != j) = sampled tokens that chose both i
  and j; C[i, i] = sampled tokens that chose i (its sampled load). Symmetric.
- hot / cold experts: load_e > mean + 1 std is hot, load_e < mean - 1 std is cold (population std over
  the layer's E experts, loads from `expert_counts` summed over steps, which cover every token, not only
  the sample). One std, not a decile, so a perfectly balanced layer has no hot or cold expert at all.
- fan-out of a placement: mean over sampled tokens of the number of distinct EP ranks the token's k
  experts live on (1 = every token stays on one rank; min(k, ep) = the most all-to-all messages). With
  replicas (EPLB layout, an expert in several slots), each expert of a token goes to a replica on a rank
  the token already touches when there is one, else to its first replica; a greedy cover, exact when no
  expert is replicated.
- co-activation placement (`coactivation_p2l`): greedy graph partitioning with a load cap. Experts are
  placed heaviest first; each goes to the rank (with a free slot, and whose load would stay within
  (1 + slack) * mean rank load, if any rank allows) that maximises affinity = sum of C[e, j] over the
  experts j already there, ties to the lower-loaded then lower rank. A swap pass then exchanges expert
  pairs across ranks when that lowers the cut weight (sum of C over pairs on different ranks) and keeps
  both ranks within the cap. E / ep slots per rank, as the other strategies (analysis/placement.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from moekern.errors import UsageError


@dataclass
class CoactivationData:
    """Per-layer co-activation of a gate log: `coact[l]: [E, E]`, `load[l]: [E]` (expert_counts summed),
    `samples[l]`: list of (step, ids [N, k] int64) arrays, `layers`: sorted layer ids."""

    num_experts: int
    layers: list[int]
    coact: dict[int, np.ndarray]
    load: dict[int, np.ndarray]
    samples: dict[int, list[tuple[int, np.ndarray]]] = field(default_factory=dict)

    def sample_tokens(self, layer: int, steps=None) -> np.ndarray:
        """`[N, k]` sampled ids of `layer` (restricted to `steps`, a set, when given)."""
        parts = [a for s, a in self.samples.get(layer, []) if steps is None or s in steps]
        k = max((a.shape[1] for a in parts), default=0)
        parts = [a for a in parts if a.shape[1] == k]
        return np.concatenate(parts) if parts else np.zeros((0, k), dtype=np.int64)


def coactivation_matrix(tokens, num_experts: int) -> np.ndarray:
    """`tokens: [N, k]` ints in [0, E) (or a list of id lists) -> `C: [E, E]` int64 (module docstring)."""
    rows = [np.unique(np.asarray(t, dtype=np.int64)) for t in tokens]
    c = np.zeros((num_experts, num_experts), dtype=np.int64)
    for r in rows:
        if r.size and (r.min() < 0 or r.max() >= num_experts):
            raise ValueError(f"topk_sample ids must lie in [0, num_experts={num_experts}); got {r.tolist()}")
        c[np.ix_(r, r)] += 1
    return c


def load_coactivation(path, max_tokens: int | None = None) -> CoactivationData:
    """Read the gate logs under `path`; records without `topk_sample` still add to the loads.
    `max_tokens` drops records of steps with more tokens (warm-up), as the imbalance metrics do."""
    from moekern import gatelog

    records, _ = gatelog.read_gate_log(path)
    if not records:
        raise UsageError(f"no valid gate-log records under {str(path)!r}")
    e = max(len(r.expert_counts) for r in records)
    coact: dict[int, np.ndarray] = {}
    load: dict[int, np.ndarray] = {}
    samples: dict[int, list] = {}
    for r in records:
        if len(r.expert_counts) != e or (max_tokens is not None and r.num_tokens > max_tokens):
            continue
        load.setdefault(r.layer, np.zeros(e))
        load[r.layer] += np.asarray(r.expert_counts, dtype=np.float64)
        if r.topk_sample:
            good = [t for t in r.topk_sample if isinstance(t, list) and t]
            if not good:
                continue
            k = len(good[0])
            ids = np.asarray([t for t in good if len(t) == k], dtype=np.int64)
            coact[r.layer] = coact.get(r.layer, np.zeros((e, e), dtype=np.int64)) + coactivation_matrix(ids, e)
            samples.setdefault(r.layer, []).append((r.step, ids))
    layers = sorted(load)
    for l in layers:
        coact.setdefault(l, np.zeros((e, e), dtype=np.int64))
    return CoactivationData(e, layers, coact, load, samples)


def hot_cold(load) -> tuple[np.ndarray, np.ndarray]:
    """(hot ids, cold ids) of `load: [E]`: above mean + 1 std / below mean - 1 std (population std)."""
    a = np.asarray(load, dtype=np.float64)
    m, s = a.mean(), a.std()
    if s == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    return np.flatnonzero(a > m + s), np.flatnonzero(a < m - s)


# ----------------------------------------------------------------------------------------------- fan-out
def _slot_ranks(p2l: np.ndarray, ep_size: int, num_experts: int) -> list[list[int]]:
    per = p2l.size // ep_size
    ranks: list[list[int]] = [[] for _ in range(num_experts)]
    for p, e in enumerate(p2l):
        if p // per not in ranks[e]:
            ranks[e].append(p // per)
    return ranks


def fan_out(tokens, ep_size: int, expert_to_rank=None, physical_to_logical=None) -> float:
    """Mean distinct EP ranks per token of `tokens: [N, k]` under `expert_to_rank: [E]` or
    `physical_to_logical: [P]` (module docstring for replicas). NaN for N = 0."""
    t = np.asarray(tokens, dtype=np.int64)
    if t.ndim != 2:
        raise ValueError(f"tokens must be [N, k]; got shape {t.shape}")
    if t.shape[0] == 0:
        return float("nan")
    if (expert_to_rank is None) == (physical_to_logical is None):
        raise ValueError("give exactly one of expert_to_rank or physical_to_logical")
    if expert_to_rank is not None:
        e2r = np.asarray(expert_to_rank, dtype=np.int64)
        if t.max() >= e2r.size:
            raise ValueError(f"token ids reach {t.max()} but expert_to_rank has {e2r.size} entries")
        r = np.sort(e2r[t], axis=1)
        return float((1 + (np.diff(r, axis=1) != 0).sum(axis=1)).mean())
    p2l = np.asarray(physical_to_logical, dtype=np.int64)
    if p2l.size % ep_size:
        raise ValueError(f"physical_to_logical has {p2l.size} slots, not a multiple of ep_size={ep_size}")
    e = int(max(p2l.max(), t.max())) + 1
    ranks = _slot_ranks(p2l, ep_size, e)
    if any(not ranks[x] for x in np.unique(t)):
        raise ValueError("a sampled expert has no slot in physical_to_logical")
    if all(len(r) == 1 for r in ranks if r):
        e2r = np.array([r[0] if r else 0 for r in ranks])
        return fan_out(t, ep_size, expert_to_rank=e2r)
    total = 0
    for row in t:
        touched: set[int] = set()
        # experts with one replica first: they fix ranks the replicated ones can then reuse
        for x in sorted(set(row.tolist()), key=lambda x: (len(ranks[x]), x)):
            hit = [r for r in ranks[x] if r in touched]
            touched.add(hit[0] if hit else ranks[x][0])
        total += len(touched)
    return total / t.shape[0]


# -------------------------------------------------------------------------------------------- placement
def cut_weight(coact, expert_to_rank) -> float:
    """Sum of C[i, j] over unordered expert pairs on different ranks."""
    c = np.asarray(coact, dtype=np.float64)
    e2r = np.asarray(expert_to_rank)
    diff = e2r[:, None] != e2r[None, :]
    return float(np.triu(c * diff, 1).sum())


def coactivation_e2r(load, coact, ep_size: int, slack: float = 0.1, swap_rounds: int = 3) -> np.ndarray:
    """`load: [E]`, `coact: [E, E]` -> expert_to_rank `[E]`, E / ep_size experts per rank (module doc)."""
    w = np.asarray(load, dtype=np.float64)
    c = np.asarray(coact, dtype=np.float64).copy()
    e = w.size
    if c.shape != (e, e):
        raise ValueError(f"coact must be [E, E] = [{e}, {e}]; got {c.shape}")
    if ep_size < 1 or e % ep_size:
        raise UsageError(f"ep_size={ep_size} must be >= 1 and divide num_experts={e}")
    if slack < 0:
        raise ValueError(f"slack={slack} must be >= 0")
    np.fill_diagonal(c, 0.0)
    per = e // ep_size
    cap = (1.0 + slack) * w.sum() / ep_size
    e2r = np.full(e, -1, dtype=np.int64)
    rank_load = np.zeros(ep_size)
    size = np.zeros(ep_size, dtype=np.int64)
    for x in sorted(range(e), key=lambda x: (-w[x], x)):
        free = [r for r in range(ep_size) if size[r] < per]
        ok = [r for r in free if rank_load[r] + w[x] <= cap] or [min(free, key=lambda r: (rank_load[r], r))]
        aff = {r: c[x, e2r == r].sum() for r in ok}
        r = min(ok, key=lambda r: (-aff[r], rank_load[r], r))
        e2r[x], rank_load[r], size[r] = r, rank_load[r] + w[x], size[r] + 1
    aff = c @ np.eye(ep_size)[e2r]  # [E, ep]: affinity of each expert to each rank
    for _ in range(swap_rounds):
        improved = False
        for a in range(e):
            ra = e2r[a]
            rb = e2r  # candidate partners b, vectorized
            la = rank_load[ra] - w[a] + w  # load of ra after a <-> b
            lb = rank_load[rb] - w + w[a]  # load of b's rank after the swap
            # never push a rank past the cap (or past where it already was)
            ok = (rb != ra) & (np.maximum(la, lb) <= np.maximum(cap, np.maximum(rank_load[ra], rank_load[rb])))
            # co-activation kept on-rank gained by moving a -> rank(b) and b -> rank(a)
            gain = (aff[a, rb] - c[a] + aff[np.arange(e), ra] - c[:, a]
                    - aff[a, ra] - aff[np.arange(e), rb])
            gain = np.where(ok, gain, -np.inf)
            b = int(np.argmax(gain))
            if gain[b] <= 1e-9:
                continue
            r_b = e2r[b]
            rank_load[ra], rank_load[r_b] = la[b], lb[b]
            aff[:, ra] += c[:, b] - c[:, a]
            aff[:, r_b] += c[:, a] - c[:, b]
            e2r[a], e2r[b] = r_b, ra
            improved = True
        if not improved:
            break
    return e2r


def e2r_to_p2l(expert_to_rank, ep_size: int) -> np.ndarray:
    """expert_to_rank `[E]` (E / ep per rank) -> the EPLB-style physical->logical map `[E]`."""
    e2r = np.asarray(expert_to_rank, dtype=np.int64)
    return np.concatenate([np.flatnonzero(e2r == r) for r in range(ep_size)])


def coactivation_p2l(load, coact, ep_size: int, slack: float = 0.1) -> np.ndarray:
    """The co-activation placement as a physical->logical map `[E]` (analysis.placement's layout)."""
    return e2r_to_p2l(coactivation_e2r(load, coact, ep_size, slack), ep_size)


# ---------------------------------------------------------------------------------------- placement study
@dataclass
class PlacementRow:
    strategy: str
    num_redundant: int
    step_max_mean: float  # held-out steps: mean over (step, layer) of max/mean rank load
    fan_out: float  # held-out sampled tokens: mean distinct ranks per token, mean over layers
    physical_to_logical: np.ndarray  # [L, P]


def placement_study(path, ep_size: int, train_frac: float = 0.5, max_tokens: int | None = 1000,
                    num_redundant: int | None = None, slack: float = 0.1, combine_ranks: str = "auto") -> dict:
    """Every analysis/placement.py strategy plus "coactivation", fitted on the first `train_frac` of the
    steps, scored on the rest by rank-load max/mean and by fan-out (held-out `topk_sample` tokens).
    `path` holds one run (the train/test split is by step id); `combine_ranks` as metrics.load_table's.

    Returns {"ep_size", "rows": [PlacementRow], "train_steps", "test_steps", "sampled_tokens_test",
    "coact": CoactivationData}."""
    from moekern.analysis.imbalance.metrics import load_table
    from moekern.analysis.placement.advice import advise, score_placement

    table = load_table(path, combine_ranks=combine_ranks)
    if len(table.run_names) > 1:
        raise UsageError(f"{str(path)!r} holds {len(table.run_names)} runs ({', '.join(table.run_names)}); the "
                         "co-activation study splits one run's steps into train and test: give one run's folder")
    adv = advise(table, ep_size, num_redundant=num_redundant, train_frac=train_frac, max_tokens=max_tokens)
    t = table.select(table.step_mask(max_tokens))
    n_train = adv.train_steps
    train_steps = set(int(s) for s in t.steps[:n_train])
    test_steps = set(int(s) for s in t.steps[n_train:])
    test = t.select(np.arange(t.num_steps) >= n_train)
    data = load_coactivation(path, max_tokens=max_tokens)
    layer_ids = [int(x) for x in sorted(data.layers)]
    if len(layer_ids) != t.num_layers:
        raise ValueError(f"gate log has {len(layer_ids)} layers with loads but the load table has {t.num_layers}")
    train_load = np.where(t.present[:n_train, :, None], t.counts[:n_train], 0.0).sum(axis=0)  # [L, E]
    coact_p2l = []
    for j, l in enumerate(layer_ids):
        c = coactivation_matrix(data.sample_tokens(l, train_steps), data.num_experts) \
            if data.samples.get(l) else np.zeros((data.num_experts,) * 2)
        coact_p2l.append(coactivation_p2l(train_load[j], c, ep_size, slack))
    coact_p2l = np.stack(coact_p2l)
    step, _, _ = score_placement(test, coact_p2l, ep_size)
    entries = [(s.strategy, s.num_redundant, s.test_step_max_mean, s.physical_to_logical) for s in adv.scores]
    entries.append(("coactivation", 0, step, coact_p2l))
    test_tokens = {l: data.sample_tokens(l, test_steps) for l in layer_ids}
    rows = []
    for name, red, mm, p2l in entries:
        fos = [fan_out(test_tokens[l], ep_size, physical_to_logical=p2l[j])
               for j, l in enumerate(layer_ids) if test_tokens[l].shape[0]]
        rows.append(PlacementRow(name, red, float(mm), float(np.mean(fos)) if fos else float("nan"), p2l))
    return {"ep_size": ep_size, "rows": rows, "train_steps": n_train, "test_steps": test.num_steps,
            "sampled_tokens_test": int(sum(v.shape[0] for v in test_tokens.values())), "coact": data}


# ------------------------------------------------------------------------------------------- synthetic
def write_synthetic_coactivation_log(path, num_experts: int = 16, top_k: int = 4, num_layers: int = 2,
                                     num_steps: int = 20, tokens_per_step: int = 64, num_groups: int = 4,
                                     in_group: float = 0.9, seed: int = 0):
    """SYNTHETIC gate log with `topk_sample` for tests and the sample report (nothing measured).

    Experts form `num_groups` equal groups by a seeded random permutation, so neither the contiguous nor
    the round-robin placement keeps a group on one rank (except by chance); a token picks a group (group popularity ~
    Dirichlet(2)) and each of its k distinct experts comes from that group with probability `in_group`.
    """
    from pathlib import Path

    from moekern.gatelog import GateRecord, write_records

    rng = np.random.default_rng(seed)
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    if p.exists():
        p.unlink()
    perm = rng.permutation(num_experts)
    groups = [np.sort(perm[g::num_groups]) for g in range(num_groups)]
    recs = []
    for l in range(num_layers):
        pop = rng.dirichlet(np.full(num_groups, 2.0))
        for s in range(num_steps):
            toks = []
            for _ in range(tokens_per_step):
                g = groups[rng.choice(num_groups, p=pop)]
                chosen: list[int] = []
                while len(chosen) < top_k:
                    pool = g if rng.random() < in_group else np.arange(num_experts)
                    x = int(rng.choice(pool))
                    if x not in chosen:
                        chosen.append(x)
                toks.append(chosen)
            counts = np.bincount(np.asarray(toks).reshape(-1), minlength=num_experts)
            recs.append((s, l, counts, toks))
    recs.sort(key=lambda r: (r[0], r[1]))
    write_records(p, [GateRecord(s, l, c.tolist(), tokens_per_step, phase="decode", top_k=top_k,
                                 model="synthetic-coactivation", topk_sample=t) for s, l, c, t in recs])
    return p
