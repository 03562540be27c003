#!/usr/bin/env python
"""Compile every Triton kernel specialisation fusedloss ships, ahead of time, for sm_90.

The Triton interpreter (TRITON_INTERPRET=1, how the kernels are tested on CPU) accepts code the
real compiler rejects (e.g. a loop variable that changes type), so CI also compiles each
specialisation the launchers can produce for a GPU, with no GPU present:
    triton.compile(ASTSource(fn, signature, constexprs), target=GPUTarget("cuda", 90, 32))
The list comes from each kernel module's `specialisations()`, which uses the same
constexpr/pointer-type helpers as its launcher.

Usage: python scripts/triton_aot_check.py [--arch 90] [--jobs N] [--only softmax_ce,...] [-v]
Exit status 0 when every specialisation compiled; otherwise each failure is printed.
Must run WITHOUT TRITON_INTERPRET=1 (the interpreter replaces the compiler).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor

MODULES = ("softmax_ce", "sigmoid_bce", "scale_grad")


def _specs(only):
    import importlib
    out = []
    for mod_name in only:
        # fusedloss's kernel modules by short name; anything else as an importable module path
        # (how the tests hand it a kernel the compiler must reject)
        full = f"fusedloss.triton_kernels.{mod_name}" if mod_name in MODULES else mod_name
        mod = importlib.import_module(full)
        for i, spec in enumerate(mod.specialisations()):
            out.append((mod_name, i, spec))
    return out


def _label(mod_name, spec):
    fn, sig, ce, warps = spec
    flags = ",".join(f"{k}={getattr(v, 'name', v)}" for k, v in ce.items())
    return f"{mod_name}.{fn.__name__}[x={sig.get('x_ptr', sig.get('g_ptr'))} {flags} warps={warps}]"


def _compile(job):
    mod_name, index, arch = job
    import triton
    from triton.backends.compiler import GPUTarget
    spec = dict((i, s) for _, i, s in _specs([mod_name]))[index]
    fn, sig, ce, warps = spec
    t0 = time.perf_counter()
    try:
        kernel = triton.compile(triton.compiler.ASTSource(fn, sig, ce),
                                target=GPUTarget("cuda", arch, 32),
                                options=dict(num_warps=warps))
        spills = getattr(kernel, "n_spills", None)
        return _label(mod_name, spec), None, time.perf_counter() - t0, spills
    except Exception as e:  # report every failure, not only the first
        return _label(mod_name, spec), f"{type(e).__name__}: {e}", time.perf_counter() - t0, None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, default=90, help="CUDA compute capability (90: H100/H200)")
    ap.add_argument("--jobs", type=int, default=1, help="compile processes")
    ap.add_argument("--only", default=",".join(MODULES),
                    help="comma-separated kernel modules (short names, or importable module paths "
                    "that define specialisations())")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("triton_aot_check: unset TRITON_INTERPRET (the interpreter replaces the compiler)",
              file=sys.stderr)
        return 2
    only = [m for m in args.only.split(",") if m]
    jobs = [(m, i, args.arch) for m, i, _ in _specs(only)]
    t0 = time.perf_counter()
    if args.jobs > 1:
        with ProcessPoolExecutor(args.jobs) as pool:
            results = list(pool.map(_compile, jobs))
    else:
        results = [_compile(j) for j in jobs]
    failures = [(label, err) for label, err, _, _ in results if err]
    if args.verbose:
        for label, err, secs, spills in results:
            print(f"{'FAIL' if err else 'ok  '} {secs:5.2f}s spills={spills} {label}")
    for label, err in failures:
        print(f"FAIL {label}\n     {err}")
    print(f"triton_aot_check: {len(results) - len(failures)}/{len(results)} specialisations "
          f"compiled for sm_{args.arch} in {time.perf_counter() - t0:.1f}s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
