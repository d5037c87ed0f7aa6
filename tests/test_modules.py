"""Fused SCConv / SCBottleneck / SCNet against the reference: train and eval, every gradient,
running statistics, other norm layers, convert(), saved-for-backward bytes."""

import copy
import warnings
from unittest import mock

import pytest
import torch
from torch import nn

import scnet_fused
from scnet_fused import models, modules, reference as R

import published_style
from _util import backends_here, kink_perturbed, randomize_norms

BACKENDS = backends_here()
# the package's value (the suite's conftest sets the threshold to 0 for every test)
DEFAULT_RECOMPUTE_MIN_ELEMENTS = scnet_fused.modules.RECOMPUTE_MIN_ELEMENTS
DEFAULT_INFERENCE_MIN_ELEMENTS = (scnet_fused.modules.BOTTLENECK_INFERENCE_MIN_ELEMENTS,
                                  scnet_fused.modules.SCCONV_INFERENCE_MIN_ELEMENTS)


def _pair(ctor, *args, **kwargs):
    torch.manual_seed(0)
    ref = ctor(*args, **kwargs)
    fused = scnet_fused.convert(ref)
    return ref, fused


def _count_forward_calls(monkeypatch, cls):
    """The modules of class ``cls`` whose forward runs, in call order (the class's forward wrapped; the
    fused paths check ``type(m).forward`` and still recognise it)."""
    calls = []
    forward = cls.forward

    def counting(self, *args, **kwargs):
        calls.append(self)
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(cls, "forward", counting)
    return calls


def _called(calls, module):
    return any(m is module for m in calls)


def _step_and_compare(ref, fused, x, steps=2, rtol=1e-4, atol=1e-4):
    params_r = dict(ref.named_parameters())
    params_f = dict(fused.named_parameters())
    assert list(params_r) == list(params_f)
    for _ in range(steps):
        xr = x.clone().requires_grad_()
        xf = x.clone().requires_grad_()
        out_r, out_f = ref(xr), fused(xf)
        torch.testing.assert_close(out_f, out_r, rtol=rtol, atol=atol)
        g = torch.randn_like(out_r)
        names = list(params_r)
        gr = torch.autograd.grad(out_r, [xr] + [params_r[n] for n in names], g)
        gf = torch.autograd.grad(out_f, [xf] + [params_f[n] for n in names], g)
        for name, a, b in zip(["input"] + names, gf, gr):
            torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m: f"grad {name}: {m}")
    sr, sf = ref.state_dict(), fused.state_dict()
    assert list(sr) == list(sf)
    for k in sr:
        torch.testing.assert_close(sf[k], sr[k], rtol=1e-5, atol=1e-6, msg=lambda m: f"state {k}: {m}")


