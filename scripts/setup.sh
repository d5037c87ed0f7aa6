#!/usr/bin/env bash
# Set up a local virtual environment with torch, the build tools and scnet_fused (with its compiled
# extension: the C++ CPU kernels always, the CUDA kernels when a CUDA toolkit is found).
# Idempotent: re-running reuses .venv and rebuilds only what changed.
#   --tests   also build what the test suite compiles (the CUDA kernels for the host CUDA model,
#             build/cuda_emu; the CMake build, build/cmake-test; the ptxas report's device compiles,
#             build/ptxas), so the test run itself compiles only what changed since; and installs
#             onnx, onnxscript and onnxruntime for the ONNX export tests
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
VPY=.venv/bin/python

# pip, with the local mirror's notices about absent index folders filtered out (errors still show).
pipq() { "$VPY" -m pip install -q "$@" 2> >(grep -v "^WARNING: Location" >&2); }

if ! "$VPY" -c "import torch" >/dev/null 2>&1; then
  pipq "torch>=2.9"
fi
pipq pybind11 ninja numpy pytest pytest-benchmark matplotlib scikit-learn "setuptools>=64" wheel
"$VPY" -c "import triton" >/dev/null 2>&1 || pipq "triton>=3.5" || \
  echo "setup: triton could not be installed; the triton backend will be unavailable" >&2
# Before triton 3.7 the Triton interpreter (how the tests run the Triton kernels without a GPU) fails
# with numpy 2.4 and later.
if "$VPY" -c "import re, sys, triton; sys.exit(0 if tuple(map(int, re.findall(r'\d+', triton.__version__)[:2])) < (3, 7) else 1)" 2>/dev/null; then
  pipq "numpy<2.4" || echo "setup: numpy<2.4 could not be installed; Triton kernels will not run on CPU tensors" \
    "(the triton backend says so), CUDA tensors are not affected" >&2
fi

# The CUDA toolkit: honour CUDA_HOME, else let setup.py find it (the nvcc on PATH may be a wrapper).
export MAX_JOBS=${MAX_JOBS:-2}
pipq --no-build-isolation -e .
"$VPY" -c "import scnet_fused, scnet_fused._C as C; from scnet_fused.ops import _cpp; print('scnet_fused', scnet_fused.__version__, '| extension: cuda kernels' if C.with_cuda else '| extension: cpu kernels only', '| cpu kernels', _cpp.cpu_isa() or 'none')"

if [ "${1:-}" = "--tests" ]; then
  pipq onnx onnxscript onnxruntime
  "$VPY" tests/_cuda_emu.py 2> >(grep -v "No CUDA runtime is found" >&2)
  "$VPY" tests/test_cmake_build.py
  "$VPY" tests/test_cuda_build.py
fi
