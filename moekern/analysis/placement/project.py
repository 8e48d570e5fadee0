"""`moekern project`: PROJECTED expert-parallel step time on 1-4 nodes of 8 GPUs (nothing here is measured).

Model, per MoE layer, EP over W = 8 * nodes GPUs, `tokens` tokens per GPU per step, every token starting on
its own GPU (data-parallel attention), routing drawn from a measured distribution:
- destinations: each sampled token's top-k experts map (through the placement) to a set D of ranks. The
  samples are the gate logs' `topk_sample` when present, else tokens drawn from the layer's measured
  expert loads (k distinct experts, probability proportional to load: independent choices, which ignores
  co-activation). Source ranks are uniform, so a token on rank s sends one copy to each rank in D \\ {s},
  over NVLink when the rank shares s's node, over the NIC otherwise.
- dispatch bytes per copy: H * dispatch_bytes (2 = bf16, 1 = fp8 + scales ignored) plus k * 8 bytes of
  ids and weights; combine returns H * 2 bytes per copy.
- time of one all-to-all = max over ranks of max(send, receive) time, each the larger of intra-node bytes
  / intra_bw and inter-node bytes / inter_bw (NVLink and NIC run in parallel), plus a fixed latency per
  phase (`latency_us`). A rank's receive share comes from its share of the (token, rank) pairs, so hot
  ranks (imbalance) and fan-out (co-activation) both raise the time.
- expert GEMMs: the busiest rank's (token, expert) pairs * 6 * H * I FLOPs at `gemm_tflops`.
- step = num_moe_layers * (dispatch + GEMM + combine) + attention/dense FLOPs (2 * non-expert active params
  * tokens) at `gemm_tflops`; no overlap of communication and compute is assumed (an upper bound).

Bandwidths: intra_bw defaults to a multi-GPU measured value from benchmarks/results/ep/*.json when one
holds "intra_node_bytes_per_s" (bench_ep.py's single-GPU file records only HBM copy bandwidth, which is NOT
an NVLink figure and is not used), else ASSUMED 350 GB/s per GPU per direction (H100 NVLink 4: 450 GB/s
per direction, ~80% reachable by all-to-all). inter_bw default: 50 GB/s per GPU (one 400 Gb/s NIC per
GPU). Both are arguments.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from moekern.errors import UsageError

DEFAULT_INTRA_BW = 350e9
DEFAULT_INTER_BW = 50e9
GPUS_PER_NODE = 8


def _result_files(search_dirs):
    """(path, parsed JSON) of every readable *.json under the existing `search_dirs`, in sorted order."""
    for d in search_dirs:
        for f in sorted(Path(d).rglob("*.json")) if Path(d).is_dir() else []:
            try:
                yield f, json.loads(f.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError):
                continue


def measured_intra_bw(search_dirs=("benchmarks/results/ep",)) -> tuple[float | None, str]:
    """(bytes/s, source) of a measured multi-GPU intra-node bandwidth, or (None, why not)."""
    for f, obj in _result_files(search_dirs):
        if isinstance(obj, dict) and isinstance(obj.get("intra_node_bytes_per_s"), (int, float)):
            return float(obj["intra_node_bytes_per_s"]), str(f)
    return None, "no measured multi-GPU intra-node bandwidth file (intra_node_bytes_per_s) under " \
                 + ", ".join(search_dirs)


def sample_tokens_from_load(load, top_k: int, n: int, seed: int = 0) -> np.ndarray:
    """`[n, k]` ids, k distinct experts per token with probability proportional to `load: [E]`."""
    p = np.asarray(load, dtype=np.float64) + 1e-12
    p /= p.sum()
    rng = np.random.default_rng(seed)
    # Gumbel top-k = sampling k without replacement proportional to p
    g = np.log(p)[None, :] + rng.gumbel(size=(n, p.size))
    return np.argsort(-g, axis=1)[:, :top_k]


@dataclass
class Projection:
    nodes: int
    gpus: int
    placement: str
    dispatch_us: float
    gemm_us: float
    combine_us: float
    dense_us: float
    step_ms: float
    fan_out: float
    inter_node_fraction: float  # of the copies leaving a rank, share crossing nodes
    max_rank_share: float  # busiest rank's share of (token, rank) pairs * W (1 = even)


def _rank_tables(tokens: np.ndarray, e2r: np.ndarray, world: int):
    """Per sampled token, a [W] 0/1 row of ranks touched."""
    hit = np.zeros((tokens.shape[0], world), dtype=np.float64)
    np.put_along_axis(hit, e2r[tokens], 1.0, axis=1)
    return hit


def project_layer(tokens: np.ndarray, e2r: np.ndarray, world: int, tokens_per_gpu: int, hidden: int, top_k: int,
                  intra_bw: float, inter_bw: float, dispatch_bytes: float = 2.0, latency_us: float = 10.0):
    """(dispatch_us, combine_us, fan_out, inter_fraction, max_rank_share, busiest rank's expert pairs per
    source token) for one layer; `tokens: [N, k]` sampled ids, `e2r: [E]` expert -> rank in [0, world)."""
    hit = _rank_tables(tokens, e2r, world)  # [N, W]
    p_rank = hit.mean(axis=0)  # P(a token touches rank r)
    node = np.arange(world) // GPUS_PER_NODE
    same = node[:, None] == node[None, :]
    np.fill_diagonal(same, False)
    cross = node[:, None] != node[None, :]
    total_tok = tokens_per_gpu * world
    d_bytes = hidden * dispatch_bytes + top_k * 8
    c_bytes = hidden * 2.0
    # sends of source s: tokens_per_gpu * sum_r P(r) over r in the relevant set
    send_intra = tokens_per_gpu * (same @ p_rank)  # [W] copies
    send_inter = tokens_per_gpu * (cross @ p_rank)
    # receives of rank r: every other source's tokens_per_gpu * P(r)
    recv_intra = tokens_per_gpu * p_rank * same.sum(axis=0)
    recv_inter = tokens_per_gpu * p_rank * cross.sum(axis=0)

    def phase(nbytes):
        t_send = np.maximum(send_intra * nbytes / intra_bw, send_inter * nbytes / inter_bw)
        t_recv = np.maximum(recv_intra * nbytes / intra_bw, recv_inter * nbytes / inter_bw)
        return 1e6 * float(np.max(np.maximum(t_send, t_recv))) + latency_us

    copies_out = send_intra + send_inter
    inter_frac = float(send_inter.sum() / copies_out.sum()) if copies_out.sum() > 0 else 0.0
    # expert (token, expert) pairs landing on each rank
    pairs = np.bincount(e2r[tokens].reshape(-1), minlength=world) / tokens.shape[0]  # per source token
    share = float(p_rank.max() / p_rank.mean()) if p_rank.mean() > 0 else 1.0
    return phase(d_bytes), phase(c_bytes), float(hit.sum(axis=1).mean()), inter_frac, share, \
        float(pairs.max() * total_tok)


def project(spec, layer_tokens: list[np.ndarray], layer_e2r: dict[str, list[np.ndarray]], nodes=(1, 2, 3, 4),
            tokens_per_gpu: int = 256, intra_bw: float | None = None, inter_bw: float = DEFAULT_INTER_BW,
            gemm_tflops: float = 400.0, dispatch_bytes: float = 2.0, latency_us: float = 10.0) -> list[Projection]:
    """Projections for every node count and placement. `layer_tokens`: per measured layer `[N, k]` ids
    (the measured layers stand in for all of the model's MoE layers, cycled); `layer_e2r[name](world)`
    must give per-layer expert->rank maps for that world size: pass {name: callable(world) -> [maps]}."""
    from moekern.models import param_counts

    if intra_bw is None:
        intra_bw = measured_intra_bw()[0] or DEFAULT_INTRA_BW
    pc = param_counts(spec)
    dense_flops = 2.0 * (pc.active - spec.num_moe_layers * spec.top_k * 3 * spec.hidden_size
                         * spec.intermediate_size - pc.embeddings / 2) * tokens_per_gpu
    dense_us = 1e6 * dense_flops / (gemm_tflops * 1e12)
    out = []
    for n in nodes:
        world = GPUS_PER_NODE * n
        for name, maps_fn in layer_e2r.items():
            try:
                maps = maps_fn(world)
            except ValueError:
                continue  # e.g. E not divisible by this world size
            res = [project_layer(t, m, world, tokens_per_gpu, spec.hidden_size, spec.top_k, intra_bw, inter_bw,
                                 dispatch_bytes, latency_us) for t, m in zip(layer_tokens, maps)]
            disp, comb, fo, inter, share, pairs = (float(np.mean([r[i] for r in res])) for i in range(6))
            gemm_us = 1e6 * pairs * 6.0 * spec.hidden_size * spec.intermediate_size / (gemm_tflops * 1e12)
            step = spec.num_moe_layers * (disp + gemm_us + comb) + dense_us
            out.append(Projection(n, world, name, disp, gemm_us, comb, dense_us, step / 1e3, fo, inter, share))
    return out


def placements_for(load_by_layer: list[np.ndarray], coact_by_layer: list[np.ndarray] | None, num_experts: int):
    """{name: world -> per-layer expert->rank maps} for contiguous, round_robin, greedy (load-balanced) and,
    with co-activation matrices, coactivation."""
    from moekern.analysis.imbalance.metrics import contiguous_map, round_robin_map
    from moekern.analysis.placement.advice import greedy_p2l
    from moekern.analysis.imbalance.coactivation import coactivation_e2r

    def from_p2l(p2l, world):
        per = p2l.size // world
        e2r = np.empty(num_experts, dtype=np.int64)
        e2r[p2l] = np.arange(p2l.size) // per
        return e2r

    out = {"contiguous": lambda w: [contiguous_map(num_experts, w) for _ in load_by_layer],
           "round_robin": lambda w: [round_robin_map(num_experts, w) for _ in load_by_layer],
           "greedy": lambda w: [from_p2l(greedy_p2l(l, w), w) for l in load_by_layer]}
    if coact_by_layer is not None:
        out["coactivation"] = lambda w: [coactivation_e2r(l, c, w) for l, c in zip(load_by_layer, coact_by_layer)]
    return out


def project_from_gate_log(path, model: str, nodes=(1, 2, 3, 4), tokens_per_gpu: int = 256, max_tokens=1000,
                          n_samples: int = 2000, combine_ranks: str = "auto", **kw) -> tuple[list[Projection], dict]:
    """Projections under the routing of the gate logs at `path` for registry `model`; (rows, info).
    Expert loads come from metrics.load_table (ranks combined per `combine_ranks`, runs pooled, steps with
    more than `max_tokens` tokens left out); sampled top-k ids, where the records carry them, set fan-out."""
    from moekern.models import get_model
    from moekern.analysis.imbalance.coactivation import load_coactivation
    from moekern.analysis.imbalance.metrics import load_table

    spec = get_model(model)
    table = load_table(path, combine_ranks=combine_ranks)
    if table.num_experts != spec.num_experts:
        raise UsageError(f"gate log has {table.num_experts} experts but model={model!r} has {spec.num_experts} "
                         f"({str(path)!r})")
    data = load_coactivation(path, max_tokens=max_tokens)
    t = table.select(table.step_mask(max_tokens))
    if not t.num_steps:
        raise UsageError(f"gate log {str(path)!r} has no step with <= {max_tokens} tokens")
    load_by_layer = np.where(t.present[..., None], t.counts, 0.0).sum(axis=0)  # [L, E]
    loads = list(load_by_layer)
    if len(loads) != len(data.layers):
        raise ValueError(f"gate log has {len(data.layers)} layers with records but {len(loads)} in the load table")
    has_sample = all(data.samples.get(l) for l in data.layers)
    if has_sample:
        toks = [data.sample_tokens(l) for l in data.layers]
        coacts = [data.coact[l] for l in data.layers]
    else:
        toks = [sample_tokens_from_load(ld, spec.top_k, n_samples, seed=i) for i, ld in enumerate(loads)]
        coacts = None
    intra = kw.pop("intra_bw", None)
    src = "argument"
    if intra is None:
        intra, src = measured_intra_bw()
        if intra is None:
            intra, src = DEFAULT_INTRA_BW, f"ASSUMED {DEFAULT_INTRA_BW / 1e9:.0f} GB/s ({src})"
    rows = project(spec, toks, placements_for(loads, coacts, spec.num_experts), nodes, tokens_per_gpu,
                   intra_bw=intra, **kw)
    info = {"model": spec.name, "routing": "topk_sample" if has_sample else "drawn from measured loads "
            "(independent choices)", "intra_bw": intra, "intra_bw_source": src,
            "inter_bw": kw.get("inter_bw", DEFAULT_INTER_BW), "tokens_per_gpu": tokens_per_gpu,
            "layers_measured": len(data.layers), "status": "PROJECTED (analytic model), not measured"}
    return rows, info


def measured_ep_rows(search_dirs=("benchmarks/results/ep",)) -> list[dict]:
    """Measured moekern.ep rows (bench_ep.py JSON) to set beside the projection, with their device."""
    out = []
    for f, obj in _result_files(search_dirs):
        for r in obj.get("results", []) if isinstance(obj, dict) else []:
            out.append({"file": str(f), "device": obj.get("device"), "bench": obj.get("bench"), **r})
    return out


def projection_plot(rows: list[Projection], title: str = "", path=None) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from moekern.analysis.plotting import fig_png

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for name in sorted({r.placement for r in rows}):
        rr = [r for r in rows if r.placement == name]
        axes[0].plot([r.gpus for r in rr], [r.step_ms for r in rr], marker="o", label=name)
        axes[1].plot([r.gpus for r in rr], [r.dispatch_us + r.combine_us for r in rr], marker="o", label=name)
    axes[0].set_ylabel("projected step time (ms)")
    axes[1].set_ylabel("dispatch + combine per layer (us)")
    for ax in axes:
        ax.set_xlabel("GPUs (8 per node)")
        ax.set_xticks(sorted({r.gpus for r in rows}))  # the projected GPU counts only, no fractional ticks
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"PROJECTED, not measured: {title}", fontsize=9)
    fig.tight_layout()
    return fig_png(fig, path, bbox_tight=False)
