"""The self-calibration gate as custom ops with autograd.

``sc_gate(x, small, k3, scale=None, shift=None, small_scale=None, small_shift=None)``
    ``(k3 * scale + shift) * sigmoid(x + interpolate(small * small_scale + small_shift, size=x.shape[-2:],
    mode="nearest"))``; with the affines None it is the plain SCConv gate ``k3 * sigmoid(x + up(small))``.
    ``scale``/``shift`` are per-channel (``[C]``): an eval-mode BatchNorm of k3 folded in;
    ``small_scale``/``small_shift`` likewise of the pooled branch (applied where the kernels read it).
``sc_gate_bn_train(x, small, k3, weight, bias, eps)``
    the gate with a training-mode BatchNorm of k3 inside: returns ``(y, mean, var)`` where
    ``y = gate(x, small, bn(k3))`` normalized with the batch statistics, and ``mean`` / ``var`` (biased)
    are those statistics (float32, for the running-stat update; not differentiable).
``sc_gate_bn2_train(x, small, k3, weight, bias, eps, small_weight, small_bias, small_eps)``
    the same with a training-mode BatchNorm of the pooled branch too: ``small`` is k2's convolution
    output, normalized with its batch statistics inside the gate kernels (the normalized map is never
    written); returns ``(y, mean, var, small_mean, small_var)``.

The backward passes are custom ops too (``sc_gate_backward``, ``sc_gate_bn_train_backward``,
``sc_gate_bn2_train_backward``), so ``torch.compile`` sees them as single nodes. In eager mode with a
compiled backend (cpu, cuda) the public functions call the C++ autograd twins of these ops instead
(``csrc/autograd.cpp``: same kernels, same saved tensors, no Python in the autograd node). Nothing but
the inputs (and the batch statistics) is saved for backward: the sigmoid, the gate and the normalized
k3 and pooled map are recomputed.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import _dispatch, _double, _plain

__all__ = ["sc_gate", "sc_gate_bn_train", "sc_gate_bn2_train", "check_gate_inputs"]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _shape(t: Tensor) -> tuple:
    return tuple(t.shape)


def _inputs_ok(x, small, k3, per_channel) -> bool:
    """True only where every check of :func:`check_gate_inputs` passes and every size is a plain int: the
    common case in a few attribute reads (about 1 us against 6 for the checks one by one). Anything
    else returns False, and the checks one by one name the problem (or pass symbolic sizes)."""
    if not (isinstance(x, Tensor) and isinstance(small, Tensor) and isinstance(k3, Tensor)):
        return False
    xs, ss = x.shape, small.shape
    if len(xs) != 4 or len(ss) != 4:
        return False
    N, C, H, W = xs
    n, c, h, w = ss
    if not (type(N) is int and type(C) is int and type(H) is int and type(W) is int and type(n) is int
            and type(c) is int and type(h) is int and type(w) is int):
        return False
    dt, dev = x.dtype, x.device
    if (dt not in _FLOAT_DTYPES or small.dtype != dt or k3.dtype != dt or k3.shape != xs or n != N or c != C
            or not (1 <= h <= H and 1 <= w <= W) or small.device != dev or k3.device != dev):
        return False
    for v in per_channel:
        if v is not None and not (isinstance(v, Tensor) and v.dim() == 1 and v.shape[0] == C and v.device == dev
                                  and v.is_floating_point()):
            return False
    return True


def check_gate_inputs(x: Tensor, small: Tensor, k3: Tensor, *per_channel: Optional[Tensor],
                      names: tuple[str, ...] = (), op: str = "sc_gate") -> None:
    """Validate the gate's inputs before any kernel runs; raise ValueError/TypeError naming the problem
    and ``op``, the public op called."""
    if _inputs_ok(x, small, k3, per_channel):
        return
    for name, t in (("x", x), ("small", small), ("k3", k3)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{op}: {name} must be a Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{op}: {name} must be 4-D (N, C, H, W), got shape {_shape(t)}")
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{op}: {name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    if small.dtype != x.dtype or k3.dtype != x.dtype:
        raise TypeError(
            f"{op}: x, small and k3 must share one dtype, got x {x.dtype}, small {small.dtype}, k3 {k3.dtype}"
        )
    if small.device != x.device or k3.device != x.device:
        raise ValueError(
            f"{op}: x, small and k3 must be on one device, got x {x.device}, small {small.device}, k3 {k3.device}"
        )
    if _shape(k3) != _shape(x):
        raise ValueError(f"{op}: k3 must have x's shape {_shape(x)}, got {_shape(k3)}")
    if small.shape[0] != x.shape[0] or small.shape[1] != x.shape[1]:
        raise ValueError(
            f"{op}: small must have x's batch and channel sizes (N={x.shape[0]}, C={x.shape[1]}), "
            f"got small {_shape(small)} for x {_shape(x)}"
        )
    empty = (f"{op}: the pooled map is empty (small {_shape(small)}): H and W of x {_shape(x)} "
             f"must be at least the pooling rate")
    larger = (f"{op}: small {_shape(small)} must not be larger than x {_shape(x)} in H or W "
              f"(the gate upsamples it to x's size)")
    # With symbolic sizes (torch.compile / torch.export with dynamic H or W) these two are left to the
    # op's own body, which runs them on the real sizes before any kernel: comparing h // r with H there
    # added a guard that specialised H and W, and an export with dynamic H and W failed. Plain sizes
    # (eager, or static shapes while tracing) are checked here.
    if not any(isinstance(d, torch.SymInt) for d in (small.shape[2], small.shape[3], x.shape[2], x.shape[3])):
        if small.shape[2] < 1 or small.shape[3] < 1:
            raise ValueError(empty)
        if small.shape[2] > x.shape[2] or small.shape[3] > x.shape[3]:
            raise ValueError(larger)
    for i, t in enumerate(per_channel):
        if t is not None:
            check_per_channel(op, names[i] if i < len(names) else f"per-channel argument {i}", t, x, "x")


def checked_eps(op: str, eps, name: str = "eps") -> float:
    """``eps`` as a float, positive: a training BatchNorm divides by sqrt(var + eps), and a constant
    channel has var 0 (ATen's batch_norm refuses eps <= 0 in training too; NaN is refused here as well)."""
    value = float(eps)
    if not value > 0.0:
        raise ValueError(f"{op}: {name} must be positive (a training BatchNorm divides by sqrt(var + {name})), "
                         f"got {value}")
    return value


def check_per_channel(op: str, name: str, v, like: Tensor, like_name: str) -> None:
    """``v`` must be a floating-point 1-D tensor of ``like``'s C values on ``like``'s device."""
    C = like.shape[1]
    if not isinstance(v, Tensor) or v.dim() != 1 or v.shape[0] != C:
        raise ValueError(f"{op}: {name} must be a 1-D tensor of C={C} values, got "
                         f"{_shape(v) if isinstance(v, Tensor) else type(v).__name__}")
    if v.device != like.device:
        raise ValueError(f"{op}: {name} is on {v.device}, {like_name} on {like.device}")
    if not v.is_floating_point():
        raise TypeError(f"{op}: {name} must be floating point, got {v.dtype}")


def _format(x: Tensor) -> torch.memory_format:
    """The memory format the kernels use (and the outputs get) for an input like ``x``."""
    if x.is_contiguous():
        return torch.contiguous_format
    if x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _empty_like_x(x: Tensor) -> Tensor:
    return torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=_format(x))


