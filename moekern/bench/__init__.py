"""`moekern bench`: providers (moekern cuda/triton/torch, vLLM, FlashInfer) on identical inputs.

shapes: the shape tables and input builders; providers: the provider registry, normalizers and the
reference checks; timing: CUDA-graph / CUDA-event timing and the measured ceilings; runner: check then
time every (shape, provider); report: JSON, table, plots; cli: the `moekern bench` command.
The pytest-benchmark files in benchmarks/ read the same shapes and providers.
"""
