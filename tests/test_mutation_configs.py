"""The mutation campaign's configs (tools/mutation/*.cfg) select the tests they say they select.

Each config's `pytest_add_cli_args_test_selection` is collected by pytest itself (one subprocess, every config
in turn) and the hypothesis tests it would run are compared with the ones it means to keep: a `-k "not
property"` reads as "no hypothesis" but lets through every @given test whose name lacks the word
(test_align_properties, test_permute_then_unpermute_is_identity, ...), each of which multiplies the time of
every mutant it covers. hypothesis marks each @given test `hypothesis`, so `-m "not hypothesis"` is exact.
"""

from __future__ import annotations

import configparser
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "tools" / "mutation").glob("*.cfg"))

# The hypothesis tests a config runs on purpose: fast ones that judge the mutated module best.
KEPT = {
    # 60 examples over numpy vectors against brute-force definitions of every metric
    "metrics.cfg": {"tests/test_analysis_metrics.py::test_properties_against_brute_force"},
    # the serializer against an independent reference, the schema's main judge (a mutant takes ~0.5 s with them)
    "gatelog-schema.cfg": {
        "tests/test_gatelog_schema.py::test_serializer_equals_the_reference_and_round_trips",
        "tests/test_gatelog_writer.py::test_python_step_lines_equal_an_independent_reference",
        "tests/test_gatelog_writer.py::test_cpp_formatter_equals_the_python_serializer",
        "tests/test_analysis_metrics.py::test_properties_against_brute_force",
    },
    # the selection its survivors.md section was made with (its `-k` matches "reference" in their names)
    "routing-reference.cfg": {
        "tests/test_routing.py::test_property_reference_invariants",
        "tests/test_routing.py::test_property_triton_matches_reference",
    },
}

_COLLECT = r"""
import json, sys
import pytest

class Recorder:
    def __init__(self):
        self.hyp = []
    def pytest_collection_finish(self, session):
        self.hyp = sorted({i.nodeid.split("[")[0] for i in session.items if i.get_closest_marker("hypothesis")})

out = {}
for name, args in json.loads(sys.argv[1]).items():
    rec = Recorder()
    code = pytest.main(["--collect-only", "-q", "-p", "no:cacheprovider", *args], plugins=[rec])
    out[name] = {"code": int(code), "hypothesis": rec.hyp}
print("RESULT " + json.dumps(out))
"""


def _selection(cfg: Path) -> list[str]:
    parser = configparser.ConfigParser()
    parser.read(cfg)
    return parser["mutmut"].get("pytest_add_cli_args_test_selection", "").split("\n")


def test_every_config_runs_only_the_hypothesis_tests_it_means_to():
    assert CONFIGS, "no tools/mutation/*.cfg found"
    selections = {cfg.name: [a for a in _selection(cfg) if a] for cfg in CONFIGS}
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-c", _COLLECT, json.dumps(selections)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert line, f"collection did not finish:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    got = json.loads(line[0][len("RESULT "):])
    for name, res in got.items():
        assert res["code"] == 0, f"{name}: its test selection does not collect (pytest exit code {res['code']})"
    wrong = {name: sorted(set(res["hypothesis"]) ^ KEPT.get(name, set())) for name, res in got.items()}
    wrong = {name: diff for name, diff in wrong.items() if diff}
    assert not wrong, f"hypothesis tests run but not meant to, or meant to but not run: {wrong}"


# ------------------------------------------------------------------------------------------ kernel mutants
def _kernel_mutants():
    sys.path.insert(0, str(ROOT / "tools" / "mutation"))
    try:
        import kernel_mutants
    finally:
        sys.path.pop(0)
    return kernel_mutants


def test_kernel_mutants_apply_to_the_sources():
    """Each planted kernel bug still finds its line exactly once: an edited kernel must not leave a mutant that
    silently changes nothing (or two places) on the next GPU run."""
    assert _kernel_mutants().check_sources() == []


@pytest.mark.parametrize("name", [m.name for m in _kernel_mutants().MUTANTS if not m.hip_only])
def test_kernel_mutant_selects_gpu_tests(name):
    """The tests a kernel mutant runs exist and are GPU tests (collected here, skipped without a GPU): a selection
    that collects nothing would report no verdict on the GPU machine."""
    mutant = next(m for m in _kernel_mutants().MUTANTS if m.name == name)
    proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "-m",
                           "gpu", *mutant.tests], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    collected = [line for line in proc.stdout.splitlines() if "::" in line]
    assert len(collected) >= 3, proc.stdout[-2000:]


def test_kernel_mutants_refuse_a_work_folder_that_holds_or_sits_in_the_checkout(tmp_path):
    km = _kernel_mutants()
    assert "would be deleted" in km.check_work_dir(ROOT)
    assert "would be deleted" in km.check_work_dir(ROOT.parent)
    assert "copy itself" in km.check_work_dir(ROOT / "tools" / "mutation" / "scratch")
    assert km.check_work_dir(tmp_path / "mutants") is None
    assert km.main(["--work", str(ROOT)]) == 2 and (ROOT / ".git").exists()
