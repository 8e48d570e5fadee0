#!/usr/bin/env python3
"""Compile every moekern Triton kernel for sm_90 and sm_80 on a CPU-only machine (no GPU, no driver).

Why: the CPU tests run the kernels under TRITON_INTERPRET=1, which executes the kernel body as Python and
accepts code that the real compiler rejects (a `x: tl.constexpr = ...` rebound across tl.static_range
iterations, a module-level Python int read inside a kernel, ...). Such kernels passed every CPU test and then
failed to compile on the H100. This check runs the real compiler (triton.compile -> TTIR, TTGIR, LLVM IR, PTX,
and a cubin through the ptxas bundled with triton) for exactly the specializations the code launches.

How, in three processes:
  1. capture (a subprocess with TRITON_INTERPRET=1): the interpreter's launcher (InterpretedFunction.run) is
     wrapped to record every launch - kernel, each argument (a tensor by its dtype and 16-byte alignment, a
     TensorDescriptor by dtype and block shape, scalars by value) and the launch options (num_warps,
     num_stages) - while the drivers (.ci/triton_compile_drivers.py), small representative calls of every
     public op, run: fused_topk for the standard model routings, align/permute/unpermute on each of their
     paths, fused_moe with the BlockConfig variants (fuse_silu, persistent, tma, group_m, the tuned Hopper
     table), the EP peer kernels. Shapes are tiny
     (the interpreter is slow) but dtypes are those of the GPU (bf16 pointers compile differently from fp32).
  2. select: launches are deduplicated by what changes the compiled code (constexpr values, argument types,
     the integer specializations triton makes on a GPU: == 1, % 16 == 0, int32/int64; options); at most
     --max-per-kernel per kernel are kept (Hopper-only launches: a separate group), greedily covering every
     distinct constexpr value, argument type, option and pair of boolean constexprs; what a cap leaves out is
     printed.
  3. compile (TRITON_INTERPRET unset, a fresh TRITON_CACHE_DIR, --jobs worker processes): each selected launch
     is turned into a signature exactly as a GPU launch would be (triton's own binder and _pack_args, the
     CUDA backend's specialization), then triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32)).
     A kernel that needs more shared memory than the target has (it would fail at launch) also fails here.
     TMA (tensor-descriptor) launches and the Hopper-tuned configs are compiled for sm_90 only.

Prints one line per compiled kernel ("ok sm_90 moekern.dispatch.triton_ops._align_single_kernel [...]" or
"FAIL ..." followed by the error) and exits 1 if any compile fails, a driver raises, or a kernel defined
in moekern/ (a `@triton.jit def _..._kernel`) was never launched by the drivers (add a call in
.ci/triton_compile_drivers.py).

    python .ci/triton_compile_check.py                    # sm_90 + sm_80, every op
    python .ci/triton_compile_check.py --arch 90 --ops dispatch --max-per-kernel 3
    python .ci/triton_compile_check.py --driver my_kernels.py --ops none   # a file defining drive()
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import importlib.util
import inspect
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for _path in (ROOT, Path(__file__).resolve().parent):  # moekern, and the drivers beside this file
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from triton_compile_drivers import DRIVERS  # noqa: E402  (needs the path above)

OPS = ("topk", "dispatch", "moe", "ep")
# Shared memory a block may use (triton checks this at load time, so an over-budget config compiles and then
# fails on the GPU): H100 227 KiB, A100 163 KiB.
SMEM_LIMIT = {90: 232448, 80: 166912}
OPTION_KEYS = ("num_warps", "num_stages", "num_ctas", "maxnreg", "launch_pdl", "launch_cooperative_grid")


# ============================================================================================ 1. capture


class Capture:
    """Records launches made through the interpreter. `tags` is set by the drivers around calls whose
    launches are meant for Hopper only (TMA, the sm_90 tuned table): those are not compiled for sm_80.
    While `execute` is False a launch is recorded and not run (outputs stay torch.empty garbage): drivers
    whose host code never reads a kernel's output use that, because the interpreter is slow."""

    def __init__(self):
        self.launches: list[dict] = []
        self.tags: dict[str, set[str]] = {}  # tag -> names of the kernels it applies to
        self.execute = True
        self.errors: list[str] = []

    def install(self):
        from triton.runtime.interpreter import InterpretedFunction
        from triton.runtime.jit import _normalize_ty

        original = InterpretedFunction.run
        capture = self

        def run(fn_self, *args, grid, warmup, **kwargs):
            try:
                capture.record(fn_self, args, kwargs, _normalize_ty)
            except Exception as exc:  # noqa: BLE001  (recording must never change what the op does)
                capture.errors.append(f"{fn_self.fn.__qualname__}: could not record the launch: {exc!r}")
            if not capture.execute:
                return None
            return original(fn_self, *args, grid=grid, warmup=warmup, **kwargs)

        InterpretedFunction.run = run

    def record(self, fn_self, args, kwargs, normalize_ty):
        fn = fn_self.fn
        sig = inspect.signature(fn)
        names = list(sig.parameters)
        bound = sig.bind(*args, **{k: v for k, v in kwargs.items() if k in names})
        bound.apply_defaults()
        ann = {n: normalize_ty(t) for n, t in fn.__annotations__.items()}
        params = []
        for n in names:
            params.append({"name": n, "constexpr": ann.get(n) == "constexpr", "arg": _describe(bound.arguments[n])})
        options = {k: v for k, v in kwargs.items() if k not in names}
        bad = sorted(set(options) - set(OPTION_KEYS))
        if bad:
            raise ValueError(f"unknown launch options {bad}")
        self.launches.append({
            "module": fn.__module__, "name": fn.__qualname__, "file": inspect.getsourcefile(fn),
            "params": params, "options": options,
            "tags": sorted(t for t, kernels in self.tags.items() if fn.__name__ in kernels),
        })


