"""The fused modules' two convolutions with backwards of their own, as custom ops for torch.compile.

In eager mode the modules run them as ``torch.autograd.Function``s (``modules._ConvOfGate``: k4's
convolution of the gate output, which recomputes that output in its backward instead of saving it;
``modules._ParamConv``: a convolution whose weight is a parameter cast, or several stacked, saving the
parameters instead of that new weight-sized tensor). A compiled graph holding an autograd.Function
cannot go to AOTAutograd's cache (torch bypasses it for them), so every process that compiled a fused
model traced its forward and backward graphs again (scnet50's first compiled forward + backward at
2x3x128x128, caches warm, Intel Xeon: 23.9 s, and 13.3 s with these ops;
``benchmarks/results/cpu-xeon/compile_time.md``). Under torch.compile (not torch.export) the modules
take these ops instead: the same computations and saved tensors, their backward formulas registered
with ``register_autograd``.

``conv_of_gate``: ``conv2d(y, weight)`` with ``y = sc_gate(x, small, k3, scale, shift, small_scale,
small_shift)`` rebuilt in the backward. ``winograd_op``: the graph's decision (``winograd._graph_op_applies``,
made while dynamo traces): the body then runs ``scnet_fused::conv3x3``'s (Winograd where the size rule
says so on the real tensors, else ATen's convolution) and the backward ``conv3x3_backward``; otherwise
ATen's convolution and its backward. The output has y's layout (dense NCHW or channels_last), as the
fake tensor says.

``param_conv``: ``conv2d(x, cat(weights).to(x.dtype))``, saving x and the parameters; the output in x's
layout. Neither supports a second derivative (torch.compile has none for custom autograd either).
"""

from __future__ import annotations

from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import winograd
from .sc_gate import sc_gate


def _conv_like(x: Tensor, weight: Tensor, stride, padding, dilation, groups: int) -> Tensor:
    """The fake output: ATen's convolution on the fake tensors gives the shape, in x's graph layout (the
    layout the bodies return)."""
    out = F.conv2d(x, weight.to(x.dtype), None, stride, padding, dilation, groups)
    return torch.empty(out.shape, dtype=x.dtype, device=x.device, memory_format=winograd._graph_format(x))


def param_weight(weights, dtype: Optional[torch.dtype] = None) -> Tensor:
    """The weight the parameters make: the one, or several stacked; cast to ``dtype`` if given (also
    ``modules._ParamConv``'s)."""
    w = weights[0] if len(weights) == 1 else torch.cat(weights)
    return w if dtype is None else w.to(dtype)


# ----------------------------------------------------------------------------------------------
# conv_of_gate
# ----------------------------------------------------------------------------------------------


@torch.library.custom_op("scnet_fused::conv_of_gate", mutates_args=())
def _conv_of_gate(y: Tensor, weight: Tensor, x: Tensor, small: Tensor, k3: Tensor, scale: Optional[Tensor],
                  shift: Optional[Tensor], small_scale: Optional[Tensor], small_shift: Optional[Tensor],
                  stride: List[int], padding: List[int], dilation: List[int], groups: int,
                  winograd_op: bool) -> Tensor:
    if winograd_op:
        return torch.ops.scnet_fused.conv3x3(y, weight.to(y.dtype), None)
    out = F.conv2d(y, weight.to(y.dtype), None, stride, padding, dilation, groups)
    return winograd._in_format(out, winograd._graph_format(y))


@_conv_of_gate.register_fake
def _(y, weight, x, small, k3, scale, shift, small_scale, small_shift, stride, padding, dilation, groups,
      winograd_op):
    return _conv_like(y, weight, stride, padding, dilation, groups)


def _conv_of_gate_setup(ctx, inputs, output):
    y, weight, x, small, k3, scale, shift, small_scale, small_shift, stride, padding, dilation, groups, wop = inputs
    ctx.conv = (stride, padding, dilation, groups, wop)
    ctx.save_for_backward(weight, x, small, k3, scale, shift, small_scale, small_shift)


