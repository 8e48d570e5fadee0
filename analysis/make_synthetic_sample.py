"""Generate the SYNTHETIC sample under moekern/data/synthetic_results/ (tests with known effects).

Nothing here is measured: gate logs are drawn by moekern.analysis.datasets.synthetic with a skew tied to each
dataset's predicted score, and serving numbers come from a made-up model (TPOT grows with batch size and
with imbalance, EPLB trims it, lognormal noise, a few injected outliers). Every file is marked
"synthetic": true. It is kept because some tests need KNOWN effects (the learned serving predictor must
find the throughput trend; the report's trend plots, IQR filter and CIs need a grid of runs): the
shipped real sample (moekern/data/sample_results, one H100 run) has two runs and no grid.

    python analysis/make_synthetic_sample.py [--out moekern/data/synthetic_results] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np

from moekern.analysis.datasets.generate import generate_datasets
from moekern.analysis.imbalance.metrics import load_table, summarize
from moekern.analysis.datasets.synthetic import write_synthetic_gate_log

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "moekern/data/synthetic_results"))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    (out / "runs").mkdir(parents=True)
    rng = np.random.default_rng(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        infos = generate_datasets(4, tmp, seed=args.seed, prompts_per_dataset=40)
    datasets = [infos[0], infos[1], infos[-2]]
    cvs = {}
    for i, info in enumerate(datasets):
        skew = 0.15 + 0.5 * info.score  # synthetic link: more concentrated text -> more skewed routing
        g = write_synthetic_gate_log(out / "gate_logs" / f"ds{i}" / "gate_log.rank0.jsonl", num_steps=24,
                                     num_layers=6, num_experts=16, top_k=2, tokens_per_step=96, skew=skew,
                                     seed=args.seed + i)
        cvs[i] = summarize(load_table(g.parent)).overall["step_cv"]
    base = {"moekern": 11.0, "vllm": 12.5}
    n = 0
    for backend in base:
        for seqs in (8, 16, 32, 64):
            for tokens in (2048, 8192):
                for eplb in (False, True):
                    for i, info in enumerate(datasets):
                        tpot = base[backend] * (1 + 0.012 * seqs) * (1 + 0.35 * cvs[i]) * (0.93 if eplb else 1.0)
                        tpot *= float(rng.lognormal(0, 0.05))
                        ttft = (40 + 0.004 * tokens + 1.5 * seqs) * (1 + 0.2 * cvs[i]) * float(rng.lognormal(0, 0.08))
                        if rng.random() < 0.04:  # injected outliers so the report's IQR filter has work to do
                            tpot *= 3.0
                        thr = seqs * 1000.0 / tpot
                        obj = {"synthetic": True, "backend": "vllm", "model_id": "mistralai/Mixtral-8x7B-v0.1",
                               "num_prompts": 200, "duration": 60.0, "completed": 200, "failed": 0,
                               "total_input_tokens": 200 * 40, "total_output_tokens": int(thr * 60),
                               "request_throughput": 200 / 60.0, "output_throughput": thr,
                               "total_token_throughput": thr + 200 * 40 / 60.0,
                               "mean_ttft_ms": ttft, "median_ttft_ms": ttft * 0.95, "p99_ttft_ms": ttft * 1.8,
                               "mean_tpot_ms": tpot, "median_tpot_ms": tpot * 0.98, "p99_tpot_ms": tpot * 1.4,
                               "mean_itl_ms": tpot, "median_itl_ms": tpot * 0.97, "p99_itl_ms": tpot * 1.6,
                               "moekern": {"moe_backend": backend, "max_num_seqs": seqs,
                                           "max_num_batched_tokens": tokens, "eplb": eplb,
                                           "dataset": Path(info.path).name, "predicted_score": info.score,
                                           "gate_log": f"../gate_logs/ds{i}"}}
                        if n % 17 == 5:
                            obj.pop("p99_itl_ms")  # missing fields must be tolerated
                        name = f"{backend}_s{seqs}_b{tokens}_eplb{int(eplb)}_ds{i}.json"
                        (out / "runs" / name).write_text(json.dumps(obj, indent=1), encoding="utf-8")
                        n += 1
    (out / "metadata.json").write_text(json.dumps({
        "synthetic": True, "title": "moekern sample report (SYNTHETIC data)", "ep_size": 4,
        "description": "SYNTHETIC sample made by analysis/make_synthetic_sample.py: not measured. "
                       "It exists for tests that need known effects; the real sample is moekern/data/sample_results.",
        "generator": "analysis/make_synthetic_sample.py", "seed": args.seed}, indent=1), encoding="utf-8")
    (out / "README.md").write_text(
        "# SYNTHETIC sample results\n\nThese files are **synthetic**: made by `analysis/make_synthetic_sample.py` "
        "(seed %d), not measured on any GPU. They exist for tests that need known effects "
        "(a grid of runs with a built-in imbalance -> latency link). The real sample is moekern/data/sample_results "
        "(one H100 run).\n\n"
        "- runs/*.json: bench-result-shaped JSON (vLLM `--save-result` keys + a `moekern` metadata block)\n"
        "- gate_logs/ds*/gate_log.rank0.jsonl: moekern.gatelog/1 logs (16 experts, 6 layers, 24 steps + 1 "
        "warm-up step of 4096 tokens that the default filter drops)\n" % args.seed, encoding="utf-8")
    print(f"wrote {n} synthetic runs and {len(datasets)} gate logs to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
