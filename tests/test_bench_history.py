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


# ------------------------------------------------------------------------------------ --index: INDEX.md


@pytest.fixture
def run_tree(tmp_path):
    """A small results tree: a bench run (README, gpu.txt, results.json one folder down), an end-to-end run
    grouped under e2e/, a folder of dated logs with no README, and a folder that only groups folders."""
    root = tmp_path / "results"
    bench = root / "k-2026-01-02"
    (bench / "moe").mkdir(parents=True)
    (bench / "README.md").write_text("intro line\n# Kernel run on some GPU (2026-01-02)\n\nbody\n")
    (bench / "gpu.txt").write_text("name, driver_version\nNVIDIA H100 80GB HBM3, 580.1\n")
    _write(bench / "moe", "2026-01-02", [
        _row("moe", "x", 1, "vllm", 100.0), _row("moe", "x", 1, "moekern-triton", 50.0),
        _row("moe", "x", 8, "vllm", 10.0), _row("moe", "x", 8, "moekern-triton", 20.0),
        _row("moe", "x", 1, "torch", 900.0)])
    e2e = root / "e2e" / "h200-2026-02-03-ab"
    e2e.mkdir(parents=True)
    (e2e / "README.md").write_text("# An A/B | with a pipe\n")
    (e2e / "e2e_m.json").write_text(json.dumps({"summary": {
        "offline.moekern_vs_vllm": 1.25, "offline.moekern_vs_vllm_ci95": [1.1, 1.4], "offline.steady_state": True,
        "offline.gate_log_overhead": 0.05, "offline.moekern_vs_vllm_by_round": [1.2, 1.3]}}))
    old = root / "e2e" / "h100-2025-12-30-old"
    old.mkdir()
    (old / "e2e_m.json").write_text(json.dumps({"summary": {"serve.moekern_vs_vllm": 0.9, "offline.steady_state": False,
                                                            "offline.gate_log_overhead": 0.2}}))
    logs = root / "logs"
    logs.mkdir()
    (logs / "h200-2026-03-09-b.log").write_text("x")
    (logs / "h100-2026-03-01-a.log").write_text("x")
    return root


def test_index_rows_from_the_files(run_tree):
    rows = {r["folder"]: r for r in history.index_rows(run_tree)}
    assert list(rows) == ["e2e/h100-2025-12-30-old", "k-2026-01-02", "e2e/h200-2026-02-03-ab", "logs"]  # by date
    k = rows["k-2026-01-02"]
    assert (k["date"], k["gpu"], k["what"]) == ("2026-01-02", "H100", "Kernel run on some GPU (2026-01-02)")
    assert k["headline"] == "time / vLLM's, geomean: moe triton 1.00x"  # 0.5x and 2x; the torch loop left out
    ab = rows["e2e/h200-2026-02-03-ab"]
    assert (ab["date"], ab["gpu"]) == ("2026-02-03", "H200")
    assert ab["headline"] == "offline: tok/s moekern / vllm 1.250x (95 % CI 1.100 to 1.400), gate-log overhead 5.0 %"
    assert rows["e2e/h100-2025-12-30-old"]["headline"] == ("offline: gate-log overhead 20.0 %; not steady / "
                                                           "serve: tok/s moekern / vllm 0.900x; steadiness not recorded")
    lg = rows["logs"]
    assert (lg["date"], lg["gpu"], lg["what"], lg["headline"]) == ("2026-03-01 to 2026-03-09", "H100, H200", "-", "-")


def test_index_markdown_links_and_cli(run_tree, tmp_path, capsys):
    text = history.render_index(run_tree, run_tree / "INDEX.md")
    assert "| [`k-2026-01-02/`](k-2026-01-02/) |" in text and "An A/B \\| with a pipe" in text
    assert len([ln for ln in text.splitlines() if ln.startswith("| 20")]) == 4
    elsewhere = history.render_index(run_tree, tmp_path / "docs" / "INDEX.md")
    assert "](../results/logs/)" in elsewhere
    assert main(["bench-history", str(run_tree), "--index"]) == 0
    assert (run_tree / "INDEX.md").read_text() == text
    assert history.render_index(run_tree, run_tree / "INDEX.md") == text  # the index itself is no run
    assert main(["bench-history", str(run_tree), str(tmp_path), "--index"]) == 2
    assert "--index takes exactly one results folder" in capsys.readouterr().err


def test_committed_index_is_current():
    """benchmarks/results/INDEX.md is what the generator makes of the committed folders."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
    committed = (root / "INDEX.md").read_text()
    assert history.render_index(root, root / "INDEX.md") == committed, \
        "benchmarks/results/INDEX.md is stale: run `moekern bench-history --index` and commit it"
