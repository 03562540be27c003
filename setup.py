"""Build fusedloss: the Python package (python/), the Triton kernels (triton_kernels/ installed as
fusedloss.triton_kernels) and the native ops.

Native extensions (loaded with torch.ops.load_library, so they need no Python init):
- fusedloss._C              csrc/ops.cpp (schemas) + csrc/cuda/*.cu when CUDA can be compiled.
- fusedloss._cpu_<isa>      csrc/cpu/*.cpp compiled once per x86 ISA level. at::vec::Vectorized is
                            the scalar fallback unless the file is compiled for the ISA (measured:
                            489 ms scalar vs 53 ms AVX2 for a one-pass CE over 4096x32000 fp32, see
                            ../shared/ENVIRONMENT.md), so we ship one build per level and
                            python/fusedloss/_native.py picks one at import from
                            torch.backends.cpu.get_cpu_capability().

CUDA is built when a CUDA toolkit and a CUDA build of torch are present, never decided by
torch.cuda.is_available() (CI compiles with no GPU). FUSEDLOSS_NO_CUDA=1 skips it.
"""

import glob
import os
import platform
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


def _want_cuda(torch):
    if os.environ.get("FUSEDLOSS_NO_CUDA", "0") == "1" or torch.version.cuda is None:
        return False
    if not os.environ.get("CUDA_HOME"):
        for cand in ("/usr/local/cuda",):
            if os.path.exists(os.path.join(cand, "bin", "nvcc")):
                os.environ["CUDA_HOME"] = cand
    return bool(os.environ.get("CUDA_HOME")) and os.path.exists(
        os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc"))


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
    cuda_sources = _rel(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
    if _want_cuda(torch) and cuda_sources:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")  # H100/H200; see ENVIRONMENT.md
        exts.append(cpp_extension.CUDAExtension(
            "fusedloss._C", ["csrc/ops.cpp"] + cuda_sources,
            include_dirs=[os.path.join(ROOT, "csrc")] + _nvidia_include_dirs(),
            extra_compile_args={"cxx": common, "nvcc": ["-O3", "--use_fast_math", "-lineinfo",
                                                        "--expt-relaxed-constexpr"]}))
    else:
        exts.append(cpp_extension.CppExtension(
            "fusedloss._C", ["csrc/ops.cpp"], extra_compile_args={"cxx": ["-O2"]}))
    return exts, {"build_ext": cpp_extension.BuildExtension.with_options(no_python_abi_suffix=False)}


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
