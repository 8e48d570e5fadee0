"""`moekern recommend`, `predict` and `validate` on small inputs: a gate log is used (and one of another
model refused), a predictor that gives every layout the same throughput does not rank them, bad prompt
lines are reported, and a validation with nothing to correlate is a usage error."""

import json

import numpy as np
import pytest

from moekern.analysis.datasets.predictor import read_prompts
from moekern.analysis.study import learned


def test_recommend_uses_the_log_and_says_when_the_predictor_cannot_tell_layouts_apart(tmp_path, monkeypatch):
    import pandas as pd

    from moekern.analysis.datasets.synthetic import write_synthetic_gate_log
    from moekern.analysis.placement.recommend import recommend
    from moekern.errors import UsageError

    class Flat:  # in range everywhere, and the same throughput for every layout
        synthetic = False

        def predict(self, cfgs):
            return pd.DataFrame([{"output_throughput": 1000.0, "mean_tpot_ms": 5.0} for _ in cfgs])

        def extrapolating(self, cfg):
            return []

    monkeypatch.setattr(learned, "load", lambda path=None: (Flat(), "flat test predictor"))
    g = write_synthetic_gate_log(tmp_path / "g" / "gate_log.rank0.jsonl", num_steps=20, num_experts=8, skew=0.6)
    rec = recommend("mixtral", 4, gate_log=g.parent)
    assert "predictor" not in rec["decided_by"] and "no gate log" not in rec["decided_by"]
    assert any("cannot tell these layouts apart" in n for n in rec["notes"])
    assert any(n.startswith("gate log: 21 steps") for n in rec["notes"])
    ep = [c for c in rec["candidates"] if c["layout"] == "EP4"]
    assert all(np.isfinite(c["max_mean_load"]) for c in ep)  # the log scored the placements
    with pytest.raises(UsageError, match="8 experts but --model deepseek-v3 has 256"):
        recommend("deepseek-v3", 8, gate_log=g.parent)
    from moekern.analysis.placement.recommend import predictor_tells_apart

    cands = [{"layout": "TP4", "pred_output_throughput": 1000.0}, {"layout": "EP4", "pred_output_throughput": 1000.0}]
    assert not predictor_tells_apart(cands)
    cands[1]["pred_output_throughput"] = 1100.0
    assert predictor_tells_apart(cands)


def test_predict_reports_bad_lines(tmp_path, capsys):
    from moekern.cli import main

    f = tmp_path / "d.jsonl"
    f.write_text('{"prompt": "What is a cat?"}\n{broken\n\n{"text": "no prompt key"}\n{"prompt": "Why is the sky blue?"}\n')
    skipped = []
    prompts, _ = read_prompts(f, skipped)
    assert prompts == ["What is a cat?", "Why is the sky blue?"]
    assert [i for i, _ in skipped] == [2, 4]
    assert main(["predict", str(f), "--fallback-tokenizer"]) == 0
    cap = capsys.readouterr()
    assert "skipped 2 bad line(s)" in cap.err and "line 2: not JSON" in cap.err and "line 4:" in cap.err
    assert main(["predict", str(f), "--fallback-tokenizer", "--json"]) == 0
    obj = json.loads(capsys.readouterr().out)
    assert [s["line"] for s in obj[str(f)]["skipped_lines"]] == [2, 4]


def test_validate_without_any_matching_log_is_a_usage_error(tmp_path, capsys):
    from moekern.cli import main

    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "000_0.2500.jsonl").write_text('{"prompt": "x"}\n')
    (tmp_path / "logs" / "unrelated").mkdir(parents=True)
    assert main(["validate", str(tmp_path / "ds"), str(tmp_path / "logs")]) == 2
    err = capsys.readouterr().err
    assert "matches any of the 1 datasets" in err and "rho" not in err
