"""Build fusedloss: the Python package (python/), the Triton kernels (triton_kernels/ installed as
fusedloss.triton_kernels) and the native ops.

Native extensions (loaded with torch.ops.load_library, so they need no Python init):
- fusedloss._C              csrc/ops.cpp (schemas) + csrc/cuda/*.{cu,cpp} when CUDA can be compiled.
- fusedloss._cpu_<isa>      csrc/cpu/*.cpp compiled once per x86 ISA level. at::vec::Vectorized is
                            the scalar fallback unless the file is compiled for the ISA (measured:
                            489 ms scalar vs 53 ms AVX2 for a one-pass CE over 4096x32000 fp32 on
                            a 2-core AVX2 x86_64 machine), so we ship one build per level and
                            python/fusedloss/_native.py picks one at import from
                            torch.backends.cpu.get_cpu_capability().

CUDA is built when a CUDA toolkit and a CUDA build of torch are present, never decided by
torch.cuda.is_available() (CI compiles with no GPU). FUSEDLOSS_NO_CUDA=1 skips it. Architectures:
TORCH_CUDA_ARCH_LIST when set, else those of the GPUs present, else DEFAULT_CUDA_ARCHS; the list
compiled in is readable at run time (torch.ops.fusedloss_cuda.arch_list()).
"""

import glob
import os
import platform
import re
import shutil
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _rel(paths):
    return sorted(os.path.relpath(p, ROOT) for p in paths)


def _nvidia_include_dirs():
    # The system toolkit lacks cusparse.h / cublas_v2.h that ATen's CUDA headers include; the pip
    # CUDA packages that come with torch have them.
    dirs = []
    for sp in sys.path:
        dirs += glob.glob(os.path.join(sp, "nvidia", "cu*", "include"))
        dirs += glob.glob(os.path.join(sp, "nvidia", "*", "include"))
    return sorted(set(d for d in dirs if os.path.isdir(d)))


def _cuda_version(path: str) -> tuple:
    """(12, 4) for /usr/local/cuda-12.4; () when the name holds no version."""
    return tuple(int(v) for v in re.findall(r"\d+", os.path.basename(path)))


