#!/usr/bin/env python
"""Compile every Triton kernel specialisation fusedloss ships, ahead of time, for sm_90.

The Triton interpreter (TRITON_INTERPRET=1, how the kernels are tested on CPU) accepts code the
real compiler rejects (e.g. a loop variable that changes type), so CI also compiles each
specialisation the launchers can produce for a GPU, with no GPU present:
    triton.compile(ASTSource(fn, signature, constexprs), target=GPUTarget("cuda", 90, 32))
The list comes from each kernel module's `specialisations()`, which uses the same
constexpr / pointer-type helpers as its launcher: every (kernel, logits dtype, compile-time
switch, block, warps) combination a launch can select.

Variants (--variants): on top of those switches, Triton's JIT specialises integer arguments by
value: an int equal to 1 becomes a compile-time constant and pointers / ints divisible by 16
get an alignment attribute (that is what lets loads vectorise). `generic` compiles neither
(integers as i32 arguments), `aligned` marks every pointer and specialisable int as divisible
by 16 (the usual launch), `ones` makes every specialisable int the constant 1 (the code path
most likely to break: e.g. `C.to(...)` fails on a constant).

Usage: python scripts/triton_aot_check.py [--arch 90] [--jobs N] [--only softmax_ce,...]
           [--variants generic,aligned,ones] [--dtype fp32] [-v]
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
VARIANTS = ("generic", "aligned", "ones")


def _specs(only, dtype=None):
    import importlib
    out = []
    for mod_name in only:
        # fusedloss's kernel modules by short name; anything else as an importable module path
        # (how the tests hand it a kernel the compiler must reject)
        full = f"fusedloss.triton_kernels.{mod_name}" if mod_name in MODULES else mod_name
        mod = importlib.import_module(full)
        for i, spec in enumerate(mod.specialisations()):
            if dtype is None or _first_pointer(spec[1]) == "*" + dtype:
                out.append((mod_name, i, spec))
    return out


def _first_pointer(sig):
    return next((t for t in sig.values() if t.startswith("*")), None)


def _apply_variant(fn, sig, ce, variant):
    """(signature, constexprs, attrs) for one value-specialisation variant (see module doc)."""
    if variant == "generic":
        return sig, ce, {}
    no_spec = {fn.arg_names[p.num] for p in fn.params if p.do_not_specialize}
    specialisable = [n for n, t in sig.items() if t in ("i32", "i64") and n not in no_spec]
    if variant == "ones":
        sig = {n: ("constexpr" if n in specialisable else t) for n, t in sig.items()}
        return sig, {**ce, **{n: 1 for n in specialisable}}, {}
    aligned = [n for n, t in sig.items() if t.startswith("*") or n in specialisable]
    return sig, ce, {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in aligned}


def _label(mod_name, spec, variant):
    fn, sig, ce, warps = spec
    flags = ",".join(f"{k}={getattr(v, 'name', v)}" for k, v in ce.items())
    return f"{mod_name}.{fn.__name__}[{_first_pointer(sig)} {flags} warps={warps} {variant}]"


def _compile(job):
    mod_name, index, variant, arch = job
    import triton
    from triton.backends.compiler import GPUTarget
    spec = dict((i, s) for _, i, s in _specs([mod_name]))[index]
    fn, sig, ce, warps = spec
    t0 = time.perf_counter()
    label = _label(mod_name, spec, variant)
    try:
        sig, ce, attrs = _apply_variant(fn, sig, ce, variant)
        triton.compile(triton.compiler.ASTSource(fn, sig, ce, attrs),
                       target=GPUTarget("cuda", arch, 32), options=dict(num_warps=warps))
        return label, None, time.perf_counter() - t0
    except Exception as e:  # report every failure, not only the first
        return label, f"{type(e).__name__}: {e}", time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, default=90, help="CUDA compute capability (90: H100/H200)")
    ap.add_argument("--jobs", type=int, default=1, help="compile processes")
    ap.add_argument("--only", default=",".join(MODULES),
                    help="comma-separated kernel modules (short names, or importable module paths "
                    "that define specialisations())")
    ap.add_argument("--variants", default="generic",
                    help=f"comma-separated value-specialisation variants out of {VARIANTS}")
    ap.add_argument("--dtype", default=None,
                    help="only specialisations whose first pointer has this Triton type (fp32...)")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("triton_aot_check: unset TRITON_INTERPRET (the interpreter replaces the compiler)",
              file=sys.stderr)
        return 2
    variants = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        ap.error(f"--variants: unknown {unknown}; expected some of {VARIANTS}")
    only = [m for m in args.only.split(",") if m]
    jobs = [(m, i, v, args.arch) for m, i, _ in _specs(only, args.dtype) for v in variants]
    t0 = time.perf_counter()
    if args.jobs > 1:
        with ProcessPoolExecutor(args.jobs) as pool:
            results = list(pool.map(_compile, jobs))
    else:
        results = [_compile(j) for j in jobs]
    failures = [(label, err) for label, err, _ in results if err]
    if args.verbose:
        for label, err, secs in results:
            print(f"{'FAIL' if err else 'ok  '} {secs:5.2f}s {label}")
    for label, err in failures:
        print(f"FAIL {label}\n     {err}")
    print(f"triton_aot_check: {len(results) - len(failures)}/{len(results)} specialisations "
          f"compiled for sm_{args.arch} ({','.join(variants)}) in "
          f"{time.perf_counter() - t0:.1f}s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