def _as(t: Tensor, fmt: torch.memory_format) -> Tensor:
    return t.contiguous(memory_format=fmt)


def _vec(t: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    return None if t is None else t.detach().to(dtype).contiguous()


def _acc_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _prepare(x: Tensor, small: Tensor, k3: Tensor, *rest: Tensor):
    fmt = _format(x)
    return (fmt, _as(x, fmt), small.contiguous(), _as(k3, fmt)) + tuple(_as(t, fmt) for t in rest)


# ----------------------------------------------------------------------------------------------
# sc_gate
# ----------------------------------------------------------------------------------------------


_GATE_NAMES = ("scale", "shift", "small_scale", "small_shift")


@torch.library.custom_op("scnet_fused::sc_gate", mutates_args=())
def _sc_gate(x: Tensor, small: Tensor, k3: Tensor, scale: Optional[Tensor], shift: Optional[Tensor],
             small_scale: Optional[Tensor] = None, small_shift: Optional[Tensor] = None) -> Tensor:
    check_gate_inputs(x, small, k3, scale, shift, small_scale, small_shift, names=_GATE_NAMES)
    if x.numel() == 0:
        return _empty_like_x(x)
    _, prims = _dispatch.select(x.device, x.dtype)
    _, x, small, k3 = _prepare(x, small, k3)
    acc = _acc_dtype(x)
    small_affine = _small_args(small_scale, small_shift, acc)
    return prims.gate_forward(x, small, k3, _vec(scale, acc), _vec(shift, acc), *small_affine)


@_sc_gate.register_fake
def _(x, small, k3, scale, shift, small_scale=None, small_shift=None):
    check_gate_inputs(x, small, k3, scale, shift, small_scale, small_shift, names=_GATE_NAMES)
    return _empty_like_x(x)


def _small_args(small_scale: Optional[Tensor], small_shift: Optional[Tensor], acc: torch.dtype) -> tuple:
    """The pooled branch's affine for a primitive: nothing without one (the primitives' defaults)."""
    if small_scale is None and small_shift is None:
        return ()
    return _vec(small_scale, acc), _vec(small_shift, acc)


@torch.library.custom_op("scnet_fused::sc_gate_backward", mutates_args=())
def _sc_gate_backward(dy: Tensor, x: Tensor, small: Tensor, k3: Tensor, scale: Optional[Tensor],
                      shift: Optional[Tensor], small_scale: Optional[Tensor] = None,
                      small_shift: Optional[Tensor] = None,
                      need_sums: bool = True) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dx, dsmall, dk3, sum_g, sum_gk); sum_g and sum_gk (the gradients of shift and scale) are empty
    without need_sums."""
    acc = _acc_dtype(x)
    if x.numel() == 0:
        zeros = torch.zeros(x.shape[1] if need_sums else 0, dtype=acc, device=x.device)
        return (_empty_like_x(x), torch.zeros_like(small, memory_format=torch.contiguous_format),
                _empty_like_x(x), zeros, zeros.clone())
    _, prims = _dispatch.select(x.device, x.dtype)
    _, x, small, k3, dy = _prepare(x, small, k3, dy.to(x.dtype))
    dx, dsmall, dk3, sum_g, sum_gk = prims.gate_backward(
        dy, x, small, k3, _vec(scale, acc), _vec(shift, acc), None, True, *_small_args(small_scale, small_shift, acc),
        need_sums=need_sums)
    return dx, dsmall, dk3, sum_g, sum_gk


@_sc_gate_backward.register_fake
def _(dy, x, small, k3, scale, shift, small_scale=None, small_shift=None, need_sums=True):
    acc = _acc_dtype(x)
    c = x.new_empty(x.shape[1] if need_sums else 0, dtype=acc)
    return (_empty_like_x(x), small.new_empty(small.shape), _empty_like_x(x), c, c.new_empty(c.shape))


def small_affine_grads(dn: Tensor, small: Tensor, small_scale: Optional[Tensor], small_shift: Optional[Tensor]):
    """The gradients through the pooled branch's affine from ``dn``, the gradient of its output (the
    kernels' dsmall): ``dsmall = dn * small_scale`` and, over N, h and w, ``sum(dn * small)`` and
    ``sum(dn)`` (the C++ twin is ``small_affine_grads`` of csrc/autograd.cpp: the same calls)."""
    d = dn.to(_acc_dtype(dn))
    dsmall = (d * small_scale.to(d.dtype).view(1, -1, 1, 1)).to(small.dtype) if small_scale is not None else dn
    dss = (d * small.to(d.dtype)).sum((0, 2, 3)).to(small_scale.dtype) if small_scale is not None else None
    dst = d.sum((0, 2, 3)).to(small_shift.dtype) if small_shift is not None else None
    return dsmall, dss, dst


def _sc_gate_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _sc_gate_bwd(ctx, dy):
    if torch.is_grad_enabled():  # create_graph: a backward that can be differentiated again
        return tuple(_double.vjp("sc_gate", dy, ctx.saved_tensors))
    x, small, k3, scale, shift, ss, st = ctx.saved_tensors
    # The per-channel sums only where a trained affine asks for them (not a plain gate or frozen constants).
    want_dscale = scale is not None and ctx.needs_input_grad[3]
    want_dshift = shift is not None and ctx.needs_input_grad[4]
    dx, dsmall, dk3, sum_g, sum_gk = torch.ops.scnet_fused.sc_gate_backward(
        dy, x, small, k3, scale, shift, ss, st, want_dscale or want_dshift)
    dscale = sum_gk.to(scale.dtype) if want_dscale else None
    dshift = sum_g.to(shift.dtype) if want_dshift else None
    dss = dst = None
    if ss is not None or st is not None:
        dsmall, dss, dst = small_affine_grads(dsmall, small, ss, st)
    return dx, dsmall, dk3, dscale, dshift, dss, dst


_dispatch.register_autograd(_sc_gate, _sc_gate_bwd, _sc_gate_setup)


def sc_gate(x: Tensor, small: Tensor, k3: Tensor, scale: Optional[Tensor] = None,
            shift: Optional[Tensor] = None, small_scale: Optional[Tensor] = None,
            small_shift: Optional[Tensor] = None) -> Tensor:
    """``(k3 * scale + shift) * sigmoid(x + interpolate(small * small_scale + small_shift, size=x.shape[-2:],
    mode="nearest"))``.

    x, k3: ``(N, C, H, W)``; small: ``(N, C, h, w)`` with ``1 <= h <= H``, ``1 <= w <= W``; one dtype
    (float16, bfloat16, float32; float64 on the reference backend) and one device. ``scale``/``shift``:
    optional ``[C]`` per-channel affine of k3; ``small_scale``/``small_shift``: optional ``[C]``
    per-channel affine of small (an eval-mode BatchNorm of the pooled branch), applied in float32 where
    the kernels read small. The output has x's memory format (contiguous or channels_last).
    Differentiable in every input.
    """
    if _dispatch.fx_symbolic(x):  # torch.fx symbolic tracing: one node, the op
        return _dispatch.fx_record(sc_gate, 1, x, small, k3, scale, shift, small_scale, small_shift)
    check_gate_inputs(x, small, k3, scale, shift, small_scale, small_shift, names=_GATE_NAMES)
    path = _dispatch.route(x)
    if path is _dispatch.CPP:
        return torch.ops.scnet_fused._sc_gate_ag(x, small, k3, scale, shift, small_scale, small_shift)
    if path is _dispatch.PLAIN:
        return _plain.sc_gate(x, small, k3, scale, shift, small_scale, small_shift)
    return torch.ops.scnet_fused.sc_gate(x, small, k3, scale, shift, small_scale, small_shift)


# ----------------------------------------------------------------------------------------------
# sc_gate_bn_train: the gate with a training-mode BatchNorm of k3 folded in
# ----------------------------------------------------------------------------------------------


def affine_fold(weight: Tensor, bias: Tensor, mean: Tensor, var: Tensor, eps: float, dtype: torch.dtype):
    """``(invstd, scale, shift)`` in ``dtype`` with ``bn(t) = t * scale + shift`` per channel:
    ``invstd = rsqrt(var + eps)``, ``scale = weight * invstd``, ``shift = bias - mean * scale``
    (differentiable in whatever requires grad; the C++ twin is ``affine_fold`` of csrc/autograd.cpp)."""
    invstd = torch.rsqrt(var.to(dtype) + eps)
    scale = weight.to(dtype) * invstd
    return invstd, scale, bias.to(dtype) - mean.to(dtype) * scale


def bn_fold(weight: Tensor, bias: Tensor, mean: Tensor, var: Tensor, eps: float):
    """:func:`affine_fold` of a training-mode BatchNorm from its batch statistics (no autograd)."""
    return affine_fold(weight.detach(), bias.detach(), mean, var, eps, mean.dtype)


def _check_bn(x: Tensor, small: Tensor, k3: Tensor, weight: Tensor, bias: Tensor) -> None:
    check_gate_inputs(x, small, k3, weight, bias, names=("weight", "bias"), op="sc_gate_bn_train")
    if weight is None or bias is None:
        raise ValueError("sc_gate_bn_train: weight and bias are required (pass ones and zeros for affine=False)")
    n_per_channel = x.shape[0] * x.shape[2] * x.shape[3]
    if n_per_channel <= 1:
        raise ValueError(
            f"sc_gate_bn_train: expected more than 1 value per channel when training, got input of shape {_shape(x)}"
        )


def _gate_bn_train_forward(prims, x, small, k3, weight, bias, eps, small_affine=()):
    """(y, mean, var) of the training-mode BatchNorm gate on prepared inputs; ``small_affine``: the
    pooled branch's (scale, shift), or nothing."""
    if _dispatch.one_call(prims, x):  # NCHW: channel by channel, k3 read the second time from cache
        return prims.gate_bn_train_forward(x, small, k3, weight.detach(), bias.detach(), eps, *small_affine)
    mean, var = prims.channel_stats(k3)
    _, scale, shift = bn_fold(weight, bias, mean, var, eps)
    y = prims.gate_forward(x, small, k3, scale.contiguous(), shift.contiguous(), *small_affine)
    return y, mean, var


