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


if __name__ == "__main__":
    if shutil.which("cmake") is None:
        print("cmake is not installed: nothing to build")
    else:
        print(f"cmake build for {build()} in {BUILD}")
