"""The command and the package's entry points: `moekern e2e` and `python -m moekern.e2e` (help without vLLM),
the children started as package modules, the model configs as package data, check_equal through the runner's
real offline path, and pool_runs."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from e2e_fakes import FakeProc

from moekern.e2e import arms, check_equal, make_configs, pool_runs
from moekern.e2e.args import build_parser as build_e2e_parser

REPO = Path(__file__).resolve().parents[1]


def test_check_equal_runs_run_e2es_offline_path_with_its_own_defaults(tmp_path, monkeypatch):
    """check_equal through the runner's real offline path, the child faked: every field run_offline_arm reads
    is in its arguments (a hand-built namespace once lacked dummy_router_seed and failed only on the GPU),
    the three arms run in order, equal tokens give equal=True and exit 0, a differing token exit 1; with
    --tensor-parallel-size 2 every rank must have written its gate log."""
    from moekern.gatelog import GateRecord, write_records

    env_seen, tokens = [], {"moekern-routing-log": [[1, 2, 3], [4, 5, 6]]}
    log_ranks = [0]

    def popen(cmd, stdout, env=None, **kw):
        spec = json.loads(Path(cmd[-1]).read_text())
        env_seen.append(env.get("MOEKERN_KERNELS"))
        arm = Path(spec["result"]).stem.removeprefix("offline_")
        if env.get("MOEKERN_GATE_LOG_DIR"):  # what the plugin writes in each rank's worker
            d = Path(env["MOEKERN_GATE_LOG_DIR"])
            d.mkdir(parents=True, exist_ok=True)
            for rank in log_ranks:
                write_records(d / f"gate_log.rank{rank}.jsonl",
                              [GateRecord(step=0, layer=0, expert_counts=[3, 1], num_tokens=2, rank=rank, top_k=2)])
        Path(spec["result"]).write_text(json.dumps({
            "init_s": 1.0, "runs": [{"output_tok_s": 5.0}], "output_tok_s": 5.0, "plugin": "unavailable: x",
            "token_ids": tokens.get(arm, [[1, 2, 3], [4, 5, 6]])}))
        assert spec["save_tokens"] is True and spec["warmup_reps"] == 0
        return FakeProc()

    monkeypatch.setattr(subprocess, "Popen", popen)
    monkeypatch.setattr(arms, "plugin_entry_point", lambda: "moekern.vllm:register")
    assert check_equal.main(["--model", "mixtral", "--out", str(tmp_path / "a")]) == 0
    report = json.loads((tmp_path / "a" / "check_equal.json").read_text())
    assert report["equal"] and report["off_vs_off"]["prompts_differing"] == 0
    assert env_seen == ["off", "off", "routing"]
    tokens["moekern-routing-log"] = [[1, 2, 3], [4, 9, 6]]
    assert check_equal.main(["--model", "mixtral", "--no-baseline", "--out", str(tmp_path / "b")]) == 1
    report = json.loads((tmp_path / "b" / "check_equal.json").read_text())
    assert report["routing_vs_off"] == {"prompts_differing": 1, "of": 2,
                                        "first_difference": {"prompt": 1, "position": 1}}
    # tensor parallelism: the engine gets the flags; equal tokens but rank 1's gate log missing -> exit 1
    tokens["moekern-routing-log"] = [[1, 2, 3], [4, 5, 6]]
    assert check_equal.main(["--model", "mixtral", "--no-baseline", "--tensor-parallel-size", "2",
                             "--enable-expert-parallel", "--out", str(tmp_path / "c")]) == 1
    report = json.loads((tmp_path / "c" / "check_equal.json").read_text())
    assert report["equal"] and report["expert_parallel"] and report["gate_log_ranks"] == {
        "ok": False, "ranks": [0], "want": [0, 1]}
    spec = json.loads(next((tmp_path / "c").rglob("offline_vllm*.spec.json")).read_text())
    assert spec["engine"]["tensor_parallel_size"] == 2 and spec["engine"]["enable_expert_parallel"] is True
    log_ranks[:] = [0, 1]
    assert check_equal.main(["--model", "mixtral", "--no-baseline", "--tensor-parallel-size", "2",
                             "--out", str(tmp_path / "d")]) == 0
    report = json.loads((tmp_path / "d" / "check_equal.json").read_text())
    assert report["gate_log_ranks"]["ok"] and report["gate_log"]["ranks"] == {"0": 1, "1": 1}
    with pytest.raises(SystemExit):  # expert parallelism over one rank
        check_equal.main(["--model", "mixtral", "--enable-expert-parallel", "--out", str(tmp_path / "e")])


def _e2e_result(d, vllm, moekern, max_num_seqs=128, jit=0, rounds=None):
    d.mkdir(parents=True)
    arm = lambda xs, j: {"runs": [{"output_tok_s": x} for x in xs], "jit_during_measurement": j,  # noqa: E731
                         "autotune_during_measurement": 0, **({"rounds": rounds[0]} if rounds else {})}
    res = {"meta": {"model": "mixtral-8x7b-4l", "workload": {"num_prompts": 512, "input_len": 256, "output_len": 128},
                    "engine": {"max_num_seqs": max_num_seqs}},
           "offline": {"vllm": arm(vllm, 0), "moekern": {**arm(moekern, jit),
                                                         **({"rounds": rounds[1]} if rounds else {})}}}
    (d / "e2e_mixtral-8x7b-4l.json").write_text(json.dumps(res))
    return d


def test_pool_runs(tmp_path, capsys):
    rounds = ([{"output_tok_s": 100.0}, {"output_tok_s": 104.0}], [{"output_tok_s": 99.0}, {"output_tok_s": 106.0}])
    a = _e2e_result(tmp_path / "a", [100.0, 102.0, 98.0], [99.0, 101.0, 97.0], rounds=rounds)
    b = _e2e_result(tmp_path / "b", [104.0, 106.0, 105.0], [107.0, 108.0, 106.0])
    p = pool_runs.pool([a, b], "vllm", "moekern")
    assert p["pooled"]["n"] == (6, 6) and p["pooled"]["base_median"] == 103.0
    assert p["pooled"]["arm_median"] == 103.5 and p["pooled"]["ratio"] == pytest.approx(103.5 / 103.0)
    assert p["runs"][0]["by_round"] == pytest.approx([0.99, 106 / 104]) and p["runs"][1]["by_round"] == []
    assert pool_runs.main([str(a), str(b)]) == 0
    assert "pooled: 103 vs 104 tok/s, ratio 1.005" in capsys.readouterr().out
    c = _e2e_result(tmp_path / "c", [1.0, 2.0], [1.0, 2.0], max_num_seqs=256)
    assert pool_runs.main([str(a), str(c)]) == 2 and "differ from the first" in capsys.readouterr().err
    u = _e2e_result(tmp_path / "u", [1.0, 2.0], [1.0, 2.0], jit=3)
    assert pool_runs.main([str(u)]) == 2 and "not steady state" in capsys.readouterr().err
    assert pool_runs.main([str(u), "--include-unsteady"]) == 0
    assert pool_runs.main([str(a), "--arm", "flashinfer"]) == 2 and "no timed offline passes" in capsys.readouterr().err


# ---- the command and the package's entry points ----------------------------------------------------------
def test_moekern_e2e_command_has_the_runners_flags(tmp_path, capsys):
    """`moekern e2e` is registered in moekern's CLI with the runner's own flags and checks: the plan prints,
    a bad flag is argparse's exit 2 naming the command and the flag."""
    from moekern.cli import build_parser, main

    sub = next(a for a in build_parser()._actions if a.dest == "command")  # argparse keeps sub-parsers there
    e2e = sub.choices["e2e"]
    flags = {s for a in e2e._actions for s in a.option_strings}
    runner_flags = {s for a in build_e2e_parser()._actions for s in a.option_strings}
    assert flags == runner_flags and {"--concurrency-grid", "--gate-log-paired", "--rounds", "--result",
                                      "--budget-s", "--no-shape-sweep", "--moe-configs"} <= flags
    assert main(["e2e", "--quick", "--mode", "offline", "--arms", "vllm,moekern", "--plan-only"]) == 0
    assert "plan offline: 2 arm(s), 512 prompts x (256 in + 128 out)" in capsys.readouterr().out
    assert main(["e2e", "--reps", "0"]) == 2  # moekern.cli.main returns argparse's exit code
    assert "moekern e2e: error: --reps=0 must be >= 1" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["-m", "moekern.cli", "e2e", "--help"], ["-m", "moekern.e2e", "--help"]])
