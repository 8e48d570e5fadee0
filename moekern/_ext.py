"""Finds what this machine can run: the compiled extension moekern._C, Triton, a GPU.

Backends are chosen by argument (`backend="auto"|"torch"|"triton"|"cuda"`); this module only answers
whether one is available and, if not, why, so that errors can say so.
"""

from __future__ import annotations

import importlib.util
import os

import torch

BACKENDS = ("auto", "torch", "triton", "cuda")


def _probe_extension() -> tuple[str | None, bool]:
    try:
        from moekern import _C  # noqa: F401  (registers torch.ops.moekern.*)
    except ImportError as exc:
        return (f"moekern._C is not built ({exc}); reinstall with `pip install --no-build-isolation -e .` "
                "on a GPU machine"), False
    return None, bool(torch.ops.moekern.has_device_kernels())


def _probe_triton() -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed; `pip install triton`"
    return None


# Probed once, at import, as plain module constants: torch.compile then reads them as constants
# instead of tracing an op call or a functools.cache wrapper inside a compiled region.
_EXTENSION_ERROR, _DEVICE_KERNELS = _probe_extension()
_TRITON_ERROR = _probe_triton()


def extension_error() -> str | None:
    """None when moekern._C imports, else the reason it does not."""
    return _EXTENSION_ERROR


def has_op(name: str) -> bool:
    """Whether moekern._C registers torch.ops.moekern.<name> (a _C built before the op existed must still import)."""
    if _EXTENSION_ERROR is not None:
        return False
    try:
        getattr(torch.ops.moekern, name)
    except (AttributeError, RuntimeError):
        return False
    return True


def cuda_kernels_available() -> bool:
    """True when moekern._C was built with device (CUDA or HIP) kernels."""
    return _DEVICE_KERNELS


def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_error() -> str | None:
    """None when triton is installed, else the reason it is not usable."""
    return _TRITON_ERROR


def backend_unavailable_reason(backend: str, device: torch.device) -> str | None:
    """Why `backend` cannot run on tensors on `device`, or None if it can."""
    if backend == "torch":
        return None
    if backend == "triton":
        if triton_error():
            return triton_error()
        if device.type == "cuda" or interpreting():
            return None
        return f"the triton backend needs CUDA tensors (or TRITON_INTERPRET=1 on CPU); got device={device}"
    if backend == "cuda":
        if device.type != "cuda":
            return f"the cuda backend needs CUDA/HIP tensors; got device={device}"
        if extension_error():
            return extension_error()
        if not cuda_kernels_available():
            return "moekern._C was built without device kernels (CPU-only build); rebuild on a GPU machine"
        return None
    raise ValueError(f"backend={backend!r} must be one of {BACKENDS}")


def resolve_backend(backend: str, device: torch.device, *, cuda_ok: bool = True, triton_ok: bool = True) -> str:
    """Turn "auto" into a concrete backend; check an explicit one. Raises ValueError/RuntimeError.

    cuda_ok / triton_ok let a caller rule a backend out for the given arguments (a size it does not cover).
    """
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} must be one of {BACKENDS}")
    if backend == "auto":
        if device.type == "cuda":
            if cuda_ok and backend_unavailable_reason("cuda", device) is None:
                return "cuda"
            if triton_ok and backend_unavailable_reason("triton", device) is None:
                return "triton"
        return "torch"
    reason = backend_unavailable_reason(backend, device)
    if reason is not None:
        raise RuntimeError(f"backend={backend!r} is unavailable on this machine: {reason}")
    return backend
