"""moekern bench-history: ratios formed within each run, geomean over shapes, runs ordered by date."""

from __future__ import annotations

import json
import math

import pytest

from moekern.bench import history
from moekern.cli import main


def _row(op, model, m, provider, us, status="ok"):
    return {"op": op, "shape": f"{op}/{model}/M={m}", "block_size": 0, "provider": provider, "status": status,
            "median_us": us if status == "ok" else None}


def _write(folder, date, rows, demo=False):
    folder.mkdir(parents=True, exist_ok=True)
    env = {"date": f"{date}T12:00:00+00:00", "gpu": "TestGPU", "demo": demo}
    (folder / "results.json").write_text(json.dumps({"environment": env, "rows": rows}))


@pytest.fixture
def results(tmp_path):
    root = tmp_path / "results"
    # newer run first on disk; two moe shapes: moekern 0.5x and 2x vLLM -> geomean 1.0; routing 0.8x at one shape
    _write(root / "a-new", "2026-12-02", [
        _row("moe", "x", 1, "vllm", 100.0), _row("moe", "x", 1, "moekern-triton", 50.0),
        _row("moe", "x", 8, "vllm", 10.0), _row("moe", "x", 8, "moekern-triton", 20.0),
        _row("moe", "x", 8, "flashinfer", 0.0, status="wrong"),
        _row("moe", "x", 1, "flashinfer", 80.0),
        _row("routing", "x", 1, "vllm", 5.0), _row("routing", "x", 1, "moekern-cuda", 4.0),
        _row("routing", "x", 8, "moekern-cuda", 3.0),  # no vLLM row at this shape: not compared
        _row("moe", "x", 1, "torch", 5000.0),
    ])
    _write(root / "b-old", "2026-11-01", [
        _row("moe", "x", 1, "vllm", 100.0), _row("moe", "x", 1, "moekern-triton", 120.0)])
    _write(root / "demo", "2026-12-03", [_row("moe", "x", 1, "vllm", 1.0), _row("moe", "x", 1, "torch", 2.0)],
           demo=True)
    (root / "junk").mkdir()
    (root / "junk" / "results.json").write_text("{not json")
    (root / "other").mkdir()
    (root / "other" / "results.json").write_text(json.dumps({"something": "else"}))
    return root


def test_summary_ratios_counts_and_order(results):
    runs, skipped = history.find_runs([str(results)])
    assert [p.parent.name for p, _ in runs] == ["b-old", "a-new"]  # by date, not by name or disk order
    assert len(skipped) == 3 and any("CPU demo" in s for s in skipped) and any("unreadable" in s for s in skipped)
    got = {(s["run"].rsplit("/", 1)[-1], s["op"], s["provider"]): s for s in history.summarize(runs)}
    assert got[("b-old", "moe", "moekern-triton")]["geomean_ratio"] == pytest.approx(1.2)
    new = got[("a-new", "moe", "moekern-triton")]
    assert new["geomean_ratio"] == pytest.approx(1.0) and new["shapes"] == 2
    assert (new["min_ratio"], new["max_ratio"]) == (pytest.approx(0.5), pytest.approx(2.0))
    fi = got[("a-new", "moe", "flashinfer")]
    assert fi["shapes"] == 1 and fi["wrong_or_failed"] == 1 and fi["geomean_ratio"] == pytest.approx(0.8)
    assert got[("a-new", "routing", "moekern-cuda")]["shapes"] == 1
    assert ("a-new", "moe", "vllm") not in got  # the baseline itself is no column


def test_other_baseline(results):
    runs, _ = history.find_runs([str(results)])
    got = {(s["run"].rsplit("/", 1)[-1], s["provider"]): s for s in history.summarize(runs, baseline="flashinfer")
           if s["op"] == "moe"}
    assert got[("a-new", "moekern-triton")]["geomean_ratio"] == pytest.approx(50.0 / 80.0)
    assert got[("a-new", "vllm")]["geomean_ratio"] == pytest.approx(100.0 / 80.0)
    assert not any(k[0] == "b-old" for k in got)  # no FlashInfer in that run


def test_cli_table_plot_json(results, tmp_path, capsys):
    png, js = tmp_path / "h.png", tmp_path / "h.json"
    assert main(["bench-history", str(results), "--plot", str(png), "--json", str(js)]) == 0
    out = capsys.readouterr().out
    assert "1.200x" in out and "1.000x" in out and "0.50-2.00x" in out
    assert "torch" not in out  # the reference loop is left out unless asked for
    assert png.stat().st_size > 1000 and png.read_bytes()[:4] == b"\x89PNG"
    records = json.loads(js.read_text())
    assert all(math.isfinite(r["geomean_ratio"]) for r in records)
    assert main(["bench-history", str(results), "--providers", "torch"]) == 0
    assert "50.000x" in capsys.readouterr().out


def test_cli_errors(tmp_path, capsys):
    assert main(["bench-history", str(tmp_path / "nope")]) == 2
    assert "no such folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["bench-history", str(tmp_path / "empty")]) == 1
    assert "no run" in capsys.readouterr().err
