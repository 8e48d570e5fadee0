"""Shared test set-up: GPU marker, and the Triton interpreter on machines without a GPU.

TRITON_INTERPRET must be set before any @triton.jit kernel is defined, so it is set here, before the
tests import moekern's kernels.

On a machine with a GPU, a moekern._C without device kernels (setup.py falls back to a CPU build of the
bindings when it finds no nvcc) is a broken build, not a reason to skip: every cuda-backend test would skip
and the GPU run would look green. There, a `gpu` test that skips fails instead, naming the build
(tests/test_build.py::test_gpu_machine_has_device_kernels says the same once).
"""

import os

import torch

HAS_GPU = torch.cuda.is_available()
if not HAS_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def missing_device_kernels() -> str | None:
    """Why moekern._C cannot run on this GPU machine's tensors, or None (also None without a GPU)."""
    if not HAS_GPU:
        return None
    from moekern import _ext

    if _ext.extension_error() is not None:
        return _ext.extension_error()
    if not _ext.cuda_kernels_available():
        return "moekern._C was built without device kernels (a CPU-only build: was nvcc found?)"
    return None


def pytest_collection_modifyitems(config, items):
    if HAS_GPU:
        return
    skip = pytest.mark.skip(reason="needs a CUDA/ROCm GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.skipped and HAS_GPU and "gpu" in item.keywords:
        reason = missing_device_kernels()
        if reason is not None:
            report.outcome = "failed"
            report.longrepr = f"a GPU is present but {reason}: this gpu test would have skipped; rebuild moekern._C"


@pytest.fixture
def device():
    return "cuda" if HAS_GPU else "cpu"
