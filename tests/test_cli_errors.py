"""Every user mistake on the command line: exit code 2, one line on stderr that names the argument, no traceback.

The table below drives every subcommand that `moekern --help` lists (a test fails when a new command has no
case) with a bad path, a bad name, a bad number and a corrupt or empty file where the command reads one.
In-process through `moekern.cli.main` (fast); two cases run the installed entry point in a subprocess to
check what a shell sees, and `--debug` shows the traceback instead of the line.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from moekern.analysis.datasets.synthetic import write_synthetic_gate_log
from moekern.cli import build_parser, main

# (argv with {g}: an 8-expert gate-log folder, {t}: a folder of fixtures, {nope}: a path that does not exist,
#  {repo}: the checkout; what stderr must name, or None: not a mistake, exit 0)
CASES = [
    # bench
    ("bench --ops gemm", "--ops gemm"),
    ("bench --models bogus", "bogus"),
    ("bench --tokens x", "argument --tokens: 'x'"),
    ("bench --providers cutlass", "--providers cutlass"),
    ("bench --block-sizes 0", "--block-sizes"),
    # bench-history
    ("bench-history {nope}", "{nope}"),
    ("bench-history {repo}/benchmarks/results --plot {nope}/h.png", "{nope}/h.png: No such file or directory"),
    # models
    ("models --model bogus", "argument --model: unknown model 'bogus'"),
    ("models --gpus 0", "argument --gpus: '0'"),
    ("models --write-config {t}/cfg", "--write-config"),
    # metrics
    ("metrics {nope}", "argument path: '{nope}' does not exist"),
    ("metrics {g} --phase bogus", "argument --phase: 'bogus'"),
    ("metrics {g} --ep-size 3", "ep_size=3"),
    ("metrics {g} --ep-size 0", "argument --ep-size: '0'"),
    ("metrics {g} --max-tokens many", "argument --max-tokens: 'many'"),
    ("metrics {t}/corrupt.jsonl", "'{t}/corrupt.jsonl' (2 lines skipped)"),
    ("metrics {t}/empty.jsonl", "'{t}/empty.jsonl'"),
    ("metrics {g} --phase prefill --no-filter --ep-size 2 --placement {t}/bad.json", "--placement '{t}/bad.json'"),
    ("metrics {g} --ep-size 2 --placement bogus", "--placement 'bogus'"),
    ("metrics {g} --placement round_robin", "--placement 'round_robin' needs --ep-size"),
    ("metrics --bench {t}/bad.json", "'{t}/bad.json'"),
    ("metrics --bench {t}/empty_dir", None),  # an empty results folder is not a mistake: no runs, exit 0
    # steptimes
    ("steptimes {nope}", "argument path: '{nope}'"),
    ("steptimes {g} --phase bogus", "argument --phase: 'bogus'"),
    ("steptimes {g} --gap-s 0", "--gap-s"),
    # datasets generate
    ("datasets generate --num 0 --out {t}/ds", "argument --num: '0'"),
    ("datasets generate --num 2 --out {t}/ds --prompts x", "argument --prompts: 'x'"),
    # predict
    ("predict {nope}", "'{nope}' does not exist"),
    ("predict {t}/corrupt.jsonl", "'{t}/corrupt.jsonl' holds no prompts"),
    ("predict {t}/empty.jsonl", "'{t}/empty.jsonl' holds no prompts"),
    # validate
    ("validate {nope} {g}", "argument datasets_dir: '{nope}'"),
    ("validate {t}/empty_dir {g}", "'{t}/empty_dir'"),
    ("validate {t}/empty_dir {g} --n-boot 0", "argument --n-boot: '0'"),
    # placement
    ("placement {nope} --ep-size 2", "argument path: '{nope}'"),
    ("placement {g} --ep-size 3", "ep_size=3"),
    ("placement {g} --ep-size two", "argument --ep-size: 'two'"),
    ("placement {g} --ep-size 2 --model bogus", "argument --model: unknown model 'bogus'"),
    ("placement {g} --ep-size 2 --train-frac 2", "argument --train-frac: '2'"),
    ("placement {g} --ep-size 2 --max-tokens 1", "need >= 2 steps after the max_tokens=1 filter; got 0"),
    ("placement {t}/corrupt.jsonl --ep-size 2", "'{t}/corrupt.jsonl'"),
    ("placement {g} --ep-size 2 --out {nope}/advice.json", "--out '{nope}/advice.json'"),
    # sweep
    ("sweep {nope}", "argument spec: '{nope}'"),
    ("sweep {t}/bad.yaml", "'{t}/bad.yaml' is not valid YAML"),
    ("sweep {t}/no_grid.yaml --dry-run", "missing 'grid'"),
    # report
    ("report {nope}", "argument results_dir: '{nope}'"),
    ("report {t}/corrupt.jsonl", "argument results_dir: '{t}/corrupt.jsonl' is a file"),
    ("report {t}/empty_dir --out {t}/r.html", "results_dir='{t}/empty_dir' holds no bench result"),
    ("report --ep-size x", "argument --ep-size: 'x'"),
    ("report --metadata {nope}", "argument --metadata: '{nope}'"),
    ("report {t}/empty_dir --metadata {t}/bad.json --out {t}/r.html", "metadata='{t}/bad.json' is not valid JSON"),
    # profile
    ("profile trace {nope}", "argument trace: '{nope}'"),
    ("profile trace {t}/bad.json", "trace '{t}/bad.json' is not a Chrome-trace JSON"),
    ("profile trace {t}/empty.jsonl", "trace '{t}/empty.jsonl'"),
    ("profile torch --model bogus", "argument --model: unknown model 'bogus'"),
    ("profile run --tokens 0", "argument --tokens: '0'"),
    # coactivation
    ("coactivation {nope} --ep-size 2", "argument path: '{nope}'"),
    ("coactivation {g} --ep-size 3", "ep_size=3"),
    ("coactivation {g} --ep-size 0", "argument --ep-size: '0'"),
    ("coactivation {t}/corrupt.jsonl --ep-size 2", "'{t}/corrupt.jsonl'"),
    ("coactivation {g} --ep-size 2 --plot {t}/coact.png", "--plot '{t}/coact.png': no record under '{g}' carries "
                                                         "topk_sample"),
    # factorial
    ("factorial {nope}", "argument spec: '{nope}'"),
    ("factorial {t}/bad.yaml", "'{t}/bad.yaml' is not valid YAML"),
    ("factorial {t}/no_grid.yaml --dry-run", "'factors'"),
    ("factorial {t}/bad.yaml --reps 0", "argument --reps: '0'"),
    ("factorial {t}/bad.yaml --analyze {nope}", "argument --analyze: '{nope}'"),
    # recommend
    ("recommend --model bogus", "argument --model: unknown model 'bogus'"),
    ("recommend --model mixtral --gpus 0", "argument --gpus: '0'"),
    ("recommend --model mixtral --gate-log {nope}", "argument --gate-log: '{nope}'"),
    ("recommend --model mixtral --predictor {nope}", "--predictor '{nope}'"),
    ("recommend --model mixtral --retrain {nope}", "argument --retrain: '{nope}'"),
    ("recommend --model mixtral --retrain {t}/empty_dir --predictor {t}/p.joblib", "'{t}/empty_dir'"),
    ("coactivation {g} --ep-size 2 --out {nope}/c.json", "{nope}/c.json: No such file or directory"),
    # project
    ("project {nope} --model mixtral", "argument gate_log: '{nope}'"),
    ("project {g} --model bogus", "argument --model: unknown model 'bogus'"),
    ("project {g} --model mixtral --nodes a,b", "argument --nodes: 'a,b'"),
    ("project {g} --model mixtral --nodes 0", "argument --nodes: '0'"),
    ("project {g} --model mixtral --json --plot {nope}/p.png", "{nope}/p.png: No such file or directory"),
    ("project {t}/corrupt.jsonl --model mixtral", "'{t}/corrupt.jsonl'"),
    ("project {g} --model deepseek-v3", "gate log has 8 experts but model='deepseek-v3' has 256"),
    ("project {g} --model mixtral --nodes 2,4", "--nodes 2,4: no projection for 2 node(s) = 16 GPUs, 4 node(s) = "
                                                "32 GPUs: mixtral has E=8 experts"),
    # diffusion
    ("diffusion generate --model bogus --prompt-ids 1", "argument --model: unknown model 'bogus'"),
    ("diffusion generate --prompt-ids 1 --steps 0", "argument --steps: '0'"),
    ("diffusion compare --ar {nope} --diffusion {g}", "argument --ar: '{nope}'"),
    ("diffusion compare --ar {g} --diffusion {g} --ar-phase bogus", "argument --ar-phase: 'bogus'"),
    # e2e (its flags are checked by moekern.e2e.args.check_args: argparse's one line as well)
    ("e2e --model bogus", "argument --model: invalid choice: 'bogus'"),
    ("e2e --rounds 0", "--rounds=0 must be >= 1"),
    ("e2e --dataset {nope} --plan-only", "--dataset '{nope}' is not a file"),
    # the gate-log readers' flags (--combine-ranks, --definition)
    ("metrics {g} --combine-ranks bogus", "argument --combine-ranks: invalid choice: 'bogus'"),
    ("metrics {g} --definition seed --max-tokens 5", "--definition seed fixes its own token filter"),
    ("placement {g} --ep-size 2 --combine-ranks bogus", "argument --combine-ranks"),
]


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
    t = tmp_path_factory.mktemp("cli_errors")
    write_synthetic_gate_log(t / "g" / "gate_log.rank0.jsonl", num_steps=12, num_experts=8)
    (t / "corrupt.jsonl").write_text('not json\n{"schema": "moekern.gatelog/1", "step": -1}\n')
    (t / "empty.jsonl").write_text("")
    (t / "bad.yaml").write_text("grid: [\n")
    (t / "no_grid.yaml").write_text("command: echo {x}\n")
    (t / "bad.json").write_text("{nope")
    (t / "empty_dir").mkdir()
    return {"g": str(t / "g"), "t": str(t), "nope": str(t / "nope"),
            "repo": str(Path(__file__).resolve().parents[1])}


def _argv(case: str, fx: dict) -> list[str]:
    return [part.format(**fx) for part in case.split()]


def _commands(parser, prefix=()) -> set[tuple[str, ...]]:
    """Every leaf subcommand of the parser, as a tuple of words (('metrics',), ('datasets', 'generate'), ...)."""
    import argparse

    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        return {prefix}
    out = set()
    for name, sub in subs[0].choices.items():
        out |= _commands(sub, prefix + (name,))
    return out


def test_every_subcommand_has_a_case():
    covered = set()
    for case, _ in CASES:
        words = case.split()
        covered.add(tuple(words[:2]) if words[0] in ("datasets", "profile", "diffusion") else (words[0],))
    # the profile tools ncu/nsys/rocprof share `profile torch`'s options; diffusion bench shares generate's
    missing = _commands(build_parser()) - covered - {("profile", t) for t in ("ncu", "nsys", "rocprof")} \
        - {("diffusion", "bench")}
    assert not missing, f"no bad-input case for: {sorted(' '.join(m) for m in missing)}"


@pytest.mark.parametrize("case,named", CASES, ids=[c for c, _ in CASES])
def test_user_mistake_is_one_line_and_exit_2(case, named, fixtures, capsys):
    rc = main(_argv(case, fixtures))
    err = capsys.readouterr().err
    if named is None:
        assert rc == 0 and "Traceback" not in err
        return
    lines = err.strip().splitlines()
    assert rc == 2, (case, err)
    assert len(lines) == 1 and "Traceback" not in err, err
    words = case.split()
    cmd = " ".join(words[:2]) if words[0] in ("datasets", "profile", "diffusion") else words[0]
    assert lines[0].startswith(f"moekern {cmd}: ") or (cmd == "bench-history" and lines[0].startswith("moekern ")), \
        lines[0]
    assert named.format(**fixtures) in lines[0], (named, lines[0])


def test_debug_shows_the_traceback_of_a_usage_error(fixtures):
    from moekern.errors import UsageError

    with pytest.raises(UsageError, match="ep_size=3"):
        main(["--debug", *_argv("placement {g} --ep-size 3", fixtures)])


@pytest.mark.parametrize("case,named", [("metrics {g} --ep-size 3", "ep_size=3 must be >= 1 and divide"),
                                        ("placement {g} --ep-size 2 --model bogus", "unknown model 'bogus'")])
def test_shell_sees_one_line_and_exit_2(case, named, fixtures):
    proc = subprocess.run([sys.executable, "-m", "moekern.cli", *_argv(case, fixtures)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and named in lines[0] and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stdout == ""


def test_placement_map_file_is_read(fixtures, tmp_path, capsys):
    # the checks on --placement must not refuse a valid map (`moekern placement --out` writes one)
    path = tmp_path / "map.json"
    path.write_text(json.dumps({"recommended": {"expert_to_rank": [1, 1, 1, 1, 0, 0, 0, 0]}}))
    assert main(["metrics", fixtures["g"], "--ep-size", "2", "--placement", str(path), "--json"]) == 0
    contiguous = tmp_path / "c.json"
    contiguous.write_text(json.dumps({"expert_to_rank": [0, 0, 0, 0, 1, 1, 1, 1]}))
    out = json.loads(capsys.readouterr().out)
    assert main(["metrics", fixtures["g"], "--ep-size", "2", "--placement", str(contiguous), "--json"]) == 0
    out_c = json.loads(capsys.readouterr().out)
    # the swapped map moves every expert to the other rank: the same loads, ranks swapped
    assert out["rank_load"]["rank_tokens"] == pytest.approx(out_c["rank_load"]["rank_tokens"][::-1])


def test_refused_plot_writes_no_file(fixtures):
    assert main(_argv("coactivation {g} --ep-size 2 --plot {t}/coact.png", fixtures)) == 2
    assert not (Path(fixtures["t"]) / "coact.png").exists()


def test_project_names_the_node_counts_it_cannot_place(fixtures, tmp_path, capsys):
    # Mixtral's 8 experts fill 8 GPUs (1 node); 16 and 32 GPUs cannot each hold a whole number of them
    png = tmp_path / "p.png"
    assert main(_argv("project {g} --model mixtral --nodes 1,2,4 --plot", fixtures) + [str(png)]) == 0
    out = capsys.readouterr().out
    assert "note: no projection for 2 node(s) = 16 GPUs, 4 node(s) = 32 GPUs: mixtral has E=8" in out
    rows = [line.split() for line in out.splitlines() if line.strip().startswith(("8 ", "16 ", "32 "))]
    assert {r[0] for r in rows} == {"8"} and png.stat().st_size > 1000
    assert main(_argv("project {g} --model mixtral --nodes 1,2 --json", fixtures)) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["info"]["nodes_left_out"] == [2] and "note: no projection" in captured.err
