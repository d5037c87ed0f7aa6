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


def toolkit_version(root):
    """(major, minor) of the CUDA toolkit at ``root``, from the ``CUDA_VERSION`` its ``include/cuda.h``
    defines (13000 for 13.0), or None where that cannot be read."""
    try:
        with open(os.path.join(root, "include", "cuda.h"), "r", errors="ignore") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 3 and parts[0] == "#define" and parts[1] == "CUDA_VERSION" and parts[2].isdigit():
                    v = int(parts[2])
                    return v // 1000, (v % 1000) // 10
    except (OSError, TypeError):
        pass
    return None


def cuda_build_decision(flag, cuda_home, torch_cuda):
    """Whether setup.py builds the CUDA kernels, and the note it prints when it does not: ``flag`` is
    SCNET_FUSED_CUDA ("0", "1" or anything else for auto), ``torch_cuda`` torch.version.cuda (None for a
    CPU build of torch). Raises SystemExit for "1" without a toolkit or a CUDA build of torch. Auto also
    leaves them out where the toolkit's major version differs from torch's, which torch's extension
    builder refuses (with "1" the build goes on and torch says so)."""
    if flag == "1":
        if not cuda_home or torch_cuda is None:
            raise SystemExit("SCNET_FUSED_CUDA=1 but no CUDA toolkit (set CUDA_HOME) or torch is not a CUDA build")
        return True, None
    if flag == "0":
        return False, None
    if not cuda_home or torch_cuda is None:
        return False, ("scnet_fused: building without CUDA kernels (no CUDA toolkit found or torch is a CPU "
                       "build); the 'cuda' backend will be absent")
    have = toolkit_version(cuda_home)
    want = str(torch_cuda).split(".")[0]
    if have is not None and want.isdigit() and have[0] != int(want):
        return False, (f"scnet_fused: building without CUDA kernels: the toolkit at {cuda_home} is CUDA "
                       f"{have[0]}.{have[1]} and torch was built with CUDA {torch_cuda}, a major version torch's "
                       f"extension builder refuses to mix; the 'cuda' backend will be absent (point CUDA_HOME at "
                       f"a CUDA {want} toolkit, or set SCNET_FUSED_CUDA=1 to try anyway)")
    return True, None
