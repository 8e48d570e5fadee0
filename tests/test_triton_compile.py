""".ci/triton_compile_check.py: the CPU-only check that every Triton kernel compiles for sm_90/sm_80.

The interpreter (TRITON_INTERPRET=1, what the CPU tests use) runs kernels the real compiler rejects. These
tests show that the check fails on such kernels - both bug classes that reached the H100 (a constexpr rebound
inside tl.static_range, a module-level int read in a kernel) and a config over the shared-memory budget -
while the interpreter accepts them, that it passes on well-formed kernels (a subset of moekern's own), and
that its selection of specializations deduplicates and caps as documented. The whole check on the tree
runs in .ci/run (about a minute), not here.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / ".ci" / "triton_compile_check.py"

BAD_KERNELS = textwrap.dedent('''
    import torch
    import triton
    import triton.language as tl

    SCALE = 3  # a plain module-level int: the interpreter reads it, the compiler refuses


    @triton.jit
    def _rebind_kernel(x_ptr, LOG: tl.constexpr):
        offs = tl.arange(0, 16)
        h = tl.load(x_ptr + offs)
        for stage in tl.static_range(1, LOG + 1):
            for step in tl.static_range(stage):
                j: tl.constexpr = stage - 1 - step  # rebound on every unrolled iteration
                h = h + j
        tl.store(x_ptr + offs, h)


    @triton.jit
    def _global_int_kernel(x_ptr):
        offs = tl.arange(0, 16)
        tl.store(x_ptr + offs, tl.load(x_ptr + offs) * SCALE)


    @triton.jit
    def _big_smem_kernel(a_ptr, b_ptr, c_ptr, K, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
        for k0 in range(0, K, BLOCK):
            a = tl.load(a_ptr + offs[:, None] * K + k0 + offs[None, :])
            b = tl.load(b_ptr + (k0 + offs[:, None]) * BLOCK + offs[None, :])
            acc = tl.dot(a, b, acc)
        tl.store(c_ptr + offs[:, None] * BLOCK + offs[None, :], acc.to(c_ptr.dtype.element_ty))


    @triton.jit
    def _good_kernel(x_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(x_ptr + offs, tl.load(x_ptr + offs, mask=offs < n) * 2, mask=offs < n)


    def drive(cap):
        x = torch.arange(16, dtype=torch.float32)
        # these run in the interpreter without error: the premise of the check
        _rebind_kernel[(1,)](x, LOG=3)
        _global_int_kernel[(1,)](x)
        _good_kernel[(1,)](x, 16, BLOCK=16)
        _good_kernel[(1,)](x.to(torch.float16), 10, BLOCK=16)
        RAN.append(True)
        cap.execute = False  # recorded only: 1 MiB of shared memory on a GPU, 256^3 numpy dots here
        y = torch.zeros(16, dtype=torch.bfloat16)
        _big_smem_kernel[(1,)](y, y, y, 1024, BLOCK=256, num_warps=8, num_stages=4)
        assert RAN


    RAN = []
''')


def _run(*args, timeout=240):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=ROOT)
    return proc.returncode, proc.stdout + proc.stderr


def _load_check():
    spec = importlib.util.spec_from_file_location("triton_compile_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _line(out: str, status: str, arch: int, kernel: str) -> str:
    hits = [ln for ln in out.splitlines()
            if ln.startswith(f"{status} ") and f" sm_{arch} " in ln and f".{kernel} " in ln]
    assert hits, f"no '{status} sm_{arch} ...{kernel}' line in:\n{out}"
    return hits[0]


def test_catches_what_the_interpreter_accepts(tmp_path):
    driver = tmp_path / "bad_kernels.py"
    driver.write_text(BAD_KERNELS)
    rc, out = _run("--ops", "none", "--driver", str(driver), "--arch", "90,80")
    assert rc == 1, out
    assert "FAIL capture" not in out, out  # the interpreter ran every one of them
    for arch in (90, 80):
        _line(out, "FAIL", arch, "_rebind_kernel")
        _line(out, "FAIL", arch, "_global_int_kernel")
        _line(out, "FAIL", arch, "_big_smem_kernel")
        _line(out, "ok  ", arch, "_good_kernel")
    assert "j is already defined. constexpr cannot be reassigned." in out
    assert "at _rebind_kernel (line 6 of its def): j: tl.constexpr = stage - 1 - step" in out
    assert "Cannot access global variable SCALE" in out
    assert "sm_90 allows 232448" in out and "sm_80 allows 166912" in out
    # two _good_kernel launches that specialize differently (fp32 / fp16, n % 16 == 0 or not): both compiled
    assert sum(1 for ln in out.splitlines() if ln.startswith("ok   sm_90") and "._good_kernel " in ln) == 2
    assert "compiled 4/10 ok" in out


def test_moekern_ep_kernels_compile():
    """A quick slice of the real check: the EP peer kernels (pointer tables cast in-kernel; the local reduce is
    moekern.dispatch's unpermute kernel writing into the peer region) for sm_90."""
    rc, out = _run("--ops", "ep", "--arch", "90", "--max-per-kernel", "2")
    assert rc == 0, out
    for kernel in ("_ep_dispatch_write_kernel", "_unpermute_kernel", "_ep_combine_pull_kernel"):
        _line(out, "ok  ", 90, kernel)
    assert "FAIL" not in out


def _launch(name, tags=(), **consts):
    params = [{"name": "x_ptr", "constexpr": False, "arg": {"tensor": "bfloat16", "aligned": True}},
              {"name": "n", "constexpr": False, "arg": {"value": consts.pop("n", 7)}}]
    params += [{"name": k, "constexpr": True, "arg": {"value": v}} for k, v in consts.items()]
    return {"module": "m", "name": name, "file": "m.py", "params": params, "options": {"num_warps": 4},
            "tags": list(tags)}


def test_select_dedupes_caps_and_covers():
    check = _load_check()
    launches = [_launch("_a_kernel", B=16, F=True, n=7), _launch("_a_kernel", B=16, F=True, n=9),  # same class
                _launch("_a_kernel", B=16, F=True, n=32),  # n % 16 == 0: specializes differently
                _launch("_a_kernel", B=32, F=False), _launch("_a_kernel", B=64, F=True),
                _launch("_a_kernel", B=16, F=True, tags=["hopper_only"])]
    chosen, stats = check.select(launches, cap_per_kernel=10)
    assert stats["m._a_kernel"]["distinct"] == 4 and stats["m._a_kernel"]["compiled"] == 4
    assert stats["m._a_kernel [hopper_only]"]["compiled"] == 1
    assert len(chosen) == 5
    chosen, stats = check.select(launches, cap_per_kernel=2)
    s = stats["m._a_kernel"]
    assert s["compiled"] == 2 and s["uncovered"], s  # capped, and what the cap left out is reported
    chosen, _ = check.select(launches[:1] * 5, cap_per_kernel=3)
    assert len(chosen) == 1


def test_every_moekern_kernel_is_found():
    check = _load_check()
    found = check.defined_kernels()
    for kid in ("moekern.routing.triton_topk._fused_topk_kernel", "moekern.dispatch.triton_ops._align_single_kernel",
                "moekern.experts.triton_gemm._grouped_gemm_kernel", "moekern.ep.peer._ep_combine_pull_kernel"):
        assert kid in found, sorted(found)


@pytest.mark.parametrize("bad_arch", ["75", "90,x"])
def test_bad_arguments(bad_arch):
    rc, out = _run("--arch", bad_arch, "--ops", "none", timeout=60)
    assert rc == 2 and "--arch" in out, out


def test_pdl_variants_one_per_flag_combination_and_the_wait_comes_first():
    """Each kernel with a PDL constexpr is compiled again for sm_90 with PDL=True and launch_pdl, once per combination
    of its other boolean constexprs; a PTX that touches global memory before griddepcontrol.wait is refused."""
    check = _load_check()

    def launch(name, persistent, block):
        return {"module": "m", "name": name, "file": "f", "tags": [], "options": {"num_warps": 4},
                "params": [{"name": "x", "constexpr": False, "arg": {"tensor": "bfloat16", "aligned": True}},
                           {"name": "PERSISTENT", "constexpr": True, "arg": {"value": persistent}},
                           {"name": "BLOCK", "constexpr": True, "arg": {"value": block}},
                           {"name": "PDL", "constexpr": True, "arg": {"value": False}}]}

    plain = {**launch("other", False, 16), "params": launch("other", False, 16)["params"][:3]}
    launches = [launch("k", False, 16), launch("k", False, 32), launch("k", True, 16), plain]
    out = check.pdl_variants(launches, [90, 80])
    assert [(v["name"], v["params"][1]["arg"]["value"]) for v in out] == [("k", False), ("k", True)]
    assert all(v["options"]["launch_pdl"] and "pdl" in v["tags"] and v["params"][3]["arg"] == {"value": True}
               for v in out)
    assert launches[0]["params"][3]["arg"] == {"value": False}  # the captured launch itself is untouched
    assert check.pdl_variants(launches, [80]) == []

    good = "ld.param.u64 %rd1, [p];\n\tgriddepcontrol.wait;\n\tld.global.v4.b32 {%r1}, [%rd1];\n"
    assert check.pdl_order_problem(good) is None
    assert "no griddepcontrol.wait" in check.pdl_order_problem("ld.param.u64 %rd1, [p];\n")
    early = "\t@%p1 ld.global.b32 %r2, [%rd1];\n\tgriddepcontrol.wait;\n"
    assert "ld.global" in check.pdl_order_problem(early)
    assert "cp.async" in check.pdl_order_problem("\tcp.async.ca.shared.global [%r1], [%rd1], 16;\ngriddepcontrol.wait;")