def _conv_of_gate_bwd(ctx, grad_out):
    weight, x, small, k3, scale, shift, small_scale, small_shift = ctx.saved_tensors
    stride, padding, dilation, groups, wop = ctx.conv
    y = sc_gate(x, small, k3, scale, shift, small_scale, small_shift)
    need_y, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    w = weight.to(y.dtype)
    if wop:
        grad_y, grad_w = torch.ops.scnet_fused.conv3x3_backward(grad_out, y, w, need_y, need_w)
    else:
        grad_y, grad_w, _ = torch.ops.aten.convolution_backward(
            grad_out, y, w, None, list(stride), list(padding), list(dilation), False, [0, 0], groups,
            [need_y, need_w, False])
    grad_y = grad_y if need_y else None
    grad_w = grad_w.to(weight.dtype) if need_w else None
    return (grad_y, grad_w) + (None,) * 12


_conv_of_gate.register_autograd(_conv_of_gate_bwd, setup_context=_conv_of_gate_setup)


def conv_of_gate(y: Tensor, weight: Tensor, x: Tensor, small: Tensor, k3: Tensor, scale: Optional[Tensor],
                 shift: Optional[Tensor], small_scale: Optional[Tensor], small_shift: Optional[Tensor],
                 stride, padding, dilation, groups: int) -> Tensor:
    """``conv2d(y, weight)`` (y the gate output of the other arguments, recomputed in the backward), for a
    graph dynamo is tracing."""
    stride, padding, dilation = (list(winograd._pair(v)) for v in (stride, padding, dilation))
    wop = winograd._graph_op_applies(y, weight, stride, padding, dilation, groups)
    return torch.ops.scnet_fused.conv_of_gate(y, weight, x, small, k3, scale, shift, small_scale, small_shift,
                                              stride, padding, dilation, groups, wop)


# ----------------------------------------------------------------------------------------------
# param_conv
# ----------------------------------------------------------------------------------------------


@torch.library.custom_op("scnet_fused::param_conv", mutates_args=())
def _param_conv(x: Tensor, weights: List[Tensor], stride: List[int], padding: List[int], dilation: List[int],
                groups: int) -> Tensor:
    out = F.conv2d(x, param_weight(weights, x.dtype), None, stride, padding, dilation, groups)
    return winograd._in_format(out, winograd._graph_format(x))


@_param_conv.register_fake
def _(x, weights, stride, padding, dilation, groups):
    return _conv_like(x, param_weight(weights), stride, padding, dilation, groups)


def _param_conv_setup(ctx, inputs, output):
    x, weights, stride, padding, dilation, groups = inputs
    ctx.conv = (stride, padding, dilation, groups, len(weights))
    ctx.save_for_backward(x, *weights)


def _param_conv_bwd(ctx, grad_out):
    x, *weights = ctx.saved_tensors
    stride, padding, dilation, groups, _ = ctx.conv
    need_x, need_ws = ctx.needs_input_grad[0], ctx.needs_input_grad[1]  # (a list for the Tensor[] input)
    need_w = any(need_ws)
    grad_x, grad_w, _ = torch.ops.aten.convolution_backward(
        grad_out, x, param_weight(weights, x.dtype), None, list(stride), list(padding), list(dilation), False,
        [0, 0], groups, [need_x, need_w, False])
    grads_w = [None] * len(weights)
    if need_w:
        grads_w = [g.to(w.dtype) if need else None
                   for g, w, need in zip(grad_w.split([w.shape[0] for w in weights]), weights, need_ws)]
    return grad_x if need_x else None, grads_w, None, None, None, None


_param_conv.register_autograd(_param_conv_bwd, setup_context=_param_conv_setup)


def param_conv(x: Tensor, stride, padding, dilation, groups: int, *weights: Tensor) -> Tensor:
    """``conv2d(x, cat(weights).to(x.dtype))`` saving the parameters, for a graph dynamo is tracing (the
    arguments of ``modules._ParamConv.apply``)."""
    stride, padding, dilation = (list(winograd._pair(v)) for v in (stride, padding, dilation))
    return torch.ops.scnet_fused.param_conv(x, list(weights), stride, padding, dilation, groups)
