"""The compiled extension ``scnet_fused._C`` as a backend: C++ (CPU) and CUDA kernels.

The extension registers the kernel-level primitives as ``torch.ops.scnet_fused._gate_forward`` and
friends (schemas in ``csrc/ops.cpp``; CPU kernels in ``csrc/cpu/``, CUDA kernels in ``csrc/cuda/``).
"""

from __future__ import annotations

from typing import Optional

import torch

_OPS = ("_gate_forward", "_gate_backward", "_gate_backward_k3", "_channel_stats", "_avgpool", "_avgpool_backward",
        "_affine_relu", "_affine_relu_out", "_affine_relu_backward_sums", "_affine_relu_backward_apply")
_import_error: Optional[str] = None

try:
    from .. import _C  # noqa: F401  (loads the op library)
except Exception as exc:  # not built, or built against another torch
    _import_error = f"the compiled extension scnet_fused._C is not importable ({type(exc).__name__}: {exc})"


def has_kernel(op: str, key: str) -> bool:
    if _import_error is not None:
        return False
    try:
        return bool(torch._C._dispatch_has_kernel_for_dispatch_key(f"scnet_fused::{op}", key))
    except RuntimeError:
        return False


_AUTOGRAD_OPS = ("_sc_gate_ag", "_sc_gate_bn_train_ag", "_sc_avgpool_ag", "_bn_relu_train_ag", "_bn_relu_cat_train_ag")
_autograd_ops: Optional[bool] = None


def has_autograd_ops() -> bool:
    """The extension carries the C++ autograd ops of csrc/autograd.cpp."""
    global _autograd_ops
    if _autograd_ops is None:
        _autograd_ops = _import_error is None and all(
            torch._C._dispatch_has_kernel_for_dispatch_key(f"scnet_fused::{op}", "Autograd")
            for op in _AUTOGRAD_OPS)
    return _autograd_ops


def unavailable_reason(name: str) -> Optional[str]:
    """None when backend ``name`` ('cpu' or 'cuda') has compiled kernels, else why not."""
    if _import_error is not None:
        return _import_error
    key = "CPU" if name == "cpu" else "CUDA"
    missing = [op for op in _OPS if not has_kernel(op, key)]
    if missing:
        if name == "cuda":
            return "scnet_fused._C was built without CUDA kernels (no CUDA toolkit at build time, or SCNET_FUSED_CUDA=0)"
        return f"scnet_fused._C has no {key} kernels for {', '.join(missing)}"
    return None


class Primitives:
    """The primitives of ``scnet_fused.ops._dispatch`` over the extension's ops."""

    def __init__(self, name: str):
        self.name = name
        self._ops = torch.ops.scnet_fused

    def gate_forward(self, x, small, k3, scale, shift):
        return self._ops._gate_forward(x, small, k3, scale, shift)

    def gate_backward(self, dy, x, small, k3, scale, shift, center, need_dk3):
        dx, dsmall, dk3, sum_g, sum_gk = self._ops._gate_backward(dy, x, small, k3, scale, shift, center, need_dk3)
        return dx, dsmall, (dk3 if need_dk3 else None), sum_g, sum_gk

    def gate_backward_k3(self, dy, x, small, k3, p, q, r):
        return self._ops._gate_backward_k3(dy, x, small, k3, p, q, r)

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

    def affine_relu_backward_sums(self, dy, t, scale, shift, center):
        return self._ops._affine_relu_backward_sums(dy, t, scale, shift, center)

    def affine_relu_backward_apply(self, dy, t, scale, shift, p, q, r):
        return self._ops._affine_relu_backward_apply(dy, t, scale, shift, p, q, r)
