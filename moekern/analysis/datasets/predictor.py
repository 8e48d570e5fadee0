"""Predict a prompt set's routing imbalance from text alone, and the shipped query corpus it builds on.

Why text predicts imbalance: a router maps similar tokens to similar experts, so a batch whose tokens are
few and repeated (one topic, one phrase, one domain) concentrates on few experts. The predictor scores a
prompt set (a dataset, or one prompt) with five components, each in [0, 1], higher = more concentrated:

- repetition: mean over prompts of 1 - unique/len of its tokens (within-prompt repetition);
- vocab_concentration: 1 - types / min(tokens, V) over the whole set (V = tokenizer vocabulary): few
  distinct tokens for the amount of text;
- entropy_concentration: 1 - H(unigram) / ln(min(tokens, V)): token distribution peaked on few tokens;
- ngram_concentration: share of all bigram occurrences taken by the 20 most frequent bigrams;
- domain_concentration: 1 - normalized entropy of the prompts' domain distribution over the corpus's
  domains (domain labels when given, else the corpus domain whose token profile is closest by cosine).

score = sum_i w_i * component_i with DEFAULT_WEIGHTS (sum 1). The weights are a prior, not fitted:
`moekern validate` measures how well the score ranks datasets by measured CV (Spearman + bootstrap CI).

Tokenizer: Mixtral-8x7B's SentencePiece model (32000 pieces), the file mistral_common/data/
tokenizer.model.v1 of the installed mistral-common package, loaded with sentencepiece. Without
mistral-common or sentencepiece it falls back to a lower-cased whitespace/punctuation tokenizer, and
`tokenizer_name` says "whitespace-fallback" so every output reports it.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources

import numpy as np

DEFAULT_WEIGHTS = {"repetition": 0.2, "vocab_concentration": 0.2, "entropy_concentration": 0.2,
                   "ngram_concentration": 0.15, "domain_concentration": 0.25}
TOP_BIGRAMS = 20
FALLBACK_VOCAB = 32000


# ------------------------------------------------------------------------------------------------ corpus
@lru_cache(maxsize=1)
def load_corpus() -> dict[str, tuple[str, ...]]:
    """The shipped query corpus: {domain: (query, ...)} (25 domains x 50 queries, moekern/data)."""
    text = resources.files("moekern").joinpath("data/query_corpus.txt").read_text(encoding="utf-8")
    out: dict[str, list[str]] = {}
    domain = None
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("## "):
            domain = line[3:].strip()
            out[domain] = []
        elif line and not line.startswith("#") and domain is not None:
            out[domain].append(line)
    return {k: tuple(v) for k, v in out.items()}


# --------------------------------------------------------------------------------------------- tokenizer
class Tokenizer:
    """Mixtral's SentencePiece tokenizer, or a whitespace fallback; `encode(text) -> list[int]`."""

    def __init__(self, force_fallback: bool = False):
        self.name = "whitespace-fallback"
        self.vocab_size = FALLBACK_VOCAB
        self.reason = "forced" if force_fallback else ""
        self._sp = None
        self._ws_vocab: dict[str, int] = {}
        if not force_fallback:
            try:
                import sentencepiece as spm
                import mistral_common

                path = resources.files(mistral_common).joinpath("data/tokenizer.model.v1")
                self._sp = spm.SentencePieceProcessor(model_file=str(path))
                self.vocab_size = int(self._sp.get_piece_size())
                self.name = "mixtral-8x7b-sentencepiece(mistral_common/data/tokenizer.model.v1)"
            except (ImportError, OSError, RuntimeError) as exc:
                self.reason = f"{type(exc).__name__}: {exc}"

    @property
    def is_fallback(self) -> bool:
        return self._sp is None

    def encode(self, text: str) -> list[int]:
        if self._sp is not None:
            return list(self._sp.encode(text))
        ids = []
        for w in re.findall(r"\w+|[^\w\s]", text.lower()):
            ids.append(self._ws_vocab.setdefault(w, len(self._ws_vocab)))
        return ids


@lru_cache(maxsize=2)
def get_tokenizer(force_fallback: bool = False) -> Tokenizer:
    return Tokenizer(force_fallback)


# --------------------------------------------------------------------------------------------- predictor
@dataclass
class Prediction:
    """A predicted imbalance `score` in [0, 1] with its `components` (each in [0, 1]) and weights."""

    score: float
    components: dict[str, float]
    weights: dict[str, float]
    num_prompts: int
    num_tokens: int
    tokenizer: str
    domain_counts: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"score": self.score, "components": self.components, "weights": self.weights,
                "num_prompts": self.num_prompts, "num_tokens": self.num_tokens, "tokenizer": self.tokenizer,
                "domain_counts": self.domain_counts}


