"""Second derivatives (``create_graph=True``: gradient penalties, Hessian-vector products) through the
fused ops and modules. A backward run with create_graph recomputes the op in standard operators and
differentiates that (scnet_fused/ops/_double.py); checked here on both eager paths (the torch.library
ops and the C++ autograd ops) against the same derivatives of the standard-operator forms in float64,
by gradgradcheck in float64, and for the whole SCConv, bottleneck and a small SCNet against the
reference (float64: to rounding; float32: as close to float64 as the float32 reference is)."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import scnet_fused
from scnet_fused import models
from scnet_fused import reference as R
from scnet_fused.ops import _cpp, _dispatch, _plain, sc_avgpool
from scnet_fused.ops.bn_relu import bn_add_relu_train, bn_relu_cat_train, bn_relu_train
from scnet_fused.ops.relu_cat import relu_cat
from scnet_fused.ops.sc_gate import sc_gate, sc_gate_bn2_train, sc_gate_bn_train

from _util import randomize_norms

PATHS = ["library"] + (["cpp"] if _cpp.has_glue_ops() else [])


def _path(monkeypatch, path):
    monkeypatch.setenv("SCNET_FUSED_CPP_AUTOGRAD", "1" if path == "cpp" else "0")


def _inputs(dtype, seed=0, n=2, c=3, size=(9, 7)):
    """x, small, k3 of a map pooled by 3 (9x7 to 3x2: the irregular nearest map), and four per-channel
    vectors."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, *size, generator=g)
    small = torch.randn(n, c, size[0] // 3, size[1] // 3, generator=g)
    k3 = torch.randn(n, c, *size, generator=g)
    vecs = [torch.rand(c, generator=g) + 0.5, torch.randn(c, generator=g), torch.rand(c, generator=g) + 0.5,
            torch.randn(c, generator=g)]
    return [t.to(dtype).requires_grad_() for t in (x, small, k3, *vecs)]


# name -> (fused op, its standard-operator form), both called as f(x, small, k3, w, b, w2, b2)
OPS = {
    "sc_gate": (lambda *a: sc_gate(*a), lambda *a: _plain.sc_gate(*a)),
    "sc_gate_no_affine": (lambda x, s, k, *_: sc_gate(x, s, k), lambda x, s, k, *_: _plain.sc_gate(x, s, k, None, None)),
    "sc_gate_bn_train": (lambda x, s, k, w, b, *_: sc_gate_bn_train(x, s, k, w, b, 1e-5)[0],
                         lambda x, s, k, w, b, *_: _plain.sc_gate_bn_train(x, s, k, w, b, 1e-5)[0]),
    "sc_gate_bn2_train": (lambda x, s, k, w, b, w2, b2: sc_gate_bn2_train(x, s, k, w, b, 1e-5, w2, b2, 1e-5)[0],
                          lambda x, s, k, w, b, w2, b2: _plain.sc_gate_bn2_train(x, s, k, w, b, 1e-5, w2, b2,
                                                                                  1e-5)[0]),
    "bn_relu_train": (lambda x, s, k, w, b, *_: bn_relu_train(k, w, b)[0],
                      lambda x, s, k, w, b, *_: _plain.bn_relu_train(k, w, b, 1e-5)[0]),
    "bn_add_relu_train": (lambda x, s, k, w, b, *_: bn_add_relu_train(k, w, b, x)[0],
                          lambda x, s, k, w, b, *_: _plain.bn_add_relu_train(k, w, b, x, 1e-5)[0]),
    "bn_relu_cat_train": (lambda x, s, k, w, b, w2, b2: bn_relu_cat_train(k, w, b, x, w2, b2)[0],
                          lambda x, s, k, w, b, w2, b2: _plain.bn_relu_cat_train(k, w, b, x, w2, b2, 1e-5, 1e-5)[0]),
    "relu_cat": (lambda x, s, k, *_: relu_cat(k, x), lambda x, s, k, *_: _plain.relu_cat(k, x)),
    # the modules' BatchNorm without activation (C++ only: SCConv's k4 norm on float32 CPU tensors)
    "bn_train": (lambda x, s, k, w, b, *_: torch.ops.scnet_fused._bn_train_ag(k, w, b, 1e-5)[0],
                 lambda x, s, k, w, b, *_: F.batch_norm(k, None, None, w, b, True, 0.0, 1e-5)),
    "sc_avgpool": (lambda x, *_: sc_avgpool(x, 3), lambda x, *_: _plain.sc_avgpool(x, 3)),
}


def _second(fn, inputs, seed=1):
    """(first, second): the gradients of sum(f * w1) with create_graph, then the gradients of
    sum over them of (gradient * w2) with respect to the inputs and to w1 (the upstream gradient: the
    first derivative is linear in it), for random w1, w2 (None where unused)."""
    out = fn(*inputs)
    g = torch.Generator().manual_seed(seed)
    w1 = torch.randn(out.shape, generator=g).to(out.dtype).requires_grad_()
    first = torch.autograd.grad((out * w1).sum(), inputs, create_graph=True, allow_unused=True)
    total = sum((f * torch.randn(f.shape, generator=g).to(f.dtype)).sum() for f in first if f is not None)
    second = torch.autograd.grad(total, list(inputs) + [w1], allow_unused=True)
    return first, second


def _close(got, want, rtol, what):
    """got close to want (float64), a missing gradient (None) counting as zeros."""
    if got is None and want is None:
        return
    if got is None:
        got = torch.zeros_like(want)
    if want is None:
        want = torch.zeros_like(got, dtype=torch.float64)
    err = (got.double() - want).abs().max().item()
    assert err <= rtol * max(1.0, want.abs().max().item()), f"{what}: error {err:.3e}"


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("name", sorted(OPS))
def test_op_second_derivatives_match_standard_ops(monkeypatch, path, name):
    """float32 through the fused op against the standard-operator form in float64."""
    _path(monkeypatch, path)
    if name == "bn_train" and not _cpp.has_autograd_ops():
        pytest.skip("no compiled C++ autograd ops")
    fused, plain = OPS[name]
    ins32 = _inputs(torch.float32)
    if path == "cpp" and name not in ("sc_avgpool",):
        assert _dispatch.cpp_autograd(ins32[0]) or name in ("relu_cat", "bn_train")
    ins64 = [t.detach().double().requires_grad_() for t in ins32]
    first, second = _second(fused, ins32)
    first64, second64 = _second(plain, ins64)
    # the first derivatives with create_graph are the kernels' own ones (same bits as without)
    plain_first = torch.autograd.grad((fused(*ins32) * torch.randn(
        fused(*ins32).shape, generator=torch.Generator().manual_seed(1))).sum(), ins32, allow_unused=True)
    for i, (a, b, c) in enumerate(zip(first, first64, plain_first)):
        _close(a, b, 1e-4, f"{name} first derivative {i}")
        if a is not None:
            torch.testing.assert_close(a.detach(), c, rtol=1e-5, atol=1e-5)
    for i, (a, b) in enumerate(zip(second, second64)):
        _close(a, b, 1e-3, f"{name} second derivative {i}")
    assert second[-1] is not None  # the first derivative stays attached to the upstream gradient


@pytest.mark.parametrize("name", ["sc_gate", "sc_gate_bn2_train", "bn_add_relu_train", "bn_relu_cat_train"])
def test_op_gradgradcheck_float64(name):
    """Against finite differences (float64: the torch.library path)."""
    fused, _ = OPS[name]
    ins = _inputs(torch.float64, n=2, c=2, size=(7, 4))
    assert torch.autograd.gradgradcheck(fused, ins, atol=1e-5, rtol=1e-4)


def _sc_pair(train, C=6, stride=1, seed=0):
    torch.manual_seed(seed)
    ref = R.SCConv(C, C, stride, 1, 1, 1, 4, nn.BatchNorm2d)
    randomize_norms(ref)
    fused = scnet_fused.convert(copy.deepcopy(ref))
    ref.train(train), fused.train(train)
    return ref, fused


def _model_second(model, x, seed=1):
    """Gradient-penalty style: g = d sum(out * w) / dx with create_graph, then the gradients of
    sum(g^2) with respect to x and every parameter."""
    x = x.detach().clone().requires_grad_()
    out = model(x)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out.dtype)
    (g,) = torch.autograd.grad((out * w).sum(), x, create_graph=True)
    params = [p for p in model.parameters()]
    second = torch.autograd.grad(g.square().sum(), [x] + params, allow_unused=True)
    return g.detach(), second


