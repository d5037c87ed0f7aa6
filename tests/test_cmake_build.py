"""The second build: CMakeLists.txt builds the op library against libtorch and its C++ test passes
under ctest. A configure, compile or test failure fails this test."""

import os
import shutil
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(cmd, cwd, timeout):
    proc = subprocess.run(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-6000:]}"
    return proc.stdout


@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is not installed")
def test_cmake_build_and_ctest(tmp_path):
    build = tmp_path / "cmake-build"
    # One instruction set (the one the Python build loaded here) keeps this test's compile time down;
    # the other builds of the same sources are checked through the Python modules (test_cpu_isa.py).
    from scnet_fused.ops import _cpp

    isa = _cpp.cpu_isa() or "default"
    _run(["cmake", "-S", ROOT, "-B", str(build), f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
          f"-DPython_EXECUTABLE={sys.executable}", f"-DSCNET_FUSED_CPU_ISAS={isa}"], ROOT, 300)
    _run(["cmake", "--build", str(build), "-j", str(min(2, os.cpu_count() or 1))], ROOT, 600)
    out = _run(["ctest", "--output-on-failure"], str(build), 300)
    assert "100% tests passed" in out, out
    assert f"test_sc_gate_{isa}" in out and "Skipped" not in out, out
