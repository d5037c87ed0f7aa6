"""bn_relu_train: training-mode BatchNorm + ReLU fused, against F.batch_norm + relu in float64."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import scnet_fused
from scnet_fused import reference as R
from scnet_fused.ops import backend
from scnet_fused.ops import _dispatch
from scnet_fused.ops.bn_relu import bn_add_relu_train, bn_relu_cat_train, bn_relu_train

from _util import assert_close_rule, backends_here

SHAPES = [(3, 5, 7, 6), (2, 16, 14, 13), (4, 3, 1, 1), (1, 9, 25, 7)]


def _inputs(shape, dtype=torch.float32, channels_last=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = (torch.randn(*shape, generator=g) * 2 + 0.3).to(dtype)
    if channels_last:
        t = t.contiguous(memory_format=torch.channels_last)
    C = shape[1]
    w = torch.rand(C, generator=g) + 0.5
    b = torch.randn(C, generator=g) * 0.5
    dy = torch.randn(*shape, generator=g).to(dtype)
    return t, w, b, dy


def _eager(t, w, b, eps=1e-5):
    return F.relu(F.batch_norm(t, None, None, w, b, True, 0.1, eps))


@pytest.mark.parametrize("name", backends_here())
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("channels_last", [False, True])
def test_matches_batch_norm_relu(name, shape, channels_last):
    t, w, b, dy = _inputs(shape, channels_last=channels_last)
    leaves = [v.clone().requires_grad_() for v in (t, w, b)]
    with backend(name):
        y, mean, var = bn_relu_train(*leaves)
        grads = torch.autograd.grad(y, leaves, dy)
    ref = [v.detach().double().requires_grad_() for v in (t, w, b)]
    y64 = _eager(*ref)
    g64 = torch.autograd.grad(y64, ref, dy.double())
    torch.testing.assert_close(y.double(), y64.detach(), rtol=1e-5, atol=1e-5)
    var64, mean64 = torch.var_mean(t.double(), dim=(0, 2, 3), unbiased=False)
    torch.testing.assert_close(mean.double(), mean64, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(var.double(), var64, rtol=1e-5, atol=1e-5)
    for n, a, e in zip(("dt", "dweight", "dbias"), grads, g64):
        torch.testing.assert_close(a.double(), e, rtol=1e-4, atol=1e-4, msg=lambda m: f"{n}: {m}")
    fmt = torch.channels_last if channels_last and shape[2] * shape[3] > 1 else torch.contiguous_format
    assert y.is_contiguous(memory_format=fmt) and grads[0].is_contiguous(memory_format=fmt)
    assert not mean.requires_grad and mean.dtype == torch.float32


@pytest.mark.parametrize("name", [n for n in backends_here() if n != "reference"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision(name, dtype):
    t, w, b, dy = _inputs((2, 16, 14, 13), dtype=dtype, channels_last=True, seed=1)
    leaves = [t.clone().requires_grad_(), w.clone().requires_grad_(), b.clone().requires_grad_()]
    with backend(name):
        y, _, _ = bn_relu_train(*leaves)
        grads = torch.autograd.grad(y, leaves, dy)
    ref = [v.detach().double().requires_grad_() for v in (t, w, b)]
    y64 = _eager(*ref)
    g64 = torch.autograd.grad(y64, ref, dy.double())
    eager = [t.clone().requires_grad_(), w.to(dtype).requires_grad_(), b.to(dtype).requires_grad_()]
    ye = _eager(*eager)
    ge = torch.autograd.grad(ye, eager, dy)
    assert y.dtype == dtype and grads[0].dtype == dtype
    assert_close_rule(y, y64.detach(), ye.detach(), what=f"{name} {dtype} y")
    for n, a, e, l in zip(("dt", "dweight", "dbias"), grads, g64, ge):
        assert_close_rule(a, e, l, what=f"{name} {dtype} {n}")


@pytest.mark.parametrize("name", backends_here())
def test_relu_edge_values(name):
    """Exactly zero before the ReLU gets zero gradient; NaN propagates forward and passes gradient, as
    torch.relu does."""
    t = torch.tensor([[[[0.0, 1.0, -1.0, 2.0]]], [[[0.5, float("nan"), -0.5, 0.0]]]])  # (2, 1, 1, 4)
    w, b = torch.ones(1), torch.zeros(1)
    with backend(name):
        y, mean, var = bn_relu_train(t.clone().requires_grad_(), w, b)
    assert torch.isnan(y).all()  # a NaN in the channel makes its statistics NaN, as torch's
    assert torch.isnan(mean).all() and torch.isnan(var).all()
    from scnet_fused.ops import _dispatch

    with backend(name):
        _, prims = _dispatch.select(t.device, t.dtype)
    z = torch.tensor([[[[0.0, 1.0, -1.0, float("nan")]]]])
    one, zero = torch.ones(1), torch.zeros(1)
    torch.testing.assert_close(prims.affine_relu(z, one, zero), torch.relu(z), equal_nan=True)
    dy = torch.ones_like(z)
    zz = z.clone().requires_grad_()
    (expect,) = torch.autograd.grad(torch.relu(zz), zz, dy)
    got = prims.affine_relu_backward_apply(dy, z, one, zero, one, zero, zero)
    torch.testing.assert_close(got[..., :3], expect[..., :3])  # (at the NaN, q * t is NaN by design)
    sum_g, _ = prims.affine_relu_backward_sums(dy, z, one, zero, zero)
    assert sum_g.item() == expect.sum().item() == 2.0  # the NaN position passed its gradient


def test_opcheck_gradcheck_and_errors():
    t, w, b, _ = _inputs((2, 3, 5, 4))
    torch.library.opcheck(torch.ops.scnet_fused.bn_relu_train.default,
                          (t.requires_grad_(), w.requires_grad_(), b.requires_grad_(), 1e-5))
    t64 = torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    w64 = torch.rand(3, dtype=torch.float64, requires_grad=True)
    b64 = torch.randn(3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: bn_relu_train(*a)[0], (t64, w64, b64))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        bn_relu_train(torch.randn(1, 3, 1, 1), torch.ones(3), torch.zeros(3))
    with pytest.raises(ValueError, match="weight must be a 1-D tensor of C=3"):
        bn_relu_train(torch.randn(2, 3, 4, 4), torch.ones(4), torch.zeros(3))
    with pytest.raises(ValueError, match="4-D"):
        bn_relu_train(torch.randn(2, 3, 4), torch.ones(3), torch.zeros(3))
    with pytest.raises(TypeError, match="float16, bfloat16, float32 or float64"):
        bn_relu_train(torch.ones(2, 3, 4, 4, dtype=torch.int32), torch.ones(3), torch.zeros(3))


def test_saves_only_t_and_per_channel_vectors():
    t, w, b, _ = _inputs((2, 4, 8, 8))
    t.requires_grad_()
    shapes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda x: shapes.append(tuple(x.shape)) or x, lambda x: x):
        bn_relu_train(t, w.requires_grad_(), b.requires_grad_())
    assert sorted(shapes) == sorted([tuple(t.shape), (4,), (4,), (4,), (4,)])


@pytest.mark.parametrize("name", backends_here())
@pytest.mark.parametrize("channels_last,stack", [(False, True), (True, True), (False, False)])
def test_bottleneck_runs_it_in_training(name, channels_last, stack):
    """The fused bottleneck's conv1_a / conv1_b BatchNorm + ReLU run as one fused op over their stacked
    convolution's output in training (two with ``stack_conv1 = False``), and bn3 with the shortcut's
    addition and the final ReLU as another; same outputs, gradients and
    running statistics as the reference over two steps (one of the two BatchNorms with cumulative
    averaging), then eval."""
    torch.manual_seed(0)
    ref = R.SCBottleneck(128, 32, norm_layer=nn.BatchNorm2d, downsample=None)
    ref.bn1_a.momentum = None  # cumulative average for one of them
    ref.k1[1].momentum = None
    fused = scnet_fused.convert(ref)
    fused.stack_conv1 = stack
    x = torch.randn(2, 128, 14, 13)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    ref.train(), fused.train()
    with backend(name):
        for _ in range(2):
            xr, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
            with torch.profiler.profile() as prof:
                out_f = fused(xf)
            out_r = ref(xr)
            torch.testing.assert_close(out_f, out_r, rtol=1e-4, atol=1e-4)
            g = torch.randn_like(out_r)
            for a, e in zip(torch.autograd.grad(out_f, [xf] + list(fused.parameters()), g),
                            torch.autograd.grad(out_r, [xr] + list(ref.parameters()), g)):
                torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-4)
            calls = [e.name for e in prof.events()
                     if e.name in ("scnet_fused::bn_relu_train", "scnet_fused::_bn_relu_train_ag")]
            assert len(calls) == (1 if stack else 2), calls
            cat_calls = [e.name for e in prof.events()
                         if e.name in ("scnet_fused::bn_relu_cat_train", "scnet_fused::_bn_relu_cat_train_ag")]
            assert len(cat_calls) == 1, cat_calls  # k1's and k4's BatchNorm + ReLU into the concatenation
            tail_calls = [e.name for e in prof.events()
                          if e.name in ("scnet_fused::bn_add_relu_train", "scnet_fused::_bn_add_relu_train_ag")]
            assert len(tail_calls) == 1, tail_calls  # bn3 + the shortcut + the ReLU
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(fused.state_dict()[k], v, rtol=1e-5, atol=1e-6, msg=lambda m: f"{k}: {m}")
    assert int(fused.bn1_a.num_batches_tracked) == 2


# ------------------------------------------------------------------------------------------------
# bn_relu_cat_train: two branches' BatchNorm + ReLU written into their concatenation
# ------------------------------------------------------------------------------------------------

# The last two: a one-channel branch is dense in both layouts (the concatenation follows the first
# branch's; the second is read in it).
CAT_SHAPES = [((2, 5, 7, 6), 3), ((3, 16, 14, 13), 16), ((4, 3, 1, 1), 2), ((2, 3, 7, 2), 1), ((2, 1, 7, 2), 3)]


def _cat_inputs(shape, cb, dtype=torch.float32, channels_last=False, seed=0):
    ta, wa, ba, _ = _inputs(shape, dtype, channels_last, seed)
    tb, wb, bb, _ = _inputs((shape[0], cb) + tuple(shape[2:]), dtype, channels_last, seed + 1)
    g = torch.Generator().manual_seed(seed + 2)
    dout = torch.randn(shape[0], shape[1] + cb, *shape[2:], generator=g).to(dtype)
    return (ta, wa, ba, tb, wb, bb), dout


def _eager_cat(ta, wa, ba, tb, wb, bb, eps_a=1e-5, eps_b=1e-5):
    return torch.cat([_eager(ta, wa, ba, eps_a), _eager(tb, wb, bb, eps_b)], dim=1)


@pytest.mark.parametrize("name", backends_here())
@pytest.mark.parametrize("shape,cb", CAT_SHAPES, ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else str(v))
@pytest.mark.parametrize("channels_last", [False, True])
def test_cat_matches_batch_norm_relu_cat(name, shape, cb, channels_last):
    args, dout = _cat_inputs(shape, cb, channels_last=channels_last)
    leaves = [v.clone().requires_grad_() for v in args]
    with backend(name):
        out, mean_a, var_a, mean_b, var_b = bn_relu_cat_train(*leaves, eps_a=1e-5, eps_b=1e-3)
        grads = torch.autograd.grad(out, leaves, dout)
    ref = [v.detach().double().requires_grad_() for v in args]
    out64 = _eager_cat(*ref, eps_a=1e-5, eps_b=1e-3)
    g64 = torch.autograd.grad(out64, ref, dout.double())
    torch.testing.assert_close(out.double(), out64.detach(), rtol=1e-5, atol=1e-5)
    for t, mean, var in ((args[0], mean_a, var_a), (args[3], mean_b, var_b)):
        var64, mean64 = torch.var_mean(t.double(), dim=(0, 2, 3), unbiased=False)
        torch.testing.assert_close(mean.double(), mean64, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(var.double(), var64, rtol=1e-5, atol=1e-5)
    for n, a, e in zip(("dta", "dwa", "dba", "dtb", "dwb", "dbb"), grads, g64):
        torch.testing.assert_close(a.double(), e, rtol=1e-4, atol=1e-4, msg=lambda m: f"{n}: {m}")
    # out takes ta's memory format (contiguous when ta is dense in both)
    fmt = torch.channels_last if channels_last and shape[1] > 1 and shape[2] * shape[3] > 1 else torch.contiguous_format
    assert out.is_contiguous(memory_format=fmt)


@pytest.mark.parametrize("name", [n for n in backends_here() if n != "reference"])
def test_cat_low_precision(name):
    args, dout = _cat_inputs((2, 16, 14, 13), 8, dtype=torch.bfloat16, channels_last=True, seed=3)
    leaves = [v.clone().requires_grad_() for v in args]
    with backend(name):
        out = bn_relu_cat_train(*leaves)[0]
        grads = torch.autograd.grad(out, leaves, dout)
    ref = [v.detach().double().requires_grad_() for v in args]
    out64 = _eager_cat(*ref)
    g64 = torch.autograd.grad(out64, ref, dout.double())
    eager = [v.detach().to(torch.bfloat16).requires_grad_() for v in args]
    oute = _eager_cat(*eager)
    ge = torch.autograd.grad(oute, eager, dout)
    assert out.dtype == torch.bfloat16
    assert_close_rule(out, out64.detach(), oute.detach(), what=f"{name} out")
    for n, a, e, l in zip(("dta", "dwa", "dba", "dtb", "dwb", "dbb"), grads, g64, ge):
        assert_close_rule(a, e, l, what=f"{name} {n}")


@pytest.mark.parametrize("name", backends_here())
@pytest.mark.parametrize("channels_last", [False, True])
def test_slices_written_and_read_in_place(name, channels_last):
    """affine_relu_out writes exactly its channel slice of a wider buffer (the rest keeps its sentinel);
    the backward primitives read a slice of a wider gradient exactly as the same values made dense."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    t, _, _, _ = _inputs((2, 5, 6, 7), channels_last=channels_last)
    scale, shift = torch.rand(5) + 0.5, torch.randn(5)
    with backend(name):
        _, prims = _dispatch.select(t.device, t.dtype)
    buf = torch.full((2, 12, 6, 7), 7.0).contiguous(memory_format=fmt)
    prims.affine_relu_out(t, scale, shift, buf[:, 4:9])
    torch.testing.assert_close(buf[:, 4:9], prims.affine_relu(t, scale, shift), rtol=0, atol=0)
    assert (buf[:, :4] == 7.0).all() and (buf[:, 9:] == 7.0).all()
    wide = torch.randn(2, 12, 6, 7).contiguous(memory_format=fmt)
    dy = wide[:, 4:9]
    dense = dy.contiguous(memory_format=fmt)
    center, p, q, r = torch.randn(5), torch.randn(5), torch.randn(5), torch.randn(5)
    for a, e in zip(prims.affine_relu_backward_sums(dy, t, scale, shift, center),
                    prims.affine_relu_backward_sums(dense, t, scale, shift, center)):
        torch.testing.assert_close(a, e, rtol=0, atol=0)
    torch.testing.assert_close(prims.affine_relu_backward_apply(dy, t, scale, shift, p, q, r),
                               prims.affine_relu_backward_apply(dense, t, scale, shift, p, q, r), rtol=0, atol=0)
    # a one-channel t (dense in both layouts) into a slice of a buffer in the other layout
    one = t[:, 2:3].contiguous()
    other = torch.contiguous_format if channels_last else torch.channels_last
    wide_out = torch.full((2, 4, 6, 7), 7.0).contiguous(memory_format=other)
    prims.affine_relu_out(one, scale[:1], shift[:1], wide_out[:, 1:2])
    torch.testing.assert_close(wide_out[:, 1:2], prims.affine_relu(one, scale[:1], shift[:1]), rtol=0, atol=0)
    assert (wide_out[:, 0] == 7.0).all() and (wide_out[:, 2:] == 7.0).all()
    if name != "reference":  # the reference copies into any strides; the kernels refuse other layouts
        with pytest.raises((ValueError, RuntimeError), match="channel slice"):
            prims.affine_relu_out(t, scale, shift, torch.empty(2, 5, 7, 6).transpose(2, 3))


