"""The public ops in standard PyTorch operators, for the calls that the custom ops cannot serve (see
:func:`scnet_fused.ops._dispatch.standard_ops_only`): ONNX export and ``torch.jit.trace``, which
should record no operator of this package, and ``torch.func`` transforms, which the custom ops'
autograd does not support. The reference's math (:mod:`scnet_fused.reference`), differentiated by
autograd; the nearest upsampling as index gathers that every ONNX runtime computes as PyTorch does.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import reference as R

__all__ = ["upsample_nearest", "sc_gate", "sc_gate_bn_train", "sc_gate_bn2_train", "sc_avgpool", "bn_relu_train",
           "bn_relu_cat_train", "relu_cat"]


def _index_map(out_len: Tensor, in_len: Tensor) -> Tensor:
    """:func:`scnet_fused._index.nearest_source_index` as tensor arithmetic, so that a trace records it:
    ``min(floor(i * (in / out)), in - 1)`` with float32 division and product. ``out_len`` / ``in_len``:
    float32 vectors of zeros of the output / input length (they follow the traced shapes)."""
    ones = out_len + 1
    n_out, n_in = ones.sum(), (in_len + 1).sum()
    i = ones.cumsum(0) - 1
    return torch.minimum(torch.floor(i * (n_in / n_out)), n_in - 1).to(torch.int64)


def upsample_nearest(small: Tensor, like: Tensor) -> Tensor:
    """``interpolate(small, size=like.shape[-2:], mode="nearest")`` as two gathers whose indices come
    from the shapes by PyTorch's float32 formula. (onnxruntime's Resize computes the source index by
    another formula and, for some sizes, gets another row: a 114-row map pooled by 4 reads row 13
    instead of 14 at output row 57.) The sizes are read from tensors, so exported dynamic axes stay
    dynamic; an empty batch is fine."""
    rows = _index_map(torch.zeros_like(like[:, :1, :, :1], dtype=torch.float32).sum((0, 1, 3)),
                      torch.zeros_like(small[:, :1, :, :1], dtype=torch.float32).sum((0, 1, 3)))
    cols = _index_map(torch.zeros_like(like[:, :1, :1, :], dtype=torch.float32).sum((0, 1, 2)),
                      torch.zeros_like(small[:, :1, :1, :], dtype=torch.float32).sum((0, 1, 2)))
    return small.index_select(2, rows).index_select(3, cols)


def sc_gate(x: Tensor, small: Tensor, k3: Tensor, scale: Optional[Tensor], shift: Optional[Tensor],
            small_scale: Optional[Tensor] = None, small_shift: Optional[Tensor] = None) -> Tensor:
    s = torch.sigmoid(R._acc(x) + upsample_nearest(R._affine(small, small_scale, small_shift), x))
    return R._like(R._affine(k3, scale, shift) * s, x)


def _batch_affine(t: Tensor, weight: Tensor, bias: Tensor, eps: float):
    """Batch mean and biased variance of t (float32, float64 for float64) and the BatchNorm as a
    per-channel affine, differentiable in t, weight and bias."""
    mean, var = R.channel_stats(t)
    scale = weight.to(mean.dtype) * torch.rsqrt(var + eps)
    return mean, var, scale, bias.to(mean.dtype) - mean * scale


def sc_gate_bn_train(x: Tensor, small: Tensor, k3: Tensor, weight: Tensor, bias: Tensor,
                     eps: float) -> Tuple[Tensor, Tensor, Tensor]:
    mean, var, scale, shift = _batch_affine(k3, weight, bias, eps)
    return sc_gate(x, small, k3, scale, shift), mean.detach(), var.detach()


def sc_gate_bn2_train(x: Tensor, small: Tensor, k3: Tensor, weight: Tensor, bias: Tensor, eps: float,
                      small_weight: Tensor, small_bias: Tensor,
                      small_eps: float) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    mean, var, scale, shift = _batch_affine(k3, weight, bias, eps)
    small_mean, small_var, ss, st = _batch_affine(small, small_weight, small_bias, small_eps)
    y = sc_gate(x, small, k3, scale, shift, ss, st)
    return y, mean.detach(), var.detach(), small_mean.detach(), small_var.detach()


def sc_avgpool(x: Tensor, r: int) -> Tensor:
    return R.avgpool(x, r)


def bn_z(t: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tuple[Tensor, Tensor, Tensor]:
    """``(z, mean, var)``: the training-mode BatchNorm of t (batch statistics) in the accumulation
    dtype, differentiable in t, weight and bias, and its statistics."""
    mean, var, scale, shift = _batch_affine(t, weight, bias, eps)
    return R._acc(t) * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1), mean, var


def bn_train(t: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tuple[Tensor, Tensor, Tensor]:
    z, mean, var = bn_z(t, weight, bias, eps)
    return R._like(z, t), mean.detach(), var.detach()


def bn_relu_train(t: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tuple[Tensor, Tensor, Tensor]:
    z, mean, var = bn_z(t, weight, bias, eps)
    return R._like(torch.relu(z), t), mean.detach(), var.detach()


def bn_add_relu_train(t: Tensor, weight: Tensor, bias: Tensor, residual: Tensor,
                      eps: float) -> Tuple[Tensor, Tensor, Tensor]:
    z, mean, var = bn_z(t, weight, bias, eps)
    return R._like(torch.relu(z + R._acc(residual)), t), mean.detach(), var.detach()


def affine_add_relu(t: Tensor, residual: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    a = R._acc(t)
    z = a * scale.to(a.dtype).view(1, -1, 1, 1) + shift.to(a.dtype).view(1, -1, 1, 1) + R._acc(residual)
    return R._like(torch.relu(z), t)


def bn_relu_cat_train(ta: Tensor, wa: Tensor, ba: Tensor, tb: Tensor, wb: Tensor, bb: Tensor, eps_a: float,
                      eps_b: float) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    ya, mean_a, var_a = bn_relu_train(ta, wa, ba, eps_a)
    yb, mean_b, var_b = bn_relu_train(tb, wb, bb, eps_b)
    return R._like(torch.cat([ya, yb], 1), ta), mean_a, var_a, mean_b, var_b


def relu_cat(a: Tensor, b: Tensor) -> Tensor:
    return R._like(torch.cat([torch.relu(a), torch.relu(b)], 1), a)
