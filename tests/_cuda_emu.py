"""The CUDA kernels of ``csrc/cuda/`` built for the host CUDA model of ``csrc/emu/cuda_emu.h``.

Without a GPU the device code of the CUDA kernels would only ever be compiled. This module rewrites
each ``.cu`` file into C++ for the host model and builds them, with the op schemas of
``csrc/ops.cpp``, into one library whose ops live in ``torch.ops.scnet_fused_cuda_emu`` and take CPU
tensors. The rewrite is mechanical and keeps every line where it was (compiler messages point at the
``.cu`` lines):

- ``kernel<...><<<grid, block[, smem[, stream]]>>>(args)`` becomes
  ``::cuda_emu::launch<&kernel<...>>(::cuda_emu::LaunchConfig(grid, block, ...), args)``;
- the ``c10/cuda`` includes are dropped (the model stands in for the guard, the stream and the launch
  check) and ``cuda_emu.h`` is included before the first project header;
- the ops register in the ``scnet_fused_cuda_emu`` namespace, for the CPU dispatch key, and the
  launchers' device checks expect CPU tensors.

Run as a script (``python tests/_cuda_emu.py``) it builds the library into ``build/cuda_emu``;
the tests load it from there and rebuild only what changed.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUILD = ROOT / "build" / "cuda_emu"
NAME = "scnet_fused_cuda_emu"
SOURCES = ["csrc/ops.cpp", "csrc/emu/cuda_emu.cpp", "csrc/cuda/sc_gate_cuda.cu", "csrc/cuda/sc_pool_cuda.cu",
           "csrc/cuda/sc_bn_relu_cuda.cu", "csrc/emu/emu_ops.cu"]

_IDENT = re.compile(r"[A-Za-z0-9_:]")


def _match(text: str, at: int, ch: str, other: str, step: int) -> int:
    """Index of the bracket matching text[at] == ch, scanning in direction step (+1 or -1) for other."""
    depth = 0
    for i in range(at, -1 if step < 0 else len(text), step):
        if text[i] == ch:
            depth += 1
        elif text[i] == other:
            depth -= 1
            if depth == 0:
                return i
    raise ValueError(f"unbalanced {ch}{other} from offset {at}")


def _rewrite_launches(text: str, where: str) -> str:
    out = []
    pos = 0
    while True:
        k = text.find("<<<", pos)
        if k < 0:
            out.append(text[pos:])
            return "".join(out)
        # the kernel: an identifier, maybe qualified, maybe with template arguments
        e = k - 1
        while text[e].isspace():
            e -= 1
        s = _match(text, e, ">", "<", -1) - 1 if text[e] == ">" else e
        while s >= 0 and _IDENT.match(text[s]):
            s -= 1
        kernel = text[s + 1:e + 1]
        if not kernel or not (kernel[0].isalpha() or kernel[0] in "_:"):
            raise ValueError(f"{where}: no kernel name before the launch at offset {k}")
        c = text.find(">>>", k)
        cfg = text[k + 3:c]
        a = c + 3
        while text[a].isspace():
            a += 1
        if text[a] != "(":
            raise ValueError(f"{where}: expected the kernel arguments after '>>>' at offset {c}")
        b = _match(text, a, "(", ")", +1)
        args = text[a + 1:b]
        out.append(text[pos:s + 1])
        sep = ", " if args.strip() else ""
        out.append(f"::cuda_emu::launch<&{kernel}>(::cuda_emu::LaunchConfig({cfg}){sep}{args})")
        pos = b + 1


def _rename_library(text: str) -> str:
    """The TORCH_LIBRARY* blocks of the scnet_fused namespace moved to the model's namespace."""
    return re.sub(r"\bTORCH_LIBRARY(_IMPL|_FRAGMENT)?\(scnet_fused,", rf"TORCH_LIBRARY\1({NAME},", text)


def rewrite(text: str, where: str) -> str:
    """The C++ of one CUDA source for the host model (line numbers kept)."""
    lines = text.split("\n")
    first_local = next((i for i, ln in enumerate(lines) if ln.startswith('#include "')), None)
    if first_local is None:
        raise ValueError(f"{where}: no project header is included")
    for i, ln in enumerate(lines):
        if ln.startswith("#include <c10/cuda/"):
            lines[i] = ""
    lines[first_local] = f'#include "cuda_emu.h"\n#line {first_local + 1} "{where}"\n{lines[first_local]}'
    text = "\n".join(lines)
    text = _rewrite_launches(text, where)
    text = _rename_library(text)
    text = re.sub(r"(TORCH_LIBRARY_IMPL\(" + NAME + r"), CUDA,", r"\1, CPU,", text)
    text = text.replace("c10::DeviceType::CUDA", "c10::DeviceType::CPU").replace(".is_cuda()", ".is_cpu()")
    return f'#line 1 "{where}"\n{text}'


def _write_sources() -> list[str]:
    src_dir = BUILD / "src"
    src_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for rel in SOURCES:
        text = (ROOT / rel).read_text()
        if rel.endswith(".cu"):
            text = rewrite(text, rel)
        else:  # C++ sources (ops.cpp: its schemas move to the model's namespace)
            text = f'#line 1 "{rel}"\n{_rename_library(text)}'
        dst = src_dir / (Path(rel).stem + ".emu.cpp")
        if not dst.exists() or dst.read_text() != text:  # untouched files keep their build
            dst.write_text(text)
        paths.append(str(dst))
    return paths


def build(verbose: bool = False) -> str:
    """Builds (or finds up to date) the emulation library; returns its path."""
    from torch.utils.cpp_extension import load

    sources = _write_sources()
    os.environ.setdefault("MAX_JOBS", "2")
    # the ninja of this interpreter's environment (pip's ninja package) when the venv is not activated
    bindir = os.path.dirname(sys.executable)
    if bindir not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = bindir + os.pathsep + os.environ.get("PATH", "")
    lib = load(name=NAME, sources=sources, build_directory=str(BUILD),
               extra_include_paths=[str(ROOT / "csrc"), str(ROOT / "csrc" / "cuda"), str(ROOT / "csrc" / "emu")],
               extra_cflags=["-O2", "-DSCNET_FUSED_CUDA_EMU"], is_python_module=False, verbose=verbose)
    return lib if isinstance(lib, str) else str(BUILD / f"{NAME}.so")


_loaded = None


def load_library():
    """The model's op namespace, ``torch.ops.scnet_fused_cuda_emu``, built and loaded once."""
    global _loaded
    import torch

    if _loaded is None:
        build()  # loads the library into the process
        _loaded = getattr(torch.ops, NAME)
    return _loaded


def configure(max_blocks: int = 0, index64: bool = False, reverse: bool = False) -> None:
    load_library()._emu_configure(int(max_blocks), bool(index64), bool(reverse))


def take_log() -> dict[str, int]:
    names, counts = load_library()._emu_take_log()
    return dict(zip(names, counts))


def primitives():
    """``scnet_fused.ops._cpp.Primitives`` over the emulated CUDA kernels (CPU tensors in and out)."""
    from scnet_fused.ops._cpp import Primitives

    ops = load_library()
    p = Primitives("cuda_emu")
    p._ops = ops
    return p


if __name__ == "__main__":
    path = build(verbose="-v" in sys.argv)
    print(f"cuda_emu: built {path}")