def test_cat_opcheck_errors_and_saved_tensors():
    args, dout = _cat_inputs((2, 3, 5, 4), 2)
    leaves = [v.clone().requires_grad_() for v in args]
    torch.library.opcheck(torch.ops.scnet_fused.bn_relu_cat_train.default,
                          (leaves[0], leaves[1], leaves[2], 1e-5, leaves[3], leaves[4], leaves[5], 1e-3))
    a64 = [v.detach().double().requires_grad_() for v in args]
    assert torch.autograd.gradcheck(lambda *a: bn_relu_cat_train(*a)[0], a64)
    shapes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda x: shapes.append(tuple(x.shape)) or x, lambda x: x):
        bn_relu_cat_train(*leaves)
    # ta, tb and per-channel vectors: never the normalised halves, the masks or the output
    assert sorted(shapes) == sorted([(2, 3, 5, 4), (3,), (3,), (3,), (3,), (2, 2, 5, 4), (2,), (2,), (2,), (2,)])
    ta, wa, ba, tb, wb, bb = args
    with pytest.raises(ValueError, match="differ outside the channel dimension"):
        bn_relu_cat_train(ta, wa, ba, tb[:, :, :4], wb, bb)
    with pytest.raises(ValueError, match="differ in dtype or device"):
        bn_relu_cat_train(ta, wa, ba, tb.double(), wb, bb)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        bn_relu_cat_train(ta[:1, :, :1, :1], wa, ba, tb[:1, :, :1, :1], wb, bb)
    with pytest.raises(ValueError, match="bn_relu_cat_train: weight_b must be a 1-D tensor of C=2"):
        bn_relu_cat_train(ta, wa, ba, tb, wa, bb)
    with pytest.raises(ValueError, match="bn_relu_cat_train: tb must be a 4-D"):
        bn_relu_cat_train(ta, wa, ba, tb[0], wb, bb)