def _cuda_home():
    """The CUDA toolkit to build with: CUDA_HOME / CUDA_PATH when set, else the toolkit of the
    nvcc on PATH (when it is not a wrapper script), else /usr/local/cuda, else the newest
    /usr/local/cuda-*; None when there is none (then only the C++ part is built)."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var]
    cands = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        cands.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    # the newest versioned toolkit first: by version number (as text, cuda-9.2 > cuda-12.4)
    cands += ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), key=_cuda_version,
                                          reverse=True)
    for c in cands:
        if os.path.exists(os.path.join(c, "bin", "nvcc")) and \
                os.path.exists(os.path.join(c, "include", "cuda_runtime.h")):
            return c
    return None


def _want_cuda(torch, cpp_extension):
    if os.environ.get("FUSEDLOSS_NO_CUDA", "0") == "1" or torch.version.cuda is None:
        return False
    home = _cuda_home()
    if home is None or not os.path.exists(os.path.join(home, "bin", "nvcc")):
        print("fusedloss: no CUDA toolkit found (set CUDA_HOME): building without CUDA kernels",
              file=sys.stderr)
        return False
    # torch's build reads its own guess at import (from the nvcc on PATH, which may be a
    # wrapper script outside the toolkit): use the toolkit found here.
    os.environ["CUDA_HOME"] = home
    cpp_extension.CUDA_HOME = home
    return True


# CUDA architectures built when TORCH_CUDA_ARCH_LIST is unset and no GPU is visible (CI, wheels):
# sm_80 machine code runs on every 8.x GPU (A100 8.0, A10/3090 8.6, L40S/4090 8.9); sm_90 on
# H100/H200; the compute_90 PTX is compiled by the driver on newer GPUs (B200 10.0, 12.x) at
# first use. Each machine-code arch costs one more device compile of every .cu file (measured
# on the 2-core x86_64 build machine, see README "Building").
DEFAULT_CUDA_ARCHS = "8.0;9.0+PTX"


def _cuda_arch_list(torch):
    """TORCH_CUDA_ARCH_LIST if set; else the capabilities of the GPUs present; else the default."""
    env = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip()
    if env:
        return env
    try:
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    except RuntimeError:
        n = 0
    if n:
        caps = sorted({torch.cuda.get_device_capability(i) for i in range(n)})
        return ";".join(f"{a}.{b}" for a, b in caps[:-1]) + \
            (";" if len(caps) > 1 else "") + "{}.{}+PTX".format(*caps[-1])
    return DEFAULT_CUDA_ARCHS


def _compiled_archs(cpp_extension, arch_list):
    """['sm_80', 'sm_90', 'compute_90']: what the -gencode flags for arch_list put in the .so."""
    os.environ["TORCH_CUDA_ARCH_LIST"] = arch_list  # what torch's build turns into -gencode
    try:
        flags = cpp_extension._get_cuda_arch_flags()
    except Exception:  # private helper: fall back to parsing the list ourselves
        flags = []
        for item in arch_list.replace(",", ";").replace(" ", ";").split(";"):
            if item:
                num = item.split("+")[0].replace(".", "")
                flags.append(f"arch=compute_{num},code=sm_{num}")
                if item.endswith("+PTX"):
                    flags.append(f"arch=compute_{num},code=compute_{num}")
    return sorted(set(re.findall(r"code=\[?((?:sm|compute)_\w+)", " ".join(flags))),
                  key=lambda a: (a.startswith("compute"), a))


# ISA levels for the CPU kernels: name -> compiler flags. CPU_CAPABILITY_* selects the
# at::vec implementation; -m flags let the compiler emit the instructions.
CPU_ISAS = {"default": []}
if platform.machine() in ("x86_64", "AMD64"):
    CPU_ISAS["avx2"] = ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2", "-DCPU_CAPABILITY=AVX2"]
    CPU_ISAS["avx512"] = ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c",
                          "-DCPU_CAPABILITY_AVX512", "-DCPU_CAPABILITY=AVX512"]


def _extensions():
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:  # metadata-only invocation
        return [], {}
    common = ["-O3", "-fopenmp"] if sys.platform != "darwin" else ["-O3"]
    exts = []
    cpu_sources = _rel(glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp")))
    if cpu_sources:
        for isa, flags in CPU_ISAS.items():
            exts.append(cpp_extension.CppExtension(
                f"fusedloss._cpu_{isa}", cpu_sources,
                include_dirs=[os.path.join(ROOT, "csrc")],
                extra_compile_args={"cxx": common + flags + [f"-DFUSEDLOSS_ISA={isa}"]},
                extra_link_args=["-fopenmp"] if sys.platform != "darwin" else []))
    cuda_sources = _rel(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")) +
                        glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cpp")))
    if _want_cuda(torch, cpp_extension) and cuda_sources:
        archs = _compiled_archs(cpp_extension, _cuda_arch_list(torch))
        print(f"fusedloss: CUDA kernels for {' '.join(archs)}", file=sys.stderr)
        # No --use_fast_math: it turns tanhf into tanh.approx and divisions into approximations,
        # which the accuracy tests pin; the kernels call __expf/__logf explicitly where intended.
        exts.append(cpp_extension.CUDAExtension(
            "fusedloss._C", ["csrc/ops.cpp"] + cuda_sources,
            include_dirs=[os.path.join(ROOT, "csrc")] + _nvidia_include_dirs(),
            extra_compile_args={
                "cxx": common + [f"-DFUSEDLOSS_CUDA_ARCHS={','.join(archs)}"],
                "nvcc": ["-O3", "-lineinfo", "--expt-relaxed-constexpr"]}))
    else:
        exts.append(cpp_extension.CppExtension(
            "fusedloss._C", ["csrc/ops.cpp"], extra_compile_args={"cxx": ["-O2"]}))
    return _selected(exts), {
        "build_ext": cpp_extension.BuildExtension.with_options(no_python_abi_suffix=False)}


def _selected(exts):
    """FUSEDLOSS_EXTS=_C,_cpu_avx2: build only these extensions (iterating on one of them)."""
    want = [w.strip() for w in os.environ.get("FUSEDLOSS_EXTS", "").split(",") if w.strip()]
    return [e for e in exts if not want or e.name.split(".")[-1] in want]


# FUSEDLOSS_NO_EXT=1: register the package (editable install) without compiling; the Makefile
# then builds the extensions once, incrementally, with `setup.py build_ext --inplace` (pip's own
# build directory would otherwise compile everything a second time).
ext_modules, cmdclass = ([], {}) if os.environ.get("FUSEDLOSS_NO_EXT") == "1" else _extensions()

setup(
    name="fusedloss",
    version="0.1.0",
    package_dir={"": "python", "fusedloss.triton_kernels": "triton_kernels"},
    packages=find_packages("python") + ["fusedloss.triton_kernels"],
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    python_requires=">=3.10",
    install_requires=["torch>=2.6"],
)
