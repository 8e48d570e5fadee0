"""pytest-benchmark set-up shared by benchmarks/bench_*.py: the same shapes, providers, checks and timing
as `moekern bench` (moekern.bench), one pytest-benchmark group per shape.

    pytest benchmarks/ --benchmark-json=bench.json [--benchmark-only]

How a measurement is reported: moekern.bench.timing times the call (CUDA graph of back-to-back calls,
CUDA events, rotating inputs for small ops); those numbers (median/min/max µs, method, roofline
fraction, speedup over vLLM when vLLM ran earlier in the session) go to benchmark.extra_info and are the
ones to quote. pytest-benchmark's own statistics come from benchmark.pedantic over one graph replay
followed by torch.cuda.synchronize(), so they include a launch+sync (~10 µs) that the extra_info
numbers do not; they are there so --benchmark-compare and the usual tables work.
Without a GPU every benchmark is skipped.
"""

from __future__ import annotations

import gc

import pytest
import torch

HAS_GPU = torch.cuda.is_available()


def pytest_collect_file(file_path, parent):
    # The files are named bench_*.py (house style); collect them without touching the project's ini.
    if file_path.suffix == ".py" and file_path.name.startswith("bench_"):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def pytest_collection_modifyitems(config, items):
    if HAS_GPU:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (moekern bench runs a CPU demo instead)")
    for item in items:
        item.add_marker(skip)


class _Session:
    """Inputs of one (op, model) at a time (DeepSeek-V3's weights are 22 GB), reference per shape,
    ceilings measured once, vLLM medians for the speedup column."""

    def __init__(self):
        self.key = None
        self.inputs = None
        self.ref_shape = None
        self.ref = None
        self.ceilings = None
        self.vllm_us: dict[str, float] = {}

    def inputs_for(self, shape, max_tokens):
        from moekern.bench.shapes import make_inputs

        key = (shape.op, shape.model)
        if key != self.key:
            self.inputs = self.ref = self.ref_shape = None
            gc.collect()
            torch.cuda.empty_cache()
            self.inputs, self.key = make_inputs(shape, max_tokens, "cuda"), key
        return self.inputs.first(shape.num_tokens)

    def reference(self, shape, inp):
        from moekern.bench.providers import reference_output

        if shape != self.ref_shape:
            self.ref, self.ref_shape = reference_output(shape, inp), shape
        return self.ref


@pytest.fixture(scope="session")
def bench_session():
    from moekern.bench.runner import measure_ceilings

    s = _Session()
    s.ceilings = measure_ceilings("cuda")
    return s


def pytest_generate_tests(metafunc):
    """bench_case is (shape, provider name) over the op's shapes (module attribute OP) and providers."""
    if "bench_case" not in metafunc.fixturenames:
        return
    from moekern.bench.providers import PROVIDER_NAMES, get_providers
    from moekern.bench.shapes import bench_shapes

    op = metafunc.module.OP
    cases = [(s, p.name) for s in bench_shapes((op,)) for p in get_providers(op, PROVIDER_NAMES)]
    # vLLM first within a shape, so the others can report their speedup over it
    cases.sort(key=lambda c: (c[1] != "vllm",))
    cases.sort(key=lambda c: bench_shapes((op,)).index(c[0]))
    metafunc.parametrize("bench_case", cases, ids=[f"{s.key}/{p}" for s, p in cases])


def run_case(benchmark, bench_session, bench_case):
    """Check, time and report one (shape, provider); skip if unavailable, fail if wrong."""
    from moekern.bench.providers import get_providers
    from moekern.bench.runner import measure_one
    from moekern.bench.shapes import bench_shapes

    shape, name = bench_case
    provider = get_providers(shape.op, (name,))[0]
    max_tokens = max(s.num_tokens for s in bench_shapes((shape.op,), (shape.model,)))
    reason = provider.unavailable(shape, torch.device("cuda"))
    if reason:
        pytest.skip(reason)
    inp = bench_session.inputs_for(shape, max_tokens)
    ref = bench_session.reference(shape, inp)
    row = measure_one(shape, provider, inp, ref, "cuda", ceilings=bench_session.ceilings)
    if row["status"] == "skipped":
        pytest.skip(row["reason"])
    if row["status"] != "ok":
        pytest.fail(f"{name} on {shape.key}: {row['status']}: {row['reason']}")
    if name == "vllm":
        bench_session.vllm_us[shape.key] = row["median_us"]
    elif shape.key in bench_session.vllm_us:
        row["speedup_vs_vllm"] = bench_session.vllm_us[shape.key] / row["median_us"]
    benchmark.group = shape.key
    benchmark.extra_info.update({k: v for k, v in row.items() if k not in ("timing",)})
    benchmark.extra_info["timing"] = row["timing"]
    fn = provider.prepare(shape, inp)

    def synced():
        fn()
        torch.cuda.synchronize()

    benchmark.pedantic(synced, rounds=20, iterations=1, warmup_rounds=2)
