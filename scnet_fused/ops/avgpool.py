"""``sc_avgpool(x, r)``: the ``r x r``, stride-``r`` average pool of SCConv's ``k2`` branch.

Same values as ``F.avg_pool2d(x, r, r)`` (``floor`` output size: the trailing ``H % r`` rows and
``W % r`` columns are dropped, and get a zero gradient), run by this package's kernels (Triton, C++,
CUDA) in x's memory format, forward and backward. Nothing full-size is saved for backward: the
backward needs x's shape and layout only (ATen's keeps x itself alive).
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _dispatch, _plain
from .sc_gate import _format

__all__ = ["sc_avgpool", "check_avgpool_input"]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_avgpool_input(x: Tensor, r: int) -> None:
    """Raise ValueError/TypeError before any kernel runs if ``x`` cannot be pooled at rate ``r``."""
    if not isinstance(x, Tensor):
        raise TypeError(f"sc_avgpool: x must be a Tensor, got {type(x).__name__}")
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"sc_avgpool: the pooling rate must be an int >= 1, got {r!r}")
    if x.dim() != 4:
        raise ValueError(f"sc_avgpool: x must be 4-D (N, C, H, W), got shape {tuple(x.shape)}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"sc_avgpool: x must be float16, bfloat16, float32 or float64, got {x.dtype}")
    if x.shape[2] < r or x.shape[3] < r:
        raise ValueError(f"sc_avgpool: H and W of x {tuple(x.shape)} must be at least the pooling rate {r} "
                         f"(the pooled map would be empty)")


def _channels_last(x: Tensor) -> bool:
    return _format(x) == torch.channels_last


@torch.library.custom_op("scnet_fused::sc_avgpool", mutates_args=())
def _sc_avgpool(x: Tensor, r: int) -> Tensor:
    check_avgpool_input(x, r)
    if x.numel() == 0:
        N, C, H, W = x.shape
        return torch.empty((N, C, H // r, W // r), dtype=x.dtype, device=x.device, memory_format=_format(x))
    _, prims = _dispatch.select(x.device, x.dtype)
    return prims.avgpool(x.contiguous(memory_format=_format(x)), r)


@_sc_avgpool.register_fake
def _(x, r):
    check_avgpool_input(x, r)
    N, C, H, W = x.shape
    return torch.empty((N, C, H // r, W // r), dtype=x.dtype, device=x.device, memory_format=_format(x))


@torch.library.custom_op("scnet_fused::sc_avgpool_backward", mutates_args=())
def _sc_avgpool_backward(dy: Tensor, H: int, W: int, r: int, channels_last: bool) -> Tensor:
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    if dy.numel() == 0:
        return torch.empty((dy.shape[0], dy.shape[1], H, W), dtype=dy.dtype, device=dy.device,
                           memory_format=fmt).zero_()
    _, prims = _dispatch.select(dy.device, dy.dtype)
    return prims.avgpool_backward(dy.contiguous(memory_format=fmt), H, W, r, channels_last)


@_sc_avgpool_backward.register_fake
def _(dy, H, W, r, channels_last):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return torch.empty((dy.shape[0], dy.shape[1], H, W), dtype=dy.dtype, device=dy.device, memory_format=fmt)


def _setup(ctx, inputs, output):
    x, r = inputs
    ctx.r = r
    ctx.size = (x.shape[2], x.shape[3])
    ctx.channels_last = _channels_last(x)


def _backward(ctx, dy):
    H, W = ctx.size
    return torch.ops.scnet_fused.sc_avgpool_backward(dy, H, W, ctx.r, ctx.channels_last), None


_dispatch.register_autograd(_sc_avgpool, _backward, _setup)


def _setup_bwd(ctx, inputs, output):
    ctx.r = inputs[3]


def _backward_bwd(ctx, ddx):
    # the pool's backward is linear in dy with the pool as its adjoint: double backward is the pool
    return torch.ops.scnet_fused.sc_avgpool(ddx, ctx.r), None, None, None, None


_dispatch.register_autograd(_sc_avgpool_backward, _backward_bwd, _setup_bwd)


def sc_avgpool(x: Tensor, r: int) -> Tensor:
    """``F.avg_pool2d(x, r, r)`` for a 4-D x with ``H, W >= r``, through the fused kernels.

    float16, bfloat16, float32 (float64 on the reference backend); contiguous or channels_last (other
    strides are copied to contiguous first); the output keeps x's memory format. Differentiable.
    """
    if _dispatch.fx_symbolic(x):
        return _dispatch.fx_record(sc_avgpool, 1, x, r)
    check_avgpool_input(x, r)
    path = _dispatch.route(x)
    if path is _dispatch.PLAIN:
        return _plain.sc_avgpool(x, r)
    if path is _dispatch.CPP:  # eager with a compiled backend: the C++ autograd twin (csrc/autograd.cpp)
        return torch.ops.scnet_fused._sc_avgpool_ag(x, r)
    return torch.ops.scnet_fused.sc_avgpool(x, r)
