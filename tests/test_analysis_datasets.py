"""Query corpus, ImbalancePredictor (real Mixtral tokenizer and fallback), dataset generation (naming,
determinism, score spread) and `validate` on synthetic gate logs."""

import json
import re

import numpy as np
import pytest

from moekern.analysis.datasets.generate import generate_datasets
from moekern.analysis.datasets.predictor import DEFAULT_WEIGHTS, ImbalancePredictor, get_tokenizer, load_corpus, read_prompts
from moekern.analysis.datasets.synthetic import write_synthetic_gate_log
from moekern.analysis.datasets.validate import validate


def test_corpus_shape():
    corpus = load_corpus()
    assert len(corpus) == 25
    assert all(len(qs) == 50 for qs in corpus.values())
    all_q = [q for qs in corpus.values() for q in qs]
    assert len(set(all_q)) == len(all_q)  # no duplicate queries


def test_mixtral_tokenizer_is_used():
    pytest.importorskip("mistral_common")
    pytest.importorskip("sentencepiece")
    tok = get_tokenizer()
    assert not tok.is_fallback and tok.vocab_size == 32000 and "mixtral" in tok.name
    assert tok.encode("Hello world") == [22557, 1526]  # Llama/Mistral SentencePiece ids


def test_predictor_components_and_ordering():
    pred = ImbalancePredictor()
    corpus = load_corpus()
    mixed = [qs[i] for i in range(4) for qs in corpus.values()]  # 100 prompts, all 25 domains
    narrow = [corpus["cooking"][0] + " " + corpus["cooking"][0]] * 100  # one repeated prompt
    pm, pn = pred.predict(mixed), pred.predict(narrow, ["cooking"] * 100)
    assert set(pm.components) == set(DEFAULT_WEIGHTS)
    for p in (pm, pn):
        assert all(0.0 <= v <= 1.0 for v in p.components.values())
        assert p.score == pytest.approx(sum(p.weights[k] * v for k, v in p.components.items()))
    assert pn.score > pm.score + 0.3
    assert pn.components["domain_concentration"] == pytest.approx(1.0)
    assert pm.components["domain_concentration"] < 0.05  # 25 domains, evenly
    assert pn.components["repetition"] > 0.4 and pm.components["repetition"] < pn.components["repetition"]


def test_domain_classification_without_labels():
    pred = ImbalancePredictor()
    assert pred.classify_domain("How do I make a pie crust flaky with cold butter?") == "cooking"
    assert pred.classify_domain("Why is my SQL join query slow even with an index on the column?") == "databases"


def test_fallback_tokenizer_reports_itself():
    pred = ImbalancePredictor(force_fallback=True)
    p = pred.predict(["a b a b", "c d"])
    assert p.tokenizer == "whitespace-fallback"
    assert p.components["repetition"] == pytest.approx((0.5 + 0.0) / 2)


def test_bad_predictor_inputs():
    with pytest.raises(ValueError, match="unknown components"):
        ImbalancePredictor(weights={"nope": 1.0})
    with pytest.raises(ValueError, match="non-empty"):
        ImbalancePredictor().predict([])
    with pytest.raises(ValueError, match="one per prompt"):
        ImbalancePredictor().predict(["a", "b"], ["cooking"])


