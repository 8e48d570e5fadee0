"""`moekern diffusion bench`: masked-diffusion generation speed and routing imbalance vs (L, B, S, batch), per
MoE backend, with the autoregressive decode of the same model as a baseline.

What is measured, per (backend, gen_length L, block_length B, steps S, batch N):
  - tokens/s = N * L / (sum of the S step times); each step is timed from before its forward to after a
    device synchronize that follows the token commit (wall clock around a synced step);
  - per-step latency: median / p10 / p90 over the S steps;
  - FFN (MoE) time share = sum of the FFN times / sum of the step times. The FFN of each layer (router GEMM,
    routing, experts, combine) is bracketed by CUDA events on a GPU (perf_counter on a CPU, where the
    number measures PyTorch CPU ops or the Triton interpreter, not kernels);
  - routing imbalance per denoising step: CV (moekern.analysis.imbalance.metrics.cv, population std / mean) of each
    MoE layer's expert counts, averaged over layers, plus the run's summary (metrics.summarize).
Before each timed run an untimed warm-up with the same forward shapes (S = number of blocks) compiles
Triton kernels. The AR baseline (generate.ar_generate: causal attention, one token per forward, no KV
cache) runs once per (backend, L, N).

RANDOM WEIGHTS. Kernel and step timings are meaningful: the FLOPs, bytes and shapes are the real model's
(at full size). Routing statistics are NOT: a random router spreads tokens almost uniformly, so the CV here
says nothing about a trained LLaDA-MoE's imbalance (load a checkpoint with --checkpoint for that). The
generated tokens are noise too.
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from moekern.diffusion.generate import GenerationResult, ar_generate, generate, validate_generation_args
from moekern.diffusion.model import DiffusionModel, moe_backend_unavailable_reason

RANDOM_WEIGHTS_NOTE = ("random weights: kernel/step timings are meaningful (real shapes); routing imbalance "
                       "of a random router says nothing about a trained model's; generated tokens are noise")


@dataclass(frozen=True)
class BenchCase:
    gen_length: int
    block_length: int
    steps: int
    batch: int

    @property
    def label(self) -> str:
        return f"L{self.gen_length}-B{self.block_length}-S{self.steps}-N{self.batch}"


def make_cases(gen_lengths, block_lengths, steps_list, batches) -> tuple[list[BenchCase], list[str]]:
    """The valid (L, B, S, N) combinations, and a note for each invalid one (skipped, with the reason)."""
    cases, skipped = [], []
    for L in gen_lengths:
        for B in block_lengths:
            for S in steps_list:
                for N in batches:
                    try:
                        validate_generation_args(L, B, S)
                    except ValueError as exc:
                        skipped.append(f"L={L} B={B} S={S}: {exc}")
                        continue
                    cases.append(BenchCase(L, B, S, N))
    return cases, sorted(set(skipped))


def random_prompts(model: DiffusionModel, batch: int, prompt_length: int, seed: int) -> torch.Tensor:
    """[batch, prompt_length] int64 ids in [0, V) without the mask id."""
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.vocab_size - 1, (batch, prompt_length), generator=g)
    return torch.where(ids >= cfg.mask_id, ids + 1, ids)


def _step_stats(res: GenerationResult, batch: int, gen_length: int) -> dict:
    secs = np.array([s.seconds for s in res.steps])
    ffn = np.array([s.ffn_seconds for s in res.steps])
    total = float(secs.sum())
    row = {"tokens_per_s": batch * gen_length / total if total > 0 else float("nan"),
           "total_s": total, "num_forwards": len(secs),
           "step_ms_median": float(np.median(secs) * 1e3), "step_ms_p10": float(np.percentile(secs, 10) * 1e3),
           "step_ms_p90": float(np.percentile(secs, 90) * 1e3),
           "ffn_share": float(ffn.sum() / total) if total > 0 else float("nan"),
           "ffn_ms_per_step": float(ffn.mean() * 1e3)}
    counts = [s.expert_counts for s in res.steps if s.expert_counts is not None]
    if counts:
        from moekern.analysis.imbalance import metrics

        arr = torch.stack(counts).numpy().astype(np.float64)  # [S, layers, E]
        cv = metrics.cv(arr)  # [S, layers]
        row["cv_per_step"] = [float(x) for x in np.nanmean(cv, axis=1)]
        table = metrics.table_from_counts(arr, num_tokens=[s.num_tokens for s in res.steps])
        row["imbalance"] = metrics.summarize(table, max_tokens=None).overall
    return row


def _env_info(device: torch.device) -> dict:
    info = {"torch": torch.__version__, "python": platform.python_version(), "device": str(device)}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    for mod in ("triton", "vllm"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:
            info[mod] = None
    return info


def run_bench(model: DiffusionModel, cases: list[BenchCase], *, backends=("moekern", "vllm", "torch"),
              kernels: str = "auto", prompt_length: int = 64, ar: bool = True, seed: int = 0,
              temperature: float = 0.0, log=print, gate_log_dir=None) -> dict:
    """Time every case on every available backend (unavailable ones are recorded as skipped with the
    reason). Returns the JSON-able result dict (see the module docstring). With `gate_log_dir`, each timed
    diffusion run's gate records go to gate_log_dir/<backend>_<label>/gate_log.rank0.jsonl (phase
    "diffusion"), the input of moekern.diffusion.compare."""
    dev = model.device
    cfg = model.config
    out = {"note": RANDOM_WEIGHTS_NOTE, "env": _env_info(dev), "config": asdict(cfg),
           "dtype": str(model.dtype).replace("torch.", ""), "prompt_length": prompt_length, "kernels": kernels,
           "temperature": temperature, "diffusion": [], "ar": [], "skipped": []}
    if not cfg.is_moe:
        backends = ("dense",)
    for backend in backends:
        if backend != "dense":
            reason = moe_backend_unavailable_reason(backend, dev, kernels)
            if reason is not None:
                out["skipped"].append(f"backend={backend}: skipped: {reason}")
                log(f"[diffusion bench] backend={backend}: skipped: {reason}")
                continue
        mb = "torch" if backend == "dense" else backend
        ar_done = set()
        for case in cases:
            prompts = random_prompts(model, case.batch, prompt_length, seed)
            kw = dict(gen_length=case.gen_length, block_length=case.block_length, temperature=temperature,
                      seed=seed, moe_backend=mb, kernels=kernels)
            nblocks = case.gen_length // case.block_length
            generate(model, prompts, steps=nblocks, record_counts=False, **kw)  # warm-up, same shapes
            res = generate(model, prompts, steps=case.steps, time_steps=True, **kw)
            row = {"backend": backend, **asdict(case), "label": case.label, **_step_stats(res, case.batch,
                                                                                          case.gen_length)}
            if gate_log_dir is not None and cfg.is_moe:
                from moekern.diffusion.generate import write_gate_log

                gpath = Path(gate_log_dir) / f"{backend}_{case.label}" / "gate_log.rank0.jsonl"
                gpath.parent.mkdir(parents=True, exist_ok=True)
                gpath.unlink(missing_ok=True)
                write_gate_log(res, gpath, cfg.top_k, model=cfg.name)
                row["gate_log"] = str(gpath)
            out["diffusion"].append(row)
            log(f"[diffusion bench] {backend:8s} {case.label:24s} {row['tokens_per_s']:10.1f} tok/s  "
                f"step {row['step_ms_median']:8.2f} ms  ffn share {row['ffn_share']:.2f}")
            key = (case.gen_length, case.batch)
            if ar and key not in ar_done:
                ar_done.add(key)
                akw = dict(gen_length=case.gen_length, temperature=temperature, seed=seed, moe_backend=mb,
                           kernels=kernels)
                # Warm-up over every prefix length: Triton may pick (and compile) other tile configs as the
                # token count grows; the torch path compiles nothing, so a short warm-up does there.
                warm = case.gen_length if backend in ("moekern", "vllm") else min(4, case.gen_length)
                ar_generate(model, prompts, record_counts=False, **{**akw, "gen_length": warm})
                ares = ar_generate(model, prompts, time_steps=True, **akw)
                arow = {"backend": backend, "gen_length": case.gen_length, "batch": case.batch,
                        "label": f"AR-L{case.gen_length}-N{case.batch}",
                        **_step_stats(ares, case.batch, case.gen_length)}
                arow.pop("cv_per_step", None)
                out["ar"].append(arow)
                log(f"[diffusion bench] {backend:8s} {arow['label']:24s} {arow['tokens_per_s']:10.1f} tok/s  "
                    f"step {arow['step_ms_median']:8.2f} ms  ffn share {arow['ffn_share']:.2f}  (AR, no KV cache)")
    return out


def write_results(result: dict, out_dir, tag: str = "diffusion") -> list[Path]:
    """Write <tag>.json and PNG plots (throughput, FFN share, CV per step) into out_dir; returns the paths."""
    d = Path(out_dir)
    d.mkdir(parents=True, exist_ok=True)
    paths = [d / f"{tag}.json"]
    paths[0].write_text(json.dumps(result, indent=1, default=float), encoding="utf-8")
    rows = result["diffusion"]
    if not rows:
        return paths
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    backends = sorted({r["backend"] for r in rows})
    labels = list(dict.fromkeys(r["label"] for r in rows))
    ar_labels = list(dict.fromkeys(r["label"] for r in result["ar"]))
    all_labels = labels + ar_labels
    width = 0.8 / len(backends)
    for metric, fname, ylabel in (("tokens_per_s", "throughput", "generated tokens / s"),
                                  ("ffn_share", "ffn_share", "FFN (MoE) share of step time")):
        fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(all_labels) * len(backends)), 4))
        for j, b in enumerate(backends):
            vals = {r["label"]: r[metric] for r in rows + result["ar"] if r["backend"] == b}
            xs = [i + j * width for i in range(len(all_labels))]
            ax.bar(xs, [vals.get(lab, 0.0) for lab in all_labels], width, label=b)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(all_labels))])
        ax.set_xticklabels(all_labels, rotation=45, ha="right", fontsize=7)
        ax.set_ylabel(ylabel)
        if metric == "tokens_per_s":
            ax.set_yscale("log")
        ax.set_title(f"{result['config']['name']} ({result['dtype']}, {result['env'].get('gpu') or 'CPU'}); "
                     "AR = causal, no KV cache", fontsize=8)
        ax.legend(fontsize=7)
        fig.tight_layout()
        p = d / f"{tag}_{fname}.png"
        fig.savefig(p, dpi=120)
        plt.close(fig)
        paths.append(p)
    cv_rows = [r for r in rows if r.get("cv_per_step")]
    if cv_rows:
        first = cv_rows[0]["backend"]
        fig, ax = plt.subplots(figsize=(7, 4))
        for r in cv_rows:
            if r["backend"] == first:
                ax.plot(r["cv_per_step"], label=r["label"], lw=1)
        ax.set_xlabel("denoising step")
        ax.set_ylabel("CV of expert counts (mean over layers)")
        ax.set_title("routing imbalance per denoising step -- RANDOM WEIGHTS: says nothing about trained "
                     "models", fontsize=8)
        ax.legend(fontsize=6)
        fig.tight_layout()
        p = d / f"{tag}_cv_per_step.png"
        fig.savefig(p, dpi=120)
        plt.close(fig)
        paths.append(p)
    return paths
