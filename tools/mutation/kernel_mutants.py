"""Planted bugs in the device kernels (csrc/**/*.cu, *.cuh), each of which the GPU tests must catch.

mutmut mutates Python only, and the CPU suite never runs a kernel, so a bug in a .cu file is caught, if at all,
by the GPU tests on the next GPU run. This script checks that they do: it copies the checkout (sources only) to
a scratch folder, builds moekern._C there once, then for each mutant below swaps one line, rebuilds
incrementally (ninja recompiles only the files that include the changed one), runs the GPU tests that should
judge it, and puts the line back. The checkout's own build is never touched.

    python tools/mutation/kernel_mutants.py [--work /tmp/moekern-kernel-mutants] [--json OUT] [NAME ...]
    python tools/mutation/kernel_mutants.py --list        # the mutants, no GPU needed
    python tools/mutation/kernel_mutants.py --simt        # no GPU: judged by the CPU emulation's tests instead

--simt judges every mutant by tests/test_simt_kernels.py, which runs the same CUDA source on the CPU under the SIMT
emulator (tools/simt/): a rebuild of the emulation (~15 s) instead of moekern._C, no GPU. The GPU tests stay the
judges of what the emulator cannot see (memory ordering, the real compiler).

A mutant is "killed" when its tests fail, "survived" when they pass (a hole in the GPU tests), "build failed"
when the mutated source does not compile and "timeout" when its tests run past 15 minutes (no verdict). Exit
code 1 when any mutant survives. --work must lie outside the checkout: it is deleted and refilled.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Mutant:
    name: str
    path: str  # relative to the repository root
    old: str  # must occur exactly once in the file
    new: str
    tests: tuple[str, ...]  # pytest arguments that must fail on the mutant (GPU tests; empty: a HIP-only path)
    what: str

    @property
    def hip_only(self) -> bool:
        """A bug in a HIP-only path: no CUDA GPU test can see it, only --simt (its wave-64 emulation) judges it."""
        return not self.tests


# Cheapest rebuild first (align.cu and permute.cu alone; histogram.cuh: the two routing files; align_scatter.cuh and
# redux_topk.cuh also recompile route_align.cu, the longest file), so a run cut short has judged the most mutants.
MUTANTS = (
    Mutant(
        "align-chunk-hist-drops-expert-0", "csrc/dispatch/align.cu",
        "if (e >= 0 && e < E) atomicAdd(&s_hist[e], 1);", "if (e > 0 && e < E) atomicAdd(&s_hist[e], 1);",
        ("tests/test_cuda_ops.py", "-k", "align"),
        "the per-chunk histogram of the several-chunk plan skips expert 0: later chunks' prefixes are short",
    ),
    Mutant(
        "unpermute-reads-the-row-past-the-output", "csrc/dispatch/permute.cu",
        "if (row < 0 || row >= num_rows) continue;", "if (row < 0 || row > num_rows) continue;",
        ("tests/test_cuda_ops.py", "-k", "unpermute"),
        "a slot whose row is exactly expert_output's row count is summed (one row past the tensor) instead of "
        "skipped",
    ),
    Mutant(
        "histogram-grid-drops-single-counts", "csrc/routing/histogram.cuh",
        "if (c != 0) atomicAdd(&acc[e], c);", "if (c > 1) atomicAdd(&acc[e], c);",
        ("tests/test_cuda_ops.py", "-k", "topk"),
        "the multi-block routing grid leaves out a block's experts chosen exactly once: counts too low",
    ),
    Mutant(
        "histogram-atomic-tail-skips-the-memset", "csrc/routing/redux_topk.cu",
        "const Error z = memset_async(a.counts, 0, sizeof(int32_t) * a.E, stream);",
        "const Error z = kSuccess;",
        ("tests/test_cuda_ops.py", "-k", "topk"),
        "the atomic-tail grid adds into counts left from before (the caller's buffer is not zeroed): counts too high",
    ),
    Mutant(
        "align-unstable-rank", "csrc/dispatch/align_scatter.cuh",
        "popc(peers & lanemask_lt())", "(popc(peers) - 1 - popc(peers & lanemask_lt()))",
        ("tests/test_cuda_ops.py", "-k", "align"),
        "slots of one expert within a warp step ranked from the last lane: still grouped by expert, but not in "
        "slot order (vLLM's layout is unordered; ours must equal the stable reference)",
    ),
    Mutant(
        "thread-pads-skip-each-runs-first-position", "csrc/dispatch/align_scatter.cuh",
        "if (tid < E && tid % num_chunks == chunk) write_run(tid, 0u, 1u);",
        "if (tid < E && tid % num_chunks == chunk) write_run(tid, 1u, 1u);",
        ("tests/test_cuda_ops.py", "tests/test_route_align.py", "-k", "align or route"),
        "the one-thread-per-expert writer (align's default and route_and_align's one launch at E >= 64, <= 1024 "
        "slots, B <= 16) leaves every expert's first pad and first block id unwritten (torch.empty garbage)",
    ),
    Mutant(
        "routing-lane-ties-to-the-higher-index", "csrc/routing/redux_topk.cuh",
        "    if (key[i] > bk) {\n      bk = key[i];\n      bi = i;\n    }\n  }\n\n  float res_w",
        "    if (key[i] >= bk) {\n      bk = key[i];\n      bi = i;\n    }\n  }\n\n  float res_w",
        ("tests/test_cuda_ops.py", "tests/test_route_align.py", "-k", "topk or route"),
        "equal scores held by one lane go to its higher expert index first (the reference: the lower index)",
    ),
    Mutant(
        "routing-groups-tie-to-the-higher-group", "csrc/routing/redux_topk.cuh",
        "above += (o > gkey || (o == gkey && j < grp)) ? 1 : 0;",
        "above += (o > gkey || (o == gkey && j > grp)) ? 1 : 0;",
        ("tests/test_cuda_ops.py", "tests/test_route_align.py", "-k", "topk or route"),
        "grouped routing (DeepSeek-V3) keeps the higher of two groups with equal scores (the reference: the lower)",
    ),
    Mutant(
        "routing-shared-histogram-not-zeroed", "csrc/routing/redux_topk.cuh",
        "  for (int e = threadIdx.x; e < a.E; e += blockDim.x) s_hist[e] = 0;\n",
        "  // (the shared histogram is not zeroed)\n",
        ("tests/test_cuda_ops.py", "tests/test_route_align.py", "-k", "topk or route"),
        "the routing kernels count into shared memory they never zeroed (garbage on a GPU; the emulator fills "
        "shared memory with 0xA5 for the same reason)",
    ),
    Mutant(
        "hip-popc-drops-the-upper-lanes", "csrc/common/portability.cuh",
        "__device__ __forceinline__ int popc(lane_mask_t m) { return __popcll(m); }",
        "__device__ __forceinline__ int popc(lane_mask_t m) { return __popc(static_cast<unsigned>(m)); }",
        (),
        "HIP only: lane counts of a wavefront of 64 miss lanes 32-63, so align's ranks within a warp step go wrong",
    ),
    Mutant(
        "route-align-grid-chunk-in-tokens", "csrc/dispatch/route_align.cu",
        "align_detail::LoadWrittenHere{}, align_detail::MatchHardware{}, g.tokens_per_block * a.top_k, a.counts);",
        "align_detail::LoadWrittenHere{}, align_detail::MatchHardware{}, g.tokens_per_block, a.counts);",
        ("tests/test_route_align.py", "-k", "cuda"),
        "route_and_align's grid tier gives each block's chunk its token count instead of its slot count: blocks "
        "scatter the wrong slots",
    ),
)


def check_sources(root: Path = ROOT) -> list[str]:
    """Problems with the mutant table against the sources at `root` (each `old` must occur exactly once)."""
    problems = []
    for m in MUTANTS:
        path = root / m.path
        if not path.is_file():
            problems.append(f"{m.name}: {m.path} does not exist")
            continue
        hits = path.read_text().count(m.old)
        if hits != 1:
            problems.append(f"{m.name}: the line to change occurs {hits} times in {m.path} (must be once)")
    names = [m.name for m in MUTANTS]
    if len(set(names)) != len(names):
        problems.append("mutant names repeat")
    return problems


def _copy_sources(work: Path) -> None:
    """The checkout's tracked and untracked-but-not-ignored files, without build outputs, into work/."""
    skip = {".git", "build", ".gpuenv", ".whl", ".fiwhl", ".fiaot", "results", "__pycache__", ".venv"}

    def ignore(folder, names):  # results/ and benchmarks/results/: outputs, not sources
        return [n for n in names if n in skip or n.endswith((".so", ".pyc"))]

    if work.exists():
        shutil.rmtree(work)
    shutil.copytree(ROOT, work, ignore=ignore)