def test_generate_naming_determinism_and_spread(tmp_path):
    a = generate_datasets(8, tmp_path / "a", seed=3, prompts_per_dataset=30)
    b = generate_datasets(8, tmp_path / "b", seed=3, prompts_per_dataset=30)
    c = generate_datasets(8, tmp_path / "c", seed=4, prompts_per_dataset=30)
    names = sorted(p.name for p in (tmp_path / "a").glob("*.jsonl"))
    assert len(names) == 8
    for i, (name, info) in enumerate(zip(names, a)):
        assert re.fullmatch(r"\d{3}_\d\.\d{4}\.jsonl", name)
        assert name == f"{i:03d}_{info.score:.4f}.jsonl"
    for x, y in zip(a, b):
        assert open(x.path).read() == open(y.path).read()
    assert any(open(x.path).read() != open(z.path).read() for x, z in zip(a, c))
    scores = np.array([i.score for i in a])
    assert scores.max() - scores.min() > 0.3  # a wide spread
    intens = np.array([i.intensity for i in a])
    assert np.corrcoef(intens, scores)[0, 1] > 0.7  # controlled by the intensity knob
    line = json.loads(open(a[0].path).readline())
    assert set(line) >= {"prompt", "domain", "prompt_len"} and line["prompt_len"] > 0
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert manifest["num"] == 8 and "mixtral" in manifest["tokenizer"]
    prompts, domains = read_prompts(a[0].path)
    assert len(prompts) == 30 and domains is not None
    with pytest.raises(ValueError, match="num"):
        generate_datasets(0, tmp_path / "d")


def test_validate_on_synthetic_logs(tmp_path):
    ds = tmp_path / "ds"
    infos = generate_datasets(6, ds, seed=0, prompts_per_dataset=20)
    logs = tmp_path / "logs"
    for info in infos:
        stem = info.path.rsplit("/", 1)[-1][:-6]
        # synthetic ground truth: routing skew rises with the predicted score
        write_synthetic_gate_log(logs / stem / "gate_log.rank0.jsonl", num_steps=12, num_layers=2, num_experts=8,
                                 skew=0.1 + 0.8 * info.score, seed=1)
    # one dataset without logs is reported, not fatal
    (ds / "099_0.5000.jsonl").write_text(json.dumps({"prompt": "x"}) + "\n")
    res = validate(ds, logs, n_boot=200)
    assert len(res.pairs) == 6 and res.unmatched == ["099_0.5000"]
    assert res.rho.value > 0.7 and res.rho.low <= res.rho.value <= res.rho.high
    # shuffled ground truth: no longer a strong positive rank correlation
    logs2 = tmp_path / "logs2"
    order = [3, 0, 5, 1, 4, 2]
    for info, j in zip(infos, order):
        stem = info.path.rsplit("/", 1)[-1][:-6]
        write_synthetic_gate_log(logs2 / stem / "gate_log.rank0.jsonl", num_steps=12, num_layers=2, num_experts=8,
                                 skew=0.1 + 0.8 * infos[j].score, seed=1)
    assert validate(ds, logs2, n_boot=50).rho.value < res.rho.value


def test_cli_generate_predict_and_metrics_json(tmp_path, capsys):
    from moekern.cli import main

    assert main(["datasets", "generate", "--num", "2", "--out", str(tmp_path / "d"), "--seed", "1",
                 "--prompts", "10"]) == 0
    files = sorted((tmp_path / "d").glob("*.jsonl"))
    assert len(files) == 2 and "tokenizer: mixtral" in capsys.readouterr().out
    assert main(["predict", "--json", *map(str, files)]) == 0
    res = json.loads(capsys.readouterr().out)
    for f in files:  # the file name carries the same score the predictor gives
        assert f"{res[str(f)]['score']:.4f}" == f.stem.split("_")[1]
        assert set(res[str(f)]["components"]) == set(DEFAULT_WEIGHTS)
    log = write_synthetic_gate_log(tmp_path / "g" / "gate_log.rank0.jsonl", num_steps=5, num_experts=8, skew=1.0)
    assert main(["metrics", str(log.parent), "--json", "--ep-size", "2"]) == 0
    out = json.loads(capsys.readouterr().out)  # strict JSON even with an infinite max/min
    assert out["steps_dropped"] == 1  # the synthetic 4096-token warm-up step
    assert out["overall"]["step_max_min"] == "inf"  # idle experts under heavy skew (seeded, deterministic)
    assert out["rank_load"]["ep_size"] == 2
