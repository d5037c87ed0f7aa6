"""The compiled extension as a backend: C++ (CPU) and CUDA kernels.

``scnet_fused._C`` registers the kernel-level primitives as ``torch.ops.scnet_fused._gate_forward`` and
friends (schemas in ``csrc/ops.cpp``, CUDA kernels in ``csrc/cuda/``). The CPU kernels of ``csrc/cpu/``
are built once per instruction set into ``scnet_fused._cpu_default``, ``_cpu_avx2`` and
``_cpu_avx512``; the best one this CPU runs is loaded (``$SCNET_FUSED_CPU_ISA`` caps the choice, for
example ``avx2`` on an AVX-512 machine). Only one is ever loaded in a process: each registers the same
kernels.
"""

from __future__ import annotations

import importlib
import os
import warnings
from typing import Optional

import torch

_OPS = ("_gate_forward", "_gate_backward", "_gate_backward_k3", "_channel_stats", "_avgpool", "_avgpool_backward",
        "_affine_relu", "_affine_relu_out", "_affine_relu_backward_sums", "_affine_relu_backward_apply",
        "_affine_add_relu")
_import_error: Optional[str] = None


def _import_failure(exc: BaseException, built_against: Optional[str], running: str) -> str:
    """Why scnet_fused._C did not import, naming the torch it was built against where that differs from
    the running one (its symbols are then another torch's: rebuild)."""
    reason = f"the compiled extension scnet_fused._C is not importable ({type(exc).__name__}: {exc})"
    if built_against and built_against != running:
        reason += (f"; it was built against torch {built_against} and this is torch {running}: rebuild it "
                   f"(pip install -e . --no-build-isolation, or python setup.py build_ext --inplace)")
    return reason


def _built_against() -> Optional[str]:
    try:
        from .._build_info import TORCH_VERSION  # written by setup.py at build time
    except ImportError:
        return None
    return TORCH_VERSION


try:
    from .. import _C  # noqa: F401  (loads the op library)
except Exception as exc:  # not built, or built against another torch
    _import_error = _import_failure(exc, _built_against(), torch.__version__)

# Instruction sets of the CPU kernel builds, most capable first.
CPU_ISAS = ("avx512", "avx2", "default")
_ISA_ENV = "SCNET_FUSED_CPU_ISA"
_cpu_isa: Optional[str] = None
_cpu_isa_error: Optional[str] = None


def _load_cpu_kernels() -> None:
    """Import the best CPU kernel build this CPU runs, at most ``$SCNET_FUSED_CPU_ISA``."""
    global _cpu_isa, _cpu_isa_error
    cap = os.environ.get(_ISA_ENV, "").strip().lower()
    if cap and cap not in CPU_ISAS:
        raise ValueError(f"{_ISA_ENV}={cap!r}: expected one of {', '.join(CPU_ISAS)}")
    candidates = CPU_ISAS[CPU_ISAS.index(cap):] if cap else CPU_ISAS
    supports = getattr(_C, "cpu_supports_isa", None)
    if supports is None:  # an _C from an older build next to this Python code
        _cpu_isa_error = "scnet_fused._C is out of date (no cpu_supports_isa): rebuild the package"
        return
    tried = []
    for isa in candidates:
        if not supports(isa):
            tried.append(f"{isa}: this CPU lacks it")
            continue
        try:
            importlib.import_module(f"{__package__.rsplit('.', 1)[0]}._cpu_{isa}")
        except ImportError as exc:
            tried.append(f"{isa}: not loadable ({exc})")
            continue
        _cpu_isa = isa
        if cap and isa != cap:
            warnings.warn(f"scnet_fused: {_ISA_ENV}={cap} asked for CPU kernels this process cannot use "
                          f"({'; '.join(tried)}); using the {isa} build", RuntimeWarning, stacklevel=2)
        return
    _cpu_isa_error = "no CPU kernel build of scnet_fused is loadable (" + "; ".join(tried) + ")"


if _import_error is None:
    _load_cpu_kernels()


def built_isas():
    """The instruction sets whose CPU kernel module is installed, most capable first."""
    import importlib.util

    pkg = __package__.rsplit(".", 1)[0]
    return [isa for isa in CPU_ISAS if importlib.util.find_spec(f"{pkg}._cpu_{isa}") is not None]


