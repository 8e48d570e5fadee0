"""Prompt datasets with a wide, controlled spread of predicted routing imbalance.

`generate_datasets(num, out_dir, seed)` writes `num` JSONL files named `{index:03d}_{score:.4f}.jsonl`
(score = ImbalancePredictor score of the file's prompts) plus `manifest.json`. Each line is a vLLM
custom-dataset prompt (`vllm bench serve --dataset-name custom --dataset-path FILE`):

    {"prompt": "...", "domain": "cooking", "prompt_len": 23, "strategy": "domain_mixing"}

(prompt_len counts tokens of the predictor's tokenizer; the manifest says which tokenizer.)

Dataset i gets an intensity t = i / (num - 1) in [0, 1] and a strategy cycling through STRATEGIES; t
sets how concentrated the text is, so scores spread from a 25-domain mix (t = 0) to one repeated phrase
(t = 1):
- domain_mixing: queries from round(25 ** (1 - t)) domains, 1-2 per prompt;
- single_domain_repetition: few domains, a query pool shrinking with t, each query repeated 1 + 3t times;
- ngram_concentration: every prompt carries one fixed phrase of the domain, repeated round(6t) times;
- length_variation: prompts concatenate 1 .. 1 + 8t queries of the chosen domains (long same-topic text).
Deterministic under `seed` (numpy Generator per dataset, seeded from (seed, index)).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from moekern.analysis.datasets.predictor import ImbalancePredictor, load_corpus
from moekern.errors import UsageError

STRATEGIES = ("domain_mixing", "single_domain_repetition", "ngram_concentration", "length_variation")


@dataclass
class DatasetInfo:
    index: int
    path: str
    strategy: str
    intensity: float
    num_domains: int
    score: float
    components: dict


def _prompts_for(strategy: str, t: float, n: int, rng: np.random.Generator) -> list[tuple[str, str]]:
    corpus = load_corpus()
    names = sorted(corpus)
    k = max(1, int(round(len(names) ** (1.0 - t))))
    doms = [names[i] for i in rng.choice(len(names), size=k, replace=False)]
    out: list[tuple[str, str]] = []
    if strategy == "domain_mixing":
        for _ in range(n):
            d = doms[rng.integers(len(doms))]
            qs = corpus[d]
            m = 1 + int(rng.integers(2))
            out.append((" ".join(qs[j] for j in rng.choice(len(qs), size=m, replace=False)), d))
    elif strategy == "single_domain_repetition":
        pool_size = max(1, int(round(50 * (1.0 - t) ** 2)))
        pools = {d: [corpus[d][j] for j in rng.choice(len(corpus[d]), size=pool_size, replace=False)] for d in doms}
        reps = 1 + int(round(3 * t))
        for _ in range(n):
            d = doms[rng.integers(len(doms))]
            q = pools[d][rng.integers(len(pools[d]))]
            out.append((" ".join([q] * reps), d))
    elif strategy == "ngram_concentration":
        phrases = {}
        for d in doms:
            words = corpus[d][rng.integers(len(corpus[d]))].rstrip("?.!").split()
            phrases[d] = " ".join(words[: min(len(words), 5)])
        reps = int(round(6 * t))
        for _ in range(n):
            d = doms[rng.integers(len(doms))]
            q = corpus[d][rng.integers(len(corpus[d]))]
            out.append(((" ".join([phrases[d]] * reps) + " " + q).strip(), d))
    elif strategy == "length_variation":
        max_parts = 1 + int(round(8 * t))
        for _ in range(n):
            d = doms[rng.integers(len(doms))]
            qs = corpus[d]
            m = 1 + int(rng.integers(max_parts))
            out.append((" ".join(qs[j] for j in rng.choice(len(qs), size=min(m, len(qs)), replace=False)), d))
    else:
        raise ValueError(f"strategy={strategy!r} must be one of {STRATEGIES}")
    return out


def generate_datasets(num: int, out_dir: str | os.PathLike, seed: int = 0, prompts_per_dataset: int = 100,
                      strategies=STRATEGIES, predictor: ImbalancePredictor | None = None) -> list[DatasetInfo]:
    """Write `num` datasets to `out_dir` (see module docstring); returns their DatasetInfo, index order."""
    if num < 1:
        raise UsageError(f"num={num} must be >= 1")
    if prompts_per_dataset < 1:
        raise ValueError(f"prompts_per_dataset={prompts_per_dataset} must be >= 1")
    for s in strategies:
        if s not in STRATEGIES:
            raise ValueError(f"strategy={s!r} must be one of {STRATEGIES}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pred = predictor or ImbalancePredictor()
    infos = []
    for i in range(num):
        t = i / (num - 1) if num > 1 else 0.5
        strategy = strategies[i % len(strategies)]
        rng = np.random.default_rng([seed, i])
        rows = _prompts_for(strategy, t, prompts_per_dataset, rng)
        p = pred.predict([r[0] for r in rows], [r[1] for r in rows])
        path = out / f"{i:03d}_{p.score:.4f}.jsonl"
        for old in out.glob(f"{i:03d}_*.jsonl"):  # a re-run with other settings must not leave two files
            if old != path:
                old.unlink()
        with open(path, "w", encoding="utf-8") as fh:
            for prompt, dom in rows:
                fh.write(json.dumps({"prompt": prompt, "domain": dom,
                                     "prompt_len": len(pred.tokenizer.encode(prompt)), "strategy": strategy}) + "\n")
        infos.append(DatasetInfo(i, str(path), strategy, t, len({d for _, d in rows}), p.score, p.components))
    manifest = {"seed": seed, "num": num, "prompts_per_dataset": prompts_per_dataset,
                "tokenizer": pred.tokenizer.name, "weights": pred.weights,
                "datasets": [{**info.__dict__, "path": Path(info.path).name} for info in infos]}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1), encoding="utf-8")
    return infos
