"""1x1 convolutions of channels_last float32 CPU maps as matrix products (``scnet_fused.ops.conv1x1``):
the rule that takes them, the products inside ``_ParamConv`` against float64 ``F.conv2d`` (outputs,
both gradients, second derivatives), and the fused bottleneck with them forced on against the
reference and against oneDNN."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import scnet_fused
from scnet_fused import modules
from scnet_fused import reference as R
from scnet_fused.ops import conv1x1

CL = torch.channels_last


@pytest.fixture
def gemm():
    previous = conv1x1.set_conv1x1("gemm")
    yield
    conv1x1.set_conv1x1(previous)


@pytest.fixture
def calls(monkeypatch):
    """Counts of conv1x1.forward / conv1x1.backward calls."""
    seen = {"forward": 0, "backward": 0}
    for name in seen:
        fn = getattr(conv1x1, name)

        def counted(*args, _fn=fn, _name=name, **kwargs):
            seen[_name] += 1
            return _fn(*args, **kwargs)

        monkeypatch.setattr(conv1x1, name, counted)
    return seen


def _x(N=2, C=8, H=5, W=6, dtype=torch.float32, fmt=CL):
    return torch.randn(N, C, H, W, dtype=dtype).contiguous(memory_format=fmt)


def _w(K=6, C=8, k=1, dtype=torch.float32):
    return torch.randn(K, C, k, k, dtype=dtype)


# ---------------------------------------------------------------------------------------------
# The rule
# ---------------------------------------------------------------------------------------------


def test_takes_a_channels_last_float32_map(gemm):
    assert conv1x1.gemm_applies(_x(), (_w(),), 1, 0, 1, 1)
    assert conv1x1.gemm_applies(_x(), (_w(4), _w(3)), (1, 1), (0, 0), (1, 1), 1)  # stacked
    assert conv1x1.gemm_applies(_x(H=9, W=9)[:, :, ::2, ::2], (_w(),), 1, 0, 1, 1)  # subsampled view
    assert conv1x1.gemm_applies(_x(H=1, W=1, fmt=torch.contiguous_format), (_w(),), 1, 0, 1, 1)


@pytest.mark.parametrize("case", [
    "nchw", "float64", "bfloat16", "weight_float64", "3x3", "stride", "padding", "dilation", "groups",
    "empty_batch", "channels", "meta"])
def test_rule_leaves_the_rest_to_onednn(gemm, case):
    x, w, args = _x(), _w(), [1, 0, 1, 1]
    if case == "nchw":
        x = _x(fmt=torch.contiguous_format)
    elif case == "float64":
        x, w = _x(dtype=torch.float64), _w(dtype=torch.float64)
    elif case == "bfloat16":
        x, w = x.bfloat16(), w.bfloat16()
    elif case == "weight_float64":
        w = w.double()
    elif case == "3x3":
        w = _w(k=3)
    elif case == "stride":
        args[0] = 2
    elif case == "padding":
        args[1] = 1
    elif case == "dilation":
        args[2] = 2
    elif case == "groups":
        args[3] = 2
    elif case == "empty_batch":
        x = _x(N=0)
    elif case == "channels":
        w = _w(C=4)
    elif case == "meta":
        x = x.to("meta")
    assert not conv1x1.gemm_applies(x, (w,), *args)


def test_settings(monkeypatch):
    previous = conv1x1.set_conv1x1("onednn")
    try:
        assert not conv1x1.gemm_applies(_x(), (_w(),), 1, 0, 1, 1)
        conv1x1.set_conv1x1("auto")
        wide, narrow = _x(C=128), _x(C=64)
        for intel in (True, False):
            monkeypatch.setattr(conv1x1, "_intel", intel)
            assert conv1x1.gemm_applies(wide, (_w(64, 128), _w(64, 128)), 1, 0, 1, 1) == intel
            assert not conv1x1.gemm_applies(wide, (_w(64, 128),), 1, 0, 1, 1)  # 64 output channels
            assert not conv1x1.gemm_applies(narrow, (_w(256, 64),), 1, 0, 1, 1)  # 64 input channels
        with pytest.raises(ValueError, match="set_conv1x1"):
            conv1x1.set_conv1x1("cudnn")
        assert conv1x1.get_conv1x1() == "auto"
        monkeypatch.setenv("SCNET_FUSED_CONV1X1", "fast")
        with pytest.raises(ValueError, match="SCNET_FUSED_CONV1X1"):
            conv1x1._env_mode()
        monkeypatch.setenv("SCNET_FUSED_CONV1X1", " GEMM ")
        assert conv1x1._env_mode() == "gemm"
    finally:
        conv1x1.set_conv1x1(previous)
    assert scnet_fused.set_conv1x1 is conv1x1.set_conv1x1


def test_not_under_torch_func(gemm):
    x, w = _x(), _w()
    seen = []
    torch.func.grad(lambda t: seen.append(conv1x1.gemm_applies(t, (w,), 1, 0, 1, 1)) or t.sum())(x)
    assert seen == [False]


# ---------------------------------------------------------------------------------------------
# The products inside _ParamConv
# ---------------------------------------------------------------------------------------------


def _param_conv(x, weights):
    return modules._ParamConv.apply(x, (1, 1), (0, 0), (1, 1), 1, *weights)


@pytest.mark.parametrize("n_weights", [1, 2])
@pytest.mark.parametrize("grad_layout", ["channels_last", "contiguous", "expanded"])
@pytest.mark.parametrize("subsampled", [False, True])
def test_matches_float64(gemm, calls, n_weights, grad_layout, subsampled):
    base = _x(N=3, C=8, H=9, W=7, dtype=torch.float64)
    ws = [_w(K, 8, dtype=torch.float64) for K in (5, 4)[:n_weights]]
    x64 = base.clone().requires_grad_()
    w64 = [w.clone().requires_grad_() for w in ws]
    xf = base.float().contiguous(memory_format=CL).requires_grad_()
    wf = [w.float().requires_grad_() for w in ws]
    inp64, inpf = (x64[:, :, ::2, ::2], xf[:, :, ::2, ::2]) if subsampled else (x64, xf)
    y64 = F.conv2d(inp64, torch.cat(w64))
    yf = _param_conv(inpf, wf)
    assert calls["forward"] == 1 and yf.is_contiguous(memory_format=CL)
    torch.testing.assert_close(yf.double(), y64, rtol=1e-5, atol=1e-5)
    if grad_layout == "expanded":
        gf = torch.randn(1, 1, 1, 1).expand_as(yf)
    else:
        fmt = CL if grad_layout == "channels_last" else torch.contiguous_format
        gf = torch.randn(yf.shape).contiguous(memory_format=fmt)
    yf.backward(gf)
    y64.backward(gf.double())
    assert calls["backward"] == 1
    torch.testing.assert_close(xf.grad.double(), x64.grad, rtol=1e-5, atol=1e-5)
    for a, b in zip(wf, w64):
        torch.testing.assert_close(a.grad.double(), b.grad, rtol=1e-5, atol=1e-4)


def test_only_the_gradients_asked_for(gemm, calls):
    x, w = _x().requires_grad_(), _w()
    y = _param_conv(x, [w])
    (dx,) = torch.autograd.grad(y, x, torch.ones_like(y))
    torch.testing.assert_close(dx, F.conv_transpose2d(torch.ones_like(y), w), rtol=1e-5, atol=1e-5)
    x2, w2 = _x(), _w().requires_grad_()
    (dw,) = torch.autograd.grad(_param_conv(x2, [w2]).sum(), w2)
    torch.testing.assert_close(dw, x2.sum((0, 2, 3)).view(1, -1, 1, 1).expand_as(w2), rtol=1e-5, atol=1e-4)
    assert calls["backward"] == 2


def test_second_derivatives(gemm, calls):
    """Under create_graph the backward is ATen's convolution backward (differentiable): a gradient
    penalty through the products gives float64 F.conv2d's second derivatives."""
    base, wb = _x(N=2, C=6, H=4, W=5, dtype=torch.float64), _w(3, 6, dtype=torch.float64)
    results = []
    for dtype, conv in ((torch.float32, lambda x, w: _param_conv(x, [w])), (torch.float64, F.conv2d)):
        x = base.to(dtype).contiguous(memory_format=CL).requires_grad_()
        w = wb.to(dtype).requires_grad_()
        y = conv(x, w)
        gx, gw = torch.autograd.grad(y.square().sum(), (x, w), create_graph=True)
        results.append(torch.autograd.grad(gx.square().sum() + gw.square().sum(), (x, w)))
    # the create_graph backward is ATen's; the second backward's path through y (the penalty's
    # upstream gradient 2y depends on it) is a first-order backward of the products
    assert calls["forward"] == 1 and calls["backward"] == 1
    for a, b in zip(*results):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# The fused bottleneck