def test_help_works_without_vllm_in_a_fresh_process(argv):
    """Both spellings print the runner's help in a fresh interpreter that never imports vLLM (here vLLM is not
    installed at all; an import finder fails the run if anything tries)."""
    guard = ("import runpy, sys\n"
             "class NoVllm:\n"
             "    def find_spec(self, name, path=None, target=None):\n"
             "        if name == 'vllm' or name.startswith('vllm.'):\n"
             "            raise ImportError('vllm imported while building the parser')\n"
             "sys.meta_path.insert(0, NoVllm())\n"
             f"sys.argv = {argv[1:]!r}\n"
             f"runpy.run_module({argv[1]!r}, run_name='__main__', alter_sys=True)\n")
    proc = subprocess.run([sys.executable, "-c", guard], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "--concurrency-grid" in proc.stdout and "--gate-log-paired" in proc.stdout


def test_children_run_as_package_modules(tmp_path):
    """The runner's children are `python -m moekern.e2e.offline SPEC` and `python -m moekern.e2e.grid_child
    SPEC`, started for real here: the grid child with no points writes nothing and exits 0; asked for the
    in-process bench without vLLM it exits 3 (the parent's cue to fall back); the offline child reaches its
    vLLM import."""
    spec = tmp_path / "grid.spec.json"
    progress = tmp_path / "progress.jsonl"
    base = {"points": [], "marker_fd": None, "deadline": 4e9, "progress": str(progress)}
    spec.write_text(json.dumps({**base, "in_process": False}))
    run = lambda *a: subprocess.run([sys.executable, "-m", *a], capture_output=True, text=True, timeout=120,
                                    cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert run("moekern.e2e.grid_child", str(spec)).returncode == 0 and progress.read_text() == ""
    if importlib.util.find_spec("vllm") is None:
        spec.write_text(json.dumps({**base, "in_process": True}))
        assert run("moekern.e2e.grid_child", str(spec)).returncode == 3
        offline = tmp_path / "offline.spec.json"
        offline.write_text(json.dumps({"engine": {}}))
        proc = run("moekern.e2e.offline", str(offline))
        assert proc.returncode == 1 and "No module named 'vllm'" in proc.stderr


def test_model_configs_ship_as_package_data():
    """Every committed moekern/e2e/configs/*/config.json matches pyproject's package-data globs (so an installed
    moekern e2e finds its models), and make_configs.config_path names the same files."""
    import fnmatch

    text = (REPO / "pyproject.toml").read_text()
    section = text.split("[tool.setuptools.package-data]", 1)[1].split("\n[", 1)[0]
    globs = json.loads(section.split("moekern =", 1)[1].strip().splitlines()[0])
    pkg = REPO / "moekern"
    files = sorted((pkg / "e2e" / "configs").glob("*/config.json"))
    assert len(files) == len(make_configs.MODELS)
    for f in files:
        rel = f.relative_to(pkg).as_posix()
        assert any(fnmatch.fnmatchcase(rel, g) and g.count("/") == rel.count("/") for g in globs), rel
        assert make_configs.config_path(f.parent.name) == f