class ImbalancePredictor:
    """Scores prompt sets by predicted routing imbalance (see module docstring).

    `predict(prompts, domains=None) -> Prediction`; `prompts: list[str]`, `domains: list[str] | None`.
    """

    def __init__(self, weights: dict[str, float] | None = None, tokenizer: Tokenizer | None = None,
                 force_fallback: bool = False):
        self.weights = dict(DEFAULT_WEIGHTS if weights is None else weights)
        unknown = set(self.weights) - set(DEFAULT_WEIGHTS)
        if unknown:
            raise ValueError(f"weights has unknown components {sorted(unknown)}; known: {list(DEFAULT_WEIGHTS)}")
        total = sum(self.weights.values())
        if total <= 0 or any(w < 0 for w in self.weights.values()):
            raise ValueError(f"weights must be non-negative with a positive sum; got {self.weights}")
        self.weights = {k: v / total for k, v in self.weights.items()}
        self.tokenizer = tokenizer or get_tokenizer(force_fallback)
        self._profiles = None

    def _domain_profiles(self):
        """TF-IDF token profiles of the corpus domains: tokens common to every domain ("What", "is", "?")
        get weight ~0, so the profile is the domain's own vocabulary."""
        if self._profiles is None:
            corpus = load_corpus()
            names = list(corpus)
            tfs = [Counter(t for q in corpus[d] for t in self.tokenizer.encode(q)) for d in names]
            df = Counter(t for tf in tfs for t in tf)
            idf = {t: math.log(len(names) / n) for t, n in df.items()}
            vecs = []
            for tf in tfs:
                v = {t: c * idf[t] for t, c in tf.items() if idf[t] > 0}
                vecs.append((v, math.sqrt(sum(x * x for x in v.values())) or 1.0))
            self._profiles = (names, vecs, idf)
        return self._profiles

    def classify_domain(self, prompt: str, tokens: list[int] | None = None) -> str:
        """The corpus domain whose TF-IDF token profile is closest (cosine) to `prompt`'s tokens."""
        names, vecs, idf = self._domain_profiles()
        toks = Counter(tokens if tokens is not None else self.tokenizer.encode(prompt))
        q = {t: c * idf[t] for t, c in toks.items() if idf.get(t, 0.0) > 0}
        best, best_sim = names[0], -1.0
        for name, (prof, norm) in zip(names, vecs):
            sim = sum(v * prof.get(t, 0.0) for t, v in q.items()) / norm
            if sim > best_sim:  # strict: ties go to the earlier domain
                best, best_sim = name, sim
        return best

    def predict(self, prompts: list[str], domains: list[str] | None = None) -> Prediction:
        if isinstance(prompts, str):
            prompts = [prompts]
        if not prompts:
            raise ValueError("prompts must be a non-empty list of strings")
        if domains is not None and len(domains) != len(prompts):
            raise ValueError(f"domains has {len(domains)} entries; expected one per prompt ({len(prompts)})")
        token_lists = [self.tokenizer.encode(p) for p in prompts]
        all_tokens = [t for tl in token_lists for t in tl]
        n = len(all_tokens)
        comps: dict[str, float] = {}
        reps = [1.0 - len(set(tl)) / len(tl) for tl in token_lists if tl]
        comps["repetition"] = float(np.mean(reps)) if reps else 0.0
        counts = Counter(all_tokens)
        cap = min(n, self.tokenizer.vocab_size)
        comps["vocab_concentration"] = 1.0 - len(counts) / cap if cap > 1 else 1.0
        if cap > 1:
            p = np.array(list(counts.values()), dtype=np.float64) / n
            comps["entropy_concentration"] = float(1.0 - (-(p * np.log(p)).sum()) / math.log(cap))
        else:
            comps["entropy_concentration"] = 1.0
        bigrams = Counter(b for tl in token_lists for b in zip(tl, tl[1:]))
        nb = sum(bigrams.values())
        comps["ngram_concentration"] = (sum(c for _, c in bigrams.most_common(TOP_BIGRAMS)) / nb) if nb else 1.0
        if domains is None:
            domains = [self.classify_domain(p, tl) for p, tl in zip(prompts, token_lists)]
        dcounts = Counter(domains)
        ndom = len(load_corpus())
        if ndom > 1:
            q = np.array(list(dcounts.values()), dtype=np.float64) / len(domains)
            comps["domain_concentration"] = float(1.0 - (-(q * np.log(q)).sum()) / math.log(ndom))
        else:
            comps["domain_concentration"] = 1.0
        comps = {k: float(min(1.0, max(0.0, v))) for k, v in comps.items()}
        score = sum(self.weights.get(k, 0.0) * v for k, v in comps.items())
        return Prediction(float(score), comps, dict(self.weights), len(prompts), n, self.tokenizer.name,
                          dict(dcounts))


def read_prompts(path, skipped: list | None = None) -> tuple[list[str], list[str] | None]:
    """Prompts (and domains when every line has one) of a JSONL dataset ({"prompt": ...} per line) or a
    plain-text file (one prompt per line). A JSONL line that is not JSON, or not an object with a string
    "prompt", is left out and, when `skipped` (a list) is given, reported there as (line number, reason)."""
    import json
    from pathlib import Path

    p = Path(path)
    prompts, domains = [], []
    with open(p, encoding="utf-8") as fh:
        for i, line in enumerate(fh, 1):
            line = line.strip()
            if not line:
                continue
            if p.suffix == ".jsonl":
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    if skipped is not None:
                        skipped.append((i, f"not JSON ({exc.msg})"))
                    continue
                if isinstance(obj, dict) and isinstance(obj.get("prompt"), str):
                    prompts.append(obj["prompt"])
                    domains.append(obj.get("domain"))
                elif skipped is not None:
                    skipped.append((i, 'not an object with a string "prompt"'))
            else:
                prompts.append(line)
                domains.append(None)
    return prompts, (domains if domains and all(isinstance(d, str) for d in domains) else None)
