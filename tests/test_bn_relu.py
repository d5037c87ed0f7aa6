"""bn_relu_train: training-mode BatchNorm + ReLU fused, against F.batch_norm + relu in float64."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import scnet_fused
from scnet_fused import reference as R
from scnet_fused.ops import backend
from scnet_fused.ops.bn_relu import bn_relu_train

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
@pytest.mark.parametrize("channels_last", [False, True])
def test_bottleneck_runs_it_in_training(name, channels_last):
    """The fused bottleneck's conv1_a / conv1_b BatchNorm + ReLU run as the fused op in training; same
    outputs, gradients and running statistics as the reference over two steps, then eval."""
    torch.manual_seed(0)
    ref = R.SCBottleneck(128, 32, norm_layer=nn.BatchNorm2d, downsample=None)
    ref.bn1_a.momentum = None  # cumulative average for one of them
    fused = scnet_fused.convert(ref)
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
            assert len(calls) == 2, calls
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(fused.state_dict()[k], v, rtol=1e-5, atol=1e-6, msg=lambda m: f"{k}: {m}")
    assert int(fused.bn1_a.num_batches_tracked) == 2
