"""The second build: CMakeLists.txt builds the op library against libtorch and its C++ test passes
under ctest. A configure, compile or test failure fails this test.

The build lives in build/cmake-test and is incremental: ``bash scripts/setup.sh --tests`` (or
``python tests/test_cmake_build.py``) builds it ahead of the test run, and the test then configures
and builds again (recompiling whatever changed since) and runs ctest."""

import os
import shutil
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUILD = os.path.join(ROOT, "build", "cmake-test")


def _run(cmd, cwd, timeout):
    proc = subprocess.run(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-6000:]}"
    return proc.stdout


def build():
    """Configures and builds BUILD for the instruction set the Python build loaded; returns it."""
    # One instruction set keeps the compile time down; the other builds of the same sources are checked
    # through the Python modules (test_cpu_isa.py).
    from scnet_fused.ops import _cpp

    isa = _cpp.cpu_isa() or "default"
    _run(["cmake", "-S", ROOT, "-B", BUILD, f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
          f"-DPython_EXECUTABLE={sys.executable}", f"-DSCNET_FUSED_CPU_ISAS={isa}"], ROOT, 300)
    _run(["cmake", "--build", BUILD, "-j", str(min(2, os.cpu_count() or 1))], ROOT, 900)
    return isa


@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is not installed")
def test_cmake_build_and_ctest():
    isa = build()
    out = _run(["ctest", "--output-on-failure"], BUILD, 300)
    assert "100% tests passed" in out, out
    assert f"test_sc_gate_{isa}" in out and "Skipped" not in out, out



@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is not installed")
def test_cmake_configures_the_cuda_kernels(tmp_path):
    """SCNET_FUSED_CUDA=ON configures (CMake 3.25 knows no C++20 flag for nvcc: the project gives it) and
    compiles the .cu files as setup.py does: C++20, sm_80 and sm_90 machine code and sm_90's PTX.
    Configure only; building them is what setup.py's build and the ptxas report do."""
    from scnet_fused._toolkit import cuda_build_decision, find_cuda_home

    home = find_cuda_home()
    ok, note = cuda_build_decision("", home, torch.version.cuda)
    if not ok:
        pytest.skip(note or "no CUDA toolkit")
    env = {k: v for k, v in os.environ.items() if k != "TORCH_CUDA_ARCH_LIST"}
    env["CUDA_HOME"] = home
    proc = subprocess.run(["cmake", "-S", ROOT, "-B", str(tmp_path), f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
                           f"-DPython_EXECUTABLE={sys.executable}", "-DSCNET_FUSED_CPU_ISAS=default",
                           "-DSCNET_FUSED_CUDA=ON"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-6000:]
    with open(tmp_path / "CMakeFiles" / "scnet_fused_ops.dir" / "flags.make") as f:
        flags = next(line for line in f if line.startswith("CUDA_FLAGS"))
    for want in ("-std=c++20", "arch=compute_80,code=sm_80", "arch=compute_90,code=sm_90",
                 "arch=compute_90,code=compute_90"):
        assert want in flags, (want, flags)


if __name__ == "__main__":
    if shutil.which("cmake") is None:
        print("cmake is not installed: nothing to build")
    else:
        print(f"cmake build for {build()} in {BUILD}")
