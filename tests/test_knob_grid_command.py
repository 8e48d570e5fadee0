"""Issue 31's GPU command on a CPU: `moekern sweep analysis/specs/imbalance_grid.yaml --budget-s ... --only ...`
(what `gpu_session.sh knob-grid` runs) through the real runner, serve grid and bench child, against a stand-in
`vllm` (tests/fake_vllm.py: /health, /v1/completions writing gate-log records, and /collective_rpc only under
VLLM_SERVER_DEV_MODE=1, as vLLM 0.26 serve). Checks what each bench leaves, the resume and the budget stop."""

import json
import os
import shutil
import stat
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from fake_vllm import LOADS

from moekern.analysis.imbalance.metrics import cv
from moekern.cli import main

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def gpu_like(tmp_path, monkeypatch):
    """A checkout-like folder holding the spec, and a PATH whose `vllm` is the stand-in and whose `python` is
    this interpreter (the spec's command starts `python -m moekern.e2e`)."""
    specs = tmp_path / "analysis" / "specs"
    specs.mkdir(parents=True)
    shutil.copy(REPO / "analysis" / "specs" / "imbalance_grid.yaml", specs)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, target in (("vllm", f"{sys.executable} {REPO / 'tests' / 'fake_vllm.py'}"), ("python", sys.executable)):
        f = bin_dir / name
        f.write_text(f'#!/bin/sh\nexec {target} "$@"\n')
        f.chmod(f.stat().st_mode | stat.S_IEXEC)
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "tokenizer.json").write_text("{}")
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("GPUENV_MIXTRAL_TOKENIZER", str(tok))
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    return specs / "imbalance_grid.yaml", tmp_path / "results" / "imbalance_grid"


def test_knob_grid_command_runs_resumes_and_stops_at_its_budget(gpu_like, capsys):
    spec, out = gpu_like
    only = ["--only", "max_num_seqs=8", "--only", "max_num_batched_tokens=2048"]
    assert main(["sweep", str(spec), "--no-progress", "--budget-s", "300", *only, "--only", "backend=vllm"]) == 0
    assert '"ran": 1, "failed": 0' in capsys.readouterr().out
    runs = out / "runs"
    names = sorted(f.name for f in runs.glob("*.json"))
    assert names == [f"s8_b2048_vllm_k{k}_c64_drandom_r0.json" for k in ("hot", "moderate", "uniform")]
    for skew, loads in (("uniform", "uniform"), ("moderate", "cold"), ("hot", "hot")):
        obj = json.loads((runs / f"s8_b2048_vllm_k{skew}_c64_drandom_r0.json").read_text())
        m = obj["moekern"]
        want = float(cv(np.array(LOADS[loads], float)))
        assert m["routing_skew"] == skew and m["measured_cv_agg"] == pytest.approx(want, abs=1e-6)
        assert m["measured_cv_step"] == pytest.approx(want, abs=1e-6) and m["gate_log_steps"] == 3
        assert m["max_num_seqs"] == 8 and m["max_num_batched_tokens"] == 2048 and m["moe_backend"] == "vllm"
        assert (runs / m["gate_log"]).is_dir() and m["steady_state"] is True
        card = yaml.safe_load((runs / f"s8_b2048_vllm_k{skew}_c64_drandom_r0.card.yaml").read_text())
        assert card["skew"]["in_force"] == m["routing_skew_in_force"] and card["knobs"]["max_model_len"] == 4096
    # one server for the three skews: one gate-log folder per server start
    assert len(list((out / "gate_logs" / "s8_b2048_vllm").iterdir())) == 1
    # resume: nothing left to run for that point
    assert main(["sweep", str(spec), "--no-progress", "--budget-s", "300", *only, "--only", "backend=vllm"]) == 0
    assert '"planned": 1, "skipped": 1, "ran": 0' in capsys.readouterr().out
    # a budget under min_point_s (200) starts nothing and says what is left
    assert main(["sweep", str(spec), "--no-progress", "--budget-s", "150", *only]) == 0
    text = capsys.readouterr().out
    assert "stopping; 2 point(s) left for the next invocation" in text and '"left": 2' in text
    assert not (runs / "s8_b2048_moekern_khot_c64_drandom_r0.json").exists()
