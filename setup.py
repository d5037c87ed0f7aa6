"""Build scnet_fused._C: the C++ CPU kernels always, the CUDA kernels when a CUDA toolkit is present.

Environment:
  SCNET_FUSED_CUDA=0|1     force the CUDA kernels off / on (default: on when a toolkit and a CUDA
                           build of torch of the same CUDA major version are found, with a note when
                           not; a GPU is not needed to build them)
  CUDA_HOME                the toolkit root (found from /usr/local/cuda* or nvcc otherwise)
  TORCH_CUDA_ARCH_LIST     default "8.0;9.0+PTX": SASS for sm_80 (which sm_86 / sm_89 GPUs run too) and
                           sm_90, and sm_90's PTX, which the driver compiles for newer GPUs (sm_100,
                           sm_120) on first load
  SCNET_FUSED_CPU_ISAS     comma list of instruction sets to build the CPU kernels for, each into a
                           module of its own (scnet_fused._cpu_<isa>; the best one the running CPU
                           supports is loaded): default, avx2, avx512. Default: all three on x86-64
                           (whatever the build machine has), "default" elsewhere.
  SCNET_FUSED_BUILD_TEMP=0 compile in setuptools' build folder (default: build/temp.<platform>-<python>
                           of the checkout, kept between builds so a rebuild compiles only what changed)
  SCNET_FUSED_DEBUG=1      keep the host compiler's debug information (-g, from Python's build flags);
                           by default it is off (-g0): shared objects about 20x smaller, compiles ~30% faster
"""

import glob
import importlib.util
import os
import platform
import sys
import sysconfig

import setuptools
from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _load_toolkit():
    # scnet_fused/_toolkit.py imports nothing heavy; load it by path (the package is not built yet).
    spec = importlib.util.spec_from_file_location("_scnet_fused_toolkit",
                                                  os.path.join(HERE, "scnet_fused", "_toolkit.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


toolkit = _load_toolkit()
CUDA_HOME = toolkit.find_cuda_home()
if CUDA_HOME:
    os.environ["CUDA_HOME"] = CUDA_HOME  # cpp_extension reads it at import time
os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")

import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

WITH_CUDA, _note = toolkit.cuda_build_decision(os.environ.get("SCNET_FUSED_CUDA", "").strip(), CUDA_HOME,
                                                torch.version.cuda)
if _note:
    print(_note, file=sys.stderr)


# Compiler flags of each instruction set (CPU_CAPABILITY_* selects ATen's vector types, as in ATen's own
# per-capability builds; the flags are those ATen uses for its AVX2 and AVX512 levels).
CPU_ISA_FLAGS = {
    "default": [],
    "avx2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2"],
    "avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX512"],
}


def cpu_isas():
    choice = os.environ.get("SCNET_FUSED_CPU_ISAS", "").strip()
    if choice:
        isas = [c.strip() for c in choice.split(",") if c.strip()]
        unknown = [c for c in isas if c not in CPU_ISA_FLAGS]
        if unknown or not isas:
            sys.exit(f"SCNET_FUSED_CPU_ISAS={choice!r}: expected a comma list of {', '.join(CPU_ISA_FLAGS)}")
        return isas
    if platform.machine() in ("x86_64", "AMD64"):
        return list(CPU_ISA_FLAGS)
    return ["default"]


def rel(paths):
    return sorted(os.path.relpath(p, HERE) for p in paths)


sources = rel(glob.glob(os.path.join(HERE, "csrc", "*.cpp")))
cpu_sources = rel(glob.glob(os.path.join(HERE, "csrc", "cpu", "*.cpp")))
# Python's CFLAGS carry -g; the last -g option wins, so -g0 here drops the debug information.
cxx = ["-O3", "-fopenmp"] + ([] if os.environ.get("SCNET_FUSED_DEBUG", "").strip() == "1" else ["-g0"])
extra_link = ["-fopenmp"]
include_dirs = [os.path.join(HERE, "csrc")]

if WITH_CUDA:
    sources += rel(glob.glob(os.path.join(HERE, "csrc", "cuda", "*.cu")))
    ext = CUDAExtension(
        "scnet_fused._C",
        sources,
        include_dirs=include_dirs,
        define_macros=[("SCNET_FUSED_WITH_CUDA", "1")],
        extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-lineinfo", "--expt-relaxed-constexpr"]},
        extra_link_args=extra_link,
    )
else:
    ext = CppExtension("scnet_fused._C", sources, include_dirs=include_dirs, extra_compile_args={"cxx": cxx},
                       extra_link_args=extra_link)

# The CPU kernels, once per instruction set (csrc/cpu/sc_isa.h).
cpu_exts = []
for isa in cpu_isas():
    cpu_ext = CppExtension(f"scnet_fused._cpu_{isa}", cpu_sources, include_dirs=include_dirs,
                           extra_compile_args={"cxx": cxx + CPU_ISA_FLAGS[isa]}, extra_link_args=extra_link)
    cpu_ext.scnet_isa = isa
    cpu_exts.append(cpu_ext)


# Object files live in build/ of the checkout, not in the temporary folder that pip's editable build
# passes (new on every install): ninja then recompiles only what changed since the last build (it
# tracks headers and compiler command lines). SCNET_FUSED_BUILD_TEMP=0 keeps setuptools' folder.
BUILD_TEMP = os.path.join(HERE, "build", f"temp.{sysconfig.get_platform()}-{sys.implementation.cache_tag}")


BUILD_INFO = "scnet_fused/_build_info.py"


class Build(BuildExtension.with_options(use_ninja=True)):
    """Each instruction set's objects in a folder of their own: the same sources, other flags. Records
    the torch the extension is compiled against (``scnet_fused/_build_info.py``), so that an import
    under another torch can say so (a dependency resolution that upgrades torch after the build leaves
    an extension whose symbols the new torch lacks)."""

    def run(self):
        text = f"# Written by setup.py at build time.\nTORCH_VERSION = {torch.__version__!r}\n"
        targets = [os.path.join(HERE, BUILD_INFO)]
        if not self.inplace:
            targets.append(os.path.join(self.build_lib, BUILD_INFO))
        for path in targets:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w") as f:
                f.write(text)
        super().run()

    def build_extension(self, ext):
        base = self.build_temp
        temp = BUILD_TEMP if os.environ.get("SCNET_FUSED_BUILD_TEMP", "1") != "0" else base
        isa = getattr(ext, "scnet_isa", None)
        self.build_temp = os.path.join(temp, f"cpu_{isa}") if isa is not None else temp
        try:
            super().build_extension(ext)
        finally:
            self.build_temp = base


# The license as metadata on every setuptools the build requires (>= 64): an SPDX expression where
# setuptools reads one (77 and later), the older text field before (pyproject.toml's `license = "MIT"`
# is refused before 77 and its table form is deprecated after).
_SETUPTOOLS_MAJOR = int(setuptools.__version__.split(".")[0])
_LICENSE = {"license_expression": "MIT"} if _SETUPTOOLS_MAJOR >= 77 else {"license": "MIT"}

setup(
    ext_modules=[ext] + cpu_exts,
    cmdclass={"build_ext": Build},
    **_LICENSE,
)