def _describe(v):
    """JSON description of one launch argument, enough to rebuild a stand-in the binder specializes alike."""
    import torch
    import triton.language as tl
    from triton.tools.tensor_descriptor import TensorDescriptor

    if isinstance(v, TensorDescriptor):
        return {"desc": str(v.base.dtype).removeprefix("torch."), "shape": [int(s) for s in v.shape],
                "strides": [int(s) for s in v.strides], "block_shape": [int(s) for s in v.block_shape],
                "padding": v.padding}
    if isinstance(v, torch.Tensor):
        return {"tensor": str(v.dtype).removeprefix("torch."), "aligned": v.data_ptr() % 16 == 0}
    if isinstance(v, tl.constexpr):
        return _describe(v.value)
    if isinstance(v, tl.dtype):
        return {"tl_dtype": v.name}
    if isinstance(v, tuple):
        return {"tuple": [_describe(x) for x in v]}
    if v is None or isinstance(v, (bool, int, float, str)):
        return {"value": v}
    raise TypeError(f"cannot describe a launch argument of type {type(v).__name__}")




def _load_file(path: str):
    """Import a driver file as its own module (the compile step imports it again by the same path)."""
    path = str(Path(path).resolve())
    name = f"_tcc_{re.sub(r'[^0-9A-Za-z_]', '_', Path(path).stem)}_{hashlib.sha1(path.encode()).hexdigest()[:8]}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def capture_main(out_path: str, ops: list[str], driver_files: list[str]) -> int:
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("capture must run with TRITON_INTERPRET=1 (main() starts it that way)")
    cap = Capture()
    cap.install()
    failures = []
    runs = [(op, DRIVERS[op]) for op in ops] + [(f, None) for f in driver_files]
    for label, fn in runs:
        t0 = time.time()
        cap.execute = True
        try:
            if fn is None:
                module = _load_file(label)
                module.drive(cap)
            else:
                fn(cap)
            print(f"captured {label}: {len(cap.launches)} launches so far ({time.time() - t0:.1f}s)", flush=True)
        except Exception:  # noqa: BLE001  (report every broken driver, then fail)
            failures.append(label)
            print(f"FAIL capture {label}:\n{traceback.format_exc()}", flush=True)
    for e in cap.errors:
        print(f"FAIL capture: {e}", flush=True)
    with open(out_path, "w") as f:
        json.dump(cap.launches, f)
    return 1 if failures or cap.errors else 0


# ============================================================================================== 2. select


def _int_class(v: int) -> tuple:
    """What triton's specialization keeps of a runtime int: its type, == 1 (a constant), % 16 == 0."""
    kind = "i32" if -2**31 <= v < 2**31 else "i64" if -2**63 <= v < 2**63 else "u64"
    return (kind, v == 1, v % 16 == 0)


