"""The pooled branch's BatchNorm inside the gate kernels: sc_gate's ``small_scale`` / ``small_shift``
(an eval-mode fold) and sc_gate_bn2_train (batch statistics), on every backend here, and the modules'
use of them (k2's BatchNorm module no longer runs; results, gradients and running statistics as the
reference's)."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import scnet_fused
from scnet_fused import reference as R
from scnet_fused.ops import sc_gate, sc_gate_bn2_train

from _util import backends_here, eager_gate, randn, randomize_norms

BACKENDS = backends_here()

# (N, C, H, W, h, w): irregular maps, a 1x1 pooled map, h != w.
SHAPES = [(3, 5, 14, 13, 3, 3), (2, 12, 5, 5, 1, 1), (3, 4, 13, 14, 3, 7)]


def _inputs(shape, dtype=torch.float32, channels_last=False):
    N, C, H, W, h, w = shape
    x = randn(N, C, H, W, channels_last=channels_last, dtype=dtype, requires_grad=True)
    small = randn(N, C, h, w, dtype=dtype, requires_grad=True, scale=1.5, shift=0.4)
    k3 = randn(N, C, H, W, channels_last=channels_last, dtype=dtype, requires_grad=True, shift=0.3)
    return x, small, k3


def _params(C, n):
    g = torch.Generator().manual_seed(C + n)
    out = []
    for _ in range(n // 2):
        out.append((torch.rand(C, generator=g) + 0.5).requires_grad_())
        out.append((torch.randn(C, generator=g) * 0.5).requires_grad_())
    return out


def _eager_bn2(x, small, k3, w, b, w2, b2, eps=1e-5, eps2=1e-3):
    return eager_gate(x, F.batch_norm(small, None, None, w2, b2, True, 0.0, eps2),
                      F.batch_norm(k3, None, None, w, b, True, 0.0, eps))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_gate_small_affine_matches_eager(backend, shape, channels_last):
    x, small, k3 = _inputs(shape, channels_last=channels_last)
    scale, shift, ss, st = _params(shape[1], 4)
    ref = eager_gate(x, small * ss.view(1, -1, 1, 1) + st.view(1, -1, 1, 1),
                     k3 * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1))
    inputs = (x, small, k3, scale, shift, ss, st)
    g = torch.randn_like(ref)
    with scnet_fused.backend(backend):
        out = sc_gate(*inputs)
        got = torch.autograd.grad(out, inputs, g)
        only_ss = sc_gate(x, small, k3, None, None, ss, None)  # a missing one: 1 or 0
    torch.testing.assert_close(out, ref)
    for name, a, b in zip(("x", "small", "k3", "scale", "shift", "small_scale", "small_shift"), got,
                          torch.autograd.grad(ref, inputs, g)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=lambda m: f"{name}: {m}")
    torch.testing.assert_close(only_ss, eager_gate(x, small * ss.view(1, -1, 1, 1), k3))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_gate_bn2_train_matches_eager(backend, shape, channels_last):
    x, small, k3 = _inputs(shape, channels_last=channels_last)
    w, b, w2, b2 = _params(shape[1], 4)
    ref = _eager_bn2(x, small, k3, w, b, w2, b2)
    inputs = (x, small, k3, w, b, w2, b2)
    g = torch.randn_like(ref)
    with scnet_fused.backend(backend):
        out, mean, var, mean2, var2 = sc_gate_bn2_train(x, small, k3, w, b, 1e-5, w2, b2, 1e-3)
        got = torch.autograd.grad(out, inputs, g)
    torch.testing.assert_close(out, ref)
    if channels_last and shape[1] > 1:
        assert out.is_contiguous(memory_format=torch.channels_last)
    for t, s in ((k3, (mean, var)), (small, (mean2, var2))):
        v, m = torch.var_mean(t.detach(), dim=(0, 2, 3), unbiased=False)
        torch.testing.assert_close(s[0], m)
        torch.testing.assert_close(s[1], v)
        assert s[0].dtype == s[1].dtype == torch.float32 and not s[0].requires_grad
    for name, a, b_ in zip(("x", "small", "k3", "weight", "bias", "small_weight", "small_bias"), got,
                           torch.autograd.grad(ref, inputs, g)):
        torch.testing.assert_close(a, b_, rtol=1e-4, atol=1e-4, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("half_params", [False, True], ids=["float32_params", "half_params"])
def test_gate_bn2_train_low_precision(backend, dtype, half_params):
    """Half-precision inputs, with float32 BatchNorm parameters (autocast) or half-precision ones (a model
    converted with .bfloat16()): within the storage type's rounding of the float64 result."""
    x, small, k3 = _inputs(SHAPES[0], dtype=dtype)
    w, b, w2, b2 = (t.detach().to(dtype if half_params else torch.float32).requires_grad_()
                    for t in _params(SHAPES[0][1], 4))
    inputs = (x, small, k3, w, b, w2, b2)
    g = torch.randn(x.shape, dtype=dtype)
    with scnet_fused.backend(backend):
        out, *_ = sc_gate_bn2_train(x, small, k3, w, b, 1e-5, w2, b2, 1e-3)
        got = torch.autograd.grad(out, inputs, g)
    a64 = [t.detach().double().requires_grad_() for t in inputs]
    ref = _eager_bn2(*a64)
    want = torch.autograd.grad(ref, a64, g.double())
    assert out.dtype == dtype
    tol = dict(rtol=3e-2, atol=3e-2)
    torch.testing.assert_close(out.double(), ref, **tol)
    for name, a, t, e in zip(("x", "small", "k3", "weight", "bias", "small_weight", "small_bias"), got, inputs,
                             want):
        assert a.dtype == t.dtype, name
        scale = max(1.0, e.abs().max().item())
        torch.testing.assert_close(a.double() / scale, e / scale, **tol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cpp_autograd", ["1", "0"])
def test_gate_bn2_train_one_image_small_with_an_unused_batch_stride(backend, cpp_autograd, monkeypatch):
    """A 1-image channels_last pooled map whose (size-1, never used) batch stride is not C*h*w is a legal
    tensor: the same results and gradients as its NCHW copy. ATen's CPU BatchNorm backward misreads such
    an input beside an NCHW gradient (the pooled map's gradient was off by 3.8 on values of 3.3 through
    the C++ autograd op, which passed the user's tensor to it)."""
    monkeypatch.setenv("SCNET_FUSED_CPP_AUTOGRAD", cpp_autograd)
    torch.manual_seed(0)
    C, H, W = 8, 12, 12
    x, k3 = torch.randn(1, C, H, W), torch.randn(1, C, H, W)
    w, b, sw, sb = torch.rand(C) + 0.5, torch.randn(C), torch.rand(C) + 0.5, torch.randn(C)
    values = torch.randn(1, C, 3, 3)
    odd = torch.empty(200).as_strided((1, C, 3, 3), (7, 1, 3 * C, C))
    odd.copy_(values)
    assert odd.is_contiguous(memory_format=torch.channels_last) and odd.stride(0) != 9 * C
    dy = torch.randn(1, C, H, W)
    runs = []
    for small in (values, odd):
        leaves = [small.detach().requires_grad_(), sw.clone().requires_grad_(), sb.clone().requires_grad_()]
        with scnet_fused.backend(backend):
            y = sc_gate_bn2_train(x, leaves[0], k3, w, b, 1e-5, leaves[1], leaves[2], 1e-5)[0]
        runs.append((y.detach(),) + torch.autograd.grad(y, leaves, dy))
    for want, got in zip(*runs):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_gate_bn2_train_input_errors():
    x, small, k3 = _inputs(SHAPES[0])
    w, b, w2, b2 = _params(SHAPES[0][1], 4)
    with pytest.raises(ValueError, match="^sc_gate_bn2_train: small_weight must be a 1-D tensor of C=5"):
        sc_gate_bn2_train(x, small, k3, w, b, 1e-5, w2[:3], b2, 1e-5)
    with pytest.raises(ValueError, match="^sc_gate_bn_train: weight must be a 1-D tensor of C=5"):
        scnet_fused.sc_gate_bn_train(x, small, k3, w[:2], b)
    with pytest.raises(TypeError, match="^sc_gate_bn2_train: x, small and k3 must share one dtype"):
        sc_gate_bn2_train(x, small.double(), k3, w, b, 1e-5, w2, b2, 1e-5)
    with pytest.raises(ValueError, match="small_weight and small_bias are required"):
        sc_gate_bn2_train(x, small, k3, w, b, 1e-5, None, b2, 1e-5)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        sc_gate_bn2_train(x[:1], small[:1, :, :1, :1], k3[:1], w, b, 1e-5, w2, b2, 1e-5)
    with pytest.raises(ValueError, match="small_scale must be a 1-D tensor of C=5"):
        sc_gate(x, small, k3, None, None, w2[:2], b2)


def test_gradcheck_float64():
    x, small, k3 = (t.double().detach().requires_grad_() for t in _inputs((2, 3, 7, 6, 2, 2)))
    p = [t.double().detach().requires_grad_() for t in _params(3, 4)]
    assert torch.autograd.gradcheck(lambda *a: sc_gate(*a), (x, small, k3, *p))
    assert torch.autograd.gradcheck(lambda x, s, k, w, b, w2, b2: sc_gate_bn2_train(x, s, k, w, b, 1e-5, w2, b2,
                                                                                    1e-3)[0], (x, small, k3, *p))


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    x, small, k3 = _inputs(SHAPES[0])
    p = _params(SHAPES[0][1], 4)
    with scnet_fused.backend(backend):
        torch.library.opcheck(torch.ops.scnet_fused.sc_gate.default, (x, small, k3, *p))
        torch.library.opcheck(torch.ops.scnet_fused.sc_gate.default, (x, small, k3, None, None, p[0], None))
        args = (x, small, k3, p[0], p[1], 1e-5, p[2], p[3], 1e-3)
        torch.library.opcheck(torch.ops.scnet_fused.sc_gate_bn2_train.default, args)
        torch.library.opcheck(torch.ops.scnet_fused.sc_gate_bn2_train.default,
                              tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args))


