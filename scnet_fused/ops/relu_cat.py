"""``relu_cat(a, b) = cat([relu(a), relu(b)], dim=1)`` with each ReLU writing its half of the output.

The bottleneck's two branches end in a ReLU and are then concatenated for conv3. Written this way
the two half-size ReLU outputs never exist: one full read and write of the 2 * width channels less,
and nothing but the output (which conv3 saves anyway) is held for backward.

``scnet_fused::relu_cat`` (with its backward ``relu_cat_backward``) is what torch.compile and
torch.export see; in plain eager calls with the compiled extension present, ``_relu_cat_ag`` of
``csrc/autograd.cpp`` runs the same ATen ops with its autograd node in C++ (no Python layers: the
custom-op path costs tens of microseconds per call, which small maps notice).
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _dispatch, _double, _plain
from .sc_gate import _format

__all__ = ["relu_cat"]


def _check(a: Tensor, b: Tensor) -> None:
    if a.dim() != 4 or b.dim() != 4:
        raise ValueError(f"relu_cat expects 4-D tensors, got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.shape[0] != b.shape[0] or a.shape[2:] != b.shape[2:]:
        raise ValueError(f"relu_cat: shapes {tuple(a.shape)} and {tuple(b.shape)} differ outside dim 1")
    if a.dtype != b.dtype or a.device != b.device:
        raise ValueError(f"relu_cat: dtype/device differ ({a.dtype} on {a.device}, {b.dtype} on {b.device})")


def _empty_out(a: Tensor, b: Tensor) -> Tensor:
    shape = (a.shape[0], a.shape[1] + b.shape[1], a.shape[2], a.shape[3])
    return torch.empty(shape, dtype=a.dtype, device=a.device, memory_format=_format(a))


@torch.library.custom_op("scnet_fused::relu_cat", mutates_args=())
def _relu_cat(a: Tensor, b: Tensor) -> Tensor:
    _check(a, b)
    out = _empty_out(a, b)
    ca = a.shape[1]
    torch.clamp_min(a, 0, out=out[:, :ca])
    torch.clamp_min(b, 0, out=out[:, ca:])
    return out


@_relu_cat.register_fake
def _(a, b):
    _check(a, b)
    return _empty_out(a, b)


@torch.library.custom_op("scnet_fused::relu_cat_backward", mutates_args=())
def _relu_cat_backward(grad: Tensor, out: Tensor, ca: int) -> tuple[Tensor, Tensor]:
    # Each half is masked straight from the slices (one read of grad and out, one write per half);
    # zero where out <= 0, as ReLU's own backward (a NaN output passes the gradient).
    zero = torch.zeros((), dtype=grad.dtype, device=grad.device)
    fmt = _format(out)
    halves = ((slice(None), slice(0, ca)), (slice(None), slice(ca, None)))
    return tuple(torch.where(out[i] <= 0, zero, grad[i]).contiguous(memory_format=fmt) for i in halves)


@_relu_cat_backward.register_fake
def _(grad, out, ca):
    fmt = _format(out)
    n, _, h, w = out.shape
    return (torch.empty((n, ca, h, w), dtype=grad.dtype, device=grad.device, memory_format=fmt),
            torch.empty((n, out.shape[1] - ca, h, w), dtype=grad.dtype, device=grad.device, memory_format=fmt))


def _setup(ctx, inputs, output):
    ctx.ca = inputs[0].shape[1]
    ctx.save_for_backward(output)


def _backward(ctx, grad):
    (out,) = ctx.saved_tensors
    if torch.is_grad_enabled():  # create_graph: a backward that can be differentiated again
        return tuple(_double.vjp("relu_cat", grad, (out,), (ctx.ca,)))
    return tuple(torch.ops.scnet_fused.relu_cat_backward(grad, out, ctx.ca))


_relu_cat.register_autograd(_backward, setup_context=_setup)


def relu_cat(a: Tensor, b: Tensor) -> Tensor:
    """``torch.cat([torch.relu(a), torch.relu(b)], dim=1)`` in one buffer (a's memory format)."""
    if _dispatch.fx_symbolic(a):  # torch.fx symbolic tracing: one node, the op
        return _dispatch.fx_record(relu_cat, 1, a, b)
    _check(a, b)
    if _dispatch.standard_ops_only():
        return _plain.relu_cat(a, b)
    if _dispatch.cpp_glue(a, b):  # the same computation with its autograd node in C++ (csrc/autograd.cpp)
        return torch.ops.scnet_fused._relu_cat_ag(a, b)
    return torch.ops.scnet_fused.relu_cat(a, b)
