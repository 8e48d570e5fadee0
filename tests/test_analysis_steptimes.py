"""moekern.analysis.serving.steptimes and `moekern steptimes`: step wall times from gate-log time stamps."""

from __future__ import annotations

import gzip
import json

import pytest

from moekern.analysis.serving import steptimes as stt
from moekern.cli import main
from moekern.gatelog import GateRecord, write_records


def _log(path, steps, layers=2, gz=False):
    """steps: [(step, time, tokens, phase)]; every layer of a step carries the same stamp."""
    recs = [GateRecord(step=s, layer=li, expert_counts=[tok + 3, tok + 3], num_tokens=tok + 3, phase=ph, top_k=2,
                       time=t, extra={"scheduled_tokens": tok})
            for s, t, tok, ph in steps for li in range(layers)]
    path.parent.mkdir(parents=True, exist_ok=True)
    if gz:
        with gzip.open(path, "wt") as f:
            f.write("".join(r.to_json() + "\n" for r in recs))
    else:
        write_records(path, recs)
    return path


def test_step_times_rules(tmp_path):
    """Durations only between consecutive steps of one file, at most gap_s apart; scheduled tokens used."""
    _log(tmp_path / "a" / "gate_log.rank0.jsonl",
         [(0, 10.0, 512, "prefill"), (1, 10.005, 128, "decode"), (2, 10.011, 128, "decode"),
          (4, 10.020, 128, "decode"),  # step 3 dropped: no duration for 4
          (5, 12.0, 128, "decode"),  # 1.98 s later: a pass boundary, not a step
          (6, 12.004, 64, "decode")])
    _log(tmp_path / "b" / "gate_log.rank0.jsonl.gz", [(0, 50.0, 8, "decode"), (1, 50.002, 8, "decode")], gz=True)
    times = stt.step_times(tmp_path)
    got = sorted((t.step, t.tokens, round(t.seconds * 1e3, 3)) for t in times)
    assert got == [(1, 8, 2.0), (1, 128, 5.0), (2, 128, 6.0), (6, 64, 4.0)]
    assert [t.step for t in stt.step_times(tmp_path, gap_s=3.0) if t.tokens == 128] == [1, 2, 5]
    assert stt.step_times(tmp_path, phase="prefill") == []
    with pytest.raises(ValueError, match="gap_s"):
        stt.step_times(tmp_path, gap_s=0)


def test_summarize_and_compare(tmp_path):
    base = [stt.StepTime("f", i, 128, "decode", 0.004) for i in range(9)] + [stt.StepTime("f", 9, 128, "decode", 0.1)]
    base += [stt.StepTime("f", 10, 9000, "mixed", 0.02)]
    other = [stt.StepTime("g", i, 100, "decode", 0.005) for i in range(10)]
    rows = stt.summarize(base)
    assert [(r["tokens"], r["steps"]) for r in rows] == [("65-128", 10), ("8193-16384", 1)]
    dec = rows[0]
    assert dec["median_ms"] == pytest.approx(4.0) and dec["p90_ms"] == pytest.approx(4.0)
    assert dec["mean_ms"] == pytest.approx((9 * 4 + 100) / 10)
    assert sum(r["share"] for r in rows) == pytest.approx(1.0)
    cmp = stt.compare(rows, stt.summarize(other))
    assert len(cmp) == 1 and cmp[0]["tokens"] == "65-128"
    assert cmp[0]["ratio"] == pytest.approx(1.25) and cmp[0]["extra_s"] == pytest.approx(0.01)
    assert stt.bucket_of(1) == 1 and stt.bucket_of(129) == 256 and stt.bucket_of(10 ** 6) == stt.BUCKETS[-1]


def test_cli_table_json_and_plot(tmp_path, capsys):
    a = _log(tmp_path / "moekern" / "gate_log.rank0.jsonl", [(i, 1.0 + 0.006 * i, 128, "decode") for i in range(20)])
    b = _log(tmp_path / "vllm" / "gate_log.rank0.jsonl", [(i, 1.0 + 0.005 * i, 128, "decode") for i in range(20)])
    png = tmp_path / "st.png"
    assert main(["steptimes", str(a.parent), "--vs", str(b.parent), "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert "vs vllm: median step time ratio (moekern / vllm" in out and "   1.200 " in out
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert main(["steptimes", str(a), "--json", "--label", "x"]) == 0
    obj = json.loads(capsys.readouterr().out)
    assert obj["label"] == "x" and obj["buckets"][0]["steps"] == 19 and "compare" not in obj


def test_cli_errors(tmp_path, capsys):
    assert main(["steptimes", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err
    untimed = _log(tmp_path / "u" / "gate_log.rank0.jsonl", [(0, None, 8, "decode"), (1, None, 8, "decode")])
    assert main(["steptimes", str(untimed)]) == 1
    assert "no timed steps" in capsys.readouterr().err
    assert main(["steptimes", str(untimed), "--gap-s", "0"]) == 2
    assert "--gap-s=0.0 must be > 0" in capsys.readouterr().err


def test_recorder_cost_from_sidecars(tmp_path, capsys):
    """The recorder's own per-step cost, step-weighted over the sidecars next to the logs, and its share of
    the median step in the CLI; absent (None) for logs whose sidecars predate the measurement."""
    a = _log(tmp_path / "gate_log.rank0.jsonl", [(0, 1.0, 8, "decode"), (1, 1.010, 8, "decode"),
                                                 (2, 1.020, 8, "decode")])
    b = _log(tmp_path / "gate_log.rank1.jsonl.gz", [(0, 1.0, 8, "decode"), (1, 1.010, 8, "decode")], gz=True)
    assert stt.recorder_cost(tmp_path) is None  # no sidecars yet
    for path, steps, us, snap in ((a, 300, 100.0, "moekern gatelog_snapshot kernel"), (b, 100, 200.0, None)):
        name = path.name.replace(".jsonl.gz", "").replace(".jsonl", "")
        split = {"phase": {"wall": us / 2, "cpu": us / 4}, "end": {"wall": us / 2, "cpu": us / 2}}
        (tmp_path / f"{name}.meta.json").write_text(json.dumps(
            {"steps": steps, "host_us_per_step": us, "host_split_us_per_step": split,
             **({"snapshot": snap} if snap else {})}))
    cost = stt.recorder_cost(tmp_path)
    assert cost["host_us_per_step"] == 125.0 and cost["steps"] == 400 and cost["files"] == 2  # (300*100+100*200)/400
    assert cost["split_us_per_step"]["phase"] == {"wall": 62.5, "cpu": 31.25}
    assert cost["hand_off"] == ["moekern gatelog_snapshot kernel", "torch calls (before the snapshot op)"]
    assert main(["steptimes", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "125 us/step (phase 62, end 62) = 1.2% of the median step (10.00 ms)" in out
    assert main(["steptimes", str(tmp_path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["recorder"]["host_us_per_step"] == 125.0
