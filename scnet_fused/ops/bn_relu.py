"""``bn_relu_train(t, weight, bias, eps)``: a training-mode BatchNorm followed by a ReLU, fused.

Returns ``(y, mean, var)``: ``y = relu(batch_norm(t))`` normalised with the batch statistics of t
(``mean`` and biased ``var``, float32 ``[C]``, for the running-statistics update; not differentiable).
Forward: one statistics pass over t, one pass writing y (eager: the statistics, the normalisation
and the ReLU each read and write t-sized tensors). Backward: one pass reducing BatchNorm's two
per-channel sums with the ReLU mask recomputed from t, one pass writing dt. On the cpu backend each
is one call, and on NCHW tensors it goes channel by channel, so the second pass reads the channel from
cache. Saved for backward: t and the per-channel vectors (never the normalised tensor or the mask).
Differentiable in t, weight, bias.
"""

from __future__ import annotations


import torch
from torch import Tensor

from .._alloc import new_empty
from . import _dispatch, _double, _plain
from .sc_gate import _format, bn_fold, check_per_channel, checked_eps

__all__ = ["bn_relu_train", "bn_relu_cat_train", "bn_add_relu_train", "affine_add_relu", "check_bn_relu_inputs"]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_bn_relu_inputs(t: Tensor, weight: Tensor, bias: Tensor, op: str = "bn_relu_train", tname: str = "t",
                         suffix: str = "") -> None:
    """Raise ValueError/TypeError before any kernel runs when the inputs cannot be normalised."""
    _check_map(t, op, tname)
    check_per_channel(op, "weight" + suffix, weight, t, tname)
    check_per_channel(op, "bias" + suffix, bias, t, tname)
    if t.shape[0] * t.shape[2] * t.shape[3] <= 1:
        raise ValueError(f"{op}: expected more than 1 value per channel when training, got {tname} of "
                         f"shape {tuple(t.shape)}")


def _check_map(t: Tensor, op: str, tname: str = "t") -> None:
    if not isinstance(t, Tensor) or t.dim() != 4:
        raise ValueError(f"{op}: {tname} must be a 4-D (N, C, H, W) tensor, got "
                         f"{tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__}")
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{op}: {tname} must be float16, bfloat16, float32 or float64, got {t.dtype}")


def _check_residual(t: Tensor, residual: Tensor, op: str) -> None:
    if not isinstance(residual, Tensor) or residual.shape != t.shape:
        raise ValueError(f"{op}: residual must have t's shape {tuple(t.shape)}, got "
                         f"{tuple(residual.shape) if isinstance(residual, Tensor) else type(residual).__name__}")
    if residual.dtype != t.dtype or residual.device != t.device:
        raise ValueError(f"{op}: residual must have t's dtype and device ({t.dtype} on {t.device}), "
                         f"got {residual.dtype} on {residual.device}")


def _acc_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