@pytest.mark.parametrize("name", backends_here())
def test_cat_mixed_layouts_and_strided_inputs(name):
    """ta channels_last, tb a strided view, and an expanded (stride-0) output gradient from .sum():
    the right values, out in ta's memory format."""
    args, _ = _cat_inputs((2, 6, 9, 10), 4, channels_last=True, seed=5)
    leaves = [v.detach().clone().requires_grad_() for v in args]
    leaves[3] = torch.randn(2, 4, 9, 20)[:, :, :, ::2].requires_grad_()  # tb: contiguous in no format
    with backend(name):
        out = bn_relu_cat_train(*leaves)[0]
        grads = torch.autograd.grad(out.sum(), leaves)
    ref = [v.detach().double().requires_grad_() for v in leaves]
    out64 = _eager_cat(*ref)
    g64 = torch.autograd.grad(out64.sum(), ref)
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out.double(), out64.detach(), rtol=1e-5, atol=1e-5)
    for a, e in zip(grads, g64):
        torch.testing.assert_close(a.double(), e, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------------
# bn_add_relu_train: BatchNorm + residual addition + ReLU (a bottleneck's end)
# ------------------------------------------------------------------------------------------------


def _eager_add(t, w, b, res, eps=1e-5):
    return F.relu(F.batch_norm(t, None, None, w, b, True, 0.1, eps) + res)


def _residual(shape, dtype=torch.float32, seed=5):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * 1.5).to(dtype)


