"""Finding the CUDA toolkit root: used by setup.py (loaded by path, before torch) and the build tests."""

import glob
import os
import shutil


def _is_toolkit(root):
    return bool(root) and os.path.isfile(os.path.join(root, "bin", "nvcc")) and \
        os.path.isfile(os.path.join(root, "include", "cuda_runtime.h"))


def find_cuda_home():
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if _is_toolkit(os.environ.get(var)):
            return os.environ[var]
    nvcc = shutil.which("nvcc")
    if nvcc:
        # The nvcc on PATH may be a wrapper script: ask it where it lives instead of trusting its path.
        real = os.path.realpath(nvcc)
        root = os.path.dirname(os.path.dirname(real))
        if _is_toolkit(root):
            return root
        try:
            with open(nvcc, "r", errors="ignore") as f:
                for token in f.read().split():
                    if token.endswith("/bin/nvcc") and _is_toolkit(os.path.dirname(os.path.dirname(token))):
                        return os.path.dirname(os.path.dirname(token))
        except OSError:
            pass
    for root in ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True):
        if _is_toolkit(root):
            return root
    return None