@torch.library.custom_op("scnet_fused::bn_relu_train", mutates_args=())
def _bn_relu_train(t: Tensor, weight: Tensor, bias: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    check_bn_relu_inputs(t, weight, bias)
    _, prims = _dispatch.select(t.device, t.dtype)
    t = t.contiguous(memory_format=_format(t))
    if _dispatch.one_call(prims, t):
        y = new_empty(t.shape, t.dtype, t.device, _format(t))
        mean, var = prims.bn_relu_train_out(t, weight.detach(), bias.detach(), eps, y)
        return y, mean, var
    mean, var = prims.channel_stats(t)
    _, scale, shift = bn_fold(weight, bias, mean, var, eps)
    y = prims.affine_relu(t, scale.contiguous(), shift.contiguous())
    return y, mean, var


@_bn_relu_train.register_fake
def _(t, weight, bias, eps):
    check_bn_relu_inputs(t, weight, bias)
    c = t.new_empty(t.shape[1], dtype=_acc_dtype(t))
    return torch.empty(t.shape, dtype=t.dtype, device=t.device, memory_format=_format(t)), c, c.new_empty(c.shape)


@torch.library.custom_op("scnet_fused::bn_relu_train_backward", mutates_args=())
def _bn_relu_train_backward(dy: Tensor, t: Tensor, weight: Tensor, bias: Tensor, mean: Tensor, var: Tensor,
                            eps: float) -> tuple[Tensor, Tensor, Tensor]:
    _, prims = _dispatch.select(t.device, t.dtype)
    fmt = _format(t)
    t = t.contiguous(memory_format=fmt)
    dy = dy.to(t.dtype).contiguous(memory_format=fmt)
    return _grads(prims, dy, t, weight, bias, mean, var, eps)


def _grads(prims, dy: Tensor, t: Tensor, weight: Tensor, bias: Tensor, mean: Tensor, var: Tensor, eps: float):
    """(dt, dweight, dbias) of relu(batch_norm(t)) for the output gradient dy (dense like t, or a
    channel slice of a concatenation's gradient in t's memory format: read in place)."""
    if _dispatch.one_call(prims, t):
        # The fold, the passes below and the algebra between them (NCHW: channel by channel, each
        # channel's t and dy read the second time from cache).
        dt, dweight, dbias = prims.bn_relu_train_backward(dy, t, weight.detach(), bias.detach(), mean, var, eps)
        return dt, dweight.to(weight.dtype), dbias.to(bias.dtype)
    invstd, scale, shift = bn_fold(weight, bias, mean, var, eps)
    scale, shift = scale.contiguous(), shift.contiguous()
    # Pass 1: sum(g) and sum(g * (t - mean)), g = dy masked by the ReLU (recomputed from t).
    sum_g, sum_gc = prims.affine_relu_backward_sums(dy, t, scale, shift, mean.contiguous())
    m = float(t.shape[0] * t.shape[2] * t.shape[3])
    dweight = sum_gc * invstd  # sum(g * xhat)
    # Pass 2: dt = scale * (g - sum_g / M - xhat * dweight / M) = p * g + q * t + r.
    q = -scale * invstd * dweight / m
    r = -q * mean - scale * sum_g / m
    dt = prims.affine_relu_backward_apply(dy, t, scale, shift, scale, q.contiguous(), r.contiguous())
    return dt, dweight.to(weight.dtype), sum_g.to(bias.dtype)


@_bn_relu_train_backward.register_fake
def _(dy, t, weight, bias, mean, var, eps):
    return (torch.empty(t.shape, dtype=t.dtype, device=t.device, memory_format=_format(t)),
            weight.new_empty(weight.shape), bias.new_empty(bias.shape))


def _setup(ctx, inputs, output):
    t, weight, bias, eps = inputs
    _, mean, var = output
    ctx.eps = eps
    ctx.mark_non_differentiable(mean, var)
    ctx.save_for_backward(t, weight, bias, mean, var)


def _backward(ctx, dy, _dmean, _dvar):
    t, weight, bias, mean, var = ctx.saved_tensors
    if torch.is_grad_enabled():  # create_graph: a backward that can be differentiated again
        return (*_double.vjp("bn_relu_train", dy, (t, weight, bias), (ctx.eps,)), None)
    if dy is None:
        dy = torch.zeros_like(t)
    dt, dweight, dbias = torch.ops.scnet_fused.bn_relu_train_backward(dy, t, weight, bias, mean, var, ctx.eps)
    return dt, dweight, dbias, None


_dispatch.register_autograd(_bn_relu_train, _backward, _setup)


def bn_relu_train(t: Tensor, weight: Tensor, bias: Tensor, eps: float = 1e-5) -> tuple[Tensor, Tensor, Tensor]:
    """``relu(batch_norm(t, weight, bias, training=True))`` fused; returns ``(y, mean, var)``.

    t: ``(N, C, H, W)`` float16 / bfloat16 / float32 (float64 on the reference backend), contiguous or
    channels_last (y keeps the format); weight, bias: ``[C]``. ``mean`` and biased ``var`` are the
    float32 batch statistics (update running statistics with them; unbiased = var * M / (M - 1)).
    """
    if _dispatch.fx_symbolic(t):  # torch.fx symbolic tracing: one node, the op
        return _dispatch.fx_record(bn_relu_train, 3, t, weight, bias, eps)
    check_bn_relu_inputs(t, weight, bias)
    eps = checked_eps("bn_relu_train", eps)
    path = _dispatch.route(t)
    if path is _dispatch.PLAIN:
        return _plain.bn_relu_train(t, weight, bias, float(eps))
    if path is _dispatch.CPP:  # eager with a compiled backend: the C++ autograd twin (csrc/autograd.cpp)
        return torch.ops.scnet_fused._bn_relu_train_ag(t, weight, bias, float(eps))
    return torch.ops.scnet_fused.bn_relu_train(t, weight, bias, float(eps))


# ------------------------------------------------------------------------------------------------
# Two branches' BatchNorm + ReLU written straight into their concatenation
# ------------------------------------------------------------------------------------------------


def check_bn_relu_cat_inputs(ta: Tensor, wa: Tensor, ba: Tensor, tb: Tensor, wb: Tensor, bb: Tensor) -> None:
    check_bn_relu_inputs(ta, wa, ba, "bn_relu_cat_train", "ta", "_a")
    check_bn_relu_inputs(tb, wb, bb, "bn_relu_cat_train", "tb", "_b")
    if ta.shape[0] != tb.shape[0] or ta.shape[2:] != tb.shape[2:]:
        raise ValueError(f"bn_relu_cat_train: the branches differ outside the channel dimension: "
                         f"{tuple(ta.shape)} and {tuple(tb.shape)}")
    if ta.dtype != tb.dtype or ta.device != tb.device:
        raise ValueError(f"bn_relu_cat_train: the branches differ in dtype or device ({ta.dtype} on {ta.device}, "
                         f"{tb.dtype} on {tb.device})")


def _cat_empty(ta: Tensor, tb: Tensor, fmt: torch.memory_format) -> Tensor:
    n, ca, h, w = ta.shape
    return new_empty((n, ca + tb.shape[1], h, w), ta.dtype, ta.device, fmt)


@torch.library.custom_op("scnet_fused::bn_relu_cat_train", mutates_args=())
def _bn_relu_cat_train(ta: Tensor, wa: Tensor, ba: Tensor, eps_a: float, tb: Tensor, wb: Tensor, bb: Tensor,
                       eps_b: float) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    check_bn_relu_cat_inputs(ta, wa, ba, tb, wb, bb)
    eps_a, eps_b = checked_eps("bn_relu_cat_train", eps_a, "eps_a"), checked_eps("bn_relu_cat_train", eps_b, "eps_b")
    _, prims = _dispatch.select(ta.device, ta.dtype)
    fmt = _format(ta)
    out = _cat_empty(ta, tb, fmt)
    ca = ta.shape[1]
    stats = []
    for t, w, b, eps, half in ((ta, wa, ba, eps_a, out[:, :ca]), (tb, wb, bb, eps_b, out[:, ca:])):
        t = t.contiguous(memory_format=fmt)
        if _dispatch.one_call(prims, t):
            mean, var = prims.bn_relu_train_out(t, w.detach(), b.detach(), eps, half)  # written in place
        else:
            mean, var = prims.channel_stats(t)
            _, scale, shift = bn_fold(w, b, mean, var, eps)
            prims.affine_relu_out(t, scale.contiguous(), shift.contiguous(), half)  # written in place
        stats += [mean, var]
    return out, stats[0], stats[1], stats[2], stats[3]


@_bn_relu_cat_train.register_fake
def _(ta, wa, ba, eps_a, tb, wb, bb, eps_b):
    check_bn_relu_cat_inputs(ta, wa, ba, tb, wb, bb)
    checked_eps("bn_relu_cat_train", eps_a, "eps_a"), checked_eps("bn_relu_cat_train", eps_b, "eps_b")
    out = torch.empty((ta.shape[0], ta.shape[1] + tb.shape[1], ta.shape[2], ta.shape[3]), dtype=ta.dtype,
                      device=ta.device, memory_format=_format(ta))
    ca, cb = ta.new_empty(ta.shape[1], dtype=_acc_dtype(ta)), tb.new_empty(tb.shape[1], dtype=_acc_dtype(tb))
    return out, ca, ca.new_empty(ca.shape), cb, cb.new_empty(cb.shape)


@torch.library.custom_op("scnet_fused::bn_relu_cat_train_backward", mutates_args=())
def _bn_relu_cat_train_backward(dout: Tensor, ta: Tensor, wa: Tensor, ba: Tensor, mean_a: Tensor, var_a: Tensor,
                                eps_a: float, tb: Tensor, wb: Tensor, bb: Tensor, mean_b: Tensor, var_b: Tensor,
                                eps_b: float) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    _, prims = _dispatch.select(ta.device, ta.dtype)
    fmt = _format(ta)
    dout = dout.to(ta.dtype).contiguous(memory_format=fmt)
    ca = ta.shape[1]
    # each half of dout is read in place by the kernels (a channel slice in ta's memory format)
    ga = _grads(prims, dout[:, :ca], ta.contiguous(memory_format=fmt), wa, ba, mean_a, var_a, eps_a)
    gb = _grads(prims, dout[:, ca:], tb.contiguous(memory_format=fmt), wb, bb, mean_b, var_b, eps_b)
    return ga + gb


@_bn_relu_cat_train_backward.register_fake
def _(dout, ta, wa, ba, mean_a, var_a, eps_a, tb, wb, bb, mean_b, var_b, eps_b):
    fmt = _format(ta)
    return (torch.empty(ta.shape, dtype=ta.dtype, device=ta.device, memory_format=fmt), wa.new_empty(wa.shape),
            ba.new_empty(ba.shape), torch.empty(tb.shape, dtype=tb.dtype, device=tb.device, memory_format=fmt),
            wb.new_empty(wb.shape), bb.new_empty(bb.shape))


def _cat_setup(ctx, inputs, output):
    ta, wa, ba, eps_a, tb, wb, bb, eps_b = inputs
    _, mean_a, var_a, mean_b, var_b = output
    ctx.eps = (eps_a, eps_b)
    ctx.mark_non_differentiable(mean_a, var_a, mean_b, var_b)
    ctx.save_for_backward(ta, wa, ba, mean_a, var_a, tb, wb, bb, mean_b, var_b)


def _cat_backward(ctx, dout, *_dstats):
    ta, wa, ba, mean_a, var_a, tb, wb, bb, mean_b, var_b = ctx.saved_tensors
    if torch.is_grad_enabled():  # create_graph: a backward that can be differentiated again
        dta, dwa, dba, dtb, dwb, dbb = _double.vjp("bn_relu_cat_train", dout, (ta, wa, ba, tb, wb, bb), ctx.eps)
        return dta, dwa, dba, None, dtb, dwb, dbb, None
    if dout is None:
        dout = torch.zeros((ta.shape[0], ta.shape[1] + tb.shape[1], ta.shape[2], ta.shape[3]), dtype=ta.dtype,
                           device=ta.device)
    dta, dwa, dba, dtb, dwb, dbb = torch.ops.scnet_fused.bn_relu_cat_train_backward(
        dout, ta, wa, ba, mean_a, var_a, ctx.eps[0], tb, wb, bb, mean_b, var_b, ctx.eps[1])
    return dta, dwa, dba, None, dtb, dwb, dbb, None


_dispatch.register_autograd(_bn_relu_cat_train, _cat_backward, _cat_setup)


def bn_relu_cat_train(ta: Tensor, wa: Tensor, ba: Tensor, tb: Tensor, wb: Tensor, bb: Tensor, eps_a: float = 1e-5,
                      eps_b: float = 1e-5) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``cat([relu(batch_norm(ta)), relu(batch_norm(tb))], dim=1)`` in training mode, each branch's
    normalise-and-ReLU pass writing its channels of the output directly.

    Returns ``(out, mean_a, var_a, mean_b, var_b)``: the float32 batch statistics (biased variances) of
    each branch, for the running-statistics update. ``ta`` ``(N, Ca, H, W)`` and ``tb`` ``(N, Cb, H, W)``
    share N, H, W, dtype and device; ``out`` takes ta's memory format. The backward reads each half of
    the output gradient in place (no copy of the halves) and saves ta, tb and per-channel vectors.
    Eager: two BatchNorms write their outputs, the ReLUs and the concatenation read and write them again.
    """
    if _dispatch.fx_symbolic(ta):
        return _dispatch.fx_record(bn_relu_cat_train, 5, ta, wa, ba, tb, wb, bb, eps_a, eps_b)
    check_bn_relu_cat_inputs(ta, wa, ba, tb, wb, bb)
    eps_a, eps_b = checked_eps("bn_relu_cat_train", eps_a, "eps_a"), checked_eps("bn_relu_cat_train", eps_b, "eps_b")
    path = _dispatch.route(ta)
    if path is _dispatch.PLAIN:
        return _plain.bn_relu_cat_train(ta, wa, ba, tb, wb, bb, float(eps_a), float(eps_b))
    if path is _dispatch.CPP:  # eager with a compiled backend: the C++ autograd twin (csrc/autograd.cpp)
        return torch.ops.scnet_fused._bn_relu_cat_train_ag(ta, wa, ba, float(eps_a), tb, wb, bb, float(eps_b))
    return torch.ops.scnet_fused.bn_relu_cat_train(ta, wa, ba, float(eps_a), tb, wb, bb, float(eps_b))


# ------------------------------------------------------------------------------------------------
# BatchNorm + residual addition + ReLU: the end of a bottleneck
# ------------------------------------------------------------------------------------------------


def check_bn_add_relu_inputs(t: Tensor, weight: Tensor, bias: Tensor, residual: Tensor) -> None:
    check_bn_relu_inputs(t, weight, bias, "bn_add_relu_train")
    _check_residual(t, residual, "bn_add_relu_train")


@torch.library.custom_op("scnet_fused::bn_add_relu_train", mutates_args=())
def _bn_add_relu_train(t: Tensor, weight: Tensor, bias: Tensor, residual: Tensor,
                       eps: float) -> tuple[Tensor, Tensor, Tensor]:
    check_bn_add_relu_inputs(t, weight, bias, residual)
    eps = checked_eps("bn_add_relu_train", eps)
    _, prims = _dispatch.select(t.device, t.dtype)
    t = t.contiguous(memory_format=_format(t))
    if _dispatch.one_call(prims, t):  # NCHW channel by channel: t's second read from cache
        return prims.bn_add_relu_train_forward(t, residual, weight.detach(), bias.detach(), eps)
    mean, var = prims.channel_stats(t)
    _, scale, shift = bn_fold(weight, bias, mean, var, eps)
    y = prims.affine_add_relu(t, residual, scale.contiguous(), shift.contiguous())
    return y, mean, var


@_bn_add_relu_train.register_fake
def _(t, weight, bias, residual, eps):
    check_bn_add_relu_inputs(t, weight, bias, residual)
    checked_eps("bn_add_relu_train", eps)
    c = t.new_empty(t.shape[1], dtype=_acc_dtype(t))
    return torch.empty(t.shape, dtype=t.dtype, device=t.device, memory_format=_format(t)), c, c.new_empty(c.shape)


@torch.library.custom_op("scnet_fused::bn_add_relu_train_backward", mutates_args=())
def _bn_add_relu_train_backward(dy: Tensor, y: Tensor, t: Tensor, weight: Tensor, bias: Tensor, mean: Tensor,
                                var: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    _, prims = _dispatch.select(t.device, t.dtype)
    fmt = _format(t)
    t = t.contiguous(memory_format=fmt)
    if _dispatch.one_call(prims, t):  # the passes below in one call (NCHW: channel by channel)
        dt, dweight, dbias, g = prims.bn_add_relu_train_backward(dy.to(t.dtype), y, t, weight.detach(),
                                                                 bias.detach(), mean, var, eps)
        return dt, dweight.to(weight.dtype), dbias.to(bias.dtype), g
    # g = dy where the output is not <= 0 (torch's ReLU backward from its output: a NaN passes dy):
    # the residual's gradient, and the BatchNorm's output gradient
    g = torch.ops.aten.threshold_backward(dy.to(t.dtype), y, 0).contiguous(memory_format=fmt)
    invstd, scale, _ = bn_fold(weight, bias, mean, var, eps)
    scale = scale.contiguous()
    # The BatchNorm's backward from g through the ReLU primitives with their mask switched off: with
    # scale 0 and shift 1 the masked value 0 * t + 1 is never <= 0 (NaN for an infinite t: not <= 0).
    off, on = torch.zeros_like(scale), torch.ones_like(scale)
    sum_g, sum_gc = prims.affine_relu_backward_sums(g, t, off, on, mean.contiguous())
    m = float(t.shape[0] * t.shape[2] * t.shape[3])
    dweight = sum_gc * invstd
    q = -scale * invstd * dweight / m
    r = -q * mean - scale * sum_g / m
    dt = prims.affine_relu_backward_apply(g, t, off, on, scale, q.contiguous(), r.contiguous())
    return dt, dweight.to(weight.dtype), sum_g.to(bias.dtype), g


@_bn_add_relu_train_backward.register_fake
def _(dy, y, t, weight, bias, mean, var, eps):
    fmt = _format(t)
    return (torch.empty(t.shape, dtype=t.dtype, device=t.device, memory_format=fmt), weight.new_empty(weight.shape),
            bias.new_empty(bias.shape), torch.empty(t.shape, dtype=t.dtype, device=t.device, memory_format=fmt))


def _add_setup(ctx, inputs, output):
    t, weight, bias, residual, eps = inputs
    y, mean, var = output
    ctx.eps = eps
    ctx.mark_non_differentiable(mean, var)
    ctx.save_for_backward(y, t, weight, bias, mean, var)


def _add_backward(ctx, dy, _dmean, _dvar):
    y, t, weight, bias, mean, var = ctx.saved_tensors
    if torch.is_grad_enabled():  # create_graph: a backward that can be differentiated again
        return (*_double.vjp("bn_add_relu_train", dy, (t, weight, bias, y), (ctx.eps,)), None)
    if dy is None:
        dy = torch.zeros_like(t)
    dt, dweight, dbias, dres = torch.ops.scnet_fused.bn_add_relu_train_backward(dy, y, t, weight, bias, mean, var,
                                                                                ctx.eps)
    return dt, dweight, dbias, dres, None


_dispatch.register_autograd(_bn_add_relu_train, _add_backward, _add_setup)


def bn_add_relu_train(t: Tensor, weight: Tensor, bias: Tensor, residual: Tensor,
                      eps: float = 1e-5) -> tuple[Tensor, Tensor, Tensor]:
    """``relu(batch_norm(t, weight, bias, training=True) + residual)`` fused; returns ``(y, mean, var)``.

    The end of a bottleneck: its last BatchNorm, the shortcut's addition and the ReLU. Forward: one
    statistics pass over t, one pass reading t and residual and writing y (eager: the normalised tensor,
    the sum and the ReLU each written and read again). Backward: the ReLU's mask from y (the residual's
    gradient), then BatchNorm's two passes. Saved for backward: y and t (eager saves the same two:
    BatchNorm's input and the ReLU's output) and per-channel vectors. ``residual`` has t's shape, dtype
    and device (any memory format; read in t's); ``mean`` and biased ``var`` as :func:`bn_relu_train`.
    Differentiable in t, weight, bias and residual.
    """
    if _dispatch.fx_symbolic(t):
        return _dispatch.fx_record(bn_add_relu_train, 3, t, weight, bias, residual, eps)
    check_bn_add_relu_inputs(t, weight, bias, residual)
    eps = checked_eps("bn_add_relu_train", eps)
    path = _dispatch.route(t)
    if path is _dispatch.PLAIN:
        return _plain.bn_add_relu_train(t, weight, bias, residual, float(eps))
    if path is _dispatch.CPP:  # eager with a compiled backend: the C++ autograd twin (csrc/autograd.cpp)
        return torch.ops.scnet_fused._bn_add_relu_train_ag(t, weight, bias, residual, float(eps))
    return torch.ops.scnet_fused.bn_add_relu_train(t, weight, bias, residual, float(eps))


# ------------------------------------------------------------------------------------------------
# Inference: an eval-mode BatchNorm (a per-channel affine) + residual addition + ReLU
# ------------------------------------------------------------------------------------------------


def _check_affine_add_relu(t: Tensor, residual: Tensor, scale: Tensor, shift: Tensor) -> None:
    _check_map(t, "affine_add_relu")
    _check_residual(t, residual, "affine_add_relu")
    check_per_channel("affine_add_relu", "scale", scale, t, "t")
    check_per_channel("affine_add_relu", "shift", shift, t, "t")


def _affine_add_relu_args(t: Tensor, residual: Tensor, scale: Tensor, shift: Tensor):
    """The primitive's arguments: t dense in its memory format, the constants in the accumulation dtype."""
    acc = _acc_dtype(t)
    return t.contiguous(memory_format=_format(t)), residual, scale.to(acc).contiguous(), shift.to(acc).contiguous()


@torch.library.custom_op("scnet_fused::affine_add_relu", mutates_args=())
def _affine_add_relu_op(t: Tensor, residual: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    _check_affine_add_relu(t, residual, scale, shift)
    _, prims = _dispatch.select(t.device, t.dtype)
    return prims.affine_add_relu(*_affine_add_relu_args(t, residual, scale, shift))


@_affine_add_relu_op.register_fake
def _(t, residual, scale, shift):
    _check_affine_add_relu(t, residual, scale, shift)
    return torch.empty(t.shape, dtype=t.dtype, device=t.device, memory_format=_format(t))


def affine_add_relu(t: Tensor, residual: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    """``relu(t * scale[c] + shift[c] + residual)`` in one pass, for inference (no autograd): an eval-mode
    BatchNorm folded to ``scale`` / ``shift``, the shortcut's addition and the ReLU at a bottleneck's end
    (eager: the BatchNorm, the sum and the ReLU each read and write a full-size tensor). y like t."""
    if _dispatch.fx_symbolic(t):
        return _dispatch.fx_record(affine_add_relu, 1, t, residual, scale, shift)
    _check_affine_add_relu(t, residual, scale, shift)
    if torch.is_grad_enabled() and any(v.requires_grad for v in (t, residual, scale, shift)):
        raise RuntimeError("affine_add_relu is for inference: call it under torch.no_grad() "
                           "(bn_add_relu_train is the differentiable op)")
    path = _dispatch.route(t)
    if path is _dispatch.PLAIN:
        return _plain.affine_add_relu(t, residual, scale, shift)
    if path is _dispatch.CPP:  # eager with a compiled backend: the kernel op itself (nothing to record)
        return torch.ops.scnet_fused._affine_add_relu(*_affine_add_relu_args(t, residual, scale, shift))
    return torch.ops.scnet_fused.affine_add_relu(t, residual, scale, shift)
