"""Sweep (plan, dry run, resume, failures, annotation) and the report (HTML with embedded PNGs, the
SYNTHETIC banner or the caveats box, Markdown) on the shipped REAL sample (one H100 run: two runs, n=1 each,
so the report must degrade), on the SYNTHETIC grid (known effects: trends and intervals must appear) and on
a sweep's own output."""

import base64
import json
import re
import sys
import textwrap
from pathlib import Path

import pytest

from moekern.analysis.study.sweep import load_spec, plan
from moekern.analysis.study.sweep_run import run_sweep

SAMPLE = Path(__file__).resolve().parents[1] / "moekern" / "data" / "sample_results"  # real, one H100 run
SYNTHETIC = Path(__file__).resolve().parents[1] / "moekern" / "data" / "synthetic_results"  # known effects

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
    assert s == {"planned": 8, "skipped": 0, "ran": 8, "failed": 0, "left": 0}
    obj = json.loads((spec.out_dir / "runs" / f"{p0.run_id}.json").read_text())
    assert obj["moekern"]["moe_backend"] == "moekern" and obj["moekern"]["max_num_seqs"] == 8
    assert obj["moekern"]["predicted_score"] == pytest.approx(0.2) and obj["moekern"]["eplb"] is False
    assert run_sweep(spec, progress=False) == {"planned": 8, "skipped": 8, "ran": 0, "failed": 0, "left": 0}  # resume

    # the results feed load_runs: CV attached from each run's gate log
    from moekern.analysis.imbalance.metrics import cv
    from moekern.analysis.serving.metrics import load_runs

    runs, _ = load_runs(spec.out_dir)
    assert len(runs) == 8 and all(r.measured_cv == pytest.approx(cv([6, 2, 0, 0])) for r in runs)


def test_sweep_failures_are_retried(tmp_path):
    spec = load_spec(_spec(tmp_path, [8, "fail"]))
    s = run_sweep(spec, progress=False)
    assert s["ran"] == 4 and s["failed"] == 4
    status = [json.loads(l) for l in (spec.out_dir / "sweep_status.jsonl").read_text().splitlines()]
    assert sum(not x["ok"] for x in status) == 4 and "exit code 3" in status[-1]["reason"]
    assert run_sweep(spec, progress=False)["skipped"] == 4  # failed points run again


def test_sweep_budget_stops_before_a_point_that_cannot_fit_and_only_selects(tmp_path, capsys):
    """--budget-s: no point starts with less than min_point_s left (they stay for the next invocation);
    {budget_left_s} reaches the command; --only runs a subset of one grid key's values."""
    from moekern.analysis.study.sweep_run import parse_only

    p = _spec(tmp_path, [8, 16])
    p.write_text(p.read_text().replace("{eplb_flag}", "{eplb_flag} --left {budget_left_s}")
                 + "min_point_s: 1000\n")
    spec = load_spec(p)
    s = run_sweep(spec, progress=False, budget_s=500)
    assert s == {"planned": 8, "skipped": 0, "ran": 0, "failed": 0, "left": 8}
    assert "under min_point_s 1000: stopping; 8 point(s) left" in capsys.readouterr().out
    spec.min_point_s = 1.0
    s = run_sweep(spec, progress=False, budget_s=500, only=parse_only(["max_num_seqs=16", "eplb=False"]))
    assert s["planned"] == 2 and s["ran"] == 2 and s["left"] == 0
    assert sorted(f.stem for f in (spec.out_dir / "runs").glob("*.json")) == \
        ["moekern_s16_eplb0_d000_0.2000", "moekern_s16_eplb0_d001_0.7000"]
    run_sweep(spec, dry_run=True, budget_s=321)
    assert "--left 321" in capsys.readouterr().out
    with pytest.raises(ValueError, match="--only backend=vllm: 'vllm' is not among \\['moekern'\\]"):
        run_sweep(spec, only=parse_only(["backend=vllm"]), dry_run=True)
    with pytest.raises(ValueError, match="'tp' is no grid key"):
        run_sweep(spec, only=parse_only(["tp=2"]), dry_run=True)
    with pytest.raises(ValueError, match="must be KEY=V1"):
        parse_only(["backend"])
    with pytest.raises(ValueError, match="budget_s=0 must be > 0"):
        run_sweep(spec, budget_s=0)


