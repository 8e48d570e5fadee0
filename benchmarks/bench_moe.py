"""pytest-benchmark: bf16 fused MoE experts (w13/w2, SiLU-and-mul), given the routing, every provider, one group per shape.

    pytest benchmarks/bench_moe.py --benchmark-json=bench_moe.json

Shapes and providers come from moekern.bench (the same as `moekern bench --ops moe`); see conftest.py.
"""

from conftest import run_case

OP = "moe"


def test_moe(benchmark, bench_session, bench_case):
    run_case(benchmark, bench_session, bench_case)