def _arg_class(d: dict):
    if "value" in d:
        v = d["value"]
        if isinstance(v, bool) or v is None or isinstance(v, str):
            return ("v", v)
        if isinstance(v, int):
            return ("int",) + _int_class(v)
        return ("float",)
    if "tuple" in d:
        return ("tuple",) + tuple(_arg_class(x) for x in d["tuple"])
    if "tensor" in d:
        return ("tensor", d["tensor"], d["aligned"])
    if "desc" in d:
        return ("desc", d["desc"], tuple(d["block_shape"]))
    return ("tl_dtype", d["tl_dtype"])


def _features(launch: dict) -> frozenset:
    feats = set()
    for p in launch["params"]:
        if p["constexpr"]:
            feats.add(("c", p["name"], json.dumps(p["arg"], sort_keys=True)))
        else:
            feats.add(("s", p["name"], _arg_class(p["arg"])))
    for k, v in launch["options"].items():
        feats.add(("o", k, v))
    # pairs of boolean constexprs (flags that switch code paths on and off interact)
    flags = [(p["name"], p["arg"]["value"]) for p in launch["params"]
             if p["constexpr"] and isinstance(p["arg"].get("value"), bool)]
    for i, a in enumerate(flags):
        for b in flags[i + 1:]:
            feats.add(("p", a, b))
    return frozenset(feats)


def kernel_id(launch: dict) -> str:
    return f"{launch['module']}.{launch['name']}"


def select(launches: list[dict], cap_per_kernel: int) -> tuple[list[dict], dict]:
    """Dedupe launches by their compiled-code features, then keep <= cap per kernel: greedily the launch that
    adds the most features (constexpr values, argument classes, options, pairs of flags) not yet covered.
    Hopper-only launches (TMA, the sm_90 table) are a group of their own with their own cap: they compile
    for sm_90 only, and the tuned table holds the configs production actually runs."""
    by_kernel: dict[str, dict] = {}
    for launch in launches:
        group = kernel_id(launch) + "".join(f" [{t}]" for t in launch["tags"])
        by_kernel.setdefault(group, {}).setdefault(_features(launch), launch)
    chosen, stats = [], {}
    for kid, uniq in by_kernel.items():
        items = list(uniq.items())
        covered, picked = set(), []
        while items and len(picked) < cap_per_kernel:
            i = max(range(len(items)), key=lambda j: (len(items[j][0] - covered), -j))
            if picked and not items[i][0] - covered:
                break  # every feature covered
            feats, launch = items.pop(i)
            covered |= feats
            picked.append(launch)
        missed = set().union(*(f for f, _ in items)) - covered if items else set()
        stats[kid] = {"distinct": len(uniq), "compiled": len(picked), "uncovered": sorted(map(str, missed))}
        chosen += picked
    return chosen, stats


def defined_kernels() -> set[str]:
    """moekern's launchable kernels: every `@triton.jit ... def _<name>_kernel(` under moekern/."""
    found = set()
    for path in sorted((ROOT / "moekern").rglob("*.py")):
        text = path.read_text()
        mod = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        for m in re.finditer(r"@triton\.jit[^\n]*\n(?:@[^\n]*\n)*def (_\w+_kernel)\(", text):
            found.add(f"{mod}.{m.group(1)}")
    return found


# ============================================================================================= 3. compile


def _standin(d: dict):
    import torch

    if "value" in d:
        return d["value"]
    if "tuple" in d:
        return tuple(_standin(x) for x in d["tuple"])
    if "tensor" in d:
        base = torch.empty(64, dtype=getattr(torch, d["tensor"]))
        return base if d["aligned"] else base[1:]  # CPU allocations are 64-byte aligned; [1:] is not 16
    if "desc" in d:
        from triton.tools.tensor_descriptor import TensorDescriptor

        base = torch.empty(64, dtype=getattr(torch, d["desc"]))
        return TensorDescriptor(base, d["shape"], d["strides"], d["block_shape"], d["padding"])
    import triton.language as tl

    return getattr(tl, d["tl_dtype"])