def test_sweep_point_past_its_timeout_gets_sigterm_first(tmp_path):
    """A point past its timeout is asked to stop (SIGTERM: moekern e2e then stops its servers) before it is
    killed; the sweep records the timeout and moves on."""
    import subprocess

    from moekern.analysis.study.sweep_run import run_point

    script = tmp_path / "slow.py"
    script.write_text("import signal, sys, time\n"
                      "signal.signal(signal.SIGTERM, lambda s, f: (print('stopping servers', flush=True), sys.exit(143)))\n"
                      "print('started', flush=True)\ntime.sleep(30)\n")
    with open(tmp_path / "log", "w") as fh, pytest.raises(subprocess.TimeoutExpired):
        run_point([sys.executable, str(script)], fh, tmp_path, timeout=1.5)
    assert (tmp_path / "log").read_text().split() == ["started", "stopping", "servers"]


def test_sweep_bad_template(tmp_path):
    p = _spec(tmp_path, [8])
    p.write_text(p.read_text().replace("{result}", "{nonexistent}"))
    with pytest.raises(ValueError, match="nonexistent"):
        plan(load_spec(p))


def test_example_spec_parses():
    spec = load_spec(Path(__file__).resolve().parents[1] / "analysis" / "specs" / "sweep_example.yaml")
    assert spec.grid["max_num_seqs"] == [8, 16, 32, 64]
    assert spec.grid["max_num_batched_tokens"] == [2048, 4096, 8192, 16384]


def test_synthetic_grid_is_labelled_synthetic():
    meta = json.loads((SYNTHETIC / "metadata.json").read_text())
    assert meta["synthetic"] is True
    assert "SYNTHETIC" in (SYNTHETIC / "README.md").read_text()
    assert all(json.loads(f.read_text())["synthetic"] is True for f in (SYNTHETIC / "runs").glob("*.json"))


def test_real_sample_is_real_and_consistent():
    """The shipped sample is the H100 run's files, byte for byte (README sha256), small, and its gate log
    obeys the schema's invariant sum(counts) == num_tokens * top_k in every record."""
    import hashlib

    from moekern import gatelog

    meta = json.loads((SAMPLE / "metadata.json").read_text())
    assert meta["synthetic"] is False and meta["caveats"]
    readme = (SAMPLE / "README.md").read_text()
    assert "H100" in readme and "dummy" in readme.lower() and "not steady state" in readme.lower()
    sums = dict(re.findall(r"^\s+([0-9a-f]{64})\s+(\S+)$", readme, flags=re.M))
    assert len(sums) == 6
    for digest, name in sums.items():
        assert hashlib.sha256((SAMPLE / name).read_bytes()).hexdigest() == digest, name
    assert sum(f.stat().st_size for f in SAMPLE.rglob("*") if f.is_file()) < 300_000
    recs, skipped = gatelog.read_gate_log(SAMPLE / "gate_logs")
    assert not skipped and len(recs) == 844
    assert all(sum(r.expert_counts) == r.num_tokens * r.top_k for r in recs)


