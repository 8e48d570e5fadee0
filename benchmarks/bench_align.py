"""pytest-benchmark: moe_align_block_size-style alignment of topk_ids into expert blocks, every provider, one group per shape.

    pytest benchmarks/bench_align.py --benchmark-json=bench_align.json

Shapes and providers come from moekern.bench (the same as `moekern bench --ops align`); see conftest.py.
"""

from conftest import run_case

OP = "align"


def test_align(benchmark, bench_session, bench_case):
    run_case(benchmark, bench_session, bench_case)