def check_work_dir(work: Path, root: Path = ROOT) -> str | None:
    """Why `work` cannot be the scratch copy (it is deleted and refilled), or None: it must not be the checkout,
    hold it, or sit inside it."""
    w, r = work.resolve(), root.resolve()
    if w == r or r.is_relative_to(w):
        return f"--work {work} is or holds the checkout {r}: it would be deleted"
    if w.is_relative_to(r):
        return f"--work {work} is inside the checkout {r}: the copy would copy itself"
    return None


def _build(work: Path, log: Path) -> tuple[bool, float]:
    env = dict(os.environ, MOEKERN_REQUIRE_EXTENSION="1")
    env.setdefault("TORCH_CUDA_ARCH_LIST", "9.0a")
    env.setdefault("MAX_JOBS", str(os.cpu_count() or 4))
    t0 = time.time()
    with log.open("a") as f:
        proc = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=work, env=env,
                              stdout=f, stderr=subprocess.STDOUT)
    return proc.returncode == 0, time.time() - t0


def _run_pytest(work: Path, args: tuple[str, ...], env: dict, log: Path) -> int | None:
    """pytest in work/ with `args`, stopping at the first failure; its exit code, or None past 15 minutes."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *args]
    with log.open("a") as f:
        f.write(f"\n$ {' '.join(cmd)}\n")
        f.flush()
        try:
            return subprocess.run(cmd, cwd=work, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=900).returncode
        except subprocess.TimeoutExpired:
            f.write("\n(timed out after 900 s)\n")
            return None


SIMT_TESTS = ("tests/test_simt_kernels.py",)


def _simt_env(work: Path) -> dict:
    return dict(os.environ, PYTHONPATH=str(work), MOEKERN_SIMT_CACHE=str(work / ".simt-cache"))


def _build_simt(work: Path, log: Path) -> tuple[bool, float]:
    """The emulation of work's sources (tools/simt/build.py), so a mutant that does not compile is scored as such
    and not as killed by the tests' build fixture."""
    t0 = time.time()
    with log.open("a") as f:
        f.write("\n$ python tools/simt/build.py\n")
        f.flush()
        proc = subprocess.run([sys.executable, "tools/simt/build.py"], cwd=work, env=_simt_env(work), stdout=f,
                              stderr=subprocess.STDOUT)
    return proc.returncode == 0, time.time() - t0


