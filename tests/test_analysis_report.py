"""Sweep (plan, dry run, resume, failures, annotation) and the report (HTML with embedded PNGs and the
SYNTHETIC banner, Markdown) on the shipped sample and on a sweep's own output."""

import base64
import json
import re
import sys
import textwrap
from pathlib import Path

import pytest

from moekern.analysis.sweep import load_spec, plan, run_sweep

SAMPLE = Path(__file__).resolve().parents[1] / "moekern" / "data" / "sample_results"

FAKE_RUNNER = textwrap.dedent('''
    import json, sys
    from pathlib import Path
    a = dict(zip(sys.argv[1::2], sys.argv[2::2]))
    if a["--seqs"] == "fail":
        sys.exit(3)
    Path(a["--out"]).write_text(json.dumps({"backend": "vllm", "mean_tpot_ms": 10.0 + int(a["--seqs"]),
                                            "mean_ttft_ms": 50.0, "output_throughput": 100.0, "duration": 1.0}))
    with open(Path(a["--gate"]) / "gate_log.rank0.jsonl", "w") as fh:
        fh.write(json.dumps({"schema": "moekern.gatelog/1", "step": 0, "layer": 0, "num_tokens": 4,
                             "top_k": 2, "expert_counts": [6, 2, 0, 0]}) + "\\n")
''')


def _spec(tmp_path, seqs):
    (tmp_path / "runner.py").write_text(FAKE_RUNNER)
    ds = tmp_path / "ds"
    ds.mkdir(exist_ok=True)
    for name in ("000_0.2000.jsonl", "001_0.7000.jsonl"):
        (ds / name).write_text('{"prompt": "hi"}\n')
    spec = tmp_path / "spec.yaml"
    spec.write_text(textwrap.dedent(f"""
        name: t
        out_dir: out
        command: "{sys.executable} runner.py --backend {{backend}} --seqs {{max_num_seqs}} --out {{result}} --gate {{gate_log_dir}} {{eplb_flag}}"
        eplb_flag: {{true: "--eplb on", false: ""}}
        grid:
          backend: [moekern]
          max_num_seqs: {json.dumps(seqs)}
          eplb: [false, true]
          dataset: ["ds/*.jsonl"]
    """))
    return spec


def test_sweep_plan_dry_run_and_resume(tmp_path, capsys):
    spec = load_spec(_spec(tmp_path, [8, 16]))
    pts = plan(spec)
    assert len(pts) == 2 * 2 * 2 and not any(p.done for p in pts)
    assert len({p.run_id for p in pts}) == len(pts)
    p0 = pts[0]
    assert p0.run_id == "moekern_s8_eplb0_d000_0.2000"
    assert "--eplb" not in p0.command and "--eplb" in pts[2].command
    assert run_sweep(spec, dry_run=True)["skipped"] == 0
    assert capsys.readouterr().out.count("[todo]") == 8
    assert not (spec.out_dir / "runs").exists()  # dry run touches nothing

    s = run_sweep(spec, progress=False)
    assert s == {"planned": 8, "skipped": 0, "ran": 8, "failed": 0}
    obj = json.loads((spec.out_dir / "runs" / f"{p0.run_id}.json").read_text())
    assert obj["moekern"]["moe_backend"] == "moekern" and obj["moekern"]["max_num_seqs"] == 8
    assert obj["moekern"]["predicted_score"] == pytest.approx(0.2) and obj["moekern"]["eplb"] is False
    assert run_sweep(spec, progress=False) == {"planned": 8, "skipped": 8, "ran": 0, "failed": 0}  # resume

    # the results feed load_runs: CV attached from each run's gate log
    from moekern.analysis.metrics import cv
    from moekern.analysis.serving import load_runs

    runs, _ = load_runs(spec.out_dir)
    assert len(runs) == 8 and all(r.measured_cv == pytest.approx(cv([6, 2, 0, 0])) for r in runs)


def test_sweep_failures_are_retried(tmp_path):
    spec = load_spec(_spec(tmp_path, [8, "fail"]))
    s = run_sweep(spec, progress=False)
    assert s["ran"] == 4 and s["failed"] == 4
    status = [json.loads(l) for l in (spec.out_dir / "sweep_status.jsonl").read_text().splitlines()]
    assert sum(not x["ok"] for x in status) == 4 and "exit code 3" in status[-1]["reason"]
    assert run_sweep(spec, progress=False)["skipped"] == 4  # failed points run again


def test_sweep_bad_template(tmp_path):
    p = _spec(tmp_path, [8])
    p.write_text(p.read_text().replace("{result}", "{nonexistent}"))
    with pytest.raises(ValueError, match="nonexistent"):
        plan(load_spec(p))


def test_example_spec_parses():
    spec = load_spec(Path(__file__).resolve().parents[1] / "analysis" / "specs" / "sweep_example.yaml")
    assert spec.grid["max_num_seqs"] == [8, 16, 32, 64]
    assert spec.grid["max_num_batched_tokens"] == [2048, 4096, 8192, 16384]


def test_sample_is_labelled_synthetic():
    meta = json.loads((SAMPLE / "metadata.json").read_text())
    assert meta["synthetic"] is True
    assert "SYNTHETIC" in (SAMPLE / "README.md").read_text()
    assert all(json.loads(f.read_text())["synthetic"] is True for f in (SAMPLE / "runs").glob("*.json"))


def test_report_html_from_sample(tmp_path):
    from moekern.cli import main

    out = tmp_path / "r.html"
    assert main(["report", str(SAMPLE), "--out", str(out), "--n-boot", "100"]) == 0
    html = out.read_text()
    assert "SYNTHETIC DATA" in html
    imgs = re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", html)
    assert len(imgs) >= 6  # seqs, batch tokens, vs CV, vs score, 2 heatmaps, rank bars
    assert all(base64.b64decode(i)[:8] == b"\x89PNG\r\n\x1a\n" for i in imgs)
    assert "Findings (95% bootstrap CI)" in html and "moekern: median TPOT" in html
    assert "IQR outlier" in html and "Per-rank load" in html


def test_report_markdown_from_sweep_output(tmp_path):
    from moekern.analysis.report import write_report

    spec = load_spec(_spec(tmp_path, [8, 16]))
    run_sweep(spec, progress=False)
    out = write_report(spec.out_dir, tmp_path / "rep" / "report.md", n_boot=50)
    md = out.read_text()
    assert "SYNTHETIC" not in md  # nothing here claims to be synthetic
    pngs = list((tmp_path / "rep" / "report_files").glob("*.png"))
    assert pngs and all(f"report_files/{p.name}" in md for p in pngs)
    assert "| finding |" in md


def test_sweep_collects_from_run_dir(tmp_path):
    # a runner that writes a folder (like benchmarks/e2e/run_e2e.py --out DIR) instead of one result file
    (tmp_path / "r.py").write_text("import json, sys, pathlib\n"
                                   "d = pathlib.Path(sys.argv[1]); d.mkdir(parents=True, exist_ok=True)\n"
                                   "(d / 'serve_moekern.bench.json').write_text(json.dumps({'mean_tpot_ms': 5.0}))\n")
    spec = tmp_path / "s.yaml"
    spec.write_text(f'command: "{sys.executable} r.py {{run_dir}}"\ncollect: "serve_*.bench.json"\n'
                    "grid: {backend: [moekern]}\n")
    sp = load_spec(spec)
    assert run_sweep(sp, progress=False)["ran"] == 1
    obj = json.loads(next((sp.out_dir / "runs").glob("*.json")).read_text())
    assert obj["mean_tpot_ms"] == 5.0 and obj["moekern"]["moe_backend"] == "moekern"