SC_CASES = [
    # (C, N, H, W, stride, dilation, groups)
    (6, 3, 14, 13, 1, 1, 1),
    (4, 1, 25, 7, 2, 1, 1),
    (6, 2, 5, 5, 1, 2, 2),
    (12, 3, 13, 14, 2, 1, 3),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", SC_CASES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_scconv_train_and_eval(backend, case, channels_last):
    C, N, H, W, stride, dil, groups = case
    ref, fused = _pair(R.SCConv, C, C, stride, dil, dil, groups, 4, nn.BatchNorm2d)
    randomize_norms(ref)
    fused.load_state_dict(ref.state_dict())
    x = torch.randn(N, C, H, W)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with scnet_fused.backend(backend):
        _step_and_compare(ref.train(), fused.train(), x, steps=2)
        _step_and_compare(ref.eval(), fused.eval(), x, steps=1)
    assert int(fused.k3[1].num_batches_tracked) == 2


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pooling_r,H,W", [(2, 13, 9), (3, 13, 14), (5, 25, 11), (1, 6, 5)])
def test_scconv_other_pooling_rates(backend, pooling_r, H, W):
    """pooling_r is read from the module, never assumed to be 4 (irregular maps for every rate)."""
    ref, fused = _pair(R.SCConv, 6, 6, 1, 1, 1, 2, pooling_r, nn.BatchNorm2d)
    randomize_norms(ref)
    fused.load_state_dict(ref.state_dict())
    x = torch.randn(2, 6, H, W)
    with scnet_fused.backend(backend):
        _step_and_compare(ref.train(), fused.train(), x, steps=1)
        _step_and_compare(ref.eval(), fused.eval(), x, steps=1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("channels_last", [False, True])
def test_scconv_inference_folds_k4_batchnorm(backend, channels_last, monkeypatch):
    """Under no_grad in eval mode k4's BatchNorm is folded into its convolution: same output."""
    ref, fused = _pair(R.SCConv, 12, 12, 2, 1, 1, 3, 4, nn.BatchNorm2d)
    randomize_norms(ref)
    fused.load_state_dict(ref.state_dict())
    ref.eval(), fused.eval()
    calls = _count_forward_calls(monkeypatch, nn.BatchNorm2d)
    for n, folded in ((8, True), (1, False)):  # one image: re-scaling k4's weights would cost more
        x = torch.randn(n, 12, 13, 14)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.no_grad(), scnet_fused.backend(backend):
            expected = ref(x)
            calls.clear()
            torch.testing.assert_close(fused(x), expected, rtol=1e-4, atol=1e-5)
        assert _called(calls, fused.k4[1]) != folded


@pytest.mark.parametrize("norm", ["momentum_none", "no_running_stats", "no_affine", "groupnorm", "identity",
                                  "frozen", "syncbn_eval"])
def test_other_norm_layers(norm):
    layers = {
        "momentum_none": lambda c: nn.BatchNorm2d(c, momentum=None),
        "no_running_stats": lambda c: nn.BatchNorm2d(c, track_running_stats=False),
        "no_affine": lambda c: nn.BatchNorm2d(c, affine=False),
        "groupnorm": lambda c: nn.GroupNorm(2, c),
        "identity": lambda c: nn.Identity(),
        "frozen": FrozenBN,
        "syncbn_eval": nn.SyncBatchNorm,
    }
    ref, fused = _pair(R.SCConv, 6, 6, 1, 1, 1, 1, 4, layers[norm])
    randomize_norms(ref)
    fused.load_state_dict(ref.state_dict())
    x = torch.randn(2, 6, 13, 14)
    if norm == "syncbn_eval":
        ref.eval(), fused.eval()
        _step_and_compare(ref, fused, x, steps=1)
    else:
        _step_and_compare(ref.train(), fused.train(), x, steps=3)
        _step_and_compare(ref.eval(), fused.eval(), x, steps=1)


@pytest.mark.parametrize("block", ["scconv", "bottleneck", "bottleneck_k4"])
def test_instance_norm_on_one_channels_last_image(block):
    """InstanceNorm2d on one channels_last image: its output is NCHW, and ATen's backward given a
    channels_last gradient for it computes wrong values; the gradients the fused gate returns in x's
    layout reach it in its output's layout, so they match the reference. ``bottleneck_k4``: only the
    SCConv's k4 is an InstanceNorm, the other norms BatchNorms, so the concatenation's backward hands
    k4's NCHW output a channels_last gradient (k1's half is channels_last)."""
    norm = lambda c: nn.InstanceNorm2d(c, affine=True)  # noqa: E731
    if block == "scconv":
        ref, fused = _pair(R.SCConv, 16, 16, 1, 1, 1, 1, 4, norm)
        x = torch.randn(1, 16, 8, 8)
    elif block == "bottleneck_k4":  # norm_layer's calls: bn1_a, bn1_b, k1, k2, k3, k4, bn3
        kinds = iter([nn.BatchNorm2d] * 5 + [norm, nn.BatchNorm2d])
        ref, fused = _pair(R.SCBottleneck, 16, 4, norm_layer=lambda c: next(kinds)(c))
        assert isinstance(ref.scconv.k4[1], nn.InstanceNorm2d) and isinstance(ref.bn3, nn.BatchNorm2d)
        x = torch.randn(1, 16, 12, 12)
    else:
        ref, fused = _pair(R.SCBottleneck, 32, 8, norm_layer=norm)
        x = torch.randn(1, 32, 8, 8)
    fused.load_state_dict(ref.state_dict())
    _step_and_compare(ref.train(), fused.train(), x.contiguous(memory_format=torch.channels_last), steps=1)


class FrozenBN(nn.Module):
    """A frozen BatchNorm (buffers only), as detection codebases use."""

    def __init__(self, c, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.rand(c) + 0.5)
        self.register_buffer("bias", torch.randn(c))
        self.register_buffer("running_mean", torch.randn(c) * 0.1)
        self.register_buffer("running_var", torch.rand(c) + 0.5)

    def forward(self, x):
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        return x * scale.view(1, -1, 1, 1) + (self.bias - self.running_mean * scale).view(1, -1, 1, 1)


def test_fused_constructor_is_drop_in():
    torch.manual_seed(0)
    ref = R.SCConv(8, 8, 2, 1, 1, 1, 4, nn.BatchNorm2d)
    fused = scnet_fused.SCConv(8, 8, 2, 1, 1, 1, 4, nn.BatchNorm2d)
    assert list(ref.state_dict()) == list(fused.state_dict())
    fused.load_state_dict(ref.state_dict())
    _step_and_compare(ref, fused, torch.randn(2, 8, 14, 14), steps=1)
    with pytest.raises(ValueError, match="inplanes == planes"):
        scnet_fused.SCConv(8, 16, 1, 1, 1, 1, 4, nn.BatchNorm2d)
    with pytest.raises(ValueError, match="smaller than pooling_r=4"):
        fused(torch.randn(1, 8, 3, 9))
    with pytest.raises(ValueError, match="expects 8 input channels"):
        fused(torch.randn(1, 4, 9, 9))


@pytest.mark.parametrize("kwargs", [dict(stride=2, avd=True, is_first=True), dict(stride=1, cardinality=2),
                                    dict(stride=2, dilation=2)])
def test_bottleneck(kwargs):
    down = nn.Sequential(nn.Conv2d(32, 128, 1, stride=kwargs["stride"], bias=False), nn.BatchNorm2d(128))
    ref, fused = _pair(R.SCBottleneck, 32, 32, downsample=down, norm_layer=nn.BatchNorm2d, **kwargs)
    assert isinstance(fused, scnet_fused.SCBottleneck) and isinstance(fused.scconv, scnet_fused.SCConv)
    randomize_norms(ref)
    fused.load_state_dict(ref.state_dict())
    x = torch.randn(2, 32, 14, 13)
    _step_and_compare(ref.train(), fused.train(), x, steps=2)
    _step_and_compare(ref.eval(), fused.eval(), x, steps=1)


@pytest.mark.parametrize("norm", ["momentum_none", "no_running_stats", "no_affine", "groupnorm", "frozen"])
def test_bottleneck_norm_layers(norm):
    """The bottleneck's fused BatchNorm + ReLU paths (conv1_a/b, and k1 + k4 into the concatenation)
    with every BatchNorm flavour, and the module fallbacks for other norms: outputs, gradients and
    buffers as the reference over training steps, then eval."""
    layers = {
        "momentum_none": lambda c: nn.BatchNorm2d(c, momentum=None),
        "no_running_stats": lambda c: nn.BatchNorm2d(c, track_running_stats=False),
        "no_affine": lambda c: nn.BatchNorm2d(c, affine=False),
        "groupnorm": lambda c: nn.GroupNorm(2, c),
        "frozen": FrozenBN,
    }
    ref, fused = _pair(R.SCBottleneck, 32, 16, norm_layer=layers[norm],
                       downsample=nn.Sequential(nn.Conv2d(32, 64, 1, bias=False), layers[norm](64)))
    randomize_norms(ref)
    fused.load_state_dict(ref.state_dict())
    x = torch.randn(2, 32, 13, 14)
    _step_and_compare(ref.train(), fused.train(), x, steps=2)
    _step_and_compare(ref.eval(), fused.eval(), x, steps=1)


@pytest.mark.parametrize("inplanes,planes,channels_last", [(32, 8, False), (1024, 256, True)],
                         ids=["stacked-nchw", "matmul-channels_last"])
def test_norm_free_bottleneck_on_one_image(inplanes, planes, channels_last):
    """``norm_layer=nn.Identity`` (a norm-free block) on one image: the entry convolutions' outputs reach
    the block's in-place ReLU through the Identity as views (the stacked convolution's NCHW halves; a
    channels_last matrix-product convolution's output where the weights outweigh the input), which
    autograd refuses to modify in place. Outputs and gradients as the reference, with the input
    requiring grad or not, and at inference."""
    ref, fused = _pair(R.SCBottleneck, inplanes, planes, norm_layer=lambda c: nn.Identity())
    x = torch.randn(1, inplanes, 8, 8)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    _step_and_compare(ref.train(), fused.train(), x, steps=1)
    torch.testing.assert_close(fused(x), ref(x), rtol=1e-4, atol=1e-4)  # x without grad, weights with
    with torch.no_grad():
        torch.testing.assert_close(fused.eval()(x), ref.eval()(x), rtol=1e-4, atol=1e-4)


# The stacked path on every backend in both memory formats; the variants choose between paths in the
# module (the backend's kernels are the same), so they run on the default backend.
ENTRY_CASES = ([(b, "stacked", cl) for b in BACKENDS for cl in (False, True)]
               + [("auto", v, False) for v in ("different_eps", "bias", "stack_conv1_false")])


@pytest.mark.parametrize("backend,variant,channels_last", ENTRY_CASES)
def test_bottleneck_entry_convolutions(backend, variant, channels_last, monkeypatch):
    """conv1_a and conv1_b run as one convolution with their weights stacked (neither module called):
    training (one fused BatchNorm + ReLU over both halves), eval with autograd (the norms as modules on
    the halves), inference (both BatchNorms folded); two images and one (NCHW halves without a copy).
    BatchNorms with different eps keep the stacked convolution but normalise each half on its own;
    a convolution with a bias runs as a module, and so do both with ``stack_conv1 = False``. Outputs,
    gradients and running statistics as the reference."""
    torch.manual_seed(0)
    down = nn.Sequential(nn.Conv2d(24, 32, 1, bias=False), nn.BatchNorm2d(32))
    ref = R.SCBottleneck(24, 8, downsample=down, norm_layer=nn.BatchNorm2d)
    if variant == "different_eps":
        ref.bn1_b.eps = 1e-3
    if variant == "bias":
        ref.conv1_b = nn.Conv2d(24, ref.conv1_b.out_channels, 1, bias=True)
    randomize_norms(ref)
    fused = scnet_fused.convert(ref)
    if variant == "stack_conv1_false":
        fused.stack_conv1 = False
    calls = _count_forward_calls(monkeypatch, nn.Conv2d)
    for n in (2, 1):
        x = torch.randn(n, 24, 13, 10)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with scnet_fused.backend(backend):
            for mode in ("train", "eval"):
                calls.clear()
                _step_and_compare(ref.train(mode == "train"), fused.train(mode == "train"), x,
                                  steps=2 if mode == "train" else 1)
                stacked = not any(_called(calls, m) for m in (fused.conv1_a, fused.conv1_b))
                assert stacked == (variant in ("stacked", "different_eps")), mode
            with torch.no_grad():
                expected = ref(x)
                calls.clear()
                torch.testing.assert_close(fused(x), expected, rtol=1e-4, atol=1e-5)
        # inference: stacked and folded; with a bias, conv1_b as a module (conv1_a folded on its own)
        assert not _called(calls, fused.conv1_a) and _called(calls, fused.conv1_b) == (variant == "bias")


@pytest.mark.parametrize("size,stacked", [((4, 6), False), ((8, 8), True)])
def test_entry_convolutions_stack_only_where_the_input_outweighs_the_weights(size, stacked, monkeypatch):
    """The stacked weight is a new tensor on every call: conv1_a and conv1_b are stacked only where x
    has at least half as many elements as the two weights (here N * H * W against the branch width
    128: 96 runs them one by one, 256 stacks them). Both ways in training, eval with autograd and
    inference, with the reference's outputs, gradients and running statistics."""
    torch.manual_seed(0)
    ref = R.SCBottleneck(64, 16, bottleneck_width=512, norm_layer=nn.BatchNorm2d)
    randomize_norms(ref)
    fused = scnet_fused.convert(ref)
    assert ref.conv1_a.weight.numel() + ref.conv1_b.weight.numel() == 2 * 128 * 64
    x = torch.randn(4, 64, *size)
    calls = _count_forward_calls(monkeypatch, nn.Conv2d)
    # At 4x6 k2's pooled map is 1x1 and its training-mode BatchNorm normalises 4 values per channel: k2's
    # weight gradient is ill-conditioned, 2e-4 from a float64 run for the reference and the fused module
    # alike (measured), so the two float32 runs are compared at 5e-4 there.
    tol = 5e-4 if size == (4, 6) else 1e-4
    for mode in ("train", "eval"):
        calls.clear()
        _step_and_compare(ref.train(mode == "train"), fused.train(mode == "train"), x,
                          steps=2 if mode == "train" else 1, rtol=tol, atol=tol)
        assert _called(calls, fused.conv1_a) != stacked and _called(calls, fused.conv1_b) != stacked, mode
    with torch.no_grad():
        expected = ref(x)
        calls.clear()
        torch.testing.assert_close(fused(x), expected, rtol=1e-4, atol=1e-5)
    assert _called(calls, fused.conv1_a) != stacked


def test_float64_eval_keeps_float64_precision():
    """Eval-mode BatchNorm folding (the gate's constants, the folded convolution weights) runs in
    float64 for a float64 model: fused and reference agree to float64 rounding, not float32's."""
    down = nn.Sequential(nn.Conv2d(32, 64, 1, bias=False), nn.BatchNorm2d(64))
    ref, fused = _pair(R.SCBottleneck, 32, 16, norm_layer=nn.BatchNorm2d, downsample=down)
    randomize_norms(ref)
    fused.load_state_dict(ref.state_dict())
    ref, fused = ref.double().eval(), fused.double().eval()
    x = torch.randn(2, 32, 14, 13, dtype=torch.float64)
    with torch.no_grad():  # convolution + BatchNorm pairs folded
        torch.testing.assert_close(fused(x), ref(x), rtol=1e-11, atol=1e-11)
    torch.testing.assert_close(fused(x), ref(x), rtol=1e-11, atol=1e-11)  # k3's BatchNorm folded into the gate


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("channels_last", [False, True])
def test_bottleneck_inference_folds_batchnorms(backend, channels_last, monkeypatch):
    """Under no_grad in eval mode the bottleneck's conv + BatchNorm pairs run folded: same output."""
    down = nn.Sequential(nn.Conv2d(32, 128, 1, stride=2, bias=False), nn.BatchNorm2d(128))
    ref, fused = _pair(R.SCBottleneck, 32, 32, stride=2, downsample=down, norm_layer=nn.BatchNorm2d)
    randomize_norms(ref)
    fused.load_state_dict(ref.state_dict())
    ref.eval(), fused.eval()
    calls = _count_forward_calls(monkeypatch, nn.BatchNorm2d)
    x = torch.randn(4, 32, 14, 13)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    names = ("bn1_a", "bn1_b", "bn3")
    for grad in (False, True):  # with autograd on, the eval-mode modules run as they are
        with torch.set_grad_enabled(grad), scnet_fused.backend(backend):
            expected = ref(x)
            calls.clear()
            torch.testing.assert_close(fused(x), expected, rtol=1e-4, atol=1e-5)
        assert [_called(calls, getattr(fused, name)) for name in names] == [grad] * 3  # folded at this size


@pytest.mark.parametrize("channels_last", [False, True])
def test_subsample_gradient_keeps_the_input_layout(channels_last):
    """The strided 1x1 downsample's subsampled view (modules._Subsample): its input gradient in the
    input's memory format (the slices' own backward gives NCHW), equal to the slices' gradient, and
    differentiable twice."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(2, 5, 7, 8, dtype=torch.float64).contiguous(memory_format=fmt).requires_grad_()
    y = modules._Subsample.apply(x, 2, 3)
    assert y.shape == (2, 5, 4, 3)
    g = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, x, g)
    xs = x.detach().requires_grad_()
    (expect,) = torch.autograd.grad(xs[:, :, ::2, ::3], xs, g)
    assert torch.equal(gx, expect) and gx.is_contiguous(memory_format=fmt)
    assert torch.autograd.gradcheck(lambda t: modules._Subsample.apply(t, 2, 2), (x,))
    assert torch.autograd.gradgradcheck(lambda t: modules._Subsample.apply(t, 2, 2).square(), (x,))


def test_strided_downsample_training_through_subsample(monkeypatch):
    """A stride-2 bottleneck's plain downsample in training, channels_last: its convolution reads the
    subsampled view through _Subsample; the input gradient, every parameter gradient and the output
    match the reference's."""
    down = nn.Sequential(nn.Conv2d(32, 128, 1, stride=2, bias=False), nn.BatchNorm2d(128))
    ref, fused = _pair(R.SCBottleneck, 32, 32, stride=2, downsample=down, norm_layer=nn.BatchNorm2d)
    seen = []
    apply = modules._Subsample.apply
    monkeypatch.setattr(modules._Subsample, "apply", lambda *a: seen.append(a[0].shape) or apply(*a))
    x = torch.randn(4, 32, 14, 13).contiguous(memory_format=torch.channels_last)
    xr, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
    dy = torch.randn(4, 128, 7, 7)
    out_r, out_f = ref(xr), fused(xf)
    out_r.backward(dy), out_f.backward(dy)
    assert seen == [(4, 32, 14, 13)]
    torch.testing.assert_close(out_f, out_r, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(xf.grad, xr.grad, rtol=1e-4, atol=1e-5)
    for (n, p), q in zip(fused.named_parameters(), ref.parameters()):
        atol = 1e-5 * max(1.0, q.grad.abs().max().item())
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=atol, msg=lambda m: f"{n}: {m}")


@pytest.mark.parametrize("hooked", [False, True])
def test_avd_bottleneck_takes_the_fused_path(hooked, monkeypatch):
    """The v1d models' first block of a stage (avd, stride 2, a downsample that pools first): conv1_a and
    conv1_b stacked (neither module called), the avd pool once per forward on the concatenation, and
    at inference the downsample's convolution folded with its BatchNorm (its pool still runs). With a
    hook on the avd pool the bottleneck runs as the reference does (the pool called on each half).
    Outputs, gradients and running statistics as the reference, training then eval."""
    torch.manual_seed(0)
    down = nn.Sequential(nn.AvgPool2d(2, 2, ceil_mode=True, count_include_pad=False),
                         nn.Conv2d(32, 128, 1, bias=False), nn.BatchNorm2d(128))  # as SCNet's avg_down
    ref = R.SCBottleneck(32, 32, stride=2, downsample=down, avd=True, norm_layer=nn.BatchNorm2d)
    assert ref.avd
    randomize_norms(ref)
    fused = scnet_fused.convert(ref)
    assert isinstance(fused, scnet_fused.SCBottleneck)
    seen = []
    if hooked:
        fused.avd_layer.register_forward_hook(lambda m, inp, out: seen.append(tuple(inp[0].shape)))
    convs = _count_forward_calls(monkeypatch, nn.Conv2d)
    pools = _count_forward_calls(monkeypatch, nn.AvgPool2d)
    x = torch.randn(4, 32, 14, 13)
    for mode in ("train", "eval"):
        convs.clear(), pools.clear()
        steps = 2 if mode == "train" else 1
        _step_and_compare(ref.train(mode == "train"), fused.train(mode == "train"), x, steps=steps)
        avd_calls = sum(m is fused.avd_layer for m in pools)
        assert avd_calls == steps * (2 if hooked else 1), mode
        assert _called(convs, fused.conv1_a) == hooked and _called(convs, fused.conv1_b) == hooked, mode
    if hooked:
        assert set(seen) == {(4, 16, 14, 13)}  # each half, as the reference pools them
    with torch.no_grad():
        expected = ref(x)
        convs.clear(), pools.clear()
        torch.testing.assert_close(fused(x), expected, rtol=1e-4, atol=1e-5)
    assert _called(pools, fused.downsample[0]) and _called(convs, fused.downsample[1]) == hooked


def _sgd_history(x, y, steps, channels_last=False):
    """Losses of ``steps`` SGD steps of the reference, the fused model and a float64 reference. With
    ``channels_last`` the float32 reference gets the batch channels_last and the fused model converts
    it itself (its CPU training default), else both keep NCHW maps (the fused model told to)."""
    torch.manual_seed(0)
    ref = R.SCNet(R.SCBottleneck, layers=(1, 1, 1, 1), num_classes=5)
    fused = models.build("scnet50", layers=(1, 1, 1, 1), num_classes=5)
    fused.load_state_dict(ref.state_dict())
    if not channels_last:
        fused.cpu_channels_last = False
    truth = copy.deepcopy(ref).double()
    x_ref = x.contiguous(memory_format=torch.channels_last) if channels_last else x
    runs = [(ref, x_ref), (fused, x), (truth, x.double())]
    opts = [torch.optim.SGD(m.parameters(), lr=0.01) for m, _ in runs]
    history = []
    for _ in range(steps):
        losses = []
        for (m, inp), opt in zip(runs, opts):
            loss = nn.functional.cross_entropy(m(inp), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        history.append(losses)
    return history, ref, fused


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_small_scnet_sgd_losses_match(channels_last):
    """Four SGD steps of a small SCNet: the fused model's losses are as close to a float64 run of the
    reference as the float32 reference's are, in the same memory layout (float32 rounding drifts
    either one by ~1e-4, by up to ~5e-4 channels_last, whose convolutions sum in another order).
    Checked on the input and two copies with 1e-5 relative noise, and required on two of the three: a
    ReLU input within rounding of 0 (measured once: |z| = 4e-8 against a largest 4.45, in layer4)
    takes the other side of the kink in one of two correct float32 runs and moves the later losses by
    ~1e-3."""
    torch.manual_seed(0)
    # 128 px: layer4's pooled map is 2 x 2, so its BatchNorm sees 16 values per channel.
    x = torch.randn(4, 3, 128, 128)
    y = torch.tensor([0, 1, 2, 3])
    verdicts = []
    for inp in kink_perturbed(x):
        history, ref, fused = _sgd_history(inp, y, steps=4, channels_last=channels_last)
        assert history[-1][1] < 0.5 * history[0][1], history
        verdicts.append((all(abs(lf - lt) <= 3 * abs(lr - lt) + 1e-4 * max(1.0, lt) for lr, lf, lt in history),
                         history))
        if sum(v for v, _ in verdicts) >= 2:  # two of three: the third input cannot change the verdict
            break
    assert sum(v for v, _ in verdicts) >= 2, verdicts
    ref.eval(), fused.eval()
    with torch.no_grad():
        torch.testing.assert_close(fused(x), ref(x), rtol=1e-3, atol=1e-3)  # after 4 steps of float drift


def _stem_layouts(model, x, **kw):
    """The memory format the stem convolution sees on each forward of ``model`` on ``x``."""
    seen = []
    h = model.conv1.register_forward_pre_hook(
        lambda mod, args: seen.append(args[0].is_contiguous(memory_format=torch.channels_last)))
    try:
        out = model(x, **kw)
    finally:
        h.remove()
    return seen, out


def test_classifier_cpu_layout_policy():
    """The fused classifier on a CPU batch: channels_last maps when training and for eval images of at
    least 192 x 192 px (``cpu_channels_last = "auto"``), the caller's layout for smaller eval images,
    under torch.jit.trace, and with ``False``; always with ``True``; the logits the same."""
    torch.manual_seed(0)
    m = models.build("scnet50", layers=(1, 1, 1, 1), num_classes=5)
    small, large = torch.randn(2, 3, 64, 64), torch.randn(1, 3, 192, 192)
    seen, out = _stem_layouts(m.train(), small)
    assert seen == [True] and out.is_contiguous()  # the logits come out as from an NCHW run
    m.eval()
    with torch.no_grad():
        seen, out_auto = _stem_layouts(m, small)
        assert seen == [False]
        seen, _ = _stem_layouts(m, large)
        assert seen == [True]
        seen, _ = _stem_layouts(m, torch.randn(8, 3, 176, 192))  # 176 x 192 px: below the rule
        assert seen == [False]
        m.cpu_channels_last = True
        seen, out_cl = _stem_layouts(m, small)
        assert seen == [True]
        torch.testing.assert_close(out_cl, out_auto, rtol=1e-4, atol=1e-5)
        m.cpu_channels_last = False
        seen, _ = _stem_layouts(m, large)
        assert seen == [False]
    m.train()
    seen, _ = _stem_layouts(m, small)
    assert seen == [False]
    del m.cpu_channels_last  # back to the class default
    assert m.cpu_channels_last == "auto"
    # a traced graph keeps the caller's layout (the rule is not recorded into it)
    m.eval()
    seen = []
    h = m.conv1.register_forward_pre_hook(
        lambda mod, args: seen.append(args[0].is_contiguous(memory_format=torch.channels_last)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.trace(m, large, check_trace=False)
    h.remove()
    assert seen == [False]
    for bad in ("yes", 1, None):
        m.cpu_channels_last = bad
        with pytest.raises(ValueError, match="cpu_channels_last"):
            m(small)
    # the policy is a class attribute: nothing in the state_dict
    assert not any("channels_last" in k for k in m.state_dict())


def test_classifier_channels_last_training_matches_nchw():
    """One training step of the fused classifier in its CPU default (channels_last maps) against the
    same model on NCHW maps: logits, every parameter gradient and the running statistics."""
    torch.manual_seed(0)
    a = models.build("scnet50", layers=(1, 1, 1, 1), num_classes=5)
    b = copy.deepcopy(a)
    b.cpu_channels_last = False
    x, y = torch.randn(2, 3, 64, 64), torch.tensor([1, 4])
    outs = []
    for m in (a, b):
        out = m(x)
        nn.functional.cross_entropy(out, y).backward()
        outs.append(out)
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-4, atol=1e-5)
    # float32 rounding: the reference's own gradients (either layout) differ from a float64 run's by up
    # to ~3e-5 of the largest (the stem's filter gradient: 8e-5 of 3.0)
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        atol = 1e-4 * max(1.0, q.grad.abs().max().item())
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=atol, msg=lambda s: f"{n}: {s}")
    for (n, u), v in zip(a.named_buffers(), b.buffers()):
        torch.testing.assert_close(u, v, rtol=1e-5, atol=1e-6, msg=lambda s: f"{n}: {s}")


def test_features_only():
    m = models.scnet50(features_only=True, out_indices=(2, 4)).eval()
    assert m.channels == [512, 2048] and m.strides == [8, 32]
    with torch.no_grad():
        feats = m(torch.randn(1, 3, 128, 128))
    assert [tuple(f.shape) for f in feats] == [(1, 512, 16, 16), (1, 2048, 4, 4)]
    d = models.scnet50_v1d(features_only=True, dilated=True)
    assert d.strides == [4, 8, 8, 8]
    with pytest.raises(ValueError, match="out_indices"):
        models.scnet50(features_only=True, out_indices=(0, 5))
    # the maps come out in stage order, one per index: other orders and repeats are errors, as are
    # non-integers and out_indices without features_only
    for bad in ((4, 2), (2, 2)):
        with pytest.raises(ValueError, match="strictly increasing"):
            models.scnet50(features_only=True, out_indices=bad)
    for bad in ([1.5], "12", 3, (True,)):
        with pytest.raises(TypeError, match="out_indices"):
            models.scnet50(features_only=True, out_indices=bad)
    with pytest.raises(ValueError, match="features_only"):
        models.scnet50(out_indices=(1,))
    # stages after the last selected one are not built (no unused parameters); a full checkpoint loads
    two = models.scnet50(features_only=True, out_indices=(1, 2), fused=False)
    assert not hasattr(two, "layer3") and not hasattr(two, "layer4")
    assert not any(k.startswith(("layer3.", "layer4.")) for k in two.state_dict())


def test_models_take_a_norm_layer_factory():
    """norm_layer may be a factory (functools.partial, a lambda), not only a class, as its annotation
    says: the models build and the fused one matches the reference (float64, training and eval)."""
    import functools

    for norm in (functools.partial(nn.BatchNorm2d, momentum=0.3), lambda c: nn.GroupNorm(4, c)):
        torch.manual_seed(0)
        ref = models.build("scnet50", fused=False, layers=(1, 1, 1, 1), num_classes=3, norm_layer=norm).double()
        fused = models.build("scnet50", fused=True, layers=(1, 1, 1, 1), num_classes=3, norm_layer=norm).double()
        fused.load_state_dict(ref.state_dict())
        x = torch.randn(2, 3, 128, 128, dtype=torch.float64)
        _step_and_compare(ref.train(), fused.train(), x, steps=1, rtol=1e-7, atol=1e-9)
        _step_and_compare(ref.eval(), fused.eval(), x, steps=1, rtol=1e-7, atol=1e-9)


def test_scnet_rejects_other_dilations_and_empty_widths():
    with pytest.raises(ValueError, match="dilation"):
        R.scnet50(dilated=True, dilation=3)
    for kwargs in (dict(bottleneck_width=0), dict(groups=0)):
        with pytest.raises(ValueError, match="positive"):
            R.scnet50(**kwargs)


def test_convert_published_style_model():
    # float64: this net has ReLUs after BatchNorms over 2 images, where float32 rounding (of either
    # implementation) can flip a ReLU mask and move upstream gradients by a few percent.
    torch.manual_seed(0)
    ref = published_style.TinyNet().double()
    randomize_norms(ref)
    fused, report = scnet_fused.convert_with_report(ref)
    names = [r[0] for r in report]
    assert names == ["blocks.0", "blocks.0.scconv", "blocks.1", "blocks.1.scconv", "lone"]
    assert isinstance(fused.blocks[0], scnet_fused.SCBottleneck) and isinstance(fused.lone, scnet_fused.SCConv)
    assert type(ref.lone) is published_style.SCConv  # inplace=False left the original alone
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    _step_and_compare(ref.train(), fused.train(), x, steps=2)
    _step_and_compare(ref.eval(), fused.eval(), x, steps=1)
    # inplace conversion keeps the very same parameters, and eval mode
    ref.eval()
    same = scnet_fused.convert(ref, inplace=True)
    assert same is ref and isinstance(ref.lone, scnet_fused.SCConv) and not ref.lone.training
    assert scnet_fused.convert_with_report(same)[1] == []  # nothing left to convert


class TaggedSCConv(R.SCConv):
    """A subclass keeping the reference's forward, with a method and class attribute of its own."""

    kind = "tagged"

    def describe(self) -> str:
        return f"{self.kind} {self.planes}"


class FreezableBottleneck(R.SCBottleneck):
    frozen = False

    def freeze(self) -> None:
        self.frozen = True
        for p in self.parameters():
            p.requires_grad_(False)


def test_convert_keeps_the_replaced_classes_methods_and_isinstance():
    """A converted module keeps its class's methods and class attributes and still passes isinstance
    against that class (a reference subclass, the published file's class), with the fused forward; the
    result pickles (torch.save of the whole model), deep-copies and converts again to itself."""
    import io
    import pickle

    torch.manual_seed(0)
    ref = nn.Sequential(TaggedSCConv(16, 16, 1, 1, 1, 1, 4, nn.BatchNorm2d),
                        FreezableBottleneck(64, 16, norm_layer=nn.BatchNorm2d), published_style.TinyNet().lone)
    randomize_norms(ref)
    fused = scnet_fused.convert(ref)
    sc, block, pub = fused
    assert isinstance(sc, TaggedSCConv) and isinstance(sc, scnet_fused.SCConv) and sc.describe() == "tagged 16"
    assert isinstance(block, FreezableBottleneck) and isinstance(block, scnet_fused.SCBottleneck)
    assert isinstance(pub, published_style.SCConv) and isinstance(pub, scnet_fused.SCConv)
    assert type(sc).forward is scnet_fused.SCConv.forward and type(block).forward is scnet_fused.SCBottleneck.forward
    assert type(sc) is type(scnet_fused.convert(TaggedSCConv(8, 8, 1, 1, 1, 1, 4, nn.BatchNorm2d)))  # one class a pair
    block.freeze()
    assert block.frozen and not any(p.requires_grad for p in block.parameters()) and not FreezableBottleneck.frozen
    for copy_of in (copy.deepcopy, lambda m: pickle.loads(pickle.dumps(m)),
                    lambda m: torch.load(io.BytesIO(_saved(m)), weights_only=False)):
        again = copy_of(fused)
        assert [type(m) for m in again] == [type(m) for m in fused] and again[0].describe() == "tagged 16"
        assert again[1].frozen and scnet_fused.convert_with_report(again)[1] == []
        x = torch.randn(2, 16, 12, 12)
        with torch.no_grad():
            torch.testing.assert_close(again[0].eval()(x), sc.eval()(x))
    x = torch.randn(2, 16, 12, 12, requires_grad=True)
    xr = x.detach().clone().requires_grad_()
    sc.train()(x).sum().backward()
    ref[0].train()(xr).sum().backward()
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-4, atol=1e-5)


_REGISTRY = []


class Registering(R.SCConv):
    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        _REGISTRY.append(cls)


class RegisteredSCConv(Registering):
    pass


class PropertySCConv(published_style.SCConv):  # (the published class stores no pooling_r)
    @property
    def pooling_r(self):
        return self.k2[0].kernel_size


class FrozenAttrsSCConv(R.SCConv):
    """Refuses attribute changes after its constructor."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        object.__setattr__(self, "_frozen", True)

    def __setattr__(self, name, value):
        if getattr(self, "_frozen", False):
            raise AttributeError(f"{type(self).__name__} is frozen: cannot set {name!r}")
        super().__setattr__(name, value)


class NewWithArgsSCConv(R.SCConv):
    def __new__(cls, inplanes, *args, **kwargs):
        return super().__new__(cls)


class OwnReduceSCConv(R.SCConv):
    def __reduce__(self):
        return (OwnReduceSCConv, (8, 8, 1, 1, 1, 1, 4, nn.BatchNorm2d))


@pytest.mark.parametrize("src", [RegisteredSCConv, PropertySCConv, FrozenAttrsSCConv, NewWithArgsSCConv,
                                 OwnReduceSCConv, "local"])
def test_convert_keeps_nothing_it_cannot_combine(src):
    """A source class that a combined class would run or bypass something of (an __init_subclass__, a
    property shadowing the attributes the fused module sets, its own __setattr__ / __new__ / __reduce__)
    or that cannot be found again by name (made inside a function: its instances would not unpickle)
    converts to the plain fused class, as before; nothing of the user's runs (no registration) and the
    result pickles."""
    import pickle

    if src == "local":
        class Local(R.SCConv):
            pass

        src = Local
    _REGISTRY.clear()
    m = scnet_fused.convert(src(8, 8, 1, 1, 1, 1, 4, nn.BatchNorm2d), inplace=True)
    assert type(m) is scnet_fused.SCConv and _REGISTRY == []
    x = torch.randn(2, 8, 12, 12)
    with torch.no_grad():
        torch.testing.assert_close(pickle.loads(pickle.dumps(m)).eval()(x), m.eval()(x))


def test_combined_class_copies_through_module_getstate():
    """The combined class pickles and copies through nn.Module.__getstate__, so a module compiled in place
    deep-copies into one that runs its own weights."""
    m = scnet_fused.convert(TaggedSCConv(8, 8, 1, 1, 1, 1, 4, nn.BatchNorm2d)).eval()
    m.compile(backend="eager")
    x = torch.randn(2, 8, 12, 12)
    with torch.no_grad():
        m(x)
        c = copy.deepcopy(m)
        assert "_compiled_call_impl" not in c.__dict__ and isinstance(c, TaggedSCConv)
        c.k4[0].weight.zero_()
        assert (c(x) - m(x)).abs().max() > 0
    assert isinstance(torch.load(__import__("io").BytesIO(_saved(m)), weights_only=False), TaggedSCConv)


def _saved(m: nn.Module) -> bytes:
    import io

    buf = io.BytesIO()
    torch.save(m, buf)
    return buf.getvalue()


def test_convert_keeps_dtype_and_reference_models():
    m = R.scnet50(num_classes=3).double()
    fused = scnet_fused.convert(m)
    assert all(p.dtype == torch.float64 for p in fused.parameters())
    n_sc = sum(isinstance(x, scnet_fused.SCConv) for x in fused.modules())
    assert n_sc == 16
    assert list(fused.state_dict()) == list(m.state_dict())
    # the stem's pool, as the fused models have it (no state; ATen's results: tests/test_maxpool.py)
    from scnet_fused.modules import MaxPool2d

    fused, report = scnet_fused.convert_with_report(m)
    assert type(fused.maxpool) is MaxPool2d and type(m.maxpool) is torch.nn.MaxPool2d
    assert ("maxpool", "MaxPool2d", "scnet_fused.modules.MaxPool2d") in report
    assert scnet_fused.convert_with_report(fused)[1] == []
    with pytest.raises(TypeError, match="nn.Module"):
        scnet_fused.convert("model")


def test_convert_a_module_held_twice_becomes_one_fused_module():
    """A module held in two slots of one container, or by two parents: every slot gets the same fused
    module (the container's children listing names a shared module once)."""
    torch.manual_seed(0)
    s = R.SCConv(8, 8, 1, 1, 1, 1, 4, nn.BatchNorm2d)
    seq = nn.Sequential(s, nn.ReLU(), s)
    out, report = scnet_fused.convert_with_report(seq)
    assert type(out[0]) is scnet_fused.SCConv and out[0] is out[2] and [r[0] for r in report] == ["0"]
    b = R.SCBottleneck(32, 8, norm_layer=nn.BatchNorm2d)
    parents = nn.ModuleList([nn.ModuleList([b, b]), nn.Sequential(b)])
    scnet_fused.convert(parents, inplace=True)
    assert type(parents[0][0]) is scnet_fused.SCBottleneck
    assert parents[0][0] is parents[0][1] is parents[1][0]
    x = torch.randn(2, 8, 12, 12)
    with torch.no_grad():
        torch.testing.assert_close(out.eval()(x), seq.eval()(x), rtol=1e-5, atol=1e-5)


class _ResidualSCConv(R.SCConv):
    def forward(self, x):
        return super().forward(x) + x


class _ScaledSCConv(scnet_fused.SCConv):
    def forward(self, x):
        return 0.5 * super().forward(x)


class _RefScaledSCConv(R.SCConv):
    def forward(self, x):
        return 0.5 * super().forward(x)


class _DoubledSeq(nn.Sequential):
    def forward(self, x):
        return 2.0 * super().forward(x)


def test_convert_leaves_a_subclass_with_its_own_forward():
    """A subclass of the reference classes whose forward differs has the layout but not the computation:
    convert leaves it (with a warning) and converts what is inside; a module already fused (a subclass
    of the fused classes too) stays as it is."""
    torch.manual_seed(0)
    ref = _ResidualSCConv(8, 8, 1, 1, 1, 1, 4, nn.BatchNorm2d)
    with pytest.warns(UserWarning, match="forward of its own"):
        out, report = scnet_fused.convert_with_report(ref)
    assert type(out) is _ResidualSCConv and report == []
    block = R.SCBottleneck(64, 16, norm_layer=nn.BatchNorm2d)
    block.scconv = _ResidualSCConv(8, 8, 1, 1, 1, 1, 4, nn.BatchNorm2d)
    with pytest.warns(UserWarning, match="its scconv"):
        out = scnet_fused.convert(block)
    assert type(out) is R.SCBottleneck and type(out.scconv) is _ResidualSCConv
    x = torch.randn(2, 64, 12, 12)
    torch.testing.assert_close(out(x), block(x), rtol=1e-5, atol=1e-5)
    fused = _ScaledSCConv(8, 8, 1, 1, 1, 1, 4, nn.BatchNorm2d)
    fused.recompute_gate = False
    again, report = scnet_fused.convert_with_report(fused)
    assert type(again) is _ScaledSCConv and again.recompute_gate is False and report == []


@pytest.mark.parametrize("train", [True, False])
def test_fused_modules_run_the_forwards_of_subclasses_inside(train):
    """A fused bottleneck whose scconv is a subclass with its own forward, and Sequential subclasses with
    their own forward as k3, k4 or the downsample: the fused paths call those forwards, as the reference
    does, instead of taking the layers inside apart."""
    torch.manual_seed(0)
    ref = R.SCBottleneck(64, 16, downsample=nn.Sequential(nn.Conv2d(64, 64, 1, bias=False), nn.BatchNorm2d(64)))
    randomize_norms(ref)
    ref.scconv = _RefScaledSCConv(8, 8, 1, 1, 1, 1, 4, nn.BatchNorm2d)
    ref.scconv.k3 = _DoubledSeq(*ref.scconv.k3)
    ref.downsample = _DoubledSeq(*ref.downsample)
    fused = scnet_fused.SCBottleneck(64, 16, downsample=copy.deepcopy(ref.downsample))
    fused.scconv = _ScaledSCConv(8, 8, 1, 1, 1, 1, 4, nn.BatchNorm2d)
    fused.scconv.k3 = _DoubledSeq(*fused.scconv.k3)
    fused.load_state_dict(ref.state_dict())
    sc_ref = R.SCConv(8, 8, 1, 1, 1, 1, 4, nn.BatchNorm2d)
    randomize_norms(sc_ref)
    sc_ref.k3, sc_ref.k4 = _DoubledSeq(*sc_ref.k3), _DoubledSeq(*sc_ref.k4)
    sc_fused = scnet_fused.SCConv(8, 8, 1, 1, 1, 1, 4, nn.BatchNorm2d)
    sc_fused.k3, sc_fused.k4 = _DoubledSeq(*sc_fused.k3), _DoubledSeq(*sc_fused.k4)
    sc_fused.load_state_dict(sc_ref.state_dict())
    for r, f, x in ((ref, fused, torch.randn(2, 64, 16, 16)), (sc_ref, sc_fused, torch.randn(2, 8, 16, 16))):
        r.train(train), f.train(train)
        torch.testing.assert_close(f(x), r(x), rtol=1e-4, atol=1e-4)


def test_convert_keeps_each_submodules_mode():
    # a frozen BatchNorm (eval inside a training model, as detection backbones keep them) stays frozen,
    # and a training one inside an eval model keeps training
    torch.manual_seed(0)
    model = nn.Sequential(R.SCBottleneck(64, 16), R.SCConv(64, 64, 1, 1, 1, 1, 4, nn.BatchNorm2d)).train()
    norms = [name for name, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    frozen = set(norms[::2])  # every other one, in module order
    frozen |= {"0.bn3", "1.k3.1"}
    for name, m in model.named_modules():
        if name in frozen:
            m.eval()
    randomize_norms(model)
    modes = {name: m.training for name, m in model.named_modules()}
    fused = scnet_fused.convert(model)
    assert {name: m.training for name, m in fused.named_modules()} == modes
    x = torch.randn(2, 64, 8, 8)
    before = copy.deepcopy(model)
    y_ref, y = model(x), fused(x)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    for name, m in fused.named_modules():
        if name in frozen:  # eval BatchNorms: running statistics untouched
            torch.testing.assert_close(m.running_mean, dict(before.named_modules())[name].running_mean,
                                       rtol=0, atol=0)
    model.eval().get_submodule("0.bn3").train()
    assert not scnet_fused.convert(model).get_submodule("0.k1.1").training
    assert scnet_fused.convert(model).get_submodule("0.bn3").training


def test_convert_keeps_hooks_and_attributes_of_the_converted_modules():
    torch.manual_seed(0)
    model = R.scnet50(num_classes=3)
    block, sc = model.layer1[0], model.layer2[0].scconv
    calls = []
    block.register_forward_pre_hook(lambda m, args: calls.append("block pre"))
    handle = sc.register_forward_hook(lambda m, args, out: out * 0)  # replaces the SCConv's output
    model.maxpool.register_forward_hook(lambda m, args, out: calls.append("pool"))
    block.tag = "kept"
    fused = scnet_fused.convert(model, inplace=True)
    assert isinstance(fused.layer1[0], scnet_fused.SCBottleneck) and fused.layer1[0].tag == "kept"
    assert isinstance(fused.layer2[0].scconv, scnet_fused.SCConv)
    assert type(fused.maxpool).__name__ == "MaxPool2d" and type(fused.maxpool) is not nn.MaxPool2d
    assert fused.maxpool.kernel_size == 3 and fused.maxpool.stride == 2
    out = fused.layer2[0].scconv(torch.randn(2, 64, 8, 8))
    assert torch.count_nonzero(out) == 0
    fused.eval()
    with torch.no_grad():
        fused(torch.randn(1, 3, 128, 128))
    assert calls == ["pool", "block pre"]
    handle.remove()  # the user's handle still reaches the converted module's hooks
    assert torch.count_nonzero(fused.layer2[0].scconv(torch.randn(2, 64, 8, 8))) > 0


def _saved_bytes(module, x):
    """Bytes of the unique storages saved for backward by one forward (parameters and input excluded)."""
    exclude = {p.untyped_storage().data_ptr() for p in module.parameters()}
    exclude.add(x.untyped_storage().data_ptr())
    seen = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in exclude:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(x)
    return sum(seen.values())


def test_saved_for_backward_bytes():
    torch.manual_seed(0)
    ref = R.SCConv(32, 32, 1, 1, 1, 1, 4, nn.BatchNorm2d).train()
    fused = scnet_fused.convert(ref)
    x = torch.randn(2, 32, 28, 28, requires_grad=True)
    b_ref, b_fused = _saved_bytes(ref, x), _saved_bytes(fused, x)
    full = x.numel() * 4
    # reference: k3's conv output, BN3's output, the sigmoid, the product and k4's conv output (plus
    # the small pooled-branch tensors): about 5 full-size tensors. Fused: k3's conv output and k4's
    # conv output; the gate output is recomputed in backward, and of the pooled branch (1/16 of a
    # full-size tensor each) the pool's output and k2's convolution output only: its BatchNorm is
    # applied inside the gate, so the normalized map is neither written nor saved (2.13x measured).
    assert b_ref >= 5 * full
    assert b_fused <= 0.5 * b_ref and b_fused <= 2.15 * full, (b_fused / full, b_ref / full)
    fused.recompute_gate = False
    assert _saved_bytes(fused, x) >= 3 * full  # the gate output is then saved by k4's convolution


@pytest.mark.parametrize("autocast", [False, True])
def test_stacked_entry_convolution_saves_the_parameters(autocast, monkeypatch):
    """conv1_a and conv1_b run as one convolution of their stacked weights; its backward keeps the two
    parameters and stacks them again rather than holding the stacked (under autocast: stacked and
    cast) weight, a new tensor as large as both: nothing of that shape is saved, and outputs, running
    statistics and every gradient are bit for bit those of ``F.conv2d`` on the stacked weight."""
    from scnet_fused import modules as fused_modules

    torch.manual_seed(0)
    ref = R.SCBottleneck(64, 16, norm_layer=nn.BatchNorm2d,
                         downsample=nn.Sequential(nn.Conv2d(64, 64, 1, bias=False), nn.BatchNorm2d(64)))
    randomize_norms(ref)
    x = torch.randn(2, 64, 8, 8)

    def run(module):
        return _step_saving(module, x, autocast)

    fused = scnet_fused.convert(ref)
    out, saved = run(fused)
    stacked = (2 * fused.conv1_a.out_channels, 64, 1, 1)
    assert not any(t.shape == stacked for t in saved)
    assert sum(t is fused.conv1_a.weight or t is fused.conv1_b.weight for t in saved) == 2

    def cat_conv(x, weights, stride, padding, dilation, groups):
        return nn.functional.conv2d(x, torch.cat(weights), None, stride, padding, dilation, groups)

    with monkeypatch.context() as patch:
        patch.setattr(fused_modules, "_param_conv", cat_conv)
        patch.setattr(fused_modules, "_conv", lambda conv, x: conv(x))
        patch.setattr(fused_modules.SCConv, "recompute_gate", False)
        plain, saved_p = run(scnet_fused.convert(ref))
    assert any(t.shape == stacked for t in saved_p)  # what the plain stacked convolution keeps
    for i, (a, b) in enumerate(zip(out, plain)):
        assert a.dtype == b.dtype
        assert torch.equal(a, b), i


def test_gate_output_saved_below_the_recompute_size(monkeypatch):
    """Below ``RECOMPUTE_MIN_ELEMENTS`` k4's convolution keeps the gate output instead of recomputing it
    (the same gradients); from that size on it recomputes."""
    from scnet_fused import modules as fused_modules

    monkeypatch.setattr(fused_modules, "RECOMPUTE_MIN_ELEMENTS", DEFAULT_RECOMPUTE_MIN_ELEMENTS)
    torch.manual_seed(0)
    ref = R.SCConv(16, 16, 1, 1, 1, 1, 4, nn.BatchNorm2d).train()
    small_x = torch.randn(2, 16, 28, 28, requires_grad=True)  # 25088 elements: y saved
    large_x = torch.randn(6, 16, 28, 28, requires_grad=True)  # 75264: recomputed
    assert small_x.numel() < DEFAULT_RECOMPUTE_MIN_ELEMENTS <= large_x.numel()
    fused = scnet_fused.convert(ref)
    assert _saved_bytes(fused, small_x) >= 3 * small_x.numel() * 4
    assert _saved_bytes(fused, large_x) <= 2.15 * large_x.numel() * 4
    for x in (small_x, large_x):
        grads = []
        for threshold in (0, x.numel() + 1):  # recompute, then save
            monkeypatch.setattr(fused_modules, "RECOMPUTE_MIN_ELEMENTS", threshold)
            m = scnet_fused.convert(ref)
            grads.append(torch.autograd.grad(m(x).square().sum(), [x] + list(m.parameters())))
        for a, b in zip(*grads):
            assert torch.equal(a, b)


def test_small_maps_at_inference_run_the_reference_computation(monkeypatch):
    """At inference (autograd off) a bottleneck's input below ``BOTTLENECK_INFERENCE_MIN_ELEMENTS`` and an
    SCConv's below ``SCCONV_INFERENCE_MIN_ELEMENTS`` run the reference computation (every BatchNorm
    module called, nothing folded), with the reference's results bit for bit; larger maps, and training
    at any size, run the fused paths."""
    from scnet_fused import modules as fused_modules

    bottleneck_min, scconv_min = DEFAULT_INFERENCE_MIN_ELEMENTS
    monkeypatch.setattr(fused_modules, "BOTTLENECK_INFERENCE_MIN_ELEMENTS", bottleneck_min)
    monkeypatch.setattr(fused_modules, "SCCONV_INFERENCE_MIN_ELEMENTS", scconv_min)
    ref, fused = _pair(R.SCBottleneck, 256, 64)
    randomize_norms(ref)
    fused.load_state_dict(ref.state_dict())
    ref.eval(), fused.eval()
    small, large = torch.randn(1, 256, 8, 8), torch.randn(1, 256, 40, 40)
    assert small.numel() < bottleneck_min <= large.numel()
    calls = _count_forward_calls(monkeypatch, nn.BatchNorm2d)
    norms = [m for m in fused.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        assert torch.equal(fused(small), ref(small))
        assert all(_called(calls, m) for m in norms)
        calls.clear()
        torch.testing.assert_close(fused(large), ref(large), rtol=1e-4, atol=1e-4)
        assert not _called(calls, fused.bn3) and not _called(calls, fused.scconv.k3[1])  # in the fused ops
    calls.clear()
    x = small.clone().requires_grad_()
    fused(x).sum().backward()  # autograd on: the fused paths (k3's norm inside the gate)
    assert not _called(calls, fused.scconv.k3[1])
    # a stage's first block: a small input (64 channels) but a large output stays fused
    first_ref, first = _pair(R.SCBottleneck, 64, 64,
                             downsample=nn.Sequential(nn.Conv2d(64, 256, 1, bias=False), nn.BatchNorm2d(256)))
    first_ref.eval(), first.eval()
    x64 = torch.randn(1, 64, 40, 40)
    assert x64.numel() < bottleneck_min <= 256 * 40 * 40
    calls.clear()
    with torch.no_grad():
        torch.testing.assert_close(first(x64), first_ref(x64), rtol=1e-4, atol=1e-4)
    assert not _called(calls, first.bn3)
    # a conv3 that is not a convolution (no out_channels): the rule sizes the output by x's channels
    odd_ref = R.SCBottleneck(256, 64)
    odd_ref.conv3 = nn.Sequential(odd_ref.conv3)
    odd = scnet_fused.convert(odd_ref).eval()
    odd_ref.eval()
    with torch.no_grad():
        assert torch.equal(odd(small), odd_ref(small))
    sc_ref, sc = _pair(R.SCConv, 32, 32, 1, 1, 1, 1, 4, nn.BatchNorm2d)
    sc_ref.eval(), sc.eval()
    tiny, big = torch.randn(2, 32, 16, 16), torch.randn(2, 32, 32, 32)
    assert tiny.numel() < scconv_min <= big.numel()
    calls.clear()
    with torch.no_grad():
        assert torch.equal(sc(tiny), sc_ref(tiny))
        assert _called(calls, sc.k3[1])
        calls.clear()
        torch.testing.assert_close(sc(big), sc_ref(big), rtol=1e-4, atol=1e-4)
        assert not _called(calls, sc.k3[1])


def _step_saving(module, x, autocast):
    """One forward (under bf16 autocast if asked) and the gradients of the input and every parameter:
    ``(output, *gradients, *buffers)`` and the tensors saved for backward. The module's input is not a
    leaf, as inside a network: autocast caches its cast of a leaf that requires grad, and the gradients
    of that cast's uses then add up in bf16 (a convolution that casts x itself adds its term in float32)."""
    xx = x.clone().requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = module(xx * 1.0)
    grads = torch.autograd.grad(y.float().square().sum(), [xx] + list(module.parameters()))
    return (y,) + grads + tuple(module.buffers()), saved


@pytest.mark.parametrize("train", [True, False])
def test_autocast_convolutions_save_the_parameters(train, monkeypatch):
    """Under bf16 autocast the SCConv's convolutions (k2's and k3's through _ParamConv, k4's through
    _ConvOfGate) save their float32 weights, cast again in the backward, instead of bf16 copies: no
    weight-shaped tensor among the saved ones but the parameters themselves; outputs, running statistics
    and every gradient bit for bit those of the convolutions run as modules under autocast."""
    from scnet_fused import modules as fused_modules

    torch.manual_seed(0)
    ref = R.SCConv(32, 32, 1, 1, 1, 1, 4, nn.BatchNorm2d).train(train)
    randomize_norms(ref)
    x = torch.randn(2, 32, 16, 16)

    def run(module):
        return _step_saving(module, x, autocast=True)

    fused = scnet_fused.convert(ref)
    weights = {m.weight.data_ptr() for m in fused.modules() if isinstance(m, nn.Conv2d)}
    out, saved = run(fused)
    weight_shaped = [t for t in saved if t.shape == (32, 32, 3, 3)]
    assert len(weight_shaped) == 3 and all(t.dtype == torch.float32 and t.data_ptr() in weights
                                           for t in weight_shaped), [(t.shape, t.dtype) for t in weight_shaped]
    with monkeypatch.context() as patch:
        patch.setattr(fused_modules, "_conv", lambda conv, x: conv(x))
        patch.setattr(fused_modules.SCConv, "recompute_gate", False)
        as_modules, saved_m = run(scnet_fused.convert(ref))
    assert sum(t.shape == (32, 32, 3, 3) and t.dtype == torch.bfloat16 for t in saved_m) == 3
    assert out[0].dtype == torch.bfloat16 and out[1].dtype == torch.float32
    for a, b in zip(out, as_modules):
        assert a.dtype == b.dtype and torch.equal(a, b)


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
def test_autocast_float32_input_cast_once(fmt, monkeypatch):
    """A float32 input under bf16 autocast: k3's convolution and the gate read one cast of x (saved
    once), with outputs, running statistics and every gradient bit for bit those of two casts; a
    hook on k3's convolution still sees the float32 input."""
    from scnet_fused import modules as fused_modules

    torch.manual_seed(0)
    ref = R.SCConv(16, 16, 1, 1, 1, 1, 4, nn.BatchNorm2d).train()
    x = torch.randn(2, 16, 28, 28).contiguous(memory_format=fmt)

    def run(module):
        xx = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = module(xx)
            saved = _saved_bytes(module, xx)
        grads = torch.autograd.grad(y.float().square().sum(), [xx] + list(module.parameters()))
        return (y,) + grads + tuple(module.buffers()), saved

    with torch.autocast("cpu", dtype=torch.bfloat16):
        b_ref = _saved_bytes(ref, x.clone().requires_grad_())
    shared, b_shared = run(scnet_fused.convert(ref))
    with monkeypatch.context() as patch:
        patch.setattr(fused_modules, "_autocast_input", lambda x, conv: None)
        two_casts, b_two = run(scnet_fused.convert(ref))
    assert shared[0].dtype == torch.bfloat16 and shared[1].dtype == torch.float32
    for a, b in zip(shared, two_casts):
        assert torch.equal(a, b)
    full = x.numel() * 2  # one full-size bf16 tensor
    # saved: x's bf16 cast, k3's and k4's convolution outputs (+ pooled-branch maps; the convolutions
    # keep their float32 parameters, not bf16 copies); with two casts also the second copy of x
    # (measured 3.14 and 4.14 full-size)
    assert b_shared <= 3.2 * full and b_two >= 4.1 * full, (b_shared / full, b_two / full)
    assert b_shared <= 0.5 * b_ref, (b_shared, b_ref)

    fused = scnet_fused.convert(ref)
    seen = []
    fused.k3[0].register_forward_pre_hook(lambda m, inp: seen.append(inp[0].dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused(x)
    assert seen == [torch.float32]


@pytest.mark.parametrize("backend", BACKENDS)
def test_recompute_gate_gives_identical_gradients(backend):
    torch.manual_seed(0)
    ref = R.SCConv(6, 6, 2, 1, 1, 1, 4, nn.BatchNorm2d)
    a, b = scnet_fused.convert(ref), scnet_fused.convert(ref)
    b.recompute_gate = False
    x = torch.randn(2, 6, 13, 14).contiguous(memory_format=torch.channels_last)
    with scnet_fused.backend(backend):
        for mode in ("train", "eval"):
            getattr(a, mode)(), getattr(b, mode)()
            ga = torch.autograd.grad(a(x.requires_grad_()).square().sum(), [x] + list(a.parameters()))
            gb = torch.autograd.grad(b(x).square().sum(), [x] + list(b.parameters()))
            for u, v in zip(ga, gb):
                assert torch.equal(u, v)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("size", [(4, 4), (7, 5)])
def test_k2_on_a_one_pixel_pooled_map_runs_its_centre_taps(size, channels_last, monkeypatch):
    """Input maps under 8 px pooled at rate 4 leave k2 a 1x1 map, whose 3x3 convolution sees only its
    centre taps: the fused SCConv runs it as a matrix product (k2's convolution module is not called)
    and matches the reference in training (output, gradients of the input and of every parameter, the
    other taps' zero, running statistics over two steps), eval with autograd and inference."""
    ref, fused = _pair(R.SCConv, 8, 8, 1, 1, 1, 1, 4, nn.BatchNorm2d)
    randomize_norms(ref)
    fused.load_state_dict(ref.state_dict())
    x = torch.randn(3, 8, *size)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    calls = _count_forward_calls(monkeypatch, nn.Conv2d)
    for mode in ("train", "eval"):
        _step_and_compare(ref.train(mode == "train"), fused.train(mode == "train"), x, steps=2 if mode == "train" else 1)
    assert not _called(calls, fused.k2[1])
    with torch.no_grad():
        torch.testing.assert_close(fused(x), ref(x), rtol=1e-4, atol=1e-5)
    fused.train()
    fused.zero_grad()
    # (not .sum(): the sum of a training-mode BatchNorm's output does not depend on its input)
    fused(x.clone().requires_grad_()).square().sum().backward()
    g = fused.k2[1].weight.grad
    assert g[:, :, 1, 1].abs().sum() > 0 and torch.count_nonzero(g) == g[:, :, 1, 1].numel()


@pytest.mark.parametrize("n,k,c", [(1, 3, 37), (5, 16, 32), (8, 20, 50), (2, 0, 5)])
def test_centre_taps_filter_gradient_kernel(n, k, c):
    """``_centre_taps_wgrad(dy, x)``: dy^T x as (K, C, 3, 3) filters, zero but the centre taps (C with a
    partial vector, one image, no filters), against float64; and its refusals."""
    pytest.importorskip("scnet_fused._C")
    from scnet_fused.ops import _cpp

    if not _cpp.has_kernel("_centre_taps_wgrad", "CPU"):
        pytest.skip("the CPU kernels are not built")
    dy, x = torch.randn(n, k), torch.randn(n, c)
    got = torch.ops.scnet_fused._centre_taps_wgrad(dy, x)
    want = torch.zeros(k, c, 3, 3, dtype=torch.float64)
    want[:, :, 1, 1] = dy.double().t() @ x.double()
    assert got.shape == (k, c, 3, 3) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    assert torch.count_nonzero(got) == torch.count_nonzero(got[:, :, 1, 1])
    with pytest.raises(RuntimeError, match="float32"):
        torch.ops.scnet_fused._centre_taps_wgrad(dy.double(), x.double())
    with pytest.raises(RuntimeError, match="one batch size"):
        torch.ops.scnet_fused._centre_taps_wgrad(dy, torch.randn(n + 1, c))
    with pytest.raises(RuntimeError, match="2-D"):
        torch.ops.scnet_fused._centre_taps_wgrad(dy.view(n, k, 1), x)


def test_k2_centre_taps_backward_takes_the_kernel_on_float32_cpu():
    """The fused SCConv's training backward on a 1x1 pooled map writes k2's filter gradient with
    ``_centre_taps_wgrad`` (float32 CPU), and the gradient is the reference's."""
    from scnet_fused.ops import _cpp

    if not _cpp.has_kernel("_centre_taps_wgrad", "CPU"):
        pytest.skip("the CPU kernels are not built")
    ref, fused = _pair(R.SCConv, 8, 8, 1, 1, 1, 1, 4, nn.BatchNorm2d)
    randomize_norms(ref)
    fused.load_state_dict(ref.state_dict())
    x, dy = torch.randn(12, 8, 5, 6), torch.randn(12, 8, 5, 6)
    with torch.profiler.profile() as prof:
        gf = torch.autograd.grad(fused(x), fused.k2[1].weight, dy)[0]
    assert "scnet_fused::_centre_taps_wgrad" in {e.name for e in prof.events()}
    gr = torch.autograd.grad(ref(x), ref.k2[1].weight, dy)[0]
    ref64 = copy.deepcopy(ref).double()
    g64 = torch.autograd.grad(ref64(x.double()), ref64.k2[1].weight, dy.double())[0]
    # a random cotangent (a loss like y.square().sum() is ill-conditioned through k2's batch statistics:
    # both float32 models there are about 5e-4 of the largest element off float64); here both are
    # within 1e-6, and a wrong product is off by the order of the gradient
    scale = g64.abs().max().item()
    for g in (gr, gf):
        assert (g.double() - g64).abs().max().item() <= 1e-5 * scale
    assert torch.count_nonzero(gf) == torch.count_nonzero(gf[:, :, 1, 1]) > 0


def test_k2_centre_taps_product_first_and_second_derivatives():
    """The centre-tap product's own backward (the filters' gradient zero-padded in one pass) against
    finite differences in float64, and its double backward (a backward with create_graph), and through
    the fused SCConv: an input-gradient penalty on a 1x1 pooled map gives the reference's gradients."""
    from scnet_fused.modules import _CentreTaps

    x2d = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 5, 3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(_CentreTaps.apply, (x2d, w))
    assert torch.autograd.gradgradcheck(_CentreTaps.apply, (x2d, w))
    ref, fused = _pair(R.SCConv, 8, 8, 1, 1, 1, 1, 4, nn.BatchNorm2d)
    randomize_norms(ref)
    fused.load_state_dict(ref.state_dict())
    x = torch.randn(3, 8, 6, 6)
    grads = []
    # the reference in float64 is the truth: the second derivatives through batch statistics of three
    # values amplify float32 rounding, so the float32 reference is itself off by up to about 1e-3 of a
    # gradient's largest element; the fused one must be as close to the truth as the reference is
    for m, xm in ((ref, x), (fused, x), (copy.deepcopy(ref).double(), x.double())):
        xx = xm.clone().requires_grad_()
        (gx,) = torch.autograd.grad(m(xx).square().sum(), xx, create_graph=True)
        grads.append(torch.autograd.grad(gx.square().sum(), [xx] + list(m.parameters())))
    names = ["input"] + [n for n, _ in fused.named_parameters()]
    for name, r32, f32, r64 in zip(names, *grads):
        scale = r64.abs().max().item()
        ref_err, fused_err = ((t.double() - r64).abs().max().item() for t in (r32, f32))
        assert fused_err <= 2 * ref_err + 1e-4 * scale + 1e-6, (name, fused_err, ref_err, scale)
    assert grads[1][names.index("k2.1.weight")][:, :, 1, 1].abs().sum() > 0


def test_k2_centre_taps_follow_every_edit_of_the_filters():
    """k2's centre taps on a 1x1 pooled map are taken from the filters on every call: an in-place change
    (an optimizer step, an edit through .data that leaves the version counter alone) or a new weight
    tensor is seen on the next call, at inference and with autograd on (where the taps' gradient flows)."""
    ref, fused = _pair(R.SCConv, 8, 8, 1, 1, 1, 1, 4, nn.BatchNorm2d)
    randomize_norms(ref)
    fused.load_state_dict(ref.state_dict())
    ref.eval(), fused.eval()
    x = torch.randn(3, 8, 6, 6)
    conv2 = fused.k2[1]
    with torch.no_grad():
        torch.testing.assert_close(fused(x), ref(x), rtol=1e-4, atol=1e-5)
        for m in (ref, fused):
            m.k2[1].weight.mul_(-2.0)  # in place, as an optimizer step
        torch.testing.assert_close(fused(x), ref(x), rtol=1e-4, atol=1e-5)
    for m in (ref, fused):
        m.k2[1].weight.data[:, :, 1, 1] += 0.5  # through .data: the parameter's version is unchanged
    with torch.no_grad():
        torch.testing.assert_close(fused(x), ref(x), rtol=1e-4, atol=1e-5)
        w = torch.randn_like(conv2.weight)
        conv2.weight, ref.k2[1].weight = nn.Parameter(w.clone()), nn.Parameter(w.clone())
        torch.testing.assert_close(fused(x), ref(x), rtol=1e-4, atol=1e-5)
    fused(x).sum().backward()
    assert conv2.weight.grad[:, :, 1, 1].abs().sum() > 0


@pytest.mark.parametrize("size", [(15, 17), (14, 14)])
@pytest.mark.parametrize("train", [True, False])
def test_strided_1x1_downsample_reads_the_subsampled_pixels(size, train, monkeypatch):
    """A plain 1x1 convolution with stride 2 (the downsample of a stage's first block) runs on
    x[:, :, ::2, ::2] at stride 1 on the CPU: the strided convolution's output and gradients, odd sizes
    included; the path is taken in training and at inference (BatchNorm folded)."""
    from scnet_fused import modules

    taken = []
    real = modules._subsampled
    monkeypatch.setattr(modules, "_subsampled", lambda conv, x: taken.append(tuple(x.shape)) or real(conv, x))
    conv = nn.Conv2d(8, 16, 1, stride=2, bias=False)
    bn = nn.BatchNorm2d(16)
    bn.running_mean.normal_()
    bn.running_var.uniform_(0.5, 2.0)
    seq = nn.Sequential(conv, bn).train(train)
    ref = copy.deepcopy(seq)
    x = torch.randn(3, 8, *size)
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = modules._seq_conv_bn(seq, a), ref(b)
    torch.testing.assert_close(ya, yb, rtol=1e-5, atol=1e-6)
    g = torch.randn_like(ya)
    ya.backward(g)
    yb.backward(g)
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(conv.weight.grad, ref[0].weight.grad, rtol=1e-5, atol=1e-5)
    assert taken == [(3, 8) + size]
    if not train:
        with torch.no_grad():
            torch.testing.assert_close(modules._seq_conv_bn(seq, x), ref(x), rtol=1e-5, atol=1e-5)
        assert len(taken) == 2  # the folded inference path too


@pytest.mark.parametrize("kind", ["bottleneck", "scconv"])
@pytest.mark.parametrize("reentrant", [True, False])
def test_under_activation_checkpointing(reentrant, kind):
    """torch.utils.checkpoint over a fused bottleneck or SCConv with the recomputation's early stop off
    (the whole function recomputed): outputs, gradients and running statistics as the reference's (the
    early stop: the test below)."""
    from torch.utils.checkpoint import checkpoint, set_checkpoint_early_stop

    torch.manual_seed(0)
    if kind == "bottleneck":
        down = nn.Sequential(nn.Conv2d(32, 64, 1, bias=False), nn.BatchNorm2d(64))
        ref = R.SCBottleneck(32, 16, downsample=down, norm_layer=nn.BatchNorm2d)
    else:
        ref = R.SCConv(32, 32, 1, 1, 1, 1, 4, nn.BatchNorm2d)
    randomize_norms(ref)
    x = torch.randn(2, 32, 18, 20)
    runs = []
    for m in (copy.deepcopy(ref), scnet_fused.convert(copy.deepcopy(ref))):
        xi = x.clone().requires_grad_()
        with set_checkpoint_early_stop(False):
            out = checkpoint(m.train(), xi, use_reentrant=reentrant)
        (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(1))).sum().backward()
        runs.append((out.detach(), xi.grad, [p.grad for p in m.parameters()], list(m.buffers())))
    (oa, ga, pa, ba), (ob, gb, pb, bb) = runs
    torch.testing.assert_close(ob, oa, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gb, ga, rtol=1e-4, atol=1e-4)
    for a, b in zip(pa, pb):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4 * max(1.0, a.abs().max().item()))
    for a, b in zip(ba, bb):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tail", ["none", "scaled", "view", "relu"])
@pytest.mark.parametrize("kind", ["bottleneck", "scconv"])
def test_checkpoint_early_stop_updates_every_norm_as_the_reference(kind, tail):
    """torch.utils.checkpoint without reentrance and with the recomputation's early stop on (PyTorch's
    default), the function ending with a fused bottleneck / SCConv, or with ops after it that save
    nothing for backward (a scale, a view) or something (a ReLU): every BatchNorm's running statistics
    as the reference's under the same checkpoint (two updates each). The fused bn3 / k4 BatchNorm saves
    before its update; without the mark saved after the update, the recomputation stopped before it
    (one update, running_mean off by up to 0.07 here)."""
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    if kind == "bottleneck":
        ref = R.SCBottleneck(32, 8, norm_layer=nn.BatchNorm2d)
    else:
        from scnet_fused.ops import _cpp

        if not _cpp.has_autograd_ops():
            pytest.skip("no compiled C++ autograd ops: k4's BatchNorm runs as the module")
        ref = R.SCConv(32, 32, 1, 1, 1, 1, 4, nn.BatchNorm2d)
    randomize_norms(ref)
    after = {"none": lambda t: t, "scaled": lambda t: t * 2.0, "view": lambda t: t.view(-1), "relu": torch.relu}[tail]
    x = torch.randn(2, 32, 18, 20)
    stats = []
    for m in (copy.deepcopy(ref).train(), scnet_fused.convert(copy.deepcopy(ref)).train()):
        out = checkpoint(lambda t: after(m(t)), x.clone().requires_grad_(), use_reentrant=False)
        out.sum().backward()
        stats.append({k: v for k, v in m.state_dict().items() if k.endswith(("running_mean", "running_var",
                                                                               "num_batches_tracked"))})
    want, got = stats
    assert got.keys() == want.keys() and all(v.item() == 2 for k, v in want.items() if k.endswith("tracked"))
    for key, value in got.items():
        torch.testing.assert_close(value, want[key], rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.parametrize("kind", ["bottleneck", "scconv"])
def test_checkpoint_early_stop_with_a_frozen_block_after_the_last_save(kind):
    """A checkpointed function whose last part is a frozen training block on an input without grad:
    nothing there is saved (in the reference or the fused block), so the early-stopped recomputation
    ends before it and its BatchNorms get one update in both; a mark made whatever the op saved gave
    the fused block two."""
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    ref = R.SCBottleneck(32, 8, norm_layer=nn.BatchNorm2d) if kind == "bottleneck" else \
        R.SCConv(32, 32, 1, 1, 1, 1, 4, nn.BatchNorm2d)
    randomize_norms(ref)
    w, img = torch.randn(2, 32, 12, 12), torch.randn(2, 32, 12, 12)
    stats = []
    for m in (copy.deepcopy(ref).train(), scnet_fused.convert(copy.deepcopy(ref)).train()):
        m.requires_grad_(False)
        checkpoint(lambda a, b: torch.sigmoid(a).sum() + m(b).sum(), w.clone().requires_grad_(), img,
                   use_reentrant=False).backward()
        stats.append({k: v for k, v in m.state_dict().items() if k.endswith(("running_mean", "running_var",
                                                                               "num_batches_tracked"))})
    want, got = stats
    assert all(v.item() == 1 for k, v in want.items() if k.endswith("tracked"))
    for key, value in got.items():
        torch.testing.assert_close(value, want[key], rtol=1e-5, atol=1e-6, msg=key)


def test_mark_after_a_statistics_update_only_under_saved_tensor_hooks():
    """The mark of a running-statistics update (an empty tensor saved for backward) is made only where
    saved-tensor hooks are active, with grad mode on: a fused bottleneck's forward packs exactly one
    tensor more per updated BatchNorm than its saved tensors without the mark, and none at all under
    no_grad."""
    torch.manual_seed(0)
    m = scnet_fused.convert(R.SCBottleneck(32, 8, norm_layer=nn.BatchNorm2d)).train()
    x = torch.randn(2, 32, 18, 20, requires_grad=True)
    packed = []

    def pack(t):
        packed.append(t.numel())
        return t

    with mock.patch.object(modules, "_save_after_update", wraps=modules._save_after_update) as marked, \
            torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        m(x)
    assert marked.call_count == 7  # once for each of the block's seven BatchNorms (bn1_a ... bn3)
    assert packed.count(0) == 2 * marked.call_count  # (mark * mark: two packs)
    packed.clear()
    with torch.no_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        m(x)
    assert packed == []
    with mock.patch.object(modules, "_top_saved_hooks", None):  # an older torch without the query
        packed.clear()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            m(x)
        assert packed.count(0) == 0


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("norm", ["default", "momentum_none", "no_affine", "no_running_stats"])
def test_scconv_k4_batchnorm_from_the_package_kernels(norm, channels_last):
    """A standalone SCConv's k4 BatchNorm in training, on a float32 CPU tensor: the C++ op _bn_train_ag
    (the one-call BatchNorm kernels without the ReLU) instead of ATen's BatchNorm, with the reference's
    outputs, gradients and running statistics over two steps, for each BatchNorm configuration."""
    import functools

    from scnet_fused.ops import _cpp

    if not _cpp.has_autograd_ops():
        pytest.skip("no compiled C++ autograd ops")
    kw = {"default": {}, "momentum_none": {"momentum": None}, "no_affine": {"affine": False},
          "no_running_stats": {"track_running_stats": False}}[norm]
    ref, fused = _pair(R.SCConv, 8, 8, 1, 1, 1, 1, 4, functools.partial(nn.BatchNorm2d, **kw))
    randomize_norms(ref)
    fused.load_state_dict(ref.state_dict())
    x = torch.randn(3, 8, 13, 11)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.profiler.profile() as prof:
        _step_and_compare(ref.train(), fused.train(), x, steps=2)
    assert "scnet_fused::_bn_train_ag" in {e.name for e in prof.events()}
    with torch.no_grad():
        out = fused(x)
    assert out.is_contiguous(memory_format=torch.channels_last) == channels_last


def test_k4_batchnorm_op_bad_input_is_a_clear_error():
    """_bn_train_ag refuses what its kernels do not take, naming it, before any kernel runs."""
    from scnet_fused.ops import _cpp

    if not _cpp.has_autograd_ops():
        pytest.skip("no compiled C++ autograd ops")
    op = torch.ops.scnet_fused._bn_train_ag
    t, w, b = torch.randn(2, 3, 4, 4), torch.ones(3), torch.zeros(3)
    with pytest.raises(RuntimeError, match="CPU tensors only"):
        op(t.to("meta"), w.to("meta"), b.to("meta"), 1e-5)
    with pytest.raises(RuntimeError, match="4-D t with elements in every channel"):
        op(t[0], w, b, 1e-5)
    with pytest.raises(RuntimeError, match="weight and bias must be 1-D of t's 3 channels"):
        op(t, torch.ones(4), b, 1e-5)
    with pytest.raises(RuntimeError, match="4-D t with elements in every channel"):
        op(t[:0], w, b, 1e-5)


def test_convert_in_place_of_a_root_scconv_returns_the_fused_module_sharing_its_parameters():
    """A model that is itself an SCConv cannot become another object: convert(inplace=True) returns a new
    fused module that holds the very same submodules and parameters (so an optimizer built on the
    original's parameters still trains it)."""
    ref = R.SCConv(8, 8, 1, 1, 1, 1, 4, nn.BatchNorm2d)
    new = scnet_fused.convert(ref, inplace=True)
    assert isinstance(new, scnet_fused.SCConv) and new is not ref
    assert {id(p) for p in new.parameters()} == {id(p) for p in ref.parameters()}
    assert new.k3[1] is ref.k3[1]


def test_strided_downsample_with_few_channels_in_channels_last_trains():
    """A stage's first block with a strided 1x1 downsample of fewer than 16 input channels on a
    channels_last float32 CPU map: oneDNN's weight gradient of that convolution writes past its
    workspace (IC below its channel block, stride 2: 8 or 12 input channels into 16 at 3x22x20
    crashed torch 2.14.1 on an AVX-512 Xeon). The fused block runs it as the stride-1 convolution of
    the subsampled view, and its gradients match the reference's in float64 (which takes ATen's own
    double convolution)."""
    torch.manual_seed(0)
    ds = nn.Sequential(nn.Conv2d(8, 16, 1, 2, bias=False), nn.BatchNorm2d(16))
    ref = R.SCBottleneck(8, 4, 2, ds, 1, 32, True, 1, False, nn.BatchNorm2d)
    randomize_norms(ref)
    fused = scnet_fused.convert(copy.deepcopy(ref))
    ref64 = copy.deepcopy(ref).double()
    x = torch.randn(3, 8, 22, 20).contiguous(memory_format=torch.channels_last)
    dy = torch.randn(3, 16, 11, 10)
    got, want = [], []
    for m, xx, out in ((fused, x, got), (ref64, x.double(), want)):
        xi = xx.clone().requires_grad_()
        y = m(xi)
        out.extend([y.detach()] + list(torch.autograd.grad(y, [xi] + list(m.parameters()), dy.to(y.dtype))))
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w, rtol=1e-4, atol=1e-4 * w.abs().max().item() + 1e-6)
