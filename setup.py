"""Build fastcl: the Python package, plus the C++ extension ``fastcl._C`` from csrc/.

The extension is a CUDAExtension whenever nvcc is found (CUDA_HOME, or nvcc on PATH), never
decided by ``torch.cuda.is_available()``, so CUDA sources compile on machines without a GPU;
otherwise a CppExtension (CPU kernels only). Environment:
  FASTCL_SKIP_CUDA_BUILD=1   build the CPU-only extension even when nvcc exists
  FASTCL_SKIP_EXTENSION=1    build no extension (Triton and torch backends only)
  TORCH_CUDA_ARCH_LIST       CUDA architectures (default "8.0;9.0")
  MAX_JOBS                   parallel compile jobs (read by torch's BuildExtension)
"""
import glob
import os

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
# optimisation flags of the C++ sources. No trapping math: GCC then if-converts the clamp of the
# tile loops' exp and vectorises them (with trapping math it keeps a branch, and the loops scalar)
CXX_OPT_FLAGS = ["-O3", "-fno-trapping-math"]


def _flag(name: str) -> bool:
    return os.environ.get(name, "0") not in ("", "0", "false", "False")


def _cxx_standard() -> str:
    """The C++ standard the installed torch headers need (recent releases require C++20)."""
    import torch.utils.cpp_extension as cpp_ext

    for inc in cpp_ext.include_paths():
        header = os.path.join(inc, "ATen", "ATen.h")
        if os.path.exists(header):
            with open(header) as f:
                return "-std=c++20" if "C++20" in f.read() else "-std=c++17"
    return "-std=c++17"


def _extensions():
    cpp = sorted(glob.glob(os.path.join("csrc", "**", "*.cpp"), recursive=True))
    cu = sorted(glob.glob(os.path.join("csrc", "**", "*.cu"), recursive=True))
    if not cpp or _flag("FASTCL_SKIP_EXTENSION"):
        return [], {}
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    nvcc = None
    if CUDA_HOME and os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")):
        nvcc = os.path.join(CUDA_HOME, "bin", "nvcc")
    use_cuda = bool(nvcc and cu) and not _flag("FASTCL_SKIP_CUDA_BUILD")
    std = _cxx_standard()
    cxx = CXX_OPT_FLAGS + [std]
    include_dirs = [os.path.join(ROOT, "csrc")]
    if use_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        nvcc_flags = ["-O3", std, "--expt-relaxed-constexpr", "-lineinfo",
                      "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
                      "-U__CUDA_NO_BFLOAT16_OPERATORS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__"]
        ext = CUDAExtension("fastcl._C", cpp + cu, include_dirs=include_dirs,
                            define_macros=[("FASTCL_WITH_CUDA", "1")],
                            extra_compile_args={"cxx": cxx + ["-fopenmp"], "nvcc": nvcc_flags},
                            extra_link_args=["-fopenmp"])
    else:
        ext = CppExtension("fastcl._C", cpp, include_dirs=include_dirs,
                           extra_compile_args={"cxx": cxx + ["-fopenmp"]},
                           extra_link_args=["-fopenmp"])
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    name="fastcl",
    version="0.1.0",
    description="Fused Triton and C++/CUDA kernels for the InfoNCE family of contrastive losses",
    long_description=open(os.path.join(ROOT, "README.md")).read() if os.path.exists(
        os.path.join(ROOT, "README.md")) else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["fastcl", "fastcl.*"]),
    python_requires=">=3.9",
    install_requires=["torch>=2.4", "triton>=3.0; platform_system=='Linux'"],
    extras_require={"test": ["pytest", "pytest-benchmark"], "bench": ["matplotlib", "rich"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