# ------------------------------------------------------------------------------------------------
# The modules
# ------------------------------------------------------------------------------------------------


def _pair(C, stride=1, groups=1):
    torch.manual_seed(0)
    ref = R.SCConv(C, C, stride, 1, 1, groups, 4, nn.BatchNorm2d)
    randomize_norms(ref)
    return ref, scnet_fused.convert(ref)


def _count_bn_calls(monkeypatch):
    calls = []
    forward = nn.BatchNorm2d.forward

    def counting(self, *args, **kwargs):
        calls.append(self)
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(nn.BatchNorm2d, "forward", counting)
    return calls


def _compare_step(ref, fused, x, rtol=1e-4, atol=1e-4):
    xr, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_r, out_f = ref(xr), fused(xf)
    torch.testing.assert_close(out_f, out_r, rtol=rtol, atol=atol)
    g = torch.randn_like(out_r)
    names = [n for n, _ in ref.named_parameters()]
    pr, pf = dict(ref.named_parameters()), dict(fused.named_parameters())
    gr = torch.autograd.grad(out_r, [xr] + [pr[n] for n in names], g)
    gf = torch.autograd.grad(out_f, [xf] + [pf[n] for n in names], g)
    for name, a, b in zip(["input"] + names, gf, gr):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m: f"grad {name}: {m}")
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(fused.state_dict()[k], v, rtol=1e-5, atol=1e-6, msg=lambda m: f"{k}: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("channels_last", [False, True])
def test_scconv_runs_k2_batchnorm_inside_the_gate(backend, channels_last, monkeypatch):
    """Training (three steps: outputs, every gradient, both running statistics and num_batches_tracked),
    eval with gradients and inference: k2's BatchNorm module never runs, the results are the
    reference's."""
    ref, fused = _pair(6)
    calls = _count_bn_calls(monkeypatch)
    x = torch.randn(3, 6, 14, 13)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with scnet_fused.backend(backend):
        for mode in ("train", "train", "train", "eval"):
            ref.train(mode == "train"), fused.train(mode == "train")
            calls.clear()
            _compare_step(ref, fused, x)
            assert any(m is ref.k2[2] for m in calls)
            assert not any(m is fused.k2[2] for m in calls), mode
        for n in (1, 3):  # inference, also where the conv + BN fold would not pay
            calls.clear()
            with torch.no_grad():
                torch.testing.assert_close(fused(x[:n]), ref(x[:n]), rtol=1e-4, atol=1e-5)
            assert not any(m is fused.k2[2] for m in calls)
    assert int(fused.k2[2].num_batches_tracked) == 3


def test_scconv_fuse_k2_norm_off_runs_the_module(monkeypatch):
    """``fuse_k2_norm = False``: k2's BatchNorm runs as the module, with the reference's results."""
    ref, fused = _pair(6)
    fused.fuse_k2_norm = False
    calls = _count_bn_calls(monkeypatch)
    x = torch.randn(2, 6, 13, 14)
    for mode in (True, False):
        ref.train(mode), fused.train(mode)
        calls.clear()
        _compare_step(ref, fused, x)
        assert any(m is fused.k2[2] for m in calls)


@pytest.mark.parametrize("backend", BACKENDS)
def test_scconv_bfloat16_model_trains_like_the_reference(backend):
    """A whole SCConv in bfloat16 (parameters too): outputs, gradients and running statistics within
    twice the bfloat16 reference's error against a float64 reference, plus rounding."""
    ref, _ = _pair(6)
    ref64 = copy.deepcopy(ref).double().train()
    ref16 = copy.deepcopy(ref).bfloat16().train()
    fused16 = scnet_fused.convert(copy.deepcopy(ref)).bfloat16().train()
    x = torch.randn(3, 6, 14, 13)
    g = torch.randn(3, 6, 14, 13)
    results = []
    with scnet_fused.backend(backend):
        for m, dtype in ((ref64, torch.float64), (ref16, torch.bfloat16), (fused16, torch.bfloat16)):
            xi = x.to(dtype).requires_grad_()
            out = m(xi)
            grads = torch.autograd.grad(out, [xi] + list(m.parameters()), g.to(dtype))
            results.append([out] + list(grads) + [m.k2[2].running_mean, m.k2[2].running_var])
    for i, (r, e, f) in enumerate(zip(*results)):
        err_eager = (e.double() - r).abs().max().item()
        err = (f.double() - r).abs().max().item()
        assert f.dtype == torch.bfloat16
        assert err <= 2 * err_eager + 1e-2 * max(1.0, r.abs().max().item()), (i, err, err_eager)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("frozen", ["k2", "k3"])
def test_scconv_mixed_batchnorm_modes(backend, frozen):
    """One of the two BatchNorms in eval mode, the other training: k2's norm runs as the module where
    the gate cannot take it; the results are the reference's either way."""
    ref, fused = _pair(6)
    x = torch.randn(2, 6, 13, 14)
    with scnet_fused.backend(backend):
        for m in (ref, fused):
            m.train()
            getattr(m, frozen)[-1 if frozen == "k2" else 1].eval()
        _compare_step(ref, fused, x)
        _compare_step(ref, fused, x)


def test_scconv_one_pooled_value_per_channel_in_training():
    """N = 1 with a 1x1 pooled map: BatchNorm2d's own error in training, as the reference's."""
    ref, fused = _pair(4)
    x = torch.randn(1, 4, 7, 7)
    with pytest.raises(ValueError, match="more than 1 value per channel") as want:
        ref.train()(x)
    with pytest.raises(ValueError, match="more than 1 value per channel") as got:
        fused.train()(x)
    assert str(got.value) == str(want.value)
    torch.testing.assert_close(fused.eval()(x), ref.eval()(x), rtol=1e-4, atol=1e-5)


def test_scconv_k2_batchnorm_without_affine_or_running_stats():
    """k2's BatchNorm with affine=False, momentum=None and track_running_stats=False (batch statistics in
    eval too): the gate applies it, as the reference's."""
    ref, fused = _pair(6)
    for m in (ref, fused):
        m.k2[2] = nn.BatchNorm2d(6, affine=False, momentum=None)
    fused.k2[2].load_state_dict(ref.k2[2].state_dict())
    x = torch.randn(2, 6, 13, 14)
    for mode in (True, True, False):
        ref.train(mode), fused.train(mode)
        _compare_step(ref, fused, x)
    ref2, fused2 = copy.deepcopy(ref), copy.deepcopy(fused)
    for m in (ref2, fused2):
        m.k2[2] = nn.BatchNorm2d(6, track_running_stats=False)
        m.eval()
    _compare_step(ref2, fused2, x)


@pytest.mark.parametrize("momentum", [0.1, None])
def test_scconv_k2_and_k3_sharing_one_batchnorm(momentum):
    """One BatchNorm module as k2's and k3's norm: its running statistics take k2's batch, then k3's, as
    in the reference (the counter bumped before each), over training steps and an eval step."""
    torch.manual_seed(0)
    ref = R.SCConv(6, 6, 1, 1, 1, 1, 4, nn.BatchNorm2d)
    randomize_norms(ref)
    ref.k3[1].momentum = momentum
    ref.k2[2] = ref.k3[1]
    fused = scnet_fused.convert(ref)
    assert fused.k2[2] is fused.k3[1] and fused.k3[1] is not ref.k3[1]
    x = torch.randn(2, 6, 13, 14)
    for mode in (True, True, False):
        ref.train(mode), fused.train(mode)
        _compare_step(ref, fused, x)
    assert int(fused.k3[1].num_batches_tracked) == 4