@torch.library.custom_op("scnet_fused::sc_gate_bn_train", mutates_args=())
def _sc_gate_bn_train(x: Tensor, small: Tensor, k3: Tensor, weight: Tensor, bias: Tensor,
                      eps: float) -> tuple[Tensor, Tensor, Tensor]:
    _check_bn(x, small, k3, weight, bias)
    eps = checked_eps("sc_gate_bn_train", eps)
    _, prims = _dispatch.select(x.device, x.dtype)
    _, x, small, k3 = _prepare(x, small, k3)
    return _gate_bn_train_forward(prims, x, small, k3, weight, bias, eps)


@_sc_gate_bn_train.register_fake
def _(x, small, k3, weight, bias, eps):
    _check_bn(x, small, k3, weight, bias)
    checked_eps("sc_gate_bn_train", eps)
    acc = _acc_dtype(x)
    c = x.new_empty(x.shape[1], dtype=acc)
    return _empty_like_x(x), c, c.new_empty(c.shape)


@torch.library.custom_op("scnet_fused::sc_gate_bn_train_backward", mutates_args=())
def _sc_gate_bn_train_backward(dy: Tensor, x: Tensor, small: Tensor, k3: Tensor, weight: Tensor,
                               bias: Tensor, mean: Tensor, var: Tensor,
                               eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    _, prims = _dispatch.select(x.device, x.dtype)
    _, x, small, k3, dy = _prepare(x, small, k3, dy.to(x.dtype))
    return _gate_bn_train_grads(prims, dy, x, small, k3, weight, bias, mean, var, eps)


def _gate_bn_train_grads(prims, dy, x, small, k3, weight, bias, mean, var, eps, small_affine=()):
    """(dx, dsmall, dk3, dweight, dbias) of the training-mode BatchNorm gate on prepared inputs; with
    ``small_affine`` dsmall is the gradient of the pooled branch's affine output."""
    if _dispatch.one_call(prims, x):
        # The fold, the two passes below and the algebra between them (NCHW: channel by channel,
        # each channel's k3 and g * scale read the second time from cache).
        dx, dsmall, dk3, dweight, dbias = prims.gate_bn_train_backward(
            dy, x, small, k3, weight.detach(), bias.detach(), mean, var, eps, *small_affine)
        return dx, dsmall, dk3, dweight.to(weight.dtype), dbias.to(bias.dtype)
    invstd, scale, shift = bn_fold(weight, bias, mean, var, eps)
    scale, shift = scale.contiguous(), shift.contiguous()
    # Pass 1: dx, dsmall and the per-channel sums sum(g), sum(g * (k3 - mean)), g = dy * sigmoid(.).
    dx, dsmall, _, sum_g, sum_gc = prims.gate_backward(dy, x, small, k3, scale, shift, mean.contiguous(), False,
                                                       *small_affine)
    m = float(x.shape[0] * x.shape[2] * x.shape[3])
    dbias = sum_g
    dweight = sum_gc * invstd  # sum(g * xhat)
    # Pass 2: BatchNorm's input gradient, dk3 = scale * (g - sum_g / M - xhat * dweight / M),
    # written as p * g + q * k3 + r with per-channel p, q, r (the sigmoid recomputed).
    q = (-scale * invstd * dweight / m).contiguous()
    r = (-q * mean - scale * sum_g / m).contiguous()
    dk3 = prims.gate_backward_k3(dy, x, small, k3, scale, q, r, *small_affine)
    return dx, dsmall, dk3, dweight.to(weight.dtype), dbias.to(bias.dtype)


@_sc_gate_bn_train_backward.register_fake
def _(dy, x, small, k3, weight, bias, mean, var, eps):
    return (_empty_like_x(x), small.new_empty(small.shape), _empty_like_x(x),
            weight.new_empty(weight.shape), bias.new_empty(bias.shape))


def _bn_setup(ctx, inputs, output):
    x, small, k3, weight, bias, eps = inputs
    _, mean, var = output
    ctx.eps = eps
    ctx.mark_non_differentiable(mean, var)
    ctx.save_for_backward(x, small, k3, weight, bias, mean, var)


def _bn_bwd(ctx, dy, _dmean, _dvar):
    x, small, k3, weight, bias, mean, var = ctx.saved_tensors
    if torch.is_grad_enabled():  # create_graph: a backward that can be differentiated again
        return (*_double.vjp("sc_gate_bn_train", dy, (x, small, k3, weight, bias), (ctx.eps,)), None)
    dx, dsmall, dk3, dweight, dbias = torch.ops.scnet_fused.sc_gate_bn_train_backward(
        dy, x, small, k3, weight, bias, mean, var, ctx.eps)
    return dx, dsmall, dk3, dweight, dbias, None


_dispatch.register_autograd(_sc_gate_bn_train, _bn_bwd, _bn_setup)


def sc_gate_bn_train(x: Tensor, small: Tensor, k3: Tensor, weight: Tensor, bias: Tensor,
                     eps: float = 1e-5) -> tuple[Tensor, Tensor, Tensor]:
    """Gate with a training-mode BatchNorm of ``k3`` fused in.

    Returns ``(y, mean, var)``: ``y = bn(k3) * sigmoid(x + up(small))`` with ``bn`` normalizing by the
    batch statistics of k3 and applying ``weight``/``bias``; ``mean`` and biased ``var`` (float32,
    ``[C]``) are the batch statistics, for updating running stats. Differentiable in x, small, k3,
    weight and bias.
    """
    if _dispatch.fx_symbolic(x):
        return _dispatch.fx_record(sc_gate_bn_train, 3, x, small, k3, weight, bias, eps)
    _check_bn(x, small, k3, weight, bias)
    eps = checked_eps("sc_gate_bn_train", eps)
    path = _dispatch.route(x)
    if path is _dispatch.PLAIN:
        return _plain.sc_gate_bn_train(x, small, k3, weight, bias, float(eps))
    if path is _dispatch.CPP:
        return torch.ops.scnet_fused._sc_gate_bn_train_ag(x, small, k3, weight, bias, float(eps))
    return torch.ops.scnet_fused.sc_gate_bn_train(x, small, k3, weight, bias, float(eps))


# ----------------------------------------------------------------------------------------------
# sc_gate_bn2_train: training-mode BatchNorms of k3 and of the pooled branch inside the gate
# ----------------------------------------------------------------------------------------------


def _check_bn2(x: Tensor, small: Tensor, k3: Tensor, weight: Tensor, bias: Tensor, small_weight: Tensor,
               small_bias: Tensor) -> None:
    check_gate_inputs(x, small, k3, weight, bias, small_weight, small_bias,
                      names=("weight", "bias", "small_weight", "small_bias"), op="sc_gate_bn2_train")
    if any(v is None for v in (weight, bias, small_weight, small_bias)):
        raise ValueError("sc_gate_bn2_train: weight, bias, small_weight and small_bias are required (pass ones and "
                         "zeros for affine=False)")
    for name, t in (("k3", x), ("the pooled map", small)):
        if t.shape[0] * t.shape[2] * t.shape[3] <= 1:
            raise ValueError(f"sc_gate_bn2_train: expected more than 1 value per channel when training, got {name} "
                             f"of shape {_shape(t)}")


def _small_fold(small_weight, small_bias, small_mean, small_var, small_eps):
    """The pooled map's BatchNorm as the per-channel affine the kernels apply: ``(invstd, (scale, shift))``
    (:func:`bn_fold`; forward and backward fold the same way, so the backward recomputes the forward's)."""
    invstd, ss, st = bn_fold(small_weight, small_bias, small_mean, small_var, small_eps)
    return invstd, (ss.contiguous(), st.contiguous())


@torch.library.custom_op("scnet_fused::sc_gate_bn2_train", mutates_args=())
def _sc_gate_bn2_train(x: Tensor, small: Tensor, k3: Tensor, weight: Tensor, bias: Tensor, eps: float,
                       small_weight: Tensor, small_bias: Tensor,
                       small_eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    _check_bn2(x, small, k3, weight, bias, small_weight, small_bias)
    _, prims = _dispatch.select(x.device, x.dtype)
    _, x, small, k3 = _prepare(x, small, k3)
    small_mean, small_var = prims.channel_stats(small)
    _, small_affine = _small_fold(small_weight, small_bias, small_mean, small_var, small_eps)
    y, mean, var = _gate_bn_train_forward(prims, x, small, k3, weight, bias, eps, small_affine)
    return y, mean, var, small_mean, small_var


@_sc_gate_bn2_train.register_fake
def _(x, small, k3, weight, bias, eps, small_weight, small_bias, small_eps):
    _check_bn2(x, small, k3, weight, bias, small_weight, small_bias)
    c = x.new_empty(x.shape[1], dtype=_acc_dtype(x))
    return _empty_like_x(x), c, c.new_empty(c.shape), c.new_empty(c.shape), c.new_empty(c.shape)


@torch.library.custom_op("scnet_fused::sc_gate_bn2_train_backward", mutates_args=())
def _sc_gate_bn2_train_backward(dy: Tensor, x: Tensor, small: Tensor, k3: Tensor, weight: Tensor, bias: Tensor,
                                mean: Tensor, var: Tensor, eps: float, small_weight: Tensor, small_bias: Tensor,
                                small_mean: Tensor, small_var: Tensor, small_eps: float
                                ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    _, prims = _dispatch.select(x.device, x.dtype)
    _, x, small, k3, dy = _prepare(x, small, k3, dy.to(x.dtype))
    invstd2, small_affine = _small_fold(small_weight, small_bias, small_mean, small_var, small_eps)
    dx, dn, dk3, dweight, dbias = _gate_bn_train_grads(prims, dy, x, small, k3, weight, bias, mean, var, eps,
                                                       small_affine)
    # The pooled branch's BatchNorm backward on the small map, from dn (the gradient of its output); the
    # weight in the statistics' dtype (half-precision parameters: ATen's mixed-type form).
    # (An empty pooled map: nothing to reduce, and ATen's CPU BatchNorm backward divides by the channel
    # count, a floating-point exception at C = 0.)
    if small.numel() == 0:
        dsmall, dsw, dsb = torch.zeros_like(small), torch.zeros_like(small_weight), torch.zeros_like(small_bias)
    else:
        dsmall, dsw, dsb = torch.ops.aten.native_batch_norm_backward(
            dn, small, small_weight.detach().to(small_mean.dtype), None, None, small_mean, invstd2, True, small_eps,
            [True, True, True])
    return dx, dsmall, dk3, dweight, dbias, dsw.to(small_weight.dtype), dsb.to(small_bias.dtype)


@_sc_gate_bn2_train_backward.register_fake
def _(dy, x, small, k3, weight, bias, mean, var, eps, small_weight, small_bias, small_mean, small_var, small_eps):
    return (_empty_like_x(x), small.new_empty(small.shape), _empty_like_x(x), weight.new_empty(weight.shape),
            bias.new_empty(bias.shape), small_weight.new_empty(small_weight.shape),
            small_bias.new_empty(small_bias.shape))


def _bn2_setup(ctx, inputs, output):
    x, small, k3, weight, bias, eps, small_weight, small_bias, small_eps = inputs
    _, mean, var, small_mean, small_var = output
    ctx.eps, ctx.small_eps = eps, small_eps
    ctx.mark_non_differentiable(mean, var, small_mean, small_var)
    ctx.save_for_backward(x, small, k3, weight, bias, mean, var, small_weight, small_bias, small_mean, small_var)


def _bn2_bwd(ctx, dy, _dmean, _dvar, _dsmall_mean, _dsmall_var):
    x, small, k3, weight, bias, mean, var, small_weight, small_bias, small_mean, small_var = ctx.saved_tensors
    if torch.is_grad_enabled():  # create_graph: a backward that can be differentiated again
        dx, dsmall, dk3, dweight, dbias, dsw, dsb = _double.vjp(
            "sc_gate_bn2_train", dy, (x, small, k3, weight, bias, small_weight, small_bias), (ctx.eps, ctx.small_eps))
        return dx, dsmall, dk3, dweight, dbias, None, dsw, dsb, None
    if dy is None:  # only the statistics were used (they carry no gradient)
        dy = torch.zeros_like(x)
    dx, dsmall, dk3, dweight, dbias, dsw, dsb = torch.ops.scnet_fused.sc_gate_bn2_train_backward(
        dy, x, small, k3, weight, bias, mean, var, ctx.eps, small_weight, small_bias, small_mean, small_var,
        ctx.small_eps)
    return dx, dsmall, dk3, dweight, dbias, None, dsw, dsb, None


_dispatch.register_autograd(_sc_gate_bn2_train, _bn2_bwd, _bn2_setup)


def sc_gate_bn2_train(x: Tensor, small: Tensor, k3: Tensor, weight: Tensor, bias: Tensor, eps: float,
                      small_weight: Tensor, small_bias: Tensor,
                      small_eps: float = 1e-5) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gate with training-mode BatchNorms of ``k3`` and of the pooled map ``small`` fused in.

    ``y = bn(k3) * sigmoid(x + up(bn_small(small)))`` where both BatchNorms normalize by their batch
    statistics and apply their weight / bias; ``bn_small`` is applied where the kernels read the pooled
    map, so its output is never written. Returns ``(y, mean, var, small_mean, small_var)``: the batch
    statistics (biased variances, float32, ``[C]``) of k3 and of small, for updating running stats.
    Differentiable in x, small, k3 and the four BatchNorm parameters.
    """
    if _dispatch.fx_symbolic(x):
        return _dispatch.fx_record(sc_gate_bn2_train, 5, x, small, k3, weight, bias, eps, small_weight, small_bias,
                                   small_eps)
    _check_bn2(x, small, k3, weight, bias, small_weight, small_bias)
    eps, small_eps = checked_eps("sc_gate_bn2_train", eps), checked_eps("sc_gate_bn2_train", small_eps, "small_eps")
    path = _dispatch.route(x)
    if path is _dispatch.PLAIN:
        return _plain.sc_gate_bn2_train(x, small, k3, weight, bias, eps, small_weight, small_bias, small_eps)
    if path is _dispatch.CPP:
        return torch.ops.scnet_fused._sc_gate_bn2_train_ag(x, small, k3, weight, bias, eps, small_weight,
                                                            small_bias, small_eps)
    return torch.ops.scnet_fused.sc_gate_bn2_train(x, small, k3, weight, bias, eps, small_weight, small_bias,
                                                   small_eps)