def _compare_models(ref, fused, x, rtol_first, rtol_second):
    g_ref, s_ref = _model_second(ref, x)
    g_fus, s_fus = _model_second(fused, x)
    _close(g_fus, g_ref.double(), rtol_first, "first derivative")
    names = ["x"] + [n for n, _ in fused.named_parameters()]
    for n, a, b in zip(names, s_fus, s_ref):
        _close(a, None if b is None else b.double(), rtol_second, f"second derivative, {n}")


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape", [(2, 6, 9, 11), (2, 16, 64, 64)], ids=["small", "recomputed_gate"])
def test_scconv_second_derivatives_float64(train, shape):
    """float64: to rounding. 2x16x64x64 takes the path that recomputes the gate in k4's backward
    (RECOMPUTE_MIN_ELEMENTS): its weight gradient must depend on everything the gate does."""
    assert shape[0] * shape[1] * shape[2] * shape[3] >= scnet_fused.modules.RECOMPUTE_MIN_ELEMENTS or shape[1] == 6
    ref, fused = _sc_pair(train, C=shape[1])
    ref, fused = ref.double(), fused.double()
    x = torch.randn(*shape, dtype=torch.float64)
    _compare_models(ref, fused, x, 1e-10, 1e-9)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("algorithm", ["direct", "winograd"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_scconv_second_derivatives_float32(monkeypatch, path, algorithm, train):
    """float32 (the C++ kernels, either convolution) against the float64 reference, held to the float32
    reference's own distance from it (the batch statistics' second derivatives are sensitive)."""
    _path(monkeypatch, path)
    ref, fused = _sc_pair(train, C=16)
    x = torch.randn(2, 16, 64, 64)
    truth = copy.deepcopy(ref).double()
    g64, s64 = _model_second(truth, x.double())
    g32, s32 = _model_second(ref, x)
    prev = scnet_fused.set_conv_algorithm(algorithm)
    try:
        gf, sf = _model_second(fused, x)
    finally:
        scnet_fused.set_conv_algorithm(prev)
    _close(gf, g64, 1e-4, "first derivative")
    for i, (a, b, c) in enumerate(zip(sf, s64, s32)):
        if b is None:  # a parameter the first derivative does not depend on (k4's BatchNorm bias)
            assert c is None and (a is None or not a.any()), f"second derivative {i}"
            continue
        ref_err = (c.double() - b).abs().max().item() / max(1.0, b.abs().max().item())
        _close(a, b, 3 * ref_err + 1e-4, f"second derivative {i}")


def test_bottleneck_second_derivatives_float64():
    torch.manual_seed(0)
    down = nn.Sequential(nn.Conv2d(16, 32, 1, stride=2, bias=False), nn.BatchNorm2d(32))
    ref = R.SCBottleneck(16, 8, stride=2, downsample=down, norm_layer=nn.BatchNorm2d).double()
    fused = scnet_fused.convert(copy.deepcopy(ref))
    assert isinstance(fused, scnet_fused.SCBottleneck)
    x = torch.randn(2, 16, 12, 10, dtype=torch.float64)
    for train in (True, False):
        ref.train(train), fused.train(train)
        _compare_models(ref, fused, x, 1e-10, 1e-9)


def test_small_scnet_gradient_penalty_float64():
    """A small SCNet with a gradient penalty on its input, the fused model against the reference."""
    torch.manual_seed(0)
    ref = R.SCNet(R.SCBottleneck, layers=(1, 1, 1, 1), num_classes=5).double()
    fused = models.build("scnet50", layers=(1, 1, 1, 1), num_classes=5).double()
    fused.load_state_dict(ref.state_dict())
    x = torch.randn(2, 3, 128, 136, dtype=torch.float64)  # layer4's maps 4x5: at least the pooling rate
    _compare_models(ref.train(), fused.train(), x, 1e-10, 1e-8)


def test_parameter_convolution_under_autocast_twice_differentiable():
    """The modules' convolution that saves its parameters (``_param_conv``) under CPU autocast: the
    cast of x is recorded, so a second derivative reaches x through it, as through F.conv2d."""
    import torch.nn.functional as F

    from scnet_fused.modules import _param_conv

    torch.manual_seed(0)
    x = torch.randn(2, 8, 10, 10, requires_grad=True)
    w = torch.randn(6, 8, 3, 3, requires_grad=True)
    dy = torch.randn(2, 6, 10, 10)
    got = []
    for conv in (lambda: _param_conv(x, (w,), 1, 1, 1, 1), lambda: F.conv2d(x, w, None, 1, 1)):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = conv()
        assert y.dtype == torch.bfloat16
        (gw,) = torch.autograd.grad(y, w, dy.to(y.dtype), create_graph=True)
        got.append(torch.autograd.grad(gw.float().square().sum(), x)[0])
    torch.testing.assert_close(got[0], got[1], rtol=1e-2, atol=1e-2 * got[1].abs().max().item())


def test_scconv_second_derivatives_under_autocast():
    """bfloat16 autocast on the CPU: the fused SCConv's second derivatives as close to float64 as the
    reference's under the same autocast."""
    torch.manual_seed(0)
    ref, fused = _sc_pair(True, C=16)
    x = torch.randn(2, 16, 64, 64)
    res = []
    for m, dt in ((ref, torch.float32), (fused, torch.float32), (copy.deepcopy(ref).double(), torch.float64)):
        xi = x.to(dt).requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dt != torch.float64):
            out = m(xi)
        w = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.dtype)
        (g,) = torch.autograd.grad((out * w).sum(), xi, create_graph=True)
        res.append(torch.autograd.grad(g.float().square().sum(), [xi] + list(m.parameters()), allow_unused=True))
    names = ["x"] + [n for n, _ in fused.named_parameters()]
    for n, r, f, t in zip(names, *res):
        if t is None:  # k4's BatchNorm bias: the input gradient does not depend on it
            assert r is None and (f is None or not f.any()), n
            continue
        scale = t.abs().max().item()
        err_ref = (r.double() - t).abs().max().item() / scale
        err_fused = (f.double() - t).abs().max().item() / scale
        assert err_fused <= 3 * err_ref + 1e-3, f"{n}: fused {err_fused:.2e}, reference {err_ref:.2e}"


def test_unknown_op_is_a_clear_error():
    with pytest.raises(ValueError, match="no standard-operator form for 'nope'"):
        torch.ops.scnet_fused._double_vjp("nope", torch.ones(1), [torch.ones(1)], [])
