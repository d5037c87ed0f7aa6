"""A 2-D max pool for NCHW float32 CPU maps (SCNet's stem pool) with ATen's exact results.

ATen's CPU max pool is slow on NCHW maps: the stem's 3x3 / stride 2 pool over 8x64x112x112 took
25 ms there on a 2-core AMD EPYC (its channels_last kernel 1.5 ms), 2% of an scnet50 training step at
batch 8 and 7% of an inference pass. :func:`max_pool2d` runs such maps
through this package's vectorized kernel (``csrc/cpu/sc_maxpool_cpu.cpp``, 2.7 ms there with the
indices a backward needs) and everything else through ``F.max_pool2d``. The kernel returns ATen's
values and ATen's indices bit for bit (ties keep the first maximum of the window in row-major
order, NaN propagates as ATen propagates it), and the backward is ATen's
``max_pool2d_with_indices_backward`` on those indices: gradients are ATen's too.
"""

from __future__ import annotations

import operator
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

_IntOr2 = Union[int, Sequence[int]]


def _pair(v: _IntOr2) -> Optional[Tuple[int, int]]:
    """An int or a sequence of one or two ints as a pair; None for anything else (a float, a bool, three
    numbers, ...), which then goes to ``F.max_pool2d`` to be rejected with ATen's own error."""
    items = tuple(v) if isinstance(v, (tuple, list)) else (v,)
    if not 1 <= len(items) <= 2 or any(isinstance(i, bool) for i in items):
        return None
    try:
        items = tuple(operator.index(i) for i in items)
    except TypeError:
        return None
    return (items[0], items[-1])


_ready: Optional[bool] = None


def _kernel_ready() -> bool:
    """The compiled kernel is registered and a vectorized build (AVX2 or AVX-512) of the CPU kernels is
    loaded: the portable build runs it slower than ATen."""
    global _ready
    if _ready is None:
        from . import _cpp

        _ready = _cpp.has_kernel("_max_pool2d_nchw", "CPU") and _cpp.cpu_isa() in ("avx2", "avx512")
    return _ready


def kernel_applies(x: Tensor, kernel_size: Tuple[int, int], stride: Tuple[int, int], padding: Tuple[int, int],
                   dilation: Tuple[int, int] = (1, 1), ceil_mode: bool = False) -> bool:
    """Whether :func:`max_pool2d` runs this pool on the package's kernel: a dense NCHW float32 CPU
    tensor of rank 4 with elements, no dilation, floor mode, padding at most half the window (as ATen
    requires), a window at most 16 rows high, and plain eager PyTorch (not under torch.compile /
    torch.export, a trace or an ONNX export, a torch.func transform or a forward-mode AD level, nor on
    a tensor subclass)."""
    from ._dispatch import _forward_ad_active, _functorch_active

    if torch.compiler.is_compiling() or torch.jit.is_tracing() or type(x) is not torch.Tensor:
        return False
    if None in (kernel_size, stride, padding, dilation):  # arguments F.max_pool2d rejects
        return False
    (kh, kw), (sh, sw), (ph, pw) = kernel_size, stride, padding
    if not (x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 4 and x.numel() > 0
            and x.is_contiguous() and tuple(dilation) == (1, 1) and not ceil_mode
            and 0 < kh <= 16 and kw > 0 and sh > 0 and sw > 0 and 0 <= 2 * ph <= kh and 0 <= 2 * pw <= kw
            and x.shape[2] + 2 * ph >= kh and x.shape[3] + 2 * pw >= kw
            and x.shape[2] * x.shape[3] < (1 << 31) - 64 * sw):
        return False
    # a forward-mode AD level open: dual tensors get their tangents from F.max_pool2d
    return not (_functorch_active() or _forward_ad_active()) and _kernel_ready()


class _MaxPool2dNCHW(torch.autograd.Function):
    """The kernel's forward (values and ATen's indices); ATen's backward on those indices (itself
    differentiable, so double backward works as it does through ``F.max_pool2d``)."""

    @staticmethod
    def forward(ctx, x, kernel_size, stride, padding):
        y, idx = torch.ops.scnet_fused._max_pool2d_nchw(x, *kernel_size, *stride, *padding, True)
        ctx.save_for_backward(x, idx)
        ctx.args = (list(kernel_size), list(stride), list(padding))
        ctx.mark_non_differentiable(idx)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, idx = ctx.saved_tensors
        k, s, p = ctx.args
        dx = torch.ops.aten.max_pool2d_with_indices_backward(dy, x, k, s, p, [1, 1], False, idx)
        return dx, None, None, None


def max_pool2d(x: Tensor, kernel_size: _IntOr2, stride: Optional[_IntOr2] = None, padding: _IntOr2 = 0,
               dilation: _IntOr2 = 1, ceil_mode: bool = False) -> Tensor:
    """``F.max_pool2d(x, kernel_size, stride, padding, dilation, ceil_mode)``: the same values and
    gradients, on the package's kernel where :func:`kernel_applies`."""
    k = _pair(kernel_size)
    s = k if stride is None or (isinstance(stride, (tuple, list)) and len(stride) == 0) else _pair(stride)
    p, d = _pair(padding), _pair(dilation)
    if not kernel_applies(x, k, s, p, d, ceil_mode):
        return F.max_pool2d(x, kernel_size, stride, padding, dilation, ceil_mode)
    if torch.is_grad_enabled() and x.requires_grad:
        return _MaxPool2dNCHW.apply(x, k, s, p)
    return torch.ops.scnet_fused._max_pool2d_nchw(x, *k, *s, *p, False)[0]
