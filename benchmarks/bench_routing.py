"""pytest-benchmark: fused top-k routing (softmax top-k; DeepSeek-V3 grouped sigmoid top-k with bias), every provider, one group per shape.

    pytest benchmarks/bench_routing.py --benchmark-json=bench_routing.json

Shapes and providers come from moekern.bench (the same as `moekern bench --ops routing`); see conftest.py.
"""

from conftest import run_case

OP = "routing"


def test_routing(benchmark, bench_session, bench_case):
    run_case(benchmark, bench_session, bench_case)
