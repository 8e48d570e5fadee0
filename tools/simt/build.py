"""Build the CPU emulation of moekern's CUDA kernels (tools/simt/simt_emulation.h has the why).

The .cu sources are compiled as C++20 by the host compiler, unchanged except for one textual rewrite: a launch
``kernel<<<grid, block, smem, stream>>>(args)`` becomes ``::mk_simt::Launch(grid, block, smem, stream)(kernel,
args)``, the one piece of CUDA syntax no header can stand in for. The library is cached by a hash of every
input, outside the source tree.

    python tools/simt/build.py            # prints both libraries' paths, wave 32 and 64 (builds them if needed)

From Python: ``from tools.simt.build import library_path`` (tests/test_simt_kernels.py loads it with ctypes). Two
builds: wave 32 compiles the kernels' CUDA path, wave 64 their HIP path (wavefronts of 64, 64-bit lane masks, the
shuffle fallbacks), which no GPU here has ever run.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
# The kernels the emulator runs: every .cu file (routing, dispatch, the gate log's snapshot).
SOURCES = sorted((ROOT / "csrc").rglob("*.cu"))
# -fno-strict-aliasing: the kernels read rows through uint4/uint2 views, as CUDA allows; alignment: a misaligned
# vector load, which faults on a GPU, stops here too
FLAGS = ["-std=c++20", "-O1", "-fPIC", "-DMOEKERN_SIMT_EMULATION", "-fno-strict-aliasing", "-fsanitize=alignment",
         "-fno-sanitize-recover=alignment", "-Wno-unknown-pragmas", "-Wno-attributes"]
# callee (a name, maybe with template arguments holding no angle brackets of their own), then the launch
_LAUNCH = re.compile(r"([A-Za-z_][\w:]*(?:<[^<>;]*>)?)\s*<<<(.*?)>>>\s*\(", re.S)


class BuildError(RuntimeError):
    """The host compiler is missing or rejected a source."""


def rewrite_launches(text: str) -> str:
    """Every ``k<<<cfg>>>(args)`` of a .cu source as ``::mk_simt::Launch(cfg)(k, args)``."""

    def sub(m: re.Match) -> str:
        return f"::mk_simt::Launch({m.group(2)})({m.group(1)}, "

    out = _LAUNCH.sub(sub, text)
    if "<<<" in out:
        line = out[: out.index("<<<")].count("\n") + 1
        raise BuildError(f"a kernel launch at line {line} is not in the form kernel<<<...>>>(...)")
    return out


def compiler() -> str:
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
    if not cxx:
        raise BuildError("no C++ compiler found (set CXX); the SIMT emulation needs one with C++20")
    return cxx


def _flags(wave: int) -> list[str]:
    if wave not in (32, 64):
        raise BuildError(f"wave={wave} must be 32 (the CUDA path) or 64 (the HIP path)")
    return FLAGS + (["-DMOEKERN_SIMT_WAVE64"] if wave == 64 else [])


def _digest(cxx: str, wave: int) -> str:
    h = hashlib.sha256()
    h.update(" ".join([cxx, *_flags(wave)]).encode())
    for p in [*SOURCES, *sorted((ROOT / "csrc").rglob("*.h")), *sorted((ROOT / "csrc").rglob("*.cuh")),
              HERE / "simt_emulation.h", HERE / "entry.cpp", Path(__file__)]:
        h.update(str(p.relative_to(ROOT)).encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


def cache_dir() -> Path:
    base = os.environ.get("MOEKERN_SIMT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "moekern", "simt")
    return Path(base)


def library_path(wave: int = 32, jobs: int | None = None) -> Path:
    """The emulated kernels' shared library, built first if this source tree's build is not cached. wave 32: the
    CUDA path (warps of 32); wave 64: the HIP path (wavefronts of 64, MOEKERN_HIP's branches)."""
    cxx = compiler()
    flags = _flags(wave)
    out = cache_dir() / _digest(cxx, wave) / "libmoekern_simt.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        work = Path(tmp)
        units = []
        for src in SOURCES:
            unit = work / (src.parent.name + "_" + src.stem + ".cpp")  # one folder level names every source
            unit.write_text(f'#line 1 "{src.relative_to(ROOT)}"\n' + rewrite_launches(src.read_text()))
            units.append(unit)
        units.append(HERE / "entry.cpp")
        inc = ["-I", str(ROOT / "csrc"), "-I", str(HERE)]

        def compile_one(unit: Path) -> Path:
            obj = work / (unit.stem + ".o")
            r = subprocess.run([cxx, *flags, *inc, "-x", "c++", "-c", str(unit), "-o", str(obj)],
                               capture_output=True, text=True)
            if r.returncode != 0:
                raise BuildError(f"{unit.name}: {cxx} failed:\n{r.stderr[-4000:]}")
            return obj

        workers = jobs or max(1, min(len(units), os.cpu_count() or 1))
        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            objs = list(pool.map(compile_one, units))
        tmp_lib = work / out.name
        r = subprocess.run([cxx, "-shared", "-fsanitize=alignment", *[str(o) for o in objs], "-o", str(tmp_lib)],
                           capture_output=True, text=True)
        if r.returncode != 0:
            raise BuildError(f"link failed:\n{r.stderr[-4000:]}")
        os.replace(tmp_lib, out)  # atomic: a concurrent build finds a whole library or none
    return out


if __name__ == "__main__":
    try:
        for w in (32, 64):
            print(library_path(w))
    except BuildError as e:
        sys.exit(f"simt build: {e}")
