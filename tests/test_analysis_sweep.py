"""The shipped sweep spec plans on a fresh clone: its datasets are made on demand, once."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from moekern.analysis.study.sweep import ensure_datasets, load_spec
from moekern.cli import main

EXAMPLE = Path(__file__).resolve().parents[1] / "analysis" / "specs" / "sweep_example.yaml"


def test_example_spec_dry_run_on_a_fresh_clone(tmp_path, capsys):
    # the spec's paths are relative to its folder (../../results/...): the same layout under tmp_path
    spec = tmp_path / "analysis" / "specs" / EXAMPLE.name
    spec.parent.mkdir(parents=True)
    shutil.copy(EXAMPLE, spec)
    datasets = tmp_path / "results" / "datasets"
    assert not datasets.exists()
    assert main(["sweep", str(spec), "--dry-run"]) == 0
    captured = capsys.readouterr()
    files = sorted(datasets.glob("*.jsonl"))
    assert len(files) == 8 and "generated 8 datasets" in captured.err
    # 2 backends x 4 max_num_seqs x 4 max_num_batched_tokens x 2 eplb x 8 datasets, every one planned
    assert "512 points, 0 done (skipped), 512 to run" in captured.out
    assert all(f.name in captured.out for f in files)
    assert json.loads(files[0].read_text().splitlines()[0])["prompt"]
    # a second plan reuses them: nothing is rewritten
    stamps = {f: f.stat().st_mtime_ns for f in files}
    assert main(["sweep", str(spec), "--dry-run"]) == 0
    assert "generated" not in capsys.readouterr().err
    assert {f: f.stat().st_mtime_ns for f in sorted(datasets.glob("*.jsonl"))} == stamps


def test_datasets_key_is_checked_and_optional(tmp_path):
    base = "command: echo {dataset}\ngrid:\n  dataset: [d/*.jsonl]\n"
    (tmp_path / "plain.yaml").write_text(base)
    assert load_spec(tmp_path / "plain.yaml").datasets is None
    assert ensure_datasets(load_spec(tmp_path / "plain.yaml")) == []
    (tmp_path / "bad.yaml").write_text(base + "datasets: {out: d, num: 0}\n")
    with pytest.raises(ValueError, match=r"datasets.num must be an int >= 1; got 0"):
        load_spec(tmp_path / "bad.yaml")
    (tmp_path / "typo.yaml").write_text(base + "datasets: {out: d, count: 3}\n")
    with pytest.raises(ValueError, match=r"\['count'\] unknown"):
        load_spec(tmp_path / "typo.yaml")


@pytest.mark.parametrize("skews, match", [
    ("{hot: 'hot:0:1.5'}", "bench_grid.skews.hot='hot:0:1.5': hot fraction must be in (0, 1)"),
    ("{'a b': uniform}", "bench_grid.skews name 'a b' must be letters"),
    ("[uniform]", "bench_grid.skews must map names to skews"),
])
def test_bench_grid_skews_are_checked(tmp_path, skews, match):
    spec = tmp_path / "s.yaml"
    spec.write_text("command: echo {bench_grid}\ngrid: {backend: [vllm]}\n"
                    f"bench_grid: {{concurrency: [8], skews: {skews}}}\n")
    with pytest.raises(ValueError, match=re.escape(match)):
        load_spec(spec)


def test_bench_grid_skews_render_as_runner_flags(tmp_path, capsys):
    from moekern.analysis.study.sweep import plan

    spec = tmp_path / "s.yaml"
    spec.write_text("command: echo {bench_grid}\ngrid: {backend: [vllm]}\n"
                    "bench_grid: {concurrency: [8], skews: {u: uniform, h: 'hot:0:0.5'}}\n")
    (p,) = plan(load_spec(spec))
    assert p.command[p.command.index("--skews") + 1] == "u=uniform,h=hot:0:0.5"
    assert [f.name for f in p.expected] == ["vllm_ku_c8_drandom_r0.json", "vllm_kh_c8_drandom_r0.json"]


@pytest.mark.parametrize("half", ["[a]", "[a, a]", "[a, c]", "[a, dataset]", "[a, b2]"])
def test_half_first_is_checked(tmp_path, half):
    spec = tmp_path / "s.yaml"
    spec.write_text("command: echo {a}\ngrid: {a: [1, 2, 3], b: [4, 5, 6], b2: [1, 2], dataset: [x, y, z]}\n"
                    f"half_first: {half}\n")
    with pytest.raises(ValueError, match=r"half_first must name two grid keys \(not dataset\) of >= 3 levels"):
        load_spec(spec)
