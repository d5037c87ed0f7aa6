"""Fused SCConv and SCBottleneck: the reference's constructor, module tree and state_dict,
with the self-calibration gate and the BatchNorm of ``k3`` running in fused kernels.

Training (``k3``'s norm is a BatchNorm2d using batch statistics): one pass computes k3's per-channel
statistics, one kernel applies BN, the upsampled calibration map, the sigmoid and the product
(:func:`scnet_fused.ops.sc_gate_bn_train`); the running statistics are updated exactly as
``nn.BatchNorm2d`` does. Eval: the BN is folded into per-channel constants of the gate kernel
(:func:`scnet_fused.ops.sc_gate` with ``scale``/``shift``). Any other norm layer (SyncBatchNorm in
training, GroupNorm, a frozen BN, Identity, ...) runs as a module and feeds the generic fused gate.
The pooled branch ``k2``: its average pool runs as this package's kernel (:func:`scnet_fused.ops.sc_avgpool`,
forward and backward, nothing full-size saved) and its convolution as the module, on a map
``pooling_r**2`` times smaller. Its BatchNorm is applied inside the gate kernels where they read the
pooled map, so the normalized map is never written: in training with its batch statistics
(:func:`scnet_fused.ops.sc_gate_bn2_train`, with k3's), in eval folded to per-channel constants
(``small_scale``/``small_shift`` of :func:`scnet_fused.ops.sc_gate`). Another norm there runs as the
module.

ONNX export (``torch.onnx.export``, TorchScript-based or dynamo-based) and ``torch.jit.trace`` record the
same computation in standard operators instead of this package's custom ops, so the exported graph
runs in any ONNX runtime and the traced module loads without this package; inside a ``torch.func``
transform the modules take the same path (:func:`scnet_fused.ops._dispatch.standard_ops_only`).
``torch.compile`` and ``torch.export`` keep the fused ops.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import weakref

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules import module as _nn_module

from . import reference
from .ops import sc_avgpool, sc_gate, sc_gate_bn2_train, sc_gate_bn_train
from .ops.bn_relu import affine_add_relu, bn_add_relu_train, bn_relu_cat_train, bn_relu_train
from .ops._dispatch import cpp_autograd, cpp_glue, exporting, fx_symbolic, standard_ops_only
from .ops.relu_cat import relu_cat
from .ops.sc_gate import _format, affine_fold
from .ops import _cpp, _plain, compiled_convs, conv1x1, winograd
from .ops.maxpool import max_pool2d

__all__ = ["SCConv", "SCBottleneck", "MaxPool2d", "scnet_stem"]


# torch.nn's global module hooks (register_module_forward_hook, ...): dicts it adds to and removes
# from in place, never rebinds.
_GLOBAL_HOOK_DICTS = tuple(d for d in (getattr(_nn_module, name, None) for name in (
    "_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
    "_global_backward_pre_hooks")) if d is not None)


def _hookless(*mods: nn.Module) -> bool:
    """Nothing is attached to these modules' calls: no forward or backward hooks of their own or global
    ones (``register_module_forward_hook``, ...), no per-instance ``forward``. Only then does a fused
    path stand in for their forward; otherwise the modules run, so hooks see what they would see in
    the reference (pruning's forward pre-hook, activation hooks, profilers' module trackers, ...)."""
    for hooks in _GLOBAL_HOOK_DICTS:
        if hooks:
            return False
    for m in mods:
        if (m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks
                or "forward" in m.__dict__):
            return False
    return True


def _plain_seq(m: nn.Module, n: Optional[int] = None) -> bool:
    """An nn.Sequential (``n`` layers, if given) that runs its layers in order: no subclass forward of its
    own and nothing attached (:func:`_hookless`), so a fused path may call the layers inside directly."""
    return (isinstance(m, nn.Sequential) and type(m).forward is nn.Sequential.forward
            and (n is None or len(m) == n) and _hookless(m))


def _plain_batchnorm(m: nn.Module) -> bool:
    """A BatchNorm whose forward is nn.BatchNorm2d's own (subclasses that override forward excluded)
    and that nothing is attached to (:func:`_hookless`)."""
    return (isinstance(m, nn.modules.batchnorm._BatchNorm) and type(m).forward is nn.BatchNorm2d.forward
            and _hookless(m))


def _plain_relu(m: nn.Module) -> bool:
    return type(m).forward is nn.ReLU.forward and _hookless(m)


def _foldable_eval_norm(m: nn.Module) -> bool:
    """A norm that, in its current mode, is the per-channel affine of its running statistics."""
    if isinstance(m, nn.modules.batchnorm._BatchNorm) and type(m).forward in (
            nn.BatchNorm2d.forward, nn.SyncBatchNorm.forward):
        return (not m.training) and m.track_running_stats and m.running_mean is not None and _hookless(m)
    return False


def _eval_fold(bn, like: Tensor, differentiable: bool) -> Tuple[Tensor, Tensor]:
    """Per-channel ``(scale, shift)`` of an eval-mode BatchNorm (from its running statistics), in float32
    (float64 for a float64 ``like``, so a float64 model keeps float64 precision).

    ``differentiable``: keep the autograd graph to weight and bias (eval-mode fine-tuning)."""
    acc = torch.float64 if like.dtype == torch.float64 else torch.float32
    weight, bias = bn.weight, bn.bias
    if not differentiable and weight is not None:
        weight, bias = weight.detach(), bias.detach()
    return _affine_fold(weight, bias, bn.running_mean, bn.running_var, bn.eps, acc, like)


def _affine_fold(weight: Optional[Tensor], bias: Optional[Tensor], mean: Tensor, var: Tensor, eps: float,
                 acc: torch.dtype, like: Tensor) -> Tuple[Tensor, Tensor]:
    """``scale = weight * rsqrt(var + eps)``, ``shift = bias - mean * scale`` in ``acc`` (weight and bias
    None: 1 and 0). In eager mode one call of the C++ helper (the same ATen calls, differentiable the
    same way); under torch.compile these operators."""
    if cpp_glue(mean, var):
        return torch.ops.scnet_fused._bn_affine_fold(weight, bias, mean, var, eps, acc)
    if weight is None:
        weight, bias = _affine_params_none(mean.shape[0], like)
    _, scale, shift = affine_fold(weight, bias, mean, var, eps, acc)
    return scale, shift


def _plain_conv(conv: nn.Module) -> bool:
    return type(conv) is nn.Conv2d and conv.bias is None and conv.padding_mode == "zeros" \
        and not isinstance(conv.padding, str) and _hookless(conv)


def _outweighs(activations, weights) -> bool:
    """``activations >= weights`` (element counts), the size rule of the folded and stacked convolutions'
    per-call weight copies; always True under torch.compile / torch.export, where a comparison with
    the batch size would become a guard (a recompilation, or a failed export over a dynamic batch
    range) and the weight copy is a small kernel of the compiled graph: one graph for every size."""
    if torch.compiler.is_compiling():
        return True
    return activations >= weights


def _conv_out_numel(conv: nn.Conv2d, x: Tensor) -> int:
    size = [x.shape[0], conv.out_channels]
    for d in range(2):
        k, s, p, dil = conv.kernel_size[d], conv.stride[d], conv.padding[d], conv.dilation[d]
        size.append((x.shape[2 + d] + 2 * p - dil * (k - 1) - 1) // s + 1)
    return size[0] * size[1] * size[2] * size[3]


def _strided_1x1(conv: nn.Module, x: Tensor) -> bool:
    """A plain 1x1 convolution with a stride and no padding on a CPU tensor (the plain downsample of a
    stage's first block): it reads only the pixels ``x[:, :, ::sh, ::sw]``, and oneDNN's strided 1x1
    convolution is slow on the CPU, so those run as the subsampled view through a stride-1 convolution
    (:func:`_subsampled`; under torch.compile too, so that a compiled module computes what the eager
    one does). Measured on a 2-core AMD EPYC (benchmarks/results/cpu-epyc/downsample.md), forward +
    backward: 38.4 -> 33.3 ms at 8x256x56x56 -> 512 channels, 32.9 -> 27.7 at 8x512x28x28, 35.6 -> 31.2
    at 8x1024x14x14 (oneDNN's strided backward copies x); inference 1.06x-1.10x."""
    return (_plain_conv(conv) and tuple(conv.kernel_size) == (1, 1) and _pair(conv.padding) == (0, 0)
            and _pair(conv.dilation) == (1, 1) and _pair(conv.stride) != (1, 1) and x.dim() == 4
            and x.device.type == "cpu")


def _subsampled(conv: nn.Module, x: Tensor) -> Tensor:
    """``x[:, :, ::sh, ::sw]``, the pixels a strided 1x1 convolution reads (a view); with autograd
    recording x's gradient in eager mode, through :class:`_Subsample`."""
    sh, sw = _pair(conv.stride)
    if torch.is_grad_enabled() and x.requires_grad and not torch.compiler.is_compiling():
        return _Subsample.apply(x, sh, sw)
    return x[:, :, ::sh, ::sw]


class _Subsample(torch.autograd.Function):
    """``x[:, :, ::sh, ::sw]`` (a view) whose backward writes x's gradient in x's memory format. The two
    slices' own backward builds it contiguous (NCHW) whatever x's layout: in a channels_last network
    that gradient then met the block's other branch's channels_last one in a mixed-layout addition and
    was converted back for the BatchNorm before it (the fused scnet50 training step, Intel Xeon: 21.9
    ms for that addition at 8x256x56x56 against 1.9 for a same-layout one, and an 11.1 ms copy).
    Differentiable twice (the backward is a zero fill and a slice assignment)."""

    @staticmethod
    def forward(ctx, x, sh, sw):
        ctx.geometry = (x.shape, x.dtype, x.device, winograd._graph_format(x))  # (NCHW unless dense channels_last)
        ctx.steps = (sh, sw)
        return x[:, :, ::sh, ::sw]

    @staticmethod
    def backward(ctx, grad):
        shape, dtype, device, fmt = ctx.geometry
        sh, sw = ctx.steps
        gx = torch.empty(shape, dtype=dtype, device=device, memory_format=fmt).zero_()
        gx[:, :, ::sh, ::sw] = grad
        return gx, None, None


def _conv_bn(conv: nn.Module, bn: nn.Module, x: Tensor) -> Tensor:
    """``bn(conv(x))``. At inference (no grad) with an eval-mode BatchNorm whose output is at least 4x
    the convolution's weights, one convolution with the BatchNorm folded into its weights and bias:
    the normalisation pass over the output disappears (for tiny batches re-scaling the weights would
    cost more than it saves, so they keep the two steps)."""
    if (not torch.is_grad_enabled() and _plain_conv(conv) and _foldable_eval_norm(bn) and x.dim() == 4
            and _outweighs(_conv_out_numel(conv, x), 4 * conv.weight.numel())):
        sources = (conv.weight, bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.eps)
        stride = conv.stride
        if _strided_1x1(conv, x):
            x, stride = _subsampled(conv, x), 1
        return winograd.conv2d_cached(conv, x, sources, lambda: _folded(conv, bn, x), stride, conv.padding,
                                      conv.dilation, conv.groups)
    return bn(_conv(conv, x))


def _folded(conv: nn.Conv2d, bn: nn.Module, like: Tensor) -> Tuple[Tensor, Tensor]:
    """The weight and bias of ``conv`` with the eval-mode BatchNorm ``bn`` folded in (inference)."""
    if cpp_glue(conv.weight, bn.running_mean, bn.running_var):
        acc = torch.float64 if like.dtype == torch.float64 else torch.float32
        weight, bias = (None, None) if bn.weight is None else (bn.weight.detach(), bn.bias.detach())
        return torch.ops.scnet_fused._conv_bn_fold(conv.weight, weight, bias, bn.running_mean, bn.running_var,
                                                   bn.eps, acc)
    scale, shift = _eval_fold(bn, like, differentiable=False)
    return ((conv.weight.to(scale.dtype) * scale.view(-1, 1, 1, 1)).to(conv.weight.dtype),
            shift.to(conv.weight.dtype))


def _seq_conv_bn(seq: nn.Module, x: Tensor) -> Tensor:
    """A ``Sequential(..., Conv2d, norm)`` (the plain downsample, or the v1d models' average pool
    first) with its last two through :func:`_conv_bn`, the modules before them called as they are;
    anything else as the module."""
    if _plain_seq(seq) and len(seq) >= 2:
        *head, conv, norm = seq
        for m in head:
            x = m(x)
        return _conv_bn(conv, norm, x)
    return seq(x)


def _plain_pool(pool: nn.Module, r: int) -> bool:
    """An nn.AvgPool2d that is exactly the r x r, stride-r, floor-mode pool of :func:`sc_avgpool`."""
    if type(pool) is not nn.AvgPool2d or not _hookless(pool):
        return False
    stride = pool.stride if pool.stride is not None else pool.kernel_size
    return (_pair(pool.kernel_size) == (r, r) and _pair(stride) == (r, r) and _pair(pool.padding) == (0, 0)
            and not pool.ceil_mode and pool.divisor_override is None)


# Whether autocast exists for a device type, asked once per type: torch.compile of torch 2.11 cannot
# trace torch.amp.is_autocast_available (a graph break, an error under fullgraph=True), but it reads a
# module-level dict as a constant.
_AUTOCAST_AVAILABLE = {t: torch.amp.is_autocast_available(t) for t in ("cpu", "cuda", "meta")}


def _autocast_available(device_type: str) -> bool:
    known = _AUTOCAST_AVAILABLE.get(device_type)
    if known is None:
        known = _AUTOCAST_AVAILABLE[device_type] = torch.amp.is_autocast_available(device_type)
    return known


def _autocast_on(device_type: str) -> bool:
    """Autocast is enabled for tensors of this device type."""
    return _autocast_available(device_type) and torch.is_autocast_enabled(device_type)


def _conv_accepts(conv: nn.Module, x: Tensor) -> bool:
    """``conv`` will take x's dtype (equal to its weight's, or autocast recasts both); otherwise the
    modules run as they are and raise their own error."""
    weight = getattr(conv, "weight", None)
    if not isinstance(weight, Tensor) or weight.dtype == x.dtype:
        return True
    return _autocast_on(x.device.type)


def _submodules(m: nn.Module):
    """``m`` and every module below it, a module held in several places once per place."""
    yield m
    for child in m._modules.values():
        if child is not None:
            yield from _submodules(child)


def _bad_train_norms(m: nn.Module) -> bool:
    """Whether the fused modules must run the reference computation in training for their BatchNorms:

    - a BatchNorm that normalises with batch statistics has eps <= 0 (or NaN), which ATen refuses: the
      error then comes with the reference's side effects (the BatchNorms before it have counted the
      batch, and it has bumped its own counter), where a fused path that updates two BatchNorms at once
      would count neither, or both;
    - one such BatchNorm module serves in two places (k1's norm shared with one of the SCConv's, say), or
      two share their running statistics (the same buffer tensors): the statistics then depend on the
      order the places run in, which the fused paths change.

    Checked whatever the module's own mode (test-time adaptation runs an eval-mode model whose
    BatchNorms train)."""
    seen = set()  # the BatchNorms and their running-statistics tensors (ids: all are alive meanwhile)
    for b in _submodules(m):
        if isinstance(b, nn.modules.batchnorm._BatchNorm):
            buffers = b._buffers
            mean, var = buffers.get("running_mean"), buffers.get("running_var")
            if not (b.training or mean is None):
                continue
            if not b.eps > 0 or id(b) in seen:
                return True
            seen.add(id(b))
            if mean is not None:
                if id(mean) in seen or id(var) in seen:
                    return True
                seen.add(id(mean))
                seen.add(id(var))
    return False


def _bn_momentum(bn: nn.modules.batchnorm._BatchNorm) -> float:
    """nn.BatchNorm2d's exponential_average_factor; bumps num_batches_tracked as it does, and then, as
    it does, raises ATen's error for an eps <= 0 (or NaN)."""
    factor = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    if not bn.eps > 0:
        raise ValueError(f"batch_norm eps must be positive during training, but got {bn.eps}")
    return factor


def _update_running_stats(bn, factor: float, mean: Tensor, var: Tensor, t: Tensor, out: Tensor) -> None:
    """nn.BatchNorm2d's running-statistics update from the batch ``mean`` / biased ``var`` of ``t``;
    ``out`` is the fused op's output (it saved tensors for backward where it requires grad: see
    :func:`_save_after_update`).

    In eager mode the buffers are updated through ``.data``, which leaves their version counters as
    ATen's BatchNorm kernels leave them: a BatchNorm node that saved them (the same module run in
    another place of the model) still runs its backward after this update."""
    if bn.training and bn.track_running_stats and bn.running_mean is not None:
        m = t.shape[0] * t.shape[2] * t.shape[3]
        running_mean, running_var = bn.running_mean, bn.running_var
        if not torch.compiler.is_compiling():
            running_mean, running_var = running_mean.data, running_var.data
        if cpp_glue(running_mean, running_var, mean, var):  # the same ATen calls in one C++ call
            torch.ops.scnet_fused._update_running_stats_(running_mean, running_var, mean, var, factor, m / (m - 1))
        else:
            with torch.no_grad():
                _blend_(running_mean, mean, factor)
                _blend_(running_var, var * (m / (m - 1)), factor)
        if out.requires_grad:
            _save_after_update()


_top_saved_hooks = getattr(getattr(torch._C, "_autograd", None), "_top_saved_tensors_default_hooks", None)


def _save_after_update() -> None:
    """Under saved-tensor hooks (``torch.utils.checkpoint`` without reentrance), one empty tensor saved
    for backward after a running-statistics update whose fused op saved tensors (its output requires
    grad; where it saved nothing, nn.BatchNorm2d saved nothing either). The fused ops save their
    tensors before the module updates the statistics, where nn.BatchNorm2d saves after its update; the
    checkpoint's recomputation stops at the last tensor saved (early stop, PyTorch's default), so
    without this mark it would stop before the update of a checkpointed function's last fused
    BatchNorm, which then got one update where the reference's gets two. The mark is saved by a node of
    its own (an empty leaf times itself), outside the output's graph, in the forward and the
    recomputation alike. No hooks, no grad mode or torch.compile: nothing is done."""
    if (_top_saved_hooks is None or not torch.is_grad_enabled() or torch.compiler.is_compiling()
            or _top_saved_hooks(False) is None):
        return
    mark = torch.empty(0, requires_grad=True)
    mark.mul(mark)


def _blend_(running: Tensor, stat: Tensor, factor: float) -> None:
    """``running = (1 - factor) * running + factor * stat`` in place. Buffers of 16-bit floats are
    updated in float32 and rounded once, as ATen's BatchNorm does: a batch variance above 65504 (a
    float16 infinity) still moves a float16 running variance by a finite step. (float16 buffers get
    ATen's bits; bfloat16 ones differ by bfloat16 rounding, ATen's CPU kernel rounding its batch
    statistics to bfloat16 first.)"""
    if running.dtype in (torch.float16, torch.bfloat16):
        running.copy_(running.float().mul_(1.0 - factor).add_(stat.float(), alpha=factor))
    else:
        running.mul_(1.0 - factor).add_(stat.to(running.dtype), alpha=factor)


def _tensors_on(m: nn.Module, t: Tensor) -> bool:
    """``m``'s parameters and buffers are on ``t``'s device (else the module runs and raises its error)."""
    return all(v.device == t.device for v in m._parameters.values() if v is not None) and \
        all(v.device == t.device for v in m._buffers.values() if v is not None)


def _gate_takes_norm(norm: nn.Module, small: Tensor) -> bool:
    """Whether the gate kernels apply k2's ``norm`` to the pooled map ``small`` (k2's convolution output):
    a BatchNorm2d with batch statistics, or an eval-mode one they fold, with its tensors on small's device
    (else the module runs: another norm's result, or the module's own error), and, with batch
    statistics, more than one value per channel (else BatchNorm2d's own error)."""
    if not _tensors_on(norm, small):
        return False
    if _batch_stats_bn(norm):
        return _bn_stats_ok(small)
    return _foldable_eval_norm(norm)


def _batch_stats_bn(bn: nn.Module) -> bool:
    """A plain BatchNorm2d normalising with the batch's statistics (training, or no running stats)."""
    return _plain_batchnorm(bn) and (bn.training or bn.running_mean is None)


def _fusable_pair(ta: Tensor, tb: Tensor) -> bool:
    """Two branch outputs the fused BatchNorm + ReLU + concatenation takes (else the modules run)."""
    return (ta.dim() == 4 and tb.dim() == 4 and ta.numel() > 0 and tb.numel() > 0 and ta.dtype == tb.dtype
            and ta.device == tb.device and ta.shape[0] == tb.shape[0] and ta.shape[2:] == tb.shape[2:]
            and ta.shape[0] * ta.shape[2] * ta.shape[3] > 1)


def _bn_relu(conv: nn.Module, bn: nn.Module, relu: nn.Module, x: Tensor) -> Tensor:
    """``relu(bn(conv(x)))``: with a BatchNorm2d using batch statistics, BN + ReLU as one fused op
    (:func:`scnet_fused.ops.bn_relu.bn_relu_train`) and the running statistics updated as nn.BatchNorm2d
    does; otherwise as the modules (inference folds conv + eval BN, see :func:`_conv_bn`)."""
    if not _batch_stats_bn(bn):
        return _relu(relu, _conv_bn(conv, bn, x))
    return _bn_relu_of(bn, relu, _conv(conv, x))


def _relu(relu: nn.Module, t: Tensor) -> Tensor:
    """``relu(t)`` for a norm's output ``t``. A norm that hands back its input (``nn.Identity`` in a
    norm-free block) can hand back a view: a half of the stacked entry convolution or a matrix-product
    convolution's output, views autograd lets no in-place op modify. An in-place activation then
    gets a copy (the reference's convolutions give it a tensor of its own)."""
    if t._base is not None and torch.is_grad_enabled() and getattr(relu, "inplace", False):
        t = t.clone()
    return relu(t)


def _bn_stats_ok(t: Tensor) -> bool:
    """More than one value per channel (else BatchNorm2d's own handling and error)."""
    return t.dim() == 4 and t.numel() > 0 and t.shape[0] * t.shape[2] * t.shape[3] > 1


def _bn_relu_of(bn: nn.Module, relu: nn.Module, t: Tensor) -> Tensor:
    """``relu(bn(t))``, BatchNorm + ReLU fused where ``bn`` uses batch statistics."""
    if not (_batch_stats_bn(bn) and _bn_stats_ok(t)):
        # any other norm; an empty batch, or one value per channel: BatchNorm2d's own handling / error
        return _relu(relu, bn(t))
    factor = _bn_momentum(bn)
    weight, bias = _affine_params(bn, t)
    y, mean, var = bn_relu_train(t, weight, bias, bn.eps)
    _update_running_stats(bn, factor, mean, var, t, y)
    return y


def _bn_of(bn: nn.Module, t: Tensor) -> Tensor:
    """``bn(t)``. With a BatchNorm using batch statistics on a float32 CPU tensor in eager mode: the C++
    op ``_bn_train_ag`` (the one-call kernels of bn_relu_train without the ReLU, NCHW channel by
    channel), 1.4x-2.2x faster than ATen's CPU BatchNorm forward + backward at SCNet's stage shapes
    (``benchmarks/results/cpu-xeon/k4_norm.md``); running statistics as nn.BatchNorm2d. Otherwise (other
    devices and dtypes, torch.compile, hooks, eval) the module; a norm other than a BatchNorm with its
    gradient in its output's layout (:func:`_norm_module_out`: in a bottleneck, the concatenation's
    backward hands SCConv's output a gradient in the block's layout)."""
    if not (_batch_stats_bn(bn) and _bn_stats_ok(t) and t.dtype == torch.float32 and t.device.type == "cpu"
            and t.shape[1] == bn.num_features and _tensors_on(bn, t) and cpp_autograd(t)):
        if isinstance(bn, nn.modules.batchnorm._BatchNorm):
            return bn(t)
        return _norm_module_out(bn, t)
    factor = _bn_momentum(bn)
    weight, bias = _affine_params(bn, t)
    y, mean, var = torch.ops.scnet_fused._bn_train_ag(t, weight, bias, bn.eps)
    _update_running_stats(bn, factor, mean, var, t, y)
    return y


def _same_input_convs(a: nn.Module, b: nn.Module, x: Tensor) -> bool:
    """Two plain convolutions (:func:`_plain_conv`) of the same input that one convolution with both
    weights stacked computes: same input channels, kernel, stride, padding and dilation, no groups."""
    return (_plain_conv(a) and _plain_conv(b) and x.dim() == 4 and a.groups == 1 and b.groups == 1
            and a.in_channels == b.in_channels and a.kernel_size == b.kernel_size and a.stride == b.stride
            and a.padding == b.padding and a.dilation == b.dilation and a.weight.dtype == b.weight.dtype
            and a.weight.device == b.weight.device and _conv_accepts(a, x))


def _stack_pays(a: nn.Conv2d, b: nn.Conv2d, x: Tensor) -> bool:
    """Whether stacking the two convolutions saves more than it costs: the stacked weight is a new
    tensor on every call (and its gradient one more in the backward), while the saving (x read once,
    one input gradient) scales with x. Where the weights are more than twice x's size (deep stages at
    small batches: N * H * W below the branch width) the copy costs more, and with glibc's default
    allocator the fresh weight-sized blocks also bring page faults that cost more still; measured on
    a 2-core Xeon, SCBottleneck(2048, 512) at 2x2048x7x7: stacked 0.90x of separate in training, 0.74x
    at inference."""
    return _outweighs(2 * x.numel(), a.weight.numel() + b.weight.numel())


def _split_channels(t: Tensor, c: int) -> Tuple[Tensor, Tensor]:
    """``t``'s first ``c`` channels and the rest, each dense in ``t``'s memory format (for one image in
    NCHW the halves already are: no copy)."""
    fmt = torch.channels_last if (t.is_contiguous(memory_format=torch.channels_last)
                                  and not t.is_contiguous()) else torch.contiguous_format
    a, b = t.split([c, t.shape[1] - c], 1)
    return a.contiguous(memory_format=fmt), b.contiguous(memory_format=fmt)


def _conv1_pair(ca: nn.Module, bna: nn.Module, cb: nn.Module, bnb: nn.Module, relu: nn.Module,
                x: Tensor, stack: bool = True) -> Tuple[Tensor, Tensor]:
    """``relu(bna(ca(x)))`` and ``relu(bnb(cb(x)))``: the bottleneck's two entry convolutions.

    Both read x: one convolution with their weights stacked computes the two (x read once, one larger
    matrix product, and in the backward one input gradient instead of two added together); the
    halves are then split off. With both BatchNorms using batch statistics (training), one fused
    BatchNorm + ReLU over both halves (their running statistics updated separately, as
    nn.BatchNorm2d does); at inference (no grad, eval-mode BatchNorms) both folded into the one
    convolution; otherwise the norms run as modules on the halves. Convolutions that cannot be
    stacked (a hook, a bias, other shapes), weights that outweigh the input (:func:`_stack_pays`), or
    all with ``stack=False``, run one by one."""
    if not (stack and _same_input_convs(ca, cb, x) and _stack_pays(ca, cb, x)):
        return _bn_relu(ca, bna, relu, x), _bn_relu(cb, bnb, relu, x)
    conv_args = (ca.stride, ca.padding, ca.dilation)
    c = ca.out_channels
    if (not torch.is_grad_enabled() and _foldable_eval_norm(bna) and _foldable_eval_norm(bnb)
            and _outweighs(_conv_out_numel(ca, x) + _conv_out_numel(cb, x),
                           4 * (ca.weight.numel() + cb.weight.numel()))):
        (wa, ba), (wb, bb) = _folded(ca, bna, x), _folded(cb, bnb, x)
        weight, bias = torch.cat([wa, wb]), torch.cat([ba, bb])
        return _split_channels(torch.relu_(F.conv2d(x, weight, bias, *conv_args)), c)
    t = _param_conv(x, (ca.weight, cb.weight), *conv_args, 1)
    if (_batch_stats_bn(bna) and _batch_stats_bn(bnb) and bna.eps == bnb.eps and _bn_stats_ok(t)
            and (bna.weight is None) == (bnb.weight is None)
            and (bna.weight is None or bna.weight.dtype == bnb.weight.dtype)):
        factor_a, factor_b = _bn_momentum(bna), _bn_momentum(bnb)
        wa, ba = _affine_params(bna, t)
        wb, bb = _affine_params(bnb, t)
        y, mean, var = bn_relu_train(t, torch.cat([wa, wb]), torch.cat([ba, bb]), bna.eps)
        _update_running_stats(bna, factor_a, mean[:c], var[:c], t, y)
        _update_running_stats(bnb, factor_b, mean[c:], var[c:], t, y)
        return _split_channels(y, c)
    ta, tb = _split_channels(t, c)
    return _bn_relu_of(bna, relu, ta), _bn_relu_of(bnb, relu, tb)


def _affine_params(bn: nn.modules.batchnorm._BatchNorm, like: Tensor) -> Tuple[Tensor, Tensor]:
    if bn.weight is not None:
        return bn.weight, bn.bias
    return _affine_params_none(bn.num_features, like)


def _affine_params_none(C: int, like: Tensor) -> Tuple[Tensor, Tensor]:
    """The identity affine of a BatchNorm without parameters: float32 ones and zeros."""
    return (torch.ones(C, device=like.device, dtype=torch.float32),
            torch.zeros(C, device=like.device, dtype=torch.float32))


# Inference (autograd off) on maps below these sizes runs the reference computation (the modules), in
# eager mode: there the fused paths' Python (per call: the path checks, the BatchNorm folds, the
# Winograd rules, ~900 more Python calls per bottleneck than the reference's forward) costs more than
# their kernels save. Measured on a 2-core Xeon, SCNet-50's blocks in eval against the reference's
# (benchmarks/results/cpu-xeon/small_inference.md, nine interleaved rounds, 2 threads), time relative to
# the reference, by the larger of the block's input and output: 401408 elements and more 0.75x-1.03x
# (layer1 to layer3[0] at 1x224; at 2x224 and 4x160 to layer4[0]) but 1.05x-1.08x for layer3[1] and
# layer4[0] at 2x224 and 4x160; 524288 at 2x128 (layer1, layer2[0]) 0.87x-0.96x; 262144 and fewer
# 1.06x-1.40x (1x224 from layer3[1], 2x128 from layer2[1], layer4[1] at 2x224 and 4x160). A bottleneck
# whose input and output both have fewer than 3 x 2^17 elements, and an SCConv whose input has fewer
# than 3 x 2^14 (a bottleneck's SCConv sees an eighth of its input), take the reference. Training keeps
# the fused paths at every size (their saved-memory bounds). Under torch.compile / torch.export the
# fused paths always run (a size test would be a guard).
BOTTLENECK_INFERENCE_MIN_ELEMENTS = 3 << 17
SCCONV_INFERENCE_MIN_ELEMENTS = 3 << 14


def _reference_inference(elements: int, min_elements: int) -> bool:
    """Whether an inference call (autograd off, eager) on a map of ``elements`` elements is small enough
    for the reference computation (:data:`BOTTLENECK_INFERENCE_MIN_ELEMENTS`)."""
    return not torch.is_grad_enabled() and elements < min_elements and not torch.compiler.is_compiling()


# Gate outputs below this many elements are saved for k4's backward rather than recomputed.
RECOMPUTE_MIN_ELEMENTS = 1 << 16


def _recompute_pays(y: Tensor) -> bool:
    """Whether recomputing the gate output ``y`` in k4's backward is worth it: it saves one y-sized
    tensor for one more gate pass. Below ``RECOMPUTE_MIN_ELEMENTS`` (256 KiB in float32) the memory is
    negligible and the pass is not: measured on a 2-core Xeon (float32, one process, five interleaved
    rounds), the SCConv training step took 1.95 ms recomputing and 1.76 ms saving y at 2x64x8x8,
    4.27 and 4.01 at 2x256x4x4, 4.02 and 3.83 at 2x128x14x14 (50176 elements); the same at
    8x256x7x7 (100352: 10.61 and 10.65). A small gate kernel is tens of microseconds; the rest is
    the extra autograd node and its Python. Always under torch.compile / torch.export, where a size
    test would become a guard."""
    if torch.compiler.is_compiling():
        return True
    return y.numel() >= RECOMPUTE_MIN_ELEMENTS


def _autocast_input(x: Tensor, conv: nn.Module) -> Optional[Tensor]:
    """Under autocast, ``x`` cast to the dtype autocast gives ``conv``'s input (a plain nn.Conv2d, which
    autocast runs in its lower precision); None where autocast leaves x as it is. The SCConv casts x
    once and gives the cast to k3's convolution (autocast then casts only the weight: the same
    convolution) and to the gate, which reads x in k3's dtype: one full-size cast and one saved
    tensor instead of two (autocast's own cast of x would be a second copy, saved by the convolution)."""
    device_type = x.device.type
    if not _autocast_on(device_type):
        return None
    dtype = torch.get_autocast_dtype(device_type)
    if (type(conv) is not nn.Conv2d or not _hookless(conv) or not x.is_floating_point()
            or x.dtype in (torch.float64, dtype)):
        return None  # autocast does not cast float64; a hook sees the input the reference gives it
    return x.to(dtype)


class _SharedCast(torch.autograd.Function):
    """``x_amp`` (``x`` already cast, passed detached) as a tensor whose gradient goes to ``x``, cast back
    to x's dtype: the gate reads the cast k3's convolution read, and the two gradients of x still add
    up in x's dtype (as they do with two casts), not in the lower precision."""

    @staticmethod
    def forward(ctx, x, x_amp):
        ctx.dtype = x.dtype
        return x_amp

    @staticmethod
    def backward(ctx, grad):
        return grad.to(ctx.dtype), None


class _GradLayoutOf(torch.autograd.Function):
    """The identity, whose backward gives the gradient the memory layout ``t`` has (dense NCHW or
    channels_last). The gate ops return k3's and the pooled map's gradients in x's layout; where a norm
    module made those tensors in the other layout, its backward then still gets its output's layout
    (ATen's InstanceNorm2d backward, given a channels_last gradient for its NCHW output of a one-image
    channels_last input, returns wrong values: torch 2.14)."""

    @staticmethod
    def forward(ctx, t):
        ctx.fmt = _format(t) if t.dim() == 4 else torch.contiguous_format
        return t.view_as(t)

    @staticmethod
    def backward(ctx, grad):
        if grad is None or grad.is_contiguous(memory_format=ctx.fmt):
            return grad
        return grad.contiguous(memory_format=ctx.fmt)


def _norm_module_out(norm: nn.Module, t: Tensor) -> Tensor:
    """``norm(t)`` for a norm the gate does not take inside (run as its module), its gradient to come
    back in the layout of its output (:class:`_GradLayoutOf`)."""
    out = norm(t)
    if torch.is_grad_enabled() and out.requires_grad and out.dim() == 4:
        out = _GradLayoutOf.apply(out)
    return out


class _ConvOfGate(torch.autograd.Function):
    """``conv2d(y)`` for the gate output ``y``, saving the gate's inputs instead of ``y``.

    ``y = sc_gate(x, small, k3, scale, shift, small_scale, small_shift)`` is cheap to recompute (it
    reads x and k3), so the backward recomputes it for the convolution's weight gradient rather than
    keeping a full-size tensor alive between forward and backward. ``x``, ``small`` and ``k3`` are saved
    by the gate's own backward anyway; the affines are per-channel (detached: they only rebuild y).

    A backward run with create_graph needs the weight gradient as a function of everything y depends
    on (a second derivative through it reaches x, k3, the pooled branch and the BatchNorms' weights):
    ``regate(x, small, k3)`` rebuilds y in standard operators from the same tensors, attached to the
    graph (x, small and k3 are inputs of this node for that; their first-order gradients come through
    y, so they get none here), and the convolution's backward is ATen's, differentiable again.
    """

    # forward(ctx, ...) rather than forward + setup_context: that form binds the arguments with
    # inspect.signature on every call (about 40 us on a Xeon core). torch.func transforms, which
    # need the other form, never reach this class: the modules run standard operators inside them.
    # ``weight`` is the parameter; the convolution uses it in y's dtype (under autocast a cast made here
    # and again in the backward: the parameter is saved, not a copy).
    @staticmethod
    def forward(ctx, y, weight, x, small, k3, scale, shift, small_scale, small_shift, stride, padding, dilation,
                groups, regate):
        ctx.conv = (stride, padding, dilation, groups)
        ctx.regate = regate
        ctx.save_for_backward(weight, x, small, k3, scale, shift, small_scale, small_shift)
        ctx.winograd = winograd.winograd_applies(y, weight, stride, padding, dilation, groups)
        if ctx.winograd:
            return winograd.conv3x3_winograd(y, weight)
        return F.conv2d(y, weight.to(y.dtype), None, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad_out):
        weight, x, small, k3, scale, shift, small_scale, small_shift = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conv
        if torch.is_grad_enabled():  # create_graph: y and the gradients attached to the graph
            y = ctx.regate(x, small, k3)
        else:
            y = sc_gate(x, small, k3, scale, shift, small_scale, small_shift)
        if ctx.winograd:
            grad_y, grad_w = winograd.conv_backward(grad_out, y, weight, ctx.needs_input_grad[0],
                                                    ctx.needs_input_grad[1])
            return (grad_y, grad_w) + (None,) * 12
        grad_y, grad_w, _ = torch.ops.aten.convolution_backward(
            grad_out, y, weight.to(y.dtype), None, list(stride), list(padding), list(dilation), False, [0, 0],
            groups, [ctx.needs_input_grad[0], ctx.needs_input_grad[1], False])
        if grad_w is not None:
            grad_w = grad_w.to(weight.dtype)
        return (grad_y, grad_w) + (None,) * 12


class _ParamConv(torch.autograd.Function):
    """``conv2d(x, w)`` with ``w`` the parameter ``weights[0]``, or several parameters stacked along the
    output channels (``torch.cat``), in x's dtype (under autocast x comes cast, by an operation autograd
    records, and w is cast here): the backward keeps the parameters themselves and rebuilds w from them,
    instead of holding the stacked or cast weight, a new weight-sized tensor, until the backward (at the
    deep stages the weights outweigh the activations). Outputs and gradients are those of ``F.conv2d``
    on the stacked / cast weight; differentiable again (the backward is ATen's convolution backward on
    the saved input and the rebuilt weight, both attached to the graph). A 1x1 convolution of a
    channels_last float32 CPU map runs as matrix products where :func:`conv1x1.gemm_applies` (forward
    and backward; under create_graph the backward is ATen's, as above)."""

    @staticmethod
    def forward(ctx, xc, stride, padding, dilation, groups, *weights):
        ctx.conv = (stride, padding, dilation, groups)
        ctx.gemm = conv1x1.gemm_applies(xc, weights, stride, padding, dilation, groups)
        ctx.save_for_backward(xc, *weights)
        if ctx.gemm:
            return conv1x1.forward(xc, _param_weight(weights))
        return F.conv2d(xc, _param_weight(weights, xc.dtype), None, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad_out):
        xc, *weights = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conv
        need_w = any(ctx.needs_input_grad[5:])
        if ctx.gemm and not torch.is_grad_enabled():
            grad_x, grad_w = conv1x1.backward(grad_out, xc, _param_weight(weights), ctx.needs_input_grad[0],
                                              need_w)
        else:
            grad_x, grad_w, _ = torch.ops.aten.convolution_backward(
                grad_out, xc, _param_weight(weights, xc.dtype), None, list(stride), list(padding),
                list(dilation), False, [0, 0], groups, [ctx.needs_input_grad[0], need_w, False])
        grads_w = [None] * len(weights)
        if grad_w is not None:
            grads_w = [g.to(w.dtype) for g, w in zip(grad_w.split([w.shape[0] for w in weights]), weights)]
        return (grad_x, None, None, None, None, *grads_w)


def _compiled_graph() -> bool:
    """Under torch.compile, not torch.export: the convolutions with backwards of their own enter the graph
    as custom ops (:mod:`scnet_fused.ops.compiled_convs`), which AOTAutograd's cache takes, instead of
    as autograd.Functions, which it does not."""
    return torch.compiler.is_compiling() and not exporting() and not torch.onnx.is_in_onnx_export()


_param_weight = compiled_convs.param_weight


def _autocast_dtype(x: Tensor, weights) -> Tuple[bool, Optional[torch.dtype]]:
    """``(ok, dtype)``: autocast's dtype for a convolution of x with these float32 weights (None when
    autocast is off); ok False where autocast is on and would not run the convolution as a plain cast of
    both (another weight dtype, an x autocast does not cast)."""
    if not _autocast_on(x.device.type):
        return True, None
    dtype = torch.get_autocast_dtype(x.device.type)
    return all(w.dtype == torch.float32 for w in weights) and x.dtype in (torch.float32, dtype), dtype


def _param_conv(x: Tensor, weights, stride, padding, dilation, groups: int) -> Tensor:
    """``F.conv2d(x, torch.cat(weights))`` (one weight: that one), under autocast in its dtype, through
    :class:`_ParamConv` where autograd records it (the parameters saved, not the stacked / cast copy)."""
    ok, dtype = _autocast_dtype(x, weights)
    if not (ok and torch.is_grad_enabled() and x.dim() == 4):
        return F.conv2d(x, _param_weight(weights), None, stride, padding, dilation, groups)
    apply = compiled_convs.param_conv if _compiled_graph() else _ParamConv.apply
    if dtype is None:
        return apply(x, _pair(stride), _pair(padding), _pair(dilation), groups, *weights)
    with torch.autocast(x.device.type, enabled=False):
        # x cast as autocast would (recorded: its gradient comes back in x's dtype, and a second
        # derivative reaches x through it); the cast of the weights inside
        return apply(x.to(dtype), _pair(stride), _pair(padding), _pair(dilation), groups, *weights)


class _CentreTaps(torch.autograd.Function):
    """``F.linear(x2d, weight[:, :, 1, 1])`` for (K, C, 3, 3) filters (k2's convolution of a 1x1 map),
    whose backward writes the filters' gradient in one pass, the taps' gradient zero-padded to 3x3: the
    select's own backward zero-fills the filters' shape and then copies the taps in (8x256x1x1 with 256
    filters, Intel Xeon, 2 threads: the filters' gradient 70-89 against about 320 us). On float32 CPU
    tensors the product and the padding are one kernel (``_centre_taps_wgrad``: each filter row zeroed
    and its taps written while it is in cache). A backward with create_graph runs in standard operators
    on the saved inputs, so that it is differentiated again."""

    @staticmethod
    def forward(ctx, x2d: Tensor, weight: Tensor) -> Tensor:
        ctx.save_for_backward(x2d, weight)
        return _centre_linear(x2d, weight)

    @staticmethod
    def backward(ctx, grad_y: Tensor):
        x2d, weight = ctx.saved_tensors
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_y @ winograd.centre_taps(weight)
        if ctx.needs_input_grad[1]:
            if _centre_wgrad_kernel(grad_y, x2d):
                grad_w = torch.ops.scnet_fused._centre_taps_wgrad(grad_y, x2d)
            else:
                K, C = weight.shape[0], weight.shape[1]
                grad_w = F.pad((grad_y.t() @ x2d).view(K, C, 1, 1), (1, 1, 1, 1))
        return grad_x, grad_w


def _centre_wgrad_kernel(grad_y: Tensor, x2d: Tensor) -> bool:
    """Whether the filters' gradient of :class:`_CentreTaps` runs as ``_centre_taps_wgrad`` (float32 CPU
    tensors, a backward that is not differentiated again, the kernel built)."""
    return (not torch.is_grad_enabled() and grad_y.device.type == "cpu" and grad_y.dtype == torch.float32
            and x2d.dtype == torch.float32 and _cpp.has_kernel("_centre_taps_wgrad", "CPU"))


def _centre_linear(x2d: Tensor, weight: Tensor) -> Tensor:
    """``F.linear(x2d, weight[:, :, 1, 1])``. Where autograd records nothing of it, the taps are gathered
    into a contiguous matrix first: F.linear of the strided select copied them transposed (8x256 by
    256x256 filters, model 167 Xeon, 2 threads, filters out of cache: 296 against 114 us). Where it
    would save them for x2d's gradient, the select (a view of the filters) is passed as it is."""
    taps = winograd.centre_taps(weight)
    if not (torch.is_grad_enabled() and (x2d.requires_grad or weight.requires_grad)):
        taps = taps.contiguous()
    return F.linear(x2d, taps)


def _centre_taps_only(conv: nn.Module, x: Tensor) -> bool:
    """A 3x3 convolution with stride 1, padding 1, no dilation and one group of a 1x1 map: its other eight
    taps see only the zero padding (k2 on layer4's pooled maps in SCNet-50)."""
    return (x.dim() == 4 and x.shape[2] == 1 and x.shape[3] == 1 and tuple(conv.kernel_size) == (3, 3)
            and _pair(conv.stride) == (1, 1) and _pair(conv.padding) == (1, 1) and _pair(conv.dilation) == (1, 1)
            and conv.groups == 1)


def _conv(conv: nn.Module, x: Tensor) -> Tensor:
    """``conv(x)``; under autocast with a plain float32 convolution (:func:`_plain_conv`) and autograd
    on, through :class:`_ParamConv` (the parameter saved instead of its lower-precision copy); a plain
    convolution the Winograd rule takes (:func:`winograd.winograd_applies`) as Winograd; a plain 3x3
    convolution of a 1x1 map as the matrix product with its centre taps (:func:`_centre_taps_only`:
    8x256x1x1 with 256 filters took 2.53 ms forward + backward through oneDNN and 0.65 ms this way, AMD
    EPYC, 2 threads; the other taps' gradient is zero either way); with autograd on, a plain 1x1
    convolution of a channels_last float32 CPU map (a strided one: of its subsampled input) as matrix
    products through :class:`_ParamConv` where :func:`conv1x1.gemm_applies`."""
    if not (torch.is_grad_enabled() and _autocast_on(x.device.type) and _plain_conv(conv)):
        if _plain_conv(conv) and _centre_taps_only(conv, x):
            N, K = x.shape[0], conv.weight.shape[0]
            # the centre taps as one select of the flattened taps (indexing [:, :, 1, 1] made two copies);
            # with autograd recording the filters, through _CentreTaps, whose backward writes their
            # gradient in one pass (the select's backward: a zero fill and a copy)
            x2d = x.reshape(N, x.shape[1])
            if torch.is_grad_enabled() and conv.weight.requires_grad and not torch.compiler.is_compiling():
                return _CentreTaps.apply(x2d, conv.weight).view(N, K, 1, 1)
            return _centre_linear(x2d, conv.weight).view(N, K, 1, 1)
        if _plain_conv(conv) and not torch.is_grad_enabled():  # inference: a Winograd filter transform is kept
            if _strided_1x1(conv, x):
                return F.conv2d(_subsampled(conv, x), conv.weight, None, 1, 0, 1, conv.groups)
            return winograd.conv2d_cached(conv, x, (conv.weight,), lambda: (conv.weight, None), conv.stride,
                                          conv.padding, conv.dilation, conv.groups, fallback=lambda: conv(x))
        if _plain_conv(conv) and winograd.winograd_applies(x, conv.weight, conv.stride, conv.padding, conv.dilation,
                                                           conv.groups):
            return winograd.conv3x3_winograd(x, conv.weight)
        strided = _strided_1x1(conv, x)
        xs, stride = (_subsampled(conv, x), 1) if strided else (x, conv.stride)
        if (_plain_conv(conv) and tuple(conv.kernel_size) == (1, 1)
                and conv1x1.gemm_applies(xs, (conv.weight,), stride, conv.padding, conv.dilation, conv.groups)):
            return _ParamConv.apply(xs, _pair(stride), _pair(conv.padding), _pair(conv.dilation), conv.groups,
                                    conv.weight)
        if strided:
            return F.conv2d(xs, conv.weight, None, 1, 0, 1, conv.groups)
        return conv(x)
    return _param_conv(x, (conv.weight,), conv.stride, conv.padding, conv.dilation, conv.groups)


def _regate_affine(scale, shift, small_scale, small_shift):
    """The gate output from (x, small, k3) in standard operators, with these per-channel affines (eval
    folds, attached to the BatchNorms' parameters; None: none): :class:`_ConvOfGate` under create_graph."""
    return lambda x, small, k3: _plain.sc_gate(x, small, k3, scale, shift, small_scale, small_shift)


def _regate_bn(bn: nn.Module, k3: Tensor):
    """As :func:`_regate_affine`, k3 normalized by its batch statistics (``bn`` in training mode)."""
    weight, bias = _affine_params(bn, k3)
    return lambda x, small, k: _plain.sc_gate_bn_train(x, small, k, weight, bias, bn.eps)[0]


def _regate_bn2(bn: nn.Module, bn2: nn.Module, k3: Tensor, small: Tensor):
    """As :func:`_regate_bn`, the pooled branch normalized by its batch statistics too (``bn2``)."""
    weight, bias = _affine_params(bn, k3)
    weight2, bias2 = _affine_params(bn2, small)
    return lambda x, s, k: _plain.sc_gate_bn2_train(x, s, k, weight, bias, bn.eps, weight2, bias2, bn2.eps)[0]


_pair = winograd._pair


class SCConv(reference.SCConv):
    """Drop-in fused self-calibrated convolution (same arguments and state_dict as the reference).

    ``recompute_gate`` (default True): k4's convolution recomputes the gate output in its backward
    instead of saving it (one full-size tensor less held for backward, one cheap gate pass more),
    for gate outputs of at least ``RECOMPUTE_MIN_ELEMENTS`` elements (:func:`_recompute_pays`).
    ``fuse_k2_norm`` (default True): k2's BatchNorm is applied inside the gate kernels (training: with
    its batch statistics; eval: folded into the gate's per-channel constants); False runs it as the
    module on the pooled map.
    """

    recompute_gate = True
    fuse_k2_norm = True

    def forward(self, x: Tensor) -> Tensor:
        if fx_symbolic(x):  # torch.fx symbolic tracing: the reference's graph
            return reference.SCConv.forward(self, x)
        if standard_ops_only():
            return self._portable_forward(x)
        if (_reference_inference(x.numel(), SCCONV_INFERENCE_MIN_ELEMENTS) or not self._fusable()
                or _bad_train_norms(self)):
            # a small map at inference; hooks on k2 / k3 / k4: the modules; a training eps ATen refuses or
            # a BatchNorm in two places (_bad_train_norms)
            return super().forward(x)
        y, saved = self._gate(x)
        conv4, norm4 = self.k4[0], self.k4[1]
        if not torch.is_grad_enabled():
            return _conv_bn(conv4, norm4, y)
        return _bn_of(norm4, self._conv4(y, *saved))

    def _portable_forward(self, x: Tensor) -> Tensor:
        """The reference computation in standard operators only (exports, torch.func transforms)."""
        reference._check_sc_input(x, self.inplanes, self.pooling_r)
        up = _plain.upsample_nearest(self.k2(x), x)
        return self.k4(torch.mul(self.k3(x), torch.sigmoid(torch.add(x, up))))

    def _fusable(self) -> bool:
        """The fused forward calls the layers inside k2, k3 and k4, not the containers: only without
        hooks on them (:func:`_hookless`), and with k3 and k4 plain (conv, norm) Sequentials (a subclass
        with a forward of its own runs as the module); k2 is checked where it is taken apart."""
        return _hookless(self.k2) and _plain_seq(self.k3, 2) and _plain_seq(self.k4, 2)

    def _pre_norm4(self, x: Tensor) -> Tensor:
        """k4's convolution output, before k4's norm (the bottleneck fuses that norm with its ReLU)."""
        y, saved = self._gate(x)
        return self._conv4(y, *saved)

    def _gate(self, x: Tensor):
        """The gate output y (k4's input) and what k4's convolution needs to recompute it."""
        reference._check_sc_input(x, self.inplanes, self.pooling_r)
        small, norm2 = self._k2(x)
        conv3, norm3 = self.k3[0], self.k3[1]
        x_amp = _autocast_input(x, conv3)
        k3 = _conv(conv3, x if x_amp is None else x_amp)
        if k3.shape[-2:] != x.shape[-2:]:
            # the reference fails at the product, after k2 and k3 ran in full: their norms count this
            # batch there (running statistics), so they do here
            with torch.no_grad(), contextlib.suppress(Exception):
                if norm2 is not None:
                    norm2(small)
                norm3(k3)
            raise ValueError(f"SCConv: k3 changed the spatial size {tuple(x.shape[-2:])} -> "
                             f"{tuple(k3.shape[-2:])}; the gate needs them equal")
        k3_train = k3.numel() > 0 and _batch_stats_bn(norm3)
        if norm2 is not None:
            if _batch_stats_bn(norm2):
                in_gate = k3_train  # both BatchNorms with batch statistics: sc_gate_bn2_train
            else:
                in_gate = k3.numel() > 0 and not k3_train  # k2's eval fold, into the other gates
            if not in_gate:  # mixed modes, an empty batch: k2's norm runs as the module
                small, norm2 = _norm_module_out(norm2, small), None
        # The gate kernels take one dtype: under autocast the conv outputs set it.
        if small.dtype != k3.dtype:
            small = small.to(k3.dtype)
        if x.dtype == k3.dtype:
            xg = x
        elif x_amp is not None and x_amp.dtype == k3.dtype:  # the cast k3's convolution read, shared
            xg = _SharedCast.apply(x, x_amp.detach())
        else:
            xg = x.to(k3.dtype)
        scale = shift = ss = st = None
        if norm2 is not None and not _batch_stats_bn(norm2):  # eval: k2's norm folded into the gate
            ss, st = _eval_fold(norm2, small, differentiable=True)
        if k3.numel() == 0:  # empty batch: BatchNorm2d's own handling (empty output, stats kept)
            k3 = norm3(k3).to(k3.dtype)
            y = sc_gate(xg, small, k3)
            regate = _regate_affine(None, None, None, None)
        elif k3_train and norm2 is not None:
            y, scale, shift, ss, st = self._gate_bn2_train(xg, small, k3, norm3, norm2)
            regate = _regate_bn2(norm3, norm2, k3, small)
        elif k3_train:
            y, scale, shift = self._gate_bn_train(xg, small, k3, norm3)
            regate = _regate_bn(norm3, k3)
        elif _foldable_eval_norm(norm3):
            scale, shift = _eval_fold(norm3, k3, differentiable=True)
            y = sc_gate(xg, small, k3, scale, shift, ss, st)
            regate = _regate_affine(scale, shift, ss, st)
        else:
            k3 = _norm_module_out(norm3, k3).to(k3.dtype)
            y = sc_gate(xg, small, k3, None, None, ss, st)
            regate = _regate_affine(None, None, ss, st)
        return y, (xg, small, k3, scale, shift, ss, st, regate)

    def _k2(self, x: Tensor) -> Tuple[Tensor, Optional[nn.Module]]:
        """The pooled branch: the pool as a fused kernel, then k2's convolution on the small map.
        Returns ``(small, norm)``: k2's convolution output and its norm where the gate applies that norm
        (a BatchNorm2d with batch statistics, or an eval-mode one it folds), else k2's output and None."""
        k2, r = self.k2, self.pooling_r
        if _plain_seq(k2, 3) and _plain_pool(k2[0], r) and _conv_accepts(k2[1], x):
            pooled = sc_avgpool(x, r)
            conv2, norm2 = k2[1], k2[2]
            small = _conv(conv2, pooled)
            if self.fuse_k2_norm and _gate_takes_norm(norm2, small):
                return small, norm2
            return _norm_module_out(norm2, small), None
        return _GradLayoutOf.apply(k2(x)) if torch.is_grad_enabled() else k2(x), None

    def _conv4(self, y, x, small, k3, scale, shift, small_scale, small_shift, regate):
        conv4 = self.k4[0]
        if not (self.recompute_gate and _plain_conv(conv4) and y.requires_grad and _recompute_pays(y)):
            return _conv(conv4, y)
        weight = conv4.weight
        amp_device = _autocast_available(y.device.type)
        if _autocast_on(y.device.type):
            dtype = torch.get_autocast_dtype(y.device.type)
            y = y.to(dtype)  # the weight: cast inside _ConvOfGate, the parameter saved
            if y.dtype != x.dtype:  # recompute in the dtype the convolution saw
                x, small, k3 = x.to(dtype), small.to(dtype), k3.to(dtype)
        elif weight.dtype != y.dtype:
            return conv4(y)
        if scale is not None:
            scale, shift = scale.detach(), shift.detach()
        if small_scale is not None:
            small_scale, small_shift = small_scale.detach(), small_shift.detach()
        with torch.autocast(y.device.type, enabled=False) if amp_device else contextlib.nullcontext():
            if _compiled_graph():
                return compiled_convs.conv_of_gate(y, weight, x, small, k3, scale, shift, small_scale, small_shift,
                                                   conv4.stride, conv4.padding, conv4.dilation, conv4.groups)
            return _ConvOfGate.apply(y, weight, x, small, k3, scale, shift, small_scale, small_shift,
                                     _pair(conv4.stride), _pair(conv4.padding), _pair(conv4.dilation), conv4.groups,
                                     regate)

    def _gate_bn_train(self, x: Tensor, small: Tensor, k3: Tensor, bn):
        factor = _bn_momentum(bn)
        weight, bias = _affine_params(bn, k3)
        y, mean, var = sc_gate_bn_train(x, small, k3, weight, bias, bn.eps)
        _update_running_stats(bn, factor, mean, var, k3, y)
        # as the op folded it (bn_fold: detached, in the statistics' dtype): the same y on recompute
        scale, shift = _affine_fold(weight.detach(), bias.detach(), mean, var, bn.eps, mean.dtype, k3)
        return y, scale, shift

    def _gate_bn2_train(self, x: Tensor, small: Tensor, k3: Tensor, bn: nn.Module, bn2: nn.Module):
        """The gate with k3's and k2's BatchNorms (batch statistics) inside; both running statistics
        updated as nn.BatchNorm2d does. Returns y and the two folds as the op applied them.

        k2's norm is counted and updated before k3's, in the reference's order."""
        factor2 = _bn_momentum(bn2)
        factor = _bn_momentum(bn)
        weight, bias = _affine_params(bn, k3)
        weight2, bias2 = _affine_params(bn2, small)
        y, mean, var, mean2, var2 = sc_gate_bn2_train(x, small, k3, weight, bias, bn.eps, weight2, bias2, bn2.eps)
        _update_running_stats(bn2, factor2, mean2, var2, small, y)
        _update_running_stats(bn, factor, mean, var, k3, y)
        scale, shift = _affine_fold(weight.detach(), bias.detach(), mean, var, bn.eps, mean.dtype, k3)
        ss, st = _affine_fold(weight2.detach(), bias2.detach(), mean2, var2, bn2.eps, mean2.dtype, small)
        return y, scale, shift, ss, st

    @classmethod
    def adopt(cls, module: nn.Module) -> "SCConv":
        """A fused SCConv sharing ``module``'s submodules (weights, buffers, mode, device, dtype)."""
        conv = module.k3[0]
        if conv.in_channels != conv.out_channels:
            raise ValueError(f"cannot fuse an SCConv with inplanes={conv.in_channels} != planes={conv.out_channels}")
        new = _adopted(cls, module)
        new.inplanes = conv.in_channels
        new.planes = conv.out_channels
        r = getattr(module, "pooling_r", None) or _pool_rate(module.k2[0])
        new.pooling_r = int(r)
        return new


def _adopted(cls, module: nn.Module) -> nn.Module:
    """A ``cls`` instance that takes over ``module``'s instance state: its children, parameters and buffers
    (in containers of its own, so that swapping a child leaves ``module`` as it was), its hooks (the same
    dicts: handles the user holds still remove them), its other attributes and its own training flag
    (each child keeps its mode: a frozen BatchNorm stays in eval). Where ``module``'s class is not a base
    of ``cls`` (a subclass of the reference's, the published file's class), the instance is of
    :func:`_keeping`'s class deriving from both, so that class's methods and class attributes stay."""
    cls = _keeping(cls, type(module))
    new = cls.__new__(cls)
    for key, value in module.__dict__.items():
        if key in ("_modules", "_parameters", "_buffers", "_non_persistent_buffers_set"):
            value = value.copy()
        new.__dict__[key] = value
    return new


_KEEPING: "weakref.WeakValueDictionary[Tuple[type, type], type]" = weakref.WeakValueDictionary()
_KEEPING_LOCK = threading.Lock()


# What a source class's own classes may not define for a combined class (:func:`_combinable`): hooks of
# class creation, instance creation, attribute setting and pickling that would run (or be bypassed) in
# adopting the module and copying the result.
_NOT_COMBINED = frozenset(("__init_subclass__", "__new__", "__setattr__", "__delattr__", "__getattribute__",
                           "__reduce__", "__reduce_ex__", "__class_getitem__"))


def _importable(source: type) -> bool:
    """``source`` is found again by its module and qualified name (what unpickling a combined instance
    needs; a class made inside a function is not)."""
    obj = sys.modules.get(source.__module__)
    for part in source.__qualname__.split("."):
        obj = getattr(obj, part, None)
    return obj is source


def _combinable(cls: type, source: type) -> bool:
    """Whether a class deriving from ``cls`` and ``source`` can be made and used without running or
    changing anything of the user's, and pickled: ``source`` importable (:func:`_importable`), a plain
    metaclass, none of :data:`_NOT_COMBINED` and no data descriptor (a property, slots) in its own
    classes (a descriptor would shadow the instance attributes the fused modules set and read)."""
    if type(source) is not type or not _importable(source):
        return False
    for k in source.__mro__:
        if k in cls.__mro__:
            continue
        for name, value in vars(k).items():
            if name in _NOT_COMBINED:
                return False
            if (hasattr(type(value), "__set__") or hasattr(type(value), "__delete__")) and \
                    name not in ("__dict__", "__weakref__"):
                return False
    return True


def _keeping(cls: type, source: type) -> type:
    """``cls`` where it derives from ``source`` already, else a class deriving from ``cls`` (first: its
    forward and methods run) and ``source`` (the replaced module's class: its other methods and class
    attributes stay reachable, and ``isinstance(m, source)`` still holds), one per pair while it has
    instances. Its instances pickle and deep-copy through :func:`_rebuild_keeping` with
    ``nn.Module.__getstate__``'s state (the class itself is made here, not importable). Where the two
    cannot be combined (:func:`_combinable`, or making the class fails), ``cls``."""
    if issubclass(cls, source) or not _combinable(cls, source):
        return cls
    with _KEEPING_LOCK:
        kept = _KEEPING.get((cls, source))
        if kept is None:
            def __reduce_ex__(self, protocol):
                return _rebuild_keeping, (cls, source), self.__getstate__()

            try:
                kept = type(f"Fused{source.__name__}", (cls, source),
                            {"__module__": __name__, "__reduce_ex__": __reduce_ex__,
                             "__doc__": f"{cls.__qualname__} keeping the methods of {source.__qualname__}"})
            except Exception:  # (a layout conflict, or what a base class's hooks raise)
                return cls
            _KEEPING[(cls, source)] = kept
    return kept


def _rebuild_keeping(cls: type, source: type) -> nn.Module:
    """An empty instance of ``_keeping(cls, source)`` (unpickling and deepcopy then set its state)."""
    kept = _keeping(cls, source)
    return kept.__new__(kept)


def _pool_rate(pool: nn.Module) -> int:
    k = pool.kernel_size
    return int(k[0] if isinstance(k, (tuple, list)) else k)


class SCBottleneck(reference.SCBottleneck):
    """The SCNet bottleneck with a fused SCConv (same arguments and state_dict as the reference).

    conv1_a and conv1_b run as one convolution with their weights stacked (x read once; one input
    gradient in the backward) where x is at least half the size of the two weights, and the two
    branches' final ReLUs write straight into the concatenation conv3 reads; in training the
    BatchNorm + ReLU after conv1_a / conv1_b run as one fused op over both halves, and k1's and the
    SCConv's k4 BatchNorm + ReLU as one op writing both halves of that concatenation. With avd (the
    v1d models' first block of a stage), the avd pool runs once, on that concatenation. The block's end,
    bn3 + the shortcut's addition + the ReLU, is one fused op in training and at inference.
    Submodules with hooks run as modules (see :func:`_hookless`). ``stack_conv1`` (default True; a
    class or instance attribute): False runs conv1_a and conv1_b one after the other (each with its
    fused BatchNorm + ReLU), as the reference does.
    At inference (no grad, eval-mode BatchNorms) each convolution + BatchNorm pair runs as one
    convolution with the BatchNorm folded in, where the output outweighs the weights.
    """

    stack_conv1 = True

    def forward(self, x: Tensor) -> Tensor:
        if fx_symbolic(x):  # torch.fx symbolic tracing: the reference's graph (its SCConv's too)
            return reference.SCBottleneck.forward(self, x)
        if (not _plain_relu(self.relu) or x.dim() != 4 or standard_ops_only()
                or _reference_inference(self._map_elements(x), BOTTLENECK_INFERENCE_MIN_ELEMENTS)
                or (self.avd and not self._plain_avd()) or _bad_train_norms(self)):
            # exports and torch.func transforms: standard operators only; a small map at inference
            # (BOTTLENECK_INFERENCE_MIN_ELEMENTS); a ReLU or an avd pool with hooks or its own forward
            # is called as often as the reference calls it; a training eps ATen refuses (its error with
            # the reference's side effects) or a BatchNorm in two places (_bad_train_norms)
            return super().forward(x)
        residual = x
        out_a, out_b = _conv1_pair(self.conv1_a, self.bn1_a, self.conv1_b, self.bn1_b, self.relu, x,
                                   self.stack_conv1)
        out = self._branches(out_a, out_b)
        if self.avd:
            # the pool works channel by channel: on the concatenation it is the two halves' pools
            # concatenated (one pass, no second concatenation)
            out = self.avd_layer(out)
        # the end fused: in training; at inference where conv3's output and the shortcut share a dtype
        # (under autocast they do not, and bn3 is better folded into conv3's weights)
        if _batch_stats_bn(self.bn3) or (not torch.is_grad_enabled() and _foldable_eval_norm(self.bn3)
                                         and not _autocast_on(x.device.type)):
            out = _conv(self.conv3, out)
            if self.downsample is not None:
                residual = _seq_conv_bn(self.downsample, x)
            return self._tail(out, residual)
        out = _conv_bn(self.conv3, self.bn3, out)
        if self.downsample is not None:
            residual = _seq_conv_bn(self.downsample, x)
        out = out + residual
        return self.relu(out)

    def _map_elements(self, x: Tensor) -> int:
        """The larger of the block's input and output sizes (a stage's first block at 64 channels in has
        a small input and a large output), for the small-map rule at inference."""
        s = getattr(self, "stride", 1)
        s = int(s[0] if isinstance(s, (tuple, list)) else s)
        channels = getattr(self.conv3, "out_channels", None) or x.shape[1]  # a conv3 of another kind: x's
        out = x.shape[0] * channels * (-(-x.shape[2] // s)) * (-(-x.shape[3] // s))
        return max(x.numel(), out)

    def _tail(self, t: Tensor, residual: Tensor) -> Tensor:
        """``relu(bn3(t) + residual)`` as one fused op where t and the residual match in shape, dtype and
        device (under autocast they do not: bf16 t, float32 residual, and the modules run): with bn3
        using batch statistics :func:`scnet_fused.ops.bn_relu.bn_add_relu_train` (running statistics as
        nn.BatchNorm2d updates them); at inference (no grad, eval-mode bn3) bn3 folded to per-channel
        constants of :func:`scnet_fused.ops.bn_relu.affine_add_relu`."""
        bn = self.bn3
        if not (t.dim() == 4 and t.numel() > 0 and residual.shape == t.shape and residual.dtype == t.dtype
                and residual.device == t.device and _tensors_on(bn, t)):
            return self.relu(bn(t) + residual)
        if not _batch_stats_bn(bn):  # inference: the eval-mode BatchNorm as the op's affine
            scale, shift = _eval_fold(bn, t, differentiable=False)
            return affine_add_relu(t, residual, scale, shift)
        if not _bn_stats_ok(t):
            return self.relu(bn(t) + residual)
        factor = _bn_momentum(bn)
        weight, bias = _affine_params(bn, t)
        y, mean, var = bn_add_relu_train(t, weight, bias, residual, bn.eps)
        _update_running_stats(bn, factor, mean, var, t, y)
        return y

    def _plain_avd(self) -> bool:
        """The avd layer is an nn.AvgPool2d or nn.MaxPool2d (a per-channel pool) with nothing attached."""
        pool = getattr(self, "avd_layer", None)
        return type(pool) in (nn.AvgPool2d, nn.MaxPool2d) and _hookless(pool)

    def _branches(self, out_a: Tensor, out_b: Tensor) -> Tensor:
        """``cat([relu(k1(out_a)), relu(scconv(out_b))], 1)``. With both branches ending in a BatchNorm2d
        that uses batch statistics (training), the two BatchNorm + ReLU passes write their halves of the
        concatenation directly (:func:`scnet_fused.ops.bn_relu_cat_train`); running statistics as
        nn.BatchNorm2d updates them. Otherwise the branches run as modules and their ReLUs write the
        halves (:func:`scnet_fused.ops.relu_cat.relu_cat`)."""
        k1, sc = self.k1, self.scconv
        # scconv's fused halves only from this package's SCConv forward (a subclass with a forward of its
        # own runs as the module)
        if not (_plain_seq(k1, 2) and _batch_stats_bn(k1[1]) and isinstance(sc, SCConv)
                and type(sc).forward is SCConv.forward and _hookless(sc) and sc._fusable()
                and _batch_stats_bn(sc.k4[1])):
            return relu_cat(_seq_conv_bn(k1, out_a), sc(out_b))
        bn_a, bn_b = k1[1], sc.k4[1]
        ta = _conv(k1[0], out_a)
        try:
            tb = sc._pre_norm4(out_b)
        except Exception:
            # the reference's k1 ran in full before its SCConv raised (a pooled map of one value per
            # channel in training, ...): k1's BatchNorm counts this batch there, so it does here
            with torch.no_grad(), contextlib.suppress(Exception):
                bn_a(ta)
            raise
        if not _fusable_pair(ta, tb):
            return relu_cat(bn_a(ta), bn_b(tb))  # nn.BatchNorm2d's own handling (and errors)
        factor_a, factor_b = _bn_momentum(bn_a), _bn_momentum(bn_b)
        wa, ba = _affine_params(bn_a, ta)
        wb, bb = _affine_params(bn_b, tb)
        out, mean_a, var_a, mean_b, var_b = bn_relu_cat_train(ta, wa, ba, tb, wb, bb, bn_a.eps, bn_b.eps)
        _update_running_stats(bn_a, factor_a, mean_a, var_a, ta, out)
        _update_running_stats(bn_b, factor_b, mean_b, var_b, tb, out)
        return out

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: Optional[nn.Module] = None,
                 cardinality: int = 1, bottleneck_width: int = 32, avd: bool = False, dilation: int = 1,
                 is_first: bool = False, norm_layer=None) -> None:
        super().__init__(inplanes, planes, stride, downsample, cardinality, bottleneck_width, avd,
                         dilation, is_first, norm_layer, scconv_cls=SCConv)

    @classmethod
    def adopt(cls, module: nn.Module) -> "SCBottleneck":
        """A fused bottleneck sharing ``module``'s submodules; its SCConv becomes the fused one."""
        new = _adopted(cls, module)
        if "downsample" not in new._modules:
            new.downsample = None
        for attr in ("avd", "dilation", "stride"):  # class attributes of the source class too
            if attr not in new.__dict__ and hasattr(module, attr):
                setattr(new, attr, getattr(module, attr))
        if not hasattr(new, "avd"):
            new.avd = hasattr(module, "avd_layer")
        if not isinstance(new.scconv, SCConv):
            new.scconv = SCConv.adopt(new.scconv)
        return new



class MaxPool2d(nn.MaxPool2d):
    """``nn.MaxPool2d`` (same arguments, no state) whose dense NCHW float32 CPU inputs run on this
    package's kernel (:func:`scnet_fused.ops.maxpool.max_pool2d`: ATen's values, indices and gradients,
    about 9x faster than ATen's NCHW kernel on the stem's 8x64x112x112 map); everything else, and
    ``return_indices=True``, as ``nn.MaxPool2d``. The fused models use it for the stem's pool."""

    def forward(self, x: Tensor) -> Tensor:
        if fx_symbolic(x):
            # torch.fx symbolic tracing: a call of this module, as the tracer records an nn.MaxPool2d
            # (a leaf); the traced graph then runs it, on the package's kernel. The module traced on its
            # own, or one the traced module does not hold: F.max_pool2d's node.
            try:
                path = x.tracer.path_of_module(self)
            except NameError:
                path = ""
            if path:
                return x.tracer.create_proxy("call_module", path, (x,), {})
            return super().forward(x)
        if self.return_indices or standard_ops_only():
            return super().forward(x)
        return max_pool2d(x, self.kernel_size, self.stride, self.padding, self.dilation, self.ceil_mode)


def scnet_stem(conv1: nn.Module, bn1: nn.Module, relu: nn.Module, maxpool: nn.Module, x: Tensor) -> Tensor:
    """``maxpool(relu(bn1(conv1(x))))``, an SCNet's stem, as the fused models run it: with ``bn1`` a
    BatchNorm2d using batch statistics (training), BatchNorm + ReLU as one fused op
    (:func:`scnet_fused.ops.bn_relu_train`; running statistics as nn.BatchNorm2d updates them); at
    inference with an eval-mode ``bn1``, the BatchNorm folded into ``conv1`` (a plain convolution);
    otherwise, and where a hook is attached to ``bn1`` or ``relu``, the modules. ``conv1`` runs as its
    module (the v1d models' deep stem is a Sequential) unless it is a plain convolution the fused
    paths take; ``maxpool`` always runs as its module. The v1d models' deep stem (``conv1`` a Sequential
    of convolution, BatchNorm, ReLU, ..., convolution) runs its convolution + BatchNorm + ReLU triples
    the same way, and its last convolution with ``bn1``."""
    if fx_symbolic(x) or standard_ops_only() or x.dim() != 4 or not _plain_relu(relu):
        return maxpool(relu(bn1(conv1(x))))
    if type(conv1) is nn.Sequential and len(conv1) > 0 and isinstance(conv1[-1], nn.Conv2d) and _hookless(conv1):
        mods = list(conv1)
        i = 0
        while i < len(mods) - 1:
            if (i + 3 < len(mods) and isinstance(mods[i], nn.Conv2d)
                    and isinstance(mods[i + 1], nn.modules.batchnorm._BatchNorm) and _plain_relu(mods[i + 2])):
                x = _bn_relu(mods[i], mods[i + 1], mods[i + 2], x)
                i += 3
            else:
                x = mods[i](x)
                i += 1
        conv1 = mods[-1]
    return maxpool(_bn_relu(conv1, bn1, relu, x))
