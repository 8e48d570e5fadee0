"""Write the build.ninja of FlashInfer's sm90 CUTLASS fused-MoE module on a machine without a GPU.

FlashInfer builds `fused_moe_90` (about 180 CUTLASS translation units) with nvcc on its first call; on the GPU
machine that takes longer than a whole device session (> 15 min on 16 cores, unfinished). This script asks FlashInfer's own JIT
code for the very sources, flags and link line it would use there, without importing the parts of FlashInfer
that need a GPU, CUDA libraries or Python 3.12 (apache-tvm-ffi's extension module is built for CPython >= 3.12;
only its pure-Python `libinfo`, which names the header directories, is loaded). tools/gpu/flashinfer_aot.sh
runs it and then ninja; the result is loaded on the GPU machine as an ahead-of-time module
(flashinfer/data/aot/fused_moe_90/fused_moe_90.so), which FlashInfer prefers to JIT compiling.

    python tools/gpu/flashinfer_aot_ninja.py SRC_DIR   # SRC_DIR: the unpacked flashinfer + tvm_ffi wheels
Prints the path of build.ninja. Environment: FLASHINFER_WORKSPACE_BASE (where FlashInfer's cache goes),
CUDA_HOME, FLASHINFER_EXTRA_CUDAFLAGS/CFLAGS/LDFLAGS (as FlashInfer reads them).
"""

from __future__ import annotations

import importlib.util
import os
import sys
import types
from pathlib import Path


def _stub_package(name: str, path: Path) -> types.ModuleType:
    """A package object for name whose submodules load from path, without running its __init__."""
    mod = types.ModuleType(name)
    mod.__path__ = [str(path)]
    sys.modules[name] = mod
    return mod


def write_ninja(src: Path) -> Path:
    os.environ["FLASHINFER_CUDA_ARCH_LIST"] = "9.0a"
    for pkg in ("flashinfer", "tvm_ffi"):
        if not (src / pkg).is_dir():
            raise SystemExit(f"{src / pkg} is missing: unpack the {pkg} wheel into {src} first")
    tvm = _stub_package("tvm_ffi", src / "tvm_ffi")
    spec = importlib.util.spec_from_file_location("tvm_ffi.libinfo", src / "tvm_ffi" / "libinfo.py")
    libinfo = importlib.util.module_from_spec(spec)
    sys.modules["tvm_ffi.libinfo"] = libinfo
    spec.loader.exec_module(libinfo)
    tvm.libinfo = libinfo
    _stub_package("flashinfer", src / "flashinfer")
    from flashinfer.jit import fused_moe  # noqa: E402  (after the stubs, by design)

    jit_spec = fused_moe.gen_cutlass_fused_moe_sm90_module()
    jit_spec.write_ninja()
    return Path(jit_spec.ninja_path)


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    print(write_ninja(Path(argv[0]).resolve()))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