def runnable_isas():
    """The installed builds this CPU runs, most capable first (empty without the extension)."""
    if _import_error is not None:
        return []
    return [isa for isa in built_isas() if _C.cpu_supports_isa(isa)]


def cpu_isa() -> Optional[str]:
    """The instruction set of the loaded CPU kernels ('avx512', 'avx2', 'default'), None when none is."""
    return _cpu_isa


def has_kernel(op: str, key: str) -> bool:
    if _import_error is not None:
        return False
    try:
        return bool(torch._C._dispatch_has_kernel_for_dispatch_key(f"scnet_fused::{op}", key))
    except RuntimeError:
        return False


# The cpu backend's one-call primitives (see scnet_fused.ops._dispatch).
_CPU_ONLY_OPS = ("_add_channel_affine_", "_bn_relu_train_backward", "_bn_relu_train_out", "_bn_train_backward",
                 "_bn_train_out", "_gate_bn_train_forward",
                 "_gate_bn_train_backward", "_bn_add_relu_train_forward", "_bn_add_relu_train_backward")
# The ops of csrc/autograd.cpp, with the dispatch key each is registered for: the autograd twins of
# the public ops (which call the backend kernels), and the ops that use no backend kernel.
_AUTOGRAD_OPS = {op: "Autograd" for op in ("_sc_gate_ag", "_sc_gate_bn_train_ag", "_sc_gate_bn2_train_ag",
                                           "_sc_avgpool_ag", "_bn_relu_train_ag", "_bn_relu_cat_train_ag",
                                           "_bn_add_relu_train_ag", "_bn_train_ag")}
_GLUE_OPS = {"_relu_cat_ag": "Autograd", "_bn_affine_fold": "CompositeImplicitAutograd",
             "_conv_bn_fold": "CompositeImplicitAutograd", "_update_running_stats_": "CompositeImplicitAutograd"}
_registered: dict = {}


def _all_registered(name: str, table: dict) -> bool:
    """Whether the extension loaded and registers every op of ``table`` for its key (asked once)."""
    known = _registered.get(name)
    if known is None:
        known = _registered[name] = _import_error is None and all(
            torch._C._dispatch_has_kernel_for_dispatch_key(f"scnet_fused::{op}", key) for op, key in table.items())
    return known


def has_autograd_ops() -> bool:
    """The extension carries the C++ autograd ops of csrc/autograd.cpp."""
    return _all_registered("autograd", _AUTOGRAD_OPS)


def has_glue_ops() -> bool:
    """The extension carries the C++ ops that use no backend kernel (csrc/autograd.cpp)."""
    return _all_registered("glue", _GLUE_OPS)


def unavailable_reason(name: str) -> Optional[str]:
    """None when backend ``name`` ('cpu' or 'cuda') has compiled kernels, else why not."""
    if _import_error is not None:
        return _import_error
    key = "CPU" if name == "cpu" else "CUDA"
    ops = _OPS + (_CPU_ONLY_OPS if name == "cpu" else ())
    missing = [op for op in ops if not has_kernel(op, key)]
    if missing:
        if name == "cuda":
            return ("scnet_fused._C was built without CUDA kernels (no CUDA toolkit at build time, one of another "
                    "CUDA major version than torch's, or SCNET_FUSED_CUDA=0)")
        if _cpu_isa_error is not None:
            return _cpu_isa_error
        return f"scnet_fused._C has no {key} kernels for {', '.join(missing)}"
    return None


def arch_names(arch_list: str) -> str:
    """nvcc's __CUDA_ARCH_LIST__ ("800,900") as compute capabilities ("8.0, 9.0")."""
    out = []
    for item in arch_list.split(","):
        item = item.strip()
        if item.isdigit():
            n = int(item)
            out.append(f"{n // 100}.{n % 100 // 10}")
    return ", ".join(out) or "unknown archs"


_cuda_problems: dict = {}