def test_report_html_from_real_sample(tmp_path):
    """The default `moekern report` (no RESULTS_DIR) renders the real sample: caveats on top, no SYNTHETIC
    banner, the run table, per-phase imbalance, placement for EP 2/4/8, and no fake intervals (n=1)."""
    from moekern.cli import main

    out = tmp_path / "r.html"
    assert main(["report", "--out", str(out), "--n-boot", "50"]) == 0
    html = out.read_text()
    assert "SYNTHETIC DATA" not in html and "CAVEATS" in html and "dummy" in html.lower()
    imgs = re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", html)
    assert len(imgs) >= 3  # per-step CV, heatmap, rank bars
    assert all(base64.b64decode(i)[:8] == b"\x89PNG\r\n\x1a\n" for i in imgs)
    assert "serve_moekern" in html and "serve_vllm" in html
    assert "phase decode" in html and "phase prefill" in html and "identical expert counts" in html
    assert "no plot vs max-num-seqs: every run has max-num-seqs = 128" in html
    for ep in (2, 4, 8):
        assert f"EP={ep}: recommended" in html
    findings = html[html.index("<h2>Findings"):]
    rows = re.findall(r"<tr><td>(.*?)</td><td>(.*?)</td><td>(.*?)</td>", findings)
    assert rows and all(ci == "n/a" for _, _, ci in rows)  # one run per backend: no interval anywhere
    assert any("moekern / vllm: median TPOT (one run each)" == f for f, _, _ in rows)
    ratio = [float(v) for f, v, _ in rows if f.startswith("moekern / vllm: median TPOT")][0]
    assert ratio == pytest.approx(5.2347538650778125 / 5.017898539682349, rel=1e-3)


def test_report_html_from_synthetic_grid(tmp_path):
    """The synthetic grid has known effects (TPOT rises with max-num-seqs and CV): every trend plot and
    bootstrap interval is drawn."""
    from moekern.cli import main

    out = tmp_path / "r.html"
    assert main(["report", str(SYNTHETIC), "--out", str(out), "--n-boot", "100", "--ep-size", "4"]) == 0
    html = out.read_text()
    assert "SYNTHETIC DATA" in html
    imgs = re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", html)
    assert len(imgs) >= 6  # seqs, batch tokens, vs CV, vs score, heatmaps, rank bars, per-step CV
    assert "Findings (95% bootstrap CI" in html and re.search(r"moekern: TPOT mean \(ms\), median of 4\d runs", html)
    assert "IQR outlier" in html and "Per-rank load" in html
    findings = html[html.index("<h2>Findings"):]
    cis = re.findall(r"<td>\[([-0-9.e+]+), ([-0-9.e+]+)\]</td>", findings)
    assert len(cis) >= 6 and all(float(lo) <= float(hi) for lo, hi in cis)


def test_report_degrades_on_thin_data(tmp_path):
    """Two runs of one backend with one max-num-seqs value and no gate logs: no trend plot, no interval,
    each absence said in words."""
    from moekern.analysis.report.html import build_report, render_markdown

    for i, tpot in enumerate((5.0, 6.0)):
        (tmp_path / f"r{i}.json").write_text(json.dumps({"mean_tpot_ms": tpot, "mean_ttft_ms": 50.0,
                                                         "output_throughput": 100.0, "duration": 1.0,
                                                         "moekern": {"moe_backend": "x", "max_num_seqs": 8}}))
    rep = build_report(tmp_path, n_boot=20)
    assert not any(kind == "img" for _, items in rep.sections for kind, _ in items)
    assert any("every run has max-num-seqs = 8" in n for n in rep.notes)
    f = [x for x in rep.findings if x["finding"].startswith("x: TPOT mean")][0]
    assert f["estimate"].n == 2 and f["estimate"].value == pytest.approx(5.5)
    assert "no interval" in f["note"]
    md = render_markdown(rep, tmp_path / "img", "img")
    assert "| x: TPOT mean (ms), median of 2 runs | 5.5 | n/a | 2 |" in md