def _resolve(launch: dict):
    if launch["module"].startswith("_tcc_"):  # a --driver file, imported by path as in the capture
        module = _load_file(launch["file"])
    else:
        module = importlib.import_module(launch["module"])
    obj = module
    for part in launch["name"].split("."):
        obj = getattr(obj, part)
    return obj


def _label(launch: dict) -> str:
    consts = [f"{p['name']}={_short(p['arg'], True)}" for p in launch["params"] if p["constexpr"]]
    consts += [f"{k}={v}" for k, v in launch["options"].items()]
    args = [_short(p["arg"]) for p in launch["params"] if not p["constexpr"]]
    return f"[{','.join(consts)}] ({','.join(args)})"


def _short(d: dict, constexpr: bool = False) -> str:
    if "value" in d:
        v = d["value"]
        if constexpr:
            return str(v)
        if isinstance(v, int) and not isinstance(v, bool):  # what the GPU launch specializes on
            kind, one, div16 = _int_class(v)
            return "=1" if one else kind + ("%16" if div16 else "")
        return "fp32" if isinstance(v, float) else str(v)
    if "tensor" in d:
        return "*" + {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "int32": "i32", "int64": "i64",
                "uint8": "u8", "int16": "i16"}.get(d["tensor"], d["tensor"]) + ("" if d["aligned"] else "!a")
    if "desc" in d:
        return f"desc<{d['desc']}{d['block_shape']}>"
    if "tuple" in d:
        return "(" + ",".join(_short(x) for x in d["tuple"]) + ")"
    return d.get("tl_dtype", "?")


def compile_one(task: tuple[dict, int]) -> dict:
    """Compile one launch for sm_<cc> the way a GPU launch would; returns {ok, line, detail}."""
    launch, cc = task
    t0 = time.time()
    head = f"sm_{cc} {kernel_id(launch)} {_label(launch)}"
    try:
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource, make_backend
        from triton.runtime.jit import create_function_from_signature

        kern = _resolve(launch)
        target = GPUTarget("cuda", cc, 32)
        backend = make_backend(target)
        binder = create_function_from_signature(kern.signature, kern.params, backend)
        kwargs = {p["name"]: _standin(p["arg"]) for p in launch["params"]}
        kwargs.update(launch["options"])
        bound, specialization, opts = binder(**kwargs)
        options, signature, constexprs, attrs = kern._pack_args(backend, opts, bound, specialization, opts)
        compiled = triton.compile(ASTSource(kern, signature, constexprs, attrs), target=target,
                                  options=options.__dict__)
        if "cubin" not in compiled.asm:
            raise RuntimeError("no cubin produced")
        if "pdl" in launch["tags"]:
            problem = pdl_order_problem(compiled.asm.get("ptx", ""))
            if problem:
                raise RuntimeError(problem)
        smem = compiled.metadata.shared
        if smem > SMEM_LIMIT[cc]:
            raise RuntimeError(f"needs {smem} bytes of shared memory; sm_{cc} allows {SMEM_LIMIT[cc]} per block "
                               "(triton raises OutOfResources at launch)")
        return {"ok": True, "line": f"ok   {head} smem={smem} ({time.time() - t0:.1f}s)", "detail": ""}
    except Exception as exc:  # noqa: BLE001  (every failure is reported, the run goes on)
        detail = "\n".join("      " + ln for ln in _explain(exc))
        return {"ok": False, "line": f"FAIL {head} ({time.time() - t0:.1f}s)", "detail": detail}


def _explain(exc: BaseException) -> list[str]:
    """The root error, then where it happened: triton nests one CompilationError per inlined @jit call."""
    chain, e = [], exc
    while e is not None and all(e is not c for c in chain):
        chain.append(e)
        e = e.__cause__ or e.__context__
    root = chain[-1]
    if type(root).__name__ == "CompilationError":
        text = getattr(root, "error_message", None) or str(root).splitlines()[-1]
    else:
        text = str(root)
    lines = [f"{type(root).__name__}: " + " ".join(text.split())[:600]]
    sites = []
    for e in chain:
        if type(e).__name__ != "CompilationError":
            continue
        msg = str(getattr(e, "message", None) or e).splitlines()
        caret = next((i for i, ln in enumerate(msg) if ln.strip() == "^"), None)
        src = getattr(e, "src", None)
        fn = re.search(r"def (\w+)\(", src) if isinstance(src, str) else None
        where = re.match(r"at (\d+):(\d+):", msg[0]) if msg else None
        if caret is not None and caret > 0:
            sites.append(f"{fn.group(1) if fn else '?'} (line {where.group(1) if where else '?'} of its def): "
                         f"{msg[caret - 1].strip()}")
    for i, site in enumerate(reversed(sites)):  # innermost first
        lines.append(("at " if i == 0 else "called from ") + site)
    if not sites and len(lines) == 1 and "\n" in str(exc):
        lines += [ln for ln in str(exc).splitlines() if ln.strip()][-10:]
    return lines


