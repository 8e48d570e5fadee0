"""Build moekern._C from csrc/.

CUDA build when torch has CUDA and nvcc is found (arch list defaults to sm_80 and sm_90a; set
TORCH_CUDA_ARCH_LIST to override), HIP build when torch is a ROCm build (torch hipifies csrc/), and a
CPU build of the bindings alone otherwise (op schemas registered, no device kernels). Set
MOEKERN_NO_EXTENSION=1 to skip the extension entirely; the package then uses Triton or torch.
Installing never fails for want of a GPU toolchain: a failed extension build is reported and skipped.
"""

import glob
import os
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _sources(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern), recursive=True))


def _extensions():
    if os.environ.get("MOEKERN_NO_EXTENSION") == "1":
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension as ce
    except ImportError:
        print("moekern: torch not importable at build time; skipping moekern._C", file=sys.stderr)
        return [], {}

    include_dirs = [os.path.join(ROOT, "csrc")]
    # No -std for the host compiler: torch picks the standard its headers need (C++20 from torch 2.10 on).
    # Device files are torch-free and C++17.
    cxx_flags = ["-O3"]
    is_hip = torch.version.hip is not None
    has_cuda = torch.version.cuda is not None and ce.CUDA_HOME is not None
    # Host sources: bindings.cpp (the only file that includes torch) and the torch-free host code beside the
    # kernels (csrc/gatelog/format.cpp), compiled in every build, the CPU-only one included.
    host_sources = _sources("csrc/**/*.cpp")
    device_sources = _sources("csrc/**/*.cu")
    if is_hip or has_cuda:
        if has_cuda and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0a"
        nvcc_flags = ["-O3", "-std=c++17", "-DMOEKERN_WITH_DEVICE=1"]
        if has_cuda:
            nvcc_flags += ["--expt-relaxed-constexpr", "-lineinfo"]
        ext = ce.CUDAExtension(
            "moekern._C",
            sources=host_sources + device_sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags + ["-DMOEKERN_WITH_DEVICE=1"], "nvcc": nvcc_flags},
            extra_link_args=_cxx_runtime_link_args(),
        )
    else:
        ext = ce.CppExtension(
            "moekern._C",
            sources=host_sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=_cxx_runtime_link_args(),
        )
    return [ext], {"build_ext": _tolerant_build_ext(ce.BuildExtension)}


def _cxx_runtime_link_args() -> list[str]:
    """Link the C++ runtime torch itself runs on, by path, ahead of the compiler's own -lstdc++.

    A compiler whose lib/ holds only libstdc++.a (the H100 image's CXX=/opt/gcc/bin/g++) links a private,
    never-initialized copy of the C++ runtime into the extension; the first C++ error message that formats a
    number (TORCH_CHECK(..., "variant=", 7, ...)) then crashes in the locale code instead of raising. Naming
    the libstdc++.so.6 that this process has loaded (torch's) makes the extension use the shared one.
    """
    if not sys.platform.startswith("linux"):
        return []
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "/libstdc++.so.6" in line}
    except OSError:
        return []
    return [sorted(paths)[0]] if paths else []


def _tolerant_build_ext(base):
    class BuildExt(base):
        def run(self):
            try:
                super().run()
            except Exception as exc:  # a missing toolchain must not fail the install
                if os.environ.get("MOEKERN_REQUIRE_EXTENSION") == "1":
                    raise
                print(f"moekern: building moekern._C failed ({exc}); the package will use Triton/torch",
                      file=sys.stderr)

    return BuildExt


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
