"""Build scnet_fused._C: the C++ CPU kernels always, the CUDA kernels when a CUDA toolkit is present.

Environment:
  SCNET_FUSED_CUDA=0|1     force the CUDA kernels off / on (default: on when a toolkit and a CUDA
                           build of torch are found; a GPU is not needed to build them)
  CUDA_HOME                the toolkit root (found from /usr/local/cuda* or nvcc otherwise)
  TORCH_CUDA_ARCH_LIST     default "8.0;9.0"
  SCNET_FUSED_CPU_ARCH     extra -m flags for the CPU kernels (default: AVX2+FMA on x86-64 when the
                           build machine has them; "none" for a portable build)
"""

import glob
import importlib.util
import os
import platform
import sys

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _load_toolkit_finder():
    # scnet_fused/_toolkit.py imports nothing heavy; load it by path (the package is not built yet).
    spec = importlib.util.spec_from_file_location("_scnet_fused_toolkit",
                                                  os.path.join(HERE, "scnet_fused", "_toolkit.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.find_cuda_home


find_cuda_home = _load_toolkit_finder()
CUDA_HOME = find_cuda_home()
if CUDA_HOME:
    os.environ["CUDA_HOME"] = CUDA_HOME  # cpp_extension reads it at import time
os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")

import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

flag = os.environ.get("SCNET_FUSED_CUDA", "").strip()
if flag == "1":
    if not CUDA_HOME or torch.version.cuda is None:
        sys.exit("SCNET_FUSED_CUDA=1 but no CUDA toolkit (set CUDA_HOME) or torch is not a CUDA build")
    WITH_CUDA = True
elif flag == "0":
    WITH_CUDA = False
else:
    WITH_CUDA = bool(CUDA_HOME) and torch.version.cuda is not None
    if not WITH_CUDA:
        print("scnet_fused: building without CUDA kernels (no CUDA toolkit found or torch is a CPU build); "
              "the 'cuda' backend will be absent", file=sys.stderr)


def cpu_arch_flags():
    choice = os.environ.get("SCNET_FUSED_CPU_ARCH", "").strip()
    if choice == "none":
        return []
    if choice:
        return choice.split()
    if platform.machine() in ("x86_64", "AMD64"):
        try:
            with open("/proc/cpuinfo") as f:
                info = f.read()
            if " avx2 " in info and " fma " in info and " f16c " in info:
                return ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2"]
        except OSError:
            pass
    return []


def rel(paths):
    return sorted(os.path.relpath(p, HERE) for p in paths)


sources = rel(glob.glob(os.path.join(HERE, "csrc", "*.cpp")) + glob.glob(os.path.join(HERE, "csrc", "cpu", "*.cpp")))
cxx = ["-O3", "-fopenmp"] + cpu_arch_flags()
define_macros = []
extra_link = ["-fopenmp"]

if WITH_CUDA:
    sources += rel(glob.glob(os.path.join(HERE, "csrc", "cuda", "*.cu")))
    ext = CUDAExtension(
        "scnet_fused._C",
        sources,
        include_dirs=[os.path.join(HERE, "csrc")],
        define_macros=define_macros + [("SCNET_FUSED_WITH_CUDA", "1")],
        extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-lineinfo", "--expt-relaxed-constexpr"]},
        extra_link_args=extra_link,
    )
else:
    ext = CppExtension(
        "scnet_fused._C",
        sources,
        include_dirs=[os.path.join(HERE, "csrc")],
        define_macros=define_macros,
        extra_compile_args={"cxx": cxx},
        extra_link_args=extra_link,
    )

setup(
    ext_modules=[ext],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