def _worker_init():
    import torch  # noqa: F401  (import once per worker, not per task)
    import triton  # noqa: F401


def pdl_variants(launches: list[dict], archs: list[int]) -> list[dict]:
    """The interpreter never launches with programmatic dependent launch (PDL=False: its gdc_* inline asm does not
    run there), so for sm_90 compile each kernel that has a PDL constexpr again with PDL=True and the launch_pdl
    option, as a Hopper GPU launches it: one launch per combination of its other boolean constexprs (persistent,
    TMA, fused SiLU, ... change where the first memory access sits). compile_one then checks the PTX."""
    if not any(cc >= 90 for cc in archs):
        return []
    out, seen = [], set()
    for launch in launches:
        if not any(p["name"] == "PDL" and p["constexpr"] for p in launch["params"]):
            continue
        flags = tuple((p["name"], p["arg"].get("value")) for p in launch["params"]
                      if p["constexpr"] and p["name"] != "PDL" and isinstance(p["arg"].get("value"), bool))
        key = (kernel_id(launch), flags)
        if key in seen:
            continue
        seen.add(key)
        params = [dict(p, arg={"value": True}) if p["name"] == "PDL" else p for p in launch["params"]]
        out.append(dict(launch, params=params, options=dict(launch["options"], launch_pdl=True),
                        tags=sorted(set(launch["tags"]) | {"pdl"})))
    return out


# A global or shared-memory-to-global access, an atomic or a prefetch in PTX (ld.param / ld.shared are not memory
# another kernel writes).
_MEMORY_OP = re.compile(r"^\s*(?:@!?%p\d+\s+)?(?:ld\.global|st\.global|cp\.async|atom\.|red\.|prefetch|"
                        r"ld\.volatile\.global|mbarrier\.try_wait|cp\.reduce)", re.M)


def pdl_order_problem(ptx: str) -> str | None:
    """Why a PDL kernel's PTX is unsafe, or None: it must execute griddepcontrol.wait before any global memory
    access (the previous kernel may still be writing what it reads, or reading what it overwrites)."""
    at = ptx.find("griddepcontrol.wait")
    if at < 0:
        return "launched with PDL=True but its PTX has no griddepcontrol.wait"
    early = _MEMORY_OP.search(ptx[:at])
    if early:
        return f"a memory access before griddepcontrol.wait: {early.group(0).strip()!r}"
    return None


def compile_main(specs_path: str, archs: list[int], jobs: int) -> int:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise SystemExit("the compile step must run without TRITON_INTERPRET (main() starts it that way)")
    with open(specs_path) as f:
        launches = json.load(f)
    tasks, skipped = [], []
    launches = launches + pdl_variants(launches, archs)
    for launch in launches:
        for cc in archs:
            if cc < 90 and "pdl" in launch["tags"]:
                continue  # programmatic dependent launch: sm_90 and later only
            if cc < 90 and "hopper_only" in launch["tags"]:
                why = "TMA descriptor" if any("desc" in p["arg"] for p in launch["params"]) else "sm_90-tuned config"
                skipped.append(f"skip sm_{cc} {kernel_id(launch)} {_label(launch)} ({why}: Hopper only)")
            else:
                tasks.append((launch, cc))
    for line in skipped:
        print(line)
    results = []
    if jobs <= 1:
        for t in tasks:
            results.append(compile_one(t))
            _print_result(results[-1])
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx, initializer=_worker_init) as pool:
            for r in pool.map(compile_one, tasks):
                results.append(r)
                _print_result(r)
    bad = [r for r in results if not r["ok"]]
    print(f"compiled {len(results) - len(bad)}/{len(results)} ok ({len(skipped)} skipped)")
    return 1 if bad else 0