def _add_run(name, t, w, b, res, dy):
    """bn_add_relu_train on backend ``name`` and eager float64: (y, mean, var, grads, y64, g64), the
    gradients of t, weight, bias and the residual."""
    leaves = [v.clone().requires_grad_() for v in (t, w, b, res)]
    with backend(name):
        y, mean, var = bn_add_relu_train(*leaves)
        grads = torch.autograd.grad(y, leaves, dy)
    ref = [v.detach().double().requires_grad_() for v in (t, w, b, res)]
    y64 = _eager_add(*ref)
    g64 = torch.autograd.grad(y64, ref, dy.double())
    return y, mean, var, grads, y64.detach(), g64


@pytest.mark.parametrize("name", backends_here())
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("t_format,res_format", [("nchw", "nchw"), ("nhwc", "nhwc"), ("nchw", "nhwc"),
                                                 ("nhwc", "strided")])
def test_add_matches_batch_norm_add_relu(name, shape, t_format, res_format):
    """Outputs, statistics and every gradient (the residual's included) against float64 eager; the
    residual in t's memory format, in the other, or not dense at all (read in t's); y and the input
    gradients in t's format."""
    t, w, b, dy = _inputs(shape, channels_last=t_format == "nhwc")
    res = _residual(shape)
    if res_format == "nhwc":
        res = res.contiguous(memory_format=torch.channels_last)
    elif res_format == "strided":
        res = _residual((shape[0], shape[1], shape[2], 2 * shape[3]))[..., ::2]
    y, mean, var, grads, y64, g64 = _add_run(name, t, w, b, res, dy)
    torch.testing.assert_close(y.double(), y64, rtol=1e-5, atol=1e-5)
    var64, mean64 = torch.var_mean(t.double(), dim=(0, 2, 3), unbiased=False)
    torch.testing.assert_close(mean.double(), mean64, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(var.double(), var64, rtol=1e-5, atol=1e-5)
    for n, a, e in zip(("dt", "dweight", "dbias", "dresidual"), grads, g64):
        torch.testing.assert_close(a.double(), e, rtol=1e-4, atol=1e-4, msg=lambda m: f"{n}: {m}")
    fmt = torch.channels_last if t_format == "nhwc" and shape[2] * shape[3] > 1 else torch.contiguous_format
    assert y.is_contiguous(memory_format=fmt) and grads[0].is_contiguous(memory_format=fmt)
    assert not mean.requires_grad and mean.dtype == torch.float32


@pytest.mark.skipif("cpu" not in backends_here(), reason="the cpu backend is not built")
@pytest.mark.parametrize("shape,channels_last", [((2, 2, 256, 200), False), ((3, 1, 6, 5), False),
                                                 ((2, 19, 40, 50), True)],
                         ids=["channel_over_1MiB", "one_channel", "nhwc_several_tasks"])
def test_add_cpu_two_pass_paths(shape, channels_last):
    """The cpu backend's one-call forward and backward go channel by channel on NCHW tensors only where
    a channel fits in cache and every thread gets one; these shapes take the two-pass paths instead
    (channels_last: the mask pass, the sums and the apply, over more values than one task takes, so
    the mask pass's tasks start mid-vector, with a 3-lane channel tail)."""
    t, w, b, dy = _inputs(shape, channels_last=channels_last)
    if channels_last:
        dy = dy.contiguous(memory_format=torch.channels_last)
    res = _residual(shape).contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    y, _, _, grads, y64, g64 = _add_run("cpu", t, w, b, res, dy)
    assert y.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    torch.testing.assert_close(y.double(), y64, rtol=1e-5, atol=1e-5)
    for n, a, e in zip(("dt", "dweight", "dbias", "dresidual"), grads, g64):
        torch.testing.assert_close(a.double(), e, rtol=1e-4, atol=2e-3 if n != "dt" else 1e-4,
                                   msg=lambda m: f"{n}: {m}")


@pytest.mark.parametrize("name", [n for n in backends_here() if n != "reference"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_add_low_precision(name, dtype):
    shape = (2, 16, 14, 13)
    t, w, b, dy = _inputs(shape, dtype=dtype, channels_last=True, seed=1)
    res = _residual(shape, dtype)
    y, _, _, grads, y64, g64 = _add_run(name, t, w, b, res, dy)
    eager = [t.clone().requires_grad_(), w.to(dtype).requires_grad_(), b.to(dtype).requires_grad_(),
             res.clone().requires_grad_()]
    ye = _eager_add(*eager)
    ge = torch.autograd.grad(ye, eager, dy)
    assert y.dtype == dtype and grads[0].dtype == dtype and grads[3].dtype == dtype
    assert_close_rule(y, y64, ye.detach(), what=f"{name} {dtype} y")
    for n, a, e, l in zip(("dt", "dweight", "dbias", "dresidual"), grads, g64, ge):
        assert_close_rule(a, e, l, what=f"{name} {dtype} {n}")


@pytest.mark.parametrize("name", backends_here())
def test_add_relu_edge_values(name):
    """The ReLU's mask comes from the output, as torch's ReLU backward: an output of exactly 0 (the sum
    cancelling) stops the gradient, a NaN residual makes a NaN output that passes it."""
    t = torch.tensor([[[[1.0, -1.0, 0.5, 2.0]]], [[[-0.5, 0.0, 1.5, -2.0]]]])  # (2, 1, 1, 4)
    w, b = torch.ones(1), torch.zeros(1)
    with torch.no_grad():
        z = F.batch_norm(t, None, None, w, b, True, 0.1, 1e-5)
    res = -z  # the sum is 0 (up to rounding of the fold: set exactly below)
    res[0, 0, 0, 3] = float("nan")
    leaves = [t.clone().requires_grad_(), w.clone().requires_grad_(), b.clone().requires_grad_(),
              res.clone().requires_grad_()]
    with backend(name):
        y, _, _ = bn_add_relu_train(*leaves)
        (dres,) = torch.autograd.grad(y, leaves[3], torch.ones_like(y))
    assert torch.isnan(y[0, 0, 0, 3]) and dres[0, 0, 0, 3] == 1.0
    expect = torch.where(y.detach() <= 0, 0.0, 1.0)
    torch.testing.assert_close(dres, expect)  # whatever the rounding of the sum, the mask is the output's


@pytest.mark.parametrize("name", backends_here())
def test_add_relu_edge_values_channels_last(name):
    """The same on channels_last maps of 19 channels (a full vector and a tail on the CPU): outputs of
    exactly 0 stop the gradient, NaN outputs pass it, and dt, dweight, dbias stay finite in the channels
    without a NaN."""
    torch.manual_seed(3)
    t = torch.randn(2, 19, 3, 4)
    w, b = torch.rand(19) + 0.5, torch.randn(19)
    with torch.no_grad():
        z = F.batch_norm(t, None, None, w, b, True, 0.1, 1e-5)
    res = -z.clone()
    res[:, ::2] = torch.randn(2, 10, 3, 4)  # even channels: ordinary sums; odd channels: cancelling
    res[1, 5, 2, 1] = float("nan")
    res[0, 18, 0, 0] = float("nan")
    leaves = [v.contiguous(memory_format=torch.channels_last) if v.dim() == 4 else v.clone() for v in (t, w, b, res)]
    leaves = [v.detach().requires_grad_() for v in leaves]
    dy = torch.randn(2, 19, 3, 4).contiguous(memory_format=torch.channels_last)
    with backend(name):
        y, _, _ = bn_add_relu_train(*leaves)
        dt, dw, db, dres = torch.autograd.grad(y, leaves, dy)
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert torch.isnan(y[1, 5, 2, 1]) and torch.isnan(y[0, 18, 0, 0])
    torch.testing.assert_close(dres, torch.where(y.detach() <= 0, 0.0, dy))  # NaN outputs pass dy
    clean = [c for c in range(19) if c not in (5, 18)]
    assert torch.isfinite(dt[:, clean]).all() and torch.isfinite(dw[clean]).all() and torch.isfinite(db[clean]).all()
    torch.testing.assert_close(db, dres.sum((0, 2, 3)), rtol=1e-5, atol=1e-5)


def test_add_opcheck_gradcheck_and_errors():
    t, w, b, _ = _inputs((2, 3, 5, 4))
    res = _residual((2, 3, 5, 4))
    torch.library.opcheck(torch.ops.scnet_fused.bn_add_relu_train.default,
                          (t.requires_grad_(), w.requires_grad_(), b.requires_grad_(), res.requires_grad_(), 1e-5))
    args64 = [torch.randn(2, 3, 4, 5, dtype=torch.float64), torch.rand(3, dtype=torch.float64) + 0.5,
              torch.randn(3, dtype=torch.float64), torch.randn(2, 3, 4, 5, dtype=torch.float64)]
    args64 = [a.requires_grad_() for a in args64]
    assert torch.autograd.gradcheck(lambda *a: bn_add_relu_train(*a)[0], args64)
    good = (torch.randn(2, 3, 4, 4), torch.ones(3), torch.zeros(3))
    with pytest.raises(ValueError, match="residual must have t's shape"):
        bn_add_relu_train(*good, torch.randn(2, 3, 4, 5))
    with pytest.raises(ValueError, match="residual must have t's dtype and device"):
        bn_add_relu_train(*good, torch.randn(2, 3, 4, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        bn_add_relu_train(torch.randn(1, 3, 1, 1), torch.ones(3), torch.zeros(3), torch.randn(1, 3, 1, 1))
    with pytest.raises(ValueError, match="4-D"):
        bn_add_relu_train(torch.randn(2, 3, 4), torch.ones(3), torch.zeros(3), torch.randn(2, 3, 4))


def test_add_saves_y_t_and_per_channel_vectors():
    t, w, b, _ = _inputs((2, 4, 8, 8))
    res = _residual((2, 4, 8, 8)).requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x) or x, lambda x: x):
        y, _, _ = bn_add_relu_train(t.requires_grad_(), w.requires_grad_(), b.requires_grad_(), res)
    assert sorted(tuple(s.shape) for s in saved) == sorted([tuple(t.shape)] * 2 + [(4,)] * 4)
    assert any(s is y or s.data_ptr() == y.data_ptr() for s in saved)  # the output, not the residual
    assert not any(s.data_ptr() == res.data_ptr() for s in saved)


@pytest.mark.parametrize("name", backends_here())
@pytest.mark.parametrize("channels_last", [False, True])
def test_affine_add_relu_inference(name, channels_last):
    """relu(t * scale + shift + residual) in one pass (an eval BatchNorm folded, the shortcut, the ReLU):
    against float64 eager, residual in the other memory format too; y in t's format. With autograd
    recording it refuses (it is the inference op), naming the training one."""
    from scnet_fused.ops.bn_relu import affine_add_relu

    t, w, b, _ = _inputs((3, 6, 9, 7), channels_last=channels_last)
    res = _residual((3, 6, 9, 7))
    scale, shift = w * 0.7, b - 0.2
    expect = F.relu(t.double() * scale.double().view(1, -1, 1, 1) + shift.double().view(1, -1, 1, 1) + res.double())
    with backend(name), torch.no_grad():
        y = affine_add_relu(t, res, scale, shift)
        y_cl = affine_add_relu(t, res.contiguous(memory_format=torch.channels_last), scale, shift)
    for got in (y, y_cl):
        torch.testing.assert_close(got.double(), expect, rtol=1e-6, atol=1e-6)
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        assert got.is_contiguous(memory_format=fmt)
    with pytest.raises(RuntimeError, match="bn_add_relu_train"):
        affine_add_relu(t.requires_grad_(), res, scale, shift)
    with pytest.raises(ValueError, match="residual must have t's shape"):
        affine_add_relu(t.detach(), res[:, :3], scale, shift)
    with backend(name):
        torch.library.opcheck(torch.ops.scnet_fused.affine_add_relu.default, (t.detach(), res, scale, shift))


@pytest.mark.parametrize("name,autocast", [(n, False) for n in backends_here()] + [("auto", True)])
def test_bottleneck_inference_end_is_one_op(name, autocast, monkeypatch):
    """At inference (no grad, eval-mode BatchNorms) the bottleneck's bn3 + shortcut + ReLU run as one
    affine_add_relu call, bn3 folded into its constants (bn3 not called); the reference's output. Under
    bf16 autocast (conv3's output bf16, the shortcut float32) bn3 is folded into conv3's weights instead
    (still not called, and no affine_add_relu)."""
    torch.manual_seed(0)
    down = nn.Sequential(nn.Conv2d(32, 64, 1, stride=2, bias=False), nn.BatchNorm2d(64))
    ref = R.SCBottleneck(32, 16, stride=2, downsample=down, norm_layer=nn.BatchNorm2d)
    with torch.no_grad():
        for m in ref.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    ref.eval()
    fused = scnet_fused.convert(ref)
    x = torch.randn(8, 32, 14, 13)  # conv3's output at least 4x its weights: the fold's size rule
    called = []
    forward = nn.BatchNorm2d.forward

    def counting(self, *args):
        called.append(self)
        return forward(self, *args)

    monkeypatch.setattr(nn.BatchNorm2d, "forward", counting)  # the fused paths still see nn.BatchNorm2d's
    with torch.no_grad(), backend(name), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        expected = ref(x)
        called.clear()
        with torch.profiler.profile() as prof:
            got = fused(x)
    tol = dict(rtol=3e-2, atol=3e-2) if autocast else dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got, expected, **tol)
    calls = [e.name for e in prof.events()
             if e.name in ("scnet_fused::affine_add_relu", "scnet_fused::_affine_add_relu")]
    assert len(calls) == (0 if autocast else 1) and not any(m is fused.bn3 for m in called), calls
