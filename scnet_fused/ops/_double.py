"""Second derivatives through the fused ops: their backward recomputed in standard operators.

The fused backward kernels have no derivative of their own. When autograd runs a fused op's backward
with ``create_graph=True`` (a gradient penalty, a Hessian-vector product), the op instead recomputes
its forward from the tensors it saved, in the standard operators of :mod:`scnet_fused.ops._plain`,
and differentiates that with ``create_graph=True``: the gradients it returns are then themselves
differentiable, to any order, and equal the kernels' first derivatives to rounding. The saved tensors
are the op's inputs, still attached to the graph, so the second derivative reaches everything the
first one depends on.

Both autograd forms use it: the Python custom ops' backward functions call :func:`vjp`, and the C++
autograd nodes (``csrc/autograd.cpp``) call the op ``scnet_fused::_double_vjp`` registered here.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch import Tensor

from .. import reference as R
from . import _plain


def _grad(outs: Sequence[Tensor], grads: Sequence[Tensor], inputs: Sequence[Optional[Tensor]]) -> List[Optional[Tensor]]:
    """d<grads, outs>/d inputs with create_graph, None for inputs that are None or need no gradient."""
    wrt = [i for i, t in enumerate(inputs) if t is not None and t.requires_grad]
    res: List[Optional[Tensor]] = [None] * len(inputs)
    if not wrt:
        return res
    got = torch.autograd.grad(outs, [inputs[i] for i in wrt], grads, create_graph=True, allow_unused=True)
    for i, g in zip(wrt, got):
        res[i] = g
    return res


def _alias(inputs: Sequence[Optional[Tensor]]) -> List[Optional[Tensor]]:
    """Each input that requires grad as a view of itself: differentiating with respect to the views gives
    the partial derivatives with respect to each input, not the total ones (k3 and small are functions
    of x in an SCConv: gradients with respect to x itself would count their paths again), and the
    views keep the result attached to the inputs for the next derivative."""
    return [t.view_as(t) if t is not None and t.requires_grad else t for t in inputs]


def _by_forward(forward: Callable[..., Tensor]) -> Callable[..., List[Optional[Tensor]]]:
    """The vector-Jacobian product of a one-output forward ``forward(*inputs, *scalars)``."""

    def vjp(dy: Tensor, inputs: Sequence[Optional[Tensor]], scalars: Sequence[float]) -> List[Optional[Tensor]]:
        with torch.enable_grad():
            leaves = _alias(inputs)
            out = forward(*leaves, *scalars)
            return _grad([out], [dy.to(out.dtype)], leaves)

    return vjp


def _bn_add_relu_vjp(dy: Tensor, inputs: Sequence[Optional[Tensor]], scalars: Sequence[float]):
    """``relu(bn(t) + residual)`` from its saved output y (the residual itself is not saved): the
    residual's gradient is dy masked by y, and t's, the weight's and the bias's are the BatchNorm's
    vector-Jacobian product at that masked gradient."""
    y = inputs[3]
    with torch.enable_grad():
        t, weight, bias = _alias(inputs[:3])
        g = R._relu_grad(dy, y)  # dy where y is not <= 0: linear in dy, constant in the rest almost everywhere
        dt, dweight, dbias = _grad([_plain.bn_z(t, weight, bias, scalars[0])[0]], [g], [t, weight, bias])
    return [dt, dweight, dbias, g.to(y.dtype)]


def _relu_cat_vjp(dy: Tensor, inputs: Sequence[Optional[Tensor]], scalars: Sequence[float]):
    """``cat([relu(a), relu(b)], 1)`` from its saved output (inputs: out; scalars: a's channel count)."""
    (out,) = inputs
    ca = int(scalars[0])
    with torch.enable_grad():
        g = R._relu_grad(dy, out).to(out.dtype)
        return [g[:, :ca], g[:, ca:]]


_VJPS: Dict[str, Callable[..., List[Optional[Tensor]]]] = {
    # inputs: x, small, k3, scale, shift, small_scale, small_shift
    "sc_gate": _by_forward(_plain.sc_gate),
    # inputs: x, small, k3, weight, bias; scalars: eps
    "sc_gate_bn_train": _by_forward(lambda x, small, k3, w, b, eps: _plain.sc_gate_bn_train(x, small, k3, w, b, eps)[0]),
    # inputs: x, small, k3, weight, bias, small_weight, small_bias; scalars: eps, small_eps
    "sc_gate_bn2_train": _by_forward(
        lambda x, small, k3, w, b, sw, sb, eps, seps: _plain.sc_gate_bn2_train(x, small, k3, w, b, eps, sw, sb,
                                                                                 seps)[0]),
    # inputs: t, weight, bias; scalars: eps
    "bn_train": _by_forward(lambda t, w, b, eps: _plain.bn_train(t, w, b, eps)[0]),
    # inputs: t, weight, bias; scalars: eps
    "bn_relu_train": _by_forward(lambda t, w, b, eps: _plain.bn_relu_train(t, w, b, eps)[0]),
    # inputs: ta, wa, ba, tb, wb, bb; scalars: eps_a, eps_b
    "bn_relu_cat_train": _by_forward(
        lambda ta, wa, ba, tb, wb, bb, ea, eb: _plain.bn_relu_cat_train(ta, wa, ba, tb, wb, bb, ea, eb)[0]),
    # inputs: t, weight, bias, y (the output); scalars: eps. Gradients: t, weight, bias, residual
    "bn_add_relu_train": _bn_add_relu_vjp,
    # inputs: out; scalars: a's channel count. Gradients: a, b
    "relu_cat": _relu_cat_vjp,
}


def vjp(op: str, dy: Optional[Tensor], inputs: Sequence[Optional[Tensor]],
        scalars: Sequence[float] = ()) -> List[Optional[Tensor]]:
    """The gradients of ``op``'s differentiable output, given ``dy``, with respect to ``inputs`` (the op's
    saved tensors, attached to the graph), computed so that they can be differentiated again. None where
    an input is None or needs no gradient, and everywhere when dy is None (only outputs without a
    gradient were used)."""
    if op not in _VJPS:
        raise ValueError(f"scnet_fused._double_vjp: no standard-operator form for {op!r} (known: {sorted(_VJPS)})")
    if dy is None:
        return [None] * (2 if op == "relu_cat" else len(inputs))
    return _VJPS[op](dy, inputs, scalars)


# The C++ autograd nodes reach vjp through the dispatcher (a CompositeImplicitAutograd kernel: autograd
# records the standard operators it runs).
_lib = torch.library.Library("scnet_fused", "FRAGMENT")
_lib.define("_double_vjp(str op, Tensor? dy, Tensor?[] inputs, float[] scalars) -> Tensor?[]")


def _double_vjp(op: str, dy: Optional[Tensor], inputs: List[Optional[Tensor]], scalars: List[float]):
    return vjp(op, dy, inputs, scalars)


_lib.impl("_double_vjp", _double_vjp, "CompositeImplicitAutograd")