def _print_result(r: dict):
    print(r["line"], flush=True)
    if r["detail"]:
        print(r["detail"], flush=True)


# ======================================================================================= orchestration


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="90,80", help="compute capabilities to compile for (default 90,80)")
    ap.add_argument("--ops", default=",".join(OPS), help=f"drivers to run: subset of {OPS}, or 'none'")
    ap.add_argument("--driver", action="append", default=[],
                    help="extra driver file: a module with drive(capture) launching its own kernels")
    ap.add_argument("--max-per-kernel", type=int, default=10)
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--keep", help="write the captured and selected launches (JSON) to this directory")
    ap.add_argument("--capture-to", help=argparse.SUPPRESS)
    ap.add_argument("--compile-from", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    ops = [] if args.ops in ("none", "") else [o.strip() for o in args.ops.split(",")]
    unknown = sorted(set(ops) - set(OPS))
    if unknown:
        ap.error(f"--ops: unknown {unknown}; choose from {OPS}")
    archs = [int(a) if a.strip().isdigit() else -1 for a in args.arch.split(",")]
    if any(a not in SMEM_LIMIT for a in archs):
        ap.error(f"--arch must be a subset of {sorted(SMEM_LIMIT)}; got {args.arch}")
    drivers = [str(Path(d).resolve()) for d in args.driver]

    if args.capture_to:
        return capture_main(args.capture_to, ops, drivers)
    if args.compile_from:
        return compile_main(args.compile_from, archs, args.jobs)

    t_start = time.time()
    work = Path(tempfile.mkdtemp(prefix="triton_compile_check_"))
    try:
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
        env["TRITON_CACHE_DIR"] = str(work / "cache")  # nothing cached across runs
        script = [sys.executable, str(Path(__file__).resolve())]
        extra = sum((["--driver", d] for d in drivers), [])

        print(f"::: capture under TRITON_INTERPRET=1 (ops: {','.join(ops) or 'none'}; drivers: {len(drivers)})",
              flush=True)
        captured = work / "captured.json"
        rc_capture = subprocess.call(script + ["--capture-to", str(captured), "--ops", ",".join(ops) or "none"] + extra,
                                     env={**env, "TRITON_INTERPRET": "1"})
        if not captured.exists():
            print("FAIL capture produced no launches file")
            return 1
        launches = json.loads(captured.read_text())
        chosen, stats = select(launches, args.max_per_kernel)
        n_kernels = len({kernel_id(launch) for launch in launches})
        print(f"::: {len(launches)} launches of {n_kernels} kernels; compiling {len(chosen)} specializations "
              f"(<= {args.max_per_kernel} per kernel) for {','.join(f'sm_{a}' for a in archs)}", flush=True)
        for kid, s in sorted(stats.items()):
            note = f"; not covered: {', '.join(s['uncovered'][:6])}" if s["uncovered"] else ""
            print(f"    {kid}: {s['distinct']} distinct, {s['compiled']} compiled{note}")
        missing = []
        if set(ops) == set(OPS):  # with every driver run, every kernel defined in moekern must have launched
            missing = sorted(defined_kernels() - {kernel_id(launch) for launch in launches})
            for kid in missing:
                print(f"FAIL {kid}: defined in moekern but never launched by the drivers "
                      "(add a call to .ci/triton_compile_drivers.py)")
        selected = work / "selected.json"
        selected.write_text(json.dumps(chosen))
        if args.keep:
            os.makedirs(args.keep, exist_ok=True)
            shutil.copy(captured, args.keep)
            shutil.copy(selected, args.keep)
        t_compile = time.time()
        print(f"::: compile (TRITON_INTERPRET unset, fresh cache, {args.jobs} jobs); capture took "
              f"{t_compile - t_start:.0f}s", flush=True)
        rc_compile = subprocess.call(script + ["--compile-from", str(selected), "--arch", args.arch,
                                               "--jobs", str(args.jobs)], env=env)
        ok = rc_capture == 0 and rc_compile == 0 and not missing
        print(f"::: triton compile check {'passed' if ok else 'FAILED'} in {time.time() - t_start:.0f}s "
              f"(capture {t_compile - t_start:.0f}s, compile {time.time() - t_compile:.0f}s)")
        return 0 if ok else 1
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