def _run_tests(work: Path, tests: tuple[str, ...], log: Path) -> int | None:
    """The GPU tests that judge a mutant, against work's own moekern._C."""
    return _run_pytest(work, ("-m", "gpu", *tests), dict(os.environ, PYTHONPATH=str(work)), log)


def _run_simt_tests(work: Path, log: Path) -> int | None:
    """The CPU emulation's tests in work/ (against the emulation _build_simt built)."""
    return _run_pytest(work, SIMT_TESTS, _simt_env(work), log)


def _imports_from(work: Path, log: Path) -> bool:
    """Whether a test process started in work/ imports work's moekern and its device kernels (not an installed
    checkout's); the child's output goes to the log either way."""
    code = ("import os, torch, moekern, moekern._C; "
            "print('MOEKERN_AT', os.path.realpath(moekern.__file__)); "
            "print('DEVICE_KERNELS', torch.ops.moekern.has_device_kernels())")
    proc = subprocess.run([sys.executable, "-c", code], cwd=work, env=dict(os.environ, PYTHONPATH=str(work)),
                          capture_output=True, text=True)
    with log.open("a") as f:
        f.write(f"\n$ import check (exit {proc.returncode})\n{proc.stdout}{proc.stderr}\n")
    lines = dict(line.split(" ", 1) for line in proc.stdout.splitlines() if line.startswith(("MOEKERN_AT ", "DEVICE_")))
    root = os.path.realpath(work)
    return (proc.returncode == 0 and lines.get("MOEKERN_AT", "").startswith(root + os.sep)
            and lines.get("DEVICE_KERNELS") == "True")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("names", nargs="*", help="mutants to run (default: all)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/moekern-kernel-mutants"))
    ap.add_argument("--json", type=Path, help="write the verdicts here")
    ap.add_argument("--log", type=Path, default=None, help="build and test output (default: WORK.log)")
    ap.add_argument("--list", action="store_true", help="print the mutants and check they apply; no GPU needed")
    ap.add_argument("--simt", action="store_true",
                    help="judge by the CPU emulation's tests (tests/test_simt_kernels.py) instead of the GPU tests")
    args = ap.parse_args(argv)

    problems = check_sources()
    if args.list or problems:
        for m in MUTANTS:
            print(f"{m.name:<42} {m.path:<34} {m.what}")
        for p in problems:
            print(f"error: {p}", file=sys.stderr)
        return 1 if problems else 0
    unknown = sorted(set(args.names) - {m.name for m in MUTANTS})
    if unknown:
        print(f"error: unknown mutant(s) {', '.join(unknown)}; --list shows them", file=sys.stderr)
        return 2
    bad_work = check_work_dir(args.work)
    if bad_work:
        print(f"error: {bad_work}; pick a folder outside it (default /tmp/moekern-kernel-mutants)", file=sys.stderr)
        return 2
    todo = [m for m in MUTANTS if not args.names or m.name in args.names]
    if not args.simt:  # the GPU here is CUDA: a HIP-only path is judged by --simt's wave-64 emulation alone
        skipped = [m.name for m in todo if m.hip_only]
        if skipped:
            print(f"skipped (HIP only, judged by --simt): {', '.join(skipped)}")
        todo = [m for m in todo if not m.hip_only]
    log = args.log or args.work.parent / f"{args.work.name}.log"
    log.write_text("")

    _copy_sources(args.work)
    if args.simt:
        rc = _run_simt_tests(args.work, log)
        print(f"unmutated emulation tests in {args.work}: {'ok' if rc == 0 else 'FAILED'}", flush=True)
        if rc != 0:
            print(f"error: the emulation's tests fail before any mutant; see {log}", file=sys.stderr)
            return 2
    else:
        ok, secs = _build(args.work, log)
        print(f"clean build in {args.work}: {'ok' if ok else 'FAILED'} ({secs:.0f} s)", flush=True)
        if not ok or not _imports_from(args.work, log):
            print(f"error: the scratch copy does not build or import its own moekern._C; see {log}", file=sys.stderr)
            return 2

    verdicts = []
    for m in todo:
        path = args.work / m.path
        original = path.read_text()
        path.write_text(original.replace(m.old, m.new, 1))
        try:
            if args.simt:
                built, secs = _build_simt(args.work, log)
                rc = _run_simt_tests(args.work, log) if built else None
            else:
                built, secs = _build(args.work, log)
                rc = _run_tests(args.work, m.tests, log) if built else None
            if not built:
                verdict = "build failed"
            else:
                verdict = ("killed" if rc == 1 else "survived" if rc == 0 else "timeout" if rc is None
                           else f"error (pytest exit {rc})")
        finally:
            path.write_text(original)
        verdicts.append(dict(asdict(m), verdict=verdict, build_s=round(secs, 1), pytest_rc=rc))
        print(f"{m.name:<42} {verdict:<14} (rebuild {secs:.0f} s)", flush=True)
        if args.json:  # after every mutant: a run cut short keeps its verdicts
            args.json.write_text(json.dumps(verdicts, indent=1))
    survived = [v["name"] for v in verdicts if v["verdict"] == "survived"]
    print(f"{sum(v['verdict'] == 'killed' for v in verdicts)} of {len(verdicts)} killed"
          + (f"; SURVIVED: {', '.join(survived)}" if survived else ""))
    return 1 if survived else 0


if __name__ == "__main__":
    raise SystemExit(main())