def test_report_reads_run_e2e_layout(tmp_path):
    """serve_<arm>.bench.json without a moekern block: backend from the name, engine from e2e_*.json,
    gate logs from gate_logs/<arm>/ (CV attached)."""
    from moekern.analysis.imbalance.metrics import cv
    from moekern.analysis.serving.metrics import load_runs

    (tmp_path / "serve_moekern.bench.json").write_text(json.dumps({"backend": "vllm", "mean_tpot_ms": 5.0, "duration": 1.0}))
    (tmp_path / "serve_vllm.bench.json").write_text(json.dumps({"backend": "vllm", "mean_tpot_ms": 6.0, "duration": 1.0}))
    (tmp_path / "e2e_m.json").write_text(json.dumps({"meta": {"engine": {"max_num_seqs": 32, "eplb": False,
                                                                          "max_num_batched_tokens": None}}}))
    g = tmp_path / "gate_logs" / "moekern"
    g.mkdir(parents=True)
    (g / "gate_log.rank0.jsonl").write_text(json.dumps({"schema": "moekern.gatelog/1", "step": 0, "layer": 0,
                                                        "num_tokens": 4, "top_k": 2,
                                                        "expert_counts": [6, 2, 0, 0]}) + "\n")
    runs = {r.moe_backend: r for r in load_runs(tmp_path)[0]}
    assert set(runs) == {"moekern", "vllm"}
    assert runs["moekern"].max_num_seqs == 32 and runs["moekern"].eplb is False
    assert runs["moekern"].measured_cv == pytest.approx(cv([6, 2, 0, 0]))
    assert runs["vllm"].gate_log is None and runs["vllm"].measured_cv is None
    assert "file name" in runs["vllm"].extra["inferred_from"]
    # an explicit moekern block wins over the layout
    (tmp_path / "serve_vllm.bench.json").write_text(json.dumps({"mean_tpot_ms": 6.0, "duration": 1.0,
                                                                "moekern": {"moe_backend": "flashinfer"}}))
    assert {r.moe_backend for r in load_runs(tmp_path)[0]} == {"moekern", "flashinfer"}


def test_report_markdown_from_sweep_output(tmp_path):
    from moekern.analysis.report.html import write_report

    spec = load_spec(_spec(tmp_path, [8, 16]))
    run_sweep(spec, progress=False)
    out = write_report(spec.out_dir, tmp_path / "rep" / "report.md", n_boot=50)
    md = out.read_text()
    assert "SYNTHETIC" not in md  # nothing here claims to be synthetic
    pngs = list((tmp_path / "rep" / "report_files").glob("*.png"))
    assert pngs and all(f"report_files/{p.name}" in md for p in pngs)
    assert "| finding |" in md


def test_sweep_collects_from_run_dir(tmp_path):
    # a runner that writes a folder (like moekern e2e --out DIR) instead of one result file
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


def test_report_combines_ranks_as_asked(tmp_path, monkeypatch):
    """`moekern report --combine-ranks` reaches the gate-log loader (two ranks without metadata)."""
    from moekern.analysis.imbalance import metrics as M
    from moekern.cli import main
    from moekern.gatelog import GateRecord, write_records

    (tmp_path / "r0.json").write_text(json.dumps({"mean_tpot_ms": 5.0, "mean_ttft_ms": 50.0, "output_throughput": 1.0,
                                                  "duration": 1.0, "moekern": {"moe_backend": "x"}}))
    logs = tmp_path / "gate_logs"
    logs.mkdir()
    for rank, counts in ((0, [2, 0]), (1, [0, 2])):
        write_records(logs / f"gate_log.rank{rank}.jsonl",
                      [GateRecord(s, 0, counts, 2, rank=rank, top_k=1) for s in range(3)])
    seen = []
    real = M.load_table

    def spy(path, *a, **kw):
        seen.append(kw.get("combine_ranks"))
        return real(path, *a, **kw)

    monkeypatch.setattr(M, "load_table", spy)
    assert main(["report", str(tmp_path), "--out", str(tmp_path / "r.md"), "--n-boot", "5",
                 "--combine-ranks", "dedupe"]) == 0
    assert seen and set(seen) == {"dedupe"}