# ---------------------------------------------------------------------------------------------


def _bottleneck(stride):
    inplanes = 64 if stride == 1 else 32
    down = None if stride == 1 else nn.Sequential(nn.Conv2d(inplanes, 64, 1, stride, bias=False), nn.BatchNorm2d(64))
    return R.SCBottleneck(inplanes, 16, stride=stride, downsample=down)


def _train_run(m, x, steps=2):
    x = x.clone().requires_grad_()
    for _ in range(steps):
        y = m(x)
        y.square().mean().backward()
    return y.detach(), x.grad, [p.grad for p in m.parameters()], [b.clone() for b in m.buffers()]


@pytest.mark.parametrize("stride", [1, 2])
def test_bottleneck_channels_last_training(gemm, calls, stride):
    """conv1 (both branches stacked), conv3 and the strided downsample through the products: the
    training steps agree with the float64 reference (outputs, input and parameter gradients, running
    statistics) as closely as with oneDNN's convolutions."""
    ref = _bottleneck(stride).double().to(memory_format=CL)
    fused = scnet_fused.convert(copy.deepcopy(ref)).float()
    fused_onednn = copy.deepcopy(fused)
    x = torch.randn(4, ref.conv1_a.in_channels, 12, 12, dtype=torch.float64).contiguous(memory_format=CL)
    want = _train_run(ref, x)
    got = _train_run(fused, x.float().contiguous(memory_format=CL))
    n_fwd = calls["forward"]
    assert n_fwd == 2 * (3 if stride == 2 else 2) and calls["backward"] == n_fwd
    previous = conv1x1.set_conv1x1("onednn")
    try:
        other = _train_run(fused_onednn, x.float().contiguous(memory_format=CL))
    finally:
        conv1x1.set_conv1x1(previous)
    assert calls["forward"] == n_fwd  # oneDNN: no product
    assert got[0].is_contiguous(memory_format=CL)

    def err(a, b):
        return ((a.double() - b).norm() / b.norm()).item()

    for g, o, w in zip(got[2], other[2], want[2]):
        assert err(g, w) < max(3 * err(o, w), 1e-5)
    for a, b in ((got[0], want[0]), (got[1], want[1])):
        assert err(a, b) < 1e-5
    for g, w in zip(got[3], want[3]):
        torch.testing.assert_close(g.to(w.dtype), w, rtol=1e-5, atol=1e-6)  # (num_batches_tracked: int64)


def test_nchw_bottleneck_keeps_onednn(gemm, calls):
    m = scnet_fused.convert(_bottleneck(2))
    m(torch.randn(2, 32, 8, 8, requires_grad=True)).sum().backward()
    assert calls["forward"] == 0 and calls["backward"] == 0


def test_hooked_conv3_runs_as_the_module(gemm, calls):
    m = scnet_fused.convert(_bottleneck(1)).to(memory_format=CL)
    seen = []
    m.conv3.register_forward_hook(lambda mod, args, out: seen.append(out.shape))
    y = m(torch.randn(2, 64, 6, 6).contiguous(memory_format=CL).requires_grad_())
    assert seen == [y.shape]
    assert calls["forward"] == 1  # conv1 only


def test_inference_unchanged(gemm, calls):
    m = scnet_fused.convert(_bottleneck(2)).to(memory_format=CL).eval()
    with torch.no_grad():
        m(torch.randn(2, 32, 8, 8).contiguous(memory_format=CL))
    assert calls["forward"] == 0