def cuda_device_problem(device: torch.device) -> Optional[str]:
    """None when CUDA ``device`` loads this build's CUDA kernels, else why not (asked of the CUDA runtime
    once per device: a GPU older than every architecture of the build has no image to load; a newer one
    compiles the build's PTX)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index in _cuda_problems:
        return _cuda_problems[index]
    probe = getattr(_C, "cuda_kernel_problem", None) if _import_error is None else None
    result: Optional[str] = None
    if probe is not None:
        problem = probe(index)
        if problem:
            major, minor = torch.cuda.get_device_capability(index)
            result = (f"the CUDA kernels of this build cannot run on GPU {index} ({torch.cuda.get_device_name(index)}, "
                      f"compute capability {major}.{minor}): {problem}; they were compiled for compute capability "
                      f"{arch_names(getattr(_C, 'cuda_arch_list', ''))}; rebuild with "
                      f"TORCH_CUDA_ARCH_LIST=\"{major}.{minor}\" (pip install -e . --no-build-isolation)")
    _cuda_problems[index] = result
    return result


class Primitives:
    """The primitives of ``scnet_fused.ops._dispatch`` over the extension's ops."""

    def __init__(self, name: str):
        self.name = name
        self._ops = torch.ops.scnet_fused

    def gate_forward(self, x, small, k3, scale, shift, small_scale=None, small_shift=None):
        return self._ops._gate_forward(x, small, k3, scale, shift, small_scale, small_shift)

    def gate_backward(self, dy, x, small, k3, scale, shift, center, need_dk3, small_scale=None, small_shift=None,
                      need_sums=True):
        dx, dsmall, dk3, sum_g, sum_gk = self._ops._gate_backward(dy, x, small, k3, scale, shift, center, need_dk3,
                                                                  small_scale, small_shift, need_sums)
        return dx, dsmall, (dk3 if need_dk3 else None), sum_g, sum_gk

    def gate_backward_k3(self, dy, x, small, k3, p, q, r, small_scale=None, small_shift=None):
        return self._ops._gate_backward_k3(dy, x, small, k3, p, q, r, small_scale, small_shift)

    def add_channel_affine_(self, d, t, q, r):
        self._ops._add_channel_affine_(d, t, q, r)
        return d

    def channel_stats(self, t):
        return self._ops._channel_stats(t)

    def avgpool(self, x, r):
        return self._ops._avgpool(x, int(r))

    def avgpool_backward(self, dy, H, W, r, channels_last):
        return self._ops._avgpool_backward(dy, int(H), int(W), int(r), bool(channels_last))

    def affine_relu(self, t, scale, shift):
        return self._ops._affine_relu(t, scale, shift)

    def affine_relu_out(self, t, scale, shift, out):
        self._ops._affine_relu_out(t, scale, shift, out)
        return out

    def affine_add_relu(self, t, residual, scale, shift):
        return self._ops._affine_add_relu(t, residual, scale, shift)

    def affine_relu_backward_sums(self, dy, t, scale, shift, center):
        return self._ops._affine_relu_backward_sums(dy, t, scale, shift, center)

    def affine_relu_backward_apply(self, dy, t, scale, shift, p, q, r):
        return self._ops._affine_relu_backward_apply(dy, t, scale, shift, p, q, r)

    def bn_relu_train_backward(self, dy, t, weight, bias, mean, var, eps):
        return self._ops._bn_relu_train_backward(dy, t, weight, bias, mean, var, float(eps))

    def bn_relu_train_out(self, t, weight, bias, eps, out):
        return self._ops._bn_relu_train_out(t, weight, bias, float(eps), out)

    def bn_train_backward(self, dy, t, weight, bias, mean, var, eps):
        return self._ops._bn_train_backward(dy, t, weight, bias, mean, var, float(eps))

    def bn_train_out(self, t, weight, bias, eps, out):
        return self._ops._bn_train_out(t, weight, bias, float(eps), out)

    def bn_add_relu_train_forward(self, t, residual, weight, bias, eps):
        return self._ops._bn_add_relu_train_forward(t, residual, weight, bias, float(eps))

    def bn_add_relu_train_backward(self, dy, y, t, weight, bias, mean, var, eps):
        return self._ops._bn_add_relu_train_backward(dy, y, t, weight, bias, mean, var, float(eps))

    def gate_bn_train_forward(self, x, small, k3, weight, bias, eps, small_scale=None, small_shift=None):
        return self._ops._gate_bn_train_forward(x, small, k3, weight, bias, float(eps), small_scale, small_shift)

    def gate_bn_train_backward(self, dy, x, small, k3, weight, bias, mean, var, eps, small_scale=None,
                               small_shift=None):
        return self._ops._gate_bn_train_backward(dy, x, small, k3, weight, bias, mean, var, float(eps), small_scale,
                                                 small_shift)
